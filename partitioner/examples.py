"""Example models shared by the quickstart, tests and benchmarks (plain torch only).

Every model has a module-level factory taking keyword arguments, so the CLI can
load ``modelsplit.examples:mlp`` and pass ``width=512``; `example_input` makes a
matching example call ``(args, kwargs)``. Factories are deterministic: weights
depend only on ``seed``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GPT",
    "MLP",
    "MODELS",
    "DataDependent",
    "Gate",
    "MyModel",
    "ResNet50Like",
    "SMALL",
    "ResidualCNN",
    "ShapeDependent",
    "TwoInputDict",
    "data_dependent",
    "example_input",
    "gpt",
    "mlp",
    "my_model",
    "resnet50",
    "residual_cnn",
    "shape_dependent",
    "small",
    "two_input_dict",
]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Initialise under a fixed seed without touching the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class MyModel(nn.Module):
    """The seed example: (N, 64) -> (N, 10) through Linear+ReLU layers."""

    def __init__(self, hidden: int = 256, depth: int = 6, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            sizes = [64] + [hidden] * depth
            layers: list[nn.Module] = []
            for a, b in zip(sizes, sizes[1:], strict=False):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(sizes[-1], 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class MLP(nn.Module):
    """``depth`` Linear(width, width)+GELU layers: (N, width) -> (N, width)."""

    def __init__(self, width: int = 1024, depth: int = 8, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return x


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class ResidualCNN(nn.Module):
    """A stem, ``blocks`` residual blocks, global pooling: (N, 3, H, W) -> (N, classes)."""

    def __init__(
        self, channels: int = 32, blocks: int = 4, num_classes: int = 10, seed: int = 0
    ) -> None:
        super().__init__()
        with _seeded(seed):
            self.stem = nn.Sequential(
                nn.Conv2d(3, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            )
            self.blocks = nn.Sequential(*(_ResBlock(channels) for _ in range(blocks)))
            self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-style decoder: token ids (N, T) -> logits (N, T, vocab); LM head tied to
    the token embedding."""

    def __init__(
        self,
        vocab: int = 512,
        dim: int = 128,
        layers: int = 4,
        heads: int = 4,
        max_len: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        with _seeded(seed):
            self.tok = nn.Embedding(vocab, dim)
            self.pos = nn.Embedding(max_len, dim)
            self.blocks = nn.Sequential(*(_Block(dim, heads) for _ in range(layers)))
            self.ln = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        return self.head(self.ln(self.blocks(x)))


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.down(x))


