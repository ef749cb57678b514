"""Shared fixtures: the small models and data of ``builders``, and a guard that no test leaks a registration.

Also what keeps the suite sound in parallel and under load (the README's command runs it with pytest-xdist,
``-n auto --dist loadgroup`` in pyproject's ``addopts``; ``-n 0`` runs it in one process):

- every xdist worker computes with one torch thread, and the child processes that tests start inherit
  ``OMP_NUM_THREADS=1``, so two workers on two cores do not oversubscribe them;
- the tests of a module that defines a module- or class-scoped fixture run on one worker, so the fixture is
  built once, not once per worker;
- hypothesis has no per-example deadline and no too-slow health check: both are wall-clock limits that a
  slow or busy machine trips on correct code.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import builders
import pytest
import torch
from hypothesis import HealthCheck, settings

import rebasin
from rebasin.trace import registered_modules


@pytest.fixture
def make_mlp():
    """:func:`builders.mlp`: ``make_mlp(in_features, hidden, out_features, bn=False, seed=None)``."""
    return builders.mlp


@pytest.fixture
def make_batches():
    """:func:`builders.batches`: ``make_batches(shape, n, batch, seed=0, scale=1.0, shift=0.0, classes=3)``."""
    return builders.batches


@pytest.fixture(autouse=True)
def no_registration_leaks():
    """Every test leaves the matcher and layer-rule registries as it found them."""
    matchers = rebasin.matcher_names()
    modules = dict(registered_modules())
    yield
    assert rebasin.matcher_names() == matchers, "a test left matchers registered or removed"
    assert dict(registered_modules()) == modules, "a test left layer rules registered, replaced or removed"


settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

if os.environ.get("PYTEST_XDIST_WORKER") is not None and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")  # the examples, CLI and docs runs in child processes


#: A test module that defines a fixture of one of these scopes (``@pytest.fixture(scope="module")``).
_SHARED_FIXTURE = re.compile(r"""scope\s*=\s*["'](module|class)["']""")


@functools.cache
def _shares_fixtures(path: Path) -> bool:
    try:
        return bool(_SHARED_FIXTURE.search(path.read_text(encoding="utf-8")))
    except OSError:
        return False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN201 - xdist's types, xdist optional
    """``--dist loadgroup``, and the tests of a module that defines a module- or class-scoped fixture together.

    Such a fixture (a trained model, the distributed world, checkpoints for the CLI) would otherwise be
    built again on every worker that gets one of the module's tests. The controller sees only test ids, so
    the module's source says whether it shares fixtures (``xdist_group`` marks cannot say it: pytest-xdist 3.8
    under pytest 9.2 drops them silently). Every other test is scheduled on its own.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ModuleFixtureScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            if scope != nodeid:  # an xdist_group mark, where xdist still reads them
                return scope
            module = nodeid.split("::", 1)[0]
            return module if _shares_fixtures(config.rootpath / module) else nodeid

    return ModuleFixtureScheduling(config, log)
