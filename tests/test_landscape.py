"""Landscape metrics: mode connectivity, CKA, Hessian top eigenvalue and trace (Yang et al. 2021)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

from rebasin import BezierCurve, RebasinError, landscape, permute, random_permutation, spec_from_model
from rebasin._common import state_of
from rebasin.apps.data import tensor_loader
from rebasin.apps.models import MLP
from rebasin.apps.training import fit_classifier_, seeded_model
from rebasin.landscape import cka, hessian_top_eigenvalue, hessian_trace, mode_connectivity


def clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def assert_unchanged(model: nn.Module, before: dict, flags: list[bool]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Hessian


class Quadratic(nn.Module):
    """loss_fn(model(x), y) = 1/2 theta^T H theta, so the Hessian is exactly H."""

    def __init__(self, h: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(h.shape[0], generator=g, dtype=h.dtype))
        self.register_buffer("h", h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.theta @ self.h @ self.theta + 0.0 * x.sum()


def quad_loss(out, y):
    return out


def spectrum_matrix(eigs, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


DUMMY = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))


@pytest.mark.parametrize("eigs", [[5.0, -2.0, 1.0, 0.5, 3.0], [-7.0, 3.0, 1.0, -0.5], [0.1, 2.0, 2.5, 2.4]])
def test_hessian_of_a_quadratic_is_exact(eigs):
    h = spectrum_matrix(eigs)
    model = Quadratic(h)
    top = max(eigs, key=abs)  # power iteration: largest magnitude, sign kept
    res = hessian_top_eigenvalue(model, DUMMY, loss_fn=quad_loss, n_iter=5000, tol=1e-13)
    assert res.converged and 1 <= res.n_iter < 5000
    assert_close(float(res), top, rtol=1e-6, atol=0)
    v = torch.cat([t.reshape(-1) for t in res.eigenvector.values()])
    assert_close(h @ v, top * v, rtol=0, atol=1e-4)  # it is an eigenvector
    assert_close(hessian_trace(model, DUMMY, loss_fn=quad_loss, method="exact").trace, sum(eigs), rtol=1e-12, atol=1e-12)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_unbiased_otherwise():
    diag = Quadratic(torch.diag(torch.tensor([3.0, -1.0, 0.25, 8.0], dtype=torch.float64)))
    for seed in range(3):
        est = hessian_trace(diag, DUMMY, loss_fn=quad_loss, n_samples=3, seed=seed)
        assert est.trace == pytest.approx(10.25, abs=1e-12) and est.std_error == pytest.approx(0.0, abs=1e-12)
    h = spectrum_matrix([4.0, 1.0, -2.0, 0.5, 3.0], seed=3)
    est = hessian_trace(Quadratic(h), DUMMY, loss_fn=quad_loss, n_samples=4000, seed=1)
    # per-sample variance of z^T H z with Rademacher z is 2 (||H||_F^2 - sum_j H_jj^2)
    sd = math.sqrt(2 * (h.pow(2).sum() - h.diagonal().pow(2).sum()))
    assert est.std_error == pytest.approx(sd / math.sqrt(4000), rel=0.1)
    assert abs(est.trace - 6.5) < 4 * est.std_error
    again = hessian_trace(Quadratic(h), DUMMY, loss_fn=quad_loss, n_samples=50, seed=7)
    assert again == hessian_trace(Quadratic(h), DUMMY, loss_fn=quad_loss, n_samples=50, seed=7)
    assert again.trace != hessian_trace(Quadratic(h), DUMMY, loss_fn=quad_loss, n_samples=50, seed=8).trace


def tiny_mlp() -> nn.Module:
    return seeded_model(lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), 0)


def tiny_data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def full_hessian(model: nn.Module, x, y, loss_fn=nn.functional.cross_entropy) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        parts = torch.split(flat, [math.prod(s) for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0)


@functools.lru_cache(maxsize=1)
def mlp_case():
    model = tiny_mlp()
    x, y = tiny_data()
    h = full_hessian(model, x, y)
    return model, x, y, h


def test_hessian_of_a_tiny_mlp_matches_autograd():
    model, x, y, h = mlp_case()
    eigs = torch.linalg.eigvalsh(h)
    top = float(eigs[eigs.abs().argmax()])
    before, flags = clone(model.state_dict()), [m.training for m in model.modules()]
    default = hessian_top_eigenvalue(model, (x, y), loss_fn=nn.functional.cross_entropy)  # n_iter=100, tol=1e-4
    assert default.converged
    assert_close(default.eigenvalue, top, rtol=1e-3, atol=0)
    res = hessian_top_eigenvalue(model, (x, y), loss_fn=nn.functional.cross_entropy, n_iter=3000, tol=1e-12)
    assert res.converged
    assert_close(res.eigenvalue, top, rtol=1e-9, atol=0)
    again = hessian_top_eigenvalue(model, (x, y), loss_fn=nn.functional.cross_entropy, n_iter=3000, tol=1e-12)
    assert again.eigenvalue == res.eigenvalue and again.n_iter == res.n_iter  # seeded start vector
    assert all(torch.equal(again.eigenvector[k], v) for k, v in res.eigenvector.items())
    other = hessian_top_eigenvalue(model, (x, y), loss_fn=nn.functional.cross_entropy, n_iter=3000, tol=1e-12, seed=1)
    assert not torch.equal(other.eigenvector["0.weight"], res.eigenvector["0.weight"])
    exact = hessian_trace(model, (x, y), loss_fn=nn.functional.cross_entropy, method="exact")
    assert exact.n_samples == 51
    assert_close(exact.trace, float(h.trace()), rtol=1e-10, atol=0)
    # Hutchinson: unbiased, so check against the exact trace within 4 standard errors
    est = hessian_trace(model, (x, y), loss_fn=nn.functional.cross_entropy, n_samples=400, seed=0)
    assert est.std_error > 0 and abs(est.trace - float(h.trace())) < 4 * est.std_error
    assert_unchanged(model, before, flags)


@pytest.mark.filterwarnings("ignore:hessian_top_eigenvalue")
def test_hessian_batches_state_device_and_eval_mode():
    model, x, y, h = mlp_case()
    # a list of unequal batches is the Hessian of the mean loss over all examples
    split = [(x[:5], y[:5]), (x[5:], y[5:])]
    assert_close(hessian_trace(model, split, loss_fn=nn.functional.cross_entropy, method="exact").trace,
                 float(h.trace()), rtol=1e-10, atol=0)  # fmt: skip
    one = hessian_top_eigenvalue(model, (x, y), loss_fn=nn.functional.cross_entropy, n_iter=50, tol=0.0, seed=3)
    two = hessian_top_eigenvalue(model, split, loss_fn=nn.functional.cross_entropy, n_iter=50, tol=0.0, seed=3)
    assert_close(two.eigenvalue, one.eigenvalue, rtol=1e-9, atol=0)
    # state= evaluates another point; the model's own weights are not used
    other = seeded_model(lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), 5)
    h_other = full_hessian(other, x, y)
    got = hessian_trace(model, (x, y), loss_fn=nn.functional.cross_entropy, state=other.state_dict(), method="exact")
    assert_close(got.trace, float(h_other.trace()), rtol=1e-10, atol=0)
    assert hessian_top_eigenvalue(model, (x, y), loss_fn=nn.functional.cross_entropy, device="cpu", n_iter=3).n_iter == 3
    with torch.no_grad():  # works from inside no_grad blocks too
        assert_close(hessian_trace(model, (x, y), loss_fn=nn.functional.cross_entropy, method="exact").trace,
                     float(h.trace()), rtol=1e-10, atol=0)  # fmt: skip
    # dropout and BatchNorm in eval mode: deterministic, and the training flags come back
    net = seeded_model(lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5),
                                             nn.Linear(6, 3)).double(), 1)  # fmt: skip
    net.train()
    before, flags = clone(net.state_dict()), [m.training for m in net.modules()]
    a = hessian_trace(net, (x, y), loss_fn=nn.functional.cross_entropy, method="exact").trace
    b = hessian_trace(net, (x, y), loss_fn=nn.functional.cross_entropy, method="exact").trace
    ref = float(full_hessian(copy.deepcopy(net).eval(), x, y).trace())
    assert a == b and a == pytest.approx(ref, rel=1e-10)
    assert_unchanged(net, before, flags)


def test_hessian_only_trainable_parameters_and_tied_weights():
    x, y = tiny_data()
    x = x[:, :3]
    ce = nn.functional.cross_entropy
    net = seeded_model(lambda: nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double(), 2)
    h = full_hessian(net, x, y)  # order: 0.weight (9), 0.bias (3), 2.weight (9), 2.bias (3)
    net.get_submodule("0").requires_grad_(False)
    got = hessian_trace(net, (x, y), loss_fn=ce, method="exact")
    assert got.n_samples == 12 and got.trace == pytest.approx(float(h[12:, 12:].trace()), rel=1e-10)
    # tied weights: one parameter used twice is one block of the Hessian, differentiated through both uses
    lin = nn.Linear(3, 3).double()
    tied = nn.Sequential(lin, nn.Tanh(), lin)
    assert len(tied.state_dict()) == 4 and len(list(tied.parameters())) == 2
    h_tied = full_hessian(tied, x, y)
    eigs = torch.linalg.eigvalsh(h_tied)
    assert_close(hessian_trace(tied, (x, y), loss_fn=ce, method="exact").trace, float(h_tied.trace()), rtol=1e-10, atol=0)
    res = hessian_top_eigenvalue(tied, (x, y), loss_fn=ce, n_iter=3000, tol=1e-12)
    assert_close(res.eigenvalue, float(eigs[eigs.abs().argmax()]), rtol=1e-8, atol=0)


def test_hessian_errors():
    model, x, y, _ = mlp_case()
    ce = nn.functional.cross_entropy
    with pytest.raises(RebasinError, match="empty"):
        hessian_trace(model, [], loss_fn=ce)
    with pytest.raises(RebasinError, match="targets"):
        hessian_trace(model, x, loss_fn=ce)
    with pytest.raises(RebasinError, match="scalar"):
        hessian_trace(model, (x, y), loss_fn=lambda o, t: o, method="exact")
    with pytest.raises(RebasinError, match="method"):
        hessian_trace(model, (x, y), loss_fn=ce, method="hutch++")
    with pytest.raises(RebasinError, match="n_samples"):
        hessian_trace(model, (x, y), loss_fn=ce, n_samples=0)
    with pytest.raises(RebasinError, match="n_iter"):
        hessian_top_eigenvalue(model, (x, y), loss_fn=ce, n_iter=0)
    with pytest.raises(RebasinError, match="tol"):
        hessian_top_eigenvalue(model, (x, y), loss_fn=ce, tol=-1.0)
    with pytest.raises(RebasinError, match="missing keys"):
        hessian_trace(model, (x, y), loss_fn=ce, state={"0.weight": torch.zeros(6, 4)})
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(RebasinError, match="no trainable"):
        hessian_trace(frozen, (x, y), loss_fn=ce)
    with pytest.warns(UserWarning, match="raise n_iter"):
        res = hessian_top_eigenvalue(model, (x, y), loss_fn=ce, n_iter=2, tol=0.0)
    assert not res.converged and res.n_iter == 2


# ----------------------------------------------------------------------------------------------
# CKA


def cka_reference(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al.'s linear CKA from the Gram matrices, written independently."""
    n = x.shape[0]
    hmat = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = hmat @ (x @ x.T) @ hmat, hmat @ (y @ y.T) @ hmat  # noqa: E741 - K and L are the centred Gram matrices of CKA
    return float((k * l).sum() / (k.norm() * l.norm()))


