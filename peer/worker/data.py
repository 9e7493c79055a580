"""Training data: the embedded corpus (the Python standard library's own `.py` sources, as bytes), text
(a file, a folder, a glob; as bytes), token files as nanoGPT writes them (`train.bin` / `val.bin`,
uint16), or the text column of a Hugging Face dataset saved with `save_to_disk`. What `--data` names, and
the checks made before anything is read, are in `peer/worker/sources.py`.

The standard library is on every machine with Python, so the default run needs no download. Text is split
by file (every 20th file is held out for validation) so that near-duplicate text never leaks from training
into evaluation; a single file (or a dataset of one row) holds out its last twentieth instead. Runs compare
only when their corpus hash matches: another Python version ships another standard library. Token files
are memory-mapped, never read whole.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shoal.peer.worker.sources import TOKEN_FILE_SUFFIX, DataError, DataSource, resolve_data, text_column

VALIDATION_EVERY = 20  # every 20th file (sorted order) is held out
# Folders that are tests or third-party code, not the standard library itself.
_EXCLUDED_PARTS = {"site-packages", "dist-packages", "idle_test", "__pycache__"}
HF_ROWS_PER_BATCH = 1024  # rows read at once from a saved dataset


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint8 bytes of the training files, or uint16 tokens
    validation: np.ndarray  # the held-out bytes or tokens
    sha256: (
        str  # of train + validation (token files: of their first and last megabyte), to tell corpora apart
    )
    files: int
    vocab_size: int = 256  # bytes; token files: the largest token + 1


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
    """Reads files as bytes; every VALIDATION_EVERY-th file goes to validation (one file: its last
    twentieth)."""
    digest = hashlib.sha256()

    def read(path: Path) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise DataError(f"cannot read the data file {path}: {error.strerror or error}") from error
        digest.update(data)
        return data

    train, validation, count = split_documents(read(path) for path in files)
    return Corpus(train=train, validation=validation, sha256=digest.hexdigest(), files=count)


def split_documents(documents: Iterator[bytes]) -> tuple[np.ndarray, np.ndarray, int]:
    """Training and validation bytes from documents (files, dataset rows), and how many there were: every
    VALIDATION_EVERY-th document is held out (the first when there are fewer); a single document holds out
    its last VALIDATION_EVERY-th."""
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    for i, data in enumerate(documents):
        (val_parts if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train_parts).append(data)
    count = len(train_parts) + len(val_parts)
    if count == 0:
        raise DataError("the data holds no documents")
    if count < VALIDATION_EVERY:  # no 20th document: hold out the first
        val_parts, train_parts = train_parts[:1], train_parts[1:]
    if count == 1:
        whole = val_parts[0]
        cut = len(whole) - len(whole) // VALIDATION_EVERY
        train_parts, val_parts = [whole[:cut]], [whole[cut:]]
    train = np.frombuffer(b"".join(train_parts), dtype=np.uint8)
    validation = np.frombuffer(b"".join(val_parts), dtype=np.uint8)
    return train, validation, count


def load_hf_dataset(source: DataSource) -> Corpus:
    """The text column of a dataset saved with `save_to_disk`, read from disk only (never the hub). Rows
    are documents, as files are; a DatasetDict's validation (or test) split is held out when it has one."""
    assert source.path is not None  # resolve_data names the folder of every hf source
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as error:
        raise DataError(
            f"--data {source.path} is a Hugging Face dataset; reading it needs the datasets package: "
            "pip install 'shoal[datasets]'"
        ) from error
    try:
        loaded = datasets.load_from_disk(str(source.path))
    except Exception as error:  # the library raises many kinds; any of them means the same to the user
        raise DataError(
            f"cannot load the Hugging Face dataset {source.path}: {type(error).__name__}: {str(error)[:200]}"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        train_set = loaded[source.train_split or next(iter(loaded))]
        held_out = loaded[source.validation_split] if source.validation_split else None
    else:
        train_set, held_out = loaded, None
    column = source.column or text_column(train_set.features.to_dict(), source.path)
    if column not in train_set.column_names:
        raise DataError(f"the Hugging Face dataset {source.path} has no column {column!r}")
    digest = hashlib.sha256()

    def rows(dataset) -> Iterator[bytes]:
        for batch in dataset.select_columns([column]).iter(batch_size=HF_ROWS_PER_BATCH):
            for text in batch[column]:
                if isinstance(text, str) and text:
                    data = text.encode("utf-8") + b"\n"
                    digest.update(data)
                    yield data

    if held_out is None:
        train, validation, count = split_documents(rows(train_set))
    else:
        train = np.frombuffer(b"".join(rows(train_set)), dtype=np.uint8)
        validation = np.frombuffer(b"".join(rows(held_out)), dtype=np.uint8)
        count = len(train_set) + len(held_out)
    if not len(train) or not len(validation):
        raise DataError(f"the column {column!r} of the Hugging Face dataset {source.path} holds no text")
    return Corpus(train=train, validation=validation, sha256=digest.hexdigest(), files=count)


def shard(data: np.ndarray, index: int, count: int, min_bytes: int) -> np.ndarray:
    """Contiguous shard `index` of `count` of the training bytes; each peer trains on its own."""
    if not 0 <= index < count:
        raise DataError(f"shard {index} is not in 0..{count - 1}")
    size = len(data) // count
    part = data[index * size : (index + 1) * size]
    if len(part) < min_bytes:
        raise DataError(
            f"shard {index}/{count} has {len(part)} bytes, fewer than one batch window ({min_bytes}); "
            "use fewer shards (--shard INDEX/COUNT) or more data"
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
    if len(data) <= block_size + 1:
        raise DataError(
            f"the held-out data has {len(data)} tokens, fewer than one evaluation window of "
            f"{block_size + 2}; use more data"
        )
    sampler = BatchSampler(data, block_size, count, seed)
    return sampler.next()


def load_corpus(data: str | None) -> Corpus:
    """The run's data (see `peer/worker/sources.py`): None for the standard library, token files, text (a
    file, a folder, a glob), or a saved Hugging Face dataset."""
    source = resolve_data(data)
    if source.kind == "stdlib":
        return load_stdlib_corpus()
    if source.kind == "tokens":
        assert source.path is not None
        return load_token_files(source.path)
    if source.kind == "hf":
        return load_hf_dataset(source)
    return load_text_corpus(list(source.files))
