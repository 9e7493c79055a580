"""What `--data` names, found and checked without reading it whole, and without torch or numpy.

`--data` takes a text file, a folder of text files, a glob (quoted, expanded here: 'books/*.txt',
'corpus/**/*.md'), nanoGPT token files (one `.bin`, or a folder with `train.bin` and `val.bin`), or a
Hugging Face `datasets` dataset saved with `save_to_disk` (a `Dataset` or a `DatasetDict`; reading it
needs the optional `datasets` package, and never the hub). The daemon calls `resolve_data` before it
starts anything, so that a wrong path, an empty folder or a binary file fail at once with one line; the
worker resolves the same way and then reads (`peer/worker/data.py`).

Text must be UTF-8: a file whose first `TEXT_PROBE_BYTES` hold a NUL byte or an invalid UTF-8 sequence is
refused by name. Hidden files and folders (a name starting with '.') under a folder are skipped.
"""

from __future__ import annotations

import codecs
import glob
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import ShoalError

TEXT_PROBE_BYTES = 8192  # how much of each text file is checked for NUL bytes and invalid UTF-8
TOKEN_FILE_SUFFIX = ".bin"
HF_STRING_TYPES = ("string", "large_string")
# Split names of a DatasetDict, by preference: the training split, then the held-out one.
HF_TRAIN_SPLITS = ("train",)
HF_VALIDATION_SPLITS = ("validation", "valid", "val", "test")
DATA_FORMS = (
    "a text file, a folder of text files, a quoted glob such as 'texts/*.txt', nanoGPT token files "
    "(a .bin file, or a folder with train.bin and val.bin) or a Hugging Face dataset saved with save_to_disk"
)


class DataError(ShoalError):
    """The training data could not be read or is too small for the requested shard."""


@dataclass(frozen=True)
class DataSource:
    """The data a peer trains on, as `--data` named it."""

    kind: str  # "stdlib", "text", "tokens" or "hf"
    path: Path | None = None  # tokens: the .bin file or its folder; hf: the dataset's folder
    files: tuple[Path, ...] = ()  # text: every file, in a fixed order
    column: str | None = None  # hf: the text column (None: the worker picks from the loaded features)
    train_split: str | None = None  # hf DatasetDict: the split to train on
    validation_split: str | None = None  # hf DatasetDict: the held-out split, if it has one


def resolve_data(data: str | None) -> DataSource:
    """The source `data` names (None: the Python standard library), checked; raises DataError."""
    if data is None:
        return DataSource("stdlib")
    path = Path(data).expanduser()
    if not path.exists() and glob.has_magic(data):
        return _text_source(_glob_files(data), f"the files {data!r} matches")
    if not path.exists():
        raise DataError(f"--data {data}: no such file or folder; pass {DATA_FORMS}")
    if path.is_dir():
        if is_hf_dataset(path):
            return _hf_source(path)
        if (path / "train.bin").exists():
            if not (path / "val.bin").is_file():
                raise DataError(
                    f"--data {path} holds train.bin but no val.bin; nanoGPT's prepare.py writes both"
                )
            return DataSource("tokens", path=path)
        files = visible_files(path)
        if not files:
            raise DataError(
                f"--data {path} is an empty folder (hidden files are skipped); put text files in it"
            )
        return _text_source(files, f"the folder {path}")
    if path.suffix == TOKEN_FILE_SUFFIX:
        return DataSource("tokens", path=path)
    return _text_source([path], str(path))


def is_hf_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def visible_files(folder: Path) -> list[Path]:
    """Every regular file under `folder`, recursively, hidden ones (and those in hidden folders) left out,
    in a fixed order."""
    files = []
    for path in folder.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_file():
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _glob_files(pattern: str) -> list[Path]:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files: list[Path] = []
    for match in map(Path, matches):
        files.extend(visible_files(match) if match.is_dir() else [match] if match.is_file() else [])
    if not files:
        raise DataError(
            f"--data {pattern!r} matches no file; check the pattern (quote it, so that the shell leaves it "
            "to the peer: --data 'texts/*.txt')"
        )
    return list(dict.fromkeys(files))


def _text_source(files: list[Path], what: str) -> DataSource:
    for path in files:
        check_text_file(path)
    if all(path.stat().st_size == 0 for path in files):
        raise DataError(f"--data: {what} holds no text (every file is empty)")
    return DataSource("text", files=tuple(files))


def check_text_file(path: Path) -> None:
    """Raises DataError unless the start of `path` reads as UTF-8 text."""
    try:
        with open(path, "rb") as file:
            head = file.read(TEXT_PROBE_BYTES)
    except OSError as error:
        raise DataError(f"cannot read the data file {path}: {error.strerror or error}") from error
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataError(
            f"the data file {path} is not text (a NUL byte at offset {nul}); --data takes UTF-8 text, "
            "nanoGPT .bin token files or a saved Hugging Face dataset: remove the file or point --data "
            "elsewhere"
        )
    try:  # the probe may end inside a multi-byte character: only a complete file must end cleanly
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < TEXT_PROBE_BYTES)
    except UnicodeDecodeError as error:
        raise DataError(
            f"the data file {path} is not UTF-8 text (byte {head[error.start]:#04x} at offset "
            f"{error.start}); convert it to UTF-8, or remove it from the data"
        ) from error


def _hf_source(path: Path) -> DataSource:
    train_split = validation_split = None
    info_dir = path
    if (path / "dataset_dict.json").is_file():
        splits = _read_json(path / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
            raise DataError(f"the Hugging Face dataset {path} lists no splits in dataset_dict.json")
        train_split = next((s for s in HF_TRAIN_SPLITS if s in splits), splits[0])
        validation_split = next((s for s in HF_VALIDATION_SPLITS if s in splits and s != train_split), None)
        info_dir = path / train_split
    if importlib.util.find_spec("datasets") is None:
        raise DataError(
            f"--data {path} is a Hugging Face dataset; reading it needs the datasets package: "
            "pip install 'shoal[datasets]' (or pip install datasets)"
        )
    features = _read_json(info_dir / "dataset_info.json").get("features")
    column = text_column(features, path) if isinstance(features, dict) else None
    return DataSource(
        "hf", path=path, column=column, train_split=train_split, validation_split=validation_split
    )


def text_column(features: dict, where: Path | str) -> str:
    """The column to train on: "text", else the only string column; features as dataset_info.json writes
    them ({name: {"_type": "Value", "dtype": "string"}, ...})."""

    def is_string(spec: object) -> bool:
        return (
            isinstance(spec, dict) and spec.get("_type") == "Value" and spec.get("dtype") in HF_STRING_TYPES
        )

    strings = [name for name, spec in features.items() if is_string(spec)]
    if "text" in strings:
        return "text"
    if len(strings) == 1:
        return strings[0]
    columns = ", ".join(map(str, features)) or "none"
    if not strings:
        raise DataError(
            f"the Hugging Face dataset {where} has no string column to train on (columns: {columns})"
        )
    raise DataError(
        f"the Hugging Face dataset {where} has several string columns ({', '.join(strings)}) and none is "
        "named 'text'; rename the one to train on: dataset.rename_column(NAME, 'text').save_to_disk(...)"
    )


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path} of a saved Hugging Face dataset: {error}") from error
    if not isinstance(value, dict):
        raise DataError(f"{path} of a saved Hugging Face dataset is not a JSON object")
    return value
