"""The datasets and loaders of the applications: :mod:`rebasin.datasets` (their public home), re-exported."""

from __future__ import annotations

from .. import datasets
from ..datasets import *  # noqa: F403  # the public home's names, listed once there

__all__ = list(datasets.__all__)
