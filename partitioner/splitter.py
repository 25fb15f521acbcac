"""ModelSplitter: trace -> profile -> solve -> split -> run, behind the nn.Module interface."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from partitioner.cost import DEFAULT_BANDWIDTH, Bandwidth, DeviceSpec, parse_bytes
from partitioner.plan import Plan
from partitioner.recovery import HostCopy, StateDictSource, survivors, timed_replan
from partitioner.retarget import read_through_copy, retarget
from partitioner.verify import batch_size

__all__ = ["ModelSplitter", "auto_partition", "resolve_devices"]

log = logging.getLogger(__name__)

MemoryLike = int | str | Sequence[int | str | None] | None


def resolve_devices(
    num_devices: int | None = None,
    devices: Sequence[str | torch.device | DeviceSpec] | None = None,
    memory: MemoryLike = None,
    speed: Sequence[float] | None = None,
) -> list[DeviceSpec]:
    """Device specs from the user's options.

    ``devices`` wins when given. Otherwise ``num_devices`` picks ``cuda:0..n-1``
    when that many GPUs exist, else ``n`` CPU workers named ``cpu:0..n-1`` (each a
    thread of its own on the host). ``memory`` is bytes, a string such as
    ``"16GB"``, or one entry per device.
    """
    if devices is not None:
        if num_devices is not None and num_devices != len(devices):
            raise ValueError(
                f"num_devices={num_devices} disagrees with {len(devices)} devices given; "
                f"pass one of them"
            )
        specs = [
            d if isinstance(d, DeviceSpec) else DeviceSpec(_device_name(d, k))
            for k, d in enumerate(devices)
        ]
    else:
        n = 1 if num_devices is None else num_devices
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_devices must be a positive integer ({num_devices!r} < 1)")
        if torch.cuda.is_available() and torch.cuda.device_count() >= n:
            specs = [DeviceSpec(f"cuda:{k}") for k in range(n)]
        else:
            specs = [DeviceSpec(f"cpu:{k}") for k in range(n)]
    if not specs:
        raise ValueError("devices must not be empty")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(
            f"device names must be unique ({names}); name CPU workers 'cpu:0', 'cpu:1', ..."
        )
    mems = _per_device(memory, len(specs), "memory")
    speeds = _per_device(speed, len(specs), "speed")
    return [
        DeviceSpec(
            s.name,
            s.memory if mems[k] is None else parse_bytes(mems[k]),
            s.speed if speeds[k] is None else float(speeds[k]),
        )
        for k, s in enumerate(specs)
    ]


def _device_name(device: str | torch.device, k: int) -> str:
    name = str(device)
    if name == "cpu":
        return f"cpu:{k}"
    torch.device(name)  # raises a clear RuntimeError for a malformed name
    return name


def _per_device(value: Any, n: int, what: str) -> list[Any]:
    if value is None or isinstance(value, int | float | str):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{what} lists {len(values)} values for {n} devices; give one per device")
    return values


def torch_device(name: str) -> torch.device:
    """The torch device a plan's device name runs on (``cpu:3`` is a CPU worker)."""
    dev = torch.device(name)
    return torch.device("cpu") if dev.type == "cpu" else dev


@dataclass
class _Compiled:
    """One traced, planned and split model for one input signature."""

    plan: Plan
    stages: list[torch.fx.GraphModule]
    pipeline: Any
    graph: Any  # the CostGraph, kept for re-planning without re-profiling
    gm: Any = None  # the traced module, kept for re-splitting after a failure
    generation: int = 0  # the device set it was planned for (see ModelSplitter.revive)


