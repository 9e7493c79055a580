"""Codec benchmark: bits per parameter and encode+decode throughput against a naive torch implementation.

    python -m bench.codec --json bench/out/codec.json [--sizes 10M,100M] [--gpu] [--max-seconds 900]

For each model size (fp32, GPT-like matrices plus 1-D vectors, Gaussian pseudo-gradients) this measures, in
one process so that the noisy shared machine affects both sides alike:
- bits per parameter of a first-round payload with fixed 12-bit and with entropy-coded indices (all side
  information counted);
- encode + decode + accumulate-into-dense throughput, in MB/s of fp32 input, of ``kernels.codec`` and of
  ``naive_round`` below (the scheme as the reference code writes it: dense scatter, unchunk, dense decode),
  runs interleaved, best of ``--repeats``;
- the machine's memory-copy bandwidth (``torch`` tensor copy of the same size), to report what fraction of
  it the codec reaches.
With ``--gpu`` the same throughput on CUDA for the torch path and, when CuPy is importable, the CuPy backend,
with byte-equality of their payloads checked.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shoal.kernels.chunking import layout
from shoal.kernels.codec import CodecConfig, accumulate, decode, encode, expected_of, payload_bits_per_param

SIZES = {"10M": 10_000_000, "100M": 100_000_000}
# Model width of the synthetic model: GPT-like blocks of (D, 4D) and (4D, D) matrices and D-vectors.
WIDTH = 1024
BETA = 0.95


def model_shapes(n_params: int) -> list[tuple[int, ...]]:
    """Shapes of a GPT-like model of about ``n_params`` parameters (matrices a multiple of 64 per side)."""
    cycle = [(WIDTH, 4 * WIDTH), (4 * WIDTH,), (4 * WIDTH, WIDTH), (WIDTH,)]
    shapes: list[tuple[int, ...]] = []
    total = 0
    while total < n_params:
        shape = cycle[len(shapes) % len(cycle)]
        left = n_params - total
        if math.prod(shape) > left:
            shape = (max(64, left // WIDTH // 64 * 64), WIDTH) if left >= 64 * WIDTH else (left,)
        shapes.append(shape)
        total += math.prod(shape)
    return shapes


def make_model(n_params: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=g, device=device) for i, s in enumerate(model_shapes(n_params))}


# ---- naive reference: the scheme as research code writes it ----


def _tiles(e: torch.Tensor, h: int, w: int) -> torch.Tensor:
    rows, cols = e.shape
    return e.reshape(rows // h, h, cols // w, w).permute(0, 2, 1, 3).reshape(rows // h, cols // w, h * w)


def _untiles(t: torch.Tensor, rows: int, cols: int, h: int, w: int) -> torch.Tensor:
    return t.reshape(rows // h, cols // w, h, w).permute(0, 2, 1, 3).reshape(rows, cols)


def naive_round(
    deltas: dict[str, torch.Tensor], ef: dict[str, torch.Tensor], into: dict[str, torch.Tensor]
) -> int:
    """One encode + decode + accumulate of every tensor, written plainly. Returns payload bytes."""
    sent_bytes = 0
    for name, delta in deltas.items():
        lay = layout(tuple(delta.shape), 64, 64)
        e = ef.setdefault(name, torch.zeros_like(delta))
        e.mul_(BETA).add_(delta)
        x = _tiles(e.view(lay.rows, lay.cols), lay.h, lay.w)
        idx = torch.topk(x.abs(), lay.k, dim=-1, sorted=False).indices
        v = torch.gather(x, -1, idx)
        shift = v.mean()
        c = v - shift
        std = c.norm() / math.sqrt(max(1, c.numel() - 1))
        scale = 1.5 * std if std > 0 else torch.ones((), device=c.device)
        q = torch.clamp(torch.round(c / scale + 2), 0, 3).to(torch.uint8)
        zero = torch.zeros((), device=c.device)
        lut = torch.stack([c[q == b].mean() if (q == b).any() else zero for b in range(4)])
        # wire: 12-bit indices (pairs in 3 bytes), 2-bit codes (4 per byte)
        flat_idx = idx.reshape(-1).to(torch.int32)
        if flat_idx.numel() % 2:
            flat_idx = torch.cat([flat_idx, flat_idx.new_zeros(1)])
        a, b2 = flat_idx[0::2], flat_idx[1::2]
        idx_bytes = torch.stack([a >> 4, ((a & 15) << 4) | (b2 >> 8), b2 & 255], dim=1).to(torch.uint8)
        qf = q.reshape(-1)
        qf = torch.cat([qf, qf.new_zeros((-qf.numel()) % 4)]).view(-1, 4)
        q_bytes = qf[:, 0] | (qf[:, 1] << 2) | (qf[:, 2] << 4) | (qf[:, 3] << 6)
        sent_bytes += idx_bytes.numel() + q_bytes.numel() + 20
        # local reconstruction (dense) and EF update
        deq = lut[q.long()] + shift
        dense = torch.zeros_like(x).scatter_(-1, idx, deq)
        e.sub_(_untiles(dense, lay.rows, lay.cols, lay.h, lay.w).view(delta.shape))
        # receiver: unpack, dequantize, dense scatter, unchunk, add
        i32 = idx_bytes.to(torch.int32)
        a2 = (i32[:, 0] << 4) | (i32[:, 1] >> 4)
        b3 = ((i32[:, 1] & 15) << 8) | i32[:, 2]
        r_idx = torch.stack([a2, b3], dim=1).reshape(-1)[: idx.numel()].view(idx.shape).long()
        r_q = torch.stack([(q_bytes >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1)[: q.numel()]
        r_val = lut[r_q.view(q.shape).long()] + shift
        r_dense = torch.zeros_like(x).scatter_(-1, r_idx, r_val)
        into[name].add_(_untiles(r_dense, lay.rows, lay.cols, lay.h, lay.w).view(delta.shape))
    return sent_bytes


def shoal_round(
    deltas: dict[str, torch.Tensor],
    ef: dict[str, torch.Tensor],
    into: dict[str, torch.Tensor],
    cfg: CodecConfig,
) -> int:
    payload = encode(deltas, ef, cfg, beta=BETA)
    accumulate(decode(payload, expected_of(deltas)), into)
    return len(payload)


# ---- measurement ----


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def memcpy_gb_s(n_bytes: int, device: str, repeats: int) -> float:
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    best = min(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    # A copy reads n bytes and writes n bytes; like `memcpy` figures, count the n bytes copied.
    return n_bytes / best / 1e9


class Guard:
    """Wall-clock guard: stop measuring (and say so in the JSON) once the budget is spent."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.tripped = False

    def ok(self) -> bool:
        self.tripped = self.tripped or time.monotonic() > self.deadline
        return not self.tripped


