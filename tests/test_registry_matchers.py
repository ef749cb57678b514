"""The matcher registry: built-ins registered like a user's matcher, and a user's matcher usable everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rebasin
from rebasin import RebasinError, permute, random_permutation, register_matcher, spec_from_model, unregister_matcher


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
    wm = rebasin.get_matcher("weight_matching")
    assert "n_iter" in wm.options() and "device" in wm.options() and wm.description


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
        register_matcher("no_seed", lambda spec, a, b, *, model_a=None, model_b=None, loader=None: {})
    with pytest.raises(RebasinError, match="non-empty string"):
        register_matcher("", lambda spec, a, b, **kw: {})
    with pytest.raises(RebasinError, match="unknown method 'nope'"):
        unregister_matcher("nope")
    assert "two_args" not in rebasin.matcher_names()


def test_data_driven_matchers_say_they_need_data():
    a, b, spec, _ = _pair(2)
    with pytest.raises(RebasinError, match="matcher 'activation_matching' needs data"):
        rebasin.get_matcher("activation_matching")(spec, a.state_dict(), b.state_dict(), model_a=a, model_b=b)


def test_registered_states_are_used_not_the_models_own():
    """A data-driven matcher runs the *states* it is given through the architecture (merge relies on it)."""
    a, b, spec, planted = _pair(3)
    x = torch.randn(64, 5)
    other = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 3))
    res = rebasin.get_matcher("activation_matching")(
        spec, a.state_dict(), b.state_dict(), model_a=other, model_b=other, loader=[x]
    )
    aligned = permute(spec, res.perms, b.state_dict())
    for key, value in a.state_dict().items():
        torch.testing.assert_close(aligned[key], value)
