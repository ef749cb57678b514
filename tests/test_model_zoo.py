"""The model zoo: today's vision and language families trace exactly and align, from tiny configs with random weights.

For every model: ``spec_from_model`` returns a spec that passes ``spec.check`` (a random permutation, with
norm weights / biases / statistics randomised first, leaves the outputs unchanged), a random permutation
drawn from the spec and applied to the weights is recovered by ``weight_matching``, and the units that
should move do move (heads, tokens-mixing units, ...). Models come from ``torchvision`` and ``transformers``
(tiny configs, nothing downloaded) or are written here in plain PyTorch (MLP-Mixer, einsum attention,
a timm-style DropPath).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from builders import benchmark_module, heads_and_units_moved
from torch import nn

import rebasin
from rebasin import RebasinError
from rebasin.spec.core import permute, random_permutation
from rebasin.trace import trace_model

tv = pytest.importorskip("torchvision")
T = pytest.importorskip("transformers")

from rebasin.trace import hf_rules

# trace_model registers the transformers rules the first time it meets one; register them at import so the
# conftest guard against registry leaks sees them before any test.
hf_rules.register()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- the zoo
# the models are shared with benchmarks/model_zoo.py (its table of coverage, equivalence and planted recovery)
_zoo = benchmark_module("_zoo")
Mixer, _images = _zoo.Mixer, _zoo.images
convnext, efficientnet, swin_torchvision, swin_hf = _zoo.convnext, _zoo.efficientnet, _zoo.swin_torchvision, _zoo.swin_hf
t5, clip, whisper, mixer, einsum_net, shufflenet = _zoo.t5, _zoo.clip, _zoo.whisper, _zoo.mixer, _zoo.einsum_net, _zoo.shufflenet

ZOO = {"convnext": convnext, "efficientnet": efficientnet, "swin_torchvision": swin_torchvision,
       "swin_hf": swin_hf, "t5": t5, "clip": clip, "whisper": whisper, "einsum": einsum_net}


def _build(name, seed=0):
    torch.manual_seed(seed)
    model, x = ZOO[name]()
    return model.eval(), x


@pytest.fixture(scope="module")
def traced():
    out = {}
    for name in ZOO:
        model, x = _build(name)
        with warnings.catch_warnings():
            warnings.simplefilter("error", rebasin.RebasinWarning)  # no weight is left without a rule
            out[name] = (model, x, trace_model(model, x))
    return out


@pytest.mark.parametrize("name", list(ZOO))
def test_equivalent_with_randomised_norms(traced, name):
    model, x, tr = traced[name]
    spec = tr.spec
    assert set(spec.axes) == set(model.state_dict())
    assert spec.perms, "nothing permutable"
    for seed in (1, 2):
        assert spec.check(model, x, seed=seed) <= 1e-4


# EfficientNet: coordinate descent from the identity stops in a local optimum (the squeeze-excitation units: its
# first 1x1 convolution, initialised with fan-out scaling, has weights ~4x larger than its neighbours, so a wrong
# squeeze permutation misleads the expansion units' assignment and vice versa). The spec is exact (the check
# passes); the planted permutation is a fixed point of the descent, which the test below asserts instead.
COLD_START = [n for n in ZOO if n != "efficientnet"]


def _planted(spec, state_a, seed=7):
    planted = random_permutation(spec, seed=seed)
    state_b = permute(spec, planted, state_a)
    moved = [k for k, v in state_a.items() if v.is_floating_point() and not torch.equal(state_b[k], v)]
    assert moved, "the planted permutation moved nothing"
    return planted, state_b


def _assert_recovered(spec, result, state_a, state_b):
    back = permute(spec, result, state_b)
    for k, v in state_a.items():
        torch.testing.assert_close(back[k], v, atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("name", COLD_START)
def test_weight_matching_recovers_planted_permutation(traced, name):
    model, _, tr = traced[name]
    state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _, state_b = _planted(tr.spec, state_a)
    _assert_recovered(tr.spec, rebasin.weight_matching(tr.spec, state_a, state_b, seed=0), state_a, state_b)


def test_efficientnet_planted_permutation_is_a_fixed_point(traced):
    model, _, tr = traced["efficientnet"]
    state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    planted, state_b = _planted(tr.spec, state_a)
    truth = {p: torch.argsort(v) for p, v in planted.items()}
    _assert_recovered(tr.spec, rebasin.weight_matching(tr.spec, state_a, state_b, init=truth, seed=0), state_a,
                      state_b)


@pytest.mark.parametrize("name", ["convnext", "einsum"])
def test_activation_matching_recovers_planted_permutation(traced, name):
    # the einsum rule tells activation matching which activations a weight reads; window attention (a function
    # kept whole) has no node for its heads, so torchvision's Swin is weight matching's (as nn.MultiheadAttention)
    model, x, tr = traced[name]
    other, _ = _build(name)
    other.load_state_dict(permute(tr.spec, random_permutation(tr.spec, seed=5), model.state_dict()))
    result = rebasin.activation_matching(model, other, [x, x], example_input=x)
    _assert_recovered(tr.spec, result, model.state_dict(), other.state_dict())


@pytest.mark.parametrize("name", ["swin_torchvision", "swin_hf", "t5", "clip", "whisper", "einsum"])
def test_attention_heads_are_structured_and_move(traced, name):
    spec = traced[name][2].spec
    assert spec.structure
    heads, units = heads_and_units_moved(spec, random_permutation(spec, seed=3))
    assert heads > 0 and units > 0


def test_t5_relative_bias_follows_the_heads(traced):
    spec = traced["t5"][2].spec
    ax = spec.axes
    enc = "model.encoder.block.{}.layer.0.SelfAttention."
    table = ax[enc.format(0) + "relative_attention_bias.weight"]
    assert table[0] is None and table[1] is not None
    # the bias computed by the first layer is reused by every layer: one head permutation for the encoder
    outer = {spec.structure[ax[enc.format(i) + "q.weight"][0]][0] for i in range(2)}
    assert outer == {table[1]}
    assert ax["model.encoder.block.0.layer.0.layer_norm.weight"] == (ax["model.shared.weight"][1],)


def test_swin_relative_bias_tables_follow_the_heads(traced):
    for name, table_key, q_key in (
            ("swin_hf", "model.swin.encoder.layers.0.blocks.1.attention.relative_position_bias."
                        "relative_position_bias_table",
             "model.swin.encoder.layers.0.blocks.1.attention.q_proj.weight"),
            ("swin_torchvision", "features.1.1.attn.relative_position_bias_table", "features.1.1.attn.qkv.weight")):
        spec = traced[name][2].spec
        table = spec.axes[table_key]
        q = spec.axes[q_key][0]
        q = spec.concat[q][0][0] if q in spec.concat else q
        assert table[0] is None and table[1] == spec.structure[q][0], name


def test_mixer_token_and_channel_units_move():
    spec = _trace_pinned("mixer").spec
    ax = spec.axes
    token, channel = ax["blocks.0.token1.weight"], ax["blocks.0.chan1.weight"]
    # token mixing: hidden token units permutable, the patch axis (fixed by the patch order) is not
    assert token[0] is not None and token[1] is None and ax["blocks.0.token2.weight"] == (None, token[0])
    # channel mixing: hidden units permutable, its input is the residual stream (the stem's channels)
    stream = ax["stem.weight"][0]
    assert channel == (channel[0], stream) and channel[0] is not None and channel[0] != token[0]
    assert ax["blocks.0.norm1.weight"] == (stream,)


def test_einsum_weights_read_their_axes(traced):
    ax = traced["einsum"][2].spec.axes
    stream = ax["embed.weight"][1]
    assert ax["blocks.0.wq.weight" if "blocks.0.wq.weight" in ax else "blocks.0.wq"][1] == stream
    assert ax["blocks.0.wo"][0] == stream and ax["mlp_out"] == (None, ax["mlp_in.weight"][0])


def test_clip_token_picked_by_index_keeps_the_stream(traced):
    ax = traced["clip"][2].spec.axes
    stream = ax["model.text_model.embeddings.token_embedding.weight"][1]
    assert stream is not None and ax["model.text_projection.weight"][1] == stream


def test_whisper_positional_embedding_has_a_rule(traced):
    ax = traced["whisper"][2].spec.axes
    dec = ax["model.model.decoder.embed_positions.weight"]
    assert dec[0] is None and dec[1] == ax["model.model.decoder.embed_tokens.weight"][1] is not None


# ------------------------------------------------------------------------------------------- op rules in isolation
class _Einsum(nn.Module):
    def __init__(self, equation):
        super().__init__()
        self.equation = equation
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)

    def forward(self, x):
        return torch.einsum(self.equation, self.a(x), self.b(x))


def test_einsum_contraction_over_one_shared_permutation():
    spec = rebasin.spec_from_model(_Einsum("bi,bi->b"), torch.randn(3, 4))
    assert spec.axes["a.weight"][0] == spec.axes["b.weight"][0] is not None


def _refused_or_pinned(model, x, match):
    """Refused under strict=True; by default the units are pinned, with the reason in the one warning."""
    with pytest.raises(RebasinError, match=match):
        rebasin.spec_from_model(model, x, strict=True)
    with pytest.warns(rebasin.RebasinWarning, match=match):
        spec = rebasin.spec_from_model(model, x)
    assert spec.coverage is not None and spec.coverage.pinned > 0
    return spec


def test_einsum_sum_over_a_permuted_axis_is_refused():
    _refused_or_pinned(_Einsum("bi,bj->bj"), torch.randn(3, 4), "sums over the permuted axis")


def test_einsum_in_sublist_form_is_read():
    class Sub(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.einsum(self.a(x), [0, 1], [0, 1]))

    spec = rebasin.spec_from_model(Sub(), torch.randn(3, 4))  # torch.einsum turns the sublists into an equation
    assert spec.axes["a.weight"][0] == spec.axes["b.weight"][1] is not None


def test_swin_v2_cosine_window_attention():
    # the relative bias comes from a small MLP whose output units are the heads; logit_scale is per head
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=[2, 2],
                            num_classes=5, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2).eval()
    spec = trace_model(model, _images(size=16)).spec
    heads = spec.axes["features.1.0.attn.logit_scale"][0]
    assert heads is not None and spec.axes["features.1.0.attn.cpb_mlp.2.weight"][0] == heads
    assert spec.check(model, _images(size=16), seed=2) <= 1e-4
    state_a = model.state_dict()
    _, state_b = _planted(spec, state_a)
    _assert_recovered(spec, rebasin.weight_matching(spec, state_a, state_b, seed=0), state_a, state_b)


class _Pad(nn.Module):
    def __init__(self, pad):
        super().__init__()
        self.pad, self.fc, self.head = pad, nn.Linear(3, 8), nn.Linear(8 + pad[0] + pad[1], 2)

    def forward(self, x):
        return self.head(F.pad(self.fc(x), self.pad)).mean((1, 2))


def test_pad_on_the_channel_axis_is_refused_and_zero_channel_pad_passes():
    x = torch.randn(2, 3, 5, 3)
    spec = rebasin.spec_from_model(_Pad((0, 0, 0, 1, 1, 0)), x)
    assert spec.axes["fc.weight"][0] is not None
    _refused_or_pinned(_Pad((0, 1, 0, 1)), x, "pads a permuted axis")


class _Roll(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims, self.fc, self.head = dims, nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.roll(self.fc(x), 1, self.dims))


def test_roll_over_spatial_axes_passes_and_over_channels_is_refused():
    x = torch.randn(2, 4, 3)
    assert rebasin.spec_from_model(_Roll((1,)), x).perms
    _refused_or_pinned(_Roll((2,)), x, "rolls a permuted axis")


class _Pick(nn.Module):
    def __init__(self, along_features):
        super().__init__()
        self.along, self.fc, self.head = along_features, nn.Linear(3, 8), nn.Linear(2 if along_features else 8, 2)

    def forward(self, x, idx):
        h = self.fc(x)
        return self.head(h[:, :, idx] if self.along else h[torch.arange(h.shape[0]), idx])


def test_advanced_index_on_unpermuted_axes_passes_on_permuted_refused():
    x, idx = torch.randn(2, 5, 3), torch.tensor([1, 4])
    spec = rebasin.spec_from_model(_Pick(False), (x, idx))
    assert spec.axes["fc.weight"][0] is not None
    _refused_or_pinned(_Pick(True), (x, idx), "advanced indexing along a permuted axis")


# ------------------------------------------------------------------------------------------- with pinned units
# Two models have units that no permutation may move: the MLP-Mixer's token-mixing outputs (the patch axis, which
# the residual keeps in place) and ShuffleNetV2's branch outputs (the channel shuffle interleaves two branches'
# channels, which blocks and concatenations cannot express). Everything else in them is free: those units are
# pinned to the identity (named in the one warning, counted by spec.coverage), strict=True refuses.
# name: (builder, the reason the pins give, a module whose units are pinned)
PINNED = {"mixer": (mixer, "unpermuted tensor of the same size along axis 1", "blocks.0.token2"),
          "shufflenet": (shufflenet, "splits a concatenation of permutations", "stage2.0.branch2.5")}


def _trace_pinned(name):
    make, reason, module = PINNED[name]
    torch.manual_seed(0)
    model, x = make()
    with pytest.raises(RebasinError, match=reason):
        trace_model(model.eval(), x, strict=True)
    with pytest.warns(rebasin.RebasinWarning, match=reason):
        tr = trace_model(model.eval(), x)
    assert tr.spec.coverage.modules[module][1] > 0, tr.spec.coverage
    assert tr.spec.coverage.permutable > 0
    return tr


@pytest.mark.parametrize("name", list(PINNED))
def test_pinned_models_equivalent_and_planted_recovered(name):
    torch.manual_seed(0)
    model, x = PINNED[name][0]()
    tr = _trace_pinned(name)
    spec = tr.spec
    assert spec.check(model.eval(), x, seed=1) <= 1e-4
    state_a = model.state_dict()
    state_b = permute(spec, random_permutation(spec, seed=7), state_a)
    back = permute(spec, rebasin.weight_matching(spec, state_a, state_b, seed=0), state_b)
    for k, v in state_a.items():
        torch.testing.assert_close(back[k], v, atol=1e-6, rtol=0, msg=k)


def test_shufflenet_inner_units_move():
    ax = _trace_pinned("shufflenet").spec.axes
    mid = ax["stage2.0.branch2.0.weight"][0]
    assert mid is not None and ax["stage2.0.branch2.3.weight"][0] == mid  # through the depthwise convolution
    assert ax["stage2.0.branch2.5.weight"][:2] == (None, mid)  # the branch output stays in place
