"""Deprecated alias of :mod:`rebasin.apps.training` (moved in 0.2; removed in the next release)."""

from __future__ import annotations

import warnings

from .apps.training import *  # noqa: F403 - the deprecated alias re-exports the moved module's names
from .apps.training import __all__  # noqa: F401 - re-exported so the alias lists the same names

warnings.warn(
    "rebasin.train moved to rebasin.apps.training; the old module is removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
