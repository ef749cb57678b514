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
    # one permutation on both axes of a square weight (P W Pᵀ) is traced
    assert "('P0', 'P0')" in out and namespace["Residual"] is not None
    # the manual spec on the page matches the traced one for the same MLP
    assert namespace["manual"].axes == namespace["spec"].axes


def _check_extending(namespace: dict, out: str, blocks: list[str]) -> None:
    import torch

    import rebasin

    assert len(blocks) >= 9
    # "Add a layer rule": the page registered its layers inside the test's registration scope
    assert rebasin.trace.module_rule(namespace["MyLinear"]) is not None
    lines = out.splitlines()
    # declarative: the printed axes; REPAIR lists the hidden MyLinear as a producer (not the output layer)
    assert lines[0] == "('P0', None) ('P0',) (None, 'P0')"
    assert lines[1] == "['0']"
    # callable: a hidden permutation of its own, the stream on the rows of w_out
    assert lines[2] == "('P1', 'P0') ('P0', 'P1') {'P0': 8, 'P1': 32}"
    assert lines[3:5] == ["True", "True"]
    # the conditional rule shown on the page works as written
    grouped = namespace["grouped_layer_rule"]
    with rebasin.trace.registration_scope():
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
        with rebasin.trace.registration_scope():
            for i, block in enumerate(blocks):
                try:
                    exec(compile(block, f"{page} block {i}", "exec"), namespace)  # noqa: S102 - our own docs
                except Exception as exc:  # pragma: no cover - the message is the point
                    raise AssertionError(f"{page} block {i} failed: {exc!r}\n{block}") from exc
            RUNNABLE_PAGES[page](namespace, capsys.readouterr().out, blocks)
    finally:
        for name in set(rebasin.matcher_names()) - registered:
            rebasin.matching.unregister_matcher(name)
    if "MyLinear" in namespace:
        assert rebasin.trace.module_rule(namespace["MyLinear"]) is None


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

    # the top level and the names that left it for a subpackage (rebasin._MOVED, besides the applications')
    homes = {n: "rebasin" for n in rebasin.__all__}
    homes |= {n: home for n, home in rebasin._MOVED.items() if not home.startswith("rebasin.apps")}

    def covered(name: str) -> bool:
        obj = getattr(importlib.import_module(homes[name]), name)
        return name in documented or getattr(obj, "__module__", None) in whole_modules

    missing = [n for n in homes if not covered(n)]
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


def _what_is_in_it(text: str) -> str:
    match = re.search(r"^## What is in it\n\n(.*?)\n\n", text, flags=re.S | re.M)
    assert match, "no 'What is in it' table"
    return match.group(1)


def test_readme_and_docs_home_show_the_same_api_table():
    """docs/index.md copies the README's 'What is in it' table (links relative to docs/)."""
    readme = _what_is_in_it((ROOT / "README.md").read_text())
    home = _what_is_in_it((DOCS / "index.md").read_text())
    for name in ("register_matcher", "register_module", "fit_flow_connection", "rebasin merge"):
        assert name in readme
    assert home == readme.replace("](docs/", "](")


def _benchmark_sections() -> dict[str, str]:
    text = (DOCS / "benchmarks.md").read_text()
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


#: A command on the benchmarks page: a script of benchmarks/, a python -m module, or the CLI.
_COMMAND = re.compile(r"`((?:OMP_NUM_THREADS=\d+ )?(?:python benchmarks/\w+\.py|python -m [\w.]+|rebasin )[^`]*)`")


def test_benchmarks_page_is_curated():
    """One current section per benchmark, each with a command that runs from any checkout."""
    text = (DOCS / "benchmarks.md").read_text()
    for machine_path in ("/work/", "/tmp/", "/root/", "/home/"):
        assert machine_path not in text, f"absolute path {machine_path} on docs/benchmarks.md: use ../shared/data or DIR"
    sections = _benchmark_sections()
    assert len(sections) >= 10
    titles = [re.sub(r" \(\d{4}-\d{2}-\d{2} \d{2}:\d{2}\)$", "", t) for t in sections]
    assert len(set(titles)) == len(titles), "two sections for one benchmark: keep the current one (history is in git)"
    assert titles == list(sections), "dated section titles are the old log format; the date goes on a 'Ran:' line"
    for title, body in sections.items():
        assert _COMMAND.search(body), f"section {title!r} has no command"
        assert re.search(r"^Ran: \d{4}-\d{2}-\d{2}", body, flags=re.M), f"section {title!r} does not say when it ran"
    for figure in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (DOCS / figure).exists(), figure


def test_benchmark_commands_use_existing_flags():
    """Every --flag of a command on the benchmarks page is one its script defines (flags renamed in 0.2)."""
    sources = {"continual.compare": ROOT / "continual" / "compare.py"}
    checked = 0
    for command in _COMMAND.findall((DOCS / "benchmarks.md").read_text()):
        script = re.search(r"python benchmarks/(\w+\.py)", command)
        module = re.search(r"python -m ([\w.]+)", command)
        if script:
            source = (ROOT / "benchmarks" / script.group(1)).read_text()
        elif module and module.group(1) in sources:
            source = sources[module.group(1)].read_text()
        else:
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", command):
            assert f'"{flag}"' in source, f"{flag} is not an option of {command}"
            checked += 1
    assert checked > 50


def test_benchmark_report_replaces_its_section(tmp_path):
    """A benchmark run rewrites its own section of the page instead of appending a dated copy."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nIntro.\n\n## Speed\n\nCommand: `old`\n\n| a |\n|---|\n| 1 |\n\n"
                    "## Other\n\nkept\n\n## Speed (2026-01-01 10:00)\n\nan old log entry\n")
    _report.append_report("Speed", f"python benchmarks/x.py --data-root {ROOT.parent}/shared/data", "| a |\n|---|\n| 2 |",
                          notes="notes", path=page)
    text = page.read_text()
    assert text.count("## Speed") == 1 and "| 1 |" not in text and "old log entry" not in text
    assert "Command: `python benchmarks/x.py --data-root ../shared/data`" in text and "| 2 |" in text
    assert text.index("## Speed") < text.index("## Other") and "kept" in text and text.startswith("# Benchmarks\n\nIntro.")
    _report.append_report("New", "python benchmarks/y.py", "| b |", path=page)
    assert page.read_text().rstrip().endswith("| b |") and page.read_text().count("## New") == 1
