"""A user's registered matcher works wherever methods are listed: align, merge, the continual plugin, the
command line (``--matcher-module``) and the demo — each of them reads the one matcher registry."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import rebasin
from rebasin import (
    RebasinError,
    align,
    merge,
    permute,
    random_permutation,
    register_matcher,
    spec_from_model,
    weight_matching,
)
from rebasin.apps.cli import main
from rebasin.apps.demo import demo_methods
from rebasin.matching import unregister_matcher


def tanh_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3))


def planted(seed: int = 0):
    torch.manual_seed(seed)
    a = tanh_net()
    spec = spec_from_model(a, torch.randn(2, 4))
    b = tanh_net()
    b.load_state_dict(permute(spec, random_permutation(spec, seed=seed + 1), a.state_dict()))
    return a, b, spec


def loader_factory():
    """A loader for ``rebasin align --data`` (importable as tests' module attribute)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return [(x[i : i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, 64, 16)]


@pytest.fixture
def user_wm():
    """A user's matcher without a ``device`` option (callers must not force one on it); records its calls."""
    calls = []

    @register_matcher("user_wm", description="a user's weight matching with its own sweep limit")
    def match(spec, state_a, state_b, *, model_a=None, model_b=None, loader=None, seed=0, sweeps=100):
        calls.append({"seed": seed, "sweeps": sweeps, "loader": loader is not None})
        return weight_matching(spec, state_a, state_b, n_iter=sweeps, seed=seed)

    yield calls
    if "user_wm" in rebasin.matcher_names():  # a test may have unregistered it already
        unregister_matcher("user_wm")


def test_align_runs_a_users_matcher(user_wm):
    a, b, spec = planted()
    res = align(a, b, method="user_wm", spec=spec, seed=4, sweeps=7)
    assert isinstance(res, rebasin.Alignment) and res.method == "user_wm"
    assert user_wm == [{"seed": 4, "sweeps": 7, "loader": False}]
    for key, value in a.state_dict().items():
        assert_close(res.state_b[key], value)


def test_merge_runs_a_users_matcher(user_wm):
    a, b, spec = planted(1)
    c = tanh_net()
    c.load_state_dict(permute(spec, random_permutation(spec, seed=9), a.state_dict()))
    x = torch.randn(32, 4)
    merged, info = merge([a, b, c], method="user_wm", spec=spec, repair=False, device="cpu", sweeps=50,
                         return_info=True)
    assert info.method == "user_wm" and info.converged
    assert [al.method for al in info.alignments if al is not None] == ["user_wm", "user_wm"]
    assert len(user_wm) >= 2 and all(call["sweeps"] == 50 for call in user_wm)
    assert_close(merged(x), a(x))  # permuted copies merge back into the reference
    with pytest.raises(RebasinError, match=r"unknown option\(s\) \['sweep'\] for matcher 'user_wm'"):
        merge([a, b], method="user_wm", spec=spec, repair=False, sweep=3)
    assert len(user_wm) == 2 * info.rounds  # the typo failed before any alignment ran


@pytest.mark.skipif(importlib.util.find_spec("avalanche") is None, reason="needs avalanche-lib (continual extra)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:No loggers specified")
@pytest.mark.filterwarnings("ignore:no QP solver found")
def test_continual_plugin_runs_a_users_matcher_inside_replay(user_wm):
    from avalanche.training import Replay
    from avalanche.training.plugins import EvaluationPlugin

    from continual.benchmarks import synthetic
    from continual.plugin import RebasinMergePlugin

    reads = []

    @register_matcher("user_reads_data", uses_data=True)
    def with_data(spec, state_a, state_b, *, model_a=None, model_b=None, loader=None, seed=0):
        "Weight matching that records whether it was given data."
        reads.append(sum(int(batch[0].shape[0]) for batch in loader) if loader is not None else None)
        return weight_matching(spec, state_a, state_b, seed=seed)

    try:
        with pytest.raises(RebasinError, match=r"unknown option\(s\) \['sweep'\]"):
            RebasinMergePlugin(matcher="user_wm", matcher_options={"sweep": 3})
        bench = synthetic(3, seed=0)
        for name, calls in (("user_wm", user_wm), ("user_reads_data", reads)):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
            plugin = RebasinMergePlugin(matcher=name, alpha=0.5, new_samples=64, matcher_options=(
                {"sweeps": 20} if name == "user_wm" else {}))
            strategy = Replay(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                              criterion=nn.CrossEntropyLoss(), mem_size=32, train_mb_size=32, train_epochs=1,
                              eval_mb_size=256, plugins=[plugin],
                              evaluator=EvaluationPlugin(loggers=[]))
            for exp in bench.train_stream:
                strategy.train(exp)
            assert len(plugin.history) == 2 and [r.alpha for r in plugin.history] == [0.5, 0.5]
            assert all(set(r.perms) == set(plugin.spec.perm_to_axes) for r in plugin.history)
            assert len(calls) == 2
        assert all(call == {"seed": call["seed"], "sweeps": 20, "loader": False} for call in user_wm)  # data-free
        assert reads == [64, 64]  # a matcher that reads data gets the plugin's new samples
    finally:
        unregister_matcher("user_reads_data")


USER_MODULE = '''
import torch
from rebasin import activation_matching, register_matcher, weight_matching


@register_matcher("cli_user_wm", description="weight matching, registered from a user's module")
def cli_user_wm(spec, state_a, state_b, *, model_a=None, model_b=None, loader=None, seed=0):
    return weight_matching(spec, state_a, state_b, seed=seed)


@register_matcher("cli_user_act", needs_data=True, description="activation matching on the given states")
def cli_user_act(spec, state_a, state_b, *, model_a=None, model_b=None, loader=None, seed=0):
    return activation_matching(model_a, model_b, loader, spec=spec, state_a=state_a, state_b=state_b)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable module that registers two matchers when imported (what --matcher-module imports)."""
    name = "rebasin_test_user_matchers"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    this = sys.modules[__name__]
    monkeypatch.setitem(sys.modules, "rebasin_test_everywhere", this)  # factories for --model / --data
    yield name
    sys.modules.pop(name, None)
    for matcher in ("cli_user_wm", "cli_user_act"):
        if matcher in rebasin.matcher_names():
            unregister_matcher(matcher)


def _saved_pair(tmp_path):
    a, b, _ = planted(2)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    return a


@pytest.mark.parametrize("method", ["cli_user_wm", "cli_user_act"])
def test_cli_align_runs_a_matcher_from_matcher_module(tmp_path, user_module, method):
    a = _saved_pair(tmp_path)
    out = tmp_path / "b_aligned.pt"
    argv = ["align", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", "rebasin_test_everywhere:tanh_net",
            "--example-shape", "1,4", "-o", str(out), "--method", method, "--matcher-module", user_module]
    if method == "cli_user_act":
        argv += ["--data", "rebasin_test_everywhere:loader_factory"]
    assert main(argv) == 0
    aligned = torch.load(out, weights_only=True)
    for key, value in a.state_dict().items():
        assert_close(aligned[key], value)


def test_cli_lists_registered_matchers_and_errors_in_one_line(tmp_path, user_module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["align", "--help", "--matcher-module", user_module])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in rebasin.matcher_names():  # every registered matcher with its description
        assert name in text and rebasin.matching.get_matcher(name).description in " ".join(text.split())
    assert "cli_user_wm" in text and "weight matching, registered from a user's module" in text

    _saved_pair(tmp_path)
    common = ["align", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", "rebasin_test_everywhere:tanh_net",
              "--example-shape", "1,4", "-o", str(tmp_path / "o.pt")]
    for tail, message in [
        (["--matcher-module", "no_such_module_xyz"], "cannot import --matcher-module 'no_such_module_xyz'"),
        (["--method", "cli_user_act", "--matcher-module", user_module], "needs data: pass --data"),
        (["--method", "nope"], "unknown method 'nope'"),
    ]:
        assert main(common + tail) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_demo_lists_and_runs_a_users_matcher(tmp_path, user_wm, capsys):
    rows = demo_methods()
    assert rows == (
        "weight_matching", "activation_matching", "ste", "sinkhorn_l2", "sinkhorn_midpoint", "sinkhorn_random",
        "ot", "transform_matching", "user_wm", "weight_matching+repair", "weight_matching+bezier",
    )
    common = ["--epochs", "3", "--width", "16", "--num-points", "3", "--device", "cpu", "--no-progress"]
    assert main(["demo", "--out", str(tmp_path), "--methods", "weight_matching,user_wm,user_wm+repair", *common]) == 0
    methods = json.loads((tmp_path / "results.json").read_text())["methods"]
    assert set(methods) == {"naive", "weight_matching", "user_wm", "user_wm+repair"}
    # the user's matcher is weight matching with the same seed: the same row as the built-in
    assert methods["user_wm"]["barrier"] == methods["weight_matching"]["barrier"]
    assert methods["user_wm+repair"]["path"] == "repair"
    unregister_matcher("user_wm")  # gone from the registry: gone from the demo
    assert "user_wm" not in demo_methods()
    assert main(["demo", "--out", str(tmp_path), "--methods", "user_wm", *common]) == 2
    assert "unknown method(s) ['user_wm']" in capsys.readouterr().err


def test_merge_runs_a_replacement_weight_matching_without_init():
    # register_matcher(..., overwrite=True) replaces a built-in; merge's warm start must not pass it init=
    a, b, spec = planted(2)
    c = tanh_net()
    c.load_state_dict(permute(spec, random_permutation(spec, seed=5), a.state_dict()))
    builtin = rebasin.matching.get_matcher("weight_matching")
    calls = []

    def replacement(spec, state_a, state_b, *, model_a=None, model_b=None, loader=None, seed=0, device=None):
        calls.append(seed)
        return weight_matching(spec, state_a, state_b, seed=seed)

    register_matcher("weight_matching", replacement, overwrite=True)
    try:
        merged, info = merge([a, b, c], spec=spec, repair=False, device="cpu", n_iter=3, return_info=True)
    finally:
        register_matcher("weight_matching", builtin.fn, description=builtin.description, overwrite=True,
                         reads_checkpoints=builtin.reads_checkpoints)
    assert rebasin.matching.get_matcher("weight_matching") == builtin
    assert info.rounds >= 2 and len(calls) == 2 * info.rounds
    x = torch.randn(16, 4)
    assert_close(merged(x), a(x))


@pytest.mark.skipif(importlib.util.find_spec("avalanche") is None, reason="needs avalanche-lib (continual extra)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:No loggers specified")
@pytest.mark.filterwarnings("ignore:no QP solver found")
def test_continual_plugin_runs_a_replacement_sinkhorn_without_fit():
    # the plugin quiets the built-in Sinkhorn with fit=; a "sinkhorn" registered over it need not take fit=
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from continual.benchmarks import synthetic
    from continual.plugin import RebasinMergePlugin

    builtin = rebasin.matching.get_matcher("sinkhorn")
    calls = []

    def replacement(spec, state_a, state_b, *, model_a=None, model_b=None, loader=None, seed=0):
        calls.append(loader is not None)
        return weight_matching(spec, state_a, state_b, seed=seed)

    register_matcher("sinkhorn", replacement, uses_data=True, overwrite=True)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
        plugin = RebasinMergePlugin(matcher="sinkhorn", alpha=0.5, new_samples=64)
        strategy = Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                         criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1, eval_mb_size=256,
                         plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
        for exp in synthetic(2, seed=0).train_stream:
            strategy.train(exp)
    finally:
        register_matcher("sinkhorn", builtin.fn, needs_data=builtin.needs_data, description=builtin.description,
                         uses_data=builtin.uses_data, overwrite=True)
    assert calls == [True] and [r.alpha for r in plugin.history] == [0.5]
    assert rebasin.matching.get_matcher("sinkhorn") == builtin


def test_demo_runs_replacements_of_ste_and_sinkhorn_without_their_options(tmp_path):
    # the demo's settings for the built-in ste / sinkhorn go only to matchers that take them
    builtins = {name: rebasin.matching.get_matcher(name) for name in ("ste", "sinkhorn")}

    def plain(spec, state_a, state_b, *, model_a=None, model_b=None, loader=None, seed=0):
        return weight_matching(spec, state_a, state_b, seed=seed)

    try:
        for name in builtins:
            register_matcher(name, plain, overwrite=True)
        assert "sinkhorn" in demo_methods() and "sinkhorn_l2" not in demo_methods()
        common = ["--epochs", "3", "--width", "16", "--num-points", "3", "--device", "cpu", "--no-progress"]
        assert main(["demo", "--out", str(tmp_path), "--methods", "weight_matching,ste,sinkhorn", *common]) == 0
    finally:
        for name, m in builtins.items():
            register_matcher(name, m.fn, needs_data=m.needs_data, description=m.description, uses_data=m.uses_data,
                             overwrite=True)
    methods = json.loads((tmp_path / "results.json").read_text())["methods"]
    assert methods["ste"]["barrier"] == methods["sinkhorn"]["barrier"] == methods["weight_matching"]["barrier"]
    assert "sinkhorn_l2" in demo_methods()
