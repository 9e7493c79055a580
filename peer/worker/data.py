"""Training data: the embedded corpus (the Python standard library's own `.py` sources, as bytes), text
files or folders (as bytes), or token files as nanoGPT writes them (`train.bin` / `val.bin`, uint16).

The standard library is on every machine with Python, so the default run needs no download. Text is split
by file (every 20th file is held out for validation) so that near-duplicate text never leaks from training
into evaluation. Runs compare only when their corpus hash matches: another Python version ships another
standard library. Token files are memory-mapped, never read whole.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shoal.errors import ShoalError

VALIDATION_EVERY = 20  # every 20th file (sorted order) is held out
# Folders that are tests or third-party code, not the standard library itself.
_EXCLUDED_PARTS = {"site-packages", "dist-packages", "idle_test", "__pycache__"}


class DataError(ShoalError):
    """The training data could not be read or is too small for the requested shard."""


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint8 bytes of the training files, or uint16 tokens
    validation: np.ndarray  # the held-out bytes or tokens
    sha256: (
        str  # of train + validation (token files: of their first and last megabyte), to tell corpora apart
    )
    files: int
    vocab_size: int = 256  # bytes; token files: the largest token + 1


TOKEN_FILE_SUFFIX = ".bin"
HASHED_TOKEN_BYTES = 1 << 20  # token files can be many GB: hash their ends and their size


def load_token_files(path: Path) -> Corpus:
    """nanoGPT's layout: a folder with train.bin and val.bin, or one .bin whose last 1/20 is held out."""
    path = Path(path)
    train: np.ndarray  # memory-mapped files, or views into one
    validation: np.ndarray
    if path.is_dir():
        train = np.memmap(path / "train.bin", dtype=np.uint16, mode="r")
        validation = np.memmap(path / "val.bin", dtype=np.uint16, mode="r")
    else:
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        cut = len(tokens) - len(tokens) // VALIDATION_EVERY
        train, validation = tokens[:cut], tokens[cut:]
    if len(validation) < 2 or len(train) < 2:
        raise DataError(
            f"token files under {path} hold too few tokens ({len(train)} train, {len(validation)} val)"
        )
    digest = hashlib.sha256()
    for part in (train, validation):
        digest.update(str(len(part)).encode())
        digest.update(part[: HASHED_TOKEN_BYTES // 2].tobytes())
        digest.update(part[-HASHED_TOKEN_BYTES // 2 :].tobytes())
    vocab = int(max(train.max(), validation.max())) + 1
    return Corpus(train, validation, digest.hexdigest(), files=1, vocab_size=vocab)


def is_token_data(path: Path) -> bool:
    path = Path(path)
    return (path.is_dir() and (path / "train.bin").exists()) or path.suffix == TOKEN_FILE_SUFFIX


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
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
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
            raise DataError(f"{len(data)} tokens are too few for windows of {block_size + 1}")
        self.data = data  # bytes or a memory-mapped token file: only the sampled windows are read
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            len(self.data) - self.block_size - 1, (self.batch_size,), generator=self.generator
        )
        rows = [self.data[s : s + self.block_size + 1] for s in starts.tolist()]
        windows = torch.from_numpy(np.stack(rows).astype(np.int64))
        return windows[:, :-1], windows[:, 1:]


def fixed_windows(
    data: np.ndarray, block_size: int, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same `count` evaluation windows on every peer: eval losses compare across the run."""
    sampler = BatchSampler(data, block_size, count, seed)
    return sampler.next()


def load_corpus(data: str | None) -> Corpus:
    """The run's data: None for the standard library, token files, or a text file or folder."""
    if data is None:
        return load_stdlib_corpus()
    if is_token_data(Path(data)):
        return load_token_files(Path(data))
    return load_text_corpus(text_files_under(Path(data)))
