"""Paths, REPAIR and merging on specs with structure, concatenations, grouped axes and P W P^T (issue 13)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from builders import cat_grouped, cat_grouped_spec
from torch import nn
from torch.testing import assert_close

from rebasin import PermutationSpec, RebasinError, interpolate, merge, permute, random_permutation, repair
from rebasin._common import state_of
from rebasin.paths import arc_interpolate, channel_stats, proximal_alternating_minimization
from rebasin.paths._repair_stats import producers
from rebasin.spec import check_permutations

pytestmark = pytest.mark.filterwarnings("ignore:sinkhorn did not converge")


# ----------------------------------------------------------------------------- a cat + grouped-conv net
def _data(n: int = 64, batch: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(n, 2, 5, 5, generator=g) + 0.3
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _model(seed: int, bn: bool = False) -> nn.Module:
    return cat_grouped(bn=bn, seed=seed)


def test_cat_grouped_hand_spec_is_exact():
    spec = cat_grouped_spec()
    spec.check(_model(0), _data()[0][0][:4])
    spec_bn = cat_grouped_spec(bn=True)
    spec_bn.check(_model(0, bn=True), _data()[0][0][:4])


def test_repair_cat_and_grouped_conv_moves_channel_stats_to_targets():
    data = _data()
    spec = cat_grouped_spec()
    a, b = _model(1), _model(2)
    sa, sb = state_of(a), state_of(b)
    plain, normed, _ = producers(a, spec)
    assert [p.name for p in plain] == ["a", "b", "m", "g"] and not normed
    ea, eb = channel_stats(a, sa, data, spec=spec), channel_stats(a, sb, data, spec=spec)
    t = 0.4
    out = repair(a, sa, sb, t, data, spec=spec)
    got = channel_stats(out, state_of(out), data, spec=spec)
    assert list(got) == ["a", "b", "m", "g"]
    for k in got:
        assert_close(got[k].mean, (1 - t) * ea[k].mean + t * eb[k].mean, atol=1e-5, rtol=1e-5)
        assert_close(got[k].std, (1 - t) * ea[k].std + t * eb[k].std, atol=1e-5, rtol=1e-5)


def test_repair_batchnorm_after_cat_normalises_the_parts_producers():
    spec = cat_grouped_spec(bn=True)
    a = _model(1, bn=True)
    plain, normed, bns = producers(a, spec)
    assert [p.name for p in normed] == ["a", "b"] and [p.name for p in plain] == ["m", "g"] and bns == {"norm"}
    data = _data()
    out = state_of(repair(a, state_of(a), state_of(_model(2, bn=True)), 0.5, data, spec=spec))
    mid = interpolate(state_of(a), state_of(_model(2, bn=True)), 0.5)
    assert torch.equal(out["a.weight"], mid["a.weight"]) and torch.equal(out["b.weight"], mid["b.weight"])
    assert not torch.allclose(out["g.weight"], mid["g.weight"])


def test_repair_of_a_permuted_copy_is_permutation_equivariant():
    """REPAIR between A and a permuted A equals REPAIR between A and A, permuted back (structure kept)."""
    data = _data()
    spec = cat_grouped_spec()
    a, b = _model(1), _model(2)
    sa, sb = state_of(a), state_of(b)
    perms = random_permutation(spec, seed=3, sizes=spec.validate(sa))
    pa, pb = permute(spec, perms, sa), permute(spec, perms, sb)
    out = state_of(repair(a, sa, sb, 0.5, data, spec=spec))
    out_p = state_of(repair(a, pa, pb, 0.5, data, spec=spec))
    want = permute(spec, perms, out)
    for k in out:
        assert_close(out_p[k], want[k], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- arc
def _orbit_mean(spec: PermutationSpec, key: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Brute force: the mean of permute(spec, p, state)[key] over every permutation p inside the spec's structure."""
    sizes = spec.validate(state)
    names = spec.perms
    total, count = torch.zeros_like(state[key]), 0
    for combo in itertools.product(*[itertools.permutations(range(sizes[n])) for n in names]):
        perms = {n: torch.tensor(c) for n, c in zip(names, combo)}
        try:
            check_permutations(spec, perms, sizes)
        except RebasinError:
            continue
        total, count = total + permute(spec, perms, state)[key], count + 1
    return total / count


ARC_CASES = {
    "pwpt": (PermutationSpec({"w": ("P", "P"), "b": ("P",)}), {"w": (3, 3), "b": (3,)}, "w"),
    "concat_with_fixed_part": (
        PermutationSpec({"a": ("P", None), "w": ("Q", "C")}, concat={"C": (("P", 3), (None, 2))}),
        {"a": (3, 2), "w": (2, 5)}, "w"),
    "lstm_gates": (
        PermutationSpec({"i": ("G", None), "h": ("G", "H")}, concat={"G": (("H", 3),) * 2}),
        {"i": (6, 2), "h": (6, 3)}, "h"),
    "grouped": (
        PermutationSpec({"w": ("O", "I", None), "b": ("O",)}, structure={"I": ("G", 2), "O": ("G", 2)},
                        grouped={("w", 1): 2}),
        {"w": (4, 2, 2), "b": (4,)}, "w"),
    "packed_heads": (
        PermutationSpec({"qkv": ("QKV", "R"), "o": ("R", "VO")}, structure={"QK": ("H", 2), "VO": ("H", 2)},
                        concat={"QKV": (("QK", 4), ("QK", 4), ("VO", 4))}),
        {"qkv": (12, 2), "o": (2, 4)}, "qkv"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ARC_CASES))
