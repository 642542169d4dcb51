"""Every limit the readers put on a file, in one place.

A hostile or corrupt file may claim any size, nesting or count in its headers: each claim is
checked against these bounds *before* anything is allocated or parsed, so that reading any
file costs memory bounded by what the limits allow (and by its number of tensors), never by
what the file says about itself. The bounds are far above anything a real checkpoint or
snapshot needs. This module is a leaf (it imports nothing), so ``schema.py`` uses it too.
"""

from __future__ import annotations

# A pickle read whole before it is unpickled: a torch.save archive's data.pkl, a DCP
# .metadata. Real ones hold ~100 bytes per tensor.
MAX_PICKLE_BYTES = 256 << 20
# ... and a torch.save archive's data.pkl within a fixed allowance plus one per storage
# record: ~100-300 bytes describe a tensor, so a pickle much larger than its records need
# holds something else (torch's weights-only unpickler spends ~140 bytes of memory and ~2 us
# per byte of nested empty lists).
PICKLE_BYTES_BASE = 8 << 20
PICKLE_BYTES_PER_RECORD = 16 << 10
# Operations of the DCP metadata unpickler (each makes at most one small object): a real
# .metadata takes ~110 per tensor, so 4M is ~36k tensors; a hostile one stops within ~8 s
# and ~450 MB here.
MAX_PICKLE_OPS = 4 << 20
# Records in a torch.save zip archive (one per storage, plus a few), and the bytes of its
# central directory (read whole by zipfile).
MAX_RECORDS = 1 << 20
MAX_CENTRAL_DIRECTORY_BYTES = 512 << 20
# A .safetensors JSON header: the cap safetensors itself enforces.
MAX_HEADER_BYTES = 100 << 20
# A Hugging Face sharded-checkpoint index (*.index.json).
MAX_INDEX_BYTES = 64 << 20
# A PEFT adapter's adapter_config.json (~2 kB; a long target_modules list stays far below).
MAX_ADAPTER_CONFIG_BYTES = 16 << 20
# A statedict snapshot .json (one line per tensor: ~100k tensors fit in ~30 MB).
MAX_SNAPSHOT_BYTES = 256 << 20
# JSON arrays and objects in one file, counted by their opening brackets before parsing
# (each costs ~100 bytes parsed, strings' brackets count too): a snapshot has ~3 a tensor.
MAX_JSON_CONTAINERS = 4 << 20
# Nesting of JSON arrays and objects (a snapshot needs 5, a safetensors header 3).
MAX_JSON_DEPTH = 64
# Dimensions of a tensor (torch allows at most 64), and the size of one dimension (int64).
MAX_DIMS = 64
MAX_DIM = (1 << 63) - 1
