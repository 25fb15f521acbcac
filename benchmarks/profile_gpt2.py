"""How long trace and profile take on GPT-2 small (transformers, torch.export, ~530 nodes).

    .venv/bin/python benchmarks/profile_gpt2.py [--batch 8] [--seq 64] [--chunks 8]
        [--repeat 5] [--threads N]

Prints the node count, the seconds each pass took and, for scale, one eager forward
of the micro-batch: profile(cost="time") costs about 1 + repeat such forwards.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)

    import transformers

    from partitioner.capture.tracer import trace
    from partitioner.profiling.costgraph import profile

    config = transformers.GPT2Config(use_cache=False)  # GPT-2 small: 12 layers, 768 wide
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (ns.batch, ns.seq))

    micro = ids[: -(-ns.batch // ns.chunks)]
    eager = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            model(micro)
            eager.append(time.perf_counter() - start)

    start = time.perf_counter()
    gm = trace(model, (ids,))
    traced = time.perf_counter() - start
    compute = sum(n.op == "call_function" for n in gm.graph.nodes)

    start = time.perf_counter()
    graph = profile(gm, (ids,), chunks=ns.chunks, repeat=ns.repeat)
    profiled = time.perf_counter() - start
    predicted = sum(t for _, t in graph.nodes(data="time"))

    start = time.perf_counter()
    profile(gm, (ids,), chunks=ns.chunks, cost="flops")
    flops = time.perf_counter() - start

    print(
        f"GPT-2 small, batch {ns.batch} x {ns.seq} tokens, chunks {ns.chunks}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"  nodes: {graph.number_of_nodes()} ({compute} compute)")
    print(f"  trace (torch.export):       {traced:6.2f} s")
    print(f"  profile cost='time' x{ns.repeat}:  {profiled:6.2f} s")
    print(f"  profile cost='flops':       {flops:6.2f} s")
    print(f"  predicted forward per micro-batch: {predicted * 1e3:.1f} ms")
    print(f"  eager forward per micro-batch (median of 3): {sorted(eager)[1] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
