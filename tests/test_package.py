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


def test_modelsplit_reexports_the_public_api() -> None:
    import modelsplit
    import partitioner
    import runtime

    for name in partitioner.__all__:
        assert getattr(modelsplit, name) is getattr(partitioner, name), name
    for name in runtime.__all__:
        assert getattr(modelsplit, name) is getattr(runtime, name), name
    assert set(modelsplit.__all__) == set(partitioner.__all__) | set(runtime.__all__)


def test_modelsplit_imports_no_torch_until_asked() -> None:
    code = (
        "import sys\n"
        "from modelsplit import solve, evaluate, DeviceSpec, Plan\n"
        "assert 'torch' not in sys.modules, 'import modelsplit imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
