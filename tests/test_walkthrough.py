"""docs/walkthrough.md runs as written: every command of its bash blocks, in order, in a folder holding a copy
of examples/walkthrough/mynet.py, through child processes. ``rebasin`` runs as ``python -P -m rebasin``,
which, like the installed console script, does not put the working directory on ``sys.path``: the page's
``--model mynet:mlp`` must work without PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from builders import HANG_S

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "walkthrough.md"


def _commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def test_walkthrough_page_is_in_the_nav():
    assert "walkthrough.md" in (ROOT / "mkdocs.yml").read_text()


def test_walkthrough_commands_run_as_written(tmp_path):
    for script in ("mynet.py", "hf_models.py"):
        shutil.copy(ROOT / "examples" / "walkthrough" / script, tmp_path / script)
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    commands = _commands()
    assert [c[:2] for c in commands if c[0] == "rebasin"] == [
        ["rebasin", "path"], ["rebasin", "align"], ["rebasin", "align"], ["rebasin", "path"], ["rebasin", "merge"],
        ["rebasin", "align"], ["rebasin", "merge"],
    ]
    stdout = {}
    for command in commands:
        program = {"python": [sys.executable], "rebasin": [sys.executable, "-P", "-m", "rebasin"]}[command[0]]
        proc = subprocess.run(program + command[1:], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=HANG_S, check=False)
        assert proc.returncode == 0, f"{shlex.join(command)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
        stdout[shlex.join(command[:2]) + " " + command[-1]] = proc.stdout

    for name in ("checkpoints/A.pt", "checkpoints/B.pt", "aligned/B.pt", "aligned/B_am.pt", "merged.pt"):
        assert (tmp_path / name).is_file(), name
    perms = torch.load(tmp_path / "aligned" / "B_perms.pt", weights_only=True)
    assert {k: len(v) for k, v in perms.items()} == {"P0": 128, "P1": 128}

    naive = json.loads((tmp_path / "path-naive" / "results.json").read_text())
    aligned = json.loads((tmp_path / "path-aligned" / "results.json").read_text())
    assert set(naive["methods"]) == {"linear"} and set(aligned["methods"]) == {"linear", "repair"}
    for payload in (naive, aligned):
        assert {"endpoints", "methods", "paths", "num_points"} <= set(payload)
        for row in payload["methods"].values():
            assert {"barrier", "midpoint", "path", "time_s"} <= set(row)
            assert set(row["barrier"]) == set(row["midpoint"]) == {"loss", "accuracy"}
    assert (tmp_path / "path-aligned" / "paths.png").read_bytes()[:4] == b"\x89PNG"
    # what the page says about the numbers: alignment removes most of the barrier, REPAIR lowers it further
    barrier = {name: row["barrier"]["loss"] for name, row in aligned["methods"].items()}
    assert barrier["repair"] < barrier["linear"] < 0.25 * naive["methods"]["linear"]["barrier"]["loss"]
    # the Hugging Face folders: written in the layout of B (shards and index) and of A, loadable
    models = tmp_path / "models"
    assert sorted(p.name for p in (models / "B_aligned").iterdir()) == sorted(p.name for p in (models / "B").iterdir())
    assert (models / "B_aligned" / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in (models / "merged").iterdir()) == sorted(p.name for p in (models / "A").iterdir())
    merge_out = next(v for k, v in stdout.items() if k.startswith("rebasin merge") and k.endswith(".pt"))
    accuracy = re.search(r"naive average ([\d.]+)%, merged ([\d.]+)%", merge_out)
    assert accuracy and float(accuracy.group(2)) > float(accuracy.group(1))
