"""The architectures the conformance sweep builds: small random configs, never weights.

Every builder returns a fresh model, initialised from the global RNG (the caller seeds it),
so that two calls under the same seed build twins. Nothing here downloads anything: Hugging
Face models are built from a config made in code, timm with ``pretrained=False``,
torchvision with ``weights=None``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Models above this many parameters are skipped (named, with the cap in the reason): a
# full sweep row writes the model and its optimizer state several times, and CI has two
# cores and a few minutes. STATEDICT_SWEEP_MAX_PARAMS=0 lifts the cap. A quantized model
# is measured by its float model (``Architecture.size_model``): its own weights are packed,
# not parameters, so it used to count as 0 and pass any cap.
MAX_PARAMS = int(os.environ.get("STATEDICT_SWEEP_MAX_PARAMS", 15_000_000))


@dataclass
class Architecture:
    """One row of the sweep: how to build it, and what it is made of."""

    name: str
    build: Callable[[], nn.Module]
    library: str  # transformers, timm, torchvision, torch
    optimizer: Callable[[nn.Module], Any] | None = None  # default: AdamW
    scheduler: Callable[[Any], Any] | None = None
    # a model whose optimizer steps need a closure (LBFGS) or sparse gradients
    step: Callable[[nn.Module, Any], None] | None = None
    wrapper_prefix: str | None = None  # "module." / "_orig_mod.": the bare model's keys
    hf: bool = False
    quantized: bool = False
    # what the size cap counts, on the meta device, where ``build`` cannot say: the float
    # model that a quantized builder converts (its packed weights are no parameters)
    size_model: Callable[[], nn.Module] | None = None
    # the smallest of its family, when this is the same model at another width or depth
    # (``FAMILIES``): that one runs the operations this one leaves out
    variant_of: str | None = None
    notes: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- transformers

# Every size knob the tiny configs turn down, set where the config has it.
HF_SMALL: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 48,
    "max_position_embeddings": 64,
    "head_dim": 8,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "n_inner": 48,
    "n_ctx": 64,
    "d_model": 32,
    "d_ff": 48,
    "d_kv": 8,
    "num_layers": 2,
    "num_heads": 4,
    "num_decoder_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 48,
    "decoder_ffn_dim": 48,
    "num_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 24,
    "image_size": 32,
    "patch_size": 8,
    "embedding_size": 32,
    "max_source_positions": 64,
    "max_target_positions": 64,
    "num_mel_bins": 16,
    "state_size": 8,
    "attention_hidden_size": 32,
    "rotary_dim": 4,
    "ffn_dim": 48,
    "word_embed_proj_dim": 32,
}

# Special tokens inside the tiny vocabulary (the defaults point past it).
HF_TOKENS = {
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 0,
    "start_token_id": 0,
    "sep_token_id": 2,
    "cls_token_id": 1,
}

HF_OVERRIDES: dict[str, dict[str, Any]] = {
    "CLIPModel": {
        "text_config": {
            **{
                k: HF_SMALL[k]
                for k in (
                    "vocab_size",
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "intermediate_size",
                    "max_position_embeddings",
                )
            },
            "projection_dim": 16,
        },
        "vision_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 48,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 16,
        },
        "projection_dim": 16,
    },
    "SiglipModel": {
        "text_config": {
            "vocab_size": 96,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 48,
            "max_position_embeddings": 64,
        },
        "vision_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 48,
            "image_size": 32,
            "patch_size": 8,
        },
    },
    "SwinForImageClassification": {
        "embed_dim": 16,
        "depths": [1, 1],
        "num_heads": [2, 2],
        "window_size": 2,
        "num_labels": 10,
    },
    "ConvNextForImageClassification": {
        "hidden_sizes": [16, 32],
        "depths": [1, 1],
        "num_stages": 2,
        "num_labels": 10,
    },
    "ResNetForImageClassification": {
        "hidden_sizes": [16, 32],
        "depths": [1, 1],
        "embedding_size": 16,
        "num_labels": 10,
    },
    "SegformerForSemanticSegmentation": {
        "num_encoder_blocks": 2,
        "depths": [1, 1],
        "sr_ratios": [2, 1],
        "hidden_sizes": [16, 32],
        "patch_sizes": [7, 3],
        "strides": [4, 2],
        "num_attention_heads": [1, 2],
        "mlp_ratios": [2, 2],
        "decoder_hidden_size": 32,
        "num_labels": 4,
    },
    "Wav2Vec2ForCTC": {
        "conv_dim": [16, 16],
        "conv_kernel": [10, 3],
        "conv_stride": [5, 2],
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
        "vocab_size": 32,
    },
    "HubertForCTC": {
        "conv_dim": [16, 16],
        "conv_kernel": [10, 3],
        "conv_stride": [5, 2],
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
        "vocab_size": 32,
    },
    "ViTForImageClassification": {"num_labels": 10},
    "DeiTForImageClassification": {"num_labels": 10},
    "BeitForImageClassification": {"num_labels": 10},
    "Speech2TextForConditionalGeneration": {
        "input_feat_per_channel": 16,
        "conv_channels": 16,
    },
    "JambaForCausalLM": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "mamba_d_state": 8,
        "mamba_dt_rank": 4,
        "mamba_expand": 2,
        "use_mamba_kernels": False,
    },
    "Mamba2ForCausalLM": {"num_heads": 8, "head_dim": 8, "expand": 2, "n_groups": 1},
    "DeepseekV3ForCausalLM": {
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 8,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
    },
    "GPTNeoForCausalLM": {
        "attention_types": [[["global", "local"], 1]],
        "num_layers": 2,
        "window_size": 16,
    },
    "RwkvForCausalLM": {"context_length": 64},
    "LongT5ForConditionalGeneration": {"global_block_size": 4, "local_radius": 4},
}

# GPT-2 .. Mamba, as the issue names them, then the families people fine-tune most.
HF_MODELS = """
GPT2LMHeadModel BertForMaskedLM LlamaForCausalLM MistralForCausalLM MixtralForCausalLM
Qwen2MoeForCausalLM T5ForConditionalGeneration BartForConditionalGeneration
WhisperForConditionalGeneration ViTForImageClassification CLIPModel MambaForCausalLM
Mamba2ForCausalLM Qwen2ForCausalLM Qwen3ForCausalLM Qwen3MoeForCausalLM GPTNeoXForCausalLM
GPTJForCausalLM OPTForCausalLM BloomForCausalLM FalconForCausalLM PhiForCausalLM
Phi3ForCausalLM GemmaForCausalLM Gemma2ForCausalLM RobertaForMaskedLM DistilBertForMaskedLM
AlbertForMaskedLM ElectraForMaskedLM DebertaV2ForMaskedLM XLMRobertaForMaskedLM
MPNetForMaskedLM PegasusForConditionalGeneration MarianMTModel MBartForConditionalGeneration
Wav2Vec2ForCTC HubertForCTC SwinForImageClassification ConvNextForImageClassification
ResNetForImageClassification DeiTForImageClassification BeitForImageClassification
SegformerForSemanticSegmentation Starcoder2ForCausalLM StableLmForCausalLM GraniteForCausalLM
OlmoForCausalLM Olmo2ForCausalLM CodeGenForCausalLM GPTBigCodeForCausalLM SiglipModel
Dinov2Model GPTNeoForCausalLM LongT5ForConditionalGeneration
Speech2TextForConditionalGeneration JambaForCausalLM FalconMambaForCausalLM RwkvForCausalLM
OlmoeForCausalLM GraniteMoeForCausalLM DeepseekV3ForCausalLM
""".split()  # noqa: SIM905 (a table to read)


def hf_config(model_name: str) -> Any:
    import transformers

    model_cls = getattr(transformers, model_name)
    config_cls = model_cls.config_class
    default = config_cls()
    overrides = HF_OVERRIDES.get(model_name, {})
    aliases = getattr(config_cls, "attribute_map", {})  # Swin: num_attention_heads -> num_heads
    kwargs = {
        k: v
        for k, v in {**HF_SMALL, **HF_TOKENS}.items()
        # a derived size (Falcon's head_dim) is a read-only property: leave it derived
        if hasattr(default, k)
        and not isinstance(getattr(config_cls, k, None), property)
        and aliases.get(k) not in overrides
    }
    kwargs.update(overrides)
    return config_cls(**kwargs)


def hf_builder(model_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model_name)(hf_config(model_name)).eval()

    return build


# ----------------------------------------------------------------------------------- timm

# The smallest model of each family (timm's own test_* models where a family has one).
TIMM_MODELS = """
resnet10t resnet18 resnest14d seresnext26t_32x4d efficientnet_b0 tf_efficientnet_lite0
mobilenetv2_035 mobilenetv3_small_050 mobilenetv4_conv_small_035 mnasnet_small
mixnet_s ghostnet_050 lcnet_035 tinynet_e fbnetc_100 hardcorenas_a semnasnet_050
spnasnet_100 regnetx_002 regnety_002 rexnet_100 densenet121 dla46_c hrnet_w18_small
cs3darknet_focus_s dpn48b ese_vovnet19b_slim selecsls42b skresnet18 res2net50_26w_4s
repvgg_a0 mobileone_s0 fastvit_t8 efficientformerv2_s0 edgenext_xx_small levit_128s
mobilevit_xxs mobilevitv2_050 efficientvit_b0 efficientvit_m0 repvit_m0_9 tiny_vit_5m_224
vit_tiny_patch16_224 deit_tiny_patch16_224 xcit_nano_12_p16_224 coat_lite_tiny
crossvit_tiny_240 pvt_v2_b0 poolformer_s12 convnext_atto convnextv2_atto
inception_next_atto mambaout_femto hgnetv2_b0 starnet_s050 swin_tiny_patch4_window7_224
maxvit_nano_rw_256 coatnet_nano_rw_224 nf_regnet_b0 test_vit test_byobnet test_efficientnet
test_nfnet test_convnext test_mambaout
""".split()  # noqa: SIM905 (a table to read)


def timm_builder(model_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(model_name, pretrained=False, num_classes=10).eval()

    return build


# ---------------------------------------------------------------------------- torchvision


def torchvision_names() -> dict[str, list[str]]:
    import torchvision.models as models

    return {
        "classification": models.list_models(module=models),
        "detection": models.list_models(module=models.detection),
        "segmentation": models.list_models(module=models.segmentation),
        "quantization": models.list_models(module=models.quantization),
    }


TORCHVISION_KWARGS = {
    "classification": {"num_classes": 10},
    "detection": {"num_classes": 5, "weights_backbone": None},
    "segmentation": {"num_classes": 4, "weights_backbone": None, "aux_loss": False},
    "quantization": {"num_classes": 10, "quantize": True},
}


def torchvision_builder(
    kind: str, model_name: str, quantize: bool = True
) -> Callable[[], nn.Module]:
    """``quantize=False``: a quantization builder's float model (what the size cap counts)."""

    def build() -> nn.Module:
        import torchvision.models as models

        kwargs = dict(TORCHVISION_KWARGS[kind])
        if "quantize" in kwargs:
            kwargs["quantize"] = quantize
        if model_name.startswith(
            ("inception_v3", "quantized_inception_v3", "googlenet", "quantized_googlenet")
        ):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = True
        if model_name.startswith("keypointrcnn"):
            kwargs["num_classes"] = 2
        if model_name.startswith("ssd"):
            kwargs.pop("weights_backbone")
            kwargs["weights_backbone"] = None
        model = models.get_model(model_name, weights=None, **kwargs)
        return model.eval()

    return build


