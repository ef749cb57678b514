"""Speed of ``continual.benchmarks`` against a plain Avalanche dataset over pre-transformed tensors.

Both sides train Avalanche's stock ``Naive`` (MLP 784-256-10, AdamW 1e-3, stock loaders) on the same
rotated-MNIST tensors, one epoch per experience, and evaluate on the whole test stream after each
experience, as ``python -m continual.compare`` does:

* ``continual``: :func:`continual.benchmarks.rotated_mnist` (what ``continual.compare`` uses);
* ``plain``: an ``AvalancheDataset`` over a ``torch.utils.data.TensorDataset(x, y, task_label)`` per
  experience, handed to ``benchmark_from_datasets`` (the floor: no transform groups, no per-item data
  attributes).

``ratio = continual / plain``. The tensors are built once and shared, so the numbers are data loading
plus training plus evaluation only. Run::

    OMP_NUM_THREADS=1 python benchmarks/continual_speed.py --data-root ../shared/data --experiences 5
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn


def plain_benchmark(bm):
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset
    from torch.utils.data import TensorDataset

    def wrap(stream):
        out = []
        for exp in stream:
            ds = exp.dataset
            x = torch.stack([ds[i][0] for i in range(len(ds))]) if not hasattr(ds, "tensors") else ds.tensors[0]
            y = torch.as_tensor(list(ds.targets))
            out.append(AvalancheDataset([TensorDataset(x, y, torch.zeros_like(y))]))
        return out

    return benchmark_from_datasets(train=wrap(bm.train_stream), test=wrap(bm.test_stream))


def time_naive(bm, *, batch_size: int, epochs: int, seed: int) -> float:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from continual.baselines import mlp

    torch.manual_seed(seed)
    model = mlp(784, 256, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
        strategy = Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), 1e-3),
                         criterion=nn.CrossEntropyLoss(), train_mb_size=batch_size, train_epochs=epochs,
                         eval_mb_size=1000, evaluator=evaluator)
        start = time.perf_counter()
        for exp in bm.train_stream:
            strategy.train(exp)
            strategy.eval(bm.test_stream)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", required=True)
    p.add_argument("--experiences", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from continual.benchmarks import rotated_mnist

    t0 = time.perf_counter()
    bm = rotated_mnist(args.data_root, args.experiences)
    built = time.perf_counter() - t0
    plain = plain_benchmark(bm)
    ours = [time_naive(bm, batch_size=args.batch_size, epochs=args.epochs, seed=0) for _ in range(args.repeats)]
    floor = [time_naive(plain, batch_size=args.batch_size, epochs=args.epochs, seed=0) for _ in range(args.repeats)]
    print(f"rotated_mnist {args.experiences} experiences built in {built:.1f} s; Naive, batch {args.batch_size}, "
          f"{args.epochs} epoch(s), torch threads {torch.get_num_threads()}")
    print(f"continual {min(ours):.1f} s  plain {min(floor):.1f} s  ratio {min(ours) / min(floor):.2f}")


if __name__ == "__main__":
    main()
