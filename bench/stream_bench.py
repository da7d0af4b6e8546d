"""Benchmark `mmerge stream` for every registered method against the I/O floor of the same run.

Generates Llama-shaped bf16 models (a base and two fine-tunes) with mmerge.testing, then for
each method reports wall time, peak RSS and throughput, and the ratio to the I/O floor: the time
to read the method's inputs from the page cache plus an fsync'd write of the output's size,
measured right before that method runs. Methods that need a base get it, trimming and dropping
methods run at density 0.5, and each ratio is checked against the method's target.

    python bench/stream_bench.py                      # every method, 2.2 GB models
    python bench/stream_bench.py --preset small       # ~0.25 GB models (a 4x smaller embedding)
    python bench/stream_bench.py --methods linear,ties --backend torch --device cuda
    python bench/stream_bench.py --methods linear,ties,dare_ties,slerp --backend numpy,torch,mlx

With several backends, each method runs on each of them in turn (the same floor), and every
backend's time and peak RSS are also given as ratios to the first one's (issue #19: within
1.3x of numpy's time and 1.5x of its peak RSS): as measured, and net of what importing each
library costs by itself (best of three `python -c "import mmerge.cli, LIB"`, in the same run),
which a command pays and a library caller holding that library's tensors already has.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {
    "llama-1b": {"hidden": 2048, "intermediate": 5632, "layers": 22, "vocab": 32000},
    "small": {"hidden": 1024, "intermediate": 2816, "layers": 11, "vocab": 16000},
}
BACKEND_TARGETS = {"time": 1.3, "rss": 1.5}  # of the first backend's, for the others (issue #19)
# ratio to the I/O floor each method should stay within (issue #12)
TARGETS = {"elementwise": 1.0, "spherical": 1.5, "statistics": 3.0, "iterative": 5.0}
FAMILY = {
    "linear": "elementwise",
    "task_arithmetic": "elementwise",
    "nearswap": "elementwise",
    "passthrough": "elementwise",
    "slerp": "spherical",
    "nuslerp": "spherical",
    "multislerp": "spherical",
    "karcher": "iterative",
}


def ensure_models(cache: Path, preset: str) -> Path:
    """The folder of the preset's generated base, ft1 and ft2, written on first use."""
    from mmerge.testing import write_model_family

    models = cache / preset
    if not (models / "ft2" / "model.safetensors.index.json").exists():
        print(f"generating {preset} models in {models} ...", file=sys.stderr)
        write_model_family(models, **PRESETS[preset], dtype="BF16", layout="folder")
    return models


def model_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_seconds(files: list[Path]) -> float:
    """Time to read `files` from the page cache (after one warming read)."""
    for f in files:
        _read(f)
    start = time.perf_counter()
    for f in files:
        _read(f)
    return time.perf_counter() - start


def _read(path: Path, block: int = 16 << 20) -> None:
    buf = bytearray(block)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


