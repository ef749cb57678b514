"""Tests of continual.MCSGD (Mirzadeh et al. 2021) and its line objective, on tiny synthetic data."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from builders import synthetic_classifier as tiny
from torch import nn

pytest.importorskip("avalanche")

from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from continual.baselines import make_strategy
from continual.benchmarks import synthetic
from continual.lines import (
    fit_on_lines,
    fit_paired_lines,
    line_loss,
    line_points,
    reference_line_loss,
)
from continual.mcsgd import MCSGD, MCSGDPlugin
from rebasin import RebasinError

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:No loggers specified"),
]

ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"


@pytest.fixture(scope="module")
def bench():
    return synthetic(3, seed=0)


def common(model: nn.Module) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    return dict(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), criterion=nn.CrossEntropyLoss(),
        train_mb_size=32, train_epochs=1, eval_mb_size=256, evaluator=evaluator,
    )


# ------------------------------------------------------------------ the line objective
def test_line_points_leave_out_the_anchor():
    assert line_points(4) == (0.25, 0.5, 0.75, 1.0)
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(RebasinError, match="line_points"):
            line_points(bad)


def test_line_loss_is_the_mean_loss_at_interpolated_weights():
    model = tiny(1)
    g = torch.Generator().manual_seed(0)
    w = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    anchors = [{k: torch.randn(v.shape, generator=g) for k, v in w.items()} for _ in range(2)]
    x, y = torch.randn(20, 16, generator=g), torch.randint(0, 4, (20,), generator=g)
    got = line_loss(model, w, anchors, x, y, points=(0.5, 1.0))
    expected = []
    probe = copy.deepcopy(model)
    for a in anchors:
        for t in (0.5, 1.0):
            probe.load_state_dict({k: a[k] + t * (w[k] - a[k]) for k in w})
            expected.append(nn.functional.cross_entropy(probe(x), y))
    torch.testing.assert_close(got, torch.stack(expected).mean())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in model.state_dict().items():  # the model's own weights are neither read nor changed
        assert torch.equal(v, before[k])


def test_fit_on_lines_lowers_the_memory_loss_along_the_lines():
    model = tiny(2)
    g = torch.Generator().manual_seed(1)
    start = {k: v.clone() for k, v in model.named_parameters()}
    hat = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    points = line_points(4)
    fit = fit_on_lines(model, start, [start, hat], (x, y), points=points, lr=0.1, momentum=0.5, epochs=20,
                       batch_size=16, seed=0)
    assert fit.steps == 20 * 4
    with torch.no_grad():
        at_start = float(line_loss(model, start, [start, hat], x, y, points=points))
        at_end = float(line_loss(model, fit.state, [start, hat], x, y, points=points))
    assert fit.loss_before == pytest.approx(at_start, rel=1e-5)
    assert fit.loss_after == pytest.approx(at_end, rel=1e-5)
    assert at_end < 0.8 * at_start
    # every point sampled on the line between the fitted w and hat is lower than it was from the start
    for t in points:
        with torch.no_grad():
            before = line_loss(model, start, [hat], x, y, points=(t,))
            after = line_loss(model, fit.state, [hat], x, y, points=(t,))
        assert after < before, t
    # same seed, same result; inputs untouched
    again = fit_on_lines(model, start, [start, hat], (x, y), points=points, lr=0.1, momentum=0.5, epochs=20,
                         batch_size=16, seed=0)
    for k in fit.state:
        assert torch.equal(fit.state[k], again.state[k])
    for k, v in model.named_parameters():
        assert torch.equal(v, start[k])


def test_line_functions_reject_bad_inputs():
    model = tiny()
    params = dict(model.named_parameters())
    x, y = torch.randn(4, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RebasinError, match="at least one anchor"):
        line_loss(model, params, [], x, y, points=(1.0,))
    with pytest.raises(RebasinError, match="anchor 0 misses"):
        line_loss(model, params, [{"0.weight": params["0.weight"]}], x, y, points=(1.0,))
    with pytest.raises(RebasinError, match="memory"):
        fit_on_lines(model, params, [params], (x[:0], y[:0]), points=(1.0,), lr=0.1)


def test_reference_line_loss_gradient_is_the_reference_update():
    """Its gradient is sum_k (n + 1 - k) grad l(a + k/n (w - a)) / |B|: at the points, not through them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    names = [n for n, _ in model.named_parameters()]
    anchor = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    w = {n: torch.randn_like(p).requires_grad_(True) for n, p in model.named_parameters()}
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    before = {n: t.detach().clone() for n, t in w.items()}
    n_points = 4
    reference_line_loss(model, w, anchor, x, y, n_points=n_points).backward()
    expected = {n: torch.zeros_like(t) for n, t in w.items()}
    for k in range(n_points + 1):
        point = {n: (anchor[n] + k / n_points * (before[n] - anchor[n])).requires_grad_(True) for n in names}
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, point, (x,)), y)
        grads = torch.autograd.grad(loss, [point[n] for n in names])
        for n, g in zip(names, grads):
            expected[n] += (n_points + 1 - k) * g / x.shape[0]
    for n in names:
        torch.testing.assert_close(w[n].grad, expected[n], rtol=1e-10, atol=1e-12)
        assert torch.equal(w[n].detach(), before[n])  # inputs untouched
    # the value: the weighted point losses over the batch size
    with torch.no_grad():
        value = reference_line_loss(model, w, anchor, x, y, n_points=1)
        at = [nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y) for p in (anchor, before)]
    torch.testing.assert_close(value, (2 * at[0] + at[1]) / 6)


