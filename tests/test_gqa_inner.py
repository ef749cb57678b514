"""Value units inside grouped-query heads move (``PermutationSpec.block_inner``).

With ``H`` query heads on ``K`` key/value heads (``g = H / K``), the value units of key/value head ``b`` feed the
``g`` query heads of its group, whose outputs are separate column blocks of the output projection: one inner
permutation per key/value head, shared by the ``g`` blocks. A hand-written attention (no ``transformers``) checks
the spec construct itself; Llama / Mistral / Qwen2 (g = 2) and Gemma (multi-query, g = H) check the traced specs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from builders import traced_without_warnings
from torch import nn

import rebasin
from rebasin import PermutationSpec, RebasinError, weight_matching
from rebasin.spec.core import compose, full_axis_index, invert, permute, random_permutation, split_structured

H, KV, D, W = 4, 2, 3, 6  # query heads, key/value heads, head width, model width


class _GQA(nn.Module):
    """``x -> x + o(attention(q(x), k(x), v(x)))`` with ``KV`` key/value heads repeated for ``H`` query heads."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(W, H * D), nn.Linear(W, KV * D)
        self.v, self.o = nn.Linear(W, KV * D), nn.Linear(H * D, W)
        self.head = nn.Linear(W, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, H, D).transpose(1, 2)
        k = self.k(x).view(b, t, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1)
        v = self.v(x).view(b, t, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1)
        att = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.head(x + self.o(att.transpose(1, 2).reshape(b, t, H * D)))


