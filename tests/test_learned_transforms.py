"""Learned orthogonal transforms (``rebasin.matching.learned_transforms``): the residual stream's rotation trained
on the loss along the linear path, starting from transform_matching's Procrustes answer.

A tiny pre-LN residual MLP (LayerNorm scales and shifts trained, so a wrong fold shows) on a synthetic
4-class problem, folded by ``fold_layernorm`` so that its stream admits orthogonal maps; the hidden units
behind the ReLU stay permutations.
"""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rebasin import RebasinError, weight_matching
from rebasin.matching import TransformRebasin, cayley, learn_transforms, transform_matching
from rebasin.spec import apply_transforms, random_orthogonal, random_permutation
from rebasin.trace import fold_layernorm, symmetry_kinds, trace_model


class PreLN(nn.Module):
    def __init__(self, d: int = 12, h: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.ln1, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)
        self.ln2, self.fc3, self.fc4 = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)
        self.ln, self.out = nn.LayerNorm(d), nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + self.fc2(torch.relu(self.fc1(self.ln1(x))))
        x = x + self.fc4(torch.relu(self.fc3(self.ln2(x))))
        return self.out(self.ln(x))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g)
    x = torch.randn(256, 6, generator=g)
    y = (x @ w + 0.3 * torch.randn(256, 4, generator=g)).argmax(1)
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]


BATCHES = _data()


def _trained(seed: int, steps: int = 40) -> nn.Module:
    torch.manual_seed(seed)
    model = PreLN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(steps):
        x, y = BATCHES[i % len(BATCHES)]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return fold_layernorm(model.eval(), BATCHES[0][0][:4])


@pytest.fixture(scope="module")
def pair():
    fa, fb = _trained(0), _trained(1)
    tr = trace_model(fa, BATCHES[0][0][:4])
    kinds = symmetry_kinds(fa, trace=tr)
    stream = tr.spec.axes["out.weight"][1]
    assert kinds.kinds[stream] == "orthogonal"
    return fa, fb, tr.spec, kinds, stream


def _snapshot(*models: nn.Module) -> list[tuple[dict[str, torch.Tensor], dict[nn.Module, bool]]]:
    return [({k: v.clone() for k, v in m.state_dict().items()}, {s: s.training for s in m.modules()}) for m in models]


def _unchanged(models: tuple[nn.Module, ...], snap: list) -> None:
    for m, (state, flags) in zip(models, snap):
        for k, v in m.state_dict().items():
            assert torch.equal(v, state[k]), k
        assert {s: s.training for s in m.modules()} == flags
        assert all(p.grad is None for p in m.parameters())


def _midpoint_loss(model: nn.Module, a: dict, b: dict) -> float:
    state = {k: 0.5 * a[k] + 0.5 * b[k] for k in a}
    with torch.no_grad():
        return sum(float(F.cross_entropy(functional_call(model, state, (x,)), y)) for x, y in BATCHES) / len(BATCHES)


def test_learned_stream_is_orthogonal_and_beats_procrustes(pair) -> None:
    fa, fb, spec, kinds, stream = pair
    snap = _snapshot(fa, fb)
    res = learn_transforms(fa, fb, BATCHES, spec=spec, kinds=kinds, cost="midpoint", epochs=5, lr=1e-2, seed=0)
    _unchanged((fa, fb), snap)
    assert res.learned == (stream,)
    q = res.transforms[stream]
    assert q.dtype == torch.float32 and q.shape == (12, 12)
    torch.testing.assert_close(q.T @ q, torch.eye(12), atol=1e-5, rtol=0)
    # the other classes keep transform_matching's permutations
    for p in spec.perms:
        if p != stream:
            assert torch.equal(res.transforms[p], res.init[p])
    assert len(res.history) == 5 * len(BATCHES)
    a, b = fa.state_dict(), fb.state_dict()
    procrustes = transform_matching(spec, a, b, kinds=kinds, use={stream: "orthogonal"})
    assert all(torch.equal(torch.as_tensor(procrustes[p]), torch.as_tensor(res.init[p])) for p in spec.perms)
    before = _midpoint_loss(fa, a, apply_transforms(spec, procrustes, b, kinds=kinds))
    after = _midpoint_loss(fa, a, res.state_b)
    assert after < before - 0.01, (before, after)
    for k, v in apply_transforms(spec, res.transforms, b, kinds=kinds).items():
        torch.testing.assert_close(res.state_b[k], v)
    # the transformed B computes B's function
    x = BATCHES[0][0]
    with torch.no_grad():
        torch.testing.assert_close(functional_call(fb, res.state_b, (x,)), fb(x), atol=1e-4, rtol=1e-4)


