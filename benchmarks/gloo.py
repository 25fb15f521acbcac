"""`runtime.distributed` under torchrun on this host: one gloo process per rank on 127.0.0.1,
one intra-op thread each. Shared by benchmarks/distributed.py and benchmarks/step_prediction.py
(a script's own folder is first on ``sys.path``, so either imports it as ``gloo``)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def samples_per_second(
    ranks: int, launch_args: Sequence[str], env: Mapping[str, str] | None = None
) -> float:
    """The samples/s ``python -m runtime.distributed *launch_args`` reports on ``ranks``
    ranks; ``env`` is added to this process's environment. RuntimeError with both outputs
    when torchrun fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    if os.path.exists("/sys/class/net/lo"):
        full.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
        f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1", f"--master-port={port}",
        "-m", "runtime.distributed", *launch_args,
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)
    m = re.search(r"([0-9.]+) samples/s", res.stdout)
    if res.returncode != 0 or m is None:
        raise RuntimeError(f"torchrun failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return float(m.group(1))
