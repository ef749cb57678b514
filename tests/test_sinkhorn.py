"""The Sinkhorn operator: marginals, the three gradient modes, input errors and warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.testing import assert_close

from rebasin import RebasinError
from rebasin.matching.sinkhorn_op import SINKHORN_GRADS, _implicit_vjp, sinkhorn

F64 = torch.float64


def logits(*shape: int, scale: float = 1.0, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def dense_reference_vjp(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The implicit gradient from the full (2n-1)-sized KKT system, solved densely (one matrix)."""
    n = s.shape[-1]
    k = torch.zeros(2 * n - 1, 2 * n - 1, dtype=s.dtype)
    k[:n, :n] = torch.diag(s.sum(1))
    k[:n, n:] = s[:, : n - 1]
    k[n:, :n] = s[:, : n - 1].T
    k[n:, n:] = torch.diag(s.sum(0)[: n - 1])
    p = s * g
    sol = torch.linalg.solve(k, torch.cat([p.sum(1), p.sum(0)[: n - 1]]))
    alpha, beta = sol[:n], torch.cat([sol[n:], sol.new_zeros(1)])
    return p - s * (alpha[:, None] + beta[None, :])


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("grad", SINKHORN_GRADS)
def test_marginals_batched(grad):
    x = logits(3, 2, 7, 7, scale=2.0).requires_grad_(grad != "detach")
    s = sinkhorn(x, tau=0.5, n_iter=500, tol=1e-9, grad=grad)
    assert s.shape == x.shape and s.dtype == x.dtype
    assert (s >= 0).all()
    one = torch.ones(3, 2, 7, dtype=F64)
    assert_close(s.sum(-1), one, atol=1e-6, rtol=0)
    assert_close(s.sum(-2), one, atol=1e-6, rtol=0)
    # each batch element is normalised on its own
    assert_close(s[1, 0], sinkhorn(x[1, 0].detach(), tau=0.5, n_iter=500, tol=1e-9), atol=1e-9, rtol=0)


def test_same_forward_in_all_modes_and_float32():
    x = logits(6, 6, scale=1.5)
    outs = [sinkhorn(x, n_iter=300, grad=g) for g in SINKHORN_GRADS]
    for o in outs[1:]:
        assert_close(o, outs[0])
    s32 = sinkhorn(x.float(), n_iter=300)
    assert s32.dtype == torch.float32
    assert_close(s32, outs[0].float(), atol=1e-5, rtol=1e-4)
    s16 = sinkhorn(x.to(torch.bfloat16), n_iter=300)
    assert s16.dtype == torch.bfloat16


def test_small_tau_approaches_hard_assignment():
    x = logits(5, 5, seed=3)
    s = sinkhorn(x, tau=0.02, n_iter=3000, warn=False)
    from scipy.optimize import linear_sum_assignment

    _, cols = linear_sum_assignment(x.numpy(), maximize=True)
    assert_close(s, torch.eye(5, dtype=F64)[torch.as_tensor(cols)], atol=1e-3, rtol=0)


def test_n_equals_one_gives_ones_with_zero_gradient():
    x = torch.tensor([[[3.0]], [[-2.0]]], requires_grad=True)
    s = sinkhorn(x)
    assert_close(s, torch.ones(2, 1, 1))
    s.sum().backward()
    assert_close(x.grad, torch.zeros(2, 1, 1))
    assert_close(sinkhorn(torch.zeros(1, 1), grad="detach"), torch.ones(1, 1))


def test_inputs_not_mutated():
    x = logits(2, 5, 5).requires_grad_()
    before = x.detach().clone()
    for g in SINKHORN_GRADS:
        s = sinkhorn(x, tau=0.3, n_iter=50, grad=g, warn=False)
        if g != "detach":
            s.pow(2).sum().backward()
    assert torch.equal(x.detach(), before)