# ------------------------------------------------------------------------------ families

# One builder at several widths and depths: the same module classes and state_dict key
# layout (depth adds indices), only the tensors' sizes differ (test_models.py's
# test_variant_is_its_family_at_another_size checks both on the meta device). The first of
# each family, its smallest, runs every operation; the others run those that read a model,
# its snapshot and its file (schema, json, file_schema, show, file_gate, snapshot_gate) and
# leave to the first those that build it again or write and reload it (twin, refactor and
# the two round-trips): what they check depends on the module classes, keys, dtypes and
# optimizer state, which the family shares, and their cost grows with the model (with
# the families' larger members they were a sixth of the sweep's time).
# STATEDICT_SWEEP_VARIANTS=all runs the variants through every operation as well.
FAMILIES = [
    f.split()
    for f in """
tv-cla/densenet121 tv-cla/densenet169 tv-cla/densenet201 tv-cla/densenet161
tv-cla/efficientnet_b0 tv-cla/efficientnet_b1 tv-cla/efficientnet_b2 tv-cla/efficientnet_b3
    tv-cla/efficientnet_b4 tv-cla/efficientnet_b5 tv-cla/efficientnet_b6 tv-cla/efficientnet_b7
tv-cla/efficientnet_v2_s tv-cla/efficientnet_v2_m tv-cla/efficientnet_v2_l
tv-cla/mnasnet0_5 tv-cla/mnasnet0_75 tv-cla/mnasnet1_0 tv-cla/mnasnet1_3
tv-cla/mobilenet_v3_small tv-cla/mobilenet_v3_large
tv-cla/regnet_x_400mf tv-cla/regnet_x_800mf tv-cla/regnet_x_1_6gf tv-cla/regnet_x_3_2gf
    tv-cla/regnet_x_8gf tv-cla/regnet_x_16gf tv-cla/regnet_x_32gf
tv-cla/regnet_y_400mf tv-cla/regnet_y_800mf tv-cla/regnet_y_1_6gf tv-cla/regnet_y_3_2gf
    tv-cla/regnet_y_8gf tv-cla/regnet_y_16gf tv-cla/regnet_y_32gf tv-cla/regnet_y_128gf
tv-cla/resnet18 tv-cla/resnet34
tv-cla/resnet50 tv-cla/resnet101 tv-cla/resnet152
tv-cla/shufflenet_v2_x0_5 tv-cla/shufflenet_v2_x1_0 tv-cla/shufflenet_v2_x1_5
    tv-cla/shufflenet_v2_x2_0
tv-cla/squeezenet1_1 tv-cla/squeezenet1_0
tv-cla/vgg11 tv-cla/vgg13 tv-cla/vgg16 tv-cla/vgg19
tv-cla/vgg11_bn tv-cla/vgg13_bn tv-cla/vgg16_bn tv-cla/vgg19_bn
tv-qua/quantized_shufflenet_v2_x0_5 tv-qua/quantized_shufflenet_v2_x1_0
    tv-qua/quantized_shufflenet_v2_x1_5 tv-qua/quantized_shufflenet_v2_x2_0
timm/vit_tiny_patch16_224 timm/deit_tiny_patch16_224
""".replace("\n    ", " ")
    .strip()
    .splitlines()
]
SWEEP_VARIANTS = os.environ.get("STATEDICT_SWEEP_VARIANTS", "") == "all"


