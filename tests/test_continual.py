"""Tests of the continual/ package (Avalanche 0.6) on a tiny synthetic benchmark."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from builders import synthetic_classifier as tiny
from torch import nn

pytest.importorskip("avalanche")

from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.training import Naive, Replay
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin, SupervisedPlugin

from continual.benchmarks import synthetic
from continual.il_plugin import RebasinILPlugin
from continual.incremental import ILSettings, IncrementalRebasin
from continual.merging import merge_states, rebasin_il_state, select_alpha, write_state_
from continual.plugin import RebasinMergePlugin
from continual.policy import AlphaPolicy
from continual.strategy import RebasinIL
from rebasin import PermutationSpec, RebasinError, RebasinWarning, permute

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:No loggers specified"),
]

ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
FGT = "StreamForgetting/eval_phase/test_stream"


@pytest.fixture(scope="module")
def bench():
    return synthetic(3, seed=0)


def evaluator() -> EvaluationPlugin:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True), forgetting_metrics(experience=True, stream=True),
            loggers=[],
        )


def common(model: nn.Module, **kw):
    return dict(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), criterion=nn.CrossEntropyLoss(),
        train_mb_size=32, train_epochs=2, eval_mb_size=256, evaluator=evaluator(), **kw,
    )


def run(strategy, bench):
    results = None
    for exp in bench.train_stream:
        strategy.train(exp)
        results = strategy.eval(bench.test_stream)
    return results


# ------------------------------------------------------------------ plain functions
def test_merge_states_endpoints_and_integers():
    prev = {"w": torch.zeros(3), "n": torch.tensor(1)}
    new = {"w": torch.tensor([1.0, 2.0, 3.0]), "n": torch.tensor(7)}
    assert torch.equal(merge_states(prev, new, 1.0)["w"], new["w"])
    assert torch.equal(merge_states(prev, new, 0.0)["w"], prev["w"])
    torch.testing.assert_close(merge_states(prev, new, 0.25)["w"], torch.tensor([0.25, 0.5, 0.75]))
    assert int(merge_states(prev, new, 0.3)["n"]) == 7
    with pytest.raises(RebasinError, match="alpha"):
        merge_states(prev, new, 1.5)


def test_rebasin_il_state_formula():
    spec = PermutationSpec({"w": ("P", None), "b": ("P",)})
    prev = {"w": torch.arange(6.0).reshape(3, 2), "b": torch.tensor([1.0, 2.0, 3.0])}
    perm = {"P": torch.tensor([2, 0, 1])}
    delta = {"b": torch.full((3,), 0.5)}
    # alpha is the weight of B, the permuted copy: (1 - alpha) prev + alpha perm(prev) + delta
    out = rebasin_il_state(spec, prev, perm, 0.2, delta)
    expected_b = 0.8 * prev["b"] + 0.2 * prev["b"][perm["P"]] + 0.5
    torch.testing.assert_close(out["b"], expected_b)
    torch.testing.assert_close(out["w"], 0.8 * prev["w"] + 0.2 * prev["w"][perm["P"]])
    # exact at both ends: alpha=0 is the previous model, alpha=1 its permuted copy
    for k, v in rebasin_il_state(spec, prev, perm, 0.0).items():
        assert torch.equal(v, prev[k]), k
    permuted = permute(spec, perm, prev)
    for k, v in rebasin_il_state(spec, prev, perm, 1.0).items():
        assert torch.equal(v, permuted[k]), k
    assert torch.equal(prev["b"], torch.tensor([1.0, 2.0, 3.0]))  # input not mutated


def test_select_alpha_prefers_the_better_end():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(64, 4)
    good = {"weight": torch.tensor([[5.0, 0, 0, 0], [-5.0, 0, 0, 0]]), "bias": torch.zeros(2)}
    bad = {"weight": -good["weight"], "bias": torch.zeros(2)}
    y = (x[:, 0] < 0).long()
    loader = [(x, y)]
    choice = select_alpha(model, bad, good, new_loader=loader, old_loader=loader, grid=5)
    assert choice.alpha == 1.0 and len(choice.objective) == 5
    choice = select_alpha(model, good, bad, new_loader=loader, grid=5)
    assert choice.alpha == 0.0


def test_select_alpha_by_accuracy_minimises_the_weighted_error():
    """Random labels: the loss is lowest mid-path (flatter outputs), the error rate elsewhere."""
    from rebasin import evaluate_path

    g = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3)
    a = {"weight": torch.randn(3, 4, generator=g) * 3, "bias": torch.zeros(3)}
    b = {"weight": torch.randn(3, 4, generator=g) * 3, "bias": torch.zeros(3)}
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    by_loss = select_alpha(model, a, b, new_loader=[(x, y)], grid=11)
    by_acc = select_alpha(model, a, b, new_loader=[(x, y)], grid=11, criterion="accuracy")
    assert (by_loss.alpha, by_acc.alpha) == (0.5, 0.9)
    assert (by_loss.criterion, by_acc.criterion) == ("loss", "accuracy")
    path = evaluate_path(model, a, b, [(x, y)], ts=by_acc.grid)
    assert list(by_acc.acc_new) == pytest.approx(path.accuracy)
    assert list(by_acc.objective) == pytest.approx([1 - v for v in path.accuracy])
    i, j = by_acc.grid.index(0.5), by_acc.grid.index(0.9)
    assert by_acc.acc_new[j] > by_acc.acc_new[i] and by_acc.loss_new[j] > by_acc.loss_new[i]
    # old and new data: old_weight weights the error rates; ties go to the lower weighted loss
    old, new = [(x[:20], y[:20])], [(x[20:], y[20:])]
    c = select_alpha(model, a, b, new_loader=new, old_loader=old, grid=11, old_weight=0.25, criterion="accuracy")
    error = [0.25 * (1 - o) + 0.75 * (1 - n) for o, n in zip(c.acc_old, c.acc_new)]
    loss = [0.25 * o + 0.75 * n for o, n in zip(c.loss_old, c.loss_new)]
    assert list(c.objective) == pytest.approx(error)
    assert c.alpha == c.grid[min(range(11), key=lambda k: (error[k], loss[k], -c.grid[k]))]
    # a tie in error (both ends classify the one sample right): the lower loss wins, not the larger alpha
    xt, yt = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([0])
    confident = {"weight": torch.zeros(3, 4), "bias": torch.tensor([4.0, 0.0, 0.0])}
    timid = {"weight": torch.zeros(3, 4), "bias": torch.tensor([0.5, 0.0, 0.0])}
    tie = select_alpha(model, confident, timid, new_loader=[(xt, yt)], grid=3, criterion="accuracy")
    assert set(tie.acc_new) == {1.0} and tie.alpha == 0.0
    with pytest.raises(RebasinError, match="criterion"):
        select_alpha(model, a, b, new_loader=[(x, y)], criterion="error")
    with pytest.raises(RebasinError, match="class scores"):  # regression targets give no accuracy
        select_alpha(model, a, b, new_loader=[(x, torch.randn(40, 3))], loss_fn=nn.functional.mse_loss,
                     criterion="accuracy")


def test_write_state_keeps_parameter_objects_and_rejects_bad_keys():
    model = tiny()
    before = [id(p) for p in model.parameters()]
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    write_state_(model, state)
    assert [id(p) for p in model.parameters()] == before
    assert all(float(p.detach().abs().sum()) == 0.0 for p in model.parameters())
    with pytest.raises(RebasinError, match="missing"):
        write_state_(model, {"0.weight": torch.zeros(24, 16)})


# ------------------------------------------------------------------ the plugin
@pytest.mark.parametrize("kind", ["naive", "replay"])
def test_plugin_inside_strategies_with_metrics(bench, kind):
    model = tiny()
    if kind == "replay":
        plugin = RebasinMergePlugin(alpha=AlphaPolicy(source="replay", grid=5))
        strategy = Replay(mem_size=64, plugins=[plugin], **common(model))
    else:
        plugin = RebasinMergePlugin(alpha=AlphaPolicy(source="memory", grid=5, samples=64))
        strategy = Naive(plugins=[plugin], **common(model))
    params = list(model.parameters())
    results = run(strategy, bench)
    assert ACC in results and FGT in results
    assert 0.0 <= results[ACC] <= 1.0
    assert len(plugin.history) == 2
    assert [h.experience for h in plugin.history] == [1, 2]
    for h in plugin.history:
        assert h.choice is not None and h.alpha in h.choice.grid and h.n_old > 0 and h.n_new > 0
    # the parameters are the ones the optimizer holds, and the model still is the strategy's
    assert strategy.model is model
    assert all(a is b for a, b in zip(params, model.parameters()))
    opt_params = [p for g in strategy.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for p in params}


class BatchLog(SupervisedPlugin):
    """Records every training input row and the size of the training set of each experience."""

    def __init__(self):
        super().__init__()
        self.rows: list[torch.Tensor] = []
        self.sizes: list[int] = []

    def before_training_exp(self, strategy, *args, **kwargs):
        self.sizes.append(len(strategy.adapted_dataset))

    def after_training_iteration(self, strategy, *args, **kwargs):
        self.rows.append(strategy.mb_x.detach().clone())


def test_plugin_defaults_hold_out_samples_the_model_never_trains_on(bench):
    model = tiny()
    plugin = RebasinMergePlugin(alpha=AlphaPolicy(samples=40, grid=5))  # the default source: "holdout"
    log = BatchLog()
    strategy = Naive(plugins=[plugin, log], **common(model))
    run(strategy, bench)
    assert log.sizes == [256 - 40] * 3
    trained = torch.cat(log.rows)
    assert len(plugin._memory) == 3
    for held_x, _ in plugin._memory:
        assert held_x.shape[0] == 40
        # no held-out row was ever in a training batch
        dist = torch.cdist(held_x.flatten(1), trained.flatten(1))
        assert float(dist.min()) > 0.0
    assert [h.experience for h in plugin.history] == [1, 2]
    for k, h in enumerate(plugin.history, start=1):
        assert h.choice is not None and h.n_new == 40 and h.n_old == 40 * k
        assert h.old_weight == pytest.approx(k / (k + 1))  # every task counts the same
    # the same seed holds out the same samples
    again = RebasinMergePlugin(alpha=AlphaPolicy(samples=40, grid=5))
    run(Naive(plugins=[again], **common(tiny())), bench)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plugin._memory, again._memory))
    assert [h.alpha for h in again.history] == [h.alpha for h in plugin.history]


def test_plugin_select_alpha_by_is_passed_to_the_choice(bench):
    plugin = RebasinMergePlugin(alpha=AlphaPolicy(samples=40, grid=3, criterion="accuracy"))
    run(Replay(mem_size=64, plugins=[plugin], **common(tiny())), bench)
    for h in plugin.history:
        assert h.choice.criterion == "accuracy" and h.choice.acc_new is not None
        error = [h.old_weight * (1 - a) + (1 - h.old_weight) * (1 - b) for a, b in zip(h.choice.acc_old, h.choice.acc_new)]
        assert list(h.choice.objective) == pytest.approx(error)
    with pytest.raises(RebasinError, match="unknown criterion 'error'"):
        RebasinMergePlugin(alpha=AlphaPolicy(criterion="error"))


def test_plugin_old_weight_is_passed_to_the_choice(bench):
    plugin = RebasinMergePlugin(alpha=AlphaPolicy(samples=40, grid=3, old_weight=0.25))
    run(Replay(mem_size=64, plugins=[plugin], **common(tiny())), bench)
    assert [h.old_weight for h in plugin.history] == [0.25, 0.25]
    for h in plugin.history:  # the objective the choice minimised is the weighted one
        expected = [0.25 * a + 0.75 * b for a, b in zip(h.choice.loss_old, h.choice.loss_new)]
        assert list(h.choice.objective) == pytest.approx(expected)


def test_plugin_holdout_inside_replay_keeps_the_slice_out_of_its_own_experience(bench):
    plugin = RebasinMergePlugin(alpha=AlphaPolicy(samples=40, grid=3))
    log = BatchLog()
    strategy = Replay(mem_size=64, plugins=[plugin, log], **common(tiny()))
    for k, exp in enumerate(bench.train_stream):
        start = len(log.rows)
        strategy.train(exp)
        batches = torch.cat(log.rows[start:]).flatten(1)
        held_x = plugin._memory[k][0].flatten(1)
        # Replay's dataloader is built from the reduced dataset: no held-out row in this experience's batches
        assert float(torch.cdist(held_x, batches).min()) > 0.0
    assert log.sizes == [256 - 40] * 3 and len(plugin.history) == 2


def test_plugin_holdout_refuses_an_experience_it_would_empty(bench):
    model = tiny()
    strategy = Naive(plugins=[RebasinMergePlugin(alpha=AlphaPolicy(samples=256))], **common(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RebasinError, match="the experience has 256 training samples, no more than the hold-out of 256"):
        strategy.train(bench.train_stream[0])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RebasinError, match="old_weight"):
        RebasinMergePlugin(alpha=AlphaPolicy(old_weight=1.5))


def test_select_alpha_old_weight():
    model = nn.Linear(4, 2)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    good = {"weight": torch.tensor([[5.0, 0, 0, 0], [-5.0, 0, 0, 0]]), "bias": torch.zeros(2)}
    bad = {"weight": -good["weight"], "bias": torch.zeros(2)}
    old = [(x, (x[:, 0] < 0).long())]
    new = [(x, (x[:, 0] >= 0).long())]  # the other labelling: new data prefers the other end
    assert select_alpha(model, good, bad, new_loader=new, old_loader=old, grid=5, old_weight=1.0).alpha == 0.0
    assert select_alpha(model, good, bad, new_loader=new, old_loader=old, grid=5, old_weight=0.0).alpha == 1.0
    with pytest.raises(RebasinError, match="old_weight"):
        select_alpha(model, good, bad, new_loader=new, old_loader=old, old_weight=2.0)


def test_plugin_writes_merge_into_optimizer_params_and_resets_state(bench):
    model = tiny()
    plugin = RebasinMergePlugin(alpha=0.3)
    strategy = Naive(plugins=[plugin], **common(model))
    strategy.train(bench.train_stream[0])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    class Spy(RebasinMergePlugin.__mro__[1]):  # a SupervisedPlugin running before the merge plugin's end
        def after_training_exp(self, strategy, **kw):
            seen.update({k: v.clone() for k, v in strategy.model.state_dict().items()})

    strategy.plugins.insert(0, Spy())
    strategy.train(bench.train_stream[1])
    trained = seen
    merged = model.state_dict()
    record = plugin.history[-1]
    from rebasin import permute

    prev_aligned = permute(plugin.spec, record.perms, start)
    for k in merged:
        torch.testing.assert_close(merged[k], 0.7 * prev_aligned[k] + 0.3 * trained[k])
    assert any(not torch.equal(merged[k], trained[k]) for k in merged)
    opt = strategy.optimizer
    held = [p for g in opt.param_groups for p in g["params"]]
    assert all(any(p is q for q in held) for p in model.parameters())
    assert all(len(opt.state.get(p, {})) == 0 for p in model.parameters())


def test_plugin_alpha_one_is_a_bitwise_noop(bench):
    model = tiny()
    plugin = RebasinMergePlugin(alpha=1.0)
    strategy = Naive(plugins=[plugin], **common(model))
    strategy.train(bench.train_stream[0])
    seen = {}

    class Spy(RebasinMergePlugin.__mro__[1]):
        def after_training_exp(self, strategy, **kw):
            seen.update({k: v.clone() for k, v in strategy.model.state_dict().items()})

    strategy.plugins.insert(0, Spy())
    state_ids = {id(p): p for p in model.parameters()}
    strategy.train(bench.train_stream[1])
    opt_state_before = {id(p): {k: v.clone() for k, v in strategy.optimizer.state[p].items()} for p in model.parameters()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen[k]), k
    assert {id(p) for p in model.parameters()} == set(state_ids)
    assert all(len(s) > 0 for s in opt_state_before.values())  # optimizer state kept too
    assert plugin.history[-1].alpha == 1.0


def test_plugin_replay_without_buffer_errors_before_training(bench):
    model = tiny()
    strategy = Naive(plugins=[RebasinMergePlugin(alpha=AlphaPolicy(source="replay"))], **common(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RebasinError, match="replay buffer"):
        strategy.train(bench.train_stream[0])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # nothing trained


def test_plugin_empty_replay_buffer_errors_at_use(bench):
    model = tiny()
    plugin = RebasinMergePlugin(alpha=AlphaPolicy(source="replay"))

    class EmptyPolicy:
        buffer: list = []

    class EmptyReplay(RebasinMergePlugin.__mro__[1]):
        storage_policy = EmptyPolicy()

    strategy = Naive(plugins=[plugin, EmptyReplay()], **common(model))
    strategy.train(bench.train_stream[0])
    with pytest.raises(RebasinError, match="replay buffer is empty"):
        strategy.train(bench.train_stream[1])


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(torch.stack([h, h], dim=1).flatten(1))  # stack: not followed by the tracer, so a's units are pinned


def test_tracing_problems_surface_at_construction():
    model = Untraceable()
    x = torch.randn(2, 16)
    # what the tracer cannot prove safe is pinned (one warning at construction), not refused
    with pytest.warns(RebasinWarning, match="pinned"):
        plugin = RebasinMergePlugin(model=model, example_input=x)
    assert plugin.spec.perms == () and plugin.spec.coverage.modules["a"] == (0, 8)
    with pytest.warns(RebasinWarning, match="pinned"):
        RebasinIL(example_input=x, **common(model))
    # an input the model cannot run is refused before any training
    with pytest.raises(RebasinError, match="spec"):
        RebasinMergePlugin(model=tiny(), example_input=torch.randn(2, 15))
    with pytest.raises(RebasinError, match="example_input"):
        RebasinIL(**common(tiny()))


def test_plugin_traces_before_the_first_experience_trains(bench):
    model = Untraceable()
    plugin = RebasinMergePlugin(alpha=AlphaPolicy(source="memory"))
    seen = []

    class Probe(SupervisedPlugin):
        def before_training_iteration(self, strategy, *args, **kwargs):
            seen.append(plugin.spec)

    strategy = Naive(plugins=[plugin, Probe()], **common(model))
    with pytest.warns(RebasinWarning, match="pinned"):
        strategy.train(bench.train_stream[0])
    assert seen and all(s is not None and s is seen[0] for s in seen)  # traced once, before the first step


def test_plugin_rejects_bad_arguments():
    with pytest.raises(RebasinError, match="matcher"):
        RebasinMergePlugin(matcher="nope")
    with pytest.raises(RebasinError, match="unknown source 'nope'"):
        RebasinMergePlugin(alpha=AlphaPolicy(source="nope"))
    with pytest.raises(RebasinError, match="alpha"):
        RebasinMergePlugin(alpha=-0.1)


def test_plugin_activation_matching_runs(bench):
    model = tiny()
    plugin = RebasinMergePlugin(matcher="activation_matching", alpha=0.5, select_alpha_on="memory")
    strategy = Naive(plugins=[plugin], **common(model))
    results = run(strategy, bench)
    assert ACC in results and len(plugin.history) == 2


# ------------------------------------------------------------------ RebasinIL
def test_rebasin_il_three_experiences_end_to_end(bench):
    model = tiny()
    params = list(model.parameters())
    user_opt = None
    strategy = RebasinIL(example_input=torch.randn(2, 16), replay_mem_size=64, residual_lr=1e-2, **common(model))
    user_opt = strategy.optimizer
    accs = []
    for exp in bench.train_stream:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        strategy.train(exp)
        results = strategy.eval(bench.test_stream)
        accs.append(results[ACC])
        assert strategy.optimizer is user_opt
        if exp.current_experience > 0:
            rec = strategy.history[-1]
            merged = rebasin_il_state(strategy.spec, before, rec.perms, strategy.alpha, None)
            # merged = alpha prev + (1-alpha) perm(prev) + delta: the residual is the difference
            diff = {k: model.state_dict()[k] - merged[k] for k in merged}
            assert rec.delta_norm == pytest.approx(
                float(torch.sqrt(sum((d.double() ** 2).sum() for d in diff.values()))), rel=1e-4, abs=1e-6
            )
    assert FGT in results and len(strategy.history) == 2
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert accs[-1] > 0.5  # learns something (chance is 0.25)


def test_rebasin_il_does_not_mutate_plugin_list(bench):
    plugins: list = []
    RebasinIL(example_input=torch.randn(2, 16), plugins=plugins, **common(tiny()))
    assert plugins == []
    extra = ReplayPlugin(mem_size=8)
    given = (extra,)
    strategy = RebasinIL(example_input=torch.randn(2, 16), plugins=given, **common(tiny()))
    assert given == (extra,)
    assert strategy.plugins[:3] == [extra, strategy.replay_plugin, strategy.rebasin_plugin]


def il_options() -> dict:
    return dict(residual_lr=1e-2, init="random", seed=5)


def test_rebasin_il_plugin_in_naive_is_bitwise_the_strategy(bench):
    """RebasinIL is only SupervisedTemplate + ReplayPlugin + RebasinILPlugin: Naive with the two
    plugins trains the same weights bit for bit."""
    def train(kind: str):
        model = tiny(1)
        if kind == "strategy":
            strategy = RebasinIL(example_input=torch.zeros(2, 16), replay_mem_size=48, **il_options(), **common(model))
            plugin = strategy.rebasin_plugin
        else:
            plugin = RebasinILPlugin(**il_options())  # spec traced from the first experience's data
            strategy = Naive(plugins=[ReplayPlugin(mem_size=48), plugin], **common(model))
        torch.manual_seed(7)
        accs = []
        for exp in bench.train_stream:
            strategy.train(exp)
            accs.append(strategy.eval(bench.test_stream)[ACC])
        return model.state_dict(), accs, plugin

    state_a, accs_a, plugin_a = train("strategy")
    state_b, accs_b, plugin_b = train("plugin")
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    assert accs_a == accs_b
    assert [h.delta_norm for h in plugin_a.history] == [h.delta_norm for h in plugin_b.history]
    for ha, hb in zip(plugin_a.history, plugin_b.history, strict=True):
        assert ha.perms.keys() == hb.perms.keys() and all(torch.equal(ha.perms[k], hb.perms[k]) for k in ha.perms)
    assert plugin_a.alpha == plugin_b.alpha == 0.2


def test_rebasin_il_plugin_leaves_the_user_optimizer_and_model_alone(bench):
    """During the re-basin phase the strategy keeps the user's optimizer (same object, same groups,
    no state change) and the model's weights stay at theta_prev; the merge then resets the state."""
    model = tiny()
    params = list(model.parameters())
    plugin = RebasinILPlugin(model=model, example_input=torch.zeros(2, 16), residual_lr=1e-2)
    strategy = Naive(plugins=[ReplayPlugin(mem_size=32), plugin], **common(model))
    user_opt = strategy.optimizer
    strategy.train(bench.train_stream[0])
    groups = [[id(p) for p in g["params"]] for g in user_opt.param_groups]
    opt_state = {id(p): {k: v.clone() for k, v in user_opt.state[p].items()} for p in params}
    assert all(opt_state.values())  # AdamW moments from the first experience
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {"iterations": 0}

    class Spy(SupervisedPlugin):
        def after_update(self, strategy, **kw):
            seen["iterations"] += 1
            assert strategy.optimizer is user_opt and plugin.rebasin_phase
            assert [[id(p) for p in g["params"]] for g in user_opt.param_groups] == groups
            for p in params:
                assert p.grad is None
                assert all(torch.equal(v, opt_state[id(p)][k]) for k, v in user_opt.state[p].items())
            assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())

    strategy.plugins.append(Spy())
    strategy.train(bench.train_stream[1])
    assert seen["iterations"] > 0 and not plugin.rebasin_phase
    assert strategy.optimizer is user_opt
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(len(user_opt.state.get(p, {})) == 0 for p in params)  # stale moments dropped
    rec = plugin.history[-1]
    assert rec.experience == 1 and rec.delta_norm > 0
    merged = rebasin_il_state(plugin.spec, start, rec.perms, plugin.alpha)
    assert any(not torch.equal(model.state_dict()[k], merged[k]) for k in merged)  # the residual was added


