"""``statedict show PATH`` and ``statedict diff A B``: checkpoints and snapshots, headers only.

Exit codes for ``diff``: 0 equal, 1 different, 2 bad input (a message on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import StateDictError
from .printable import printable, printable_message
from .schema import Schema
from .schema_entries import TensorEntry

if TYPE_CHECKING:
    from .compare import ModelVerdict

# The opt-in to full unpickling (``weights_only=False``): a whole pickled model
# (``torch.save(model)``) is read only through it, and never without a warning.
UNSAFE_UNPICKLE = "--unsafe-unpickle"
UNSAFE_HELP = (
    "unpickle the file fully (torch.load weights_only=False), e.g. a whole pickled model "
    "saved with torch.save(model): this runs code from the file, only for files you trust"
)
# How the readers' refusal of such a file names the API's opt-in, which the command line
# names as its own flag instead.
API_OPT_IN = "pass weights_only=False by name"


class PrintVersion(argparse.Action):
    """``--version``, looked up only when asked for: argparse's own version action wants the
    string when the parser is built, which would read the package metadata on every command
    (see :mod:`.distribution`)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from .distribution import version_line

        print(version_line())
        parser.exit()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="statedict",
        description="Show and diff PyTorch checkpoints and statedict snapshots without "
        "loading their tensor data.",
    )
    parser.add_argument(
        "--version", action=PrintVersion, help="print the version of pytest-statedict and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="the layer table of a checkpoint or snapshot")
    show.add_argument("path", help="a checkpoint file or folder, or a snapshot .json")
    show.add_argument("--json", action="store_true", help="print the schema as snapshot JSON")
    show.add_argument("--part", help="one entry of a general checkpoint, e.g. modelB_state_dict")
    show.add_argument(
        "--tree",
        action="store_true",
        help="group the keys by module (dotted prefixes), with elements and bytes per module",
    )
    show.add_argument(UNSAFE_UNPICKLE, action="store_true", help=UNSAFE_HELP)
    diff = commands.add_parser("diff", help="the schema diff of two checkpoints or snapshots")
    diff.add_argument("expected", help="the old checkpoint or snapshot (the reference)")
    diff.add_argument("actual", help="the new one, compared against the reference")
    diff.add_argument("--expected-part", metavar="PART", help="one entry of EXPECTED (see show)")
    diff.add_argument("--actual-part", metavar="PART", help="one entry of ACTUAL (see show)")
    diff.add_argument("-v", "--verbose", action="store_true", help="show every line")
    diff.add_argument(
        "--model",
        metavar="MODULE:FUNCTION",
        help="a function that builds today's model (e.g. mypkg.models:make_model): the old "
        "checkpoint is then loaded through it, as the gate loads it, to say whether it loads",
    )
    diff.add_argument(UNSAFE_UNPICKLE, action="store_true", help=UNSAFE_HELP)
    _add_release_commands(commands)
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a name that is no valid Unicode, escaped
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    unsafe = getattr(args, "unsafe_unpickle", False)
    if unsafe:
        print(
            f"statedict: warning: {UNSAFE_UNPICKLE} unpickles the files fully, which runs any "
            "code they hold: use it only for files you trust",
            file=sys.stderr,
        )
    try:
        if args.command in RELEASE_COMMANDS:
            return RELEASE_COMMANDS[args.command](args)
        if args.command == "show":
            return _show(
                args.path, as_json=args.json, part=args.part, tree=args.tree, unsafe=unsafe
            )
        return _diff(
            args.expected,
            args.actual,
            verbose=args.verbose,
            parts=(args.expected_part, args.actual_part),
            model=args.model,
            unsafe=unsafe,
        )
    except StateDictError as exc:  # its message escapes what it quotes of the input
        text = str(exc).replace(API_OPT_IN, f"pass {UNSAFE_UNPICKLE} (it runs code from the file)")
        print(f"statedict: {text}", file=sys.stderr)
        return 2
    except Exception as exc:  # never exit 1 ("different") nor with a traceback on a crash
        print(
            f"statedict: {args.command} failed unexpectedly ({type(exc).__name__}: "
            f"{printable_message(str(exc).strip()[:300])}); this is a bug in pytest-statedict "
            "or in what it calls, please report it with the file that caused it",
            file=sys.stderr,
        )
        return 2


def _show(
    path: str, *, as_json: bool, part: str | None, tree: bool = False, unsafe: bool = False
) -> int:
    schema = _schema_of_file(path, part=part, unsafe=unsafe)
    if as_json:
        sys.stdout.write(schema.to_json())
        return 0
    print(render_tree(schema) if tree else render_table(schema))  # every field escaped
    return 0


def _say(text: str) -> None:
    """Print a report: each name in it is escaped already (:func:`printable`); what it
    quotes whole (a load error, a load hook's or a custom comparison's words) is escaped
    here, so that no character from a file reaches the terminal raw."""
    print(printable_message(text, lines=True))


def _schema_of_file(path: str, *, part: str | None, unsafe: bool) -> Schema:
    """The schema of a file as the command line reads it: without torch where it can, or,
    with :data:`UNSAFE_UNPICKLE`, loaded by torch with ``weights_only=False``."""
    if unsafe:
        from .extract import schema_of

        return schema_of(path, part=part, weights_only=False)
    from .torch_free import schema_of_file

    return schema_of_file(path, part=part)


def render_table(schema: Schema) -> str:
    """Name, shape, dtype, kind and element count per key, aligned, then the totals."""
    rows = [("name", "shape", "dtype", "kind", "elements")]
    for t in schema.tensors:
        key, dtype = printable(t.key), printable(t.dtype or "")
        if t.kind == "object":
            rows.append((key, "", printable(t.type or ""), "object", ""))
            continue
        rows.append((key, "x".join(map(str, t.shape or ())) or "()", dtype, _kind(t),
                     f"{t.numel:,}"))  # fmt: skip
    lines = _aligned(rows, numeric={4})
    totals = schema.totals
    lines.append("")
    known = any(t.kind == "parameter" for t in schema.tensors)
    lines.append(
        f"{len(schema.tensors)} keys, {totals['tensors']} tensors, {totals['elements']:,} "
        "elements, "
        + (
            f"{totals['parameters']:,} parameters ({totals['trainable']:,} trainable), "
            if known
            else ""
        )
        + _human_bytes(totals["bytes"])
    )
    return "\n".join(lines + _footer(schema))


def _footer(schema: Schema) -> list[str]:
    """Where it was saved, its optimizer, its other entries and the warnings."""
    lines = []
    if schema.framework:
        lines.append(f"framework: {printable(schema.framework)}")
    if schema.read_as:
        lines.append(f"read as: {printable_message(schema.read_as)}")
    if schema.saved_on:
        lines.append(f"saved on: {', '.join(map(printable, schema.saved_on))}")
    if schema.optimizer is not None:
        from .schema_entries import UNKNOWN_CLASS

        opt = schema.optimizer
        cls = (
            "class unknown (a bare state_dict)" if opt.cls == UNKNOWN_CLASS else printable(opt.cls)
        )
        lines.append(
            f"optimizer: {cls}, {len(opt.param_groups)} param_group(s), state for "
            f"{len(opt.state)} parameter(s)"
        )
        for i, group in enumerate(opt.param_groups):
            hyper = json.dumps(dict(group.hyperparams), sort_keys=True)
            lines.append(f"  group {i}: {len(group.params)} params {hyper}")
    if schema.extras:  # one a line: a scheduler's or a framework file's description is long
        lines.append("other entries:")
        lines.extend(f"  {printable(k)}: {printable(v)}" for k, v in schema.extras.items())
    lines.extend(f"warning: {printable_message(note)}" for note in schema.notes)
    return lines


class _Module:
    """A dotted prefix of the keys: its own entries, its submodules and their sums."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, TensorEntry]] = []
        self.children: dict[str, _Module] = {}
        self.elements = 0
        self.nbytes = 0

    def add(self, path: list[str], entry: TensorEntry) -> None:
        counted = entry.tied_to is None  # a tied storage counts once, as in the totals
        node = self
        for step in path[:-1]:
            if counted:
                node.elements += entry.numel
                node.nbytes += entry.nbytes
            node = node.children.setdefault(step, _Module())
        if counted:
            node.elements += entry.numel
            node.nbytes += entry.nbytes
        node.entries.append((path[-1], entry))


def render_tree(schema: Schema) -> str:
    """The keys grouped by module, like a torchinfo summary: each module (dotted prefix)
    with the elements and bytes of all it holds, its tensors under it; then the totals by
    role (trainable, frozen, buffers), where the schema knows them."""
    root = _Module()
    for t in schema.tensors:
        root.add(t.key.split("."), t)
    rows = [("module / key", "shape", "dtype", "kind", "elements", "size")]

    def walk(node: _Module, depth: int) -> None:
        indent = "  " * depth
        for name, t in node.entries:
            if t.kind == "object":
                rows.append((indent + printable(name), "", printable(t.type or ""), "object", "",
                             ""))  # fmt: skip
                continue
            kind = _kind(t)
            shape = "x".join(map(str, t.shape or ())) or "()"
            rows.append((indent + printable(name), shape, printable(t.dtype or ""), kind,
                         f"{t.numel:,}", _human_bytes(t.nbytes)))  # fmt: skip
        for name, child in node.children.items():
            rows.append((indent + printable(name), "", "", "module", f"{child.elements:,}",
                         _human_bytes(child.nbytes)))  # fmt: skip
            walk(child, depth + 1)

    walk(root, 0)
    numeric = {4, 5}
    lines = _aligned(rows, numeric)
    totals = schema.totals
    lines.append("")
    lines.append(
        f"total: {totals['elements']:,} elements in {totals['tensors']} tensors "
        f"({len(schema.tensors)} keys), {_human_bytes(totals['bytes'])}"
    )
    lines.append(_roles(schema))
    return "\n".join(lines + _footer(schema))


def _kind(t: TensorEntry) -> str:
    kind = t.kind + (" (frozen)" if t.kind == "parameter" and t.requires_grad is False else "")
    return kind + (f" = {printable(t.tied_to)}" if t.tied_to else "")


def _roles(schema: Schema) -> str:
    """Trainable, frozen and buffer elements; only a schema of a live model knows them."""
    counted = [t for t in schema.tensors if t.kind != "object" and t.tied_to is None]
    if not any(t.kind in ("parameter", "buffer") for t in counted):
        return (
            "trainable / frozen / buffers: not recorded (a checkpoint file does not say which "
            "tensors are parameters or require grad; a snapshot of a live model does)"
        )
    trainable = sum(t.numel for t in counted if t.kind == "parameter" and t.requires_grad)
    frozen = sum(t.numel for t in counted if t.kind == "parameter" and not t.requires_grad)
    buffers = sum(t.numel for t in counted if t.kind == "buffer")
    other = sum(t.numel for t in counted if t.kind == "tensor")
    text = f"trainable: {trainable:,}, frozen: {frozen:,}, buffers: {buffers:,} elements"
    return text + (f", other tensors: {other:,}" if other else "")


def _aligned(rows: Sequence[tuple[str, ...]], numeric: set[int]) -> list[str]:
    """The rows as columns (numbers right-aligned), a rule under the first (the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def _diff(
    expected: str,
    actual: str,
    *,
    verbose: bool,
    parts: tuple[str | None, str | None],
    model: str | None = None,
    unsafe: bool = False,
) -> int:
    from .compare import diff_schemas
    from .report import render_diff

    old = _schema_of_file(expected, part=parts[0], unsafe=unsafe)
    new = _schema_of_file(actual, part=parts[1], unsafe=unsafe)
    if model is None:
        found = diff_schemas(old, new)
        if found:
            found.model_verdict = _no_model()
    else:
        from .param_names import positions_named
        from .verdict import model_verdict

        today, today_optimizer = build_model(model)
        # today's model names today's positions (the file is what it saves)
        found = diff_schemas(old, positions_named(new, today, today_optimizer))
        found.model_verdict = model_verdict(today, old)  # asked for: decided even if equal
    refused = found.model_verdict is not None and found.model_verdict.loads is False
    if not found and not refused:
        print(f"no difference: {printable(expected)} and {printable(actual)} have the same schema")
        return 0
    title = f"{printable(actual)} differs from {printable(expected)}:"
    _say(render_diff(found, title=title, verbose=verbose, rename_direction="expected->actual"))
    return 1


def _no_model() -> ModelVerdict:
    from .compare import ModelVerdict

    return ModelVerdict(
        "", None, "no model to load into (--model MODULE:FUNCTION loads it through today's)"
    )


def build_model(spec: str) -> tuple[Any, Any]:
    """The model (and optimizer) that ``MODULE:FUNCTION`` builds: ``FUNCTION()`` returns a
    module, or a ``(module, optimizer)`` pair. The working directory is importable, as it
    is for ``python -m``."""
    import importlib

    from torch import nn

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise StateDictError(f"--model {spec!r}: expected MODULE:FUNCTION, e.g. mypkg.models:make")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
        for name in attribute.split("."):
            target = getattr(target, name)
    except (ImportError, AttributeError) as exc:
        raise StateDictError(f"--model {spec!r}: cannot be imported ({exc})") from None
    if not callable(target):
        raise StateDictError(f"--model {spec!r}: a {type(target).__name__}, not a function")
    try:
        built = target()
    except Exception as exc:
        raise StateDictError(
            f"--model {spec!r}: calling it raised {type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    model, optimizer = built if isinstance(built, tuple) and len(built) == 2 else (built, None)
    if not isinstance(model, nn.Module):
        raise StateDictError(
            f"--model {spec!r}: it returned a {type(model).__name__}, not a torch.nn.Module "
            "(or a (module, optimizer) pair)"
        )
    return model, optimizer


# ---- release history: `statedict record` and `statedict history` ------------------------


def _add_release_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    record = commands.add_parser(
        "record", help="write a release snapshot of a checkpoint (never over an existing one)"
    )
    record.add_argument("checkpoint", help="the release's checkpoint file or folder")
    record.add_argument("--release", required=True, metavar="NAME", help="e.g. v1.2.0")
    record.add_argument("--part", help="one entry of a general checkpoint, e.g. model_state_dict")
    record.add_argument(
        "--model",
        metavar="MODULE:FUNCTION",
        help="a function that builds the release's model (or a (model, optimizer) pair): it "
        "names the positions of the checkpoint's optimizer state, so that the release gate "
        "checks by name which parameter each state belongs to",
    )
    record.add_argument(UNSAFE_UNPICKLE, action="store_true", help=UNSAFE_HELP)
    record.add_argument(
        "--dir",
        metavar="DIR",
        help="the releases folder (default: statedict_releases_dir of the project's pytest "
        "config, else tests/__statedict__/releases, below the rootdir)",
    )
    history = commands.add_parser(
        "history", help="per release, the keys added, removed, renamed or reshaped"
    )
    history.add_argument("--dir", metavar="DIR", help="the releases folder (see record)")


def _record(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .releases import project_dir, record_into, refuse_recorded

    base, folder = (Path.cwd(), Path(args.dir)) if args.dir else project_dir()
    refuse_recorded(folder, args.release)  # before torch loads the model or the checkpoint
    model, optimizer = build_model(args.model) if args.model else (None, None)
    checkpoint: Any = args.checkpoint
    if args.unsafe_unpickle:
        checkpoint = _schema_of_file(args.checkpoint, part=args.part, unsafe=True)
    path = record_into(
        folder,
        args.release,
        checkpoint,
        base=base,
        part=None if args.unsafe_unpickle else args.part,
        names_from=model,
        names_optimizer=optimizer,
    )
    print(f"recorded release {args.release} in {printable(os.path.relpath(path))}: commit it")
    return 0


def _history(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .releases import history, project_dir

    folder = Path(args.dir) if args.dir else project_dir()[1]
    _say(history(folder))
    return 0


RELEASE_COMMANDS = {"record": _record, "history": _history}


if __name__ == "__main__":
    raise SystemExit(main())
