"""PEFT's loading rules: what ``set_peft_model_state_dict`` makes of an adapter.

A PEFT user never loads an adapter with ``load_state_dict``: ``PeftModel.from_pretrained``
and ``load_adapter`` call ``set_peft_model_state_dict``, which names the adapter's keys as
the model does (it inserts the adapter name: ``q.lora_A.weight`` loads into
``q.lora_A.default.weight``; a ``modules_to_save`` module's ``head.weight`` into its
trainable copy ``head.modules_to_save.default.weight``) and loads them with
``strict=False``: the base model's weights are never in an adapter. Judged by torch's
rules, every unchanged adapter fails (its keys are "unexpected", the base model's
"missing") and a rename hint points the trained head at its frozen copy
(``head.original_module``); with ``strict=False`` a layer renamed since the adapter was
saved passes, while PEFT loads the adapter silently with that layer untrained.

So, for a ``PeftModel`` checked against an adapter, the verdict is PEFT's own:
``get_peft_model_state_dict`` on a meta copy says which keys the adapter should hold (what
``save_pretrained`` writes today, in the file's names), and ``set_peft_model_state_dict``
maps the checkpoint's keys onto the model (its own key mapping runs on the copy; only the
final ``load_state_dict`` is the gate's meta load). An adapter key the model expects but
the checkpoint lacks is missing, a checkpoint key that lands on no model key unexpected, a
shape that differs (the rank changed) a mismatch, on which PEFT raises; all are named as
the adapter file names them, so a ``rename=`` hint pairs adapter keys only and points at
the trainable copies, never at ``original_module``.

peft is imported only for a model whose class comes from it: every other model costs
nothing.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .errors import first_line
from .hf_rules import RULES, LoadOutcome, LoadVerdict, library_instance

__all__ = [
    "ALL_RULES",
    "PEFT",
    "holds_an_adapter",
    "is_peft_model",
    "peft_load",
    "uses_peft_rules",
]

PEFT = "peft"
# every value of ``rules=``: torch's, transformers', PEFT's, or "auto"
ALL_RULES = (*RULES, PEFT)
# the frozen parts of a PeftModel's own state_dict, which an adapter never holds
_FROZEN_PARTS = frozenset({"base_layer", "original_module"})
# what the caught load_state_dict returns to PEFT (torch's own type is private)
_NothingLoaded = namedtuple("_NothingLoaded", ["missing_keys", "unexpected_keys"])


def is_peft_model(model: object) -> bool:
    """Is ``model`` a ``peft.PeftModel``? Imports peft only if its class comes from peft."""
    return library_instance(model, "peft", "PeftModel")


def holds_an_adapter(model: Any, state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is an adapter as PEFT saves one, not a PeftModel's whole state_dict.

    A whole state_dict names its adapters' weights with the adapter name
    (``lora_A.default.weight``) and holds the frozen base layers (``base_layer``,
    ``original_module``); an adapter holds neither (PEFT removes the adapter name on save).
    """
    marks = _FROZEN_PARTS | set(model.peft_config)
    return bool(state) and not any(marks.intersection(key.split(".")) for key in state)


def uses_peft_rules(
    model: nn.Module, state: Mapping[str, Any], rules: str, adapter_name: str | None = None
) -> bool:
    """Whether ``rules`` (``"auto"`` decided) are PEFT's for loading ``state`` into ``model``.

    ``"auto"`` picks PEFT's for a PeftModel checked against an adapter; against a whole
    state_dict of a PeftModel, the model's own ``load_state_dict`` decides as for any model.
    """
    if rules not in ALL_RULES:
        raise ValueError(
            f"assert_checkpoint_loads(rules={rules!r}): rules must be one of "
            + ", ".join(repr(r) for r in ALL_RULES)
        )
    peft_model = is_peft_model(model)
    if not peft_model and (rules == PEFT or adapter_name is not None):
        given = "rules='peft'" if rules == PEFT else f"adapter_name={adapter_name!r}"
        raise ValueError(
            f"assert_checkpoint_loads({given}): {type(model).__name__} is not a peft "
            "PeftModel; only a PeftModel loads adapters by PEFT's rules"
        )
    return rules == PEFT or (rules == "auto" and peft_model and holds_an_adapter(model, state))


