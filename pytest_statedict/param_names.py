"""Parameter names for an optimizer state saved by position.

``optimizer.state_dict()`` numbers parameters by position; only an optimizer built from
``model.named_parameters()`` (torch 2.6 and newer) saves their names. Without names, a
verdict can check that each saved state fits the parameter now at its position, but not
that it is the parameter it was saved for: two swapped submodules of one shape go unseen.
A model (and, where its groups are not in ``model.parameters()`` order, its optimizer)
says which name each position had, so that a release recorded from a file is checked by
name, as one recorded from the live model is.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from .errors import StateDictError
from .schema import Schema
from .schema_entries import OptimizerSchema, elementwise_shapes

__all__ = ["positions_named"]


def positions_named(schema: Schema, model: nn.Module, optimizer: Any = None) -> Schema:
    """``schema`` with its optimizer's positions replaced by the names ``model`` gives them.

    The names come from ``optimizer``'s param_groups where it is given (built over
    ``model``), else from ``model.parameters()`` order, the order of an optimizer built as
    ``Optimizer(model.parameters())``. Refused, naming the mismatch, where the counts or a
    saved state's shape do not fit: a wrong name is worse than none.
    """
    opt = schema.optimizer
    if opt is None or all(isinstance(p, str) for g in opt.param_groups for p in g.params):
        return schema
    if optimizer is None and len(opt.param_groups) > 1:
        raise StateDictError(
            f"the optimizer state of {schema.source or 'the checkpoint'} has "
            f"{len(opt.param_groups)} param_groups, so it was not built as "
            "Optimizer(model.parameters()) and the model alone cannot name its positions: "
            "return (model, optimizer) from the --model function, the optimizer built as "
            "training built it"
        )
    names = _names_in_order(model, optimizer)
    saved = [p for g in opt.param_groups for p in g.params]
    if len(saved) != len(names):
        raise StateDictError(
            f"the optimizer state of {schema.source or 'the checkpoint'} has {len(saved)} "
            f"parameters, and {type(model).__name__} has {len(names)}: its positions cannot "
            "be named by this model (pass the optimizer it was built with too)"
        )
    by_position = {int(p): names[i] for i, p in enumerate(saved)}
    shapes = {key: param.shape for key, param in model.named_parameters()}
    _refuse_misfits(opt, by_position, shapes, schema.source)

    def named(p: str | int) -> str | int:
        return by_position.get(int(p), p) if not isinstance(p, str) else p

    return replace(
        schema,
        optimizer=replace(
            opt,
            param_groups=tuple(
                replace(g, params=tuple(named(p) for p in g.params)) for g in opt.param_groups
            ),
            state=tuple(replace(s, param=named(s.param)) for s in opt.state),
        ),
    )


def _names_in_order(model: nn.Module, optimizer: Any) -> list[str]:
    """The parameter names in the order an optimizer numbers its parameters."""
    if optimizer is None:
        return [name for name, _ in model.named_parameters()]
    by_id: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), name)  # a tied parameter by its first name, as named_parameters()
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise StateDictError(
                    f"the optimizer holds a parameter that is not one of "
                    f"{type(model).__name__}'s: build it over the model that was given"
                )
            names.append(by_id[id(p)])
    return names


def _refuse_misfits(
    opt: OptimizerSchema,
    by_position: dict[int, str],
    shapes: dict[str, Any],
    source: str | None,
) -> None:
    for state in opt.state:
        if isinstance(state.param, str):
            continue
        name = by_position.get(int(state.param))
        shape = shapes.get(name) if name is not None else None
        for entry, saved in elementwise_shapes(state.entries):
            if shape is not None and tuple(saved) != tuple(shape):
                raise StateDictError(
                    f"the optimizer state saved at position {state.param} of "
                    f"{source or 'the checkpoint'} has {entry} of shape {list(saved)}, but the "
                    f"model's parameter {name!r} there has shape {list(shape)}: this model "
                    "does not name those positions"
                )
