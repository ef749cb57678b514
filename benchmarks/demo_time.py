"""Wall time of ``rebasin demo`` with its default settings (target: under 2 minutes on 2 CPU cores).

    python benchmarks/demo_time.py

Runs the console script in a fresh process (imports included, as a user would see it), ``--repeat``
times, and reports the minimum and the maximum wall time together with the per-method table the run
wrote. The section is appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import append_report, machine_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    times, table = [], ""
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "rebasin", "demo", "--out", out], check=True,
                           stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
            table = (Path(out) / "results.md").read_text()
            payload = json.loads((Path(out) / "results.json").read_text())
    body = (
        f"| runs | min wall (s) | max wall (s) | target (s) |\n|---:|---:|---:|---:|\n"
        f"| {len(times)} | {min(times):.1f} | {max(times):.1f} | 120 |\n\n" + table.split("\n", 2)[2]
    )
    print(body)
    if not args.no_report:
        command = "python benchmarks/" + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
        notes = (f"{machine_summary()}. `rebasin demo` with default settings in a fresh process "
                 f"({payload['architecture']} on {payload['dataset']}, {payload['epochs']} epochs); the table is "
                 f"the last run's results.md (time = matcher, plus curve training for the Bezier row).")
        append_report("rebasin demo wall time", command, body, notes=notes)


if __name__ == "__main__":
    main()
