"""The layer-rule registry: user layers registered declaratively or with a callable rule, used by tracing,
weight matching, REPAIR and the Weight Adjustment path; bad declarations; no leaking registrations."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import rebasin
from rebasin import (
    PermutationSpec,
    RebasinError,
    RebasinWarning,
    invert,
    permute,
    random_permutation,
    register_module,
    repair,
    spec_from_model,
    weight_matching,
)
from rebasin._common import forward_with_state, state_of
from rebasin.paths import channel_stats, weight_adjusted_path
from rebasin.trace import ModuleRule, RuleContext, module_rule, registered_modules, registration_scope, trace_model


# --------------------------------------------------------------------------- user layers
class MyLinear(nn.Module):
    """A linear layer torch.fx would trace as an opaque matrix product."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


class Scale(nn.Module):
    """A per-feature affine map (norm-like, no "out" role); softplus of a parameter is opaque to the tracer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(0.5 * torch.randn(n))
        self.register_buffer("shift", 0.1 * torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.softplus(self.gamma) + self.shift


LINEAR_ROLES = {"weight": ("out", "in"), "bias": ("out",)}
SCALE_ROLES = {"gamma": ("in",), "shift": ("in",)}


class Net(nn.Module):
    """MyLinear -> BatchNorm -> Scale -> ReLU -> MyLinear -> ReLU -> nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.scale = MyLinear(5, 8), nn.BatchNorm1d(8), Scale(8)
        self.fc2, self.fc3 = MyLinear(8, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.scale(self.bn(self.fc1(x))))
        return self.fc3(F.relu(self.fc2(h)))


NET_AXES = {
    "fc1.weight": ("P0", None), "fc1.bias": ("P0",),
    "bn.weight": ("P0",), "bn.bias": ("P0",), "bn.running_mean": ("P0",), "bn.running_var": ("P0",),
    "bn.num_batches_tracked": (),
    "scale.gamma": ("P0",), "scale.shift": ("P0",),
    "fc2.weight": ("P1", "P0"), "fc2.bias": ("P1",),
    "fc3.weight": (None, "P1"), "fc3.bias": (None,),
}  # fmt: skip


def net(seed: int = 0) -> Net:
    """A Net with random BatchNorm statistics and affine parameters (so a missed permutation shows)."""
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        model.bn.running_mean.copy_(0.5 * torch.randn(8))
        model.bn.running_var.copy_(0.5 + torch.rand(8))
        model.bn.weight.copy_(1 + 0.3 * torch.randn(8))
        model.bn.bias.copy_(0.3 * torch.randn(8))
    return model.eval()


def register_net_layers() -> None:
    register_module(MyLinear, params=LINEAR_ROLES, feature_dim=-1)
    register_module(Scale, params=SCALE_ROLES, feature_dim=-1)


@pytest.fixture(autouse=True)
def registry_unchanged():
    """Every test leaves the registry exactly as it found it (registrations happen inside a scope)."""
    before = registered_modules()
    yield
    assert registered_modules() == before


def output_change(model: nn.Module, spec: PermutationSpec, x: torch.Tensor, seed: int = 1) -> float:
    """max |f(permuted) - f| after a random permutation that moves every permutation's units."""
    state = state_of(model)
    perms = random_permutation(spec, seed=seed)
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    moved = permute(spec, perms, state)
    y0 = forward_with_state(model, state, x, eval_mode=True)
    y1 = forward_with_state(model, moved, x, eval_mode=True)
    return float((y0 - y1).abs().max())


# --------------------------------------------------------------------------- declarative rules
def test_unregistered_custom_layers_are_traced_into_and_permuted() -> None:
    # traced into: x @ weight.T is read as a weight product and softplus(gamma) as a view of gamma, so the
    # layers' units are permuted as if they were registered (they used to be left silently unpermuted)
    model, x = net(), torch.randn(4, 5)
    spec = spec_from_model(model, x)
    assert dict(spec.axes) == NET_AXES
    assert output_change(model, spec, x) <= 1e-5


def test_declared_layers_give_the_right_axes_and_an_exact_spec() -> None:
    model, x = net(), torch.randn(4, 5)
    with registration_scope():
        register_net_layers()
        tr = trace_model(model, x)
    assert dict(tr.spec.axes) == NET_AXES
    assert dict(tr.spec.sizes) == {"P0": 8, "P1": 7}
    # the registered layers are leaves: one call_module node each
    called = {str(n.target) for n in tr.graph_module.graph.nodes if n.op == "call_module"}
    assert {"fc1", "scale", "fc2"} <= called
    # the input of the MyLinear that consumes P0 is the activation node for P0
    assert tr.activation_nodes["P0"] == [("relu", 1)]
    assert tr.spec.check(model, x) <= 1e-5
    assert output_change(model, tr.spec, x) <= 1e-5


