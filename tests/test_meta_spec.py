"""Specs without weights: ``spec_from_model`` on models built under ``torch.device("meta")``.

The spec of a meta model (example input on meta, on CPU or a bare shape) equals the spec of the same
model with real weights, sizes included, and nothing is allocated; whatever needs values (the
functional check, matching) refuses a meta model with a RebasinError, while permuting a meta state works.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rebasin
from rebasin import (
    PermutationSpec,
    RebasinError,
    permute,
    random_permutation,
    register_module,
    spec_from_model,
    weight_matching,
)
from rebasin.apps.models import MLP, VGG, ResNet20, SmallCNN
from rebasin.trace import registration_scope, trace_model


class ConvBN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool, twice, flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.fc = nn.Linear(16 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class Residual(nn.Module):
    """A ResNet-style stream: stem, two residual branches of two Linears each, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 12)
        self.a1, self.a2 = nn.Linear(12, 10), nn.Linear(10, 12)
        self.b1, self.b2 = nn.Linear(12, 7), nn.Linear(7, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.a2(F.relu(self.a1(h)))
        h = h + self.b2(F.relu(self.b1(h)))
        return self.head(F.relu(self.norm(h)))


class MakesTensors(nn.Module):
    """A forward that creates tensors without a device: at run time (from a shape) and at trace time (constants)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 9), nn.Linear(9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x)) * torch.ones(1) + torch.zeros(x.size())[:, :1]
        return self.fc2(h) + torch.arange(2.0)


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), (2, 4)),
    "cnn_bn": (ConvBN, (2, 3, 8, 8)),
    "residual": (Residual, (2, 6)),
    "makes_tensors": (MakesTensors, (2, 5)),
    "apps_mlp_bn": (lambda: MLP(4, [8, 8], 2, norm="batchnorm", dropout=0.1), (2, 4)),
    "apps_mlp_ln": (lambda: MLP(4, [8, 6], 2, norm="layernorm", activation="gelu"), (2, 4)),
    "apps_vgg": (lambda: VGG([8, "M", 16, "M"], batch_norm=True, num_classes=3), (2, 3, 32, 32)),
    "apps_resnet20": (lambda: ResNet20(width=0.25), (2, 3, 16, 16)),
    "apps_resnet20_ln": (lambda: ResNet20(width=0.25, norm="layernorm", shortcut_kernel=3), (2, 3, 16, 16)),
    "apps_resnet20_gn": (lambda: ResNet20(width=0.25, norm="groupnorm1"), (2, 3, 16, 16)),
    "apps_smallcnn": (lambda: SmallCNN(channels=(4, 8, 8)), (2, 1, 12, 12)),
}


def _pair(name: str) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    real = build()
    with torch.device("meta"):
        meta = build()
    return real, meta, shape


def _same(a: PermutationSpec, b: PermutationSpec) -> None:
    assert a == b
    assert dict(a.sizes) == dict(b.sizes)
    assert a.perms == b.perms


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("given", ["meta", "cpu", "shape", "size"])
def test_meta_spec_equals_real_spec(name, given):
    real, meta, shape = _pair(name)
    spec_real = spec_from_model(real, torch.randn(shape))
    x = {"meta": torch.empty(shape, device="meta"), "cpu": torch.randn(shape), "shape": shape,
         "size": torch.Size(shape)}[given]
    spec_meta = spec_from_model(meta, x)  # check=True by default: skipped on meta, no error
    _same(spec_meta, spec_real)
    assert all(t.is_meta for t in meta.state_dict().values())  # nothing was materialised


@pytest.mark.parametrize("name", ["cnn_bn", "residual", "apps_resnet20"])
def test_meta_trace_activation_nodes_and_capture_with_real_weights(name):
    real, meta, shape = _pair(name)
    tr_real = trace_model(real, torch.randn(shape))
    tr_meta = trace_model(meta, shape)
    assert tr_meta.activation_nodes == tr_real.activation_nodes
    # a trace made on meta captures activations of real weights
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    state = real.state_dict()
    got, want = tr_meta.capture(state, x), tr_real.capture(state, x)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_model_far_larger_than_memory_costs_nothing():
    # 16 layers of 50,000 x 50,000 floats: 160 GB if it were real
    with torch.device("meta"):
        model = nn.Sequential(*[m for _ in range(16) for m in (nn.Linear(50_000, 50_000), nn.ReLU())],
                              nn.Linear(50_000, 10))
    spec = spec_from_model(model, (1, 50_000))
    assert len(spec.perms) == 16 and set(dict(spec.sizes).values()) == {50_000}
    assert dict(spec.axes)["2.weight"] == ("P1", "P0")


def test_real_model_from_a_shape_is_seeded_and_leaves_global_rng_alone(make_mlp):
    model = make_mlp(4, [8], 3, seed=0)
    state = torch.get_rng_state()
    spec = spec_from_model(model, (2, 4))
    assert torch.equal(torch.get_rng_state(), state)
    _same(spec, spec_from_model(model, torch.randn(2, 4)))


def test_example_input_is_not_mutated_and_stays_on_its_device():
    _, meta, shape = _pair("mlp")
    x = torch.randn(shape)
    before = x.clone()
    spec_from_model(meta, x)
    assert x.device.type == "cpu" and torch.equal(x, before)


def test_tuple_and_keyword_inputs_are_moved_to_meta():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(3, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x, y=None):
            return self.out(F.relu(self.a(x) + self.b(y)))

    torch.manual_seed(0)
    real = Two()
    with torch.device("meta"):
        meta = Two()
    x, y = torch.randn(2, 3), torch.randn(2, 4)
    want = spec_from_model(real, (x, y))
    _same(spec_from_model(meta, (x, y)), want)
    _same(spec_from_model(meta, {"x": x, "y": y}), want)


def test_registered_user_layer_on_meta():
    class MyLinear(nn.Module):
        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_out, n_in))
            self.bias = nn.Parameter(torch.randn(n_out))

        def forward(self, x):
            return x @ self.weight.T + self.bias

    def build():
        return nn.Sequential(MyLinear(4, 7), nn.ReLU(), MyLinear(7, 2))

    with registration_scope():
        register_module(MyLinear, params={"weight": ("out", "in"), "bias": ("out",)}, feature_dim=-1)
        torch.manual_seed(0)
        real = build()
        with torch.device("meta"):
            meta = build()
        _same(spec_from_model(meta, (3, 4)), spec_from_model(real, torch.randn(3, 4)))


# --------------------------------------------------------------------------- what needs values
def test_check_on_a_meta_model_says_it_needs_real_weights():
    real, meta, shape = _pair("cnn_bn")
    spec = spec_from_model(meta, shape)
    with pytest.raises(RebasinError, match="needs real weights.*on meta"):
        spec.check(meta, torch.randn(shape))
    with pytest.raises(RebasinError, match="needs real weights.*example_input is"):
        spec.check(real, torch.empty(shape, device="meta"))
    assert spec.check(real, torch.randn(shape)) >= 0.0  # the meta spec passes the check on real weights


def test_permute_a_meta_state_dict():
    _, meta, shape = _pair("apps_resnet20")
    spec = spec_from_model(meta, shape)
    state = meta.state_dict()
    out = permute(spec, random_permutation(spec, seed=0), state)
    assert out.keys() == state.keys()
    assert all(v.is_meta and v.shape == state[k].shape and v.dtype == state[k].dtype for k, v in out.items())


def test_permute_meta_states_with_structured_specs():
    e, h = 12, 3
    with torch.device("meta"):
        mha = nn.MultiheadAttention(e, h, batch_first=True)
        conv = nn.Conv2d(6, 9, 3, groups=3)
        lstm = nn.LSTM(4, 5, batch_first=True)
    specs = [
        (mha, PermutationSpec(
            {"in_proj_weight": ("QKV", "R"), "in_proj_bias": ("QKV",), "out_proj.weight": ("R", "VO"),
             "out_proj.bias": ("R",)},
            structure={"QK": ("H", e // h), "VO": ("H", e // h)},
            concat={"QKV": (("QK", e), ("QK", e), ("VO", e))})),
        (conv, PermutationSpec({"weight": ("O", "I", None, None), "bias": ("O",)},
                               structure={"I": ("G", 2), "O": ("G", 3)}, grouped={("weight", 1): 3})),
        (lstm, PermutationSpec({"weight_ih_l0": ("G", None), "weight_hh_l0": ("G", "H"), "bias_ih_l0": ("G",),
                                "bias_hh_l0": ("G",)}, concat={"G": (("H", 5),) * 4})),
    ]
    for module, spec in specs:
        state = module.state_dict()
        perms = random_permutation(spec, seed=1, sizes=spec.validate(state))
        out = permute(spec, perms, state)
        assert all(v.is_meta and v.shape == state[k].shape for k, v in out.items())


def test_matching_a_meta_state_is_refused():
    _, meta, shape = _pair("mlp")
    spec = spec_from_model(meta, shape)
    with pytest.raises(RebasinError, match=r"state_a\['0.weight'\].*on meta.*need real weights"):
        weight_matching(spec, meta.state_dict(), meta.state_dict())


def test_paths_refuse_a_meta_state():
    real, meta, shape = _pair("mlp")
    with pytest.raises(RebasinError, match="on meta.*needs real weights"):
        rebasin.evaluate_path(real, meta.state_dict(), real.state_dict(), [(torch.randn(shape), torch.zeros(2))])


def test_partly_meta_model_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.device("meta"):
        model[2] = nn.Linear(8, 2)
    with pytest.raises(RebasinError, match="some tensors on meta .'2.weight'. and some with values"):
        spec_from_model(model, (2, 4))


def test_real_model_with_a_meta_input_says_which_device():
    real, _, shape = _pair("mlp")
    with pytest.raises(RebasinError, match="example_input is on meta but the model's state is on cpu"):
        spec_from_model(real, torch.empty(shape, device="meta"))


@pytest.mark.parametrize("method", rebasin.matcher_names())
def test_every_matcher_refuses_a_meta_model(method):
    real, meta, shape = _pair("mlp")
    spec = spec_from_model(meta, shape)
    loader = [(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(RebasinError, match="is on meta"):
        rebasin.align(meta, real, method=method, spec=spec, loader=loader)
