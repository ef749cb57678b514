"""Peak memory and time of weight matching from checkpoints on disk, against the in-memory run.

Two independently initialised ``nn.Sequential(Linear(w, w), ReLU, ...)`` MLPs (``--depth`` layers of
width ``--width``; defaults 48 x 1024, about 200 MB each in float32) are written as ``.safetensors``
files to a temporary folder. Each measurement then runs in a fresh Python subprocess, so that its
peak resident memory (``VmHWM`` of ``/proc/self/status``) is its own:

* ``in memory``: both checkpoints read into dicts (``dict(open_checkpoint(path))``), then
  :func:`rebasin.weight_matching` on the dicts (the cached, low-rank engine);
* ``lazy``: :func:`rebasin.weight_matching` on the two :class:`rebasin.spec.Checkpoint` mappings (the
  engine that reads one tensor of each model at a time);
* ``save_permuted``: the lazy run's permutations applied to B and streamed to a new ``.safetensors``
  file by :func:`rebasin.save_permuted`.

``peak growth`` is ``VmHWM`` at the end minus ``VmRSS`` after the imports and the spec (the peak is
reset there through ``/proc/self/clear_refs`` where the kernel allows it); ``time`` includes reading
the files. ``same perms`` compares each run's permutations with the in-memory run's.

Run ``OMP_NUM_THREADS=2 python benchmarks/checkpoint_memory.py`` (two independent models do not converge
within the default 100 sweeps; 4 to 8 minutes on 2 cores); ``--n-iter 3`` caps both runs at 3 sweeps (about
a minute); ``--no-report`` skips writing the section of docs/benchmarks.md.

``--gpt2`` measures a transformer instead (needs ``transformers``): two random ``GPT2LMHeadModel(GPT2Config())``
(12 layers, width 768, 12 heads; ``--n-positions`` 64), the spec traced from model A by
:func:`rebasin.trace.trace_model` in the parent process (heads as structured units, packed q;k;v as
concatenations), the state_dicts' spec keys written as ``.safetensors``; the same three runs follow, each child
reading the spec from a plain-data pickle. Its rows go to their own section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from _report import append_report, machine_summary, markdown_table
from torch import nn

from rebasin import PermutationSpec, open_checkpoint, save_permuted, weight_matching


def mlp_spec(depth: int) -> PermutationSpec:
    """Spec of ``nn.Sequential(Linear, ReLU, ..., Linear)`` with ``depth`` Linear layers."""
    axes: dict[str, tuple[str | None, ...]] = {}
    prev: str | None = None
    for i in range(depth):
        out = f"P{i}" if i < depth - 1 else None
        axes[f"{2 * i}.weight"] = (out, prev)
        axes[f"{2 * i}.bias"] = (out,)
        prev = out
    return PermutationSpec(axes)


def _spec_data(spec: PermutationSpec) -> dict:
    """The spec's fields as plain dicts (a ``PermutationSpec`` holds read-only mapping views, which do not pickle)."""
    return {"axes": dict(spec.axes), "blocks": dict(spec.blocks), "structure": dict(spec.structure),
            "concat": dict(spec.concat), "grouped": dict(spec.grouped)}


def gpt2_spec_and_states(n_positions: int) -> tuple[PermutationSpec, dict, dict]:
    """The traced spec of a random ``GPT2Config()`` model and two random state_dicts (seeds 0 and 1)."""
    import warnings

    import transformers

    from rebasin.trace import trace_model

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=n_positions)).eval()

    model = build(0)
    spec = trace_model(model, torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))).spec
    state_a = {k: v.detach() for k, v in model.state_dict().items() if k in spec.axes}
    del model
    state_b = {k: v.detach() for k, v in build(1).state_dict().items() if k in spec.axes}
    return spec, state_a, state_b


