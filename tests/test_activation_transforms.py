"""Activation matching with signed permutations and orthogonal maps (``activation_transform_matching``).

Planted pairs: B is A moved by a transform of its residual stream (an orthogonal map of the project's ViT
after ``fold_layernorm``, a signed permutation of a tiny Llama's stream) and random permutations of every other
class (heads, units inside heads, MLP units). Matching on activations recovers the inverse of the plant.
"""

from __future__ import annotations

import copy

import pytest
import torch
from builders import randomize_norms_, tiny_llama
from torch import nn
from torch.func import functional_call

import rebasin.matching.activation_transforms as at
from rebasin import RebasinError
from rebasin.apps.models import MLP, ViT
from rebasin.matching import activation_transform_matching
from rebasin.spec import (
    SignedPermutation,
    SymmetryKinds,
    apply_transforms,
    random_orthogonal,
    random_permutation,
    random_signed_permutation,
)
from rebasin.trace import fold_layernorm, hf_rules, llm_rules, symmetry_kinds, trace_model


def _planted(model: nn.Module, x: torch.Tensor, stream_transform, seed: int = 2):
    """``(trace, kinds, stream class, plant, model_b)`` with ``B = plant(A)``."""
    tr = trace_model(model, x[:2])
    kinds = symmetry_kinds(model, x[:2], trace=tr)
    stream = next(p for p, k in kinds.kinds.items() if k == "orthogonal")
    plant = dict(random_permutation(tr.spec, seed=seed))
    plant[stream] = stream_transform(tr.spec.sizes[stream])
    model_b = copy.deepcopy(model)
    model_b.load_state_dict(apply_transforms(tr.spec, plant, model.state_dict(), kinds=kinds))
    return tr, kinds, stream, plant, model_b


@pytest.fixture(scope="module")
def folded_vit() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ViT(image_size=8, patch_size=4, width=8, depth=2, heads=2).eval()
    randomize_norms_(model, seed=5)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    return fold_layernorm(model, x[:2]), x


