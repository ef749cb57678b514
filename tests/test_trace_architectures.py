"""spec_from_model on the architectures of issue 13: attention, transformers, grouped / depthwise convolutions,
GroupNorm with groups, recurrent layers.

Each family is traced (with the built-in functional check) and checked again with other random permutations
and randomised norm statistics (``spec.check``); structured permutations are checked to really move heads and
units inside heads; what the spec cannot express is refused naming the node; nothing is left silently
unpermuted.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from builders import refused_then_pinned
from torch import nn
from torch.func import functional_call

import rebasin
from rebasin import RebasinWarning, spec_from_model
from rebasin.spec import invert, permute, random_permutation, split_structured


def _traced(model: nn.Module, x, seeds=(1, 2, 3)):
    """The traced spec, after checking equivalence for several random permutations and norm statistics."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RebasinWarning)
        spec = spec_from_model(model, x)
    for s in seeds:
        spec.check(model, x, seed=s, atol=1e-5, rtol=1e-5)
    return spec


def _assert_heads_move(spec, seed=0):
    """Every structure's outer permutation and its within-block permutations are drawn non-trivially."""
    assert spec.structure, "no structured permutation in the spec"
    moved_outer = moved_inner = False
    for s in range(seed, seed + 5):
        perms = random_permutation(spec, seed=s)
        for p, (_outer, d) in spec.structure.items():
            o, inner = split_structured(perms[p], d)
            moved_outer |= not torch.equal(o, torch.arange(len(o)))
            moved_inner |= not torch.equal(inner, torch.arange(d).expand(len(o), d))
    assert moved_outer and moved_inner


# --------------------------------------------------------------------------- attention
class _MHA(nn.Module):
    def __init__(self, batch_first=True, kdim=None, bias=True, add_bias_kv=False, masks=False, weights=False):
        super().__init__()
        self.bf, self.masks, self.weights = batch_first, masks, weights
        self.emb = nn.Linear(5, 16)
        self.mem = nn.Linear(3, kdim or 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias,
                                          add_bias_kv=add_bias_kv)
        self.cross = kdim is not None
        self.head = nn.Linear(16, 2)
        self.register_buffer("causal", torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), persistent=False)

    def forward(self, x, pad=None):
        h = self.emb(x)
        seq = h if self.bf else h.transpose(0, 1)
        if self.cross:
            m = self.mem(x[..., :3])
            m = m if self.bf else m.transpose(0, 1)
            a, w = self.attn(seq, m, m)
        elif self.masks:
            a, w = self.attn(seq, seq, seq, key_padding_mask=pad, attn_mask=self.causal, need_weights=self.weights)
        else:
            a, w = self.attn(seq, seq, seq)
        a = a if self.bf else a.transpose(0, 1)
        out = self.head(F.relu(a + h))
        return (out, w) if self.weights else out


_X = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0))
_PAD = torch.zeros(2, 6, dtype=torch.bool)
_PAD[0, -2:] = True

MHA_CASES = {
    "packed": (lambda: _MHA(), _X),
    "packed-seq-first": (lambda: _MHA(batch_first=False), _X),
    "separate-kdim-vdim": (lambda: _MHA(kdim=8), _X),
    "separate-seq-first": (lambda: _MHA(batch_first=False, kdim=8), _X),
    "no-bias": (lambda: _MHA(bias=False), _X),
    "add-bias-kv": (lambda: _MHA(add_bias_kv=True), _X),
    "masks": (lambda: _MHA(masks=True), (_X, _PAD)),
    "masks-seq-first": (lambda: _MHA(batch_first=False, masks=True), (_X, _PAD)),
    "need-weights": (lambda: _MHA(masks=True, weights=True), (_X, _PAD)),
}


@pytest.mark.parametrize("name", list(MHA_CASES))
def test_multihead_attention_is_exact_and_moves_heads(name):
    torch.manual_seed(0)
    make, x = MHA_CASES[name]
    model = make()
    spec = _traced(model, x)
    _assert_heads_move(spec)
    w = spec.axes["attn.out_proj.weight"][1]
    assert w in spec.structure and spec.structure[w][1] == 4
    if model.attn._qkv_same_embed_dim:
        packed = spec.axes["attn.in_proj_weight"][0]
        (q, _), (k, _), (v, _) = spec.concat[packed]
        assert q == k and v == w and spec.structure[q][0] == spec.structure[v][0]
    else:
        assert spec.axes["attn.q_proj_weight"][0] == spec.axes["attn.k_proj_weight"][0]
        assert spec.axes["attn.v_proj_weight"][0] == w
        assert spec.axes["attn.k_proj_weight"][1] == spec.axes["mem.weight"][0]
    if name == "add-bias-kv":
        assert spec.axes["attn.bias_v"] == (None, None, w)


