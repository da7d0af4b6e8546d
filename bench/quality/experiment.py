"""A small multi-task merging experiment on scikit-learn's handwritten digits, run on CPU.

One body (an MLP) is pretrained on upright digits; each task then fine-tunes a copy of it on
its own view of the digits (an input transform) and its own question (a label function), with
its own head. Bodies are written as safetensors, merged by mmerge from recipes, and scored with
each task's own head. `python bench/quality/run.py` runs it; the test suite runs a reduced one.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("pretrain", "train", "val", "test")


@dataclass(frozen=True)
class Task:
    """One fine-tuning task: how its images are shown and which question its head answers."""

    name: str
    transform: Callable[[np.ndarray], np.ndarray]  # (n, 8, 8) -> (n, 8, 8)
    labels: Callable[[np.ndarray], np.ndarray]  # digit 0..9 -> class index
    classes: int
    description: str


def _upright(images: np.ndarray) -> np.ndarray:
    return images


def _rotate90(images: np.ndarray) -> np.ndarray:
    return np.rot90(images, 1, axes=(1, 2))


def _rotate180(images: np.ndarray) -> np.ndarray:
    return np.rot90(images, 2, axes=(1, 2))


def _mirror(images: np.ndarray) -> np.ndarray:
    return images[:, :, ::-1]


def _invert(images: np.ndarray) -> np.ndarray:
    return 1.0 - images


def _transpose(images: np.ndarray) -> np.ndarray:
    return np.transpose(images, (0, 2, 1))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("up:parity", _upright, lambda d: d % 2, 2, "upright digits: odd or even"),
        Task("rot90:digit", _rotate90, lambda d: d, 10, "digits turned 90 degrees: which digit"),
        Task("mirror:ge5", _mirror, lambda d: (d >= 5).astype(int), 2, "mirrored: 5 or more"),
        Task("invert:mod3", _invert, lambda d: d % 3, 3, "inverted ink: the digit mod 3"),
        Task(
            "transp:prime",
            _transpose,
            lambda d: np.isin(d, (2, 3, 5, 7)).astype(int),
            2,
            "transposed: a prime digit",
        ),
        Task("rot180:lt3", _rotate180, lambda d: (d < 3).astype(int), 2, "upside down: below 3"),
    )
}


@dataclass(frozen=True)
class Config:
    """Everything that decides the experiment's numbers (with `seed`, all of it)."""

    tasks: tuple[str, ...] = tuple(TASKS)
    fraction: float = 1.0  # of the 1,797 digits used, stratified by digit
    split: tuple[float, float, float, float] = (0.35, 0.30, 0.15, 0.20)  # as SPLITS
    width: int = 512  # hidden width of the body
    hidden: int = 1  # hidden layers of the body
    features: int = 32  # width of the body's output, the heads' input
    batch: int = 32
    pretrain_epochs: int = 100
    pretrain_lr: float = 1e-3
    probe_steps: int = 300
    probe_lr: float = 1e-2
    finetune_epochs: int = 10
    finetune_lr: float = 3e-4
    seed: int = 0


@dataclass
class Data:
    """The digits (scaled to [0, 1]) and their true digit, per split."""

    index: dict[str, np.ndarray]  # split -> rows of scikit-learn's digits
    images: dict[str, np.ndarray]  # split -> (n, 8, 8) float32
    digits: dict[str, np.ndarray]  # split -> (n,) int

    def task(self, task: Task, split: str) -> tuple[Any, Any]:
        """(inputs, targets) of `task` on `split` as torch tensors."""
        import torch

        x = task.transform(self.images[split]).reshape(len(self.digits[split]), -1)
        y = task.labels(self.digits[split])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))


