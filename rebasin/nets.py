"""Small reference networks: public, shared by the applications and ``continual``.

(:class:`MLP` moved here from ``rebasin.apps.models``, which re-exports it, so that ``continual`` needs
public ``rebasin`` only.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ._errors import RebasinError

__all__ = ["MLP"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
_NORMS = (None, "layernorm", "batchnorm")


class MLP(nn.Module):
    """Multi-layer perceptron: ``[Linear -> norm -> activation -> dropout] * len(hidden) -> Linear``.

    The input is flattened from axis 1 (so ``(N, 1, 28, 28)`` images work with ``in_features=784``).
    Parameters live in ``self.layers`` (an ``nn.Sequential``).

    Parameters
    ----------
    in_features, hidden, out_features
        Input width, hidden widths, output width.
    activation
        ``"relu"``, ``"gelu"`` or ``"tanh"``.
    norm
        ``None``, ``"layernorm"`` or ``"batchnorm"`` after each hidden Linear.
    dropout
        Dropout probability after each activation (0 = no dropout layer).

    Examples
    --------
    >>> model = MLP(784, [256], 10)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        *,
        activation: Literal["relu", "gelu", "tanh"] = "relu",
        norm: Literal["layernorm", "batchnorm"] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value, options in (("activation", activation, list(_ACTIVATIONS)), ("norm", norm, list(_NORMS))):
            if value not in options:
                raise RebasinError(f"{name}={value!r} is not one of {options}")
        if not 0.0 <= dropout < 1.0:
            raise RebasinError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        prev = int(in_features)
        for h in hidden:
            layers.append(nn.Linear(prev, int(h)))
            if norm == "layernorm":
                layers.append(nn.LayerNorm(int(h)))
            elif norm == "batchnorm":
                layers.append(nn.BatchNorm1d(int(h)))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = int(h)
        layers.append(nn.Linear(prev, int(out_features)))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, *) -> (N, out_features)``."""
        return self.layers(torch.flatten(x, 1))
