"""Your own model, for the command-line walk-through (docs/walkthrough.md).

What ``rebasin align`` / ``path`` / ``merge`` need from your code is two kinds of factory, each a function
without arguments that ``--model`` / ``--data`` name as ``module:function``:

* ``mlp()`` builds the network (an untrained one: the command loads your checkpoint into it);
* ``train_loader()`` and ``test_loader()`` return loaders of ``(inputs, targets)`` batches.

Run as a script, it trains one network and saves its ``state_dict``, the checkpoint the commands read:

    python mynet.py --seed 0 -o checkpoints/A.pt
    python mynet.py --seed 1 -o checkpoints/B.pt

The data are scikit-learn's 8x8 digits (bundled with scikit-learn, nothing is downloaded), split once
with a fixed seed, so every factory call returns the same split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def mlp() -> nn.Module:
    """The architecture: 64 -> 128 -> 128 -> 10 with ReLUs."""
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(),
        nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


def _split() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = order[:450], order[450:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def train_loader(seed: int = 0) -> DataLoader:
    """Shuffled training batches of 64 (the shuffle is seeded: same seed, same batches)."""
    return DataLoader(_split()[0], batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))


def test_loader() -> DataLoader:
    """The 450 held-out digits, in batches of 256."""
    return DataLoader(_split()[1], batch_size=256)


def train(seed: int, epochs: int) -> nn.Module:
    """An ``mlp()`` trained with Adam from initialisation ``seed``."""
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = train_loader(seed)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description="Train mlp() on the digits and save its state_dict.")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training data")
    parser.add_argument("-o", "--output", required=True, help="where to save the state_dict")
    args = parser.parse_args()
    model = train(args.seed, args.epochs)
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_loader())
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.output)
    print(f"test accuracy {100 * correct / 450:.2f}% -> {args.output}")


if __name__ == "__main__":
    main()