def _spec(**extra) -> PermutationSpec:
    """K: key/value heads; Q: query heads in groups of H / KV under K; V: value units, D per key/value head under K;
    the residual stream is pinned (the input), so only the attention's classes move."""
    axes = {"q.weight": ("Q", None), "q.bias": ("Q",), "k.weight": ("K", None), "k.bias": ("K",),
            "v.weight": ("V", None), "v.bias": ("V",), "o.weight": (None, "Q"), "o.bias": (None,),
            "head.weight": (None, None), "head.bias": (None,)}
    blocks = {("q.weight", 0): D, ("q.bias", 0): D, ("k.weight", 0): D, ("k.bias", 0): D, ("o.weight", 1): D}
    return PermutationSpec(axes, blocks=blocks, structure={"Q": ("K", H // KV), "V": ("K", D)},
                           block_inner={("o.weight", 1): "V"}, **extra)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _GQA().eval()


_X = torch.randn(2, 5, W, generator=torch.Generator().manual_seed(1))


def _inner_moved(spec: PermutationSpec, perms: dict, v: str) -> bool:
    d = spec.structure[v][1] if v in spec.structure else perms[v].numel()
    inner = split_structured(perms[v], d)[1]
    return not torch.equal(inner, torch.arange(d).expand_as(inner))


def test_hand_written_gqa_is_exact_with_value_units_moving():
    model, spec = _model(), _spec()
    spec.check(model, _X)
    state = model.state_dict()
    y = model(_X)
    moved = 0
    for seed in range(4):
        perms = random_permutation(spec, seed=seed, sizes=spec.validate(state))
        moved += _inner_moved(spec, perms, "V")
        torch.testing.assert_close(torch.func.functional_call(model, permute(spec, perms, state), (_X,)), y)
    assert moved >= 2


def test_one_inner_permutation_per_query_head_breaks_the_function():
    """The tie matters: the two query heads of a group read one value head, so their blocks take one inner."""
    model, spec = _model(), _spec()
    state = model.state_dict()
    perms = random_permutation(spec, seed=0, sizes=spec.validate(state))
    good = permute(spec, perms, state)
    cols = full_axis_index(spec, "o.weight", 1, H * D, perms)
    swap = torch.arange(H * D)
    swap[[0, 1]] = swap[[1, 0]]  # query head 0 alone takes another order of its value units
    bad = dict(good, **{"o.weight": state["o.weight"][:, cols[swap]]})
    y = model(_X)
    torch.testing.assert_close(torch.func.functional_call(model, good, (_X,)), y)
    assert (torch.func.functional_call(model, bad, (_X,)) - y).abs().max() > 1e-3


def test_index_is_query_blocks_with_their_value_heads_inner_permutation():
    spec = _spec()
    perms = {"K": torch.tensor([1, 0]), "Q": torch.tensor([3, 2, 0, 1]), "V": torch.tensor([5, 3, 4, 1, 2, 0])}
    cols = full_axis_index(spec, "o.weight", 1, H * D, perms)
    inner_v = split_structured(perms["V"], D)[1]  # per new key/value position
    want = torch.cat([perms["Q"][a] * D + inner_v[a // (H // KV)] for a in range(H)])
    assert torch.equal(cols, want)


def test_invert_and_compose_round_trip():
    model, spec = _model(), _spec()
    state = model.state_dict()
    sizes = spec.validate(state)
    p, q = random_permutation(spec, seed=1, sizes=sizes), random_permutation(spec, seed=2, sizes=sizes)
    back = permute(spec, invert(p), permute(spec, p, state))
    both = permute(spec, compose(p, q), state)
    step = permute(spec, q, permute(spec, p, state))
    for k in state:
        torch.testing.assert_close(back[k], state[k], rtol=0, atol=0)
        torch.testing.assert_close(both[k], step[k], rtol=0, atol=0)


def test_equality_rename_subset_and_coarser_spec():
    spec = _spec()
    assert spec == _spec() and spec != PermutationSpec(spec.axes, blocks=spec.blocks, structure=spec.structure)
    renamed = spec.renamed({"V": "values", "K": "kv"})
    assert renamed.block_inner == {("o.weight", 1): "values"} and renamed.structure["values"] == ("kv", D)
    assert renamed.renamed({"values": "V", "kv": "K"}) == spec
    sub = spec.subset({"o.weight": "proj.weight"})  # the value class acts only inside the blocks there
    assert sub.block_inner == {("proj.weight", 1): "V"} and "V" in sub.perms
    assert sub.validate({"proj.weight": torch.zeros(W, H * D)}) == {"Q": H, "V": KV * D}
    coarse = spec.without_block_inner()
    assert not coarse.block_inner and coarse.axes["v.weight"] == ("K", None) and coarse.blocks[("v.weight", 0)] == D
    coarse.check(_model(), _X)


def test_spec_round_trips_through_json():
    import json

    spec = _spec(sizes={"Q": H, "K": KV, "V": KV * D})
    back = PermutationSpec.from_dict(json.loads(json.dumps(spec.as_dict())))
    assert back == spec and back.block_inner == {("o.weight", 1): "V"} and back.sizes == spec.sizes
    assert PermutationSpec.from_dict(spec.without_block_inner().as_dict()) == spec.without_block_inner()
    with pytest.raises(RebasinError, match="from_dict needs a mapping with 'axes'"):
        PermutationSpec.from_dict({"blocks": []})
    with pytest.raises(RebasinError, match="from_dict: malformed data"):
        PermutationSpec.from_dict(dict(spec.as_dict(), block_inner=[["o.weight", 1]]))


@pytest.mark.parametrize("entry, match", [
    ({("o.weight", 0): "V"}, "must carry a permutation with a block size"),
    ({("o.weight", 1): "Q"}, "must be another permutation"),
    ({("o.weight", 1): "K"}, r"'K' has inconsistent sizes.*blocks of state_dict\['o\.weight'\]"),
])
def test_bad_block_inner_entries_are_refused(entry, match):
    spec = _spec()
    with pytest.raises(RebasinError, match=match):
        PermutationSpec(spec.axes, blocks=spec.blocks, structure=spec.structure, block_inner=entry).validate(
            _model().state_dict())


def test_inner_class_with_another_outer_is_refused():
    spec = _spec()
    with pytest.raises(RebasinError, match="structured with it"):
        PermutationSpec(spec.axes, blocks=spec.blocks, structure={"Q": ("K", H // KV), "V": ("J", D)},
                        block_inner={("o.weight", 1): "V"})


def test_weight_matching_recovers_the_value_units_from_the_identity_and_reports_the_true_objective():
    model, spec = _model(), _spec()
    a = {k: v.detach() for k, v in model.state_dict().items()}
    planted = random_permutation(spec, seed=5, sizes=spec.validate(a))
    b = permute(spec, planted, a)
    for start in ("identity", "auto"):
        got, info = weight_matching(spec, a, b, seed=0, start=start, return_info=True)
        assert torch.equal(got["V"], invert(planted)["V"]) and torch.equal(got["Q"], invert(planted)["Q"])
        moved = permute(spec, got, b)
        true = sum(float((a[k].double() * moved[k].double()).sum()) for k in a if any(spec.axes[k]))
        assert info.objective[-1] == pytest.approx(true, rel=1e-6)


@pytest.mark.parametrize("engine", ["ot", "soft", "sinkhorn", "transforms"])
def test_engines_without_block_inner_refuse_it(engine):
    model, spec = _model(), _spec()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if engine == "ot":
        with pytest.raises(RebasinError, match="block_inner"):
            rebasin.matching.ot.ot_matching(spec, state, state)
    elif engine == "soft":
        m = {p: torch.eye(n) for p, n in spec.validate(state).items()}
        with pytest.raises(RebasinError, match=r"soft_permute.*block_inner.*'o\.weight'"):
            rebasin.spec.soft_permute(spec, m, state)
    elif engine == "sinkhorn":
        with pytest.raises(RebasinError, match="SinkhornRebasin does not support block_inner"):
            rebasin.SinkhornRebasin(model, model, spec=spec)
    else:
        from rebasin.spec.transforms import why_structured

        mqa = PermutationSpec(spec.axes, blocks=spec.blocks, structure={}, block_inner={("o.weight", 1): "V"})
        assert "block_inner" in why_structured(mqa, "V")


def test_unstructured_inner_class_is_one_block_shared_by_every_query_head():
    """Multi-query attention (one key/value head): V is a plain permutation of the D value units."""
    spec = _spec()
    axes = dict(spec.axes, **{"k.weight": (None, None), "k.bias": (None,)})
    blocks = {ka: v for ka, v in spec.blocks.items() if ka[0][0] != "k"}
    mqa = PermutationSpec(axes, blocks=blocks, block_inner={("o.weight", 1): "V"})
    state = {k: torch.zeros(v.shape) for k, v in _model().state_dict().items()}
    state.update({"v.weight": torch.zeros(D, W), "v.bias": torch.zeros(D), "k.weight": torch.zeros(D, W),
                  "k.bias": torch.zeros(D)})
    assert mqa.validate(state) == {"Q": H, "V": D}
    perms = {"Q": torch.tensor([2, 0, 3, 1]), "V": torch.tensor([2, 0, 1])}
    cols = full_axis_index(mqa, "o.weight", 1, H * D, perms)
    assert torch.equal(cols, torch.cat([perms["Q"][a] * D + perms["V"] for a in range(H)]))


# ------------------------------------------------------------------------------------------ LLM families
T = pytest.importorskip("transformers")

SEQ, VOCAB = 8, 50
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=32)
FAMILIES = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **_COMMON)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, **_COMMON)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **_COMMON)),
}
if hasattr(T, "GemmaForCausalLM"):  # multi-query: one key/value head for the 4 query heads
    FAMILIES["gemma"] = lambda: T.GemmaForCausalLM(T.GemmaConfig(num_key_value_heads=1, head_dim=8, **_COMMON))
_TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FAMILIES[name]().eval()


@pytest.fixture(scope="module")
def traced():
    return traced_without_warnings({name: _build(name) for name in FAMILIES}, _TOKENS)


def _randomised(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.3 + (1.0 if k.endswith("norm.weight") else 0.0))
            if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}


