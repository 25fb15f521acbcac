"""Train a split model: the GPT of ``models.py`` over 2 CPU workers, pipelined backward.

    python examples/train.py [--steps 5] [--devices 2] [--chunks 4] [--backward pipelined]

A plain training loop (SGD with momentum, next-token cross-entropy) runs on a
`ModelSplitter` and, in lockstep, on an unsplit copy of the same model. The split model's
losses and weights must track the unsplit model's step for step: splitting changes where
the work runs, not what it computes. The model is in eval mode (no dropout), so both see
the same computation.
(SGD rather than Adam for the lockstep check: Adam divides by the gradient's running
magnitude, so a gradient that is zero up to rounding, such as attention's key bias, turns
rounding noise into full-size steps on both sides, differently.)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from modelsplit import ModelSplitter
from modelsplit.examples import gpt


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: predict tokens[:, 1:] from tokens[:, :-1]."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backward", choices=("autograd", "pipelined"), default="pipelined")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = gpt(vocab=256, dim=64, layers=4, heads=4, max_len=64).eval()
    reference = copy.deepcopy(model)
    splitter = ModelSplitter(
        model,
        devices=[f"cpu:{k}" for k in range(args.devices)],
        chunks=args.chunks,
        backward=args.backward,
        time_limit=5,
    )
    # splitter.parameters() are the model's own parameters, under the same names.
    opt = torch.optim.SGD(splitter.parameters(), lr=1e-2, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=1e-2, momentum=0.9)
    data = torch.randint(0, 256, (args.steps, args.batch, 33))

    print(f"step  loss (split, backward={args.backward!r})  loss (unsplit)   ms (split)")
    for step, tokens in enumerate(data):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_of(splitter, tokens)
        loss.backward()
        opt.step()
        ms = (time.perf_counter() - start) * 1e3
        ref_opt.zero_grad(set_to_none=True)
        want = loss_of(reference, tokens)
        want.backward()
        ref_opt.step()
        print(f"{step:>4}  {loss.item():>34.6f}  {want.item():>14.6f}  {ms:>11.1f}")
        torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    plan = splitter.plan
    assert plan is not None
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    print(
        f"OK: {args.steps} steps on {plan.num_stages} stages "
        f"({', '.join(plan.devices)}) track the unsplit model"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