def test_multihead_attention_permuted_by_hand_gives_the_same_output():
    """Beyond spec.check: permute the weights and compare to the unpermuted model directly (relative 1e-5)."""
    torch.manual_seed(3)
    model = _MHA(masks=True).eval()
    spec = spec_from_model(model, (_X, _PAD))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    perms = random_permutation(spec, seed=11)
    y0 = model(_X, _PAD)
    y1 = functional_call(model, permute(spec, perms, state), (_X, _PAD))
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)


def test_multihead_attention_weight_matching_recovers_a_planted_permutation():
    torch.manual_seed(5)
    model = _MHA().eval()
    spec = spec_from_model(model, _X)
    state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    planted = random_permutation(spec, seed=7)
    state_b = permute(spec, planted, state_a)
    found = rebasin.weight_matching(spec, state_a, state_b, seed=0)
    back = permute(spec, found, state_b)
    worst = max(float((back[k] - state_a[k]).abs().max()) for k in state_a)
    assert worst <= 1e-5


def test_cross_attention_with_packed_weights_shares_the_streams_permutation():
    """kdim == embed_dim: one in_proj_weight reads both streams, so they carry one permutation."""
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 16), nn.Linear(5, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            h, m = self.a(x), self.b(x)
            return self.head(self.attn(h, m, m)[0] + h)

    spec = _traced(Cross(), _X)
    assert spec.axes["a.weight"][0] == spec.axes["b.weight"][0] == spec.axes["attn.in_proj_weight"][1]


# --------------------------------------------------------------------------- transformers
def _encoder(norm_first, batch_first=True, activation="relu"):
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first,
                                       activation=activation)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if norm_first else None,
                                 enable_nested_tensor=False)


class _Seq2(nn.Module):
    def __init__(self, body, batch_first=True):
        super().__init__()
        self.emb, self.body, self.head, self.bf = nn.Linear(5, 16), body, nn.Linear(16, 2), batch_first

    def forward(self, x):
        h = self.emb(x)
        h = self.body(h if self.bf else h.transpose(0, 1))
        return self.head(h if self.bf else h.transpose(0, 1))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_is_exact(norm_first, batch_first):
    torch.manual_seed(1)
    model = _Seq2(_encoder(norm_first, batch_first, "gelu" if norm_first else "relu"), batch_first)
    spec = _traced(model, _X)
    _assert_heads_move(spec)
    r = spec.axes["emb.weight"][0]
    assert r is not None
    for i in range(2):
        p = f"body.layers.{i}."
        assert spec.axes[p + "norm1.weight"] == (r,) and spec.axes[p + "linear2.weight"][0] == r
        assert spec.axes[p + "self_attn.out_proj.weight"][0] == r
        hidden = spec.axes[p + "linear1.weight"][0]
        assert hidden is not None and spec.axes[p + "linear2.weight"][1] == hidden
    if norm_first:
        assert spec.axes["body.norm.weight"] == (r,)


def test_transformer_decoder_layer_is_exact():
    class Dec(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 16), nn.Linear(5, 16)
            self.dec = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.dec(self.a(x), self.b(x)))

    torch.manual_seed(2)
    spec = _traced(Dec(), _X)
    _assert_heads_move(spec)
    assert spec.axes["dec.multihead_attn.in_proj_weight"][1] == spec.axes["b.weight"][0] == spec.axes["a.weight"][0]


def test_full_transformer_is_exact():
    class Tr(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 16), nn.Linear(5, 16)
            self.tr = nn.Transformer(16, 2, 1, 1, 24, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.tr(self.a(x), self.b(x)))

    torch.manual_seed(4)
    spec = _traced(Tr(), _X)
    _assert_heads_move(spec)


def test_transformer_layer_with_an_unknown_activation_is_refused_by_name():
    class Odd(nn.Module):  # not elementwise: mixes the hidden units
        def forward(self, x):
            return x - x.mean(-1, keepdim=True)

    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, activation=Odd())
    refused_then_pinned(_Seq2(layer), _X, r"body \(TransformerEncoderLayer, tests/test_trace_architectures\.py:\d+\)",
                        "not known to be elementwise", ["body"])


