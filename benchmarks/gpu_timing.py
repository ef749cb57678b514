"""Weight matching and the Sinkhorn forward + backward timed on the CPU and, when one is present, on a GPU.

Rows:

* ``weight_matching``: two independent random MLPs 784-w-w-w-10 (``w`` in ``--widths``), the states on the
  device, :func:`rebasin.weight_matching` with ``seed=0`` and at most ``--wm-iter`` sweeps. ``agrees``: the
  permutations are identical to the CPU run's.
* ``sinkhorn``: a batch of ``--batch`` random ``n x n`` logit matrices (``n`` in ``--sizes``),
  :func:`rebasin.matching.sinkhorn` with ``grad="implicit"``, ``--sk-iter`` log-domain sweeps (no early stop),
  then the backward of ``sum(S * W)``. ``agrees``: the gradient's max |diff| / max |CPU gradient|.

Times are medians over ``--repeats`` runs after one warm-up run (the first CUDA call pays for kernel loading);
every timed region is bracketed by ``torch.cuda.synchronize()`` on CUDA, so asynchronous kernels are counted.
Without a GPU the script prints the CPU rows and says that CUDA is unavailable.

Run: ``python benchmarks/gpu_timing.py`` (defaults: widths 512 1024 2048, sizes 256 512 1024, batch 4, 3
repeats); ``--no-report`` to leave docs/benchmarks.md alone, ``--report-file PATH`` to write the section
elsewhere.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import append_report, machine_summary, markdown_table

from rebasin import spec_from_model, weight_matching
from rebasin.apps.models import MLP
from rebasin.matching import sinkhorn

TITLE = "GPU next to CPU: weight matching and the Sinkhorn backward (gpu_timing)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of one ``fn()`` (synchronised before and after on CUDA) and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds over ``repeats`` runs after one untimed warm-up, and the last result."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        t, out = timed(fn, device)
        times.append(t)
    return statistics.median(times), out


# ---------------------------------------------------------------------------------------- weight matching
def mlp_states(width: int) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]:
    def make(seed: int) -> MLP:
        torch.manual_seed(seed)
        return MLP(784, [width] * 3, 10)

    a, b = make(0), make(1)
    spec = spec_from_model(a, torch.randn(2, 784))
    return spec, a.state_dict(), b.state_dict()


def time_weight_matching(width: int, device: torch.device, repeats: int, n_iter: int) -> tuple[float, dict[str, Tensor]]:
    spec, sa, sb = mlp_states(width)
    da = {k: v.to(device) for k, v in sa.items()}
    db = {k: v.to(device) for k, v in sb.items()}
    return median_time(lambda: weight_matching(spec, da, db, seed=0, n_iter=n_iter), device, repeats)


# ---------------------------------------------------------------------------------------- Sinkhorn
def time_sinkhorn(n: int, batch: int, device: torch.device, repeats: int, n_iter: int,
                  tau: float) -> tuple[float, float, Tensor]:
    """Median forward and backward seconds, and the gradient (on the CPU)."""
    g = torch.Generator().manual_seed(n)
    x0 = (2.0 * torch.randn(batch, n, n, generator=g)).to(device)
    w = torch.randn(batch, n, n, generator=g).to(device)

    def run() -> tuple[float, float, Tensor]:
        x = x0.detach().clone().requires_grad_()
        t_fwd, s = timed(lambda: sinkhorn(x, tau=tau, n_iter=n_iter, tol=None, grad="implicit", warn=False), device)
        t_bwd, _ = timed(lambda: (s * w).sum().backward(), device)
        return t_fwd, t_bwd, x.grad.detach()

    run()  # warm-up
    runs = [run() for _ in range(repeats)]
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[-1][2].cpu())


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wm-iter", type=int, default=8, help="weight matching's sweep cap")
    parser.add_argument("--sk-iter", type=int, default=50, help="Sinkhorn sweeps (no early stop)")
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--report-file", type=Path, default=None, help="write the section to this file instead")
    args = parser.parse_args(argv)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    else:
        print("CUDA is unavailable on this machine: CPU rows only.", flush=True)

    header = ["benchmark", "size", "device", "forward s", "backward s", "total s", "CPU / device", "agrees with CPU"]
    rows: list[list[object]] = []
    for width in args.widths:
        ref: dict[str, Tensor] | None = None
        cpu_s = float("nan")
        for device in devices:
            sec, perms = time_weight_matching(width, device, args.repeats, args.wm_iter)
            if ref is None:
                ref, cpu_s, agrees = perms, sec, "(reference)"
            else:
                agrees = "identical perms" if all(torch.equal(perms[k].cpu(), ref[k].cpu()) for k in ref) else "DIFFERENT"
            rows.append([f"weight_matching MLP 784-{width}x3-10", width, device.type, "", "", sec, cpu_s / sec, agrees])
            print(markdown_table(header, rows[-1:]).splitlines()[-1], flush=True)
    for n in args.sizes:
        grad_ref: Tensor | None = None
        cpu_s = float("nan")
        for device in devices:
            fwd, bwd, grad = time_sinkhorn(n, args.batch, device, args.repeats, args.sk_iter, args.tau)
            if grad_ref is None:
                grad_ref, cpu_s, agrees = grad, fwd + bwd, "(reference)"
            else:
                rel = float((grad - grad_ref).abs().max() / grad_ref.abs().max().clamp_min(1e-30))
                agrees = f"grad rel. diff {rel:.1e}"
            rows.append([f"sinkhorn fwd+bwd, batch {args.batch}", n, device.type, fwd, bwd, fwd + bwd,
                         cpu_s / (fwd + bwd), agrees])
            print(markdown_table(header, rows[-1:]).splitlines()[-1], flush=True)
    if len(devices) == 1:
        for width in args.widths:
            rows.append([f"weight_matching MLP 784-{width}x3-10", width, "cuda", "", "", "not run", "", "no GPU here"])
        for n in args.sizes:
            rows.append([f"sinkhorn fwd+bwd, batch {args.batch}", n, "cuda", "not run", "not run", "not run", "",
                         "no GPU here"])

    table = markdown_table(header, rows)
    print()
    print(table)
    gpu = "GPU: " + (torch.cuda.get_device_name(devices[1]) if len(devices) > 1 else
                     "none — CUDA is unavailable on this machine, so the CUDA rows were not run here")
    notes = (
        f"Machine: {machine_summary('cpu')}. {gpu}.\n"
        f"Weight matching: two independent random MLPs, at most {args.wm_iter} sweeps, seed 0, states on the device. "
        f"Sinkhorn: `grad=\"implicit\"`, {args.sk_iter} sweeps without early stop, tau {args.tau}, backward of "
        f"`sum(S * W)`. Medians of {args.repeats} runs after a warm-up; CUDA timings bracketed by "
        "`torch.cuda.synchronize()`. `CPU / device`: the CPU time over this row's time (the speed-up on the GPU)."
    )
    if not args.no_report:
        command = "python benchmarks/gpu_timing.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        path = append_report(TITLE, command.strip(), table, notes=notes, path=args.report_file)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