def test_a_wrong_declaration_is_caught_by_the_functional_check() -> None:
    with registration_scope():
        register_module(MyLinear, params=LINEAR_ROLES)
        register_module(Scale, params={"gamma": (None,), "shift": (None,)})  # wrong: per-feature entries
        with pytest.raises(RebasinError, match="fails the functional check"):
            spec_from_model(net(), torch.randn(4, 5))


def test_weight_matching_recovers_a_planted_permutation_of_custom_layers() -> None:
    model = net()
    with registration_scope():
        register_net_layers()
        spec = spec_from_model(model, torch.randn(4, 5))
    state_a = state_of(model)
    planted = random_permutation(spec, seed=3)
    state_b = permute(spec, planted, state_a)
    perms = weight_matching(spec, state_a, state_b)
    for name in spec.perms:
        assert torch.equal(perms[name], invert(planted)[name])
    aligned = permute(spec, perms, state_b)
    for key, value in state_a.items():
        assert torch.equal(aligned[key], value), key


def test_decorator_form_registers_and_returns_the_class() -> None:
    with registration_scope():

        @register_module(params={"weight": ("out", "in")}, feature_dim=-1)
        class NoBias(nn.Module):
            def __init__(self, n_in: int, n_out: int) -> None:
                super().__init__()
                self.weight = nn.Parameter(torch.randn(n_out, n_in))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.einsum("...i,oi->...o", x, self.weight)

        assert isinstance(NoBias, type) and issubclass(NoBias, nn.Module)
        assert module_rule(NoBias).params == {"weight": ("out", "in")}
        model = nn.Sequential(NoBias(4, 6), nn.Tanh(), NoBias(6, 2))
        spec = spec_from_model(model, torch.randn(3, 4))
    assert dict(spec.axes) == {"0.weight": ("P0", None), "2.weight": (None, "P0")}


def test_subclass_of_a_registered_class_is_traced_through_unless_registered() -> None:
    class Sub(MyLinear):
        pass

    model = nn.Sequential(Sub(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with registration_scope():
        register_module(MyLinear, params=LINEAR_ROLES)
        # its own forward is traced into (one matmul node, no call_module) where x @ weight.T reads as a weight
        tr = trace_model(model, torch.randn(3, 4))
        assert "0" not in {str(n.target) for n in tr.graph_module.graph.nodes if n.op == "call_module"}
        assert tr.spec.axes["0.weight"] == ("P0", None)
        register_module(Sub, params=LINEAR_ROLES)
        assert spec_from_model(model, torch.randn(3, 4)).axes["0.weight"] == ("P0", None)


def test_conv_like_layer_with_feature_dim_1() -> None:
    class PointwiseConv(nn.Module):
        def __init__(self, c_in: int, c_out: int) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(c_out, c_in))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("nchw,oc->nohw", x, self.kernel)

    torch.manual_seed(0)
    model = nn.Sequential(PointwiseConv(3, 6), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 3))
    x = torch.randn(2, 3, 5, 5)
    with registration_scope():
        register_module(PointwiseConv, params={"kernel": ("out", "in")}, feature_dim=1)
        spec = spec_from_model(model, x)
    assert spec.axes["0.kernel"] == ("P0", None) and spec.axes["1.running_var"] == ("P0",)
    assert spec.axes["3.weight"] == (None, "P0", None, None)