def bench_size(
    label: str, n_target: int, device: str, repeats: int, guard: Guard, gpu_backends: bool
) -> dict:
    deltas = make_model(n_target, device)
    n = sum(t.numel() for t in deltas.values())
    mb = 4 * n / 1e6
    print(f"[{label}] {n:,} fp32 parameters in {len(deltas)} tensors on {device}", flush=True)
    bits = {}
    for coding in ("fixed12", "entropy"):
        payload = encode(deltas, {}, CodecConfig(index_coding=coding), beta=BETA)
        bits[coding] = payload_bits_per_param(payload, n)
    print(f"[{label}] bits/param: fixed12 {bits['fixed12']:.4f}, entropy {bits['entropy']:.4f}", flush=True)

    cfg = CodecConfig()
    ef_s: dict[str, torch.Tensor] = {}
    ef_n: dict[str, torch.Tensor] = {}
    into = {k: torch.zeros_like(v) for k, v in deltas.items()}
    times: dict[str, list[float]] = {"shoal": [], "naive": []}
    # Warm-up round of each (allocations, first-touch page faults), then interleaved timed rounds.
    shoal_round(deltas, ef_s, into, cfg)
    naive_round(deltas, ef_n, into)
    for _ in range(repeats):
        if not guard.ok():
            break
        times["shoal"].append(timed(lambda: shoal_round(deltas, ef_s, into, cfg), device))
        times["naive"].append(timed(lambda: naive_round(deltas, ef_n, into), device))
    result: dict = {"n_params": n, "bits_per_param": bits}
    if times["shoal"] and times["naive"]:
        rates = {k: mb / min(v) for k, v in times.items()}
        copy = memcpy_gb_s(4 * n, device, repeats=5)
        result.update(
            encode_decode_mb_s=rates,
            speedup_vs_naive=rates["shoal"] / rates["naive"],
            memcpy_gb_s=copy,
            memcpy_fraction=rates["shoal"] / 1e3 / copy,
            seconds={k: min(v) for k, v in times.items()},
        )
        print(
            f"[{label}] encode+decode+accumulate: shoal {rates['shoal']:.0f} MB/s,"
            f" naive {rates['naive']:.0f} MB/s"
            f" -> speedup {result['speedup_vs_naive']:.2f}x; memcpy {copy:.1f} GB/s"
            f" (shoal = {100 * result['memcpy_fraction']:.1f} % of it)",
            flush=True,
        )
    if gpu_backends:
        result["cupy"] = bench_cupy(deltas, cfg, repeats, guard, result.get("memcpy_gb_s"))
    return result


