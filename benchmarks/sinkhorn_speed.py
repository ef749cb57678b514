"""Speed and memory of the Sinkhorn backward: implicit vs unrolled vs a dense KKT reference.

For each size ``n`` the same forward (``n_iter`` log-domain sweeps, no early stop) is followed by
a backward of ``sum(S * W)`` with

* ``implicit``  -- :func:`rebasin.matching.sinkhorn` with ``grad="implicit"`` (saves only ``S``; n x n Schur
  complement solved by conjugate gradient, Cholesky as fallback),
* ``implicit-cholesky`` -- the same with conjugate gradient switched off: the fallback path alone,
  i.e. forming the Schur complement and factorising it,
* ``unrolled``  -- ``grad="unrolled"`` (autograd through every iteration),
* ``dense``     -- written here: the same forward, and a backward that assembles the full
  ``(2n-1) x (2n-1)`` KKT system and calls ``torch.linalg.solve``.

Memory is reported as the bytes autograd saves for backward (``saved_tensors_hooks``), and on CUDA
also as the peak allocated during forward + backward above what was allocated before. Gradients
of ``implicit`` and ``unrolled`` are compared with the dense reference (max |diff| / max |ref|).

Run: ``python benchmarks/sinkhorn_speed.py [--device cuda] [--no-append]``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import append_report, machine_summary, markdown_table

import rebasin.matching.sinkhorn_op as sk


# ---------------------------------------------------------------------------- dense reference
class DenseSinkhorn(torch.autograd.Function):
    """Same forward as the implicit mode; backward by a dense solve of the (2n-1) KKT system."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tau: float, n_iter: int) -> Tensor:
        with torch.no_grad():
            s = sk._sinkhorn_log(x / tau, n_iter, None)[0].exp()
        ctx.save_for_backward(s)
        ctx.tau = tau
        return s

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (s,) = ctx.saved_tensors
        n = s.shape[-1]
        # gauge fixed by dropping the last column potential (v_n = 0) and its constraint
        k = s.new_zeros(2 * n - 1, 2 * n - 1)
        k[:n, :n] = torch.diag(s.sum(1))
        k[:n, n:] = s[:, : n - 1]
        k[n:, :n] = s[:, : n - 1].T
        k[n:, n:] = torch.diag(s.sum(0)[: n - 1])
        p = s * g
        sol = torch.linalg.solve(k, torch.cat([p.sum(1), p.sum(0)[: n - 1]]))
        alpha, beta = sol[:n], torch.cat([sol[n:], sol.new_zeros(1)])
        return (p - s * (alpha[:, None] + beta[None, :])) / ctx.tau, None, None


def run_method(method: str, x: Tensor, tau: float, n_iter: int) -> Tensor:
    if method == "dense":
        return DenseSinkhorn.apply(x, tau, n_iter)
    return sk.sinkhorn(x, tau=tau, n_iter=n_iter, tol=None, grad=method.split("-")[0])


class ForceCholesky:
    """Make the implicit backward skip conjugate gradient: its worst case (CG budget not spent)."""

    def __enter__(self) -> None:
        self._orig = sk._pcg
        sk._pcg = lambda matvec, rhs, *a, **k: (torch.zeros_like(rhs), False)

    def __exit__(self, *exc: Any) -> None:
        sk._pcg = self._orig


def timed(method: str, *args: Any, **kwargs: Any) -> tuple[float, float, Tensor]:
    if method == "implicit-cholesky":
        with ForceCholesky():
            return timed_run(method, *args, **kwargs)
    return timed_run(method, *args, **kwargs)


# ---------------------------------------------------------------------------- measurement
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SavedBytes:
    """``saved_tensors_hooks`` pair that adds up the bytes autograd saves for backward."""

    def __init__(self) -> None:
        self.total = 0

    def pack(self, t: Tensor) -> Tensor:
        self.total += t.numel() * t.element_size()
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t


def timed_run(
    method: str, x0: Tensor, w: Tensor, tau: float, n_iter: int, counter: SavedBytes | None = None
) -> tuple[float, float, Tensor]:
    """One forward + backward; returns (forward seconds, backward seconds, gradient).

    With ``counter``, the bytes the Sinkhorn forward saves for backward are added to it (the
    loss ``sum(S * W)`` saves its own operands, which are not counted).
    """
    device = x0.device
    x = x0.detach().clone().requires_grad_()
    sync(device)
    t0 = time.perf_counter()
    if counter is None:
        s = run_method(method, x, tau, n_iter)
    else:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            s = run_method(method, x, tau, n_iter)
    sync(device)
    t1 = time.perf_counter()
    (s * w).sum().backward()
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, x.grad.detach()


