r"""Normalizing flows over neuron vectors: the map :math:`\nu` of Anokhin & Yarotsky's flow connections.

A :class:`NeuronFlow` is an invertible map :math:`\nu: \mathbb{R}^d \to \mathbb{R}^d` with a tractable
log-determinant, built as

.. math:: \nu = f_K \circ \dots \circ f_1 \circ s, \qquad s(x) = (x - m) / \sigma,

where :math:`s` standardises each coordinate with the zoo's mean and standard deviation (fixed, not
trained) and each :math:`f_k` is an affine layer of one of two kinds:

* ``"realnvp"`` (Dinh et al. 2017, affine coupling): a fixed mask :math:`b \in \{0, 1\}^d` keeps half the
  coordinates; the others get :math:`y = x \odot e^{s(b \odot x)} + t(b \odot x)`. Both directions are
  one pass; :math:`\log|\det J| = \sum_i (1 - b_i)\, s_i`.
* ``"iaf"`` (Kingma et al. 2016, inverse autoregressive flow): the coordinates are split into
  ``n_blocks`` blocks in a fixed random order and a MADE network gives block :math:`j`'s scale and shift
  from the blocks before it. As in IAF the *sampling* direction :math:`\nu^{-1}` (Gaussian to neurons) is
  one pass, :math:`x = z \odot e^{s(z_{<})} + t(z_{<})`; the density direction :math:`\nu` solves block
  by block (``n_blocks`` passes). Blockwise autoregression keeps that inverse affordable at
  :math:`d \approx 800`.

Scales are :math:`s = 2\tanh(\cdot / 2)` (bounded, so neither direction overflows) and every layer
starts as the identity (zero-initialised output layer). Parameters are initialised from a
:class:`torch.Generator`; nothing draws from the global RNG.

References: L. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
D. P. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever, M. Welling, "Improved Variational
Inference with Inverse Autoregressive Flow", NeurIPS 2016. M. Germain, K. Gregor, I. Murray,
H. Larochelle, "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._common import check_int
from .._errors import RebasinError

__all__ = ["NeuronFlow", "FLOW_KINDS"]

FLOW_KINDS = ("realnvp", "iaf")


def _scale(raw: Tensor) -> Tensor:
    return 2.0 * torch.tanh(0.5 * raw)


class _MaskedMLP(nn.Module):
    """``x -> W3 relu(W2 relu(W1 x))`` with fixed 0/1 masks on the weights; the last layer starts at 0."""

    def __init__(self, masks: list[Tensor], generator: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for k, m in enumerate(masks):
            out_f, in_f = m.shape
            w = torch.empty(out_f, in_f, dtype=dtype)
            if k == len(masks) - 1:
                w.zero_()
            else:
                bound = 1.0 / math.sqrt(max(int(m.sum(1).float().mean().item()), 1))
                w.uniform_(-bound, bound, generator=generator)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(out_f, dtype=dtype)))
            self.register_buffer(f"mask{k}", m.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        n = len(self.weights)
        for k in range(n):
            x = F.linear(x, self.weights[k] * getattr(self, f"mask{k}"), self.biases[k])
            if k < n - 1:
                x = F.relu(x)
        return x


class _Coupling(nn.Module):
    """RealNVP affine coupling: coordinates with ``keep == 1`` condition the others."""

    def __init__(self, keep: Tensor, hidden: int, generator: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        d = keep.numel()
        self.register_buffer("keep", keep.to(dtype))
        ones = torch.ones
        self.net = _MaskedMLP([ones(hidden, d), ones(hidden, hidden), ones(2 * d, hidden)], generator, dtype)

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raw_s, t = self.net(x * self.keep).chunk(2, dim=-1)  # type: ignore[operator]  # nn.Module attributes are typed Tensor | Module
        free = 1.0 - self.keep  # type: ignore[operator]  # nn.Module attributes are typed Tensor | Module
        return _scale(raw_s) * free, t * free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._params(x)
        return x * torch.exp(s) + t, s.sum(-1)

    def inverse(self, y: Tensor) -> Tensor:
        s, t = self._params(y)  # the kept coordinates are unchanged, so the same parameters
        return (y - t) * torch.exp(-s)


class _Autoregressive(nn.Module):
    """IAF layer with block degrees: ``x = z * exp(s(z_<)) + t(z_<)`` from Gaussian side to neuron side."""

    def __init__(self, degree: Tensor, n_blocks: int, hidden: int, generator: torch.Generator,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.n_blocks = n_blocks
        self.register_buffer("degree", degree)
        hid = torch.arange(hidden) % max(n_blocks - 1, 1)
        m1 = (hid[:, None] >= degree[None, :]).to(dtype)  # hidden unit of degree k sees blocks <= k
        m2 = (hid[:, None] >= hid[None, :]).to(dtype)
        out = torch.cat([degree, degree])
        m3 = (out[:, None] > hid[None, :]).to(dtype)  # block j sees hidden units of degree < j
        self.net = _MaskedMLP([m1, m2, m3], generator, dtype)

    def _params(self, z: Tensor) -> tuple[Tensor, Tensor]:
        raw_s, t = self.net(z).chunk(2, dim=-1)
        return _scale(raw_s), t

    def sample_direction(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)`` in one pass."""
        s, t = self._params(z)
        return z * torch.exp(s) + t, s.sum(-1)

    def density_direction(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log|det dz/dx|)``: block ``j`` of ``z`` needs blocks ``< j``, so ``n_blocks`` passes."""
        z = torch.zeros_like(x)
        for j in range(self.n_blocks):
            s, t = self._params(z)
            sel = self.degree == j
            z = torch.where(sel, (x - t) * torch.exp(-s), z)  # type: ignore[arg-type]  # sel is a bool tensor; torch types the comparison as Tensor | bool
        s, _ = self._params(z)
        return z, -s.sum(-1)


class NeuronFlow(nn.Module):
    r"""An invertible map :math:`\nu` from neuron vectors (rows of shape ``(d,)``) to a standard Gaussian.

    Parameters
    ----------
    dim
        :math:`d`, the length of one neuron vector.
    kind
        ``"realnvp"`` (affine coupling layers) or ``"iaf"`` (blockwise inverse autoregressive layers).
    n_layers
        Number of affine layers :math:`K`.
    hidden
        Width of each layer's conditioner MLP (two hidden layers).
    n_blocks
        Autoregressive blocks per IAF layer (``"iaf"`` only; the density direction costs that many passes).
    mean, std
        Per-coordinate standardisation :math:`s(x) = (x - m)/\sigma`, shape ``(d,)``; default 0 and 1.
    seed
        Seeds the masks, the block order and the initial weights (a private :class:`torch.Generator`).
    dtype
        Parameter dtype.

    Examples
    --------
    >>> import torch
    >>> flow = NeuronFlow(6, kind="realnvp", n_layers=2, hidden=8, seed=0)
    >>> x = torch.randn(5, 6, dtype=torch.float64)
    >>> z, logdet = flow(x)
    >>> torch.allclose(flow.inverse(z), x)
    True
    """

    def __init__(
        self,
        dim: int,
        *,
        kind: str = "realnvp",
        n_layers: int = 4,
        hidden: int = 64,
        n_blocks: int = 8,
        mean: Tensor | None = None,
        std: Tensor | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if kind not in FLOW_KINDS:
            raise RebasinError(f"unknown flow kind {kind!r}; valid kinds: {list(FLOW_KINDS)}")
        dim = check_int(dim, "dim", 2)
        check_int(n_layers, "n_layers")
        check_int(hidden, "hidden")
        check_int(n_blocks, "n_blocks", 2)
        self.kind, self.dim = kind, dim
        mean = torch.zeros(dim, dtype=dtype) if mean is None else mean.detach().to(dtype).reshape(-1)
        std = torch.ones(dim, dtype=dtype) if std is None else std.detach().to(dtype).reshape(-1)
        if mean.numel() != dim or std.numel() != dim:
            raise RebasinError(f"mean and std must have {dim} entries, got {mean.numel()} and {std.numel()}")
        if not bool((std > 0).all()) or not bool(torch.isfinite(mean).all() & torch.isfinite(std).all()):
            raise RebasinError("std must be positive and finite, mean finite")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        g = torch.Generator().manual_seed(int(seed))
        layers: list[nn.Module] = []
        for _k in range(n_layers):
            if kind == "realnvp":
                keep = torch.zeros(dim)
                keep[torch.randperm(dim, generator=g)[: dim // 2]] = 1.0
                layers.append(_Coupling(keep, hidden, g, dtype))
            else:
                blocks = min(n_blocks, dim)
                degree = torch.empty(dim, dtype=torch.long)
                degree[torch.randperm(dim, generator=g)] = torch.arange(dim) % blocks
                layers.append(_Autoregressive(degree, blocks, hidden, g, dtype))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(z, log|det dz/dx|)`` = :math:`\nu(x)` and its log-Jacobian, per row. Shapes ``(n, d)``, ``(n,)``."""
        z = (x.to(self.mean.dtype) - self.mean) / self.std  # type: ignore[arg-type, operator]  # nn.Module attributes are typed Tensor | Module
        logdet = -torch.log(self.std).sum().expand(z.shape[:-1]).clone()  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
        for layer in self.layers:
            if isinstance(layer, _Coupling):
                z, ld = layer(z)
            else:
                z, ld = layer.density_direction(z)  # type: ignore[operator]  # nn.Module attributes are typed Tensor | Module
            logdet = logdet + ld
        return z, logdet

    def inverse(self, z: Tensor) -> Tensor:
        r""":math:`\nu^{-1}(z)`, shape ``(n, d)``."""
        x = z.to(self.mean.dtype)  # type: ignore[arg-type]  # nn.Module attributes are typed Tensor | Module
        for layer in reversed(self.layers):
            if isinstance(layer, _Coupling):
                x = layer.inverse(x)
            else:
                x, _ = layer.sample_direction(x)  # type: ignore[operator]  # nn.Module attributes are typed Tensor | Module
        return x * self.std + self.mean  # type: ignore[operator]  # nn.Module attributes are typed Tensor | Module

    def log_prob(self, x: Tensor) -> Tensor:
        r"""Log-density of each row under the flow: :math:`\log N(\nu(x); 0, I) + \log|\det J_\nu(x)|`."""
        z, logdet = self(x)
        return -0.5 * (z * z).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi) + logdet

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, dim={self.dim}, n_layers={len(self.layers)}"
