"""Names from a file reach the terminal escaped: no ESC/OSC sequence, bidi override or
newline a checkpoint chose is printed raw by ``statedict show``/``diff``/``history``, a
failing snapshot check, the refactor gate, the release gate or a bad-input error.

Every hostile name below is live: printed raw, the first retitles the terminal, the second
clears it, the third forges the first line of a traceback, the fourth shows the rest of
its line right to left.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from pytest_statedict import CheckpointError, schema_of
from pytest_statedict.cli import main
from pytest_statedict.compare import diff_schemas
from pytest_statedict.printable import printable, printable_message
from pytest_statedict.report import render_diff

OSC = "\x1b]0;pwned\x07"  # retitles the terminal
CLEAR = "\x1b[2J"  # clears it
FORGED = "a\nTraceback (most recent call last):"  # a forged traceback's first line
RLO = "\u202e"  # right-to-left override
HOSTILE = (OSC, CLEAR, FORGED, RLO)
# How each one prints: the escape, as written in Python source
ESCAPED = (r"\x1b]0;pwned\x07", r"\x1b[2J", r"a\nTraceback (most recent call last):", r"\u202e")


# ---- the function ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("encoder.layers.0.weight", "encoder.layers.0.weight"),
        ("编码器.权重", "编码器.权重"),  # any script's letters print as themselves
        ("café.poids", "café.poids"),
        (r"C:\Users\me\ckpt.pt", r"C:\Users\me\ckpt.pt"),  # no escape in it: as it is
        (OSC, r"\x1b]0;pwned\x07"),
        (FORGED, r"a\nTraceback (most recent call last):"),
        ("a\r\tb", r"a\r\tb"),
        (f"x{RLO}y", r"x\u202ey"),
        ("del\x7f c1\x85", r"del\x7f c1\x85"),  # DEL and C1 controls
        ("zero\u200bwidth", r"zero\u200bwidth"),  # invisible: two names would look alike
        ("line\u2028sep", r"line\u2028sep"),
        ("lone\udc80", r"lone\udc80"),  # a lone surrogate: no terminal can encode it
        ("\U000e0001tag", r"\U000e0001tag"),
        # a backslash that reads as an escape is escaped, so that the name differs in print
        # from the name holding the character: r"a\x1b" is not "a\x1b"
        (r"a\x1b", r"a\\x1b"),
        (r"a\n", r"a\\n"),
        ("back\\slash\x1b", r"back\\slash\x1b"),  # one escape: every backslash doubled
        (3, "3"),  # an optimizer's parameter index
    ],
)
def test_printable_escapes_what_does_not_print_as_itself(name: object, shown: str) -> None:
    assert printable(name) == shown


# What a printed name holds where it was escaped: a Python escape
AN_ESCAPE = re.compile(r"\\(?:[\\ntr]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")


def _read_back(shown: str) -> str:
    """The name a printed name stands for: itself, or, when it holds an escape, the string
    literal it spells (in which every backslash starts an escape)."""
    if not AN_ESCAPE.search(shown):
        return shown
    return str(ast.literal_eval("'" + shown.replace("'", "\\'") + "'"))


@given(st.text(st.characters(exclude_categories=()), max_size=12))
def test_printable_prints_every_name_on_one_line_and_no_two_names_alike(name: str) -> None:
    shown = printable(name)
    assert shown.isprintable()  # no control character, no newline, no surrogate
    assert _read_back(shown) == name  # so two names never print alike


def test_printable_message_keeps_backslashes_and_the_lines_it_is_told_to() -> None:
    quoted = f"shard {printable(FORGED)} and {OSC!r} in a path C:\\new"
    assert printable_message(quoted) == quoted  # escaped already: left as it is
    assert printable_message(f"one\n{CLEAR}") == r"one\n\x1b[2J"
    assert printable_message(f"one\n{CLEAR}", lines=True) == "one\n\\x1b[2J"


def test_a_checkpoint_error_is_one_paragraph_whatever_the_file_names(tmp_path: Path) -> None:
    error = CheckpointError(tmp_path / f"x{CLEAR}.pt", f"its shard {FORGED}{OSC} is missing")
    assert str(error) == (
        rf"checkpoint {tmp_path}/x\x1b[2J.pt: its shard a\nTraceback (most recent call last):"
        r"\x1b]0;pwned\x07 is missing"
    )
    assert error.problem == f"its shard {FORGED}{OSC} is missing"  # kept as it was


def test_a_suggested_rename_for_a_hostile_prefix_is_escaped_and_still_pastes() -> None:
    old = {f"layers.{i}.w": torch.zeros(i + 1) for i in range(2)}
    new = {f"blocks{CLEAR}.{i}.w": torch.zeros(i + 1) for i in range(2)}
    report = render_diff(diff_schemas(schema_of(old), schema_of(new)), title="differs:")
    assert report.replace("\n", "").isprintable()
    assert r"layers.0.w -> blocks\x1b[2J.0.w  tensor float32[1]" in report
    suggested = re.search(r"rename=(\[.*\]) \(", report)
    assert suggested is not None
    ((pattern, replacement),) = ast.literal_eval(suggested.group(1))  # as a user pastes it
    assert [re.sub(pattern, replacement, key) for key in new] == list(old)


# ---- the command line --------------------------------------------------------------------


def _state(prefix: str = "m", widen: int = 0) -> OrderedDict[str, torch.Tensor]:
    state: OrderedDict[str, torch.Tensor] = OrderedDict(
        (f"{prefix}{i}{name}.weight", torch.zeros(i + 1, 2 + widen))
        for i, name in enumerate(HOSTILE)
    )
    state[f"tied{OSC}"] = state["tied.b"] = torch.zeros(5)
    state._metadata = OrderedDict({"": {"version": 1}, f"m0{OSC}": {"version": 2 + widen}})  # type: ignore[attr-defined]
    return state


def _storage_location(path: Path, location: str) -> None:
    """A ``torch.save`` file whose storage says it was saved on ``location``."""
    saved = io.BytesIO()
    torch.save({"x": torch.zeros(2)}, saved)
    cpu = b"X\x03\x00\x00\x00cpu"  # BINUNICODE "cpu"
    raw = location.encode()
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert cpu in data
                data = data.replace(cpu, b"X" + len(raw).to_bytes(4, "little") + raw)
            dst.writestr(info, data)


def _write_files(tmp_path: Path) -> None:
    """Checkpoints, a snapshot, a sharded index and releases, all with hostile names."""
    torch.save(_state(), tmp_path / "a.pt")
    torch.save(_state(widen=1), tmp_path / "wider.pt")  # every shape and a version change
    torch.save(_state(prefix="n"), tmp_path / "renamed.pt")
    general = {"model_state_dict": _state(), f"epoch{CLEAR}": 3, f"notes{FORGED}": [1]}
    torch.save(general, tmp_path / "general.pt")
    save_file({k: v.clone() for k, v in _state().items()}, tmp_path / "a.safetensors")
    (tmp_path / "a.json").write_text(schema_of(tmp_path / "a.pt").to_json())
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shard = f"model{CLEAR}-00001-of-00001.safetensors"
    save_file({f"w{OSC}": torch.zeros(2)}, sharded / shard)
    index = {"metadata": {}, "weight_map": {f"w{OSC}": shard}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    lost = tmp_path / "lost"
    lost.mkdir()
    index = {"metadata": {}, "weight_map": {"w": f"{FORGED}{OSC}.safetensors"}}
    (lost / "model.safetensors.index.json").write_text(json.dumps(index))
    _storage_location(tmp_path / "located.pt", f"cuda{CLEAR}")
    for name, checkpoint in (("v1", "a.pt"), ("v2", "renamed.pt")):
        assert main(["record", str(tmp_path / checkpoint), "--release", name, "--dir", "rel"]) == 0


SHOWN = ("a.pt", "general.pt", "a.safetensors", "a.json", "sharded")


def test_show_diff_and_history_print_no_character_from_a_file_raw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _write_files(tmp_path)
    commands = [
        *(["show", path] for path in SHOWN),
        ["show", "--tree", "a.pt"],
        ["show", "located.pt"],
        ["show", "lost"],
        ["diff", "a.pt", "wider.pt"],
        ["diff", "a.json", "renamed.pt"],
        ["history", "--dir", "rel"],
    ]
    driver = textwrap.dedent(
        """
        import json, sys
        from pytest_statedict.cli import main
        for args in json.loads(sys.argv[1]):
            print("=== " + " ".join(args), flush=True)
            print(f"rc {main(args)}", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(commands)],
        capture_output=True,
        check=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    raw = done.stdout + done.stderr
    for name in HOSTILE:
        assert name.encode() not in raw
    text = raw.decode()
    assert all(line.isprintable() for line in text.split("\n")), [
        line for line in text.split("\n") if not line.isprintable()
    ]
    assert "\nTraceback" not in text
    out = {block.split("\n", 1)[0]: block for block in done.stdout.decode().split("=== ")[1:]}
    for path in SHOWN:
        block = out[f"show {path}"]
        assert "rc 0" in block
        assert (
            r"w\x1b]0;pwned\x07" in block
            if path == "sharded"
            else all(f"m{i}{shown}.weight" in block for i, shown in enumerate(ESCAPED))
        )
    assert r"tensor = tied\x1b]0;pwned\x07" in out["show a.pt"]  # tied.b's tie
    assert r"epoch\x1b[2J: int" in out["show general.pt"]
    assert r"notesa\nTraceback (most recent call last):: list" in out["show general.pt"]
    assert r"m2a\nTraceback (most recent call last):" in out["show --tree a.pt"]
    assert r"saved on: cuda\x1b[2J" in out["show located.pt"]
    assert r"~ m3\u202e.weight: shape [4, 2] -> [4, 3]" in out["diff a.pt wider.pt"]
    assert r"m0\x1b]0;pwned\x07: version 2 -> 3" in out["diff a.pt wider.pt"]
    renamed = out["diff a.json renamed.pt"]
    assert (
        r"m2a\nTraceback (most recent call last):.weight -> "
        r"n2a\nTraceback (most recent call last):.weight  tensor float32[3, 2]"
    ) in renamed
    assert r"'m1\x1b[2J.weight': 'n1\x1b[2J.weight'" in renamed  # the rename= to paste
    assert r"m1\x1b[2J.weight -> n1\x1b[2J.weight" in out["history --dir rel"]
    assert (
        r"lost/model.safetensors.index.json: its shard a\nTraceback (most recent call last):"
        r"\x1b]0;pwned\x07.safetensors is missing"
    ) in done.stderr.decode()


