"""Hugging Face ``transformers`` models built from tiny configs (no download): traced exactly, heads structured.

``spec_from_model`` falls back to the dynamic tracer (torch.fx cannot trace these models) and runs
``spec.check`` (random permutation, randomised norms, same outputs), so a returned spec is exact.
Skipped without ``transformers`` (``pip install rebasin[hf]``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from builders import heads_and_units_moved

import rebasin
from rebasin import RebasinError
from rebasin.spec.core import permute, random_permutation
from rebasin.trace import trace_model

T = pytest.importorskip("transformers")

from rebasin.trace import hf_rules

# trace_model registers the transformers layer rules the first time it meets one, on purpose and for good; register
# them at import so that the conftest guard against registry leaks sees them before any test, in any order.
hf_rules.register()

SEQ, VOCAB, WIDTH, HEADS = 8, 50, 32, 4


def _bert():
    cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
                       intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return T.BertForSequenceClassification(cfg)


def _vit():
    cfg = T.ViTConfig(image_size=16, patch_size=4, hidden_size=WIDTH, num_hidden_layers=2,
                      num_attention_heads=HEADS, intermediate_size=64, num_labels=3)
    return T.ViTForImageClassification(cfg)


def _gpt2():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = T.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=WIDTH, n_layer=2, n_head=HEADS,
                           bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(cfg)


def _tokens(n, seed):
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def _images(n, seed):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


MODELS = {"bert": (_bert, _tokens), "vit": (_vit, _images), "gpt2": (_gpt2, _tokens)}


def _build(name, seed=0):
    make, data = MODELS[name]
    torch.manual_seed(seed)
    model = make().eval()
    return model, data(2, 1)


@pytest.fixture(scope="module")
def traced():
    out = {}
    for name in MODELS:
        model, x = _build(name)
        out[name] = (model, x, trace_model(model, x))
    return out


def _logits(model, state, x):
    with torch.no_grad():
        return torch.func.functional_call(model, {**dict(model.named_buffers()), **state}, (x,),
                                          tie_weights=False).logits


@pytest.mark.parametrize("name", list(MODELS))
def test_spec_exact_with_heads(traced, name):
    model, x, tr = traced[name]
    spec = tr.spec
    assert set(spec.axes) == set(model.state_dict())
    # two layers, each with QK and VO structured by one head permutation of 4 heads of 8 units
    assert len(spec.structure) == 4
    outers = {o for o, _ in spec.structure.values()}
    assert len(outers) == 2
    for outer, members in spec.outers.items():
        assert len(members) == 2
        assert spec.outer_size(outer, spec.sizes) == HEADS
    assert all(d == WIDTH // HEADS for _, d in spec.structure.values())
    assert spec.check(model, x) <= 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_random_permutation_moves_heads_and_output_unchanged(traced, name):
    model, x, tr = traced[name]
    spec, state = tr.spec, model.state_dict()
    perms = random_permutation(spec, seed=3)
    heads_moved, units_moved = heads_and_units_moved(spec, perms)
    assert heads_moved > 0, "no head permutation moved a head"
    assert units_moved > 0, "no unit moved inside a head"
    y0 = _logits(model, state, x)
    y1 = _logits(model, permute(spec, perms, state), x)
    assert torch.allclose(y0, y1, rtol=1e-5, atol=1e-5 * float(y0.abs().max()))


def test_gpt2_tied_embeddings_and_conv1d(traced):
    spec = traced["gpt2"][2].spec
    axes = spec.axes
    assert axes["lm_head.weight"] == axes["transformer.wte.weight"]
    hidden = axes["transformer.wte.weight"][1]
    assert hidden is not None and hidden == axes["transformer.wpe.weight"][1]
    assert axes["transformer.h.0.ln_1.weight"] == (hidden,)
    # Conv1D stores (in, out): c_fc's weight is (hidden, mlp perm), c_proj's (mlp perm, hidden)
    fc, proj = axes["transformer.h.0.mlp.c_fc.weight"], axes["transformer.h.0.mlp.c_proj.weight"]
    assert fc[0] == hidden and proj[1] == hidden and fc[1] == proj[0] is not None
    # packed q;k;v: a concatenation of (QK, QK, VO)
    packed = axes["transformer.h.0.attn.c_attn.weight"][1]
    parts = spec.concat[packed]
    assert [n for _, n in parts] == [WIDTH] * 3 and parts[0][0] == parts[1][0] != parts[2][0]


@pytest.mark.parametrize("name", list(MODELS))
def test_weight_matching_recovers_planted_permutation(traced, name):
    model, _, tr = traced[name]
    spec = tr.spec
    state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    planted = random_permutation(spec, seed=7)
    state_b = permute(spec, planted, state_a)
    result = rebasin.weight_matching(spec, state_a, state_b, seed=0)
    back = permute(spec, result, state_b)
    for k, v in state_a.items():
        assert torch.allclose(back[k], v, atol=1e-6), k


@pytest.mark.parametrize("name", list(MODELS))
def test_weight_matching_independent_models_keeps_the_function(traced, name):
    # two random initialisations: the result must respect the heads, so B permuted computes what B computes
    model, x, tr = traced[name]
    other, _ = _build(name, seed=1)
    spec, state_a, state_b = tr.spec, model.state_dict(), other.state_dict()
    result = rebasin.weight_matching(spec, state_a, state_b, seed=0)
    moved = permute(spec, result, state_b)
    y0, y1 = _logits(other, state_b, x), _logits(other, moved, x)
    assert torch.allclose(y0, y1, rtol=1e-5, atol=1e-5 * float(y0.abs().max()))


@pytest.mark.parametrize("name", list(MODELS))
def test_activation_matching_recovers_planted_permutation(traced, name):
    # batches of 5 and 3 while the trace saw 2: the dynamic trace records the model again per batch
    model, x, tr = traced[name]
    spec = tr.spec
    other, _ = _build(name)
    other.load_state_dict(permute(spec, random_permutation(spec, seed=5), model.state_dict()))
    data = MODELS[name][1]
    loader = [data(5, 10), data(5, 11), data(3, 12)]
    result = rebasin.activation_matching(model, other, loader, example_input=x)
    back = permute(spec, result, other.state_dict())
    for k, v in model.state_dict().items():
        assert torch.allclose(back[k], v, atol=1e-6), k


@pytest.mark.parametrize("name", list(MODELS))
def test_capture_other_batch_size(traced, name):
    model, _, tr = traced[name]
    x = MODELS[name][1](5, 2)
    acts = tr.capture(model.state_dict(), x)
    assert acts and all(v.shape[0] == 5 for v in acts.values())


def test_fx_tracer_refuses_with_hint():
    model, x = _build("bert")
    with pytest.raises(RebasinError, match="tracer='dynamic'"):
        trace_model(model, x, tracer="fx")
    with pytest.raises(RebasinError, match="tracer must be one of"):
        trace_model(model, x, tracer="jit")
