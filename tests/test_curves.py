"""Bezier / PolyChain curves, fit_curve, arc interpolation."""

from __future__ import annotations

import math

import builders
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rebasin import (
    BezierCurve,
    PermutationSpec,
    RebasinError,
    evaluate_path,
    fit_curve,
    interpolate,
    permute,
    random_permutation,
    spec_from_model,
)
from rebasin._common import state_of
from rebasin.apps.training import evaluate, fit_classifier_, seeded_model
from rebasin.paths import ArcPath, CurveFit, PolyChainCurve, arc_interpolate

CURVES = [BezierCurve, PolyChainCurve]


def mlp() -> nn.Module:
    return builders.mlp(6, [16, 16], 3)


def bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


def states(factory, seeds=(1, 2)):
    return [state_of(seeded_model(factory, s)) for s in seeds]


def perturb_bends(curve: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in curve.parameters():
            p.add_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("cls", CURVES)
@pytest.mark.parametrize("num_bends", [2, 3, 5])
def test_curves_pass_through_endpoints_exactly(cls, num_bends):
    sa, sb = states(bn_mlp)
    curve = cls(sa, sb, num_bends=num_bends)
    assert len(list(curve.parameters())) == (num_bends - 2) * 6  # 4 weights/biases + BN weight/bias
    perturb_bends(curve)  # even far from the line, the endpoints stay put
    for t, ref in ((0.0, sa), (1.0, sb)):
        got = curve.state_dict_at(t)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), (t, k)
            assert got[k].data_ptr() != ref[k].data_ptr()


@pytest.mark.parametrize("cls", CURVES)
def test_untrained_curve_is_the_line_and_differentiable(cls):
    sa, sb = states(mlp)
    curve = cls(sa, sb, num_bends=4)
    for t in (0.1, 0.5, 0.77):
        got, line = curve.state_dict_at(t), interpolate(sa, sb, t)
        for k in sa:
            assert_close(got[k], line[k], atol=1e-6, rtol=1e-5)
    loss = sum(v.sum() for v in curve(0.4).values())
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in curve.parameters())


def test_bezier_and_polychain_formulas():
    sa, sb = {"w": torch.zeros(3)}, {"w": torch.ones(3) * 4}
    bez, poly = BezierCurve(sa, sb, num_bends=3), PolyChainCurve(sa, sb, num_bends=3)
    with torch.no_grad():
        bez.bends[0][0].fill_(10.0)
        poly.bends[0][0].fill_(10.0)
    t = 0.3
    expected = (1 - t) ** 2 * 0 + 2 * t * (1 - t) * 10 + t**2 * 4
    assert_close(bez.state_dict_at(t)["w"], torch.full((3,), expected))
    assert_close(poly.state_dict_at(0.5)["w"], torch.full((3,), 10.0))
    assert_close(poly.state_dict_at(0.75)["w"], torch.full((3,), 7.0))  # halfway from bend 10 to B 4


def test_curve_bn_buffers_not_trainable_and_fresh():
    sa, sb = states(bn_mlp)
    curve = BezierCurve(sa, sb)
    assert "1.running_mean" not in curve.trainable_keys and "1.weight" in curve.trainable_keys
    st = curve.state_dict_at(0.5)
    assert not st["1.running_mean"].requires_grad
    assert st["1.num_batches_tracked"].dtype == torch.int64
    st["1.running_mean"].add_(1.0)  # in-place use (training mode BN) cannot reach the curve
    assert_close(curve.state_dict_at(0.5)["1.running_mean"], torch.lerp(sa["1.running_mean"], sb["1.running_mean"], 0.5))


def test_curve_errors():
    sa, sb = states(mlp)
    bad = dict(sb)
    bad.pop("0.bias")
    with pytest.raises(RebasinError, match="0.bias"):
        BezierCurve(sa, bad)
    with pytest.raises(RebasinError, match="shapes differ"):
        PolyChainCurve(sa, {**sb, "0.weight": torch.zeros(16, 7)})
    with pytest.raises(RebasinError, match="dtypes"):
        BezierCurve(sa, {**sb, "0.weight": sb["0.weight"].double()})
    with pytest.raises(RebasinError, match="num_bends"):
        BezierCurve(sa, sb, num_bends=1)
    with pytest.raises(RebasinError, match="0 <= t <= 1"):
        BezierCurve(sa, sb).state_dict_at(1.5)
    with pytest.raises(RebasinError, match="trainable_keys"):
        BezierCurve(sa, sb, trainable_keys=["nope"])
    with pytest.raises(RebasinError, match="NaN"):
        BezierCurve(sa, {**sb, "0.bias": torch.full((16,), float("nan"))})


def test_curve_accepts_modules_and_does_not_mutate_inputs():
    a, b = seeded_model(mlp, 1), seeded_model(mlp, 2)
    keep = {k: v.clone() for k, v in state_of(a).items()}
    curve = PolyChainCurve(a, b)
    perturb_bends(curve)
    curve.state_dict_at(0.0)["0.weight"].add_(1.0)
    for k, v in state_of(a).items():
        assert torch.equal(v, keep[k])


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 6, generator=g)
    y = ((x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()).clamp_max(2)
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]


