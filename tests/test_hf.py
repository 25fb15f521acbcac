"""Hugging Face architectures from tiny configs: trace (torch.export) and profile."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from partitioner.capture.binding import program_of
from partitioner.capture.tracer import trace
from partitioner.planner.cost import evaluate, validate_graph
from partitioner.profiling.costgraph import profile
from runtime.interface import Const

transformers = pytest.importorskip("transformers")

VOCAB = 96
Call = tuple[tuple[Any, ...], dict[str, Any]]


def ids(batch: int, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, use_cache=False
    )
    return transformers.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config)


def llama_config() -> Any:
    return transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        use_cache=False,
    )


def llama() -> nn.Module:
    return transformers.LlamaForCausalLM(llama_config())


def t5() -> nn.Module:
    config = transformers.T5Config(
        num_layers=2,
        num_decoder_layers=2,
        d_model=32,
        d_kv=16,
        num_heads=2,
        d_ff=64,
        vocab_size=VOCAB,
        use_cache=False,
    )
    return transformers.T5ForConditionalGeneration(config)


def plain(batch: int) -> Call:
    return (ids(batch),), {}


def masked(batch: int) -> Call:
    return (ids(batch),), {"attention_mask": torch.ones(batch, 12, dtype=torch.long)}


def seq2seq(batch: int) -> Call:
    return (ids(batch),), {"decoder_input_ids": ids(batch, 6)}


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Call]]] = {
    "gpt2": (gpt2, plain),
    "bert": (bert, masked),
    "llama": (llama, plain),
    "t5": (t5, seq2seq),
}


def run_by_node(gm: fx.GraphModule, args: Any, kwargs: Any) -> Any:
    program = program_of(gm)
    values = program.bind(args, kwargs)
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    interp.run(*(values[n] for n in program.inputs), enable_io_processing=False)
    env = {node.name: value for node, value in interp.env.items()}
    return program.unflatten(
        [leaf.value if isinstance(leaf, Const) else env[leaf] for leaf in program.output_leaves]
    )


def unique_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("name", list(CASES))
def test_hf_trace_and_profile(name: str) -> None:
    build, call = CASES[name]
    model = build().eval()
    args, kwargs = call(4)
    gm = trace(model, args, kwargs)
    assert gm.meta["modelsplit_mode"] == "export"
    assert set(gm.state_dict()) == set(model.state_dict())
    args3, kwargs3 = call(3)  # another batch size: dim 0 was exported as Dim.AUTO
    with torch.no_grad():
        expected = model(*args3, **kwargs3)
        actual = run_by_node(gm, args3, kwargs3)
        direct = gm(*args3, **kwargs3)
    for out in (actual, direct):
        assert type(out) is type(expected)
        assert list(out.keys()) == list(expected.keys())
        for got, want in zip(pytree.tree_leaves(out), pytree.tree_leaves(expected), strict=True):
            torch.testing.assert_close(got, want)

    graph = profile(gm, args, kwargs, chunks=2, cost="flops")
    validate_graph(graph)
    # [Note: weights live with their readers]: each tensor once in the weight table, once on
    # a one-stage plan, and on every reader in the per-node figures the planner sums
    assert sum(graph.graph["weight_bytes"].values()) == unique_bytes(model)
    one = evaluate(graph, dict.fromkeys(graph.nodes, 0), 1, 1e9).stages[0].param_bytes
    assert one == unique_bytes(model)
    assert sum(d for _, d in graph.nodes(data="param_bytes")) >= unique_bytes(model)
    assert graph.graph["model"] == type(model).__name__
    if name == "gpt2":
        assert ["lm_head.weight", "transformer.wte.weight"] in graph.graph["ties"]


def test_gpt2_profiles_by_time() -> None:
    model = gpt2().eval()
    args, kwargs = plain(2)
    gm = trace(model, args, kwargs)
    graph = profile(gm, args, kwargs, repeat=1)
    validate_graph(graph)
    assert sum(d for _, d in graph.nodes(data="time")) > 0


def test_llama_on_meta_device() -> None:
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config()).eval()
    args, kwargs = plain(4)
    gm = trace(model, args, kwargs)
    assert all(p.is_meta for p in gm.parameters())
    graph = profile(gm, args, kwargs, cost="flops")
    validate_graph(graph)
    assert graph.graph["device"] == "meta"
    # [Note: weights live with their readers]: each tensor once in the weight table, once on
    # a one-stage plan, and on every reader in the per-node figures the planner sums
    assert sum(graph.graph["weight_bytes"].values()) == unique_bytes(model)
    one = evaluate(graph, dict.fromkeys(graph.nodes, 0), 1, 1e9).stages[0].param_bytes
    assert one == unique_bytes(model)
    assert sum(d for _, d in graph.nodes(data="param_bytes")) >= unique_bytes(model)
    assert sum(d for _, d in graph.nodes(data="flops")) > 0


def test_gpt2_binds_calls_of_another_form() -> None:
    model = gpt2().eval()
    x, mask = ids(3), torch.ones(3, 12, dtype=torch.long)
    gm = trace(model, (), {"input_ids": x, "attention_mask": mask})
    program = program_of(gm)
    assert program.inputs == ("input_ids", "attention_mask")
    with torch.no_grad():
        want = model(x, attention_mask=mask).logits
        for args, kwargs in [((x,), {"attention_mask": mask}), ((x, None, mask), {})]:
            torch.testing.assert_close(run_by_node(gm, args, kwargs).logits, want)
    program.bind((x,), {"attention_mask": mask, "labels": None})  # a default: fine
    with pytest.raises(ValueError, match="labels"):
        program.bind((x,), {"attention_mask": mask, "labels": x})