def test_default_start_is_not_below_weight_matching(pair) -> None:
    # the default init is transform_matching's (started from weight matching); an explicit init= wins
    fa, fb, spec, kinds, stream = pair
    a, b = fa.state_dict(), fb.state_dict()

    def objective(trans: dict) -> float:
        moved = apply_transforms(spec, trans, b, kinds=kinds)
        return sum(float((a[k].double() * moved[k].double()).sum()) for k in a if a[k].is_floating_point())

    mod = TransformRebasin(fa, fb, spec=spec, kinds=kinds)
    assert objective(dict(mod.init)) >= objective(weight_matching(spec, a, b))
    given = TransformRebasin(fa, fb, spec=spec, kinds=kinds, init={stream: torch.eye(12)}).init
    assert set(given) == {stream} and torch.equal(given[stream], torch.eye(12))


@pytest.mark.parametrize("parametrization", ["cayley", "expm"])
def test_seeded_reproducible(pair, parametrization: str) -> None:
    fa, fb, spec, kinds, stream = pair

    def run(seed: int):
        return learn_transforms(fa, fb, BATCHES, spec=spec, kinds=kinds, cost="random", steps=6, seed=seed,
                                parametrization=parametrization)

    r1, r2, r3 = run(3), run(3), run(4)
    assert r1.history == r2.history
    assert torch.equal(r1.transforms[stream], r2.transforms[stream])
    assert r1.history != r3.history  # the seed draws the points t along the path


def test_planted_rotation_stays_at_the_exact_answer(pair) -> None:
    fa, _, spec, kinds, stream = pair
    a = fa.state_dict()
    q = random_orthogonal(12, seed=5)
    plant = dict(random_permutation(spec, seed=6))
    plant[stream] = q
    b = apply_transforms(spec, plant, a, kinds=kinds)
    # at the exact answer the path is constant: the task loss has no first-order reason to move (float64)
    a64, b64 = ({k: v.double() for k, v in s.items()} for s in (a, b))
    m64 = copy.deepcopy(fa).double()
    mod = TransformRebasin(m64, m64, spec=spec, kinds=kinds, cost="midpoint", state_a=a64, state_b=b64)
    assert (mod.orthogonal_maps()[stream] - q.T.double()).abs().max() < 1e-5
    x, y = BATCHES[0]
    mod.compute_cost((x.double(), y)).backward()
    assert mod.free["c0"].grad.abs().max() < 1e-6
    # a cost whose minimum is the exact answer (A's outputs along the whole path): the fit stays there
    with torch.no_grad():
        targets = [fa(xb) for xb, _ in BATCHES]

    def distill(module: TransformRebasin, batch) -> torch.Tensor:
        i = next(j for j, (xb, _) in enumerate(BATCHES) if xb is batch[0])
        t = float(torch.rand((), generator=gen))
        return (module(batch[0], t=t) - targets[i]).pow(2).mean()

    gen = torch.Generator().manual_seed(0)
    res = learn_transforms(fa, fa, BATCHES, spec=spec, kinds=kinds, cost=distill, epochs=3, lr=1e-3, state_b=b)
    assert (res.transforms[stream] - q.T).abs().max() < 5e-3
    assert max(res.history) < 1e-5
    for k in a:
        torch.testing.assert_close(res.state_b[k], a[k], atol=5e-3, rtol=0)