# ---------------------------------------------------------------------------- errors and warnings
def test_unknown_grad_lists_the_valid_ones():
    with pytest.raises(RebasinError, match=r"'implicit', 'unrolled', 'detach'"):
        sinkhorn(torch.zeros(3, 3), grad="autodiff")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_rejected(bad):
    x = torch.zeros(2, 4, 4)
    x[1, 2, 3] = bad
    with pytest.raises(RebasinError, match="NaN or inf"):
        sinkhorn(x)


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (torch.zeros(3, 4), {}, r"\(\.\.\., n, n\).*\(3, 4\)"),
        (torch.zeros(4), {}, "square"),
        (torch.zeros(3, 3, dtype=torch.int64), {}, "floating"),
        (torch.zeros(3, 3), {"tau": 0.0}, "tau"),
        (torch.zeros(3, 3), {"tau": -1.0}, "tau"),
        (torch.zeros(3, 3), {"n_iter": 0}, "n_iter"),
        (torch.zeros(3, 3), {"tol": -1.0}, "tol"),
    ],
)
def test_bad_inputs(x, kwargs, match):
    with pytest.raises(RebasinError, match=match):
        sinkhorn(x, **kwargs)


def test_non_convergence_warns_once_with_the_error_and_the_fix():
    x = logits(8, 8, scale=3.0)
    with pytest.warns(UserWarning, match=r"did not converge.*off by more than tol.*Raise n_iter, raise tau") as rec:
        sinkhorn(x, tau=0.05, n_iter=2)
    hits = [w for w in rec if "did not converge" in str(w.message)]
    assert len(hits) == 1
    # the numbers are attributes (the text is fixed so that a loop warns once per call site)
    assert hits[0].message.residual > 1e-6 and hits[0].message.n_iter == 2 and hits[0].message.tau == 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn(x, tau=0.05, n_iter=2, warn=False)
        sinkhorn(x, tau=0.05, n_iter=2, tol=None)
        sinkhorn(x, tau=1.0, n_iter=500)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("shape", [(4, 4), (5, 5), (6, 6), (2, 3, 4, 4)])
def test_implicit_gradcheck(shape):
    x = logits(*shape, scale=0.8, seed=sum(shape)).requires_grad_()

    def f(t: torch.Tensor) -> torch.Tensor:
        return sinkhorn(t, tau=0.7, n_iter=3000, tol=1e-14)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_implicit_matches_unrolled_at_convergence():
    x = logits(8, 8, scale=1.5, seed=1)
    w = logits(8, 8, seed=2)
    grads = []
    for g in ("implicit", "unrolled"):
        xi = x.clone().requires_grad_()
        s = sinkhorn(xi, tau=0.5, n_iter=2000, tol=1e-13, grad=g)
        (s * w).sum().backward()
        grads.append(xi.grad)
    assert rel(grads[0], grads[1]) < 1e-6
    # sanity: a non-converged unrolled gradient is clearly different, so the check can fail
    xi = x.clone().requires_grad_()
    (sinkhorn(xi, tau=0.5, n_iter=2, grad="unrolled", warn=False) * w).sum().backward()
    assert rel(xi.grad, grads[0]) > 1e-3


@pytest.mark.parametrize("n", [6, 80, 150])
def test_implicit_matches_dense_kkt_solve(n):
    # n >= 64 exercises the conjugate-gradient path, larger scales the Cholesky fallback.
    for scale in (0.5, 4.0):
        s = sinkhorn(logits(n, n, scale=scale, seed=n), n_iter=3000, tol=1e-12)
        g = logits(n, n, seed=n + 1)
        got, n_fallback = _implicit_vjp(s, g)
        assert n_fallback == 0
        assert rel(got, dense_reference_vjp(s, g)) < 1e-8
    got32, _ = _implicit_vjp(s.float(), g.float())
    assert rel(got32.double(), dense_reference_vjp(s, g)) < 1e-3


def test_implicit_batched_equals_per_matrix():
    x = logits(3, 6, 6, scale=1.0, seed=4).requires_grad_()
    w = logits(3, 6, 6, seed=5)
    (sinkhorn(x, n_iter=1000, tol=1e-12) * w).sum().backward()
    for i in range(3):
        xi = x[i].detach().clone().requires_grad_()
        (sinkhorn(xi, n_iter=1000, tol=1e-12) * w[i]).sum().backward()
        assert_close(x.grad[i], xi.grad, atol=1e-10, rtol=1e-8)


