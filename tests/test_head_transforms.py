"""Maps inside attention heads (``rebasin.spec.heads``, ``rebasin.trace.head_symmetry``, ``rebasin.matching.heads``).

q/k rows by ``A`` and ``A^{-T}``, v rows by ``B`` and the output projection's columns by ``B^{-1}``, per
key/value head; under rotary embeddings q/k maps are one rotation per frequency pair ``(i, i + d/2)``. Tiny
``transformers`` configs (Llama, grouped-query Llama, Qwen2 with q/k/v biases, Qwen3 with q/k norms, GPT-2),
the toolkit's ViT and ``nn.MultiheadAttention``; norm parameters randomised. The issue's Llama check: a planted
signed permutation of the stream, planted head rotations and maps and permutations of every other class,
recovered exactly by weight matching.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from builders import randomize_norms_
from torch import nn

from rebasin import RebasinError
from rebasin._common import forward_with_state, tensor_leaves
from rebasin.apps.models import ViT
from rebasin.matching import transform_matching
from rebasin.matching.heads import match_heads
from rebasin.spec import (
    HeadLayout,
    HeadMaps,
    SignedPermutation,
    Slot,
    apply_transforms,
    random_head_maps,
    random_orthogonal,
    random_permutation,
    random_signed_permutation,
    transform_matrix,
)
from rebasin.trace import hf_rules, llm_rules, symmetry_kinds, trace_model
from rebasin.trace.head_symmetry import checked_layouts

T = pytest.importorskip("transformers")
VOCAB = 50


def _quiet(make, cfg) -> nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return randomize_norms_(model)


def _llama(kv: int, family: str = "Llama") -> nn.Module:
    cfg = getattr(T, f"{family}Config")(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=32,
                                        head_dim=8)
    return _quiet(getattr(T, f"{family}ForCausalLM"), cfg)


def _gpt2() -> nn.Module:
    cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                       eos_token_id=0)
    return _quiet(T.GPT2LMHeadModel, cfg)


def _bert() -> nn.Module:
    cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=32, max_position_embeddings=16)
    return _quiet(T.BertModel, cfg)


def _t5() -> nn.Module:  # its relative position bias carries the head permutation itself
    cfg = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=4)
    return _quiet(T.T5EncoderModel, cfg)


def _phi() -> nn.Module:  # rotates half of each head (partial_rotary_factor 0.5)
    return _quiet(T.PhiForCausalLM, T.PhiConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                                                num_hidden_layers=1, num_attention_heads=4))


def _olmo() -> nn.Module:  # clamps q, k and v
    return _quiet(T.OlmoForCausalLM, T.OlmoConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                                                  num_hidden_layers=1, num_attention_heads=4, clip_qkv=8.0))


class _MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.att, self.out = nn.Linear(6, 16), nn.MultiheadAttention(16, 4, batch_first=True), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.att(h, h, h)[0])


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms_(ViT(image_size=8, patch_size=4, width=32, depth=2, heads=4).eval())


hf_rules.register()  # the first trace registers these rules for good; here, for the conftest's guard
for _family in ("Llama", "Qwen2", "Qwen3"):
    llm_rules.register(_llama(2, _family))
for _model in (_phi(), _olmo()):
    llm_rules.register(_model)
trace_model(_t5(), torch.zeros(1, 4, dtype=torch.long))  # registers T5's attention rule


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))


def _setup(model: nn.Module, x: torch.Tensor):  # type: ignore[no-untyped-def]
    tr = trace_model(model, x)
    return tr.spec, symmetry_kinds(model, x, trace=tr), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _out(model: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tensor_leaves(forward_with_state(model, state, x, eval_mode=True))[0]


def test_phi_partial_rotary_and_olmo_clip_refused() -> None:
    lay = symmetry_kinds(_phi(), _tokens()).heads["model.layers.0.self_attn"]
    assert (lay.qk, lay.vo) == ("permutation", "invertible") and "partial" in lay.qk_reason
    lay = symmetry_kinds(_olmo(), _tokens()).heads["model.layers.0.self_attn"]
    assert (lay.qk, lay.vo) == ("permutation", "permutation") and "clip_qkv" in lay.vo_reason


def _planted(spec, kinds, a, *, stream: bool, seed: int = 11, **head_kinds):  # type: ignore[no-untyped-def]
    plant = dict(random_permutation(spec, seed=seed))
    if stream:
        p = next(p for p in spec.perms if kinds.admits(p, "signed"))
        plant[p] = random_signed_permutation(spec.sizes[p], seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    for n, lay in kinds.heads.items():
        plant[n] = random_head_maps(lay, generator=gen, **head_kinds)
    return plant, apply_transforms(spec, plant, a, kinds=kinds)


# ------------------------------------------------------------------------------------------- what is legal where
def test_layouts_derived() -> None:
    _, kinds, _ = _setup(_llama(2), _tokens())
    lay = kinds.heads["model.layers.0.self_attn"]
    assert (lay.heads, lay.kv_heads, lay.dim, lay.rotary, lay.qk, lay.vo) == (4, 2, 8, True, "orthogonal", "invertible")
    assert "rotary" in lay.qk_reason and "model.layers.0.self_attn" in lay.qk_reason
    for model, x, name in ((_gpt2(), _tokens(), "transformer.h.1.attn"), (_vit(), torch.randn(2, 1, 8, 8), "blocks.1"),
                           (_MHA(), torch.randn(2, 5, 6), "att")):
        lay = symmetry_kinds(model, x).heads[name]
        assert (lay.heads, lay.kv_heads, lay.rotary, lay.qk, lay.vo) == (4, 4, False, "invertible", "invertible")
        assert lay.q and lay.k and lay.v and lay.o and lay.q[0].start != lay.k[0].start


@pytest.mark.parametrize("make,x", [
    (lambda: _llama(4), _tokens), (lambda: _llama(2), _tokens), (lambda: _llama(2, "Qwen2"), _tokens),
    (_gpt2, _tokens), (_bert, _tokens), (_t5, _tokens), (_vit, lambda: torch.randn(2, 1, 8, 8)),
    (_MHA, lambda: torch.randn(2, 5, 6))])
def test_random_maps_keep_the_function(make, x) -> None:  # type: ignore[no-untyped-def]
    model, x = make(), x()
    spec, kinds, a = _setup(model, x)
    assert kinds.heads
    plant, b = _planted(spec, kinds, a, stream=False)
    assert all(plant[n].qk is not None and plant[n].vo is not None for n in kinds.heads)  # symmetry_kinds kept both
    ref, got = _out(model, a, x), _out(model, b, x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    changed = max(float((b[k] - a[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert changed > 1e-2  # the maps did something


def test_rotary_restriction_matters() -> None:
    """A dense rotation of q/k changes a Llama's logits; only per-pair rotations are legal, and apply refuses others."""
    model, x = _llama(2), _tokens()
    spec, kinds, a = _setup(model, x)
    lay = kinds.heads["model.layers.0.self_attn"]
    dense = torch.stack([random_orthogonal(8, seed=s) for s in range(2)])
    moved = dict(a)
    from rebasin.spec.heads import apply_head_maps

    unchecked = HeadLayout(lay.module, 4, 2, 8, lay.q, lay.k, lay.v, lay.o)  # no rotary: applies anything
    apply_head_maps(unchecked, HeadMaps(dense), moved)
    assert (_out(model, moved, x) - _out(model, a, x)).abs().max() > 1e-3
    # rotate_half pairs units i and i + d/2: the same rotations on adjacent pairs (2i, 2i + 1) change the logits
    pairs = random_head_maps(lay, seed=4).qk
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # unit i -> 2i, unit i + d/2 -> 2i + 1
    adjacent = torch.empty_like(pairs)
    adjacent[:, order[:, None], order[None, :]] = pairs
    for maps, same in ((pairs, True), (adjacent, False)):
        moved = dict(a)
        apply_head_maps(unchecked, HeadMaps(maps), moved)
        diff = float((_out(model, moved, x) - _out(model, a, x)).abs().max())
        assert (diff < 1e-4) == same, diff
    with pytest.raises(RebasinError, match=r"model.layers.0.self_attn.*rotary"):
        apply_transforms(spec, {lay.module: HeadMaps(dense)}, a, kinds=kinds)
    with pytest.raises(RebasinError, match=r"model.layers.0.self_attn.*'orthogonal', not 'invertible'.*rotary"):
        apply_transforms(spec, {lay.module: HeadMaps(2 * torch.eye(8).repeat(2, 1, 1))}, a, kinds=kinds)
    with pytest.raises(RebasinError, match="apply_rotary_pos_emb"):
        transform_matching(spec, a, a, kinds=kinds, heads={lay.module: "invertible"})


