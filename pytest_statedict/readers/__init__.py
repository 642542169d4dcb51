"""The file readers: one module per checkpoint format, below everything else in the package.

Where a format is read (each module's docstring says what it may unpickle and its limits;
which reader reads a path is the format registry's choice, in ``pytest_statedict.formats``):

* ``torch_zip``: ``torch.save`` zip archives (and TorchScript archives, recognised and refused);
* ``torch_legacy``: legacy (pre-1.6) ``torch.save`` pickles;
* ``safetensors_file``: ``.safetensors`` files, from their JSON header;
* ``hf_index``: Hugging Face sharded checkpoints (``*.index.json``);
* ``dcp_folder``: ``torch.distributed.checkpoint`` folders, from their ``.metadata``;
* ``peft_adapter``: PEFT adapter folders' ``adapter_config.json`` (their weights file is
  read by its own reader);
* ``snapshot_file``: statedict snapshot ``.json`` files;
* ``unpickling``: the one policy for every pickle (what may be unpickled, and how);
* ``records``: what the torch-free unpicklers build instead of tensors, storages and DCP
  metadata (the command line reads files without importing torch);
* ``limits``: every size, depth and count a hostile file could blow up;
* ``files``: what every reader checks first (a regular file, read within a bound).

Readers import only ``errors``, ``schema``, each other, the standard library and (lazily,
inside functions) torch: they return raw objects or schema entries, which the formats
(``pytest_statedict.formats``, one per reader) and ``extract`` make schemas of. This
package imports nothing at start-up.
"""