def measure_all(
    methods: list[str], x0: Tensor, w: Tensor, tau: float, n_iter: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Warm-up run per method (gradient, CUDA peak, saved bytes), then ``repeats`` rounds in which
    the methods take turns, so that load from other processes hits them alike; minimum times."""
    device = x0.device
    res: dict[str, dict[str, Any]] = {}
    for method in methods:
        peak = None
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        counter = SavedBytes()
        _, _, grad = timed(method, x0, w, tau, n_iter, counter)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
        saved = counter.total
        res[method] = {"fwd": float("inf"), "bwd": float("inf"), "saved": saved, "peak": peak, "grad": grad}
    for _ in range(repeats):
        for method in methods:
            f, b, _ = timed(method, x0, w, tau, n_iter)
            res[method]["fwd"] = min(res[method]["fwd"], f)
            res[method]["bwd"] = min(res[method]["bwd"], b)
    return res


def rel_max(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def ms(t: float) -> str:
    return f"{t * 1e3:.1f}"


class PathCounter:
    """Counts whether the implicit backward's conjugate gradient converged or fell back."""

    def __init__(self) -> None:
        self.cg_ok = 0
        self.cg_fail = 0
        self._orig = sk._pcg

    def __enter__(self) -> PathCounter:
        def pcg(*args: Any, **kwargs: Any) -> Any:
            x, ok = self._orig(*args, **kwargs)
            if ok:
                self.cg_ok += 1
            else:
                self.cg_fail += 1
            return x, ok

        sk._pcg = pcg
        return self

    def __exit__(self, *exc: Any) -> None:
        sk._pcg = self._orig

    def describe(self) -> str:
        if self.cg_ok and not self.cg_fail:
            return "CG"
        if self.cg_fail and not self.cg_ok:
            return "Cholesky"
        return "direct" if not (self.cg_ok or self.cg_fail) else "mixed"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--n-iter", type=int, default=20)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--scales", type=float, nargs="+", default=[2.0, 16.0],
                    help="std of the random logits; a large one makes S sharp (ill-conditioned backward)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (a quarter of them above n = 1024)")
    ap.add_argument("--max-dense-n", type=int, default=2048, help="skip the dense reference above this n")
    ap.add_argument("--max-unrolled-mib", type=float, default=512.0,
                    help="skip unrolled when its saved tensors would exceed this")
    ap.add_argument("--report", default=None, help="markdown file to append to (default docs/benchmarks.md)")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    elt = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    rows: list[list[object]] = []
    notes: list[str] = []
    header = ["scale", "n", "method", "fwd ms", "bwd ms", "saved MiB"]
    if device.type == "cuda":
        header.append("peak CUDA MiB")
    header += ["bwd speed-up vs dense", "max rel grad diff vs dense", "implicit solver"]

    for scale in args.scales:
        for n in args.sizes:
            x0 = (torch.randn(n, n, generator=gen, dtype=torch.float64) * scale).to(device, dtype)
            w = torch.randn(n, n, generator=gen, dtype=torch.float64).to(device, dtype)
            reps = args.repeats if n <= 1024 else max(1, args.repeats // 4)
            methods = []
            for method in ("implicit", "implicit-cholesky", "unrolled", "dense"):
                if method == "dense" and n > args.max_dense_n:
                    notes.append(f"dense reference skipped at n={n} (--max-dense-n {args.max_dense_n})")
                    continue
                est = 2 * n * n * elt * args.n_iter / 2**20  # two n x n tensors per sweep
                if method == "unrolled" and est > args.max_unrolled_mib:
                    notes.append(f"unrolled skipped at n={n}: ~{est:.0f} MiB of saved tensors")
                    continue
                methods.append(method)
            with PathCounter() as pc:
                res = measure_all(methods, x0, w, args.tau, args.n_iter, reps)
            path = pc.describe()
            dense = res.get("dense")
            for method, r in res.items():
                row: list[object] = [scale, n, method, ms(r["fwd"]), ms(r["bwd"]), mib(r["saved"])]
                if device.type == "cuda":
                    row.append(mib(r["peak"]))
                if dense is not None and method != "dense":
                    row += [f"{dense['bwd'] / r['bwd']:.1f}x", f"{rel_max(r['grad'], dense['grad']):.2e}"]
                else:
                    row += ["-", "-"]
                row.append(path if method == "implicit" else "Cholesky (forced)" if method == "implicit-cholesky" else "-")
                rows.append(row)
                print(" | ".join(str(v) for v in row), flush=True)

    # memory against n_iter at n = 512
    mem_rows: list[list[object]] = []
    n = 512
    x0 = (torch.randn(n, n, generator=gen, dtype=torch.float64) * args.scales[0]).to(device, dtype)
    w = torch.randn(n, n, generator=gen, dtype=torch.float64).to(device, dtype)
    for n_iter in (10, 50, 200):
        both = measure_all(["implicit", "unrolled"], x0, w, args.tau, n_iter, 0)
        row = [n_iter]
        for method in ("implicit", "unrolled"):
            row += [mib(both[method]["saved"])] + ([mib(both[method]["peak"])] if device.type == "cuda" else [])
        mem_rows.append(row)
        print(" | ".join(str(v) for v in row), flush=True)
    mem_header = ["n_iter"]
    for method in ("implicit", "unrolled"):
        mem_header += [f"{method} saved MiB"] + ([f"{method} peak CUDA MiB"] if device.type == "cuda" else [])

    total = time.perf_counter() - start
    table = markdown_table(header, rows) + "\n\nMemory against n_iter (n = 512):\n\n" + markdown_table(mem_header, mem_rows)
    text = (
        f"{machine_summary(device)}; device {device}, {args.dtype}, tau={args.tau}, n_iter={args.n_iter} "
        f"(fixed, no early stop), logits ~ N(0, scale^2); times are the minimum over repeats; "
        f"'implicit solver' says whether conjugate gradient converged or the Cholesky fallback ran. "
        f"'saved' counts what autograd keeps between forward and backward; on top of it the dense "
        f"backward builds the (2n-1)^2 KKT matrix ({(2 * max(args.sizes) - 1) ** 2 * elt / 2**20:.0f} MiB "
        f"at n={max(args.sizes)}) and factorises it, the implicit one only O(n) vectors when CG "
        f"converges and one n x n Schur matrix when it falls back. "
        f"Unrolled gradients differ from the dense reference where n_iter sweeps have not converged: "
        f"they are the gradient of the truncated loop, the others that of the limit. "
        f"Load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs. "
        f"Total run time {total:.0f} s."
        + ("\n\n" + "; ".join(dict.fromkeys(notes)) + "." if notes else "")
    )
    print(table)
    print(text)
    if not args.no_append:
        command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
        path = append_report(f"Sinkhorn backward: implicit vs unrolled vs dense ({device.type})", command, table,
                             notes=text, path=args.report)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
