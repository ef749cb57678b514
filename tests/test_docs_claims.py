"""Every ```python block of the documentation and the README runs, and what the page claims about it holds.

Each page's blocks run in order in one namespace (a later block uses what an earlier one defined). A block
that stands for code of the reader's own is preceded by an HTML comment (invisible in the rendered page):

* ``<!-- setup: NAME -->`` — run it after :data:`SETUPS` ``[NAME]`` put the names it assumes into the
  namespace (small models, loaders, checkpoint files in a temporary folder);
* ``<!-- not-run: REASON -->`` — do not run it (it needs ``torchrun``, a trained model zoo, ...).

The quickstart and the extending page run in ``tests/test_docs.py`` (with checks of their own) and are not
run again here.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_docs import RUNNABLE_PAGES
from torch import nn

import rebasin

try:  # the transformers layer rules register the first time a page traces such a model: register them at
    # import, so that the conftest guard against registry leaks sees them before any test
    import transformers  # noqa: F401 - imported for its side effect (registers the layer rules)
except ImportError:  # pragma: no cover
    pass
else:
    from rebasin.trace import hf_rules

    hf_rules.register()

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)
MARK = re.compile(r"<!--\s*(not-run|setup):\s*(\S.*?)\s*-->\s*$")


def python_blocks(text: str) -> list[tuple[str | None, str | None, str]]:
    """``(marker, argument, code)`` for every python block; the marker is the HTML comment on the last
    non-blank line before the block (``None`` when there is none)."""
    out = []
    for m in BLOCK.finditer(text):
        before = [line for line in text[: m.start()].splitlines() if line.strip()]
        mark = MARK.search(before[-1]) if before else None
        out.append((mark.group(1), mark.group(2), m.group(1)) if mark else (None, None, m.group(1)))
    return out


def _pages() -> list[str]:
    pages = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "docs").rglob("*.md")) if BLOCK.search(p.read_text())]
    pages = [p for p in pages if Path(p).name not in RUNNABLE_PAGES]
    return ["README.md", *pages]


# ------------------------------------------------------------------------------------------------ setups
def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def two_mlps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``model_a``, ``model_b`` (784-32-10 MLPs, different seeds), loaders of two batches and an input ``x``."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 784, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    return {"model_a": _mlp(0), "model_b": _mlp(1), "test_loader": batches, "train_loader": batches,
            "loader": batches, "x": batches[0][0]}


class MyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``MyNet``, ``example_input``, and a/b/c.safetensors in the current folder (b, c: a with planted permutations)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net = MyNet()
    spec = rebasin.spec_from_model(net, torch.randn(2, 6))
    a = net.state_dict()
    for name, state in (("a", a), *((n, rebasin.permute(spec, rebasin.random_permutation(spec, seed=s), a))
                                    for n, s in (("b", 1), ("c", 2)))):
        rebasin.save_state(state, f"{name}.safetensors")
    return {"MyNet": MyNet, "example_input": torch.randn(2, 6), "expected": a}


SETUPS: dict[str, Callable[[Path, pytest.MonkeyPatch], dict[str, Any]]] = {
    "two_mlps": two_mlps, "checkpoints": checkpoints,
}


# ------------------------------------------------------------------------------------------------ claims
def _barrier_printed(ns: dict, out: str) -> None:
    assert re.fullmatch(r"-?\d+\.\d+(e-?\d+)?\n", out), out  # one number: the loss barrier


def _large_models(ns: dict, out: str) -> None:
    # a planted permutation is undone; the merge of three permuted copies is the model; the files are real
    safetensors = pytest.importorskip("safetensors.torch")
    for name in ("b_aligned", "merged"):
        got = safetensors.load_file(f"{name}.safetensors")
        for k, v in ns["expected"].items():
            torch.testing.assert_close(got[k], v)
    # the spec was traced on a meta model (no weights) and equals the one of a real model
    assert ns["spec"].axes == rebasin.spec_from_model(MyNet(), torch.randn(2, 6)).axes


def _sinkhorn(ns: dict, out: str) -> None:
    import inspect

    # block 1: at tau=1 both marginals are 1 to tol
    tol = inspect.signature(rebasin.matching.sinkhorn).parameters["tol"].default
    first = rebasin.matching.sinkhorn(ns["logits"], tau=1.0, n_iter=50, grad="implicit")
    torch.testing.assert_close(first.sum(1), torch.ones(64), atol=tol, rtol=0)
    torch.testing.assert_close(first.sum(0), torch.ones(64), atol=tol, rtol=0)
    # block 2: the info's residual is the largest row-sum error; not converged means a warning
    S, info = ns["S"], ns["info"]
    assert info.residual == pytest.approx(float((S.detach().sum(1) - 1).abs().max()), abs=1e-6)
    assert info.n_iter == 50 and info.converged == (info.residual <= tol)
    if not info.converged:
        with pytest.warns(rebasin.matching.SinkhornConvergenceWarning, match="Raise n_iter"):
            rebasin.matching.sinkhorn(ns["logits"], tau=0.05, n_iter=50)
    # SinkhornRebasin: hard permutations
    perms = ns["perms"]
    assert set(perms) and all(sorted(p.tolist()) == list(range(len(p))) for p in perms.values())
    # learned orthogonal transforms: an orthogonal stream map whose midpoint loss is below Procrustes'
    q = ns["learned"].transforms[ns["stream"]]
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]), atol=1e-5, rtol=0)
    assert ns["midpoint_loss"](ns["learned"].state_b) < ns["midpoint_loss"](ns["procrustes"]) - 0.01
    assert "orthogonal\nTrue\n" in out


def _concepts(ns: dict, out: str) -> None:
    spec = ns["spec"]  # q/k (P1) and v/o (P2) units of the first layer: 4 heads (H0) of 8
    assert spec.structure["P1"] == spec.structure["P2"] == ("H0", 8) and spec.sizes["P1"] == 4 * 8


def _specs(ns: dict, out: str) -> None:
    spec = ns["spec"]
    assert spec.axes["0.weight"] == ("P0", None) and len(spec.perms) == 48
    real = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(8, 8), nn.ReLU())], nn.Linear(8, 2))
    with torch.device("meta"):
        meta = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(8, 8), nn.ReLU())], nn.Linear(8, 2))
    assert rebasin.spec_from_model(meta, (2, 8)).axes == rebasin.spec_from_model(real, torch.randn(2, 8)).axes


CHECKS: dict[str, Callable[[dict, str], None]] = {
    "README.md": _barrier_printed,
    "docs/index.md": _barrier_printed,
    "docs/large_models.md": _large_models,
    "docs/sinkhorn.md": _sinkhorn,
    "docs/concepts.md": _concepts,
    "docs/api/specs.md": _specs,
}


@pytest.mark.parametrize("page", _pages())
def test_page_blocks_run_and_claims_hold(page, tmp_path, monkeypatch, capsys):
    blocks = python_blocks((ROOT / page).read_text())
    assert blocks
    namespace: dict[str, Any] = {"__name__": f"docs_{Path(page).stem}"}
    ran = 0
    for i, (mark, arg, code) in enumerate(blocks):
        if mark == "not-run":
            continue
        if mark == "setup":
            assert arg in SETUPS, f"{page} block {i}: unknown setup {arg!r}; known: {sorted(SETUPS)}"
            namespace.update(SETUPS[arg](tmp_path, monkeypatch))
        try:
            with warnings.catch_warnings():  # warnings a page announces are checked in CHECKS
                warnings.simplefilter("ignore", rebasin.matching.SinkhornConvergenceWarning)
                exec(compile(code, f"{page} block {i}", "exec"), namespace)  # noqa: S102 - our own docs
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page} block {i} failed: {exc!r}\n{code}") from exc
        ran += 1
    if ran:  # a page whose blocks run says what they show
        assert page in CHECKS, f"{page}: add the checks of what its blocks show to CHECKS"
        CHECKS[page](namespace, capsys.readouterr().out)


def test_markers_are_read():
    text = "x\n<!-- not-run: needs torchrun -->\n\n```python\na = 1\n```\n```python\nb = 2\n```\n" \
           "<!-- setup: two_mlps -->\n```python\nc\n```\n"
    assert python_blocks(text) == [("not-run", "needs torchrun", "a = 1\n"), (None, None, "b = 2\n"),
                                   ("setup", "two_mlps", "c\n")]
    # a marker without a reason is no marker: the block runs (and fails if it needs names from elsewhere)
    assert python_blocks("<!-- not-run: -->\n```python\nz\n```\n") == [(None, None, "z\n")]
