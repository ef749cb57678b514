"""Equal storage: AlphaPolicy, the bounded hold-out, the buffer fold, zero storage, CLeWI and storage accounting."""

from __future__ import annotations

import warnings

import pytest
import torch
from builders import synthetic_classifier as tiny
from torch import nn

pytest.importorskip("avalanche")

from avalanche.training import LwF, Naive, Replay
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin, SupervisedPlugin

from continual.benchmarks import synthetic
from continual.clewi import CLeWI
from continual.merging import AlphaChoice, conservative_alpha, merge_states
from continual.plugin import DEFAULT_ALPHA, DEPRECATED_OPTIONS, FALLBACK_ALPHA, RebasinMergePlugin
from continual.policy import AlphaPolicy, holdout_size
from continual.storage import strategy_storage
from rebasin import RebasinError, RebasinWarning

pytestmark = [
    pytest.mark.filterwarnings("ignore:Call to deprecated function update"),
    pytest.mark.filterwarnings("ignore:No loggers specified"),
]


@pytest.fixture(scope="module")
def bench():
    return synthetic(3, seed=0)  # 256 training samples of 16 features per experience, 4 classes


def common(model: nn.Module) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(loggers=[])
    return dict(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), criterion=nn.CrossEntropyLoss(),
                train_mb_size=32, train_epochs=1, eval_mb_size=256, evaluator=evaluator)


def train(strategy, bench) -> None:
    for exp in bench.train_stream:
        strategy.train(exp)


