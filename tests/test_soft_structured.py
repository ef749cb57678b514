"""Soft structured permutations: soft_permute on structure / concat / grouped / P W P^T specs,
structured_matrix, and Sinkhorn re-basin learning permutations inside their structure (issue 13)."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import cat_grouped, cat_grouped_spec
from torch import nn
from torch.testing import assert_close

from rebasin import PermutationSpec, RebasinError, SinkhornRebasin, invert, permute, random_permutation
from rebasin.matching import sinkhorn
from rebasin.spec import (
    check_permutations,
    join_structured,
    perm_to_matrix,
    soft_permute,
    split_structured,
    structured_matrix,
)

pytestmark = pytest.mark.filterwarnings("ignore:sinkhorn did not converge")


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _mha_spec(e: int, h: int, prefix: str = "") -> PermutationSpec:
    d = e // h
    return PermutationSpec(
        {
            f"{prefix}in_proj_weight": ("QKV", "R"),
            f"{prefix}in_proj_bias": ("QKV",),
            f"{prefix}out_proj.weight": ("R", "VO"),
            f"{prefix}out_proj.bias": ("R",),
        },
        structure={"QK": ("H", d), "VO": ("H", d)},
        concat={"QKV": (("QK", e), ("QK", e), ("VO", e))},
    )


def _lstm_case():
    torch.manual_seed(3)
    hid = 5
    lstm = nn.LSTM(4, hid, batch_first=True).double()
    spec = PermutationSpec(
        {"weight_ih_l0": ("G", None), "weight_hh_l0": ("G", "H"), "bias_ih_l0": ("G",), "bias_hh_l0": ("G",)},
        concat={"G": (("H", hid),) * 4},
    )
    return spec, _state(lstm)


def _grouped_case():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 9, 3, groups=3).double()
    spec = PermutationSpec(
        {"weight": ("O", "I", None, None), "bias": ("O",)},
        structure={"I": ("G", 2), "O": ("G", 3)},
        grouped={("weight", 1): 3},
    )
    return spec, _state(conv)


def _depthwise_case():
    """A real outer: conv (P) -> depthwise conv with channel multiplier 2 (Q = (P, 2)) -> 1x1 conv."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Conv2d(3, 6, 3, groups=3), nn.Conv2d(6, 2, 1)).double()
    spec = PermutationSpec(
        {
            "0.weight": ("P", None, None, None), "0.bias": ("P",),
            "1.weight": ("Q", None, None, None), "1.bias": ("Q",),
            "2.weight": (None, "Q", None, None), "2.bias": (None,),
        },
        structure={"Q": ("P", 2)},
    )  # fmt: skip
    return spec, _state(net), net


def _pwpt_case():
    torch.manual_seed(2)
    return PermutationSpec({"weight": ("P", "P"), "bias": ("P",)}), _state(nn.Linear(6, 6).double())


def _mha_case():
    torch.manual_seed(0)
    return _mha_spec(12, 3), _state(nn.MultiheadAttention(12, 3).double())


CASES = {"mha": _mha_case, "lstm": _lstm_case, "grouped": _grouped_case, "depthwise": lambda: _depthwise_case()[:2],
         "pwpt": _pwpt_case}


