"""Tracing a model whose own names clash with torch.fx.GraphModule's (``meta``, ``graph``, …).

[Note: clashing names]
Every GraphModule uses a few attribute names for itself: ``meta`` (a dict), ``graph`` and
``code`` (properties), ``recompile`` and the rest of its methods. A model whose *top-level*
submodule, parameter or buffer has one of those names cannot be held by a traced graph under
that name: fx and torch.export both fail, with a message about an attribute that does not
exist. Nested names (``encoder.meta``) do not clash: a GraphModule holds them inside plain
submodules.

`renamed_root` gives the tracer a stand-in for such a model instead: a shallow copy whose
registries hold each clashing entry under a free name (``meta`` -> ``meta_``), of a subclass
made on the fly whose property of the old name returns the entry, so ``self.meta`` in the
model's own ``forward`` still finds it. The stand-in holds the model's own module, Parameter
and buffer objects: running it runs the model, gradients land on the model's parameters, and
an optimizer on the model trains the traced graph. The traced graph keeps the free names; the
map back (free name -> model's name) is in ``gm.meta[RENAMED_KEY]``, and `model_name` turns a
graph's qualified name into the model's. Only the places where a graph's names meet the
model's need it (`partitioner.splitting.compose.share_tensors`); the splitter registers the
model's own children, so its ``state_dict()`` keys are the model's whatever the graph calls
them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = [
    "GRAPH_MODULE_NAMES",
    "RENAMED_KEY",
    "graph_names",
    "mark_renamed",
    "model_name",
    "renamed_root",
]

log = logging.getLogger(__name__)

#: attributes every GraphModule has beyond nn.Module's: a model's own submodule, parameter or
#: buffer of one of these names cannot live in a traced graph under that name
GRAPH_MODULE_NAMES = frozenset(
    name
    for name in (*dir(fx.GraphModule), "meta", "graph", "code", "_graph", "_code")
    if not hasattr(nn.Module, name)
)

#: gm.meta key: {name in the graph: the model's name} for each renamed top-level entry
RENAMED_KEY = "modelsplit_renamed"

_REGISTRIES = ("_modules", "_parameters", "_buffers")


def renamed_root(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """``(model, {})`` when no top-level name clashes; else the stand-in of [Note: clashing
    names] and its map {free name: model's name}."""
    own = [name for registry in _REGISTRIES for name in getattr(model, registry)]
    clash = sorted(name for name in own if name in GRAPH_MODULE_NAMES)
    if not clash:
        return model, {}
    taken = set(own) | GRAPH_MODULE_NAMES | set(dir(model))
    renamed: dict[str, str] = {}
    for name in clash:
        free = name + "_"
        while free in taken:
            free += "_"
        taken.add(free)
        renamed[free] = name
    shell = copy.copy(model)  # a new __dict__ holding the same objects
    properties: dict[str, property] = {}
    for registry in _REGISTRIES:
        entries = dict(getattr(model, registry))
        for free, name in renamed.items():
            if name in entries:
                entries = {free if k == name else k: v for k, v in entries.items()}
                properties[name] = _alias(registry, free)
        shell.__dict__[registry] = entries
    persistent = model._non_persistent_buffers_set
    shell.__dict__["_non_persistent_buffers_set"] = {
        next((f for f, n in renamed.items() if n == b), b) for b in persistent
    }
    cls = type(model)
    shell.__class__ = type(cls.__name__, (cls,), {**properties, "__module__": cls.__module__})
    return shell, renamed


def _alias(registry: str, free: str) -> property:
    """``self.<model's name>``: the entry held as ``free`` (a plain attribute assignment, such
    as ``self.counter = self.counter + 1`` on a renamed buffer, writes it there too)."""

    def get(self: nn.Module) -> object:
        return self.__dict__[registry][free]

    def put(self: nn.Module, value: object) -> None:
        self.__dict__[registry][free] = value

    return property(get, put)


def model_name(renamed: Mapping[str, str], name: str) -> str:
    """The model's qualified name of the graph's ``name`` (its first part mapped back)."""
    head, dot, rest = name.partition(".")
    return renamed.get(head, head) + dot + rest


def graph_names(renamed: Mapping[str, str], specs: Sequence[Any]) -> list[Any]:
    """``specs`` (leaf modules: types, or the model's qualified names) with each name the
    graph's (the inverse of `model_name`)."""
    back = {name: free for free, name in renamed.items()}
    return [model_name(back, spec) if isinstance(spec, str) else spec for spec in specs]


def mark_renamed(gm: fx.GraphModule, renamed: Mapping[str, str]) -> fx.GraphModule:
    """Record the map back on ``gm`` (and say so once in the log)."""
    if renamed:
        gm.meta[RENAMED_KEY] = dict(renamed)
        log.info(
            "top-level %s held in the traced graph as %s (names GraphModule uses itself)",
            ", ".join(repr(n) for n in renamed.values()),
            ", ".join(repr(n) for n in renamed),
        )
    return gm
