"""ModelSplitter: trace -> profile -> solve -> split -> run, behind the nn.Module interface."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from partitioner.autoplan import (
    Compiled,
    Options,
    auto_partition,
    capture,
    check_options,
    same_graph,
    signature_key,
    trace_profile_solve,
    weight_source,
)
from partitioner.capture.batching import warn_ignored_labels, warn_training_batch_norms
from partitioner.capture.binding import describe_signature
from partitioner.capture.checks import GRADS_OFF_KEY, guard_backward
from partitioner.capture.verify import verify_compiled
from partitioner.chunking import Cut, choose_cut, verify_call
from partitioner.devices import (
    MemoryLike,
    check_available,
    every_gpu,
    resolve_devices,
    torch_device,
)
from partitioner.errors import InputError
from partitioner.planner.cost import DEFAULT_BANDWIDTH, Bandwidth, DeviceSpec
from partitioner.planner.plan import Plan, default_chunks
from partitioner.replan import HostCopy, survivors, timed_replan
from partitioner.splitting.cut import split
from partitioner.splitting.retarget import place
from runtime.pipeline import Pipeline, schedule_options
from runtime.recovery.resume import last_recovery

__all__ = ["ModelSplitter", "auto_partition", "resolve_devices"]

log = logging.getLogger(__name__)


class ModelSplitter(nn.Module):
    """A model split across devices, used like the model itself.

    >>> splitter = ModelSplitter(model, num_devices=4)       # doctest: +SKIP
    >>> output = splitter(torch.randn(100, 64))              # doctest: +SKIP

    Without ``example_inputs`` it plans on the first call. A later call whose inputs differ
    only in batch size reuses that plan; another input structure (shapes beyond dim 0,
    dtypes, keyword names, train/eval mode) is planned anew and cached. The model's
    submodules, parameters and buffers are registered under their original names, so
    ``named_parameters()`` and ``state_dict()`` match the model's and a checkpoint loads
    into either. ``schedule``: `train_step`'s ([Note: the splitter's training plan]).
    ``chunks`` (micro-batches per call) left out: up to 2 per device, bigger ones where the
    model needs them to stay exact, with a warning ([Note: choosing micro-batches]).

    ``reducer`` ("mean", "sum" or a callable) combines outputs without a batch dimension,
    such as a Hugging Face loss computed from ``labels``: "mean" weights each micro-batch by
    its size, so a mean loss equals the full batch's. ``backward="pipelined"`` (CPU devices)
    runs each stage's backward in its own worker, pipelined over micro-batches ([Note:
    pipelined backward]). ``deferred_batch_norm=True`` updates BatchNorm running statistics
    once per call with the whole batch's statistics ([Note: deferred batch norm]).

    ``on_failure="replan"`` survives a lost device mid-call: the plan is solved again on the
    surviving devices from the cached CostGraph, the lost weights come back from ``recovery``
    ("host-copy": a CPU copy of accelerator-resident weights; "state-dict": the file at
    ``state_dict_path``), the micro-batches that did not complete run again, and later calls use
    the new plan ([Note: re-planning] in `partitioner.replan`, [Note: resuming a call] in
    `runtime.recovery.resume`). ``stage_timeout`` (seconds) counts a worker that sends nothing for
    that long as a failed device. ``failed_devices`` lists the devices lost so far, ``recoveries``
    what each recovered call went through, and `revive` puts repaired devices back.
    """

    def __init__(
        self,
        model: nn.Module,
        num_devices: int | None = None,
        *,
        devices: Sequence[str | torch.device | DeviceSpec] | None = None,
        chunks: int | None = None,
        example_inputs: Sequence[Any] | None = None,
        example_kwargs: Mapping[str, Any] | None = None,
        objective: str = "throughput",
        memory: MemoryLike = None,
        speed: Sequence[float] | None = None,
        bandwidth: Bandwidth = DEFAULT_BANDWIDTH,
        solver: str | None = None,
        time_limit: float = 30.0,
        gap: float = 0.01,
        trace_mode: str = "auto",
        leaf_modules: Sequence[Any] = (),
        cost: str = "time",
        checkpoint: str = "never",
        reducer: Any = None,
        on_failure: str = "raise",
        stage_timeout: float | None = None,
        recovery: str = "host-copy",
        state_dict_path: str | None = None,
        plan: Plan | None = None,
        backward: str = "autograd",
        deferred_batch_norm: bool = False,
        schedule: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (got {type(model).__name__})")
        check_options(
            chunks, on_failure, recovery, state_dict_path, stage_timeout, backward, schedule
        )
        if plan is not None and devices is None and num_devices is None:
            devices = list(plan.device_specs)
        if devices is None and num_devices is None:
            num_devices = every_gpu()
        specs = resolve_devices(num_devices, devices, memory, speed)
        check_available([s.name for s in specs])
        if plan is not None:
            plan = plan.on_devices(specs)  # run a saved plan on the devices given here
        solving = (objective, bandwidth, solver, time_limit, gap, 0.05, trace_mode)  # imbalance
        # Kept out of nn.Module's registries: the model is not a submodule of its own split.
        self.__dict__.update(
            _model=model,
            _specs=specs,
            _offered=list(specs),
            _generation=0,
            _source=weight_source(on_failure, recovery, state_dict_path),
            _opts=Options(*solving, tuple(leaf_modules), cost, schedule, checkpoint != "never"),
            _cache={},
            _current=None,
            _given_plan=plan,
            _auto_chunks=chunks is None,  # [Note: choosing micro-batches]
            _lock=threading.RLock(),  # re-planning and the plan cache, for concurrent calls
        )
        #: the fire drills armed on this splitter (`runtime.inject_failure`)
        self.drills: list[Any] = []
        self.chunks = chunks if chunks is not None else default_chunks(len(specs))
        self.checkpoint = checkpoint
        self.reducer = reducer
        self.backward = backward
        self.deferred_batch_norm = deferred_batch_norm
        self.schedule = schedule  # train_step's; None: the plan's ([Note: training step])
        self.on_failure = on_failure
        self.stage_timeout = stage_timeout
        self.recovery = recovery
        self.failed_devices: list[str] = []
        self.recoveries: list[Any] = []  # runtime.recovery.resume.Recovery of each call
        # The model's children and tensors under their own names: the stages share them too.
        self._modules.update(model._modules)
        self._parameters.update(model._parameters)
        self._buffers.update(model._buffers)
        self._non_persistent_buffers_set.update(model._non_persistent_buffers_set)
        if example_inputs is not None:
            self._compiled(tuple(example_inputs), dict(example_kwargs or {}))

    @classmethod
    def from_plan(cls, model: nn.Module, plan: Plan | str, **kwargs: Any) -> ModelSplitter:
        """Reuse a saved plan (a Plan or a path to its JSON) without solving; it is checked
        against the model when first applied (a node it lacks, an edge backwards: PlanError)."""
        if not isinstance(plan, Plan):
            plan = Plan.load(plan)
        kwargs.setdefault("chunks", plan.chunks if plan.chunks > 1 else None)
        return cls(model, plan=plan, **kwargs)

    # -- one mode, the model's ------------------------------------------------
    @property  # type: ignore[override]
    def training(self) -> bool:
        """The model's own mode: ``splitter.train()``/``.eval()`` set it, ``model.train()``
        shows here, and each mode is traced and planned as the model runs in it."""
        model = self.__dict__.get("_model")
        return bool(model.training) if model is not None else self.__dict__["_training"]

    @training.setter
    def training(self, mode: bool) -> None:
        model = self.__dict__.get("_model")
        if model is None:  # nn.Module.__init__, before the model is kept
            self.__dict__["_training"] = mode
        else:
            model.training = mode

    # -- what users look at -------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The unsplit model (sharing its weights with the stages)."""
        return self.__dict__["_model"]  # type: ignore[no-any-return]

    @property
    def plan(self) -> Plan | None:
        """The plan of the latest call (None before the first call)."""
        current = self.__dict__["_current"]
        return None if current is None else current.plan

    @property
    def stages(self) -> list[torch.fx.GraphModule]:
        return [] if self.__dict__["_current"] is None else list(self.__dict__["_current"].stages)

    @property
    def devices(self) -> list[str]:
        """The devices the plan uses, each once (after planning), else the devices offered."""
        current = self.__dict__["_current"]
        if current is None:
            return [s.name for s in self.__dict__["_specs"]]
        return list(current.plan.device_names)

    @property
    def pipeline(self) -> Any:
        return None if self.__dict__["_current"] is None else self.__dict__["_current"].pipeline

    # -- running ------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.__dict__.get("_said_labels"):
            self.__dict__["_said_labels"] = warn_ignored_labels(kwargs, self.reducer, self.chunks)
        compiled = self._compiled(args, kwargs)
        verify_call(self.model, compiled, args, kwargs, self.__dict__["_auto_chunks"])
        source = self.__dict__["_source"]
        if isinstance(source, HostCopy):
            source.refresh(self.model)
        pipeline = compiled.pipeline
        output = pipeline(*args, **kwargs)
        off = compiled.gm.meta.get(GRADS_OFF_KEY) if compiled.gm is not None else None
        if off and torch.is_grad_enabled():
            output = guard_backward(output, off)
        if self.on_failure == "replan":
            record = last_recovery(pipeline)
            if record is not None:
                self.recoveries.append(record)
        return output

    def train_step(
        self, *args: Any, target: Any, loss_fn: Any, loss_reduction: Any = "mean", **kwargs: Any
    ) -> torch.Tensor:
        """`runtime.Pipeline.train_step` on this call's plan; other keywords are the model's."""
        pipe = self._compiled(args, kwargs).pipeline
        return pipe.train_step(
            *args, target=target, loss_fn=loss_fn, loss_reduction=loss_reduction, **kwargs
        )

    def _compiled(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Compiled:
        with self.__dict__["_lock"]:
            return self._compiled_locked(args, kwargs)

    def _compiled_locked(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Compiled:
        key = signature_key(args, kwargs, self.training)
        cache: dict[Any, Compiled] = self.__dict__["_cache"]
        compiled = cache.get(key)
        if compiled is None:
            try:
                twin = cache.get((*key[:-1], not key[-1]))  # the same inputs, other mode
                compiled = self._compile(args, kwargs, twin)
            except InputError as exc:
                planned = [describe_signature(c.plan.signature) for c in cache.values()]
                if not planned:
                    raise
                raise InputError(
                    f"{exc}; this splitter was planned for {' or '.join(planned)} (any batch size)"
                ) from exc
            cache[key] = compiled
        elif compiled.generation != self.__dict__["_generation"]:
            self._refit(compiled)  # planned before the devices changed
        self.__dict__["_current"] = compiled
        return compiled

    def _compile(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], twin: Compiled | None = None
    ) -> Compiled:
        reused = self._reuse(args, kwargs, twin) if twin is not None else None
        if reused is not None:
            return reused
        warn_training_batch_norms(self.model, self.chunks, self.deferred_batch_norm)
        build = functools.partial(self._compile_cut, args, kwargs)
        auto = self.__dict__["_auto_chunks"]  # [Note: choosing micro-batches]
        return choose_cut(self.model, args, kwargs, Cut(self.chunks), auto, build)

    def _compile_cut(self, args: Sequence[Any], kwargs: Mapping[str, Any], cut: Cut) -> Compiled:
        d, count = self.__dict__, cut.count(args, kwargs)
        specs, opts, given = d["_specs"], d["_opts"], d["_given_plan"]
        gm, graph, plan = trace_profile_solve(
            self.model, args, kwargs, specs, count, opts, given, self.reducer
        )
        stages = split(gm, plan)
        compiled = Compiled(plan, stages, None, graph, gm, d["_generation"], cut=cut)
        compiled.pipeline = self._build_pipeline(stages, plan, compiled)
        verify_compiled(self.model, compiled, args, kwargs)  # [Note: verifying the split]
        return compiled

    def _reuse(self, args: Sequence[Any], kwargs: Mapping[str, Any], twin: Compiled) -> Any:
        """After a train/eval switch: trace in the new mode, and when the graph is the one
        planned for the other mode, split it with that plan instead of profiling and solving
        again (with memory limits the activations differ by mode, so those plan anew)."""
        if any(s.memory is not None for s in self.__dict__["_specs"]):
            return None
        opts = self.__dict__["_opts"]
        gm = capture(self.model, args, kwargs, opts.leaf_modules, opts.trace_mode)
        if not same_graph(gm, twin.gm):
            return None
        log.info("training=%s: same graph as the other mode, plan reused", self.training)
        stages = split(gm, twin.plan)
        generation = self.__dict__["_generation"]
        compiled = Compiled(twin.plan, stages, None, twin.graph, gm, generation, cut=twin.cut)
        compiled.pipeline = self._build_pipeline(stages, twin.plan, compiled)
        return compiled

    def _build_pipeline(
        self, stages: list[torch.fx.GraphModule], plan: Plan, compiled: Compiled
    ) -> Any:
        place(stages, plan.devices)

        def replan(pipeline: Any, failure: Any) -> Any:
            return self._replan(compiled, failure)

        cut = compiled.cut or Cut(self.chunks)
        pipeline = Pipeline(
            stages,
            [torch_device(d) for d in plan.devices],
            chunks=cut.chunks,
            checkpoint=self.checkpoint,
            reducer=self.reducer,
            on_failure=self.on_failure,
            replan=replan,
            backward=self.backward,
            deferred_batch_norm=self.deferred_batch_norm,
            stage_timeout=self.stage_timeout,
            **schedule_options(plan, None if self.schedule == "auto" else self.schedule),
        )
        pipeline.min_rows = cut.min_rows
        # the plan's names for runtime.recovery.faults.device_names ("cpu:3", not "cpu")
        pipeline.__dict__["device_names"] = list(plan.devices)
        pipeline.__dict__["on_lost"] = self._lost  # [Note: a device lost in backward]
        for drill in list(self.drills):  # armed drills fire on every pipeline it builds
            drill.attach(pipeline)
        return pipeline

    # -- fault tolerance (partitioner/replan.py, runtime/recovery/resume.py) --------
    def _replan(self, compiled: Compiled, failure: Any) -> Any:
        """Re-plan ``compiled`` off a failed device: [Note: re-planning]. Concurrent calls
        that meet the same failure re-plan once: the later ones take the new pipeline."""
        with self.__dict__["_lock"]:
            if (
                failure.device in self.failed_devices
                and failure.device not in compiled.plan.devices
            ):
                return compiled.pipeline  # another call re-planned it already
            if failure.device not in self.failed_devices:
                self.failed_devices.append(failure.device)
            self._set_devices()
            self._refit(compiled)
            return compiled.pipeline

    def _lost(self, device: str) -> None:  # lost in backward: re-planned off on the next call
        with self.__dict__["_lock"]:
            if device not in self.failed_devices:
                self.failed_devices.append(device)

    def _set_devices(self) -> None:
        offered = self.__dict__["_offered"]
        self.__dict__["_specs"] = survivors(offered, self.failed_devices)
        self.__dict__["_generation"] += 1

    def _refit(self, compiled: Compiled) -> None:
        """Solve, split and place ``compiled`` again on the current devices (cached graph)."""
        timed_replan(
            compiled,
            self.model,
            self.__dict__["_offered"],
            self.failed_devices,
            self.__dict__["_opts"],
            self.__dict__["_source"],
            lambda stages, plan: self._build_pipeline(stages, plan, compiled),
        )
        compiled.generation = self.__dict__["_generation"]

    def revive(self, devices: Sequence[str] | None = None) -> None:
        """Mark failed devices (all by default) healthy again, after a repair: the current
        plan is solved again on them from its CostGraph now, other cached plans on their
        next call."""
        back = set(self.failed_devices if devices is None else devices) & set(self.failed_devices)
        if not back:
            return
        self.failed_devices[:] = [d for d in self.failed_devices if d not in back]
        self._set_devices()
        current = self.__dict__["_current"]
        if current is not None:
            self._refit(current)

    def extra_repr(self) -> str:
        plan = self.plan
        where = ", ".join(self.devices)
        if plan is None:
            return f"devices=[{where}], chunks={self.chunks}, not planned yet"
        return (
            f"devices=[{where}], chunks={self.chunks}, stages={plan.num_stages}, "
            f"bottleneck={plan.bottleneck:.3g}s, status={plan.status}"
        )
