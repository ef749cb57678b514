"""Deprecated alias of :mod:`rebasin.apps.models` (moved in 0.2; removed in the next release)."""

from __future__ import annotations

import warnings

from .apps.models import *  # noqa: F403
from .apps.models import __all__  # noqa: F401

warnings.warn(
    "rebasin.models moved to rebasin.apps.models; the old module is removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
