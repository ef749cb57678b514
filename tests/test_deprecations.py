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
    with pytest.warns(DeprecationWarning, match=rf"rebasin\.{name} is deprecated; use rebasin\.apps\.training\.{name}"):
        value = getattr(rebasin, name)
    assert value is getattr(training, name)


def test_unknown_top_level_names_are_still_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        rebasin.nonexistent  # noqa: B018 - the attribute access itself is under test


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

    pattern = re.compile(r"rebasin\.(fit_classifier_|evaluate|seeded_model|repair_states|repaired_path)\(|"
                         r"evaluate_path\(\w+, (None|\w*state)|repair=True, repair_loader|"
                         r"rebasin\.(models|data|train)\b(?!/)")
    files = [*(ROOT / "examples").glob("*.py"), *(ROOT / "docs").rglob("*.md"), ROOT / "README.md"]
    files = [p for p in files if p.name != "architecture.md"]  # the migration table names the old modules
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in pattern.finditer(p.read_text())]
    assert not found, found


# ------------------------------------------------------------------ 0.3: the small top level (issue 28)
#: Every name that left the top level in 0.3, by its home (each is in the home's ``__all__``).
MOVED_IN_0_3 = {
    "rebasin.spec": ("SpecCoverage", "identity_permutation", "check_permutations", "Checkpoint", "soft_permute",
        "structured_matrix", "perm_to_matrix", "matrix_to_perm",),
    "rebasin.trace": ("trace_model", "ModelTrace", "registration_scope", "module_rule", "ModuleRule",
        "RuleContext", "AxisPerm", "fold_layernorm",),
    "rebasin.matching": ("unregister_matcher", "get_matcher", "Matcher", "WeightMatchingInfo",
        "activation_correlations", "ActivationMatchingInfo", "STEInfo", "ot_matching", "sinkhorn",
        "SINKHORN_GRADS", "SinkhornInfo", "SinkhornConvergenceWarning",),
    "rebasin.paths": ("reset_bn_stats_", "repair_states", "repaired_path", "channel_stats", "ChannelStats",
        "PolyChainCurve", "CurveFit", "arc_interpolate", "ArcPath", "weight_adjusted_path", "WeightAdjustedPath",
        "WA_PATHS", "fit_flow_connection", "fit_bijection_connection", "FlowConnection", "FlowPath", "NeuronFlow",
        "proximal_alternating_minimization", "PAMResult", "ProximalStep", "plot_paths",),
    "rebasin.merging": ("MergeInfo", "MergeComparison",),
    "rebasin.landscape": ("mode_connectivity", "ModeConnectivity", "cka", "hessian_top_eigenvalue",
        "HessianEigenvalue", "hessian_trace", "HessianTrace",),
}
MOVED_NAMES = [(name, home) for home, names in MOVED_IN_0_3.items() for name in names]


@pytest.mark.parametrize(("name", "home"), MOVED_NAMES, ids=[n for n, _ in MOVED_NAMES])
def test_moved_names_warn_and_are_their_homes_objects(name, home):
    import importlib

    module = importlib.import_module(home)
    assert name in module.__all__
    assert name not in rebasin.__all__ and name not in dir(rebasin)
    with pytest.warns(DeprecationWarning, match=rf"^rebasin\.{name} is deprecated; use {home}\.{name} "):
        value = getattr(rebasin, name)
    assert value is getattr(module, name)


def test_the_top_level_is_small_and_complete():
    """``rebasin.__all__`` is the workflow and the main uses; tab completion shows it and the subpackages only."""
    assert 30 <= len(rebasin.__all__) <= 45
    for name in rebasin.__all__:
        assert name in vars(rebasin), name  # imported eagerly, no warning
    subpackages = {"spec", "trace", "matching", "paths", "merging", "landscape"}
    assert set(dir(rebasin)) == {*rebasin.__all__, *subpackages, "__version__"}
    assert all(rebasin.__getattr__(s).__name__ == f"rebasin.{s}" for s in subpackages)


