"""The Sinkhorn operator: soft permutations with an implicit (memory-free) backward.

``sinkhorn(logits, tau=...)`` turns a square matrix of logits into a doubly stochastic matrix by
alternating log-domain row and column normalisation. Three ways to differentiate it are offered
(``grad=``): through the fixed point with the implicit function theorem (Eisenberger et al. 2022,
used for re-basin by Peña et al. 2023), by plain autograd through the iterations, or not at all.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._errors import RebasinError

__all__ = ["sinkhorn", "SINKHORN_GRADS", "SinkhornInfo", "SinkhornConvergenceWarning"]

#: The valid values of ``sinkhorn(..., grad=...)``.
SINKHORN_GRADS: tuple[str, ...] = ("implicit", "unrolled", "detach")

# Convergence is checked (one host sync) every this many iterations, and after the last one.
_CHECK_EVERY = 5


@dataclass(frozen=True)
class SinkhornInfo:
    """What one :func:`sinkhorn` call did (``sinkhorn(..., return_info=True)``).

    Attributes
    ----------
    residual
        ``max |row sum - 1|`` of the result (columns sum to one up to rounding), over the whole batch; None
        when ``tol=None`` (no check was made).
    n_iter
        Sweeps performed (fewer than asked when ``tol`` was reached early).
    converged
        ``residual <= tol``; None when ``tol=None``. (``n == 1`` is trivially converged: residual 0.)
    """

    residual: float | None
    n_iter: int
    converged: bool | None


class SinkhornConvergenceWarning(UserWarning):
    """Sinkhorn stopped before its marginals reached ``tol`` (or its implicit backward needed a fallback).

    The message text is fixed, so Python's default filter shows it once per call site even in a training
    loop; the numbers of the call are attributes: ``residual``, ``tol``, ``n_iter``, ``tau``, ``n`` (and
    ``n_fallback`` / ``batch`` for the backward). Silence it with ``warn=False`` or
    ``warnings.filterwarnings("ignore", category=rebasin.matching.SinkhornConvergenceWarning)``; read the residual
    of every call with ``sinkhorn(..., return_info=True)``.
    """

    def __init__(self, message: str, **numbers: Any) -> None:
        super().__init__(message)
        for name, value in numbers.items():
            setattr(self, name, value)


_NOT_CONVERGED = (
    "sinkhorn did not converge: after n_iter iterations the row/column sums are still off by more than tol. "
    "Raise n_iter, raise tau, or scale the logits down; with grad='implicit' the gradient is that of the "
    "converged map and is only approximate here. (The numbers are attributes of this warning: residual, tol, "
    "n_iter, tau, n; sinkhorn(..., return_info=True) returns the residual of every call.)"
)
_SINGULAR = (
    "sinkhorn implicit backward: the linear system was numerically singular (S is nearly a hard permutation "
    "at this tau); solved it with a small ridge / pseudo-inverse, so those gradients are approximate (and "
    "nearly zero). Raise tau, or use grad='unrolled'. (How many matrices: the attributes n_fallback, batch, tau "
    "of this warning.)"
)


@overload
def sinkhorn(
    logits: Tensor,
    *,
    tau: float = ...,
    n_iter: int = ...,
    grad: str = ...,
    tol: float | None = ...,
    warn: bool = ...,
    return_info: Literal[False] = ...,
) -> Tensor: ...


@overload
def sinkhorn(
    logits: Tensor,
    *,
    tau: float = ...,
    n_iter: int = ...,
    grad: str = ...,
    tol: float | None = ...,
    warn: bool = ...,
    return_info: Literal[True],
) -> tuple[Tensor, SinkhornInfo]: ...


def sinkhorn(
    logits: Tensor,
    *,
    tau: float = 1.0,
    n_iter: int = 20,
    grad: str = "implicit",
    tol: float | None = 1e-6,
    warn: bool = True,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, SinkhornInfo]:
    r"""Doubly stochastic matrix closest to ``softmax(logits / tau)``: the Sinkhorn operator.

    The result is the entropic optimal transport plan with unit marginals,

    .. math::

        S^\star(L) = \operatorname*{arg\,min}_{S \ge 0,\; S\mathbf 1 = \mathbf 1,\;
        S^\top \mathbf 1 = \mathbf 1} \; -\langle S, L\rangle
        + \tau \sum_{ij} S_{ij} (\log S_{ij} - 1),

    whose solution has the form :math:`S = \exp(L/\tau + u\mathbf 1^\top + \mathbf 1 v^\top)`.
    It is computed by alternating row and column normalisation of :math:`L/\tau` in the log
    domain (column normalisation last, so columns sum to one up to rounding). As
    :math:`\tau \to 0` it tends to the permutation matrix maximising :math:`\langle P, L\rangle`.

    Parameters
    ----------
    logits
        Floating tensor of shape ``(..., n, n)``; leading dimensions are a batch. Half-precision
        inputs are computed in float32 and cast back. Not mutated.
    tau
        Temperature, ``> 0``. Smaller is closer to a hard permutation, needs more iterations and
        gives a worse-conditioned backward.
    n_iter
        Maximum number of (row, column) normalisation sweeps, ``>= 1``.
    grad
        How gradients flow back to ``logits``:

        ``"implicit"`` (default)
            Exact gradient of the converged map :math:`S^\star(L)` by the implicit function
            theorem on its optimality conditions. The forward loop runs without autograd and only
            the output ``S`` is saved, so memory is :math:`O(n^2)` whatever ``n_iter`` is; the
            backward solves an ``n x n`` symmetric positive definite system (preconditioned
            conjugate gradient, else a Cholesky factorisation of the Schur complement) instead
            of the ``(2n-1)``-sized KKT system. It is the gradient of the *limit*: if the loop has
            not converged (see the warning) it is only approximate.
        ``"unrolled"``
            Ordinary autograd through every iteration: the gradient of exactly what was
            computed, converged or not, at the price of :math:`O(n^2 \cdot n_{iter})` memory.
        ``"detach"``
            No gradient; the result is a constant.
    tol
        Stop early once every row and column sum is within ``tol`` of one; if that never
        happens within ``n_iter`` sweeps a warning says by how much it missed. ``None`` runs
        exactly ``n_iter`` sweeps with no check and no warning.
    warn
        ``False`` silences the non-convergence and ill-conditioning warnings.
    return_info
        Also return a :class:`SinkhornInfo` with the residual ``max |row sum - 1|``, the sweeps
        performed and whether ``tol`` was reached: the way to monitor convergence in a training
        loop without relying on warnings.

    Returns
    -------
    Tensor or (Tensor, SinkhornInfo)
        ``S`` with the shape, dtype and device of ``logits``; entries in ``[0, 1]``, every row
        and column summing to one (up to ``tol``). For ``n == 1`` a tensor of ones.

    Raises
    ------
    RebasinError
        Unknown ``grad`` (the valid ones are listed), non-square or non-floating ``logits``,
        NaN or inf in ``logits``, ``tau <= 0`` or ``n_iter < 1``.

    Warns
    -----
    SinkhornConvergenceWarning
        A :class:`UserWarning` when the marginals are still off by more than ``tol`` after
        ``n_iter`` sweeps (raise ``n_iter``, or raise ``tau``), and in a backward when the implicit
        linear system was numerically singular and had to be regularised. The text is the same at
        every call, so Python's default filter shows each once per call site (a training loop
        does not repeat it); the numbers (``residual``, ``tol``, ``n_iter``, ``tau``, ``n``) are
        attributes of the warning, and ``return_info=True`` gives the residual of every call.

    References
    ----------
    .. [1] F. A. G. Peña, H. R. Medeiros, T. Dubail, M. Aminbeidokhti, E. Granger, M. Pedersoli,
       "Re-basin via implicit Sinkhorn differentiation", CVPR 2023.
    .. [2] M. Eisenberger, A. Toker, L. Leal-Taixé, F. Bernard, D. Cremers, "A unified framework
       for implicit Sinkhorn differentiation", CVPR 2022.
    .. [3] G. Mena, D. Belanger, S. Linderman, J. Snoek, "Learning latent permutations with
       Gumbel-Sinkhorn networks", ICLR 2018.

    Examples
    --------
    >>> import torch
    >>> logits = torch.randn(4, 4, requires_grad=True)
    >>> s = sinkhorn(logits, tau=0.5, n_iter=200)
    >>> torch.allclose(s.sum(-1), torch.ones(4), atol=1e-5)
    True
    >>> (s * torch.eye(4)).sum().backward()   # implicit gradient, O(n^2) memory
    >>> logits.grad.shape
    torch.Size([4, 4])
    >>> s, info = sinkhorn(logits, tau=0.5, n_iter=200, return_info=True)
    >>> info.converged, info.residual <= 1e-6
    (True, True)
    """
    if grad not in SINKHORN_GRADS:
        raise RebasinError(f"unknown grad={grad!r} for sinkhorn; valid options are {list(SINKHORN_GRADS)}")
    _check_inputs(logits, tau, n_iter, tol)
    n = logits.shape[-1]
    if n <= 1:
        # The only doubly stochastic 1x1 (or empty) matrix; its derivative is zero, kept connected.
        out = torch.ones_like(logits)
        out = out if grad == "detach" or not logits.requires_grad else out + 0.0 * logits
        info = SinkhornInfo(None if tol is None else 0.0, 0, None if tol is None else True)
        return (out, info) if return_info else out
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    tau = float(tau)
    if grad == "implicit":
        s, err, sweeps = _ImplicitSinkhorn.apply(work, tau, int(n_iter), tol, bool(warn))
    elif grad == "unrolled":
        log_s, err, sweeps = _sinkhorn_log(work / tau, int(n_iter), tol)
        s = log_s.exp()
    else:
        with torch.no_grad():
            log_s, err, sweeps = _sinkhorn_log(work / tau, int(n_iter), tol)
            s = log_s.exp()
    converged = None if err is None else bool(err <= tol)
    if warn and converged is False:
        # Fixed text: Python's default filter keys on it, so a loop warns once per call site.
        warnings.warn(
            SinkhornConvergenceWarning(_NOT_CONVERGED, residual=err, tol=tol, n_iter=int(n_iter), tau=tau, n=n),
            stacklevel=2,
        )
    s = s.to(logits.dtype)
    return (s, SinkhornInfo(err, int(sweeps), converged)) if return_info else s


# ---------------------------------------------------------------------------- forward loop
def _check_inputs(logits: Any, tau: Any, n_iter: Any, tol: Any) -> None:
    if not isinstance(logits, Tensor):
        raise RebasinError(f"sinkhorn logits must be a Tensor, got {type(logits).__name__}")
    if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        raise RebasinError(
            f"sinkhorn logits must have shape (..., n, n) (square in the last two dims), got {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise RebasinError(f"sinkhorn logits must be a floating tensor, got dtype {logits.dtype}")
    try:
        tau_f = float(tau)
    except (TypeError, ValueError):
        raise RebasinError(f"sinkhorn tau must be a positive number, got {tau!r}") from None
    if not (math.isfinite(tau_f) and tau_f > 0):
        raise RebasinError(f"sinkhorn tau must be a positive finite number, got {tau!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise RebasinError(f"sinkhorn n_iter must be an integer >= 1, got {n_iter!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol >= 0):
        raise RebasinError(f"sinkhorn tol must be a number >= 0 or None, got {tol!r}")
    if logits.numel() and not bool(torch.isfinite(logits.detach()).all()):
        bad = int((~torch.isfinite(logits.detach())).sum())
        raise RebasinError(
            f"sinkhorn logits of shape {tuple(logits.shape)} contain {bad} NaN or inf value(s)"
        )


def _sinkhorn_log(x: Tensor, n_iter: int, tol: float | None) -> tuple[Tensor, float | None, int]:
    """Log-domain Sinkhorn on ``x = logits / tau``; returns ``(log S, marginal error or None, sweeps)``.

    The marginal error is ``max |row sum - 1|`` (columns are exact after the last column step).
    Differentiable by autograd when ``x`` requires grad.
    """
    row_lse = torch.logsumexp(x, dim=-1, keepdim=True)
    err: float | None = None
    sweeps = 0
    for it in range(n_iter):
        x = x - row_lse
        x = x - torch.logsumexp(x, dim=-2, keepdim=True)
        row_lse = torch.logsumexp(x, dim=-1, keepdim=True)
        sweeps = it + 1
        if tol is not None and ((it + 1) % _CHECK_EVERY == 0 or it + 1 == n_iter):
            err = float(torch.expm1(row_lse.detach()).abs().max())
            if err <= tol:
                break
    return x, err, sweeps


# ---------------------------------------------------------------------------- implicit backward
class _ImplicitSinkhorn(torch.autograd.Function):
    """Forward: Sinkhorn without autograd, saving only ``S``. Backward: implicit differentiation.

    Derivation. At the fixed point ``S = exp(X + u 1^T + 1 v^T)`` with ``X = L / tau`` and
    marginals ``a = S 1``, ``b = S^T 1``. A perturbation ``dX`` moves the potentials by
    ``(du, dv)`` and ``dS = S * (dX + du 1^T + 1 dv^T)``; keeping the marginals fixed gives the
    KKT system

        K [du; dv] = -[(S*dX) 1; (S*dX)^T 1],    K = [[diag(a), S], [S^T, diag(b)]],

    of size 2n with the one gauge direction (1, -1) in its null space (u + c, v - c give the same
    S). For an upstream gradient G, with P = S * G and g = [P 1; P^T 1] (which is orthogonal to
    (1, -1)), the adjoint [alpha; beta] = K^+ g gives

        dL/dX = P - S * (alpha 1^T + 1 beta^T).

    Eliminating alpha = (P 1 - S beta) / a leaves the n x n Schur complement

        M beta = P^T 1 - S^T ((P 1) / a),    M = diag(b) - S^T diag(1/a) S,

    which is symmetric positive semi-definite with null vector 1 (exactly, since a and b are
    computed from S); adding 1 1^T / n removes that gauge direction without changing the
    solution (the right-hand side sums to zero, so 1^T beta = 0). The result is invariant to the
    gauge, so the solution in the range is all that is needed.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, tau: float, n_iter: int, tol: float | None, warn: bool) -> tuple[Tensor, Any, int]:
        with torch.no_grad():
            log_s, err, sweeps = _sinkhorn_log(x / tau, n_iter, tol)
            s = log_s.exp()
        ctx.save_for_backward(s)
        ctx.tau = tau
        ctx.warn = warn
        return s, err, sweeps

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_s: Tensor, _grad_err: Any, _grad_sweeps: Any
    ) -> tuple[Tensor | None, None, None, None, None]:
        (s,) = ctx.saved_tensors
        if grad_s is None:
            return None, None, None, None, None
        grad_x, n_fallback = _implicit_vjp(s, grad_s)
        if n_fallback and ctx.warn:
            batch = s[..., 0, 0].numel()
            warnings.warn(
                SinkhornConvergenceWarning(_SINGULAR, n_fallback=int(n_fallback), batch=int(batch), tau=ctx.tau),
                stacklevel=2,
            )
        return grad_x / ctx.tau, None, None, None, None


