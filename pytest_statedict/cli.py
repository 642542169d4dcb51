"""``statedict show PATH`` and ``statedict diff A B``: checkpoints and snapshots, headers only.

Exit codes for ``diff``: 0 equal, 1 different, 2 bad input (a message on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .errors import StateDictError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="statedict",
        description="Show and diff PyTorch checkpoints and statedict snapshots without "
        "loading their tensor data.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="the layer table of a checkpoint or snapshot")
    show.add_argument("path", help="a checkpoint file or folder, or a snapshot .json")
    show.add_argument("--json", action="store_true", help="print the schema as snapshot JSON")
    show.add_argument("--part", help="one entry of a general checkpoint, e.g. modelB_state_dict")
    diff = commands.add_parser("diff", help="the schema diff of two checkpoints or snapshots")
    diff.add_argument("expected", help="the old checkpoint or snapshot (the reference)")
    diff.add_argument("actual", help="the new one, compared against the reference")
    diff.add_argument("--expected-part", metavar="PART", help="one entry of EXPECTED (see show)")
    diff.add_argument("--actual-part", metavar="PART", help="one entry of ACTUAL (see show)")
    diff.add_argument("-v", "--verbose", action="store_true", help="show every line")
    _add_release_commands(commands)
    args = parser.parse_args(argv)
    try:
        if args.command in RELEASE_COMMANDS:
            return RELEASE_COMMANDS[args.command](args)
        if args.command == "show":
            return _show(args.path, as_json=args.json, part=args.part)
        return _diff(
            args.expected,
            args.actual,
            verbose=args.verbose,
            parts=(args.expected_part, args.actual_part),
        )
    except StateDictError as exc:
        print(f"statedict: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # never exit 1 ("different") nor with a traceback on a crash
        print(
            f"statedict: {args.command} failed unexpectedly ({type(exc).__name__}: "
            f"{str(exc).strip()[:300]}); this is a bug in pytest-statedict or in what it "
            "calls, please report it with the file that caused it",
            file=sys.stderr,
        )
        return 2


def _show(path: str, *, as_json: bool, part: str | None) -> int:
    from .extract import schema_of

    schema = schema_of(path, part=part)
    if as_json:
        sys.stdout.write(schema.to_json())
        return 0
    print(render_table(schema))
    return 0


def render_table(schema: object) -> str:
    """Name, shape, dtype, kind and element count per key, aligned, then the totals."""
    from .compare import UNKNOWN_CLASS
    from .schema import Schema

    assert isinstance(schema, Schema)
    rows = [("name", "shape", "dtype", "kind", "elements")]
    for t in schema.tensors:
        if t.kind == "object":
            rows.append((t.key, "", t.type or "", "object", ""))
            continue
        kind = t.kind + (" (frozen)" if t.kind == "parameter" and t.requires_grad is False else "")
        if t.tied_to:
            kind += f" = {t.tied_to}"
        rows.append((t.key, "x".join(map(str, t.shape or ())) or "()", t.dtype or "", kind,
                     f"{t.numel:,}"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(
            (cell.rjust(widths[i]) if i == 4 else cell.ljust(widths[i]))
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
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
    if schema.saved_on:
        lines.append(f"saved on: {', '.join(schema.saved_on)}")
    if schema.optimizer is not None:
        opt = schema.optimizer
        cls = "class unknown (a bare state_dict)" if opt.cls == UNKNOWN_CLASS else opt.cls
        lines.append(
            f"optimizer: {cls}, {len(opt.param_groups)} param_group(s), state for "
            f"{len(opt.state)} parameter(s)"
        )
        for i, group in enumerate(opt.param_groups):
            hyper = json.dumps(dict(group.hyperparams), sort_keys=True)
            lines.append(f"  group {i}: {len(group.params)} params {hyper}")
    if schema.extras:
        lines.append("other entries: " + ", ".join(f"{k} ({v})" for k, v in schema.extras.items()))
    lines.extend(f"warning: {note}" for note in schema.notes)
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def _diff(
    expected: str, actual: str, *, verbose: bool, parts: tuple[str | None, str | None]
) -> int:
    from .compare import diff_schemas
    from .extract import schema_of
    from .report import render_diff

    found = diff_schemas(schema_of(expected, part=parts[0]), schema_of(actual, part=parts[1]))
    if not found:
        print(f"no difference: {expected} and {actual} have the same schema")
        return 0
    print(render_diff(found, title=f"{actual} differs from {expected}:", verbose=verbose,
                      rename_direction="expected->actual"))  # fmt: skip
    return 1


# ---- release history: `statedict record` and `statedict history` ------------------------


def _add_release_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    record = commands.add_parser(
        "record", help="write a release snapshot of a checkpoint (never over an existing one)"
    )
    record.add_argument("checkpoint", help="the release's checkpoint file or folder")
    record.add_argument("--release", required=True, metavar="NAME", help="e.g. v1.2.0")
    record.add_argument("--part", help="one entry of a general checkpoint, e.g. model_state_dict")
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

    from .releases import project_dir, record_into

    base, folder = (Path.cwd(), Path(args.dir)) if args.dir else project_dir()
    path = record_into(folder, args.release, args.checkpoint, base=base, part=args.part)
    print(f"recorded release {args.release} in {os.path.relpath(path)}: commit it")
    return 0


def _history(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .releases import history, project_dir

    folder = Path(args.dir) if args.dir else project_dir()[1]
    print(history(folder))
    return 0


RELEASE_COMMANDS = {"record": _record, "history": _history}


if __name__ == "__main__":
    raise SystemExit(main())