def test_rebasin_il_plugin_leaves_the_global_rng_alone(bench):
    plugin = RebasinILPlugin(init="random", seed=3)  # random logits; spec traced from the data
    strategy = Naive(plugins=[ReplayPlugin(mem_size=32), plugin], **common(tiny()))
    calls = guard_global_rng(plugin)
    run(strategy, bench)
    assert len(plugin.history) == 2 and calls["after_forward"] > 0 and calls["before_update"] == calls["after_forward"]


def test_rebasin_il_signature_mirrors_the_plugin():
    import inspect

    strategy = inspect.signature(RebasinIL).parameters
    plugin = inspect.signature(RebasinILPlugin).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in strategy.values())
    for name in ("model", "optimizer", "criterion", "train_mb_size", "train_epochs", "eval_mb_size", "device",
                 "plugins", "evaluator"):
        assert name in strategy
    for name, p in plugin.items():
        assert name in strategy, name
        if name != "model":
            assert strategy[name].default == p.default, name
    assert plugin["alpha"].default == 0.2


def test_rebasin_il_plugin_rejects_bad_arguments():
    for kwargs, match in [({"alpha": 1.5}, "alpha"), ({"perm_lr": 0}, "perm_lr"), ({"tau": float("nan")}, "tau"),
                          ({"n_iter": 0}, "n_iter"), ({"init": "nope"}, "init"),
                          ({"residual_weight_decay": -1.0}, "residual_weight_decay"), ({"seed": 1.5}, "seed")]:
        with pytest.raises(RebasinError, match=match):
            RebasinILPlugin(**kwargs)
    with pytest.raises(RebasinError, match="example_input"):
        RebasinILPlugin(model=tiny())
    with pytest.raises(TypeError):
        RebasinILPlugin(alhpa=0.3)  # no **kwargs swallowing typos
    with pytest.raises(RebasinError, match="replay_mem_size"):
        RebasinIL(example_input=torch.zeros(2, 16), replay_mem_size=-1, **common(tiny()))
    with pytest.raises(RebasinError, match="settings"):
        IncrementalRebasin(PermutationSpec({"w": ("P",)}), {"w": torch.zeros(2)}, {"alpha": 0.2}, trainable=["w"])
    assert ILSettings(perm_lr=1).perm_lr == 1.0


