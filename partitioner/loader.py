"""Load a model and build example inputs from command-line strings.

A MODEL is ``path/to/file.py:factory`` or ``package.module:factory``: a callable
returning an ``nn.Module``. Inputs are random tensors described by shapes and
dtypes (``--input-shape 32,64 --dtype float32``); keyword arguments are JSON.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from partitioner.errors import ModelSplitError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "DEFAULT_INT_HIGH",
    "INT_DTYPES",
    "InputSpec",
    "UsageError",
    "build_inputs",
    "check_target",
    "load_factory",
    "load_model",
    "parse_dtype",
    "parse_json",
    "parse_shape",
]

log = logging.getLogger(__name__)

#: dtype names the CLI accepts, and the torch dtype each one means (torch is
#: imported on first use, so ``modelsplit show`` and ``--help`` start fast).
DTYPES: dict[str, str] = {
    "float32": "float32",
    "float": "float32",
    "float64": "float64",
    "double": "float64",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64",
    "long": "int64",
    "int32": "int32",
    "int": "int32",
    "bool": "bool",
}

#: Integer inputs are drawn from [0, high); 2 is safe for token ids and masks alike.
DEFAULT_INT_HIGH = 2


class UsageError(ModelSplitError, ValueError):
    """The command line names something that does not exist or cannot be read."""


_FLOATS = frozenset({"float32", "float64", "float16", "bfloat16"})
#: the names --dtype accepts for integer tensors (ids: drawn from [0, N) with ``name:N``)
INT_DTYPES = frozenset(name for name, d in DTYPES.items() if d not in _FLOATS and d != "bool")


@dataclass(frozen=True)
class InputSpec:
    """One random input tensor: its shape, dtype name, and for integers the range [0, high)."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    high: int = DEFAULT_INT_HIGH

    def make(self, generator: torch.Generator | None = None) -> torch.Tensor:
        import torch

        dtype: torch.dtype = getattr(torch, self.dtype)
        if self.dtype in _FLOATS:
            return torch.randn(self.shape, generator=generator).to(dtype)
        if self.dtype == "bool":
            return torch.randint(0, 2, self.shape, generator=generator).bool()
        return torch.randint(0, self.high, self.shape, generator=generator, dtype=dtype)

    def describe(self) -> str:
        return ",".join(str(d) for d in self.shape) + f" ({self.dtype})"


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32,64"`` (or ``"32x64"``) -> ``(32, 64)``; every dimension a positive integer."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise UsageError(
            f"malformed input shape {text!r}: give positive integers separated by commas, "
            f"batch dimension first, e.g. --input-shape 32,64"
        )
    return dims


def parse_dtype(text: str) -> tuple[str, int]:
    """``"float32"``, ``"int64"`` or ``"int64:50257"`` (integers drawn from [0, 50257)).

    Returns the torch dtype name and the integer range; torch is not imported.
    """
    name, _, high_text = text.partition(":")
    dtype = DTYPES.get(name.strip().lower())
    if dtype is None:
        raise UsageError(f"unknown dtype {text!r}: use one of {', '.join(sorted(DTYPES))}")
    high = DEFAULT_INT_HIGH
    if high_text:
        if dtype in _FLOATS or dtype == "bool":
            raise UsageError(f"dtype {text!r}: a range ':N' applies to integer dtypes only")
        try:
            high = int(high_text)
        except ValueError:
            high = 0
        if high < 1:
            raise UsageError(f"dtype {text!r}: the range after ':' must be a positive integer")
    return dtype, high


def input_specs(shapes: Sequence[str], dtypes: Sequence[str] = ()) -> list[InputSpec]:
    """One InputSpec per ``--input-shape``; one ``--dtype`` applies to all, else one each."""
    if not shapes:
        raise UsageError("no input shape: pass --input-shape, e.g. --input-shape 32,64")
    if len(dtypes) not in (0, 1, len(shapes)):
        raise UsageError(
            f"{len(dtypes)} --dtype for {len(shapes)} --input-shape: give one dtype for all "
            f"inputs or one per input"
        )
    parsed = [parse_dtype(d) for d in dtypes or ["float32"]]
    if len(parsed) == 1:
        parsed = parsed * len(shapes)
    return [
        InputSpec(parse_shape(s), dtype, high)
        for s, (dtype, high) in zip(shapes, parsed, strict=True)
    ]


