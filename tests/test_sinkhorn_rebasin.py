"""SinkhornRebasin: learned soft permutations, costs, errors, no mutation."""

from __future__ import annotations

import copy
import warnings

import builders
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rebasin import PermutationSpec, RebasinError, SinkhornRebasin, permute, random_permutation


def mlp(seed: int, widths=(4, 12, 10, 3), bn: bool = False) -> nn.Sequential:
    return builders.mlp(widths[0], widths[1:-1], widths[-1], bn=bn, seed=seed)


def mlp_spec(model: nn.Sequential) -> PermutationSpec:
    axes: dict[str, tuple] = {}
    prev = None
    linears = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    for j, i in enumerate(linears):
        out = f"P{j}" if j < len(linears) - 1 else None
        axes[f"{i}.weight"] = (out, prev)
        axes[f"{i}.bias"] = (out,)
        bn = model[i + 1] if i + 1 < len(model) and isinstance(model[i + 1], nn.BatchNorm1d) else None
        if bn is not None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                axes[f"{i + 1}.{name}"] = (out,)
            axes[f"{i + 1}.num_batches_tracked"] = ()
        prev = out
    return PermutationSpec(axes)


def planted(seed: int = 0, noise: float = 0.0, bn: bool = False):
    a = mlp(seed, bn=bn)
    spec = mlp_spec(a).with_sizes(a.state_dict())
    perms = random_permutation(spec, seed=seed + 100)
    sb = permute(spec, perms, a.state_dict())
    g = torch.Generator().manual_seed(seed)
    sb = {k: v + noise * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sb.items()}
    b = copy.deepcopy(a)
    b.load_state_dict(sb)
    return a, b, spec


def toy_loader(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def assert_recovers(sr: SinkhornRebasin, a: nn.Module, spec: PermutationSpec, b: nn.Module, atol: float = 0.0):
    aligned = permute(spec, sr.hard_permutations(), b.state_dict())
    for k, v in a.state_dict().items():
        assert_close(aligned[k], v, atol=atol, rtol=0)


def test_l2_recovers_planted_permutation_exactly():
    a, b, spec = planted(seed=1)
    sr = SinkhornRebasin(a, b, spec=spec, cost="l2", tau=0.5, n_iter=30)
    sr.fit(steps=300, lr=0.1, progress=False)
    assert sr.history[-1] < sr.history[0]
    assert_recovers(sr, a, spec, b)


def test_l2_recovers_with_batchnorm_statistics():
    a, b, spec = planted(seed=2, bn=True)
    with torch.no_grad():
        a[1].running_mean.uniform_(-1, 1)
    b.load_state_dict(permute(spec, random_permutation(spec, seed=5), a.state_dict()))
    sr = SinkhornRebasin(a, b, spec=spec, cost="l2", tau=0.5, n_iter=30)
    sr.fit(steps=300, lr=0.1, progress=False)
    assert_recovers(sr, a, spec, b)
    aligned = sr.aligned_state_dict()
    assert_close(aligned["1.running_mean"], a.state_dict()["1.running_mean"])


@pytest.mark.parametrize("cost", ["midpoint", "random"])
def test_task_costs_run_and_reduce_loss(cost):
    a, b = mlp(0), mlp(1)
    spec = mlp_spec(a)
    loader = toy_loader()
    sr = SinkhornRebasin(a, b, spec=spec, cost=cost, seed=0)
    hist = sr.fit(loader, epochs=8, lr=0.1, progress=False)
    assert len(hist) == 8 * len(loader)
    assert all(torch.isfinite(torch.tensor(hist)))
    perms = sr.hard_permutations()
    assert set(perms) == set(spec.perms)
    for p in perms.values():
        assert torch.equal(torch.sort(p).values, torch.arange(p.numel()))


def test_random_cost_is_seeded():
    a, b = mlp(0), mlp(1)
    spec = mlp_spec(a)
    runs = []
    for _ in range(2):
        sr = SinkhornRebasin(a, b, spec=spec, cost="random", seed=3)
        runs.append(sr.fit(toy_loader(), epochs=2, lr=0.1, progress=False))
    assert runs[0] == runs[1]


def test_custom_cost_and_gradients_reach_logits():
    a, b = mlp(0), mlp(1)
    spec = mlp_spec(a)
    seen = []

    def cost(module, batch):
        seen.append(batch)
        return module.permuted_state_b()["0.weight"].sum() ** 2

    sr = SinkhornRebasin(a, b, spec=spec, cost=cost)
    value = sr.compute_cost(None)
    value.backward()
    assert sr.logits["P0"].grad is not None and sr.logits["P0"].grad.abs().sum() > 0
    sr.fit(steps=3, progress=False)
    assert len(seen) == 4


def test_custom_cost_must_be_scalar():
    a, b = mlp(0), mlp(1)
    sr = SinkhornRebasin(a, b, spec=mlp_spec(a), cost=lambda m, batch: torch.ones(3))
    with pytest.raises(RebasinError, match="scalar"):
        sr.fit(steps=1, progress=False)


def test_models_are_not_mutated_and_only_logits_train():
    a, b = mlp(0, bn=True), mlp(1, bn=True)
    a.train(), b.eval()
    before_a = {k: v.clone() for k, v in a.state_dict().items()}
    before_b = {k: v.clone() for k, v in b.state_dict().items()}
    sr = SinkhornRebasin(a, b, spec=mlp_spec(a), cost="midpoint")
    assert {n for n, _ in sr.named_parameters()} == {f"logits.{p}" for p in sr.spec.perms}
    sr.fit(toy_loader(), epochs=1, progress=False)
    sr.aligned_model()
    for m, before in ((a, before_a), (b, before_b)):
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert all(p.requires_grad for p in m.parameters())
    assert a.training and not b.training


def test_aligned_model_is_a_trainable_copy():
    a, b, spec = planted(seed=3)
    sr = SinkhornRebasin(a, b, spec=spec, cost="l2", init="weight_matching")
    model = sr.aligned_model()
    assert model is not b
    assert all(p.requires_grad for p in model.parameters())
    x = torch.randn(5, 4)
    assert_close(model(x), a(x))  # planted: the weight-matching warm start is already exact


def test_size_one_groups_and_extreme_tau():
    a, b = mlp(0, widths=(4, 1, 3)), mlp(1, widths=(4, 1, 3))
    sr = SinkhornRebasin(a, b, spec=mlp_spec(a), cost="l2")
    sr.fit(steps=2, progress=False)
    assert sr.hard_permutations()["P0"].tolist() == [0]
    for tau in (1e-3, 1e3):
        a, b = mlp(0), mlp(1)
        sr = SinkhornRebasin(a, b, spec=mlp_spec(a), cost="l2", tau=tau, n_iter=50)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # extreme temperatures may warn about convergence; never fail
            sr.fit(steps=2, progress=False)
        assert all(torch.isfinite(p).all() for p in sr.logits.values())


def test_nan_logits_are_reported():
    a, b = mlp(0), mlp(1)
    sr = SinkhornRebasin(a, b, spec=mlp_spec(a), cost="l2")
    with torch.no_grad():
        sr.logits["P1"][0, 0] = float("nan")
    with pytest.raises(RebasinError, match="'P1'.*NaN"):
        sr.compute_cost()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cost": "l3"}, "unknown cost"),
        ({"init": "zeros"}, "unknown init"),
        ({"grad": "magic"}, "unknown grad"),
        ({"tau": 0.0}, "tau"),
    ],
)
def test_bad_arguments(kwargs, match):
    a, b = mlp(0), mlp(1)
    with pytest.raises(RebasinError, match=match):
        SinkhornRebasin(a, b, spec=mlp_spec(a), **kwargs)


