"""Rename suggestions that move whole modules (rename_pairing), replayed on real refactors.

The test that a suggested ``rename=`` is right: the old checkpoint, renamed by it and loaded
strictly into the new model, gives the old model's outputs bit for bit. Each pair below is
a refactor from a real codebase's history rebuilt as self-contained modules (vit-pytorch's
PreNorm folded into its blocks, x-transformers' layers flattened, a Q/K/V rename), with
trained-looking (random, non-default) weights so that a LayerNorm sent to a Linear's place
shows in the outputs.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_statedict import assert_checkpoint_loads, schema_of
from pytest_statedict.compare import diff_schemas
from pytest_statedict.errors import StateDictMismatch
from pytest_statedict.rename_pairing import likely_renames
from pytest_statedict.schema_entries import TensorEntry

DIM, HIDDEN, DEPTH = 8, 16, 3


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every tensor random, so that no two same-shape tensors agree by their init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model.eval()


# ---- vit-pytorch: PreNorm(dim, FeedForward) -> the norm inside FeedForward's Sequential ------


class PreNorm(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class OldFeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(HIDDEN, DIM), nn.Dropout(0.0))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class NewFeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, HIDDEN), nn.GELU(),
                                 nn.Dropout(0.0), nn.Linear(HIDDEN, DIM))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    def __init__(self, own_norm: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM) if own_norm else nn.Identity()
        self.to_qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.to_out = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        weights = (q @ k.transpose(-1, -2) / DIM**0.5).softmax(-1)
        return self.to_out(weights @ v)


class OldViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(Attention()), PreNorm(OldFeedForward())]) for _ in range(DEPTH)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class NewViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(own_norm=True), NewFeedForward()]) for _ in range(DEPTH)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


# ---- x-transformers: blocks of (norm, attn, norm, ff) -> one flat list of residual layers --


class OldBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(DIM), Attention()
        self.norm2 = nn.LayerNorm(DIM)
        self.ff = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x)) + x
        return self.ff(self.norm2(x)) + x


class OldStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(OldBlock() for _ in range(DEPTH))
        self.final_norm = nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)


class FlatLayer(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(DIM), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x)) + x


class FlatStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(DEPTH):
            ff = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM))
            layers += [FlatLayer(Attention()), FlatLayer(ff)]
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


# ---- a Q/K/V rename inside each layer ----------------------------------------------------


class QKV(nn.Module):
    def __init__(self, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        for name in names:
            setattr(self, name, nn.Linear(DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (getattr(self, n)(x) for n in self.names)
        return (q @ k.transpose(-1, -2)).softmax(-1) @ v


class Encoder(nn.Module):
    def __init__(self, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QKV(names) for _ in range(DEPTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) + x
        return x


REFACTORS = {
    "vit-pytorch PreNorm folded": (OldViT, NewViT),
    "x-transformers layers flattened": (OldStack, FlatStack),
    "q/k/v renamed": (lambda: Encoder(("q", "k", "v")), lambda: Encoder(("query", "key", "value"))),
}


def suggested_mapping(old: nn.Module, new: nn.Module) -> dict[str, str]:
    """The renames the checks would suggest for the old checkpoint against the new model."""
    diff = diff_schemas(schema_of(old.state_dict()), schema_of(new))
    assert not diff.ambiguous_renames, diff.ambiguous_renames
    return dict(diff.renames)


@pytest.mark.parametrize("refactor", list(REFACTORS))
def test_the_suggested_rename_gives_the_old_outputs_back(refactor: str) -> None:
    old_cls, new_cls = REFACTORS[refactor]
    old, new = randomised(old_cls()), new_cls().eval()
    x = torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(1))
    mapping = suggested_mapping(old, new)
    renamed = {mapping.get(k, k): v for k, v in old.state_dict().items()}
    new.load_state_dict(renamed, strict=True)
    assert torch.equal(new(x), old(x))


def test_the_gate_suggests_a_rename_that_loads(tmp_path) -> None:
    """Through the gate: its ready ``rename=`` makes the same checkpoint load and agree."""
    old, new = randomised(OldViT()), NewViT().eval()
    path = tmp_path / "old.pt"
    torch.save(old.state_dict(), path)
    with pytest.raises(StateDictMismatch) as failure:
        assert_checkpoint_loads(new, path)
    message = str(failure.value)
    suggestion = re.search(r"to load it as it is: rename=(\{.*\}) \(rename= maps", message)
    assert suggestion, message
    mapping = eval(suggestion.group(1))  # the literal the message prints for users to paste
    assert_checkpoint_loads(new, path, rename=mapping)
    new.load_state_dict({mapping.get(k, k): v for k, v in old.state_dict().items()})
    x = torch.randn(1, 3, DIM)
    assert torch.equal(new(x), old(x))


def entries(keys: list[tuple[str, tuple[int, ...]]]) -> list[TensorEntry]:
    return [TensorEntry(key, "tensor", shape, "float32") for key, shape in keys]


def test_modules_of_one_kind_without_key_order_are_ambiguous_not_guessed() -> None:
    """A sorted .safetensors header carries no order: q, k, v -> query, key, value cannot be
    told apart by shape, so no rename is suggested and the candidates are shown."""
    old = entries([(f"l.{n}.weight", (4, 4)) for n in "qkv"])
    new = entries([(f"l.{n}.weight", (4, 4)) for n in ("query", "key", "value")])
    pairing = likely_renames(old, new, ordered=False)
    assert pairing.pairs == []
    assert [old for old, _ in pairing.ambiguous] == ["l.q (weight)", "l.k (weight)", "l.v (weight)"]
    candidates = {"l.query (weight)", "l.key (weight)", "l.value (weight)"}
    assert set(pairing.ambiguous[0][1]) == candidates


def test_a_module_is_never_split() -> None:
    """A LayerNorm's weight and bias go to one module: never the bias to a Linear's place,
    even where the Linear's bias has the LayerNorm's shape and a closer name."""
    old = entries([("block.norm.weight", (8,)), ("block.norm.bias", (8,))])
    new = entries([("block.net.0.weight", (8,)), ("block.net.0.bias", (8,)),
                   ("block.net.4.weight", (8, 16)), ("block.net.4.bias", (8,))])  # fmt: skip
    pairing = likely_renames(old, new)
    assert pairing.pairs == [
        ("block.norm.weight", "block.net.0.weight"),
        ("block.norm.bias", "block.net.0.bias"),
    ]


def test_keys_paired_one_by_one_never_split_their_module() -> None:
    """Keys whose module did not move whole: when their best matches lie in two modules,
    they are ambiguous, not a suggestion that scatters the module."""
    old = entries([("a.x", (3,)), ("a.y", (5,))])
    new = entries([("b.x", (3,)), ("c.y", (5,)), ("c.z", (7,))])
    pairing = likely_renames(old, new)
    assert pairing.pairs == []
    assert dict(pairing.ambiguous) == {"a.x": ("b", "c"), "a.y": ("b", "c")}


def test_the_report_shows_the_ambiguity() -> None:
    old = entries([(f"l.{n}.weight", (4, 4)) for n in "qk"])
    new = entries([(f"l.{n}.weight", (4, 4)) for n in ("query", "key")])
    from pytest_statedict.report import render_diff
    from pytest_statedict.schema import Schema

    diff = diff_schemas(Schema(tuple(old), ordered=False), Schema(tuple(new)))
    text = render_diff(diff, title="title")
    assert "renamed, but to which is ambiguous (not in the suggested rename=)" in text
    assert "l.q (weight) -> one of l.query (weight), l.key (weight)" in text
    assert "suggested, to" not in text


def test_a_model_wide_rename_of_10000_keys_pairs_in_linear_time() -> None:
    """``layers.N`` -> ``blocks.N`` over 10,000 keys: every pair right, in about a tenth of
    a second here (pairing every removed key with every added one took minutes at 2,000);
    the bound leaves room for a slow CI machine, and would catch a quadratic pairing."""
    shapes = {"weight": (4, 4), "bias": (4,)}
    old = entries([(f"layers.{i}.{m}.{leaf}", shapes[leaf]) for i in range(2500)
                   for m in ("attn", "mlp") for leaf in shapes])  # fmt: skip
    new = [TensorEntry(e.key.replace("layers.", "blocks.", 1), "tensor", e.shape, e.dtype)
           for e in old]  # fmt: skip
    start = time.perf_counter()
    pairing = likely_renames(old, new)
    elapsed = time.perf_counter() - start
    assert len(pairing.pairs) == 10_000
    assert all(new_key == old_key.replace("layers.", "blocks.", 1)
               for old_key, new_key in pairing.pairs)  # fmt: skip
    assert elapsed < 10, elapsed


# ---- from an adversarial review ----------------------------------------------------------


class TwoNorms(nn.Module):
    def __init__(self, names: tuple[str, str]) -> None:
        super().__init__()
        self.names = names
        self.b = nn.Module()
        for name in names:
            setattr(self.b, name, nn.LayerNorm(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (getattr(self.b, n) for n in self.names)
        return second(first(x) * 3)


def test_a_sorted_safetensors_header_gives_no_order_to_pair_by(tmp_path: Path) -> None:
    """``ln_x`` before ``ln_a`` in the model, after it in the sorted header: pairing by the
    header's order would swap them, so they are ambiguous and nothing is suggested."""
    from safetensors.torch import save_file

    old = randomised(TwoNorms(("ln_x", "ln_a")))
    path = tmp_path / "old.safetensors"
    save_file(old.state_dict(), path)
    with pytest.raises(StateDictMismatch) as failure:
        assert_checkpoint_loads(TwoNorms(("first", "second")), path)
    message = str(failure.value)
    assert "rename=" not in message.split("renamed, but to which is ambiguous")[0]
    assert "b.ln_x (bias, weight) -> one of b.first (weight, bias), b.second (weight, bias)" in (
        message
    )


