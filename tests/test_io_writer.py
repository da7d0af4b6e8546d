"""The streaming writer: layouts, sharding, header bytes, chunked writes, safety checks,
atomic commit, abort and resume."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
import time
from collections import namedtuple
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from mmerge.errors import InvalidInput, MmergeError
from mmerge.io import StreamingWriter, TensorSpec, open_checkpoint
from mmerge.io import flusher as flusher_module
from mmerge.io import journal as journal_module
from mmerge.io import output_path as output_path_module
from mmerge.io import writer as writer_module
from mmerge.io.adapter_writer import AdapterFolder

SPECS = [
    TensorSpec("emb", "F32", (10, 4)),
    TensorSpec("big", "F32", (100,)),
    TensorSpec("bias", "BF16", (4,)),
    TensorSpec("ids", "I64", (3,)),
]


def values(spec: TensorSpec) -> np.ndarray:
    return np.arange(spec.numel, dtype=np.float32).reshape(spec.shape) + len(spec.name)


def write_all(w: StreamingWriter, names=None) -> None:
    for spec in w.specs:
        if names is None or spec.name in names:
            w.write(spec.name, values(spec))
            w.finish_tensor(spec.name)


def finished_output(path, **kw):
    with StreamingWriter(path, SPECS, **kw) as w:
        write_all(w)
    return path


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- layouts -------------------------------------------------------------------------------


def test_single_file_layout(tmp_path):
    out = finished_output(tmp_path / "m.safetensors")
    assert leftovers(tmp_path) == ["m.safetensors"]
    loaded = safetensors.numpy.load_file(out)
    np.testing.assert_array_equal(loaded["emb"], values(SPECS[0]))
    np.testing.assert_array_equal(loaded["ids"], [3, 4, 5])


def test_folder_layout_always_has_an_index(tmp_path):
    out = finished_output(tmp_path / "m")
    assert leftovers(out) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 160 + 400 + 8 + 24
    assert list(index["weight_map"]) == ["emb", "big", "bias", "ids"]


def test_shard_size_splits_in_order_and_big_tensors_get_their_own(tmp_path):
    out = finished_output(tmp_path / "m", shard_size=200)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_of = {n: int(f[6:11]) for n, f in index["weight_map"].items()}
    assert shard_of == {"emb": 1, "big": 2, "bias": 3, "ids": 3}
    assert all(f.endswith("-of-00003.safetensors") for f in index["weight_map"].values())
    with open_checkpoint(out) as c:
        assert list(c) == ["emb", "big", "bias", "ids"]
        np.testing.assert_array_equal(c["big"].to_numpy(), values(SPECS[1]))


def test_layout_choice(tmp_path):
    assert StreamingWriter(tmp_path / "a.safetensors", SPECS).layout == "file"
    assert StreamingWriter(tmp_path / "b", SPECS).layout == "folder"
    assert StreamingWriter(tmp_path / "c.safetensors", SPECS, shard_size=10**6).layout == "folder"
    assert StreamingWriter(tmp_path / "d", SPECS, layout="file").layout == "file"
    with pytest.raises(InvalidInput, match="shard_size needs a folder"):
        StreamingWriter(tmp_path / "e", SPECS, layout="file", shard_size=10)
    with pytest.raises(InvalidInput, match="layout must be"):
        StreamingWriter(tmp_path / "f", SPECS, layout="zip")
    with pytest.raises(InvalidInput, match="shard_size must be"):
        StreamingWriter(tmp_path / "g", SPECS, shard_size=0)


def test_header_bytes(tmp_path):
    out = finished_output(tmp_path / "m.safetensors", metadata={"mmerge.method": "linear"})
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n]
    assert n % 8 == 0 and text == text.rstrip(b" ") + b" " * (n - len(text.rstrip(b" ")))
    header = json.loads(text)
    assert list(header) == ["__metadata__", "emb", "big", "bias", "ids"]
    assert header["__metadata__"] == {"format": "pt", "mmerge.method": "linear"}
    assert header["emb"]["data_offsets"] == [0, 160]
    assert header["big"]["data_offsets"] == [160, 560]
    assert len(raw) == 8 + n + 592


@pytest.mark.parametrize("metadata", [{"k": 1}, {"k": None}, {1: "v"}, ["k"]])
def test_metadata_must_be_strings(tmp_path, metadata):
    with pytest.raises(TypeError, match="metadata must"):
        StreamingWriter(tmp_path / "m.safetensors", SPECS, metadata=metadata)
    assert leftovers(tmp_path) == []


def test_spec_validation(tmp_path):
    with pytest.raises(InvalidInput, match="unknown safetensors dtype"):
        TensorSpec("a", "F128", (1,))
    with pytest.raises(InvalidInput, match="shape"):
        TensorSpec("a", "F32", (-1,))
    with pytest.raises(InvalidInput, match="invalid tensor name"):
        TensorSpec("__metadata__", "F32", (1,))
    with pytest.raises(InvalidInput, match="not valid Unicode"):
        TensorSpec("bad\udc80", "F32", (1,))
    assert TensorSpec("a", "F32", [2, 3]).shape == (2, 3)
    with pytest.raises(InvalidInput, match="listed twice"):
        StreamingWriter(tmp_path / "m.safetensors", [SPECS[0], SPECS[0]])


def test_no_tensors(tmp_path):
    with StreamingWriter(tmp_path / "e.safetensors", []):
        pass
    assert safetensors.numpy.load_file(tmp_path / "e.safetensors") == {}


# -- writing -------------------------------------------------------------------------------


def test_chunked_writes_in_any_order(tmp_path):
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    specs = [TensorSpec("a", "BF16", (10, 10)), TensorSpec("b", "F32", (100,))]
    with StreamingWriter(tmp_path / "m.safetensors", specs) as w:
        for start in (90, 0, 30, 60):
            w.write("b", x[start : start + 30], start=start)
        w.write("a", x[50:].astype(np.float64), start=50)
        w.write("a", x[:50].reshape(5, 10))
        w.finish_tensor("b")
        w.finish_tensor("a")
    with open_checkpoint(tmp_path / "m.safetensors") as c:
        np.testing.assert_array_equal(c["b"].to_numpy(), x)
        bf = x.reshape(10, 10).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(c["a"].to_numpy(), bf)


def test_write_errors(tmp_path):
    w = StreamingWriter(tmp_path / "m.safetensors", SPECS)
    with pytest.raises(InvalidInput, match="not one of the output's tensors"):
        w.write("nope", np.zeros(1))
    with pytest.raises(InvalidInput, match="runs outside"):
        w.write("ids", np.zeros(3), start=1)
    with pytest.raises(InvalidInput, match="runs outside"):
        w.write("ids", np.zeros(1), start=-1)
    with pytest.raises(InvalidInput, match="cannot write an array of dtype"):
        w.write("ids", np.zeros(3, np.complex64))
    w.write("ids", np.zeros(2))
    with pytest.raises(InvalidInput, match="only 2 of 3"):
        w.finish_tensor("ids")
    with pytest.raises(InvalidInput, match="tensors not written: 'emb', 'big', 'bias' and 1 more"):
        w.commit()
    assert not (tmp_path / "m.safetensors").exists()
    w.abort()
    assert leftovers(tmp_path) == []
    with pytest.raises(InvalidInput, match="already committed or aborted"):
        w.write("ids", np.zeros(3))


def test_add_file(tmp_path):
    src = tmp_path / "config.json"
    src.write_text("{}")
    with StreamingWriter(tmp_path / "out", SPECS) as w:
        write_all(w)
        w.add_file(src)
        w.add_file(src, "tokenizer_config.json")
        for bad in ("../x", "a/b", "model-00001-of-00001.safetensors", ".."):
            with pytest.raises(InvalidInput):
                w.add_file(src, bad)
    assert {"config.json", "tokenizer_config.json"} <= set(leftovers(tmp_path / "out"))
    w = StreamingWriter(tmp_path / "m.safetensors", SPECS)
    with pytest.raises(InvalidInput, match="only a folder output"):
        w.add_file(src)
    w.abort()


# -- safety --------------------------------------------------------------------------------


def test_refuses_to_write_over_inputs(tmp_path):
    model = finished_output(tmp_path / "in")
    single = finished_output(tmp_path / "in.safetensors")
    os.link(single, tmp_path / "hard.safetensors")
    cases = [
        (tmp_path / "in", [model]),
        (tmp_path / "in" / "sub.safetensors", [model]),
        (tmp_path, [model]),
        (tmp_path / "in.safetensors", [str(single)]),
        (tmp_path / "hard.safetensors", [single]),
    ]
    for out, inputs in cases:
        with pytest.raises(InvalidInput, match="refusing to write"):
            StreamingWriter(out, SPECS, inputs=inputs)
    assert not list(tmp_path.glob("*.mmerge-*"))


def test_replaces_an_earlier_output_only_when_asked(tmp_path):
    for out in (tmp_path / "m.safetensors", tmp_path / "m"):
        finished_output(out, metadata={"run": "1"})
        with pytest.raises(InvalidInput, match="already exists.*--overwrite"):
            finished_output(out, metadata={"run": "2"})
        with open_checkpoint(out) as c:
            assert c.metadata["run"] == "1"
        finished_output(out, metadata={"run": "2"}, overwrite=True)
        with open_checkpoint(out) as c:
            assert c.metadata["run"] == "2"
    assert leftovers(tmp_path) == ["m", "m.safetensors"]


def test_never_replaces_a_users_model_folder_unasked(tmp_path):
    user = finished_output(tmp_path / "my-model")
    (user / "README.md").write_text("my notes")
    (user / "LICENSE").write_text("mine")
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    with pytest.raises(InvalidInput, match="already exists"):
        StreamingWriter(user, SPECS)
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before
    assert leftovers(tmp_path) == ["my-model"]


def test_old_output_stays_whole_until_the_new_one_is_complete(tmp_path):
    out = finished_output(tmp_path / "m", metadata={"run": "1"})
    with StreamingWriter(out, SPECS, metadata={"run": "2"}, overwrite=True) as w:
        write_all(w)
        with open_checkpoint(out) as c:  # everything written, not committed: old one intact
            assert c.metadata["run"] == "1"
    with open_checkpoint(out) as c:
        assert c.metadata["run"] == "2"


def test_file_output_over_an_earlier_folder_output(tmp_path):
    finished_output(tmp_path / "m", layout="folder")
    finished_output(tmp_path / "m", layout="file", overwrite=True)
    assert (tmp_path / "m").is_file() and leftovers(tmp_path) == ["m"]


def test_refuses_to_replace_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("precious")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "sub").mkdir()
    (tmp_path / "tree" / "a.safetensors").write_bytes(b"")
    (tmp_path / "notes").write_text("precious")
    for name in ("docs", "tree", "notes"):
        with pytest.raises(InvalidInput, match="refusing to replace"):
            StreamingWriter(tmp_path / name, SPECS, overwrite=True)
        with pytest.raises(InvalidInput, match="already exists"):
            StreamingWriter(tmp_path / name, SPECS)
    assert (tmp_path / "docs" / "notes.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    StreamingWriter(tmp_path / "empty", SPECS).abort()  # an absent or empty folder is fine
    finished_output(tmp_path / "empty.safetensors")
    (tmp_path / "empty2").mkdir()
    finished_output(tmp_path / "empty2", layout="file")
    assert (tmp_path / "empty2").is_file()


@pytest.mark.parametrize("name", ["m", "m.safetensors"])
def test_a_failed_final_rename_keeps_the_old_output(tmp_path, monkeypatch, name):
    out = finished_output(tmp_path / name, metadata={"run": "1"})
    real = output_path_module.os.replace

    def failing(src, dst):
        if str(src).endswith(".mmerge-partial"):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(output_path_module.os, "replace", failing)
    with (
        pytest.raises(OSError, match="Input/output error"),
        StreamingWriter(out, SPECS, metadata={"run": "2"}, overwrite=True) as w,
    ):
        write_all(w)
    monkeypatch.setattr(output_path_module.os, "replace", real)
    with open_checkpoint(out) as c:
        assert c.metadata["run"] == "1"
    assert not list(tmp_path.glob("*.mmerge-old*"))
    with StreamingWriter(out, SPECS, metadata={"run": "2"}, overwrite=True, resume=True) as w:
        assert w.pending() == []  # the finished partial output is kept for --resume
    with open_checkpoint(out) as c:
        assert c.metadata["run"] == "2"
    assert leftovers(tmp_path) == [name]


def test_output_that_appears_during_the_merge_is_not_replaced(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(InvalidInput, match="already exists"), StreamingWriter(out, SPECS) as w:
        write_all(w)
        finished_output(tmp_path / "m", metadata={"run": "other"})
    with open_checkpoint(out) as c:
        assert c.metadata["run"] == "other"


def test_checks_free_disk_space_first(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda p: usage(10**6, 10**6, 100))
    with pytest.raises(MmergeError, match="not enough disk space"):
        StreamingWriter(tmp_path / "m.safetensors", SPECS)
    assert leftovers(tmp_path) == []


def test_space_check_counts_index_journal_and_added_files(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    probe = StreamingWriter(tmp_path / "probe", SPECS, shard_size=200)
    shards = sum(s.size for s in probe._shards)
    probe.abort()
    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda p: usage(0, 0, shards))
    with pytest.raises(MmergeError, match=r"not enough disk space in .*the output needs"):
        StreamingWriter(tmp_path / "m", SPECS, shard_size=200)
    free = shards + 10**5
    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda p: usage(0, 0, free))
    StreamingWriter(tmp_path / "m", SPECS, shard_size=200).abort()
    with pytest.raises(MmergeError, match="not enough disk space"):
        StreamingWriter(tmp_path / "m", SPECS, shard_size=200, reserve_bytes=10**5)
    assert leftovers(tmp_path) == []


def test_full_disk_while_starting_the_journal_leaves_nothing(tmp_path, monkeypatch):
    def full(self, data):
        Path.open(self, "wb").close()  # the temp file exists when the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module.Path, "write_bytes", full)
    with pytest.raises(MmergeError, match=r"not enough disk space in .*needs .* GB"):
        StreamingWriter(tmp_path / "m", SPECS)
    assert leftovers(tmp_path) == []


def test_unwritable_output_folder_names_the_output(tmp_path, monkeypatch):
    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(writer_module.os, "open", denied)
    with pytest.raises(MmergeError) as info:
        StreamingWriter(tmp_path / "m.safetensors", SPECS)
    message = str(info.value)
    assert "cannot write the output" in message and str(tmp_path / "m.safetensors") in message
    assert "mmerge-" not in message
    assert leftovers(tmp_path) == []


def test_full_disk_during_preallocation_is_a_clear_error(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module.os, "posix_fallocate", full, raising=False)
    with pytest.raises(MmergeError, match="not enough disk space"):
        StreamingWriter(tmp_path / "m", SPECS, shard_size=200)
    assert leftovers(tmp_path) == []


def test_unfinished_with_block_keeps_the_partial_output(tmp_path):
    with (
        pytest.raises(InvalidInput, match="tensors not written"),
        StreamingWriter(tmp_path / "m.safetensors", SPECS) as w,
    ):
        write_all(w, {"emb"})
    assert leftovers(tmp_path) == ["m.safetensors.mmerge-journal", "m.safetensors.mmerge-partial"]
    with StreamingWriter(tmp_path / "m.safetensors", SPECS, resume=True) as w:
        assert w.pending() == ["big", "bias", "ids"]
        write_all(w, set(w.pending()))
    assert leftovers(tmp_path) == ["m.safetensors"]


# -- interruption and resume ---------------------------------------------------------------


def interrupted(out, names, **kw):
    """A `with` block that finishes `names`, writes half of another tensor, then fails."""
    with pytest.raises(RuntimeError), StreamingWriter(out, SPECS, **kw) as w:
        write_all(w, names)
        w.write("ids", np.zeros(1))
        raise RuntimeError("interrupted")


def test_exception_keeps_partial_and_journal_never_the_final_name(tmp_path):
    interrupted(tmp_path / "m", {"emb", "bias"})
    assert leftovers(tmp_path) == ["m.mmerge-journal", "m.mmerge-partial"]


@pytest.mark.parametrize("name", ["m.safetensors", "m"])
def test_resume_finishes_and_matches_a_clean_run(tmp_path, name):
    clean = finished_output(tmp_path / "clean" / name, shard_size=200 if name == "m" else None)
    out = tmp_path / "run" / name
    kw = {"shard_size": 200} if name == "m" else {}
    interrupted(out, {"emb", "bias"}, **kw)
    with StreamingWriter(out, SPECS, resume=True, **kw) as w:
        assert w.pending() == ["big", "ids"]
        write_all(w, set(w.pending()))
    assert leftovers(tmp_path / "run") == [name]
    if name == "m":
        assert leftovers(out) == leftovers(clean)
        pairs = [(out / f, clean / f) for f in leftovers(out)]
    else:
        pairs = [(out, clean)]
    for a, b in pairs:
        assert a.read_bytes() == b.read_bytes()


def test_resume_with_another_layout_starts_afresh(tmp_path):
    out = tmp_path / "m.safetensors"
    interrupted(out, {"emb"}, metadata={"t": "0.5"})
    w = StreamingWriter(out, SPECS, resume=True, metadata={"t": "0.7"})
    assert w.pending() == [s.name for s in SPECS]
    w.abort()


def test_resume_false_discards_the_partial_output(tmp_path):
    out = tmp_path / "m.safetensors"
    interrupted(out, {"emb"})
    w = StreamingWriter(out, SPECS)
    assert w.pending() == [s.name for s in SPECS]
    w.abort()
    assert leftovers(tmp_path) == []


def test_resume_refuses_an_input_replaced_by_another_with_the_same_header(tmp_path):
    src = finished_output(tmp_path / "in.safetensors")
    other = tmp_path / "other.safetensors"
    with StreamingWriter(other, SPECS) as w:
        for spec in SPECS:
            w.write(spec.name, values(spec) * 2)
            w.finish_tensor(spec.name)
    assert src.read_bytes()[:100] == other.read_bytes()[:100]  # same header
    out = tmp_path / "m.safetensors"
    interrupted(out, {"emb"}, inputs=[src])
    os.replace(other, src)
    with pytest.raises(InvalidInput, match=r"cannot resume: .*in.safetensors changed"):
        StreamingWriter(out, SPECS, resume=True, inputs=[src])
    assert "m.safetensors.mmerge-partial" in leftovers(tmp_path)  # kept, not mixed in
    StreamingWriter(out, SPECS, inputs=[src]).abort()  # without --resume: starts over


def test_resume_after_a_reboot_starts_afresh(tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    interrupted(out, {"emb"})
    monkeypatch.setattr(journal_module, "boot_id", lambda: "another-boot")
    w = StreamingWriter(out, SPECS, resume=True)
    assert w.pending() == [s.name for s in SPECS]
    w.abort()


def test_resume_ignores_a_torn_journal_line_and_a_damaged_partial(tmp_path):
    out = tmp_path / "m.safetensors"
    interrupted(out, {"emb", "big"})
    journal = tmp_path / "m.safetensors.mmerge-journal"
    journal.write_bytes(journal.read_bytes()[:-3])  # "big" line cut short
    w = StreamingWriter(out, SPECS, resume=True)
    assert w.pending() == ["big", "bias", "ids"]
    w.abort()
    interrupted(out, {"emb"})
    partial = tmp_path / "m.safetensors.mmerge-partial"
    with open(partial, "r+b") as f:
        f.truncate(100)
    w = StreamingWriter(out, SPECS, resume=True)
    assert w.pending() == [s.name for s in SPECS]
    w.abort()


def test_abort_removes_everything(tmp_path):
    interrupted(tmp_path / "m", {"emb"})
    w = StreamingWriter(tmp_path / "m", SPECS, resume=True)
    w.abort()
    assert leftovers(tmp_path) == []


def test_committed_output_replaces_atomically_without_leftovers(tmp_path):
    out = finished_output(tmp_path / "m")
    shutil.copytree(out, tmp_path / "before")
    finished_output(out, overwrite=True)
    assert leftovers(tmp_path) == ["before", "m"]


# -- write-back while writing ------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def eventually(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def flushing() -> bool:
    return any(t.name == "mmerge-flush" for t in threading.enumerate())


@pytest.fixture
def syncs(monkeypatch):
    """Syncs of output files by the write-back thread (FLUSH_BYTES lowered to 100 bytes)."""
    monkeypatch.setattr(flusher_module, "FLUSH_BYTES", 100)
    done = []
    real = flusher_module._sync

    def sync(fd):
        real(fd)
        done.append(fd)

    monkeypatch.setattr(flusher_module, "_sync", sync)
    return done


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_the_output_is_written_back_while_tensors_are_still_written(tmp_path, syncs):
    before = open_fds()
    with StreamingWriter(tmp_path / "m", SPECS, shard_size=200) as w:
        w.write("bias", values(SPECS[2]))  # 8 bytes: not enough to start a write-back
        assert not flushing() and syncs == []
        w.write("emb", values(SPECS[0]))  # 160 bytes: its file is synced in the background
        assert eventually(lambda: len(syncs) == 1)
        write_all(w)
    assert not flushing() and open_fds() == before
    with open_checkpoint(tmp_path / "m") as c:
        for spec in SPECS:
            np.testing.assert_array_equal(c[spec.name].to_numpy(), values(spec))


def test_a_failed_write_back_fails_the_commit_and_keeps_the_partial_output(tmp_path, monkeypatch):
    """The kernel reports a write-back error to one sync only: the thread's must reach the
    commit, or the output would be renamed into place with bytes the disk lost."""
    monkeypatch.setattr(flusher_module, "FLUSH_BYTES", 100)
    failed = threading.Event()

    def failing(fd):
        failed.set()
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(flusher_module, "_sync", failing)
    out = tmp_path / "m.safetensors"
    with (
        pytest.raises(MmergeError, match=rf"cannot write the output {out}: Input/output error"),
        StreamingWriter(out, SPECS) as w,
    ):
        write_all(w)
        assert failed.wait(5)  # the commit's own fsync would succeed: the error is the thread's
    assert leftovers(tmp_path) == ["m.safetensors.mmerge-journal", "m.safetensors.mmerge-partial"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_an_abandoned_merge_does_not_wait_for_a_write_back_under_way(tmp_path, monkeypatch):
    monkeypatch.setattr(flusher_module, "FLUSH_BYTES", 100)
    started, release = threading.Event(), threading.Event()

    def slow(fd):
        started.set()
        release.wait(10)

    monkeypatch.setattr(flusher_module, "_sync", slow)
    before = open_fds()
    w = StreamingWriter(tmp_path / "m.safetensors", SPECS)
    w.write("emb", values(SPECS[0]))
    assert started.wait(5)
    begun = time.monotonic()
    w.abort()
    assert time.monotonic() - begun < 1 and leftovers(tmp_path) == []
    release.set()
    assert eventually(lambda: open_fds() == before and not flushing())


def test_scratch_files_are_not_written_back(tmp_path, syncs):
    """A scratch file (LoRA extraction's stage) is deleted before any commit: resuming needs
    only the page cache, so its bytes are never sent to the disk on purpose."""
    folder = AdapterFolder(tmp_path / "adapter")
    scratch = folder.scratch("stage.safetensors", SPECS, {})
    scratch.write("emb", values(SPECS[0]))
    with StreamingWriter(tmp_path / "m.safetensors", SPECS, write_back=False) as w:
        write_all(w)
    assert not eventually(lambda: syncs, 0.3) and not flushing()
    folder.close()
