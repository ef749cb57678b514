"""Activation matching inside nn.MultiheadAttention and the nn.Transformer* layers (units the trace keeps whole).

The q/k/v units, the attention output before ``out_proj`` and the feed-forward units are recomputed from each
module's captured inputs and the state's weights; a planted permutation of every class (heads, units inside
heads, feed-forward units, the residual stream) is recovered exactly, and on two unrelated models the result
leaves B's function unchanged.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from builders import randomize_norms_
from torch import nn
from torch.testing import assert_close

from rebasin import RebasinError, invert, permute, random_permutation, spec_from_model
from rebasin.matching import activation_matching
from rebasin.trace import RuleContext, register_module, registration_scope


class EncoderViT(nn.Module):
    """Patch embedding, class token, positions, ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer``, head."""

    def __init__(self, *, batch_first: bool, norm_first: bool, width: int = 8, heads: int = 2, depth: int = 2,
                 seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.batch_first = batch_first
        self.embed = nn.Linear(6, width)
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, width))
        self.pos = nn.Parameter(0.5 * torch.randn(1, 5, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu",
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.last = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu",
                                               batch_first=batch_first, norm_first=norm_first)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.last(self.encoder(h))
        return self.head(h[:, 0] if self.batch_first else h[0])


def _data(n: int = 64, seed: int = 1) -> list[torch.Tensor]:
    x = torch.randn(n, 4, 6, generator=torch.Generator().manual_seed(seed))
    return [x[: n // 2], x[n // 2 :]]


def _planted(model: nn.Module, x: torch.Tensor, seed: int = 3):
    spec = spec_from_model(model, x[:2])
    pi = random_permutation(spec, seed=seed)
    model_b = copy.deepcopy(model)
    model_b.load_state_dict(permute(spec, pi, model.state_dict()))
    return spec, pi, model_b


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_planted_encoder_vit_is_recovered_exactly(batch_first, norm_first):
    model = randomize_norms_(EncoderViT(batch_first=batch_first, norm_first=norm_first), seed=2).eval()
    loader = _data()
    spec, pi, model_b = _planted(model, loader[0])
    assert len(spec.structure) == 6  # q/k and v/o of three attention modules, structured by heads
    perms, info = activation_matching(model, model_b, loader, return_info=True)
    for name, want in invert(pi).items():
        assert torch.equal(perms[name], want), name
    back = permute(spec, perms, model_b.state_dict())
    for k, v in model.state_dict().items():
        assert_close(back[k], v, rtol=0, atol=0, msg=k)
    assert min(info.corr_after.values()) == pytest.approx(1.0, abs=1e-9)
    # the units inside the attention modules pool the q and k (resp. v and pre-out_proj) activations of
    # 64 inputs x 5 tokens: 2 x 320 samples each
    qk = [p for p in spec.structure if spec.concat and any(p == parts[0][0] for parts in spec.concat.values())]
    assert {info.num_samples[p] for p in qk} == {640}


@pytest.mark.parametrize("norm_first", [True, False])
def test_unrelated_encoder_vits_keep_b_s_function(norm_first):
    model_a = randomize_norms_(EncoderViT(batch_first=True, norm_first=norm_first, seed=0), seed=1).eval()
    model_b = randomize_norms_(EncoderViT(batch_first=True, norm_first=norm_first, seed=5), seed=6).eval()
    loader = _data()
    spec = spec_from_model(model_a, loader[0][:2])
    perms = activation_matching(model_a, model_b, loader)
    moved = copy.deepcopy(model_b)
    moved.load_state_dict(permute(spec, perms, model_b.state_dict()))
    x = loader[1]
    with torch.no_grad():
        assert_close(moved(x), model_b(x), rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in perms.values())


class Seq2Seq(nn.Module):
    """``nn.Transformer`` (encoder and decoder) with a causal target mask and a key padding mask."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.src, self.tgt = nn.Linear(6, 8), nn.Linear(6, 8)
        self.net = nn.Transformer(8, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=12,
                                  dropout=0.0, activation="gelu", batch_first=True)
        self.out = nn.Linear(8, 3)
        self.register_buffer("causal", torch.ones(4, 4, dtype=torch.bool).triu(1))  # True: not attended

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (torch.arange(x.shape[1], device=x.device) == x.shape[1] - 1).expand(x.shape[0], -1)  # the last token
        h = self.net(self.src(x), self.tgt(x), tgt_mask=self.causal, src_key_padding_mask=pad)
        return self.out(h.mean(1))