def test_qk_norm_refuses_qk_maps() -> None:
    model, x = _llama(2, "Qwen3"), _tokens()
    spec, kinds, a = _setup(model, x)
    lay = kinds.heads["model.layers.0.self_attn"]
    assert (lay.qk, lay.vo) == ("permutation", "invertible")
    rot = random_head_maps(HeadLayout("x", 4, 2, 8, (), (), (), (), rotary=True, qk="orthogonal"), seed=0).qk
    with pytest.raises(RebasinError, match=r"'model.layers.0.self_attn.q_norm' \(Qwen3RMSNorm\)"):
        apply_transforms(spec, {lay.module: HeadMaps(rot)}, a, kinds=kinds)
    with pytest.raises(RebasinError, match="q_norm"):
        transform_matching(spec, a, a, kinds=kinds, heads={lay.module: ("orthogonal", "invertible")})
    # v/o maps stay legal, and a kind alone is capped per side
    _, b = _planted(spec, kinds, a, stream=False)
    found = transform_matching(spec, a, b, kinds=kinds, heads="invertible")
    assert found[lay.module].qk is None and found[lay.module].vo is not None
    back = apply_transforms(spec, found, b, kinds=kinds)
    for k in a:
        torch.testing.assert_close(back[k], a[k], rtol=1e-4, atol=1e-5)