class Rows(SupervisedPlugin):
    """Every training input row, per experience."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[torch.Tensor]] = []

    def before_training_exp(self, strategy, *args, **kwargs):
        self.rows.append([])

    def after_training_iteration(self, strategy, *args, **kwargs):
        self.rows[-1].append(strategy.mb_x.detach().clone())


# ------------------------------------------------------------------ the policy object
def test_alpha_policy_bad_inputs_each_fail_clearly():
    with pytest.raises(RebasinError, match="grid is empty"):
        AlphaPolicy(grid=[])
    with pytest.raises(RebasinError, match="unknown source 'fold'"):
        AlphaPolicy(source="fold")
    with pytest.raises(RebasinError, match="folds must be an int >= 2"):
        AlphaPolicy(source="buffer_fold", folds=1)
    with pytest.raises(RebasinError, match=r"max_fraction must be a number in \(0, 1\)"):
        AlphaPolicy(max_fraction=1.0)
    with pytest.raises(RebasinError, match="samples must be an int >= 1"):
        AlphaPolicy(samples=0)
    with pytest.raises(RebasinError, match="refit must be True or False, got 'yes'"):
        AlphaPolicy(source="buffer_fold", refit="yes")
    with pytest.raises(RebasinError, match="source 'replay' holds nothing out"):
        AlphaPolicy(source="replay", refit=True)
    with pytest.raises(RebasinError, match="not an AlphaPolicy"):
        RebasinMergePlugin(alpha={"sorce": "holdout"})
    with pytest.raises(RebasinError, match="alpha must be a number in"):
        RebasinMergePlugin(alpha="half")
    with pytest.raises(TypeError, match="unexpected keyword"):
        RebasinMergePlugin(alpha_grids=3)


def test_alpha_is_a_number_or_a_policy():
    assert RebasinMergePlugin(alpha=0.5).alpha == 0.5
    plugin = RebasinMergePlugin(alpha={"source": "buffer_fold", "folds": 3})  # e.g. from --option JSON
    assert plugin.alpha is None and plugin.policy == AlphaPolicy(source="buffer_fold", folds=3)
    assert RebasinMergePlugin().policy == DEFAULT_ALPHA == AlphaPolicy(source="buffer_fold", refit=True)
    assert RebasinMergePlugin(alpha=AlphaPolicy()).policy == FALLBACK_ALPHA == AlphaPolicy()  # the earlier default
    assert AlphaPolicy(grid=3).candidates == (0.0, 0.5, 1.0)


@pytest.mark.parametrize("old", sorted(DEPRECATED_OPTIONS))
def test_each_old_keyword_still_works_with_a_deprecation_warning(old):
    value = {"select_alpha_on": "memory", "select_alpha_by": "accuracy", "old_weight": 0.25, "alpha_grid": 3,
             "new_samples": 7, "old_samples": 9, "memory_per_experience": 11}[old]
    with pytest.warns(DeprecationWarning, match=rf"RebasinMergePlugin\({old}=\.\.\.\) is deprecated"):
        plugin = RebasinMergePlugin(**{old: value})
    field = DEPRECATED_OPTIONS[old]
    expected = AlphaPolicy(**{field: value})
    assert plugin.alpha is None and plugin.policy == expected
    with pytest.warns(DeprecationWarning, match=rf"RebasinMergePlugin\.{old} is deprecated"):
        assert getattr(plugin, old) == value  # the 0.2 attribute reads the policy's field


def test_alpha_none_is_a_deprecated_alias_of_the_default_policy():
    with pytest.warns(DeprecationWarning, match=r"alpha=None\) is deprecated"):
        plugin = RebasinMergePlugin(alpha=None)
    assert plugin.alpha is None and plugin.policy == AlphaPolicy()


# ------------------------------------------------------------------ the hold-out is bounded
def test_holdout_size_is_capped_by_the_fraction():
    assert holdout_size(1000, AlphaPolicy(samples=200)) == (200, False)
    assert holdout_size(250, AlphaPolicy(samples=200)) == (50, True)  # the new user: 50 held out, not 200
    assert holdout_size(250, AlphaPolicy(samples=200, max_fraction=0.1)) == (25, True)
    with pytest.raises(RebasinError, match="250 training samples, no more than the hold-out of 300"):
        holdout_size(250, AlphaPolicy(samples=300))


def test_the_hold_out_cannot_eat_an_experience_and_warns_once(bench):
    rows = Rows()
    plugin = RebasinMergePlugin(alpha=AlphaPolicy(samples=200, grid=3))  # 200 of 256: capped at 51
    with pytest.warns(RebasinWarning, match="holding out 200 of the 256 samples") as record:
        train(Naive(plugins=[plugin, rows], **common(tiny())), bench)
    assert len([w for w in record if issubclass(w.category, RebasinWarning)]) == 1
    assert [sum(r.shape[0] for r in exp) for exp in rows.rows] == [256 - 51] * 3
    assert plugin.storage() == {"held_out_samples": 3 * 51, "memory_samples": 0, "model_copies": 1}


def test_an_experience_smaller_than_the_hold_out_fails_before_training(bench):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = Naive(plugins=[RebasinMergePlugin(alpha=AlphaPolicy(samples=300))], **common(model))
    with pytest.raises(RebasinError, match="256 training samples, no more than the hold-out of 300"):
        strategy.train(bench.train_stream[0])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ the buffer fold
def test_buffer_fold_chooses_on_buffer_samples_this_experience_never_trained_on(bench):
    rows = Rows()
    plugin = RebasinMergePlugin(alpha=AlphaPolicy(source="buffer_fold", folds=4, samples=20, grid=3))
    strategy = Replay(mem_size=64, plugins=[plugin, rows], **common(tiny()))
    replay = next(p for p in strategy.plugins if isinstance(p, ReplayPlugin))
    folds = []
    original = plugin._take_fold

    def spy(*args):
        original(*args)
        folds.append(plugin._fold)

    plugin._take_fold = spy
    for k, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        assert len(replay.storage_policy.buffer) == 64  # the fold is back before the buffer is updated
        if k > 0:
            fold_x = folds[-1][0]
            assert fold_x.shape[0] == 64 // 4
            trained = torch.cat(rows.rows[k])
            assert float(torch.cdist(fold_x, trained).min()) > 0.0  # no fold row in this experience's batches
    assert [h.n_old for h in plugin.history] == [16, 16]
    assert all(h.choice is not None and h.n_new == 20 for h in plugin.history)
    assert plugin.storage() == {"held_out_samples": 0, "memory_samples": 0, "model_copies": 1}
    assert folds[0] is None and not torch.equal(folds[1][0], folds[2][0])  # no buffer yet; then the fold rotates


class Boom(SupervisedPlugin):
    """Raises in the callback ``when`` at experience ``at`` (after the fold was taken, before or during training)."""

    def __init__(self, when: str, at: int):
        super().__init__()
        self.when, self.at = when, at
        setattr(self, when, self.boom)

    def boom(self, strategy, *args, **kwargs):
        if strategy.experience.current_experience == self.at:
            raise RuntimeError("boom")


@pytest.mark.parametrize("when", ["before_training_exp", "before_training_epoch", "before_training_iteration"])
def test_an_exception_while_the_fold_is_out_leaves_the_buffer_intact(bench, when):
    plugin = RebasinMergePlugin(alpha=AlphaPolicy(source="buffer_fold", folds=4, samples=20, grid=3))
    # Boom after the replay plugin: at before_training_exp the fold is out and the replay dataloader built
    strategy = Replay(mem_size=64, plugins=[plugin], **common(tiny()))
    strategy.plugins.append(Boom(when, at=1))
    replay = next(p for p in strategy.plugins if isinstance(p, ReplayPlugin))
    strategy.train(bench.train_stream[0])
    before = replay.storage_policy.buffer
    rows = torch.stack([before[i][0] for i in range(len(before))])
    with pytest.raises(RuntimeError, match="boom"):
        strategy.train(bench.train_stream[1])
    after = replay.storage_policy.buffer
    assert len(after) == 64
    torch.testing.assert_close(torch.stack([after[i][0] for i in range(len(after))]), rows)
    assert "_before_training_exp" not in vars(strategy) and "_train_exp" not in vars(strategy)  # wrappers gone
    strategy.plugins.pop()
    strategy.train(bench.train_stream[1])  # and the stream goes on
    assert len(replay.storage_policy.buffer) == 64 and len(plugin.history) == 1


def test_the_default_folds_the_buffer_and_stores_nothing_more(bench):
    plugin = RebasinMergePlugin()
    strategy = Replay(mem_size=64, plugins=[plugin], **common(tiny()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hold-out's cap (256 samples per experience here)
        warnings.filterwarnings("error", ".*fold of the replay buffer")  # a buffer after the plugin: no fallback
        for exp in bench.train_stream[:2]:
            strategy.train(exp)
    assert plugin.policy == DEFAULT_ALPHA and [h.n_old for h in plugin.history] == [64 // 5 + 1]
    assert plugin.history[0].refit_steps > 0
    assert plugin.storage() == {"held_out_samples": 0, "memory_samples": 0, "model_copies": 1}


@pytest.mark.parametrize("where", ["none", "before"])
def test_the_default_without_a_buffer_after_it_falls_back_to_the_hold_out_once(bench, where):
    plugin = RebasinMergePlugin()
    plugins = [plugin] if where == "none" else [ReplayPlugin(mem_size=64), plugin]
    strategy = Naive(plugins=plugins, **common(tiny()))
    with pytest.warns(RebasinWarning, match="default chooses alpha on a fold of the replay buffer") as caught:
        for exp in bench.train_stream[:2]:
            strategy.train(exp)
    assert sum("fold of the replay buffer" in str(w.message) for w in caught) == 1  # once, not per experience
    assert plugin.policy == FALLBACK_ALPHA and len(plugin.history) == 1
    assert plugin.storage()["held_out_samples"] == 2 * 51  # synthetic(3): 256 per experience, at most 20% held out
    # asked for explicitly, the fold still refuses a strategy without a buffer (no silent fallback)
    with pytest.raises(RebasinError, match="needs a replay buffer"):
        Naive(plugins=[RebasinMergePlugin(alpha=AlphaPolicy(source="buffer_fold", refit=True))],
              **common(tiny())).train(bench.train_stream[0])


def test_buffer_fold_bad_setups_fail_before_training(bench):
    policy = AlphaPolicy(source="buffer_fold", folds=5)
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RebasinError, match="at most 3 samples, too few to cut into 5 folds"):
        Replay(mem_size=3, plugins=[RebasinMergePlugin(alpha=policy)], **common(model)).train(bench.train_stream[0])
    with pytest.raises(RebasinError, match="must come before ReplayPlugin"):
        Naive(plugins=[ReplayPlugin(mem_size=64), RebasinMergePlugin(alpha=policy)], **common(model)).train(
            bench.train_stream[0])
    with pytest.raises(RebasinError, match="needs a replay buffer"):
        Naive(plugins=[RebasinMergePlugin(alpha=policy)], **common(model)).train(bench.train_stream[0])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ zero storage
def test_conservative_alpha_keeps_as_much_old_as_the_new_task_allows():
    choice = AlphaChoice(1.0, (0.0, 0.25, 0.5, 1.0), (), (), (), acc_new=(0.3, 0.85, 0.89, 0.9))
    assert conservative_alpha(choice, 0.02) == 0.5
    assert conservative_alpha(choice, 0.05) == 0.25
    assert conservative_alpha(choice, 0.0) == 1.0
    with pytest.raises(RebasinError, match="class scores"):
        conservative_alpha(AlphaChoice(1.0, (0.0, 1.0), (), (), ()), 0.02)


def test_zero_storage_keeps_no_sample(bench):
    plugin = RebasinMergePlugin(alpha=AlphaPolicy(source="current", samples=40, grid=5, tolerance=0.05))
    strategy = Naive(plugins=[plugin], **common(tiny()))
    train(strategy, bench)
    assert plugin._memory == []
    assert [h.n_old for h in plugin.history] == [0, 0] and [h.n_new for h in plugin.history] == [40, 40]
    for h in plugin.history:
        assert h.alpha == conservative_alpha(h.choice, 0.05)
    assert strategy_storage(strategy) == {"buffer_samples": 0, "held_out_samples": 0, "memory_samples": 0,
                                          "model_copies": 1}


# ------------------------------------------------------------------ CLeWI
def test_clewi_interpolates_and_repairs_on_top_of_replay(bench):
    model = tiny(1)
    user_plugins: list = []
    strategy = CLeWI(mem_size=48, plugins=user_plugins, **common(model))
    plugins = strategy.plugins
    assert user_plugins == [] and plugins.index(strategy.clewi_plugin) < plugins.index(strategy.replay_plugin)
    merged = []
    original = strategy.clewi_plugin._merged_state

    def spy(strat, prev, new, alpha, data):
        out = original(strat, prev, new, alpha, data)
        merged.append((merge_states(prev, new, alpha), out))
        return out

    strategy.clewi_plugin._merged_state = spy
    train(strategy, bench)
    assert [h.alpha for h in strategy.history] == [0.5, 0.5]
    for plain, repaired in merged:  # REPAIR rescales the interpolated units: not the plain midpoint
        assert not torch.equal(plain["0.weight"], repaired["0.weight"])
    for k, v in model.state_dict().items():  # the model holds the last repaired merge
        torch.testing.assert_close(v, merged[-1][1][k])
    assert strategy_storage(strategy) == {"buffer_samples": 48, "held_out_samples": 0, "memory_samples": 0,
                                          "model_copies": 1}
    with pytest.raises(RebasinError, match="fixed number"):
        CLeWI(alpha=AlphaPolicy(), **common(tiny()))


# ------------------------------------------------------------------ storage of Avalanche's own strategies
def test_storage_counts_what_regularisation_strategies_keep(bench):
    strategy = LwF(alpha=1.0, temperature=2.0, **common(tiny()))
    strategy.train(bench.train_stream[0])
    assert strategy_storage(strategy)["model_copies"] == 1.0  # LwF's previous model
    strategy = Replay(mem_size=40, **common(tiny()))
    strategy.train(bench.train_stream[0])
    assert strategy_storage(strategy) == {"buffer_samples": 40, "held_out_samples": 0, "memory_samples": 0,
                                          "model_copies": 0}


def test_si_penalises_on_cpu_where_avalanches_plugin_trains_naive(bench):
    from avalanche.training.plugins import SynapticIntelligencePlugin

    from continual.si import SIPlugin

    def run(plugins):
        model = tiny()
        strategy = Naive(plugins=plugins, **common(model))
        train(strategy, bench)
        return model

    naive = run([])
    theirs, ours = SynapticIntelligencePlugin(si_lambda=1.0), SIPlugin(si_lambda=1.0)
    avalanche_si, si = run([theirs]), run([ours])
    # Avalanche 0.6 on CPU: its snapshots are views of the live weights, so no importance and no penalty
    assert max(float(v.data.abs().max()) for v in theirs.ewc_data[1].values()) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(naive.parameters(), avalanche_si.parameters()))
    importance = torch.cat([v.data for v in ours.ewc_data[1].values()])
    assert float(importance.max()) > 0.0
    assert not all(torch.equal(a, b) for a, b in zip(naive.parameters(), si.parameters()))
    # the anchor is the weights after the last experience, a copy (not the live parameters)
    anchor = torch.cat([v.data for v in ours.ewc_data[0].values()])
    torch.testing.assert_close(anchor, torch.cat([p.detach().flatten() for p in si.parameters()]))
    assert all(v.data.data_ptr() != p.data_ptr() for v, p in zip(ours.ewc_data[0].values(), si.parameters()))


def test_make_strategy_si_uses_the_copying_plugin(bench):
    from continual.baselines import make_strategy
    from continual.si import SIPlugin

    model = tiny()
    strategy = make_strategy("si", model=model, example_input=torch.zeros(2, 16), train_mb_size=32, train_epochs=1,
                             evaluator=common(model)["evaluator"])
    assert sum(isinstance(p, SIPlugin) for p in strategy.plugins) == 1
    strategy.train(bench.train_stream[0])
    assert strategy_storage(strategy)["model_copies"] > 0  # SI's state is counted


def test_refit_trains_on_the_held_out_slice_after_the_choice_and_stores_nothing_more(bench):
    # 256 samples per experience, 40 held out, batches of 32: two refit steps after every experience
    policy = AlphaPolicy(source="buffer_fold", folds=4, samples=40, grid=3, refit=True)
    plugin = RebasinMergePlugin(alpha=policy, train_from="sequential")
    rows = Rows()
    strategy = Replay(mem_size=64, plugins=[plugin, rows], **common(tiny()))
    seen: list[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]] = []
    original = plugin._refit

    def spy(strategy_, device):
        inputs: list[torch.Tensor] = []
        hook = strategy_.model[0].register_forward_hook(
            lambda m, args, out: inputs.append(args[0].detach().clone()) if m.training else None)
        try:
            steps = original(strategy_, device)
        finally:
            hook.remove()
        seen.append((plugin._heldout[0].clone(), inputs, strategy_.model[0].weight.detach().clone()))
        return steps

    plugin._refit = spy
    for k, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        held, inputs, refit_weight = seen[k]
        assert held.shape[0] == 40 and len(inputs) == 2
        refit_rows = torch.cat(inputs)
        # every held-out row is trained on in the refit, none in the experience's own batches
        exact = torch.cdist(held, refit_rows, compute_mode="donot_use_mm_for_euclid_dist")
        assert float(exact.min(dim=1).values.max()) == 0.0
        assert float(torch.cdist(held, torch.cat(rows.rows[k])).min()) > 0.0
        # after the first experience, every refit batch is half held-out, half buffer samples
        assert refit_rows.shape[0] == (40 if k == 0 else 80)
        # the next experience trains from the refit weights (the sequential chain), whatever the merge did
        torch.testing.assert_close(plugin._sequential["0.weight"], refit_weight)
    assert [h.refit_steps for h in plugin.history] == [2, 2]
    assert plugin.storage() == {"held_out_samples": 0, "memory_samples": 0, "model_copies": 1}


def test_without_refit_nothing_changes_and_with_it_the_weights_do(bench):
    def final(refit: bool) -> nn.Module:
        model = tiny()
        plugin = RebasinMergePlugin(alpha=AlphaPolicy(source="buffer_fold", folds=4, samples=40, grid=3, refit=refit))
        train(Replay(mem_size=64, plugins=[plugin], **common(model)), bench)
        assert all(h.refit_steps == (2 if refit else 0) for h in plugin.history)
        return model

    plain, refit = final(False), final(True)
    assert not torch.equal(plain[0].weight, refit[0].weight)


def test_make_strategy_rebasin_merge_refit(bench):
    from continual.baselines import make_strategy

    model = tiny()
    strategy = make_strategy("rebasin_merge_refit", model=model, example_input=torch.zeros(2, 16), mem_size=64,
                             train_mb_size=32, train_epochs=1, evaluator=common(model)["evaluator"])
    plugin = next(p for p in strategy.plugins if isinstance(p, RebasinMergePlugin))
    assert plugin.policy == AlphaPolicy(source="buffer_fold", refit=True)
