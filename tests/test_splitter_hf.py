"""ModelSplitter on Hugging Face architectures from tiny configs: outputs and gradients."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from partitioner import ModelSplitter

pytest.importorskip("transformers")

from tests.test_hf import bert, gpt2, ids, llama, t5  # noqa: E402


@pytest.mark.parametrize(
    ("factory", "devices", "chunks", "backward"),
    [
        (gpt2, 2, 3, "autograd"),
        (bert, 3, 2, "autograd"),
        (llama, 4, 4, "autograd"),
        # BERT's pooler output is unused by the loss: its parameters must keep grad None.
        (gpt2, 2, 3, "pipelined"),  # the LM head tied to the embedding
        (bert, 3, 2, "pipelined"),
        (llama, 4, 4, "pipelined"),
    ],
)
def test_split_hf_model_matches_outputs_and_gradients(
    factory: Callable[[], nn.Module], devices: int, chunks: int, backward: str
) -> None:
    torch.manual_seed(0)
    model = factory().eval()  # eval: no dropout, so gradients compare exactly
    reference = copy.deepcopy(model)
    x = ids(6)
    splitter = ModelSplitter(
        model, num_devices=devices, chunks=chunks, time_limit=5, backward=backward
    )
    out, want = splitter(input_ids=x), reference(input_ids=x)
    assert type(out) is type(want)
    key = "logits" if "logits" in want else "last_hidden_state"
    torch.testing.assert_close(out[key], want[key])
    out[key].float().pow(2).mean().backward()
    want[key].float().pow(2).mean().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        if b.grad is None:
            if backward == "pipelined":
                assert a.grad is None, name
            assert a.grad is None or not a.grad.any(), name
            continue
        torch.testing.assert_close(a.grad, b.grad, msg=name, rtol=1e-4, atol=1e-6)
    # Another batch size reuses the plan.
    plan = splitter.plan
    torch.testing.assert_close(splitter(input_ids=x[:5])[key], reference(input_ids=x[:5])[key])
    assert splitter.plan is plan


def test_split_gpt2_with_broadcast_position_ids() -> None:
    # position_ids of shape (1, L) beside input_ids (B, L) go to every micro-batch whole.
    torch.manual_seed(0)
    model = gpt2().eval()
    x = ids(6)
    positions = torch.arange(x.shape[1]).unsqueeze(0)
    splitter = ModelSplitter(model, num_devices=2, chunks=3, time_limit=5)
    with torch.no_grad():
        out = splitter(input_ids=x, position_ids=positions)
        want = model(input_ids=x, position_ids=positions)
        torch.testing.assert_close(out.logits, want.logits)
        plan = splitter.plan
        # Another batch size reuses the plan; a full (B, L) position_ids is another structure.
        five = splitter(input_ids=x[:5], position_ids=positions)
        torch.testing.assert_close(five.logits, want.logits[:5])
        assert splitter.plan is plan
        full = positions.expand(6, -1).contiguous()
        torch.testing.assert_close(splitter(input_ids=x, position_ids=full).logits, want.logits)


@pytest.mark.parametrize("backward", ["autograd", "pipelined"])
def test_split_t5_encoder_decoder(backward: str) -> None:
    # Two token inputs (encoder and decoder), cross-attention reading the encoder's output.
    torch.manual_seed(0)
    model = t5().eval()
    reference = copy.deepcopy(model)
    kwargs = {"input_ids": ids(6), "decoder_input_ids": ids(6, 5)}
    splitter = ModelSplitter(model, num_devices=3, chunks=3, time_limit=5, backward=backward)
    out, want = splitter(**kwargs), reference(**kwargs)
    torch.testing.assert_close(out.logits, want.logits)
    out.logits.pow(2).mean().backward()
    want.logits.pow(2).mean().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name
            continue
        torch.testing.assert_close(a.grad, b.grad, msg=name, rtol=1e-4, atol=1e-6)


def test_a_mean_over_labels_with_ignored_positions_says_it_is_not_the_unsplit_loss() -> None:
    # reducer="mean" weights micro-batches by rows; with -100 labels the unsplit loss
    # weights by counted tokens, so the two differ: never without a word.
    torch.manual_seed(0)
    model = gpt2().eval()
    x = ids(6)
    labels = x.clone()
    labels[0, 2:] = -100
    splitter = ModelSplitter(model, num_devices=2, chunks=3, time_limit=5, reducer="mean")
    with pytest.warns(UserWarning, match=r"ignored positions \(-100\).*not by the tokens"):
        splitter(input_ids=x, labels=labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splitter(input_ids=x, labels=labels)  # said once
        splitter(input_ids=x, labels=x)  # nothing ignored: the row-weighted mean is exact


@pytest.mark.parametrize("backward", ["autograd", "pipelined"])
def test_token_mean_makes_the_loss_over_ignored_labels_exact(backward: str) -> None:
    # Hugging Face's causal-LM loss is a mean over the shifted labels that are not -100:
    # token_mean(shift=1) weights each micro-batch by those, so loss and gradients are the
    # unsplit model's (reducer="mean" weights by rows: off where micro-batches count
    # different tokens).
    from runtime import token_mean

    torch.manual_seed(0)
    model = gpt2().eval()
    reference = copy.deepcopy(model)
    x = ids(6)
    labels = x.clone()
    labels[0, 2:] = -100  # micro-batches of 2 rows count 8, 14 and 14 tokens
    labels[1, :5] = -100
    want = reference(input_ids=x, labels=labels).loss
    want.backward()
    splitter = ModelSplitter(
        model,
        num_devices=2,
        chunks=3,
        time_limit=5,
        backward=backward,
        reducer=token_mean("labels", shift=1),
        example_kwargs={"input_ids": x, "labels": labels},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "rows, not tokens" warning
        got = splitter(input_ids=x, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name
            continue
        torch.testing.assert_close(a.grad, b.grad, msg=name, rtol=1e-4, atol=1e-6)
    by_rows = ModelSplitter(
        copy.deepcopy(reference), num_devices=2, chunks=3, time_limit=5, reducer="mean"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        off = by_rows(input_ids=x, labels=labels).loss
    assert abs(off.item() - want.item()) > 1e-3  # the test can fail
    labels[:2] = -100  # micro-batch 0 counts no token: its mean is 0/0
    with pytest.raises(ValueError, match="micro-batch 0 of 3 counts 0 items"):
        splitter(input_ids=x, labels=labels)