def test_checked_layouts_lowers_a_wrong_layout() -> None:
    """The net under the derivation: maps that change the outputs leave the layout without maps, with the reason."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    fake = HeadLayout("0", 2, 2, 4, (Slot("0.weight", 0), Slot("0.bias", 0)), (), (Slot("0.weight", 0),),
                      (Slot("2.weight", 1),), qk="permutation")
    got = checked_layouts(model, {"fake": fake}, torch.randn(3, 4))["fake"]
    assert got.vo == "permutation" and "changed the outputs" in got.vo_reason


# ------------------------------------------------------------------------------------------- the Llama check
@pytest.mark.parametrize("kv", [4, 2])
@pytest.mark.parametrize("vo", ["orthogonal", "invertible"])
def test_llama_planted_stream_and_heads_recovered_exactly(kv: int, vo: str) -> None:
    model, x = _llama(kv), _tokens()
    spec, kinds, a = _setup(model, x)
    before = {k: v.clone() for k, v in a.items()}
    plant, b = _planted(spec, kinds, a, stream=True, vo=vo)
    b_before = {k: v.clone() for k, v in b.items()}
    found = transform_matching(spec, a, b, kinds=kinds, heads=vo)
    assert all(torch.equal(a[k], before[k]) and torch.equal(b[k], b_before[k]) for k in a)
    back = apply_transforms(spec, found, b, kinds=kinds)
    for k in a:
        torch.testing.assert_close(back[k], a[k], rtol=0, atol=1e-5)
    p = next(p for p in spec.perms if kinds.admits(p, "signed"))
    assert isinstance(found[p], SignedPermutation)
    torch.testing.assert_close(transform_matrix(found[p]), transform_matrix(plant[p]).T, rtol=0, atol=0)
    for n in kinds.heads:  # head maps undo the planted ones (in A's head order, so compare through the weights)
        assert found[n].qk is not None and found[n].vo is not None
    torch.testing.assert_close(_out(model, back, x), _out(model, a, x), rtol=1e-4, atol=1e-4)
    # permutations alone cannot undo the head maps
    plain = transform_matching(spec, a, b, kinds=kinds, n_iter=3)
    gap = apply_transforms(spec, plain, b, kinds=kinds)["model.layers.0.self_attn.q_proj.weight"]
    assert (gap - a["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-2


def _circuits(lay: HeadLayout, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from rebasin.matching.heads import _rows  # noqa: PLC2701 - the same extraction the matcher uses

    d = lay.dim
    q, k = _rows(state, lay.q, lay.heads, d), _rows(state, lay.k, lay.kv_heads, d)
    v, o = _rows(state, lay.v, lay.kv_heads, d), _rows(state, lay.o, lay.heads, d)
    return q.transpose(1, 2) @ k, o.transpose(1, 2) @ v


@pytest.mark.parametrize("make,x", [(_gpt2, _tokens), (_t5, _tokens), (_vit, lambda: torch.randn(2, 1, 8, 8))])
def test_non_rotary_invertible_maps_recovered_up_to_the_symmetry(make, x) -> None:  # type: ignore[no-untyped-def]
    model, x = make(), x()
    spec, kinds, a = _setup(model, x)
    _, b = _planted(spec, kinds, a, stream=False, qk="invertible", vo="invertible")
    found = transform_matching(spec, a, b, kinds=kinds, heads="invertible")
    back = apply_transforms(spec, found, b, kinds=kinds)
    for lay in kinds.heads.values():
        for got, want in zip(_circuits(lay, back), _circuits(lay, a)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_out(model, back, x), _out(model, a, x), rtol=1e-4, atol=1e-4)
    # orthogonal maps cannot undo invertible ones: the fit leaves a gap, the circuits still match the heads
    orth = apply_transforms(spec, transform_matching(spec, a, b, kinds=kinds, heads="orthogonal"), b, kinds=kinds)
    lay = next(iter(kinds.heads.values()))
    q_key = lay.q[0].key
    assert (orth[q_key] - a[q_key]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- bad inputs
def test_bad_maps() -> None:
    model, x = _vit(), torch.randn(2, 1, 8, 8)
    spec, kinds, a = _setup(model, x)
    name = "blocks.0"
    eye = torch.eye(8).repeat(4, 1, 1)
    with pytest.raises(RebasinError, match="singular"):
        apply_transforms(spec, {name: HeadMaps(vo=torch.zeros(4, 8, 8))}, a, kinds=kinds)
    nan = eye.clone()
    nan[1, 2, 3] = float("nan")
    with pytest.raises(RebasinError, match="non-finite"):
        apply_transforms(spec, {name: HeadMaps(qk=nan)}, a, kinds=kinds)
    with pytest.raises(RebasinError, match=r"shape \(4, 8, 8\)"):
        apply_transforms(spec, {name: HeadMaps(qk=torch.eye(8))}, a, kinds=kinds)
    with pytest.raises(RebasinError, match="not an attention layout"):
        apply_transforms(spec, {"blocks.9": HeadMaps(qk=eye)}, a, kinds=kinds)
    with pytest.raises(RebasinError, match="pass kinds="):
        apply_transforms(spec, {name: HeadMaps(qk=eye)}, a)
    with pytest.raises(RebasinError, match="heads must be one of"):
        transform_matching(spec, a, a, kinds=kinds, heads="rotation")
    with pytest.raises(RebasinError, match="not an attention layout"):
        transform_matching(spec, a, a, kinds=kinds, heads={"nope": "orthogonal"})
    # an invertible fit the weights do not determine (a head whose v rows are all zero)
    dead = dict(a)
    dead["blocks.0.qkv.weight"] = a["blocks.0.qkv.weight"].clone()
    dead["blocks.0.qkv.weight"][64:72] = 0
    dead["blocks.0.qkv.bias"] = a["blocks.0.qkv.bias"].clone()
    dead["blocks.0.qkv.bias"][64:72] = 0
    dead["blocks.0.proj.weight"] = a["blocks.0.proj.weight"].clone()
    dead["blocks.0.proj.weight"][:, 0:8] = 0
    with pytest.raises(RebasinError, match="singular.*orthogonal map instead"):
        match_heads(kinds.heads[name], dead, dead, qk="orthogonal", vo="invertible", name=name)
