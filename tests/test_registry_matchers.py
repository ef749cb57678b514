"""The matcher registry: built-ins registered like a user's matcher, and a user's matcher usable everywhere."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rebasin
from rebasin import RebasinError, permute, random_permutation, register_matcher, spec_from_model
from rebasin.matching import unregister_matcher


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 3))
    spec = spec_from_model(a, torch.randn(2, 5))
    b = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 3))
    planted = random_permutation(spec, seed=seed + 1)
    b.load_state_dict(permute(spec, planted, a.state_dict()))
    return a, b, spec, planted


@pytest.fixture
def oracle():
    """A user's matcher (weight matching underneath) that records how it was called and returns info."""
    calls = []

    @register_matcher("oracle")
    def match(spec, state_a, state_b, *, model_a=None, model_b=None, loader=None, seed=0, scale=1.0):
        "Weight matching, called through the registry like any user matcher."
        calls.append({"seed": seed, "scale": scale, "has_models": model_a is not None})
        perms = rebasin.weight_matching(spec, state_a, state_b, seed=seed)
        return rebasin.MatchResult(perms, info={"scale": scale})

    yield calls
    unregister_matcher("oracle")


def test_builtins_are_registered_and_listed_in_order():
    names = rebasin.matcher_names()
    assert names[:2] == ("identity", "weight_matching")
    assert {"activation_matching", "ste", "sinkhorn", "ot"} <= set(names)
    assert set(rebasin.matcher_names(needs_data=True)) == {"activation_matching", "ste"}
    wm = rebasin.matching.get_matcher("weight_matching")
    assert "n_iter" in wm.options() and wm.description
    # the standard keywords are read from the signature once, not listed as options
    assert "device" not in wm.options() and {"device", "seed", "init"} <= wm.standard


def test_a_users_matcher_works_through_align(oracle):
    a, b, spec, planted = _pair()
    res = rebasin.align(a, b, method="oracle", spec=spec, seed=3, scale=2.0)
    assert res.method == "oracle" and res.info == {"scale": 2.0}
    assert oracle == [{"seed": 3, "scale": 2.0, "has_models": True}]
    for key, value in a.state_dict().items():
        torch.testing.assert_close(res.state_b[key], value)
    with pytest.raises(RebasinError, match=r"unknown option\(s\) \['scal'\] for matcher 'oracle'"):
        rebasin.align(a, b, method="oracle", spec=spec, scal=2.0)


def test_a_plain_dict_result_is_accepted_and_checked():
    a, b, spec, planted = _pair(1)

    @register_matcher("bad")
    def bad(spec, state_a, state_b, **kw):
        return {"P0": torch.zeros(12, dtype=torch.long)}

    try:
        with pytest.raises(RebasinError, match="matcher 'bad' returned invalid permutations.*not a permutation"):
            rebasin.align(a, b, method="bad", spec=spec)
    finally:
        unregister_matcher("bad")


def test_registration_errors_are_clear():
    with pytest.raises(RebasinError, match="already registered"):
        register_matcher("weight_matching", lambda spec, a, b, **kw: {})
    with pytest.raises(RebasinError, match="must have the signature"):
        register_matcher("two_args", lambda spec, a: {})
    with pytest.raises(RebasinError, match="must have the signature"):
        register_matcher("models_no_states", lambda model_a, model_b, loader, *, spec=None: {})
    with pytest.raises(RebasinError, match="non-empty string"):
        register_matcher("", lambda spec, a, b, **kw: {})
    with pytest.raises(RebasinError, match="unknown method 'nope'"):
        unregister_matcher("nope")
    assert "two_args" not in rebasin.matcher_names() and "models_no_states" not in rebasin.matcher_names()


def test_data_driven_matchers_say_they_need_data():
    a, b, spec, _ = _pair(2)
    with pytest.raises(RebasinError, match="matcher 'activation_matching' needs data"):
        rebasin.matching.get_matcher("activation_matching")(spec, a.state_dict(), b.state_dict(), model_a=a, model_b=b)