def test_data_costs_need_a_loader():
    a, b = mlp(0), mlp(1)
    sr = SinkhornRebasin(a, b, spec=mlp_spec(a), cost="midpoint")
    with pytest.raises(RebasinError, match="needs data"):
        sr.fit(progress=False)


def test_device_mismatch_is_reported():
    a, b = mlp(0), mlp(1)
    b = b.to(torch.float64)  # a different dtype is fine; device mismatch faked below
    import rebasin.matching.sinkhorn_rebasin as mod

    real = mod.model_device
    try:
        mod.model_device = lambda m: torch.device("cuda:0") if m is b else torch.device("cpu")
        with pytest.raises(RebasinError, match="same device|one device"):
            SinkhornRebasin(a, b, spec=mlp_spec(a))
    finally:
        mod.model_device = real


def test_architecture_mismatch_is_reported():
    a, b = mlp(0), mlp(1, widths=(4, 12, 11, 3))
    with pytest.raises(RebasinError, match="shape"):
        SinkhornRebasin(a, b, spec=mlp_spec(a))


def test_forward_at_endpoints_matches_models():
    a, b, spec = planted(seed=4)
    sr = SinkhornRebasin(a, b, spec=spec, cost="l2", init="weight_matching", init_scale=50.0)
    sr.eval()
    x = torch.randn(6, 4)
    assert_close(sr(x, t=0.0), a(x))
    # sharp logits at the exact permutation: soft-permuted B is (numerically) A
    assert_close(sr(x), a(x), atol=1e-4, rtol=1e-4)


def test_fit_with_dropout_is_seeded_and_leaves_the_global_rng_alone():
    # fit runs the model in training mode; its dropout must not draw from (and shift) the caller's RNG
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    spec = PermutationSpec({"0.weight": ("P", None), "0.bias": ("P",), "3.weight": (None, "P"), "3.bias": (None,)})
    histories = []
    for _ in range(2):
        torch.manual_seed(123)
        before = torch.get_rng_state()
        sr = SinkhornRebasin(a, b, spec=spec, cost="midpoint", seed=7)
        histories.append(sr.fit(data, epochs=2, progress=False))
        assert torch.equal(torch.get_rng_state(), before)
    assert histories[0] == histories[1]


@pytest.mark.parametrize("n_iter", [0, 2.5, True, "20"])
def test_bad_n_iter_is_named(n_iter):
    a, b = mlp(0), mlp(1)
    with pytest.raises(RebasinError, match="n_iter must be an int >= 1"):
        SinkhornRebasin(a, b, spec=mlp_spec(a), n_iter=n_iter)


def test_fit_without_permutations_is_a_clear_error():
    a, b = builders.mlp(5, [], 3, seed=1), builders.mlp(5, [], 3, seed=2)
    module = SinkhornRebasin(a, b, cost="l2", example_input=torch.randn(2, 5))
    assert module.device.type == "cpu"  # no logits: the states' device
    with pytest.raises(RebasinError, match="no permutations, so there is nothing to learn"):
        module.fit(steps=2)