def bench_cupy(
    deltas: dict[str, torch.Tensor], cfg: CodecConfig, repeats: int, guard: Guard, copy_gb_s: float | None
) -> dict:
    """CuPy backend on CUDA: byte-equality with the torch path, throughput and achieved GB/s."""
    try:
        from shoal.kernels import cupy_backend
    except ImportError as exc:  # pragma: no cover - depends on the machine
        return {"skipped": f"cupy backend not importable: {exc}"}
    if not cupy_backend.available():
        return {"skipped": "cupy not installed or no CUDA device"}
    n = sum(t.numel() for t in deltas.values())
    ef_t: dict[str, torch.Tensor] = {}
    ef_c: dict[str, torch.Tensor] = {}
    same = True
    for _ in range(2):  # two rounds: the second starts from a non-zero error feedback
        p_t = encode(deltas, ef_t, cfg, beta=BETA)
        p_c = cupy_backend.encode(deltas, ef_c, cfg, beta=BETA)
        same = same and p_t == p_c and all(torch.equal(ef_t[k], ef_c[k]) for k in ef_t)
    t_torch, t_cupy = [], []
    for _ in range(repeats):
        if not guard.ok():
            break
        t_torch.append(timed(lambda: encode(deltas, ef_t, cfg, beta=BETA), "cuda"))
        t_cupy.append(timed(lambda: cupy_backend.encode(deltas, ef_c, cfg, beta=BETA), "cuda"))
    out: dict = {"byte_identical": same}
    if t_torch and t_cupy:
        # Bytes the encoder must move at least: read delta, read and write the error feedback (12 B/param).
        out.update(
            encode_mb_s={"torch": 4 * n / 1e6 / min(t_torch), "cupy": 4 * n / 1e6 / min(t_cupy)},
            achieved_gb_s={"torch": 12 * n / 1e9 / min(t_torch), "cupy": 12 * n / 1e9 / min(t_cupy)},
        )
        if copy_gb_s:
            # A device copy of n bytes moves 2n bytes (read + write): the card's usable bandwidth.
            card = 2 * copy_gb_s
            out["fraction_of_bandwidth"] = {k: v / card for k, v in out["achieved_gb_s"].items()}
    print(f"[cupy] {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True, help="where to write the results")
    ap.add_argument("--sizes", default="10M,100M", help="comma-separated, from " + ",".join(SIZES))
    ap.add_argument("--gpu", action="store_true", help="run on CUDA (torch and CuPy backends)")
    ap.add_argument("--repeats", type=int, default=3)
    # One thread by default: on the shared 2-core machine torch's thread pool, oversubscribed by other jobs,
    # made both implementations 2-4x slower and their ratio noisy. 0 keeps torch's default.
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="wall-clock guard for the whole run")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        print("--gpu given but torch sees no CUDA device", file=sys.stderr)
        return 2
    guard = Guard(args.max_seconds)
    per_size: dict[str, dict] = {}
    for label in args.sizes.split(","):
        if not guard.ok():
            print(f"[{label}] skipped: wall-clock guard of {args.max_seconds:.0f} s reached", flush=True)
            per_size[label] = {"skipped": "wall-clock guard"}
            continue
        per_size[label] = bench_size(label, SIZES[label], device, args.repeats, guard, args.gpu)
    # The layout: the 100M case at the top level, the others beside it under their labels.
    main_label = "100M" if "100M" in per_size else next(iter(per_size))
    out = dict(per_size[main_label])
    out.update({label: res for label, res in per_size.items() if label != main_label})
    out.update(
        device=device,
        torch_threads=torch.get_num_threads(),
        guard_tripped=guard.tripped,
        note="shared CPU: other jobs ran beside this one; ratios are from interleaved runs in one process",
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
