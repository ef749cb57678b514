"""Offline continual-learning benchmarks built from in-memory tensors.

Every experience is materialised once as tensors (rotations and pixel permutations are applied to
the whole experience at once, never per sample through PIL), then handed to Avalanche's
``tensors_benchmark``, so every Avalanche strategy, plugin, metric and logger works on them. MNIST is
read from a local torchvision root (``root/MNIST/raw/*-ubyte``) and never downloaded.

* :func:`rotated_mnist` — domain-incremental: experience ``i`` is MNIST rotated by ``angles[i]``
  (default evenly spaced over 0–180°, both ends included).
* :func:`permuted_mnist` — domain-incremental: a fixed random pixel permutation per experience.
* :func:`split_mnist` — class-incremental: two new digits per experience.
* :func:`synthetic` — a tiny domain-incremental benchmark (Gaussian classes seen through a
  different random rotation of the input space per experience) for fast tests.

All are deterministic given ``seed``. Images are returned as ``(N, 1, 28, 28)`` float32 normalised
with MNIST's mean and std (models flatten them), or with ``pixels="raw"`` in ``[0, 1]`` (what
``ToTensor`` gives, and what MC-SGD's reference code trains on: its learning rates diverge on
normalised inputs); synthetic inputs are ``(N, n_features)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rebasin import RebasinError
from rebasin.checks import check_int
from rebasin.datasets import MNIST_MEAN, MNIST_STD, mnist_tensors

__all__ = [
    "random_angles",
    "rotated_mnist",
    "permuted_mnist",
    "split_mnist",
    "synthetic",
    "rotate_images",
    "benchmark_from_tensors",
    "BENCHMARKS",
    "PIXELS",
]

Pairs = list[tuple[Tensor, Tensor]]

#: How the MNIST benchmarks scale their pixels.
PIXELS = ("normalized", "raw")


def _check_pixels(pixels: str) -> None:
    if pixels not in PIXELS:
        raise RebasinError(f"unknown pixels {pixels!r}; choose one of {PIXELS}")


def _scaled(pairs: Pairs, pixels: str) -> Pairs:
    """``pairs`` of MNIST-normalised images as ``pixels`` asks (``"raw"``: back to ``[0, 1]``)."""
    _check_pixels(pixels)
    return pairs if pixels == "normalized" else [(x * MNIST_STD + MNIST_MEAN, y) for x, y in pairs]


def benchmark_from_tensors(train: Pairs, test: Pairs) -> Any:
    """An Avalanche benchmark with one experience per ``(x, y)`` pair (task label 0 everywhere).

    Parameters
    ----------
    train, test
        Lists of equal length of ``(inputs, integer targets)``.

    Returns
    -------
    avalanche benchmark
        With ``train_stream`` and ``test_stream``; experience ``i`` of both streams holds ``train[i]``
        and ``test[i]``.
    """
    if len(train) != len(test) or not train:
        raise RebasinError(
            f"need the same positive number of train and test experiences, got {len(train)} and {len(test)}"
        )
    for name, pairs in (("train", train), ("test", test)):
        for i, (x, y) in enumerate(pairs):
            if x.shape[0] != y.shape[0] or x.shape[0] == 0:
                raise RebasinError(
                    f"{name} experience {i}: x has shape {tuple(x.shape)} and y {tuple(y.shape)}; need the "
                    "same positive number of rows"
                )
    from avalanche.benchmarks import tensors_benchmark

    return tensors_benchmark(
        train_tensors=[[x, y] for x, y in train],
        test_tensors=[[x, y] for x, y in test],
        task_labels=[0] * len(train),
    )


def _subset(x: Tensor, y: Tensor, n: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    if n is None or n >= x.shape[0]:
        return x, y
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RebasinError(f"sample counts must be positive ints or None, got {n!r}")
    idx = torch.randperm(x.shape[0], generator=generator)[:n].sort().values
    return x[idx], y[idx]


def _mnist(root: str | os.PathLike[str], train_samples: int | None, test_samples: int | None, seed: int):
    g = torch.Generator().manual_seed(int(seed))
    xtr, ytr = _subset(*mnist_tensors(root, train=True), train_samples, g)
    xte, yte = _subset(*mnist_tensors(root, train=False), test_samples, g)
    return (xtr, ytr), (xte, yte)


def rotate_images(x: Tensor, degrees: float) -> Tensor:
    """Rotate a batch of MNIST-normalised images ``(N, C, H, W)`` by ``degrees`` (bilinear).

    Pixels coming from outside the image are background (0 before normalisation). The whole batch
    is rotated with one ``grid_sample`` call.
    """
    if x.ndim != 4:
        raise RebasinError(f"rotate_images needs a batch of shape (N, C, H, W), got {tuple(x.shape)}")
    a = math.radians(float(degrees))
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta[None], [1, *x.shape[1:]], align_corners=False)
    grid = grid.to(x.device).expand(x.shape[0], *grid.shape[1:])
    raw = x * MNIST_STD + MNIST_MEAN
    out = F.grid_sample(raw, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out - MNIST_MEAN) / MNIST_STD


def random_angles(n: int, *, seed: int = 0) -> list[float]:
    """``n`` rotation angles drawn uniformly from ``[0, 180)`` degrees, rounded down to 0.1, from a seeded generator.

    The generator is seeded with ``seed + 2``: ``seed`` itself draws the MNIST subsets and ``seed + 1`` the
    pixel permutations of :func:`permuted_mnist`, so the three streams stay independent.
    """
    g = torch.Generator().manual_seed(int(seed) + 2)
    return [math.floor(1800.0 * float(u)) / 10.0
            for u in torch.rand(check_int(n, "n"), generator=g, dtype=torch.float64)]


def rotated_mnist(
    root: str | os.PathLike[str],
    n_experiences: int = 20,
    *,
    seed: int = 0,
    angles: Sequence[float] | str | None = None,
    train_samples: int | None = None,
    test_samples: int | None = None,
    pixels: str = "normalized",
) -> Any:
    """Rotated MNIST: experience ``i`` is every image rotated by ``angles[i]`` degrees.

    Parameters
    ----------
    root
        torchvision root holding ``MNIST/raw``. Never downloads.
    n_experiences
        Number of experiences (ignored when ``angles`` is given).
    seed
        Seeds the optional subsets and the random angles.
    angles
        Rotation of each experience; default ``linspace(0, 180, n_experiences)``; ``"random"``:
        ``n_experiences`` angles drawn uniformly from ``[0, 180)`` (seeded by ``seed``).
    train_samples, test_samples
        Use a seeded random subset of this many training / test images (the same images in every
        experience); all 60,000 / 10,000 by default.
    pixels
        ``"normalized"`` (default: MNIST's mean and std) or ``"raw"`` (``[0, 1]``).

    Returns
    -------
    avalanche benchmark
        ``train_stream`` / ``test_stream`` of ``n_experiences`` experiences, 10 classes each.

    Examples
    --------
    >>> bm = rotated_mnist("../shared/data", n_experiences=20)  # doctest: +SKIP
    >>> len(bm.train_stream)                                      # doctest: +SKIP
    20
    """
    if angles is None:
        n = check_int(n_experiences, "n_experiences")
        angles = [180.0 * i / (n - 1) for i in range(n)] if n > 1 else [0.0]
    elif isinstance(angles, str):
        if angles != "random":
            raise RebasinError(f"angles must be a sequence of degrees, None or 'random', got {angles!r}")
        angles = random_angles(check_int(n_experiences, "n_experiences"), seed=seed)
    angles = [float(a) for a in angles]
    if not angles:
        raise RebasinError("angles must hold at least one rotation")
    _check_pixels(pixels)  # before MNIST is read
    (xtr, ytr), (xte, yte) = _mnist(root, train_samples, test_samples, seed)
    train = [(rotate_images(xtr, a), ytr) for a in angles]
    test = [(rotate_images(xte, a), yte) for a in angles]
    return benchmark_from_tensors(_scaled(train, pixels), _scaled(test, pixels))


def permuted_mnist(
    root: str | os.PathLike[str],
    n_experiences: int = 10,
    *,
    seed: int = 0,
    train_samples: int | None = None,
    test_samples: int | None = None,
    pixels: str = "normalized",
) -> Any:
    """Permuted MNIST: experience ``i`` applies its own random pixel permutation (drawn from ``seed``).

    Every experience, the first included, is permuted. See :func:`rotated_mnist` for the other
    arguments.
    """
    n = check_int(n_experiences, "n_experiences")
    _check_pixels(pixels)
    (xtr, ytr), (xte, yte) = _mnist(root, train_samples, test_samples, seed)
    g = torch.Generator().manual_seed(int(seed) + 1)
    train, test = [], []
    for _ in range(n):
        p = torch.randperm(28 * 28, generator=g)
        train.append((xtr.reshape(-1, 784)[:, p].reshape(xtr.shape), ytr))
        test.append((xte.reshape(-1, 784)[:, p].reshape(xte.shape), yte))
    return benchmark_from_tensors(_scaled(train, pixels), _scaled(test, pixels))


def split_mnist(
    root: str | os.PathLike[str],
    n_experiences: int = 5,
    *,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    train_samples: int | None = None,
    test_samples: int | None = None,
    pixels: str = "normalized",
) -> Any:
    """Split MNIST (class-incremental): the ten digits in ``n_experiences`` equal groups.

    ``class_order`` defaults to ``0, 1, ..., 9`` (experience 0 holds digits 0 and 1 with five
    experiences). See :func:`rotated_mnist` for the other arguments.
    """
    n = check_int(n_experiences, "n_experiences")
    order = list(range(10)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(10)):
        raise RebasinError(f"class_order must be a permutation of 0..9, got {order}")
    if 10 % n:
        raise RebasinError(f"n_experiences must divide the 10 classes evenly, got {n}")
    _check_pixels(pixels)
    (xtr, ytr), (xte, yte) = _mnist(root, train_samples, test_samples, seed)
    k = 10 // n
    train, test = [], []
    for i in range(n):
        classes = torch.tensor(order[i * k : (i + 1) * k])
        mtr, mte = torch.isin(ytr, classes), torch.isin(yte, classes)
        train.append((xtr[mtr], ytr[mtr]))
        test.append((xte[mte], yte[mte]))
    return benchmark_from_tensors(_scaled(train, pixels), _scaled(test, pixels))


def synthetic(
    n_experiences: int = 3,
    *,
    seed: int = 0,
    n_features: int = 16,
    n_classes: int = 4,
    train_per_class: int = 64,
    test_per_class: int = 32,
    noise: float = 0.6,
) -> Any:
    """A tiny domain-incremental benchmark for tests (no files).

    Class ``c`` is a Gaussian blob around a fixed random mean (shared by every experience);
    experience ``i`` sees the inputs through its own random orthogonal rotation of the input space
    (the identity for experience 0). Each experience is learnable on its own, and different
    rotations interfere, so forgetting is visible.

    Returns
    -------
    avalanche benchmark
        Inputs of shape ``(N, n_features)``, targets in ``0..n_classes-1``.

    Examples
    --------
    >>> bm = synthetic(3)              # doctest: +SKIP
    >>> len(bm.train_stream[0].dataset)  # doctest: +SKIP
    256
    """
    n = check_int(n_experiences, "n_experiences")
    g = torch.Generator().manual_seed(int(seed))
    means = 2.0 * torch.randn(n_classes, n_features, generator=g)

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n_classes).repeat_interleave(per_class)
        x = means[y] + noise * torch.randn(y.shape[0], n_features, generator=g)
        return x, y

    train, test = [], []
    for i in range(n):
        rot = torch.eye(n_features) if i == 0 else torch.linalg.qr(torch.randn(n_features, n_features, generator=g))[0]
        (xtr, ytr), (xte, yte) = draw(train_per_class), draw(test_per_class)
        train.append((xtr @ rot, ytr))
        test.append((xte @ rot, yte))
    return benchmark_from_tensors(train, test)


#: Benchmarks by name, as used by ``python -m continual.compare --benchmark NAME``.
BENCHMARKS = {
    "rotated_mnist": rotated_mnist,
    "permuted_mnist": permuted_mnist,
    "split_mnist": split_mnist,
    "synthetic": synthetic,
}
