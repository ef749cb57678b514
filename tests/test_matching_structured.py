"""Matchers on structured specs: heads/groups (``structure``), concatenations (``concat``), grouped axes and
``P W P^T``. Planted permutations are recovered exactly and every result respects the structure."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from rebasin import RebasinError, RebasinWarning
from rebasin.matching import weight as weight_module
from rebasin.matching.activation import activation_matching
from rebasin.matching.assignment import structured_assignment
from rebasin.matching.ot import ot_matching
from rebasin.matching.ste import ste_matching
from rebasin.matching.weight import weight_matching
from rebasin.spec import PermutationSpec, check_permutations, invert, permute, random_permutation, split_structured
from rebasin.trace import spec_from_model


def textbook(*args, **kwargs):
    """weight_matching with the incremental engine off (the module's test seam, never an argument)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weight_module, "_INCREMENTAL", False)
        return weight_matching(*args, **kwargs)

def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---------------------------------------------------------------------------------------- models and specs
class _Attn(nn.Module):
    """Linear -> packed nn.MultiheadAttention (self-attention) -> mean over tokens -> Linear."""

    def __init__(self, e: int = 12, h: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(5, e)
        self.attn = nn.MultiheadAttention(e, h, batch_first=True)
        self.out = nn.Linear(e, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inp(x)
        return self.out(self.attn(z, z, z)[0].mean(1))


def _attn_spec(e: int = 12, h: int = 3) -> PermutationSpec:
    """The packed-MHA spec of tests/test_spec_structure.py inside a small network."""
    d = e // h
    return PermutationSpec(
        {"inp.weight": ("R", None), "inp.bias": ("R",),
         "attn.in_proj_weight": ("QKV", "R"), "attn.in_proj_bias": ("QKV",),
         "attn.out_proj.weight": ("R", "VO"), "attn.out_proj.bias": ("R",),
         "out.weight": (None, "R"), "out.bias": (None,)},
        structure={"QK": ("H", d), "VO": ("H", d)},
        concat={"QKV": (("QK", e), ("QK", e), ("VO", e))},
    )


def _gconv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 9, 3, padding=1, groups=3), nn.ReLU(),
                         nn.Conv2d(9, 4, 1))


GCONV_SPEC = PermutationSpec(
    {"0.weight": ("I", None, None, None), "0.bias": ("I",), "2.weight": ("O", "I", None, None), "2.bias": ("O",),
     "4.weight": (None, "O", None, None), "4.bias": (None,)},
    structure={"I": ("G", 2), "O": ("G", 3)},
    grouped={("2.weight", 1): 3},
)


class _LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(x)[0][:, -1])


LSTM_SPEC = PermutationSpec(
    {"lstm.weight_ih_l0": ("G", None), "lstm.weight_hh_l0": ("G", "H"), "lstm.bias_ih_l0": ("G",),
     "lstm.bias_hh_l0": ("G",), "out.weight": (None, "H"), "out.bias": (None,)},
    concat={"G": (("H", 6),) * 4},
)


