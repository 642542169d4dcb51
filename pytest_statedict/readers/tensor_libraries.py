"""Libraries whose tensor subclasses a ``torch.save`` file may hold, such as torchao's.

torchao's quantized weights (``Int8Tensor``...) are tensor subclasses: a state_dict of a
quantized model pickles them by their class (``torchao.quantization.Int8Tensor``), and
``torch.load(weights_only=True)`` rebuilds them only once torchao is imported, which puts
its classes on torch's allowlist (``torch.serialization.add_safe_globals``). Nothing
else imports it: not the plugin, nor ``statedict show``. So before such a file is loaded,
the library its pickle names is imported, if it is installed; if it is not, the error says
so ("needs torchao: ``pip install torchao``") instead of torch's refusal of an unknown
global.

The names are read from the pickle's ``GLOBAL`` opcodes without running it, and only the
libraries of :data:`LIBRARIES` are imported: a file never chooses what else is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ..errors import CheckpointError, first_line, hide_from_bad_input
from .unpickling import pickle_globals

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

# The top-level module of each library -> what installs it. Each registers its tensor
# subclasses as safe globals for torch.load when it is imported.
LIBRARIES = {"torchao": "torchao"}


def named_libraries(pickled: bytes) -> dict[str, list[str]]:
    """The libraries of :data:`LIBRARIES` whose classes a pickle names, with those names.

    A byte search first: the opcode walk (pure Python, ~1 s for a pickle of a million
    opcodes) runs only for a pickle that names one of them somewhere.
    """
    if not any(module.encode() in pickled for module in LIBRARIES):
        return {}
    found: dict[str, list[str]] = {}
    for name in pickle_globals(pickled):
        module = name.partition(".")[0]
        if module in LIBRARIES and name not in found.setdefault(module, []):
            found[module].append(name)
    return found


def import_named_libraries(path: Path, pickled: bytes) -> None:
    """Import each library whose tensors ``pickled`` holds, or say which one is missing."""
    for module, names in named_libraries(pickled).items():
        if sys.modules.get(module) is not None:  # imported (None: an import that was blocked)
            continue
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        if importlib.util.find_spec(module) is None:
            raise CheckpointError(
                path,
                f"it holds tensors of {module} ({shown}), which is not installed here: it needs "
                f"{module} to be read (`pip install {LIBRARIES[module]}`)",
            )
        try:
            importlib.import_module(module)
        except Exception as exc:  # a library that is installed but broken: its own error
            raise CheckpointError(
                path,
                f"it holds tensors of {module} ({shown}), which is installed but cannot be "
                f"imported ({type(exc).__name__}: {first_line(exc, 200)})",
            ) from None
