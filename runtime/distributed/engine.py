"""Run a plan on torch.distributed.pipelining: this rank's stage, one process per stage.

[Note: distributed stages]
Every rank builds the whole model (same seed, same weights), traces and splits
it with the same plan, and keeps stage ``rank``: the world size must equal
``plan.num_stages``. The stage is wrapped by `runtime.distributed.relay` (skip values are
passed through the stages between, see [Note: relay]) and handed to
``PipelineStage``; ``ScheduleGPipe`` or ``Schedule1F1B`` runs the micro-batches.
The first rank feeds the inputs, the last rank gets the output (and computes
the loss when training); the ranks in between take and return nothing.

Shapes are static: `runtime.distributed.relay.dry_run` runs the first micro-batch of the
example through all stages once, and what crosses each boundary is given to
``PipelineStage`` as ``input_args``/``output_args`` (the engine's own inference
would run stages on uninitialised receive buffers). Every call must use the
example's batch shape, split into ``chunks`` equal micro-batches.

Weights used by several stages (tied embeddings) live on each of their ranks;
`DistributedPipeline.train_step` sums their gradients across those ranks, so
every copy takes the same optimizer step.

Run the module itself under torchrun for the command line; see
`runtime.distributed.launch`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining.microbatch import TensorChunkSpec

from partitioner.errors import ModelSplitError
from runtime.distributed.relay import RelayStage, rebuild_output, relay
from runtime.interface import stage_io

__all__ = ["SCHEDULES", "DistributedPipeline", "split_for_ranks"]

log = logging.getLogger(__name__)

SCHEDULES: dict[str, type] = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
LossFn = Callable[..., torch.Tensor]


def split_for_ranks(
    model: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    plan: Any,
) -> list[torch.fx.GraphModule]:
    """Trace ``model`` and split it by ``plan``: the same stages on every rank.

    The stages hold the model's own Parameter objects, so ranks that share a
    weight can be found by identity and the model's names map onto the stages.
    """
    from partitioner.capture.tracer import trace
    from partitioner.splitting.compose import share_tensors
    from partitioner.splitting.cut import split

    gm = trace(model, tuple(args), dict(kwargs or {}))
    share_tensors(gm, model)
    return split(gm, plan)


class DistributedPipeline:
    """Stage ``rank`` of a split model on torch.distributed.pipelining.

    ``stages`` are all the split stages (every rank has them); ``example``
    holds the full-batch positional and keyword arguments the model is called
    with, on every rank: `runtime.distributed.relay.dry_run` runs its first micro-batch
    through the stages once to learn the shapes each boundary carries (handed
    to ``PipelineStage`` as static shapes) and which values are Python numbers.
    The first rank feeds the batch, the last rank gets the output; the others
    call `forward` and `train_step` with no arguments.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        example: tuple[Sequence[Any], Mapping[str, Any]],
        *,
        chunks: int,
        schedule: str = "gpipe",
        loss_fn: LossFn | None = None,
        scale_grads: bool = True,
        device: torch.device | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_process_group")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)} ({schedule!r})")
        self.rank = dist.get_rank(group)
        self.num_stages = len(stages)
        world = dist.get_world_size(group)
        if world != self.num_stages:
            raise ModelSplitError(
                f"the plan has {self.num_stages} stages but {world} processes run it: "
                f"launch one process per stage (--nproc-per-node={self.num_stages}) "
                f"or re-plan for {world} devices"
            )
        if schedule == "1f1b" and chunks < self.num_stages:
            raise ValueError(
                f"1f1b needs at least one micro-batch per stage ({chunks} chunks < "
                f"{self.num_stages} stages)"
            )
        self.chunks, self.schedule_name = chunks, schedule
        self.loss_fn, self.scale_grads, self.group = loss_fn, scale_grads, group
        self.device = device or torch.device("cpu")
        self.program = stage_io(stages[0]).program
        values = self._bind(example)
        self._shapes = {n: v.shape for n, v in values.items() if isinstance(v, torch.Tensor)}
        micro = {name: _first_chunk(v, chunks, name) for name, v in values.items()}
        wrapped, self.bounds, self.examples = relay(stages, micro)
        self.module: RelayStage = wrapped[self.rank].to(self.device)
        self.tied = _tied(stages, self.rank)
        self._runners: dict[bool, tuple[PipelineStage, Any]] = {}

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.num_stages - 1

    def _bind(self, call: tuple[Sequence[Any], Mapping[str, Any]]) -> dict[str, Any]:
        args, kwargs = call
        return self.program.bind(tuple(args), dict(kwargs))

    def _inputs(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        if not self.is_first:
            return ()
        values = self._bind((args, kwargs))
        for name, shape in self._shapes.items():
            got = getattr(values[name], "shape", None)
            if got != shape:
                raise ModelSplitError(
                    f"input {name!r} has shape {tuple(got or ())}, but this pipeline was built "
                    f"for {tuple(shape)}: the engine's buffers have fixed shapes, build a "
                    f"DistributedPipeline per input shape"
                )
        return tuple(_to(values[name], self.device) for name in self.program.inputs)

    def _runner(self, train: bool) -> tuple[PipelineStage, Any]:
        # One PipelineStage per schedule: the engine infers and caches shapes and
        # grad buffers per (stage, has_backward), so forward and training keep apart.
        if train not in self._runners:
            # Static shapes from the dry run: the engine's dynamic inference would run
            # stages on uninitialised buffers (garbage token ids, garbage sizes).
            k = self.rank
            stage = PipelineStage(
                self.module,
                k,
                self.num_stages,
                self.device,
                input_args=_all_tensors(self.examples.boundary[k], first=k == 0),
                output_args=_all_tensors(self.examples.boundary[k + 1]),
                group=self.group,
            )
            cls = SCHEDULES[self.schedule_name]
            if self.schedule_name == "1f1b" and not train:
                cls = ScheduleGPipe  # forward only: 1F1B and GPipe are the same order
            schedule = cls(
                stage,
                self.chunks,
                loss_fn=self._loss() if train else None,
                output_merge_spec=_merge_spec(self.examples.boundary[-1]),
                scale_grads=self.scale_grads,
            )
            self._runners[train] = (stage, schedule)
        return self._runners[train]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the micro-batches forward; the model's output on the last rank, else None.

        The first rank passes the model's arguments; the others call it with none.
        """
        _, schedule = self._runner(False)
        with torch.no_grad():
            out = schedule.step(*self._inputs(args, kwargs))
        return self._output(out) if self.is_last else None

    def _output(self, leaves: Any) -> Any:
        leaves = leaves if isinstance(leaves, tuple) else (leaves,)
        return rebuild_output(self.program, self.bounds[-1], leaves, self.examples.kinds)

    def _loss(self) -> LossFn:
        """``loss_fn(model output, target)`` from the engine's call on the last stage's
        leaves (a tuple, or the one leaf alone)."""
        fn = self.loss_fn
        assert fn is not None

        def loss(out: Any, target: Any) -> torch.Tensor:
            return fn(self._output(out), target)

        return loss

    __call__ = forward

    def train_step(
        self, *args: Any, target: torch.Tensor | None = None, **kwargs: Any
    ) -> list[torch.Tensor] | None:
        """Forward and backward through the schedule; the per-micro-batch losses on the
        last rank (which passes ``target``), else None. Gradients accumulate in the
        stage's parameters like ``loss.backward()``: zero them between steps."""
        if self.loss_fn is None:
            raise ValueError("train_step needs a loss_fn: DistributedPipeline(..., loss_fn=...)")
        if self.is_last and target is None:
            raise ValueError("the last rank computes the loss: pass target=...")
        _, schedule = self._runner(True)
        losses: list[torch.Tensor] = []
        tgt = _to(target, self.device) if self.is_last else None
        schedule.step(*self._inputs(args, kwargs), target=tgt, losses=losses)
        self.sync_tied_grads()
        return losses if self.is_last else None

    def sync_tied_grads(self) -> None:
        """Sum the gradients of weights shared with other stages (a collective: every
        rank calls it, in the same order, whether or not it holds the weight)."""
        for param, ranks in self.tied:
            if self.rank in ranks and param.grad is not None:
                grad = param.grad
            else:
                grad = torch.zeros(param.shape, dtype=param.dtype, device=self.device)
            dist.all_reduce(grad, group=self.group)
            if self.rank in ranks:
                param.grad = grad

    def parameters(self) -> Any:
        """This rank's parameters: build the optimizer on these."""
        return self.module.parameters()


def _first_chunk(value: Any, chunks: int, name: str) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.size(0) % chunks:
        raise ModelSplitError(
            f"input {name!r} has batch size {value.size(0)}, not a multiple of chunks={chunks}: "
            f"torch.distributed.pipelining needs equal micro-batches"
        )
    return value.tensor_split(chunks)[0]


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _all_tensors(values: tuple[Any, ...], first: bool = False) -> tuple[Any, ...] | None:
    """Static shapes for the engine, or None to let it infer them. The first stage's
    inputs are the caller's own values, never received: their tensors suffice."""
    if first:
        return tuple(v for v in values if isinstance(v, torch.Tensor))
    return values if all(isinstance(v, torch.Tensor) for v in values) else None


def _merge_spec(leaves: tuple[Any, ...]) -> tuple[TensorChunkSpec | None, ...]:
    """Concatenate batched output leaves along dim 0; others must agree across chunks."""
    batched = TensorChunkSpec(0)  # type: ignore[no-untyped-call]
    return tuple(batched if isinstance(v, torch.Tensor) and v.dim() > 0 else None for v in leaves)


def _tied(stages: Sequence[nn.Module], rank: int) -> list[tuple[nn.Parameter, tuple[int, ...]]]:
    """Parameters held by more than one stage, in one order on every rank, with the
    ranks that hold them; this rank's own object where it holds one."""
    holders: dict[int, list[int]] = {}
    params: dict[int, nn.Parameter] = {}
    for j, stage in enumerate(stages):
        for p in stage.parameters():
            holders.setdefault(id(p), []).append(j)
            params.setdefault(id(p), p)
    tied = [(params[k], tuple(js)) for k, js in holders.items() if len(js) > 1]
    if tied:
        log.info("rank %s: %s weight(s) shared between stages", rank, len(tied))
    return tied
