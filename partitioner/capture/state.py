"""A model's plain Python state: kept as it was through planning, and frozen caches found.

[Note: plain attributes]
Planning runs the model (the trace, the output and gradient checks, the batch-independence
check), and a model may keep state outside its parameters and buffers: timm's LeViT keeps
``attention_bias_cache``, a dict filled on the first call in eval mode with a tensor computed
from the ``attention_biases`` parameter. Two things follow.

- Planning must not leave such state changed: `preserved_attributes` snapshots every
  submodule's plain attributes (not parameters, buffers, submodules or nn.Module's own
  fields) and puts them back afterwards: an attribute planning added is removed, one it
  rebound is rebound, a dict, list or set it filled gets its old contents, and a plain tensor
  attribute changed in place gets its old values.
- A tensor in such state that autograd connects to the parameters (it requires grad: it was
  computed from them in grad mode) becomes a constant of the exported graph, so the split
  model would give those parameters no gradient through it, silently. `frozen_constants`
  finds them; the tracer then keeps the graph for inference only, and a backward through it
  raises naming the attribute and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["frozen_constants", "preserved_attributes"]

_MODULE_FIELDS = frozenset(nn.Module().__dict__)
_CONTAINERS = (dict, list, set)


def _plain(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in module.__dict__.items() if k not in _MODULE_FIELDS}


def _contents(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, set)):
        return type(value)(value)
    if isinstance(value, torch.Tensor) and not value.is_meta:
        return value.detach().clone()
    return None


@contextmanager
def preserved_attributes(model: nn.Module) -> Iterator[None]:
    """Run code that calls ``model`` and put its plain attributes back afterwards, even on
    an error ([Note: plain attributes])."""
    saved = []
    for module in model.modules():
        plain = _plain(module)
        saved.append((module, plain, {k: _contents(v) for k, v in plain.items()}))
    try:
        yield
    finally:
        for module, plain, contents in saved:
            _restore(module, plain, contents)


def _restore(module: nn.Module, plain: dict[str, Any], contents: dict[str, Any]) -> None:
    for key in [k for k in _plain(module) if k not in plain]:
        del module.__dict__[key]
    for key, value in plain.items():
        module.__dict__[key] = value
        old = contents[key]
        if isinstance(value, _CONTAINERS) and not _same(value, old):
            value.clear()
            value.update(old) if isinstance(value, (dict, set)) else value.extend(old)
        elif isinstance(value, torch.Tensor) and _changed(old, value):
            with torch.no_grad():
                value.copy_(old)


def _same(value: Any, old: Any) -> bool:
    """The same contents, item by item by identity (``==`` on tensors is elementwise)."""
    if isinstance(value, dict):
        return value.keys() == old.keys() and all(value[k] is old[k] for k in value)
    if isinstance(value, list):
        return len(value) == len(old) and all(a is b for a, b in zip(value, old, strict=True))
    return len(value) == len(old) and all(any(a is b for b in old) for a in value)


def _changed(old: torch.Tensor | None, value: torch.Tensor) -> bool:
    return old is not None and old.shape == value.shape and not torch.equal(old, value.detach())


def frozen_constants(model: nn.Module, constants: dict[str, Any]) -> list[str]:
    """Where the model keeps each tensor of ``constants`` (an exported program's lifted
    constants) that requires grad: ``"blocks.0.attn.cache['cpu']"``-style names, or the
    constant's own name when no attribute holds it ([Note: plain attributes])."""
    found = []
    for name, value in constants.items():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            found.append(_holder(model, value) or name)
    return found


def _holder(model: nn.Module, tensor: torch.Tensor) -> str | None:
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for key, value in _plain(module).items():
            if value is tensor:
                return f"{prefix}{key}"
            items: Any = value.items() if isinstance(value, dict) else ()
            if isinstance(value, (list, tuple)):
                items = enumerate(value)
            for k, v in items:
                if v is tensor:
                    return f"{prefix}{key}[{k!r}]"
    return None