def peft_load(
    model: Any,
    target: Any,
    state: Mapping[str, Any],
    *,
    strict: bool,
    adapter_name: str | None,
    torch_load: Callable[[nn.Module, Mapping[str, Any]], LoadOutcome],
) -> LoadVerdict:
    """What loading the adapter ``state`` into ``model`` with ``set_peft_model_state_dict``
    refuses.

    ``target`` is a meta copy of ``model``; ``torch_load`` is the gate's meta load, into
    which PEFT's own key mapping hands the state it would load. Missing keys are only the
    adapter's (what ``get_peft_model_state_dict`` gives for the model today); every key is
    named as the adapter file names it.
    """
    import peft
    from peft.utils import get_peft_model_state_dict

    name = _adapter_named(model, adapter_name)
    how = (
        f"PEFT's set_peft_model_state_dict (peft {peft.__version__}, adapter {name!r}, "
        f"strict={strict})"
    )
    # what save_pretrained would write today, read from the model itself: it copies no
    # tensor (a prompt-learning adapter's embeddings are computed, which a meta copy cannot);
    # embedding layers are left out, as "auto" would ask the Hub about the base model
    expected = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    owned: dict[str, str] = {}
    if model.peft_config[name].is_prompt_learning:
        # PEFT loads a prompt encoder's state by key, itself, not through load_state_dict
        verdict = _by_adapter_keys(state, expected, how)
    else:
        owned, _ = _mapped(target, expected, name)  # model key -> the adapter key saved from it
        try:
            into, loaded = _mapped(target, state, name)
        except Exception as exc:  # PEFT's mapping raises: a modules_to_save module renamed
            verdict = _by_adapter_keys(state, expected, how, raised=exc)
        else:
            missing, unexpected, shapes, error = torch_load(target, loaded)
            verdict = LoadVerdict(
                [owned[k] for k in missing if k in owned],  # the base model's: no adapter's
                [into.get(k, k) for k in unexpected],
                [(into.get(k, k), ours, theirs) for k, ours, theirs in shapes],
                error,
                PEFT,
                how,
            )
            if (verdict.missing or verdict.unexpected) and not shapes and not error:
                verdict.notes.append(
                    "PEFT itself loads this adapter without an error (its load is "
                    "strict=False): the missing adapter weights keep their initial values, "
                    "untrained"
                )
    verdict.unmatched = (
        {k: state[k] for k in verdict.unexpected if k in state},
        {k: expected[k] for k in verdict.missing},
    )
    verdict.notes[:0] = _naming(owned, verdict)
    return verdict


def _adapter_named(model: Any, adapter_name: str | None) -> str:
    """The adapter to load into: the one named, the model's only one, or ``"default"``
    (PEFT's own default name)."""
    names = list(model.peft_config)
    listed = ", ".join(repr(n) for n in names)
    if adapter_name is None:
        if len(names) == 1:
            return names[0]
        if "default" not in names:
            raise ValueError(
                f"assert_checkpoint_loads(): {type(model).__name__} has the adapters {listed} "
                "and none is called 'default': pass adapter_name= to say which one the "
                "adapter is loaded into"
            )
        return "default"
    if adapter_name not in names:
        raise ValueError(
            f"assert_checkpoint_loads(adapter_name={adapter_name!r}): "
            f"{type(model).__name__} has no adapter of that name; its adapters are {listed}"
        )
    return adapter_name


def _mapped(
    target: Any, state: Mapping[str, Any], adapter_name: str
) -> tuple[dict[str, str], dict[str, Any]]:
    """The state PEFT's ``set_peft_model_state_dict`` would load into ``target``, and the
    adapter key each of its keys came from (model key -> adapter key).

    PEFT's own mapping runs (the adapter name inserted, ``modules_to_save`` keys moved to
    their trainable copies, its tuner's and transformers' conversions); its final
    ``load_state_dict`` call is caught instead of run. A key is traced by its tensor, which
    the mapping passes on as it is.
    """
    from peft.utils import set_peft_model_state_dict

    handed: dict[str, Any] = {}

    def catch(state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> _NothingLoaded:
        handed.update(state_dict)
        return _NothingLoaded([], [])

    target.load_state_dict = catch
    try:
        set_peft_model_state_dict(target, dict(state), adapter_name=adapter_name)
    finally:
        del target.load_state_dict
    source: dict[int, str] = {}
    for key, value in state.items():
        source.setdefault(id(value), key)
    return {key: source.get(id(value), key) for key, value in handed.items()}, handed


def _by_adapter_keys(
    state: Mapping[str, Any],
    expected: Mapping[str, Any],
    how: str,
    *,
    raised: Exception | None = None,
) -> LoadVerdict:
    """The keys and shapes compared as the adapter file names them: where PEFT loads by
    key itself (a prompt encoder), or where its key mapping ``raised``."""
    notes = []
    if raised is not None:
        note = (
            f"the {type(raised).__name__} is set_peft_model_state_dict's own, raised before "
            "it loads anything"
        )
        if isinstance(raised, KeyError):
            note += ": it looks up each modules_to_save module's weights under today's name"
        notes.append(note)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        (k, _shape(state[k]), _shape(expected[k]))
        for k in state
        if k in expected and _shape(state[k]) != _shape(expected[k])
    ]
    error = first_line(raised) if raised is not None else None
    return LoadVerdict(missing, unexpected, shapes, error, PEFT, how, notes=notes)


def _naming(owned: Mapping[str, str], verdict: LoadVerdict) -> list[str]:
    """How to read the keys of a refused load: as the adapter file names them, with where
    PEFT loads one of them (a missing one where there is one)."""
    if not (verdict.missing or verdict.unexpected or verdict.shapes):
        return []
    by_adapter_key = {adapter_key: key for key, adapter_key in owned.items() if key != adapter_key}
    shown = next((k for k in verdict.missing if k in by_adapter_key), None)
    shown = shown or next(iter(by_adapter_key), None)
    if shown is None:
        return []
    return [
        "keys are named as the adapter file names them: PEFT loads "
        f"{shown} into {by_adapter_key[shown]}"
    ]


def _shape(value: Any) -> str:
    return str(list(getattr(value, "shape", ())))