def test_fit_curve_lowers_the_mid_curve_loss_and_is_seeded():
    data = _problem()
    a = fit_classifier_(seeded_model(mlp, 1), data, epochs=30, lr=1e-2, seed=1)
    b = fit_classifier_(seeded_model(mlp, 2), data, epochs=30, lr=1e-2, seed=2)
    keep = {k: v.clone() for k, v in state_of(a).items()}
    sa, sb = state_of(a), state_of(b)
    mid_line = evaluate(a, data, state=interpolate(sa, sb, 0.5))[0]
    curves = []
    for _ in range(2):
        curve = BezierCurve(sa, sb, num_bends=3)
        fit = fit_curve(a, curve, data, epochs=20, lr=1e-2, weight_decay=1e-4, seed=3, progress=False)
        curves.append(curve)
    assert isinstance(fit, CurveFit) and fit.steps == 20 * len(data) and len(fit.loss) == 20
    mid_curve = evaluate(a, data, state=curves[0].state_dict_at(0.5))[0]
    assert mid_curve < 0.7 * mid_line, (mid_curve, mid_line)
    for p, q in zip(curves[0].parameters(), curves[1].parameters()):
        assert torch.equal(p, q)  # same seed, same curve
    for k, v in state_of(a).items():  # the user's model is untouched
        assert torch.equal(v, keep[k])
    assert all(m.training for m in a.modules())  # flags restored (fresh modules train)


def test_fit_curve_on_bn_net_and_evaluate_path_with_bn_reset():
    data = _problem()
    sa, sb = states(bn_mlp)
    model = seeded_model(bn_mlp, 1)
    model.eval()
    curve = PolyChainCurve(sa, sb)
    fit_curve(model, curve, data[:2], epochs=1, lr=1e-3, seed=0, progress=False)
    assert not model.training  # flags restored
    res = evaluate_path(model, None, None, data, path=curve, bn_loader=data, num_points=3)
    assert res.metadata["bn_reset"] and len(res) == 3


def test_fit_curve_errors():
    sa, sb = states(mlp)
    curve = BezierCurve(sa, sb)
    with pytest.raises(RebasinError, match="epochs"):
        fit_curve(seeded_model(mlp, 0), curve, _problem(), epochs=0)
    with pytest.raises(RebasinError, match="curve"):
        fit_curve(seeded_model(mlp, 0), {"w": 1}, _problem(), epochs=1)
    with pytest.raises(RebasinError, match="does not fit the model"):
        fit_curve(seeded_model(bn_mlp, 0), curve, _problem(), epochs=1, progress=False)


# ------------------------------------------------------------------------------------------ arc


def test_arc_endpoints_exact():
    a, b = seeded_model(cnn, 1), seeded_model(cnn, 2)
    spec = spec_from_model(a, torch.randn(2, 1, 4, 4))
    sa, sb = state_of(a), state_of(b)
    for t, ref in ((0.0, sa), (1.0, sb)):
        got = arc_interpolate(sa, sb, t, spec=spec)
        for k in ref:
            assert torch.equal(got[k], ref[k])


def test_arc_formula_with_blocks_and_untouched_entries():
    spec = PermutationSpec(
        {"w1": ("P", None), "b1": ("P",), "w2": (None, "P"), "b2": (None,)}, blocks={("w2", 1): 2}
    )
    g = torch.Generator().manual_seed(0)
    sa = {"w1": torch.randn(3, 2, generator=g), "b1": torch.randn(3, generator=g), "w2": torch.randn(2, 6, generator=g), "b2": torch.randn(2, generator=g)}
    sb = {k: torch.randn(v.shape, generator=g) for k, v in sa.items()}
    t = 0.3
    c, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
    got = arc_interpolate(sa, sb, t, spec=spec)
    mu = 0.5 * (sa["w1"].mean(0, keepdim=True) + sb["w1"].mean(0, keepdim=True))
    assert_close(got["w1"], mu + c * (sa["w1"] - mu) + s * (sb["w1"] - mu))
    # block axis: channel c occupies columns 2c, 2c+1; average over channels per block offset
    ma = sa["w2"].reshape(2, 3, 2).mean(1, keepdim=True)
    mb = sb["w2"].reshape(2, 3, 2).mean(1, keepdim=True)
    mu2 = (0.5 * (ma + mb)).expand(2, 3, 2).reshape(2, 6)
    assert_close(got["w2"], mu2 + c * (sa["w2"] - mu2) + s * (sb["w2"] - mu2))
    assert_close(got["b2"], torch.lerp(sa["b2"], sb["b2"], t))


def test_arc_is_permutation_equivariant_and_pure():
    a, b = seeded_model(mlp, 1), seeded_model(mlp, 2)
    spec = spec_from_model(a, torch.randn(2, 6))
    sa, sb = state_of(a), state_of(b)
    keep = {k: v.clone() for k, v in sb.items()}
    perms = random_permutation(spec, seed=5, sizes=spec.validate(sa))
    got = arc_interpolate(permute(spec, perms, sa), permute(spec, perms, sb), 0.6, spec=spec)
    ref = permute(spec, perms, arc_interpolate(sa, sb, 0.6, spec=spec))
    for k in ref:
        assert_close(got[k], ref[k])
    for k, v in sb.items():
        assert torch.equal(v, keep[k])


def test_arc_path_in_evaluate_path_and_errors():
    a, b = seeded_model(mlp, 1), seeded_model(mlp, 2)
    spec = spec_from_model(a, torch.randn(2, 6))
    data = _problem()
    res = evaluate_path(a, None, None, data, path=ArcPath(state_of(a), state_of(b), spec=spec), num_points=3)
    assert abs(res.loss[0] - evaluate(a, data)[0]) < 1e-6 and abs(res.loss[2] - evaluate(b, data)[0]) < 1e-6
    with pytest.raises(RebasinError, match="spec"):
        arc_interpolate(state_of(a), state_of(b), 0.5, spec=None)
    with pytest.raises(RebasinError, match="missing"):
        arc_interpolate({k: v for k, v in state_of(a).items() if k != "0.bias"}, {k: v for k, v in state_of(b).items() if k != "0.bias"}, 0.5, spec=spec)
