"""Proximal alternating minimisation (Tatro et al. 2020): curve bend and permutation learned together."""

from __future__ import annotations

import builders
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rebasin import (
    BezierCurve,
    RebasinError,
    evaluate_path,
    interpolate,
    invert,
    permute,
    random_permutation,
    spec_from_model,
)
from rebasin._common import state_of
from rebasin.apps.data import digits_tensors, tensor_loader
from rebasin.apps.training import fit_classifier_, seeded_model
from rebasin.paths import PolyChainCurve
from rebasin.paths._pam_steps import centred_direction
from rebasin.paths.pam import PAMResult, ProximalStep, proximal_alternating_minimization
from rebasin.spec import check_permutations, matrix_to_perm

TS = [i / 10 for i in range(11)]


def mlp() -> nn.Module:
    return builders.mlp(64, [24, 24], 10)


@pytest.fixture(scope="module")
def setup():
    x, y = digits_tensors()
    x, y = x[:384], y[:384]
    train = tensor_loader(x, y, batch_size=64, shuffle=True, seed=0)
    models = [fit_classifier_(seeded_model(mlp, s), train, epochs=12, lr=3e-3, seed=s) for s in (1, 2)]
    loader = tensor_loader(x, y, batch_size=128)  # unshuffled: the same batches on every call
    spec = spec_from_model(models[0], x[:2])
    return models[0], state_of(models[0]), state_of(models[1]), loader, spec


def run(model, sa, sb, loader, spec, **kw) -> PAMResult:
    opts = {"spec": spec, "rounds": 4, "theta_steps": 4, "lr": 1e-2}  # perm_step: ProximalStep(batches=2)
    opts.update(kw)
    return proximal_alternating_minimization(model, sa, sb, loader, **opts)


def mean_loss(model, path, loader) -> float:
    res = evaluate_path(model, None, None, loader, path=path, ts=TS)
    return sum(res.loss) / len(res.loss)


@pytest.mark.parametrize("kind, cls", [("bezier", BezierCurve), ("polychain", PolyChainCurve)])
def test_result_is_a_curve_from_a_to_permuted_b(setup, kind, cls):
    model, sa, sb, loader, spec = setup
    res = run(model, sa, sb, loader, spec, curve=kind, finetune_steps=3)
    assert set(res.perms) == set(spec.perms)
    check_permutations(spec, res.perms, spec.validate(sa))
    assert all(p.dtype == torch.int64 for p in res.perms.values())
    assert isinstance(res.curve, cls)
    end = permute(spec, res.perms, sb)
    for t, ref in ((0.0, sa), (1.0, end)):
        got = res.curve.state_dict_at(t)
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), t
    assert len(res.history) == len(res.changed) == len(res.perm_steps) == 4
    assert all(torch.isfinite(torch.tensor(h)) for h in res.history)
    assert res.finetune_loss == res.finetune_loss and res.time_s > 0  # not NaN: fine-tuning ran
    # the soft matrices are doubly stochastic and round to the returned permutations
    for p, s in res.soft.items():
        assert_close(s.sum(0), torch.ones(s.shape[0]), atol=5e-3, rtol=0)
        assert_close(s.sum(1), torch.ones(s.shape[0]), atol=5e-3, rtol=0)
        assert torch.equal(matrix_to_perm(s), res.perms[p])
    # usable as a path
    assert len(evaluate_path(model, None, None, loader, path=res.curve, ts=[0.0, 0.5, 1.0]).loss) == 3


def test_learned_curve_beats_the_linear_path(setup):
    model, sa, sb, loader, spec = setup
    res = run(model, sa, sb, loader, spec, rounds=5, theta_steps=6)
    end = permute(spec, res.perms, sb)
    curve = mean_loss(model, res.curve, loader)
    line = mean_loss(model, lambda t: interpolate(sa, end, t), loader)
    assert curve < line, (curve, line)


