"""The Ray executor on a cluster of two nodes started with `ray start` (a head and a second
node, one CPU each, on this machine), driven by the command line's --executor ray
--ray-address: a merge and a LoRA apply give the same bytes as the local executor."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import contents

from mmerge.testing import random_adapter, write_model_family

pytest.importorskip("ray", reason="Ray is not installed (pip install 'mmerge[ray]')")

BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a test cluster on this machine only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _start(args: list, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, env=ENV, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    """HOST:PORT of a head node and a second node, stopped (by their pids) afterwards."""
    port = _free_port()
    where = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats", "--block"]
    head = [BIN / "ray", "start", "--head", f"--port={port}", "--include-dashboard=false"]
    node = [BIN / "ray", "start", f"--address={where}"]
    count = f"import ray; ray.init(address={where!r}); print(sum(n['Alive'] for n in ray.nodes()))"
    logs = tmp_path_factory.mktemp("ray-nodes")
    started = [_start([*head, *common], logs / "head")]
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            time.sleep(1)
            if len(started) == 1 and "Ray runtime started" in (logs / "head").read_text():
                started.append(_start([*node, *common], logs / "node"))
            if len(started) == 2 and _python(count) == "2":
                break
        else:
            pytest.fail("the two-node Ray cluster did not start: " + (logs / "head").read_text())
        yield where
    finally:
        for p in reversed(started):
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_model_family(
        tmp_path_factory.mktemp("family"), hidden=64, intermediate=96, layers=2, vocab=128
    )


def mmerge(*args) -> None:
    out = subprocess.run(
        [BIN / "mmerge", *map(str, args), "-q"], capture_output=True, text=True, env=ENV
    )
    assert out.returncode == 0, out.stderr


def test_two_nodes_merge_and_lora_apply(address, family, tmp_path):
    ties = ["ties", "--density", "0.5", "-p", "scope=model", "--base", family["base"]]
    for name, executor in [("local", []), ("ray", ["--executor", "ray", "--ray-address", address])]:
        mmerge(
            "stream",
            family["ft1"],
            family["ft2"],
            "-m",
            *ties,
            "--shard-size",
            "20KB",
            "-o",
            tmp_path / f"ties-{name}",
            *executor,
        )
    assert contents(tmp_path / "ties-ray") == contents(tmp_path / "ties-local")
    adapter = random_adapter(family["base"], tmp_path / "adapter", rank=4, scale=0.2)
    for name, executor in [("local", []), ("ray", ["--executor", "ray", "--ray-address", address])]:
        mmerge(
            "lora",
            "apply",
            family["base"],
            adapter,
            "--shard-size",
            "20KB",
            "-o",
            tmp_path / f"lora-{name}",
            *executor,
        )
    assert contents(tmp_path / "lora-ray") == contents(tmp_path / "lora-local")