class ResNet50Like(nn.Module):
    """ResNet-50's layout ([3, 4, 6, 3] bottlenecks) with a configurable base width."""

    def __init__(
        self,
        width: int = 64,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        num_classes: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        with _seeded(seed):
            self.stem = nn.Sequential(
                nn.Conv2d(3, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
            stages: list[nn.Module] = []
            cin = width
            for i, n in enumerate(layers):
                w = width * 2**i
                blocks = [
                    _Bottleneck(cin if j == 0 else 4 * w, w, 2 if i and not j else 1)
                    for j in range(n)
                ]
                stages.append(nn.Sequential(*blocks))
                cin = 4 * w
            self.stages = nn.Sequential(*stages)
            self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TwoInputDict(nn.Module):
    """Two positional tensors and keyword arguments in, a dict out."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            self.a = nn.Linear(dim, dim)
            self.b = nn.Linear(dim, dim)
            self.mix = nn.Linear(2 * dim, dim)

    def forward(
        self, x: Tensor, y: Tensor, *, scale: float = 1.0, bias: Tensor | None = None
    ) -> dict[str, Tensor]:
        h = torch.relu(self.a(x)) * scale
        g = torch.tanh(self.b(y))
        out = self.mix(torch.cat([h, g], dim=-1))
        if bias is not None:
            out = out + bias
        return {"out": out, "gate": g}


class Gate(nn.Module):
    """Branches on the values of its input: no tracer can capture both paths."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, dim)
        self.down = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.mean() > 0:
            return self.up(x)
        return self.down(x)


class DataDependent(nn.Module):
    """Data-dependent control flow inside a submodule: trace with ``leaf_modules=[Gate]``."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            self.inp = nn.Linear(dim, dim)
            self.gate = Gate(dim)
            self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.gate(torch.relu(self.inp(x))))


class ShapeDependent(nn.Module):
    """Branches on a shape: symbolic tracing fails, torch.export captures it."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            self.a = nn.Linear(dim, dim)
            self.b = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] > 16:
            return self.b(torch.relu(self.a(x)))
        return self.a(x)


def my_model(hidden: int = 256, depth: int = 6, seed: int = 0) -> MyModel:
    return MyModel(hidden, depth, seed)


def mlp(width: int = 1024, depth: int = 8, seed: int = 0) -> MLP:
    return MLP(width, depth, seed)


def residual_cnn(channels: int = 32, blocks: int = 4, num_classes: int = 10) -> ResidualCNN:
    return ResidualCNN(channels, blocks, num_classes).eval()


def gpt(
    vocab: int = 512, dim: int = 128, layers: int = 4, heads: int = 4, max_len: int = 128
) -> GPT:
    return GPT(vocab, dim, layers, heads, max_len)


def resnet50(width: int = 64, num_classes: int = 1000) -> ResNet50Like:
    return ResNet50Like(width, num_classes=num_classes).eval()


def two_input_dict(dim: int = 32) -> TwoInputDict:
    return TwoInputDict(dim)


def data_dependent(dim: int = 32) -> DataDependent:
    return DataDependent(dim)


def shape_dependent(dim: int = 32) -> ShapeDependent:
    return ShapeDependent(dim)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "my_model": my_model,
    "mlp": mlp,
    "residual_cnn": residual_cnn,
    "gpt": gpt,
    "resnet50": resnet50,
    "two_input_dict": two_input_dict,
    "data_dependent": data_dependent,
    "shape_dependent": shape_dependent,
}


def example_input(
    name: str, batch: int = 8, *, seed: int = 0, **config: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An example call ``(args, kwargs)`` for ``MODELS[name](**config)`` at ``batch`` rows.

    ``config`` takes the factory's size arguments (``width``, ``dim``, ``vocab``...)
    and, for image models, ``size`` (pixels) and for GPT ``seq`` (tokens).
    """
    g = torch.Generator().manual_seed(seed)
    if name == "my_model":
        return (torch.randn(batch, 64, generator=g),), {}
    if name == "mlp":
        return (torch.randn(batch, config.get("width", 1024), generator=g),), {}
    if name in ("residual_cnn", "resnet50"):
        size = config.get("size", 32 if name == "residual_cnn" else 224)
        return (torch.randn(batch, 3, size, size, generator=g),), {}
    if name == "gpt":
        seq = config.get("seq", 64)
        return (torch.randint(0, config.get("vocab", 512), (batch, seq), generator=g),), {}
    if name == "two_input_dict":
        dim = config.get("dim", 32)
        x, y, bias = (torch.randn(batch, dim, generator=g) for _ in range(3))
        return (x, y), {"scale": 0.5, "bias": bias}
    if name in ("data_dependent", "shape_dependent"):
        return (torch.randn(batch, config.get("dim", 32), generator=g),), {}
    raise KeyError(f"unknown example model {name!r}; choose from {sorted(MODELS)}")


# Test-sized configurations: every model traces and profiles in well under a second.
SMALL: dict[str, dict[str, Any]] = {
    "my_model": {"hidden": 32, "depth": 3},
    "mlp": {"width": 32, "depth": 3},
    "residual_cnn": {"channels": 8, "blocks": 2},
    "gpt": {"vocab": 64, "dim": 32, "layers": 2, "heads": 2, "max_len": 32},
    "resnet50": {"width": 4, "num_classes": 10},
    "two_input_dict": {"dim": 16},
    "data_dependent": {"dim": 16},
    "shape_dependent": {"dim": 32},
}
SMALL_INPUT: dict[str, dict[str, Any]] = {
    "residual_cnn": {"size": 16},
    "resnet50": {"size": 32},
    "gpt": {"seq": 16},
}


def small(
    name: str, batch: int = 4, seed: int = 0
) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    """A test-sized model and an example call for it: ``(model, args, kwargs)``."""
    config = SMALL[name]
    shape = {k: v for k, v in config.items() if k in ("width", "dim", "vocab")}
    args, kwargs = example_input(name, batch, seed=seed, **shape, **SMALL_INPUT.get(name, {}))
    return MODELS[name](**config), args, kwargs
