"""Signed permutations and orthogonal maps of a class (``rebasin.spec.transforms``, ``rebasin.trace.symmetry``).

A Llama-family model from a tiny ``transformers`` config computes the same logits after a random signed
permutation of its residual stream, and after a random orthogonal map of the stream once its RMSNorm scales
are folded into their readers; units behind an elementwise function (GELU, SwiGLU) and attention heads stay
permutations, and asking for more is refused with the module and the op.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from rebasin import PermutationSpec, RebasinError
from rebasin.spec import (
    SignedPermutation,
    SymmetryKinds,
    apply_transforms,
    fold_rmsnorm,
    kind_of,
    random_orthogonal,
    random_permutation,
    random_signed_permutation,
    transform_matrix,
)
from rebasin.trace import hf_rules, llm_rules, symmetry_kinds, trace_model

VOCAB = 50


def _llama(seed: int = 0, **extra: object) -> nn.Module:
    T = pytest.importorskip("transformers")
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, **extra)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = T.LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random norm scales, so that a wrong treatment of them shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return model


_X = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))

if importlib.util.find_spec("transformers") is not None:  # the first trace registers the attention rule for good;
    hf_rules.register()
    llm_rules.register(_llama())  # here, so that the conftest's registry guard sees it before any test


def _logits(model: nn.Module, state: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return functional_call(model, state, (_X,), tie_weights=False).logits


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, object, SymmetryKinds]:
    model = _llama(mlp_bias=True)
    tr = trace_model(model, _X)
    return model, tr, symmetry_kinds(model, _X, trace=tr)


def _stream(tr: object) -> str:
    return tr.spec.axes["model.norm.weight"][0]  # type: ignore[attr-defined]  # any transform result: typed object to stay generic


def test_llama_kinds(llama: tuple) -> None:
    _, tr, kinds = llama
    p = _stream(tr)
    assert kinds.kinds[p] == "orthogonal"
    assert set(kinds.scales[p]) == {k for k in tr.spec.axes if k.endswith("norm.weight")}
    assert kinds.readers["model.norm.weight"] == ("lm_head.weight",)
    mlp = tr.spec.axes["model.layers.0.mlp.gate_proj.weight"][0]
    assert kinds.kinds[mlp] == "permutation" and "silu" in kinds.reasons[mlp]
    heads = tr.spec.axes["model.layers.0.self_attn.q_proj.weight"][0]
    assert kinds.kinds[heads] == "permutation" and "structured" in kinds.reasons[heads]


def test_llama_signed_permutation_is_equivalent(llama: tuple) -> None:
    model, tr, kinds = llama
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    p = _stream(tr)
    transforms = dict(random_permutation(tr.spec, seed=4))
    transforms[p] = random_signed_permutation(tr.spec.sizes[p], seed=5)
    out = apply_transforms(tr.spec, transforms, state, kinds=kinds)
    torch.testing.assert_close(_logits(model, out), _logits(model, state), atol=1e-4, rtol=1e-4)
    for k in state:  # input not mutated
        torch.testing.assert_close(state[k], before[k], rtol=0, atol=0)
    # the norm scales moved without signs, the embedding with them
    sp = transforms[p]
    torch.testing.assert_close(out["model.norm.weight"], state["model.norm.weight"][sp.perm])
    torch.testing.assert_close(out["model.embed_tokens.weight"],
                               state["model.embed_tokens.weight"][:, sp.perm] * sp.signs)
    # flipping the norm scales' signs too would break the function: the test can fail
    wrong = dict(out)
    wrong["model.norm.weight"] = out["model.norm.weight"] * sp.signs
    assert not torch.allclose(_logits(model, wrong), _logits(model, state), atol=1e-3)


def test_llama_orthogonal_stream_after_fold(llama: tuple) -> None:
    model, tr, kinds = llama
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    p = _stream(tr)
    q = random_orthogonal(tr.spec.sizes[p], seed=6)
    with pytest.raises(RebasinError, match="fold_rmsnorm"):
        apply_transforms(tr.spec, {p: q}, state, kinds=kinds)
    before = {k: v.clone() for k, v in state.items()}
    folded = fold_rmsnorm(tr.spec, state, kinds)
    assert all(torch.equal(state[k], before[k]) for k in state)  # not mutated
    torch.testing.assert_close(_logits(model, folded), _logits(model, state), atol=1e-5, rtol=1e-5)
    assert all(bool((folded[k] == 1).all()) for k in kinds.scales[p])
    transforms = dict(random_permutation(tr.spec, seed=7))
    transforms[p] = q
    out = apply_transforms(tr.spec, transforms, folded, kinds=kinds)
    torch.testing.assert_close(_logits(model, out), _logits(model, state), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out["model.embed_tokens.weight"], folded["model.embed_tokens.weight"])
    # the inverse map takes the weights back
    back = apply_transforms(tr.spec, {p: q.T.contiguous()}, out, kinds=kinds)
    torch.testing.assert_close(back["lm_head.weight"], apply_transforms(tr.spec, {k: v for k, v in transforms.items()
                                                                              if k != p}, folded)["lm_head.weight"],
                               atol=1e-5, rtol=1e-5)


def test_tied_embeddings_refuse_fold() -> None:
    model = _llama(tie_word_embeddings=True)
    tr = trace_model(model, _X)
    kinds = symmetry_kinds(model, _X, trace=tr)
    p = tr.spec.axes["model.norm.weight"][0]
    out = apply_transforms(tr.spec, {p: random_signed_permutation(tr.spec.sizes[p], seed=1)},
                           model.state_dict(), kinds=kinds)
    torch.testing.assert_close(_logits(model, out), _logits(model, model.state_dict()), atol=1e-4, rtol=1e-4)
    with pytest.raises(RebasinError, match="tied"):
        fold_rmsnorm(tr.spec, model.state_dict(), kinds)


def _gelu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))


def test_orthogonal_through_gelu_is_refused() -> None:
    model = _gelu_mlp()
    kinds = symmetry_kinds(model, torch.randn(2, 4))
    assert kinds.kinds["P0"] == "permutation"
    assert "'1'" in kinds.reasons["P0"] and "GELU" in kinds.reasons["P0"]
    spec = trace_model(model, torch.randn(2, 4)).spec
    with pytest.raises(RebasinError, match=r"module '1' \(GELU\)"):
        apply_transforms(spec, {"P0": random_orthogonal(8, seed=0)}, model.state_dict(), kinds=kinds)
    with pytest.raises(RebasinError, match="GELU"):
        apply_transforms(spec, {"P0": random_signed_permutation(8, seed=0)}, model.state_dict(), kinds=kinds)
    # a permutation is still fine
    out = apply_transforms(spec, {"P0": torch.randperm(8, generator=torch.Generator().manual_seed(0))},
                           model.state_dict(), kinds=kinds)
    x = torch.randn(5, 4)
    torch.testing.assert_close(functional_call(model, out, (x,)), model(x))


class _LinearStream(nn.Module):
    """A stream with only linear uses (two writers summed, one reader) and an RMSNorm module."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.norm, self.out = nn.Linear(3, 6), nn.Linear(3, 6), nn.RMSNorm(6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.a(x) + self.b(x)) + self.a(x))


