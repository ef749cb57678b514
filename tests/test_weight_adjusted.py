"""The Weight Adjustment path (Anokhin & Yarotsky 2020): :func:`rebasin.paths.weight_adjusted_path`."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import planted, rand
from torch import nn
from torch.testing import assert_close

from rebasin import (
    RebasinError,
    evaluate_path,
    interpolate,
    invert,
    spec_from_model,
)
from rebasin._common import forward_with_state, state_of
from rebasin.apps.data import tensor_loader
from rebasin.apps.models import MLP, SmallCNN
from rebasin.apps.training import evaluate, fit_classifier_, seeded_model
from rebasin.matching import ot_matching
from rebasin.paths import WeightAdjustedPath, weight_adjusted_path


def mlp_pair(hidden=(16, 16), seeds=(1, 2)):
    return [seeded_model(lambda: MLP(5, list(hidden), 3), s) for s in seeds]


@pytest.mark.parametrize("kind", ["linear", "arc"])
def test_wa_path_starts_at_a_and_ends_at_b_exactly(kind):
    ma, mb = mlp_pair()
    sa, sb = state_of(ma), state_of(mb)
    wa = weight_adjusted_path(ma, sa, sb, rand(40, 5), base=kind)
    assert wa.num_stages == 3
    for t, ref in ((0.0, sa), (1.0, sb)):
        got = wa.state_dict_at(t)
        assert list(got) == list(ref)
        for k in ref:
            assert torch.equal(got[k], ref[k]) and got[k].data_ptr() != ref[k].data_ptr(), (t, k)


@pytest.mark.parametrize("kind", ["linear", "arc"])
def test_wa_path_is_continuous_at_and_between_stage_boundaries(kind):
    ma, mb = mlp_pair()
    sa, sb = state_of(ma), state_of(mb)
    wa = weight_adjusted_path(ma, sa, sb, rand(40, 5), base=kind)

    def dist(s0, s1):
        return max(float((s1[k] - s0[k]).abs().max()) for k in sa)

    # a jump J would give near ~ J ~ far; a continuous (Lipschitz) path gives near ~ far / 100
    for t, sides in ((0.0, (1,)), (1 / 3, (-1, 1)), (0.18, (1,)), (0.5, (-1, 1)), (2 / 3, (-1, 1)), (1.0, (-1,))):
        here = wa.state_dict_at(t)
        for side in sides:
            far = dist(here, wa.state_dict_at(t + side * 1e-3))
            near = dist(here, wa.state_dict_at(t + side * 1e-5))
            assert far > 0 and near <= 0.05 * far + 1e-4, (t, side, far, near)


def test_wa_custom_layer_move_reproduces_the_linear_base_and_is_differentiable():
    ma, mb = mlp_pair()
    sa, sb = state_of(ma), state_of(mb)
    x = rand(40, 5)
    calls = []

    def lerp_move(i, start, end, s):
        calls.append((i, s))
        return torch.lerp(start[0], end[0], s), torch.lerp(start[1], end[1], s)

    custom = weight_adjusted_path(ma, sa, sb, x, base=lerp_move)
    line = weight_adjusted_path(ma, sa, sb, x)
    assert custom.kind == "custom"
    for t in (0.0, 0.1, 1 / 3, 0.5, 0.9, 1.0):
        got, ref = custom.state_dict_at(t), line.state_dict_at(t)
        assert all(torch.equal(got[k], ref[k]) for k in ref), t
    assert all(0.0 < s < 1.0 for _, s in calls)  # never called at a stage end
    # differentiable=True: gradients reach what the moving layer depends on, through the refit
    scale = torch.ones((), requires_grad=True)

    def scaled(i, start, end, s):
        w, b = lerp_move(i, start, end, s)
        return w * scale, b

    st = weight_adjusted_path(ma, sa, sb, x, base=scaled).state_dict_at(0.2, differentiable=True)
    assert st["layers.2.weight"].requires_grad  # the refit depends on the moved layer
    forward_with_state(ma, st, x).square().sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)
    with torch.no_grad():
        plain = weight_adjusted_path(ma, sa, sb, x, base=scaled).state_dict_at(0.2)
    assert not plain["layers.2.weight"].requires_grad


def test_wa_stage_structure_and_refit():
    ma, mb = mlp_pair(hidden=(32, 32))
    sa, sb = state_of(ma), state_of(mb)
    x = rand(12, 5)  # fewer inputs than hidden units: the refit can match A exactly
    wa = weight_adjusted_path(ma, sa, sb, x)
    s = wa.state_dict_at(1 / 3)  # end of stage 1: layer 1 at B, layer 2 refit, layer 3 at A
    assert torch.equal(s["layers.0.weight"], sb["layers.0.weight"])
    assert torch.equal(s["layers.4.weight"], sa["layers.4.weight"])
    assert not torch.allclose(s["layers.2.weight"], sa["layers.2.weight"])
    stage1 = nn.Sequential(*list(ma.layers)[:3])  # Linear, ReLU, Linear: layer-2 pre-activations
    keys = ["0.weight", "0.bias", "2.weight", "2.bias"]
    z_a = forward_with_state(stage1, {k: sa[f"layers.{k}"] for k in keys}, x)
    for t in (0.1, 0.2, 1 / 3):  # in stage 1 the target is A's pre-activations throughout
        st = wa.state_dict_at(t)
        z = forward_with_state(stage1, {k: st[f"layers.{k}"] for k in keys}, x)
        assert_close(z, z_a, atol=1e-3 * float(z_a.abs().max()), rtol=0)
    assert wa.stage(0.5) == (2, 0.5)


def test_wa_keeps_output_closer_to_a_than_the_linear_path():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    loader = tensor_loader(x, y, batch_size=32, shuffle=True)
    ma, mb = (fit_classifier_(m, loader, epochs=15, lr=1e-2, seed=i) for i, m in enumerate(mlp_pair(), 1))
    sa, sb = state_of(ma), state_of(mb)
    out_a = forward_with_state(ma, sa, x)
    paths = {
        "linear": lambda t: interpolate(sa, sb, t),
        "wa": weight_adjusted_path(ma, sa, sb, x),
        "arc_wa": weight_adjusted_path(ma, sa, sb, x, base="arc"),
    }
    for t in (0.25, 0.5):
        err = {k: float((forward_with_state(ma, p(t), x) - out_a).pow(2).mean()) for k, p in paths.items()}
        assert err["wa"] < 0.5 * err["linear"], (t, err)
        assert err["arc_wa"] < 0.5 * err["linear"], (t, err)
    res = evaluate_path(ma, None, None, [(x, y)], num_points=7, path=paths["wa"])
    assert res.accuracy[0] == evaluate(ma, [(x, y)])[1] and res.accuracy[-1] == evaluate(mb, [(x, y)])[1]


def test_wa_arc_uses_given_spec_like_the_default_one():
    ma, mb = mlp_pair()
    sa, sb = state_of(ma), state_of(mb)
    x = rand(30, 5)
    spec = spec_from_model(ma, x)
    own = weight_adjusted_path(ma, sa, sb, x, base="arc")
    given = weight_adjusted_path(ma, sa, sb, x, base="arc", spec=spec)
    for t in (0.2, 0.5, 0.9):
        s1, s2 = own.state_dict_at(t), given.state_dict_at(t)
        for k in sa:
            assert torch.equal(s1[k], s2[k])
    # the arc differs from the linear WA path inside a stage
    lin = weight_adjusted_path(ma, sa, sb, x).state_dict_at(0.2)
    assert not torch.allclose(lin["layers.0.weight"], own.state_dict_at(0.2)["layers.0.weight"])


def test_wa_sequential_with_flatten_dropout_inplace_relu_and_no_bias_does_not_mutate():
    def factory():
        return nn.Sequential(nn.Flatten(), nn.Linear(6, 8, bias=False), nn.ReLU(inplace=True), nn.Dropout(0.5),
                             nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    ma, mb = seeded_model(factory, 0), seeded_model(factory, 1)
    ma.train()
    sa, sb = state_of(ma), state_of(mb)
    x = rand(20, 2, 3)
    before = [copy.deepcopy(s) for s in (sa, sb, state_of(ma))] + [x.clone()]
    wa = weight_adjusted_path(ma, sa, sb, (x, torch.zeros(20)))
    states = [wa.state_dict_at(t) for t in (0.0, 0.2, 0.5, 0.7, 1.0)]
    for s in states:
        s["1.weight"].add_(1.0)  # returned tensors are new: editing them changes nothing
    for ref, now in zip(before[:3], (sa, sb, state_of(ma))):
        assert all(torch.equal(ref[k], now[k]) for k in ref)
    assert torch.equal(before[3], x) and ma.training and all(m.training for m in ma.modules())
    assert "1.bias" not in wa.state_dict_at(0.5)


def test_wa_rejects_models_that_are_not_linear_chains():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)) + x)

    x = rand(8, 4)
    for model, inp in [
        (Residual(), x),
        (MLP(4, [6], 2, norm="batchnorm"), x),
        (SmallCNN(channels=(2, 2, 2)), rand(8, 1, 8, 8)),
    ]:
        s = state_of(model)
        with pytest.raises(RebasinError, match="Linear"):
            weight_adjusted_path(model, s, s, inp)


def test_wa_rejects_bad_inputs():
    ma, mb = mlp_pair()
    sa, sb = state_of(ma), state_of(mb)
    x = rand(10, 5)
    other = state_of(MLP(5, [16, 8], 3))
    with pytest.raises(RebasinError, match="state_b"):
        weight_adjusted_path(ma, sa, other, x)
    with pytest.raises(RebasinError, match="unknown path kind"):
        weight_adjusted_path(ma, sa, sb, x, base="bezier")
    with pytest.raises(RebasinError, match="ridge"):
        weight_adjusted_path(ma, sa, sb, x, ridge=0.0)
    with pytest.raises(RebasinError, match="batch"):
        weight_adjusted_path(ma, sa, sb, rand(0, 5))
    with pytest.raises(RebasinError, match="cannot run"):
        weight_adjusted_path(ma, sa, sb, rand(10, 7))
    with pytest.raises(RebasinError, match="dtypes"):
        weight_adjusted_path(ma, sa, {k: v.double() for k, v in sb.items()}, x)
    wa = weight_adjusted_path(ma, sa, sb, x)
    assert isinstance(wa, WeightAdjustedPath)
    for t in (-0.1, 1.5, float("nan")):
        with pytest.raises(RebasinError, match="t "):
            wa.state_dict_at(t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ot_and_wa_on_cuda():
    model = seeded_model(lambda: MLP(5, [16, 16], 3), 0)
    spec, sa, sb, p = planted(model, rand(2, 5))
    ca, cb = ({k: v.cuda() for k, v in s.items()} for s in (sa, sb))
    perms = ot_matching(spec, ca, cb)
    assert all(torch.equal(perms[k], invert(p)[k]) for k in p)
    wa = weight_adjusted_path(model, ca, cb, rand(20, 5), device="cuda", base="arc")
    cpu = weight_adjusted_path(model, sa, sb, torch.randn(20, 5, generator=torch.Generator().manual_seed(0)))
    s = wa.state_dict_at(0.4)
    assert all(v.is_cuda for v in s.values()) and set(s) == set(cpu.state_dict_at(0.4))
    assert torch.equal(wa.state_dict_at(1.0)["layers.0.weight"], cb["layers.0.weight"])
