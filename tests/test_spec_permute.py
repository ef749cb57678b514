"""PermutationSpec validation and the pure permutation functions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from rebasin import PermutationSpec, RebasinError, compose, invert, permute, random_permutation
from rebasin.spec import check_permutations, identity_permutation


def mlp_spec() -> PermutationSpec:
    return PermutationSpec(
        {
            "0.weight": ("P0", None),
            "0.bias": ("P0",),
            "1.weight": ("P0",),
            "1.bias": ("P0",),
            "1.running_mean": ("P0",),
            "1.running_var": ("P0",),
            "1.num_batches_tracked": (),
            "3.weight": (None, "P0"),
            "3.bias": (None,),
        }
    )


def mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].weight.uniform_(0.5, 2)
        m[1].bias.uniform_(-1, 1)
    return m


def clone(sd):
    return {k: v.clone() for k, v in sd.items()}


def test_derived_views():
    spec = mlp_spec()
    assert spec.perms == ("P0",)
    assert spec.perm_to_axes["P0"][0] == ("0.weight", 0)
    assert ("3.weight", 1) in spec.perm_to_axes["P0"]
    assert spec.validate(mlp().state_dict()) == {"P0": 6}
    assert spec.with_sizes(mlp().state_dict()).sizes == {"P0": 6}


def test_check_accepts_right_spec_and_rejects_wrong_one():
    m = mlp()
    x = torch.randn(5, 3)
    assert mlp_spec().check(m, x) <= 1e-5
    wrong = dict(mlp_spec().axes)
    wrong["1.running_mean"] = (None,)  # forgetting BN statistics is a classic bug
    with pytest.raises(RebasinError, match="spec is wrong"):
        PermutationSpec(wrong).check(m, x)


def test_check_does_not_mutate_model():
    m = mlp().train()
    before = clone(m.state_dict())
    mlp_spec().check(m, torch.randn(5, 3))
    assert m.training and all(mod.training for mod in m.modules())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_validate_lists_missing_and_unexpected_keys():
    sd = mlp().state_dict()
    sd["extra.weight"] = torch.zeros(2)
    del sd["3.bias"]
    with pytest.raises(RebasinError) as err:
        mlp_spec().validate(sd)
    assert "'3.bias'" in str(err.value) and "'extra.weight'" in str(err.value)


def test_validate_inconsistent_sizes_names_keys_and_shapes():
    spec = PermutationSpec({"a": ("P", None), "b": (None, "P")})
    with pytest.raises(RebasinError) as err:
        spec.validate({"a": torch.zeros(4, 2), "b": torch.zeros(2, 5)})
    msg = str(err.value)
    assert "'P'" in msg and "(4, 2)" in msg and "(2, 5)" in msg


def test_validate_rank_mismatch_and_nonfinite():
    spec = PermutationSpec({"a": ("P", None)})
    with pytest.raises(RebasinError, match="axes"):
        spec.validate({"a": torch.zeros(4)})
    bad = torch.zeros(4, 2)
    bad[1, 1] = float("nan")
    with pytest.raises(RebasinError, match="'a'.*NaN"):
        spec.validate({"a": bad}, finite=True)


def test_spec_construction_errors():
    assert PermutationSpec({"w": ("P", "P")}).perm_to_axes["P"] == (("w", 0), ("w", 1))  # P W P^T
    with pytest.raises(RebasinError, match="tuple"):
        PermutationSpec({"w": "P"})
    with pytest.raises(RebasinError, match="blocks"):
        PermutationSpec({"w": ("P", None)}, blocks={("w", 1): 4})
    with pytest.raises(RebasinError, match="sizes"):
        PermutationSpec({"w": ("P", None)}, sizes={"Q": 3})


def test_validate_pair_shape_mismatch():
    spec = PermutationSpec({"w": ("P", None)})
    with pytest.raises(RebasinError, match=r"\(3, 2\) vs \(3, 5\)"):
        spec.validate_pair({"w": torch.zeros(3, 2)}, {"w": torch.zeros(3, 5)})


def test_permute_moves_rows_and_columns_and_buffers():
    m = mlp()
    sd = m.state_dict()
    p = {"P0": torch.tensor([5, 3, 1, 0, 2, 4])}
    out = permute(mlp_spec(), p, sd)
    assert_close(out["0.weight"], sd["0.weight"][p["P0"]])
    assert_close(out["1.running_var"], sd["1.running_var"][p["P0"]])
    assert_close(out["3.weight"], sd["3.weight"][:, p["P0"]])
    assert out["3.bias"] is sd["3.bias"]  # untouched tensors are shared, not copied


def test_permute_is_functionally_equivalent():
    m = mlp()
    x = torch.randn(7, 3)
    spec = mlp_spec()
    p = random_permutation(spec, seed=3, sizes=spec.validate(m.state_dict()))
    permuted = permute(spec, p, m.state_dict())
    m2 = mlp()
    m2.load_state_dict(permuted)
    m.eval(), m2.eval()
    assert_close(m(x), m2(x))


def test_permute_does_not_mutate_inputs():
    sd = mlp().state_dict()
    before = clone(sd)
    p = {"P0": torch.tensor([5, 3, 1, 0, 2, 4])}
    p_before = p["P0"].clone()
    permute(mlp_spec(), p, sd)
    for k in sd:
        assert torch.equal(sd[k], before[k])
    assert torch.equal(p["P0"], p_before)


def test_blocks_expand_channel_major():
    spec = PermutationSpec({"w": (None, "P")}, blocks={("w", 1): 3})
    w = torch.arange(6.0).reshape(1, 6)  # two channels, three positions each
    out = permute(spec, {"P": torch.tensor([1, 0])}, {"w": w})
    assert_close(out["w"], torch.tensor([[3.0, 4.0, 5.0, 0.0, 1.0, 2.0]]))
    assert spec.validate({"w": w}) == {"P": 2}
    with pytest.raises(RebasinError, match="multiple"):
        spec.validate({"w": torch.zeros(1, 7)})


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([0, 1, 1, 2, 3, 4]), "not a permutation"),
        (torch.tensor([0, 1, 2]), "3 entries"),
        (torch.tensor([0, 1, 2, 3, 4, 6]), "not a permutation"),
        (torch.tensor([0.0, 1, 2, 3, 4, 5]), "integer"),
    ],
)
def test_bad_permutations_rejected(bad, match):
    with pytest.raises(RebasinError, match=match):
        permute(mlp_spec(), {"P0": bad}, mlp().state_dict())


def test_unknown_permutation_name_rejected():
    with pytest.raises(RebasinError, match="unknown permutation 'Q'"):
        check_permutations(mlp_spec(), {"Q": torch.arange(3)})


def test_random_permutation_is_seeded():
    spec = PermutationSpec({"a": ("P", "Q")}, sizes={"P": 50, "Q": 40})
    p1, p2, p3 = (random_permutation(spec, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert not torch.equal(p1["P"], p3["P"])
    with pytest.raises(RebasinError, match="sizes"):
        random_permutation(PermutationSpec({"a": ("P",)}), seed=0)


def test_identity_and_compose():
    spec = PermutationSpec({"a": ("P", None)}, sizes={"P": 5})
    ident = identity_permutation(spec)
    s = {"a": torch.randn(5, 2)}
    assert torch.equal(permute(spec, ident, s)["a"], s["a"])
    p, q = random_permutation(spec, seed=0), random_permutation(spec, seed=1)
    assert torch.equal(
        permute(spec, compose(p, q), s)["a"], permute(spec, q, permute(spec, p, s))["a"]
    )


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    m=st.integers(1, 7),
    block=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_invert(n, m, block, seed):
    spec = PermutationSpec(
        {"w1": ("P", None), "b1": ("P",), "w2": ("Q", "P"), "w3": (None, "Q")},
        blocks={("w3", 1): block},
    )
    g = torch.Generator().manual_seed(seed)
    s = {
        "w1": torch.randn(n, 3, generator=g),
        "b1": torch.randn(n, generator=g),
        "w2": torch.randn(m, n, generator=g),
        "w3": torch.randn(2, m * block, generator=g),
    }
    p = random_permutation(spec, seed=seed, sizes=spec.validate(s))
    back = permute(spec, invert(p), permute(spec, p, s))
    for k in s:
        assert torch.equal(back[k], s[k])
