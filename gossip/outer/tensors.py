"""Small helpers over one peer's model state: a dict of named tensors (φ, θ, Δ, buffers).

Every outer method works on these dicts, never on stacked replicas, because that is what the live worker
holds. Functions here return new dicts and leave their inputs alone unless the name says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from shoal.gossip.outer.errors import OuterError, OuterMessageError
from shoal.gossip.outer.wire import Message

Named = dict[str, torch.Tensor]


def check_same_layout(
    reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise OuterError unless `other` has exactly the names and shapes of `reference`."""
    if reference.keys() != other.keys():
        missing = sorted(reference.keys() - other.keys())[:3]
        extra = sorted(other.keys() - reference.keys())[:3]
        raise OuterError(
            f"{what} has other tensor names than the slow weights (missing {missing}, extra {extra})"
        )
    for name, tensor in reference.items():
        if other[name].shape != tensor.shape:
            raise OuterError(
                f"{what}[{name!r}] has shape {tuple(other[name].shape)}, "
                f"slow weights have {tuple(tensor.shape)}"
            )


def pseudo_gradient(slow: Mapping[str, torch.Tensor], fast: Mapping[str, torch.Tensor]) -> Named:
    """Δ = φ − θ (old minus new; pitfall P1): a step along −Δ moves φ toward θ. Computed in fp32 (P19)."""
    check_same_layout(slow, fast, "fast weights")
    return {name: slow[name].float() - fast[name].float() for name in slow}


def mean(dicts: Iterable[Mapping[str, torch.Tensor]]) -> Named:
    """Element-wise mean of named tensors with the same layout."""
    items = list(dicts)
    if not items:
        raise OuterError("mean of no updates: pass at least the peer's own update")
    total = {name: t.float().clone() for name, t in items[0].items()}
    for other in items[1:]:
        check_same_layout(total, other, "update")
        for name in total:
            total[name] += other[name]
    return {name: t / len(items) for name, t in total.items()}


def clone(named: Mapping[str, torch.Tensor]) -> Named:
    return {name: t.detach().clone() for name, t in named.items()}


def zeros_like(named: Mapping[str, torch.Tensor]) -> Named:
    return {name: torch.zeros_like(t, dtype=torch.float32) for name, t in named.items()}


def all_finite(named: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in named.values())


def dense_tensors(named: Mapping[str, torch.Tensor]) -> list[bytes]:
    """Named tensors as raw fp32 bytes in sorted-name order: a dense message's `tensors` field."""
    return [named[n].detach().float().contiguous().numpy().tobytes() for n in sorted(named)]


def read_dense(message: Message, like: Mapping[str, torch.Tensor]) -> Named:
    """Inverse of `dense_tensors`, checked against this peer's layout; OuterMessageError if it won't fit."""
    names = sorted(like)
    if len(message.tensors) != len(names):
        raise OuterMessageError(
            f"message from {message.origin} has {len(message.tensors)} tensors, model has {len(names)}"
        )
    out: Named = {}
    for name, raw in zip(names, message.tensors, strict=True):
        shape = like[name].shape
        if len(raw) != 4 * like[name].numel():
            raise OuterMessageError(
                f"message from {message.origin}: tensor {name!r} has {len(raw)} bytes, "
                f"expected {4 * like[name].numel()} for shape {tuple(shape)}"
            )
        out[name] = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).view(shape)
    if not all_finite(out):
        raise OuterMessageError(f"message from {message.origin} carries non-finite values; dropped")
    return out
