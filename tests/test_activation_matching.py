"""Activation matching: planted permutations recovered exactly, dead units, residual streams, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rebasin import RebasinError, invert, permute, random_permutation, spec_from_model
from rebasin.apps.models import MLP, VGG, ResNet20
from rebasin.matching.activation import activation_correlations, activation_matching, correlation_from_moments
from rebasin.trace import trace_model


def _randomize_norms_(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (so they must be permuted)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def _positive_biases_(model: nn.Module) -> nn.Module:
    """Hidden Linear biases > 0: no ReLU unit is dead on the test data (dead units cannot be told apart)."""
    with torch.no_grad():
        for m in list(model.modules())[:-1]:
            if isinstance(m, nn.Linear):
                m.bias.abs_().add_(0.1)
    return model


def _planted(model: nn.Module, x: torch.Tensor, seed: int = 7):
    """``B = permute(spec, pi, A)``; returns (spec, pi, model_b)."""
    spec = spec_from_model(model, x[:2])
    pi = random_permutation(spec, seed=seed)
    model_b = copy.deepcopy(model)
    model_b.load_state_dict(permute(spec, pi, model.state_dict()))
    return spec, pi, model_b


def _batches(x: torch.Tensor, size: int):
    return [(x[i : i + size], torch.zeros(len(x[i : i + size]), dtype=torch.long)) for i in range(0, len(x), size)]


def _assert_recovers(spec, pi, perms, model_a, model_b):
    assert set(perms) == set(spec.perms)
    for name in spec.perms:
        assert torch.equal(perms[name], invert(pi)[name]), name
    back = permute(spec, perms, model_b.state_dict())
    for k, v in model_a.state_dict().items():
        assert_close(back[k], v, rtol=0, atol=0, msg=k)


def test_planted_mlp_exact():
    torch.manual_seed(0)
    model = _positive_biases_(MLP(6, [16, 12], 3))
    x = torch.randn(96, 6)
    spec, pi, model_b = _planted(model, x)
    perms, info = activation_matching(model, model_b, _batches(x, 32), return_info=True)
    _assert_recovers(spec, pi, perms, model, model_b)
    for name in spec.perms:
        assert info.corr_after[name] == pytest.approx(1.0, abs=1e-9)
        assert info.corr_before[name] < 0.9
    assert info.num_batches == 3 and info.num_samples == {"P0": 96, "P1": 96}


def test_planted_vgg_bn_flatten_exact():
    torch.manual_seed(1)
    model = VGG([4, "M", 6, "M", 8], batch_norm=True, image_size=8, classifier_hidden=[10])
    model = _positive_biases_(_randomize_norms_(model, 1))
    x = torch.randn(20, 3, 8, 8)
    spec, pi, model_b = _planted(model, x)
    assert spec.blocks  # the Flatten -> Linear block axis is exercised
    perms = activation_matching(model, model_b, _batches(x, 5))
    _assert_recovers(spec, pi, perms, model, model_b)


def test_planted_resnet20_exact():
    torch.manual_seed(2)
    model = _randomize_norms_(ResNet20(width=0.25, num_classes=4), 2)
    x = torch.randn(6, 3, 8, 8)
    spec, pi, model_b = _planted(model, x)
    perms = activation_matching(model, model_b, _batches(x, 3))
    _assert_recovers(spec, pi, perms, model, model_b)


def test_planted_with_positive_rescaling_is_recovered():
    # ReLU is positively homogeneous: scaling a unit's input by c and its output weights by 1/c does
    # not change the function. Correlations are scale invariant, so the permutation is still found.
    torch.manual_seed(3)
    model = _positive_biases_(MLP(5, [10], 2))
    x = torch.randn(64, 5)
    spec, pi, model_b = _planted(model, x)
    c = torch.linspace(0.2, 5.0, 10)
    with torch.no_grad():
        layers = model_b.layers
        layers[0].weight.mul_(c[:, None])
        layers[0].bias.mul_(c)
        layers[2].weight.div_(c[None, :])
    assert_close(model_b(x), model(x), rtol=1e-4, atol=1e-5)
    perms = activation_matching(model, model_b, [x])
    assert torch.equal(perms["P0"], invert(pi)["P0"])


def test_dead_unit_no_nan_and_valid_permutation():
    torch.manual_seed(4)
    model = _positive_biases_(MLP(6, [12], 3))
    with torch.no_grad():  # unit 5 never fires
        model.layers[0].weight[5].zero_()
        model.layers[0].bias[5] = -1.0
    x = torch.randn(80, 6)
    spec, pi, model_b = _planted(model, x)
    corr = activation_correlations(model, model_b, _batches(x, 16))["P0"]
    assert torch.isfinite(corr).all()
    dead_b = int(invert(pi)["P0"][5])  # B's copy of the dead unit
    assert torch.equal(corr[5], torch.zeros(12, dtype=torch.float64))
    assert torch.equal(corr[:, dead_b], torch.zeros(12, dtype=torch.float64))
    perms, info = activation_matching(model, model_b, _batches(x, 16), return_info=True)
    assert torch.equal(torch.sort(perms["P0"]).values, torch.arange(12))
    assert torch.equal(perms["P0"], invert(pi)["P0"])  # the live units pin down the dead one
    assert info.corr_after["P0"] == pytest.approx(11 / 12, abs=1e-9)


def test_dead_units_on_both_sides_do_not_break_live_matches():
    torch.manual_seed(5)
    model_a = _positive_biases_(MLP(4, [8], 2))
    model_b = _positive_biases_(MLP(4, [8], 2))
    with torch.no_grad():
        for m, units in ((model_a, [1, 2]), (model_b, [0, 6])):
            m.layers[0].weight[units] = 0.0
            m.layers[0].bias[units] = -0.5
    x = torch.randn(40, 4)
    corr = activation_correlations(model_a, model_b, [x])["P0"]
    assert torch.isfinite(corr).all()
    assert corr[[1, 2]].abs().sum() == 0 and corr[:, [0, 6]].abs().sum() == 0
    perms = activation_matching(model_a, model_b, [x])
    assert torch.equal(torch.sort(perms["P0"]).values, torch.arange(8))


def test_correlation_from_moments_matches_numpy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 200, generator=g, dtype=torch.float64) * 3 + 10
    b = torch.randn(5, 200, generator=g, dtype=torch.float64) + a[[3, 0, 4, 1, 2]] * 0.5
    got = correlation_from_moments(200, a.sum(1), b.sum(1), (a * a).sum(1), (b * b).sum(1), a @ b.T)
    want = np.corrcoef(a.numpy(), b.numpy())[:5, 5:]
    assert_close(got, torch.from_numpy(want), rtol=1e-10, atol=1e-10)


def test_streaming_equals_one_batch():
    torch.manual_seed(6)
    # float64 end to end: a float32 matmul may round differently for another batch size (BLAS blocking),
    # which is ~1e-7 and not what this test is about (the streaming sums).
    model_a = MLP(6, [9], 3).double()
    model_b = MLP(6, [9], 3).double()
    x = torch.randn(70, 6, dtype=torch.float64) + 3.0  # a large mean: the shifted sums keep the covariance accurate
    one = activation_correlations(model_a, model_b, [x])["P0"]
    many = activation_correlations(model_a, model_b, _batches(x, 8))["P0"]
    assert_close(many, one, rtol=1e-10, atol=1e-10)
    capped = activation_correlations(model_a, model_b, _batches(x, 10), max_batches=2)["P0"]
    assert_close(capped, activation_correlations(model_a, model_b, [x[:20]])["P0"], rtol=1e-10, atol=1e-10)


class _ResidualMLP(nn.Module):
    """x -> Linear -> [h + Linear(relu(Linear(h)))] x 2 -> relu -> Linear: one residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.a1, self.b1 = nn.Linear(6, 5), nn.Linear(5, 6)
        self.a2, self.b2 = nn.Linear(6, 5), nn.Linear(5, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.b1(torch.relu(self.a1(h)))
        h = h + self.b2(torch.relu(self.a2(h)))
        return self.out(torch.relu(h))


def test_residual_stream_pools_all_nodes_into_one_assignment():
    torch.manual_seed(7)
    model_a, model_b = _ResidualMLP(), _ResidualMLP()
    x = torch.randn(50, 4)
    tr = trace_model(model_a, x[:2])
    stream = tr.spec.axes["inp.weight"][0]
    assert tr.spec.axes["b1.weight"][0] == stream and tr.spec.axes["out.weight"][1] == stream
    nodes = tr.activation_nodes[stream]
    assert len(nodes) >= 3  # h (twice) and relu(h) are read by the next weighted layers

    # reference: the pooled correlation over every node's samples, computed directly
    acts_a = tr.capture(model_a.state_dict(), x, [n for n, _ in nodes])
    acts_b = tr.capture(model_b.state_dict(), x, [n for n, _ in nodes])
    fa = torch.cat([acts_a[n].movedim(ax, 0).reshape(6, -1) for n, ax in nodes], 1).double()
    fb = torch.cat([acts_b[n].movedim(ax, 0).reshape(6, -1) for n, ax in nodes], 1).double()
    want = torch.from_numpy(np.corrcoef(fa.detach().numpy(), fb.detach().numpy())[:6, 6:])
    got = activation_correlations(model_a, model_b, _batches(x, 20))[stream]
    assert_close(got, want, rtol=1e-9, atol=1e-9)

    # one permutation for the whole stream, and the planted one is found
    spec, pi, planted_b = _planted(model_a, x, seed=3)
    perms, info = activation_matching(model_a, planted_b, [x], return_info=True)
    assert set(perms) == set(spec.perms)
    assert info.num_samples[stream] == 50 * len(nodes)
    _assert_recovers(spec, pi, perms, model_a, planted_b)


def test_hand_written_spec_with_other_names():
    torch.manual_seed(8)
    model = _positive_biases_(MLP(5, [7], 2))
    x = torch.randn(30, 5)
    spec, pi, model_b = _planted(model, x)
    renamed = spec.renamed({"P0": "hidden"})
    perms = activation_matching(model, model_b, [x], spec=renamed)
    assert list(perms) == ["hidden"]
    assert torch.equal(perms["hidden"], invert(pi)["P0"])


def test_models_not_mutated():
    torch.manual_seed(9)
    model_a = _randomize_norms_(VGG([4, "M"], batch_norm=True, image_size=4), 0)
    model_b = _randomize_norms_(VGG([4, "M"], batch_norm=True, image_size=4), 1)
    model_a.train()
    model_b.eval()
    before_a = {k: v.clone() for k, v in model_a.state_dict().items()}
    before_b = {k: v.clone() for k, v in model_b.state_dict().items()}
    x = torch.randn(10, 3, 4, 4)
    x0 = x.clone()
    activation_matching(model_a, model_b, _batches(x, 4))
    for before, model in ((before_a, model_a), (before_b, model_b)):
        for k, v in model.state_dict().items():
            assert_close(v, before[k], rtol=0, atol=0, msg=k)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(m.training for m in model_a.modules())
    assert not any(m.training for m in model_b.modules())
    assert torch.equal(x, x0)


def test_different_architectures_raise():
    x = torch.randn(8, 6)
    with pytest.raises(RebasinError, match="layers.0.weight"):
        activation_matching(MLP(6, [8], 3), MLP(6, [9], 3), [x])
    with pytest.raises(RebasinError, match="only in model_b"):
        activation_matching(MLP(6, [8], 3), MLP(6, [8, 8], 3), [x])


def test_different_devices_raise():
    model_a = MLP(3, [4], 2)
    model_b = MLP(3, [4], 2).to("meta")
    with pytest.raises(RebasinError, match="device"):
        activation_matching(model_a, model_b, [torch.randn(4, 3)])


def test_bad_loader_inputs_raise():
    model = MLP(3, [4], 2)
    with pytest.raises(RebasinError, match="no batch"):
        activation_matching(model, model, [])
    with pytest.raises(RebasinError, match="max_batches"):
        activation_matching(model, model, [torch.randn(4, 3)], max_batches=0)