def test_rebasin_il_plugin_rejects_multitask_models(bench):
    from avalanche.models import MultiTaskModule

    class TwoArgs(MultiTaskModule):
        def __init__(self):
            super().__init__()
            self.body = tiny()

        def forward_single_task(self, x, task_label):
            return self.body(x)

    model = TwoArgs()
    strategy = Naive(plugins=[RebasinILPlugin(spec=PermutationSpec({}))], **common(model))
    with pytest.raises(RebasinError, match="MultiTaskModule"):
        strategy.train(bench.train_stream[0])


# ------------------------------------------------------------------ compare and packaging
def test_compare_writes_outputs(tmp_path):
    from continual.compare import accuracy_matrix_metrics, main

    acc, fgt = accuracy_matrix_metrics([[1.0, 0.0], [0.5, 0.9]])
    assert acc == pytest.approx(0.7) and fgt == pytest.approx(0.5)
    code = main([
        "--benchmark", "synthetic", "--strategies", "naive,rebasin_merge_holdout,rebasin_il", "--seeds", "1",
        "--epochs", "1", "--batch-size", "64", "--mem-size", "32", "--hidden", "16", "--out", str(tmp_path),
        "--no-progress",
    ])
    assert code == 0
    for name in ("runs.csv", "summary.csv", "summary.md", "accuracy.png", "runs.json"):
        assert (tmp_path / name).stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    # the plugin's earlier defaults keep held-out samples besides the buffer: an equal-storage Replay control follows
    assert [r["strategy"] for r in rows] == ["naive", "rebasin_merge_holdout", "replay_eq_rebasin_merge_holdout",
                                             "rebasin_il"]
    assert "± " in (tmp_path / "summary.md").read_text()
    runs = {r["strategy"]: r for r in json.loads((tmp_path / "runs.json").read_text())["runs"]}
    held = runs["rebasin_merge_holdout"]["storage"]
    # synthetic(3): 256 samples per experience; 200 asked, at most 20% (51) held out of each and kept
    assert held == {"buffer_samples": 32, "held_out_samples": 3 * 51, "memory_samples": 0, "model_copies": 1}
    assert runs["replay_eq_rebasin_merge_holdout"]["storage"]["buffer_samples"] == 32 + 3 * 51
    assert runs["naive"]["storage"] == {"buffer_samples": 0, "held_out_samples": 0, "memory_samples": 0,
                                        "model_copies": 0}
    assert "| 185 (32 + 153) |" in (tmp_path / "summary.md").read_text()