def test_keys_of_a_module_that_gained_one_pair_by_leaf_name() -> None:
    """The module also gained a buffer, so it did not move whole: its weight still goes to
    the weight and its bias to the bias, whatever the registration order."""
    old = entries([("enc.norm.weight", (4,)), ("enc.norm.bias", (4,))])
    new = entries([("dec.ln.bias", (4,)), ("dec.ln.weight", (4,)), ("dec.ln.eps", (1,))])
    assert likely_renames(old, new).pairs == [
        ("enc.norm.weight", "dec.ln.weight"),
        ("enc.norm.bias", "dec.ln.bias"),
    ]


def test_modules_paired_by_their_order_alone_are_marked() -> None:
    old = entries([("b.norm1.weight", (4,)), ("b.norm2.weight", (4,))])
    new = entries([("b.post.weight", (4,)), ("b.pre.weight", (4,))])
    pairing = likely_renames(old, new)
    assert pairing.by_order == [("b.norm1 (weight)", "b.post (weight)"),
                                ("b.norm2 (weight)", "b.pre (weight)")]  # fmt: skip


def test_a_prefix_rename_is_suggested_only_where_it_moves_nothing_else() -> None:
    """``enc.b`` -> ``encoder.b`` while ``enc.a`` stays: ``^enc\\.`` would move ``enc.a``
    too, so the suggestion names the key instead."""
    from pytest_statedict.report import suggest_rename
    from pytest_statedict.schema import Schema

    old = Schema(tuple(entries([("enc.a.weight", (2,)), ("enc.b.weight", (3,))])))
    new = Schema(tuple(entries([("enc.a.weight", (2,)), ("encoder.b.weight", (3,))])))
    diff = diff_schemas(old, new)
    assert suggest_rename(diff.renames, "expected->actual", diff) == (
        "rename={'enc.b.weight': 'encoder.b.weight'}"
    )
    alone = diff_schemas(Schema(old.tensors[1:]), Schema(new.tensors[1:]))
    assert suggest_rename(alone.renames, "expected->actual", alone) == (
        "rename=[(r'^enc\\.', 'encoder.')]"
    )


def test_a_suggestion_is_valid_python_whatever_the_names() -> None:
    from pytest_statedict.report import suggest_rename

    suggestion = suggest_rename([("it's.w", "new.w")], "expected->actual")
    pattern, replacement = eval(suggestion.removeprefix("rename="))[0]
    assert re.sub(pattern, replacement, "it's.w") == "new.w"
