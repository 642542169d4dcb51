"""Which rules decide "loads": torch's ``load_state_dict``, or transformers' ``from_pretrained``.

A Hugging Face user never loads a checkpoint with ``load_state_dict``: ``from_pretrained``
does, and it accepts what a strict torch load refuses. ``save_pretrained`` leaves out a
tied key (``lm_head.weight``) and ``from_pretrained`` ties it back; a model declares keys
to ignore (``_keys_to_ignore_on_load_*``, the legacy ``rotary_emb.inv_freq`` and
``position_ids`` buffers); and transformers 5 converts legacy checkpoint layouts on load
(per-expert MoE weights merged, the ViT family's keys renamed). A gate that speaks only
torch's rules fails on every fresh checkpoint of such a model.

So, for a ``PreTrainedModel``, the verdict is transformers' own: its conversion mapping
(``get_model_conversion_mapping``) and loader (``convert_and_load_state_dict_in_model``)
run on a meta copy of the model with a state of meta tensors (no tensor data is read and
the user's model is not touched), then the parts of ``_finalize_model_loading`` that
change the loading info: ``mark_tied_weights_as_initialized``, ``tie_weights`` and
``_adjust_missing_and_unexpected_keys``. The keys those rules accepted are named with the
rule that accepted them, so a report shows why a key a strict load would refuse passed.

transformers is imported only when the model's class comes from it: a model of any other
library costs no import. transformers 4.50 to 4.x decide on keys before reading data,
by functions of their own (``transformers4_load``); older ones are not supported:
``rules="auto"`` keeps torch's rules for them and says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

RULES = ("auto", "torch", "transformers")

# what a load attempt returns: missing, unexpected, shape mismatches (key, checkpoint, model)
# and any other error, as the gate's torch load does
# A transformers PreTrainedModel: typed loosely, transformers being optional (and untyped)
HFModel = Any

LoadOutcome = tuple[list[str], list[str], list[tuple[str, str, str]], "str | None"]


@dataclass
class LoadVerdict:
    """What a load under one set of rules refused, and what it accepted only by its rules."""

    missing: list[str]
    unexpected: list[str]
    shapes: list[tuple[str, str, str]]  # key, checkpoint shape, model shape
    error: str | None
    rules: str  # "torch" or "transformers"
    how: str  # the rules, as a report names them: "load_state_dict(strict=True)"
    # "key: why" for each key that these rules accepted where a strict torch load would not
    accepted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. why auto kept torch's rules
    # the keys left unmatched on each side (checkpoint key -> tensor, model key -> tensor),
    # for the likely-renames diff; None: the whole checkpoint against the whole model
    unmatched: tuple[dict[str, Any], dict[str, Any]] | None = None


def is_transformers_model(model: object) -> bool:
    """Is ``model`` a transformers ``PreTrainedModel``? Imports transformers only if so likely."""
    return library_instance(model, "transformers", "PreTrainedModel")


def library_instance(obj: object, package: str, class_name: str) -> bool:
    """Is ``obj`` an instance of ``package.class_name``, importing ``package`` only if so likely.

    An instance of a library's class (or of a ``trust_remote_code`` class built on it) has
    a class from a ``<package>.`` module in its MRO; anything else is decided without
    importing the library, which takes seconds. A library that does not import is not one
    whose rules apply.
    """
    prefix = f"{package}."
    if not any((cls.__module__ or "").startswith(prefix) for cls in type(obj).__mro__):
        return False
    try:
        cls = getattr(__import__(package), class_name)  # a top-level package
    except Exception:
        return False
    return isinstance(obj, cls)


def transformers_version() -> tuple[int, ...]:
    import transformers

    return tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])


def choose_rules(model: nn.Module, rules: str) -> tuple[str, list[str]]:
    """``"torch"`` or ``"transformers"`` for ``rules`` (``auto`` decided), and notes on why."""
    if rules not in RULES:
        raise ValueError(
            f"assert_checkpoint_loads(rules={rules!r}): rules must be one of "
            + ", ".join(repr(r) for r in RULES)
        )
    if rules == "torch":
        return "torch", []
    hf_model = is_transformers_model(model)
    if not hf_model:
        if rules == "transformers":
            raise ValueError(
                f"assert_checkpoint_loads(rules='transformers'): {type(model).__name__} is not a "
                "transformers PreTrainedModel; only from_pretrained applies transformers' "
                "loading rules, so pass rules='torch' (or 'auto')"
            )
        return "torch", []
    quantized = _torch_quantized_module(model)
    if rules == "auto" and quantized is not None:
        return "torch", [
            f"torch's rules were applied: {quantized} is a torch.ao quantized module, whose "
            "packed weights only its own load_state_dict loads (from_pretrained does not)"
        ]
    if transformers_version() < (5, 0) and not _has_v4_loader():
        import transformers

        floor = (
            f"transformers {transformers.__version__} is older than 4.50, the first whose "
            "loading rules the gate applies"
        )
        if rules == "transformers":
            raise ValueError(f"assert_checkpoint_loads(rules='transformers'): {floor}")
        return "torch", [f"torch's rules were applied: {floor}"]
    return "transformers", []


def _torch_quantized_module(model: nn.Module) -> str | None:
    """The name of a ``torch.ao`` quantized module in ``model`` (``quantize_dynamic``), if any."""
    for name, module in model.named_modules():
        if type(module).__module__.startswith("torch.ao.nn.quantized"):
            return name or type(module).__name__
    return None


def _has_v4_loader() -> bool:
    """transformers 4.50 to 4.x: the key-level helpers its ``_load_pretrained_model`` calls."""
    from transformers import modeling_utils

    return all(
        hasattr(modeling_utils, name)
        for name in ("_find_missing_and_unexpected_keys", "_find_mismatched_keys")
    ) and hasattr(modeling_utils.PreTrainedModel, "_get_key_renaming_mapping")


def decide_load(
    model: nn.Module,
    state: Mapping[str, Any],
    *,
    rules: str,
    strict: bool,
    copy: Callable[[nn.Module], nn.Module],
    torch_load: Callable[[nn.Module, Mapping[str, Any]], LoadOutcome],
) -> LoadVerdict:
    """Load ``state`` into ``copy(model)`` (a meta copy) under ``rules``, and say what failed.

    ``torch_load`` is the gate's strict-free ``load_state_dict`` attempt, used for torch's
    rules; transformers' rules run its own loader on the copy instead.
    """
    chosen, notes = choose_rules(model, rules)
    if chosen == "torch":
        missing, unexpected, shapes, error = torch_load(copy(model), state)
        how = f"load_state_dict(strict={strict})"
        return LoadVerdict(missing, unexpected, shapes, error, "torch", how, notes=notes)
    if transformers_version() < (5, 0):
        return transformers4_load(copy(model), state, strict=strict)
    return transformers_load(copy(model), state, strict=strict)


def transformers_load(target: HFModel, state: Mapping[str, Any], *, strict: bool) -> LoadVerdict:
    """What ``from_pretrained(..., output_loading_info=True)`` reports for ``state``.

    ``target`` is a meta copy of the model, loaded in place; ``state`` is a checkpoint's
    state_dict, real or meta tensors (only shapes and dtypes are used).
    """
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    how = f"transformers {transformers.__version__} from_pretrained's rules (strict={strict})"
    meta_state = {key: _on_meta(value) for key, value in state.items()}
    model_keys = dict(target.state_dict())
    config = LoadStateDictConfig(
        device_map={"": "meta"},
        weight_mapping=get_model_conversion_mapping(target, None, None),
        dtype_plan=target._get_dtype_plan(None),
    )
    # the loader's progress bar and its warnings (a checkpoint seen as corrupted, a tie
    # not made) are transformers talking to a from_pretrained user: the report says it all
    bar = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        info, _ = convert_and_load_state_dict_in_model(
            model=target, state_dict=meta_state, load_config=config
        )
        before_marking = set(info.missing_keys)
        target.mark_tied_weights_as_initialized(info)
        shared = before_marking - info.missing_keys  # custom code's shared modules
        before_tie = set(info.missing_keys)
        target.tie_weights(missing_keys=info.missing_keys, recompute_mapping=False)
        tied = before_tie - info.missing_keys
        before_ignore = (set(info.missing_keys), set(info.unexpected_keys))
        target._adjust_missing_and_unexpected_keys(info)
    except Exception as exc:  # a conversion that cannot run on meta, a model's own error
        error = f"transformers' loader raised {type(exc).__name__}: {exc}"
        return LoadVerdict([], [], [], error, "transformers", how)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()

    errors = list(info.error_msgs) + [f"{k}: {v}" for k, v in info.conversion_errors.items()]
    shapes = sorted(
        (key, _shape(checkpoint), _shape(expected))
        for key, checkpoint, expected in info.mismatched_keys
    )
    names, renamings, converters = _source_names(target, meta_state, model_keys)
    accepted = _renamed(target, names, renamings, converters, model_keys, info)
    accepted += [
        f"{key}: missing, loaded through a module it shares with another key (custom code)"
        for key in sorted(shared)
    ]
    accepted += [
        f"{key}: missing, tied to {_tie_source(target, key)} "
        "(transformers' tied weights: tie_word_embeddings / _tied_weights_keys)"
        for key in sorted(tied)
    ]
    accepted += _ignored(target, before_ignore[0] - info.missing_keys, "missing")
    accepted += _ignored(target, before_ignore[1] - info.unexpected_keys, "unexpected")
    unmatched = (
        {k: v for k, v in meta_state.items() if names[k][0] not in model_keys},
        {k: model_keys[k] for k in info.missing_keys if k in model_keys},
    )
    return LoadVerdict(
        sorted(info.missing_keys),
        sorted(info.unexpected_keys),
        shapes,
        "; ".join(errors) or None,
        "transformers",
        how,
        accepted=accepted,
        unmatched=unmatched,
    )


def transformers4_load(target: HFModel, state: Mapping[str, Any], *, strict: bool) -> LoadVerdict:
    """The same for transformers 4.50 to 4.x, whose loader decides on keys before any data.

    Its ``_load_pretrained_model`` steps, in its order, by its own functions: the
    base-model prefix and ``_get_key_renaming_mapping`` (legacy ``gamma``/``beta`` and weight
    norm names), ``_find_missing_and_unexpected_keys`` (tied parameters, non-persistent
    buffers), ``_find_mismatched_keys`` on the checkpoint's shapes, and
    ``_adjust_missing_and_unexpected_keys`` (the keys to ignore). The key mapping is the
    one ``from_pretrained`` passes: the class's ``_checkpoint_conversion_mapping`` for the
    vision-language models it lists (Llava, Qwen2-VL, ...), whose ``save_pretrained`` writes
    the old layout back (:func:`_v4_key_mapping`).
    """
    import transformers
    from transformers.modeling_utils import (
        _find_mismatched_keys,
        _find_missing_and_unexpected_keys,
        find_tied_parameters,
    )

    how = f"transformers {transformers.__version__} from_pretrained's rules (strict={strict})"
    meta_state = {key: _on_meta(value) for key, value in state.items()}
    keys = list(meta_state)
    prefix = target.base_model_prefix
    task_from_base, base_from_task = _prefix_direction(target, prefix, keys)
    key_mapping = _v4_key_mapping(target)
    try:
        names = target._get_key_renaming_mapping(keys, key_mapping, base_from_task, task_from_base)
        loaded = list(names.values())
        missing, unexpected = _find_missing_and_unexpected_keys(
            target, keys, loaded, base_from_task, None
        )
        mismatched, shapes = _find_mismatched_keys(
            target, meta_state, None, True, names, False, True
        )
        adjusted = target._adjust_missing_and_unexpected_keys(
            list(missing), list(unexpected), task_from_base
        )
    except Exception as exc:  # a model's own renaming hook, a corrupted prefix layout
        error = f"transformers' loader raised {type(exc).__name__}: {exc}"
        return LoadVerdict([], [], [], error, "transformers", how)
    model_keys = dict(target.state_dict())
    accepted = _renamed_v4(target, prefix, names, model_keys, mismatched, key_mapping)
    groups = find_tied_parameters(target)
    accepted += _tied_v4(groups, model_keys, loaded, missing)
    buffers = {name for name, _ in target.named_buffers()}
    accepted += [
        f"{key}: unexpected, ignored (a non-persistent buffer of the model)"
        for key in sorted(set(loaded) - set(model_keys) - set(unexpected))
        if key in buffers
    ]
    accepted += _ignored(target, set(missing) - set(adjusted[0]), "missing")
    accepted += _ignored(target, set(unexpected) - set(adjusted[1]), "unexpected")
    unmatched = (
        {k: v for k, v in meta_state.items() if names.get(k) not in model_keys},
        {k: model_keys[k] for k in adjusted[0] if k in model_keys},
    )
    return LoadVerdict(
        sorted(adjusted[0]),
        sorted(adjusted[1]),
        sorted((k, _shape(c), _shape(m)) for k, (c, m) in zip(mismatched, shapes, strict=True)),
        None,
        "transformers",
        how,
        accepted=accepted,
        unmatched=unmatched,
    )


def _v4_key_mapping(target: HFModel) -> dict[str, str] | None:
    """The ``key_mapping`` transformers 4's ``from_pretrained`` applies when none is passed:
    the class's ``_checkpoint_conversion_mapping`` where a class of its MRO is named after
    one of ``modeling_utils.VLMS`` (the same test ``from_pretrained`` makes), else none."""
    from transformers import modeling_utils

    families = getattr(modeling_utils, "VLMS", ())
    named = any(
        family in cls.__name__.lower() for cls in type(target).__mro__[:-1] for family in families
    )
    return dict(target._checkpoint_conversion_mapping) if named else None


def _prefix_direction(target: HFModel, prefix: str, keys: list[str]) -> tuple[bool, bool]:
    """transformers 4's ``(task_from_base, base_from_task)``: whether the checkpoint lacks
    the base-model prefix the model has, or has one the model lacks."""
    has_prefix = bool(prefix) and any(k.startswith(prefix) for k in keys)
    expects_prefix = bool(prefix) and hasattr(target, prefix)
    return not has_prefix and expects_prefix, has_prefix and not expects_prefix


def _renamed_v4(
    target: HFModel,
    prefix: str,
    names: Mapping[str, str],
    model_keys: Mapping[str, Any],
    mismatched: Any,
    key_mapping: Mapping[str, str] | None,
) -> list[str]:
    """The keys transformers 4's key renaming loaded under a model key, and what renamed
    each: the model's ``_fix_state_dict_key_on_load``, its class's
    ``_checkpoint_conversion_mapping`` or the base-model prefix."""
    accepted = []
    for key, name in names.items():
        if name != key and name in model_keys and name not in mismatched:
            fixed, by_fix = target._fix_state_dict_key_on_load(key)
            pattern = next((p for p in key_mapping or {} if re.search(p, fixed)), None)
            if by_fix:
                why = f"{type(target).__name__}._fix_state_dict_key_on_load"
            elif pattern is not None:
                why = f"{type(target).__name__}._checkpoint_conversion_mapping {pattern!r}"
            else:
                why = f"base_model_prefix {prefix!r}"
            accepted.append(f"{key}: renamed to {name} by transformers' key renaming ({why})")
    return accepted


def _tied_v4(
    groups: list[list[str]], model_keys: Mapping[str, Any], loaded: list[str], missing: Any
) -> list[str]:
    """The model keys neither loaded nor missing: tied parameters, each named with a loaded
    key of its group (``find_tied_parameters``'s groups)."""
    accepted = []
    for key in sorted(set(model_keys) - set(loaded) - set(missing)):
        group: list[str] = next((g for g in groups if key in g), [])
        source = next((k for k in group if k in loaded), "a tied key")
        accepted.append(
            f"{key}: missing, tied to {source} (transformers' tied parameters, shared in the model)"
        )
    return accepted


def _on_meta(value: Any) -> Any:
    """A meta tensor of ``value``'s shape and dtype: the loader reads no data through it."""
    if isinstance(value, torch.Tensor) and value.device.type != "meta":
        try:
            return torch.empty_like(value, device="meta")
        except (RuntimeError, NotImplementedError):  # quantized, sparse: kept as they are
            return value
    return value


def _shape(size: Any) -> str:
    return str(list(size))


def _tie_source(target: HFModel, key: str) -> str:
    """The key a tie took ``key``'s tensor from: its declared source, or (when the source
    was the missing one) the declared target, as ``tie_weights`` swaps them."""
    ties = target.all_tied_weights_keys
    if key in ties:
        return ties[key]
    for other, source in ties.items():
        if source == key:
            return other
    return "a tied key"


def _source_names(target: HFModel, state: Mapping[str, Any], model_keys: Mapping[str, Any]):
    """Each checkpoint key -> (the model key it loads into, converter pattern), by transformers.

    The same two calls of ``rename_source_key`` that ``convert_and_load_state_dict_in_model``
    makes, on a fresh conversion mapping (renaming marks a mapping used).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        rename_source_key,
    )

    mapping = get_model_conversion_mapping(target, None, None)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    prefix = target.base_model_prefix
    names = {}
    for key in state:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, model_keys)
        if renamed not in model_keys and key in model_keys:
            renamed, pattern = rename_source_key(key, [], [], prefix, model_keys)
        names[key] = (renamed, pattern)
    return names, renamings, converters


def _renamed(
    target: HFModel,
    names: Mapping[str, tuple[str, str | None]],
    renamings: list[Any],
    converters: list[Any],
    model_keys: Mapping[str, Any],
    info: Any,
) -> list[str]:
    """The checkpoint keys that transformers' checkpoint conversion loaded under another name."""
    refused = info.missing_keys | {k[0] for k in info.mismatched_keys}
    by_converter: dict[str, list[str]] = {}
    converter_of: dict[str, Any] = {}
    lines = []
    for key, (renamed, pattern) in names.items():
        if renamed == key or renamed not in model_keys or renamed in refused:
            continue
        if pattern is not None:
            by_converter.setdefault(renamed, []).append(key)
            converter_of[renamed] = next(c for c in converters if pattern in c.source_patterns)
            continue
        rules = []
        current = key
        for renaming in renamings:  # which of the renamings fired, in transformers' order
            after, _ = renaming.rename_source_key(current)
            if after != current:
                rules.append(f"{_patterns(renaming, 'source')} -> {_patterns(renaming, 'target')}")
                current = after
        why = (
            "WeightRenaming " + ", ".join(rules)
            if rules
            else f"base_model_prefix {target.base_model_prefix!r}"
        )
        lines.append(f"{key}: renamed to {renamed} by transformers' checkpoint conversion ({why})")
    for renamed, keys in by_converter.items():
        converter = converter_of[renamed]
        ops = ", ".join(type(op).__name__ for op in converter.operations)
        shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} keys)" if len(keys) > 3 else "")
        lines.append(
            f"{renamed}: built from {shown} by transformers' checkpoint conversion "
            f"(WeightConverter {ops})"
        )
    return lines


