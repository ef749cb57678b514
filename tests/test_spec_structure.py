"""Structured permutations in the spec: heads/groups (``structure``), concatenations (``concat``),
grouped axes (``grouped``) and one permutation on two axes of a tensor (P W P^T)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from rebasin import RebasinError
from rebasin.spec import (
    PermutationSpec,
    check_permutations,
    invert,
    join_structured,
    permute,
    random_permutation,
    split_structured,
)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _mha_spec(e, h):
    d = e // h
    return PermutationSpec(
        {"in_proj_weight": ("QKV", "R"), "in_proj_bias": ("QKV",), "out_proj.weight": ("R", "VO"), "out_proj.bias": ("R",)},
        structure={"QK": ("H", d), "VO": ("H", d)},
        concat={"QKV": (("QK", e), ("QK", e), ("VO", e))},
    )


def test_mha_packed_hand_spec_is_exact_and_moves_heads():
    torch.manual_seed(0)
    e, h = 12, 3
    mha = nn.MultiheadAttention(e, h, batch_first=True)
    state = _state(mha)
    spec = _mha_spec(e, h).with_sizes(state)
    assert spec.perms == ("QK", "VO", "R") and spec.units == (("QK", "VO"), ("R",))
    perms = random_permutation(spec, seed=4)
    outer_qk, inner_qk = split_structured(perms["QK"], e // h)
    outer_vo, _ = split_structured(perms["VO"], e // h)
    assert torch.equal(outer_qk, outer_vo) and not torch.equal(outer_qk, torch.arange(h))
    assert not torch.equal(inner_qk, torch.arange(e // h).expand(h, -1))
    out = permute(spec, perms, state)
    x = torch.randn(2, 5, e)
    y0 = mha(x, x, x)[0]
    xp = x[..., perms["R"]]
    y1 = functional_call(mha, out, (xp, xp, xp))[0]
    torch.testing.assert_close(y1, y0[..., perms["R"]], atol=1e-5, rtol=1e-5)
    back = permute(spec, invert(perms), out)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_grouped_conv_hand_spec_is_exact():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 9, 3, groups=3)
    state = _state(conv)
    spec = PermutationSpec(
        {"weight": ("O", "I", None, None), "bias": ("O",)},
        structure={"I": ("G", 2), "O": ("G", 3)},
        grouped={("weight", 1): 3},
    )
    sizes = spec.validate(state)
    assert sizes == {"O": 9, "I": 6}  # the input size comes from the grouped axis times the groups
    for seed in range(5):
        perms = random_permutation(spec, seed=seed, sizes=sizes)
        out = permute(spec, perms, state)
        x = torch.randn(2, 6, 7, 7)
        y0 = conv(x)
        y1 = functional_call(conv, out, (x[:, perms["I"]],))
        torch.testing.assert_close(y1, y0[:, perms["O"]], atol=1e-5, rtol=1e-5)


def test_one_permutation_on_two_axes_is_exact():
    torch.manual_seed(2)
    lin = nn.Linear(6, 6)
    spec = PermutationSpec({"weight": ("P", "P"), "bias": ("P",)})
    state = _state(lin)
    perms = random_permutation(spec, seed=0, sizes=spec.validate(state))
    out = permute(spec, perms, state)
    x = torch.randn(4, 6)
    y0 = x + torch.relu(lin(x))
    xp = x[:, perms["P"]]
    y1 = xp + torch.relu(functional_call(lin, out, (xp,)))
    torch.testing.assert_close(y1, y0[:, perms["P"]])


def test_lstm_gates_as_a_concatenation_is_exact():
    torch.manual_seed(3)
    hid = 5
    lstm = nn.LSTM(4, hid, batch_first=True)
    gates = (("H", hid),) * 4
    spec = PermutationSpec(
        {"weight_ih_l0": ("G", None), "weight_hh_l0": ("G", "H"), "bias_ih_l0": ("G",), "bias_hh_l0": ("G",)},
        concat={"G": gates},
    )
    state = _state(lstm)
    perms = random_permutation(spec, seed=1, sizes=spec.validate(state))
    out = permute(spec, perms, state)
    x = torch.randn(2, 3, 4)
    y0 = lstm(x)[0]
    y1 = functional_call(lstm, out, (x,))[0]
    torch.testing.assert_close(y1, y0[..., perms["H"]])


def test_concat_with_an_unpermuted_part():
    spec = PermutationSpec({"a": ("P", None), "w": (None, "C")}, concat={"C": (("P", 3), (None, 2))})
    state = {"a": torch.arange(6.0).reshape(3, 2), "w": torch.arange(5.0).reshape(1, 5)}
    out = permute(spec, {"P": torch.tensor([2, 0, 1])}, state)
    assert out["w"].tolist() == [[2.0, 0.0, 1.0, 3.0, 4.0]]
    assert spec.perms == ("P",) and spec.occurrences["P"][1].key == "w"


def test_structure_roundtrip_and_renamed():
    outer, inner = torch.tensor([2, 0, 1]), torch.tensor([[1, 0], [0, 1], [1, 0]])
    flat = join_structured(outer, inner)
    assert flat.tolist() == [5, 4, 0, 1, 3, 2]
    o2, i2 = split_structured(flat, 2)
    assert torch.equal(o2, outer) and torch.equal(i2, inner)
    spec = _mha_spec(8, 2).renamed({"QK": "q", "H": "heads"})
    assert spec.structure["q"] == ("heads", 4) and spec.concat["QKV"][0] == ("q", 8)


def test_check_permutations_refuses_broken_structure():
    spec = _mha_spec(8, 2).with_sizes({"in_proj_weight": torch.zeros(24, 8), "in_proj_bias": torch.zeros(24),
                                       "out_proj.weight": torch.zeros(8, 8), "out_proj.bias": torch.zeros(8)})
    ok = random_permutation(spec, seed=0)
    check_permutations(spec, ok)
    with pytest.raises(RebasinError, match="moves units between blocks"):
        check_permutations(spec, {**ok, "QK": torch.tensor([0, 4, 2, 3, 1, 5, 6, 7])})
    swapped = join_structured(torch.tensor([1, 0]), torch.arange(4).expand(2, -1))
    same = join_structured(torch.tensor([0, 1]), torch.arange(4).expand(2, -1))
    with pytest.raises(RebasinError, match="differently"):
        check_permutations(spec, {**ok, "QK": swapped, "VO": same})
    with pytest.raises(RebasinError, match="but not 'VO'"):
        check_permutations(spec, {"QK": ok["QK"], "R": ok["R"]})


@pytest.mark.parametrize("kwargs, match", [
    ({"structure": {"X": ("H", 2)}}, "not a permutation of the spec"),
    ({"structure": {"P": ("P", 2)}}, "another"),
    ({"structure": {"P": ("Q", 2), "Q": ("H", 1)}}, "nested"),
    ({"concat": {"Z": (("P", 2),)}}, "not a permutation used"),
    ({"concat": {"P": (("Q", 0),)}}, "positive"),
    ({"grouped": {("w", 1): 2}}, "structured"),
])
def test_structure_construction_errors(kwargs, match):
    with pytest.raises(RebasinError, match=match):
        PermutationSpec({"w": ("P", "Q"), "v": ("Q", None)}, **kwargs)


def test_structure_size_errors():
    spec = PermutationSpec({"a": ("P", None), "b": ("Q", None)}, structure={"P": ("H", 3), "Q": ("H", 2)})
    with pytest.raises(RebasinError, match="not a multiple of its block size"):
        spec.validate({"a": torch.zeros(4, 1), "b": torch.zeros(4, 1)})
    with pytest.raises(RebasinError, match="share the outer"):
        spec.validate({"a": torch.zeros(6, 1), "b": torch.zeros(6, 1)})
