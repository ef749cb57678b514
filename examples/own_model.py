"""Re-basin your own nn.Module: a traced spec, its check, alignment, and a manual spec where tracing stops.

1. ``TinyResNet`` (written here, with a custom ``forward``: conv + BatchNorm stem, a residual block,
   max-pool, Flatten -> Linear) is traced by ``rebasin.spec_from_model``; ``spec.check`` confirms that
   permuting the weights as the spec says leaves the outputs unchanged; two copies trained from
   different seeds on the 8x8 digits are aligned with ``rebasin.align`` and the linear paths compared
   (BatchNorm statistics recomputed at every point, as a BN net needs).
2. ``TwoBranch`` concatenates two conv branches with ``torch.cat``: the traced spec says so with a
   concatenation (``spec.concat``), and weight matching undoes a hidden permutation of it exactly.
3. ``EinsumMix`` mixes channels with ``torch.einsum``, which the tracer cannot prove safe: it pins the
   units the einsum touches (one warning names them by module path and source line) and keeps the rest
   permutable; ``strict=True`` raises ``RebasinError`` instead. A hand-written ``PermutationSpec`` says
   the same by hand.

    python examples/own_model.py            # about 15 s on 2 CPU cores
    python examples/own_model.py --tiny     # a few seconds (CI)

Prints the spec, the barriers and the error; writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import rebasin
from rebasin.apps.data import digits_loaders
from rebasin.apps.training import fit_classifier_, seeded_model


class TinyResNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))  # the residual add ties conv2's channels to the stem's
        return self.fc(torch.flatten(F.max_pool2d(x, 2), 1))  # Flatten of C x 4 x 4 -> Linear


class TwoBranch(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.branch3 = nn.Conv2d(1, width, 3, padding=1)
        self.branch5 = nn.Conv2d(1, width, 5, padding=2)
        self.conv = nn.Conv2d(2 * width, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.relu(self.branch3(x)), F.relu(self.branch5(x))], dim=1)
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class EinsumMix(TwoBranch):
    """TwoBranch with a channel mix written as an einsum over a raw weight tensor (read from its equation)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__(width)
        self.mix = nn.Parameter(torch.randn(2 * width, 2 * width) / (2 * width) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.relu(self.branch3(x)), F.relu(self.branch5(x))], dim=1)
        x = torch.einsum("oc,nchw->nohw", self.mix, x)
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class CumsumMix(TwoBranch):
    """TwoBranch with a cumulative sum over the channels: an op no rule proves safe for a permutation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.relu(self.branch3(x)), F.relu(self.branch5(x))], dim=1).cumsum(dim=1)
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Trace, check and align a user-defined model.")
    parser.add_argument("--tiny", action="store_true", help="small settings that run in seconds (CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples_out/own_model", help="output folder")
    args = parser.parse_args(argv)
    width, epochs, points = (8, 3, 5) if args.tiny else (32, 10, 11)

    train, test = digits_loaders(batch_size=64, seed=args.seed, flatten=False)  # images (N, 1, 8, 8)
    x = next(iter(test))[0].to(args.device)
    models = [seeded_model(lambda: TinyResNet(width), seed=args.seed + k).to(args.device) for k in range(2)]

    spec = rebasin.spec_from_model(models[0], example_input=x[:2])
    print(spec)
    for key, axes in spec.axes.items():
        print(f"  {key:<24} {axes}")
    print(f"  blocks (Flatten -> Linear, channel-major): {dict(spec.blocks)}")
    print(f"spec.check: max output change under a random permutation {spec.check(models[0], x):.2e}")

    for k, model in enumerate(models):
        fit_classifier_(model, train, epochs=epochs, seed=args.seed + k)
    results = {"spec_perms": dict(spec.sizes)}
    for method in ("identity", "weight_matching"):  # "identity" = no alignment (naive)
        aligned = rebasin.align(models[0], models[1], method=method, spec=spec, seed=args.seed)
        line = rebasin.LinearPath(models[0].state_dict(), aligned.state_b)
        path = rebasin.evaluate_path(models[0], rebasin.BNResetPath(line, models[0], train), test, num_points=points)
        results[method] = rebasin.barrier(path, metric="loss")
        print(f"{method:>16}: loss barrier {results[method]:.4f} (BN statistics reset along the path)")

    # torch.cat of two permuted branches: a concatenation of the branches' permutations.
    net = seeded_model(TwoBranch, seed=args.seed).to(args.device)
    cat_spec = rebasin.spec_from_model(net, x[:2])
    print(f"TwoBranch: conv.weight {cat_spec.axes['conv.weight']}, concat {dict(cat_spec.concat)}")
    results["cat_concat"] = {k: [list(p) for p in v] for k, v in cat_spec.concat.items()}
    hidden = rebasin.random_permutation(cat_spec, seed=args.seed + 1)
    shuffled = rebasin.permute(cat_spec, hidden, net.state_dict())
    found = rebasin.weight_matching(cat_spec, net.state_dict(), shuffled)
    results["cat_recovered"] = all(
        torch.equal(v, net.state_dict()[k]) for k, v in rebasin.permute(cat_spec, found, shuffled).items())
    print(f"TwoBranch: weight matching undoes a random permutation exactly: {results['cat_recovered']}")

    # An einsum is read from its equation: the raw weight's "o" axis is a new permutation, its "c" axis takes
    # the concatenation's; the whole model stays permutable.
    net = seeded_model(EinsumMix, seed=args.seed).to(args.device)
    ein_spec = rebasin.spec_from_model(net, x[:2])
    print(f"EinsumMix: mix {ein_spec.axes['mix']}, {ein_spec.coverage.summary().splitlines()[0]}")
    results["einsum_coverage"] = ein_spec.coverage.as_dict()

    # A cumulative sum over the channels: the tracer cannot prove it safe. By default it pins the units it
    # touches to the identity (one warning names them by module path and source line) and keeps the rest
    # permutable; spec.coverage counts both. strict=True refuses instead.
    net = seeded_model(CumsumMix, seed=args.seed).to(args.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", rebasin.RebasinWarning)
        pinned = rebasin.spec_from_model(net, x[:2])
    for w in caught:
        print(f"RebasinWarning: {w.message}")
    print(pinned.coverage.summary())
    results["cumsum_coverage"] = pinned.coverage.as_dict()
    try:
        rebasin.spec_from_model(net, x[:2], strict=True)
    except rebasin.RebasinError as err:
        print(f"RebasinError: {err}")
        results["cumsum_error"] = str(err)
    # Manual spec: keep the branch channels (and so the cumulative sum's axis) fixed, permute the rest.
    manual = rebasin.PermutationSpec({
        "branch3.weight": (None, None, None, None), "branch3.bias": (None,),
        "branch5.weight": (None, None, None, None), "branch5.bias": (None,),
        "conv.weight": ("P", None, None, None), "conv.bias": ("P",),
        "bn.weight": ("P",), "bn.bias": ("P",), "bn.running_mean": ("P",), "bn.running_var": ("P",),
        "bn.num_batches_tracked": (), "fc.weight": (None, "P"), "fc.bias": (None,),
    })
    print(f"manual spec.check: max output change {manual.check(net, x):.2e}")
    # With it, everything works as before; e.g. weight matching recovers a hidden permutation exactly.
    hidden = rebasin.random_permutation(manual, seed=args.seed + 1, sizes=manual.validate(net.state_dict()))
    shuffled = rebasin.permute(manual, hidden, net.state_dict())
    found = rebasin.weight_matching(manual, net.state_dict(), shuffled)
    recovered = all(torch.equal(v, net.state_dict()[k]) for k, v in rebasin.permute(manual, found, shuffled).items())
    results["manual_recovered"] = recovered
    print(f"manual spec: weight matching undoes a random permutation exactly: {recovered}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
