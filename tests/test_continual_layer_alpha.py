"""One merge weight per layer: layer_groups, merge_states with per-layer alphas, select_layer_alphas and
AlphaPolicy(granularity="layer") in the plugin."""

from __future__ import annotations

import warnings

import pytest
import torch
from builders import synthetic_classifier as tiny
from torch import nn

from continual.merging import layer_groups, merge_states, select_alpha, select_layer_alphas
from continual.policy import AlphaPolicy
from rebasin import RebasinError

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated function update")


def _pair(seed: int = 0) -> tuple[nn.Module, dict, dict]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    other = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    for m in (model, other):  # randomised norm statistics
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.data.uniform_(0.5, 1.5)
        m[1].bias.data.normal_()
    return model, other.state_dict(), model.state_dict()


def _data(seed: int, n: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return [(x[i : i + 16], torch.randint(0, 3, (16,), generator=g)) for i in range(0, n, 16)]


def _objective(model: nn.Module, state: dict, old_weight: float) -> float:
    """``old_weight * mean loss on _data(2) + (1 - old_weight) * mean loss on _data(1)`` of ``state``, by hand."""
    def mean_loss(batches):
        with torch.no_grad():
            losses = [nn.functional.cross_entropy(torch.func.functional_call(model.eval(), state, (x,)), y, reduction="sum")
                      for x, y in batches]
        return float(sum(losses)) / sum(len(y) for _, y in batches)
    return old_weight * mean_loss(_data(2)) + (1 - old_weight) * mean_loss(_data(1))


def test_layer_groups_put_norms_and_biases_with_their_layer():
    _, _, state = _pair()
    assert layer_groups(state) == {
        "0": ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"),
        "3": ("3.weight", "3.bias"),
    }  # num_batches_tracked (an integer buffer) belongs to no group


def test_layer_groups_of_a_leading_norm_join_the_first_layer():
    m = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2))
    assert layer_groups(m.state_dict()) == {"1": ("0.weight", "0.bias", "1.weight", "1.bias")}


def test_merge_with_the_same_alpha_for_every_layer_is_the_single_alpha_merge():
    _, prev, new = _pair()
    for a in (0.0, 0.3, 1.0):
        per_layer = merge_states(prev, new, {"0": a, "3": a})
        single = merge_states(prev, new, a)
        assert per_layer.keys() == single.keys()
        for k in single:
            torch.testing.assert_close(per_layer[k], single[k], rtol=0, atol=0)


def test_merge_per_layer_weights_each_layer_and_mutates_nothing():
    _, prev, new = _pair()
    before = {k: v.clone() for k, v in {**prev, **{"n." + k: v for k, v in new.items()}}.items()}
    out = merge_states(prev, new, {"0": 1.0, "3": 0.0})
    for k in ("0.weight", "1.running_var"):
        torch.testing.assert_close(out[k], new[k], rtol=0, atol=0)
    torch.testing.assert_close(out["3.weight"], prev["3.weight"], rtol=0, atol=0)
    torch.testing.assert_close(out["1.num_batches_tracked"], new["1.num_batches_tracked"])
    for k, v in {**prev, **{"n." + k: v for k, v in new.items()}}.items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [{"0": 0.5}, {"0": 0.5, "3": 0.5, "9": 0.5}, {"0": 0.5, "3": 1.5}])
def test_merge_per_layer_bad_alphas_raise(alpha):
    _, prev, new = _pair()
    with pytest.raises(RebasinError, match="alpha"):
        merge_states(prev, new, alpha)


def test_layer_search_with_one_candidate_is_the_single_choice():
    model, prev, new = _pair()
    kwargs = dict(new_loader=_data(1), old_loader=_data(2), grid=[0.4], old_weight=0.5)
    choice = select_layer_alphas(model, prev, new, passes=2, **kwargs)
    assert choice.alphas == {"0": 0.4, "3": 0.4} and choice.start.alpha == 0.4
    # the reported objective is the merge's, recomputed here outside the search
    torch.testing.assert_close(choice.objective, _objective(model, merge_states(prev, new, 0.4), 0.5), rtol=1e-6, atol=0)


def test_layer_search_never_ends_above_the_single_alpha_and_is_deterministic():
    model, prev, new = _pair()
    kwargs = dict(new_loader=_data(1), old_loader=_data(2), grid=5, old_weight=0.5, passes=2)
    a = select_layer_alphas(model, prev, new, **kwargs)
    b = select_layer_alphas(model, prev, new, **kwargs)
    assert a == b
    # recomputed from the chosen per-layer merge (not the search's own bookkeeping): true, and not above the
    # best single alpha's objective, recomputed the same way
    torch.testing.assert_close(a.objective, _objective(model, merge_states(prev, new, a.alphas), 0.5), rtol=1e-6, atol=0)
    best_single = min(_objective(model, merge_states(prev, new, t), 0.5) for t in a.start.grid)
    assert a.objective <= best_single + 1e-9
    if len(set(a.alphas.values())) == 1:  # every layer at one value: the single alpha's merge
        assert a.objective == a.start.objective[a.start.grid.index(a.alphas["0"])]