def test_arc_centre_is_the_orbit_mean(case):
    spec, shapes, key = ARC_CASES[case]
    g = torch.Generator().manual_seed(0)
    sa = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    sb = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    mu = 0.5 * (_orbit_mean(spec, key, sa) + _orbit_mean(spec, key, sb))
    # at t = 1/2 the arc is mu + (cos + sin)(pi/4) * (midpoint - mu)
    c = 2 ** 0.5 / 2
    want = mu + c * (sa[key] - mu) + c * (sb[key] - mu)
    assert_close(arc_interpolate(sa, sb, 0.5, spec=spec)[key], want)


def test_arc_is_permutation_equivariant_on_a_structured_spec():
    spec = cat_grouped_spec()
    sa, sb = state_of(_model(1)), state_of(_model(2))
    perms = random_permutation(spec, seed=5, sizes=spec.validate(sa))
    got = arc_interpolate(permute(spec, perms, sa), permute(spec, perms, sb), 0.3, spec=spec)
    want = permute(spec, perms, arc_interpolate(sa, sb, 0.3, spec=spec))
    for k in got:
        assert_close(got[k], want[k])


def test_arc_refuses_finer_orbits():
    spec = PermutationSpec({"w": ("P", "P")}, structure={"P": ("H", 2)})
    s = {"w": torch.randn(4, 4)}
    with pytest.raises(RebasinError, match="acts on 2 axes of 'w' and is structured"):
        arc_interpolate(s, s, 0.5, spec=spec)
    spec = PermutationSpec({"w": ("A", "B"), "v": ("A",), "u": ("B",)}, structure={"A": ("H", 2), "B": ("H", 1)})
    with pytest.raises(RebasinError, match="share an outer"):
        arc_interpolate({"w": torch.randn(4, 2), "v": torch.randn(4), "u": torch.randn(2)},
                        {"w": torch.randn(4, 2), "v": torch.randn(4), "u": torch.randn(2)}, 0.5, spec=spec)


# ----------------------------------------------------------------------------- attention: merge / interpolate
class Attn(nn.Module):
    def __init__(self, e: int = 8, h: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(e, h, batch_first=True)
        self.head = nn.Linear(e, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x + self.attn(x, x, x)[0]).mean(1))


def attn_spec(e: int = 8, h: int = 2) -> PermutationSpec:
    return PermutationSpec(
        {
            "attn.in_proj_weight": ("QKV", None), "attn.in_proj_bias": ("QKV",),
            "attn.out_proj.weight": (None, "VO"), "attn.out_proj.bias": (None,),
            "head.weight": (None, None), "head.bias": (None,),
        },
        structure={"QK": ("H", e // h), "VO": ("H", e // h)},
        concat={"QKV": (("QK", e), ("QK", e), ("VO", e))},
    )  # fmt: skip


def test_merge_attention_with_sinkhorn_undoes_a_planted_structured_permutation():
    torch.manual_seed(0)
    a = Attn()
    spec = attn_spec()
    x = torch.randn(2, 5, 8)
    spec.check(a, x)
    sa = state_of(a)
    planted = random_permutation(spec, seed=1, sizes=spec.validate(sa))
    b = copy.deepcopy(a)
    b.load_state_dict(permute(spec, planted, sa))
    merged, info = merge([a, b], method="sinkhorn", spec=spec, repair=False, return_info=True,
                         cost="l2", fit={"steps": 150, "lr": 0.1})
    check_permutations(spec, info.perms[1])
    for k, v in sa.items():
        assert_close(merged.state_dict()[k], v, atol=1e-5, rtol=1e-5)
    # interpolating A with the aligned B stays on A (B is A up to the planted permutation)
    aligned = info.alignments[1].state_b
    mid = interpolate(sa, aligned, 0.5)
    assert_close(mid["attn.in_proj_weight"], sa["attn.in_proj_weight"], atol=1e-5, rtol=1e-5)


def test_repair_refuses_attention_out_proj_clearly():
    torch.manual_seed(0)
    e = 8
    a, b = Attn(e), Attn(e)
    spec = PermutationSpec(
        {
            "attn.in_proj_weight": ("QKV", "R"), "attn.in_proj_bias": ("QKV",),
            "attn.out_proj.weight": ("R", "VO"), "attn.out_proj.bias": ("R",),
            "head.weight": (None, "R"), "head.bias": (None,),
        },
        structure={"QK": ("H", 4), "VO": ("H", 4)},
        concat={"QKV": (("QK", e), ("QK", e), ("VO", e))},
    )  # fmt: skip
    data = [(torch.randn(4, 5, e), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(RebasinError, match="MultiheadAttention"):
        repair(a, state_of(a), state_of(b), 0.5, data, spec=spec)


def test_pam_refuses_structured_specs():
    torch.manual_seed(0)
    a, b = Attn(), Attn()
    with pytest.raises(RebasinError, match="structures"):
        proximal_alternating_minimization(a, state_of(a), state_of(b), [(torch.randn(2, 5, 8), torch.zeros(2).long())],
                                          spec=attn_spec(), init="identity")
