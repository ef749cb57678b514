"""Small in-memory datasets and loaders: public, shared by the applications, ``continual``, benchmarks and tests.

(Moved here from ``rebasin.apps.data``, which re-exports it, so that ``continual`` needs public ``rebasin``
only.)

Everything is a tensor from the start (no per-sample PIL transforms), and every shuffle goes
through a seeded :class:`torch.Generator`. Nothing here downloads: MNIST is read from a local
root laid out the way torchvision expects.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ._common import check_int
from ._errors import RebasinError

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

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def tensor_loader(
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A :class:`DataLoader` over ``TensorDataset(x, y)``; shuffling uses ``Generator().manual_seed(seed)``.

    Two loaders built with the same arguments yield the same batches epoch after epoch. The loader always
    carries its own generator, even unshuffled: a ``DataLoader`` without one draws a base seed from the
    global torch RNG every time it is iterated, which would shift the caller's random stream.

    Examples
    --------
    >>> import torch
    >>> loader = tensor_loader(torch.arange(10.0), torch.arange(10), batch_size=4, shuffle=True)
    >>> [len(xb) for xb, _ in loader]
    [4, 4, 2]
    """
    if x.shape[0] != y.shape[0]:
        raise RebasinError(f"x and y must have the same number of rows, got {tuple(x.shape)} and {tuple(y.shape)}")
    check_int(batch_size, "batch_size")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
    )


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return x, y


def digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 digits: ``x`` of shape ``(1797, 64)`` float32 in ``[0, 1]``, ``y`` int64 in 0..9.

    Returns fresh copies (the parsed data is cached in-process).

    Examples
    --------
    >>> x, y = digits_tensors()
    >>> tuple(x.shape), tuple(y.shape)
    ((1797, 64), (1797,))
    """
    x, y = _digits()
    return x.clone(), y.clone()


def _split(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    if not 0.0 < test_fraction < 1.0:
        raise RebasinError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, min(n - 1, round(n * test_fraction)))
    return order[n_test:], order[:n_test]


def digits_loaders(
    *, batch_size: int = 64, test_fraction: float = 0.25, seed: int = 0, flatten: bool = True
) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders over the digits, split at random by ``seed`` (same seed, same split).

    Parameters
    ----------
    batch_size
        Batch size of both loaders.
    test_fraction
        Share of the 1797 images held out for testing.
    seed
        Seeds the split and the training loader's shuffling.
    flatten
        Inputs of shape ``(B, 64)`` when True, ``(B, 1, 8, 8)`` otherwise.

    Returns
    -------
    (train_loader, test_loader)
        The training loader shuffles; the test loader does not.

    Examples
    --------
    >>> train, test = digits_loaders(batch_size=32)
    >>> len(train.dataset), len(test.dataset)
    (1348, 449)
    """
    x, y = digits_tensors()
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    train_idx, test_idx = _split(x.shape[0], test_fraction, seed)
    return (
        tensor_loader(x[train_idx], y[train_idx], batch_size=batch_size, shuffle=True, seed=seed),
        tensor_loader(x[test_idx], y[test_idx], batch_size=batch_size),
    )


@functools.lru_cache(maxsize=4)
def _mnist_uint8(root: str, train: bool) -> tuple[Tensor, Tensor]:
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(root, train=train, download=False)
    except RuntimeError as err:
        expected = ", ".join(str(Path(root) / "MNIST" / "raw" / f) for f in _MNIST_FILES)
        raise RebasinError(
            f"MNIST not found under root {root!r} (download is disabled). Expected the IDX files "
            f"in torchvision's layout: {expected}"
        ) from err
    return ds.data, ds.targets


def mnist_tensors(root: str | os.PathLike[str], train: bool = True) -> tuple[Tensor, Tensor]:
    """MNIST from a local torchvision root, as tensors.

    Parameters
    ----------
    root
        Folder containing ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``. Never
        downloads.
    train
        The 60,000 training images, or the 10,000 test images.

    Returns
    -------
    (x, y)
        ``x`` float32 of shape ``(N, 1, 28, 28)`` normalised with the usual mean 0.1307 and
        std 0.3081; ``y`` int64 of shape ``(N,)``. Fresh tensors on each call (the raw bytes are
        cached in-process).

    Examples
    --------
    >>> root = data_root_from_env()
    >>> x, y = mnist_tensors(root, train=False)  # doctest: +SKIP
    >>> tuple(x.shape)  # doctest: +SKIP
    (10000, 1, 28, 28)
    """
    raw, labels = _mnist_uint8(str(Path(root).expanduser().resolve()), bool(train))
    x = raw.unsqueeze(1).to(torch.float32).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return x, labels.to(torch.int64, copy=True)


def mnist_loaders(
    root: str | os.PathLike[str],
    *,
    batch_size: int = 128,
    flatten: bool = True,
    train_subset: int | None = None,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders over local MNIST (see :func:`mnist_tensors`).

    Parameters
    ----------
    root
        torchvision root holding ``MNIST/raw``.
    batch_size
        Batch size of both loaders.
    flatten
        Inputs of shape ``(B, 784)`` when True, ``(B, 1, 28, 28)`` otherwise.
    train_subset
        Keep only this many training images, drawn at random with ``seed``.
    seed
        Seeds the subset and the training loader's shuffling.

    Returns
    -------
    (train_loader, test_loader)
    """
    (xtr, ytr), (xte, yte) = mnist_tensors(root, train=True), mnist_tensors(root, train=False)
    if train_subset is not None:
        if check_int(train_subset, "train_subset") > len(ytr):
            raise RebasinError(f"train_subset must be at most {len(ytr)}, got {train_subset}")
        keep = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))[:train_subset]
        xtr, ytr = xtr[keep], ytr[keep]
    if flatten:
        xtr, xte = xtr.flatten(1), xte.flatten(1)
    return (
        tensor_loader(xtr, ytr, batch_size=batch_size, shuffle=True, seed=seed),
        tensor_loader(xte, yte, batch_size=batch_size),
    )


def data_root_from_env(var: str = "REBASIN_DATA") -> Path | None:
    """The data root named by environment variable ``var``, or None when it is unset or empty.

    Examples
    --------
    >>> data_root_from_env("SURELY_NOT_SET_ANYWHERE") is None
    True
    """
    value = os.environ.get(var, "").strip()
    return Path(value).expanduser() if value else None
