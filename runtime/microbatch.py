"""Scatter a batch into micro-batches and gather their outputs back.

[Note: micro-batching rules]
- Every tensor leaf of the input pytree with at least one dimension is a batched tensor;
  all of them must have the same size along dim 0, the batch size B, except that a tensor
  whose dim 0 is 1 while B > 1 broadcasts, as torch broadcasting would treat it (a Hugging
  Face ``position_ids`` or ``attention_mask`` of shape (1, L) beside ``input_ids`` (B, L)).
- 0-dim tensors, size-1 broadcast tensors and non-tensor leaves go to each micro-batch
  unchanged.
- The batch is split along dim 0 into m = min(chunks, B) micro-batches with
  `torch.tensor_split`, whose sizes differ by at most one (views, no copy). A batch with no
  batched tensor is one micro-batch.
- Gather concatenates, leaf by leaf, every tensor whose dim 0 is its micro-batch's size;
  pytrees (tuples, lists, dicts, Hugging Face ``ModelOutput``) keep their structure.
- A leaf without a batch dimension (a scalar loss, a statistic over the batch) has no
  meaningful concatenation: it is a ValueError unless a reducer is given. Non-tensor leaves
  equal across micro-batches (None, a flag) are kept as they are.
- A `CountedMean` reducer (`token_mean`) weights each micro-batch's value by the items it
  counts in that micro-batch's inputs, not by its rows: a mean over tokens whose number
  differs between micro-batches (labels with ignored positions) is then the full batch's.
  Each call binds it to its micro-batches (`CountedMean.bind`) before gathering.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = [
    "CountedMean",
    "Reducer",
    "batch_size",
    "bound",
    "capped",
    "gather",
    "reduce_values",
    "scatter",
    "tree_leaves",
    "token_mean",
    "tree_map",
]

# "mean" (weighted by micro-batch size, so it is the full-batch mean of a mean-reduced
# loss), "sum", or a callable from the per-micro-batch values to one value.
Reducer = str | Callable[[list[Any]], Any]
REDUCERS = ("mean", "sum")


class CountedMean:
    """A reducer: the mean of the micro-batches' values weighted by ``count(args, kwargs)``
    of each micro-batch's own inputs (an int or a 0-dim tensor), not by its rows."""

    def __init__(self, count: Callable[[tuple[Any, ...], dict[str, Any]], Any]) -> None:
        if not callable(count):
            raise TypeError(f"CountedMean needs a callable count(args, kwargs) ({count!r})")
        self.count = count

    def bind(self, pieces: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]) -> Reducer:
        """The reducer of one call whose micro-batches' inputs are ``pieces``."""
        counts = []
        for i, (args, kwargs) in enumerate(pieces):
            n = self.count(args, kwargs)
            n = int(n.item()) if isinstance(n, torch.Tensor) else int(n)
            if n <= 0:
                raise ValueError(
                    f"micro-batch {i} of {len(pieces)} counts {n} items (every label "
                    f"ignored?): its mean is 0/0, which no weight makes the full batch's; "
                    f"use fewer chunks"
                )
            counts.append(n)
        total = sum(counts)
        return lambda values: _sum([v * (c / total) for v, c in zip(values, counts, strict=True)])

    def __repr__(self) -> str:
        return f"CountedMean({getattr(self.count, '__name__', self.count)!r})"


def bound(reducer: Any, args: Sequence[Any], kwargs: Mapping[str, Any], chunks: int) -> Any:
    """``reducer`` for one call of ``args``/``kwargs`` in ``chunks`` micro-batches: a
    `CountedMean` bound to their counts, any other reducer as it is."""
    if not isinstance(reducer, CountedMean):
        return reducer
    return reducer.bind(scatter((tuple(args), dict(kwargs)), chunks)[0])


