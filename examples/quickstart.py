"""Quickstart: split a model over 4 devices, run a batch, check it against the unsplit model.

Run it with ``make demo`` (or ``python examples/quickstart.py`` inside the venv). With
fewer than 4 GPUs the 4 devices are CPU workers (one thread each), so it runs anywhere.
"""

from __future__ import annotations

import os
import sys

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models import MyModel  # noqa: E402

from partitioner import ModelSplitter  # noqa: E402


def show_plan(splitter: ModelSplitter, console: Console) -> None:
    plan = splitter.plan
    assert plan is not None
    table = Table(title=f"{plan.model}: {plan.num_stages} stages, {plan.solver} ({plan.status})")
    for col in ("stage", "device", "nodes", "first", "last", "compute ms", "in KB", "params KB"):
        table.add_column(col, justify="right" if col not in ("first", "last", "device") else "left")
    for j, s in enumerate(plan.stages):
        table.add_row(
            str(j),
            s.device,
            str(s.nodes),
            str(s.first),
            str(s.last),
            f"{1e3 * s.time:.3f}",
            f"{s.in_bytes / 1e3:.1f}",
            f"{s.param_bytes / 1e3:.1f}",
        )
    console.print(table)
    console.print(
        f"bottleneck {1e3 * plan.bottleneck:.3f} ms per micro-batch, lower bound "
        f"{1e3 * plan.lower_bound:.3f} ms, gap {100 * plan.gap:.2f}%, "
        f"solved in {plan.solve_time:.2f}s, {plan.chunks} micro-batches"
    )


def main() -> int:
    torch.manual_seed(0)
    console = Console()

    # The seed example, verbatim.
    model = MyModel()
    splitter = ModelSplitter(model, num_devices=4)
    input_data = torch.randn(100, 64)
    output = splitter.forward(input_data)

    show_plan(splitter, console)
    with torch.no_grad():
        expected = model(input_data)
    err = (output - expected).abs().max().item()
    console.print(f"batch 100: output {tuple(output.shape)}, max abs err vs unsplit model {err:.2e}")

    # Another batch size reuses the plan; micro-batches may be uneven.
    x37 = torch.randn(37, 64)
    err37 = (splitter(x37) - model(x37)).abs().max().item()
    console.print(f"batch 37: max abs err vs unsplit model {err37:.2e}")

    ok = err < 1e-5 and err37 < 1e-5
    console.print("[green]OK: split output equals the unsplit model[/]" if ok else "[red]MISMATCH[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
