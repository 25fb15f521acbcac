"""Quickstart: split a model over 4 devices, run a batch, check it against the unsplit model.

Run it with ``make demo`` (or ``python examples/quickstart.py`` wherever modelsplit is
installed). With
fewer than 4 GPUs the 4 devices are CPU workers (one thread each), so it runs anywhere.
"""

from __future__ import annotations

import sys

import torch
from rich.console import Console

from modelsplit import ModelSplitter
from modelsplit.examples import MyModel
from partitioner.cli.render import stage_table, summary


def show_plan(splitter: ModelSplitter, console: Console) -> None:
    plan = splitter.plan
    assert plan is not None
    console.print(stage_table(plan, title=f"{plan.model} on {plan.num_stages} stages"))
    for key, value in summary(plan):
        console.print(f"{key:>13}  {value}")


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
    console.print(f"batch 100: output {tuple(output.shape)}, max abs err vs unsplit {err:.2e}")

    # Another batch size reuses the plan; micro-batches may be uneven.
    x37 = torch.randn(37, 64)
    err37 = (splitter(x37) - model(x37)).abs().max().item()
    console.print(f"batch 37: max abs err vs unsplit model {err37:.2e}")

    ok = err < 1e-5 and err37 < 1e-5
    verdict = "[green]OK: split output equals the unsplit model[/]" if ok else "[red]MISMATCH[/]"
    console.print(verdict)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