def load_data(cfg: Config) -> Data:
    """The digits split into pretrain / train / val / test, stratified by digit and seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    target = digits.target.astype(np.int64)
    index = np.arange(len(target))
    if cfg.fraction < 1.0:
        index, _ = train_test_split(
            index, train_size=cfg.fraction, stratify=target, random_state=cfg.seed
        )
    parts: dict[str, np.ndarray] = {}
    rest, total = index, 1.0
    for name, share in zip(SPLITS[:-1], cfg.split[:-1]):
        taken, rest = train_test_split(
            rest, train_size=share / total, stratify=target[rest], random_state=cfg.seed
        )
        parts[name], total = taken, total - share
    parts[SPLITS[-1]] = rest
    return Data(
        index=parts,
        images={k: images[v] for k, v in parts.items()},
        digits={k: target[v] for k, v in parts.items()},
    )


@contextlib.contextmanager
def deterministic_torch(threads: int = 1) -> Iterator[None]:
    """One CPU thread and deterministic kernels, restored afterwards: same bits on every run."""
    import torch

    was_threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(was_threads)
        torch.use_deterministic_algorithms(was_deterministic)


def make_body(cfg: Config, seed: int):
    """The shared network: ReLU layers named `layers.N.weight` / `.bias`, N = 0 .. hidden."""
    import torch
    from torch import nn

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            sizes = (64, *(cfg.width,) * cfg.hidden, cfg.features)
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

        def forward(self, x):
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x

    torch.manual_seed(seed)
    return Body()


def make_head(cfg: Config, classes: int, seed: int):
    """A task's linear head on the body's features."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Linear(cfg.features, classes)