def test_our_code_and_pages_import_moved_names_from_their_homes():
    """The library, continual, benchmarks, examples, docs and the other tests spell moved names at their homes."""
    import re

    names = "|".join(name for name, _ in MOVED_NAMES)
    dotted = re.compile(rf"(?<![\w.])rebasin\.({names})\b")
    imported = re.compile(r"from rebasin import (\([^)]*\)|[^\n]*)")
    moved = {name for name, _ in MOVED_NAMES}
    roots = ("rebasin", "continual", "benchmarks", "examples", "docs", "tests")
    files = [p for r in roots for p in (ROOT / r).rglob("*") if p.suffix in (".py", ".md")]
    files += [ROOT / "README.md"]
    skip = {ROOT / "rebasin" / "__init__.py", Path(__file__).resolve(), ROOT / "docs" / "architecture.md"}
    found = []
    for p in files:
        if p in skip:
            continue
        text = p.read_text()
        found += [f"{p.relative_to(ROOT)}: {m.group(0)}" for m in dotted.finditer(text)]
        found += [f"{p.relative_to(ROOT)}: from rebasin import {n}" for m in imported.finditer(text)
                  for n in re.findall(r"\w+", m.group(1)) if n in moved]
    assert not found, found


# ------------------------------------------------------------------ 0.2 spellings of REPAIR and evaluate_path
def _repair_case():
    import torch
    from torch import nn

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    b = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    for m in (a, b):  # randomised norm statistics, so that a wrong reset shows
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    spec = rebasin.spec_from_model(a, torch.randn(2, 3))
    data = [(torch.randn(16, 3), torch.randint(0, 2, (16,))) for _ in range(2)]
    return a, a.state_dict(), b.state_dict(), spec, data


def test_repair_two_state_form_is_deprecated_and_equals_the_new_form():
    from torch.testing import assert_close

    model, sa, sb, spec, data = _repair_case()
    new = rebasin.repair(model, [sa, sb], [0.7, 0.3], data, spec=spec)
    with pytest.warns(DeprecationWarning, match=r"repair\(\) is deprecated.*repair\(model, \[state_a, state_b\]"):
        old = rebasin.repair(model, sa, sb, 0.3, data, spec=spec)
    assert isinstance(old, type(model))
    for k, v in new.items():
        assert_close(old.state_dict()[k], v)


def test_repair_states_is_a_deprecated_alias_of_repair():
    from torch.testing import assert_close

    model, sa, sb, spec, data = _repair_case()
    new = rebasin.repair(model, [sa, sb], [0.5, 0.5], data, spec=spec)
    with pytest.warns(DeprecationWarning, match=r"repair_states is deprecated.*use repair\(model, states, weights"):
        old = rebasin.paths.repair_states(model, [sa, sb], [0.5, 0.5], data, spec=spec)
    for k, v in new.items():
        assert_close(old[k], v)


def test_repaired_path_is_a_deprecated_alias_of_repaired_path_class():
    model, sa, sb, spec, data = _repair_case()
    with pytest.warns(DeprecationWarning, match=r"repaired_path is deprecated.*RepairedPath"):
        path = rebasin.paths.repaired_path(model, sa, sb, data, spec=spec)
    assert isinstance(path, rebasin.RepairedPath)


@pytest.mark.parametrize("form", ["linear", "bn_loader", "repair", "path"])
def test_evaluate_path_old_form_is_deprecated_and_equals_the_path_object(form):
    model, sa, sb, spec, data = _repair_case()
    curve = rebasin.BezierCurve(sa, sb, num_bends=3)
    old_kw, new_path = {
        "linear": ({}, rebasin.LinearPath(sa, sb)),
        "bn_loader": ({"bn_loader": data}, rebasin.BNResetPath(rebasin.LinearPath(sa, sb), model, data)),
        "repair": ({"repair": True, "repair_loader": data, "spec": spec},
                   rebasin.RepairedPath(model, sa, sb, data, spec=spec)),
        "path": ({"path": curve}, curve),
    }[form]
    states = (None, None) if form == "path" else (sa, sb)
    with pytest.warns(DeprecationWarning, match=r"this form of evaluate_path\(\) is deprecated.*LinearPath"):
        old = rebasin.evaluate_path(model, *states, data, num_points=3, **old_kw)
    new = rebasin.evaluate_path(model, new_path, data, num_points=3)
    assert old.loss == new.loss and old.accuracy == new.accuracy
    assert old.metadata["path"] == new.metadata["path"] and old.metadata["bn_reset"] == new.metadata["bn_reset"]
