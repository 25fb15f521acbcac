"""Training plans against the baselines, all scored by the same simulator.

    .venv/bin/python benchmarks/train_baselines.py [--devices 4 --chunks 8 --time-limit 10]
        [--models mlp gpt residual_cnn gpt2 llama]

For each model: trace, ``profile(training=True)`` at the micro-batch size of ``--chunks``
micro-batches (measured forward and backward per node, one intra-op thread), then, for each
schedule (gpipe, 1f1b, interleaved-1f1b with 2 stages per device, zero-bubble), the step time
`stepcost.step_figures` predicts (the event simulation of that schedule's actions with each
stage's forward, backward and transfers: docs/planner.md, "Training plans") for:

- uniform: equal numbers of layers per stage (torchtitan's default split, DeepSpeed's
  ``uniform``), layers as the module paths' numbered blocks;
- layer-dp: layers balanced by forward + backward time, the schedule-aware
  auto-partitioning of PyTorch pull request #179212 (torchtitan #2113), ported from its
  description (`partitioner.planner.baselines`, policy ``"layer-dp"``);
- forward-only: today's inference plan (`solve` with ``training=False``: the ILP on forward
  time per micro-batch), then run under the schedule;
- modelsplit: `solve(training=True, schedule=..., chunks=M, virtual_stages=V)`, which
  minimises that simulated step.

Every plan has K * V stages on ``--devices`` equal devices (stage s on device s % K), no memory
limit, the default bandwidth. The last column is the best baseline's step over modelsplit's
(above 1: modelsplit is faster). ``gpt2`` (GPT-2 small, 12 layers, 64 tokens) and ``llama``
(a 8-layer Llama of width 256) come from transformers configs with random weights and are
skipped when transformers does not import.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from partitioner.capture.tracer import trace  # noqa: E402
from partitioner.examples import MODELS, example_input  # noqa: E402
from partitioner.planner.baselines import baseline_stages  # noqa: E402
from partitioner.planner.cost import DEFAULT_BANDWIDTH, DeviceSpec  # noqa: E402
from partitioner.planner.heuristics import index_graph, sources_late  # noqa: E402
from partitioner.planner.solver import solve  # noqa: E402
from partitioner.planner.stepcost import stage_specs, step_figures  # noqa: E402
from partitioner.profiling.costgraph import profile  # noqa: E402

#: model -> batch (the profile's micro-batch is batch / --chunks rows)
BATCH = {"mlp": 64, "gpt": 16, "residual_cnn": 32, "gpt2": 8, "llama": 8}
#: (schedule, virtual stages per device)
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zero-bubble", 1))
POLICIES = ("uniform", "layer-dp")


def build(name: str) -> tuple[nn.Module, tuple[Any, ...]] | None:
    """A model in training mode and its example inputs (None: transformers is missing)."""
    batch = BATCH[name]
    if name in ("gpt2", "llama"):
        try:
            import transformers
        except ImportError:
            print(f"{name}: transformers does not import; skipped")
            return None
        if name == "gpt2":
            config: Any = transformers.GPT2Config(use_cache=False)
            model: nn.Module = transformers.GPT2LMHeadModel(config)
        else:
            config = transformers.LlamaConfig(
                vocab_size=4096,
                hidden_size=256,
                intermediate_size=688,
                num_hidden_layers=8,
                num_attention_heads=8,
                num_key_value_heads=4,
                use_cache=False,
            )
            model = transformers.LlamaForCausalLM(config)
        return model.train(), (torch.randint(0, config.vocab_size, (batch, 64)),)
    config_kwargs = {"gpt": {"layers": 8}, "mlp": {"depth": 8}, "residual_cnn": {"blocks": 8}}
    args, _ = example_input(name, batch)
    return MODELS[name](**config_kwargs.get(name, {})).train(), args


def score(
    graph: nx.DiGraph,
    assignment: dict[str, int],
    specs: list[DeviceSpec],
    schedule: str,
    chunks: int,
    v: int,
) -> float:
    figures = step_figures(graph, assignment, specs, DEFAULT_BANDWIDTH, schedule, chunks, v)
    return figures.step_time


def rows(name: str, args: argparse.Namespace) -> list[str]:
    built = build(name)
    if built is None:
        return []
    model, inputs = built
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = trace(model, inputs)
        graph = profile(gm, inputs, training=True, chunks=args.chunks)
    took = time.perf_counter() - t0
    specs = [DeviceSpec(f"cpu:{k}") for k in range(args.devices)]
    late = index_graph(graph, sources_late(graph))
    print(f"{name}: {graph.number_of_nodes()} nodes, profiled in {took:.1f} s", file=sys.stderr)
    out = []
    for schedule, v in SCHEDULES:
        stages = stage_specs(specs, v)
        steps: dict[str, float] = {}
        for policy in POLICIES:
            stage = baseline_stages(graph, late, stages, policy)
            steps[policy] = score(
                graph, dict(zip(late.names, stage, strict=True)), specs, schedule, args.chunks, v
            )
        fwd = solve(graph, stages, training=False, chunks=args.chunks, time_limit=args.time_limit)
        if fwd.num_stages == len(stages):
            steps["forward-only"] = score(
                graph, dict(fwd.assignment), specs, schedule, args.chunks, v
            )
        plan = solve(
            graph,
            specs,
            training=True,
            schedule=schedule,
            chunks=args.chunks,
            virtual_stages=v,
            checkpoint=False,
            time_limit=args.time_limit,
        )
        assert plan.step_time is not None
        ours = float(plan.step_time)
        best = min(steps.values())
        cells = [
            f"{1e3 * steps[p]:.2f}" if p in steps else "n/a" for p in (*POLICIES, "forward-only")
        ]
        label = schedule if v == 1 else f"{schedule} (V={v})"
        out.append(
            f"| {name} | {label} | {' | '.join(cells)} | {1e3 * ours:.2f} | {best / ours:.2f} |"
        )
        print(out[-1], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--time-limit", type=float, default=10.0)
    p.add_argument("--models", nargs="+", default=["mlp", "gpt", "residual_cnn", "gpt2", "llama"])
    args = p.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, {args.devices} devices, {args.chunks} micro-batches; "
        "predicted step time (ms) by the same simulator\n"
    )
    print(
        "| model | schedule | uniform | layer-dp (PR #179212) | forward-only plan | "
        "modelsplit | best baseline / modelsplit |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        rows(name, args)


if __name__ == "__main__":
    main()