# ----------------------------------------------------------------------- special cases


class TinyMLP(nn.Module):
    """The model the optimizer and scheduler rows train: two layers and a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class ConvNet(nn.Module):
    """A small CNN with BatchNorm, for the weight-norm and wrapper rows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3)
        self.bn = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3)
        self.head = nn.Linear(8, 3)


def legacy_weight_norm() -> nn.Module:
    """HiFi-GAN / wav2vec2 style: ``torch.nn.utils.weight_norm`` (weight_g, weight_v)."""
    model = ConvNet()
    with _warnings_ignored():
        torch.nn.utils.weight_norm(model.conv1)
        torch.nn.utils.weight_norm(model.conv2, dim=None)
    return model


def parametrized_weight_norm() -> nn.Module:
    """The new ``parametrizations.weight_norm`` (original0 / original1)."""
    model = ConvNet()
    torch.nn.utils.parametrizations.weight_norm(model.conv1)
    torch.nn.utils.parametrizations.weight_norm(model.conv2)
    return model


class Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


def parametrized_custom() -> nn.Module:
    """A user parametrization (symmetric weight) and the built-in orthogonal one."""
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    torch.nn.utils.parametrizations.orthogonal(model[2])
    return model


def spectral_norm_legacy() -> nn.Module:
    """GAN discriminators: ``torch.nn.utils.spectral_norm`` (weight_orig, weight_u, weight_v)."""
    model = ConvNet()
    torch.nn.utils.spectral_norm(model.conv1)
    torch.nn.utils.spectral_norm(model.head)
    return model


