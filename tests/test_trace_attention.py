"""Hand-written attention, concatenation and split traced by spec_from_model (issue 13): exact specs with heads."""

import math

import pytest
import torch
import torch.nn.functional as F
from builders import refused_then_pinned
from torch import nn

from rebasin import RebasinError, permute, random_permutation, spec_from_model
from rebasin.apps.models import ViT
from rebasin.spec import split_structured


class Attn(nn.Module):
    """Separate q/k/v projections, heads by view/transpose, softmax(q k^T) v or SDPA, cls token, pos embedding."""

    def __init__(self, e: int = 16, h: int = 4, sdpa: bool = False, mask: str | None = None) -> None:
        super().__init__()
        self.h, self.sdpa, self.mask = h, sdpa, mask
        self.inp = nn.Linear(6, e)
        self.cls = nn.Parameter(torch.randn(1, 1, e))
        self.pos = nn.Parameter(torch.randn(1, 5, e))
        self.ln = nn.LayerNorm(e)
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))
        self.fc1, self.fc2, self.head = nn.Linear(e, 32), nn.Linear(32, e), nn.Linear(e, 3)
        self.register_buffer("head_bias", torch.randn(1, h, 5, 5))
        self.register_buffer("causal", torch.ones(5, 5, dtype=torch.bool).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        x = self.inp(x)
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
        y = self.ln(x)
        q = self.q(y).view(b, t + 1, self.h, -1).transpose(1, 2)
        k = self.k(y).view(b, t + 1, self.h, -1).transpose(1, 2)
        v = self.v(y).view(b, t + 1, self.h, -1).transpose(1, 2)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if self.mask == "causal":
                s = s.masked_fill(self.causal, float("-inf"))
            elif self.mask == "per-head":
                s = s + self.head_bias  # a state entry with a head axis: permuted with the heads
            elif self.mask == "head-index":
                s = s + torch.arange(self.h, dtype=s.dtype).view(1, self.h, 1, 1)  # depends on the head order
            a = torch.softmax(s, dim=-1) @ v
        a = a.transpose(1, 2).reshape(b, t + 1, -1)
        x = x + self.o(a)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x[:, 0])


def _moves_heads_and_units(spec):
    perms = random_permutation(spec, seed=1)
    assert spec.structure, "no head structure found"
    for p, (_, d) in spec.structure.items():
        outer, inner = split_structured(perms[p], d)
        assert not torch.equal(outer, torch.arange(len(outer)))
        assert not torch.equal(inner, torch.arange(d).expand_as(inner))


@pytest.mark.parametrize("sdpa, mask", [(False, None), (True, None), (False, "causal"), (False, "per-head")])
def test_hand_written_attention_is_exact_with_heads(sdpa, mask):
    torch.manual_seed(0)
    model = Attn(sdpa=sdpa, mask=mask)
    x = torch.randn(2, 4, 6)
    spec = spec_from_model(model, x)  # asserts outputs unchanged under a random permutation (norms randomised)
    r = spec.axes["pos"][2]
    assert spec.axes["cls"] == (None, None, r) and spec.axes["ln.weight"] == (r,)
    qk, vo = spec.axes["q.weight"][0], spec.axes["v.weight"][0]
    assert spec.axes["k.weight"][0] == qk and spec.axes["o.weight"] == (r, vo) and qk != vo
    assert spec.structure[qk][0] == spec.structure[vo][0] and spec.structure[qk][1] == 4
    _moves_heads_and_units(spec)
    if mask == "per-head":  # the bias's head axis carries the head permutation itself
        assert spec.axes["head_bias"] == (None, spec.structure[qk][0], None, None)
    perms = random_permutation(spec, seed=5)
    y0 = model(x)
    y1 = torch.func.functional_call(model, permute(spec, perms, model.state_dict()), (x,))
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)


def test_mask_depending_on_the_head_order_is_refused():
    refused_then_pinned(Attn(mask="head-index"), torch.randn(2, 4, 6),
                        r"the \+ in Attn\.forward \(tests/test_trace_attention\.py:\d+\)",
                        r"unpermuted tensor of the same size along axis 1", ["q", "k", "v"])


def test_selecting_one_head_is_refused():
    class OneHead(Attn):
        def forward(self, x):
            b, t, _ = x.shape
            q = self.q(self.inp(x)).view(b, t, self.h, -1)
            return self.head(self.o(q[:, :, 0].repeat(1, 1, self.h)))

    refused_then_pinned(OneHead(), torch.randn(2, 4, 6),
                        r"the indexing \[\.\.\.\] in OneHead\.forward \(tests/test_trace_attention\.py:\d+\)",
                        "indexes into the permuted axis", ["q"])