def test_planted_permutation_weight_matching_start_is_kept(setup):
    # B is A with its units shuffled: weight matching finds the inverse exactly, and PAM (whose
    # curve is then the constant A) has nothing to gain by leaving it — the paper's "alignment is
    # locally optimal" observation in its cleanest form.
    model, sa, _, loader, spec = setup
    q = random_permutation(spec, seed=3)
    sb = permute(spec, q, sa)
    target = invert(q)
    res = run(model, sa, sb, loader, spec, init="weight_matching", perm_step=ProximalStep(lr=2.0))
    assert all(torch.equal(res.perms[p], target[p]) for p in target)
    assert sum(res.changed) == 0
    loss_a = mean_loss(model, lambda t: sa, loader)
    assert mean_loss(model, res.curve, loader) < loss_a + 0.05


def test_planted_permutation_from_identity_no_worse_than_identity(setup):
    # From the identity PAM does NOT recover a random planted permutation: its permutation step is
    # a local (linearised) move and the loss along a trained curve is nearly flat in single swaps.
    # What holds: the permutations it ends with give a curve no worse than keeping the identity
    # under the same budget (a tiny step lr never moves the assignment).
    model, sa, _, loader, spec = setup
    q = random_permutation(spec, seed=4)
    sb = permute(spec, q, sa)
    opts = {"init": "identity", "rounds": 8, "theta_steps": 5, "seed": 0}
    pam = run(model, sa, sb, loader, spec, perm_step=ProximalStep(lr=1.0, batches=4), **opts)
    fixed = run(model, sa, sb, loader, spec, perm_step=ProximalStep(lr=1e-9, batches=4), **opts)
    assert sum(fixed.changed) == 0 and all(torch.equal(p, torch.arange(p.numel())) for p in fixed.perms.values())
    assert mean_loss(model, pam.curve, loader) <= 1.05 * mean_loss(model, fixed.curve, loader)


def test_seeded_runs_are_reproducible(setup):
    model, sa, sb, loader, spec = setup
    step = ProximalStep(lr=2.0)
    r1 = run(model, sa, sb, loader, spec, seed=7, init="identity", perm_step=step)
    r2 = run(model, sa, sb, loader, spec, seed=7, init="identity", perm_step=step)
    r3 = run(model, sa, sb, loader, spec, seed=8, init="identity", perm_step=step)
    assert all(torch.equal(r1.perms[p], r2.perms[p]) for p in r1.perms)
    assert all(torch.equal(u, v) for u, v in zip(r1.curve.parameters(), r2.curve.parameters()))
    assert r1.history == r2.history and r1.changed == r2.changed
    assert r1.history != r3.history  # the seed drives the draws of t


def test_theta_steps_zero_keeps_the_initial_bend(setup):
    model, sa, sb, loader, spec = setup
    init = random_permutation(spec, seed=1)
    res = run(model, sa, sb, loader, spec, theta_steps=0, init=init, perm_step=ProximalStep(lr=1e-9))
    assert all(torch.equal(res.perms[p], init[p]) for p in init)
    mid = torch.lerp(sa["0.weight"], permute(spec, init, sb)["0.weight"], 0.5)
    assert_close(res.curve.bends[0][res.curve._trainable_index["0.weight"]].detach(), mid)


def test_inputs_are_not_mutated_batchnorm_and_dropout():
    torch.manual_seed(0)
    factory = lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))  # noqa: E731 - a one-line model factory
    ma, mb = seeded_model(factory, 1), seeded_model(factory, 2)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    loader = tensor_loader(x, y, batch_size=16)
    for m in (ma, mb):  # give the BN buffers non-trivial values
        fit_classifier_(m, loader, epochs=1)
    ma.eval()
    before = {k: v.clone() for k, v in ma.state_dict().items()}
    sa, sb = state_of(ma), state_of(mb)
    sa_copy, sb_copy = {k: v.clone() for k, v in sa.items()}, {k: v.clone() for k, v in sb.items()}
    res = proximal_alternating_minimization(
        ma, sa, mb, loader, example_input=x[:2], rounds=2, theta_steps=2, finetune_steps=1, lr=1e-2
    )
    assert not any(m.training for m in ma.modules())
    assert all(torch.equal(before[k], v) for k, v in ma.state_dict().items())
    assert all(torch.equal(sa_copy[k], sa[k]) for k in sa) and all(torch.equal(sb_copy[k], sb[k]) for k in sb)
    assert all(torch.equal(sb_copy[k], v) for k, v in mb.state_dict().items())
    assert all(torch.isfinite(torch.tensor(h)) for h in res.history)
    # BN running statistics of the final endpoint are B's, permuted (not the train-mode copies)
    end = res.curve.state_dict_at(1.0)
    spec = spec_from_model(ma, x[:2])
    assert torch.equal(end["1.running_mean"], permute(spec, res.perms, sb)["1.running_mean"])


