"""The Ray executor (spec/distributed.md) on a real Ray cluster on this machine: every method
family, a LoRA apply and a recipe give the same bytes as the local executor; a worker killed
mid-shard costs a retry; a driver killed mid-merge, then --resume, completes the same output and
keeps the shards it verifies (rewriting one that no longer does); without Ray, one clear error."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mmerge.engine.api import merge, run_recipe
from mmerge.errors import InvalidInput, MmergeError
from mmerge.lora.applying import apply
from mmerge.testing import random_adapter, write_model_family

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mmerge[ray]')")

SHARD = 20_000  # bytes per output shard: about ten shards for the family below
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster with two worker CPUs; its workers sleep in each chunk write while
    the returned marker file exists."""
    marker = tmp_path_factory.mktemp("ray") / "slow"
    env = {"PYTHONPATH": str(HERE), "MMERGE_TEST_SLOW_MARKER": str(marker)}
    ray.init(
        address="local",  # a new cluster, whatever else runs on this machine
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": "ray_slow.install", "env_vars": env},
    )
    yield marker
    ray.shutdown()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """bf16 base and two fine-tunes, each stored in several shards."""
    return write_model_family(
        tmp_path_factory.mktemp("family"),
        hidden=64,
        intermediate=96,
        layers=2,
        vocab=128,
        shard_size=40_000,
    )


def contents(folder: Path) -> dict[str, str]:
    """sha256 of every file in an output folder (hidden files included)."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


CASES = {
    "linear": dict(method="linear"),
    "ties": dict(method="ties", base=True, density=0.5),
    "dare_ties": dict(method="dare_ties", base=True, density=0.4, seed=3),
    "slerp": dict(method="slerp", t=0.3),
    "ties_model_scope": dict(method="ties", base=True, density=0.3, scope="model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_bytes_as_local(cluster, family, tmp_path, case):
    kwargs = dict(CASES[case])
    if kwargs.pop("base", False):
        kwargs["base"] = family["base"]
    models = [family["ft1"], family["ft2"]]
    local = merge(models, tmp_path / "local", shard_size=SHARD, **kwargs)
    remote = merge(models, tmp_path / "ray", shard_size=SHARD, executor="ray", **kwargs)
    assert len(list(remote.output.glob("*.safetensors"))) > 5
    assert contents(remote.output) == contents(local.output)


def test_lora_apply_same_bytes(cluster, family, tmp_path):
    adapter = random_adapter(family["base"], tmp_path / "adapter", rank=4, scale=0.2)
    local = apply(family["base"], [adapter], tmp_path / "local", shard_size=SHARD)
    remote = apply(family["base"], [adapter], tmp_path / "ray", shard_size=SHARD, executor="ray")
    assert contents(remote.output) == contents(local.output)


def test_recipe_same_bytes_and_one_file_output(cluster, family, tmp_path):
    recipe = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(family["ft2"]), "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "parameters": {"scope": "model"},
    }
    local = run_recipe(recipe, tmp_path / "local.safetensors")
    remote = run_recipe(recipe, tmp_path / "ray.safetensors", executor="ray")
    assert remote.output.read_bytes() == local.output.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def _kill_first_writer(partial: Path, killed: list[int], stop: threading.Event) -> None:
    """Kill the worker process of the first temporary shard file seen (its pid is in the name)."""
    while not stop.is_set():
        for f in partial.glob(".*.tmp") if partial.is_dir() else ():
            pid = int(f.name.rsplit(".", 2)[-2].split("-")[0])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.005)


def test_worker_killed_mid_shard_is_retried(cluster, family, tmp_path):
    models = [family["ft1"], family["ft2"]]
    kwargs = dict(method="ties", base=family["base"], density=0.5, shard_size=SHARD)
    local = merge(models, tmp_path / "local", **kwargs)
    out = tmp_path / "ray"
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(
        target=_kill_first_writer, args=(out.with_name("ray.mmerge-partial"), killed, stop)
    )
    cluster.touch()
    watcher.start()
    try:
        remote = merge(models, out, executor="ray", **kwargs)
    finally:
        stop.set()
        watcher.join()
        cluster.unlink()
    assert killed, "no worker was caught writing a shard"
    assert contents(remote.output) == contents(local.output)


DRIVER = """
import sys, ray
from mmerge.engine.api import merge
address, out, base, ft1, ft2, shard, hooks, marker = sys.argv[1:]
env = {"PYTHONPATH": hooks, "MMERGE_TEST_SLOW_MARKER": marker}
hook = {"worker_process_setup_hook": "ray_slow.install", "env_vars": env}
ray.init(address=address, log_to_driver=False, runtime_env=hook)
merge([ft1, ft2], out, method="ties", base=base, density=0.5, shard_size=int(shard),
      executor="ray")
