"""Align two MLPs trained from different seeds; compare the naive and the aligned linear path.

Two MLPs (64-128-128-10) are trained on scikit-learn's 8x8 digits from different seeds. The straight
line between their weights crosses a loss barrier ("naive"); permuting B's hidden units with weight
matching first (Ainsworth et al., ICLR 2023) makes the line nearly flat.

    python examples/align_mlps.py            # about 10 s on 2 CPU cores
    python examples/align_mlps.py --tiny     # a few seconds (CI)

Prints the barriers; writes paths.png (loss and accuracy along both paths) and results.json to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import rebasin
from rebasin.apps.data import digits_loaders
from rebasin.apps.models import MLP
from rebasin.apps.training import fit_classifier_, seeded_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Naive vs weight-matched linear path between two MLPs.")
    parser.add_argument("--tiny", action="store_true", help="small settings that run in seconds (CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples_out/align_mlps", help="output folder")
    args = parser.parse_args(argv)
    width, epochs, points = (64, 8, 9) if args.tiny else (128, 30, 25)

    train, test = digits_loaders(batch_size=64, seed=args.seed)
    models = []
    for k in range(2):  # same data, different initialisation and batch order
        model = seeded_model(lambda: MLP(64, [width, width], 10), seed=args.seed + k)
        fit_classifier_(model, train, epochs=epochs, seed=args.seed + k, device=args.device)
        models.append(model)
    model_a, model_b = models

    # The spec (which permutation acts on which axis of which tensor) is traced from the model.
    spec = rebasin.spec_from_model(model_a, example_input=torch.zeros(1, 64, device=args.device))
    perms = rebasin.weight_matching(spec, model_a.state_dict(), model_b.state_dict(), seed=args.seed)
    state_b_aligned = rebasin.permute(spec, perms, model_b.state_dict())

    state_a = model_a.state_dict()
    paths = {
        "naive": rebasin.evaluate_path(model_a, rebasin.LinearPath(state_a, model_b.state_dict()), test, num_points=points),
        "weight matching": rebasin.evaluate_path(model_a, rebasin.LinearPath(state_a, state_b_aligned), test,
                                                  num_points=points),
    }
    results = {"test_accuracy": {"a": paths["naive"].accuracy[0], "b": paths["naive"].accuracy[-1]}}
    print(f"test accuracy: A {100 * results['test_accuracy']['a']:.2f}%, B {100 * results['test_accuracy']['b']:.2f}%")
    for name, path in paths.items():
        loss_barrier = rebasin.barrier(path, kind="max_minus_mean", metric="loss")
        acc_barrier = rebasin.barrier(path, kind="max_minus_mean", metric="accuracy")
        results[name] = {"loss_barrier": loss_barrier, "accuracy_barrier": acc_barrier, "path": path.as_dict()}
        print(f"{name:>16}: loss barrier {loss_barrier:.4f}, accuracy barrier {100 * acc_barrier:.2f} pts")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    rebasin.paths.plot_paths(paths, metric="loss", ax=axes[0], title="test loss")
    rebasin.paths.plot_paths(paths, metric="accuracy", ax=axes[1], title="test accuracy")
    fig.savefig(out / "paths.png", dpi=110)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'paths.png'} and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