def _status(field: str) -> int:
    """``VmHWM`` / ``VmRSS`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(mode: str, folder: Path, n_iter: int) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with open(folder / "spec.pkl", "rb") as f:
        spec = PermutationSpec(**pickle.load(f))
    a_path, b_path = folder / "a.safetensors", folder / "b.safetensors"
    reset = _reset_peak()
    base = _status("VmRSS")
    t0 = time.perf_counter()
    if mode == "memory":
        state_a, state_b = dict(open_checkpoint(a_path)), dict(open_checkpoint(b_path))
        t_load = time.perf_counter() - t0
        perms, info = weight_matching(spec, state_a, state_b, n_iter=n_iter, return_info=True)
    elif mode == "lazy":
        t_load = 0.0
        perms, info = weight_matching(spec, open_checkpoint(a_path), open_checkpoint(b_path), n_iter=n_iter,
                                      return_info=True)
    else:  # save
        t_load = 0.0
        perms = torch.load(folder / "perms_lazy.pt")
        info = None
        save_permuted(spec, perms, open_checkpoint(b_path), folder / "b_permuted.safetensors")
    elapsed = time.perf_counter() - t0
    peak = _status("VmHWM")
    if mode != "save":
        torch.save(perms, folder / f"perms_{mode}.pt")
    print(json.dumps({
        "mode": mode, "time": elapsed, "load": t_load, "growth": peak - base, "reset": reset,
        "sweeps": None if info is None else info.n_sweeps,
        "converged": None if info is None else info.converged,
    }))


def _sweeps(result: dict) -> str:
    return f"{result['sweeps']}" + ("" if result["converged"] else " (cap)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=48, help="Linear layers (default 48)")
    parser.add_argument("--width", type=int, default=1024, help="width of every layer (default 1024)")
    parser.add_argument("--n-iter", type=int, default=100,
                        help="sweeps of weight matching at most, the same for both runs (default 100, the library's)")
    parser.add_argument("--gpt2", action="store_true",
                        help="two random GPT2Config() models (12 layers, width 768) instead of the MLPs")
    parser.add_argument("--n-positions", type=int, default=64, help="n_positions of the GPT-2 config (default 64)")
    parser.add_argument("--no-report", action="store_true", help="do not write the section of docs/benchmarks.md")
    parser.add_argument("--child", choices=["memory", "lazy", "save"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir, args.n_iter)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        if args.gpt2:
            spec, state_a, state_b = gpt2_spec_and_states(args.n_positions)
            print(f"GPT-2 spec traced and models built in {time.perf_counter() - t0:.1f} s: {len(spec.perms)} "
                  f"permutations, {len(spec.structure)} structured, {len(spec.concat)} concatenations", flush=True)
            for name, state in (("a", state_a), ("b", state_b)):
                save_permuted(spec, {}, state, folder / f"{name}.safetensors")
            del state_a, state_b, state
        else:
            spec = mlp_spec(args.depth)
            for name, seed in (("a", 0), ("b", 1)):
                torch.manual_seed(seed)
                layers: list[nn.Module] = []
                for i in range(args.depth):
                    layers += [nn.Linear(args.width, args.width)] + ([nn.ReLU()] if i < args.depth - 1 else [])
                state = nn.Sequential(*layers).state_dict()
                save_permuted(spec, {}, state, folder / f"{name}.safetensors")
                del layers, state
        with open(folder / "spec.pkl", "wb") as f:
            pickle.dump(_spec_data(spec), f)
        ckpt_mb = (folder / "a.safetensors").stat().st_size / 2**20
        results = {}
        for mode in ("memory", "lazy", "save"):
            cmd = [sys.executable, __file__, "--child", mode, "--dir", str(folder), "--n-iter", str(args.n_iter)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
            print(mode, results[mode], flush=True)
        ref = torch.load(folder / "perms_memory.pt")
        lazy = torch.load(folder / "perms_lazy.pt")
        same = all(torch.equal(ref[k], lazy[k]) for k in ref)
    t_mem = results["memory"]["time"]
    rows = [
        ["in memory (dicts)", f"{results['memory']['growth'] / 2**20:.0f}", f"{t_mem:.1f}",
         f"{results['memory']['load']:.1f}", _sweeps(results["memory"]), "1.00", "(reference)"],
        ["lazy (checkpoints)", f"{results['lazy']['growth'] / 2**20:.0f}", f"{results['lazy']['time']:.1f}", "-",
         _sweeps(results["lazy"]), f"{results['lazy']['time'] / t_mem:.2f}", "yes" if same else "NO"],
        ["save_permuted (B, streamed)", f"{results['save']['growth'] / 2**20:.0f}", f"{results['save']['time']:.1f}",
         "-", "-", "-", "-"],
    ]
    table = markdown_table(["run", "peak growth (MB)", "time (s)", "of which loading (s)", "sweeps",
                            "time / in memory", "same perms"], rows)
    print(table)
    print(f"checkpoint size: {ckpt_mb:.0f} MB each; target: lazy growth <= {ckpt_mb / 2:.0f} MB, time <= 1.5x")
    if not args.no_report:
        threads = os.environ.get("OMP_NUM_THREADS", "(unset)")
        if args.gpt2:
            models = (f"Two independently initialised GPT-2 models (GPT2Config(): 12 layers, width 768, 12 heads, "
                      f"vocab 50257; n_positions={args.n_positions}), the spec traced from model A ({len(spec.perms)} "
                      f"permutations, {len(spec.structure)} of them inside heads, {len(spec.concat)} packed q;k;v "
                      f"concatenations), {ckpt_mb:.0f} MB each as float32 safetensors (the tied lm_head.weight is "
                      "stored too)")
        else:
            models = f"Two independently initialised {args.depth}-layer, {args.width}-wide MLPs, {ckpt_mb:.0f} MB each as float32 safetensors"
        notes = (
            f"{models}; every run in a fresh subprocess, OMP_NUM_THREADS={threads}. Peak growth: VmHWM "
            "minus the resident memory after the imports (the peak is reset there). Target: the lazy run's growth "
            f"at most half a checkpoint ({ckpt_mb / 2:.0f} MB) and at most 1.5x the in-memory time. The machine is "
            f"shared with other jobs, so times are noisy. {machine_summary()}."
        )
        command = f"OMP_NUM_THREADS={threads} python benchmarks/checkpoint_memory.py " + shlex.join(
            a for a in sys.argv[1:] if a != "--no-report")
        title = "Weight matching from checkpoints on disk" + (", GPT-2" if args.gpt2 else "")
        append_report(f"{title} (checkpoint_memory)", command.strip(), table, notes=notes)


if __name__ == "__main__":
    main()