class _Residual(nn.Module):
    """h = W0 x; h = h + relu(W1 h) (P W1 P^T); y = W2 h."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.res, self.b = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h + torch.relu(self.res(h)))


RES_SPEC = PermutationSpec({"a.weight": ("P", None), "a.bias": ("P",), "res.weight": ("P", "P"), "res.bias": ("P",),
                            "b.weight": (None, "P"), "b.bias": (None,)})


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(4, 3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))


CAT_SPEC = PermutationSpec({"a.weight": ("A", None), "a.bias": ("A",), "b.weight": ("B", None), "b.bias": ("B",),
                            "c.weight": (None, "C"), "c.bias": (None,)},
                           concat={"C": (("A", 5), ("B", 3))})


def _depthwise_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.ReLU(),
                         nn.Conv2d(8, 2, 1))


DEPTHWISE_SPEC = PermutationSpec(  # one input channel per group: the groups' inner blocks have size d = 1
    {"0.weight": ("I", None, None, None), "0.bias": ("I",), "2.weight": ("M", "I", None, None), "2.bias": ("M",),
     "4.weight": (None, "M", None, None), "4.bias": (None,)},
    structure={"I": ("G", 1), "M": ("G", 2)},
    grouped={("2.weight", 1): 4},
)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


# A real outer permutation: "M"'s blocks of 2 move with "C", which acts on axes itself (and on the same tensor).
OUTER_SPEC = PermutationSpec(
    {"0.weight": ("C", None), "0.bias": ("C",), "2.weight": ("M", "C"), "2.bias": ("M",),
     "4.weight": (None, "M"), "4.bias": (None,)},
    structure={"M": ("C", 2)},
)

CASES = {
    "depthwise": (_depthwise_net, DEPTHWISE_SPEC, torch.randn(2, 3, 5, 5)),
    "outer": (_mlp, OUTER_SPEC, torch.randn(2, 16)),
    "mha": (_Attn, _attn_spec(), torch.randn(2, 4, 5)),
    "gconv": (_gconv_net, GCONV_SPEC, torch.randn(2, 3, 5, 5)),
    "lstm": (_LSTMNet, LSTM_SPEC, torch.randn(2, 3, 4)),
    "residual": (_Residual, RES_SPEC, torch.randn(2, 4)),
    "cat": (_Cat, CAT_SPEC, torch.randn(2, 4)),
}


def _case(name: str, seed: int = 0) -> tuple[nn.Module, PermutationSpec, dict[str, torch.Tensor]]:
    make, spec, x = CASES[name]
    torch.manual_seed(seed)
    model = make()
    state = _state(model)
    spec = spec.with_sizes(state)
    spec.check(model, x)  # the hand-written spec is right for the model
    return model, spec, state


def _outer_moves(spec: PermutationSpec, perms: dict[str, torch.Tensor]) -> bool:
    for p, (_, d) in spec.structure.items():
        outer, _ = split_structured(perms[p], d)
        if not torch.equal(outer, torch.arange(outer.numel())):
            return True
    return False


# ---------------------------------------------------------------------------------------- structured assignment
def test_structured_assignment_is_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    for d, h in [(1, 3), (2, 3), (3, 2), (5, 2)]:
        s1, s2 = rng.normal(size=(h * d, h * d)), rng.normal(size=(h * d, h * d))
        so = rng.normal(size=(h, h))
        res = structured_assignment([s1, torch.from_numpy(s2)], [d, d], so)
        best = -np.inf
        for o in itertools.permutations(range(h)):
            v = sum(so[a, o[a]] for a in range(h))
            for s in (s1, s2):
                for a in range(h):
                    v += max(sum(s[a * d + i, o[a] * d + t[i]] for i in range(d)) for t in itertools.permutations(range(d)))
            best = max(best, v)
        assert res.value == pytest.approx(best)
        got = sum(so[a, res.outer[a]] for a in range(h)) + sum(
            s[a * d + i, res.outer[a] * d + inner[a, i]] for s, inner in ((s1, res.inner[0]), (s2, res.inner[1]))
            for a in range(h) for i in range(d))
        assert got == pytest.approx(best)


def test_structured_assignment_errors():
    with pytest.raises(RebasinError, match="one block size per similarity"):
        structured_assignment([np.eye(4)], [2, 2])
    with pytest.raises(RebasinError, match="blocks of 3"):
        structured_assignment([np.eye(4)], [3])
    with pytest.raises(RebasinError, match="members have"):
        structured_assignment([np.eye(4), np.eye(6)], [2, 2])
    with pytest.raises(RebasinError, match="outer similarity"):
        structured_assignment([np.eye(4)], [2], np.eye(3))
    with pytest.raises(RebasinError, match="NaN or inf"):
        structured_assignment([np.full((4, 4), np.nan)], [2])


# ---------------------------------------------------------------------------------------- weight matching
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_matching_recovers_planted_structured_permutations(name, seed):
    _, spec, a = _case(name, seed)
    planted = random_permutation(spec, seed=seed + 10)
    b = permute(spec, planted, a)
    perms, info = weight_matching(spec, a, b, seed=seed, return_info=True)
    check_permutations(spec, perms, spec.sizes)
    back = permute(spec, perms, b)
    for k in a:
        torch.testing.assert_close(back[k], a[k], atol=0, rtol=0)
    assert all(torch.equal(perms[p], q) for p, q in invert(planted).items())
    assert info.converged and all(y >= x - 1e-6 * abs(x) for x, y in zip(info.objective, info.objective[1:]))
    if spec.structure:
        assert _outer_moves(spec, planted) and _outer_moves(spec, perms)  # heads / groups really moved


@pytest.mark.parametrize("name", sorted(CASES))
def test_weight_matching_with_noise_stays_structured_and_objective_is_true(name):
    _, spec, a = _case(name, 3)
    g = torch.Generator().manual_seed(0)
    b = permute(spec, random_permutation(spec, seed=5), a)
    b = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1 else v
         for k, v in b.items()}
    perms, info = weight_matching(spec, a, b, seed=1, return_info=True)
    check_permutations(spec, perms, spec.sizes)
    moved = permute(spec, perms, b)
    true = sum(float((a[k].double() * moved[k].double()).sum()) for k in a if a[k].is_floating_point()
               and any(p is not None for p in spec.axes[k]))
    assert info.objective[-1] == pytest.approx(true, rel=1e-5)
    start = permute(spec, {}, b)
    initial = sum(float((a[k].double() * start[k].double()).sum()) for k in a if a[k].is_floating_point()
                  and any(p is not None for p in spec.axes[k]))
    # float32 products summed in float64: an absolute tolerance too, the identity's objective may be near 0
    assert info.identity_objective == pytest.approx(initial, rel=1e-6, abs=1e-6) and true >= initial
    assert true >= info.initial_objective - 1e-6 * abs(info.initial_objective)


@pytest.mark.parametrize("name", ["mha", "gconv"])
def test_weight_matching_structured_is_deterministic_and_does_not_mutate(name):
    _, spec, a = _case(name, 4)
    b = permute(spec, random_permutation(spec, seed=2), a)
    b = {k: v + 0.5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) if v.is_floating_point() else v
         for k, v in b.items()}
    copies = {k: v.clone() for k, v in b.items()}
    r1 = weight_matching(spec, a, b, seed=7)
    r2 = weight_matching(spec, a, b, seed=7)
    assert all(torch.equal(r1[p], r2[p]) for p in r1)
    assert all(torch.equal(b[k], copies[k]) for k in b)
    slow = textbook(spec, a, b, seed=7)
    assert all(torch.equal(r1[p], slow[p]) for p in r1)


def test_weight_matching_gpt2_sized_heads_solves_only_head_sized_blocks(monkeypatch):
    """GPT-2-sized heads cost 2 x 144 within-head 64 x 64 solves and one 12 x 12 head solve a visit, never an
    assignment over all 768 units of QK or VO (counted, not timed: a timing limit fails on a busy machine)."""
    import rebasin.matching.assignment as assignment

    solved: list[tuple[int, int]] = []

    def recording(cost, *args, **kwargs):
        solved.append(tuple(cost.shape))
        return linear_sum_assignment(cost, *args, **kwargs)

    monkeypatch.setattr(assignment, "linear_sum_assignment", recording)
    e, h = 768, 12
    spec = _attn_spec(e, h)
    g = torch.Generator().manual_seed(0)
    a = {"inp.weight": torch.randn(e, 1024, generator=g), "inp.bias": torch.randn(e, generator=g),
         "attn.in_proj_weight": torch.randn(3 * e, e, generator=g), "attn.in_proj_bias": torch.randn(3 * e, generator=g),
         "attn.out_proj.weight": torch.randn(e, e, generator=g), "attn.out_proj.bias": torch.randn(e, generator=g),
         "out.weight": torch.randn(3, e, generator=g), "out.bias": torch.randn(3, generator=g)}
    spec = spec.with_sizes(a)
    planted = random_permutation(spec, seed=1)
    b = permute(spec, planted, a)
    perms, info = weight_matching(spec, a, b, n_iter=10, return_info=True)
    back = permute(spec, perms, b)
    assert all(torch.equal(back[k], a[k]) for k in a)
    assert info.converged
    visits = solved.count((h, h))  # one head assignment per visit of the heads
    assert visits >= 1
    assert set(solved) == {(h, h), (e // h, e // h), (e, e)}  # (e, e): the unstructured R, once a visit
    assert solved.count((e // h, e // h)) == 2 * h * h * visits and solved.count((e, e)) == visits


# ---------------------------------------------------------------------------------------- activation matching
def _grouped_mlp_spec() -> PermutationSpec:
    """An MLP whose first hidden layer is matched as 4 groups of 4 units (any structured permutation is valid)."""
    return PermutationSpec(
        {"0.weight": ("P0", None), "0.bias": ("P0",), "2.weight": ("P1", "P0"), "2.bias": ("P1",),
         "4.weight": (None, "P1"), "4.bias": (None,)},
        structure={"P0": ("G", 4)},
    )


def test_activation_matching_recovers_a_planted_structured_permutation():
    torch.manual_seed(0)
    model_a = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    spec = _grouped_mlp_spec().with_sizes(_state(model_a))
    planted = random_permutation(spec, seed=3)
    assert _outer_moves(spec, planted)
    model_b = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    model_b.load_state_dict(permute(spec, planted, _state(model_a)))
    x = torch.randn(128, 6, generator=torch.Generator().manual_seed(0))
    perms = activation_matching(model_a, model_b, [x[:64], x[64:]], spec=spec)
    check_permutations(spec, perms, spec.sizes)
    assert all(torch.equal(perms[p], q) for p, q in invert(planted).items())
    again = activation_matching(model_a, model_b, [x[:64], x[64:]], spec=spec)
    assert all(torch.equal(perms[p], again[p]) for p in perms)


def test_activation_matching_with_a_real_outer_permutation():
    model_a, spec, a = _case("outer", 1)
    planted = random_permutation(spec, seed=4)
    assert not torch.equal(planted["C"], torch.arange(4))
    model_b = _mlp()
    model_b.load_state_dict(permute(spec, planted, a))
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(0))
    perms = activation_matching(model_a, model_b, [x], spec=spec)
    check_permutations(spec, perms, spec.sizes)
    assert all(torch.equal(perms[p], q) for p, q in invert(planted).items())


def test_activation_matching_recovers_a_planted_permutation_through_a_cat():
    model_a, spec, a = _case("cat")
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    try:
        spec_from_model(model_a, x[:2])
    except RebasinError as err:  # a tracer that does not know torch.cat yet cannot find the activations
        pytest.skip(f"the tracer does not follow torch.cat: {err}")
    planted = random_permutation(spec, seed=3)
    model_b = _Cat()
    model_b.load_state_dict(permute(spec, planted, a))
    for s in (spec, None):
        perms = activation_matching(model_a, model_b, [x[:32], x[32:]], spec=s)
        back = permute(s or spec_from_model(model_a, x[:2]), perms, _state(model_b))
        assert all(torch.equal(back[k], a[k]) for k in a)


def test_activation_matching_reaches_the_units_inside_multihead_attention_with_a_hand_written_spec():
    # nn.MultiheadAttention computes q, k, v inside one module: their units are recomputed from its inputs,
    # and the hand-written spec's names (QK, VO, H) are found through the traced spec's axes
    model_a, spec, a = _case("mha", 0)
    planted = random_permutation(spec, seed=4)
    model_b = _Attn()
    model_b.load_state_dict(permute(spec, planted, a))
    x = torch.randn(48, 4, 5, generator=torch.Generator().manual_seed(1))
    perms = activation_matching(model_a, model_b, [x[:24], x[24:]], spec=spec)
    assert _outer_moves(spec, planted)
    assert all(torch.equal(perms[p], q) for p, q in invert(planted).items())


def test_activation_matching_says_which_matcher_to_use_when_the_trace_pins_the_units():
    class Nested(nn.Module):  # GroupNorm grouping a grouped convolution's channels otherwise: pinned by the tracer
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=4), nn.GroupNorm(2, 8),
                                     nn.ReLU(), nn.Conv2d(8, 2, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = Nested()
    axes = {k: (None,) * v.ndim for k, v in model.state_dict().items()}
    spec = PermutationSpec({**axes, "net.0.weight": ("P", None, None, None), "net.0.bias": ("P",)})
    with pytest.warns(RebasinWarning, match=r"- net\.0: 8 unit\(s\) pinned: net\.3 \(GroupNorm.*nested groups"):
        with pytest.raises(RebasinError, match=r"no activation node was found for permutation 'P'.*use weight_matching"):
            activation_matching(model, model, [torch.randn(4, 3, 5, 5)], spec=spec)


# ---------------------------------------------------------------------------------------- STE and OT
def test_ste_on_a_structured_spec_returns_structured_permutations():
    model_a, spec, a = _case("mha", 0)
    planted = random_permutation(spec, seed=2)
    model_b = _Attn()
    model_b.load_state_dict(permute(spec, planted, a))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    r1 = ste_matching(model_a, model_b, loader, spec=spec, epochs=1, lr=1e-3, select="best")
    r2 = ste_matching(model_a, model_b, loader, spec=spec, epochs=1, lr=1e-3, select="best")
    check_permutations(spec, r1, spec.sizes)
    assert all(torch.equal(r1[p], r2[p]) for p in r1)
    # the first step's projection is weight matching: exact on a planted B
    assert all(torch.equal(r1[p], q) for p, q in invert(planted).items())


@pytest.mark.parametrize("name, construct", [("mha", "structured permutations"), ("gconv", "grouped axes"),
                                             ("lstm", "concatenations"), ("cat", "concatenations")])
def test_ot_refuses_structured_specs(name, construct):
    _, spec, a = _case(name)
    with pytest.raises(RebasinError, match=f"ot_matching does not support.*{construct}.*weight_matching"):
        ot_matching(spec, a, a)


def test_ot_handles_one_permutation_on_two_axes():
    _, spec, a = _case("residual")
    planted = random_permutation(spec, seed=1)
    b = permute(spec, planted, a)
    perms = ot_matching(spec, a, b)
    assert torch.equal(perms["P"], invert(planted)["P"])
