"""Benchmark `mmerge lora apply` and `mmerge lora extract` against the I/O floor of the same run.

On the Llama-shaped models of stream_bench.py (2.2 GB bf16 by default):

- apply: a rank-16 adapter on every linear layer; floor = reading the base and the adapter from
  the page cache plus an fsync'd write of the output's size (target: 1.5x);
- extract: rank 64 from ft1 (a dense fine-tune of the base); floor = reading both models plus an
  fsync'd write of the adapter's size (target: 5x, peak RSS under 1 GB);
- randomized against dense SVD on a few matrices: time and relative residual
  ||D - L R||_F / ||D||_F at the same rank, on the fine-tune's deltas (a flat spectrum: noise)
  and on a matrix with a decaying spectrum.

    python bench/lora_bench.py                    # 2.2 GB models
    python bench/lora_bench.py --preset small     # ~100 MB, a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from stream_bench import PRESETS, ensure_models, model_files, read_seconds, run_merge, write_seconds

SVD_MATRICES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed(label: str, args: list[str], floor_files: list[Path], out: Path, work: Path) -> dict:
    """Run one command; the floor counts reading `floor_files` and writing the output's size."""
    read_s = read_seconds(floor_files)
    wall, rss, rc = run_merge(args)
    written = folder_bytes(out) if out.exists() else 0
    floor = read_s + write_seconds(work, written)
    subprocess.run(["rm", "-rf", str(out)], check=False)
    row = {
        "run": label,
        "wall_s": round(wall, 2),
        "floor_s": round(floor, 2),
        "ratio": round(wall / floor, 2),
        "peak_rss_mb": round(rss / 2**20),
        "written_mb": round(written / 1e6),
        "exit": rc,
    }
    print(
        f"{label:22s} {row['wall_s']:7.1f} s  floor {row['floor_s']:5.1f} s  {row['ratio']:5.2f}x"
        f"  peak RSS {row['peak_rss_mb']:5d} MB  wrote {row['written_mb']} MB"
        f"{'  FAILED' if rc else ''}",
        flush=True,
    )
    return row


def svd_comparison(models: Path, rank: int, oversample: int, power_iters: int) -> list[dict]:
    """Randomized (mmerge) against dense (numpy) SVD on deltas of the bench models and on a
    matrix with singular values decaying as 1/i."""
    from mmerge.backend.rng import gaussian
    from mmerge.io import open_checkpoint
    from mmerge.methods import lora

    cases = []
    with open_checkpoint(models / "base") as base, open_checkpoint(models / "ft1") as ft:
        for name in SVD_MATRICES:
            delta = ft[name].to_numpy() - base[name].to_numpy()
            cases.append((name.removeprefix("model.") + " (fine-tune delta)", delta))
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((2048, 1024)))
    v, _ = np.linalg.qr(rng.standard_normal((5632, 1024)))
    decaying = ((u / np.arange(1, 1025)) @ v.T).astype(np.float32)
    cases.append(("2048x5632, s_i = 1/i", decaying))
    rows = []
    for label, d in cases:
        norm = np.linalg.norm(d)
        start = time.perf_counter()
        width = lora.sketch_width(rank, oversample, d.shape)
        omega = gaussian((d.shape[1], width), seed=0, name=label)
        low = lora.randomized_svd(
            np, d.__matmul__, d.T.__matmul__, omega, rank, power_iters=power_iters
        )
        rand_s = time.perf_counter() - start
        rand_res = np.linalg.norm(d - low.left @ low.right) / norm
        start = time.perf_counter()
        uu, ss, vt = np.linalg.svd(d, full_matrices=False)
        dense_s = time.perf_counter() - start
        dense_res = np.linalg.norm(d - (uu[:, :rank] * ss[:rank]) @ vt[:rank]) / norm
        rows.append(
            {
                "matrix": f"{label} {d.shape[0]}x{d.shape[1]}",
                "randomized_s": round(rand_s, 3),
                "dense_s": round(dense_s, 2),
                "randomized_residual": round(float(rand_res), 5),
                "dense_residual": round(float(dense_res), 5),
            }
        )
        r = rows[-1]
        print(
            f"{r['matrix']:48s} randomized {r['randomized_s']:6.2f} s residual "
            f"{r['randomized_residual']:.5f} | dense {r['dense_s']:6.1f} s residual "
            f"{r['dense_residual']:.5f}",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mmerge-bench")
    ap.add_argument("--runs", default="apply,extract,svd")
    ap.add_argument("--extract-rank", type=int, default=64)
    ap.add_argument("--power-iters", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()

    from mmerge.testing import random_adapter

    models = ensure_models(a.cache, a.preset)
    work = a.cache / "out-lora"
    work.mkdir(parents=True, exist_ok=True)
    adapter = a.cache / f"{a.preset}-adapter-r16"
    if not (adapter / "adapter_config.json").exists():
        print(f"writing a rank-16 adapter in {adapter} ...", file=sys.stderr)
        random_adapter(models / "base", adapter, rank=16, alpha=32)
    base_files = model_files(models / "base")
    rows, svd_rows = [], []
    runs = a.runs.split(",")
    if "apply" in runs:
        out = work / "applied"
        args = ["lora", "apply", str(models / "base"), str(adapter), "-o", str(out), "--quiet"]
        rows.append(
            timed(
                "apply rank 16",
                args,
                base_files + [adapter / "adapter_model.safetensors"],
                out,
                work,
            )
        )
    if "extract" in runs:
        out = work / "extracted"
        args = [
            "lora",
            "extract",
            str(models / "base"),
            str(models / "ft1"),
            "--rank",
            str(a.extract_rank),
            "--power-iters",
            str(a.power_iters),
            "-o",
            str(out),
            "--quiet",
        ]
        files = base_files + model_files(models / "ft1")
        rows.append(timed(f"extract rank {a.extract_rank}", args, files, out, work))
    if "svd" in runs:
        svd_rows = svd_comparison(models, a.extract_rank, 10, a.power_iters)
    if a.json:
        result = {"preset": a.preset, "shape": PRESETS[a.preset], "runs": rows, "svd": svd_rows}
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