def test_registered_states_are_used_not_the_models_own():
    """A data-driven matcher runs the *states* it is given through the architecture (merge relies on it)."""
    a, b, spec, planted = _pair(3)
    x = torch.randn(64, 5)
    other = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 3))
    res = rebasin.matching.get_matcher("activation_matching")(
        spec, a.state_dict(), b.state_dict(), model_a=other, model_b=other, loader=[x]
    )
    aligned = permute(spec, res.perms, b.state_dict())
    for key, value in a.state_dict().items():
        torch.testing.assert_close(aligned[key], value)


class _CountingCopies(nn.Sequential):
    """A model that counts deep copies of itself (the registry adapters must not make any)."""

    copies = 0

    def __deepcopy__(self, memo):
        type(self).copies += 1
        clone = nn.Sequential(*[copy.deepcopy(m, memo) for m in self])
        clone.__class__ = type(self)
        return clone


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("activation_matching", {}),
        ("ste", {"epochs": 1, "lr": 1e-2}),
        ("sinkhorn", {"cost": "midpoint", "fit": {"epochs": 1, "progress": False}}),
    ],
)
def test_data_driven_adapters_run_the_given_states_without_copying_the_model(method, options):
    """Through the registry the matcher runs the *states* it is given on the model's architecture: the
    result equals the public function on models holding those states, and no module is deep-copied."""
    a, b, spec, _ = _pair(4)
    torch.manual_seed(5)
    x, y = torch.randn(48, 5), torch.randint(0, 3, (48,))
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    arch = _CountingCopies(*[copy.deepcopy(m) for m in a])  # another init: only the architecture
    _CountingCopies.copies = 0
    res = rebasin.matching.get_matcher(method)(
        spec, a.state_dict(), b.state_dict(), model_a=arch, model_b=arch, loader=loader, **options
    )
    assert _CountingCopies.copies == 0
    if method == "activation_matching":
        direct = rebasin.activation_matching(a, b, loader, spec=spec)
    elif method == "ste":
        direct = rebasin.ste_matching(a, b, loader, spec=spec, **options)
    else:
        sr = rebasin.SinkhornRebasin(a, b, spec=spec, cost="midpoint")
        sr.fit(loader, **options["fit"])
        direct = sr.hard_permutations()
    assert set(res.perms) == set(direct)
    for name, perm in direct.items():
        assert torch.equal(res.perms[name], perm), name


def test_public_matchers_take_explicit_states():
    """state_a / state_b replace the models' own states (backward compatible keyword arguments)."""
    a, b, spec, _ = _pair(6)
    blank = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 3))
    x = torch.randn(64, 5)
    perms = rebasin.activation_matching(blank, blank, [x], spec=spec, state_a=a.state_dict(), state_b=b.state_dict())
    aligned = permute(spec, perms, b.state_dict())
    for key, value in a.state_dict().items():
        torch.testing.assert_close(aligned[key], value)
    corr = rebasin.matching.activation_correlations(blank, blank, [x], spec=spec, state_a=a.state_dict(), state_b=a.state_dict())
    torch.testing.assert_close(corr["P0"].diagonal(), torch.ones(12, dtype=torch.float64))
    with pytest.raises(RebasinError, match=r"state_b does not fit the model.*missing keys: \['4.bias'\]"):
        rebasin.activation_matching(blank, blank, [x], spec=spec, state_b={k: v for k, v in b.state_dict().items() if k != "4.bias"})
    with pytest.raises(RebasinError, match="state_a does not fit the model"):
        rebasin.SinkhornRebasin(blank, blank, spec=spec, state_a={"0.weight": torch.zeros(12, 5)})


def test_an_option_declared_without_a_bare_star_is_accepted():
    # register_matcher accepts fn(spec, a, b, model_a=None, ..., seed=0, n_iter=5); its n_iter is an option
    def positional(spec, state_a, state_b, model_a=None, model_b=None, loader=None, seed=0, n_iter=5):
        "Weight matching whose options are positional-or-keyword."
        return rebasin.weight_matching(spec, state_a, state_b, n_iter=n_iter, seed=seed)

    matcher = register_matcher("positional_options", positional)
    try:
        assert matcher.options() == frozenset({"n_iter"})
        a, b, spec, _ = _pair()
        res = rebasin.align(a, b, method="positional_options", spec=spec, n_iter=3)
        for key, value in a.state_dict().items():
            torch.testing.assert_close(res.state_b[key], value)
        with pytest.raises(RebasinError, match=r"unknown option\(s\) \['n_ite'\]"):
            rebasin.align(a, b, method="positional_options", spec=spec, n_ite=3)
    finally:
        unregister_matcher("positional_options")


