"""interpolate, evaluate_path, reset_bn_stats, barrier, PathResult."""

from __future__ import annotations

import copy
import dataclasses

import builders
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rebasin import PathResult, RebasinError, barrier, evaluate_path, interpolate, reset_bn_stats
from rebasin.apps.training import evaluate, seeded_model


def mlp_bn() -> nn.Module:
    # two BatchNorms: the second one's statistics depend on how the first one normalises
    return builders.mlp(6, [8, 8], 3, bn=True)


def conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )


def mlp() -> nn.Module:
    return builders.mlp(6, [8], 3)


def batches(shape: tuple[int, ...], n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return builders.batches(shape, n, batch, seed=seed, scale=2.0, shift=0.5)


def trained_state(model: nn.Module, data, seed: int) -> dict[str, torch.Tensor]:
    """A state with non-trivial BN statistics: a few train-mode passes on a copy."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    m.train()
    with torch.no_grad():
        for x, _ in data:
            m(x)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def clone(state):
    return {k: v.clone() for k, v in state.items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- interpolate


def test_interpolate_exact_endpoints_and_midpoint():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(5, 7, generator=g), "b": torch.randn(7, generator=g, dtype=torch.float64)}
    b = {"w": torch.randn(5, 7, generator=g) * 1e3, "b": torch.randn(7, generator=g, dtype=torch.float64)}
    a0, b0 = clone(a), clone(b)
    assert_state_equal(interpolate(a, b, 0.0), a)
    assert_state_equal(interpolate(a, b, 1), b)
    mid = interpolate(a, b, 0.5)
    for k in a:
        assert_close(mid[k], (a[k] + b[k]) / 2)
    ext = interpolate(a, b, 2.0)
    assert_close(ext["w"], 2 * b["w"] - a["w"], rtol=1e-5, atol=1e-3)
    assert_state_equal(a, a0)  # inputs untouched
    assert_state_equal(b, b0)
    assert interpolate(a, b, 0.0)["w"] is not a["w"]


def test_interpolate_integer_buffers_from_a_and_gradients():
    a = {"w": torch.zeros(3, requires_grad=True), "n": torch.tensor(7)}
    b = {"w": torch.ones(3, requires_grad=True), "n": torch.tensor(100)}
    out = interpolate(a, b, 0.3)
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 7
    out["w"].sum().backward()
    assert_close(a["w"].grad, torch.full((3,), 0.7))
    assert_close(b["w"].grad, torch.full((3,), 0.3))


def test_interpolate_mismatch_errors():
    a = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    with pytest.raises(RebasinError, match=r"'b'.*\(3,\) vs \(4,\)"):
        interpolate(a, {"w": torch.zeros(2, 3), "b": torch.zeros(4)}, 0.5)
    with pytest.raises(RebasinError, match=r"only in state_a: \['b'\]"):
        interpolate(a, {"w": torch.zeros(2, 3)}, 0.5)
    with pytest.raises(RebasinError, match=r"only in state_b: \['c'\]"):
        interpolate(a, {**a, "c": torch.zeros(1)}, 0.5)
    with pytest.raises(RebasinError, match="float64"):
        interpolate(a, {"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(3)}, 0.5)
    for bad in (float("nan"), float("inf"), "half", None):
        with pytest.raises(RebasinError, match="finite"):
            interpolate(a, a, bad)


# ---------------------------------------------------------------- barrier

# t = 0, .25, .5, .75, 1
LOSS = [1.0, 3.2, 2.2, 2.6, 3.0]  # mean of ends 2.0; line 1 + 2t = 1, 1.5, 2, 2.5, 3
ACC = [0.9, 0.5, 0.6, 0.7, 0.8]  # mean of ends 0.85; line .9, .875, .85, .825, .8


@pytest.mark.parametrize(
    ("values", "metric", "kind", "expected"),
    [
        (LOSS, "loss", "max_minus_mean", 1.2),
        (LOSS, "loss", "detrended", 1.7),
        (LOSS, "loss", "midpoint", 0.2),
        (ACC, "accuracy", "max_minus_mean", 0.35),
        (ACC, "accuracy", "detrended", 0.375),
        (ACC, "accuracy", "midpoint", 0.25),
    ],
)
def test_barrier_formulas(values, metric, kind, expected):
    assert barrier(values, kind=kind, metric=metric) == pytest.approx(expected, abs=1e-12)
    assert barrier(torch.tensor(values), kind=kind, metric=metric) == pytest.approx(expected, abs=1e-6)
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    res = PathResult(t=ts, loss=values, accuracy=ACC if metric == "accuracy" else None)
    assert res.barrier(kind, metric) == pytest.approx(expected, abs=1e-12)


def test_barrier_uneven_ts_and_extrapolated_points():
    # detrended with uneven t: line at t=0.1 is 1.2, so the bump is 0.8
    assert barrier([1.0, 2.0, 3.0], kind="detrended", ts=[0.0, 0.1, 1.0]) == pytest.approx(0.8)
    # points outside [0, 1] do not enter the maximum
    assert barrier([50.0, 1.0, 2.0, 1.0, 60.0], ts=[-0.5, 0, 0.5, 1, 1.5]) == pytest.approx(1.0)
    # unordered ts are fine
    assert barrier([2.0, 1.0, 1.0], kind="midpoint", ts=[0.5, 0.0, 1.0]) == pytest.approx(1.0)


def test_barrier_errors():
    with pytest.raises(RebasinError, match="valid kinds.*max_minus_mean.*detrended.*midpoint"):
        barrier(LOSS, kind="peak")
    with pytest.raises(RebasinError, match="valid metrics.*loss.*accuracy"):
        barrier(LOSS, metric="error")
    with pytest.raises(RebasinError, match="at least 2"):
        barrier([1.0])
    with pytest.raises(RebasinError, match=r"t=0.5"):
        barrier([1.0, 2.0, 1.0, 1.0], kind="midpoint")  # t = 0, 1/3, 2/3, 1
    with pytest.raises(RebasinError, match="t=1"):
        barrier([1.0, 2.0], ts=[0.0, 0.9])
    with pytest.raises(RebasinError, match="3 positions"):
        barrier([1.0, 2.0], ts=[0.0, 0.5, 1.0])
    res = PathResult(t=[0, 1], loss=[1, 1])
    with pytest.raises(RebasinError, match="no accuracy"):
        barrier(res, metric="accuracy")
    with pytest.raises(RebasinError, match="ts"):
        barrier(res, ts=[0, 1])


# ---------------------------------------------------------------- PathResult


def test_path_result_roundtrip_repr_and_frozen():
    res = PathResult(t=[0, 0.5, 1], loss=[0.1, 0.9, 0.2], accuracy=[1.0, 0.5, 0.9], metadata={"path": "linear"})
    assert res.t == (0.0, 0.5, 1.0) and isinstance(res.loss, tuple)
    assert PathResult.from_dict(res.as_dict()) == res
    assert PathResult.from_json(res.to_json()) == res
    text = repr(res)
    assert text.startswith("PathResult(3 points") and "max 0.9 (t=0.5)" in text and "min 0.5" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.loss = (0.0,)
    with pytest.raises(RebasinError, match=r"\[0, 1\]"):
        PathResult(t=[0, 1], loss=[0, 0], accuracy=[0.5, 1.5])
    with pytest.raises(RebasinError, match="one loss"):
        PathResult(t=[0, 1], loss=[0])


# ---------------------------------------------------------------- evaluate_path


@pytest.fixture(scope="module")
def setup():
    data = batches((6,), 40, 16)
    model = seeded_model(mlp_bn, 0)
    sa = trained_state(model, data, 1)
    sb = trained_state(seeded_model(mlp_bn, 2), data, 3)
    return model, sa, sb, data


def test_evaluate_path_endpoints_match_evaluate(setup):
    model, sa, sb, data = setup
    model.train()
    before, sa0, sb0 = clone(model.state_dict()), clone(sa), clone(sb)
    res = evaluate_path(model, sa, sb, data, num_points=5)
    assert res.t == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert len(res.loss) == 5 and res.accuracy is not None and len(res.accuracy) == 5
    for i, s in ((0, sa), (-1, sb)):
        loss, acc = evaluate(model, data, state=s)
        assert res.loss[i] == pytest.approx(loss, rel=1e-12)
        assert res.accuracy[i] == pytest.approx(acc)
    # the loss at t=0 is what a plain eval-mode forward gives
    ref = copy.deepcopy(model)
    ref.load_state_dict(sa)
    ref.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in data])
        y = torch.cat([b[1] for b in data])
        out = ref(x)
    assert res.loss[0] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-5)
    assert res.accuracy[0] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert res.metadata["num_examples"] == 40 and res.metadata["path"] == "linear"
    # nothing mutated: model state, training flags, input states
    assert_state_equal(model.state_dict(), before)
    assert all(m.training for m in model.modules())
    assert_state_equal(sa, sa0)
    assert_state_equal(sb, sb0)
    model.eval()


def test_evaluate_path_default_grid_and_ts(setup):
    model, sa, sb, data = setup
    res = evaluate_path(model, sa, sb, data[:1], num_points=25)
    assert len(res) == 25 and res.t[0] == 0.0 and res.t[-1] == 1.0 and res.t[12] == 0.5
    res = evaluate_path(model, sa, sb, data[:1], ts=[-0.5, 0.5, 1.5])
    assert res.t == (-0.5, 0.5, 1.5)
    with pytest.raises(RebasinError, match="num_points"):
        evaluate_path(model, sa, sb, data, num_points=1)
    with pytest.raises(RebasinError, match="finite"):
        evaluate_path(model, sa, sb, data, ts=[0.0, float("nan")])


def test_identical_states_give_a_flat_path(setup):
    model, sa, _, data = setup
    res = evaluate_path(model, sa, clone(sa), data, num_points=5)
    assert max(res.loss) - min(res.loss) == 0.0
    for kind in ("max_minus_mean", "detrended", "midpoint"):
        for metric in ("loss", "accuracy"):
            assert barrier(res, kind=kind, metric=metric) == 0.0


def test_path_callable_and_state_dict_at_object(setup):
    model, sa, sb, data = setup
    linear = evaluate_path(model, sa, sb, data, num_points=3)

    class Curve:
        def state_dict_at(self, t):
            return interpolate(sa, sb, t)

    via_obj = evaluate_path(model, None, None, data, num_points=3, path=Curve())
    via_fn = evaluate_path(model, None, None, data, num_points=3, path=lambda t: interpolate(sa, sb, t))
    assert via_obj.loss == linear.loss and via_fn.loss == linear.loss
    assert via_obj.metadata["path"] == "Curve"
    with pytest.raises(RebasinError, match="not both"):
        evaluate_path(model, sa, sb, data, path=Curve())
    with pytest.raises(RebasinError, match="state_dict_at"):
        evaluate_path(model, None, None, data, path=42)
    with pytest.raises(RebasinError, match="needs state_a"):
        evaluate_path(model, sa, None, data)


def test_evaluate_path_state_model_mismatch(setup):
    model, sa, sb, data = setup
    bad = {k: v for k, v in sa.items() if k != "1.running_var"}
    with pytest.raises(RebasinError, match=r"missing keys: \['1.running_var'\]"):
        evaluate_path(model, None, None, data, path=lambda t: bad, num_points=2)
    wrong = {**sa, "0.bias": torch.zeros(5)}
    with pytest.raises(RebasinError, match=r"'0.bias': \(5,\) \(model: \(8,\)\)"):
        evaluate(model, data, state=wrong)


def test_custom_loss_non_classification():
    model = seeded_model(lambda: nn.Linear(3, 2), 0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(10, 3, generator=g), torch.randn(10, 2, generator=g))]
    s = {k: v.clone() for k, v in model.state_dict().items()}
    res = evaluate_path(model, s, s, data, num_points=2, loss_fn=nn.functional.mse_loss)
    assert res.accuracy is None
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(model(data[0][0]), data[0][1]))
    assert res.loss[0] == pytest.approx(expected, rel=1e-6)
    assert res.metadata["loss_fn"] == "mse_loss"


# ---------------------------------------------------------------- reset_bn_stats


def reference_bn_reset(model, state, loader, max_batches=None):
    """PyTorch's own cumulative average: momentum=None, reset, train-mode passes on a deepcopy."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = None
            mod.reset_running_stats()
    m.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            m(x)
    return m.state_dict()


@pytest.mark.parametrize(("factory", "shape"), [(mlp_bn, (6,)), (conv_bn, (2, 5, 5))])
def test_reset_bn_stats_matches_torch_cumulative_average(factory, shape):
    data = batches(shape, 50, 16)  # batches of 16, 16, 16, 2: unequal sizes on purpose
    model = seeded_model(factory, 0)
    state = trained_state(model, data, 1)
    state0, model0 = clone(state), clone(model.state_dict())
    model.train()
    model[1].momentum = 0.3
    new = reset_bn_stats(model, state, data)
    ref = reference_bn_reset(model, state, data)
    assert new.keys() == ref.keys()
    for k in ref:
        assert_close(new[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert int(new["1.num_batches_tracked"]) == 4
    assert not torch.allclose(new["1.running_mean"], state["1.running_mean"])
    # pure: inputs, model state, momentum and flags untouched; non-BN entries shared
    assert_state_equal(state, state0)
    assert_state_equal(model.state_dict(), model0)
    assert model[1].momentum == 0.3 and all(m.training for m in model.modules())
    assert new["0.weight"] is state["0.weight"]
    assert not model[1]._forward_pre_hooks
    # max_batches
    new2 = reset_bn_stats(model, state, data, max_batches=2)
    ref2 = reference_bn_reset(model, state, data, max_batches=2)
    assert_close(new2["1.running_var"], ref2["1.running_var"], rtol=1e-5, atol=1e-6)
    assert int(new2["1.num_batches_tracked"]) == 2


def test_reset_bn_stats_equal_batches_is_the_full_data_mean():
    data = batches((6,), 48, 16)
    model = seeded_model(mlp_bn, 0)
    state = trained_state(model, data, 1)
    new = reset_bn_stats(model, state, data)
    with torch.no_grad():
        h = torch.cat([x for x, _ in data]) @ state["0.weight"].T + state["0.bias"]
    assert_close(new["1.running_mean"], h.mean(0), rtol=1e-5, atol=1e-6)


def test_reset_bn_stats_without_bn_and_errors(setup):
    model = seeded_model(mlp, 0)
    data = batches((6,), 20, 10)
    s = dict(model.state_dict())
    out = reset_bn_stats(model, s, data)
    assert out == s and out is not s
    bn_model, sa, _, bn_data = setup
    with pytest.raises(RebasinError, match="no batches"):
        reset_bn_stats(bn_model, sa, [])
    with pytest.raises(RebasinError, match="max_batches"):
        reset_bn_stats(bn_model, sa, bn_data, max_batches=0)
    # bare-input loaders are accepted
    xs = [x for x, _ in bn_data]
    bare, paired = reset_bn_stats(bn_model, sa, xs), reset_bn_stats(bn_model, sa, bn_data)
    assert_close(bare["4.running_var"], paired["4.running_var"])


def test_evaluate_path_with_bn_reset(setup):
    model, sa, sb, data = setup
    res = evaluate_path(model, sa, sb, data, num_points=3, bn_loader=data)
    assert res.metadata["bn_reset"] is True
    loss_a, _ = evaluate(model, data, state=reset_bn_stats(model, sa, data))
    loss_mid, _ = evaluate(model, data, state=reset_bn_stats(model, interpolate(sa, sb, 0.5), data))
    assert res.loss[0] == pytest.approx(loss_a, rel=1e-12)
    assert res.loss[1] == pytest.approx(loss_mid, rel=1e-12)
    plain = evaluate_path(model, sa, sb, data, num_points=3)
    assert plain.loss[1] != res.loss[1]
    # no BN: bn_loader is a no-op
    m = seeded_model(mlp, 0)
    s = dict(m.state_dict())
    s2 = {k: v + 0.1 for k, v in s.items()}
    with_reset = evaluate_path(m, s, s2, data, num_points=3, bn_loader=data)
    assert with_reset.loss == evaluate_path(m, s, s2, data, num_points=3).loss


# ------------------------------------------------------------------ path objects: the path says how it is built
def test_evaluate_path_takes_path_objects_and_names_them():
    from torch.testing import assert_close

    from rebasin import BNResetPath, LinearPath, reset_bn_stats

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    other = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    for m in (model, other):
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    sa, sb = model.state_dict(), other.state_dict()
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    line = LinearPath(sa, sb)
    reset = BNResetPath(line, model, data, max_batches=1)
    for k, v in reset_bn_stats(model, line.state_dict_at(0.5), data).items():
        assert_close(reset.state_dict_at(0.5)[k], v)
    plain = evaluate_path(model, line, data, num_points=3)
    fixed = evaluate_path(model, reset, data, num_points=3)
    assert plain.metadata["path"] == fixed.metadata["path"] == "linear"
    assert not plain.metadata["bn_reset"] and fixed.metadata["bn_reset"] and fixed.metadata["max_batches"] == 1
    assert plain.loss != fixed.loss  # the randomised statistics are replaced at every point


def test_path_objects_reject_bad_inputs_clearly():
    from rebasin import BNResetPath, LinearPath

    model = nn.Linear(4, 3)
    sa = model.state_dict()
    with pytest.raises(RebasinError, match=r"takes a path object, not a state_dict: pass LinearPath\(state_a, state_b\)"):
        evaluate_path(model, sa, [(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))], num_points=2)
    with pytest.raises(RebasinError, match="BNResetPath needs data"):
        BNResetPath(LinearPath(sa, sa), model, None)
    with pytest.raises(RebasinError, match="path must be a callable"):
        BNResetPath(42, model, [torch.randn(2, 4)])