# --------------------------------------------------------------------------- REPAIR reads the registry
def mlp_of_my_linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(MyLinear(6, 16), nn.ReLU(), MyLinear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def test_repair_treats_a_registered_linear_like_layer_as_a_producer() -> None:
    g = torch.Generator().manual_seed(0)
    x = 1.5 * torch.randn(96, 6, generator=g) + 0.3
    data = [(x[i : i + 32], torch.zeros(32, dtype=torch.long)) for i in range(0, 96, 32)]
    a, b = mlp_of_my_linear(1), mlp_of_my_linear(2)
    with registration_scope():
        register_module(MyLinear, params=LINEAR_ROLES)
        spec = spec_from_model(a, x[:2])
        sa, sb = state_of(a), state_of(b)
        ea, eb = channel_stats(a, sa, data, spec=spec), channel_stats(a, sb, data, spec=spec)
        assert list(ea) == ["0", "2"]  # both MyLinear layers produce permuted channels
        out = repair(a, sa, sb, 0.5, data, spec=spec)
        got = channel_stats(out, state_of(out), data, spec=spec)
    for k in ("0", "2"):
        assert_close(got[k].mean, 0.5 * (ea[k].mean + eb[k].mean), atol=1e-5, rtol=1e-5)
        assert_close(got[k].std, 0.5 * (ea[k].std + eb[k].std), atol=1e-5, rtol=1e-5)
    mid = rebasin.interpolate(sa, sb, 0.5)
    assert not torch.allclose(state_of(out)["2.weight"], mid["2.weight"])
    # without the registration the same spec names no producer: the registry is what REPAIR reads
    assert channel_stats(a, sa, data, spec=spec) == {}


# --------------------------------------------------------------------------- callable rules
class ResidualMLP(nn.Module):
    """``y = x + relu(x @ w_in.T + b_in) @ w_out.T``: hidden units of its own, the stream passes through."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(hidden, width) / width**0.5)
        self.b_in = nn.Parameter(0.1 * torch.randn(hidden))
        self.w_out = nn.Parameter(torch.randn(width, hidden) / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(x @ self.w_in.T + self.b_in) @ self.w_out.T


def residual_mlp_rule(ctx: RuleContext) -> tuple:
    x = ctx.input
    stream = x[-1]
    hidden = ctx.new_permutation(size=ctx.tensor("w_in").shape[0])
    ctx.assign("w_in", (hidden, stream))
    ctx.assign("b_in", (hidden,))
    ctx.assign("w_out", (stream, hidden))
    return x


def residual_net(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), ResidualMLP(6, 10), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[2].weight.copy_(1 + 0.3 * torch.randn(6))
        model[2].bias.copy_(0.3 * torch.randn(6))
    return model


def test_callable_rule_with_an_internal_permutation() -> None:
    model, x = residual_net(), torch.randn(4, 5)
    traced_into = spec_from_model(model, x)  # x @ w.T read as weight products: the same spec without a rule
    with registration_scope():
        register_module(ResidualMLP, rule=residual_mlp_rule)
        tr = trace_model(model, x)
    assert dict(tr.spec.axes) == {
        "0.weight": ("P0", None), "0.bias": ("P0",),
        "1.w_in": ("P1", "P0"), "1.b_in": ("P1",), "1.w_out": ("P0", "P1"),
        "2.weight": ("P0",), "2.bias": ("P0",),
        "4.weight": (None, "P0"), "4.bias": (None,),
    }
    assert traced_into == tr.spec  # fmt: skip
    assert dict(tr.spec.sizes) == {"P0": 6, "P1": 10}
    assert tr.activation_nodes["P1"] == []  # made with size=: no graph node holds those units
    assert output_change(model, tr.spec, x) <= 1e-5
    state_a = state_of(model)
    for seed in (0, 1, 2):
        planted = random_permutation(tr.spec, seed=seed)
        perms = weight_matching(tr.spec, state_a, permute(tr.spec, planted, state_a))
        assert all(torch.equal(perms[p], invert(planted)[p]) for p in tr.spec.perms), seed


class GroupedLinear(nn.Module):
    """Linear-like with ``groups`` independent blocks: only ``groups == 1`` is a plain permutation."""

    def __init__(self, n_in: int, n_out: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.randn(n_out, n_in // groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.unflatten(-1, (self.groups, -1))
        w = self.weight.unflatten(0, (self.groups, -1))
        return torch.einsum("...gi,goi->...go", xs, w).flatten(-2)


def grouped_linear_rule(ctx: RuleContext) -> tuple:
    if ctx.module.groups == 1:
        return ctx.apply_roles()  # the declared params
    ctx.refuse(f"GroupedLinear with {ctx.module.groups} groups mixes features only within groups", *ctx.input)
    return (None,) * len(ctx.output_shape)


@pytest.mark.parametrize("groups", [1, 2])
def test_callable_rule_with_declared_params_and_refusal(groups: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), GroupedLinear(4, 6, groups), nn.ReLU(), nn.Linear(6, 2))
    with registration_scope():
        register_module(GroupedLinear, params={"weight": ("out", "in")}, rule=grouped_linear_rule)
        if groups == 1:
            spec = spec_from_model(model, torch.randn(2, 3))
            assert spec.axes["2.weight"] == ("P1", "P0")
        else:
            with pytest.raises(RebasinError, match=r"2 \(GroupedLinear\).*\['P0'\]: GroupedLinear with 2 groups"):
                spec_from_model(model, torch.randn(2, 3), strict=True)
            with pytest.warns(RebasinWarning, match=r"- 0: 4 unit\(s\) pinned: 2 \(GroupedLinear\): GroupedLinear with 2"):
                spec = spec_from_model(model, torch.randn(2, 3))
            assert dict(spec.coverage.modules) == {"0": (0, 4), "2": (0, 6)}  # its rule gave its weight no axes


def test_elementwise_registration_reaches_the_weight_adjusted_path() -> None:
    class QuickGELU(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.special.expit(1.702 * x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), QuickGELU(), nn.Linear(8, 3))
    sa, sb = state_of(model), {k: v + 0.1 for k, v in state_of(model).items()}
    with pytest.raises(RebasinError, match="not a chain"):  # traced into: x feeds two ops
        weight_adjusted_path(model, sa, sb, torch.randn(16, 4))
    with registration_scope():
        register_module(QuickGELU, params={})
        assert module_rule(QuickGELU).elementwise
        wa = weight_adjusted_path(model, sa, sb, torch.randn(16, 4))
        assert spec_from_model(model, torch.randn(2, 4)).axes["0.weight"] == ("P0", None)
    assert wa.num_stages == 2 and torch.equal(wa.state_dict_at(1.0)["2.weight"], sb["2.weight"])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"params": {"weight": ("out", "inn")}}, r"MyLinear.*params\['weight'\].*unknown role.*'inn'"),
        ({"params": {"weight": "out"}}, r"MyLinear.*params\['weight'\] must be a tuple.*'out'"),
        ({"params": {"weight": ("out", "out")}}, r"MyLinear.*params\['weight'\].*\['out'\] to two axes"),
        ({"params": {"weight": ("out", "in")}, "feature_dim": 1.0}, r"MyLinear.*feature_dim must be an int.*1.0"),
        ({"params": {"weight": ("out", "in")}, "feature_dim": True}, r"feature_dim must be an int.*True"),
        ({"params": ["weight"]}, r"MyLinear.*params must be a mapping.*list"),
        ({}, r"MyLinear.*give params= .* or rule="),
        ({"rule": "not callable"}, r"MyLinear.*rule must be callable"),
    ],
)
def test_bad_declarations_are_rejected_at_registration(kwargs: dict, pattern: str) -> None:
    with registration_scope():
        with pytest.raises(RebasinError, match=pattern):
            register_module(MyLinear, **kwargs)
        assert module_rule(MyLinear) is None


def test_only_module_classes_can_be_registered() -> None:
    with pytest.raises(RebasinError, match="nn.Module subclass.*int"):
        register_module(int, params={})  # type: ignore[type-var]  # the wrong type is the input under test


@pytest.mark.parametrize(
    ("params", "feature_dim", "pattern"),
    [
        # role tuple length is checked against the tensor's rank, with the key and the shape
        ({"weight": ("out",), "bias": ("out",)}, -1,
         r"MyLinear at fc1 \(MyLinear, tests/test_registry_modules\.py:\d+\).*params\['weight'\] has 1 role.*'fc1.weight' has shape \(8, 5\) \(2 axes\)"),
        # a name the module does not have: its entries and shapes are listed
        ({**LINEAR_ROLES, "gain": ("out",)}, -1,
         r"MyLinear at fc1 \(MyLinear, tests/test_registry_modules\.py:\d+\).*names 'gain', which MyLinear does not have.*'weight': \(8, 5\), 'bias': \(8,\)"),
        # an entry the declaration leaves out
        ({"weight": ("out", "in")}, -1, r"MyLinear at fc1 \(MyLinear, tests/test_registry_modules\.py:\d+\).*does not name.*\{'bias': \(8,\)\}"),
        # an axis whose size is not the number of features (wrong feature_dim: 0 is the batch axis)
        (LINEAR_ROLES, 0, r"at fc1 \(MyLinear, tests/test_registry_modules\.py:\d+\), 'fc1.weight' has shape \(8, 5\); its axis 0 has the role 'out' but has 8 "
                          r"entries, not the 4 output features \(axis 0 of the output, shape \(4, 8\)\)"),
    ],
)  # fmt: skip
def test_bad_declarations_are_reported_when_tracing(params: dict, feature_dim: int, pattern: str) -> None:
    with registration_scope():
        register_module(MyLinear, params=params, feature_dim=feature_dim)
        register_module(Scale, params=SCALE_ROLES)
        with pytest.raises(RebasinError, match=pattern):
            spec_from_model(net(), torch.randn(4, 5))


@pytest.mark.parametrize(
    ("rule", "pattern"),
    [
        (lambda ctx: "nope", r"rule for MyLinear at fc1 \(MyLinear, tests/test_registry_modules\.py:\d+\).*returned 'nope'"),
        (lambda ctx: ctx.assign("kernel", (None, None)),
         r"MyLinear at fc1 \(MyLinear, tests/test_registry_modules\.py:\d+\).* names 'kernel'.*'weight': \(8, 5\)"),
        (lambda ctx: ctx.assign("weight", (None,)), r"gave 'fc1.weight' \(shape \(8, 5\)\) 1 axes"),
        (lambda ctx: ctx.assign("weight", (ctx.new_permutation(size=3), None)),
         r"permutation of 3 entries on axis 0 of 'fc1.weight', which has shape \(8, 5\)"),
        (lambda ctx: ctx.assign("weight", ("P0", None)), r"axis 0 of 'fc1.weight' the value 'P0'"),
        (lambda ctx: ctx.new_permutation(), r"new_permutation at fc1 \(MyLinear, tests/test_registry_modules\.py:\d+\).*exactly one"),
        (lambda ctx: ctx.new_permutation(5), r"axis 5 is not an axis of the output \(shape \(4, 8\)\)"),
        (lambda ctx: ctx.apply_roles(), r"MyLinear at fc1 \(MyLinear, tests/test_registry_modules\.py:\d+\).*apply_roles\(\) needs params="),
    ],
)  # fmt: skip
def test_callable_rule_misuse_names_the_node_and_key(rule, pattern: str) -> None:
    with registration_scope():
        register_module(MyLinear, rule=rule)
        register_module(Scale, params=SCALE_ROLES)
        with pytest.raises(RebasinError, match=pattern):
            spec_from_model(net(), torch.randn(4, 5))


# --------------------------------------------------------------------------- the registry itself
def test_builtins_are_in_the_registry() -> None:
    linear = module_rule(nn.Linear)
    assert isinstance(linear, ModuleRule) and linear.cls is nn.Linear
    assert dict(linear.params) == {"weight": ("out", "in"), "bias": ("out",)} and linear.feature_dim == -1
    assert module_rule(nn.Linear(2, 3)) is linear
    conv = module_rule(nn.Conv2d)
    assert conv.role_axis("weight", "out") == 0 and conv.feature_dim == -3 and conv.fn is not None
    assert module_rule(nn.ConvTranspose2d).role_axis("weight", "out") == 1
    # BatchNorm2d finds the rule registered on torch's _BatchNorm base through its MRO
    bn = module_rule(nn.BatchNorm2d)
    assert bn is module_rule(nn.SyncBatchNorm) and bn.params["running_var"] == ("in",)
    assert module_rule(nn.ReLU).elementwise and module_rule(nn.Dropout).elementwise
    assert not module_rule(nn.LayerNorm).elementwise
    registered = registered_modules()
    for cls in (nn.Linear, nn.Conv1d, nn.Conv3d, nn.Embedding, nn.GroupNorm, nn.LayerNorm, nn.PReLU, nn.Flatten,
                nn.MultiheadAttention):
        assert cls in registered, cls
    assert module_rule(nn.LSTM) is not None and module_rule(MyLinear) is None


def test_registering_twice_needs_overwrite_and_the_scope_restores_builtins() -> None:
    relu_rule = module_rule(nn.ReLU)
    with registration_scope():
        with pytest.raises(RebasinError, match=r"ReLU already has a layer rule \(params=\{\}.*overwrite=True"):
            register_module(nn.ReLU, params={"weight": (None,)})
        register_module(nn.ReLU, params={})  # the same rule again (a factory called twice): a no-op
        assert module_rule(nn.ReLU) is relu_rule
        register_module(nn.ReLU, rule=lambda ctx: ctx.unsupported("no ReLU today"), overwrite=True)
        with pytest.raises(RebasinError, match=r"1 \(ReLU\).*no ReLU today"):
            spec_from_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 3), strict=True)
    assert module_rule(nn.ReLU) is relu_rule
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert spec_from_model(model, torch.randn(2, 3)).perms == ("P0",)


def test_registrations_last_until_the_scope_ends() -> None:
    with registration_scope():
        register_module(MyLinear, params=LINEAR_ROLES)
        with registration_scope():
            register_module(Scale, params=SCALE_ROLES)
            assert module_rule(Scale) is not None
        assert module_rule(Scale) is None and module_rule(MyLinear) is not None
    assert module_rule(MyLinear) is None


def test_docstring_examples_run() -> None:
    from rebasin.trace import registry, rules

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    objects = (registry.register_module, registry.registration_scope, registry.module_rule,
               registry.registered_modules, rules.ModuleRule, rules.RuleContext)
    tests = [t for obj in objects for t in finder.find(obj, globs={})]
    assert sum(len(t.examples) for t in tests) >= 20
    for t in tests:
        runner.run(t)
    assert runner.failures == 0
