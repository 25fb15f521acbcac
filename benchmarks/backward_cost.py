"""Predicted (sum of the nodes' bwd_time) against measured backward time per pipeline stage.

    .venv/bin/python benchmarks/backward_cost.py [--models mlp residual_cnn gpt gpt2]
        [--stages 1 2 4] [--repeat 5] [--runs 20] [--threads N]

For each model: trace, ``profile(training=True)``, cut the node list into K contiguous pieces
of equal forward + backward time, build each piece as its own module
(`torch.fx.passes.split_module`) and time its backward as a stage runs it:
``torch.autograd.grad`` of its outputs over its inputs that need a gradient and its
parameters, fastest of ``--runs`` (noise only adds time). Prints one row per stage:
predicted, measured, predicted / measured. ``gpt2`` is GPT-2 small from a transformers config
with random weights (batch 1 x 64 tokens), skipped when transformers does not import.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.passes.split_module import split_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from partitioner.capture.tracer import trace  # noqa: E402
from partitioner.examples import MODELS, example_input  # noqa: E402
from partitioner.profiling.costgraph import profile  # noqa: E402

#: the example models and their batch (one micro-batch: profile with chunks=1)
BATCH = {"my_model": 256, "mlp": 64, "residual_cnn": 32, "gpt": 8, "resnet50": 4}


def build(name: str) -> tuple[nn.Module, tuple[Any, ...]] | None:
    """A model in training mode and its example positional inputs (None: not available)."""
    if name == "gpt2":
        try:
            import transformers
        except ImportError:
            print("gpt2: transformers does not import; skipped")
            return None
        config = transformers.GPT2Config(use_cache=False)  # GPT-2 small, random weights
        model: nn.Module = transformers.GPT2LMHeadModel(config)
        return model.train(), (torch.randint(0, config.vocab_size, (1, 64)),)
    args, _ = example_input(name, BATCH[name])
    return MODELS[name]().train(), args


def pieces(graph: nx.DiGraph, k: int) -> dict[str, int]:
    """Node -> piece: the node list in order, cut where forward + backward time crosses j/k
    (fewer than k pieces where one node is longer than a piece)."""
    cost = {v: d["time"] + d["bwd_time"] for v, d in graph.nodes(data=True)}
    total, done, where = sum(cost.values()), 0.0, {}
    for v in graph.nodes:
        where[v] = min(k - 1, int(done / total * k)) if total > 0 else 0
        done += cost[v]
    # a node bigger than a piece (GPT-2's lm_head) leaves a piece empty: number those used
    used = {s: i for i, s in enumerate(sorted(set(where.values())))}
    return {v: used[s] for v, s in where.items()}


def stage_inputs(split: fx.GraphModule, k: int, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The positional inputs each stage receives when the split module runs on ``args``."""
    seen: dict[int, tuple[Any, ...]] = {}
    hooks = []
    for j in range(k):
        sub = getattr(split, f"submod_{j}")
        hooks.append(sub.register_forward_pre_hook(lambda _, a, j=j: seen.setdefault(j, a)))
    with torch.enable_grad():
        split(*args)
    for h in hooks:
        h.remove()
    return [seen[j] for j in range(k)]


def _wants(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()


def measured_backward(stage: nn.Module, args: tuple[Any, ...], runs: int) -> float:
    """The stage's backward, fastest of ``runs`` (each after a fresh forward)."""
    best = float("inf")
    for _ in range(runs):
        leaves = tuple(a.detach().requires_grad_() if _wants(a) else a for a in args)
        with torch.enable_grad():
            out = stage(*leaves)
        outs = [t for t in pytree.tree_leaves(out) if _wants(t)]
        wrt = [a for a in leaves if _wants(a)] + [p for p in stage.parameters() if p.requires_grad]
        seeds = [torch.ones_like(t) for t in outs]
        start = time.perf_counter()
        torch.autograd.grad(outs, wrt, seeds, allow_unused=True)
        best = min(best, time.perf_counter() - start)
    return best


def report(name: str, stages: list[int], repeat: int, runs: int) -> None:
    built = build(name)
    if built is None:
        return
    model, args = built
    gm = trace(model, args)
    start = time.perf_counter()
    graph = profile(gm, args, training=True, repeat=repeat)
    took = time.perf_counter() - start
    fwd = sum(d["time"] for _, d in graph.nodes(data=True))
    bwd = sum(d["bwd_time"] for _, d in graph.nodes(data=True))
    print(
        f"{name}: {graph.number_of_nodes()} nodes, profile {took:.2f} s, "
        f"forward {fwd * 1e3:.2f} ms, backward {bwd * 1e3:.2f} ms predicted"
    )
    for k in stages:
        stage_rows(gm, graph, args, k, runs)


def stage_rows(
    gm: fx.GraphModule, graph: nx.DiGraph, args: tuple[Any, ...], k: int, runs: int
) -> None:
    """Print predicted against measured backward for each of ``k`` equal-time stages."""
    where = pieces(graph, k)
    k = len(set(where.values()))
    split = split_module(gm, gm, lambda n: where[n.name])
    inputs = stage_inputs(split, k, args)
    measured = [float("inf")] * k
    for _ in range(runs):  # round-robin: a busy spell slows one run of each, not all of one
        for j in range(k):
            run = measured_backward(getattr(split, f"submod_{j}"), inputs[j], 1)
            measured[j] = min(measured[j], run)
    for j in range(k):
        predicted = sum(graph.nodes[v]["bwd_time"] for v, s in where.items() if s == j)
        print(
            f"  K={k} stage {j}: predicted {predicted * 1e3:8.2f} ms  measured "
            f"{measured[j] * 1e3:8.2f} ms  ratio {predicted / measured[j]:5.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "residual_cnn", "gpt", "gpt2"])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=5, help="profile's timed runs per node")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per stage backward")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    torch.manual_seed(0)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load}")
    for name in ns.models:
        report(name, ns.stages, ns.repeat, ns.runs)


if __name__ == "__main__":
    main()
