"""Benchmark merging DeepSeek-style fp8 checkpoints against the I/O floor measured in the same run.

Generates a Llama-shaped fp8 family (a base and two fine-tunes: every layer matrix F8_E4M3 with
128x128 float32 block scales, the rest BF16) with mmerge.testing, then for each case reports
wall time, CPU time, peak RSS, and the ratio to the I/O floor: reading the case's inputs from
the page cache plus an fsync'd write of its output's size.

    python bench/fp8_bench.py                     # 2.3 GB fp8 models (hidden 2048, 40 layers)
    python bench/fp8_bench.py --preset fp8-small      # ~60 MB models, a quick look
    python bench/fp8_bench.py --bf16-reference        # also task_arithmetic on stream_bench's
                                                      # bf16 family, for the cost per parameter
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import stream_bench
from stream_bench import model_files, read_seconds, run_merge, write_seconds

PRESETS = {
    "fp8-2b": {"hidden": 2048, "intermediate": 5632, "layers": 40, "vocab": 32000},
    "fp8-small": {"hidden": 512, "intermediate": 1408, "layers": 8, "vocab": 8000},
}
# name: (method arguments, uses the base, extra options)
CASES = {
    "task_arithmetic-bf16": (["--method", "task_arithmetic", "-w", "0.5,0.5"], True, []),
    "task_arithmetic-fp8": (
        ["--method", "task_arithmetic", "-w", "0.5,0.5"],
        True,
        ["--out-dtype", "fp8"],
    ),
    "linear-bf16": (["--method", "linear", "-w", "0.5,0.5"], False, []),
    "ties-bf16": (["--method", "ties", "--density", "0.5"], True, []),
}


def ensure_models(cache: Path, preset: str) -> Path:
    """The folder of the preset's generated fp8 base, ft1 and ft2, written on first use."""
    from mmerge.testing import write_fp8_model_family

    models = cache / preset
    if not (models / "ft2" / "model.safetensors.index.json").exists():
        print(f"generating {preset} fp8 models in {models} ...", file=sys.stderr)
        write_fp8_model_family(models, **PRESETS[preset])
    return models


def _child_cpu() -> float:
    """CPU seconds (user and system) used so far by this process's finished children: the
    merge's own work, whatever else the machine is running."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _parameters(folder: Path) -> int:
    """Parameters of a checkpoint, dequantized (scales not counted)."""
    from mmerge.io import open_checkpoint

    with open_checkpoint(folder) as ckpt:
        return sum(ref.numel for ref in ckpt.values())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in model_files(folder))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="fp8-2b")
    ap.add_argument("--cases", default="task_arithmetic-bf16,task_arithmetic-fp8,linear-bf16")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mmerge-bench")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--bf16-reference",
        action="store_true",
        help="first run task_arithmetic on stream_bench's bf16 llama-1b family",
    )
    a = ap.parse_args()

    work = a.cache / "out-fp8"
    work.mkdir(parents=True, exist_ok=True)
    runs = [(case, ensure_models(a.cache, a.preset)) for case in a.cases.split(",")]
    if a.bf16_reference:
        runs.insert(0, ("task_arithmetic-bf16", stream_bench.ensure_models(a.cache, "llama-1b")))
    rows = []
    for case, models in runs:
        names = {k: model_files(models / k) for k in ("base", "ft1", "ft2")}
        method_args, needs_base, extra = CASES[case]
        inputs = names["ft1"] + names["ft2"] + (names["base"] if needs_base else [])
        out = work / case
        args = [
            "stream",
            str(models / "ft1"),
            str(models / "ft2"),
            *method_args,
            *extra,
            "-o",
            str(out),
            "--quiet",
            "--backend",
            a.backend,
        ]
        if needs_base:
            args += ["--base", str(models / "base")]
        before = _child_cpu()
        wall, rss, rc = run_merge(args)
        cpu = _child_cpu() - before
        written = folder_bytes(out) if rc == 0 else 0
        floor = read_seconds(inputs) + write_seconds(work, written)
        subprocess.run(["rm", "-rf", str(out)], check=False)
        read = sum(f.stat().st_size for f in inputs)
        rows.append(
            {
                "case": case,
                "models": models.name,
                "params_per_model": _parameters(models / "ft1"),
                "wall_s": round(wall, 2),
                "floor_s": round(floor, 2),
                "ratio": round(wall / floor, 2),
                "cpu_s": round(cpu, 1),
                "peak_rss_mb": round(rss / 2**20),
                "read_gb": round(read / 1e9, 2),
                "written_gb": round(written / 1e9, 2),
                "exit": rc,
            }
        )
        r = rows[-1]
        print(
            f"{models.name:9s} {case:22s} {r['wall_s']:7.1f} s  floor {r['floor_s']:5.1f} s  "
            f"{r['ratio']:5.2f}x  cpu {r['cpu_s']:6.1f} s  peak RSS {r['peak_rss_mb']:5d} MB  "
            f"read {r['read_gb']:.2f} GB  wrote {r['written_gb']:.2f} GB  "
            f"{r['cpu_s'] / r['params_per_model'] * 1e9:.1f} cpu ns/param"
            f"{'  FAILED' if rc else ''}",
            flush=True,
        )
    if a.json:
        a.json.write_text(json.dumps({"preset": a.preset, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