def test_cayley_gradient() -> None:
    m = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: cayley(w - w.T), (m,))
    q = cayley(m - m.T).detach()
    torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(cayley(torch.zeros(3, 3)), torch.eye(3))
    # the matrix exponential is the other parametrisation: both orthogonal, equal to first order at zero
    small = 1e-4 * (m - m.T).detach()
    torch.testing.assert_close(cayley(small), torch.linalg.matrix_exp(-2 * small), atol=1e-10, rtol=0)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    tests = finder.find(cayley, globs={"torch": torch, "cayley": cayley})
    assert sum(len(t.examples) for t in tests) == 3
    for t in tests:
        runner.run(t)
    assert runner.failures == 0


def test_non_finite_fit_is_one_error_and_leaves_the_models(pair) -> None:
    fa, fb, spec, kinds, _ = pair
    snap = _snapshot(fa, fb)
    with pytest.raises(RebasinError, match="the cost is nan at step 1; the fit stopped"):
        learn_transforms(fa, fb, BATCHES, spec=spec, kinds=kinds, loss_fn=lambda out, y: out.sum() * float("nan"))
    _unchanged((fa, fb), snap)

    def bad_gradient(module: TransformRebasin, batch) -> torch.Tensor:  # finite value, NaN gradient at zero
        return F.cross_entropy(module(batch[0], t=0.5), batch[1]) + module.free["c0"].abs().sqrt().sum()

    mod = TransformRebasin(fa, fb, spec=spec, kinds=kinds, cost=bad_gradient)
    with pytest.raises(RebasinError, match="became non-finite at step 1"):
        mod.fit(BATCHES)
    assert bool(torch.isfinite(mod.free["c0"]).all())  # the last good maps are kept
    _unchanged((fa, fb), snap)


def test_refusals(pair) -> None:
    fa, fb, spec, kinds, stream = pair
    hidden = spec.axes["fc1.weight"][0]
    with pytest.raises(RebasinError, match=r"admits transforms up to 'permutation', not 'orthogonal': torch.relu after module 'fc1'"):
        TransformRebasin(fa, fb, spec=spec, kinds=kinds, learn=[hidden])
    with pytest.raises(RebasinError, match="unknown parametrization 'qr'"):
        TransformRebasin(fa, fb, spec=spec, kinds=kinds, parametrization="qr")
    with pytest.raises(RebasinError, match="unknown class 'nope'"):
        TransformRebasin(fa, fb, spec=spec, kinds=kinds, learn=["nope"])
    with pytest.raises(RebasinError, match="unknown cost"):
        TransformRebasin(fa, fb, spec=spec, kinds=kinds, cost="l2")
    with pytest.raises(RebasinError, match="needs a loader"):
        TransformRebasin(fa, fb, spec=spec, kinds=kinds).fit(None)
    # the unfolded model: LayerNorm keeps the stream a permutation, nothing to learn
    torch.manual_seed(0)
    raw = PreLN().eval()
    tr = trace_model(raw, BATCHES[0][0][:4])
    with pytest.raises(RebasinError, match="no class of the spec admits an orthogonal map.*LayerNorm"):
        TransformRebasin(raw, raw, spec=tr.spec, kinds=symmetry_kinds(raw, trace=tr))


def test_start_from_a_signed_permutation_and_run_the_module(pair) -> None:
    fa, fb, spec, kinds, stream = pair
    a, b = fa.state_dict(), fb.state_dict()
    signed = transform_matching(spec, a, b, kinds=kinds)  # a signed permutation of the stream
    mod = TransformRebasin(fa, fb, spec=spec, kinds=kinds, learn=[stream], init=signed, cost="midpoint").eval()
    start = mod.orthogonal_maps()[stream]
    assert set(start.abs().unique().tolist()) == {0.0, 1.0}  # the signed permutation's matrix
    x = BATCHES[0][0]
    with torch.no_grad():
        torch.testing.assert_close(mod(x, t=0.0), fa(x))
        torch.testing.assert_close(mod(x), fb(x), atol=1e-5, rtol=1e-5)
    history = mod.fit(BATCHES, steps=5, lr=1e-2)
    assert len(history) == 5 and not mod.training  # the module's mode is restored
    assert (mod.transforms()[stream] - start).abs().max() > 1e-3  # it moved
    for k, v in mod.aligned_state_dict().items():
        torch.testing.assert_close(v, apply_transforms(spec, mod.transforms(), b, kinds=kinds)[k])
