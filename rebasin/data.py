"""Deprecated alias of :mod:`rebasin.apps.data` (moved in 0.2; removed in the next release)."""

from __future__ import annotations

import warnings

from .apps.data import *  # noqa: F403 - the deprecated alias re-exports the moved module's names
from .apps.data import __all__  # noqa: F401 - re-exported so the alias lists the same names

warnings.warn(
    "rebasin.data moved to rebasin.apps.data; the old module is removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
