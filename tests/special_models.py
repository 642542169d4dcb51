"""Small models with the special state real architectures have.

Each stands for a family the conformance sweep found a gap in (legacy and new weight norm,
parametrizations, static and dynamic quantization with a tied bias, ``_extra_state``, a
version-dependent load hook); the tests import them, and write this file into pytester
projects as a user's model module.
"""

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize


def legacy_weight_norm():
    """HiFi-GAN style: torch.nn.utils.weight_norm (weight recomputed, a non-leaf attribute)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        conv = nn.utils.weight_norm(nn.Conv1d(2, 4, 3))
    return nn.Sequential(conv, nn.ReLU(), nn.Conv1d(4, 2, 1))


def new_weight_norm():
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2))


class Symmetric(nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).transpose(-1, -2)


def parametrized():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    return model


class _ConvNet(nn.Module):
    def __init__(self):
        from torch.ao import quantization as tq

        super().__init__()
        self.quant = tq.QuantStub()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):  # x: [N, 3, 3, 3]
        x = self.relu(self.conv(self.quant(x)))
        return self.dequant(self.fc(torch.flatten(x, 1)))


def quantized_conv_net(seed=0):
    """Eager static quantization: a quantized conv (bias packed with it) and linear."""
    from torch.ao import quantization as tq

    torch.manual_seed(seed)
    model = _ConvNet().eval()
    model.qconfig = tq.get_default_qconfig(torch.backends.quantized.engine)
    tq.prepare(model, inplace=True)
    model(torch.randn(2, 3, 3, 3))
    return tq.convert(model)


class TiedHead(nn.Module):
    """BERT's MLM head in small: the decoder's bias is the head's own tied parameter."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.dense = nn.Linear(8, 8)
        self.decoder = nn.Linear(8, 10)
        self.bias = nn.Parameter(torch.zeros(10))
        self.decoder.bias = self.bias

    def forward(self, ids):
        return self.decoder(self.dense(self.embed(ids)))


def dynamic_quantized_tied(seed=0):
    from torch.ao import quantization as tq

    torch.manual_seed(seed)
    return tq.quantize_dynamic(TiedHead(), {nn.Linear}, dtype=torch.qint8)


class WithExtraState(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.vocab = {"a": 0, "b": 1}

    def get_extra_state(self):
        return {"vocab": dict(self.vocab)}

    def set_extra_state(self, state):
        self.vocab = dict(state["vocab"])


def with_extra_state():
    return nn.Sequential(WithExtraState(), nn.Linear(2, 2))


class Versioned(nn.Module):
    """MNASNet's pattern: a _load_from_state_dict that needs the module version."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def versioned():
    return nn.Sequential(Versioned(), nn.Linear(2, 2))


def with_optimizer(model, steps=1):
    """An Adam with state, after ``steps`` steps from fixed gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    return optimizer
