"""The model table of benchmarks/zoo.py: every architecture from a constructor, random weights.

Each entry builds its model from a config or constructor (torchvision ``weights=None``, timm
``pretrained=False``, Hugging Face ``*.from_config``/``Model(config)`` with tiny configs), so
nothing is downloaded, and makes its own inputs at any batch size. ``needs`` names the library
the entry imports; the zoo skips an entry whose library is missing (the main venv has no
torchvision and no timm).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
VOCAB = 96
SEQ = 12


@dataclass(frozen=True)
class Entry:
    name: str
    family: str  # torchvision / timm / hf / trap
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Inputs]  # batch size -> (args, kwargs)
    needs: str = ""  # the library the entry imports ("" for torch alone)
    train: bool = False  # run in training mode (else eval: no dropout, BatchNorm frozen)
    options: dict[str, Any] = field(default_factory=dict)  # extra ModelSplitter options
    input_grad: bool = True  # float inputs require grad (their gradients are compared too)
    expect: str = ""  # what a correct library does with it, for the reader
    batches: tuple[int, int] = (4, 3)  # the planned batch size, and a second one


ENTRIES: list[Entry] = []


def _gen(batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + batch)


def image(size: int | tuple[int, int], channels: int = 3) -> Callable[[int], Inputs]:
    h, w = (size, size) if isinstance(size, int) else size

    def make(batch: int) -> Inputs:
        return (torch.randn(batch, channels, h, w, generator=_gen(batch)),), {}

    return make


def features(*shape: int) -> Callable[[int], Inputs]:
    def make(batch: int) -> Inputs:
        return (torch.randn(batch, *shape, generator=_gen(batch)),), {}

    return make


def tokens(seq: int = SEQ, mask: bool = False, **extra: Callable[[int], Any]) -> Callable:
    """input_ids (B, seq); with mask=True an attention_mask padding the last 3 positions of
    row 1; extra keyword inputs are made by their functions of the batch size."""

    def make(batch: int) -> Inputs:
        kwargs: dict[str, Any] = {
            "input_ids": torch.randint(3, VOCAB, (batch, seq), generator=_gen(batch))
        }
        if mask:
            m = torch.ones(batch, seq, dtype=torch.long)
            if batch > 1:
                m[1, -3:] = 0
            kwargs["attention_mask"] = m
        for key, fn in extra.items():
            kwargs[key] = fn(batch)
        return (), kwargs

    return make


def add(entry: Entry) -> None:
    ENTRIES.append(entry)


# -- torchvision -------------------------------------------------------------------------


def tv(name: str, size: int = 64, inputs: Callable[[int], Inputs] | None = None, **kw: Any):
    def build() -> nn.Module:
        models = importlib.import_module("torchvision.models")
        return getattr(models, name)(weights=None, **kw)

    add(Entry(f"tv_{name}", "torchvision", build, inputs or image(size), "torchvision"))


def tv_seg(name: str, size: int = 64, **kw: Any):
    def build() -> nn.Module:
        seg = importlib.import_module("torchvision.models.segmentation")
        return getattr(seg, name)(weights=None, weights_backbone=None, **kw)

    add(Entry(f"tv_{name}", "torchvision", build, image(size), "torchvision"))


def tv_video(name: str):
    def build() -> nn.Module:
        video = importlib.import_module("torchvision.models.video")
        return getattr(video, name)(weights=None)

    add(Entry(f"tv_{name}", "torchvision", build, features(3, 4, 32, 32), "torchvision"))


tv("resnet18")
tv("resnet50")
tv("resnext50_32x4d")
tv("densenet121")
tv("inception_v3", size=96, aux_logits=True, init_weights=True)
tv("googlenet", aux_logits=True, init_weights=True)
tv("mobilenet_v2")
tv("mobilenet_v3_small")
tv("efficientnet_b0")
tv("efficientnet_v2_s")
tv("regnet_y_400mf")
tv("convnext_tiny")
tv("swin_t")
tv("vit_b_16", image_size=64)
tv("squeezenet1_1")
tv("shufflenet_v2_x1_0")
tv("mnasnet0_5")
tv("vgg11_bn")
tv("alexnet")
tv_seg("fcn_resnet50")
tv_seg("deeplabv3_mobilenet_v3_large")
tv_seg("lraspp_mobilenet_v3_large")
tv_video("r3d_18")


def _fasterrcnn() -> nn.Module:
    det = importlib.import_module("torchvision.models.detection")
    return det.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=64
    )


add(
    Entry(
        "tv_fasterrcnn_mobilenet_v3_320",
        "torchvision",
        _fasterrcnn,
        image(64),
        "torchvision",
        expect="data-dependent output (a list of boxes per image): a clear error",
    )
)


# -- timm ----------------------------------------------------------------------------------


def tm(name: str, size: int | None = 64, inputs: Callable[[int], Inputs] | None = None, **kw):
    def build() -> nn.Module:
        timm = importlib.import_module("timm")
        extra = dict(kw)
        if size is not None and "img_size" not in extra and inputs is None:
            extra.setdefault("img_size", size)
        return timm.create_model(name, pretrained=False, **extra)

    add(Entry(f"timm_{name}", "timm", build, inputs or image(size or 64), "timm"))


def tm_cnn(name: str, size: int = 64, **kw: Any) -> None:
    """A convolutional timm model: no img_size argument."""

    def build() -> nn.Module:
        timm = importlib.import_module("timm")
        return timm.create_model(name, pretrained=False, **kw)

    add(Entry(f"timm_{name}", "timm", build, image(size), "timm"))


tm("vit_tiny_patch16_224")
tm("deit_tiny_distilled_patch16_224")
tm("vit_small_patch16_224", reg_tokens=4, class_token=True, no_embed_class=True, depth=4)
tm_cnn("convnext_atto")
tm_cnn("efficientnet_b0")
tm("levit_128s")
tm("cait_xxs24_224")
tm("eva02_tiny_patch14_224", size=56)
tm_cnn("hrnet_w18_small")
tm_cnn("mobilevit_xxs")
tm("swin_tiny_patch4_window7_224", window_size=2)
tm_cnn("resnet18d")
tm_cnn("regnety_002")
tm("mixer_s16_224")
tm("xcit_nano_12_p16_224")
tm_cnn("pvt_v2_b0")
tm_cnn("ghostnet_100")
tm_cnn("dla34")
tm_cnn("nf_resnet26")
tm_cnn("edgenext_xx_small")
tm_cnn("fastvit_t8")
tm_cnn("rexnet_100")
tm_cnn("tresnet_m")
tm("sequencer2d_s", size=None, inputs=image(64))
tm("beit_base_patch16_224", depth=2)


# -- Hugging Face --------------------------------------------------------------------------


def _tf() -> Any:
    return importlib.import_module("transformers")


def hf(
    name: str,
    config: str,
    model: str,
    inputs: Callable[[int], Inputs],
    *,
    expect: str = "",
    options: dict[str, Any] | None = None,
    **cfg: Any,
) -> None:
    def build() -> nn.Module:
        tf = _tf()
        return getattr(tf, model)(getattr(tf, config)(**cfg))

    add(
        Entry(
            f"hf_{name}", "hf", build, inputs, "transformers", False, options or {}, True, expect
        )
    )


TEXT = dict(vocab_size=VOCAB, use_cache=False)
DEC = dict(
    **TEXT,
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
ENC = dict(
    vocab_size=VOCAB,
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)

hf(
    "gpt2",
    "GPT2Config",
    "GPT2LMHeadModel",
    tokens(),
    n_layer=2,
    n_embd=32,
    n_head=2,
    n_positions=64,
    **TEXT,
)
hf("llama", "LlamaConfig", "LlamaForCausalLM", tokens(), **DEC)
hf("mistral", "MistralConfig", "MistralForCausalLM", tokens(), sliding_window=8, **DEC)
hf("qwen2", "Qwen2Config", "Qwen2ForCausalLM", tokens(), **DEC)
hf("qwen3", "Qwen3Config", "Qwen3ForCausalLM", tokens(), head_dim=8, **DEC)
hf("gemma2", "Gemma2Config", "Gemma2ForCausalLM", tokens(), head_dim=8, sliding_window=8, **DEC)
hf("phi3", "Phi3Config", "Phi3ForCausalLM", tokens(), pad_token_id=0, **DEC)
hf(
    "gpt_neox",
    "GPTNeoXConfig",
    "GPTNeoXForCausalLM",
    tokens(),
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    **TEXT,
)
hf(
    "opt",
    "OPTConfig",
    "OPTForCausalLM",
    tokens(),
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    ffn_dim=64,
    word_embed_proj_dim=32,
    max_position_embeddings=64,
    **TEXT,
)
hf(
    "bloom",
    "BloomConfig",
    "BloomForCausalLM",
    tokens(),
    n_layer=2,
    hidden_size=32,
    n_head=4,
    **TEXT,
)
hf(
    "falcon",
    "FalconConfig",
    "FalconForCausalLM",
    tokens(),
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    new_decoder_architecture=True,
    num_kv_heads=2,
    **TEXT,
)
hf(
    "mixtral_moe",
    "MixtralConfig",
    "MixtralForCausalLM",
    tokens(),
    num_local_experts=4,
    num_experts_per_tok=2,
    **DEC,
)
hf(
    "qwen2_moe",
    "Qwen2MoeConfig",
    "Qwen2MoeForCausalLM",
    tokens(),
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    **DEC,
)
hf(
    "mamba",
    "MambaConfig",
    "MambaForCausalLM",
    tokens(),
    vocab_size=VOCAB,
    hidden_size=32,
    state_size=8,
    num_hidden_layers=2,
    expand=2,
    conv_kernel=4,
    use_cache=False,
)
hf("bert", "BertConfig", "BertModel", tokens(mask=True), **ENC)
hf("roberta", "RobertaConfig", "RobertaForMaskedLM", tokens(mask=True), pad_token_id=1, **ENC)
hf(
    "distilbert",
    "DistilBertConfig",
    "DistilBertForSequenceClassification",
    tokens(mask=True),
    vocab_size=VOCAB,
    n_layers=2,
    dim=32,
    n_heads=2,
    hidden_dim=64,
    max_position_embeddings=64,
)
hf("albert", "AlbertConfig", "AlbertModel", tokens(mask=True), embedding_size=16, **ENC)
hf(
    "electra",
    "ElectraConfig",
    "ElectraForPreTraining",
    tokens(mask=True),
    embedding_size=16,
    **ENC,
)
hf("deberta_v2", "DebertaV2Config", "DebertaV2Model", tokens(mask=True), **ENC)
hf(
    "modernbert",
    "ModernBertConfig",
    "ModernBertModel",
    tokens(mask=True),
    vocab_size=VOCAB,
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    global_attn_every_n_layers=2,
    local_attention=8,
    pad_token_id=0,
)
DECODER_IDS = {"decoder_input_ids": lambda b: torch.randint(3, VOCAB, (b, 7), generator=_gen(b))}
hf(
    "t5",
    "T5Config",
    "T5ForConditionalGeneration",
    tokens(**DECODER_IDS),
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    use_cache=False,
)
hf(
    "bart",
    "BartConfig",
    "BartForConditionalGeneration",
    tokens(**DECODER_IDS),
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    use_cache=False,
)
hf(
    "switch_moe",
    "SwitchTransformersConfig",
    "SwitchTransformersForConditionalGeneration",
    # with an attention_mask: without one, transformers 5.25's SwitchTransformers builds its
    # mask only when not compiling and subscripts None under torch.export (a model bug)
    tokens(mask=True, **DECODER_IDS),
    expect="expert capacity depends on the tokens in the batch: a clear error or exact",
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    num_experts=4,
    encoder_sparse_step=1,
    decoder_sparse_step=1,
    expert_capacity=4,
    use_cache=False,
)
hf(
    "whisper",
    "WhisperConfig",
    "WhisperForConditionalGeneration",
    lambda b: (
        (),
        {"input_features": features(16, 64)(b)[0][0], **{k: f(b) for k, f in DECODER_IDS.items()}},
    ),
    vocab_size=VOCAB,
    num_mel_bins=16,
    encoder_layers=2,
    decoder_layers=2,
    d_model=32,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_source_positions=32,
    max_target_positions=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
    use_cache=False,
)
hf(
    "wav2vec2",
    "Wav2Vec2Config",
    "Wav2Vec2Model",
    features(800),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16),
    conv_kernel=(10, 3),
    conv_stride=(5, 2),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    feat_extract_norm="group",
)
VIT = dict(
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)
hf("vit", "ViTConfig", "ViTForImageClassification", image(32), num_labels=5, **VIT)
CLIP_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=32,
    eos_token_id=2,
)
hf("clip_text", "CLIPTextConfig", "CLIPTextModel", tokens(), **CLIP_TEXT)


def _clip_inputs(batch: int) -> Inputs:
    _, kwargs = tokens()(batch)
    kwargs["pixel_values"] = image(32)(batch)[0][0]
    return (), kwargs


def _clip() -> nn.Module:
    tf = _tf()
    vision = dict(VIT)
    vision.pop("num_channels")
    config = tf.CLIPConfig(text_config=CLIP_TEXT, vision_config=vision, projection_dim=16)
    return tf.CLIPModel(config)


add(
    Entry(
        "hf_clip",
        "hf",
        _clip,
        _clip_inputs,
        "transformers",
        expect="logits_per_image is (B, B), it reads across rows: a clear error (chunks=1)",
    )
)


# -- hand-written traps --------------------------------------------------------------------


def trap(name: str, inputs: Callable[[int], Inputs], expect: str, **kw: Any):
    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        add(Entry(f"trap_{name}", "trap", cls, inputs, expect=expect, **kw))
        return cls

    return deco


D = 16


def mlp(d: int = D) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))


@trap("cls_expand", features(8, D), "exact (cls_token.expand(B, -1, -1))")
class ClsExpand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.a, self.b, self.c = mlp(), mlp(), nn.Linear(D, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.a(x)], dim=1)
        h = self.b(h)
        return self.c(h[:, 0] + h[:, 1:].mean(1))


@trap("pos_embed", features(8, D), "exact ((1, L, D) parameter added to (B, L, D))")
class PosEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 8, D))
        self.a, self.b, self.c = mlp(), mlp(), mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) + self.pos
        h = self.b(h) + self.pos  # read again further down: by two stages
        return self.c(h)


@trap("aliased_param", features(D), "exact (one Parameter under two names)")
class AliasedParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(D, D) / 4)
        self.w_out = self.w_in
        self.a, self.b = mlp(), mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x @ self.w_in)
        return self.b(h) @ self.w_out.t()


@trap("inplace_view", features(D), "exact (h[:, :4] += 1; h.relu_())")
class InplaceView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = mlp(), mlp(), mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        before = h.sum(-1, keepdim=True)  # read before the mutation (saves nothing of h)
        g = self.b(x)
        h[:, :4] += 1  # through a view
        h.relu_()
        return self.c(g) + h + before


@trap("identity_relu_inplace", features(D), "exact (nn.Identity then ReLU(inplace=True))")
class IdentityReluInplace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = mlp(), mlp(), mlp()
        self.ident, self.relu = nn.Identity(), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        k = self.b(x)
        r = self.relu(self.ident(h))  # rewrites h itself
        return self.c(k) + r + h


@trap("contrastive", features(D), "(B, B) similarity: a clear error (chunks=1)")
class Contrastive(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img, self.txt = mlp(), mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = nn.functional.normalize(self.img(x), dim=-1)
        b = nn.functional.normalize(self.txt(x), dim=-1)
        return a @ b.t() / 0.07


@trap(
    "batchnorm_train",
    features(D),
    "BatchNorm in training: per-micro-batch statistics (GPipe), with a warning",
    train=True,
    batches=(8, 12),
)
class BatchNormTrain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = mlp(), nn.BatchNorm1d(D), mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.bn(self.a(x)))


@trap(
    "batchnorm_train_deferred",
    features(D),
    "deferred_batch_norm=True: running statistics exact; outputs per micro-batch (GPipe)",
    train=True,
    options={"deferred_batch_norm": True},
    batches=(8, 12),
)
class BatchNormTrainDeferred(BatchNormTrain):
    pass


@trap("step_counter", features(D), "buffer += 1 per call: once per micro-batch, with a warning")
class StepCounter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = mlp(), mlp()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        return self.b(self.a(x))


@trap("meta_submodule", features(D), "a submodule named meta (GraphModule.meta): exact")
class MetaSubmodule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.meta, self.b, self.c = mlp(), mlp(), mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.meta(x)))


@trap("batch_size_branch", features(D), "if x.shape[0] > 2: a clear error")
class BatchSizeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = mlp(), mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if x.shape[0] > 2:
            h = h * 2
        return self.b(h)


@trap("mha_unused_weights", features(8, D), "exact (attention weights returned, unused)")
class MhaUnusedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = mlp()
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.b = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        out, _weights = self.attn(h, h, h)
        return self.b(out + h)


def _gpt2_labels_inputs(batch: int) -> Inputs:
    _, kwargs = tokens()(batch)
    labels = kwargs["input_ids"].clone()
    labels[0, 5:] = -100
    kwargs["labels"] = labels
    return (), kwargs


def _gpt2() -> nn.Module:
    tf = _tf()
    config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, **TEXT)
    return tf.GPT2LMHeadModel(config)


add(
    Entry(
        "trap_gpt2_labels_ignored",
        "trap",
        _gpt2,
        _gpt2_labels_inputs,
        "transformers",
        options={"reducer": "mean"},
        expect="token-level loss, labels -100, reducer=mean: a warning (rows, not tokens)",
    )
)


def _token_mean() -> Any:
    from runtime import token_mean

    return token_mean("labels", shift=1)  # GPT-2 predicts token t + 1 at position t


add(
    Entry(
        "trap_gpt2_labels_token_mean",
        "trap",
        _gpt2,
        _gpt2_labels_inputs,
        "transformers",
        options={"reducer": _token_mean()},
        expect="the same loss with reducer=token_mean(shift=1): exact",
    )
)


@trap("shared_module_twice", features(D), "exact (one Linear called at two depths)")
class SharedModuleTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared, self.a, self.b = nn.Linear(D, D), mlp(), mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(self.shared(x))
        return self.shared(self.b(h))


@trap("no_grad_block", features(D), "exact: no gradient through the no_grad block")
class NoGradBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.gate, self.b = mlp(), nn.Linear(D, D), mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        with torch.no_grad():
            g = torch.sigmoid(self.gate(h))
        return self.b(h * g)


@trap(
    "inplace_input", features(D), "the caller's input mutated as unsplit, exact", input_grad=False
)
class InplaceInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = mlp(), mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x.clone())  # (a Linear that read x itself would save it for backward)
        x.mul_(2)
        return self.b(h) + x


@trap("batch_statistic", features(D), "x - x.mean(0): reads across rows: a clear error")
class BatchStatistic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = mlp(), mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h - h.mean(0, keepdim=True))


@trap("data_dependent_branch", features(D), "if h.sum() > 0: a clear TraceError or exact")
class DataDependentBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = mlp(), mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            h = -h
        return self.b(h)


@trap("lstm", features(8, D), "exact (nn.LSTM, tuple output with state)")
class Lstm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = mlp()
        self.lstm = nn.LSTM(D, D, num_layers=2, batch_first=True)
        self.b = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (_h, _c) = self.lstm(self.a(x))
        return self.b(out)


@trap("dict_output_int", features(D), "exact (dict with an int argmax and a None)")
class DictOutputInt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = mlp(), nn.Linear(D, 5)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        logits = self.b(self.a(x))
        return {"logits": logits, "pred": logits.argmax(-1), "extra": None}


@trap(
    "param_cache",
    features(D),
    "timm LeViT's eval-mode cache of a tensor computed from a parameter: planning leaves the "
    "cache as it was, exact",
)
class ParamCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = mlp(), mlp()
        self.bias = nn.Parameter(torch.randn(D))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.b(self.a(x) + self.bias * 2)
        if str(x.device) not in self.cache:
            self.cache[str(x.device)] = self.bias * 2
        return self.b(self.a(x) + self.cache[str(x.device)])


BY_NAME = {e.name: e for e in ENTRIES}
QUICK = [
    "tv_resnet18",
    "tv_mobilenet_v3_small",
    "timm_vit_tiny_patch16_224",
    "timm_convnext_atto",
    "hf_gpt2",
    "hf_bert",
    "hf_mixtral_moe",
    "trap_cls_expand",
    "trap_inplace_view",
    "trap_contrastive",
]
assert len(BY_NAME) == len(ENTRIES), "duplicate names"
assert all(n in BY_NAME for n in QUICK)