def parse_json(text: str | None, what: str) -> dict[str, Any]:
    """A JSON object from the command line (``--kwargs``, ``--factory-kwargs``)."""
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(
            f"{what} is not valid JSON ({e.msg} at column {e.colno}): "
            f"""pass an object, e.g. {what} '{{"width": 64}}'"""
        ) from e
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object (got {type(value).__name__})")
    return value


def build_inputs(
    specs: Sequence[InputSpec], kwargs: dict[str, Any] | None = None, seed: int = 0
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """Random positional inputs, and keyword arguments with tensor specs made into tensors.

    A keyword value ``{"shape": [8, 16], "dtype": "int64"}`` becomes a random
    tensor; any other JSON value is passed as it is.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    args = tuple(s.make(gen) for s in specs)
    out: dict[str, Any] = {}
    for key, value in (kwargs or {}).items():
        if isinstance(value, dict) and "shape" in value:
            shape = value["shape"]
            text = ",".join(str(d) for d in shape) if isinstance(shape, list) else str(shape)
            dtype, high = parse_dtype(str(value.get("dtype", "float32")))
            out[key] = InputSpec(parse_shape(text), dtype, high).make(gen)
        else:
            out[key] = value
    return args, out


def _split_target(target: str) -> tuple[str, str]:
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name or not name.isidentifier():
        raise UsageError(
            f"MODEL {target!r} must be 'path/to/file.py:factory' or 'package.module:factory'"
        )
    return where, name


def _import_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise UsageError(f"model file {path!r} does not exist: check the path before ':'")
    name = "_modelsplit_user_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path!r}: it must be a Python file ending in .py")
    module = importlib.util.module_from_spec(spec)
    # Let the file import its neighbours, as `python path/to/file.py` would.
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _import_module(name: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and name.startswith(e.name):
            raise UsageError(
                f"no module named {name!r}: give a file path ('models.py:mlp') or an importable "
                f"module ('modelsplit.examples:mlp'), importable from the current directory"
            ) from e
        raise


def _is_file(where: str) -> bool:
    return where.endswith(".py") or os.sep in where or "/" in where


def check_target(target: str) -> None:
    """Check MODEL's form, and that its file exists, without importing anything."""
    where, _ = _split_target(target)
    if _is_file(where) and not os.path.isfile(where):
        raise UsageError(f"model file {where!r} does not exist: check the path before ':'")


@contextlib.contextmanager
def _no_exit(doing: str) -> Iterator[None]:
    """A model file that calls sys.exit() (a script's ``main`` run at import) is an error
    naming it, not an exit of the CLI with the file's own code and no message."""
    try:
        yield
    except SystemExit as e:
        raise UsageError(
            f"{doing} called sys.exit({e.code!r}): MODEL must name a factory in a module "
            f"that can be imported without running its script (guard it with "
            f"`if __name__ == '__main__':`)"
        ) from e


def load_factory(target: str) -> Callable[..., Any]:
    """The factory named by ``file.py:name`` or ``package.module:name``."""
    where, name = _split_target(target)
    is_file = _is_file(where)
    with _no_exit(f"importing {where}"):
        module = _import_file(where) if is_file else _import_module(where)
    factory = getattr(module, name, None)
    if factory is None:
        own = [
            (inspect.isclass(v), k)  # functions (the likely factories) first
            for k, v in vars(module).items()
            if callable(v)
            and not k.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
        ]
        public = [k for _, k in sorted(own)]
        hint = f"; it defines {', '.join(public[:8])}" if public else ""
        raise UsageError(f"{where!r} has no factory {name!r}{hint}")
    if not callable(factory):
        raise UsageError(f"{target!r} is a {type(factory).__name__}, not a callable factory")
    return factory  # type: ignore[no-any-return]


def load_model(target: str, factory_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Call the factory ``target`` with ``factory_kwargs``; it must return an nn.Module."""
    from torch import nn

    factory = load_factory(target)
    kwargs = factory_kwargs or {}
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise UsageError(f"{target} rejects --factory-kwargs {kwargs}: {e}") from e
    except ValueError:  # no signature to check (a builtin): let the call tell
        pass
    with _no_exit(f"calling {target}"):
        model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"{target} returned a value of type {type(model).__name__}, not a torch.nn.Module: "
            f"MODEL must name a callable that builds the model"
        )
    log.info("loaded %s: %s", target, type(model).__name__)
    return model
