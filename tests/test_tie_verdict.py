"""Ties on load (tie_verdict): a new weight tie that silently drops a trained tensor.

nanoGPT's commit 7c828855 tied ``lm_head.weight`` to ``transformer.wte.weight``: an untied
checkpoint of the version before still loads with ``strict=True`` (both keys exist), and the
tied parameter keeps whichever was loaded last, so the model's outputs change. Rebuilt here
as a self-contained pair; torch's own load is the oracle that the outputs really change.
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_statedict import (
    StateDictError,
    StateDictMismatch,
    assert_checkpoint_loads,
    assert_state_dict_matches,
    schema_of,
)
from pytest_statedict.cli import main
from pytest_statedict.verdict import model_verdict

VOCAB, DIM = 11, 6

GPT_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(11, 6)
            self.ln_f = nn.LayerNorm(6)


    class GPT(nn.Module):
        def __init__(self, tied):
            super().__init__()
            self.transformer = Transformer()
            self.lm_head = nn.Linear(6, 11, bias=False)
            if tied:
                self.lm_head.weight = self.transformer.wte.weight

        def forward(self, idx):
            return self.lm_head(self.transformer.ln_f(self.transformer.wte(idx)))


    def tied():
        return GPT(tied=True)


    def untied():
        return GPT(tied=False)
    """
)
namespace: dict[str, object] = {}
exec(compile(GPT_MODULE, "gpt_module", "exec"), namespace)
GPT = namespace["GPT"]

OVERWRITES = (
    "it loads, but lm_head.weight overwrites the trained transformer.wte.weight: "
    "one tied parameter now"
)


