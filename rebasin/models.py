"""Deprecated alias of :mod:`rebasin.apps.models` (moved in 0.2; removed in the next release)."""

from __future__ import annotations

import warnings

from .apps.models import *  # noqa: F403 - the deprecated alias re-exports the moved module's names
from .apps.models import __all__  # noqa: F401 - re-exported so the alias lists the same names

warnings.warn(
    "rebasin.models moved to rebasin.apps.models; the old module is removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