def test_compare_shards_combine_into_one_table(tmp_path):
    from continual.compare import combine_runs, main

    common_args = ["--benchmark", "synthetic", "--epochs", "1", "--batch-size", "64", "--mem-size", "32",
                   "--hidden", "16", "--no-progress", "--no-equal-storage"]
    main([*common_args, "--strategies", "naive", "--seeds", "2", "--out", str(tmp_path / "a")])
    main([*common_args, "--strategies", "rebasin_merge,naive", "--first-seed", "2", "--seeds", "1",
          "--out", str(tmp_path / "b")])
    runs_a = json.loads((tmp_path / "a" / "runs.json").read_text())["runs"]
    assert [r["seed"] for r in runs_a] == [0, 1]
    # a seed gives the same run whether it comes first or not
    main([*common_args, "--strategies", "naive", "--first-seed", "1", "--seeds", "1", "--out", str(tmp_path / "c")])
    run_c = json.loads((tmp_path / "c" / "runs.json").read_text())["runs"][0]
    assert run_c["seed"] == 1 and run_c["accuracy"] == runs_a[1]["accuracy"]

    assert main(["--combine", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "all")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "all" / "summary.csv")))
    # strategies in the canonical order, whatever order the shards ran them in
    assert [(r["strategy"], r["seeds"]) for r in rows] == [("naive", "3"), ("rebasin_merge", "1")]
    runs = list(csv.DictReader(open(tmp_path / "all" / "runs.csv")))
    assert [(r["strategy"], r["seed"]) for r in runs][:3] == [("naive", "0"), ("naive", "1"), ("naive", "2")]
    accs = [float(r["average_accuracy"]) for r in runs[:3]]
    assert float(rows[0]["acc_mean"]) == pytest.approx(sum(accs) / 3)
    combined = (tmp_path / "all" / "summary.md").read_text()
    assert "3 seed(s) (0, 1, 2)" in combined and "batch 64, 1 epochs, replay 32" in combined
    assert (tmp_path / "all" / "accuracy.png").stat().st_size > 0

    with pytest.raises(RebasinError, match="both"):
        combine_runs([tmp_path / "a", tmp_path / "c"])
    main([*common_args[:3], "2", *common_args[4:], "--strategies", "naive", "--seeds", "1",
          "--out", str(tmp_path / "d")])
    with pytest.raises(RebasinError, match="other settings.*epochs"):
        combine_runs([tmp_path / "b", tmp_path / "d"])
    with pytest.raises(RebasinError, match="no runs.json"):
        combine_runs([tmp_path / "missing"])


