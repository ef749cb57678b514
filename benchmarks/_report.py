"""Shared helper of the benchmark scripts: append a dated section to docs/benchmarks.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path

import torch

__all__ = ["append_report", "machine_summary", "markdown_table", "mnist_root", "REPORT_PATH"]

REPORT_PATH = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

_HEADER = """# Benchmarks

Sections are appended by the scripts in `benchmarks/` (each records the exact command that made it).
Timings are wall-clock seconds; machines are shared and noisy, so scripts measure the compared
variants side by side in one run and keep the minimum over repeats.
"""


def machine_summary(device: str | torch.device | None = None) -> str:
    """One line describing where the numbers were taken (CPU, threads, torch, GPU if used)."""
    parts = [
        f"{platform.machine()} {platform.processor() or platform.system()}",
        f"{os.cpu_count()} CPUs visible, torch {torch.__version__} with {torch.get_num_threads()} threads",
    ]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(dev)}")
    return "; ".join(parts)


def append_report(
    title: str,
    command: str,
    table_markdown: str,
    *,
    notes: str = "",
    path: str | Path | None = None,
) -> Path:
    """Append a section ``## title (date)`` with the command, optional notes and a markdown table.

    Parameters
    ----------
    title
        Section title, e.g. ``"Weight matching speed"``.
    command
        The exact command line that produced the numbers (shown in a code span).
    table_markdown
        A markdown table (or any markdown body).
    notes
        Extra markdown placed between the command and the table (machine, definitions).
    path
        Report file; default ``docs/benchmarks.md`` of this repository. Created with a header if
        missing.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    target = Path(path) if path is not None else REPORT_PATH
    target.parent.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [f"\n## {title} ({stamp})\n", f"Command: `{command}`\n"]
    if notes:
        body.append(notes.rstrip() + "\n")
    body.append(table_markdown.rstrip() + "\n")
    new = not target.exists() or target.stat().st_size == 0
    with open(target, "a", encoding="utf-8") as fh:
        if new:
            fh.write(_HEADER)
        fh.write("\n".join(body))
    return target


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table; floats are shown with 3 significant digits."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mnist_root(arg: str | None) -> Path:
    """``--data-root`` (or ``$REBASIN_DATA``) as a folder holding ``MNIST/raw``; exits with a message otherwise."""
    from rebasin.apps.data import data_root_from_env

    root = Path(arg) if arg else data_root_from_env()
    if root is None or not (root / "MNIST" / "raw").exists():
        sys.exit(f"MNIST not found: pass --data-root or set REBASIN_DATA (got {root})")
    return root
