"""merge: N models into one basin, averaged and REPAIRed."""

from __future__ import annotations

import builders
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import rebasin
from rebasin import RebasinError, compare_merge, merge, permute, random_permutation, spec_from_model
from rebasin._common import state_of
from rebasin.apps.training import fit_classifier_, seeded_model
from rebasin.merging import MergeInfo


def mlp() -> nn.Module:
    return builders.mlp(6, [16, 16], 3)


def bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)
    )


def data(shape=(6,), n=192, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    flat = x.reshape(n, -1)
    y = ((flat[:, 0] * flat[:, 1] > 0).long() + (flat[:, 2] > 0.5).long()).clamp_max(2)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def permuted_copies(factory, shape, k=3):
    base = seeded_model(factory, 0)
    spec = spec_from_model(base, torch.randn(2, *shape))
    sizes = spec.validate(state_of(base))
    copies = [base]
    for s in range(1, k):
        m = seeded_model(factory, 100 + s)
        m.load_state_dict(permute(spec, random_permutation(spec, seed=s, sizes=sizes), state_of(base)))
        copies.append(m)
    return copies, spec


@pytest.mark.parametrize("method", ["weight_matching", "activation_matching"])
def test_merge_of_permuted_copies_is_the_model(method):
    loader = data()
    copies, spec = permuted_copies(mlp, (6,), k=4)
    x = torch.cat([x for x, _ in loader])
    merged, info = merge(copies, method=method, loader=loader, return_info=True)
    assert isinstance(info, MergeInfo) and info.converged and info.repaired
    assert_close(merged(x), copies[0](x), atol=1e-5, rtol=1e-5)
    comparison = compare_merge(copies, merged, info, loader, loader=loader)
    assert comparison.accuracy["merged"] == comparison.accuracy["models"][0] == comparison.accuracy["ensemble"]
    if method != "weight_matching":
        return  # data-driven matching cannot tell apart units that are dead on the data
    # perms map each copy back onto the reference
    for m, p in zip(copies, info.perms):
        for k, v in permute(spec, p, state_of(m)).items():
            assert_close(v, state_of(copies[0])[k])


def test_merge_bn_cnn_copies_reference_not_first():
    loader = data((1, 4, 4))
    copies, spec = permuted_copies(bn_cnn, (1, 4, 4), k=3)
    from rebasin.paths import reset_bn_stats_

    for m in copies:  # statistics of the data REPAIR uses
        reset_bn_stats_(m, loader)
    merged = merge(copies, loader=loader, spec=spec, reference=2)
    x = torch.cat([x for x, _ in loader])
    merged.eval()
    copies[0].eval()
    assert_close(merged(x), copies[0](x), atol=1e-5, rtol=1e-5)
    # the output lives in the reference's basin: same weights as copies[2]
    assert_close(state_of(merged)["0.weight"], state_of(copies[2])["0.weight"])


def test_merge_trained_models_beats_naive_and_inputs_untouched():
    loader = data(n=384)
    models = [fit_classifier_(seeded_model(mlp, s), loader, epochs=25, lr=1e-2, seed=s) for s in range(3)]
    keep = [{k: v.clone() for k, v in state_of(m).items()} for m in models]
    merged, info = merge(models, loader=loader, return_info=True, n_iter=5)
    comparison = compare_merge(models, merged, info, loader, loader=loader)
    assert comparison.accuracy["merged"] > comparison.accuracy["naive"]
    assert comparison.loss["merged"] < comparison.loss["naive"]
    for m, kept in zip(models, keep):
        for k, v in state_of(m).items():
            assert torch.equal(v, kept[k])
    assert all(p.requires_grad for p in merged.parameters()) and merged is not models[0]
    plain = state_of(merge(models, repair=False, n_iter=5, example_input=loader[0][0][:2]))
    assert_close(plain["4.bias"], state_of(merged)["4.bias"])  # output layer: plain average both times
    assert not torch.allclose(plain["0.weight"], state_of(merged)["0.weight"])  # REPAIR rescaled


def test_merge_errors():
    loader = data()
    a, b = seeded_model(mlp, 0), seeded_model(mlp, 1)
    other = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(RebasinError, match="one architecture"):
        merge([a, other], loader=loader)
    with pytest.raises(RebasinError, match="one architecture"):
        merge([a, bn_cnn()], loader=loader)
    with pytest.raises(RebasinError, match="at least two"):
        merge([a], loader=loader)
    with pytest.raises(RebasinError, match="loader"):
        merge([a, b])
    with pytest.raises(RebasinError, match="reference"):
        merge([a, b], loader=loader, reference=5)
    with pytest.raises(RebasinError, match="n_iter"):
        merge([a, b], loader=loader, n_iter=0)
    with pytest.raises(RebasinError, match="unknown method"):
        merge([a, b], loader=loader, method="magic")


def test_weight_matching_rounds_are_warm_started_and_settle(monkeypatch):
    """Later rounds start weight matching from the current permutations, so the pairwise objective never drops."""
    import sys

    from rebasin import weight_matching

    align_module = sys.modules["rebasin.matching.alignment"]  # merge imports align from here at call time

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
              for _ in range(4)]
    x = torch.randn(8, 6)
    spec = spec_from_model(models[0], x)
    inits = []
    real_align = align_module.align

    def spying_align(*args, **kwargs):
        inits.append(kwargs.get("init"))
        return real_align(*args, **kwargs)

    monkeypatch.setattr(align_module, "align", spying_align)
    _, info = merge(models, spec=spec, repair=False, n_iter=50, return_info=True)
    assert info.converged and info.rounds < 50
    assert all(i is None for i in inits[:3])  # round 1 aligns to the reference from the identity
    assert all(isinstance(i, dict) and set(i) == set(spec.perm_to_axes) for i in inits[3:])

    def pairwise(states):
        return sum(
            float((a.double() * b.double()).sum())
            for i, sa in enumerate(states) for sb in states[i + 1:]
            for k in sa for a, b in [(sa[k], sb[k])]
        )

    states = [state_of(m) for m in models]
    first = [states[0]] + [permute(spec, p, s) for p, s in zip(info.perms[1:], states[1:])]
    # the settled alignment is at least as similar pairwise as aligning everyone to the reference once
    once = [states[0]] + [permute(spec, weight_matching(spec, states[0], s), s) for s in states[1:]]
    assert pairwise(first) >= pairwise(once) - 1e-6


