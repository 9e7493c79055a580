"""SparseLoCo (arXiv 2508.15706): error feedback + chunked top-k + 2-bit codec, no outer momentum.

See docs/outer-methods.md, SparseLoCo. Per peer:  e ← β·e + Δ;  m = encode(e);  e ← e − decode(m)   (all
inside `kernels.codec.encode`, pitfall P5). Aggregate: per coordinate, the MEAN OVER THE CONTRIBUTORS THAT
SELECTED IT (reference `scatter_reduce(mean, include_self=False)`, pitfall P4);  φ ← φ − α·A.  The outer lr is
applied once (P3): EF accumulates Δ unscaled and α multiplies only the aggregate.

This is the codec math the product's `pair_sparseloco` composes with a partner. SparseLoCo's own method (an
all-gather over every peer) and the gossip variant (V-A) are research baselines the daemon refuses; they
live with the convergence benchmark (bench/convergence/research/).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from shoal.gossip.outer.errors import OuterMessageError
from shoal.gossip.outer.tensors import Named, OuterError, check_same_layout
from shoal.gossip.outer.wire import Message
from shoal.kernels import codec

# Reference hyper-parameters: α = 1, β = 0.95 (hparams/512M/sweeps). Density: the codec's defaults.
DEFAULT_LR = 1.0
DEFAULT_EF_BETA = 0.95


def layout(slow: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What `codec.decode` must find in a payload: every tensor of the model, fp32."""
    return {name: (tuple(t.shape), torch.float32) for name, t in slow.items()}


def compress(
    delta: Mapping[str, torch.Tensor],
    error: Mapping[str, torch.Tensor],
    config: codec.CodecConfig | None,
    beta: float = DEFAULT_EF_BETA,
) -> tuple[bytes, Named]:
    """Fold Δ into a copy of the EF buffer, encode it; returns (payload, new EF buffer). Inputs untouched."""
    config = config or codec.CodecConfig()
    check_same_layout(delta, error, "error-feedback buffer")
    new_error = {name: t.float().clone() for name, t in error.items()}
    payload = codec.encode({n: t.float() for n, t in delta.items()}, new_error, config, beta=beta)
    return payload, new_error


def decode_dense(payload: bytes, slow: Mapping[str, torch.Tensor]) -> tuple[Named, Named]:
    """A payload as dense (values, contributor mask) tensors shaped like the slow weights."""
    update = codec.decode(payload, expected=layout(slow))
    if update.keys() != slow.keys():
        raise codec.CodecError(f"codec payload has {len(update)} tensors, the model {len(slow)}; dropped")
    values = {name: torch.zeros(t.shape, dtype=torch.float32) for name, t in slow.items()}
    codec.accumulate(update, values)
    mask = {name: torch.zeros(t.shape, dtype=torch.float32) for name, t in slow.items()}
    for name, sparse in update.items():  # which coordinates this sender selected (contributor count)
        mask[name].view(-1)[sparse.indices] = 1.0
    return values, mask


def decode_message(message: Message, slow: Mapping[str, torch.Tensor]) -> tuple[Named, Named]:
    """The codec payload of a sparse method's message as dense (values, contributor mask)."""
    if message.update is None:
        raise OuterMessageError(f"{message.kind} message from {message.origin} carries no codec payload")
    try:
        return decode_dense(message.update, slow)
    except codec.CodecError as exc:
        raise OuterMessageError(f"{message.kind} message from {message.origin}: {exc}") from exc


def contributor_mean(decoded: Sequence[tuple[Named, Named]]) -> Named:
    """Per coordinate: sum of the values sent for it / number of peers that sent it (0 where nobody did)."""
    if not decoded:
        raise OuterError("SparseLoCo aggregate of no payloads: include the peer's own")
    names = decoded[0][0].keys()
    total = {n: torch.zeros_like(decoded[0][0][n]) for n in names}
    count = {n: torch.zeros_like(decoded[0][0][n]) for n in names}
    for values, mask in decoded:
        for n in names:
            total[n] += values[n]
            count[n] += mask[n]
    return {n: total[n] / count[n].clamp_min(1.0) for n in names}


def apply(slow: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor], lr: float) -> Named:
    """φ ← φ − α·A (no momentum, pitfall P10)."""
    check_same_layout(slow, aggregate, "SparseLoCo aggregate")
    return {n: (phi.float() - lr * aggregate[n]).to(phi.dtype) for n, phi in slow.items()}