def _logits(model: nn.Module, state: dict) -> torch.Tensor:
    with torch.no_grad():
        return torch.func.functional_call(model, {**dict(model.named_buffers()), **state}, (_TOKENS,),
                                          kwargs={"use_cache": False}, tie_weights=False).logits


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_value_units_move_and_logits_are_unchanged(traced, name):
    model, spec = traced[name]
    back = PermutationSpec.from_dict(spec.as_dict())
    assert back == spec and back.coverage == spec.coverage and back.sizes == spec.sizes
    o = "model.layers.0.self_attn.o_proj.weight"
    v = spec.block_inner[(o, 1)]
    assert spec.axes["model.layers.0.self_attn.v_proj.weight"][0] == v
    spec.check(model, _TOKENS)  # randomised norm statistics
    state = _randomised(model, seed=2)
    moved = 0
    for seed in range(3):
        perms = random_permutation(spec, seed=seed)
        moved += _inner_moved(spec, perms, v)
        y = _logits(model, state)
        torch.testing.assert_close(_logits(model, permute(spec, perms, state)), y, rtol=1e-4,
                                   atol=1e-4 * float(y.abs().max()))
    assert moved == 3


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_weight_matching_recovers_the_inner_value_permutation(traced, name, tmp_path):
    from rebasin.spec.checkpoint import open_checkpoint
    from rebasin.spec.hf_folder import save_permuted

    model, spec = traced[name]
    a = _randomised(model, seed=4)
    planted = random_permutation(spec, seed=7)
    b = permute(spec, planted, a)
    want = invert(planted)
    values = sorted(set(spec.block_inner.values()))
    save_permuted(spec, {}, a, tmp_path / "a.safetensors")
    save_permuted(spec, planted, a, tmp_path / "b.safetensors")
    dense = weight_matching(spec, a, b, seed=0)
    lazy = weight_matching(spec, open_checkpoint(tmp_path / "a.safetensors"), open_checkpoint(tmp_path / "b.safetensors"),
                           seed=0)
    for got in (dense, lazy):
        assert all(torch.equal(got[v], want[v]) for v in values)
        back = permute(spec, got, b)
        for key in a:
            torch.testing.assert_close(back[key], a[key], rtol=0, atol=0)