def _implicit_vjp(s: Tensor, g: Tensor) -> tuple[Tensor, int]:
    """``dL/dX`` for ``S = sinkhorn(X)`` at convergence; returns it and the number of fallbacks."""
    p = s * g
    a = s.sum(-1).clamp_min(torch.finfo(s.dtype).tiny)  # row sums, (..., n)
    b = s.sum(-2)  # column sums, (..., n)
    gr = p.sum(-1)
    gc = p.sum(-2)
    rhs = gc - _tmv(s, gr / a)
    beta, n_fallback = _solve_schur(s, a, b, rhs)
    alpha = (gr - _mv(s, beta)) / a
    return p - s * (alpha.unsqueeze(-1) + beta.unsqueeze(-2)), n_fallback


def _mv(s: Tensor, x: Tensor) -> Tensor:
    """``S x`` batched: ``(..., n, n) x (..., n) -> (..., n)``."""
    return (s @ x.unsqueeze(-1)).squeeze(-1)


def _tmv(s: Tensor, y: Tensor) -> Tensor:
    """``S^T y`` batched."""
    return (y.unsqueeze(-2) @ s).squeeze(-2)


def _solve_schur(s: Tensor, a: Tensor, b: Tensor, rhs: Tensor) -> tuple[Tensor, int]:
    """Solve ``(diag(b) - S^T diag(1/a) S + 1 1^T / n) beta = rhs``, batched.

    Preconditioned conjugate gradient with matrix-vector products first (``O(n^2)`` per
    iteration, converges in a handful of iterations when ``S`` is far from a hard permutation);
    when it has not converged within a budget cheaper than a factorisation, a Cholesky solve of
    the formed matrix; where that fails (numerically singular), a ridge, then a pseudo-inverse.
    """
    n = s.shape[-1]
    eps = torch.finfo(s.dtype).eps
    rtol = 1e-11 if s.dtype == torch.float64 else 1e-5
    if n >= 64:
        diag = b - _tmv(s * s, 1.0 / a) + 1.0 / n
        diag_inv = 1.0 / diag.clamp_min(1e3 * eps * b.abs().amax(-1, keepdim=True).clamp_min(1.0))

        def matvec(x: Tensor) -> Tensor:
            return b * x - _tmv(s, _mv(s, x) / a) + x.mean(-1, keepdim=True)

        beta, ok = _pcg(matvec, rhs, diag_inv, rtol, maxiter=max(8, n // 32))
        if ok:
            return beta, 0
    m = -(s.transpose(-1, -2) @ (s / a.unsqueeze(-1)))
    m.diagonal(dim1=-2, dim2=-1).add_(b)
    m.add_(1.0 / n)
    return _spd_solve(m, rhs)


def _pcg(matvec: Any, rhs: Tensor, diag_inv: Tensor, rtol: float, maxiter: int) -> tuple[Tensor, bool]:
    """Batched Jacobi-preconditioned conjugate gradient from zero; ``(x, converged)``."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    norm0 = rhs.norm(dim=-1, keepdim=True)
    target = rtol * norm0
    if bool((norm0 <= target).all()):
        return x, True
    z = r * diag_inv
    d = z.clone()
    rz = (r * z).sum(-1, keepdim=True)
    zero = torch.zeros((), dtype=rhs.dtype, device=rhs.device)
    for it in range(maxiter):
        ad = matvec(d)
        dad = (d * ad).sum(-1, keepdim=True)
        step = torch.where(dad > 0, rz / dad, zero)
        x = x + step * d
        r = r - step * ad
        if (it + 1) % 4 == 0 or it + 1 == maxiter:
            res = r.norm(dim=-1, keepdim=True)
            if bool((res <= target).all()):
                return x, True
            # Give up early (the caller factorises instead) when the observed rate of decrease
            # would not reach the target within the budget, or the iterates blew up.
            rate = (res / norm0).clamp_min(1e-300).log() / (it + 1)
            need = float(((target / norm0).log() / rate.clamp_max(-1e-12)).amax())
            if not math.isfinite(need) or need > 1.5 * maxiter or not bool(torch.isfinite(x).all()):
                return x, False
        z = r * diag_inv
        rz_new = (r * z).sum(-1, keepdim=True)
        d = z + torch.where(rz > 0, rz_new / rz, zero) * d
        rz = rz_new
    return x, False


def _spd_solve(m: Tensor, rhs: Tensor) -> tuple[Tensor, int]:
    """Solve SPD systems ``m x = rhs`` batched; regularise the numerically singular ones."""
    eps = torch.finfo(m.dtype).eps
    chol, info = torch.linalg.cholesky_ex(m)
    x = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    # A factorisation can succeed on a numerically singular matrix and return garbage; the
    # squared pivot ratio is a lower bound on the condition number, so flag kappa * eps > 0.1.
    piv = chol.diagonal(dim1=-2, dim2=-1).abs()
    ill = piv.amin(-1).square() < 10 * eps * piv.amax(-1).square()
    bad = (info != 0) | ill | ~torch.isfinite(x).all(-1)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return x, 0
    mb, rb = m[bad], rhs[bad]
    scale = mb.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)
    ridge = 1e3 * eps * scale
    mr = mb + torch.diag_embed(ridge.unsqueeze(-1).expand_as(rb))
    chol_r, info_r = torch.linalg.cholesky_ex(mr)
    xr = torch.cholesky_solve(rb.unsqueeze(-1), chol_r).squeeze(-1)
    still = (info_r != 0) | ~torch.isfinite(xr).all(-1)
    if bool(still.any()):
        try:
            xp = (torch.linalg.pinv(mb[still], hermitian=True) @ rb[still].unsqueeze(-1)).squeeze(-1)
            xp = torch.nan_to_num(xp, nan=0.0, posinf=0.0, neginf=0.0)
        except RuntimeError:  # eigh did not converge: give up on these, zero adjoint
            xp = torch.zeros_like(rb[still])
        xr[still] = xp
    x = x.clone()
    x[bad] = xr
    return x, n_bad
