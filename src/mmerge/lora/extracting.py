"""`lora extract`: a PEFT adapter approximating a fine-tune as its base plus low-rank deltas.

Each weight matrix's delta FT - BASE is formed a row block at a time from the memory maps (and
kept only while it fits a small budget) and factored by randomized SVD: a Gaussian test matrix
from mmerge's counter RNG (so every backend starts from the same numbers), oversampling, power
iterations with re-orthonormalisation, and the SVD of a small square core. The rank of each
module follows a rule (fixed, epsilon, energy). Changed tensors that are not weight matrices go
to modules_to_save when their module has no LoRA layer, and are reported otherwise.

Two phases, both resumable: the factors at the largest rank, their singular values and each
delta's squared norm go to a scratch file in the partial output; then the ranks are chosen and
the adapter written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmerge.errors import InvalidInput, PlanError
from mmerge.io.adapter import PREFIX, factor_keys, peft_config
from mmerge.io.layout import TensorSpec
from mmerge.lora.result import AdapterResult, ModuleReport, factor_dtype, rank_settings
from mmerge.methods import lora as math_lora

PathLike = str | os.PathLike
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
EMBEDDING_MODULES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
HEAD_MODULES = ("lm_head", "embed_out")
BLOCK_ELEMENTS = 1 << 20  # elements of the delta formed at once
CACHE_BYTES = 512 << 20  # deltas of all workers kept between passes, in total
STAGE_NAME = "extract-stage.safetensors"
DEFAULT_POWER_ITERS = 1
DEFAULT_OVERSAMPLE = 10


@dataclass(frozen=True)
class _Matrix:
    """A weight matrix extracted as a LoRA layer."""

    name: str
    module: str
    kind: str  # "linear" or "embedding"
    shape: tuple[int, int]
    rank: int  # the largest rank kept (min(R, m, n))
    width: int  # columns of the test matrix


def _module_of(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def _classify(name: str, shape: tuple, embed: bool) -> str | None:
    """'linear', 'embedding', or None (not a LoRA candidate) for a float tensor."""
    module, param = _module_of(name)
    if len(shape) != 2 or param != "weight" or not module or 0 in shape:
        return None
    last = module.split(".")[-1]
    if last in EMBEDDING_MODULES:
        return "embedding" if embed else None
    if last in HEAD_MODULES:
        return "linear" if embed else None
    return "linear"


def _selected(name: str, include: str | None, exclude: str | None) -> bool:
    try:
        if include is not None and not re.search(include, name):
            return False
        return not (exclude is not None and re.search(exclude, name))
    except re.error as exc:
        raise InvalidInput(f"invalid regular expression: {exc}") from None


def _plan(base, ft, rank, oversample, embed, include, exclude):
    """(matrices, other tensors) to extract, after checking FT against BASE from headers."""
    missing = [n for n in base if n not in ft]
    extra = [n for n in ft if n not in base]
    if extra:
        raise PlanError(f"tensor {extra[0]!r} of the fine-tune is not in the base")
    if missing:
        raise PlanError(f"tensor {missing[0]!r} of the base is not in the fine-tune")
    matrices, others = [], []
    for name, b in base.items():
        f = ft[name]
        if tuple(b.shape) != tuple(f.shape):
            raise PlanError(
                f"tensor {name!r} has shape {tuple(f.shape)} in the fine-tune and "
                f"{tuple(b.shape)} in the base (resized vocabularies are not supported)"
            )
        if not _selected(name, include, exclude):
            continue
        floats = b.dtype in FLOAT_CODES and f.dtype in FLOAT_CODES
        kind = _classify(name, tuple(b.shape), embed) if floats else None
        if kind is None:
            others.append(name)
            continue
        m, n = b.shape
        k = min(rank, m, n)
        width = math_lora.sketch_width(k, oversample, (m, n))
        matrices.append(_Matrix(name, _module_of(name)[0], kind, (m, n), k, width))
    return matrices, others


def _stage_specs(matrices: Sequence[_Matrix], others: Sequence[str]) -> list[TensorSpec]:
    specs = []
    for mat in matrices:
        m, n = mat.shape
        specs += [
            TensorSpec(mat.name + ".left", "F32", (m, mat.rank)),
            TensorSpec(mat.name + ".right", "F32", (mat.rank, n)),
            TensorSpec(mat.name + ".s", "F32", (mat.width,)),
            TensorSpec(mat.name + ".sumsq", "F64", (1,)),
        ]
    specs += [TensorSpec(name + ".changed", "U8", (1,)) for name in others]
    return specs


class _Delta:
    """FT - BASE of one matrix on the backend, formed a row block at a time from the memory
    maps. A delta that fits `cache_bytes` is assembled once and kept as one matrix for the
    later passes; a larger one is formed again, block by block, on every pass."""

    def __init__(self, base_ref, ft_ref, shape, put: Callable, cache_bytes: int):
        self.base, self.ft, self.put = base_ref, ft_ref, put
        self.m, self.n = shape
        self.step = max(1, BLOCK_ELEMENTS // max(self.n, 1))
        self.keep = 4 * self.m * self.n <= cache_bytes
        self.whole = None  # the kept delta, on the backend
        self.measured = False  # the first pass sums the squares
        self.sumsq = 0.0

    def _blocks(self, into: np.ndarray | None = None):
        """(r0, r1, host block) over the rows; the blocks are views of `into` when given."""
        ft_buf, base_buf = _scratch(0, self.step * self.n), _scratch(1, self.step * self.n)
        for r0 in range(0, self.m, self.step):
            r1 = min(self.m, r0 + self.step)
            s, e = r0 * self.n, r1 * self.n
            out = None if into is None else into[r0:r1].reshape(-1)
            ft = self.ft.read_float32(s, e, out=ft_buf[: e - s])
            d = np.subtract(ft, self.base.read_float32(s, e, out=base_buf[: e - s]), out=out)
            if not self.measured:
                self.sumsq += float(np.dot(d, d))
            yield r0, r1, d.reshape(r1 - r0, self.n)
        self.measured = True
        self.base.release()
        self.ft.release()

    def _kept(self):
        if self.whole is None and self.keep:
            host = np.empty((self.m, self.n), np.float32)
            for _ in self._blocks(host):
                pass
            self.whole = self.put(host)
        return self.whole

    def matmul(self, xp, x):
        whole = self._kept()
        if whole is not None:
            return xp.matmul(whole, x)
        return xp.concat([xp.matmul(self.put(d), x) for _, _, d in self._blocks()], axis=0)

    def rmatmul(self, xp, y):
        whole = self._kept()
        if whole is not None:
            return xp.matmul(xp.matrix_transpose(whole), y)
        total = None
        for r0, r1, d in self._blocks():
            part = xp.matmul(xp.matrix_transpose(self.put(d)), y[r0:r1, :])
            total = part if total is None else total + part
        return total


_local = threading.local()


def _scratch(slot: int, n: int) -> np.ndarray:
    """A float32 buffer of at least n elements owned by this thread, reused across blocks (a
    fresh multi-megabyte array per block costs page faults)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(slot)
    if buf is None or buf.size < n:
        buf = buffers[slot] = np.empty(n, np.float32)
    return buf


