"""Hessian top eigenvalue (power iteration) and trace (Hutchinson) from Hessian-vector products."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._common import (
    check_float,
    check_int,
    check_state_for_model,
    cross_entropy_of,
    forward_with_state,
    resolve_device,
    split_batch,
    state_of,
    to_device,
)
from .._deprecation import renamed_keywords
from .._distributed import Reducer, fingerprint, guarded, reducer
from .._errors import RebasinError
from ..paths.running import LossFn

__all__ = ["HessianEigenvalue", "HessianTrace", "hessian_top_eigenvalue", "hessian_trace"]

State = Mapping[str, Tensor]
_TRACE_METHODS = ("hutchinson", "exact")


# ----------------------------------------------------------------------------------------------
# Hessian


class _HessianOperator:
    r"""``v -> H v`` for the Hessian of the (example-weighted) mean loss over ``batches``.

    Vectors are flat float64 over the trainable floating-point parameters (``self.keys`` order).
    Each product is exact, by double backward through :func:`torch.func.functional_call` in eval
    mode: :math:`Hv = \nabla_\theta (\nabla_\theta L^\top v)`, in the parameters' own dtype, on
    fresh leaf tensors (the model's ``.grad`` fields are never touched). With a single batch the
    gradient graph is built once and reused for every product.
    """

    def __init__(
        self, model: nn.Module, batch: Any, *, loss_fn: LossFn | None, state: State | None, device: Any,
        red: Reducer | None = None,
    ) -> None:
        loss_fn = cross_entropy_of if loss_fn is None else loss_fn
        if not callable(loss_fn):
            raise RebasinError(f"loss_fn must be callable(outputs, targets) -> scalar, got {type(loss_fn).__name__}")
        self.model, self.loss_fn = model, loss_fn
        self.device = resolve_device(model, device=device)
        if state is not None:
            check_state_for_model(model, state)
        full = state_of(model) if state is None else state
        self.fixed = {k: v.detach().to(self.device) for k, v in full.items()}
        canon: dict[int, str] = {}
        self.alias: dict[str, str] = {}  # state key -> the key of the parameter it shares (tied weights)
        trainable: list[str] = []
        for name, p in model.named_parameters(remove_duplicate=False):
            first = canon.setdefault(id(p), name)
            self.alias[name] = first
            if first == name and p.requires_grad and p.is_floating_point():
                trainable.append(name)
        if not trainable:
            raise RebasinError("the model has no trainable floating-point parameters")
        self.keys = tuple(trainable)
        self.shapes = [self.fixed[k].shape for k in self.keys]
        self.dtypes = [self.fixed[k].dtype for k in self.keys]
        self.numels = [self.fixed[k].numel() for k in self.keys]
        self.dim = sum(self.numels)
        self.red = red
        with guarded(red, "the Hessian") as outcome:
            self.batches = self._batches(batch)
            outcome.count, outcome.key = len(self.batches), fingerprint(self.fixed, self.keys)
        if red is not None:  # weights over every rank's examples
            (total,) = red.sum_numbers(sum(w for *_, w in self.batches))
            self.batches = [(x, y, w / total) for x, y, w in self.batches]
        else:
            total = sum(w for *_, w in self.batches)
            self.batches = [(x, y, w / total) for x, y, w in self.batches]
        self._cache = self._graph(*self.batches[0][:2]) if len(self.batches) == 1 else None

    def _batches(self, batch: Any) -> list[tuple[Any, Any, float]]:
        if isinstance(batch, (tuple, list)) and all(isinstance(b, (tuple, list)) for b in batch):
            items = list(batch)
        elif isinstance(batch, (tuple, list, Tensor)):
            items = [batch]
        else:
            items = list(batch)  # a DataLoader or another iterable of batches
        out = []
        for item in items:
            x, y = split_batch(item)
            if y is None:
                raise RebasinError("the Hessian needs (inputs, targets) batches; got inputs only")
            n = y.shape[0] if isinstance(y, Tensor) and y.ndim else 1
            out.append((to_device(x, self.device), to_device(y, self.device), float(n)))
        if not out and self.red is None:
            raise RebasinError("batch is empty: pass (inputs, targets) or a non-empty list of such batches")
        return out  # weights: example counts, normalised by the caller

    def _graph(self, x: Any, y: Any) -> tuple[list[Tensor], list[Tensor]]:
        """Fresh parameter leaves and the loss gradient with its graph (for double backward)."""
        leaves = [self.fixed[k].detach().clone().requires_grad_(True) for k in self.keys]
        params = dict(zip(self.keys, leaves))
        state = dict(self.fixed)
        for key, first in self.alias.items():
            if first in params:
                state[key] = params[first]
        with torch.enable_grad():
            loss = self.loss_fn(forward_with_state(self.model, state, x, eval_mode=True), y)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise RebasinError(f"loss_fn must return a scalar tensor, got {got}")
            grads = torch.autograd.grad(loss.reshape(()), leaves, create_graph=True, allow_unused=True)
        return leaves, [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]

    def __call__(self, v: Tensor) -> Tensor:
        pieces = [p.reshape(s).to(d) for p, s, d in zip(torch.split(v, self.numels), self.shapes, self.dtypes)]
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for x, y, w in self.batches:
            leaves, grads = self._cache if self._cache is not None else self._graph(x, y)
            live = [i for i, g in enumerate(grads) if g.requires_grad]  # constant gradients: no curvature
            if not live:
                continue
            with torch.enable_grad():
                hv = torch.autograd.grad([grads[i] for i in live], leaves, [pieces[i] for i in live],
                                         retain_graph=self._cache is not None, allow_unused=True)  # fmt: skip
            total += w * torch.cat([
                torch.zeros(n, dtype=torch.float64, device=self.device) if h is None else h.reshape(-1).to(torch.float64)
                for h, n in zip(hv, self.numels)
            ])  # fmt: skip
        if self.red is not None:  # H v of the loss over every rank's examples
            (total,) = self.red.sum([total])
        return total


@dataclass(frozen=True)
class HessianEigenvalue:
    """Result of :func:`hessian_top_eigenvalue`; ``float(result)`` is the eigenvalue.

    Attributes
    ----------
    eigenvalue
        Rayleigh quotient of the last iterate: the eigenvalue of largest *magnitude* (may be negative).
    n_iter
        Power iterations taken (one Hessian-vector product each).
    converged
        Whether the relative change fell below ``tol``.
    eigenvector
        The unit-norm iterate ``{param name: tensor}`` (float64).
    """

    eigenvalue: float
    n_iter: int
    converged: bool
    eigenvector: Mapping[str, Tensor]

    def __float__(self) -> float:
        return self.eigenvalue


@dataclass(frozen=True)
class HessianTrace:
    """Result of :func:`hessian_trace`; ``float(result)`` is the trace.

    Attributes
    ----------
    trace
        The estimate (exact up to rounding for ``method="exact"``).
    std_error
        Standard error of the Hutchinson mean (sample std / sqrt(n)); 0 for ``"exact"``, NaN for one sample.
    n_samples
        Hessian-vector products taken.
    method
        ``"hutchinson"`` or ``"exact"``.
    """

    trace: float
    std_error: float
    n_samples: int
    method: str

    def __float__(self) -> float:
        return self.trace


@renamed_keywords(positional=("model", "loss_fn", "batch"), iters="n_iter")
def hessian_top_eigenvalue(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: LossFn | None = None,
    state: State | None = None,
    n_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    device: torch.device | str | None = None,
    sync: bool = True,
    group: Any = None,
) -> HessianEigenvalue:
    r"""Top Hessian eigenvalue of the loss by power iteration on Hessian-vector products.

    :math:`H = \nabla^2_\theta L(\theta)` over the trainable floating-point parameters (buffers
    fixed), :math:`L` the example-weighted mean of ``loss_fn`` over the batches (the full-data
    mean loss when ``loss_fn`` returns batch means). From a Gaussian start vector (a
    :class:`torch.Generator` seeded by ``seed``), :math:`v \leftarrow Hv / \lVert Hv\rVert`,
    :math:`\lambda = v^\top H v`, until :math:`|\lambda_k - \lambda_{k-1}| \le tol\,|\lambda_k|`.
    Power iteration finds the eigenvalue of largest **magnitude**, which is negative when the
    most negative curvature dominates (Yang et al. use it that way; near a minimum it is the
    largest). Convergence is geometric in :math:`|\lambda_2/\lambda_1|`; with two eigenvalues
    :math:`\pm\lambda` it does not converge. Products are exact (double backward through
    :func:`torch.func.functional_call`; the gradient graph of a single batch is built once and
    reused), computed in the parameters' dtype; the iteration runs in float64.

    Parameters
    ----------
    model
        The architecture, run in eval mode (BatchNorm uses running stats, dropout off).
        Unchanged afterwards, ``.grad`` fields included.
    batch
        ``(inputs, targets)`` or a list (or other iterable) of such batches, weighted by size.
    loss_fn
        ``loss_fn(outputs, targets) -> scalar``; default :func:`torch.nn.functional.cross_entropy`.
        (The 0.1 form ``hessian_top_eigenvalue(model, loss_fn, batch)`` still works for one
        release, with a :class:`DeprecationWarning`.)
    state
        Full state_dict to use instead of the model's own.
    n_iter, tol
        Maximum power iterations (one Hessian-vector product each) and relative tolerance; a
        warning says when ``n_iter`` ran out. ``iters=`` is a deprecated alias of ``n_iter``.
    seed
        Seeds the start vector.
    device
        Where to run; default the model's device.
    sync, group
        Under ``torch.distributed`` (an initialised process group and ``sync=True``, the default) every
        Hessian-vector product is summed over the ranks of ``group`` (None: the default group), each rank's
        batches weighted by their share of all the ranks' examples: the Hessian of the loss on the union of
        the shards, and the same result on every rank (same ``seed``). ``sync=False``: this process's data.

    Returns
    -------
    HessianEigenvalue

    Raises
    ------
    RebasinError
        No trainable parameters, an empty ``batch``, batches without targets, a non-scalar loss,
        a ``state`` that does not fit the model, bad ``n_iter`` / ``tol``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(3, 1, bias=False)
    >>> x = torch.eye(3) * torch.tensor([[1.0], [2.0], [3.0]])
    >>> mse = lambda out, y: (out - y).pow(2).sum()
    >>> res = hessian_top_eigenvalue(model, (x, torch.zeros(3, 1)), loss_fn=mse, n_iter=500, tol=1e-10)
    >>> round(res.eigenvalue, 4)
    18.0
    """
    check_int(n_iter, "n_iter")
    if not check_float(tol, "tol") >= 0:
        raise RebasinError(f"tol must be >= 0, got {tol!r}")
    op = _HessianOperator(model, batch, loss_fn=loss_fn, state=state, device=device, red=reducer(sync, group))
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(op.device)
    v = v / v.norm()
    lam, converged, it, change = math.nan, False, 0, math.inf
    for it in range(1, n_iter + 1):  # noqa: B007 - read after the loop: the number of iterations run
        hv = op(v)
        new = float(v @ hv)
        norm = hv.norm()
        if float(norm) == 0.0:  # v is in the null space: the iterate cannot move
            lam, converged = 0.0, True
            break
        v = hv / norm
        change = abs(new - lam)
        lam = new
        if change <= tol * abs(new):
            converged = True
            break
    if not converged:
        warnings.warn(
            f"hessian_top_eigenvalue: no convergence in {n_iter} iterations (last relative change "
            f"{change / max(abs(lam), 1e-300):.2e} > tol={tol}); raise n_iter= or tol=",
            stacklevel=3,  # the caller of the renamed_keywords wrapper
        )
    vec = {k: p.reshape(s) for k, p, s in zip(op.keys, torch.split(v, op.numels), op.shapes)}
    return HessianEigenvalue(eigenvalue=lam, n_iter=it, converged=converged, eigenvector=vec)


@renamed_keywords(positional=("model", "loss_fn", "batch"))
def hessian_trace(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: LossFn | None = None,
    state: State | None = None,
    n_samples: int = 100,
    method: str = "hutchinson",
    seed: int = 0,
    device: torch.device | str | None = None,
    sync: bool = True,
    group: Any = None,
) -> HessianTrace:
    r"""Trace of the loss Hessian: Hutchinson's estimator, or exact from ``d`` products.

    ``"hutchinson"``: :math:`\operatorname{tr} H \approx \frac1m \sum_{i=1}^m z_i^\top H z_i`
    with Rademacher :math:`z_i \in \{-1, 1\}^d` from a :class:`torch.Generator` seeded by
    ``seed``. It is unbiased with per-sample variance
    :math:`2(\lVert H\rVert_F^2 - \sum_j H_{jj}^2)` (exact for diagonal :math:`H`); the standard
    error is reported. ``"exact"``: :math:`\sum_j e_j^\top H e_j` over all ``d`` coordinate
    vectors — ``d`` Hessian-vector products, for small models and for checking.
    :math:`H` is as in :func:`hessian_top_eigenvalue` (same ``model``, ``batch``, ``loss_fn``,
    ``state``, ``device`` semantics, the deprecated positional ``loss_fn`` included; eval mode;
    nothing mutated).

    Parameters
    ----------
    n_samples
        Rademacher vectors for ``"hutchinson"`` (ignored for ``"exact"``).
    method
        ``"hutchinson"`` or ``"exact"``.
    seed
        Seeds the Rademacher vectors.
    sync, group
        As in :func:`hessian_top_eigenvalue`.

    Returns
    -------
    HessianTrace

    Raises
    ------
    RebasinError
        Unknown ``method``, bad ``n_samples``, and the input errors of
        :func:`hessian_top_eigenvalue`.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(3, 1, bias=False)
    >>> x = torch.eye(3) * torch.tensor([[1.0], [2.0], [3.0]])
    >>> mse = lambda out, y: (out - y).pow(2).sum()
    >>> hessian_trace(model, (x, torch.zeros(3, 1)), loss_fn=mse, n_samples=4).trace   # H = diag(2, 8, 18)
    28.0
    """
    if method not in _TRACE_METHODS:
        raise RebasinError(f"unknown method {method!r}; valid: {list(_TRACE_METHODS)}")
    check_int(n_samples, "n_samples")
    op = _HessianOperator(model, batch, loss_fn=loss_fn, state=state, device=device, red=reducer(sync, group))
    if method == "exact":
        eye = torch.zeros(op.dim, dtype=torch.float64, device=op.device)
        total = 0.0
        for j in range(op.dim):
            eye[j] = 1.0
            total += float(op(eye)[j])
            eye[j] = 0.0
        return HessianTrace(trace=total, std_error=0.0, n_samples=op.dim, method=method)
    gen = torch.Generator().manual_seed(int(seed))
    draws = []
    for _ in range(n_samples):
        z = (torch.randint(0, 2, (op.dim,), generator=gen) * 2 - 1).to(device=op.device, dtype=torch.float64)
        draws.append(float(z @ op(z)))
    values = torch.tensor(draws, dtype=torch.float64)
    se = float(values.std() / math.sqrt(n_samples)) if n_samples > 1 else math.nan
    return HessianTrace(trace=float(values.mean()), std_error=se, n_samples=n_samples, method=method)
