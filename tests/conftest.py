"""Shared fixtures: the small models and data of ``builders``, and a guard that no test leaks a registration."""

from __future__ import annotations

import builders
import pytest

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