def feature_pair():
    a = seeded_model(lambda: MLP(5, [12, 7], 3), 0)
    b = seeded_model(lambda: MLP(5, [12, 7], 3), 1)
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(2))
    return a, b, x, tensor_loader(x, torch.zeros(60, dtype=torch.long), batch_size=16)


def test_cka_matches_the_gram_formula_and_is_a_similarity():
    a, b, x, loader = feature_pair()
    with torch.no_grad():
        fa, fb = a.layers[:2](x).double(), b.layers[:2](x).double()
        oa, ob = a(x).double(), b(x).double()
    got = cka(a, b, loader, layer="layers.1")
    assert_close(got, cka_reference(fa, fb), rtol=1e-10, atol=0)
    assert 0.0 < got < 1.0
    assert_close(cka(b, a, loader, layer="layers.1"), got, rtol=1e-12, atol=0)
    assert_close(cka(a, b, loader), cka_reference(oa, ob), rtol=1e-10, atol=0)
    assert_close(cka(a, a, loader), 1.0, rtol=1e-12, atol=1e-12)
    # layer_b: compare A's first hidden layer with B's second
    with torch.no_grad():
        fb2 = b.layers[:4](x).double()
    assert_close(cka(a, b, loader, layer="layers.1", layer_b="layers.3"), cka_reference(fa, fb2), rtol=1e-10, atol=0)
    # max_batches: only the first batch
    assert_close(cka(a, b, loader, layer="layers.1", max_batches=1), cka_reference(fa[:16], fb[:16]),
                 rtol=1e-10, atol=0)  # fmt: skip