# --------------------------------------------------------------------------- grouped convolutions, GroupNorm
class _ResNeXtBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.b1 = nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)))
        return self.head(F.relu(x + self.b3(self.c3(h))).mean((2, 3)))


class _InvertedResidual(nn.Module):
    def __init__(self, multiplier):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand, self.b1 = nn.Conv2d(8, 24, 1), nn.BatchNorm2d(24)
        self.dw, self.b2 = nn.Conv2d(24, 24 * multiplier, 3, padding=1, groups=24), nn.BatchNorm2d(24 * multiplier)
        self.project, self.b3 = nn.Conv2d(24 * multiplier, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        h = F.relu6(self.b1(self.expand(x)))
        h = F.relu6(self.b2(self.dw(h)))
        return self.head((x + self.b3(self.project(h))).mean((2, 3)))


_IMG = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_resnext_block_groups_move_together():
    torch.manual_seed(0)
    spec = _traced(_ResNeXtBlock(), _IMG)
    _assert_heads_move(spec)
    p_in, p_out = spec.axes["c2.weight"][1], spec.axes["c2.weight"][0]
    assert spec.grouped[("c2.weight", 1)] == 4
    assert spec.structure[p_in] == (spec.structure[p_out][0], 8) and spec.structure[p_out][1] == 8
    assert spec.axes["c1.weight"][0] == p_in and spec.axes["c3.weight"][1] == p_out


@pytest.mark.parametrize("multiplier", [1, 2])
def test_mobilenet_inverted_residual_depthwise(multiplier):
    torch.manual_seed(0)
    spec = _traced(_InvertedResidual(multiplier), _IMG)
    hidden = spec.axes["expand.weight"][0]
    assert spec.axes["dw.weight"][1] is None
    if multiplier == 1:
        assert spec.axes["dw.weight"][0] == hidden
    else:
        out = spec.axes["dw.weight"][0]
        assert spec.structure[out] == (hidden, 2)
        _assert_heads_move(spec)


def test_group_norm_with_groups_structures_the_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    spec = _traced(model, _IMG)
    p = spec.axes["0.weight"][0]
    assert spec.structure[p][1] == 4 and spec.axes["1.weight"] == (p,)
    _assert_heads_move(spec)


def test_group_norm_after_a_grouped_conv_with_the_same_groups_unifies():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4), nn.GroupNorm(4, 16),
                          nn.ReLU(), nn.Conv2d(16, 4, 1))
    spec = _traced(model, _IMG)
    assert spec.axes["3.weight"] == (spec.axes["2.weight"][0],)


def test_grouped_conv_on_the_model_input_permutes_inside_each_group():
    model = nn.Sequential(nn.Conv2d(4, 16, 3, groups=2), nn.ReLU(), nn.Conv2d(16, 4, 1))
    spec = _traced(model, torch.randn(2, 4, 8, 8))
    c = spec.axes["0.weight"][0]
    assert [n for _, n in spec.concat[c]] == [8, 8]


def test_grouped_transposed_conv_and_functional_forms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.ConvTranspose2d(16, 8, 3, groups=4), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    spec = _traced(model, _IMG)
    assert spec.grouped[("2.weight", 1)] == 4

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 2, 1)
            self.w = nn.Parameter(torch.randn(16, 4, 3, 3))
            self.gw, self.gb = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))

        def forward(self, x):
            h = F.conv2d(self.a(x), self.w, groups=4)
            return self.c(F.relu(F.group_norm(h, 4, self.gw, self.gb)))

    spec = _traced(Functional(), _IMG)
    assert spec.grouped[("w", 1)] == 4 and spec.structure[spec.axes["gw"][0]][1] == 4


