"""Any Hugging Face `transformers` causal language model, loaded from a local folder (`--model hf:PATH`).

Optional: only when `transformers` is installed. The wrapper gives it the interface the trainer uses
(`forward(idx, targets) -> (logits, loss)`, `config.block_size`); the data must be token ids of that
model's tokenizer (token files, or text tokenized here with the tokenizer found in the same folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from shoal.errors import ShoalError

MAX_CONTEXT = 1024  # windows longer than this cost more memory than a volunteer's GPU may have


class ModelError(ShoalError):
    """A model could not be loaded."""


class _Config:
    def __init__(self, block_size: int, vocab_size: int):
        self.block_size, self.vocab_size = block_size, vocab_size


class HFCausalLM(nn.Module):
    def __init__(self, path: str):
        super().__init__()
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as error:
            raise ModelError(
                "--model hf:PATH needs the `transformers` package: pip install transformers"
            ) from error
        if not Path(path).is_dir():
            raise ModelError(
                f"no model folder at {path}; --model hf:PATH loads a local folder, never a hub name"
            )
        try:
            self.inner = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:  # no config.json, an unknown model type, ...
            reason = (str(error).splitlines() or [type(error).__name__])[0][:300]
            raise ModelError(
                f"cannot load a Hugging Face causal LM from {path}: {reason}; the folder must hold what "
                "save_pretrained writes (config.json and the weights)"
            ) from error
        context = getattr(self.inner.config, "max_position_embeddings", None) or MAX_CONTEXT
        self.config = _Config(min(int(context), MAX_CONTEXT), int(self.inner.config.vocab_size))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.inner(input_ids=idx).logits
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def tokenize_text(path: str, text: np.ndarray) -> np.ndarray:
    """Text bytes -> token ids with the tokenizer stored beside the model (uint32)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:300]
        raise ModelError(
            f"cannot load the tokenizer stored with the model in {path} ({reason}); save it there with "
            "tokenizer.save_pretrained, or train on token files of that tokenizer"
        ) from error
    ids = tokenizer(bytes(text).decode("utf-8", errors="replace"))["input_ids"]
    return np.asarray(ids, dtype=np.uint32)