def test_planted_orthogonal_stream_of_a_folded_vit_is_recovered(folded_vit):
    model, x = folded_vit
    tr, kinds, stream, plant, model_b = _planted(model, x, lambda n: random_orthogonal(n, seed=3))
    before = {k: v.clone() for k, v in model_b.state_dict().items()}
    found = activation_transform_matching(model, model_b, [x[:32], x[32:]], kinds=kinds, use={stream: "orthogonal"})
    assert set(found) == set(tr.spec.perms)
    torch.testing.assert_close(found[stream], plant[stream].T, atol=1e-4, rtol=0)
    for p in tr.spec.perms:
        if p != stream:
            assert torch.equal(found[p], torch.argsort(plant[p])), p
    back = apply_transforms(tr.spec, found, model_b.state_dict(), kinds=kinds)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back[k], v, atol=1e-4, rtol=1e-4, msg=k)
    with torch.no_grad():  # the transforms keep B's function
        torch.testing.assert_close(functional_call(model_b, back, (x,)), model_b(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model_b.state_dict().items())


def _llama() -> nn.Module:
    pytest.importorskip("transformers")
    return tiny_llama(vocab=40, hidden=16, intermediate=24, layers=1, positions=16)


try:  # the first trace of a transformers model registers these rules for good; here, for the conftest's guard
    import transformers  # noqa: F401 - imported to know whether the Llama test can run
except ImportError:  # pragma: no cover
    pass
else:
    hf_rules.register()
    llm_rules.register(_llama())


def test_planted_signed_stream_of_a_llama_is_recovered_exactly():
    model = _llama()
    x = torch.randint(0, 40, (32, 8), generator=torch.Generator().manual_seed(3))
    tr, kinds, stream, plant, model_b = _planted(model, x, lambda n: random_signed_permutation(n, seed=12), seed=11)
    found = activation_transform_matching(model, model_b, [x[:16], x[16:]], kinds=kinds)  # default: signed stream
    assert isinstance(found[stream], SignedPermutation)
    inv = torch.argsort(plant[stream].perm)
    assert torch.equal(found[stream].perm, inv)
    assert torch.equal(found[stream].signs, plant[stream].signs[inv])
    back = apply_transforms(tr.spec, found, model_b.state_dict(), kinds=kinds)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


class _LowRankStream(nn.Module):
    """A stream ``W x + b`` of width 6 from 2 inputs (it visits 3 of 6 directions), read by a scale-free RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(2, 6), nn.RMSNorm(6, elementwise_affine=False), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.inp(x)))


def test_directions_no_activation_visits_are_settled_by_the_weights(monkeypatch):
    torch.manual_seed(0)
    model, x = _LowRankStream(), torch.randn(64, 2)
    tr, kinds, stream, plant, model_b = _planted(model, x, lambda n: random_orthogonal(n, seed=4))
    use = {stream: "orthogonal"}
    found = activation_transform_matching(model, model_b, [x], kinds=kinds, use=use)
    torch.testing.assert_close(found[stream], plant[stream].T, atol=1e-4, rtol=0)
    monkeypatch.setattr(at, "_NULL_TOL", 0.0)  # without the completion the unvisited directions are left to chance
    loose = activation_transform_matching(model, model_b, [x], kinds=kinds, use=use)
    assert not torch.allclose(loose[stream], plant[stream].T, atol=1e-2)


def test_kinds_the_tracer_cannot_prove_legal_are_refused_by_module_and_op():
    torch.manual_seed(0)
    model, x = MLP(4, [8], 2), torch.randn(16, 4)
    with pytest.raises(RebasinError, match=r"class 'P0' admits transforms up to 'permutation', not 'orthogonal'.*ReLU"):
        activation_transform_matching(model, model, [x], use={"P0": "orthogonal"})
    with pytest.raises(RebasinError, match=r"unknown class 'Q'"):
        activation_transform_matching(model, model, [x], use={"Q": "signed"})
    with pytest.raises(RebasinError, match=r"kind must be one of"):
        activation_transform_matching(model, model, [x], use={"P0": "rotation"})
    with pytest.raises(RebasinError, match=r"kinds must be a SymmetryKinds"):
        activation_transform_matching(model, model, [x], kinds={"P0": "signed"})


def test_structured_classes_and_unfolded_scales_are_refused(folded_vit):
    model, x = folded_vit
    tr = trace_model(model, x[:2])
    head = next(iter(tr.spec.structure))
    permissive = SymmetryKinds({p: "orthogonal" for p in tr.spec.perms})
    with pytest.raises(RebasinError, match=rf"class '{head}' takes only permutations: it is structured"):
        activation_transform_matching(model, model, [x], kinds=permissive, use={head: "signed"})
    rms = nn.Sequential(nn.Linear(3, 6), nn.RMSNorm(6), nn.Linear(6, 2))
    with torch.no_grad():
        rms[1].weight.add_(torch.rand(6, generator=torch.Generator().manual_seed(0)))
    kinds = symmetry_kinds(rms, torch.randn(2, 3))
    with pytest.raises(RebasinError, match=r"norm scale that is not all ones; fold"):
        activation_transform_matching(rms, rms, [torch.randn(8, 3)], kinds=kinds, use={"P0": "orthogonal"})


class _RMSStream(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(3, 6), nn.RMSNorm(6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.inp(x)))


def test_default_kinds_are_derived_without_losing_a_one_shot_loader_s_batch():
    torch.manual_seed(0)
    model, x = _RMSStream(), torch.randn(64, 3)
    with torch.no_grad():
        model.norm.weight.add_(torch.rand(6, generator=torch.Generator().manual_seed(1)))
    tr, kinds, stream, plant, model_b = _planted(model, x, lambda n: random_signed_permutation(n, seed=5))
    found = activation_transform_matching(model, model_b, iter([x]))  # one batch, read by the kinds and the statistics
    back = apply_transforms(tr.spec, found, model_b.state_dict(), kinds=kinds)
    assert isinstance(found[stream], SignedPermutation)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
