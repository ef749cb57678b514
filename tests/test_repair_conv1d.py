"""REPAIR of layers whose weight stores the output on axis 1: ``transformers``' ``Conv1D`` (GPT-2)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.testing import assert_close

from rebasin import interpolate, repair, spec_from_model
from rebasin._common import state_of
from rebasin.paths import channel_stats
from rebasin.trace import hf_rules

T = pytest.importorskip("transformers")
hf_rules.register()  # registered for good by the first trace; here, so that the conftest's registry guard sees it


def _gpt2(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = T.GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=8, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.GPT2LMHeadModel(cfg).eval()


def test_repair_corrects_gpt2_conv1d_layers() -> None:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 20, (4, 8), generator=g),) for _ in range(3)]
    a, b = _gpt2(1), _gpt2(2)
    spec = spec_from_model(a, data[0][0][:2])
    sa, sb = state_of(a), state_of(b)
    ea, eb = channel_stats(a, sa, data, spec=spec), channel_stats(a, sb, data, spec=spec)
    names = ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj")
    assert all(k in ea for k in names)  # Conv1D layers are producers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out = repair(a, sa, sb, 0.5, data, spec=spec)
    got = channel_stats(out, state_of(out), data, spec=spec)
    plain = channel_stats(a, interpolate(sa, sb, 0.5), data, spec=spec)
    for k in names:
        std = 0.5 * (ea[k].std + eb[k].std)
        assert float(((plain[k].std - std) / std).abs().max()) > 0.1  # off target without REPAIR: the test can fail
        assert_close(got[k].mean, 0.5 * (ea[k].mean + eb[k].mean), atol=1e-7, rtol=1e-3)
        assert_close(got[k].std, std, atol=1e-7, rtol=1e-3)
