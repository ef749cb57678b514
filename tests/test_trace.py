"""spec_from_model / trace_model: hand-written specs, unsupported structures, activation nodes, capture."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rebasin import PermutationSpec, RebasinError, RebasinWarning, permute, random_permutation, spec_from_model
from rebasin._common import forward_with_state, state_of
from rebasin.apps.models import MLP, VGG, ResNet20
from rebasin.trace import ModelTrace, trace_model


# --------------------------------------------------------------------------- helpers
def assert_same_spec(a: PermutationSpec, b: PermutationSpec) -> None:
    """Equal up to a bijective renaming of the permutations (same grouping of axes, same blocks)."""
    assert set(a.axes) == set(b.axes), sorted(set(a.axes) ^ set(b.axes))
    fwd: dict[str, str] = {}
    back: dict[str, str] = {}
    for key in a.axes:
        ax_a, ax_b = a.axes[key], b.axes[key]
        assert len(ax_a) == len(ax_b), (key, ax_a, ax_b)
        for pa, pb in zip(ax_a, ax_b):
            assert (pa is None) == (pb is None), (key, ax_a, ax_b)
            if pa is not None:
                assert fwd.setdefault(pa, pb) == pb, f"{key}: {pa} maps to {fwd[pa]} and {pb}"
                assert back.setdefault(pb, pa) == pa, f"{key}: {pb} comes from {back[pb]} and {pa}"
    assert dict(a.blocks) == dict(b.blocks)
    if a.sizes is not None and b.sizes is not None:
        assert {fwd[p]: n for p, n in a.sizes.items()} == dict(b.sizes)


def test_assert_same_spec_can_fail() -> None:
    a = PermutationSpec({"w1": ("A", None), "w2": ("B", "A"), "w3": (None, "B")})
    assert_same_spec(a, PermutationSpec({"w1": ("x", None), "w2": ("y", "x"), "w3": (None, "y")}))
    with pytest.raises(AssertionError):  # A and B merged
        assert_same_spec(a, PermutationSpec({"w1": ("x", None), "w2": ("x", None), "w3": (None, "x")}))
    with pytest.raises(AssertionError):  # a permutation missing
        assert_same_spec(a, PermutationSpec({"w1": ("x", None), "w2": (None, "x"), "w3": (None, None)}))


def _linear(axes: dict, name: str, out: str | None, inp: str | None, bias: bool = True) -> None:
    axes[f"{name}.weight"] = (out, inp)
    if bias:
        axes[f"{name}.bias"] = (out,)


def _conv(axes: dict, name: str, out: str | None, inp: str | None, bias: bool = True) -> None:
    axes[f"{name}.weight"] = (out, inp, None, None)
    if bias:
        axes[f"{name}.bias"] = (out,)


def _bn(axes: dict, name: str, p: str) -> None:
    for s in ("weight", "bias", "running_mean", "running_var"):
        axes[f"{name}.{s}"] = (p,)
    axes[f"{name}.num_batches_tracked"] = ()


# --------------------------------------------------------------------------- hand-written specs
def test_mlp_matches_hand_written_spec() -> None:
    model = MLP(5, [8, 7], 3, norm="layernorm")  # Linear, LN, ReLU, Linear, LN, ReLU, Linear
    axes: dict = {}
    _linear(axes, "layers.0", "h1", None)
    axes["layers.1.weight"] = axes["layers.1.bias"] = ("h1",)
    _linear(axes, "layers.3", "h2", "h1")
    axes["layers.4.weight"] = axes["layers.4.bias"] = ("h2",)
    _linear(axes, "layers.6", None, "h2")
    spec = spec_from_model(model, torch.randn(2, 5))
    assert_same_spec(spec, PermutationSpec(axes, {"h1": 8, "h2": 7}))
    assert spec.perms == ("P0", "P1") and dict(spec.sizes) == {"P0": 8, "P1": 7}


def test_vgg_matches_hand_written_spec() -> None:
    model = VGG([4, "M", 6], image_size=8, batch_norm=True, classifier_hidden=(5,))
    # features: 0 conv, 1 bn, 2 relu, 3 pool, 4 conv, 5 bn, 6 relu; classifier: 0 flatten, 1 linear, 2 relu, 3 linear
    axes: dict = {}
    _conv(axes, "features.0", "c1", None)
    _bn(axes, "features.1", "c1")
    _conv(axes, "features.4", "c2", "c1")
    _bn(axes, "features.5", "c2")
    _linear(axes, "classifier.1", "f1", "c2")
    _linear(axes, "classifier.3", None, "f1")
    hand = PermutationSpec(axes, blocks={("classifier.1.weight", 1): 4 * 4})
    assert_same_spec(spec_from_model(model, torch.randn(2, 3, 8, 8)), hand)


def _resnet20_hand_spec(norm: str) -> PermutationSpec:
    axes: dict = {}

    def add_norm(name: str, p: str) -> None:
        if norm == "batchnorm":
            _bn(axes, name, p)
        else:
            axes[f"{name}.weight"] = axes[f"{name}.bias"] = (p,)

    _conv(axes, "conv1", "s1", None, bias=False)
    add_norm("norm1", "s1")
    stream = "s1"
    for stage in (1, 2, 3):
        out_stream = f"s{stage}"
        for b in range(3):
            pre = f"layer{stage}.{b}"
            inner = f"i{stage}{b}"
            _conv(axes, f"{pre}.conv1", inner, stream, bias=False)
            add_norm(f"{pre}.norm1", inner)
            _conv(axes, f"{pre}.conv2", out_stream, inner, bias=False)
            add_norm(f"{pre}.norm2", out_stream)
            if stage > 1 and b == 0:
                _conv(axes, f"{pre}.shortcut.0", out_stream, stream, bias=False)
                add_norm(f"{pre}.shortcut.1", out_stream)
            stream = out_stream
    _linear(axes, "fc", None, stream)
    return PermutationSpec(axes)


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "groupnorm1"])
def test_resnet20_matches_hand_written_spec(norm: str) -> None:
    model = ResNet20(width=0.25, norm=norm, shortcut_kernel=3)
    spec = spec_from_model(model, torch.randn(2, 3, 8, 8))
    assert_same_spec(spec, _resnet20_hand_spec(norm))
    assert spec.perms[0] == "P0" and spec.axes["conv1.weight"][0] == "P0"
    assert len(spec.perms) == 12 and spec.perms == tuple(f"P{i}" for i in range(12))


# --------------------------------------------------------------------------- unsupported structures
class _Net(nn.Module):
    """conv -> <middle> -> relu -> conv -> pool -> linear, with a pluggable middle."""

    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.middle = middle
        self.conv_b = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.middle(self.conv_a(x)))
        return self.head(self.conv_b(h).mean((2, 3)))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.out(self.attn(h, h, h)[0])


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)
        self.c = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.stack([self.a(x), self.b(x)], dim=1).sum(1))


def test_cat_along_channels_is_a_concatenation_and_exact() -> None:
    torch.manual_seed(0)
    spec = spec_from_model(_Cat(), torch.randn(1, 3, 4, 4))  # functional check included
    assert spec.axes["c.weight"] == ("C0" if False else None, spec.axes["c.weight"][1], None, None)
    name = spec.axes["c.weight"][1]
    assert spec.concat[name] == ((spec.axes["a.weight"][0], 4), (spec.axes["b.weight"][0], 4))


class _MixingReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 12)
        self.b = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).view(-1, 4, 3).transpose(1, 2).reshape(-1, 12)
        return self.b(h)


class _ControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return -self.a(x)


class _AddUnpermuted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x)) + x)


class _ChannelCumsum(nn.Module):  # a running sum over the features depends on their order
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).cumsum(1))


# name: (model, input shape, how messages name the construct (module path or call, then the model's source
# line), the reason, the module whose units are pinned)
UNSUPPORTED = {
    "nested-groups": (lambda: _Net(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.GroupNorm(2, 8))),
                      (1, 3, 6, 6), r"middle\.1 \(GroupNorm, tests/test_trace\.py:142\)", "nested groups", "middle.0"),
    "one-output-per-group": (lambda: _Net(nn.Sequential(nn.Conv2d(8, 4, 1, groups=4), nn.Conv2d(4, 8, 1))),
                             (1, 3, 6, 6), r"middle\.0 \(Conv2d, tests/test_trace\.py:142\)",
                             "one output channel per group", "conv_a"),
    "stack": (_Stack, (2, 3), r"torch\.stack in _Stack\.forward \(tests/test_trace\.py:177\)", "torch.stack", "a"),
    "mixing-reshape": (_MixingReshape, (2, 5), r"Tensor\.reshape in _MixingReshape\.forward \(tests/test_trace\.py:195\)",
                       "mixes channels", "a"),
    "add-unpermuted": (_AddUnpermuted, (2, 5), r"the \+ in _AddUnpermuted\.forward \(tests/test_trace\.py:217\)",
                       "unpermuted", "a"),
    "channel-cumsum": (_ChannelCumsum, (2, 5), r"Tensor\.cumsum in _ChannelCumsum\.forward \(tests/test_trace\.py:227\)",
                       "Tensor.cumsum is not an operation", "a"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_structure_is_refused_under_strict_naming_module_and_line(name: str) -> None:
    make, shape, where, what, _ = UNSUPPORTED[name]
    torch.manual_seed(0)
    with pytest.raises(RebasinError) as info:
        spec_from_model(make(), torch.randn(shape), strict=True)
    msg = str(info.value)
    assert re.search(where, msg) and what in msg and "PermutationSpec(axes=" in msg, msg
    assert "node '" not in msg, msg


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_structure_pins_by_default_naming_module_and_line(name: str) -> None:
    make, shape, where, what, pinned = UNSUPPORTED[name]
    torch.manual_seed(0)
    with pytest.warns(RebasinWarning) as rec:
        spec = spec_from_model(make(), torch.randn(shape))  # the functional check runs
    msgs = [str(w.message) for w in rec if "pinned" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert re.search(rf"- {re.escape(pinned)}: \d+ unit\(s\) pinned: {where}: [^\n]*{re.escape(what)}", msgs[0]), msgs[0]
    assert spec.coverage is not None and spec.coverage.modules[pinned][1] > 0
    assert any(p.module == pinned and p.line is not None and p.line.startswith("tests/test_trace.py:")
               for p in spec.coverage.pins)


def test_data_dependent_control_flow_raises_with_fx() -> None:
    with pytest.raises(RebasinError, match=r"could not trace _ControlFlow.*control flow.*tracer='dynamic'.*"
                                           r"PermutationSpec\(axes="):
        spec_from_model(_ControlFlow(), torch.randn(2, 5), tracer="fx")


def test_data_dependent_control_flow_falls_back_to_the_dynamic_tracer() -> None:
    # the default tracer records the path the example input takes when torch.fx fails
    spec = spec_from_model(_ControlFlow(), torch.randn(2, 5))
    assert spec.axes == {"a.weight": (None, None), "a.bias": (None,)}


def test_scalar_ops_and_dead_permutations_are_fine() -> None:
    class ScalarAdd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(2.0 * F.relu(self.a(x)) + 1.0)

    class OutputResidual(nn.Module):  # the Linear's output reaches the model output: no permutation
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + x

    assert spec_from_model(ScalarAdd(), torch.randn(2, 5)).perms == ("P0",)
    spec = spec_from_model(OutputResidual(), torch.randn(2, 5))
    assert spec.perms == () and dict(spec.axes) == {"a.weight": (None, None), "a.bias": (None,)}


# --------------------------------------------------------------------------- shared modules / tied weights
def test_module_called_twice_on_parallel_inputs() -> None:
    class Siamese(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.head = nn.Linear(5, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.head(F.relu(self.enc(x)) + F.relu(self.enc(y)))

    spec = spec_from_model(Siamese(), (torch.randn(2, 5), torch.randn(2, 5)))
    assert dict(spec.axes) == {"enc.weight": ("P0", None), "enc.bias": ("P0",),
                               "head.weight": (None, "P0"), "head.bias": (None,)}


def test_module_applied_to_its_own_output_gets_no_permutation() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.fc(x)))

    spec = spec_from_model(Twice(), torch.randn(2, 4))
    assert spec.perms == ()


def test_module_registered_twice_shares_its_entry() -> None:
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 6)
            self.b = self.a  # same module under two names: two state_dict keys per tensor
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.relu(self.b(x)))

    spec = spec_from_model(Aliased(), torch.randn(2, 5))
    assert spec.axes["a.weight"] == spec.axes["b.weight"] == ("P0", None)
    assert spec.axes["a.bias"] == spec.axes["b.bias"] == ("P0",)


def test_transposed_tied_weight_raises() -> None:
    class TiedAutoencoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(5, 6)
            self.mid = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.mid(F.relu(self.enc(x))))
            return F.linear(h, self.enc.weight.t())

    with pytest.raises(RebasinError, match=r"torch\.nn\.functional\.linear in TiedAutoencoder\.forward "
                       r"\(tests/test_trace\.py:\d+\).*computed in the graph.*PermutationSpec\(axes="):
        spec_from_model(TiedAutoencoder(), torch.randn(2, 5), strict=True)
    with pytest.warns(RebasinWarning, match=r"- mid: 6 unit\(s\) pinned: torch\.nn\.functional\.linear in "
                      r"TiedAutoencoder\.forward \(tests/test_trace\.py:\d+\): [^\n]*computed in the graph"):
        spec = spec_from_model(TiedAutoencoder(), torch.randn(2, 5))
    assert dict(spec.coverage.modules) == {"enc": (0, 6), "mid": (0, 6)}  # enc.weight is read transposed: pinned too


def test_permuted_parameter_used_in_unknown_op_raises() -> None:
    class WeightPenalty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.out = nn.Linear(5, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.relu(self.enc(x))) + self.enc.weight[0, 0]

    with pytest.raises(RebasinError, match=r"indexing \[\.\.\.\] in WeightPenalty\.forward \(tests/test_trace\.py:\d+\) "
                       r"safe for permutation\(s\) \['P0'\].*uses the parameter 'enc.weight'.*PermutationSpec\(axes="):
        spec_from_model(WeightPenalty(), torch.randn(2, 5), strict=True)
    with pytest.warns(RebasinWarning, match=r"- enc: 6 unit\(s\) pinned: the indexing .* uses the parameter 'enc.weight'"):
        spec = spec_from_model(WeightPenalty(), torch.randn(2, 5))
    assert spec.perms == () and spec.coverage.pinned == 6


def test_layer_scale_parameter_gets_the_permutation() -> None:
    class LayerScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 2)
            self.gamma = nn.Parameter(torch.randn(6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.gelu(self.a(x)) * self.gamma)

    spec = spec_from_model(LayerScale(), torch.randn(2, 5))
    assert spec.axes["gamma"] == ("P0",)


def test_wrong_spec_is_caught_by_the_functional_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """If a rule were wrong (here: torch.flip treated as elementwise), check=True turns it into an error."""
    import rebasin.trace.engine as trace_mod

    class Rolled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.flip(F.relu(self.a(x)), [1]))

    with pytest.raises(RebasinError, match="torch.flip"):
        spec_from_model(Rolled(), torch.randn(2, 5), strict=True)
    monkeypatch.setattr(trace_mod, "ELEMENTWISE_FN", trace_mod.ELEMENTWISE_FN | {torch.flip})
    assert spec_from_model(Rolled(), torch.randn(2, 5), check=False).perms == ("P0",)
    with pytest.raises(RebasinError, match="fails the functional check"):
        spec_from_model(Rolled(), torch.randn(2, 5))


def test_flatten_dropout_linear_blocks_and_activation_node() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.drop = nn.Dropout(0.5)
            self.fc1, self.fc2 = nn.Linear(3 * 4 * 5, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.drop(F.relu(self.conv(x)).view(x.shape[0], -1))
            return self.fc2(F.relu(self.fc1(h)))

    tr = trace_model(Net(), torch.randn(2, 2, 4, 5))
    assert dict(tr.spec.blocks) == {("fc1.weight", 1): 20}
    assert tr.spec.axes["fc1.weight"] == ("P1", "P0")
    assert tr.activation_nodes == {"P0": [("relu", 1)], "P1": [("relu_1", 1)]}


def test_bad_model_argument() -> None:
    with pytest.raises(RebasinError, match="nn.Module"):
        spec_from_model(lambda x: x, torch.randn(2))  # type: ignore[arg-type]  # the wrong type is the input under test


# --------------------------------------------------------------------------- activation nodes / capture
def test_activation_nodes_mlp() -> None:
    tr = trace_model(MLP(5, [8, 7], 3, dropout=0.1), torch.randn(2, 5))
    # layers: 0 Linear, 1 ReLU, 2 Dropout, 3 Linear, 4 ReLU, 5 Dropout, 6 Linear
    assert tr.activation_nodes == {"P0": [("layers_2", 1)], "P1": [("layers_5", 1)]}


def test_activation_nodes_flatten_uses_the_feature_map() -> None:
    tr = trace_model(VGG([4, "M", 6], image_size=8), torch.randn(2, 3, 8, 8))
    # features: 0 conv, 1 relu, 2 pool, 3 conv, 4 relu; classifier_0 is the Flatten
    assert tr.activation_nodes == {"P0": [("features_2", 1)], "P1": [("features_4", 1)]}


def test_activation_nodes_resnet20() -> None:
    tr = trace_model(ResNet20(width=0.25), torch.randn(2, 3, 8, 8))
    gm, nodes = tr.graph_module, tr.activation_nodes
    by_name = {n.name: n for n in gm.graph.nodes}

    def producer(name: str) -> str:
        """The module whose output feeds the captured ReLU / pool node."""
        arg = by_name[name].args[0]
        return str(arg.target) if arg.op == "call_module" else arg.name

    described = {p: [producer(n) for n, _ in v] for p, v in nodes.items()}
    assert all(axis == 1 for v in nodes.values() for _, axis in v)
    stream1 = ["norm1", "layer1.0.norm2_add", "layer1.1.norm2_add", "layer1.2.norm2_add"]
    streams = [v for v in described.values() if len(v) > 1]
    assert len(streams) == 3 and len(described) == 12
    # residual stream of stage 1: the stem, then each block's output (ReLU of norm2 + shortcut)
    assert described["P0"][0] == "norm1" and len(described["P0"]) == len(stream1)
    assert [by_name[n].args[0].op for n, _ in nodes["P0"][1:]] == ["call_function"] * 3
    # stage 3's stream ends at the global pool feeding fc (before the flatten)
    assert nodes[[p for p, v in described.items() if len(v) == 3][-1]][-1] == ("pool", 1)
    # each inner permutation is the ReLU after a block's norm1
    inner = sorted(v[0] for v in described.values() if len(v) == 1)
    assert inner == sorted(f"layer{s}.{b}.norm1" for s in (1, 2, 3) for b in range(3))


def test_capture_shapes_and_permutation_equivariance() -> None:
    torch.manual_seed(0)
    model = ResNet20(width=0.25)
    x = torch.randn(3, 3, 8, 8)
    tr = trace_model(model, x)
    state = state_of(model)
    acts = tr.capture(state, x)
    assert set(acts) == {n for v in tr.activation_nodes.values() for n, _ in v}
    perms = random_permutation(tr.spec, seed=3)
    acts_p = tr.capture(permute(tr.spec, perms, state), x)
    for p, nodes in tr.activation_nodes.items():
        for name, axis in nodes:
            assert acts[name].shape[axis] == tr.spec.sizes[p]
            torch.testing.assert_close(acts_p[name], acts[name].index_select(axis, perms[p]), atol=1e-5, rtol=0)
    # the value matches an ordinary forward hook on the stem ReLU input
    first = tr.capture(state, x, ["relu"])["relu"]
    with torch.no_grad():
        ref = F.relu(model.norm1.eval()(model.conv1(x)))
    torch.testing.assert_close(first, ref)


def test_capture_flatten_case_and_errors() -> None:
    model = VGG([4, "M", 6], image_size=8, classifier_hidden=(5,))
    x = torch.randn(2, 3, 8, 8)
    tr = trace_model(model, x)
    out = tr.capture(state_of(model), x, ["features_4"])
    assert out["features_4"].shape == (2, 6, 4, 4)
    with pytest.raises(RebasinError, match="unknown graph node"):
        tr.capture(state_of(model), x, ["nope"])
    with pytest.raises(RebasinError, match="missing key"):
        tr.capture({}, x, ["features_4"])


def test_nothing_is_mutated() -> None:
    torch.manual_seed(0)
    model = ResNet20(width=0.25)
    model.train()
    model.layer2.eval()  # mixed flags must survive
    flags = {name: m.training for name, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 8, 8)
    x0 = x.clone()
    tr = trace_model(model, x)
    state = state_of(model)
    train_acts = tr.capture(state, x, train=True)
    eval_acts = tr.capture(state, x)
    assert any(not torch.allclose(train_acts[k], eval_acts[k]) for k in eval_acts)  # train mode really used
    assert {name: m.training for name, m in model.named_modules()} == flags
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    torch.testing.assert_close(x, x0, rtol=0, atol=0)
    assert not any(k.startswith("_tensor_constant") for k in vars(model))
    assert set(tr.graph_module.state_dict()) == set(model.state_dict())


def test_graph_module_keys_include_unused_parameters() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 2)
            self.spare = nn.Linear(3, 3)
            self.register_buffer("scale", torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.relu(self.a(x)) * torch.tensor(2.0))

    model = Unused()
    tr = trace_model(model, torch.randn(2, 5))
    assert list(tr.graph_module.state_dict()) == list(model.state_dict()) or \
        set(tr.graph_module.state_dict()) == set(model.state_dict())
    assert tr.spec.axes["spare.weight"] == (None, None) and tr.spec.axes["scale"] == (None,)
    assert tr.spec.axes["a.weight"] == ("P0", None)


def test_model_trace_is_exported_dataclass() -> None:
    tr = trace_model(MLP(3, [4], 2), torch.randn(1, 3))
    assert isinstance(tr, ModelTrace) and isinstance(tr.graph_module, torch.fx.GraphModule)
    y = forward_with_state(tr.graph_module, state_of(tr.graph_module), torch.randn(2, 3))
    assert y.shape == (2, 2)


@pytest.mark.parametrize("make", [lambda: MLP(5, [8, 8], 3), lambda: ResNet20(width=2, num_classes=3)],
                         ids=["mlp", "resnet20"])
def test_dynamic_tracer_agrees_with_fx(make) -> None:
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 5) if isinstance(model, MLP) else torch.randn(2, 3, 8, 8)
    fx, dyn = trace_model(model, x, tracer="fx"), trace_model(model, x, tracer="dynamic")
    assert dyn.spec.axes == fx.spec.axes and dyn.spec.sizes == fx.spec.sizes
    # capture records the model again, so another batch size works; same values as the fx replay
    x5 = torch.randn(5, *x.shape[1:])
    a, b = fx.capture(model.state_dict(), x5), dyn.capture(model.state_dict(), x5)
    for p in fx.spec.perms:
        ta = [a[n].transpose(0, ax) for n, ax in fx.activation_nodes[p]]
        tb = [b[n].transpose(0, ax) for n, ax in dyn.activation_nodes[p]]
        assert len(ta) == len(tb) and all(torch.allclose(u, v) for u, v in zip(ta, tb))
    assert model.training is False and all(not m._forward_hooks for m in model.modules())


def test_dynamic_tracer_bad_input_names_the_model() -> None:
    with pytest.raises(RebasinError, match="dynamic tracer could not run MLP"):
        trace_model(MLP(5, [8], 3), torch.randn(2, 7), tracer="dynamic")
