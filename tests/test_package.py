"""Package-level promises: a torch-free planner core, and the public names."""

from __future__ import annotations

import subprocess
import sys


def test_planner_core_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import partitioner, partitioner.planner.cost, partitioner.planner.plan\n"
        "import partitioner.planner, partitioner.planner.solver\n"
        "import partitioner.planner.coarsen, partitioner.planner.baselines\n"
        "from partitioner import solve, evaluate, DeviceSpec, Plan\n"
        "assert 'torch' not in sys.modules, 'the planner core imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_public_api_names() -> None:
    import partitioner
    import runtime

    for name in ("ModelSplitter", "auto_partition", "trace", "profile", "solve", "split"):
        assert callable(getattr(partitioner, name)), name
    for name in ("evaluate", "Plan", "DeviceSpec"):
        assert hasattr(partitioner, name)
    assert callable(runtime.Pipeline)
