"""The command line end to end, through child processes: ``rebasin align`` with every registered matcher,
``rebasin path`` (results.json in the demo's format, figure, BatchNorm reset, REPAIR, Bezier curve),
``rebasin merge``, help for every option, and bad input that ends with one line and exit status 2 before
any expensive work runs.

The factories (``--model cli_factories:mlp``, ``--data cli_factories:train_data``, bad ones) live in
``tests/cli_factories.py``; the child processes find them on PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import HANG_S

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("cli_factories", TESTS / "cli_factories.py")
factories = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(factories)

BUILT_IN_MATCHERS = ("identity", "weight_matching", "activation_matching", "ste", "sinkhorn", "ot", "transform_matching")
#: The fields of a row of ``rebasin demo``'s results.json ``methods``.
DEMO_ROW = {"barrier", "midpoint", "path", "time_s"}


def rebasin(*args: str, cwd: Path, timeout: int = HANG_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "rebasin", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess, expected: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr, proc.stderr
    return proc.stderr


# session scope: built once per pytest-xdist worker (a few seconds), so this module's end-to-end tests spread over
# the workers; a module-scoped fixture keeps a module on one worker (tests/conftest.py), and these tests are the
# suite's longest chain of child processes
@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    """Three trained MLP checkpoints (A, B, C), two BatchNorm ones, and a file where a folder could be."""
    root = tmp_path_factory.mktemp("cli")
    (root / "ckpt").mkdir()
    for name, seed in (("A", 0), ("B", 1), ("C", 2)):
        factories.save_trained(factories.mlp, root / "ckpt" / f"{name}.pt", seed)
    for name, seed in (("A", 0), ("B", 1)):
        factories.save_trained(factories.mlp_bn, root / "ckpt" / f"bn_{name}.pt", seed)
    (root / "a_file").write_text("not a folder")
    return root


MLP = ("--model", "cli_factories:mlp")


def test_the_matcher_list_below_is_the_registry():
    from rebasin import matcher_names

    assert set(matcher_names()) == set(BUILT_IN_MATCHERS)


@pytest.mark.parametrize("method", BUILT_IN_MATCHERS)
def test_align_runs_every_registered_matcher_and_saves_the_permutations(work, method):
    from rebasin import permute, spec_from_model

    out, perms_file = work / "aligned" / method / "B.pt", work / "aligned" / method / "perms.pt"  # folders missing
    stdout = ok(rebasin("align", "ckpt/A.pt", "ckpt/B.pt", *MLP, "--method", method, "--data",
                        "cli_factories:few_batches", "-o", str(out), "--save-perms", str(perms_file),
                        "--device", "cpu", cwd=work))
    assert f"with {method}" in stdout
    aligned = torch.load(out, weights_only=True)
    perms = torch.load(perms_file, weights_only=True)
    state_b = torch.load(work / "ckpt" / "B.pt", weights_only=True)
    model = factories.mlp()
    spec = spec_from_model(model, torch.randn(2, 64))
    # the saved permutations are the ones applied, and B's function is unchanged
    for key, value in permute(spec, perms, state_b).items():
        torch.testing.assert_close(aligned[key], value)
    x = torch.randn(16, 64)
    model.load_state_dict(state_b)
    before = model(x)
    model.load_state_dict(aligned)
    torch.testing.assert_close(model(x), before)
    if method != "identity":
        assert set(perms) == {"P0", "P1"}


def test_path_writes_results_in_the_demo_format_with_repair_and_a_curve(work):
    out = work / "path" / "wm"
    ok(rebasin("align", "ckpt/A.pt", "ckpt/B.pt", *MLP, "--example-shape", "1,64", "-o", "aligned/wm_B.pt",
               cwd=work))
    stdout = ok(rebasin("path", "ckpt/A.pt", "aligned/wm_B.pt", *MLP, "--data", "cli_factories:test_data",
                        "--train-data", "cli_factories:train_data", "--repair", "--curve", "bezier",
                        "--curve-epochs", "1", "--num-points", "5", "--out", str(out), "--plot", "figs/p.png",
                        "--device", "cpu", cwd=work))
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["methods"]) == {"linear", "repair", "bezier"}
    for kind, row in payload["methods"].items():
        assert DEMO_ROW <= set(row) and row["path"] == kind
        assert set(row["barrier"]) == {"loss", "accuracy"} and set(row["midpoint"]) == {"loss", "accuracy"}
        assert 0 <= row["midpoint"]["accuracy"] <= 1
        path = payload["paths"][kind]
        assert len(path["t"]) == len(path["loss"]) == len(path["accuracy"]) == 5
        assert path["loss"][2] == pytest.approx(row["midpoint"]["loss"])
        assert f"{kind:<7} loss barrier {row['barrier']['loss']:8.4f}" in stdout
    assert payload["bn_reset"] is False and set(payload["endpoints"]) == {"a", "b"}
    assert payload["endpoints"]["a"]["accuracy"] == pytest.approx(payload["paths"]["linear"]["accuracy"][0])
    # the rows reuse the same aligned endpoints
    assert payload["paths"]["bezier"]["loss"][-1] == pytest.approx(payload["paths"]["linear"]["loss"][-1])
    assert payload["methods"]["repair"]["barrier"]["loss"] < payload["methods"]["linear"]["barrier"]["loss"]
    for png in (out / "paths.png", work / "figs" / "p.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_path_resets_batchnorm_statistics_by_default(work):
    bn = ("--model", "cli_factories:mlp_bn")
    ok(rebasin("align", "ckpt/bn_A.pt", "ckpt/bn_B.pt", *bn, "--example-shape", "2,64", "-o", "aligned/bn_B.pt",
               cwd=work))
    barriers = {}
    for flag in ("--bn-reset", "--no-bn-reset", None):
        out = work / "path" / f"bn{flag}"
        stdout = ok(rebasin("path", "ckpt/bn_A.pt", "aligned/bn_B.pt", *bn, "--data", "cli_factories:test_data",
                            "--train-data", "cli_factories:train_data", "--num-points", "5", "--out", str(out),
                            *([flag] if flag else []), "--device", "cpu", cwd=work))
        payload = json.loads((out / "results.json").read_text())
        assert payload["bn_reset"] is (flag != "--no-bn-reset")
        assert payload["methods"]["linear"]["bn_reset"] is payload["bn_reset"]
        assert ("BatchNorm statistics are recomputed" in stdout) is payload["bn_reset"]
        barriers[flag] = payload["methods"]["linear"]["barrier"]["loss"]
    assert barriers[None] == barriers["--bn-reset"]
    assert barriers[None] < barriers["--no-bn-reset"]


def test_merge_three_models_with_repair(work):
    out = work / "merged" / "three.pt"
    stdout = ok(rebasin("merge", "ckpt/A.pt", "ckpt/B.pt", "ckpt/C.pt", *MLP, "--data", "cli_factories:train_data",
                        "--repair", "--eval-data", "cli_factories:test_data", "-o", str(out), "--device", "cpu",
                        cwd=work))
    assert "merged 3 models with weight_matching and REPAIR" in stdout
    assert "accuracy on --eval-data: models" in stdout and "merged" in stdout
    model = factories.mlp()
    model.load_state_dict(torch.load(out, weights_only=True))  # strict: a whole state_dict of the architecture
    # without data: plain averaging after alignment; a BatchNorm net says its statistics are averages
    ok(rebasin("merge", "ckpt/A.pt", "ckpt/B.pt", *MLP, "--example-shape", "1,64", "-o", "merged/two.pt", cwd=work))
    stdout = ok(rebasin("merge", "ckpt/bn_A.pt", "ckpt/bn_B.pt", "--model", "cli_factories:mlp_bn",
                        "--example-shape", "2,64", "-o", "merged/bn.pt", cwd=work))
    assert "statistics are averages" in stdout
    stdout = ok(rebasin("merge", "ckpt/bn_A.pt", "ckpt/bn_B.pt", "--model", "cli_factories:mlp_bn",
                        "--data", "cli_factories:few_batches", "-o", "merged/bn.pt", cwd=work))
    assert "BatchNorm reset" in stdout


def test_every_option_has_help():
    from rebasin.apps.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [
        f"rebasin {name} {action.option_strings or action.dest}"
        for name, command in sub.choices.items() if name != "cl"
        for action in command._actions
        if not action.help
    ]
    assert not missing
    assert set(sub.choices) >= {"demo", "landscape", "align", "path", "merge", "cl"}


def test_help_of_each_subcommand(tmp_path):
    helps = {command: ok(rebasin(command, "--help", cwd=tmp_path)) for command in ("align", "path", "merge")}
    for stdout in helps.values():
        assert "--model" in stdout and "--device" in stdout
    assert all(name in helps["align"] for name in BUILT_IN_MATCHERS)


ALIGN = ("align", "ckpt/A.pt", "ckpt/B.pt", *MLP, "--example-shape", "1,64")
PATH = ("path", "ckpt/A.pt", "ckpt/B.pt", *MLP, "--data", "cli_factories:test_data")
MERGE = ("merge", "ckpt/A.pt", "ckpt/B.pt", *MLP, "--example-shape", "1,64")

BAD_INPUTS = {
    # output paths: checked before the models are even loaded
    "align -o under a file": ((*ALIGN, "-o", "a_file/B.pt"), "a_file is a file, not a folder"),
    "align -o is a folder": ((*ALIGN, "-o", "ckpt"), "-o ckpt is a folder; give a file name"),
    "align --save-perms under a file": ((*ALIGN, "-o", "x.pt", "--save-perms", "a_file/p.pt"), "a_file is a file"),
    "path --out is a file": ((*PATH, "--out", "a_file"), "--out a_file is a file, not a folder"),
    "path --plot under a file": ((*PATH, "--plot", "a_file/p.png"), "a_file is a file"),
    "merge -o under a file": ((*MERGE, "-o", "a_file/m.pt"), "a_file is a file"),
    # --data factories
    "data returns a tensor": ((*ALIGN, "-o", "x.pt", "--data", "cli_factories:a_tensor"), "returned Tensor, not a loader"),
    "data is empty": ((*ALIGN, "-o", "x.pt", "--data", "cli_factories:no_batches"), "yielded no batches"),
    "data is a generator": ((*ALIGN, "-o", "x.pt", "--data", "cli_factories:one_shot"), "one-shot generator"),
    "data does not fit the model": ((*ALIGN, "-o", "x.pt", "--data", "cli_factories:wrong_width"),
                                    "the model does not run on the first batch of --data"),
    "data raises": ((*ALIGN, "-o", "x.pt", "--data", "cli_factories:broken"),
                    "calling --data cli_factories:broken() failed: OSError: the data folder is not mounted"),
    "data is not callable": ((*ALIGN, "-o", "x.pt", "--data", "cli_factories:NOT_A_FUNCTION"), "not a function"),
    "data has no such name": ((*ALIGN, "-o", "x.pt", "--data", "cli_factories:nope"), "has no attribute 'nope'"),
    "data module missing": ((*ALIGN, "-o", "x.pt", "--data", "no_such_module_xyz:f"), "cannot import module"),
    "path data without targets": ((*PATH[:-1], "cli_factories:inputs_only"), "yields batches without targets"),
    "path train-data does not fit": ((*PATH, "--train-data", "cli_factories:wrong_width", "--repair"),
                                     "first batch of --train-data"),
    "merge eval-data without targets": ((*MERGE, "-o", "m.pt", "--eval-data", "cli_factories:inputs_only"),
                                        "--eval-data cli_factories:inputs_only yields batches without targets"),
    # models and checkpoints
    "model is not a module": (("align", "ckpt/A.pt", "ckpt/B.pt", "--model", "cli_factories:no_batches",
                               "--example-shape", "1,64", "-o", "x.pt"), "returned list, not an nn.Module"),
    "checkpoint is not a state_dict": (("align", "ckpt/A.pt", "a_file", *MLP, "--example-shape", "1,64", "-o", "x.pt"),
                                       "cannot read a_file as a torch state_dict"),
    "checkpoint of another architecture": (("align", "ckpt/A.pt", "ckpt/bn_B.pt", *MLP, "--example-shape", "1,64",
                                            "-o", "x.pt"), "does not match the architecture"),
    "merge one checkpoint": (("merge", "ckpt/A.pt", *MLP, "-o", "m.pt"), "at least two checkpoints"),
    "merge missing checkpoint": (("merge", "ckpt/A.pt", "ckpt/nope.pt", *MLP, "-o", "m.pt"), "no such file: ckpt/nope.pt"),
    # options
    "matcher needs data": ((*ALIGN, "-o", "x.pt", "--method", "activation_matching"), "needs data"),
    "nothing to trace from": (("align", "ckpt/A.pt", "ckpt/B.pt", *MLP, "-o", "x.pt"), "pass --example-shape"),
    "merge repair without data": ((*MERGE, "-o", "m.pt", "--repair"), "--repair measures channel statistics"),
    "merge bad reference": ((*MERGE, "-o", "m.pt", "--reference", "2"), "--reference must index the 2 checkpoints"),
    "too few points": ((*PATH, "--num-points", "1"), "argument --num-points: must be at least 2, got 1"),
    "unknown curve": ((*PATH, "--curve", "spline"), "invalid choice: 'spline'"),
    "missing -o": (ALIGN, "the following arguments are required: -o/--output"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2_before_any_work(work, case):
    argv, expected = BAD_INPUTS[case]
    if argv[0] in ("align", "merge"):  # the sentinel matcher leaves a file behind if alignment ran
        argv = (*argv, "--matcher-module", "cli_sentinel", "--method", "sentinel")
        if "activation_matching" in argv:
            argv = argv[:-2]
    (work / "matcher_ran").unlink(missing_ok=True)
    proc = rebasin(*argv, cwd=work)
    one_line_error(proc, expected)
    assert not (work / "matcher_ran").exists()
    assert proc.stdout == ""  # nothing was evaluated or written


def test_demo_writes_its_figure_by_default(tmp_path):
    stdout = ok(rebasin("demo", "--out", "demo", "--epochs", "1", "--width", "8", "--num-points", "3",
                        "--methods", "weight_matching", "--device", "cpu", "--no-progress", cwd=tmp_path))
    assert "skipping" not in stdout and "paths.png" in stdout
    assert (tmp_path / "demo" / "paths.png").read_bytes()[:4] == b"\x89PNG"