class WithExtraState(nn.Module):
    """A module with ``get_extra_state`` (Transformer Engine, fp8 recipes): ``_extra_state``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(8))
        self.calibration = {"amax_history": [1.0, 2.0], "recipe": "delayed", "steps": 3}

    def get_extra_state(self) -> Any:
        return dict(self.calibration)

    def set_extra_state(self, state: Any) -> None:
        self.calibration = dict(state)


def extra_state_model() -> nn.Module:
    return nn.Sequential(WithExtraState(), nn.ReLU(), WithExtraState())


def static_quantized_cnn() -> nn.Module:
    """Eager-mode post-training static quantization of a small CNN (fbgemm / x86)."""
    from torch.ao import quantization as tq

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant = tq.QuantStub()
            self.conv = nn.Conv2d(3, 8, 3)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(8 * 6 * 6, 10)
            self.dequant = tq.DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(self.conv(self.quant(x)))
            return self.dequant(self.fc(x.flatten(1)))

    model = Net().eval()
    model.qconfig = tq.get_default_qconfig("x86")
    with _warnings_ignored():
        prepared = tq.prepare(model)
        prepared(torch.randn(4, 3, 8, 8))
        return tq.convert(prepared)


def dynamic_quantized_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.LSTM(8, 8))
    with _warnings_ignored():
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear, nn.LSTM})


def dynamic_quantized_bert() -> nn.Module:
    model = hf_builder("BertForMaskedLM")()
    with _warnings_ignored():
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear})


def compiled() -> nn.Module:
    """``torch.compile`` wraps in an OptimizedModule: every key gains ``_orig_mod.``."""
    return torch.compile(ConvNet())  # compiled lazily: never called, never compiled


def data_parallel() -> nn.Module:
    return nn.DataParallel(ConvNet())  # device_ids=[] on a CPU-only machine


def ddp_style_prefix() -> nn.Module:
    """A checkpoint layout from DDP/FSDP scripts: the model held as ``.module``."""

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = ConvNet()

    return Holder()


def tied_embeddings() -> nn.Module:
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.body = nn.Linear(16, 16)
            self.lm_head = nn.Linear(16, 32, bias=False)
            self.lm_head.weight = self.embed.weight

    return TiedLM()


class _warnings_ignored:
    """Library deprecation warnings (weight_norm, eager quantization) are not the sweep's."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


