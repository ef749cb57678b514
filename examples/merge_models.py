"""Merge four independently trained MLPs into one model with ``rebasin.merge``.

Averaging the weights of networks trained from different seeds destroys them ("naive" average).
``rebasin.merge`` aligns every model into the first one's basin with weight matching (re-aligning each
to the average of the others until the permutations settle), averages the aligned weights and REPAIRs
the channel statistics of the average. Its info reports on that merge only (rounds, time, the merged
model's test accuracy); ``rebasin.compare_merge`` then measures, explicitly, the baselines: each input
model, the naive and the aligned averages, and the output ensemble (which costs N forward passes).

    python examples/merge_models.py            # about 10 s on 2 CPU cores
    python examples/merge_models.py --tiny     # a few seconds (CI)

Prints the accuracies; writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import rebasin
from rebasin.apps.data import digits_loaders
from rebasin.apps.models import MLP
from rebasin.apps.training import evaluate, fit_classifier_, seeded_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Merge several models into one basin.")
    parser.add_argument("--tiny", action="store_true", help="small settings that run in seconds (CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", type=int, default=4, help="how many models to merge")
    parser.add_argument("--out", default="examples_out/merge_models", help="output folder")
    args = parser.parse_args(argv)
    width, epochs = (64, 6) if args.tiny else (256, 30)

    train, test = digits_loaders(batch_size=64, seed=args.seed)
    models = []
    for k in range(args.models):
        model = seeded_model(lambda: MLP(64, [width, width], 10), seed=args.seed + k)
        models.append(fit_classifier_(model, train, epochs=epochs, seed=args.seed + k, device=args.device))

    merged, info = rebasin.merge(models, method="weight_matching", loader=train, eval_loader=test,
                                 seed=args.seed, return_info=True)
    print(f"{len(models)} MLPs 64-{width}-{width}-10; alignment rounds {info.rounds} "
          f"(converged: {info.converged}), {info.time_s:.2f} s; merged test accuracy {100 * info.accuracy:.2f}%")
    comparison = rebasin.compare_merge(models, merged, info, test, loader=train)  # the baselines, on request
    acc = comparison.accuracy
    print("individual models:  " + ", ".join(f"{100 * a:.2f}%" for a in acc["models"]))
    rows = {"naive": "naive average", "naive_repair": "naive average + REPAIR", "aligned_average": "aligned average",
            "merged": "merged (aligned + REPAIR)", "ensemble": "ensemble of outputs"}
    for key, label in rows.items():
        print(f"{label:>26}: {100 * acc[key]:.2f}%")
    # ``merged`` is an ordinary module (a copy of models[0] holding the merged weights).
    print(f"merged module's own test accuracy: {100 * evaluate(merged, test)[1]:.2f}%")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"accuracy": acc, "loss": comparison.loss, "rounds": info.rounds}, indent=2))
    print(f"wrote {out / 'results.json'}")
    return acc


if __name__ == "__main__":
    main()