# ---- pytest failure messages --------------------------------------------------------------

USER_TESTS = """
import os
import torch
from torch import nn
from pytest_statedict import assert_checkpoint_loads, statedict_releases

HOSTILE = {hostile!r}


class Hostile(nn.Module):
    def __init__(self, prefix, widen=0):
        super().__init__()
        for i, name in enumerate(HOSTILE):
            self.register_parameter(prefix + str(i) + name, nn.Parameter(torch.zeros(i + 1)))
        self.register_buffer("w" + HOSTILE[0], torch.zeros(2 + widen))


def test_user_snapshot(statedict_snapshot):
    renamed = os.environ.get("HOSTILE_RENAMED") == "1"
    statedict_snapshot.assert_match(Hostile("n" if renamed else "m", widen=renamed))


def test_user_gate():
    assert_checkpoint_loads(Hostile("n", widen=1), "old.pt")


test_user_releases = statedict_releases(lambda: Hostile("n", widen=1), optimizer=None)


class Refusing(nn.Module):
    def _load_from_state_dict(self, state_dict, prefix, *args):
        raise ValueError("cannot convert " + ", ".join(state_dict))


def test_user_hook():
    assert_checkpoint_loads(Refusing(), "old.pt")
"""


def test_failure_messages_print_no_character_from_a_file_raw(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\nstatedict_releases_dir = releases\n")
    pytester.makepyfile(test_user_hostile=USER_TESTS.format(hostile=HOSTILE))
    old = {f"m{i}{name}": torch.zeros(i + 1) for i, name in enumerate(HOSTILE)}
    old[f"w{OSC}"] = torch.zeros(2)
    torch.save(old, pytester.path / "old.pt")
    assert main(["record", "old.pt", "--release", "v1", "--dir", "releases"]) == 0
    pytester.runpytest("-k", "snapshot", "--statedict-update").assert_outcomes(passed=1)
    monkeypatch.setenv("HOSTILE_RENAMED", "1")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=4)
    text = result.stdout.str()
    for name in HOSTILE:
        assert name not in text
    assert all(line.isprintable() for line in result.outlines)
    # every "Traceback" is the escaped name's, none starts a line of its own
    assert text.count("Traceback (most recent call last):") == text.count(
        r"\nTraceback (most recent call last):"
    )
    for i, shown in enumerate(ESCAPED):  # the snapshot check's renames, the gate's, the release's
        assert text.count(f"m{i}{shown} -> n{i}{shown}") == 3
    assert r"~ w\x1b]0;pwned\x07: shape [2] -> [3]" in text  # the snapshot check's change
    assert r"w\x1b]0;pwned\x07: checkpoint [2], model [3]" in text  # the gate's, twice
    # a load hook's error quotes the keys raw: escaped, on one line
    assert r"its load_state_dict raised: ValueError: cannot convert m0\x1b]0;pwned\x07" in text