def test_import_rebasin_does_not_import_avalanche():
    code = "import sys, rebasin, continual; print('avalanche' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(not os.environ.get("REBASIN_DATA"), reason="set REBASIN_DATA to a local MNIST root")
def test_rotated_mnist_benchmark_shapes():
    from continual.benchmarks import rotated_mnist

    bm = rotated_mnist(os.environ["REBASIN_DATA"], n_experiences=3, train_samples=100, test_samples=50)
    assert len(bm.train_stream) == 3
    x, y, _ = bm.train_stream[2].dataset[0]
    assert tuple(x.shape) == (1, 28, 28)
    x0 = bm.train_stream[0].dataset[0][0]
    assert not torch.equal(x, x0)  # rotated by 180 degrees
    torch.testing.assert_close(x, torch.flip(x0, dims=(1, 2)), atol=1e-4, rtol=0)


@pytest.mark.skipif(not os.environ.get("REBASIN_DATA"), reason="set REBASIN_DATA to a local MNIST root")
@pytest.mark.parametrize("name", ["rotated_mnist", "permuted_mnist", "split_mnist"])
def test_mnist_benchmarks_raw_pixels(name):
    from continual import benchmarks
    from rebasin.apps.data import MNIST_MEAN, MNIST_STD

    make = getattr(benchmarks, name)
    kw = {"train_samples": 64, "test_samples": 32} | ({"n_experiences": 2} if name != "split_mnist" else {})
    norm, raw = make(os.environ["REBASIN_DATA"], **kw), make(os.environ["REBASIN_DATA"], pixels="raw", **kw)
    for a, b in zip(norm.train_stream, raw.train_stream):
        xa, xb = a.dataset[3][0], b.dataset[3][0]
        torch.testing.assert_close(xb, xa * MNIST_STD + MNIST_MEAN)
        assert float(xb.min()) >= -1e-6 and float(xb.max()) <= 1 + 1e-6
    with pytest.raises(RebasinError, match="unknown pixels"):
        make(os.environ["REBASIN_DATA"], pixels="unit", **kw)