# ------------------------------------------------------------ optimizers and schedulers


def sparse_embedding() -> nn.Module:
    return nn.Sequential(nn.Embedding(32, 8, sparse=True))


def torch_optimizers() -> dict[str, Callable[[nn.Module], Any]]:
    opt = torch.optim
    return {
        "SGD": lambda m: opt.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True),
        "Adam": lambda m: opt.Adam(m.parameters(), lr=1e-3, amsgrad=True),
        "AdamW": lambda m: opt.AdamW(_two_groups(m), lr=1e-3),
        "Adadelta": lambda m: opt.Adadelta(m.parameters()),
        "Adafactor": lambda m: opt.Adafactor(m.parameters()),
        "Adagrad": lambda m: opt.Adagrad(m.parameters(), lr=0.1),
        "Adamax": lambda m: opt.Adamax(m.parameters()),
        "ASGD": lambda m: opt.ASGD(m.parameters(), lr=0.1),
        "LBFGS": lambda m: opt.LBFGS(m.parameters(), lr=0.1, history_size=3, max_iter=2),
        "Muon": lambda m: opt.Muon([p for p in m.parameters() if p.ndim == 2], lr=0.02),
        "NAdam": lambda m: opt.NAdam(m.parameters(), decoupled_weight_decay=True),
        "RAdam": lambda m: opt.RAdam(m.parameters()),
        "RMSprop": lambda m: opt.RMSprop(m.parameters(), momentum=0.9, centered=True),
        "Rprop": lambda m: opt.Rprop(m.parameters()),
        "SparseAdam": lambda m: opt.SparseAdam(list(m.parameters())),
    }


def _two_groups(model: nn.Module) -> list[dict[str, Any]]:
    decayed = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
    others = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
    return [{"params": decayed, "weight_decay": 0.05}, {"params": others, "weight_decay": 0.0}]


