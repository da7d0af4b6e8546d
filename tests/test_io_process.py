"""Whole-process behaviour, in child processes: peak memory while reading a model much larger
than any tensor, a writer killed with SIGKILL mid-write (nothing final; resume completes), and
the merge's threads sharing one malloc arena."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mmerge.io import StreamingWriter, TensorSpec

MiB = 1 << 20

MEMORY_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from mmerge.io import open_checkpoint

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    ckpt = open_checkpoint(sys.argv[1])
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    baseline = status("VmRSS")
    for ref in ckpt.values():
        x = ref.read_float32()
        assert x.size == ref.numel
        del x
        ref.release()
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
    """
)


def write_constant_model(path: Path, sizes: list[int]) -> None:
    """A BF16 checkpoint with tensors of `sizes` elements, written in 1 MiB chunks."""
    block = np.full(MiB // 2, 0.5, np.float32)
    specs = [TensorSpec(f"t{i}", "BF16", (n,)) for i, n in enumerate(sizes)]
    with StreamingWriter(path, specs, shard_size=120 * MiB) as w:
        for spec, n in zip(specs, sizes, strict=True):
            for start in range(0, n, block.size):
                w.write(spec.name, block[: min(block.size, n - start)], start=start)
            w.finish_tensor(spec.name)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_reading_a_model_keeps_peak_memory_near_the_largest_tensor(tmp_path):
    sizes = [16 * MiB] + [8 * MiB] * 19  # 32 MiB + 19 x 16 MiB = 336 MiB of BF16
    write_constant_model(tmp_path / "model", sizes)
    res = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(tmp_path / "model")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    figures = json.loads(res.stdout)
    growth = figures["peak"] - figures["baseline"]
    largest_f32, model = 4 * max(sizes), 2 * sum(sizes)
    # the float32 result plus the mapped BF16 pages of one tensor, with some slack
    assert growth < 2 * largest_f32 + 16 * MiB, figures
    assert growth < model / 3, figures


KILL_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from mmerge.io import StreamingWriter, TensorSpec

    mode, out = sys.argv[1], sys.argv[2]
    specs = [TensorSpec(f"layers.{i}.w", "BF16", (1024, 1024)) for i in range(24)]
    with StreamingWriter(out, specs, shard_size=10 * 2**20, resume=mode == "resume") as w:
        print(len(w.pending()), flush=True)
        for k, name in enumerate(w.pending()):
            i = int(name.split(".")[1])
            x = np.arange(2**20, dtype=np.float32) * np.float32(1e-3) + i
            for start in range(0, x.size, 2**16):
                w.write(name, x[start : start + 2**16], start=start)
                if mode == "kill" and k >= 8:
                    time.sleep(0.01)  # slow down: the kill lands mid-write
            w.finish_tensor(name)
            if mode == "kill" and k == 7:
                print("ready", flush=True)
    """
)


def child(mode: str, out: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, mode, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_sigkill_mid_write_leaves_no_final_output_and_resume_matches(tmp_path):
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert child("clean", clean).wait(timeout=120) == 0
    proc = child("kill", out)
    assert proc.stdout.readline().strip() == "24"
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    journal = tmp_path / "out.mmerge-journal"
    assert (tmp_path / "out.mmerge-partial").is_dir() and journal.exists()
    assert len(journal.read_text().splitlines()) >= 1 + 8  # head + the 8 finished tensors
    resumed = child("resume", out)
    assert resumed.wait(timeout=120) == 0
    assert int(resumed.stdout.read()) <= 24 - 8  # the journaled tensors are not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "out"]
    names = sorted(p.name for p in clean.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


ARENA_CHILD = textwrap.dedent(
    """
    import ctypes, ctypes.util, sys, threading
    import numpy as np
    from mmerge.engine.allocator import keep_chunk_memory

    if sys.argv[1] == "kept":
        assert keep_chunk_memory()
    held, barrier = [], threading.Barrier(4)

    def work():
        barrier.wait()  # all four allocate at once, each in its own thread
        held.append(np.ones(1 << 18))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.fopen.restype = ctypes.c_void_p
    libc.fclose.argtypes = (ctypes.c_void_p,)
    libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
    f = libc.fopen(sys.argv[2].encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_info")
def test_merge_threads_share_one_malloc_arena(tmp_path):
    # chunk temporaries are freed by other threads than made them: one arena reuses their pages
    counts = {}
    for mode in ("kept", "default"):
        report = tmp_path / f"{mode}.xml"
        subprocess.run([sys.executable, "-c", ARENA_CHILD, mode, str(report)], check=True)
        counts[mode] = report.read_text().count("<heap nr=")
    assert counts["kept"] == 1, counts
    assert counts["default"] > 1, counts  # the child can tell: glibc gives threads arenas
