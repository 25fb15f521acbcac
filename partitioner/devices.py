"""Devices from the user's options: names, memory and speed, and the torch device of each."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from partitioner.planner.cost import DeviceSpec, parse_bytes

__all__ = [
    "MemoryLike",
    "check_available",
    "every_gpu",
    "missing_gpu",
    "resolve_devices",
    "torch_device",
]

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
    """The torch device a plan's device name runs on: ``cpu:3`` is a CPU worker, and so is
    a name torch does not know, such as the planner's ``dev:0`` for ``devices=4``."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        return torch.device("cpu")
    return torch.device("cpu") if dev.type == "cpu" else dev


def missing_gpu(names: Sequence[str]) -> tuple[str, int] | None:
    """The first of ``names`` that is a GPU this machine lacks, with the GPU count; None if
    every device is here (the planner's ``dev:k`` names run as CPU workers)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for name in names:
        dev = torch_device(name)
        if dev.type == "cuda" and (dev.index or 0) >= gpus:
            return name, gpus
    return None


def check_available(names: Sequence[str]) -> None:
    """Fail before any work, naming the fix, when a device to run on does not exist here.

    Planning for absent GPUs is fine (`auto_partition`, ``modelsplit plan``); running on
    them is not: without this check torch fails deep inside, with an AssertionError.
    """
    found = missing_gpu(names)
    if found is not None:
        name, gpus = found
        cpus = ", ".join(repr(f"cpu:{k}") for k in range(len(names)))
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) is a CPU build"
            fix = "or install a CUDA build of torch on a machine with GPUs"
        else:
            why = f"this machine has {gpus} GPU(s)"
            fix = f"or name only cuda:0..cuda:{gpus - 1}" if gpus else "or run on a GPU machine"
        raise ValueError(
            f"device {name!r} does not exist here: {why}; run on CPU workers "
            f"(devices=[{cpus}] or num_devices={len(names)}), {fix}"
        )


def every_gpu() -> int:
    """No device count given: every GPU there is, or one CPU worker, said out loud."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count()
    warnings.warn(
        "ModelSplitter: no num_devices or devices given and no GPU here, so the model runs "
        "as one stage on cpu:0 (nothing is split); pass num_devices=N for N CPU workers",
        UserWarning,
        stacklevel=3,
    )
    return 1