def test_standard_keywords_reach_only_the_matchers_that_declare_them():
    """mergekit's easy_define for matchers: device/sync/group/init/progress go only where declared."""
    seen = []

    def bare(spec, state_a, state_b):
        "No standard keyword at all."
        seen.append("bare")
        return {}

    def some(spec, state_a, state_b, *, device=None, init=None, seed=0):
        "Declares device, init and seed."
        seen.append((str(device), init is not None, seed))
        return {}

    a, b, spec, _ = _pair(7)
    for name, fn in (("bare", bare), ("some", some)):
        register_matcher(name, fn)
    try:
        init = {p: torch.arange(n) for p, n in spec.resolved_sizes(a.state_dict()).items()}
        for name in ("bare", "some"):
            rebasin.align(a, b, method=name, spec=spec, seed=4, device="cpu", sync=False, group=None, init=init,
                          progress=False)
        assert rebasin.matching.get_matcher("bare").standard == frozenset()
    finally:
        unregister_matcher("bare")
        unregister_matcher("some")
    assert seen == ["bare", ("cpu", True, 4)]


def test_the_public_functions_are_what_is_registered():
    assert rebasin.matching.get_matcher("weight_matching").fn is rebasin.weight_matching
    assert rebasin.matching.get_matcher("activation_matching").fn is rebasin.activation_matching
    assert rebasin.matching.get_matcher("ste").fn is rebasin.ste_matching
    assert rebasin.matching.get_matcher("ot").fn is rebasin.matching.ot_matching
    assert rebasin.matching.get_matcher("sinkhorn").fn is rebasin.matching.sinkhorn_matching
    assert rebasin.matching.get_matcher("ste").models_first and not rebasin.matching.get_matcher("ot").models_first


def test_builtin_order_is_the_fixed_list_not_the_import_order():
    from rebasin.matching import registry

    assert rebasin.matcher_names()[: len(registry.BUILTINS)] == tuple(b[0] for b in registry.BUILTINS)


def test_no_test_hooks_in_public_signatures():
    import inspect

    for fn in (rebasin.weight_matching, rebasin.activation_matching, rebasin.ste_matching, rebasin.matching.ot_matching,
               rebasin.matching.sinkhorn_matching, rebasin.align, rebasin.merge):
        hooks = [p for p in inspect.signature(fn).parameters if p.startswith("_")]
        assert not hooks, (fn.__name__, hooks)


def test_registration_order_does_not_depend_on_import_order():
    import subprocess
    import sys

    code = ("import rebasin.matching.ot, rebasin.matching.ste; from rebasin.matching import registry; "
            "print(','.join(registry.matcher_names()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(",") == list(rebasin.matcher_names())
    assert out.startswith("identity,weight_matching,activation_matching,ste,sinkhorn,ot")


def test_merge_warm_starts_every_matcher_that_declares_init():
    """init is a standard keyword: merge's later rounds pass the previous permutations to any matcher taking it."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)) for _ in range(3)]
    spec = spec_from_model(models[0], torch.randn(2, 5))
    seen = []

    def warm(spec, state_a, state_b, *, seed=0, init=None):
        "Weight matching that records its starting permutations."
        seen.append(init is not None)
        return rebasin.weight_matching(spec, state_a, state_b, seed=seed, init=init)

    register_matcher("warm", warm)
    try:
        _, info = rebasin.merge(models, method="warm", spec=spec, repair=False, n_iter=3, return_info=True)
    finally:
        unregister_matcher("warm")
    assert info.rounds >= 2 and seen[:2] == [False, False] and all(seen[2:])