# ------------------------------------------------------------------ no hidden side effects
def guard_global_rng(plugin) -> dict:
    """Wrap every Avalanche callback of ``plugin`` so that each call asserts the global torch RNG
    state after it equals the state before it; returns the per-callback call counts."""
    calls: dict = {}
    for name in dir(SupervisedPlugin):
        if not name.startswith(("before_", "after_")):
            continue

        def wrapped(strategy, *args, _inner=getattr(plugin, name), _name=name, **kwargs):  # noqa: B008 - binds the method being wrapped at definition time, on purpose
            before = torch.get_rng_state()
            out = _inner(strategy, *args, **kwargs)
            assert torch.equal(torch.get_rng_state(), before), f"{type(plugin).__name__}.{_name} drew global RNG"
            calls[_name] = calls.get(_name, 0) + 1
            return out

        setattr(plugin, name, wrapped)
    return calls


@pytest.mark.parametrize("config", ["holdout", "memory", "replay", "buffer_fold", "current", "clewi",
                                    "activation_matching", "sinkhorn"])
def test_merge_plugin_leaves_the_global_rng_alone(bench, config):
    model = tiny()
    if config in ("buffer_fold", "current"):
        plugin = RebasinMergePlugin(alpha=AlphaPolicy(source=config, grid=3, samples=32))
        strategy = Replay(mem_size=64, plugins=[plugin], **common(model))
    elif config == "clewi":
        from continual.clewi import CLeWI

        strategy = CLeWI(mem_size=64, repair_samples=32, **common(model))
        plugin = strategy.clewi_plugin
    elif config == "holdout":  # the defaults, inside Replay
        plugin = RebasinMergePlugin(alpha=AlphaPolicy(grid=3, samples=32))
        strategy = Replay(mem_size=64, plugins=[plugin], **common(model))
    elif config == "replay":
        plugin = RebasinMergePlugin(alpha=AlphaPolicy(source="replay", grid=3))
        strategy = Replay(mem_size=64, plugins=[plugin], **common(model))
    elif config == "memory":
        plugin = RebasinMergePlugin(alpha=AlphaPolicy(source="memory", grid=3, samples=32))
        strategy = Naive(plugins=[plugin], **common(model))
    else:
        options = {"fit": {"progress": False, "steps": 5}} if config == "sinkhorn" else None
        plugin = RebasinMergePlugin(matcher=config, alpha=0.5, select_alpha_on="memory", matcher_options=options)
        strategy = Naive(plugins=[plugin], **common(model))
    calls = guard_global_rng(plugin)
    run(strategy, bench)  # the spec is traced from the first experience's data
    assert len(plugin.history) == 2 and calls["after_training_exp"] == 3 and calls["before_training_exp"] == 3
    assert calls["after_train_dataset_adaptation"] == 3


