"""One name per concept: the 0.2 names work, and the 0.1 spellings the docs used still work for one release.

Each deprecated spelling warns (a DeprecationWarning pointing at the caller's line) and gives exactly the
result of the new one; giving both spellings is a TypeError, as for any argument given twice.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

from rebasin import BezierCurve, evaluate_path, fit_curve, reset_bn_stats
from rebasin._common import state_of
from rebasin.apps.data import tensor_loader
from rebasin.apps.models import MLP
from rebasin.apps.training import seeded_model
from rebasin.landscape import hessian_top_eigenvalue, hessian_trace, mode_connectivity
from rebasin.paths import PolyChainCurve, ProximalStep, proximal_alternating_minimization, weight_adjusted_path


def _data(n=48, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _pair(factory=lambda: MLP(5, [8], 3)):
    return seeded_model(factory, 1), seeded_model(factory, 2)


def _deprecated(call, match):
    """``call()`` under a DeprecationWarning matching ``match``, raised at this file's line."""
    with pytest.warns(DeprecationWarning, match=match) as record:
        out = call()
    assert all(w.filename == __file__ for w in record if issubclass(w.category, DeprecationWarning)), [
        w.filename for w in record
    ]
    return out


def _no_deprecation(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return call()


# ---------------------------------------------------------------------------------------------- Hessian


def test_hessian_loss_fn_is_a_keyword_with_the_cross_entropy_default():
    model, _ = _pair()
    batch = _data()
    assert list(inspect.signature(hessian_top_eigenvalue).parameters)[:3] == ["model", "batch", "loss_fn"]
    assert list(inspect.signature(hessian_trace).parameters)[:3] == ["model", "batch", "loss_fn"]
    default = _no_deprecation(lambda: hessian_trace(model, batch, method="exact"))
    explicit = hessian_trace(model, batch, loss_fn=F.cross_entropy, method="exact")
    assert default == explicit
    with pytest.warns(UserWarning, match="no convergence in 7 iterations") as record:
        new = _no_deprecation(lambda: hessian_top_eigenvalue(model, batch, n_iter=7, tol=0.0))
    assert new.n_iter == 7 and not hasattr(new, "iterations")
    assert record[0].filename == __file__  # the warning names the caller's line, through the renaming wrapper


@pytest.mark.filterwarnings("ignore:hessian_top_eigenvalue. no convergence")
def test_hessian_positional_loss_fn_and_iters_are_deprecated_aliases():
    model, _ = _pair()
    batch = _data()
    mse = lambda out, y: (out - F.one_hot(y, 3).float()).pow(2).mean()  # noqa: E731 - a one-line loss
    new = hessian_top_eigenvalue(model, batch, loss_fn=mse, n_iter=30, tol=0.0, seed=2)
    old = _deprecated(lambda: hessian_top_eigenvalue(model, mse, batch, iters=30, tol=0.0, seed=2),
                      r"hessian_top_eigenvalue\(model, loss_fn, batch\)|iters=")  # fmt: skip
    assert old.eigenvalue == new.eigenvalue and old.n_iter == new.n_iter
    assert all(torch.equal(old.eigenvector[k], v) for k, v in new.eigenvector.items())
    only_iters = _deprecated(lambda: hessian_top_eigenvalue(model, batch, loss_fn=mse, iters=30, tol=0.0, seed=2),
                             r"use hessian_top_eigenvalue\(n_iter=")  # fmt: skip
    assert only_iters.eigenvalue == new.eigenvalue
    trace_new = hessian_trace(model, batch, loss_fn=mse, n_samples=5, seed=1)
    trace_old = _deprecated(lambda: hessian_trace(model, mse, batch, n_samples=5, seed=1),
                            r"use hessian_trace\(model, batch, loss_fn=loss_fn\)")  # fmt: skip
    assert trace_old == trace_new
    with pytest.raises(TypeError, match="n_iter"):
        hessian_top_eigenvalue(model, batch, iters=3, n_iter=3)
    with pytest.raises(TypeError, match="loss_fn"):
        hessian_trace(model, mse, batch, loss_fn=mse)


# ---------------------------------------------------------------------------------------------- mode connectivity


def test_mode_connectivity_num_points_and_its_deprecated_alias():
    model, other = _pair()
    x, y = _data()
    sa, sb = state_of(model), state_of(other)
    new = _no_deprecation(lambda: mode_connectivity(model, sa, sb, [(x, y)], curve="linear", num_points=5))
    old = _deprecated(lambda: mode_connectivity(model, sa, sb, [(x, y)], curve="linear", n_points=5),
                      r"mode_connectivity\(n_points=\.\.\.\) is deprecated.*use mode_connectivity\(num_points=")
    assert old.values == new.values and old.ts == new.ts == (0.0, 0.25, 0.5, 0.75, 1.0)
    with pytest.raises(TypeError, match="num_points"):
        mode_connectivity(model, sa, sb, [(x, y)], curve="linear", n_points=5, num_points=5)


def test_mode_connectivity_takes_the_kind_as_curve_and_objects_as_path():
    model, other = _pair()
    x, y = _data()
    sa, sb = state_of(model), state_of(other)
    trained = mode_connectivity(model, sa, sb, [(x, y)], curve="polychain", epochs=1, num_points=3)
    assert isinstance(trained.curve, PolyChainCurve)
    again = mode_connectivity(model, None, None, [(x, y)], path=trained.curve, num_points=3)
    assert again.values == trained.values and again.fit is None
    assert mode_connectivity(model, sa, sb, [(x, y)], num_points=3, epochs=1).curve.kind == "bezier"  # the default


# ---------------------------------------------------------------------------------------------- paths


def test_weight_adjusted_path_base_and_its_deprecated_alias():
    ma, mb = _pair()
    sa, sb = state_of(ma), state_of(mb)
    x, _ = _data()
    new = _no_deprecation(lambda: weight_adjusted_path(ma, sa, sb, x, base="arc"))
    old = _deprecated(lambda: weight_adjusted_path(ma, sa, sb, x, path="arc"),
                      r"weight_adjusted_path\(path=\.\.\.\) is deprecated.*use weight_adjusted_path\(base=")
    assert new.kind == old.kind == "arc"
    for t in (0.2, 0.5, 0.9):
        got, ref = old.state_dict_at(t), new.state_dict_at(t)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(TypeError, match="base"):
        weight_adjusted_path(ma, sa, sb, x, path="arc", base="arc")


def test_evaluate_path_max_batches_caps_the_statistics_loaders_only():
    factory = lambda: MLP(5, [8], 3, norm="batchnorm")  # noqa: E731 - a one-line model factory
    ma, mb = _pair(factory)
    sa, sb = state_of(ma), state_of(mb)
    x, y = _data()
    stats = tensor_loader(x, y, batch_size=8)  # 6 batches
    test = tensor_loader(x, y, batch_size=16)  # 3 batches, always read whole
    res = evaluate_path(ma, sa, sb, test, ts=[0.5], bn_loader=stats, max_batches=2)
    assert res.metadata["max_batches"] == 2 and res.metadata["num_examples"] == 48
    capped = reset_bn_stats(ma, {k: torch.lerp(sa[k], sb[k], 0.5) if sa[k].is_floating_point() else sa[k]
                                 for k in sa}, stats, max_batches=2)  # fmt: skip
    ref = evaluate_path(ma, None, None, test, ts=[0.5], path=lambda t: capped)
    assert res.loss == ref.loss
    whole = evaluate_path(ma, sa, sb, test, ts=[0.5], bn_loader=stats)
    assert whole.loss != res.loss
    repaired = evaluate_path(ma, sa, sb, test, ts=[0.5], repair=True, repair_loader=stats, max_batches=2)
    assert repaired.metadata["num_examples"] == 48
    with pytest.raises(TypeError):
        evaluate_path(ma, sa, sb, test, bn_loader=stats, bn_batches=2)  # renamed outright (no docs used it)


def test_fit_curve_takes_the_curve_object_as_path():
    ma, mb = _pair()
    x, y = _data()
    assert list(inspect.signature(fit_curve).parameters)[:3] == ["model", "path", "loader"]
    one, two = BezierCurve(state_of(ma), state_of(mb)), BezierCurve(state_of(ma), state_of(mb))
    fit_curve(ma, one, [(x, y)], epochs=2, progress=False)
    fit_curve(ma, path=two, loader=[(x, y)], epochs=2, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(one.parameters(), two.parameters()))


@pytest.mark.parametrize("cls", [BezierCurve, PolyChainCurve])
def test_with_end_moves_the_learned_bend_onto_another_b(cls):
    ma, mb = _pair()
    sa, sb = state_of(ma), state_of(mb)
    curve = cls(sa, sb, num_bends=4)
    with torch.no_grad():
        for p in curve.parameters():
            p.add_(0.1)
    before = [p.detach().clone() for p in curve.parameters()]
    other = {k: v + 1.0 for k, v in sb.items()}
    moved = curve.with_end(other)
    assert type(moved) is cls and moved.num_bends == 4 and moved.trainable_keys == curve.trainable_keys
    assert all(torch.equal(p, q) for p, q in zip(moved.parameters(), curve.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(curve.parameters(), before))  # the original is unchanged
    for t, ref in ((0.0, sa), (1.0, other)):
        got = moved.state_dict_at(t)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    mid = moved.state_dict_at(0.4)
    assert all(torch.equal(mid[k], curve.state_dict_at(0.4, end=other)[k]) for k in mid)


# ---------------------------------------------------------------------------------------------- PAM


def test_pam_flat_step_options_are_deprecated_aliases_of_perm_step():
    ma, mb = _pair()
    x, y = _data()
    loader = tensor_loader(x, y, batch_size=16)
    common = {"example_input": x[:2], "rounds": 2, "theta_steps": 2, "lr": 1e-2, "init": "identity", "seed": 3}
    step = ProximalStep(lr=0.5, batches=3, max_backtracks=1, tau=0.1, n_iter=200)
    new = _no_deprecation(lambda: proximal_alternating_minimization(ma, mb, mb, loader, perm_step=step, **common))
    flat = {"perm_lr": 0.5, "perm_batches": 3, "max_backtracks": 1, "tau": 0.1, "sinkhorn_iters": 200}
    old = _deprecated(lambda: proximal_alternating_minimization(ma, mb, mb, loader, **flat, **common),
                      r"use proximal_alternating_minimization\(perm_step=ProximalStep\(lr=")
    assert old.history == new.history and old.perm_steps == new.perm_steps and old.changed == new.changed
    assert all(torch.equal(old.soft[p], new.soft[p]) for p in new.soft)
    assert all(torch.equal(p, q) for p, q in zip(old.curve.parameters(), new.curve.parameters()))
    # a flat name refines a given perm_step
    mixed = _deprecated(lambda: proximal_alternating_minimization(
        ma, mb, mb, loader, perm_step=ProximalStep(lr=0.5, batches=3, max_backtracks=1, tau=0.1), sinkhorn_iters=200,
        **common), "sinkhorn_iters")  # fmt: skip
    assert mixed.history == new.history
    with pytest.raises(TypeError, match="unexpected keyword"):
        proximal_alternating_minimization(ma, mb, mb, loader, perm_lr_typo=1.0, **common)