def _patterns(transform: Any, side: str) -> str:
    """A transform's patterns as declared (before transformers compiles them to regexes)."""
    declared = getattr(transform, f"_original_{side}_patterns", None)
    patterns = declared or getattr(transform, f"{side}_patterns")
    return " | ".join(f"'{p}'" for p in patterns)


def _ignored(target: HFModel, keys: set[str], side: str) -> list[str]:
    """Why ``_adjust_missing_and_unexpected_keys`` dropped each key: the pattern and its source."""
    declared = (
        target._keys_to_ignore_on_load_missing
        if side == "missing"
        else target._keys_to_ignore_on_load_unexpected
    ) or ()
    attribute = f"_keys_to_ignore_on_load_{side}"
    lines = []
    for key in sorted(keys):
        pattern = next((p for p in declared if re.search(p, key)), None)
        if pattern is not None:
            why = f"{type(target).__name__}.{attribute} pattern {pattern!r}"
        elif key.endswith("rotary_emb.inv_freq"):
            why = "transformers ignores legacy rotary_emb.inv_freq buffers"
        elif key.endswith("position_ids"):
            why = "transformers ignores legacy position_ids buffers"
        else:
            why = "transformers' ignore rules"
        lines.append(f"{key}: {side}, ignored ({why})")
    return lines
