"""The embedded training corpus: the Python standard library's own `.py` sources, read as bytes.

Every machine with Python has it, so the default run needs no download. The file list is sorted and
split by file (every 20th file is held out for validation) so that near-duplicate text never leaks
from training into evaluation. Runs compare only when their corpus hash matches: another Python
version ships another standard library.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kernels.errors import ShoalError

VALIDATION_EVERY = 20  # every 20th file (sorted order) is held out
# Folders that are tests or third-party code, not the standard library itself.
_EXCLUDED_PARTS = {"site-packages", "dist-packages", "idle_test", "__pycache__"}


class DataError(ShoalError):
    """The training data could not be read or is too small for the requested shard."""


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint8 bytes of the training files, concatenated
    validation: np.ndarray  # uint8 bytes of the held-out files
    sha256: str  # of train + validation, to tell runs on different corpora apart
    files: int


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files, tests and site-packages excluded, in a deterministic order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(p in _EXCLUDED_PARTS or p.startswith("test") for p in parts[:-1]) or parts[-1].startswith(
            "test"
        ):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_stdlib_corpus(root: Path | None = None) -> Corpus:
    return load_text_corpus(stdlib_files(root))


def load_text_corpus(files: list[Path]) -> Corpus:
    """Reads files as bytes; every VALIDATION_EVERY-th file goes to validation."""
    if len(files) < 2:
        raise DataError(f"a corpus needs at least 2 files (one for validation), found {len(files)}")
    train_parts, val_parts = [], []
    digest = hashlib.sha256()
    for i, path in enumerate(files):
        data = path.read_bytes()
        digest.update(data)
        is_validation = i % VALIDATION_EVERY == VALIDATION_EVERY - 1 or (
            len(files) < VALIDATION_EVERY and i == 0
        )
        (val_parts if is_validation else train_parts).append(data)
    train = np.frombuffer(b"".join(train_parts), dtype=np.uint8)
    validation = np.frombuffer(b"".join(val_parts), dtype=np.uint8)
    return Corpus(train=train, validation=validation, sha256=digest.hexdigest(), files=len(files))


def text_files_under(path: Path) -> list[Path]:
    """A file, or every regular file of a folder (recursively, sorted), as a text corpus."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"data path {path} does not exist; pass a file or a folder of text files")
    return sorted(p for p in path.rglob("*") if p.is_file())


def shard(data: np.ndarray, index: int, count: int, min_bytes: int) -> np.ndarray:
    """Contiguous shard `index` of `count` of the training bytes; each peer trains on its own."""
    if not 0 <= index < count:
        raise DataError(f"shard {index} is not in 0..{count - 1}")
    size = len(data) // count
    part = data[index * size : (index + 1) * size]
    if len(part) < min_bytes:
        raise DataError(
            f"shard {index}/{count} has {len(part)} bytes, fewer than one batch window ({min_bytes}); "
            "use fewer shards or more data"
        )
    return part


class BatchSampler:
    """Random windows of `block_size + 1` bytes from one array, from a seeded generator."""

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, seed: int):
        if len(data) <= block_size + 1:
            raise DataError(f"{len(data)} bytes are too few for windows of {block_size + 1}")
        self.data = torch.from_numpy(data.astype(np.int64))
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            len(self.data) - self.block_size - 1, (self.batch_size,), generator=self.generator
        )
        windows = torch.stack([self.data[s : s + self.block_size + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


def fixed_windows(
    data: np.ndarray, block_size: int, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same `count` evaluation windows on every peer: eval losses compare across the run."""
    sampler = BatchSampler(data, block_size, count, seed)
    return sampler.next()