def test_cka_gram_fallback_and_batching_agree(monkeypatch):
    a, b, x, loader = feature_pair()
    streamed = cka(a, b, loader, layer="layers.0")
    one_batch = cka(a, b, [x], layer="layers.0")
    monkeypatch.setattr(landscape.similarity, "_CKA_FEATURE_BUDGET", 0)
    gram = cka(a, b, loader, layer="layers.0")
    assert_close(streamed, one_batch, rtol=1e-10, atol=0)
    assert_close(streamed, gram, rtol=1e-10, atol=0)


def test_cka_invariant_to_permuted_units_and_isotropic_scaling():
    a, b, x, loader = feature_pair()
    spec = spec_from_model(a, x[:2])
    perms = random_permutation(spec, seed=4)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    pa = MLP(5, [12, 7], 3)
    pa.load_state_dict(permute(spec, perms, a.state_dict()))
    for layer in ("layers.0", "layers.1", "layers.3"):
        assert_close(cka(a, pa, loader, layer=layer), 1.0, rtol=1e-10, atol=1e-10)
        assert cka(a, b, loader, layer=layer) < 0.999  # the test can fail: unrelated nets are not at 1
    scaled = copy.deepcopy(b)
    with torch.no_grad():
        scaled.layers[4].weight.mul_(3.5)
        scaled.layers[4].bias.mul_(3.5)
    assert_close(cka(a, scaled, loader), cka(a, b, loader), rtol=1e-6, atol=0)  # float32 features