def test_layer_search_finds_the_layer_that_should_differ():
    # the right answer: the new model's first layer and the previous model's second. Along the single line the
    # product of the layers is t * (1 - 2t) * W, at most W / 8; per layer (1, 0) it is W itself.
    torch.manual_seed(0)
    w = 4.0 * torch.randn(3, 4)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 3, bias=False))
    new = {"0.weight": torch.eye(4), "1.weight": -w}
    prev = {"0.weight": torch.zeros(4, 4), "1.weight": w.clone()}
    x = torch.randn(64, 4)
    data = [(x, (x @ w.T).argmax(1))]
    choice = select_layer_alphas(model, prev, new, new_loader=data, grid=11, passes=2)
    assert 0.0 < choice.start.alpha < 1.0
    assert choice.alphas == {"0": 1.0, "1": 0.0}
    assert choice.objective < min(choice.start.objective)
    assert choice.passes == 2


def test_layer_search_bad_passes_raise():
    model, prev, new = _pair()
    with pytest.raises(RebasinError, match="passes"):
        select_layer_alphas(model, prev, new, new_loader=_data(1), passes=0)


@pytest.mark.parametrize(
    "fields, match",
    [({"granularity": "block"}, "granularity"), ({"granularity": None}, "granularity"),
     ({"granularity": "layer", "layer_passes": 0}, "layer_passes"),
     ({"granularity": "layer", "layer_passes": 1.5}, "layer_passes"),
     ({"granularity": "layer", "source": "current"}, "granularity='layer'")],
)
def test_policy_bad_granularity_raises(fields, match):
    with pytest.raises(RebasinError, match=match):
        AlphaPolicy(**fields)


def test_plugin_merges_per_layer_with_refit_on_a_tiny_stream():
    pytest.importorskip("avalanche")
    from avalanche.training import Replay
    from avalanche.training.plugins import EvaluationPlugin

    from continual.benchmarks import synthetic
    from continual.plugin import RebasinMergePlugin

    bench = synthetic(3, seed=0)
    model = tiny()
    policy = AlphaPolicy(source="buffer_fold", folds=4, samples=40, grid=5, refit=True, granularity="layer",
                         layer_passes=2)
    plugin = RebasinMergePlugin(alpha=policy, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(loggers=[])
        strategy = Replay(mem_size=64, plugins=[plugin], model=model,
                          optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), criterion=nn.CrossEntropyLoss(),
                          train_mb_size=32, train_epochs=1, eval_mb_size=256, evaluator=evaluator)
        for exp in bench.train_stream:
            strategy.train(exp)
    merged = [h for h in plugin.history if h.layers is not None]
    assert len(merged) == 2  # no merge after the first experience
    for h in merged:
        assert set(h.layer_alphas) == {"0", "2"}
        assert all(a in policy.candidates for a in h.layer_alphas.values())
        assert h.layers.start.alpha == h.alpha and h.refit_steps == 2
        assert h.layers.objective <= min(h.choice.objective)


def test_compare_records_the_layers_alphas_of_rebasin_merge_layer():
    pytest.importorskip("avalanche")
    from continual.benchmarks import synthetic
    from continual.compare import run_strategy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_strategy("rebasin_merge_layer", synthetic(3, seed=0), seed=0, model_factory=tiny,
                              example_input=torch.zeros(2, 16), epochs=1, batch_size=32, lr=1e-2, mem_size=100,
                              device="cpu", progress=False)
    alphas, merges = result.extra["alphas"], result.extra["merges"]
    assert len(alphas) == 2  # one merge after each experience but the first, each with the two layers' alphas
    assert all(isinstance(a, list) and len(a) == 2 and all(0.0 <= v <= 1.0 for v in a) for a in alphas)
    assert [list(m["layer_alphas"].values()) for m in merges] == alphas


def test_layer_search_refuses_a_start_chosen_otherwise():
    model, prev, new = _pair()
    kwargs = dict(new_loader=_data(1), old_loader=_data(2), grid=5, old_weight=0.5)
    by_loss = select_alpha(model, prev, new, **kwargs)
    with pytest.raises(RebasinError, match="criterion='loss'.*criterion='accuracy'"):
        select_layer_alphas(model, prev, new, criterion="accuracy", start=by_loss, **kwargs)
    with pytest.raises(RebasinError, match="grid"):
        select_layer_alphas(model, prev, new, start=by_loss, **{**kwargs, "grid": 3})
    with pytest.raises(RebasinError, match="AlphaChoice"):
        select_layer_alphas(model, prev, new, start=0.5, **kwargs)