@pytest.mark.parametrize("start", ["layerwise", "auto", "best"])
def test_layerwise_start_scores_the_value_units_through_the_output_projection(traced, start, tmp_path):
    """With every ``v_proj`` zero only ``o_proj`` (through the query heads' column blocks) tells the value units
    apart: the layer-wise start still recovers a planted copy exactly, the descent ends after its confirming
    sweep, ``start="auto"`` descends once, from the start (above the identity), and ``start="best"`` skips the
    identity's descent (the end reaches the Cauchy-Schwarz bound); the checkpoint engine starts alike."""
    from rebasin.spec.checkpoint import open_checkpoint
    from rebasin.spec.hf_folder import save_permuted

    model, spec = traced["llama"]
    a = {k: torch.zeros_like(v) if "v_proj" in k else v for k, v in _randomised(model, seed=4).items()}
    planted = random_permutation(spec, seed=7)
    want = invert(planted)
    save_permuted(spec, {}, a, tmp_path / "a.safetensors")
    save_permuted(spec, planted, a, tmp_path / "b.safetensors")
    for b in (permute(spec, planted, a), open_checkpoint(tmp_path / "b.safetensors")):
        first = a if isinstance(b, dict) else open_checkpoint(tmp_path / "a.safetensors")
        got, info = weight_matching(spec, first, b, seed=0, start=start, return_info=True)
        assert all(torch.equal(got[p], want[p]) for p in want)
        assert [(kind, sweeps) for kind, _, sweeps in info.descents] == [("layerwise", 1)]
