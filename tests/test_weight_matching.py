"""Weight matching: planted recovery, descent properties, validation, the incremental engine."""

from __future__ import annotations

import builders
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rebasin import PermutationSpec, RebasinError, permute, random_permutation
from rebasin.matching import WeightMatchingInfo, _descent, linear_assignment, weight_matching
from rebasin.matching import weight as weight_module
from rebasin.matching.weight import _Engine

# ---------------------------------------------------------------- tiny models and their specs

def textbook(*args, **kwargs):
    """weight_matching with the incremental engine off (the module's test seam, never an argument)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weight_module, "_INCREMENTAL", False)
        return weight_matching(*args, **kwargs)

def mlp_spec(depth: int = 3) -> PermutationSpec:
    axes: dict[str, tuple[str | None, ...]] = {}
    prev: str | None = None
    for i in range(depth + 1):
        out = f"P{i}" if i < depth else None
        axes[f"{2 * i}.weight"] = (out, prev)
        axes[f"{2 * i}.bias"] = (out,)
        prev = out
    return PermutationSpec(axes)


def mlp(width: int = 16, depth: int = 3, seed: int = 0) -> nn.Sequential:
    return builders.mlp(5, [width] * depth, 3, seed=seed)


def conv_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 12),
        nn.ReLU(),
        nn.Linear(12, 4),
    )
    with torch.no_grad():
        for bn in (m[1], m[4]):  # non-trivial statistics and affine parameters
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
            bn.num_batches_tracked.fill_(7)
    return m


def conv_spec() -> PermutationSpec:
    bn = lambda i, p: {  # noqa: E731 - a small factory of BatchNorm entries
        f"{i}.weight": (p,),
        f"{i}.bias": (p,),
        f"{i}.running_mean": (p,),
        f"{i}.running_var": (p,),
        f"{i}.num_batches_tracked": (),
    }
    axes = {
        "0.weight": ("C0", None, None, None),
        "0.bias": ("C0",),
        **bn(1, "C0"),
        "3.weight": ("C1", "C0", None, None),
        "3.bias": ("C1",),
        **bn(4, "C1"),
        "7.weight": ("F", "C1"),
        "7.bias": ("F",),
        "9.weight": (None, "F"),
        "9.bias": (None,),
    }
    return PermutationSpec(axes, blocks={("7.weight", 1): 16})


def residual_state(seed: int = 0, d: int = 12, h: int = 10) -> tuple[PermutationSpec, dict[str, torch.Tensor]]:
    """A residual MLP: the stream permutation R sits on every tensor that reads or writes it."""
    g = torch.Generator().manual_seed(seed)
    axes: dict[str, tuple[str | None, ...]] = {"embed.weight": ("R", None), "embed.bias": ("R",)}
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (d, 4), "embed.bias": (d,)}
    for b in range(2):
        axes |= {
            f"b{b}.norm.weight": ("R",),
            f"b{b}.norm.bias": ("R",),
            f"b{b}.fc1.weight": (f"H{b}", "R"),
            f"b{b}.fc1.bias": (f"H{b}",),
            f"b{b}.fc2.weight": ("R", f"H{b}"),
            f"b{b}.fc2.bias": ("R",),
        }
        shapes |= {
            f"b{b}.norm.weight": (d,),
            f"b{b}.norm.bias": (d,),
            f"b{b}.fc1.weight": (h, d),
            f"b{b}.fc1.bias": (h,),
            f"b{b}.fc2.weight": (d, h),
            f"b{b}.fc2.bias": (d,),
        }
    axes |= {"head.weight": (None, "R"), "head.bias": (None,)}
    shapes |= {"head.weight": (3, d), "head.bias": (3,)}
    return PermutationSpec(axes), {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def planted(spec: PermutationSpec, a: dict[str, torch.Tensor], seed: int = 1):
    truth = random_permutation(spec, seed=seed, sizes=spec.validate(a))
    return truth, permute(spec, truth, a)


def assert_states_equal(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), f"{k} differs"


# ---------------------------------------------------------------- planted recovery
@pytest.mark.parametrize("incremental", [True, False])
def test_planted_mlp_recovered_exactly(incremental):
    spec, a = mlp_spec(), state(mlp(width=24))
    truth, b = planted(spec, a)
    perms, info = (weight_matching if incremental else textbook)(spec, a, b, return_info=True)
    assert_states_equal(permute(spec, perms, b), a)
    for k in truth:
        assert torch.equal(perms[k], torch.argsort(truth[k]))
    assert info.converged and isinstance(info, WeightMatchingInfo)
    assert all(p.dtype == torch.int64 and p.device.type == "cpu" for p in perms.values())


def test_planted_conv_bn_flatten_recovered_exactly_with_running_stats():
    model, spec = conv_model(), conv_spec()
    spec.check(model, torch.randn(2, 3, 8, 8))  # the hand-written spec is right
    a = state(model)
    _, b = planted(spec, a, seed=3)
    assert not torch.equal(b["1.running_mean"], a["1.running_mean"])
    perms = weight_matching(spec, a, b)
    recovered = permute(spec, perms, b)
    assert_states_equal(recovered, a)  # running_mean / running_var included


def test_planted_residual_shared_permutation_recovered_exactly():
    spec, a = residual_state()
    _, b = planted(spec, a, seed=5)
    perms, info = weight_matching(spec, a, b, return_info=True)
    assert_states_equal(permute(spec, perms, b), a)
    assert info.objective[-1] == pytest.approx(sum(float((v * v).sum()) for k, v in a.items() if k != "head.bias"))


@pytest.mark.parametrize("key", ["0.bias", "1.running_mean"])
def test_one_dimensional_tensors_disambiguate(key):
    """All units have identical weights; only the vector `key` tells them apart."""
    spec = PermutationSpec(
        {
            "0.weight": ("P", None),
            "0.bias": ("P",),
            "1.running_mean": ("P",),
            "1.num_batches_tracked": (),
            "2.weight": (None, "P"),
        }
    )
    n = 9
    a = {
        "0.weight": torch.ones(n, 4) * torch.tensor([1.0, -2.0, 0.5, 3.0]),
        "0.bias": torch.zeros(n),
        "1.running_mean": torch.zeros(n),
        "1.num_batches_tracked": torch.tensor(3),
        "2.weight": torch.ones(2, n),
    }
    a[key] = torch.linspace(-1, 1, n)
    truth, b = planted(spec, a, seed=2)
    assert not torch.equal(truth["P"], torch.arange(n))
    perms = weight_matching(spec, a, b)
    assert torch.equal(perms["P"], torch.argsort(truth["P"]))
    assert_states_equal(permute(spec, perms, b), a)


# ---------------------------------------------------------------- descent properties
def test_objective_non_decreasing_and_tracks_the_true_objective():
    spec, a, b = mlp_spec(), state(mlp(32, seed=0)), state(mlp(32, seed=1))
    perms, info = weight_matching(spec, a, b, return_info=True)
    curve = [info.initial_objective, *info.objective]
    assert all(y >= x for x, y in zip(curve, curve[1:]))
    assert info.objective[-1] > info.initial_objective
    assert info.n_sweeps == len(info.objective) and info.converged
    pb = permute(spec, perms, b)
    exact = sum(float((a[k].double() * pb[k].double()).sum()) for k in a if k != "6.bias")
    assert info.objective[-1] == pytest.approx(exact, rel=1e-5)
    identity = sum(float((a[k].double() * b[k].double()).sum()) for k in a if k != "6.bias")
    assert info.identity_objective == pytest.approx(identity, rel=1e-6)
    assert info.final_objective == info.objective[-1]
    _, from_identity = weight_matching(spec, a, b, start="identity", return_info=True)
    assert from_identity.start == "identity"
    assert from_identity.initial_objective == pytest.approx(identity, rel=1e-6)
    _, from_layerwise = weight_matching(spec, a, b, start="layerwise", return_info=True)
    assert from_layerwise.start == "layerwise" and from_layerwise.initial_objective > identity
    # start="auto" descends once, from the layer-wise start here (it begins above the identity)
    assert info.start == "layerwise" and info.final_objective == from_layerwise.final_objective
    # start="best" descends from both starts and keeps the higher end point
    higher = max(from_identity, from_layerwise, key=lambda i: i.final_objective)
    _, best = weight_matching(spec, a, b, start="best", return_info=True)
    assert best.start == higher.start and best.final_objective == higher.final_objective


def test_result_is_a_coordinatewise_optimum():
    """No single permutation can be improved by another assignment at the returned point."""
    spec, a, b = mlp_spec(), state(mlp(20, seed=2)), state(mlp(20, seed=3))
    perms = weight_matching(spec, a, b)
    pb = permute(spec, perms, b)
    base = sum(float((a[k] * pb[k]).sum()) for k in a)
    for name in spec.perms:
        again = weight_matching(spec, a, b, init=perms, n_iter=1)
        assert torch.equal(again[name], perms[name])
    assert base > sum(float((a[k] * b[k]).sum()) for k in a)


def test_same_seed_same_result_and_other_seeds_valid():
    spec, a, b = mlp_spec(), state(mlp(24, seed=4)), state(mlp(24, seed=5))
    p1 = weight_matching(spec, a, b, seed=7)
    p2 = weight_matching(spec, a, b, seed=7)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    for seed in (0, 1, 2):
        p = weight_matching(spec, a, b, seed=seed)
        for _k, v in p.items():
            assert torch.equal(torch.sort(v).values, torch.arange(24))


def test_max_iter_zero_returns_init_and_init_is_used():
    spec, a, b = mlp_spec(), state(mlp(8, seed=0)), state(mlp(8, seed=1))
    init = random_permutation(spec, seed=9, sizes=spec.validate(a))
    out, info = weight_matching(spec, a, b, init=init, n_iter=0, return_info=True)
    assert all(torch.equal(out[k], init[k]) for k in init)
    assert out["P0"] is not init["P0"]
    assert info.n_sweeps == 0 and info.objective == [] and not info.converged
    pb = permute(spec, init, b)
    assert info.initial_objective == pytest.approx(sum(float((a[k] * pb[k]).sum()) for k in a if k != "6.bias"), rel=1e-5)
    _, info1 = weight_matching(spec, a, b, n_iter=1, return_info=True)
    assert info1.n_sweeps == 1


def test_inputs_not_mutated():
    spec, a, b = mlp_spec(), state(mlp(16, seed=0)), state(mlp(16, seed=1))
    init = random_permutation(spec, seed=4, sizes=spec.validate(a))
    copies = [{k: v.clone() for k, v in d.items()} for d in (a, b, init)]
    weight_matching(spec, a, b, init=init)
    textbook(spec, a, b, init=init)
    for before, after in zip(copies, (a, b, init)):
        assert_states_equal(before, after)


def test_does_not_mutate_model_parameters():
    model_a, model_b = conv_model(0), conv_model(1)
    before = state(model_b)
    weight_matching(conv_spec(), model_a.state_dict(), model_b.state_dict())
    assert_states_equal(before, state(model_b))


def test_device_argument_and_dtypes():
    spec, a, b = mlp_spec(), state(mlp(12, seed=0)), state(mlp(12, seed=1))
    ref = weight_matching(spec, a, b)
    for device in ("cpu", torch.device("cpu")):
        out = weight_matching(spec, a, b, device=device)
        assert all(torch.equal(out[k], ref[k]) for k in ref)
    a64 = {k: v.double() for k, v in a.items()}
    b64 = {k: v.double() for k, v in b.items()}
    out = weight_matching(spec, a64, b64)
    assert all(out[k].dtype == torch.int64 for k in out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    spec, a = mlp_spec(), state(mlp(64, seed=0))
    _, b = planted(spec, a)
    b = {k: v + 0.01 * torch.randn_like(v) for k, v in b.items()}
    ref = weight_matching(spec, a, b)
    on_gpu = weight_matching(spec, {k: v.cuda() for k, v in a.items()}, {k: v.cuda() for k, v in b.items()})
    via_arg = weight_matching(spec, a, b, device="cuda")
    for out in (on_gpu, via_arg):
        assert all(out[k].device.type == "cpu" and torch.equal(out[k], ref[k]) for k in ref)


# ---------------------------------------------------------------- validation
def test_nan_rejected_naming_the_key():
    spec, a, b = mlp_spec(), state(mlp(8, seed=0)), state(mlp(8, seed=1))
    b["2.weight"][1, 2] = float("nan")
    with pytest.raises(RebasinError, match=r"state_b\['2.weight'\].*NaN"):
        weight_matching(spec, a, b)
    a["0.bias"][0] = float("inf")
    with pytest.raises(RebasinError, match=r"'0.bias'"):
        weight_matching(spec, a, state(mlp(8, seed=1)))


def test_mismatched_shapes_list_keys_and_shapes():
    spec = mlp_spec()
    a, b = state(mlp(8, seed=0)), state(mlp(9, seed=1))
    with pytest.raises(RebasinError) as err:
        weight_matching(spec, a, b)
    msg = str(err.value)
    assert "0.weight: (8, 5) vs (9, 5)" in msg and "2.weight: (8, 8) vs (9, 9)" in msg
    b = state(mlp(8, seed=1))
    del b["6.bias"]
    with pytest.raises(RebasinError, match=r"missing key\(s\) \['6.bias'\]"):
        weight_matching(spec, a, b)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"P0": torch.arange(7)}, "has 7 entries"),
        ({"P0": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])}, "not a permutation"),
        ({"P0": torch.arange(8.0)}, "integer"),
        ({"Q": torch.arange(8)}, "unknown permutation"),
    ],
)
def test_bad_init_rejected(bad, match):
    spec, a, b = mlp_spec(), state(mlp(8, seed=0)), state(mlp(8, seed=1))
    with pytest.raises(RebasinError, match=match):
        weight_matching(spec, a, b, init=bad)


@pytest.mark.parametrize("n_iter", [-1, 2.5, True])
def test_bad_max_iter_rejected(n_iter):
    spec, a = mlp_spec(), state(mlp(8))
    with pytest.raises(RebasinError, match="n_iter"):
        weight_matching(spec, a, a, n_iter=n_iter)


# ---------------------------------------------------------------- the incremental engine
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_rank_path_gives_the_same_permutations_as_full_recompute(seed):
    spec, a, b = mlp_spec(), state(mlp(48, seed=10 + seed)), state(mlp(48, seed=20 + seed))
    fast, fi = weight_matching(spec, a, b, seed=seed, return_info=True)
    full, pi = textbook(spec, a, b, seed=seed, return_info=True)
    assert all(torch.equal(fast[k], full[k]) for k in full)
    assert fi.n_sweeps == pi.n_sweeps
    assert_close(torch.tensor(fi.objective), torch.tensor(pi.objective), rtol=1e-6, atol=0)
    assert fi.n_solves < pi.n_solves and pi.n_solves == pi.n_sweeps * 3  # unchanged solves skipped
    assert fi.n_full_builds < pi.n_full_builds


def test_low_rank_path_same_permutations_conv_and_residual():
    for spec, a, b in (
        (conv_spec(), state(conv_model(0)), state(conv_model(1))),
        (residual_state(0)[0], residual_state(0)[1], residual_state(1)[1]),
    ):
        fast = weight_matching(spec, a, b)
        full = textbook(spec, a, b)
        assert all(torch.equal(fast[k], full[k]) for k in full)


def _reference_similarity(spec, a, b, perms, name):
    """S_P from scratch with rebasin.permute: every other permutation applied to B."""
    others = {k: v for k, v in perms.items() if k != name}
    pb = permute(spec, others, b)
    n = spec.validate(a)[name]
    s = torch.zeros(n, n, dtype=torch.float64)
    for key, axis in spec.perm_to_axes[name]:
        if not a[key].is_floating_point():
            continue
        k = spec.blocks.get((key, axis), 1)
        rows = lambda t: t.double().movedim(axis, 0).reshape(n, k, *t.movedim(axis, 0).shape[1:]).reshape(n, -1)  # noqa: E731, B023 - called only inside this iteration
        s += rows(a[key]) @ rows(pb[key]).T
    return s


@pytest.mark.parametrize("which", ["conv", "residual"])
def test_cached_similarities_stay_exact_under_low_rank_updates(which, monkeypatch):
    """Drive the engine by hand with small changes; caches must equal a from-scratch reference."""
    monkeypatch.setattr("rebasin.matching.weight._LOWRANK_FRACTION", 1.0)  # every change goes low-rank
    if which == "conv":
        spec, a, b = conv_spec(), state(conv_model(0)), state(conv_model(1))
    else:
        spec, a = residual_state(0)
        b = residual_state(1)[1]
    import numpy as np

    sizes = spec.validate(a)
    perms = {p: np.arange(n, dtype=np.int64) for p, n in sizes.items()}
    engine = _Engine(spec, a, b, sizes, perms, torch.device("cpu"), incremental=True)
    for p in engine.active():
        assert engine.similarity(p) is not None
    rng = np.random.default_rng(0)
    lowrank_before = engine.n_lowrank_updates
    for step in range(12):
        q = list(sizes)[step % len(sizes)]
        new = engine.perms[q].copy()
        i, j = rng.choice(sizes[q], size=2, replace=False)  # one swap: a rank-2 change
        new[[i, j]] = new[[j, i]]
        engine.update(q, new, np.sort(np.array([i, j])))
        if step % 3 == 2:
            for p in engine.active():
                got = engine.similarity(p)
                if got is None:
                    continue
                current = {k: torch.from_numpy(v.copy()) for k, v in engine.perms.items()}
                assert_close(got.double(), _reference_similarity(spec, a, b, current, p), rtol=1e-5, atol=1e-4)
    assert engine.n_lowrank_updates > lowrank_before
    assert engine.n_full_builds == len(engine.active())  # never rebuilt: only low-rank corrections


def test_unchanged_similarity_is_not_solved_again():
    spec, a = mlp_spec(), state(mlp(16))
    _, b = planted(spec, a)
    perms, info = weight_matching(spec, a, b, start="identity", return_info=True)
    again, info2 = weight_matching(spec, a, b, init=perms, return_info=True)
    assert info2.n_sweeps == 1 and info2.converged and info2.n_solves == 3 and info2.n_skipped == 0
    assert all(torch.equal(again[k], perms[k]) for k in perms)
    assert info.n_skipped > 0


def test_linear_assignment_maximises():
    s = torch.tensor([[1.0, 5.0, 0.0], [4.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert torch.equal(linear_assignment(s), torch.tensor([1, 0, 2]))
    with pytest.raises(RebasinError, match="square"):
        linear_assignment(torch.zeros(2, 3))
    with pytest.raises(RebasinError, match="NaN or inf"):
        linear_assignment(torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), name="P3")


# ---------------------------------------------------------------- library models, traced specs
def _library_cases():
    models = pytest.importorskip("rebasin.apps.models")
    trace = pytest.importorskip("rebasin.trace")
    torch.manual_seed(0)
    return trace.spec_from_model, [
        (models.MLP(6, [12, 10], 3, norm="batchnorm"), torch.randn(4, 6)),
        (models.VGG([4, "M", 6, "M"], batch_norm=True, image_size=8, classifier_hidden=[10]), torch.randn(2, 3, 8, 8)),
        (models.ResNet20(width=0.25), torch.randn(2, 3, 16, 16)),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["MLP", "VGG", "ResNet20"])
def test_planted_recovery_on_library_models(index):
    spec_from_model, cases = _library_cases()
    model, x = cases[index]
    spec = spec_from_model(model, x)
    g = torch.Generator().manual_seed(index)
    a = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in state(model).items()}
    for k in a:
        if k.endswith("running_var"):
            a[k] = a[k].abs() + 0.5
    _, b = planted(spec, a, seed=10 + index)
    perms = weight_matching(spec, a, b)
    assert_states_equal(permute(spec, perms, b), a)


def test_cost_matrix_buffer_reused_only_when_it_fits():
    import numpy as np

    from rebasin.matching.assignment import cost_from_similarity

    s = torch.randn(5, 5)
    buf = np.empty((5, 5))
    out = cost_from_similarity(s, out=buf)
    assert out is buf
    assert_close(torch.from_numpy(out), -s.double())
    for bad in (np.empty((4, 4)), np.empty((5, 5), dtype=np.float32), np.empty((5, 5)).T):
        other = cost_from_similarity(s, out=bad)
        assert other is not bad and other.dtype == np.float64
        assert_close(torch.from_numpy(other), -s.double())


def test_bad_start_is_refused_with_the_choices():
    spec, a = mlp_spec(), state(mlp(8))
    _, b = planted(spec, a)
    with pytest.raises(RebasinError, match=r"start must be one of \['auto', 'identity', 'layerwise', 'best'\], got 'nearest'"):
        weight_matching(spec, a, b, start="nearest")
    init = {p: torch.arange(n) for p, n in spec.validate(a).items()}
    with pytest.raises(RebasinError, match="start='identity' and init were both given"):
        weight_matching(spec, a, b, start="identity", init=init)
    _, info = weight_matching(spec, a, b, init=init, return_info=True)
    assert info.start == "init"


def test_layerwise_start_is_exact_for_a_planted_permutation():
    """Forced alone (no descent), the layer-wise start already is the planted answer."""
    spec, a = mlp_spec(), state(mlp(16))
    truth, b = planted(spec, a)
    perms, info = weight_matching(spec, a, b, start="layerwise", n_iter=0, return_info=True)
    assert all(torch.equal(perms[p], torch.argsort(truth[p])) for p in spec.perms)
    assert info.start == "layerwise" and info.final_objective > info.identity_objective


def test_auto_descends_once_from_the_higher_start_point(monkeypatch):
    """start='auto' (the default): one descent, from the layer-wise start when its objective is at least the
    identity's, else from the identity, so the end is never below the identity's objective."""
    spec, a = mlp_spec(), state(mlp(16))
    other = state(mlp(16, seed=1))  # unrelated models: the layer-wise start begins above the identity
    _, at_start = weight_matching(spec, a, other, start="layerwise", n_iter=0, return_info=True)
    assert at_start.final_objective > at_start.identity_objective
    _, info = weight_matching(spec, a, other, return_info=True)
    _, forced = weight_matching(spec, a, other, start="layerwise", return_info=True)
    assert [d[0] for d in info.descents] == ["layerwise"] and info.descents == forced.descents
    assert info.initial_objective == pytest.approx(at_start.final_objective, rel=1e-9)

    # a start below the identity: B is A plus a little noise (the identity is near the optimum), and the
    # layer-wise start is replaced by a random permutation after it ran
    near = {k: v + 1e-3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) for k, v in a.items()}
    bad = {p: v.numpy() for p, v in random_permutation(spec, seed=9, sizes=spec.validate(a)).items()}
    real = _descent.layerwise_start

    def misleading(spec_, sizes, access, engine, terms):
        real(spec_, sizes, access, engine, terms)
        engine.reset(bad)
        return bad, None

    monkeypatch.setattr(_descent, "layerwise_start", misleading)
    _, low = weight_matching(spec, a, near, start="layerwise", n_iter=0, return_info=True)
    assert low.final_objective < low.identity_objective  # the patched start is below the identity
    perms, info = weight_matching(spec, a, near, return_info=True)
    assert [d[0] for d in info.descents] == ["identity"] and info.start == "identity"
    assert info.final_objective >= info.identity_objective
    assert all(torch.equal(perms[p], torch.arange(perms[p].numel())) for p in spec.perms)


def test_best_descends_twice_unless_the_start_is_optimal():
    """start='best': one descent when the layer-wise end point reaches sum_k |A_k| |B_k| (a permuted copy: no
    permutation scores higher); else one from each start, both listed in info.descents, the higher one kept."""
    spec, a = mlp_spec(), state(mlp(16))
    truth, b = planted(spec, a)
    perms, info = weight_matching(spec, a, b, start="best", return_info=True)
    assert [d[0] for d in info.descents] == ["layerwise"] and info.start == "layerwise" and info.n_sweeps == 1
    assert all(torch.equal(perms[p], torch.argsort(truth[p])) for p in spec.perms)
    moved = [k for k, axes in spec.axes.items() if any(n is not None for n in axes)]  # the objective's keys
    bound = sum(float(a[k].double().norm() * b[k].double().norm()) for k in moved)
    assert info.final_objective == pytest.approx(bound, rel=1e-6)
    other = state(mlp(16, seed=1))  # unrelated models: both descents run
    perms2, info2 = weight_matching(spec, a, other, start="best", return_info=True)
    assert [d[0] for d in info2.descents] == ["layerwise", "identity"]
    assert info2.final_objective == max(d[1] for d in info2.descents) and info2.start in ("layerwise", "identity")
    assert info2.identity_objective == pytest.approx(sum(float((a[k].double() * other[k].double()).sum()) for k in moved))
    for kind, final, sweeps in info2.descents:  # each is the descent that start=kind runs alone
        got, forced = weight_matching(spec, a, other, start=kind, return_info=True)
        assert forced.descents == ((kind, final, sweeps),) and forced.final_objective == final
        if kind == info2.start:
            assert all(torch.equal(got[p], perms2[p]) for p in spec.perms)
            assert (forced.n_full_builds, forced.n_lowrank_updates, forced.n_solves) == \
                (info2.n_full_builds, info2.n_lowrank_updates, info2.n_solves)


def test_start_and_first_sweep_compute_each_product_once(monkeypatch):
    """The layer-wise start's similarities are partial sums of the first sweep's, kept and completed: on a
    permuted copy (one sweep confirms the start) every term's product A_t B'_t^T is computed exactly once."""
    spec, a = mlp_spec(), state(mlp(16))
    _, b = planted(spec, a)
    built: list[int] = []
    real = _Engine._build

    def counting(terms, out=None):
        built.extend(id(t) for t in terms)
        return real(terms, out)

    monkeypatch.setattr(_Engine, "_build", staticmethod(counting))
    _, info = weight_matching(spec, a, b, return_info=True)
    assert info.n_sweeps == 1 and len(info.descents) == 1
    assert len(built) == len(set(built)) == sum(len(spec.perm_to_axes[p]) for p in spec.perms)
