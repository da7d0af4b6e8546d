"""Benchmark the Ray executor against the local one on the models of stream_bench.py.

Starts a local Ray cluster with `--workers` worker CPUs (2 by default), then for each method and
shard size merges once with the local executor and once with the Ray executor, checks that the
outputs are byte-identical, and reports both wall times, their ratio, and the Ray run's overhead
per shard ((ray - local) / shards). On a 2-core machine no speed-up is expected: the local
executor already uses both cores; what is measured is the cost of the distribution.

    flock /work/bench.lock python bench/ray_bench.py               # 2.2 GB models
    python bench/ray_bench.py --preset small --methods linear      # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

from stream_bench import PRESETS, ensure_models

SETTINGS = {
    "linear": {},
    "ties": {"base": True, "density": 0.5},
    "ties_model": {"base": True, "density": 0.5, "scope": "model", "method": "ties"},
}


def digest(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(16 << 20):
                h.update(block)
        out[f.name] = h.hexdigest()
    return out


def timed_merge(models: Path, out: Path, name: str, shard: int, executor: str) -> float:
    from mmerge import merge

    params = dict(SETTINGS[name])
    method = params.pop("method", name)
    base = models / "base" if params.pop("base", False) else None
    start = time.perf_counter()
    merge(
        [models / "ft1", models / "ft2"],
        out,
        method=method,
        base=base,
        shard_size=shard,
        executor=executor,
        **params,
    )
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    ap.add_argument("--methods", default="linear,ties", help=f"of {', '.join(SETTINGS)}")
    ap.add_argument("--shard-sizes", default="1000000000,200000000", help="bytes, comma-separated")
    ap.add_argument("--workers", type=int, default=2, help="worker CPUs of the Ray cluster")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mmerge-bench")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()

    import ray

    models = ensure_models(a.cache, a.preset)
    work = a.cache / "out-ray"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    ray.init(address="local", num_cpus=a.workers, include_dashboard=False, log_to_driver=False)
    print(f"ray cluster with {a.workers} worker CPUs up in {time.perf_counter() - started:.1f} s")
    rows = []
    for name in a.methods.split(","):
        for shard in (int(s) for s in a.shard_sizes.split(",")):
            local_out, ray_out = work / f"{name}-local", work / f"{name}-ray"
            local_s = timed_merge(models, local_out, name, shard, "local")
            ray_s = timed_merge(models, ray_out, name, shard, "ray")
            shards = len(list(ray_out.glob("*.safetensors")))
            same = digest(local_out) == digest(ray_out)
            shutil.rmtree(local_out)
            shutil.rmtree(ray_out)
            row = {
                "method": name,
                "shard_size": shard,
                "shards": shards,
                "local_s": round(local_s, 2),
                "ray_s": round(ray_s, 2),
                "ratio": round(ray_s / local_s, 2),
                "overhead_per_shard_s": round((ray_s - local_s) / shards, 3),
                "identical": same,
            }
            rows.append(row)
            print(
                f"{name:10s} shard {shard / 1e6:6.0f} MB x{shards:3d}  local {local_s:6.1f} s  "
                f"ray {ray_s:6.1f} s  {row['ratio']:4.2f}x  "
                f"{row['overhead_per_shard_s']:+.3f} s/shard  "
                f"{'identical' if same else 'DIFFERENT BYTES'}",
                flush=True,
            )
    ray.shutdown()
    if a.json:
        a.json.write_text(json.dumps({"preset": a.preset, "workers": a.workers, "rows": rows}))


if __name__ == "__main__":
    main()
