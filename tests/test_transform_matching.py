"""Weight matching with signed permutations and orthogonal maps (``rebasin.matching.generalized``).

A Llama-style model from a tiny ``transformers`` config, B made from A by planted transforms: a signed
permutation (or, after folding the RMSNorm scales, an orthogonal map) of the residual stream and random
permutations of every other class (attention heads, MLP units). Matching recovers the inverse of the plant.
"""

from __future__ import annotations

import pytest
import torch
from builders import tiny_llama
from torch import nn

from rebasin import PermutationSpec, RebasinError, weight_matching
from rebasin.matching import transform_matching
from rebasin.spec import (
    SignedPermutation,
    SymmetryKinds,
    apply_transforms,
    fold_rmsnorm,
    random_orthogonal,
    random_permutation,
    random_signed_permutation,
    transform_matrix,
)
from rebasin.trace import hf_rules, llm_rules, symmetry_kinds, trace_model

VOCAB = 50


T = pytest.importorskip("transformers")


def _llama() -> nn.Module:
    return tiny_llama(vocab=VOCAB)


hf_rules.register()  # the first trace registers these rules for good; here, for the conftest's guard
llm_rules.register(_llama())


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, object, SymmetryKinds]:
    model = _llama()
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    tr = trace_model(model, x)
    return model, tr, symmetry_kinds(model, x, trace=tr)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_planted_signed_stream_recovered_exactly(llama: tuple) -> None:
    model, tr, kinds = llama
    spec = tr.spec
    a = _state(model)
    p = spec.axes["model.norm.weight"][0]
    plant = dict(random_permutation(spec, seed=11))
    plant[p] = random_signed_permutation(spec.sizes[p], seed=12)
    b = apply_transforms(spec, plant, a, kinds=kinds)
    before = {k: v.clone() for k, v in b.items()}
    before_a = {k: v.clone() for k, v in a.items()}
    found = transform_matching(spec, a, b, kinds=kinds)
    assert all(torch.equal(a[k], before_a[k]) for k in a)
    assert set(found) == set(spec.perms)
    assert isinstance(found[p], SignedPermutation)
    back = apply_transforms(spec, found, b, kinds=kinds)
    for k in a:
        torch.testing.assert_close(back[k], a[k], rtol=0, atol=1e-6)
    # the stream's answer is exactly the inverse of the plant
    inv = transform_matrix(plant[p]).T
    torch.testing.assert_close(transform_matrix(found[p]), inv, rtol=0, atol=0)
    for k in b:  # inputs not mutated
        assert torch.equal(b[k], before[k])


def test_planted_orthogonal_stream_recovered(llama: tuple) -> None:
    model, tr, kinds = llama
    spec = tr.spec
    a = fold_rmsnorm(spec, _state(model), kinds)
    p = spec.axes["model.norm.weight"][0]
    q = random_orthogonal(spec.sizes[p], seed=13, dtype=torch.float64).float()
    plant = dict(random_permutation(spec, seed=14))
    plant[p] = q
    b = apply_transforms(spec, plant, a, kinds=kinds)
    found = transform_matching(spec, a, b, kinds=kinds, use={p: "orthogonal"})
    assert (found[p] - q.T).abs().max() < 1e-4
    back = apply_transforms(spec, found, b, kinds=kinds)
    for k in a:
        torch.testing.assert_close(back[k], a[k], rtol=1e-4, atol=1e-4)
    # a permutation-only match cannot undo a rotation: the signed answer leaves a gap
    signed = transform_matching(spec, a, b, kinds=kinds, use={p: "signed"}, n_iter=3)
    gap = apply_transforms(spec, signed, b, kinds=kinds)["model.embed_tokens.weight"] - a["model.embed_tokens.weight"]
    assert gap.abs().max() > 1e-2


def test_orthogonal_needs_folded_scales(llama: tuple) -> None:
    model, tr, kinds = llama
    p = tr.spec.axes["model.norm.weight"][0]
    a = _state(model)
    with pytest.raises(RebasinError, match="fold"):
        transform_matching(tr.spec, a, a, kinds=kinds, use={p: "orthogonal"})


def test_refusals() -> None:
    spec = PermutationSpec({"w1": ("P", None), "b1": ("P",), "w2": (None, "P")}, sizes={"P": 3})
    g = torch.Generator().manual_seed(0)
    a = {"w1": torch.randn(3, 2, generator=g), "b1": torch.randn(3, generator=g), "w2": torch.randn(1, 3, generator=g)}
    none = SymmetryKinds({}, reasons={"P": "GELU after module '0'"})
    with pytest.raises(RebasinError, match="GELU after module '0'"):
        transform_matching(spec, a, a, kinds=none, use={"P": "orthogonal"})
    with pytest.raises(RebasinError, match="unknown class"):
        transform_matching(spec, a, a, kinds=none, use={"Q": "signed"})
    with pytest.raises(RebasinError, match="kind must be one of"):
        transform_matching(spec, a, a, kinds=none, use={"P": "rotation"})
    with pytest.raises(RebasinError, match="n_iter"):
        transform_matching(spec, a, a, kinds=none, n_iter=-1)
    with pytest.raises(RebasinError, match=r"start must be one of .*'weight_matching'.*got 'cold'"):
        transform_matching(spec, a, a, kinds=none, start="cold")
    # no class admits more than a permutation: plain weight matching
    perm = torch.tensor([2, 0, 1])
    b = apply_transforms(spec, {"P": perm}, a)
    found = transform_matching(spec, a, b, kinds=none)
    assert torch.equal(found["P"], torch.argsort(perm))


def _objective(spec: PermutationSpec, kinds: SymmetryKinds, a: dict, b: dict, found: dict) -> float:
    moved = apply_transforms(spec, found, b, kinds=kinds)
    return sum(float((a[k].double() * moved[k].double()).sum()) for k in a if a[k].is_floating_point())


def test_default_start_is_never_below_weight_matching(llama: tuple) -> None:
    # two independent inits: from the identity (start="identity", the only start before) the ascent on this pair
    # ends below weight matching's objective; the default starts from weight matching and keeps the better
    model, tr, kinds = llama
    spec = tr.spec
    a, b = _state(model), _state(tiny_llama(vocab=VOCAB, seed=1, norm_seed=11))
    p = spec.axes["model.norm.weight"][0]
    wm = _objective(spec, kinds, a, b, weight_matching(spec, a, b))
    cold = _objective(spec, kinds, a, b, transform_matching(spec, a, b, kinds=kinds, start="identity"))
    assert cold < wm - 1e-2  # the defect the default start removes
    found = transform_matching(spec, a, b, kinds=kinds)
    assert isinstance(found[p], SignedPermutation)
    assert _objective(spec, kinds, a, b, found) >= wm
    # folded, with an orthogonal stream
    fa, fb = fold_rmsnorm(spec, a, kinds), fold_rmsnorm(spec, b, kinds)
    ortho = transform_matching(spec, fa, fb, kinds=kinds, use={p: "orthogonal"})
    assert _objective(spec, kinds, fa, fb, ortho) >= _objective(spec, kinds, fa, fb, weight_matching(spec, fa, fb))
    # n_iter=0 returns the start: weight matching's permutations as transforms of each class's kind
    start = transform_matching(spec, a, b, kinds=kinds, n_iter=0)
    perms = weight_matching(spec, a, b)
    assert torch.equal(start[p].perm, perms[p]) and bool((start[p].signs == 1).all())
    assert all(torch.equal(start[q], perms[q]) for q in spec.perms if q != p)

