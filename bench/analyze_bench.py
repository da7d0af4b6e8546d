"""Benchmark `mmerge analyze` against the time to read its inputs, measured in the same run.

Uses the same generated Llama-shaped bf16 models as stream_bench.py (a base and two
fine-tunes). Each repeat reads the three checkpoints' bytes from the page cache, then times
`mmerge analyze base ft1 ft2 --json`; the best of each and the median ratio are reported, as
this machine's timings vary from run to run. One more run samples the memory of mmerge and its
worker processes together (proportional set size, so shared pages count once).

    python bench/analyze_bench.py                    # 2.2 GB models (hidden 2048, 22 layers)
    python bench/analyze_bench.py --preset small     # ~100 MB models, a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from stream_bench import PRESETS, ensure_models, model_files, read_seconds, run_merge


def peak_memory(args: list[str]) -> int:
    """Peak total proportional set size in bytes of one `mmerge` run and its children."""
    proc = subprocess.Popen([sys.executable, "-m", "mmerge", *args], stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(_pss(pid) for pid in _tree(proc.pid)))
        time.sleep(0.02)
    if proc.returncode:
        sys.exit(f"mmerge {args[0]} failed (exit {proc.returncode})")
    return peak


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *(p for child in children for p in _tree(int(child)))]


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass  # the process ended between listing and reading
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mmerge-bench")
    ap.add_argument("--repeat", type=int, default=5, help="read + analyze pairs to time")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()

    models = ensure_models(a.cache, a.preset)
    folders = [models / k for k in ("base", "ft1", "ft2")]
    files = [f for folder in folders for f in model_files(folder)]
    args = ["analyze", *map(str, folders), "--json"]
    reads, walls = [], []
    for _ in range(a.repeat):
        reads.append(read_seconds(files))
        wall, _, rc = run_merge(args)
        if rc:
            sys.exit(f"mmerge analyze failed (exit {rc})")
        walls.append(wall)
    memory = peak_memory(args)
    ratios = [w / r for w, r in zip(walls, reads, strict=True)]
    result = {
        "preset": a.preset,
        "shape": PRESETS[a.preset],
        "input_bytes": sum(f.stat().st_size for f in files),
        "cores": os.cpu_count(),
        "analyze_s": [round(w, 2) for w in walls],
        "read_s": [round(r, 2) for r in reads],
        "ratio_best": round(min(walls) / min(reads), 2),
        "ratio_median": round(statistics.median(ratios), 2),
        "peak_pss_mb": round(memory / 2**20),
    }
    print(
        f"analyze {min(walls):.2f} s  read {min(reads):.2f} s (best of {a.repeat}) -> "
        f"{result['ratio_best']:.2f}x, median ratio {result['ratio_median']:.2f}x  "
        f"peak memory {result['peak_pss_mb']} MB (all processes)"
    )
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