def test_implicit_gradient_reaches_logits_through_a_loss():
    x = logits(5, 5, dtype=torch.float32).requires_grad_()
    loss = ((sinkhorn(x, tau=0.3, n_iter=200) - torch.eye(5)) ** 2).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_detach_gives_no_gradient():
    x = logits(4, 4).requires_grad_()
    s = sinkhorn(x, grad="detach")
    assert not s.requires_grad and s.grad_fn is None


def test_implicit_saves_only_the_output():
    """Memory of the implicit mode does not grow with n_iter: one n x n tensor is saved."""

    def saved_bytes(grad: str, n_iter: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = logits(16, 16).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sinkhorn(x, n_iter=n_iter, tol=None, grad=grad)
        return total

    assert saved_bytes("implicit", 5) == saved_bytes("implicit", 100) == 16 * 16 * 8
    assert saved_bytes("unrolled", 100) > 10 * saved_bytes("unrolled", 5) > 0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("converged", [False, True])
def test_ill_conditioned_backward_is_finite_and_warns(dtype, converged):
    # tau tiny: S is a hard permutation up to rounding, the KKT system is numerically singular.
    x = logits(2, 6, 6, seed=7, dtype=dtype)
    if converged:  # well separated logits: the loop converges, S is nearly (not exactly) hard
        perm = torch.eye(6, dtype=dtype)[torch.tensor([3, 1, 4, 0, 5, 2])]
        x = 1.0 * perm + 0.002 * x
    x.requires_grad_()
    w = logits(2, 6, 6, seed=8, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the forward may not converge either; not the point here
        s = sinkhorn(x, tau=0.02, n_iter=200) if converged else sinkhorn(x, tau=1e-3, n_iter=50)
    assert (s.sum(-1) - 1).abs().max() < 1e-6 or not converged
    with pytest.warns(UserWarning, match="numerically singular"):
        (s * w).sum().backward()
    assert torch.isfinite(x.grad).all()
    # the gradient of a (locally constant) hard permutation is tiny compared to 1 / tau
    assert float(x.grad.abs().max()) < 10.0


def test_exact_permutation_backward_gives_zero_gradient():
    x = (torch.eye(70, dtype=F64)[torch.randperm(70, generator=torch.Generator().manual_seed(0))] * 50).requires_grad_()
    s = sinkhorn(x, tau=0.05, n_iter=5)
    (s * logits(70, 70)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert float(x.grad.abs().max()) < 1e-12


def test_singular_fallback_solver_directly():
    # A hard permutation matrix: the Schur complement is rank one; the fallback must not crash.
    s = torch.eye(5, dtype=F64)[torch.tensor([3, 1, 4, 0, 2])]
    g = logits(5, 5)
    got, n_fallback = _implicit_vjp(s, g)
    assert n_fallback == 1
    assert_close(got, torch.zeros(5, 5, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_and_backward_match_cpu():
    for n, scale, tau in ((6, 1.0, 0.5), (100, 2.0, 1.0), (100, 20.0, 1.0), (5, 1.0, 1e-3)):
        x = logits(2, n, n, scale=scale, seed=n)
        w = logits(2, n, n, seed=n + 1)
        grads = []
        for dev in ("cpu", "cuda"):
            # a fresh leaf per device: x.to("cpu") is x itself, so requires_grad_() on it would make the CUDA copy a non-leaf
            xi = x.detach().to(dev).requires_grad_()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = sinkhorn(xi, tau=tau, n_iter=300, tol=1e-12)
                (s * w.to(dev)).sum().backward()
            assert s.device.type == dev and xi.grad.device.type == dev
            assert torch.isfinite(xi.grad).all()
            grads.append(xi.grad.cpu())
        assert_close(grads[1], grads[0], atol=1e-8, rtol=1e-6)
