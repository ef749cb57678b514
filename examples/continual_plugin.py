"""Continual learning with Avalanche: plain fine-tuning (Naive) vs Naive + ``RebasinMergePlugin``.

After each experience the plugin aligns the previous experience's model to the freshly trained one
(weight matching) and moves the model to a point on the straight line between them, choosing the
weight on samples it held out of every experience (not trained on). Fine-tuning alone forgets the old tasks.

The benchmark is built offline: Rotated digits (scikit-learn's 8x8 digits, experience ``i`` rotated by
``90 * i / (n - 1)`` degrees), or Rotated MNIST over the same angles on a subset of the images when
--data-root (default: $REBASIN_DATA) names a folder holding MNIST/raw.

    python examples/continual_plugin.py            # about 15 s on 2 CPU cores (Avalanche imports slowly)
    python examples/continual_plugin.py --tiny     # about 10 s (CI)

Prints the average test accuracy over all experiences after the last one; writes results.json to --out.
Needs the ``continual`` extra (avalanche-lib).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from rebasin.apps.data import MNIST_MEAN, MNIST_STD, digits_tensors
from rebasin.apps.models import MLP
from rebasin.apps.training import seeded_model

warnings.filterwarnings("ignore", message="No loggers specified")  # we print the numbers ourselves
warnings.filterwarnings("ignore", category=DeprecationWarning)


def rotated_digits(angles: list[float], seed: int):
    """One experience per angle; the digits are normalised like MNIST so that ``rotate_images`` applies."""
    from continual.benchmarks import benchmark_from_tensors, rotate_images

    x, y = digits_tensors()
    x = ((x - MNIST_MEAN) / MNIST_STD).reshape(-1, 1, 8, 8)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:400], order[400:]
    return benchmark_from_tensors([(rotate_images(x[train], a), y[train]) for a in angles],
                                  [(rotate_images(x[test], a), y[test]) for a in angles])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Avalanche Naive vs Naive + RebasinMergePlugin.")
    parser.add_argument("--tiny", action="store_true", help="small settings that run in seconds (CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=os.environ.get("REBASIN_DATA") or None,
                        help="folder holding MNIST/raw for Rotated MNIST (default: $REBASIN_DATA; else digits)")
    parser.add_argument("--out", default="examples_out/continual_plugin", help="output folder")
    args = parser.parse_args(argv)
    n_exp, epochs, width = (4, 2, 128) if args.tiny else (6, 5, 256)
    angles = [90.0 * i / (n_exp - 1) for i in range(n_exp)]

    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from continual import AlphaPolicy, RebasinMergePlugin
    from continual.benchmarks import rotated_mnist

    if args.data_root:
        n_train = 1000 if args.tiny else 2000
        bench = rotated_mnist(args.data_root, seed=args.seed, angles=angles, train_samples=n_train, test_samples=1000)
        in_features, name = 784, f"Rotated MNIST, {n_exp} experiences of {n_train} training images"
    else:
        bench = rotated_digits(angles, args.seed)
        in_features, name = 64, f"Rotated digits, {n_exp} experiences"
    print(f"benchmark: {name}, rotations {[round(a) for a in angles]} degrees; MLP {in_features}-{width}-10")

    results = {"benchmark": name}
    for label in ("naive", "naive + rebasin merge"):
        model = seeded_model(lambda: MLP(in_features, [width], 10), seed=args.seed)
        plugins = []
        if label != "naive":
            # Naive has no replay buffer for the default to fold, so alpha=AlphaPolicy(): weight matching, and
            # the weight of the new model chosen at every merge on samples the plugin held out of each
            # experience (not trained on, kept), every task counting the same.
            plugins.append(RebasinMergePlugin(model=model, example_input=torch.zeros(1, in_features),
                                              alpha=AlphaPolicy(), seed=args.seed))
        strategy = Naive(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), criterion=nn.CrossEntropyLoss(),
            train_mb_size=64, train_epochs=epochs, eval_mb_size=500, device=args.device, plugins=plugins,
            evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
        )
        torch.manual_seed(args.seed)  # the same batch order for both runs
        for experience in bench.train_stream:
            strategy.train(experience)
        metrics = strategy.eval(bench.test_stream)
        results[label] = float(metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"])
        line = f"{label:>22}: average accuracy over all experiences {100 * results[label]:.2f}%"
        if plugins:
            results["alphas"] = [record.alpha for record in plugins[0].history]
            line += f"  (weight of the new model at each merge: {[round(a, 2) for a in results['alphas']]})"
        print(line)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
