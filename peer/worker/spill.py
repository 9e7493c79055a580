"""Tensors parked on disk while the worker does something else, and mapped back one by one.

An overlapped round (worker/overlap.py) keeps three models' worth of tensors until its swap's answer comes.
They wait in a spill file; when they are needed again each tensor is its own copy-on-write mapping of its
span of the file, so that its pages leave the process as soon as the tensor goes (the outer step consumes
the old φ and momentum tensor by tensor). `torch.load(mmap=True)` maps a whole file as one storage, which
stays until the last of its tensors goes: the settling step then held every old tensor to its end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ALIGN = 64  # each span starts at a multiple of this: any dtype's view of it is aligned


@dataclass(frozen=True)
class Span:
    group: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def write(path: Path, groups: Mapping[str, Mapping[str, torch.Tensor]]) -> list[Span]:
    """Writes every tensor of `groups` ({group: {name: CPU tensor}}) to `path`; returns where each went."""
    spans: list[Span] = []
    offset = 0
    with open(path, "wb") as f:
        for group, tensors in groups.items():
            for name, tensor in tensors.items():
                data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                pad = -offset % ALIGN
                f.write(b"\0" * pad)
                offset += pad
                f.write(data.data)  # a view of the tensor: no copy
                spans.append(Span(group, name, tensor.dtype, tuple(tensor.shape), offset, data.nbytes))
                offset += data.nbytes
    return spans


def read(path: Path, spans: list[Span]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors `write` put in `path`, each mapped on its own (copy-on-write: writes stay in memory).
    The file may be unlinked at once: the mappings keep its data."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for span in spans:
        if span.nbytes == 0:
            tensor = torch.empty(span.shape, dtype=span.dtype)
        else:
            mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=span.offset, shape=(span.nbytes,))
            tensor = torch.from_numpy(mapped).view(span.dtype).reshape(span.shape)
        out.setdefault(span.group, {})[span.name] = tensor
    return out