def trained(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():  # tied: written twice, last one stays
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model


def saved(tmp_path: Path, model: nn.Module, name: str = "old.pt") -> Path:
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


def test_torch_loads_an_untied_checkpoint_into_a_tied_model_and_the_outputs_change(
    tmp_path: Path,
) -> None:
    """The oracle: a strict load works, and the model no longer computes what it did."""
    old = trained(GPT(tied=False))
    new = GPT(tied=True)
    new.load_state_dict(torch.load(saved(tmp_path, old), weights_only=True), strict=True)
    idx = torch.arange(VOCAB)
    assert not torch.allclose(new(idx), old(idx))


def test_the_gate_fails_naming_both_keys(tmp_path: Path) -> None:
    path = saved(tmp_path, trained(GPT(tied=False)))
    with pytest.raises(StateDictMismatch) as failure:
        assert_checkpoint_loads(GPT(tied=True), path)
    assert OVERWRITES in str(failure.value)


def test_equal_values_load_as_tied(tmp_path: Path) -> None:
    old = trained(GPT(tied=False))
    with torch.no_grad():
        old.lm_head.weight.copy_(old.transformer.wte.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_checkpoint_loads(GPT(tied=True), saved(tmp_path, old))
    verdict = model_verdict(GPT(tied=True), schema_of(old, values=True))
    assert verdict.loads
    assert verdict.notes == (
        "transformer.wte.weight and lm_head.weight load into one tied parameter; equal in "
        "the checkpoint",
    )


def test_a_tied_checkpoint_loads_into_a_tied_model_silently(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_checkpoint_loads(GPT(tied=True), saved(tmp_path, trained(GPT(tied=True))))


def test_a_split_tie_loads_both_from_the_one_tensor_and_says_so(tmp_path: Path) -> None:
    old = trained(GPT(tied=True))
    assert_checkpoint_loads(GPT(tied=False), saved(tmp_path, old))
    verdict = model_verdict(GPT(tied=False), schema_of(old))
    assert verdict.loads
    assert verdict.notes == (
        "transformer.wte.weight, lm_head.weight were one tensor in the checkpoint and now "
        "load as independent parameters, each from it",
    )


UNKNOWN = (
    "lm_head.weight would overwrite transformer.wte.weight (separate tensors in the "
    "checkpoint, one tied parameter now), and their values could not be compared (read "
    "without tensor data: a snapshot with values=True can tell)"
)


def test_a_snapshot_without_values_cannot_tell_so_the_gate_fails_saying_so(
    tmp_path: Path,
) -> None:
    """A trained tensor that may be lost is never a "loads"."""
    snapshot = tmp_path / "old.json"
    snapshot.write_text(schema_of(trained(GPT(tied=False))).to_json())
    with pytest.raises(StateDictMismatch) as failure:
        assert_checkpoint_loads(GPT(tied=True), snapshot)
    assert UNKNOWN in str(failure.value)


def test_a_safetensors_file_is_read_for_the_two_values(tmp_path: Path) -> None:
    """Its header gives the gate meta tensors; the two tied keys' values are then read."""
    from safetensors.torch import save_file

    old = trained(GPT(tied=False))
    path = tmp_path / "old.safetensors"
    save_file(old.state_dict(), path)
    with pytest.raises(StateDictMismatch) as failure:
        assert_checkpoint_loads(GPT(tied=True), path)
    assert OVERWRITES in str(failure.value)
    with torch.no_grad():
        old.lm_head.weight.copy_(old.transformer.wte.weight)
    save_file(old.state_dict(), path)
    assert_checkpoint_loads(GPT(tied=True), path)


def test_the_match_compares_a_snapshot_with_values_by_fingerprint() -> None:
    old = schema_of(trained(GPT(tied=False)), values=True)
    with pytest.raises(StateDictMismatch) as failure:
        assert_state_dict_matches(GPT(tied=True), old)
    assert OVERWRITES in str(failure.value)


def test_statedict_diff_with_the_model_says_no(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "gpt_module.py").write_text(GPT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    old = saved(tmp_path, trained(GPT(tied=False)))
    torch.save(GPT(tied=True).state_dict(), tmp_path / "new.pt")
    code = main(["diff", str(old), "new.pt", "--model", "gpt_module:tied"])
    out = capsys.readouterr().out
    assert code == 1
    assert OVERWRITES in out


def test_the_release_gate_fails_as_it_could_not_compare(pytester: pytest.Pytester) -> None:
    """A release recorded by ``statedict record`` keeps no values: the release gate fails
    naming both keys and why, never passes silently."""
    pytester.makeini("[pytest]\npythonpath = .\n")
    pytester.makepyfile(gpt_module=GPT_MODULE)
    pytester.makepyfile(
        test_gpt_releases="""
        from gpt_module import tied
        from pytest_statedict import statedict_releases

        test_releases = statedict_releases(tied)
        """
    )
    checkpoint = saved(pytester.path, trained(GPT(tied=False)), "v1.pt")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(pytester.path)
    try:
        assert main(["record", str(checkpoint), "--release", "v1"]) == 0
    finally:
        monkeypatch.undo()
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*lm_head.weight would overwrite transformer.wte.weight*"])


# ---- from an adversarial review ----------------------------------------------------------


def test_a_rename_sending_two_keys_to_one_name_is_refused(tmp_path: Path) -> None:
    """Two trained tensors under one name: one would be lost, as by a new tie."""
    one = nn.Module()
    one.emb = nn.Embedding(VOCAB, DIM)
    path = tmp_path / "untied.pt"
    torch.save({"wte.weight": torch.randn(VOCAB, DIM), "lm_head.weight": torch.randn(VOCAB, DIM)},
               path)  # fmt: skip
    with pytest.raises(StateDictError, match="maps both 'wte.weight' and 'lm_head.weight'"):
        assert_checkpoint_loads(one, path, rename=[(r"^(wte|lm_head)\.", "emb.")])


def test_ignoring_one_key_of_a_tie_does_not_hide_what_it_overwrites(tmp_path: Path) -> None:
    """ignore= stops counting a key; torch still loads it, over the trained one."""
    path = saved(tmp_path, trained(GPT(tied=False)))
    with pytest.raises(StateDictMismatch) as failure:
        assert_checkpoint_loads(GPT(tied=True), path, ignore=["lm_head.weight"])
    assert OVERWRITES in str(failure.value)


@pytest.mark.parametrize("equal", [True, False])
def test_the_gate_reads_a_snapshot_with_values_by_its_fingerprints(
    tmp_path: Path, equal: bool
) -> None:
    old = trained(GPT(tied=False))
    if equal:
        with torch.no_grad():
            old.lm_head.weight.copy_(old.transformer.wte.weight)
    snapshot = tmp_path / "old.json"
    snapshot.write_text(schema_of(old, values=True).to_json())
    if equal:
        assert_checkpoint_loads(GPT(tied=True), snapshot)
        return
    with pytest.raises(StateDictMismatch) as failure:
        assert_checkpoint_loads(GPT(tied=True), snapshot)
    assert OVERWRITES in str(failure.value)


def test_equal_values_with_nan_and_another_dtype_load(tmp_path: Path) -> None:
    """torch loads either into the parameter with the same result: nothing is lost."""
    weights = torch.randn(VOCAB, DIM)
    weights[0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save({"transformer.wte.weight": weights, "transformer.ln_f.weight": torch.ones(DIM),
                "transformer.ln_f.bias": torch.zeros(DIM),
                "lm_head.weight": weights.clone().double()}, path)  # fmt: skip
    assert_checkpoint_loads(GPT(tied=True), path)
