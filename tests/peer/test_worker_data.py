"""The worker's other sources: nanoGPT token files, Hugging Face causal LMs from a local folder, and what
`--data` accepts: a text file, a folder, a glob, a saved Hugging Face dataset; binary files refused."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from shoal.peer.worker import sources
from shoal.peer.worker.data import DataError, load_corpus
from shoal.peer.worker.sources import resolve_data
from shoal.peer.worker.train import Trainer, TrainSettings

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def write_token_files(folder: Path, vocab: int) -> None:
    """uint16 token files as nanoGPT's prepare.py writes them (here: byte bigrams folded into `vocab`)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = np.frombuffer(
        (STDLIB / "argparse.py").read_bytes() + (STDLIB / "difflib.py").read_bytes(), np.uint8
    )
    tokens = ((text[:-1].astype(np.uint32) * 256 + text[1:]) % vocab).astype(np.uint16)
    cut = len(tokens) * 9 // 10
    tokens[:cut].tofile(folder / "train.bin")
    tokens[cut:].tofile(folder / "val.bin")


def settings(data: Path, model: str = "nano") -> TrainSettings:
    return TrainSettings(
        model=model, inner_steps=5, batch_size=8, lr=3e-3, warmup_steps=2, total_steps=100, weight_decay=0.1,
        eval_windows=16, seed=0, threads=1, method="default", data=str(data), rounds=None, shard=[0, 1],
        init_seed=1, data_seed=1, peer_id="peer-t",
    )  # fmt: skip


def test_token_files_train_a_model_with_their_vocabulary(tmp_path):
    write_token_files(tmp_path / "tokens", vocab=1000)
    corpus = load_corpus(str(tmp_path / "tokens"))
    assert corpus.train.dtype == np.uint16 and isinstance(corpus.train, np.memmap)
    assert corpus.vocab_size == int(max(corpus.train.max(), corpus.validation.max())) + 1 > 256
    trainer = Trainer(settings(tmp_path / "tokens"))
    assert trainer.model.token_embedding.num_embeddings == corpus.vocab_size
    before = trainer.evaluate()
    for _ in range(40):
        trainer.train_step()
    trainer.outer_step(trainer.message(), None)
    assert trainer.evaluate() < before - 0.5


def test_a_hugging_face_causal_lm_trains_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is optional; `pip install transformers`"
    )
    config = transformers.GPT2Config(vocab_size=1000, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf-model")
    write_token_files(tmp_path / "tokens", vocab=1000)
    trainer = Trainer(settings(tmp_path / "tokens", model=f"hf:{tmp_path / 'hf-model'}"))
    before = trainer.evaluate()
    for _ in range(40):
        trainer.train_step()
    own = trainer.message()
    assert trainer.outer_step(own, None) == "alone"
    assert trainer.evaluate() < before - 0.3


# --- what --data accepts (peer/worker/sources.py), checked before anything starts -------------------


def test_a_single_text_file_is_split_for_training_and_evaluation_and_trains(tmp_path):
    book = tmp_path / "book.txt"
    book.write_bytes((STDLIB / "argparse.py").read_bytes())
    corpus = load_corpus(str(book))
    assert corpus.files == 1
    assert len(corpus.train) + len(corpus.validation) == book.stat().st_size
    assert len(corpus.validation) == book.stat().st_size // 20  # its last twentieth is held out
    trainer = Trainer(settings(book))
    before = trainer.evaluate()
    for _ in range(40):
        trainer.train_step()
    trainer.outer_step(trainer.message(), None)
    assert trainer.evaluate() < before - 0.5


def test_a_glob_takes_the_files_it_matches_and_a_folder_skips_hidden_files(tmp_path):
    texts = tmp_path / "texts"
    (texts / "more").mkdir(parents=True)
    (texts / ".git").mkdir()
    for name in ("a.txt", "b.txt", "more/c.txt"):
        (texts / name).write_bytes((STDLIB / "difflib.py").read_bytes())
    (texts / "notes.md").write_text("not matched by the glob\n")
    (texts / ".git" / "index").write_bytes(b"DIRC\0\0\0\2binary")  # hidden: skipped, binary or not
    (texts / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")

    assert resolve_data(str(texts / "*.txt")).files == (texts / "a.txt", texts / "b.txt")
    assert resolve_data(str(texts / "**" / "*.txt")).files == (
        texts / "a.txt",
        texts / "b.txt",
        texts / "more" / "c.txt",
    )
    assert load_corpus(str(texts / "*.txt")).files == 2
    folder = resolve_data(str(texts))
    assert folder.kind == "text" and len(folder.files) == 4  # a, b, more/c, notes.md; no hidden file
    with pytest.raises(DataError, match="matches no file"):
        resolve_data(str(texts / "*.rst"))


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x7fELF\x02\x01\x01\x00" + bytes(200), "NUL byte at offset 7"),
        ("caf\u00e9 au lait\n".encode("latin-1") * 10, "not UTF-8 text"),
    ],
)
def test_a_binary_file_is_refused_by_name(tmp_path, content, why):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text("plain text " * 100)
    (folder / "bad.dat").write_bytes(content)
    for data in (folder, folder / "bad.dat", folder / "*"):
        with pytest.raises(DataError, match=why) as refused:
            load_corpus(str(data))
        assert str(folder / "bad.dat") in str(refused.value)


