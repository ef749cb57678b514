"""The datasets and loaders of the applications: :mod:`rebasin.datasets` (their public home), re-exported."""

from __future__ import annotations

from ..datasets import (
    MNIST_MEAN,
    MNIST_STD,
    data_root_from_env,
    digits_loaders,
    digits_tensors,
    mnist_loaders,
    mnist_tensors,
    tensor_loader,
)

__all__ = [
    "tensor_loader",
    "digits_tensors",
    "digits_loaders",
    "mnist_tensors",
    "mnist_loaders",
    "data_root_from_env",
    "MNIST_MEAN",
    "MNIST_STD",
]
