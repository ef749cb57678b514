"""Tiny random-weight models of today's families, shared by ``benchmarks/model_zoo.py`` and the tests.

Nothing is downloaded: Hugging Face models are built from small configs, torchvision models from their
constructors with small settings, the rest (MLP-Mixer, einsum attention, a timm-style DropPath, the
input-residual MLP) in plain PyTorch here. Each builder returns ``(model, example_input)``; the model is
in train mode as constructed (callers set ``eval()``). ``transformers`` and ``torchvision`` are imported
when a builder that needs them runs.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- plain PyTorch models
def drop_path(x, p, training):
    """timm's drop_path: per-sample stochastic depth; the identity in eval mode."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return drop_path(x, self.p, self.training)


class MixerBlock(nn.Module):
    """Token mixing (a Linear over the patch axis: transpose, Linear, transpose back) then channel mixing."""

    def __init__(self, tokens, width, token_hidden, channel_hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.token1, self.token2 = nn.Linear(tokens, token_hidden), nn.Linear(token_hidden, tokens)
        self.chan1, self.chan2 = nn.Linear(width, channel_hidden), nn.Linear(channel_hidden, width)
        self.drop = DropPath(0.1)

    def forward(self, x):
        y = self.norm1(x).transpose(1, 2)
        y = self.token2(F.gelu(self.token1(y))).transpose(1, 2)
        x = x + self.drop(y)
        return x + self.drop(self.chan2(F.gelu(self.chan1(self.norm2(x)))))


class Mixer(nn.Module):
    def __init__(self, image=16, patch=4, width=16, depth=2, classes=5):
        super().__init__()
        tokens = (image // patch) ** 2
        self.stem = nn.Conv2d(3, width, patch, stride=patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, width, 12, 24) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


class EinsumAttention(nn.Module):
    """Multi-head self-attention with every product written as an einsum, weights included."""

    def __init__(self, width=16, heads=4):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(width, width) / width ** 0.5) for _ in range(3))
        self.wo = nn.Parameter(torch.randn(width, width) / width ** 0.5)
        self.norm = nn.LayerNorm(width)
        self.drop = DropPath(0.2)

    def forward(self, x):
        b, n, c = x.shape
        h = self.norm(x)
        q = torch.einsum("bnc,dc->bnd", h, self.wq).view(b, n, self.heads, -1)
        k = torch.einsum("bnc,dc->bnd", h, self.wk).view(b, n, self.heads, -1)
        v = torch.einsum("bnc,dc->bnd", h, self.wv).view(b, n, self.heads, -1)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, c)
        return x + self.drop(torch.einsum("bnd,cd->bnc", o, self.wo))


class EinsumNet(nn.Module):
    def __init__(self, vocab=30, width=16, depth=2, classes=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*[EinsumAttention(width) for _ in range(depth)])
        self.mlp_in = nn.Linear(width, 32)
        self.mlp_out = nn.Parameter(torch.randn(classes, 32) / 32 ** 0.5)

    def forward(self, tokens):
        x = self.blocks(self.embed(tokens))
        return torch.einsum("...f,cf->...c", torch.relu(self.mlp_in(x)), self.mlp_out)


# ------------------------------------------------------------------------------------------- the zoo
class Logits(nn.Module):
    """A model returning one field of a Hugging Face output (what is compared; the rest stays free to move)."""

    def __init__(self, model, field="logits", **options):
        super().__init__()
        self.model, self.field, self.options = model, field, options

    def forward(self, *args, **kwargs):
        return getattr(self.model(*args, **kwargs, **self.options), self.field)


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    """``n`` random RGB images of ``size`` x ``size``."""
    return torch.randn(n, 3, size, size, generator=_gen(seed))


def token_ids(n: int, length: int, seed: int, vocab: int = 50) -> torch.Tensor:
    """``n`` random sequences of ``length`` token ids in ``1..vocab-1``."""
    return torch.randint(1, vocab, (n, length), generator=_gen(seed))


def convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.1,
                    num_classes=5), images()


def efficientnet():
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig
    settings = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(4, 3, 2, 8, 16, 2), MBConvConfig(4, 5, 2, 16, 24, 1)]
    return EfficientNet(settings, dropout=0.1, stochastic_depth_prob=0.2, num_classes=5, last_channel=32), images()


