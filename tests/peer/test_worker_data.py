"""The worker's other sources: nanoGPT token files, and Hugging Face causal LMs from a local folder."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from shoal.peer.worker.data import load_corpus
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