def test_a_square_read_by_a_linear_is_not_rotation_safe() -> None:
    """x ** 2 summed over the features is invariant (RMSNorm); x ** 2 read by a linear layer is not."""

    class Squared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l3(torch.relu(self.l2(self.l1(x) ** 2)))

    kinds = symmetry_kinds(Squared(), torch.randn(2, 4), check=False)  # the analysis alone, no safety net
    assert kinds.kinds["P0"] == "permutation"
    assert "square" in kinds.reasons["P0"]


def test_rmsnorm_module_and_adds() -> None:
    torch.manual_seed(1)
    model = _LinearStream()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3)
    kinds = symmetry_kinds(model, x)
    spec = trace_model(model, x).spec
    p = spec.axes["norm.weight"][0]
    assert kinds.kinds[p] == "orthogonal" and kinds.scales[p] == ("norm.weight",)
    # the norm's output is added to the stream, not only read by a weight: no readers, so no fold
    assert kinds.readers["norm.weight"] == ()
    with pytest.raises(RebasinError, match="no recorded readers"):
        fold_rmsnorm(spec, model.state_dict(), kinds)
    out = apply_transforms(spec, {p: random_signed_permutation(6, seed=2)}, model.state_dict(), kinds=kinds)
    torch.testing.assert_close(functional_call(model, out, (x,)), model(x))


