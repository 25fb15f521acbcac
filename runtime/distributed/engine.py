"""Run a plan on torch.distributed.pipelining: this rank's stages, one process per rank.

[Note: distributed stages]
Every rank builds the whole model (same seed, same weights), traces and splits
it with the same plan, and keeps its stages: stage ``rank`` with one stage per rank
(``gpipe``, ``1f1b``), stages ``rank, rank + K, ...`` with ``V`` virtual stages per rank
(``interleaved-1f1b``, ``zero-bubble``; [Note: virtual stages] in
`runtime.distributed.placement`): the world size times ``V`` must equal
``plan.num_stages``. Each stage is wrapped by `runtime.distributed.relay` (skip values are
passed through the stages between, see [Note: relay]) and handed to
``PipelineStage``; torch's schedule for the name runs the micro-batches.
The first rank feeds the inputs, the last rank gets the output (and computes
the loss when training); the ranks in between take and return nothing.

Shapes are static: `runtime.distributed.relay.dry_run` runs the first micro-batch of the
example through all stages once, and what crosses each boundary is given to
``PipelineStage`` as ``input_args``/``output_args`` (the engine's own inference
would run stages on uninitialised receive buffers). Every call must use the
example's batch shape, split into ``chunks`` equal micro-batches.

Weights used by several stages (tied embeddings) live on each of their ranks;
`DistributedPipeline.train_step` sums their gradients across those ranks, so
every copy takes the same optimizer step. Two stages of one rank hold the same
Parameter object, so autograd already adds both uses' gradients there; see
`DistributedPipeline.sync_tied_grads`.

Run the module itself under torchrun for the command line; see
`runtime.distributed.launch`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
from torch.distributed.pipelining.microbatch import (
    TensorChunkSpec,
    merge_chunks,
    split_args_kwargs_into_chunks,
)

from partitioner.errors import ModelSplitError
from runtime.allocator import keep_freed_memory
from runtime.distributed.placement import LOOPED, SCHEDULES, check_schedule, stages_of
from runtime.distributed.relay import RelayStage, rebuild_output, relay
from runtime.interface import refuse_writes, stage_io

__all__ = ["SCHEDULES", "DistributedPipeline", "split_for_ranks"]

log = logging.getLogger(__name__)

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
    from partitioner.capture.binding import program_of
    from partitioner.capture.tracer import trace
    from partitioner.splitting.compose import share_tensors
    from partitioner.splitting.cut import split

    gm = trace(model, tuple(args), dict(kwargs or {}))
    refuse_writes(program_of(gm).writes, "the distributed backend")
    share_tensors(gm, model)
    return split(gm, plan)


class DistributedPipeline:
    """This rank's stages of a split model on torch.distributed.pipelining.

    ``stages`` are all the split stages (every rank has them); ``example``
    holds the full-batch positional and keyword arguments the model is called
    with, on every rank: `runtime.distributed.relay.dry_run` runs its first micro-batch
    through the stages once to learn the shapes each boundary carries (handed
    to ``PipelineStage`` as static shapes) and which values are Python numbers.
    With ``virtual_stages=V`` rank r holds stages r, r + K, ... of the K * V
    ([Note: virtual stages]); ``schedule`` is one of `SCHEDULES`.
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
        virtual_stages: int = 1,
        loss_fn: LossFn | None = None,
        scale_grads: bool = True,
        device: torch.device | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_process_group")
        self.rank = dist.get_rank(group)
        self.num_stages = len(stages)
        self.world = dist.get_world_size(group)
        check_schedule(schedule, self.world, self.num_stages, chunks, virtual_stages)
        self.chunks, self.schedule_name = chunks, schedule
        self.loss_fn, self.scale_grads, self.group = loss_fn, scale_grads, group
        self.device = device or torch.device("cpu")
        if self.device.type == "cpu":  # [Note: CPU allocator], as a CPU Pipeline does
            keep_freed_memory()
        self.program = stage_io(stages[0]).program
        values = self._bind(example)
        self._shapes = {n: v.shape for n, v in values.items() if isinstance(v, torch.Tensor)}
        micro = {name: _first_chunk(v, chunks, name) for name, v in values.items()}
        # zero-bubble splits each backward in two halves: see [Note: relay]
        zb = schedule == "zero-bubble"
        wrapped, self.bounds, self.examples = relay(stages, micro, split_backward=zb)
        self.stage_ids = stages_of(self.rank, self.world, self.num_stages)
        self.modules: list[RelayStage] = [wrapped[s].to(self.device) for s in self.stage_ids]
        self.tied = _tied(stages, self.rank, self.world)
        self._runners: dict[bool, tuple[list[PipelineStage], Any]] = {}

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == (self.num_stages - 1) % self.world

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

    def _runner(self, train: bool) -> tuple[list[PipelineStage], Any]:
        # One PipelineStage per schedule: the engine infers and caches shapes and
        # grad buffers per (stage, has_backward), so forward and training keep apart.
        if train not in self._runners:
            pipe_stages = [
                self._stage(s, module)
                for s, module in zip(self.stage_ids, self.modules, strict=True)
            ]
            cls = SCHEDULES[self.schedule_name]
            if self.schedule_name == "1f1b" and not train:
                cls = ScheduleGPipe  # forward only: 1F1B and GPipe are the same order
            looped = self.schedule_name in LOOPED
            schedule = cls(
                pipe_stages if looped else pipe_stages[0],
                self.chunks,
                loss_fn=self._loss() if train else None,
                output_merge_spec=_merge_spec(self.examples.boundary[-1]),
                scale_grads=False,  # see _scale_grads: torch would divide a tied weight twice
            )
            self._runners[train] = (pipe_stages, schedule)
        return self._runners[train]

    def _stage(self, s: int, module: RelayStage) -> PipelineStage:
        """Stage ``s`` for the engine, with the static shapes of the dry run: the engine's
        dynamic inference would run stages on uninitialised buffers (garbage token ids,
        garbage sizes)."""
        return PipelineStage(
            module,
            s,
            self.num_stages,
            self.device,
            input_args=_all_tensors(self.examples.boundary[s], first=s == 0),
            output_args=_all_tensors(self.examples.boundary[s + 1]),
            group=self.group,
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the micro-batches forward; the model's output on the last rank, else None.

        The first rank passes the model's arguments; the others call it with none.
        """
        inputs = self._inputs(args, kwargs)
        with torch.no_grad():
            if self.world == 1 and len(self.modules) > 1:
                out = self._forward_here(inputs)
            else:
                out = self._runner(False)[1].step(*inputs)
        return self._output(out) if self.is_last else None

    def _forward_here(self, inputs: tuple[Any, ...]) -> Any:
        """Every stage on this one rank: each micro-batch through them in order, merged as
        the engine merges. torch 2.13's multi-stage schedules cannot run forward only when
        adjacent stages share a rank (``get_local_bwd_output`` asserts a backward)."""
        micro, _ = split_args_kwargs_into_chunks(inputs, {}, self.chunks)
        outs = []
        for values in micro:
            for module in self.modules:
                values = module(*values)
            outs.append(values)
        return merge_chunks(outs, _merge_spec(self.examples.boundary[-1]))

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
        last rank (which passes ``target``), else None. Gradients add to those already in
        this rank's parameters, like ``loss.backward()``: zero them between steps."""
        if self.loss_fn is None:
            raise ValueError("train_step needs a loss_fn: DistributedPipeline(..., loss_fn=...)")
        if self.is_last and target is None:
            raise ValueError("the last rank computes the loss: pass target=...")
        _, schedule = self._runner(True)
        losses: list[torch.Tensor] = []
        tgt = _to(target, self.device) if self.is_last else None
        # This step's gradients apart from earlier ones: scaling and summing across ranks
        # apply to this step's only (torch's own scaling would divide earlier ones too).
        earlier = {p: p.grad for p in self.parameters() if p.grad is not None}
        for p in earlier:
            p.grad = None
        schedule.step(*self._inputs(args, kwargs), target=tgt, losses=losses)
        self._scale_grads()
        self.sync_tied_grads()
        for p, grad in earlier.items():
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        return losses if self.is_last else None

    def _scale_grads(self) -> None:
        """Divide by ``chunks`` (the losses are per micro-batch means), once per Parameter.

        torch scales each stage's parameters at the end of its backward; a weight read
        by two stages of this rank (a tied embedding on stages 0 and 2 of 2 ranks) would
        be divided twice, so the schedule is built with ``scale_grads=False`` and this
        rank scales its parameters itself, each once.
        """
        if self.scale_grads and self.chunks != 1:
            with torch.no_grad():
                for p in self.parameters():
                    if p.grad is not None:
                        p.grad.div_(self.chunks)

    def sync_tied_grads(self) -> None:
        """Sum the gradients of weights shared with stages on other ranks (a collective:
        every rank calls it, in the same order, whether or not it holds the weight).

        A weight read by several stages of one rank is one Parameter object there, whose
        ``.grad`` autograd has already summed over those stages; it takes part once.
        """
        for param, ranks in self.tied:
            if self.rank in ranks and param.grad is not None:
                grad = param.grad
            else:
                grad = torch.zeros(param.shape, dtype=param.dtype, device=self.device)
            dist.all_reduce(grad, group=self.group)
            if self.rank in ranks:
                param.grad = grad

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters, each once (build the optimizer on these)."""
        return nn.ModuleList(self.modules).parameters()


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


def _tied(
    stages: Sequence[nn.Module], rank: int, world: int
) -> list[tuple[nn.Parameter, tuple[int, ...]]]:
    """Parameters held by stages on more than one rank (stage j on rank ``j % world``), in
    one order on every rank, with the ranks that hold them; this rank's own object where
    it holds one. A weight shared only by stages of one rank needs no collective."""
    holders: dict[int, list[int]] = {}
    params: dict[int, nn.Parameter] = {}
    for j, stage in enumerate(stages):
        for p in stage.parameters():
            ranks = holders.setdefault(id(p), [])
            if j % world not in ranks:
                ranks.append(j % world)
            params.setdefault(id(p), p)
    tied = [(params[k], tuple(rs)) for k, rs in holders.items() if len(rs) > 1]
    if tied:
        log.info("rank %s: %s weight(s) shared with other ranks", rank, len(tied))
    return tied