"""


def test_driver_killed_then_resume(cluster, family, tmp_path):
    models = [family["ft1"], family["ft2"]]
    kwargs = dict(method="ties", base=family["base"], density=0.5, shard_size=SHARD)
    local = merge(models, tmp_path / "local", **kwargs)
    out = tmp_path / "ray"
    journal = out.with_name("ray.mmerge-journal")
    address = ray.get_runtime_context().gcs_address
    args = [address, out, family["base"], family["ft1"], family["ft2"], SHARD, HERE, cluster]
    cluster.touch()
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None:
            if journal.exists() and journal.read_bytes().count(b'"shard"') >= 2:
                break
            time.sleep(0.01)
        assert driver.poll() is None, "the driver ended before a shard was recorded"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        cluster.unlink()
    recorded = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    shards = [r["shard"] for r in recorded if isinstance(r, dict)]
    partial = out.with_name("ray.mmerge-partial")
    assert not out.exists() and len(shards) >= 2
    damaged, kept = shards[0], shards[1:]
    with open(partial / damaged, "r+b") as f:  # no longer what the journal recorded
        f.seek(-2, os.SEEK_END)
        f.write(b"\x7f\x7f")
    inodes = {name: (partial / name).stat().st_ino for name in shards}
    remote = merge(models, out, executor="ray", resume=True, **kwargs)
    assert contents(remote.output) == contents(local.output)
    after = {name: (out / name).stat().st_ino for name in shards}
    assert {n: after[n] for n in kept} == {n: inodes[n] for n in kept}  # verified: kept
    assert after[damaged] != inodes[damaged]  # failed verification: written again
    assert not list(out.glob(".*.tmp"))


def test_an_error_in_a_task_is_the_local_runs_error(cluster, family, tmp_path):
    kwargs = dict(method="linear", normalize=False, model_params=[{"weight": 1e6}] * 2)
    kwargs.update(out_dtype="float16", shard_size=SHARD)
    models = [family["ft1"], family["ft2"]]
    with pytest.raises(MmergeError) as local:
        merge(models, tmp_path / "local", **kwargs)
    with pytest.raises(MmergeError) as remote:
        merge(models, tmp_path / "ray", executor="ray", **kwargs)
    assert type(remote.value) is type(local.value)  # the first failing tensor may differ
    assert "does not fit F16" in str(local.value) and "does not fit F16" in str(remote.value)
    assert "\n" not in str(remote.value)
    assert not (tmp_path / "ray").exists()
    assert not list(tmp_path.glob("ray.mmerge-partial/.*.tmp"))


def test_without_ray_one_clear_error(family, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InvalidInput, match=r"pip install 'mmerge\[ray\]'"):
        merge([family["ft1"], family["ft2"]], tmp_path / "out", executor="ray")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(executor="dask"), "executor must be one of local, ray, got 'dask'"),
        (dict(ray_address="auto"), "a Ray address needs the ray executor"),
    ],
)
def test_executor_options_refused(family, tmp_path, options, message):
    with pytest.raises(InvalidInput, match=message):
        merge([family["ft1"], family["ft2"]], tmp_path / "out", **options)
    assert not list(tmp_path.iterdir())


def test_importing_mmerge_does_not_import_ray():
    code = "import sys, mmerge, mmerge.cli, mmerge.engine.api; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