def test_einsum_is_read_and_an_unsafe_one_refused_by_name():
    class Ein(Attn):
        def __init__(self, eq):
            super().__init__()
            self.eq = eq

        def forward(self, x):
            y = self.q(self.inp(x))
            other = y if self.eq.startswith("btc,bsc") else torch.arange(16.0)  # a constant along c
            return self.head(torch.einsum(self.eq, y, other))

    # y[b,t,c] * sum_s y[b,s,c]: elementwise along c, so the permutation of c passes through
    assert spec_from_model(Ein("btc,bsc->btc"), torch.randn(2, 4, 6)).perms
    refused_then_pinned(Ein("btc,c->btc"), torch.randn(2, 4, 6),
                        r"torch\.functional\.einsum in Ein\.forward \(tests/test_trace_attention\.py:\d+\)",
                        "einsum 'btc,c->btc' meets a permuted axis 'c' with an unpermuted", ["q"])


def test_vit_packed_qkv_split_is_a_concatenation_of_structured_perms():
    torch.manual_seed(0)
    model = ViT(width=32, depth=2, heads=4)
    spec = spec_from_model(model, torch.randn(2, 1, 28, 28))
    c = spec.axes["blocks.0.qkv.weight"][0]
    (qk, n1), (qk2, n2), (vo, n3) = spec.concat[c]
    assert qk == qk2 and (n1, n2, n3) == (32, 32, 32) and spec.structure[qk] == (spec.structure[vo][0], 8)
    assert spec.axes["blocks.0.proj.weight"][1] == vo
    assert spec.axes["patch.weight"][0] == spec.axes["pos"][2] == spec.axes["blocks.1.ln1.weight"][0]
    _moves_heads_and_units(spec)


def test_split_at_other_boundaries_than_a_cat_is_refused():
    class Resplit(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(2, 2), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.cat([self.a(x), self.b(x)], dim=-1)
            u, w = h.split([2, 6], dim=-1)
            return self.c(u) + self.d(w)

    refused_then_pinned(Resplit(), torch.randn(2, 3),
                        r"Tensor\.split in Resplit\.forward \(tests/test_trace_attention\.py:\d+\)", "other boundaries",
                        ["a", "b"])


def test_chunk_of_a_linear_output_gives_independent_parts():
    class Glu(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(4, 2)

        def forward(self, x):
            u, g = self.a(x).chunk(2, dim=-1)
            return self.b(u * torch.sigmoid(g))

    spec = spec_from_model(Glu(), torch.randn(2, 3))  # u and g must share one permutation (multiplied)
    c = spec.axes["a.weight"][0]
    assert spec.concat[c][0] == spec.concat[c][1] and spec.axes["b.weight"][1] == spec.concat[c][0][0]


def test_einops_rearrange_heads_are_traced():
    einops = pytest.importorskip("einops")

    class Ein(nn.Module):
        def __init__(self, e=16, h=4):
            super().__init__()
            self.h = h
            self.inp, self.q, self.k, self.v, self.o = (nn.Linear(6, e),) + tuple(nn.Linear(e, e) for _ in range(4))
            self.head = nn.Linear(e, 3)

        def forward(self, x):
            x = self.inp(x)
            q, k, v = (einops.rearrange(f(x), "b t (h d) -> b h t d", h=self.h) for f in (self.q, self.k, self.v))
            a = einops.rearrange(F.scaled_dot_product_attention(q, k, v), "b h t d -> b t (h d)")
            return self.head(x + self.o(a))

    torch.manual_seed(0)
    spec = spec_from_model(Ein(), torch.randn(2, 5, 6))  # exact (functional check)
    _moves_heads_and_units(spec)
    assert spec.structure[spec.axes["q.weight"][0]] == spec.structure[spec.axes["k.weight"][0]]


def test_align_refuses_models_with_other_head_counts_but_equal_shapes():
    torch.manual_seed(0)
    a, b = ViT(width=32, depth=1, heads=4), ViT(width=32, depth=1, heads=2)
    assert all(a.state_dict()[k].shape == v.shape for k, v in b.state_dict().items())
    import rebasin

    with pytest.raises(RebasinError, match="different permutation specs.*structure"):
        rebasin.align(a, b, example_input=torch.randn(2, 1, 28, 28))
