"""Peak memory and time of ``rebasin align`` / ``rebasin merge`` on Hugging Face model folders.

Random ``GPT2LMHeadModel(GPT2Config())`` models (12 layers, width 768, 12 heads, vocab 50257; ``--n-positions``
64) are written with ``save_pretrained(max_shard_size=--shard-size)`` to a temporary folder. Each command then
runs in a fresh Python subprocess (``rebasin.apps.cli.main`` in process, after the imports), so that its peak
resident memory (``VmHWM``) is its own: ``align A B -o OUT`` (the model built from ``config.json`` on the meta
device, the shards read one tensor at a time, OUT written shard by shard) and, with ``--merge``, ``merge A B C
-o OUT --n-iter 2``. ``peak growth`` is ``VmHWM`` at the end minus ``VmRSS`` after the imports (the peak is
reset there where the kernel allows it); the imports include ``transformers``' GPT-2 modeling code, which the
command imports when it builds the model and which costs about 180 MB whatever the model's size. For
comparison, holding the two models (``from_pretrained``) takes two folders' worth of memory.

Run ``OMP_NUM_THREADS=1 python benchmarks/hf_folder_memory.py`` (2 to 3 minutes for align on a shared 2-core
machine; ``--merge`` adds about 7); ``--no-report`` skips writing the section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from _report import append_report, machine_summary, markdown_table
from checkpoint_memory import _reset_peak, _status


def child(argv: list[str]) -> None:
    """Run ``rebasin ARGV`` in this (fresh) process; print one JSON line with time and peak growth."""
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401 - a fixed cost of about 180 MB, not measured

    from rebasin.apps.cli import main

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    reset = _reset_peak()
    base = _status("VmRSS")
    t0 = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"code": code, "time": elapsed, "growth": _status("VmHWM") - base, "reset": reset}))


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-positions", type=int, default=64, help="n_positions of the GPT-2 config (default 64)")
    parser.add_argument("--shard-size", default="100MB", help="max_shard_size of save_pretrained (default 100MB)")
    parser.add_argument("--merge", action="store_true", help="also merge three folders (--n-iter 2)")
    parser.add_argument("--no-report", action="store_true", help="do not write the section of docs/benchmarks.md")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = ("a", "b", "c") if args.merge else ("a", "b")
        for seed, name in enumerate(names):
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=args.n_positions))
            model.save_pretrained(root / name, max_shard_size=args.shard_size)
            del model
        size = _folder_mb(root / "a")
        shards = len(list((root / "a").glob("*.safetensors")))
        runs = {"align A B": ["align", str(root / "a"), str(root / "b"), "-o", str(root / "aligned"), "--device", "cpu"]}
        if args.merge:
            runs["merge A B C (--n-iter 2)"] = ["merge", *(str(root / n) for n in names), "-o", str(root / "merged"),
                                                "--n-iter", "2", "--device", "cpu"]
        rows = []
        for label, argv in runs.items():
            cmd = [sys.executable, __file__, "--child", *argv]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(label, result, flush=True)
            assert result["code"] == 0, out
            rows.append([label, f"{result['growth'] / 2**20:.0f}", f"{result['time']:.1f}",
                         f"{result['growth'] / 2**20 / size:.2f}"])
    table = markdown_table(["command", "peak growth (MB)", "time (s)", "growth / one folder"], rows)
    print(table)
    print(f"folder size: {size:.0f} MB in {shards} shards")
    if not args.no_report:
        threads = os.environ.get("OMP_NUM_THREADS", "(unset)")
        notes = (
            f"Random GPT-2 models (GPT2Config(): 12 layers, width 768, 12 heads, vocab 50257; n_positions="
            f"{args.n_positions}) saved with save_pretrained(max_shard_size={args.shard_size!r}): {size:.0f} MB of "
            f"float32 safetensors in {shards} shards per folder (the tied lm_head is stored once, as the embedding). "
            f"Each command runs in a fresh subprocess, OMP_NUM_THREADS={threads}; peak growth is VmHWM minus the "
            "resident memory after the imports (the peak is reset there; they include transformers' GPT-2 modeling "
            "code, about 180 MB whatever the model's size), and includes building and tracing the model on the meta "
            f"device. The machine is shared with other jobs, so times are noisy. {machine_summary()}."
        )
        command = f"OMP_NUM_THREADS={threads} python benchmarks/hf_folder_memory.py " + shlex.join(
            a for a in sys.argv[1:] if a != "--no-report")
        append_report("Hugging Face model folders (hf_folder_memory)", command.strip(), table, notes=notes)


if __name__ == "__main__":
    main()