@pytest.mark.parametrize("middle, node, what, pinned", [
    (lambda: nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.GroupNorm(2, 16)), r"body\.1 \(GroupNorm",
     "nested groups", ["a", "body.0"]),
    (lambda: nn.Conv2d(16, 4, 1, groups=4), r"body \(Conv2d", "one output channel per group", ["a"]),
    (lambda: nn.ConvTranspose2d(16, 32, 1, groups=16), r"body \(ConvTranspose2d", "output channels per input channel",
     ["a"]),
])
def test_group_structures_the_spec_cannot_express_are_refused_by_name(middle, node, what, pinned):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.body, self.head = nn.Conv2d(3, 16, 1), middle(), nn.LazyLinear(2)

        def forward(self, x):
            return self.head(F.relu(self.body(F.relu(self.a(x)))).mean((2, 3)))

    net = Net()
    net(_IMG)
    refused_then_pinned(net, _IMG, node + r", tests/test_trace_architectures\.py:\d+\)", what, pinned)


# --------------------------------------------------------------------------- recurrent layers
class _Recurrent(nn.Module):
    def __init__(self, cls, layers=1, bidirectional=False, batch_first=True, embed=True, proj=0):
        super().__init__()
        self.bf, self.embed_on = batch_first, embed
        self.emb = nn.Linear(5, 8)
        kw = {"proj_size": proj} if proj else {}
        self.rnn = cls(8 if embed else 5, 6, num_layers=layers, bidirectional=bidirectional,
                       batch_first=batch_first, **kw)
        self.head = nn.Linear((proj or 6) * (2 if bidirectional else 1), 3)

    def forward(self, x):
        h = self.emb(x) if self.embed_on else x
        out, _ = self.rnn(h if self.bf else h.transpose(0, 1))
        return self.head(out[:, -1] if self.bf else out[-1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("layers, bidirectional, batch_first", [(1, False, True), (2, False, True),
                                                                  (1, True, False), (2, True, True)])
def test_recurrent_layers_are_exact_and_permute_the_hidden_units(cls, layers, bidirectional, batch_first):
    torch.manual_seed(0)
    model = _Recurrent(cls, layers, bidirectional, batch_first)
    spec = _traced(model, _X)
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cls]
    for layer in range(layers):
        for sfx in ("", "_reverse") if bidirectional else ("",):
            rows, cols = spec.axes[f"rnn.weight_hh_l{layer}{sfx}"]
            hidden = cols
            assert hidden is not None and hidden in spec.perms
            assert (spec.concat[rows] if gates > 1 else ((rows, 6),)) == ((hidden, 6),) * gates
    assert spec.axes["emb.weight"][0] == spec.axes["rnn.weight_ih_l0"][1]


def test_lstm_with_projections_is_exact():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # oneDNN has no projections
        spec = _traced(_Recurrent(nn.LSTM, 2, True, proj=4), _X)
    assert spec.axes["rnn.weight_hr_l0"][0] == spec.axes["rnn.weight_hh_l0"][1]


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_a_model_starting_with_a_recurrent_layer_gets_permutations(cls):
    spec = _traced(_Recurrent(cls, embed=False), _X)
    assert spec.perms and spec.axes["rnn.weight_hh_l0"][1] in spec.perms
    assert spec.axes["rnn.weight_ih_l0"][1] is None


def test_recurrent_final_state_of_several_layers_is_refused_by_name():
    class Last(nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.rnn, self.head = nn.GRU(5, 6, num_layers=layers, batch_first=True), nn.Linear(6, 2)

        def forward(self, x):
            _, h = self.rnn(x)
            return self.head(h[-1])

    spec = _traced(Last(1), _X)  # one layer, one direction: h_n carries the hidden permutation
    assert spec.axes["head.weight"][1] == spec.axes["rnn.weight_hh_l0"][1]
    refused_then_pinned(Last(2), _X, r"rnn \(GRU, tests/test_trace_architectures\.py:\d+\)", "stack 2 layer", ["rnn"])


def test_recurrent_initial_state_of_several_layers_with_a_permutation_is_refused():
    class Init(nn.Module):
        def __init__(self):
            super().__init__()
            self.h0 = nn.Linear(5, 6)
            self.rnn, self.head = nn.RNN(5, 6, num_layers=2, batch_first=True), nn.Linear(6, 2)

        def forward(self, x):
            h0 = torch.tanh(self.h0(x[:, 0])).unsqueeze(0).expand(2, -1, -1).contiguous()
            out, _ = self.rnn(x, h0)
            return self.head(out[:, -1])

    refused_then_pinned(Init(), _X, r"rnn \(RNN, tests/test_trace_architectures\.py:\d+\)", "initial state", ["h0"])


# --------------------------------------------------------------------------- bad input, never silent
def test_head_dim_must_divide_the_width():
    with pytest.raises(AssertionError, match="divisible"):  # torch validates this itself
        nn.MultiheadAttention(10, 3)


def test_attention_mask_varying_along_the_permuted_head_axis_is_refused():
    class Hand(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
            self.register_buffer("bias", torch.randn(1, 2, 6, 6))  # one additive mask per head

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (f(x).view(b, t, 2, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
            return self.out(y.transpose(1, 2).reshape(b, t, 8))

    refused_then_pinned(Hand(), torch.randn(2, 6, 8), r"torch\.nn\.functional\.scaled_dot_product_attention in "
                        r"Hand\.forward \(tests/test_trace_architectures\.py:\d+\)", "mask", ["q"])


def test_weights_no_rule_claims_are_reported_by_module():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 7))
            self.head = nn.Linear(7, 2)

        def forward(self, x):
            return self.head(torch.mm(x, self.w))  # an op the tracer has no rule for

    with pytest.warns(RebasinWarning, match=r"- Opaque \(the model itself\): 5 unit\(s\) pinned: no rule gave "
                      r"permutations to its weights \(w\)"):
        spec_from_model(Opaque(), torch.randn(3, 5))


def test_align_with_a_spec_without_permutations_warns():
    a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    with pytest.warns(RebasinWarning, match="no permutations: nothing to align"):
        res = rebasin.align(a, b, example_input=torch.randn(2, 4))
    assert res.perms == {}


def test_permuted_heads_are_really_moved_in_the_weights():
    """The permuted state differs from the original in the attention projection (not left as identity)."""
    model = _MHA().eval()
    spec = spec_from_model(model, _X)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    perms = random_permutation(spec, seed=2)
    out = permute(spec, perms, state)
    assert not torch.equal(out["attn.in_proj_weight"], state["attn.in_proj_weight"])
    back = permute(spec, invert(perms), out)
    assert all(torch.equal(back[k], state[k]) for k in state)


class _WithState(nn.Module):
    def __init__(self, cls, layers, init):
        super().__init__()
        self.init, self.layers, self.lstm = init, layers, cls is nn.LSTM
        self.h0 = nn.Linear(5, 6)
        self.rnn, self.head = cls(5, 6, num_layers=layers, batch_first=True), nn.Linear(6, 2)

    def forward(self, x):
        if self.init == "zeros":
            h0 = torch.zeros(self.layers, 2, 6)
        elif self.init == "input":
            h0 = x[:, : self.layers, :1].transpose(0, 1).expand(self.layers, 2, 6).contiguous()
        else:
            h0 = torch.tanh(self.h0(x[:, 0])).unsqueeze(0)
        out, _ = self.rnn(x, (h0, h0) if self.lstm else h0)
        return self.head(out[:, -1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("layers, init", [(1, "zeros"), (2, "zeros"), (1, "input"), (2, "input"), (1, "linear")])
def test_recurrent_initial_states(cls, layers, init):
    """Zeros leave every permutation free; a fixed state keeps the hidden units in place; a computed state
    of one layer carries the hidden permutation (the pinned units are reported, never silent)."""
    if init == "input":
        with pytest.warns(RebasinWarning, match=r"- rnn: \d+ unit\(s\) pinned: rnn \(\w+, tests/test_trace_architectures"
                          r"\.py:\d+\): the initial state passed in"):
            spec = spec_from_model(_WithState(cls, layers, init).eval(), _X)
        assert spec.coverage.modules["rnn"] == (0, 6 * layers)
    else:
        spec = _traced(_WithState(cls, layers, init), _X)
    hidden = spec.axes["rnn.weight_hh_l0"][1]
    if init == "input":
        assert hidden is None
    else:
        assert hidden is not None
    if init == "linear":
        assert spec.axes["h0.weight"][0] == hidden


def test_transformer_encoder_fast_path_with_a_padding_mask_is_exact():
    """Default encoder (nested-tensor fast path in eval mode) with a key padding mask passed in."""
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
            self.emb, self.enc, self.head = nn.Linear(5, 16), nn.TransformerEncoder(layer, 2), nn.Linear(16, 2)

        def forward(self, x, pad):
            return self.head(self.enc(self.emb(x), src_key_padding_mask=pad))

    torch.manual_seed(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note about enable_nested_tensor
        spec = _traced(Enc(), (_X, _PAD))
    _assert_heads_move(spec)
