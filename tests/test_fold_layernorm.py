"""``fold_layernorm``: the exact LayerNorm -> RMSNorm rewrite of pre-LN transformers, and what it opens up.

Tiny ``transformers`` GPT-2 and ViT from configs (LayerNorm scales and shifts randomised, so a wrong fold
shows): the folded copy computes the same outputs, its stream is read only by scale-free RMSNorms, and it
then admits an orthogonal map of the residual stream. BERT (post-LN) and tied embeddings are refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from rebasin import RebasinError
from rebasin.spec import apply_transforms, random_orthogonal
from rebasin.trace import fold_layernorm, symmetry_kinds, trace_model

T = pytest.importorskip("transformers")

from rebasin.trace import hf_rules

hf_rules.register()  # registered for good by the first trace; here, so that the conftest's registry guard sees it

_IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
_IMG = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _randomise_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def _gpt2(tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = T.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, tie_word_embeddings=tied)
        return _randomise_norms(T.GPT2LMHeadModel(cfg))


def _vit() -> nn.Module:
    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=24, num_labels=3)
    return _randomise_norms(T.ViTForImageClassification(cfg))


@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_fold_is_exact_and_opens_the_orthogonal_stream(family: str) -> None:
    model, x = (_gpt2(), _IDS) if family == "gpt2" else (_vit(), _IMG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stream = trace_model(model, x).spec.axes[next(k for k in before if k.endswith("norm.weight") or "ln_" in k)][0]
    kinds = symmetry_kinds(model, x)
    assert kinds.kinds[stream] == "permutation" and "LayerNorm" in kinds.reasons[stream]
    folded = fold_layernorm(model, x)
    with torch.no_grad():
        torch.testing.assert_close(folded(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, nn.LayerNorm) for m in folded.modules())
    assert any(isinstance(m, nn.RMSNorm) for m in folded.modules())
    for k, v in model.state_dict().items():  # the model is untouched
        assert torch.equal(v, before[k])
    tr = trace_model(folded, x)
    kinds = symmetry_kinds(folded, trace=tr)
    assert kinds.kinds[stream] == "orthogonal"
    state = folded.state_dict()
    q = random_orthogonal(tr.spec.sizes[stream], seed=3)
    moved = apply_transforms(tr.spec, {stream: q}, state, kinds=kinds)
    with torch.no_grad():
        torch.testing.assert_close(functional_call(folded, moved, (x,)).logits, folded(x).logits, atol=1e-4, rtol=1e-4)
        # the same rotation of the unfolded model changes its function: the test can fail
        spec0 = trace_model(model, x).spec
        raw = apply_transforms(spec0, {stream: q}, model.state_dict(), kinds=type(kinds)({stream: "orthogonal"}))
        assert not torch.allclose(functional_call(model, raw, (x,)).logits, model(x).logits, atol=1e-3)


def test_reader_without_bias_gains_one() -> None:
    torch.manual_seed(0)
    model = _randomise_norms(nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2, bias=False)))
    x = torch.randn(5, 3)
    folded = fold_layernorm(model, x)
    assert isinstance(folded[2].bias, nn.Parameter) and "2.bias" in folded.state_dict()
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert model[2].bias is None


def test_post_ln_bert_is_refused() -> None:
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=24, max_position_embeddings=16)
    model = T.BertForSequenceClassification(cfg).eval()
    with pytest.raises(RebasinError, match=r"cannot fold the LayerNorm 'bert.embeddings.LayerNorm': its output goes "
                                           r"into add"):
        fold_layernorm(model, _IDS)


def test_tied_embeddings_are_refused() -> None:
    with pytest.raises(RebasinError, match="untie the weights first"):
        fold_layernorm(_gpt2(tied=True), _IDS)


def test_no_layernorm_is_refused() -> None:
    with pytest.raises(RebasinError, match="no nn.LayerNorm to fold"):
        fold_layernorm(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 3))


def test_layernorm_read_directly_is_refused() -> None:
    class Raw(nn.Module):  # the stream goes into the head without a norm: centring it would change the output
        def __init__(self) -> None:
            super().__init__()
            self.a, self.norm, self.b, self.head = nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            h = h + self.b(self.norm(h))
            return self.head(h)

    torch.manual_seed(0)
    with pytest.raises(RebasinError, match="outputs differ"):
        fold_layernorm(_randomise_norms(Raw()), torch.randn(4, 3))


def test_folded_gpt2_planted_rotation_is_recovered() -> None:
    """Procrustes through GPT-2's transposed Conv1D readers and packed q;k;v (planted permutations elsewhere)."""
    from rebasin.matching import transform_matching
    from rebasin.spec import random_permutation

    folded = fold_layernorm(_gpt2(), _IDS)
    tr = trace_model(folded, _IDS)
    kinds = symmetry_kinds(folded, _IDS, trace=tr)
    stream = tr.spec.axes["transformer.wte.weight"][1]
    a = folded.state_dict()
    q = random_orthogonal(tr.spec.sizes[stream], seed=2)
    plant = dict(random_permutation(tr.spec, seed=3))
    plant[stream] = q
    b = apply_transforms(tr.spec, plant, a, kinds=kinds)
    found = transform_matching(tr.spec, a, b, kinds=kinds, use={stream: "orthogonal"})
    assert (found[stream] - q.T).abs().max() < 1e-4
    back = apply_transforms(tr.spec, found, b, kinds=kinds)
    for k in a:
        torch.testing.assert_close(back[k], a[k], rtol=1e-4, atol=1e-4)


def test_stream_read_for_its_shape_admits_rotations() -> None:
    """The toolkit's own ViT reads ``x.shape`` of the stream (to expand the cls token, to split heads): reading a
    shape does not use the values, so after the fold the stream is orthogonal and a rotation keeps the function."""
    from rebasin.apps.models import ViT

    torch.manual_seed(0)
    model = _randomise_norms(ViT(image_size=8, patch_size=4, width=16, depth=1, heads=2))
    folded = fold_layernorm(model, _IMG)
    tr = trace_model(folded, _IMG)
    stream = tr.spec.axes["pos"][2]
    kinds = symmetry_kinds(folded, _IMG, trace=tr)
    assert kinds.kinds[stream] == "orthogonal", kinds.reasons.get(stream)
    moved = apply_transforms(tr.spec, {stream: random_orthogonal(16, seed=4)}, folded.state_dict(), kinds=kinds)
    with torch.no_grad():
        torch.testing.assert_close(functional_call(folded, moved, (_IMG,)), model(_IMG), atol=1e-4, rtol=1e-4)