def token_mean(labels: str = "labels", ignore_index: int = -100, shift: int = 0) -> CountedMean:
    """A `CountedMean` over the tokens of keyword input ``labels`` that are not
    ``ignore_index``, after dropping the first ``shift`` positions of the last dimension
    (1 for a Hugging Face causal LM, which predicts token t + 1 from position t)."""

    def count(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if labels not in kwargs:
            raise ValueError(f"token_mean counts keyword input {labels!r}, not in this call")
        t = kwargs[labels]
        return (t[..., shift:] != ignore_index).sum()

    count.__name__ = f"tokens of {labels!r} != {ignore_index}"
    return CountedMean(count)


def _is_batched(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dim() > 0


# [Note: fast tree walk] torch's pytree costs ~20 µs to rebuild a small tree here, paid per
# micro-batch; plain tuples, lists and dicts are walked directly, anything else registered
# with pytree (namedtuples, ModelOutput) goes through it. Both visit leaves in pytree order.
_PLAIN = (tuple, list, dict)


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` in `torch.utils._pytree` order."""
    kind = type(tree)
    if kind is tuple or kind is list:
        return [leaf for item in tree for leaf in tree_leaves(item)]
    if kind is dict:
        return [leaf for item in tree.values() for leaf in tree_leaves(item)]
    if kind in pytree.SUPPORTED_NODES or pytree.is_namedtuple_instance(tree):
        return pytree.tree_leaves(tree)
    return [tree]


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``tree`` rebuilt with ``fn(leaf)`` for every leaf, visited in `tree_leaves` order."""
    kind = type(tree)
    if kind is tuple:
        return tuple(tree_map(fn, item) for item in tree)
    if kind is list:
        return [tree_map(fn, item) for item in tree]
    if kind is dict:
        return {key: tree_map(fn, item) for key, item in tree.items()}
    if kind in pytree.SUPPORTED_NODES or pytree.is_namedtuple_instance(tree):
        return pytree.tree_map(fn, tree)
    return fn(tree)


def batch_size(tree: Any) -> int | None:
    """The common dim-0 size of the batched tensors in ``tree``; None if there are none.

    Size-1 tensors beside a larger batch broadcast and do not count (see the rules above).
    """
    sizes = {int(leaf.shape[0]) for leaf in tree_leaves(tree) if _is_batched(leaf)}
    if len(sizes) > 1:
        sizes.discard(1)
    if len(sizes) > 1:
        raise ValueError(
            f"tensors of different batch sizes cannot be split into micro-batches "
            f"({_describe_sizes(tree)}); every tensor argument with a dimension must have "
            f"the batch size on dim 0"
        )
    return next(iter(sizes), None)


def _describe_sizes(tree: Any) -> str:
    found: dict[int, str] = {}
    for path, leaf in pytree.tree_flatten_with_path(tree)[0]:
        if _is_batched(leaf):
            found.setdefault(int(leaf.shape[0]), pytree.keystr(path) or "<input>")
    return ", ".join(f"{where} has {size}" for size, where in found.items())


def capped(tree: Any, chunks: int, min_rows: int = 1) -> int:
    """How many micro-batches ``tree`` splits into with at most ``chunks`` of at least
    ``min_rows`` rows each (one at least)."""
    size = batch_size(tree)
    return chunks if not size else max(1, min(chunks, size // min_rows))


def scatter(tree: Any, chunks: int) -> tuple[list[Any], list[int]]:
    """Split ``tree`` into micro-batches: (pytrees, their batch sizes).

    See [Note: micro-batching rules]. A tree with no batched tensor is one micro-batch of
    size 0 (unknown).
    """
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a positive integer ({chunks!r})")
    size = batch_size(tree)
    if size is None or size == 0:
        return [tree], [0]
    m = min(chunks, size)
    pieces: dict[int, tuple[torch.Tensor, ...]] = {}
    for leaf in tree_leaves(tree):
        if _is_batched(leaf) and leaf.shape[0] == size and id(leaf) not in pieces:
            pieces[id(leaf)] = torch.tensor_split(leaf, m)
    sizes = [int(piece.shape[0]) for piece in next(iter(pieces.values()))]

    def take(i: int) -> Callable[[Any], Any]:
        return lambda leaf: pieces[id(leaf)][i] if id(leaf) in pieces else leaf

    return [tree_map(take(i), tree) for i in range(m)], sizes


def reduce_values(values: list[Any], sizes: Sequence[int], reducer: Reducer) -> Any:
    """Combine one non-batched leaf across micro-batches with ``reducer``."""
    if callable(reducer):
        return reducer(values)
    if reducer == "sum":
        return _sum(values)
    if reducer == "mean":
        total = sum(sizes)
        if total <= 0:
            return _sum(values) / len(values)
        return _sum([v * (s / total) for v, s in zip(values, sizes, strict=True)])
    raise ValueError(f"reducer must be 'mean', 'sum' or a callable ({reducer!r})")


def _sum(values: list[Any]) -> Any:
    out = values[0]
    for v in values[1:]:
        out = out + v
    return out


def _gather_leaf(
    where: Callable[[], str], pieces: list[Any], sizes: Sequence[int], reducer: Reducer | None
) -> Any:
    if all(_is_batched(p) and int(p.shape[0]) == s for p, s in zip(pieces, sizes, strict=True)):
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    if not any(isinstance(p, torch.Tensor) for p in pieces) and all(
        p is pieces[0] or _equal(p, pieces[0]) for p in pieces
    ):
        return pieces[0]
    if reducer is not None:
        return reduce_values(pieces, sizes, reducer)
    first = pieces[0]
    what = (
        f"a tensor of shape {tuple(first.shape)}"
        if isinstance(first, torch.Tensor)
        else repr(first)
    )
    raise ValueError(
        f"output {where()} is {what}, which has no batch dimension to concatenate over "
        f"micro-batches of sizes {list(sizes)}; pass reducer='mean', 'sum' or a callable "
        f"(e.g. for a scalar loss)"
    )


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an object whose == is not a bool
        return False


def gather(outputs: list[Any], sizes: Sequence[int], reducer: Reducer | None = None) -> Any:
    """Merge per-micro-batch outputs (same pytree structure) into the full-batch output."""
    if isinstance(reducer, CountedMean):
        raise TypeError("a CountedMean is bound to a call's micro-batches first (bind)")
    if reducer is not None and not callable(reducer) and reducer not in REDUCERS:
        raise ValueError(f"reducer must be 'mean', 'sum' or a callable ({reducer!r})")
    flat = [tree_leaves(out) for out in outputs]
    for k, leaves in enumerate(flat[1:], start=1):
        if len(leaves) != len(flat[0]) or type(outputs[k]) is not type(outputs[0]):
            raise ValueError(
                f"micro-batch {k} returned another output structure than micro-batch 0 "
                f"({pytree.tree_structure(outputs[k])} != {pytree.tree_structure(outputs[0])})"
            )
    gathered = iter(
        [
            _gather_leaf(partial(_where, outputs[0], n), list(pieces), sizes, reducer)
            for n, pieces in enumerate(zip(*flat, strict=True))
        ]
    )
    return tree_map(lambda _: next(gathered), outputs[0])


def _where(tree: Any, n: int) -> str:
    """The path of leaf n of ``tree``, for messages."""
    path = pytree.tree_flatten_with_path(tree)[0][n][0]
    return pytree.keystr(path) or "value"