def test_utf8_text_is_accepted_even_when_the_probe_ends_inside_a_character(tmp_path):
    text = tmp_path / "utf8.txt"
    text.write_bytes(b"a" + "\u00e9".encode() * 10_000)  # the 8 KiB probe cuts a two-byte character
    assert resolve_data(str(text)).kind == "text"


def test_empty_data_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty folder"):
        resolve_data(str(tmp_path / "empty"))
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        resolve_data(str(tmp_path / "empty"))


def test_a_saved_hugging_face_dataset_trains_on_its_text_column(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is optional: pip install 'shoal[datasets]'")
    rows = [line for line in (STDLIB / "argparse.py").read_text().splitlines() if line.strip()]
    labels = list(range(len(rows)))
    datasets.Dataset.from_dict({"id": labels, "text": rows}).save_to_disk(tmp_path / "plain")
    source = resolve_data(str(tmp_path / "plain"))
    assert (source.kind, source.column) == ("hf", "text")
    corpus = load_corpus(str(tmp_path / "plain"))
    assert corpus.files == len(rows) and len(corpus.validation) > 0
    assert b"ArgumentParser" in corpus.train.tobytes()

    # A DatasetDict: its validation split is held out; the only string column is the text.
    split = {
        "train": datasets.Dataset.from_dict({"body": rows[:-50], "n": labels[:-50]}),
        "validation": datasets.Dataset.from_dict({"body": rows[-50:], "n": labels[-50:]}),
    }
    datasets.DatasetDict(split).save_to_disk(tmp_path / "splits")
    source = resolve_data(str(tmp_path / "splits"))
    assert (source.column, source.train_split, source.validation_split) == ("body", "train", "validation")
    corpus = load_corpus(str(tmp_path / "splits"))
    held_out = "\n".join(rows[-50:]) + "\n"
    assert corpus.validation.tobytes() == held_out.encode()
    trainer = Trainer(settings(tmp_path / "splits"))
    before = trainer.evaluate()
    for _ in range(40):
        trainer.train_step()
    trainer.outer_step(trainer.message(), None)
    assert trainer.evaluate() < before - 0.3


def test_a_hugging_face_dataset_without_a_text_column_is_refused_clearly(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="datasets is optional: pip install 'shoal[datasets]'")
    datasets.Dataset.from_dict({"title": ["a"], "body": ["b"]}).save_to_disk(tmp_path / "two")
    with pytest.raises(DataError, match=r"several string columns \(title, body\).*rename_column"):
        resolve_data(str(tmp_path / "two"))
    datasets.Dataset.from_dict({"n": [1, 2]}).save_to_disk(tmp_path / "numbers")
    with pytest.raises(DataError, match=r"no string column .*columns: n"):
        resolve_data(str(tmp_path / "numbers"))
    # Without the optional package the peer says what to install, before anything starts.
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(
        sources.importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a)
    )
    with pytest.raises(DataError, match=r"pip install 'shoal\[datasets\]'"):
        resolve_data(str(tmp_path / "two"))
