"""The documentation stays true: the quickstart and the extending page run as written, the README and the
docs home agree on the set-up commands, and every API page names objects that exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _check_quickstart(namespace: dict, out: str, blocks: list[str]) -> None:
    assert len(blocks) >= 6
    assert "loss barrier" in out and "merged accuracy" in out
    # the manual spec on the page matches the traced one for the same MLP
    assert namespace["manual"].axes == namespace["spec"].axes


def _check_extending(namespace: dict, out: str, blocks: list[str]) -> None:
    import torch

    import rebasin

    assert len(blocks) >= 9
    # "Add a layer rule": the page registered its layers inside the test's registration scope
    assert rebasin.module_rule(namespace["MyLinear"]) is not None
    lines = out.splitlines()
    # declarative: the printed axes; REPAIR lists the hidden MyLinear as a producer (not the output layer)
    assert lines[0] == "('P0', None) ('P0',) (None, 'P0')"
    assert lines[1] == "['0']"
    # callable: a hidden permutation of its own, the stream on the rows of w_out
    assert lines[2] == "('P1', 'P0') ('P0', 'P1') {'P0': 8, 'P1': 32}"
    assert lines[3:5] == ["True", "True"]
    # the conditional rule shown on the page works as written
    grouped = namespace["grouped_layer_rule"]
    with rebasin.registration_scope():
        rebasin.register_module(namespace["MyLinear"], params={"weight": ("out", "in"), "bias": ("out",)},
                                rule=grouped, overwrite=True)
        spec = rebasin.spec_from_model(torch.nn.Sequential(namespace["MyLinear"](3, 5), torch.nn.ReLU(),
                                                           torch.nn.Linear(5, 2)), torch.randn(2, 3))
    assert spec.axes["0.weight"] == ("P0", None)
    # "Add a matcher": the page's matcher ran through align and merge, and the page cleaned up after itself
    assert "wm_restarts" in out and "merged with wm_restarts" in out and "without data:" in out
    assert namespace["result"].method == "wm_restarts" and set(namespace["result"].info) == {"objective", "seed"}
    assert "wm_restarts" not in rebasin.matcher_names() and "activations" not in rebasin.matcher_names()


#: Pages whose python blocks run, in order, as one script; each with the checks of what it shows.
RUNNABLE_PAGES = {"quickstart.md": _check_quickstart, "extending.md": _check_extending}


@pytest.mark.parametrize("page", sorted(RUNNABLE_PAGES))
def test_page_runs_as_written(page, capsys, monkeypatch):
    """Every python block of the page runs, in order, in one namespace, as the page says."""
    import rebasin

    pytest.importorskip("sklearn")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    blocks = _python_blocks((DOCS / page).read_text())
    namespace: dict = {"__name__": page.removesuffix(".md")}
    registered = set(rebasin.matcher_names())
    try:
        # a page's layer rules and matchers must not leak into other tests, even when it fails half-way
        with rebasin.registration_scope():
            for i, block in enumerate(blocks):
                try:
                    exec(compile(block, f"{page} block {i}", "exec"), namespace)  # noqa: S102 - our own docs
                except Exception as exc:  # pragma: no cover - the message is the point
                    raise AssertionError(f"{page} block {i} failed: {exc!r}\n{block}") from exc
            RUNNABLE_PAGES[page](namespace, capsys.readouterr().out, blocks)
    finally:
        for name in set(rebasin.matcher_names()) - registered:
            rebasin.unregister_matcher(name)
    if "MyLinear" in namespace:
        assert rebasin.module_rule(namespace["MyLinear"]) is None


def _setup_commands(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)[:2]


def test_readme_and_docs_home_show_the_same_setup_commands():
    readme = (ROOT / "README.md").read_text()
    home = (DOCS / "index.md").read_text()
    commands = _setup_commands(readme)
    assert len(commands) == 2 and "rebasin demo" in commands[0] and "pytest" in commands[1]
    assert _setup_commands(home) == commands


def test_api_pages_reference_existing_objects():
    targets = []
    for page in sorted((DOCS / "api").glob("*.md")):
        targets += re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.M)
    assert len(targets) > 40
    for target in targets:
        if target.startswith("continual"):
            pytest.importorskip("avalanche")
        parts = target.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            break
        else:  # pragma: no cover
            raise AssertionError(f"cannot import {target}")


def test_every_public_name_is_documented():
    import rebasin

    documented = set()
    for page in (DOCS / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: rebasin\.(\w+)\s*$", page.read_text(), flags=re.M))
        documented |= set(re.findall(r"^::: rebasin\.\w+\.(\w+)\s*$", page.read_text(), flags=re.M))
    whole_modules = {f"rebasin.{m}" for m in documented}  # a page that documents a whole module

    def covered(name: str) -> bool:
        return name in documented or getattr(getattr(rebasin, name), "__module__", None) in whole_modules

    missing = [n for n in rebasin.__all__ if not covered(n)]
    assert not missing, f"add these to a page under docs/api/: {missing}"


def test_mkdocs_hook_renders_rst_math_and_roles():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rst_math", DOCS / "hooks" / "rst_math.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    html = (
        "<p>.. math::</p>\n<pre><code>a = b\n</code></pre>\n"
        "<p>.. math:: x<em>{i} + y</em>{j}</p>\n"
        "<p>.. math::\n    a &amp;= b \\\n    c &amp;= d</p>\n"
        "<p>see :math:<code>\\tau</code> and :func:<code>~rebasin.permute</code></p>"
    )
    out = hook.on_page_content(html, page=None, config=None, files=None)
    assert '<div class="math">\\[a = b\\]</div>' in out
    assert '<div class="math">\\[x_{i} + y_{j}\\]</div>' in out
    assert "\\begin{aligned}a &amp;= b \\\\\n    c &amp;= d\\end{aligned}" in out
    assert '<span class="math">\\(\\tau\\)</span>' in out and "<code>rebasin.permute</code>" in out
    assert ":math:" not in out and ":func:" not in out and ".. math::" not in out