class Counting:
    """A loader that counts how many passes are made over it."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def test_return_info_measures_only_the_requested_merge():
    """return_info adds no pass over the data: the merged model is evaluated once on eval_loader, if given."""
    from rebasin.apps.training import evaluate

    batches = data(n=128)
    models = [seeded_model(mlp, s) for s in range(3)]
    passes = {}
    for return_info in (False, True):
        loader = Counting(batches)
        out = merge(models, loader=loader, return_info=return_info)
        passes[return_info] = loader.passes
    assert passes[True] == passes[False] > 0
    merged, info = out
    assert info.loss is None and info.accuracy is None  # nothing to evaluate on: nothing measured

    loader, test = Counting(batches), Counting(data(n=64, seed=1))
    merged, info = merge(models, loader=loader, eval_loader=test, return_info=True)
    assert test.passes == 1 and loader.passes == passes[False]
    loss, acc = evaluate(merged, test.batches)
    assert info.accuracy == pytest.approx(acc) and info.loss == pytest.approx(loss)


def test_merge_info_holds_one_alignment_per_model():
    loader = data()
    copies, spec = permuted_copies(mlp, (6,), k=3)
    _, info = merge(copies, loader=loader, reference=1, return_info=True)
    assert info.reference == 1 and info.alignments[1] is None and info.method == "weight_matching"
    assert info.spec.axes == spec.axes
    for i in (0, 2):
        alignment = info.alignments[i]
        assert isinstance(alignment, rebasin.Alignment) and alignment.method == "weight_matching"
        assert info.perms[i] == alignment.perms and alignment.time_s >= 0
        expected = permute(spec, alignment.perms, state_of(copies[i]))
        for key, value in state_of(copies[1]).items():  # permuted copies land exactly on the reference
            assert_close(alignment.state_b[key], value)
            assert_close(expected[key], value)
    assert info.perms[1] == {}


def test_compare_merge_errors_name_the_problem():
    loader = data()
    models = [seeded_model(mlp, s) for s in range(3)]
    merged, info = merge(models, loader=loader, return_info=True)
    with pytest.raises(RebasinError, match="REPAIRed: pass loader="):
        compare_merge(models, merged, info, loader)
    with pytest.raises(RebasinError, match="a merge of 3 models, but 2 models were given"):
        compare_merge(models[:2], merged, info, loader, loader=loader)
    with pytest.raises(RebasinError, match="MergeInfo"):
        compare_merge(models, merged, {"perms": []}, loader, loader=loader)
    plain, plain_info = merge(models, loader=loader, repair=False, return_info=True)
    comparison = compare_merge(models, plain, plain_info, loader)  # no REPAIR: no naive_repair, no loader needed
    assert set(comparison.accuracy) == {"models", "naive", "aligned_average", "merged", "ensemble"}
    assert comparison.accuracy["merged"] == comparison.accuracy["aligned_average"]  # repair=False: the average
