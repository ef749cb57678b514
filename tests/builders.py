"""Small models and data shared by the tests (importable as ``builders``: pyproject puts tests/ on sys.path).

Every builder is deterministic: pass ``seed=`` to seed the model's initialisation, and data always comes
from its own ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(
    in_features: int, hidden: Sequence[int], out_features: int, *, bn: bool = False, seed: int | None = None
) -> nn.Sequential:
    """``Linear -> [BatchNorm1d] -> ReLU`` per hidden width, then a final ``Linear``.

    With ``seed`` the global torch RNG is seeded first (as the tests' own factories did), otherwise the
    model draws from the current global stream.
    """
    if seed is not None:
        torch.manual_seed(seed)
    widths = [in_features, *hidden]
    layers: list[nn.Module] = []
    for i in range(len(hidden)):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if bn:
            layers.append(nn.BatchNorm1d(widths[i + 1]))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(widths[-1], out_features))
    return nn.Sequential(*layers)


def batches(
    shape: tuple[int, ...],
    n: int,
    batch: int,
    *,
    seed: int = 0,
    scale: float = 1.0,
    shift: float = 0.0,
    classes: int = 3,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` Gaussian inputs of ``shape`` (times ``scale`` plus ``shift``) with uniform random class labels,
    cut into batches of ``batch``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g) * scale + shift
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
