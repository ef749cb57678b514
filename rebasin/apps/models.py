"""A small zoo of public models used by the demos, benchmarks and tests.

All of them trace with :func:`rebasin.spec_from_model`. They are seeded only by the caller
(``torch.manual_seed`` before construction) and keep their structure plain: ``nn.Sequential``
stacks, residual blocks with an explicit ``+``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import RebasinError
from ..nets import MLP

__all__ = ["MLP", "VGG", "VGG_CONFIGS", "ResNet20", "SmallCNN", "ChannelLayerNorm", "ViT"]

#: Standard VGG layer configurations (channel counts, ``"M"`` = 2x2 max-pool).
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _choice(name: str, value: object, options: Sequence[object]) -> None:
    if value not in options:
        raise RebasinError(f"{name}={value!r} is not one of {list(options)}")


def _scaled(c: int, width: float) -> int:
    if width <= 0:
        raise RebasinError(f"width must be positive, got {width}")
    return max(1, int(round(c * width)))


class VGG(nn.Module):
    """VGG-style network: ``[Conv3x3 -> (BN) -> ReLU | MaxPool2d]*`` then a classifier.

    Parameters
    ----------
    cfg
        Channel counts and ``"M"`` (2x2 max-pool), e.g. ``VGG_CONFIGS["vgg11"]``.
    in_channels, num_classes
        Input channels and number of classes.
    batch_norm
        BatchNorm2d after every convolution.
    width
        Multiplier of every channel count (rounded, at least 1).
    image_size
        Input height = width; needed to size the Flatten -> Linear classifier.
    head
        ``"flatten"``: Flatten the ``C x H x W`` map into the first Linear (channel-major blocks);
        ``"avgpool"``: AdaptiveAvgPool2d(1) -> Flatten -> Linear.
    classifier_hidden
        Hidden widths of the classifier (``Linear -> ReLU`` each) before the output Linear.

    Examples
    --------
    >>> model = VGG([8, "M", 16, "M"], image_size=8)
    >>> model(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        batch_norm: bool = False,
        width: float = 1,
        image_size: int = 32,
        head: Literal["flatten", "avgpool"] = "flatten",
        classifier_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__()
        _choice("head", head, ["flatten", "avgpool"])
        layers: list[nn.Module] = []
        c, size = int(in_channels), int(image_size)
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
                if size < 1:
                    raise RebasinError(f"image_size={image_size} is too small for {list(cfg).count('M')} max-pools")
                continue
            if isinstance(v, str) or int(v) < 1:
                raise RebasinError(f"cfg entries must be positive channel counts or 'M', got {v!r}")
            out = _scaled(int(v), width)
            layers.append(nn.Conv2d(c, out, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            c = out
        self.features = nn.Sequential(*layers)
        head_layers: list[nn.Module] = []
        if head == "avgpool":
            head_layers.append(nn.AdaptiveAvgPool2d(1))
            flat = c
        else:
            flat = c * size * size
        head_layers.append(nn.Flatten())
        for h in classifier_hidden:
            head_layers += [nn.Linear(flat, int(h)), nn.ReLU()]
            flat = int(h)
        head_layers.append(nn.Linear(flat, int(num_classes)))
        self.classifier = nn.Sequential(*head_layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, image_size, image_size) -> (N, num_classes)``."""
        return self.classifier(self.features(x))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an ``(N, C, H, W)`` map (NCHW -> NHWC -> LayerNorm(C) -> NCHW)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, C, H, W)``."""
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return ChannelLayerNorm(channels)
    return nn.GroupNorm(1, channels)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, shortcut_kernel: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm2d(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm2d(norm, cout)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, shortcut_kernel, stride=stride, padding=shortcut_kernel // 2, bias=False),
                _norm2d(norm, cout),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20: stem, 3 stages x 3 basic blocks (16/32/64 x width channels), pool, Linear.

    Identity shortcuts within a stage; at a stage change a projection shortcut (conv with
    ``shortcut_kernel`` and stride 2, then a norm).

    Parameters
    ----------
    width
        Channel multiplier (channels ``round(16 * width)`` etc.).
    num_classes, in_channels
        Output classes and input channels.
    norm
        ``"batchnorm"``, ``"layernorm"`` (LayerNorm over channels, :class:`ChannelLayerNorm`) or
        ``"groupnorm1"`` (``GroupNorm(1, C)``).
    shortcut_kernel
        1 or 3: kernel of the projection shortcut conv.

    Examples
    --------
    >>> model = ResNet20(width=0.25)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        width: float = 1,
        num_classes: int = 10,
        norm: Literal["batchnorm", "layernorm", "groupnorm1"] = "batchnorm",
        shortcut_kernel: Literal[1, 3] = 1,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        _choice("norm", norm, ["batchnorm", "layernorm", "groupnorm1"])
        _choice("shortcut_kernel", shortcut_kernel, [1, 3])
        widths = [_scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(int(in_channels), widths[0], 3, padding=1, bias=False)
        self.norm1 = _norm2d(norm, widths[0])
        stages: list[nn.Module] = []
        cin = widths[0]
        for s, cout in enumerate(widths):
            blocks = [_BasicBlock(cin if b == 0 else cout, cout, 2 if (s > 0 and b == 0) else 1, norm,
                                  shortcut_kernel) for b in range(3)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], int(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W) -> (N, num_classes)``."""
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallCNN(nn.Module):
    """Three ``Conv3x3 -> (BN) -> ReLU`` layers (max-pool after the first two), global pool, Linear.

    Examples
    --------
    >>> model = SmallCNN(channels=(8, 16, 16))
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64, 64),
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) != 3:
            raise RebasinError(f"SmallCNN takes exactly 3 channel counts, got {tuple(channels)}")
        layers: list[nn.Module] = []
        c = int(in_channels)
        for i, out in enumerate(int(v) for v in channels):
            layers.append(nn.Conv2d(c, out, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, int(num_classes)))

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W) -> (N, num_classes)``."""
        return self.head(self.features(x))


class _ViTBlock(nn.Module):
    """Pre-norm encoder block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``; attention written out with heads."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, mlp_ratio * width), nn.Linear(mlp_ratio * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q = q.view(b, n, self.heads, c // self.heads).transpose(1, 2)
        k = k.view(b, n, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, n, self.heads, c // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """A small Vision Transformer: patch embedding, cls token, learned positional embedding, pre-norm blocks.

    Attention is written with ``split`` / ``view`` / ``transpose`` and
    :func:`torch.nn.functional.scaled_dot_product_attention`, so :func:`rebasin.spec_from_model` finds the
    residual-stream permutation, the head permutation and the permutations inside each head.

    Parameters
    ----------
    image_size, patch_size, in_channels, num_classes
        Input ``(N, in_channels, image_size, image_size)``; ``patch_size`` must divide ``image_size``.
    width, depth, heads, mlp_ratio
        Embedding width (divisible by ``heads``), number of blocks, attention heads, MLP hidden width
        as a multiple of ``width``.

    Examples
    --------
    >>> import torch
    >>> model = ViT(image_size=28, patch_size=7, width=32, depth=1, heads=4)
    >>> tuple(model(torch.randn(2, 1, 28, 28)).shape)
    (2, 10)
    """

    def __init__(self, image_size: int = 28, patch_size: int = 7, in_channels: int = 1, num_classes: int = 10,
                 width: int = 64, depth: int = 3, heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        if image_size % patch_size:
            raise RebasinError(f"patch_size={patch_size} must divide image_size={image_size}")
        if width % heads:
            raise RebasinError(f"width={width} must be divisible by heads={heads}")
        n = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, width))
        self.blocks = nn.Sequential(*[_ViTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])