@pytest.mark.parametrize("train_from", ["merged", "sequential"])
def test_merge_plugin_alpha_one_inside_replay_is_bitwise_replay(bench, train_from):
    def train(with_plugin: bool):
        model = tiny(3)
        plugin = RebasinMergePlugin(alpha=1.0, train_from=train_from) if with_plugin else None  # spec from the data
        strategy = Replay(mem_size=48, plugins=[plugin] if with_plugin else [], **common(model))
        torch.manual_seed(11)
        accs = []
        for exp in bench.train_stream:
            strategy.train(exp)
            accs.append(strategy.eval(bench.test_stream)[ACC])
        return model.state_dict(), accs, torch.get_rng_state(), plugin

    state_a, accs_a, rng_a, _ = train(False)
    state_b, accs_b, rng_b, plugin = train(True)
    assert [h.alpha for h in plugin.history] == [1.0, 1.0] and plugin.spec is not None
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    assert accs_a == accs_b
    assert torch.equal(rng_a, rng_b)


@pytest.mark.parametrize("train_from", ["sequential", "merged"])
def test_merge_plugin_chains(bench, train_from):
    """"sequential" (default): experience t trains from w_hat_{t-1}, the model holds the merge in between;
    "merged": experience t trains from the merge."""
    from avalanche.training.plugins import SupervisedPlugin

    class Probe(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.starts, self.ends = [], []

        def before_training_epoch(self, strategy, *args, **kwargs):
            if strategy.clock.train_exp_epochs == 0:
                self.starts.append({k: v.detach().clone() for k, v in strategy.model.state_dict().items()})

        def after_training_epoch(self, strategy, *args, **kwargs):
            self.ends.append({k: v.detach().clone() for k, v in strategy.model.state_dict().items()})

    probe = Probe()
    model = tiny(5)
    plugin = RebasinMergePlugin(alpha=0.5, train_from=train_from)
    strategy = Naive(plugins=[probe, plugin], **common(model))
    held = []
    for exp in bench.train_stream:
        strategy.train(exp)
        held.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    hats = probe.ends[1::2]  # two epochs per experience: the weights at the end of each experience's training
    assert len(hats) == 3 and [h.alpha for h in plugin.history] == [0.5, 0.5]
    for t in (1, 2):
        # experience t starts from w_hat_{t-1} (two chains) or from the merge the model held (one chain)
        start = hats[t - 1] if train_from == "sequential" else held[t - 1]
        assert all(torch.equal(probe.starts[t][k], start[k]) for k in start)
        # between experiences the model holds (pi(previous merge) + w_hat_t) / 2
        prev = held[t - 1]
        perms = plugin.history[t - 1].perms
        aligned = permute(plugin.spec, perms, prev)
        for k in held[t]:
            torch.testing.assert_close(held[t][k], 0.5 * aligned[k] + 0.5 * hats[t][k])
    assert all(torch.equal(held[0][k], hats[0][k]) for k in held[0])  # nothing to merge after the first
    assert any(not torch.equal(held[1][k], hats[1][k]) for k in held[1])
    with pytest.raises(RebasinError, match="train_from"):
        RebasinMergePlugin(train_from="merge")


class _TinyAttention(nn.Module):
    """16 features as 4 tokens of 4 -> Linear -> a pre-norm transformer encoder layer (2 heads) -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(self.inp(x.view(-1, 4, 4))).mean(1))


def test_plugin_merges_an_attention_model_with_heads(bench):
    torch.manual_seed(0)
    model = _TinyAttention()
    plugin = RebasinMergePlugin(alpha=0.5)
    strategy = Replay(mem_size=64, plugins=[plugin], **common(model))
    results = run(strategy, bench)
    assert 0.0 <= results[ACC] <= 1.0 and len(plugin.history) == 2
    spec = plugin.spec
    assert spec is not None and spec.structure  # heads and the units inside them were aligned