@functools.lru_cache(maxsize=8)
def _test_matrix(n: int, width: int, seed: int) -> np.ndarray:
    """The Gaussian test matrix of every n-column matrix (from the counter RNG, so every backend
    starts from the same numbers; one per shape, as the sketch need not differ per tensor)."""
    from mmerge.backend.rng import gaussian

    omega = gaussian((n, width), seed=seed, name=f"mmerge.lora.sketch.{n}x{width}")
    omega.flags.writeable = False
    return omega


def _extract_matrix(mat, base_ref, ft_ref, put, seed, power_iters, cache_bytes):
    """(left, right, singular values, squared norm) of one matrix's delta, on the host."""
    from mmerge.backend import namespace
    from mmerge.backend.transfer import to_host

    delta = _Delta(base_ref, ft_ref, mat.shape, put, cache_bytes)
    omega = put(_test_matrix(mat.shape[1], mat.width, seed))
    xp = namespace(omega)
    y = delta.matmul(xp, omega)  # the first pass also sums the squares
    if delta.sumsq == 0.0:
        m, n = mat.shape
        zeros = np.zeros
        return zeros((m, mat.rank)), zeros((mat.rank, n)), zeros(mat.width), 0.0
    first = [y]

    def matmul(x):
        return first.pop() if first else delta.matmul(xp, x)

    low = math_lora.randomized_svd(
        xp, matmul, lambda y_: delta.rmatmul(xp, y_), omega, mat.rank, power_iters=power_iters
    )
    s = np.zeros(mat.width, np.float32)
    values = to_host(low.singular_values)
    s[: values.shape[0]] = values
    return to_host(low.left), to_host(low.right), s, delta.sumsq