def test_init_dict_is_used_and_not_mutated(setup):
    model, sa, sb, loader, spec = setup
    init = random_permutation(spec, seed=2)
    saved = {k: v.clone() for k, v in init.items()}
    res = run(model, sa, sb, loader, spec, init=init, rounds=1, theta_steps=1, perm_step=ProximalStep(lr=1e-9))
    assert all(torch.equal(init[k], saved[k]) for k in init)
    assert all(torch.equal(res.perms[p], init[p]) for p in init)


def test_curve_state_with_another_end_reuses_the_curve_formula_and_is_differentiable(setup):
    _, sa, sb, _, _ = setup
    curve = BezierCurve(sa, sb)
    own = {k: curve.end[curve._index[k]] for k in curve.keys}
    for t in (0.0, 0.3, 1.0):
        got, ref = curve.state_dict_at(t, end=own), curve.state_dict_at(t)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    leaf = {k: v.clone().requires_grad_(True) for k, v in sb.items()}
    out = curve.state_dict_at(0.6, end=leaf)
    out["2.weight"].sum().backward()
    assert_close(leaf["2.weight"].grad, torch.full_like(sb["2.weight"], 0.36))


def testcentred_direction():
    g = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) + torch.arange(5.0)[:, None]
    d = centred_direction(g)
    assert_close(d.sum(0), torch.zeros(5), atol=1e-6, rtol=0)
    assert_close(d.sum(1), torch.zeros(5), atol=1e-6, rtol=0)
    assert float(d.abs().max()) == pytest.approx(1.0)
    assert torch.equal(centred_direction(torch.ones(3, 3)), torch.zeros(3, 3))


def test_bad_inputs_raise(setup):
    model, sa, sb, loader, spec = setup
    cases = [
        {"curve": "arc"},
        {"rounds": 0},
        {"rounds": True},
        {"theta_steps": -1},
        {"lr": -1.0},
        {"perm_step": {"lr": 1.0}},
        {"init": "random"},
        {"init": {"P0": torch.zeros(24, dtype=torch.long)}},
        {"init": {"nope": torch.arange(24)}},
    ]
    for kw in cases:
        with pytest.raises(RebasinError):
            run(model, sa, sb, loader, spec, **kw)
    for kw in ({"lr": 0.0}, {"tau": float("nan")}, {"n_iter": 0}, {"batches": 0}, {"max_backtracks": -1}):
        with pytest.raises(RebasinError, match="ProximalStep"):
            ProximalStep(**kw)
    bad_b = dict(sb)
    bad_b["0.weight"] = torch.zeros(25, 64)
    with pytest.raises(RebasinError, match="layout"):
        run(model, sa, bad_b, loader, spec)
    with pytest.raises(RebasinError, match="layout"):
        run(model, sa, {k: v for k, v in sb.items() if k != "0.bias"}, loader, spec)
    with pytest.raises(RebasinError, match="no batches"):
        run(model, sa, sb, [], spec)
    with pytest.raises(RebasinError, match="targets"):
        run(model, sa, sb, [torch.zeros(4, 64)], spec)
    with pytest.raises(RebasinError):
        run(model, sa, sb, None, spec)
