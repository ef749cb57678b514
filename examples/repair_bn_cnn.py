"""REPAIR and BatchNorm-statistics reset on the linear path between two BatchNorm CNNs.

Averaging two aligned networks shrinks the spread of their hidden units ("variance collapse"; Jordan
et al., ICLR 2023). In a BatchNorm net the interpolated running statistics are wrong as well, so the
plain aligned path looks worse than it need be. Two fixes, both measured on the training data:

* reset BN: recompute the BatchNorm running statistics at every point (``BNResetPath``);
* REPAIR: give every permuted channel the interpolated endpoint mean and std
  (``RepairedPath``) -- BN channels by the reset, the BN-free hidden Linear of the
  classifier by folding a per-channel affine correction into its weights.

Two VGG-style CNNs (conv-BN-ReLU x 2 with max-pools, a hidden Linear, on the 8x8 digits as 1x8x8
images) are trained from different seeds and aligned with weight matching.

    python examples/repair_bn_cnn.py            # about 15 s on 2 CPU cores
    python examples/repair_bn_cnn.py --tiny     # a few seconds (CI)

Prints the loss barrier of each path; writes paths.png and results.json to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import rebasin
from rebasin.apps.data import digits_loaders
from rebasin.apps.models import VGG
from rebasin.apps.training import fit_classifier_, seeded_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Naive vs aligned vs BN-reset vs REPAIR barriers for a BN CNN.")
    parser.add_argument("--tiny", action="store_true", help="small settings that run in seconds (CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples_out/repair_bn_cnn", help="output folder")
    args = parser.parse_args(argv)
    width, epochs, points = (0.5, 4, 5) if args.tiny else (1.0, 15, 11)

    train, test = digits_loaders(batch_size=64, seed=args.seed, flatten=False)  # (N, 1, 8, 8)

    def factory():
        return VGG([32, "M", 64, "M"], in_channels=1, batch_norm=True, width=width, image_size=8,
                   classifier_hidden=[64])

    models = [seeded_model(factory, seed=args.seed + k) for k in range(2)]
    for k, model in enumerate(models):
        fit_classifier_(model, train, epochs=epochs, seed=args.seed + k, device=args.device)
    model_a, model_b = models
    example = torch.zeros(2, 1, 8, 8, device=args.device)  # for tracing the spec
    aligned = rebasin.align(model_a, model_b, method="weight_matching", example_input=example, seed=args.seed)
    state_a = model_a.state_dict()

    def path(how):
        return rebasin.evaluate_path(model_a, how, test, num_points=points)

    def reset_bn(state_b):
        return rebasin.BNResetPath(rebasin.LinearPath(state_a, state_b), model_a, train)

    paths = {
        "naive": path(rebasin.LinearPath(state_a, model_b.state_dict())),
        "naive + reset BN": path(reset_bn(model_b.state_dict())),
        "aligned": path(rebasin.LinearPath(state_a, aligned.state_b)),
        "aligned + reset BN": path(reset_bn(aligned.state_b)),
        "aligned + REPAIR": path(rebasin.RepairedPath(model_a, state_a, aligned.state_b, train, spec=aligned.spec)),
    }
    results = {}
    for name, result in paths.items():
        mid = len(result.t) // 2
        results[name] = {"loss_barrier": result.barrier(metric="loss"), "midpoint_accuracy": result.accuracy[mid]}
        print(f"{name:>20}: loss barrier {results[name]['loss_barrier']:.4f}, "
              f"midpoint accuracy {100 * result.accuracy[mid]:.2f}%")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig = rebasin.paths.plot_paths(paths, metric="loss", title="test loss, VGG-BN on 8x8 digits")
    fig.savefig(out / "paths.png", dpi=110)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'paths.png'} and {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
