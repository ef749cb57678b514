"""Run every script in examples/ with ``--tiny`` in a subprocess; check its exit status, files and numbers.

Each script prints its numbers and writes them to ``results.json`` in ``--out``; the printed numbers
must agree with the file, and the comparisons that hold robustly even at tiny settings (checked over
several seeds) are asserted.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from builders import HANG_S

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["align_mlps", "own_model", "sinkhorn_custom_cost", "repair_bn_cnn", "merge_models", "continual_plugin"]


def run_example(name: str, tmp_path: Path) -> tuple[str, dict]:
    out = tmp_path / "out"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env.pop("REBASIN_DATA", None)  # the offline digits variant everywhere
    cmd = [sys.executable, str(EXAMPLES / f"{name}.py"), "--tiny", "--out", str(out), "--device", "cpu", "--seed", "0"]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, f"{name}.py exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert not (tmp_path / "examples_out").exists(), "the script ignored --out"
    return proc.stdout, json.loads((out / "results.json").read_text())


def printed(stdout: str, label: str) -> float:
    """The first number printed after ``label:`` (percent signs left to the caller)."""
    match = re.search(re.escape(label) + r":\D*?(-?\d+\.\d+)", stdout)
    assert match, f"no number printed after {label!r} in:\n{stdout}"
    return float(match.group(1))


def test_every_example_is_tested_and_documented():
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(SCRIPTS)
    assert not (EXAMPLES / "__init__.py").exists()  # avalanche-lib installs a top-level `examples` package
    for name in SCRIPTS:
        doc = ast.get_docstring(ast.parse((EXAMPLES / f"{name}.py").read_text()))
        assert doc and f"python examples/{name}.py --tiny" in doc, name


def test_align_mlps(tmp_path):
    stdout, res = run_example("align_mlps", tmp_path)
    naive, wm = res["naive"]["loss_barrier"], res["weight matching"]["loss_barrier"]
    assert printed(stdout, "naive") == pytest.approx(naive, abs=1e-4)
    assert printed(stdout, "weight matching") == pytest.approx(wm, abs=1e-4)
    assert wm < 0.5 * naive
    assert res["weight matching"]["accuracy_barrier"] < res["naive"]["accuracy_barrier"]
    assert (tmp_path / "out" / "paths.png").stat().st_size > 10_000


def test_own_model(tmp_path):
    stdout, res = run_example("own_model", tmp_path)
    assert res["spec_perms"] == {"P0": 8, "P1": 8}
    assert "('P0', 'P1', None, None)" in stdout  # conv2 maps the block's permutation back to the stem's
    assert printed(stdout, "weight_matching") == pytest.approx(res["weight_matching"], abs=1e-4)
    assert res["weight_matching"] < res["identity"]
    assert res["cat_concat"] and res["cat_recovered"] is True
    assert res["einsum_coverage"]["pinned"] == 0 and res["einsum_coverage"]["permutable"] == 48  # read from its equation
    assert "cumsum" in res["cumsum_error"] and "manual spec" in res["cumsum_error"]
    assert "RebasinError: spec_from_model(strict=True) cannot prove Tensor.cumsum in CumsumMix.forward (" in stdout
    cov = res["cumsum_coverage"]  # by default the cumsum's units are pinned and the rest stays permutable
    assert cov["pinned"] == 16 and cov["permutable"] == 16 and cov["modules"]["branch3"] == [0, 8]
    assert "- branch3: 8 unit(s) pinned: Tensor.cumsum in CumsumMix.forward (" in stdout
    assert res["manual_recovered"] is True


def test_sinkhorn_custom_cost(tmp_path):
    stdout, res = run_example("sinkhorn_custom_cost", tmp_path)
    assert set(res) == {"naive", "l2", "midpoint", "l2 + 0.1 midpoint"}
    assert printed(stdout, "l2 + 0.1 midpoint") == pytest.approx(res["l2 + 0.1 midpoint"], abs=1e-4)
    for name in ("l2", "midpoint", "l2 + 0.1 midpoint"):
        assert res[name] < 0.5 * res["naive"], name


def test_repair_bn_cnn(tmp_path):
    stdout, res = run_example("repair_bn_cnn", tmp_path)
    barrier = {name: r["loss_barrier"] for name, r in res.items()}
    assert printed(stdout, "aligned + REPAIR") == pytest.approx(barrier["aligned + REPAIR"], abs=1e-4)
    assert barrier["aligned"] < barrier["naive"]
    assert barrier["aligned + reset BN"] < barrier["aligned"]
    assert barrier["aligned + REPAIR"] < barrier["aligned + reset BN"]
    assert (tmp_path / "out" / "paths.png").is_file()


def test_merge_models(tmp_path):
    stdout, res = run_example("merge_models", tmp_path)
    acc = res["accuracy"]
    assert res["rounds"] >= 1
    assert len(acc["models"]) == 4 and min(acc["models"]) > 0.6
    assert printed(stdout, "merged (aligned + REPAIR)") == pytest.approx(100 * acc["merged"], abs=0.01)
    assert printed(stdout, "merged module's own test accuracy") == pytest.approx(100 * acc["merged"], abs=0.01)
    assert acc["aligned_average"] > acc["naive"] + 0.3
    assert acc["merged"] > acc["naive"] + 0.3


@pytest.mark.skipif(importlib.util.find_spec("avalanche") is None, reason="needs avalanche-lib (continual extra)")
def test_continual_plugin(tmp_path):
    stdout, res = run_example("continual_plugin", tmp_path)
    assert res["benchmark"].startswith("Rotated digits, 4 experiences")
    for label in ("naive", "naive + rebasin merge"):
        assert 0.2 < res[label] <= 1.0
        assert printed(stdout, label) == pytest.approx(100 * res[label], abs=0.01)
    assert len(res["alphas"]) == 3 and all(0.0 <= a <= 1.0 for a in res["alphas"])
