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
# What unpickling one pickle may cost, charged as it runs in units of about a byte of
# memory: each opcode the memory of what it makes, and at least what its dispatch costs in
# time (``unpickling.OPCODE_COST``); each call of an allowed callable (``bytearray(n)``,
# ``Counter(s)``, ``torch.Size(b)``, a rebuild function...) and each BUILD what it allocates
# and iterates, charged *before* it runs, and a memo'd argument at every use. One budget a
# pickle: a torch.save ``data.pkl`` gets a fixed allowance plus one per storage of at least
# one byte it refers to (an empty record raises nothing); a real one spends ~2.3 kB a
# tensor. A DCP .metadata gets one fixed allowance (a real one spends ~11 kB an entry, so
# ~48k entries fit); a DCP folder's non-tensor entries share one base allowance.
# Spent, the pickle is refused: each hostile file of tests/test_hostile_cost.py adds at most
# ~60 MiB to the peak memory of the process and ~0.3 s of CPU (asserted under 160 MiB and
# 3 s), beside what its storages' allowances add (16 kB each).
PICKLE_COST_BASE = 64 << 20
PICKLE_COST_PER_STORAGE = 16 << 10
DCP_METADATA_COST = 512 << 20
# Opcodes the refusal explainer and the library scan read of a pickle: the globals a
# refused pickle names are near its start (where torch stopped), and reading them all would
# take ~0.2 s a million opcodes of a pickle of up to MAX_PICKLE_BYTES.
MAX_SCANNED_OPS = 1 << 20
# Tensor entries in a statedict snapshot, counted before it is parsed: each costs ~1.3 kB
# and ~15 us to parse and validate, and a failing gate's verdict ~0.15 ms (rename pairing
# most of it), so 128k are ~0.2 GB and ~2 s to `show`, ~20 s to a gate. Real models have
# far fewer (the largest mixture-of-experts checkpoints: ~90k).
MAX_SNAPSHOT_TENSORS = 1 << 17
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
# The bytes a value fingerprint may copy out of a view that repeats its storage (stride 0:
# ``torch.zeros(1).expand(2**31)``, a 1.7 kB file, is 8 GB copied); a view within its
# storage (a transpose) is copied whatever its size, as a tensor's hash reads every byte.
MAX_VIEW_COPY_BYTES = 64 << 20
# Dimensions of a tensor (torch allows at most 64), and the size of one dimension (int64).
MAX_DIMS = 64
MAX_DIM = (1 << 63) - 1