def test_planted_transformer_with_masks_is_recovered_exactly():
    model = randomize_norms_(Seq2Seq(), seed=1).eval()
    loader = _data()
    spec, pi, model_b = _planted(model, loader[0])
    perms = activation_matching(model, model_b, loader)
    for name, want in invert(pi).items():
        assert torch.equal(perms[name], want), name


class KVAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate key/value widths (q/k/v projection weights of their own) and a
    decoder layer reading a memory."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.kv = nn.Linear(6, 8), nn.Linear(6, 4)
        self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True, add_bias_kv=True)
        self.dec = nn.TransformerDecoderLayer(8, 2, 12, dropout=0.0, activation="gelu", batch_first=True,
                                              norm_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.kv(x)
        h = self.attn(self.q(x), kv, kv, need_weights=False)[0]
        return self.out(self.dec(h, h).mean(1))


def test_planted_attention_with_separate_projections_and_a_decoder_layer_is_recovered_exactly():
    model = randomize_norms_(KVAttention(), seed=2).eval()
    loader = _data()
    spec, pi, model_b = _planted(model, loader[0])
    assert "attn.q_proj_weight" in spec.axes
    perms = activation_matching(model, model_b, loader)
    for name, want in invert(pi).items():
        assert torch.equal(perms[name], want), name


def test_models_are_not_mutated():
    model_a = EncoderViT(batch_first=True, norm_first=True, seed=0).eval()
    model_b = EncoderViT(batch_first=True, norm_first=True, seed=1).train()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model_a, model_b)]
    flags = [[m.training for m in model.modules()] for model in (model_a, model_b)]
    activation_matching(model_a, model_b, _data())
    for model, state, flag in zip((model_a, model_b), before, flags):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert [m.training for m in model.modules()] == flag
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class PackedPair(nn.Module):
    """``x * sum(q * k)`` with q;k packed in one weight: its units exist only inside the module."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2 * hidden, width) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = (x @ self.w.T).chunk(2, dim=-1)
        return x * (q * k).sum(-1, keepdim=True)


def _packed_rule(ctx: RuleContext) -> tuple:
    x = ctx.input
    n = ctx.tensor("w").shape[0] // 2
    hidden = ctx.new_permutation(size=n)
    ctx.assign("w", (ctx.concat([(hidden, n), (hidden, n)]), x[-1]))
    return x


def test_units_only_inside_a_packed_weight_of_an_unknown_leaf_are_refused_by_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), PackedPair(8, 4), nn.Linear(8, 2))
    x = torch.randn(8, 6)
    with registration_scope():
        register_module(PackedPair, rule=_packed_rule)
        with pytest.raises(RebasinError, match=r"'P1'.*acts only inside the concatenation\(s\) \['C0'\].*weight_matching"):
            activation_matching(model, model, [x])


@pytest.mark.parametrize("make", [lambda: EncoderViT(batch_first=False, norm_first=False), Seq2Seq, KVAttention])
def test_recomputed_module_outputs_equal_the_modules_own(make):
    # the inner activations come from a re-implementation of each module's forward: its output must be the
    # module's (masks, bias_k/v, separate projections, post- and pre-norm, the encoder's nested-tensor path)
    from rebasin.matching._inner_activations import inner_probes
    from rebasin.trace import trace_model

    model = randomize_norms_(make(), seed=3).eval()
    x = _data()[0]
    tr = trace_model(model, x[:2])
    probes = inner_probes(tr)
    assert probes
    state = model.state_dict()
    nodes = {n.name: n for n in tr.graph_module.graph.nodes}
    for probe in probes:
        # the module's output node (nn.MultiheadAttention returns a pair: the getitem of its first element)
        out_node = probe.node
        if isinstance(probe.module, nn.MultiheadAttention):
            out_node = next(u.name for u in nodes[probe.node].users if u.target is operator.getitem and u.args[1] == 0)
        with torch.no_grad():
            got = tr.capture(state, x, [*probe.inputs, out_node])
            seen: list[str] = []
            out = probe.run(state, got, lambda p, _t, seen=seen: seen.append(p))
        assert_close(out, got[out_node], rtol=1e-5, atol=1e-5)
        assert set(seen) == set(probe.perms)
