"""Linear CKA between two models' representations (Kornblith et al., ICML 2019), streamed in float64."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._common import (
    check_int,
    find_logits,
    forward_with_state,
    resolve_device,
    split_batch,
    state_of,
    to_device,
)
from .._distributed import Reducer, fingerprint, guarded, reducer
from .._errors import RebasinError

__all__ = ["cka"]

State = Mapping[str, Tensor]
#: CKA keeps p*p + q*q + p*q float64 accumulators up to this many entries (128 MiB), else Gram matrices.
_CKA_FEATURE_BUDGET = 1 << 24


# ----------------------------------------------------------------------------------------------
# CKA


def _features(model: nn.Module, state: State, x: Any, module: nn.Module | None, name: str) -> Tensor:
    """Per-sample flattened float64 output of ``module`` (or of the model), shape ``(n, p)``."""
    captured: list[Any] = []
    handle = None if module is None else module.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        out = forward_with_state(model, state, x, eval_mode=True)
    finally:
        if handle is not None:
            handle.remove()
    if module is None:
        logits = find_logits(out)  # a ModelOutput's or a dict's logits, a tuple's first element
        out = out if logits is None else logits
    else:
        if len(captured) != 1:
            raise RebasinError(f"layer {name!r} ran {len(captured)} times in one forward pass; CKA needs exactly one output")
        out = captured[0]
    if not isinstance(out, Tensor) or out.ndim == 0:
        raise RebasinError(f"the representation at {name!r} must be a tensor with a batch axis, got {type(out).__name__}")
    return out.detach().reshape(out.shape[0], -1).to(torch.float64)


def _module(model: nn.Module, layer: str | None, which: str) -> nn.Module | None:
    if layer is None:
        return None
    modules = dict(model.named_modules())
    if layer not in modules:
        names = [n for n in modules if n][:12]
        raise RebasinError(f"{which} has no submodule {layer!r}; some valid names: {names}")
    return modules[layer]


class _CKAStats:
    """Streams the centred cross-covariances of X (n, p) and Y (n, q) in float64."""

    def __init__(self, p: int, q: int, sx: Tensor, sy: Tensor) -> None:
        self.gram = p * p + q * q + p * q > _CKA_FEATURE_BUDGET
        self.sx, self.sy = sx, sy  # shifts (first batch means) against cancellation
        self.n = 0
        self.ssx = self.ssy = 0.0
        self.xs: list[Tensor] = []
        self.ys: list[Tensor] = []
        self.mx = self.my = self.mxx = self.myy = self.mxy = None  # type: Tensor | None

    def add(self, x: Tensor, y: Tensor) -> None:
        x, y = x - self.sx, y - self.sy
        self.n += x.shape[0]
        self.ssx += float(x.pow(2).sum())
        self.ssy += float(y.pow(2).sum())
        if self.gram:
            self.xs.append(x)
            self.ys.append(y)
            return
        parts = (x.sum(0), y.sum(0), x.T @ x, y.T @ y, x.T @ y)
        if self.mx is None:
            self.mx, self.my, self.mxx, self.myy, self.mxy = parts
        else:
            for attr, v in zip(("mx", "my", "mxx", "myy", "mxy"), parts):
                getattr(self, attr).add_(v)

    def reduce(self, red: Reducer) -> None:
        """Replace the sums by their totals over ``red``'s ranks (re-centred on the ranks' mean shift).

        Gram form: every rank's (shifted) samples are gathered in rank order instead.
        """
        total_sx, total_sy = red.sum([self.sx, self.sy])
        sx, sy = total_sx / red.world, total_sy / red.world
        dx, dy = (self.sx - sx).to(torch.float64), (self.sy - sy).to(torch.float64)  # s_r - s
        n = float(self.n)
        if self.gram:
            xs = torch.cat(self.xs) + dx
            ys = torch.cat(self.ys) + dy
            gathered = red.gather((xs.cpu(), ys.cpu()))
            self.xs = [g[0].to(xs.device) for g in gathered]
            self.ys = [g[1].to(ys.device) for g in gathered]
            ss = [float((xs * xs).sum()), float((ys * ys).sum()), n]
            self.ssx, self.ssy, total_n = red.sum_numbers(*ss)
        else:
            assert self.mx is not None and self.my is not None
            assert self.mxx is not None and self.myy is not None and self.mxy is not None
            mx, my = self.mx + n * dx, self.my + n * dy
            mxx = self.mxx + torch.outer(dx, self.mx) + torch.outer(self.mx, dx) + n * torch.outer(dx, dx)
            myy = self.myy + torch.outer(dy, self.my) + torch.outer(self.my, dy) + n * torch.outer(dy, dy)
            mxy = self.mxy + torch.outer(dx, self.my) + torch.outer(self.mx, dy) + n * torch.outer(dx, dy)
            ssx = self.ssx + 2 * float(dx @ self.mx) + n * float(dx @ dx)
            ssy = self.ssy + 2 * float(dy @ self.my) + n * float(dy @ dy)
            scalars = torch.tensor([ssx, ssy, n], dtype=torch.float64)
            self.mx, self.my, self.mxx, self.myy, self.mxy, scalars = red.sum([mx, my, mxx, myy, mxy, scalars])
            self.ssx, self.ssy, total_n = scalars.tolist()
        self.n = int(total_n)
        self.sx, self.sy = sx, sy

    def value(self) -> float:
        if self.gram:
            x, y = torch.cat(self.xs), torch.cat(self.ys)
            x, y = x - x.mean(0), y - y.mean(0)
            kx, ky = x @ x.T, y @ y.T  # ||Xc^T Yc||_F^2 = <Kx, Ky>, ||Xc^T Xc||_F = ||Kx||_F
            hsic, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
        else:
            assert self.mx is not None and self.my is not None
            cxy = self.mxy - torch.outer(self.mx, self.my) / self.n  # type: ignore[operator]  # Optional narrowed by earlier logic mypy cannot follow
            nx = (self.mxx - torch.outer(self.mx, self.mx) / self.n).norm()  # type: ignore[operator]  # Optional narrowed by earlier logic mypy cannot follow
            ny = (self.myy - torch.outer(self.my, self.my) / self.n).norm()  # type: ignore[operator]  # Optional narrowed by earlier logic mypy cannot follow
            hsic = cxy.pow(2).sum()
        for norm, ss, which in ((nx, self.ssx, "model_a"), (ny, self.ssy, "model_b")):
            if not float(norm) > 1e-12 * ss:
                raise RebasinError(f"the representation of {which} does not vary over the inputs; CKA is undefined")
        return float(hsic / (nx * ny))


def cka(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable[Any],
    *,
    layer: str | None = None,
    layer_b: str | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    sync: bool = True,
    group: Any = None,
) -> float:
    r"""Linear CKA (Kornblith et al. 2019) between two models' representations of the same inputs.

    With :math:`X \in \mathbb{R}^{n\times p}` and :math:`Y \in \mathbb{R}^{n\times q}` the
    per-sample flattened features of A and B, column-centred to :math:`X_c, Y_c`:

    .. math::

        \text{CKA}(X, Y) = \frac{\lVert X_c^\top Y_c \rVert_F^2}
        {\lVert X_c^\top X_c \rVert_F\,\lVert Y_c^\top Y_c \rVert_F} \in [0, 1].

    It is invariant to orthogonal transforms (e.g. permutations of units) and isotropic scaling
    of either representation. Computed in float64 in one pass: when
    :math:`p^2 + q^2 + pq \le 2^{24}` only :math:`X^\top X, Y^\top Y, X^\top Y` and the column sums
    are kept (centred at the end, after shifting by the first batch's mean against cancellation);
    wider features store all samples and use the Gram form :math:`\langle K_x, K_y\rangle` with
    :math:`K = X_c X_c^\top` (memory :math:`n(p + q) + 2n^2`).

    Parameters
    ----------
    model_a, model_b
        Run in eval mode; unchanged afterwards (state and ``training`` flags).
    loader
        Yields ``(inputs, targets)`` or bare inputs; both models see the same inputs.
    layer
        Dotted name (as in ``named_modules()``) of the submodule of ``model_a`` whose output is
        captured by a forward hook; None for the model outputs.
    layer_b
        The submodule of ``model_b``; defaults to ``layer``.
    max_batches
        Use at most this many batches.
    device
        Where to run; default ``model_a``'s device.
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) the
        moments (or, for wide features, the samples) of every rank of ``group`` (None: the default group)
        are combined, so each rank gets the CKA of the union of the shards. ``sync=False``: this
        process's data only.

    Returns
    -------
    float

    Raises
    ------
    RebasinError
        Unknown layer, a layer not run exactly once per forward, different sample counts, an
        empty loader, or a representation with zero variance (CKA undefined).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> round(cka(model, model, [torch.randn(32, 4)], layer="1"), 6)
    1.0
    """
    layer_b = layer if layer_b is None else layer_b
    mod_a, mod_b = _module(model_a, layer, "model_a"), _module(model_b, layer_b, "model_b")
    if max_batches is not None:
        check_int(max_batches, "max_batches")
    device = resolve_device(model_a, device=device)
    sa = {k: v.to(device) for k, v in state_of(model_a).items()}
    sb = {k: v.to(device) for k, v in state_of(model_b).items()}
    red = reducer(sync, group)
    stats: _CKAStats | None = None
    with guarded(red, "cka") as outcome:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x = to_device(split_batch(batch)[0], device)
                fa = _features(model_a, sa, x, mod_a, layer or "output")
                fb = _features(model_b, sb, x, mod_b, layer_b or "output")
                if fa.shape[0] != fb.shape[0]:
                    raise RebasinError(f"batch {i}: model_a gave {fa.shape[0]} samples but model_b {fb.shape[0]}")
                if stats is None:
                    stats = _CKAStats(fa.shape[1], fb.shape[1], fa.mean(0), fb.mean(0))
                stats.add(fa, fb)
        if red is None and (stats is None or stats.n == 0):
            raise RebasinError("cka: the loader yielded no samples")
        outcome.count = 0 if stats is None else stats.n
        outcome.key = fingerprint(None if stats is None else (stats.sx, stats.sy, stats.gram), sa, sb)
    if red is not None:
        assert stats is not None  # every rank has samples (agreed above)
        stats.reduce(red)
    return stats.value()  # type: ignore[union-attr]  # Optional narrowed by earlier logic mypy cannot follow