def test_bad_transforms() -> None:
    spec = PermutationSpec({"w1": ("P", None), "b1": ("P",), "w2": (None, "P")})
    s = {"w1": torch.randn(3, 2), "b1": torch.randn(3), "w2": torch.randn(1, 3)}
    k = SymmetryKinds({"P": "orthogonal"})
    with pytest.raises(RebasinError, match="pass kinds="):
        apply_transforms(spec, {"P": torch.eye(3)}, s)
    with pytest.raises(RebasinError, match="not orthogonal"):
        apply_transforms(spec, {"P": 2 * torch.eye(3)}, s, kinds=k)
    with pytest.raises(RebasinError, match="non-finite"):
        apply_transforms(spec, {"P": torch.full((3, 3), float("nan"))}, s, kinds=k)
    with pytest.raises(RebasinError, match=r"shape \(2, 2\)"):
        apply_transforms(spec, {"P": torch.eye(2)}, s, kinds=k)
    with pytest.raises(RebasinError, match="signs"):
        apply_transforms(spec, {"P": SignedPermutation(torch.arange(3), torch.tensor([1.0, 0.5, 1.0]))}, s, kinds=k)
    with pytest.raises(RebasinError, match="not a permutation"):
        apply_transforms(spec, {"P": SignedPermutation(torch.tensor([0, 0, 1]), torch.ones(3))}, s, kinds=k)
    with pytest.raises(RebasinError, match="unknown class"):
        apply_transforms(spec, {"Q": torch.eye(3)}, s, kinds=k)
    with pytest.raises(RebasinError, match="a transform must be"):
        apply_transforms(spec, {"P": torch.ones(3, 3, 3)}, s, kinds=k)
    with pytest.raises(RebasinError, match="admits transforms up to 'permutation'"):
        apply_transforms(spec, {"P": torch.eye(3)}, s, kinds=SymmetryKinds({}))
    with pytest.raises(RebasinError, match="kinds must be one of"):
        SymmetryKinds({"P": "rotation"})
    with pytest.raises(RebasinError, match="seed= or generator="):
        random_orthogonal(3, seed=None)


def test_structured_class_takes_only_permutations() -> None:
    spec = PermutationSpec({"w": ("P", None), "v": (None, "P")}, structure={"P": ("H", 2)})
    s = {"w": torch.randn(4, 2), "v": torch.randn(1, 4)}
    with pytest.raises(RebasinError, match="structured"):
        apply_transforms(spec, {"P": torch.eye(4)}, s, kinds=SymmetryKinds({"P": "orthogonal"}))


def test_matrix_forms_agree() -> None:
    spec = PermutationSpec({"w1": ("P", None), "b1": ("P",), "w2": (None, "P")})
    gen = torch.Generator().manual_seed(0)
    s = {"w1": torch.randn(5, 2, generator=gen), "b1": torch.randn(5, generator=gen), "w2": torch.randn(3, 5, generator=gen)}
    k = SymmetryKinds({"P": "orthogonal"})
    sp = random_signed_permutation(5, seed=3)
    assert kind_of(sp) == "signed"
    a = apply_transforms(spec, {"P": sp}, s, kinds=k)
    b = apply_transforms(spec, {"P": transform_matrix(sp)}, s, kinds=k)
    for key in s:
        torch.testing.assert_close(a[key], b[key])
    m = transform_matrix(sp)
    torch.testing.assert_close(a["w1"], m @ s["w1"])
    torch.testing.assert_close(a["w2"], s["w2"] @ m.T)
    perm = sp.perm
    c = apply_transforms(spec, {"P": transform_matrix(perm)}, s, kinds=k)
    d = apply_transforms(spec, {"P": perm}, s)
    for key in s:
        torch.testing.assert_close(c[key], d[key])


def test_functional_check_catches_a_wrong_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _gelu_mlp()
    monkeypatch.setattr("rebasin.trace.symmetry._Analysis.run", lambda self: None)  # claims every class is free
    with pytest.raises(RebasinError, match="a random signed permutation of them changes the outputs"):
        symmetry_kinds(model, torch.randn(2, 4))
    assert symmetry_kinds(model, torch.randn(2, 4), check=False).kinds["P0"] == "orthogonal"
