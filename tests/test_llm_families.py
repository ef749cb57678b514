"""Rotary-embedding LLMs from tiny ``transformers`` configs (no download): traced exactly, heads and groups move.

Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma3, Phi and GPT-NeoX (partial rotary) with 2 layers, width 32 and
4 query heads. What the spec allows inside the attention (see ``rebasin.trace.llm_rules``): key/value heads
with their query-head groups, query heads inside their group, value units inside each key/value head (shared
by the output-projection blocks of its query heads, ``spec.block_inner``); q/k units inside a head stay in place (rotary frequency pairs do not commute with a
permutation, which the last tests show). Skipped without ``transformers``.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from builders import traced_without_warnings
from torch import nn

import rebasin
from rebasin import PermutationSpec, RebasinError
from rebasin.spec.core import permute, random_permutation, split_structured

T = pytest.importorskip("transformers")

from rebasin.trace import hf_rules, llm_rules

SEQ, VOCAB, WIDTH, HEADS, D = 8, 50, 32, 4, 8
_COMMON = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=HEADS, max_position_embeddings=32)

FAMILIES = {  # name: (builder, key/value heads)
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **_COMMON)), 2),
    "llama-mha-bias": (lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=4, attention_bias=True,
                                                                mlp_bias=True, **_COMMON)), 4),
    "llama-tied": (lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True,
                                                            **_COMMON)), 2),
    "llama-eager": (lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, attn_implementation="eager",
                                                             **_COMMON)), 2),  # attention weights returned
    "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, **_COMMON)), 2),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **_COMMON)), 2),
    "gpt-neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(rotary_pct=0.5, **_COMMON)), 4),
}
if hasattr(T, "Qwen3ForCausalLM"):
    FAMILIES["qwen3"] = (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(num_key_value_heads=2, head_dim=D, **_COMMON)), 2)
if hasattr(T, "GemmaForCausalLM"):
    FAMILIES["gemma"] = (lambda: T.GemmaForCausalLM(T.GemmaConfig(num_key_value_heads=1, head_dim=D, **_COMMON)), 1)
if hasattr(T, "Gemma3ForCausalLM"):
    FAMILIES["gemma3"] = (lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(num_key_value_heads=2, head_dim=D,
                                                                          **_COMMON)), 2)
if hasattr(T, "Olmo2ForCausalLM"):  # q_norm / k_norm over all of q / k (not per head): they follow the heads
    FAMILIES["olmo2"] = (lambda: T.Olmo2ForCausalLM(T.Olmo2Config(num_key_value_heads=2, **_COMMON)), 2)
for _cls, _cfg in (("Gemma2ForCausalLM", "Gemma2Config"), ("OlmoForCausalLM", "OlmoConfig"),
                   ("GraniteForCausalLM", "GraniteConfig"), ("StableLmForCausalLM", "StableLmConfig")):
    if hasattr(T, _cls):  # StableLM: partial rotary (a quarter of each head) and LayerNorm with bias
        FAMILIES[_cls[: -len("ForCausalLM")].lower()] = (
            lambda c=_cls, k=_cfg: getattr(T, c)(getattr(T, k)(num_key_value_heads=2, head_dim=D, **_COMMON)), 2)
if hasattr(T, "PhiForCausalLM"):
    FAMILIES["phi"] = (lambda: T.PhiForCausalLM(T.PhiConfig(num_key_value_heads=4, partial_rotary_factor=0.5,
                                                            **_COMMON)), 4)


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FAMILIES[name][0]().eval()


# trace_model registers these rules the first time it meets the classes, on purpose and for good; register them
# at import so that the conftest guard against registry leaks sees them before any test, in any order.
hf_rules.register()
for _name in FAMILIES:
    llm_rules.register(_build(_name))

_X = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def traced():
    return traced_without_warnings({name: _build(name) for name in FAMILIES}, _X)


def _logits(model: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.func.functional_call(model, {**dict(model.named_buffers()), **state}, (x,),
                                          kwargs={"use_cache": False}, tie_weights=False).logits


def _randomised(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every floating entry random (norm scales and biases included), so no constant hides a wrong axis."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.3 + (1.0 if k.endswith("norm.weight") else 0.0))
            if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_equivalence_with_randomised_norms_and_biases(traced, name):
    model, spec = traced[name]
    assert set(spec.axes) == set(model.state_dict())
    assert spec.check(model, _X) <= 1e-3
    state = _randomised(model, seed=5)
    for seed in (0, 1):
        perms = random_permutation(spec, seed=seed)
        _close(_logits(model, state, _X), _logits(model, permute(spec, perms, state), _X))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_qk_units_stay_in_place_and_heads_move(traced, name):
    model, spec = traced[name]
    kv = FAMILIES[name][1]
    if name == "gpt-neox":  # q, k, v packed per head: whole heads of 3 x d rows move
        ax = spec.axes["gpt_neox.layers.0.attention.query_key_value.weight"]
        assert spec.blocks[("gpt_neox.layers.0.attention.query_key_value.weight", 0)] == 3 * D
        assert spec.sizes[ax[0]] == HEADS and ax[0] == spec.axes["gpt_neox.layers.0.attention.dense.weight"][1]
        return
    attn = "model.layers.0.self_attn."
    q, k = spec.axes[attn + "q_proj.weight"][0], spec.axes[attn + "k_proj.weight"][0]
    # rows of q and k carry a permutation of heads acting on blocks of d: no unit moves inside a head
    assert spec.blocks[(attn + "q_proj.weight", 0)] == D and spec.sizes[q] == HEADS
    o, v = attn + "o_proj.weight", spec.axes[attn + "v_proj.weight"][0]
    if kv == 1:  # one key/value head: k's rows stay, query heads move freely, v units move in every o_proj block
        assert k is None and q not in spec.structure and v not in spec.structure and spec.sizes[v] == D
        assert spec.axes[o][1] == q and spec.blocks[(o, 1)] == D and spec.block_inner[(o, 1)] == v
        return
    assert spec.blocks[(attn + "k_proj.weight", 0)] == D and spec.sizes[k] == kv
    if name == "olmo2":  # norms over all of q and k follow the head permutations of their rows
        assert spec.axes[attn + "q_norm.weight"] == (q,) and spec.axes[attn + "k_norm.weight"] == (k,)
        assert spec.blocks[(attn + "q_norm.weight", 0)] == D
    if name in ("qwen3", "gemma3"):  # norms over one head's units: the units do not move
        assert spec.axes[attn + "q_norm.weight"] == (None,) == spec.axes[attn + "k_norm.weight"]
    if kv == HEADS:  # one key/value head per query head: v units permuted inside heads, sharing q/k's heads
        v = spec.axes[attn + "v_proj.weight"][0]
        assert q == k and spec.structure[v] == (q, D)
        assert spec.axes[attn + ("dense" if name == "phi" else "o_proj") + ".weight"][1] == v
    elif kv > 1:  # grouped-query attention: query heads structured by their key/value head, value units per
        # key/value head; o_proj's columns: query-head blocks, inside each the value units of its key/value head
        assert spec.structure[q] == (k, HEADS // kv) and spec.structure[v] == (k, D)
        assert (attn + "v_proj.weight", 0) not in spec.blocks
        assert spec.axes[o][1] == q and spec.blocks[(o, 1)] == D and spec.block_inner[(o, 1)] == v


@pytest.mark.parametrize("name", ["llama", "llama-mha-bias"])
def test_units_inside_heads_and_groups_move_and_output_is_unchanged(traced, name):
    model, spec = traced[name]
    state = _randomised(model, seed=2)
    moved_outer = moved_inner = 0
    for seed in range(3):
        perms = random_permutation(spec, seed=seed)
        for p, (_, block) in spec.structure.items():
            outer, inner = split_structured(perms[p], block)
            moved_outer += int(not torch.equal(outer, torch.arange(len(outer))))
            moved_inner += int(not torch.equal(inner, torch.arange(block).expand_as(inner)))
        _close(_logits(model, state, _X), _logits(model, permute(spec, perms, state), _X))
    # llama: query heads move inside their group (blocks of 2 heads); llama-mha: value units inside heads
    assert moved_outer > 0 and moved_inner > 0


def test_swiglu_shares_one_permutation_and_embeddings_are_tied(traced):
    _, spec = traced["llama-tied"]
    mlp = "model.layers.0.mlp."
    gate, up = spec.axes[mlp + "gate_proj.weight"][0], spec.axes[mlp + "up_proj.weight"][0]
    assert gate is not None and gate == up == spec.axes[mlp + "down_proj.weight"][1]
    hidden = spec.axes["model.embed_tokens.weight"][1]
    assert hidden is not None and spec.axes["lm_head.weight"] == (None, hidden)
    assert spec.axes["model.norm.weight"] == (hidden,) == spec.axes["model.layers.1.input_layernorm.weight"]


def _rotary_pair_swap(state: dict, prefix: str, rows: list[str], d: int) -> dict:
    """Swap frequency pairs 0 and 1 (units ``(0, d/2)`` and ``(1, d/2 + 1)``) of head 0 in the rows of ``rows``."""
    order = torch.arange(state[prefix + rows[0] + ".weight"].shape[0])
    half = d // 2
    order[[0, 1, half, half + 1]] = torch.tensor([1, 0, half + 1, half])
    out = dict(state)
    for r in rows:
        out[prefix + r + ".weight"] = state[prefix + r + ".weight"][order]
        if prefix + r + ".bias" in state:
            out[prefix + r + ".bias"] = state[prefix + r + ".bias"][order]
    return out


def test_permuting_rotary_frequency_pairs_of_q_and_k_changes_the_output(traced):
    model, spec = traced["llama-mha-bias"]
    state = _randomised(model, seed=3)
    y = _logits(model, state, _X)
    attn = "model.layers.0.self_attn."
    # the same permutation of q and k units would leave q.k unchanged without rotary embeddings; with them it does not
    moved = _logits(model, _rotary_pair_swap(state, attn, ["q_proj", "k_proj"], D), _X)
    assert (moved - y).abs().max() > 1e-2 * y.abs().max()
    # the same swap of value units (and the output projection's columns) is a symmetry
    swapped = _rotary_pair_swap(state, attn, ["v_proj"], D)
    order = torch.arange(WIDTH)
    order[[0, 1, D // 2, D // 2 + 1]] = torch.tensor([1, 0, D // 2 + 1, D // 2])
    swapped[attn + "o_proj.weight"] = state[attn + "o_proj.weight"][:, order]
    _close(y, _logits(model, swapped, _X))


def test_a_spec_permuting_qk_units_inside_heads_fails_the_check(traced):
    model, spec = traced["llama-mha-bias"]
    attn = "model.layers.0.self_attn."
    heads = spec.axes[attn + "q_proj.weight"][0]
    axes = dict(spec.axes)
    for r in ("q_proj", "k_proj"):
        axes[attn + r + ".weight"] = ("QK",) + axes[attn + r + ".weight"][1:]
        axes[attn + r + ".bias"] = ("QK",)
    blocks = {ka: b for ka, b in spec.blocks.items() if not (ka[0].startswith(attn) and ka[0][len(attn):][0] in "qk")}
    wrong = PermutationSpec(axes, None, blocks, {**spec.structure, "QK": (heads, D)}, spec.concat, spec.grouped)
    with pytest.raises(RebasinError, match="the spec is wrong for this model"):
        wrong.check(model, _X)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_weight_matching_recovers_a_planted_permutation(traced, name):
    model, spec = traced[name]
    state_a = _randomised(model, seed=4)
    planted = random_permutation(spec, seed=7)
    state_b = permute(spec, planted, state_a)
    got = rebasin.weight_matching(spec, state_a, state_b, seed=0)
    perms = got if isinstance(got, dict) else got.perms
    back = permute(spec, perms, state_b)
    for key in state_a:
        torch.testing.assert_close(back[key], state_a[key], rtol=0, atol=0)


def test_unreadable_head_count_is_refused_naming_the_module():
    model = _build("llama")
    model.config.num_attention_heads = 3  # 32 query units do not split into 3 heads
    with pytest.raises(RebasinError, match=r"attention 'model\.layers\.0\.self_attn'.*3 query heads"):
        rebasin.spec_from_model(model, _X, check=False)
    cfg = model.config
    readable = {k: v for k, v in cfg.to_dict().items() if k != "num_attention_heads"}
    model.model.layers[0].self_attn.config = types.SimpleNamespace(**readable, _attn_implementation="sdpa")
    cfg.num_attention_heads = HEADS
    with pytest.raises(RebasinError, match=r"cannot read the number of attention heads.*model\.layers\.0\.self_attn"):
        rebasin.spec_from_model(model, _X, check=False)


# --------------------------------------------------------------------------- RMSNorm and reductions, plain torch
class _HandRMSNorm(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class _RMSBlock(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(5, 12), norm(12), nn.Linear(12, 3)
        self.gate, self.up, self.down = nn.Linear(12, 16), nn.Linear(12, 16), nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        n = self.norm(h)
        h = h + self.down(nn.functional.silu(self.gate(n)) * self.up(n))
        return self.out(h - h.mean(-1, keepdim=True))  # a hand-written centring: a symmetric reduction too


@pytest.mark.parametrize("norm", [_HandRMSNorm] + ([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))
def test_rmsnorm_in_both_forms_and_symmetric_reductions_trace(norm):
    torch.manual_seed(0)
    model = _RMSBlock(norm)
    spec = rebasin.spec_from_model(model, torch.randn(4, 5))
    hidden = spec.axes["inp.weight"][0]
    assert hidden is not None and spec.axes["norm.weight"] == (hidden,) == (spec.axes["out.weight"][1],)
    assert spec.axes["gate.weight"][0] == spec.axes["up.weight"][0] is not None


def test_a_reduction_over_heads_that_keeps_the_units_inside_them_is_refused():
    class SumHeads(nn.Module):  # per-head units summed over heads: depends on which units each head permutes
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 12), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x).view(x.shape[0], 4, 3)
            return self.b(h.sum(1))

    with pytest.raises(RebasinError, match="separated from their head axis"):
        rebasin.spec_from_model(SumHeads(), torch.randn(2, 5), strict=True)
    with pytest.warns(rebasin.RebasinWarning, match="separated from their head axis"):
        spec = rebasin.spec_from_model(SumHeads(), torch.randn(2, 5))
    assert spec.coverage.modules["a"] == (0, 12)
