"""Shared helper of the benchmark scripts: write a benchmark's section of docs/benchmarks.md.

docs/benchmarks.md is a curated page, one current section per benchmark: a run *replaces* the section
with the same title (``## title``, or the older ``## title (date)`` form) instead of appending a new
one, and adds it at the end only when the page has none. History is in git.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import sys
from pathlib import Path

import torch

__all__ = ["append_report", "machine_summary", "markdown_table", "mnist_root", "relative_command", "REPORT_PATH"]

REPO_ROOT = Path(__file__).resolve().parent.parent
REPORT_PATH = REPO_ROOT / "docs" / "benchmarks.md"

_HEADER = """# Benchmarks

The current numbers of every benchmark in `benchmarks/`, one section per benchmark, each with the command
that regenerates it (run from the repository root) and when it ran. A script run replaces the section with
the same title; history is in git (`git log -p docs/benchmarks.md`).
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


def relative_command(command: str, root: str | Path | None = None) -> str:
    """``command`` with absolute paths inside the repository (or next to it) made relative to its root.

    ``/abs/repo/docs/x.png`` becomes ``docs/x.png`` and ``/abs/shared/data`` (a sibling of the
    repository) ``../shared/data``, so the page shows commands that run from any checkout. Other
    absolute paths are left as they are (``tests/test_docs.py`` rejects them on the page).
    """
    root = Path(root) if root is not None else REPO_ROOT
    start = r"(?<![\w./~-])"  # only where a path starts: after a space, '=', a quote, ...
    out = re.sub(start + re.escape(str(root)) + "/", "", command)
    out = re.sub(start + re.escape(str(root)) + r"(?=[\s'\"]|$)", ".", out)
    parent = root.parent
    if parent != Path(parent.anchor):  # never rewrite '/' itself
        out = re.sub(start + re.escape(str(parent)) + "/", "../", out)
    return out


def _find_sections(lines: list[str], title: str) -> list[tuple[int, int]]:
    """``(start, end)`` line ranges of the ``## title`` sections (also ``## title (date)``)."""
    stamped = re.compile(re.escape(f"## {title}") + r" \(\d{4}-\d{2}-\d{2} \d{2}:\d{2}\)$")
    heads = [i for i, line in enumerate(lines) if line.startswith("## ")]
    found = []
    for k, i in enumerate(heads):
        line = lines[i].rstrip()
        if line == f"## {title}" or stamped.match(line):
            found.append((i, heads[k + 1] if k + 1 < len(heads) else len(lines)))
    return found


def append_report(
    title: str,
    command: str,
    table_markdown: str,
    *,
    notes: str = "",
    path: str | Path | None = None,
) -> Path:
    """Write the section ``## title`` with the command, the date, optional notes and a markdown table.

    The name is kept for the scripts; the page is curated, not a log: if the report file already has
    a section with this title (``## title`` or ``## title (date)``), that section is replaced in place
    (and any further sections with the same title are removed); otherwise the section is appended.
    Text a person added to the old section (a reading of the numbers) goes with it: rewrite it for the
    new numbers and review ``git diff``.

    Parameters
    ----------
    title
        Section title, e.g. ``"Weight matching speed (wm_speed)"``; the key of the section.
    command
        The exact command line that produced the numbers (shown in a code span); absolute paths
        inside or next to the repository are shown relative to its root (:func:`relative_command`).
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
    body = [f"## {title}", "", f"Command: `{relative_command(command)}`", "", f"Ran: {stamp}.", ""]
    if notes:
        body += [notes.strip(), ""]
    body += [table_markdown.strip(), ""]
    text = target.read_text(encoding="utf-8") if target.exists() else ""
    if not text.strip():
        text = _HEADER
    lines = text.rstrip("\n").split("\n")
    found = _find_sections(lines, title)
    if found:
        (first_start, first_end), rest = found[0], found[1:]
        for start, end in reversed(rest):
            del lines[start:end]
        lines[first_start:first_end] = body
    else:
        lines += [""] + body
    target.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
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