def test_cka_does_not_mutate_and_runs_in_eval_mode():
    a = seeded_model(lambda: MLP(5, [8], 3, norm="batchnorm", dropout=0.5), 0)
    a.train()
    before, flags = clone(a.state_dict()), [m.training for m in a.modules()]
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    first = cka(a, a, [x[:20], x[20:]], layer="layers.2")
    assert_close(first, 1.0, rtol=1e-12, atol=1e-12)  # dropout off: both passes see the same features
    assert_unchanged(a, before, flags)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(self.lin(x))


class DropOne(nn.Module):
    def forward(self, x):
        return x[:-1]


def test_cka_errors():
    a, b, x, loader = feature_pair()
    with pytest.raises(RebasinError, match="no submodule 'layers.9'"):
        cka(a, b, loader, layer="layers.9")
    with pytest.raises(RebasinError, match="model_b has no submodule"):
        cka(a, b, loader, layer="layers.1", layer_b="nope")
    with pytest.raises(RebasinError, match="no samples"):
        cka(a, b, [])
    with pytest.raises(RebasinError, match="samples"):
        cka(a, nn.Sequential(a, DropOne()), loader)
    dead = copy.deepcopy(a)
    with torch.no_grad():
        dead.layers[0].weight.zero_()
    with pytest.raises(RebasinError, match="model_b does not vary"):
        cka(a, dead, loader, layer="layers.0")
    with pytest.raises(RebasinError, match="ran 2 times"):
        cka(Twice(), Twice(), [torch.randn(8, 3)], layer="lin")
    with pytest.raises(RebasinError, match="max_batches"):
        cka(a, b, loader, max_batches=0)


# ----------------------------------------------------------------------------------------------
# mode connectivity


def xor_net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


@functools.lru_cache(maxsize=1)
def trained_pair():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    train = tensor_loader(x[:384], y[:384], batch_size=64, shuffle=True)
    test = [(x[384:], y[384:])]
    a, b = (fit_classifier_(seeded_model(xor_net, s), train, epochs=20, lr=1e-2, seed=s) for s in (1, 2))
    a.zero_grad(set_to_none=True)  # training left gradients behind; the checks below want None
    return a, state_of(a), state_of(b), train, test


def test_mc_is_zero_for_identical_models():
    model, sa, _, _, test = trained_pair()
    for metric in ("error", "loss"):
        res = mode_connectivity(model, sa, clone(sa), test, curve="linear", metric=metric, num_points=7)
        assert res.mc == 0.0 and res.t_star == 0.0 and res.curve is None and res.fit is None
        assert len(set(res.values)) == 1 and res.endpoint_mean == res.values[0]
    assert mode_connectivity(model, model, model, test, curve="linear", num_points=3).mc == 0.0  # modules work too


