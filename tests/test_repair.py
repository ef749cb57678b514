"""REPAIR: reset_bn_stats_, repair, repair_states, RepairedPath, channel_stats."""

from __future__ import annotations

import copy

import builders
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rebasin import (
    PermutationSpec,
    RebasinError,
    RepairedPath,
    evaluate_path,
    interpolate,
    repair,
    reset_bn_stats,
    spec_from_model,
)
from rebasin._common import forward_with_state, state_of
from rebasin.apps.training import evaluate, seeded_model
from rebasin.paths import channel_stats, repair_states, repaired_path, reset_bn_stats_


def mlp(depth: int = 3, width: int = 16) -> nn.Module:
    return builders.mlp(6, [width] * depth, 3)


def ln_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)
    )


def bn_cnn() -> nn.Module:
    # BatchNorm'd convs followed by a hidden Linear without normalisation: both REPAIR code paths.
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 12), nn.ReLU(), nn.Linear(12, 3),
    )  # fmt: skip


def batches(shape: tuple[int, ...], n: int = 96, batch: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return builders.batches(shape, n, batch, seed=seed, scale=1.5, shift=0.3)


def pair(factory, example):
    a, b = seeded_model(factory, 1), seeded_model(factory, 2)
    spec = spec_from_model(a, example)
    return a, b, spec


def snapshot(*states):
    return [{k: v.clone() for k, v in s.items()} for s in states]


def assert_states_equal(s, t):
    assert s.keys() == t.keys()
    for k in s:
        assert torch.equal(s[k], t[k]), k


CASES = {
    "mlp": (mlp, (6,)),
    "layernorm_mlp": (ln_mlp, (6,)),
    "bn_cnn": (bn_cnn, (1, 5, 5)),
}


# ------------------------------------------------------------------------------------------ BN reset


def test_reset_bn_stats_in_place_exact_full_data_statistics():
    model = seeded_model(bn_cnn, 0)
    x = batches((1, 5, 5), n=64, batch=64)[0][0]
    before = {k: v.clone() for k, v in state_of(model).items() if "running" not in k and "num_batches" not in k}
    model.train()
    out = reset_bn_stats_(model, [(x, torch.zeros(64, dtype=torch.long))])
    assert out is model and model.training and model[1].momentum == 0.1
    h = model[0](x).detach()
    assert_close(model[1].running_mean, h.mean(dim=(0, 2, 3)), atol=1e-6, rtol=1e-5)
    assert_close(model[1].running_var, h.var(dim=(0, 2, 3), correction=1), atol=1e-6, rtol=1e-5)
    assert int(model[1].num_batches_tracked) == 1
    for k, v in before.items():  # parameters untouched
        assert torch.equal(state_of(model)[k], v)


def test_reset_bn_stats_matches_pytorch_cumulative_average():
    model = seeded_model(bn_cnn, 0)
    data = batches((1, 5, 5), n=96, batch=32)
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    reference.train()
    with torch.no_grad():
        for x, _ in data:
            reference(x)
    reset_bn_stats_(model, data)
    for key in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
        assert_close(state_of(model)[key], state_of(reference)[key], atol=1e-5, rtol=1e-5)
    # equal batch sizes: the running mean of the first BN is the full-data mean
    full = torch.cat([x for x, _ in data])
    assert_close(model[1].running_mean, model[0](full).detach().mean(dim=(0, 2, 3)), atol=1e-6, rtol=1e-5)


def test_reset_bn_stats_needs_loader():
    with pytest.raises(RebasinError, match="loader"):
        reset_bn_stats_(seeded_model(bn_cnn, 0), None)


# ------------------------------------------------------------------------------------------ REPAIR


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("t", [0.0, 1.0])
def test_repair_at_endpoints_keeps_outputs(case, t):
    factory, shape = CASES[case]
    data = batches(shape)
    a, b, spec = pair(factory, data[0][0][:2])
    reset_bn_stats_(a, data)  # BN endpoints carry the statistics REPAIR measures on this data
    reset_bn_stats_(b, data)
    sa, sb = state_of(a), state_of(b)
    out = repair(a, sa, sb, t, data, spec=spec)
    ref = a if t == 0.0 else b
    x = torch.cat([x for x, _ in data])
    assert_close(forward_with_state(out, state_of(out), x, eval_mode=True), forward_with_state(ref, state_of(ref), x, eval_mode=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["mlp", "layernorm_mlp"])
def test_repair_moves_channel_stats_to_interpolated_targets(case):
    factory, shape = CASES[case]
    data = batches(shape)
    a, b, spec = pair(factory, data[0][0][:2])
    sa, sb = state_of(a), state_of(b)
    ea, eb = channel_stats(a, sa, data, spec=spec), channel_stats(a, sb, data, spec=spec)
    t = 0.3
    targets = {k: ((1 - t) * ea[k].mean + t * eb[k].mean, (1 - t) * ea[k].std + t * eb[k].std) for k in ea}
    plain = channel_stats(a, interpolate(sa, sb, t), data, spec=spec)
    # without REPAIR the interpolated net is off target (variance collapse) ...
    assert max(float((plain[k].std - targets[k][1]).abs().max()) for k in plain) > 1e-2
    out = repair(a, sa, sb, t, data, spec=spec)
    got = channel_stats(out, state_of(out), data, spec=spec)
    assert list(got) == list(ea) and len(got) >= 2
    for k, (mean, std) in targets.items():  # ... with REPAIR it is on target, layer after layer
        assert_close(got[k].mean, mean, atol=1e-5, rtol=1e-5)
        assert_close(got[k].std, std, atol=1e-5, rtol=1e-5)


def test_repair_bn_net_resets_statistics_and_corrects_plain_layers():
    data = batches((1, 5, 5))
    a, b, spec = pair(bn_cnn, data[0][0][:2])
    sa, sb = state_of(reset_bn_stats_(a, data)), state_of(reset_bn_stats_(b, data))
    out = state_of(repair(a, sa, sb, 0.5, data, spec=spec))
    # the BN statistics are exactly the cumulative statistics of the repaired net
    again = reset_bn_stats(a, out, data)
    for key in ("1.running_mean", "1.running_var", "4.running_var"):
        assert_close(out[key], again[key])
    # BN-normalised convs are not rescaled; the un-normalised hidden Linear is corrected
    mid = interpolate(sa, sb, 0.5)
    assert torch.equal(out["0.weight"], mid["0.weight"]) and torch.equal(out["3.weight"], mid["3.weight"])
    assert not torch.allclose(out["7.weight"], mid["7.weight"])
    ea, eb = channel_stats(a, sa, data, spec=spec), channel_stats(a, sb, data, spec=spec)
    got = channel_stats(a, out, data, spec=spec)
    assert_close(got["7"].std, 0.5 * (ea["7"].std + eb["7"].std), atol=1e-5, rtol=1e-5)


def test_closed_form_close_to_measured_and_skips_the_interpolated_pass():
    data = batches((6,))
    a, b, spec = pair(lambda: mlp(depth=2, width=32), data[0][0][:2])
    # B correlated with A, as aligned trained networks are: A plus independent noise
    sa = state_of(a)
    sb = {k: v + 0.7 * w for (k, v), w in zip(sa.items(), state_of(b).values())}

    class Counting(list):
        passes = 0

        def __iter__(self):
            Counting.passes += 1
            return super().__iter__()

    loader = Counting(data)
    closed = repair(a, sa, sb, 0.5, loader, spec=spec, closed_form=True)
    assert Counting.passes == 1  # one pass over the endpoints, none over the interpolated net
    measured = repair(a, sa, sb, 0.5, data, spec=spec)
    ea, eb = channel_stats(a, sa, data, spec=spec), channel_stats(a, sb, data, spec=spec)
    got_c, got_m = channel_stats(closed, state_of(closed), data, spec=spec), channel_stats(measured, state_of(measured), data, spec=spec)
    target0 = 0.5 * (ea["0"].std + eb["0"].std)
    # first layer: the interpolated pre-activation *is* (a + b) / 2, so the closed form is exact
    assert_close(got_c["0"].std, target0, atol=1e-5, rtol=1e-5)
    assert_close(got_c["0"].std, got_m["0"].std, atol=1e-5, rtol=1e-5)
    # deeper: an approximation (the inputs of the interpolated layer are not the interpolated
    # inputs), still closer to the target than no REPAIR
    target2 = 0.5 * (ea["2"].std + eb["2"].std)
    plain = channel_stats(a, interpolate(sa, sb, 0.5), data, spec=spec)["2"].std
    err_closed = float(((got_c["2"].std - target2).abs() / target2).mean())
    err_plain = float(((plain - target2).abs() / target2).mean())
    assert err_closed < 0.75 * err_plain and err_closed < 0.1


def test_repair_states_n_models_uniform_targets():
    data = batches((6,))
    models = [seeded_model(mlp, s) for s in (1, 2, 3)]
    spec = spec_from_model(models[0], data[0][0][:2])
    states = [state_of(m) for m in models]
    out = repair_states(models[0], states, [1 / 3] * 3, data, spec=spec)
    stats = [channel_stats(models[0], s, data, spec=spec) for s in states]
    got = channel_stats(models[0], out, data, spec=spec)
    for k in got:
        assert_close(got[k].std, sum(s[k].std for s in stats) / 3, atol=1e-5, rtol=1e-5)
        assert_close(got[k].mean, sum(s[k].mean for s in stats) / 3, atol=1e-5, rtol=1e-5)


def test_repaired_path_plugs_into_evaluate_path():
    data = batches((6,))
    a, b, spec = pair(mlp, data[0][0][:2])
    sa, sb = state_of(a), state_of(b)
    path = repaired_path(a, sa, sb, data, spec=spec)
    assert isinstance(path, RepairedPath)
    res = evaluate_path(a, None, None, data, path=path, num_points=3)
    assert res.metadata["path"] == "RepairedPath"
    loss_a, acc_a = evaluate(a, data)
    assert abs(res.loss[0] - loss_a) < 1e-5 and res.accuracy[0] == acc_a
    mid = state_of(repair(a, sa, sb, 0.5, data, spec=spec))
    assert abs(res.loss[1] - evaluate(a, data, state=mid)[0]) < 1e-6


def test_evaluate_path_repair_option_matches_repaired_path():
    data = batches((6,))
    a, b, spec = pair(mlp, data[0][0][:2])
    sa, sb = state_of(a), state_of(b)
    via_option = evaluate_path(a, sa, sb, data, num_points=3, repair=True, spec=spec)
    via_path = evaluate_path(a, None, None, data, path=repaired_path(a, sa, sb, data, spec=spec), num_points=3)
    plain = evaluate_path(a, sa, sb, data, num_points=3)
    assert via_option.loss == via_path.loss
    assert via_option.loss[1] != plain.loss[1]  # REPAIR changed the midpoint


def test_repair_does_not_mutate_inputs_and_returns_trainable_copy():
    data = batches((1, 5, 5))
    a, b, spec = pair(bn_cnn, data[0][0][:2])
    a.train()
    sa, sb = state_of(a), state_of(b)
    keep_a, keep_b = snapshot(sa, sb)
    out = repair(a, sa, sb, 0.4, data, spec=spec)
    assert_states_equal(state_of(a), keep_a)
    assert_states_equal(sb, keep_b)
    assert a.training and all(m.training for m in a.modules())
    assert out is not a and all(p.requires_grad for p in out.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(out.parameters(), a.parameters()))


def test_repair_errors():
    data = batches((6,))
    a, b, spec = pair(mlp, data[0][0][:2])
    sa, sb = state_of(a), state_of(b)
    with pytest.raises(RebasinError, match="loader"):
        repair(a, sa, sb, 0.5, None, spec=spec)
    with pytest.raises(RebasinError, match="t must be"):
        repair(a, sa, sb, float("nan"), data, spec=spec)
    bad = dict(sb)
    bad.pop("0.bias")
    with pytest.raises(RebasinError, match="0.bias"):
        repair(a, sa, bad, 0.5, data, spec=spec)
    with pytest.raises(RebasinError, match="max_batches"):
        repair(a, sa, sb, 0.5, data, spec=spec, max_batches=0)
    with pytest.raises(RebasinError, match="no batches"):
        repair(a, sa, sb, 0.5, [], spec=spec)


def test_repair_traces_spec_from_loader_when_omitted():
    data = batches((6,))
    a, b, spec = pair(mlp, data[0][0][:2])
    sa, sb = state_of(a), state_of(b)
    assert_states_equal(
        state_of(repair(a, sa, sb, 0.5, data)), state_of(repair(a, sa, sb, 0.5, data, spec=spec))
    )


def test_repair_without_bias_warns_and_scales():
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 3))
    spec = PermutationSpec({"0.weight": ("P", None), "2.weight": (None, "P"), "2.bias": (None,)})
    a, b = seeded_model(lambda: copy.deepcopy(model), 1), seeded_model(lambda: nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 3)), 2)
    data = batches((6,))
    with pytest.warns(UserWarning, match="no bias"):
        out = repair(a, state_of(a), state_of(b), 0.5, data, spec=spec)
    ea, eb = channel_stats(a, state_of(a), data, spec=spec), channel_stats(a, state_of(b), data, spec=spec)
    assert_close(channel_stats(out, state_of(out), data, spec=spec)["0"].std, 0.5 * (ea["0"].std + eb["0"].std), atol=1e-5, rtol=1e-5)