def torch_schedulers() -> dict[str, Callable[[Any], Any]]:
    s = torch.optim.lr_scheduler
    return {
        "StepLR": lambda o: s.StepLR(o, step_size=2, gamma=0.5),
        "MultiStepLR": lambda o: s.MultiStepLR(o, milestones=[1, 3]),
        "ConstantLR": lambda o: s.ConstantLR(o, factor=0.5, total_iters=3),
        "LinearLR": lambda o: s.LinearLR(o, start_factor=0.2, total_iters=4),
        "ExponentialLR": lambda o: s.ExponentialLR(o, gamma=0.9),
        "PolynomialLR": lambda o: s.PolynomialLR(o, total_iters=5, power=2.0),
        "CosineAnnealingLR": lambda o: s.CosineAnnealingLR(o, T_max=5),
        "CosineAnnealingWarmRestarts": lambda o: s.CosineAnnealingWarmRestarts(o, T_0=2),
        "CyclicLR": lambda o: s.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2),
        "OneCycleLR": lambda o: s.OneCycleLR(o, max_lr=0.1, total_steps=10),
        "LambdaLR": lambda o: s.LambdaLR(o, lr_lambda=lambda e: 0.9**e),
        "MultiplicativeLR": lambda o: s.MultiplicativeLR(o, lr_lambda=lambda e: 0.95),
        "ReduceLROnPlateau": lambda o: s.ReduceLROnPlateau(o, patience=0),
        "SequentialLR": lambda o: s.SequentialLR(
            o,
            [s.ConstantLR(o, factor=0.5, total_iters=2), s.ExponentialLR(o, gamma=0.9)],
            milestones=[2],
        ),
        "ChainedScheduler": lambda o: s.ChainedScheduler(
            [s.ConstantLR(o, factor=0.5, total_iters=2), s.ExponentialLR(o, gamma=0.9)]
        ),
        "SWALR": lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.05, anneal_epochs=2),
    }


def timm_optimizers() -> list[str]:
    """timm's optimizers that run on a CPU without extra packages (bitsandbytes, apex)."""
    import timm.optim

    return [n for n in timm.optim.list_optimizers() if not n.startswith(("bnb", "fused"))]


def timm_optimizer(name: str) -> Callable[[nn.Module], Any]:
    def make(model: nn.Module) -> Any:
        import timm.optim

        return timm.optim.create_optimizer_v2(model, name, lr=1e-3, weight_decay=0.01)

    return make


# ------------------------------------------------------------------------------- registry


def all_architectures() -> list[Architecture]:
    rows: list[Architecture] = []
    for name in HF_MODELS:
        rows.append(Architecture(f"hf/{name}", hf_builder(name), "transformers", hf=True))
    for name in TIMM_MODELS:
        rows.append(Architecture(f"timm/{name}", timm_builder(name), "timm"))
    for kind, names in torchvision_names().items():
        for name in names:
            rows.append(
                Architecture(
                    f"tv-{kind[:3]}/{name}",
                    torchvision_builder(kind, name),
                    "torchvision",
                    quantized=kind == "quantization",
                    size_model=(
                        torchvision_builder(kind, name, quantize=False)
                        if kind == "quantization"
                        else None
                    ),
                )
            )
    special = {
        "weight_norm_legacy": legacy_weight_norm,
        "weight_norm_parametrize": parametrized_weight_norm,
        "parametrize_custom": parametrized_custom,
        "spectral_norm_legacy": spectral_norm_legacy,
        "extra_state": extra_state_model,
        "tied_embeddings": tied_embeddings,
    }
    for name, build in special.items():
        rows.append(Architecture(f"torch/{name}", build, "torch"))
    rows += [
        Architecture("torch/quantized_static", static_quantized_cnn, "torch", quantized=True),
        Architecture("torch/quantized_dynamic_mlp", dynamic_quantized_mlp, "torch", quantized=True),
        Architecture(
            "hf/BertForMaskedLM+quantize_dynamic",
            dynamic_quantized_bert,
            "transformers",
            quantized=True,
            size_model=hf_builder("BertForMaskedLM"),
        ),
        Architecture("torch/compiled", compiled, "torch", wrapper_prefix="_orig_mod."),
        Architecture("torch/data_parallel", data_parallel, "torch", wrapper_prefix="module."),
        Architecture("torch/module_prefix", ddp_style_prefix, "torch", wrapper_prefix="module."),
    ]
    for name, make in torch_optimizers().items():
        build = sparse_embedding if name == "SparseAdam" else TinyMLP
        rows.append(Architecture(f"optim/{name}", build, "torch", optimizer=make))
    for name, make in torch_schedulers().items():
        rows.append(Architecture(f"sched/{name}", TinyMLP, "torch", scheduler=make))
    for name in timm_optimizers():
        rows.append(
            Architecture(f"timm-optim/{name}", TinyMLP, "timm", optimizer=timm_optimizer(name))
        )
    by_name = {a.name: a for a in rows}
    for first, *others in FAMILIES:
        for name in others:
            if name in by_name:  # a family's member that another release lacks is no error
                by_name[name].variant_of = first
    return rows
