"""Scatter and gather: the micro-batching rules."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from runtime.microbatch import batch_size, gather, reduce_values, scatter, tree_leaves, tree_map


def test_scatter_splits_dim0_and_broadcasts_the_rest() -> None:
    x, mask, scale = torch.arange(10.0).view(10, 1), torch.ones(10, 3), torch.tensor(2.0)
    batches, sizes = scatter({"x": x, "mask": mask, "scale": scale, "flag": True}, 4)
    assert sizes == [3, 3, 2, 2]
    assert [b["x"].shape[0] for b in batches] == sizes
    assert all(b["scale"] is scale and b["flag"] is True for b in batches)
    assert torch.equal(torch.cat([b["x"] for b in batches]), x)
    assert batches[1]["x"].data_ptr() == x[3:].data_ptr()  # views, no copy


def test_scatter_batch_smaller_than_chunks_gives_fewer_chunks() -> None:
    batches, sizes = scatter(((torch.randn(3, 2),), {}), 8)
    assert sizes == [1, 1, 1] and len(batches) == 3


def test_scatter_without_batched_tensor_is_one_microbatch() -> None:
    tree = ((torch.tensor(1.0), 3), {"k": "v"})
    batches, sizes = scatter(tree, 4)
    assert batches == [tree] and sizes == [0]


def test_scatter_mismatched_batch_sizes_names_them() -> None:
    with pytest.raises(ValueError, match=r"different batch sizes.*\['a'\] has 4.*\['b'\] has 5"):
        scatter({"a": torch.zeros(4), "b": torch.zeros(5)}, 2)


def test_scatter_broadcasts_size1_tensors_beside_a_larger_batch() -> None:
    # A Hugging Face position_ids of shape (1, L) beside input_ids (B, L).
    ids, positions = torch.randint(0, 9, (5, 4)), torch.arange(4).view(1, 4)
    batches, sizes = scatter({"input_ids": ids, "position_ids": positions}, 2)
    assert sizes == [3, 2]
    assert all(b["position_ids"] is positions for b in batches)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), ids)
    assert batch_size((positions, ids)) == 5 and batch_size((positions,)) == 1


def test_scatter_size1_and_two_other_sizes_is_still_an_error() -> None:
    with pytest.raises(ValueError, match="different batch sizes"):
        scatter({"a": torch.zeros(1), "b": torch.zeros(4), "c": torch.zeros(5)}, 2)


@pytest.mark.parametrize("chunks", [0, -1, 1.5, True])
def test_scatter_rejects_bad_chunks(chunks: object) -> None:
    with pytest.raises(ValueError, match="chunks must be a positive integer"):
        scatter(torch.zeros(4), chunks)  # type: ignore[arg-type]


def test_gather_concatenates_nested_structures() -> None:
    outs = [
        ({"h": torch.full((2, 3), float(i))}, [torch.full((2,), float(i)), None], "tag")
        for i in range(3)
    ]
    out = gather(outs, [2, 2, 2])
    assert out[0]["h"].shape == (6, 3) and out[1][0].shape == (6,)
    assert out[1][1] is None and out[2] == "tag"
    assert torch.equal(out[0]["h"][:, 0], torch.tensor([0.0, 0, 1, 1, 2, 2]))


def test_gather_namedtuple_and_model_output() -> None:
    Pair = namedtuple("Pair", ["a", "b"])
    out = gather([Pair(torch.ones(1, 2), torch.zeros(1)) for _ in range(2)], [1, 1])
    assert isinstance(out, Pair) and out.a.shape == (2, 2)
    transformers = pytest.importorskip("transformers")
    ModelOutput = transformers.modeling_outputs.CausalLMOutput
    outs = [ModelOutput(logits=torch.randn(s, 4, 7)) for s in (3, 2)]
    merged = gather(outs, [3, 2])
    assert isinstance(merged, ModelOutput) and merged.logits.shape == (5, 4, 7)
    assert merged.loss is None


def test_gather_scalar_without_reducer_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"output \[1\] is a tensor of shape \(\).*reducer="):
        gather([(torch.ones(2, 1), torch.tensor(1.0))] * 2, [2, 2])


def test_gather_wrong_dim0_without_reducer_is_an_error() -> None:
    with pytest.raises(ValueError, match="no batch dimension"):
        gather([torch.ones(5), torch.ones(5)], [2, 2])


def test_gather_mean_is_weighted_by_microbatch_size() -> None:
    losses = [torch.tensor(1.0), torch.tensor(4.0)]
    assert gather(losses, [3, 1], reducer="mean").item() == pytest.approx((3 * 1 + 4) / 4)
    assert gather(losses, [3, 1], reducer="sum").item() == 5.0
    assert gather(losses, [3, 1], reducer=max).item() == 4.0


def test_gather_mean_equals_full_batch_mean_loss() -> None:
    x = torch.randn(10, 3)
    batches, sizes = scatter(x, 4)
    assert gather([b.pow(2).mean() for b in batches], sizes, "mean").item() == pytest.approx(
        x.pow(2).mean().item()
    )


def test_gather_structure_mismatch() -> None:
    with pytest.raises(ValueError, match="another output structure"):
        gather([(torch.ones(1),), (torch.ones(1), torch.ones(1))], [1, 1])


def test_reduce_values_rejects_unknown_reducer() -> None:
    with pytest.raises(ValueError, match="reducer must be"):
        reduce_values([1, 2], [1, 1], "median")
    with pytest.raises(ValueError, match="reducer must be"):
        gather([torch.tensor(1.0)], [1], reducer="median")


def test_batch_size() -> None:
    assert batch_size((torch.zeros(3, 2), torch.tensor(1.0), 7)) == 3
    assert batch_size([1, "a"]) is None


def test_fast_tree_walk_matches_pytree_order() -> None:
    import torch.utils._pytree as pytree

    Pair = namedtuple("Pair", ["a", "b"])
    tree = {"b": [1, (2, 3)], "a": Pair(4, {"z": 5, "y": 6}), "c": None}
    assert tree_leaves(tree) == pytree.tree_leaves(tree)
    assert tree_map(lambda v: v, tree) == tree
    doubled = tree_map(lambda v: v * 2 if isinstance(v, int) else v, tree)
    assert tree_leaves(doubled) == [2, 4, 6, 8, 10, 12, None]


def test_scatter_gather_roundtrip_keeps_autograd() -> None:
    x = torch.randn(7, 2, requires_grad=True)
    batches, sizes = scatter(x, 3)
    out = gather([b * 2 for b in batches], sizes)
    out.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.full_like(x, 2.0))