def write_seconds(folder: Path, nbytes: int) -> float:
    """Time to write `nbytes` and fsync them: the output half of the floor."""
    path = folder / "floor.bin"
    block = bytes(16 << 20)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left > 0:
            left -= fh.write(block[: min(left, len(block))])
        os.fsync(fh.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def run_merge(args: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes of the child, exit code) of one `mmerge` run."""
    cmd = [sys.executable, "-m", "mmerge", *args]
    code = (
        "import resource, subprocess, sys, time\n"
        "s = time.perf_counter(); rc = subprocess.call(sys.argv[1:])\n"
        "print(time.perf_counter() - s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    wall, rss_kb, rc = out.stdout.split()[-3:]
    return float(wall), int(rss_kb) * 1024, int(rc)


def import_cost(backend: str) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of a process that imports the command and `backend`'s library
    and does nothing else: the best of three."""
    from mmerge.backend import backend_class

    module = backend_class(backend).module
    code = f"import mmerge.cli, {module}"
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                f"{code}; import resource; "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append((time.perf_counter() - start, int(out.stdout.split()[-1]) * 1024))
    return min(t for t, _ in runs), min(r for _, r in runs)


def method_args(spec, models: Path) -> tuple[list[str], list[str]]:
    """(input folders, extra options) for one method: a base where it needs one, density 0.5
    where it drops entries, one model for single-model methods."""
    names = ["ft1"] if spec.max_models == 1 else ["ft1", "ft2"]
    extra = []
    if spec.base == "required":
        extra += ["--base", str(models / "base")]
    if any(p.name == "density" for p in spec.params):
        extra += ["--density", "0.5"]
    if spec.name == "linear":
        extra += ["--weights", "0.5,0.5"]
    return names, extra


def row(method, backend, wall, rss, rc, floor, inputs, first, imports) -> dict:
    """One result: against the floor, and against the first backend's run of the method (as
    measured, and net of each library's import)."""
    target = TARGETS[FAMILY.get(method, "statistics")]
    ratio = wall / floor
    out = {
        "method": method,
        "backend": backend,
        "wall_s": round(wall, 2),
        "floor_s": round(floor, 2),
        "ratio": round(ratio, 2),
        "target": target,
        "met": bool(rc == 0 and ratio <= target and rss < 1e9),
        "peak_rss_mb": round(rss / 2**20),
        "throughput_gb_s": round(sum(f.stat().st_size for f in inputs) / wall / 1e9, 2),
        "exit": rc,
    }
    if first is not None and first["exit"] == 0 and rc == 0:
        time_x, rss_x = wall / first["wall_s"], rss / 2**20 / first["peak_rss_mb"]
        (t0, r0), (t1, r1) = imports[first["backend"]], imports[backend]
        net_time = (wall - t1) / (first["wall_s"] - t0)
        net_rss = (rss - r1) / (first["peak_rss_mb"] * 2**20 - r0)
        out["vs_first"] = {
            "backend": first["backend"],
            "time": round(time_x, 2),
            "rss": round(rss_x, 2),
            "met": time_x <= BACKEND_TARGETS["time"] and rss_x <= BACKEND_TARGETS["rss"],
            "net_of_import": {"time": round(net_time, 2), "rss": round(net_rss, 2)},
        }
    return out


def describe(r: dict, several: bool) -> str:
    """One printed line of a result."""
    line = f"{r['method']:16s} " + (f"{r['backend']:6s} " if several else "")
    line += (
        f"{r['wall_s']:7.1f} s  floor {r['floor_s']:5.1f} s  {r['ratio']:5.2f}x "
        f"(target {r['target']:g}x)  peak RSS {r['peak_rss_mb']:5d} MB  "
        f"{r['throughput_gb_s']:.2f} GB/s in{'' if r['met'] else '  NOT MET'}"
    )
    vs = r.get("vs_first")
    if vs:
        line += (
            f"  | vs {vs['backend']}: time {vs['time']:.2f}x, RSS {vs['rss']:.2f}x"
            f"{'' if vs['met'] else '  NOT MET'}; net of imports: time "
            f"{vs['net_of_import']['time']:.2f}x, RSS {vs['net_of_import']['rss']:.2f}x"
        )
    return line + ("  FAILED" if r["exit"] else "")


def main() -> None:
    from mmerge.methods import all_methods, get

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    ap.add_argument("--methods", default="all", help="comma-separated, or all (the registry)")
    ap.add_argument("--backend", default="numpy", help="one, or several comma-separated")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeat", type=int, default=1, help="runs per backend: best time, top RSS")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mmerge-bench")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()

    models = ensure_models(a.cache, a.preset)
    work = a.cache / "out"
    work.mkdir(parents=True, exist_ok=True)
    files = {k: model_files(models / k) for k in ("base", "ft1", "ft2")}
    model_bytes = sum(f.stat().st_size for f in files["ft1"])
    chosen = [s.name for s in all_methods()] if a.methods == "all" else a.methods.split(",")
    backends = a.backend.split(",")
    imports = {b: import_cost(b) for b in backends} if len(backends) > 1 else {}
    for b, (secs, rss) in imports.items():
        print(f"import {b:6s} {secs:5.2f} s  peak RSS {rss / 2**20:5.0f} MB", flush=True)
    rows = []
    for method in chosen:
        spec = get(method)
        names, extra = method_args(spec, models)
        inputs = [f for n in names for f in files[n]]
        if spec.base == "required":
            inputs += files["base"]
        floor = read_seconds(inputs) + write_seconds(work, model_bytes)
        runs: dict[str, list] = {b: [] for b in backends}
        for _ in range(a.repeat):  # interleaved, so drift of the machine hits every backend
            for backend in backends:
                args = ["stream", *(str(models / n) for n in names), "--method", method]
                args += ["-o", str(work / method), "--quiet", "--backend", backend, *extra]
                if a.device:
                    args += ["--device", a.device]
                runs[backend].append(run_merge(args))
                subprocess.run(["rm", "-rf", str(work / method)], check=False)
        first = None
        for backend in backends:
            done = runs[backend]  # the best time, the highest peak, any failure
            wall, rss = min(w for w, _, _ in done), max(r for _, r, _ in done)
            rc = max(c for _, _, c in done)
            rows.append(row(method, backend, wall, rss, rc, floor, inputs, first, imports))
            first = first or rows[-1]
            print(describe(rows[-1], len(backends) > 1), flush=True)
    result = {
        "preset": a.preset,
        "shape": PRESETS[a.preset],
        "model_bytes": model_bytes,
        "backends": backends,
        "imports": {
            b: {"seconds": round(t, 2), "peak_rss_mb": round(r / 2**20)}
            for b, (t, r) in imports.items()
        },
        "device": a.device,
        "repeat": a.repeat,
        "results": rows,
    }
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