def test_fit_paired_lines_steps_and_seeding():
    torch.manual_seed(1)
    model = tiny(1)
    a = {n: p.detach().clone() for n, p in model.named_parameters()}
    b = {n: p + 0.3 * torch.randn_like(p) for n, p in a.items()}
    teacher = torch.randn(16, 4)
    xa, xb = torch.randn(30, 16), torch.randn(50, 16)
    ya, yb = (xa @ teacher).argmax(1), (xb @ teacher).argmax(1)  # learnable labels
    copies = [t.clone() for t in (xa, ya, xb, yb)]
    lines = [(a, (xa, ya), 10), (b, (xb, yb), 16)]  # 3 and 4 batches: 4 steps per epoch
    fit = fit_paired_lines(model, a, lines, n_points=5, lr=0.003, momentum=0.8, epochs=10, seed=3)
    again = fit_paired_lines(model, a, lines, n_points=5, lr=0.003, momentum=0.8, epochs=10, seed=3)
    other = fit_paired_lines(model, a, lines, n_points=5, lr=0.003, momentum=0.8, epochs=10, seed=4)
    assert fit.steps == 40 and math.isfinite(fit.loss_before) and fit.loss_after < fit.loss_before
    assert all(torch.equal(fit.state[n], again.state[n]) for n in fit.state)
    assert any(not torch.equal(fit.state[n], other.state[n]) for n in fit.state)
    assert all(torch.equal(t, c) for t, c in zip((xa, ya, xb, yb), copies))
    assert all(torch.equal(p, a[n]) for n, p in model.named_parameters())  # the model is not changed
    with pytest.raises(RebasinError, match="at least one line"):
        fit_paired_lines(model, a, [], n_points=5, lr=0.1)
    with pytest.raises(RebasinError, match="batch_size"):
        fit_paired_lines(model, a, [(a, (xa, ya), 0)], n_points=5, lr=0.1)
    with pytest.raises(RebasinError, match="line 0"):
        fit_paired_lines(model, a, [(a, (xa[:0], ya[:0]), 4)], n_points=5, lr=0.1)
    with pytest.raises(RebasinError, match="line_points"):
        fit_paired_lines(model, a, lines, n_points=0, lr=0.1)