def _changed(base_ref, ft_ref) -> bool:
    if base_ref.dtype == ft_ref.dtype:
        return not np.array_equal(base_ref.raw(), ft_ref.raw())
    return not np.array_equal(base_ref.read_float32(), ft_ref.read_float32())


def _stage_key(base, ft, options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    h.update(base.header_digest().encode() + ft.header_digest().encode())
    return h.hexdigest()


def extract(
    base: PathLike,
    finetuned: PathLike,
    output: PathLike,
    *,
    rank: int,
    rank_rule: str = "fixed",
    epsilon: float = 0.01,
    energy: float = 0.99,
    embed: bool = False,
    include: str | None = None,
    exclude: str | None = None,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = 0,
    backend: str = "numpy",
    device: str | None = None,
    out_dtype: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> AdapterResult:
    """Extract a PEFT LoRA adapter (a folder) with FT ~ BASE + B A on every weight matrix.

    `rank` is the largest rank; `rank_rule` keeps all of it (fixed), the singular values of at
    least `epsilon` times the largest (epsilon), or the fewest components holding `energy` of
    the delta's squared Frobenius norm (energy). Embeddings and the output head become LoRA
    layers only with `embed` (else, when changed, modules_to_save). `include`/`exclude` are
    regular expressions searched in tensor names.
    """
    from mmerge.backend.transfer import resolve, to_backend
    from mmerge.io import open_checkpoint

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidInput(f"rank must be a positive integer, got {rank!r}")
    if rank_rule not in math_lora.RANK_RULES:
        raise InvalidInput(f"rank rule must be one of {', '.join(math_lora.RANK_RULES)}")
    if not 0 < energy <= 1:
        raise InvalidInput(f"energy must be in (0, 1], got {energy}")
    if not 0 <= epsilon < 1:
        raise InvalidInput(f"epsilon must be in [0, 1), got {epsilon}")
    if oversample < 0 or power_iters < 0:
        raise InvalidInput("oversampling and power iterations must be >= 0")
    out_code = factor_dtype(out_dtype)
    backend, device = resolve(backend, device)
    workers = max(1, workers or min(4, os.cpu_count() or 1))
    with open_checkpoint(base) as base_ckpt, open_checkpoint(finetuned) as ft_ckpt:
        matrices, others = _plan(base_ckpt, ft_ckpt, rank, oversample, embed, include, exclude)
        if dry_run:
            planned = {m.module: ModuleReport(m.module, m.rank, float("nan")) for m in matrices}
            nbytes = sum(
                (m.shape[0] + m.shape[1]) * m.rank * np.dtype("f4").itemsize for m in matrices
            )
            return AdapterResult(None, planned, bytes_written=nbytes)
        from mmerge.io.adapter_writer import AdapterFolder

        folder = AdapterFolder(
            output, inputs=[base_ckpt.path, ft_ckpt.path], resume=resume, overwrite=overwrite
        )
        options = {
            "rank": rank,
            "oversample": oversample,
            "power_iters": power_iters,
            "seed": seed,
            "embed": embed,
            "include": include,
            "exclude": exclude,
        }
        try:
            stage = folder.scratch(
                STAGE_NAME,
                _stage_specs(matrices, others),
                {"mmerge.stage": _stage_key(base_ckpt, ft_ckpt, options)},
            )

            def put(host: np.ndarray):
                return to_backend(np.ascontiguousarray(host, np.float32), backend, device)

            _run_stage(
                stage,
                matrices,
                others,
                base_ckpt,
                ft_ckpt,
                put,
                seed,
                power_iters,
                workers,
                backend,
                on_progress,
            )
            result = _write_adapter(
                folder,
                stage,
                matrices,
                others,
                base_ckpt,
                ft_ckpt,
                rank_rule,
                rank,
                epsilon,
                energy,
                out_code,
                {**options, "rank_rule": rank_rule, "epsilon": epsilon, "energy": energy},
            )
        except BaseException:
            folder.close()
            raise
        return result


def _run_stage(
    stage, matrices, others, base, ft, put, seed, power_iters, workers, backend, on_progress
):
    """Phase 1: factors at the largest rank for every pending matrix, and which other tensors
    changed, into the scratch file (tensors already there from an interrupted run are kept)."""
    from mmerge.engine.allocator import keep_chunk_memory

    keep_chunk_memory()
    pending = set(stage.pending())
    cache = CACHE_BYTES // workers

    def matrix_job(mat: _Matrix) -> None:
        left, right, s, sumsq = _extract_matrix(
            mat, base[mat.name], ft[mat.name], put, seed, power_iters, cache
        )
        for suffix, value in (
            (".left", left),
            (".right", right),
            (".s", s),
            (".sumsq", np.array([sumsq], np.float64)),
        ):
            stage.write(mat.name + suffix, value)
        for suffix in (".left", ".right", ".s", ".sumsq"):
            stage.finish_tensor(mat.name + suffix)
        if on_progress is not None:
            on_progress(base[mat.name].nbytes + ft[mat.name].nbytes)

    def other_job(name: str) -> None:
        stage.write(name + ".changed", np.array([_changed(base[name], ft[name])], np.uint8))
        stage.finish_tensor(name + ".changed")

    jobs = [(matrix_job, m) for m in matrices if m.name + ".sumsq" in pending]
    jobs.sort(key=lambda job: -job[1].shape[0] * job[1].shape[1])  # largest first
    jobs += [(other_job, n) for n in others if n + ".changed" in pending]
    limit = _blas_limit(backend, workers)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmerge-lora") as pool:
            for future in [pool.submit(fn, arg) for fn, arg in jobs]:
                future.result()
    finally:
        if limit is not None:
            limit.restore_original_limits()


def _blas_limit(backend: str, workers: int):
    """One BLAS thread per worker when numpy computes with several workers (the workers are
    the parallelism; nested BLAS threads would oversubscribe the cores)."""
    if backend != "numpy" or workers <= 1:
        return None
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _write_adapter(
    folder,
    stage,
    matrices,
    others,
    base,
    ft,
    rank_rule,
    rank,
    epsilon,
    energy,
    out_code,
    options,
) -> AdapterResult:
    """Phase 2: ranks from the rule, modules_to_save from the changed tensors, the adapter."""
    from mmerge import __version__
    from mmerge.io import open_checkpoint

    staged = open_checkpoint(stage.partial)
    try:
        reports: dict[str, ModuleReport] = {}
        chosen: dict[str, tuple[_Matrix, int]] = {}
        for mat in matrices:
            sumsq = float(staged[mat.name + ".sumsq"].to_numpy()[0])
            if sumsq == 0.0:
                continue
            values = [float(v) for v in staged[mat.name + ".s"].to_numpy()]
            k = math_lora.choose_rank(
                values, sumsq, rank_rule, mat.rank, epsilon=epsilon, energy=energy
            )
            chosen[mat.module] = (mat, k)
            reports[mat.module] = ModuleReport(
                mat.module, k, math_lora.energy_kept(values, k, sumsq)
            )
        lora_modules = set(chosen)
        changed = [n for n in others if staged[n + ".changed"].to_numpy()[0]]
        changed += [
            m.name
            for m in matrices
            if m.module not in chosen and float(staged[m.name + ".sumsq"].to_numpy()[0]) > 0
        ]
        saved, warnings = _modules_to_save(changed, lora_modules)
        specs = []
        for module, (mat, k) in chosen.items():
            a_key, b_key = factor_keys(module, mat.kind)
            m, n = mat.shape
            a_shape, b_shape = ((k, m), (n, k)) if mat.kind == "embedding" else ((k, n), (m, k))
            specs += [TensorSpec(a_key, out_code, a_shape), TensorSpec(b_key, out_code, b_shape)]
        saved_names = [n for n in ft if _module_of(n)[0] in saved]
        specs += [TensorSpec(PREFIX + n, ft[n].dtype, tuple(ft[n].shape)) for n in saved_names]
        meta = {
            "mmerge.version": __version__,
            "mmerge.operation": "lora extract",
            "mmerge.parameters": json.dumps(options, sort_keys=True, default=str),
            "mmerge.inputs": json.dumps([str(base.path), str(ft.path)]),
        }
        writer = folder.tensors(specs, meta)
        pending = set(writer.pending())
        for module, (mat, k) in chosen.items():
            a_key, b_key = factor_keys(module, mat.kind)
            if a_key not in pending and b_key not in pending:
                continue
            left = staged[mat.name + ".left"].to_numpy()[:, :k]
            right = staged[mat.name + ".right"].to_numpy()[:k, :]
            a, b = (left.T, right.T) if mat.kind == "embedding" else (right, left)
            for key, value in ((a_key, a), (b_key, b)):
                writer.write(key, np.ascontiguousarray(value))
                writer.finish_tensor(key)
            staged[mat.name + ".left"].release()
            staged[mat.name + ".right"].release()
        for name in saved_names:
            if PREFIX + name in pending:
                writer.write(PREFIX + name, ft[name].raw())
                writer.finish_tensor(PREFIX + name)
                ft[name].release()
        r, rank_pattern, alpha_pattern = rank_settings({m: k for m, (_, k) in chosen.items()})
        config = peft_config(
            r=r,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            target_modules=sorted(chosen),
            modules_to_save=sorted(saved),
            base_model_name_or_path=str(base.path),
            task_type=_task_type(base.path),
        )
        nbytes = sum(s.nbytes for s in specs)
    finally:
        staged.close()
    output = folder.commit(config)
    return AdapterResult(output, reports, sorted(saved), warnings, nbytes)


def _modules_to_save(changed, lora_modules) -> tuple[set[str], list[str]]:
    """Modules whose changed tensors are saved whole, and what cannot be represented."""
    saved: set[str] = set()
    warnings = []
    for name in changed:
        module = _module_of(name)[0]
        if not module:
            warnings.append(f"{name}: changed, but a top-level tensor has no module to save")
        elif module in lora_modules:
            warnings.append(
                f"{name}: changed, but its module is a LoRA layer (only its weight is adapted); "
                "left out"
            )
        else:
            saved.add(module)
    return saved, warnings


def _task_type(path: Path) -> str | None:
    """CAUSAL_LM for a base whose config names a *ForCausalLM architecture."""
    config = Path(path) / "config.json"
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in archs) else None
