"""Benchmark `mmerge analyze` against two floors measured in the same run.

Uses the same generated Llama-shaped bf16 models as stream_bench.py (a base and two
fine-tunes) and reports the wall time and peak RSS of `mmerge analyze base ft1 ft2 --json`
against:
  - read: the time to read the three checkpoints' bytes from the page cache;
  - decode: the time to read every tensor of them as float32 with mmerge's reader, one
    thread per core, which any analysis of the values has to do at least.

    python bench/analyze_bench.py                    # 2.2 GB models (hidden 2048, 22 layers)
    python bench/analyze_bench.py --preset small     # ~100 MB models, a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from stream_bench import PRESETS, ensure_models, model_files, read_seconds, run_merge


def decode_seconds(folders: list[Path]) -> float:
    """Time to read every tensor of `folders` as float32 (after one warming pass)."""
    from mmerge.io import open_checkpoint

    checkpoints = [open_checkpoint(f) for f in folders]
    refs = [ckpt[name] for ckpt in checkpoints for name in ckpt]
    largest = max(ref.numel for ref in refs)
    local = threading.local()

    def decode(ref) -> None:
        if not hasattr(local, "buf"):
            local.buf = np.empty(largest, np.float32)
        ref.read_float32(out=local.buf[: ref.numel])
        ref.release()

    try:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(decode, refs))
            start = time.perf_counter()
            list(pool.map(decode, refs))
            return time.perf_counter() - start
    finally:
        for ckpt in checkpoints:
            ckpt.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mmerge-bench")
    ap.add_argument("--repeat", type=int, default=3, help="analyze runs; the best is reported")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()

    models = ensure_models(a.cache, a.preset)
    folders = [models / k for k in ("base", "ft1", "ft2")]
    files = [f for folder in folders for f in model_files(folder)]
    read_s = read_seconds(files)
    decode_s = decode_seconds(folders)
    runs = [run_merge(["analyze", *map(str, folders), "--json"]) for _ in range(a.repeat)]
    if any(rc for _, _, rc in runs):
        sys.exit(f"mmerge analyze failed (exit {[rc for _, _, rc in runs]})")
    wall = min(w for w, _, _ in runs)
    rss = max(r for _, r, _ in runs)
    result = {
        "preset": a.preset,
        "shape": PRESETS[a.preset],
        "input_bytes": sum(f.stat().st_size for f in files),
        "threads": os.cpu_count(),
        "analyze_s": round(wall, 2),
        "analyze_runs_s": [round(w, 2) for w, _, _ in runs],
        "read_s": round(read_s, 2),
        "decode_s": round(decode_s, 2),
        "ratio_read": round(wall / read_s, 2),
        "ratio_decode": round(wall / decode_s, 2),
        "peak_rss_mb": round(rss / 2**20),
    }
    print(
        f"analyze {wall:.2f} s (best of {a.repeat})  read {read_s:.2f} s -> "
        f"{result['ratio_read']:.2f}x  decode {decode_s:.2f} s -> {result['ratio_decode']:.2f}x  "
        f"peak RSS {result['peak_rss_mb']} MB"
    )
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