def _signature_key(args: Sequence[Any], kwargs: Mapping[str, Any], training: bool) -> Any:
    """Input structure without the batch size: a new batch size reuses the plan. A size-1
    tensor that broadcasts beside a larger batch is another structure than a batched one."""
    batch = batch_size(tuple(args), dict(kwargs))

    def leaf(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            kind = "T1" if x.dim() >= 1 and x.shape[0] == 1 and (batch or 1) > 1 else "T"
            return (kind, tuple(x.shape[1:]), str(x.dtype), x.dim())
        if isinstance(x, list | tuple):
            return (type(x).__name__, tuple(leaf(v) for v in x))
        if isinstance(x, dict):
            return ("dict", tuple((k, leaf(v)) for k, v in sorted(x.items())))
        return ("C", repr(x))

    return (leaf(tuple(args)), leaf(dict(kwargs)), training)


@dataclass(frozen=True)
class _Options:
    """How to trace, profile and solve; shared by ModelSplitter and auto_partition."""

    objective: str = "throughput"
    bandwidth: Bandwidth = DEFAULT_BANDWIDTH
    solver: str | None = None
    time_limit: float = 30.0
    gap: float = 0.01
    imbalance: float = 0.05
    trace_mode: str = "auto"
    leaf_modules: tuple[Any, ...] = ()
    cost: str = "time"


def _default_chunks(num_devices: int) -> int:
    # GPipe wants m >> n to shrink the bubble (n-1)/(m+n-1); 2n keeps micro-batches large
    # enough for CPU kernels to stay efficient.
    return 1 if num_devices == 1 else 2 * num_devices


def _trace_profile_solve(
    model: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    specs: list[DeviceSpec],
    chunks: int,
    opts: _Options,
    plan: Plan | None = None,
) -> tuple[torch.fx.GraphModule, Any, Plan]:
    """trace -> profile -> solve; with a given ``plan``, validate it instead of solving."""
    from partitioner.profile import profile
    from partitioner.solve import solve
    from partitioner.trace import input_signature, trace

    t0 = time.perf_counter()
    gm = trace(
        model, tuple(args), dict(kwargs), leaf_modules=opts.leaf_modules, mode=opts.trace_mode
    )
    share_tensors(gm, model)
    t1 = time.perf_counter()
    with _stage_threads(specs):
        graph = profile(gm, tuple(args), dict(kwargs), chunks=chunks, cost=opts.cost)
    t2 = time.perf_counter()
    if plan is not None:
        plan.validate(graph.nodes, graph)
        log.info("trace %.2fs, profile %.2fs, plan given", t1 - t0, t2 - t1)
        return gm, graph, plan
    plan = solve(
        graph,
        specs,
        bandwidth=opts.bandwidth,
        objective=opts.objective,
        imbalance=opts.imbalance,
        solver=opts.solver,
        time_limit=opts.time_limit,
        gap=opts.gap,
        chunks=chunks,
        signature=input_signature(tuple(args), dict(kwargs)),
        model=type(model).__name__,
    )
    log.info(
        "trace %.2fs, profile %.2fs, solve %.2fs (%s, %s, gap %.2f%%)",
        t1 - t0,
        t2 - t1,
        time.perf_counter() - t2,
        plan.solver,
        plan.status,
        100 * plan.gap,
    )
    return gm, graph, plan


@contextlib.contextmanager
def _stage_threads(specs: Sequence[DeviceSpec]) -> Iterator[None]:
    """Profile with the intra-op threads a CPU stage worker will have.

    Each CPU worker runs with max(1, cores // CPU stages) threads (see
    runtime.worker.stage_threads); timing nodes with all cores would measure a speed
    no stage sees, and on a busy machine idle OpenMP threads inflate small ops.
    """
    from runtime.worker import available_cores, stage_threads

    counts = stage_threads([torch_device(s.name) for s in specs], available_cores(), None)
    cpu = [c for c in counts if c is not None]
    before = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(cpu[0])
    try:
        yield
    finally:
        torch.set_num_threads(before)


def share_tensors(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """Make the traced module hold the model's own Parameter and buffer objects.

    torch.export may hand back new tensor objects; sharing the originals means an
    optimizer on the model (or on the splitter) trains the stages, and placing a
    weight on its device moves it rather than copying it.
    """
    own: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    for name, tensor in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        original = own.get(name)
        if original is None or original is tensor:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if attr in owner._parameters:
            owner._parameters[attr] = original  # type: ignore[assignment]
        elif attr in owner._buffers:
            owner._buffers[attr] = original


def place(stages: Sequence[nn.Module], devices: Sequence[str]) -> None:
    """Move each stage's weights to its device in place (no second copy is kept).

    Moving ``.data`` keeps every Parameter object, so the model, the splitter and
    an optimizer built before placement all see the placed weights.
    """
    owner: dict[int, int] = {}
    for j, (stage, name) in enumerate(zip(stages, devices, strict=True)):
        dev = torch_device(name)
        tied: set[str] = set()
        named: list[tuple[str, torch.Tensor]] = list(
            stage.named_parameters(remove_duplicate=False)
        )
        named += list(stage.named_buffers(remove_duplicate=False))
        for qualname, tensor in named:
            first = owner.setdefault(id(tensor), j)
            if first != j and torch_device(devices[first]) != dev:
                tied.add(qualname)  # stays with stage `first`; read through a copy here
            elif tensor.device != dev:
                tensor.data = tensor.data.to(dev)
        if tied:
            if not isinstance(stage, torch.fx.GraphModule):
                raise NotImplementedError(
                    f"stage {j} shares weights {sorted(tied)} with a stage on another "
                    f"device; put both stages on one device or untie them"
                )
            read_through_copy(stage, tied, dev)  # [Note: tied weights across devices]
        if dev.type != "cpu" and isinstance(stage, torch.fx.GraphModule):
            retarget(stage, dev)  # torch.export burns the trace device into factory calls


def _weight_source(
    on_failure: str, recovery: str, path: str | None
) -> HostCopy | StateDictSource | None:
    """Where lost weights come back from after a failure ([Note: re-planning])."""
    if on_failure != "replan":
        return None
    return StateDictSource(path) if recovery == "state-dict" and path else HostCopy()


def auto_partition(
    model: nn.Module,
    example_inputs: Sequence[Any],
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    num_devices: int | None = None,
    devices: Sequence[str | torch.device | DeviceSpec] | None = None,
    memory: MemoryLike = None,
    speed: Sequence[float] | None = None,
    chunks: int = 1,
    objective: str = "throughput",
    bandwidth: Bandwidth = DEFAULT_BANDWIDTH,
    solver: str | None = None,
    time_limit: float = 30.0,
    gap: float = 0.01,
    imbalance: float = 0.05,
    trace_mode: str = "auto",
    leaf_modules: Sequence[Any] = (),
    cost: str = "time",
) -> Plan:
    """Trace, profile and solve: the partition Plan for ``model`` on the devices."""
    specs = resolve_devices(num_devices, devices, memory, speed)
    opts = _Options(
        objective,
        bandwidth,
        solver,
        time_limit,
        gap,
        imbalance,
        trace_mode,
        tuple(leaf_modules),
        cost,
    )
    _, _, plan = _trace_profile_solve(
        model, tuple(example_inputs), dict(example_kwargs or {}), specs, chunks, opts
    )
    return plan


class ModelSplitter(nn.Module):
    """A model split across devices, used like the model itself.

    >>> splitter = ModelSplitter(model, num_devices=4)       # doctest: +SKIP
    >>> output = splitter(torch.randn(100, 64))              # doctest: +SKIP

    Without ``example_inputs`` it plans on the first call. A later call whose
    inputs differ only in batch size reuses that plan; another input structure
    (shapes beyond dim 0, dtypes, keyword names, train/eval mode) is planned anew
    and cached. The model's submodules, parameters and buffers are registered
    under their original names, so ``named_parameters()`` and ``state_dict()``
    match the model's and a checkpoint loads into either.

    ``reducer`` ("mean", "sum" or a callable) combines outputs without a batch dimension,
    such as a Hugging Face loss computed from ``labels``: "mean" weights each micro-batch by
    its size, so a mean loss equals the full batch's.

    ``backward="pipelined"`` (CPU devices) runs each stage's backward in its own worker,
    pipelined over micro-batches, instead of autograd's one thread on the CPU
    ([Note: pipelined backward] in `runtime.backward`).

    ``deferred_batch_norm=True`` updates BatchNorm running statistics once per call with
    the whole batch's statistics, as the unsplit model would, rather than once per
    micro-batch ([Note: deferred batch norm] in `runtime.batchnorm`).

    ``on_failure="replan"`` survives a lost device mid-call: the plan is solved again on
    the surviving devices from the cached CostGraph, the lost weights come back from
    ``recovery`` ("host-copy": a CPU copy of accelerator-resident weights; "state-dict": the
    file at ``state_dict_path``), the micro-batches that did not complete run again, and
    later calls use the new plan ([Note: re-planning] in `partitioner.recovery`,
    [Note: resuming a call] in `runtime.resume`). ``stage_timeout`` (seconds) counts a
    worker that sends nothing for that long as a failed device. ``failed_devices`` lists
    the devices lost so far, ``recoveries`` what each recovered call went through, and
    `revive` puts repaired devices back.
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
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (got {type(model).__name__})")
        if chunks is not None and (isinstance(chunks, bool) or chunks < 1):
            raise ValueError(f"chunks must be a positive integer ({chunks} < 1)")
        if on_failure not in ("raise", "replan"):
            raise ValueError(f"on_failure must be 'raise' or 'replan' (got {on_failure!r})")
        if recovery not in ("host-copy", "state-dict"):
            raise ValueError(f"recovery must be 'host-copy' or 'state-dict' (got {recovery!r})")
        if recovery == "state-dict" and state_dict_path is None:
            raise ValueError("recovery='state-dict' needs state_dict_path (a torch.save file)")
        if stage_timeout is not None and not stage_timeout > 0:
            raise ValueError(f"stage_timeout must be positive seconds ({stage_timeout!r})")
        if backward not in ("autograd", "pipelined"):
            raise ValueError(f"backward must be 'autograd' or 'pipelined' (got {backward!r})")
        if backward == "pipelined" and on_failure == "replan":
            raise ValueError(
                "backward='pipelined' cannot re-run lost micro-batches (on_failure='replan'): "
                "use backward='autograd' with it"
            )
        if plan is not None and devices is None and num_devices is None:
            devices = list(plan.device_specs)
        specs = resolve_devices(num_devices, devices, memory, speed)
        if plan is not None:
            plan = plan.on_devices(specs)  # run a saved plan on the devices given here
        self.__dict__["_model"] = model
        self.__dict__["_specs"] = specs
        self.__dict__["_offered"] = list(specs)
        self.__dict__["_generation"] = 0
        self.__dict__["_source"] = _weight_source(on_failure, recovery, state_dict_path)
        self.__dict__["_opts"] = _Options(
            objective,
            bandwidth,
            solver,
            time_limit,
            gap,
            0.05,
            trace_mode,
            tuple(leaf_modules),
            cost,
        )
        self.__dict__["_cache"] = {}
        self.__dict__["_current"] = None
        self.__dict__["_given_plan"] = plan
        self.chunks = chunks if chunks is not None else _default_chunks(len(specs))
        self.checkpoint = checkpoint
        self.reducer = reducer
        self.backward = backward
        self.deferred_batch_norm = deferred_batch_norm
        self.on_failure = on_failure
        self.stage_timeout = stage_timeout
        self.recovery = recovery
        self.failed_devices: list[str] = []
        self.recoveries: list[Any] = []  # runtime.resume.Recovery of each call that met one
        # Register the model's children and own tensors under their own names: the
        # splitter's parameters *are* the model's, and the stages share them too.
        self._modules.update(model._modules)
        self._parameters.update(model._parameters)
        self._buffers.update(model._buffers)
        self._non_persistent_buffers_set.update(model._non_persistent_buffers_set)
        if example_inputs is not None:
            self._compiled(tuple(example_inputs), dict(example_kwargs or {}))

    @classmethod
    def from_plan(cls, model: nn.Module, plan: Plan | str, **kwargs: Any) -> ModelSplitter:
        """Reuse a saved plan (a Plan or a path to its JSON) without solving.

        The plan is checked against the model when it is first applied: a node
        the model does not have, or an edge going backwards, is a PlanError.
        """
        if not isinstance(plan, Plan):
            plan = Plan.load(plan)
        kwargs.setdefault("chunks", plan.chunks if plan.chunks > 1 else None)
        return cls(model, plan=plan, **kwargs)

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
        current = self.__dict__["_current"]
        return [] if current is None else list(current.stages)

    @property
    def devices(self) -> list[str]:
        """Devices of the used stages (after planning), else the devices offered."""
        current = self.__dict__["_current"]
        if current is None:
            return [s.name for s in self.__dict__["_specs"]]
        return list(current.plan.devices)

    @property
    def pipeline(self) -> Any:
        current = self.__dict__["_current"]
        return None if current is None else current.pipeline

    # -- running ------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        compiled = self._compiled(args, kwargs)
        source = self.__dict__["_source"]
        if isinstance(source, HostCopy):
            source.refresh(self.model)
        pipeline = compiled.pipeline
        output = pipeline(*args, **kwargs)
        if self.on_failure == "replan":
            from runtime.resume import last_recovery

            record = last_recovery(pipeline)
            if record is not None:
                self.recoveries.append(record)
        return output

    def _compiled(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> _Compiled:
        key = _signature_key(args, kwargs, self.training)
        cache: dict[Any, _Compiled] = self.__dict__["_cache"]
        compiled = cache.get(key)
        if compiled is None:
            compiled = self._compile(args, kwargs)
            cache[key] = compiled
        elif compiled.generation != self.__dict__["_generation"]:
            self._refit(compiled)  # planned before the devices changed
        self.__dict__["_current"] = compiled
        return compiled

    def _compile(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> _Compiled:
        from partitioner.split import split

        gm, graph, plan = _trace_profile_solve(
            self.model,
            args,
            kwargs,
            self.__dict__["_specs"],
            self.chunks,
            self.__dict__["_opts"],
            self.__dict__["_given_plan"],
        )
        stages = split(gm, plan)
        compiled = _Compiled(plan, stages, None, graph, gm, self.__dict__["_generation"])
        compiled.pipeline = self._build_pipeline(stages, plan, compiled)
        return compiled

    def _build_pipeline(
        self, stages: list[torch.fx.GraphModule], plan: Plan, compiled: _Compiled
    ) -> Any:
        from runtime import Pipeline

        place(stages, plan.devices)

        def replan(pipeline: Any, failure: Any) -> Any:
            return self._replan(compiled, failure)

        pipeline = Pipeline(
            stages,
            [torch_device(d) for d in plan.devices],
            chunks=self.chunks,
            checkpoint=self.checkpoint,
            reducer=self.reducer,
            on_failure=self.on_failure,
            replan=replan,
            backward=self.backward,
            deferred_batch_norm=self.deferred_batch_norm,
            stage_timeout=self.stage_timeout,
        )
        pipeline.__dict__["device_names"] = list(plan.devices)  # runtime.faults.device_names
        return pipeline

    # -- fault tolerance (partitioner/recovery.py, runtime/resume.py) --------
    def _replan(self, compiled: _Compiled, failure: Any) -> Any:
        """Re-plan ``compiled`` off a failed device: [Note: re-planning]."""
        if failure.device not in self.failed_devices:
            self.failed_devices.append(failure.device)
        self._set_devices()
        self._refit(compiled)
        return compiled.pipeline

    def _set_devices(self) -> None:
        offered = self.__dict__["_offered"]
        self.__dict__["_specs"] = survivors(offered, self.failed_devices)
        self.__dict__["_generation"] += 1

    def _refit(self, compiled: _Compiled) -> None:
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