def _fit(params, forward, x, y, *, epochs: int, lr: float, batch: int, seed: int, shift=False):
    """Minibatch AdamW on cross-entropy; `shift` moves each batch by up to one pixel."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch):
            rows = order[start : start + batch]
            xb = x[rows]
            if shift:
                dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
                xb = torch.roll(xb.view(-1, 8, 8), (dy, dx), dims=(1, 2)).reshape(len(rows), -1)
            loss = torch.nn.functional.cross_entropy(forward(xb), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()


def pretrain(cfg: Config, data: Data):
    """The base body: which digit, on the upright pretraining split (its head is thrown away)."""
    import torch

    body = make_body(cfg, cfg.seed)
    head = make_head(cfg, 10, cfg.seed + 1)
    x = torch.from_numpy(data.images["pretrain"].reshape(-1, 64))
    y = torch.from_numpy(data.digits["pretrain"])
    params = [*body.parameters(), *head.parameters()]
    _fit(
        params,
        lambda xb: head(body(xb)),
        x,
        y,
        epochs=cfg.pretrain_epochs,
        lr=cfg.pretrain_lr,
        batch=cfg.batch,
        seed=cfg.seed + 2,
        shift=True,
    )
    return body.requires_grad_(False)


def probe(cfg: Config, body, task: Task, data: Data, seed: int):
    """The task's head: a linear probe trained on the frozen base body's features."""
    import torch

    x, y = data.task(task, "train")
    with torch.no_grad():
        feats = body(x)
    head = make_head(cfg, task.classes, seed)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.probe_lr)
    for _ in range(cfg.probe_steps):  # full batch
        loss = torch.nn.functional.cross_entropy(head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.requires_grad_(False)


def finetune(cfg: Config, base, head, task: Task, data: Data, seed: int):
    """A copy of the base body fine-tuned on the task through its frozen head."""
    import copy

    body = copy.deepcopy(base).requires_grad_(True)
    x, y = data.task(task, "train")
    _fit(
        list(body.parameters()),
        lambda xb: head(body(xb)),
        x,
        y,
        epochs=cfg.finetune_epochs,
        lr=cfg.finetune_lr,
        batch=cfg.batch,
        seed=seed,
    )
    return body.requires_grad_(False)


class Experiment:
    """The trained checkpoints on disk and the scoring of any body, file or recipe on them.

    `folder` holds base.safetensors, finetunes/<i>.safetensors (bodies, what mmerge merges)
    and heads/<i>.safetensors (each task's own head, never merged).
    """

    def __init__(self, cfg: Config, folder: Path) -> None:
        from safetensors.torch import save_file

        self.cfg, self.folder = cfg, Path(folder)
        self.tasks = [TASKS[name] for name in cfg.tasks]
        self.data = load_data(cfg)
        for sub in ("finetunes", "heads", "merges"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        with deterministic_torch():
            base = pretrain(cfg, self.data)
            self.heads = {}
            self.finetune_paths: dict[str, Path] = {}
            for i, task in enumerate(self.tasks):
                head = probe(cfg, base, task, self.data, seed=cfg.seed + 100 + i)
                body = finetune(cfg, base, head, task, self.data, seed=cfg.seed + 200 + i)
                self.heads[task.name] = head
                path = self.folder / "finetunes" / f"{i}.safetensors"
                save_file(_state(body), path)
                save_file(_state(head), self.folder / "heads" / f"{i}.safetensors")
                self.finetune_paths[task.name] = path
            self.base_path = self.folder / "base.safetensors"
            save_file(_state(base), self.base_path)
        self._body = make_body(cfg, 0).requires_grad_(False)
        self._inputs = {
            (t.name, s): self.data.task(t, s) for t in self.tasks for s in ("val", "test")
        }
        self.merges = 0  # merges written so far (each to a fresh folder)

    def score_state(
        self, state: Mapping[str, Any], split: str, tasks: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Accuracy of a body (name -> tensor) on each task's `split`, with the task's head."""
        import torch

        self._body.load_state_dict(dict(state), strict=True)
        out = {}
        with deterministic_torch(), torch.no_grad():
            for name in tasks or self.cfg.tasks:
                x, y = self._inputs[(name, split)]
                pred = self.heads[name](self._body(x)).argmax(dim=1)
                out[name] = float((pred == y).double().mean())
        return out

    def score_file(
        self, path: Path, split: str, tasks: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Accuracy of a body checkpoint on disk (a merged model, a fine-tune, the base)."""
        from safetensors.torch import load_file

        return self.score_state(load_file(path), split, tasks)

    def recipe(
        self,
        method: str,
        tasks: Sequence[str] | None = None,
        *,
        base: bool = True,
        params: Mapping[str, Any] | None = None,
        model_params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A mergekit-style recipe merging the fine-tunes of `tasks` (all by default).

        `model_params` is one mapping for every model (equal weights, one density) or one per
        model; `params` are the recipe's global parameters (lambda, ...). `base=False` leaves
        the base out.
        """
        names = list(tasks or self.cfg.tasks)
        if model_params is None or isinstance(model_params, Mapping):
            model_params = [model_params or {}] * len(names)
        recipe: dict[str, Any] = {
            "merge_method": method,
            "models": [
                {"model": str(self.finetune_paths[name]), "parameters": dict(p)}
                for name, p in zip(names, model_params, strict=True)
            ],
            "parameters": dict(params or {}),
            "dtype": "float32",
        }
        if base:
            recipe["base_model"] = str(self.base_path)
        return recipe

    def score_recipe(
        self, recipe: Mapping[str, Any], split: str, tasks: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Merge `recipe` with mmerge into a fresh folder, score it on `split`, delete it.

        `tasks` defaults to the tasks whose fine-tunes the recipe merges. A recipe mmerge
        refuses raises its MmergeError.
        """
        from mmerge.engine.api import run_recipe

        self.merges += 1
        where = Path(tempfile.mkdtemp(dir=self.folder / "merges"))
        try:
            out = where / "merged.safetensors"
            run_recipe(dict(recipe), out)
            return self.score_file(out, split, tasks or self.tasks_of(recipe))
        finally:
            shutil.rmtree(where)

    def tasks_of(self, recipe: Mapping[str, Any]) -> list[str]:
        """The tasks whose fine-tunes a recipe lists, in the experiment's order."""
        listed = {str(m["model"]) for m in recipe.get("models", [])}
        return [t for t, p in self.finetune_paths.items() if str(p) in listed]

    def evaluator(self, split: str = "val") -> Callable[[Any], float]:
        """`model -> mean accuracy over all tasks on split`: the evaluator a search calls. The
        model is a checkpoint's path (a file or a folder) or its tensors {name: array}, as
        `mmerge.evolve(..., in_memory=True)` gives them."""

        def mean_accuracy(model: Any) -> float:
            return float(np.mean(list(self.score_state(_torch_state(model), split).values())))

        return mean_accuracy

    def chance(self, split: str = "test") -> dict[str, float]:
        """Each task's majority-class rate on `split`: what a constant answer scores."""
        out = {}
        for task in self.tasks:
            counts = np.bincount(task.labels(self.data.digits[split]), minlength=task.classes)
            out[task.name] = float(counts.max() / counts.sum())
        return out


def _state(module) -> dict[str, Any]:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def _torch_state(model: Any) -> dict[str, Any]:
    """A body's tensors as torch tensors, from {name: array} or a checkpoint path mmerge reads."""
    import torch

    if isinstance(model, Mapping):
        arrays = dict(model)
    else:
        from mmerge.io import open_checkpoint

        with open_checkpoint(model) as ckpt:
            arrays = {name: ref.to_numpy() for name, ref in ckpt.items()}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


@contextlib.contextmanager
def experiment(cfg: Config, folder: Path | None = None) -> Iterator[Experiment]:
    """An Experiment in `folder`, or in a temporary folder removed afterwards."""
    if folder is not None:
        yield Experiment(cfg, folder)
        return
    tmp = Path(tempfile.mkdtemp(prefix="mmerge-quality-"))
    try:
        yield Experiment(cfg, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
