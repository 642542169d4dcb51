"""Models for the benchmarks: a hand-rolled Llama-shaped module and a stack of Linears.

``LlamaLike`` has the key layout of a Hugging Face Llama checkpoint of the 7B era
(``model.layers.N.self_attn.{q,k,v,o}_proj.weight``, the per-layer persistent
``rotary_emb.inv_freq`` buffer, ``mlp.{gate,up,down}_proj.weight``, two RMSNorm weights per
layer, ``model.embed_tokens``, ``model.norm`` and an untied ``lm_head``): 10 keys per
layer + 3, so 323 keys for 32 layers. Nothing here runs a forward pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    layers: int = 32
    d: int = 4096
    mlp: int = 11008
    vocab: int = 32000
    head_dim: int = 128

    @property
    def params(self) -> int:
        per_layer = 4 * self.d * self.d + 3 * self.d * self.mlp + 2 * self.d
        return self.layers * per_layer + 2 * self.vocab * self.d + self.d

    @property
    def buffers(self) -> int:
        return self.layers * (self.head_dim // 2)

    @property
    def nbytes(self) -> int:  # float32
        return 4 * (self.params + self.buffers)

    @property
    def keys(self) -> int:
        return 10 * self.layers + 3

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


LLAMA_7B = LlamaConfig()


def config_for_bytes(target: int, layers: int = 16, vocab: int = 32000) -> LlamaConfig:
    """A Llama-shaped config of ``layers`` layers whose float32 size is closest to ``target``.

    The width moves in steps of 64 and the MLP keeps Llama's 11008/4096 ratio, so configs of
    one layer count have the same keys and only their tensor bytes differ.
    """
    best = None
    for d in range(64, 16384 + 1, 64):
        cfg = LlamaConfig(
            layers=layers,
            d=d,
            mlp=64 * max(1, round(d * 11008 / 4096 / 64)),
            vocab=vocab,
            head_dim=min(128, d),
        )
        if best is None or abs(cfg.nbytes - target) < abs(best.nbytes - target):
            best = cfg
    assert best is not None
    return best


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class Rotary(nn.Module):
    def __init__(self, head_dim: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent, as in older HF checkpoints


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        d = cfg.d
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.rotary_emb = Rotary(cfg.head_dim)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d, cfg.mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d, cfg.mlp, bias=False)
        self.down_proj = nn.Linear(cfg.mlp, cfg.d, bias=False)


class Layer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.d)
        self.post_attention_layernorm = RMSNorm(cfg.d)


class Backbone(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.d)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.d)


class LlamaLike(nn.Module):
    def __init__(self, cfg: LlamaConfig = LLAMA_7B) -> None:
        super().__init__()
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d, cfg.vocab, bias=False)


def build_meta(cfg: LlamaConfig = LLAMA_7B) -> LlamaLike:
    with torch.device("meta"):
        return LlamaLike(cfg)


def build_normal(cfg: LlamaConfig) -> LlamaLike:
    """The way a user builds a model: on the CPU, with the modules' own initialisation."""
    return LlamaLike(cfg)


def build_filled(cfg: LlamaConfig, seed: int = 0) -> LlamaLike:
    """A CPU model with every byte written (resident), faster than the default init.

    Built on meta, materialised with ``to_empty`` and filled from one random 16 MiB block
    (memcpy speed; the default kaiming init runs at ~0.3 GiB/s here).
    """
    model = build_meta(cfg).to_empty(device="cpu")
    fill_(model.state_dict().values(), seed)
    return model


def fill_(tensors: object, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(4 * 1024 * 1024, generator=gen)  # 16 MiB of float32
    with torch.no_grad():
        for i, t in enumerate(tensors):  # type: ignore[attr-defined]
            flat = t.view(-1)
            n = flat.numel()
            shift = (i * 7919) % block.numel()
            src = torch.roll(block, shift) if shift else block
            for off in range(0, n, src.numel()):
                m = min(src.numel(), n - off)
                flat[off : off + m].copy_(src[:m].to(flat.dtype))


def state_bytes(module_or_state: object) -> int:
    state = (
        module_or_state.state_dict()  # type: ignore[attr-defined]
        if isinstance(module_or_state, nn.Module)
        else module_or_state
    )
    return sum(t.numel() * t.element_size() for t in state.values())  # type: ignore[attr-defined]


def linear_stack_meta(layers: int = 150, width: int = 64) -> nn.Sequential:
    """``layers`` Linear layers on the meta device: 2 * layers tensors (weight and bias)."""
    with torch.device("meta"):
        return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def human_bytes(n: float) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"


if __name__ == "__main__":
    m = build_meta()
    print(len(m.state_dict()), "keys", human_bytes(LLAMA_7B.nbytes))
    for target in (0.1, 1, 4):
        cfg = config_for_bytes(int(target * 1024**3))
        print(target, cfg, human_bytes(cfg.nbytes), cfg.keys)
