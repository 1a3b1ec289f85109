"""What `kmm run --jobs` buys: the wall time of one recipe run from an empty folder at each
`--jobs` value (threads left to their default: the cores shared out among the jobs), repeats
interleaved, with the median of each and its ratio to `--jobs 1`, and the sum of the stages' own
times (from stage.json) to show how much of the gain is side by side and how much is each stage
on fewer threads.

    python bench/jobs.py [--recipe classroom] [-s seeds=0,1,2,3] [--jobs 1,2] [--repeats 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_once(recipe: str, settings: list[str], jobs: str, out: Path) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "kmismatch_lite", "run", recipe, *[a for s in settings for a in ("-s", s)],
           "--jobs", jobs, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    stages = sum(json.loads(p.read_text())["seconds"] for p in out.rglob("stage.json"))
    return wall, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="classroom")
    ap.add_argument("-s", dest="settings", action="append", default=None)
    ap.add_argument("--jobs", default="1,2")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-jobs"))
    args = ap.parse_args()
    settings = args.settings if args.settings is not None else ["seeds=0,1,2,3"]
    jobs = args.jobs.split(",")
    walls: dict[str, list[float]] = {j: [] for j in jobs}
    stage_sums: dict[str, list[float]] = {j: [] for j in jobs}
    for r in range(args.repeats):
        for j in jobs:
            wall, stages = run_once(args.recipe, settings, j, args.out / f"jobs-{j}")
            walls[j].append(wall)
            stage_sums[j].append(stages)
            print(f"repeat {r + 1}: --jobs {j}: {wall:.0f} s wall, {stages:.0f} s of stage time", flush=True)
    base = statistics.median(walls[jobs[0]])
    print(f"\n{args.recipe} {' '.join(settings)}, {args.repeats} repeat(s), median wall time:")
    for j in jobs:
        w = statistics.median(walls[j])
        print(f"  --jobs {j}: {w:.0f} s ({base / w:.2f}x --jobs {jobs[0]}), stage time {statistics.median(stage_sums[j]):.0f} s")


if __name__ == "__main__":
    main()
