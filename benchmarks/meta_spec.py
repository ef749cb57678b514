"""Memory and time of ``spec_from_model`` on a model built under ``torch.device("meta")`` vs the same model on CPU.

The model is ``nn.Sequential`` of ``depth`` ``Linear(width, width) + ReLU`` layers and a last ``Linear``
(defaults: 48 layers, 1024 wide, about 200 MB of float32 weights). Each variant runs in its own fresh
Python process, so its peak resident memory is its own:

* ``meta``: the model is built under ``torch.device("meta")`` and traced from a bare shape (the functional
  check, which needs values, is skipped);
* ``meta, no warm-up``: the same as the first thing a fresh process does, so the one-time lazy imports of
  torch's Python meta kernels are counted (every other row first traces a tiny model of its kind);
* ``cpu, check=False``: the model on CPU, traced without the functional check;
* ``cpu, default``: the model on CPU, traced with the default ``check=True`` (runs the model twice, on the
  weights and on a permuted copy of them).

Columns: ``build s`` (constructing the model), ``spec s`` (``spec_from_model``), ``peak RSS growth MB``
(``VmHWM`` from ``/proc/self/status`` after the spec minus before building the model, both read after the
imports), ``same spec`` (the spec equals the CPU one, sizes included).

Run ``python benchmarks/meta_spec.py`` (a few seconds); ``--depth``/``--width`` change the model,
``--no-report`` skips writing the section of docs/benchmarks.md. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("meta", "meta, no warm-up", "cpu, check=False", "cpu, default")


def peak_rss_mb() -> float:
    """``VmHWM`` (peak resident set size) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(variant: str, depth: int, width: int) -> dict[str, object]:
    """Build the model and trace its spec in this process; the numbers as a dict."""
    import torch
    from torch import nn

    import rebasin

    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(width, 10))

    def tiny() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    if variant != "meta, no warm-up":
        # warm-up on a tiny model of the same kind: one-time lazy imports (torch.fx, torch's Python meta
        # kernels) are paid here, not in the numbers
        with torch.device("meta") if variant == "meta" else torch.device("cpu"):
            small = tiny()
        rebasin.spec_from_model(small, (2, 4), check=(variant == "cpu, default"))
    before = peak_rss_mb()
    t0 = time.perf_counter()
    if variant.startswith("meta"):
        with torch.device("meta"):
            model = build()
    else:
        model = build()
    t1 = time.perf_counter()
    spec = rebasin.spec_from_model(model, (2, width), check=(variant == "cpu, default"))
    t2 = time.perf_counter()
    after = peak_rss_mb()
    return {
        "variant": variant,
        "build_s": t1 - t0,
        "spec_s": t2 - t1,
        "rss_mb": after - before,
        "axes": repr(sorted(spec.axes.items())),
        "sizes": repr(sorted(dict(spec.sizes or {}).items())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=48)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.depth, args.width)))
        return

    from _report import append_report, machine_summary, markdown_table

    results = {}
    for variant in VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant, "--depth", str(args.depth), "--width", str(args.width)],
            check=True, capture_output=True, text=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = results["cpu, default"]
    weights_mb = ((args.depth * (args.width + 1) * args.width) + (args.width + 1) * 10) * 4 / 2**20
    rows = [[v, f"{r['build_s']:.3f}", f"{r['spec_s']:.3f}", f"{r['rss_mb']:.1f}",
             "yes" if (r["axes"], r["sizes"]) == (ref["axes"], ref["sizes"]) else "NO"]
            for v, r in results.items()]
    table = markdown_table(["model", "build s", "spec s", "peak RSS growth MB", "same spec"], rows)
    print(table)
    if not args.no_report:
        command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
        notes = (f"MLP of {args.depth} Linear({args.width}, {args.width}) + ReLU layers and a Linear({args.width}, 10): "
                 f"{weights_mb:.0f} MB of float32 weights. Each row runs in a fresh process; peak RSS growth = "
                 "VmHWM after the spec minus VmHWM before building the model. Machine: " + machine_summary() + ".")
        path = append_report(f"Specs without weights: spec_from_model on meta ({args.depth}x{args.width} MLP)",
                             command, table, notes=notes)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
