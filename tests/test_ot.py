"""OT neuron matching (Anokhin & Yarotsky 2020): :func:`rebasin.matching.ot_matching`."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import planted, rand
from torch.testing import assert_close

from rebasin import (
    RebasinError,
    invert,
    permute,
    random_permutation,
    spec_from_model,
)
from rebasin._common import state_of
from rebasin.apps.models import MLP, ResNet20, SmallCNN
from rebasin.apps.training import seeded_model
from rebasin.matching import ot_matching

CASES = {
    "mlp": (lambda: MLP(10, [32, 16], 3), (4, 10)),
    "cnn": (lambda: SmallCNN(channels=(6, 8, 8)), (2, 1, 8, 8)),
    "resnet": (lambda: ResNet20(width=0.25), (2, 3, 8, 8)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("use_outgoing", [False, True])
def test_ot_recovers_planted_permutation(name, use_outgoing):
    factory, shape = CASES[name]
    model = seeded_model(factory, 0)
    spec, sa, sb, p = planted(model, rand(*shape))
    perms = ot_matching(spec, sa, sb, use_outgoing=use_outgoing)
    assert set(perms) == set(spec.perms)
    inv = invert(p)
    for k in spec.perms:
        assert perms[k].dtype == torch.int64 and perms[k].device.type == "cpu"
        assert torch.equal(perms[k], inv[k]), k
    # the convention shared by every matcher: permute(spec, perms, B) ~ A
    aligned = permute(spec, perms, sb)
    for k, v in sa.items():
        if v.is_floating_point():
            assert_close(aligned[k], v, atol=1e-2, rtol=0)


def test_ot_identity_on_equal_models_and_beats_identity_on_distinct():
    model = seeded_model(lambda: MLP(6, [12, 12], 3), 0)
    spec = spec_from_model(model, rand(2, 6))
    sa = state_of(model)
    assert all(torch.equal(v, torch.arange(v.numel())) for v in ot_matching(spec, sa, sa).values())
    sb = state_of(seeded_model(lambda: MLP(6, [12, 12], 3), 1))
    perms = ot_matching(spec, sa, sb)
    # first layer: OT minimises the squared distance of (row, bias) over all pairings
    def dist(s):
        return float((s["layers.0.weight"] - sa["layers.0.weight"]).pow(2).sum()
                     + (s["layers.0.bias"] - sa["layers.0.bias"]).pow(2).sum())
    assert dist(permute(spec, perms, sb)) < dist(sb)
    for seed in range(5):
        other = random_permutation(spec, seed=seed, sizes=spec.validate(sa))
        assert dist(permute(spec, perms, sb)) <= dist(permute(spec, other, sb)) + 1e-5


def test_ot_does_not_mutate_and_rejects_bad_inputs():
    model = seeded_model(lambda: SmallCNN(channels=(4, 4, 4)), 0)
    spec, sa, sb, _ = planted(model, rand(2, 1, 8, 8))
    ca, cb = copy.deepcopy(sa), copy.deepcopy(sb)
    ot_matching(spec, sa, sb, use_outgoing=True)
    for k in sa:
        assert torch.equal(sa[k], ca[k]) and torch.equal(sb[k], cb[k])
    with pytest.raises(RebasinError, match="PermutationSpec"):
        ot_matching({"a": ("P",)}, sa, sb)
    short = {k: v for k, v in sb.items() if k != "head.2.bias"}
    with pytest.raises(RebasinError, match="missing"):
        ot_matching(spec, sa, short)
    bad = dict(sb, **{"features.0.weight": torch.full_like(sb["features.0.weight"], float("nan"))})
    with pytest.raises(RebasinError, match="NaN"):
        ot_matching(spec, sa, bad)
    with pytest.raises(RebasinError, match="use_outgoing"):
        ot_matching(spec, sa, sb, use_outgoing=1)