def test_fit_paired_lines_one_step_per_epoch():
    """step_every="epoch": per pass, one SGD step on sum_b sum_k (n + 1 - k) grad l_{B_b}(p_k) / N per line.

    The direction is recomputed here by per-point autograd (as the reference code gets it: batch-mean losses
    summed over the loader and divided by its size), with unequal batches, over two passes with momentum.
    """
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    names = [n for n, _ in model.named_parameters()]
    a = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    b = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    w0 = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    xa, ya = torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 3, (11,))
    xb, yb = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    lines = [(a, (xa, ya), 4), (b, (xb, yb), 3)]  # batches of 4, 4, 3 and of 3, 3, 3, 1
    n_points, lr, momentum, seed = 3, 0.1, 0.8, 5

    def direction(w, g):
        out = {n: torch.zeros_like(t) for n, t in w.items()}
        for anchor, (x, y), size in lines:
            order = torch.randperm(x.shape[0], generator=g)  # the order fit_paired_lines draws, line by line
            for i in range(0, x.shape[0], size):
                xi, yi = x[order[i : i + size]], y[order[i : i + size]]
                for k in range(n_points + 1):
                    point = {n: (anchor[n] + k / n_points * (w[n] - anchor[n])).requires_grad_(True) for n in names}
                    loss = nn.functional.cross_entropy(torch.func.functional_call(model, point, (xi,)), yi)
                    for n, grad in zip(names, torch.autograd.grad(loss, [point[n] for n in names])):
                        out[n] += (n_points + 1 - k) * grad / x.shape[0]
        return out

    g = torch.Generator().manual_seed(seed)
    d1 = direction(w0, g)
    w1 = {n: w0[n] - lr * d1[n] for n in names}  # a fresh SGD's first step: lr * direction, momentum or not
    d2 = direction(w1, g)
    w2 = {n: w1[n] - lr * (momentum * d1[n] + d2[n]) for n in names}
    one = fit_paired_lines(model, w0, lines, n_points=n_points, lr=lr, momentum=momentum, step_every="epoch",
                           seed=seed)
    two = fit_paired_lines(model, w0, lines, n_points=n_points, lr=lr, momentum=momentum, epochs=2,
                           step_every="epoch", seed=seed)
    assert one.steps == 1 and two.steps == 2
    for n in names:
        torch.testing.assert_close(one.state[n], w1[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(two.state[n], w2[n], rtol=1e-10, atol=1e-12)
    # with equal batches the direction is that of reference_line_loss on the whole line's data, times N / |B|
    equal = [(a, (xa[:8], ya[:8]), 4), (b, (xb[:9], yb[:9]), 3)]
    fit = fit_paired_lines(model, w0, equal, n_points=n_points, lr=lr, step_every="epoch", seed=seed)
    w = {n: t.clone().requires_grad_(True) for n, t in w0.items()}
    (reference_line_loss(model, w, a, xa[:8], ya[:8], n_points=n_points) * 8 / 4
     + reference_line_loss(model, w, b, xb[:9], yb[:9], n_points=n_points) * 9 / 3).backward()
    for n in names:
        torch.testing.assert_close(fit.state[n], w0[n] - lr * w[n].grad, rtol=1e-10, atol=1e-12)
    per_batch = fit_paired_lines(model, w0, lines, n_points=n_points, lr=lr, epochs=3)
    assert per_batch.steps == 12  # the longer line's 4 batches, 3 passes
    with pytest.raises(RebasinError, match="step_every"):
        fit_paired_lines(model, w0, lines, n_points=n_points, lr=lr, step_every="sample")


# ------------------------------------------------------------------ the strategy
def test_mcsgd_trains_and_evaluates(bench):
    model = tiny(3)
    plugins: list = []
    strategy = MCSGD(variant="all_lines", mem_size=16, mc_epochs=3, mc_batch_size=16, plugins=plugins,
                     **common(model))
    accs = []
    for exp in bench.train_stream:
        strategy.train(exp)
        accs.append(strategy.eval(bench.test_stream)[ACC])
    assert plugins == []  # the caller's list is not mutated
    hist = strategy.history
    assert [h.experience for h in hist] == [0, 1, 2] and [h.n_memory for h in hist] == [16, 32, 48]
    assert [h.n_lines for h in hist] == [1, 2, 3] and hist[0].steps == 0 and math.isnan(hist[0].loss_before)
    for h in hist[1:]:
        assert h.steps == 3 * math.ceil(h.n_memory / 16)
        assert h.loss_after < h.loss_before
    assert len(strategy.mcsgd_plugin.anchors) == 3
    # the model holds w_bar, written into the optimizer's parameter objects
    params = list(model.parameters())
    assert all(p is q for p, q in zip(params, strategy.optimizer.param_groups[0]["params"]))
    assert accs[-1] > 0.3  # four classes: chance is 0.25


@pytest.mark.parametrize("step_every", ["epoch", "batch"])
def test_mcsgd_reference_variant_carries_two_chains(bench, step_every):
    """Each experience trains from w_hat_{t-1}; the model holds w_bar_t between experiences; two lines."""
    from avalanche.training.plugins import SupervisedPlugin

    class Probe(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.starts = []

        def before_training_epoch(self, strategy, *args, **kwargs):
            self.starts.append({n: p.detach().clone() for n, p in strategy.model.named_parameters()})

    probe = Probe()
    model = tiny(6)
    strategy = MCSGD(mem_size=8, subset_size=40, mc_lr=0.01, mc_step_every=step_every, plugins=[probe],
                     **common(model))
    solutions = []
    for exp in bench.train_stream:
        strategy.train(exp)
        solutions.append({n: p.detach().clone() for n, p in model.named_parameters()})
    plugin = strategy.mcsgd_plugin
    hist = strategy.history
    assert [h.n_lines for h in hist] == [1, 2, 2] and [h.n_memory for h in hist] == [8, 16, 24]
    # one step per pass, or one per batch of the longer line (the subset's)
    assert hist[1].steps == hist[2].steps == (1 if step_every == "epoch" else math.ceil(40 / 16))
    for t in (1, 2):
        # the continual step started from the previous continual minimum, not from the evaluated solution
        assert all(torch.equal(probe.starts[t][n], plugin.anchors[t - 1][n]) for n in probe.starts[t])
        assert math.isfinite(hist[t].loss_before) and math.isfinite(hist[t].loss_after)
    assert all(torch.equal(solutions[0][n], plugin.anchors[0][n]) for n in solutions[0])  # w_bar_1 = w_hat_1
    # ... while the model held w_bar_2 != w_hat_2 between the second and third experience
    assert any(not torch.equal(solutions[1][n], plugin.anchors[1][n]) for n in solutions[1])
    assert all(torch.equal(solutions[2][n], plugin.solution[n]) for n in solutions[2])
    # w_bar_3 is exactly the reference step from w_bar_2 and w_hat_3, recomputed here from the plugin's seeds
    from continual._data import concat_tensors, sample_tensors

    exp = bench.train_stream[2]
    start = {n: w + plugin.start_position * (plugin.anchors[2][n] - w) for n, w in solutions[1].items()}
    subset = sample_tensors(exp.dataset, 40, seed=plugin.seed * 1_000_003 + 2 * 101 + 2, batch_size=40)
    expected = fit_paired_lines(
        model, start, [(solutions[1], concat_tensors(plugin._memory), 8), (plugin.anchors[2], subset, 16)],
        n_points=5, lr=plugin.mc_lr, momentum=plugin.mc_momentum, seed=plugin.seed * 1_000_003 + 2 * 101 + 1,
        step_every=step_every,
    )
    assert all(torch.equal(solutions[2][n], expected.state[n]) for n in solutions[2])
    # ... and the step moved it: not where it started, and the lines' loss went down
    assert any(not torch.allclose(solutions[2][n], start[n], atol=1e-4) for n in start)
    assert hist[2].loss_after < hist[2].loss_before


def test_experience_lr_decay_schedule(bench):
    from avalanche.training.plugins import SupervisedPlugin

    from continual.optim import ExperienceLRDecay

    model = tiny(7)
    decay = ExperienceLRDecay(0.5, min_lr=0.01)
    seen = []

    class Record(SupervisedPlugin):
        def before_training_epoch(self, strategy, *args, **kwargs):
            seen.append(strategy.optimizer.param_groups[0]["lr"])

    strategy = Naive(plugins=[decay, Record()], **{**common(model), "optimizer": torch.optim.SGD(
        model.parameters(), lr=0.03, momentum=0.8)})
    for exp in bench.train_stream:
        strategy.train(exp)
    assert seen == pytest.approx([0.03, 0.015, 0.01])
    for bad, match in [(0.0, "decay"), (1.5, "decay"), (True, "decay")]:
        with pytest.raises(RebasinError, match=match):
            ExperienceLRDecay(bad)
    with pytest.raises(RebasinError, match="min_lr"):
        ExperienceLRDecay(0.5, min_lr=-1)
    with pytest.raises(RebasinError, match="momentum applies"):
        make_strategy("naive", model=model, example_input=None, momentum=0.5)
    with pytest.raises(RebasinError, match="min_lr"):
        make_strategy("naive", model=model, example_input=None, min_lr=-1.0)
    with pytest.raises(RebasinError, match="decay"):
        make_strategy("naive", model=model, example_input=None, lr_decay=True)
    with pytest.raises(RebasinError, match="unknown optimizer"):
        make_strategy("naive", model=model, example_input=None, optimizer="adam")
    sgd = make_strategy("replay", model=model, example_input=None, optimizer="sgd", momentum=0.8, lr=0.05,
                        lr_decay=0.8)
    assert isinstance(sgd.optimizer, torch.optim.SGD) and sgd.optimizer.param_groups[0]["momentum"] == 0.8
    assert any(isinstance(p, ExperienceLRDecay) for p in sgd.plugins)


def test_mcsgd_first_experience_is_plain_training_and_plugin_equals_strategy(bench):
    def train(kind: str):
        model = tiny(4)
        if kind == "naive":
            strategy = Naive(**common(model))
        elif kind == "plugin":
            strategy = Naive(plugins=[MCSGDPlugin(mem_size=8, loss_fn=nn.CrossEntropyLoss())], **common(model))
        else:
            strategy = MCSGD(mem_size=8, **common(model))
        torch.manual_seed(5)
        states = []
        for exp in bench.train_stream:
            strategy.train(exp)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        return states, torch.get_rng_state()

    naive, rng_naive = train("naive")
    plugin, rng_plugin = train("plugin")
    strategy, rng_strategy = train("strategy")
    for k in naive[0]:  # w_bar_1 = w_hat_1: the first experience is Naive's, bit for bit
        assert torch.equal(naive[0][k], strategy[0][k])
        assert not torch.equal(naive[-1][k], strategy[-1][k])
        for a, b in zip(plugin, strategy):
            assert torch.equal(a[k], b[k])
    # no draw from the global RNG beyond what the base strategy does
    assert torch.equal(rng_naive, rng_strategy) and torch.equal(rng_plugin, rng_strategy)


def test_mcsgd_plugin_callbacks_leave_the_global_rng_alone(bench):
    plugin = MCSGDPlugin(mem_size=8)
    for name in ("before_training_exp", "after_training_exp"):
        inner = getattr(plugin, name)

        def wrapped(strategy, *args, _inner=inner, **kwargs):
            before = torch.get_rng_state()
            _inner(strategy, *args, **kwargs)
            assert torch.equal(torch.get_rng_state(), before)

        setattr(plugin, name, wrapped)
    strategy = Naive(plugins=[plugin], **common(tiny()))
    for exp in bench.train_stream:
        strategy.train(exp)
    assert len(plugin.history) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mem_size": 0}, "mem_size"),
        ({"mem_size": -3}, "mem_size"),
        ({"mem_size": 2.5}, "mem_size"),
        ({"mem_size": True}, "mem_size"),
        ({"line_points": 0}, "line_points"),
        ({"mc_lr": 0.0}, "mc_lr"),
        ({"mc_lr": float("nan")}, "mc_lr"),
        ({"mc_lr": "0.1"}, "mc_lr"),
        ({"mc_momentum": 1.0}, "mc_momentum"),
        ({"mc_epochs": 0}, "mc_epochs"),
        ({"mc_batch_size": None}, "mc_batch_size"),
        ({"start_position": 1.5}, "start_position"),
        ({"optimizer_state": "drop"}, "optimizer_state"),
        ({"variant": "paper"}, "variant"),
        ({"subset_size": 0}, "subset_size"),
        ({"mc_step_every": "step"}, "mc_step_every"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_mcsgd_rejects_bad_arguments(kwargs, match):
    with pytest.raises(RebasinError, match=match):
        MCSGDPlugin(**kwargs)
    with pytest.raises(RebasinError, match=match):
        MCSGD(**{**common(tiny()), **kwargs})


def test_mcsgd_rejects_wrong_types():
    model = tiny()
    with pytest.raises(RebasinError, match="model must be a torch.nn.Module"):
        MCSGD(**{**common(model), "model": model.state_dict()})
    with pytest.raises(RebasinError, match="optimizer must be a torch.optim.Optimizer"):
        MCSGD(**{**common(model), "optimizer": "sgd"})
    with pytest.raises(RebasinError, match="plugins must be a list"):
        MCSGD(**{**common(model), "plugins": "replay"})
    with pytest.raises(RebasinError, match="loss_fn must be callable"):
        MCSGDPlugin(loss_fn="ce")
    with pytest.raises(RebasinError, match="n_experiences"):
        make_strategy("mcsgd", model=model, example_input=None)
    strategy = make_strategy("mcsgd", model=model, example_input=None, mem_size=100, n_experiences=3)
    assert strategy.mcsgd_plugin.mem_size == 33
    strategy = make_strategy("mcsgd", model=model, example_input=None, options={"mem_size": 5})
    assert strategy.mcsgd_plugin.mem_size == 5


# ------------------------------------------------------------------ compare
def test_compare_jobs_gives_the_sequential_numbers(tmp_path):
    from continual.compare import main

    args = ["--benchmark", "synthetic", "--strategies", "naive,mcsgd,rebasin_merge_holdout", "--seeds", "2", "--epochs", "1",
            "--batch-size", "64", "--mem-size", "30", "--hidden", "16", "--no-progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run one thread each
    try:
        assert main([*args, "--out", str(tmp_path / "seq")]) == 0
        assert main([*args, "--jobs", "2", "--out", str(tmp_path / "par")]) == 0
    finally:
        torch.set_num_threads(threads)
    seq = json.loads((tmp_path / "seq" / "runs.json").read_text())["runs"]
    par = json.loads((tmp_path / "par" / "runs.json").read_text())["runs"]
    assert [(r["strategy"], r["seed"]) for r in seq] == [(r["strategy"], r["seed"]) for r in par]
    # each equal-storage control right after the strategy it controls (MC-SGD's memory, the plugin's held-out samples)
    assert [(r["strategy"], r["seed"]) for r in seq][:5] == [
        ("naive", 0), ("mcsgd", 0), ("replay_eq_mcsgd", 0), ("rebasin_merge_holdout", 0),
        ("replay_eq_rebasin_merge_holdout", 0)]
    assert seq[2]["storage"]["buffer_samples"] == 30 and seq[4]["storage"]["buffer_samples"] == 30 + 3 * 51
    for a, b in zip(seq, par):
        assert a["accuracy"] == b["accuracy"]
        assert a["backward_transfer"] == pytest.approx(-a["forgetting"])
        for key in ("forgetting_per_task", "alphas", "merges", "mcsgd"):
            assert a["extra"].get(key) == b["extra"].get(key)
    mcsgd = seq[1]["extra"]["mcsgd"]
    assert [m["n_memory"] for m in mcsgd] == [10, 20, 30] and mcsgd[0]["loss_before"] is None
    merges = seq[3]["extra"]["merges"]  # the plugin's earlier defaults: alpha chosen per merge
    assert [m["experience"] for m in merges] == [1, 2] and all(0.0 <= m["alpha"] <= 1.0 for m in merges)
    assert len(seq[0]["extra"]["forgetting_per_task"]) == 2


@pytest.mark.parametrize(("extra", "message"), [(["--jobs", "0"], "--jobs must be >= 1"),
                                                (["--jobs", "2", "--device", "cuda"], "forked CPU workers"),
                                                (["--depth", "0"], "--depth must be >= 1"),
                                                (["--angles", "10,20"], "--angles only applies to --benchmark rotated_mnist"),
                                                (["--mem-size", "0"], "--mem-size must be >= 1"),
                                                (["--momentum", "0.8"], "needs --optimizer sgd"),
                                                (["--optimizer", "sgd", "--momentum", "1"], "--momentum must be in"),
                                                (["--lr-decay", "0"], "--lr-decay must be in"),
                                                (["--min-lr", "0.001"], "needs --lr-decay below 1"),
                                                (["--dropout", "1"], "--dropout must be in"),
                                                (["--benchmark", "rotated_mnist", "--data-root", "unused", "--angles", "1,x"],
                                                 "--angles must be comma-separated degrees or 'random'")])
def test_compare_rejects_bad_jobs_and_depth(extra, message, capsys):
    from continual.compare import main

    with pytest.raises(SystemExit):
        main(["--benchmark", "synthetic", "--out", "unused", *extra])
    assert message in capsys.readouterr().err


def test_compare_without_mnist_is_one_line(tmp_path, capsys):
    from continual.compare import main

    assert main(["--benchmark", "rotated_mnist", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m continual.compare: error: MNIST not found") and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_bad_alpha_grid_is_refused():
    from continual import RebasinMergePlugin

    with pytest.raises(RebasinError, match=r"alpha_grid values must lie in \[0, 1\]"):
        RebasinMergePlugin(alpha={"grid": [0.5, 1.5]})


def test_random_angles_are_seeded_and_in_range():
    from continual.benchmarks import random_angles

    a = random_angles(20, seed=3)
    assert a == random_angles(20, seed=3) and a != random_angles(20, seed=4)
    assert len(a) == 20 and all(0.0 <= x < 180.0 for x in a)
    before = torch.random.get_rng_state()
    random_angles(5)
    assert torch.equal(before, torch.random.get_rng_state())  # no global randomness
    with pytest.raises(RebasinError, match="n must be an int >= 1"):
        random_angles(0)