def swin_torchvision():
    from torchvision.models.swin_transformer import SwinTransformer
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=[2, 2],
                           stochastic_depth_prob=0.1, num_classes=5), images(size=20)  # 5x5 patches: padded windows


def swin_hf():
    import transformers as T

    cfg = T.SwinConfig(image_size=20, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=2,
                       drop_path_rate=0.1, num_labels=5)
    return Logits(T.SwinForImageClassification(cfg)), images(size=20)  # 5x5 patches: padded windows


def t5():
    import transformers as T

    cfg = T.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
                     pad_token_id=0)
    ids = token_ids(2, 6, 1)
    return Logits(T.T5ForConditionalGeneration(cfg), use_cache=False), {"input_ids": ids,
                                                                         "decoder_input_ids": ids[:, :5]}


def clip():
    import transformers as T

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = T.CLIPConfig(
            text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=4, max_position_embeddings=16, eos_token_id=2),
            vision_config=dict(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=4), projection_dim=8)
    return Logits(T.CLIPModel(cfg), "logits_per_image"), {"input_ids": token_ids(2, 6, 1),
                                                          "pixel_values": images(size=16)}


def whisper():
    import transformers as T

    cfg = T.WhisperConfig(vocab_size=50, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
                          decoder_ffn_dim=32, max_source_positions=8, max_target_positions=16,
                          decoder_start_token_id=0, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    return Logits(T.WhisperForConditionalGeneration(cfg), use_cache=False), {
        "input_features": torch.randn(2, 8, 16, generator=_gen(1)), "decoder_input_ids": token_ids(2, 5, 2)}


def mixer():
    return Mixer(), images(size=16)


def einsum_net():
    return EinsumNet(), token_ids(2, 6, 1, vocab=30)


def shufflenet():
    from torchvision.models.shufflenetv2 import ShuffleNetV2
    return ShuffleNetV2([1, 1, 1], [8, 8, 16, 32, 32], num_classes=5), images()




# ------------------------------------------------------------------------------------------- rotary-embedding LLMs
def _llm(family: str, config: str, **options: Any) -> tuple[nn.Module, torch.Tensor]:
    """``transformers.<family>ForCausalLM`` from a 2-layer, 64-wide config with 4 query heads; 8 token ids."""
    import transformers as T

    common = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(T, family + "ForCausalLM")(getattr(T, config)(**common, **options))
    return model, token_ids(2, 8, 1, vocab=64)


def has_llm(family: str) -> bool:
    """Whether the installed ``transformers`` has ``<family>ForCausalLM``."""
    try:
        import transformers as T
    except ImportError:
        return False
    return hasattr(T, family + "ForCausalLM")


def llama() -> tuple[nn.Module, torch.Tensor]:
    return _llm("Llama", "LlamaConfig", num_key_value_heads=2)  # grouped-query attention, SwiGLU, RMSNorm


def mistral() -> tuple[nn.Module, torch.Tensor]:
    return _llm("Mistral", "MistralConfig", num_key_value_heads=2)


def qwen2() -> tuple[nn.Module, torch.Tensor]:
    return _llm("Qwen2", "Qwen2Config", num_key_value_heads=2)  # q/k/v biases


def gpt_neox() -> tuple[nn.Module, torch.Tensor]:
    return _llm("GPTNeoX", "GPTNeoXConfig", rotary_pct=0.25)  # rotary on a quarter of each head, packed qkv


def gemma() -> tuple[nn.Module, torch.Tensor]:
    return _llm("Gemma", "GemmaConfig", num_key_value_heads=1, head_dim=16)  # multi-query attention


def phi() -> tuple[nn.Module, torch.Tensor]:
    return _llm("Phi", "PhiConfig", num_key_value_heads=4, partial_rotary_factor=0.5)  # LayerNorm, GELU MLP


# ------------------------------------------------------------------------------------------- the input residual
class InputResidualMLP(nn.Module):
    """``head(relu(x + l2(relu(l1(x)))))``: the raw input pins the stream; ``l1``'s 32 units may still move."""

    def __init__(self, width: int = 16, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(width, hidden), nn.Linear(hidden, width), nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(x + self.l2(F.relu(self.l1(x)))))


def input_residual() -> tuple[nn.Module, torch.Tensor]:
    return InputResidualMLP(), torch.randn(4, 16, generator=_gen(1))