@pytest.mark.parametrize("metric", ["error", "loss"])
def test_mc_negative_across_a_barrier_and_matches_the_definition(metric):
    model, sa, sb, _, test = trained_pair()
    before, flags = clone(model.state_dict()), [m.training for m in model.modules()]
    sa0, sb0 = clone(sa), clone(sb)
    res = mode_connectivity(model, sa, sb, test, curve="linear", metric=metric, num_points=11)
    assert res.ts == tuple(i / 10 for i in range(11)) and res.metric == metric
    v = torch.tensor(res.values, dtype=torch.float64)
    if metric == "error":
        assert_close(v, 1 - torch.tensor(res.result.accuracy, dtype=torch.float64), rtol=0, atol=1e-12)
        assert bool(((v >= 0) & (v <= 1)).all())
    mean = 0.5 * (v[0] + v[-1])
    i = int((v - mean).abs().argmax())
    assert res.endpoint_mean == pytest.approx(float(mean), abs=1e-12)
    assert res.mc == pytest.approx(float(mean - v[i]), abs=1e-12) and res.t_star == res.ts[i]
    assert res.mc < -0.1 and 0.0 < res.t_star < 1.0  # a clear barrier between independent nets
    assert_unchanged(model, before, flags)
    for s, s0 in ((sa, sa0), (sb, sb0)):
        assert all(torch.equal(s[k], s0[k]) for k in s0)


def test_mc_with_trained_and_prebuilt_curves():
    model, sa, sb, train, test = trained_pair()
    linear = mode_connectivity(model, sa, sb, test, curve="linear", num_points=5)
    res = mode_connectivity(model, sa, sb, test, curve="bezier", fit_loader=train, epochs=4, lr=1e-2, num_points=5)
    assert isinstance(res.curve, BezierCurve) and res.fit is not None and res.fit.steps == 4 * len(train)
    assert res.values[0] == linear.values[0] and res.values[-1] == linear.values[-1]
    assert res.mc > linear.mc  # the trained curve lowers the barrier
    again = mode_connectivity(model, None, None, test, path=res.curve, num_points=5)
    assert again.values == res.values and again.curve is res.curve and again.fit is None
    checked = mode_connectivity(model, sa, sb, test, path=res.curve, num_points=5)
    assert checked.values == res.values
    called = mode_connectivity(model, sa, sb, test, path=res.curve.state_dict_at, num_points=5)  # a callable path
    assert called.values == res.values
    poly = mode_connectivity(model, sa, sb, test, curve="polychain", epochs=1, num_points=3, seed=1)
    assert type(poly.curve).__name__ == "PolyChainCurve"


def test_mc_errors():
    model, sa, sb, _, test = trained_pair()
    with pytest.raises(RebasinError, match="unknown curve"):
        mode_connectivity(model, sa, sb, test, curve="spline")
    with pytest.raises(RebasinError, match="unknown metric"):
        mode_connectivity(model, sa, sb, test, curve="linear", metric="accuracy")
    with pytest.raises(RebasinError, match="both state_a and state_b"):
        mode_connectivity(model, sa, None, test, curve="linear")
    with pytest.raises(RebasinError, match="needs state_a and state_b"):
        mode_connectivity(model, None, None, test, curve="linear")
    with pytest.raises(RebasinError, match="state_dict_at"):
        mode_connectivity(model, sa, sb, test, curve=3)
    with pytest.raises(RebasinError, match="num_points"):
        mode_connectivity(model, sa, sb, test, curve="linear", num_points=1)
    curve = BezierCurve(sa, sb)
    with pytest.raises(RebasinError, match="not state_b"):
        mode_connectivity(model, sa, sa, test, path=curve)
    with pytest.raises(RebasinError, match="not both"):
        mode_connectivity(model, sa, sb, test, curve="bezier", path=curve)
    with pytest.raises(RebasinError, match="path="):
        mode_connectivity(model, sa, sb, test, curve=curve)  # a curve object is a path, not a kind
    x, y = test[0]
    regression = [(x, torch.randn(len(x), 2))]
    with pytest.raises(RebasinError, match="classification"):
        mode_connectivity(model, sa, sb, regression, curve="linear", loss_fn=nn.functional.mse_loss)
    ok = mode_connectivity(model, sa, sb, regression, curve="linear", metric="loss", loss_fn=nn.functional.mse_loss)
    assert ok.metric == "loss" and math.isfinite(ok.mc)
