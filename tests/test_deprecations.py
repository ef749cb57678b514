"""Names that moved in 0.2 keep working for one release, with a DeprecationWarning that says where to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import rebasin
from rebasin.apps import training

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["fit_classifier_", "evaluate", "seeded_model"])
def test_training_helpers_left_the_top_level_with_a_warning(name):
    assert name not in rebasin.__all__
    with pytest.warns(DeprecationWarning, match=rf"rebasin\.{name} moved to rebasin\.apps\.training\.{name}"):
        value = getattr(rebasin, name)
    assert value is getattr(training, name)


def test_unknown_top_level_names_are_still_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        rebasin.nonexistent  # noqa: B018


OLD_MODULES = [
    ("rebasin.models", "rebasin.apps.models", "MLP"),
    ("rebasin.data", "rebasin.apps.data", "digits_loaders"),
    ("rebasin.train", "rebasin.apps.training", "fit_classifier_"),
]


@pytest.fixture(scope="module")
def old_module_warnings() -> dict[str, list[str]]:
    """One fresh interpreter imports every old module in turn (each for the first time there); per module,
    the DeprecationWarnings its import gave (one child process instead of one per module: each costs the
    import of torch)."""
    code = "import warnings, importlib, json\nfound = {}\n"
    for old, new, name in OLD_MODULES:
        code += (
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            f"    old = importlib.import_module({old!r})\n"
            f"new = importlib.import_module({new!r})\n"
            f"assert getattr(old, {name!r}) is getattr(new, {name!r})\n"
            f"found[{old!r}] = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)]\n"
        )
    code += "print(json.dumps(found))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("old", "new", "name"), OLD_MODULES)
def test_old_application_modules_are_deprecated_aliases(old, new, name, old_module_warnings):
    assert any(f"{old} moved to {new}" in message for message in old_module_warnings[old])


def test_docs_and_examples_use_the_new_names():
    """Deprecated names stay working for users, but our own pages and examples teach the current ones."""
    import re

    pattern = re.compile(r"rebasin\.(fit_classifier_|evaluate|seeded_model)\(|rebasin\.(models|data|train)\b(?!/)")
    files = [*(ROOT / "examples").glob("*.py"), *(ROOT / "docs").rglob("*.md"), ROOT / "README.md"]
    files = [p for p in files if p.name != "architecture.md"]  # the migration table names the old modules
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in pattern.finditer(p.read_text())]
    assert not found, found