def _hard_matrices(spec: PermutationSpec, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flat matrices of hard perms, structured ones built through structured_matrix (outer, inner)."""
    out = {}
    for name, p in perms.items():
        if name in spec.structure:
            outer, inner = split_structured(p, spec.structure[name][1])
            out[name] = structured_matrix(
                perm_to_matrix(outer, dtype=torch.float64),
                torch.stack([perm_to_matrix(r, dtype=torch.float64) for r in inner]),
            )
        else:
            out[name] = perm_to_matrix(p, dtype=torch.float64)
    return out


# ----------------------------------------------------------------------------- structured_matrix
def test_structured_matrix_of_hard_perms_is_the_joined_permutation():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        outer = torch.randperm(4, generator=g)
        inner = torch.stack([torch.randperm(3, generator=g) for _ in range(4)])
        s = structured_matrix(perm_to_matrix(outer), torch.stack([perm_to_matrix(r) for r in inner]))
        assert torch.equal(s, perm_to_matrix(join_structured(outer, inner)))


def test_structured_matrix_is_doubly_stochastic_and_structured():
    g = torch.Generator().manual_seed(1)
    outer = sinkhorn(torch.randn(3, 3, generator=g, dtype=torch.float64), n_iter=300, tol=None)
    inner = sinkhorn(torch.randn(3, 4, 4, generator=g, dtype=torch.float64), n_iter=300, tol=None)
    s = structured_matrix(outer, inner)
    assert s.shape == (12, 12) and bool((s >= 0).all())
    assert_close(s.sum(0), torch.ones(12, dtype=torch.float64))
    assert_close(s.sum(1), torch.ones(12, dtype=torch.float64))
    blocks = s.reshape(3, 4, 3, 4)
    for a in range(3):
        for b in range(3):
            assert_close(blocks[a, :, b, :], outer[a, b] * inner[a])


@pytest.mark.parametrize("args, match", [
    ((torch.eye(2), torch.eye(2)), "inner must have shape"),
    ((torch.eye(2), torch.ones(3, 2, 2)), r"\(2, d, d\)"),
    ((torch.ones(2, 3), torch.ones(2, 2, 2)), "outer must have shape"),
    ((torch.eye(2, dtype=torch.long), torch.ones(2, 2, 2)), "floating"),
    (([[1.0]], torch.ones(1, 1, 1)), "two tensors"),
])  # fmt: skip
def test_structured_matrix_errors(args, match):
    with pytest.raises(RebasinError, match=match):
        structured_matrix(*args)


# ----------------------------------------------------------------------------- soft_permute
@pytest.mark.parametrize("case", sorted(CASES))
def test_hard_structured_matrices_equal_permute(case):
    spec, state = CASES[case]()
    sizes = spec.validate(state)
    for seed in range(3):
        perms = random_permutation(spec, seed=seed, sizes=sizes)
        want = permute(spec, perms, state)
        for mats in (_hard_matrices(spec, perms), {k: perm_to_matrix(p, dtype=torch.float64) for k, p in perms.items()}):
            got = soft_permute(spec, mats, state)
            for k in state:
                assert torch.equal(got[k], want[k]), (case, k)


def test_soft_permute_concat_is_the_block_diagonal_of_its_parts():
    spec, state = _lstm_case()
    g = torch.Generator().manual_seed(0)
    m = sinkhorn(torch.randn(5, 5, generator=g, dtype=torch.float64), n_iter=300, tol=None)
    got = soft_permute(spec, {"H": m}, state)
    big = torch.block_diag(m, m, m, m)
    assert_close(got["weight_ih_l0"], big @ state["weight_ih_l0"])
    assert_close(got["weight_hh_l0"], big @ state["weight_hh_l0"] @ m.T)
    assert_close(got["bias_hh_l0"], big @ state["bias_hh_l0"])


def test_soft_permute_concat_with_identity_part_and_blocks():
    spec = PermutationSpec({"a": ("P", None), "w": (None, "C")}, concat={"C": (("P", 3), (None, 2))},
                           blocks={("w", 1): 2})
    state = {"a": torch.randn(3, 2, dtype=torch.float64), "w": torch.randn(4, 10, dtype=torch.float64)}
    m = sinkhorn(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), n_iter=300, tol=None)
    got = soft_permute(spec, {"P": m}, state)
    big = torch.block_diag(torch.kron(m, torch.eye(2, dtype=torch.float64)), torch.eye(4, dtype=torch.float64))
    assert_close(got["w"], state["w"] @ big.T)


def test_soft_permute_pwpt_contracts_both_axes():
    spec, state = _pwpt_case()
    m = sinkhorn(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), n_iter=300, tol=None)
    got = soft_permute(spec, {"P": m}, state)
    assert_close(got["weight"], m @ state["weight"] @ m.T)
    assert_close(got["bias"], m @ state["bias"])


def test_soft_grouped_axis_mixes_each_group_once():
    """W'_a = sum_b Sigma[a, b] T^O_a W_b (T^I_a)^T for the grouped weight's diagonal blocks."""
    spec, state = _grouped_case()
    g = torch.Generator().manual_seed(2)
    sig = sinkhorn(torch.randn(3, 3, generator=g, dtype=torch.float64), n_iter=300, tol=None)
    t_o = sinkhorn(torch.randn(3, 3, 3, generator=g, dtype=torch.float64), n_iter=300, tol=None)
    t_i = sinkhorn(torch.randn(3, 2, 2, generator=g, dtype=torch.float64), n_iter=300, tol=None)
    got = soft_permute(spec, {"O": structured_matrix(sig, t_o), "I": structured_matrix(sig, t_i)}, state)
    w = state["weight"].reshape(3, 3, 2, 3, 3)  # (group, row in group, in-channel in group, kh, kw)
    want = torch.einsum("ab,aij,bjkxy,alk->ailxy", sig, t_o, w, t_i).reshape(9, 2, 3, 3)
    assert_close(got["weight"], want)


def test_soft_permute_structure_errors():
    spec, state = _mha_case()
    sizes = spec.validate(state)
    mats = _hard_matrices(spec, random_permutation(spec, seed=0, sizes=sizes))
    with pytest.raises(RebasinError, match="but not 'VO'"):
        soft_permute(spec, {"QK": mats["QK"]}, state)
    with pytest.raises(RebasinError, match="virtual outer"):
        soft_permute(spec, {**mats, "H": torch.eye(3, dtype=torch.float64)}, state)
    with pytest.raises(RebasinError, match="concatenation"):
        soft_permute(spec, {"QKV": torch.eye(36, dtype=torch.float64)}, state)
    with pytest.raises(RebasinError, match="structured_matrix"):
        soft_permute(spec, {**mats, "QK": torch.eye(4, dtype=torch.float64).expand(3, 4, 4)}, state)


def test_soft_permute_structured_does_not_mutate_and_gradients_reach_everything():
    spec, state = _mha_case()
    before = {k: v.clone() for k, v in state.items()}
    g = torch.Generator().manual_seed(3)
    sig = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    tq = torch.randn(3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    tv = torch.randn(3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = state["in_proj_weight"].clone().requires_grad_()
    s_sig = sinkhorn(sig)
    out = soft_permute(spec, {"QK": structured_matrix(s_sig, sinkhorn(tq)), "VO": structured_matrix(s_sig, sinkhorn(tv))},
                       {**state, "in_proj_weight": w})
    sum(v.pow(2).sum() for v in out.values()).backward()
    for t in (sig, tq, tv, w):
        assert t.grad is not None and bool(t.grad.abs().sum() > 0)
    assert all(torch.equal(state[k], before[k]) for k in state)


@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
def test_gradcheck_structured_soft_permutation_through_sinkhorn(grad):
    """float64 gradcheck of logits -> Sinkhorn (batched inner) -> structured_matrix -> soft_permute."""
    torch.manual_seed(4)
    e, h = 4, 2
    spec = _mha_spec(e, h)
    state = _state(nn.MultiheadAttention(e, h).double())
    g = torch.Generator().manual_seed(5)
    sig = (0.5 * torch.randn(h, h, generator=g, dtype=torch.float64)).requires_grad_()
    tq = (0.5 * torch.randn(h, 2, 2, generator=g, dtype=torch.float64)).requires_grad_()
    tv = (0.5 * torch.randn(h, 2, 2, generator=g, dtype=torch.float64)).requires_grad_()
    probe = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in state.items()}

    def f(sig, tq, tv):
        kw = {"grad": grad, "n_iter": 300, "tol": None}
        s = sinkhorn(sig, **kw)
        out = soft_permute(spec, {"QK": structured_matrix(s, sinkhorn(tq, **kw)),
                                  "VO": structured_matrix(s, sinkhorn(tv, **kw))}, state)
        return sum((out[k] * probe[k]).sum() for k in out)

    assert torch.autograd.gradcheck(f, (sig, tq, tv), eps=1e-6, atol=1e-7)


def test_gradcheck_soft_grouped_axis():
    spec, state = _grouped_case()
    g = torch.Generator().manual_seed(6)
    sig = sinkhorn(torch.randn(3, 3, generator=g, dtype=torch.float64), n_iter=300, tol=None).requires_grad_()
    t_o = sinkhorn(torch.randn(3, 3, 3, generator=g, dtype=torch.float64), n_iter=300, tol=None).requires_grad_()
    t_i = sinkhorn(torch.randn(3, 2, 2, generator=g, dtype=torch.float64), n_iter=300, tol=None).requires_grad_()
    w = state["weight"].clone().requires_grad_()

    def f(sig, t_o, t_i, w):
        out = soft_permute(spec, {"O": structured_matrix(sig, t_o), "I": structured_matrix(sig, t_i)},
                           {**state, "weight": w})
        return out["weight"], out["bias"]

    assert torch.autograd.gradcheck(f, (sig, t_o, t_i, w))


# ----------------------------------------------------------------------------- Sinkhorn re-basin
class _Attn(nn.Module):
    def __init__(self, e: int, h: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(e, h, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x, x, x)[0]


def _planted_attention(seed: int, e: int = 8, h: int = 2):
    torch.manual_seed(seed)
    a = _Attn(e, h)
    spec = _mha_spec(e, h, prefix="attn.")
    sa = _state(a)
    planted = random_permutation(spec, seed=seed + 100, sizes=spec.validate(sa))
    b = copy.deepcopy(a)
    b.load_state_dict(permute(spec, planted, sa))
    return a, b, spec, planted


def test_sinkhorn_logits_follow_the_structure():
    a, b, spec, _ = _planted_attention(0)
    sr = SinkhornRebasin(a, b, spec=spec, cost="l2")
    shapes = {k: tuple(v.shape) for k, v in sr.logits.items()}
    assert shapes == {"H": (2, 2), "QK": (2, 4, 4), "VO": (2, 4, 4), "R": (8, 8)}
    mats = sr.soft_matrices()
    assert set(mats) == {"QK", "VO", "R"} and mats["QK"].shape == (8, 8)
    assert_close(mats["QK"].sum(0), torch.ones(8), atol=1e-4, rtol=0)
    assert_close(mats["QK"].sum(1), torch.ones(8), atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sinkhorn_l2_recovers_a_planted_structured_permutation(seed):
    a, b, spec, planted = _planted_attention(seed)
    sr = SinkhornRebasin(a, b, spec=spec, cost="l2", seed=seed)
    sr.fit(steps=150, lr=0.1)
    hp = sr.hard_permutations()
    check_permutations(spec, hp)
    truth = invert(planted)
    assert all(torch.equal(hp[k], truth[k]) for k in truth)
    aligned = sr.aligned_state_dict()
    for k, v in a.state_dict().items():
        assert_close(aligned[k], v)
    assert sr.history[-1] < 1e-2 < sr.history[0]


def test_sinkhorn_structured_seeded_runs_repeat_and_random_init_is_structured():
    a, b, spec, _ = _planted_attention(3)
    runs = []
    for _ in range(2):
        sr = SinkhornRebasin(a, b, spec=spec, cost="l2", init="random", seed=7)
        start = sr.hard_permutations()
        check_permutations(spec, start)
        sr.fit(steps=20, lr=0.1)
        runs.append((start, sr.history, {k: v.detach().clone() for k, v in sr.logits.items()}))
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in runs[0][2])


def test_sinkhorn_real_outer_depthwise():
    """A real outer permutation (depthwise multiplier): its logits are shared with its member's outer part."""
    spec, sa, net = _depthwise_case()
    net = net.float()
    sa = _state(net)
    planted = random_permutation(spec, seed=11, sizes=spec.validate(sa))
    b = copy.deepcopy(net)
    b.load_state_dict(permute(spec, planted, sa))
    sr = SinkhornRebasin(net, b, spec=spec, cost="l2", seed=0)
    assert {k: tuple(v.shape) for k, v in sr.logits.items()} == {"P": (3, 3), "Q": (3, 2, 2)}
    sr.fit(steps=150, lr=0.1)
    hp = sr.hard_permutations()
    check_permutations(spec, hp)
    truth = invert(planted)
    assert all(torch.equal(hp[k], truth[k]) for k in truth)


@pytest.mark.parametrize("seed", [0, 1])
def test_sinkhorn_l2_recovers_a_planted_permutation_through_cat_and_grouped_conv(seed):
    a = cat_grouped(seed=seed)
    spec = cat_grouped_spec()
    sa = _state(a)
    planted = random_permutation(spec, seed=seed + 10, sizes=spec.validate(sa))
    b = copy.deepcopy(a)
    b.load_state_dict(permute(spec, planted, sa))
    sr = SinkhornRebasin(a, b, spec=spec, cost="l2", seed=seed)
    assert tuple(sr.logits["G"].shape) == (2, 2) and tuple(sr.logits["R"].shape) == (2, 3, 3)
    sr.fit(steps=150, lr=0.1)
    hp = sr.hard_permutations()
    check_permutations(spec, hp)
    truth = invert(planted)
    assert all(torch.equal(hp[k], truth[k]) for k in truth)


def test_sinkhorn_weight_matching_init_must_respect_the_structure(monkeypatch):
    """A warm start outside the structure is refused with the reason (not a shape error later)."""
    import rebasin.matching.sinkhorn_rebasin as sr_mod

    a, b, spec, _ = _planted_attention(0)

    def broken(spec, state_a, state_b, seed=0):
        return {p: torch.roll(torch.arange(n), 1) for p, n in spec.validate(state_a).items()}  # crosses heads

    monkeypatch.setattr(sr_mod, "weight_matching", broken)
    with pytest.raises(RebasinError, match="outside the spec's structure"):
        SinkhornRebasin(a, b, spec=spec, cost="l2", init="weight_matching")
