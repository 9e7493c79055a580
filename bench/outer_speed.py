"""Outer-method speed on one CPU core: encode, decode and outer step in MB/s of fp32, against the old code.

    python -m bench.outer_speed --json bench/out/outer-speed.json [--params 25000000] [--repeats 5]

For every product method (`methods.METHODS`, the registry of gossip/outer/config.py) and a model-sized set
of fp32 tensors shaped like a transformer's (`model_shapes`), on one torch thread, this times
- encode: `make_message` of peer a's fast weights;
- decode: reading peer b's message against a's slow weights (what `outer_step` does to the partner's);
- step: the whole `outer_step` with a's own message and b's;
in MB/s of fp32 (4 bytes x params / seconds, median of `--repeats`), for the product and for the frozen
copy of the code before issue 17 (bench/outer_reference.py), interleaved in one process so that the noisy
shared machine slows both alike. It also checks that both write the same bytes and step to the same
weights, and measures the peak extra resident memory of each operation once (VmHWM reset through
/proc/self/clear_refs; glibc set to give large blocks back at once so that freed temporaries show).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from bench.outer_reference import REFERENCE
from shoal.gossip.outer import compressed_noloco, pair_sparseloco, sparseloco
from shoal.gossip.outer.config import MODULES, OuterConfig, OuterState
from shoal.gossip.outer.methods import METHODS
from shoal.gossip.outer.tensors import Named, read_dense
from shoal.gossip.outer.wire import unpack

WIDTH = 768  # gpt2-small's
# One transformer block: attention in and out, MLP in and out, their biases and two layer norms.
BLOCK = [
    (3 * WIDTH, WIDTH),
    (3 * WIDTH,),
    (WIDTH, WIDTH),
    (WIDTH,),
    (4 * WIDTH, WIDTH),
    (4 * WIDTH,),
    (WIDTH, 4 * WIDTH),
    (WIDTH,),
    (WIDTH,),
    (WIDTH,),
]


def model_shapes(n_params: int) -> list[tuple[int, ...]]:
    """Transformer blocks of WIDTH until about `n_params`, the rest an embedding-like matrix (odd rows)."""
    shapes: list[tuple[int, ...]] = []
    total = 0
    while total < n_params:
        shape = BLOCK[len(shapes) % len(BLOCK)]
        left = n_params - total
        if math.prod(shape) > left:
            shape = (left // WIDTH, WIDTH) if left >= WIDTH else (left,)
        shapes.append(shape)
        total += math.prod(shape)
    return shapes


def make_peers(n_params: int, seed: int = 0) -> tuple[Named, Named, Named, Named]:
    """(φ_a, φ_b, θ_a, θ_b): two replicas a little apart, each moved by its own round of inner steps."""
    g = torch.Generator().manual_seed(seed)
    slow_a = {f"p{i:03d}": 0.02 * torch.randn(s, generator=g) for i, s in enumerate(model_shapes(n_params))}
    slow_b = {n: t + 2e-4 * torch.randn(t.shape, generator=g) for n, t in slow_a.items()}
    fast_a = {n: t - 1e-3 * torch.randn(t.shape, generator=g) for n, t in slow_a.items()}
    fast_b = {n: t - 1e-3 * torch.randn(t.shape, generator=g) for n, t in slow_b.items()}
    return slow_a, slow_b, fast_a, fast_b


def product_decode(config: OuterConfig, state: OuterState, message: bytes) -> object:
    """What the product's `outer_step` does to a partner's message before the step itself."""
    msg = unpack(message, config.method)
    if config.method == "noloco":
        return read_dense(msg, state.slow)
    if config.method == "compressed-noloco":
        return compressed_noloco.read_lattice(msg, state.slow, config)
    if config.method == "pair-sparseloco":
        return sparseloco.decode_message(msg, state.slow), pair_sparseloco._partner_slices(config, state, msg)
    raise ValueError(f"no decode for {config.method}")


def snapshot(state: OuterState) -> tuple:
    # Every method rebinds φ, the momentum and the error buffer (new tensors), so references suffice.
    return (state.slow, state.momentum, state.error, dict(state.drift), dict(state.counters))


def restore(state: OuterState, saved: tuple) -> None:
    state.slow, state.momentum, state.error = saved[:3]
    state.drift, state.counters = dict(saved[3]), dict(saved[4])


_LIBC: ctypes.CDLL | None = None


def _setup_malloc() -> None:
    """glibc: blocks over 1 MiB from mmap, always, so that freed temporaries leave the resident set."""
    global _LIBC
    try:
        _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it also stops glibc's dynamic raise)
    except OSError:
        _LIBC = None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_extra_mb(fn: Callable[[], object]) -> float | None:
    """Peak resident memory above the start while `fn` runs, in MB (None where Linux does not say)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status_kib("VmRSS")
        result = fn()
        peak = _status_kib("VmHWM")
    except OSError:
        return None
    del result
    return (peak - before) * 1024 / 1e6


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def same_named(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


class MethodBench:
    """One method's two peers, both implementations' messages, and the closures that run each operation."""

    def __init__(self, method: str, peers: tuple[Named, Named, Named, Named]) -> None:
        self.method = method
        self.config = config = OuterConfig.tuned(method)
        slow_a, slow_b, self.fast_a, fast_b = peers
        self.n = sum(t.numel() for t in slow_a.values())
        self.impls = {
            "new": (MODULES[method].make_message, product_decode, MODULES[method].outer_step),
            "old": (REFERENCE[method].make_message, REFERENCE[method].decode, REFERENCE[method].outer_step),
        }
        self.a, b = OuterState.fresh("peer-a", slow_a), OuterState.fresh("peer-b", slow_b)
        self.saved = snapshot(self.a)
        saved_b = snapshot(b)
        self.messages: dict[str, tuple[bytes, bytes]] = {}
        after: dict[str, tuple[Named, Named]] = {}
        for impl, (encode, _, step) in self.impls.items():
            self.reset()
            restore(b, saved_b)
            self.messages[impl] = (encode(config, self.a, self.fast_a), encode(config, b, fast_b))
            step(config, self.a, *self.pair(impl))
            after[impl] = (self.a.slow, self.a.momentum)
        self.reset()
        self.wire_identical = self.messages["new"] == self.messages["old"]
        self.step_identical = all(same_named(x, y) for x, y in zip(after["new"], after["old"], strict=True))

    def pair(self, impl: str) -> tuple[bytes, list[bytes]]:
        own, theirs = self.messages[impl]
        return own, [theirs]

    def reset(self) -> None:
        restore(self.a, self.saved)

    def runner(self, impl: str, op: str) -> Callable[[], object]:
        encode, decode, step = self.impls[impl]
        config, a = self.config, self.a
        if op == "encode":
            return lambda: encode(config, a, self.fast_a)
        if op == "decode":
            return lambda: decode(config, a, self.messages[impl][1])
        return lambda: step(config, a, *self.pair(impl))


OPS = ("encode", "decode", "step")


def time_method(bench: MethodBench, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of every run, interleaved: each operation, new then old, `repeats` times."""
    seconds: dict[str, dict[str, list[float]]] = {i: {op: [] for op in OPS} for i in bench.impls}
    for _ in range(repeats):
        for op in OPS:
            for impl in bench.impls:
                seconds[impl][op].append(timed(bench.runner(impl, op)))
                bench.reset()
    return seconds


def memory_of(bench: MethodBench) -> dict[str, dict[str, float | None]]:
    out = {}
    for impl in bench.impls:
        out[impl] = {}
        for op in OPS:
            out[impl][op] = peak_extra_mb(bench.runner(impl, op))
            bench.reset()
    return out


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def summary(bench: MethodBench, seconds: dict, memory: dict) -> dict:
    mb = 4 * bench.n / 1e6
    rates = {i: {op: mb / statistics.median(s[op]) for op in OPS} for i, s in seconds.items()}
    out = {
        "mb_s": rates,
        "speedup": {op: rates["new"][op] / rates["old"][op] for op in OPS},
        "seconds": seconds,
        "peak_extra_mb": memory,
        "peak_extra_bytes_per_param": {
            i: {op: None if v is None else v * 1e6 / bench.n for op, v in m.items()}
            for i, m in memory.items()
        },
        "wire_identical": bench.wire_identical,
        "step_identical": bench.step_identical,
        "meets_100_mb_s": all(rates["new"][op] >= 100 for op in OPS),
    }
    per_param = out["peak_extra_bytes_per_param"]
    print(
        f"[{bench.method}] MB/s new / old: "
        + ", ".join(f"{op} {rates['new'][op]:.0f} / {rates['old'][op]:.0f}" for op in OPS)
        + "; peak extra B/param new / old: "
        + ", ".join(f"{op} {_fmt(per_param['new'][op])} / {_fmt(per_param['old'][op])}" for op in OPS)
        + f"; wire identical {bench.wire_identical}, step identical {bench.step_identical}",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True, help="where to write the results")
    ap.add_argument("--params", type=int, default=25_000_000, help="model size (fp32 parameters)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per operation (median reported)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated product methods")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    peers = make_peers(args.params)
    shapes = [tuple(t.shape) for t in peers[0].values()]
    n = sum(t.numel() for t in peers[0].values())
    print(f"{n:,} fp32 parameters in {len(shapes)} tensors, 1 torch thread", flush=True)
    benches = [MethodBench(m, peers) for m in args.methods.split(",")]
    # Timings first, with glibc's default malloc (what the worker runs with); memory after, with large
    # blocks mmap'd so that every temporary shows in the peak (this slows allocations: not timed).
    seconds = [time_method(b, args.repeats) for b in benches]
    _setup_malloc()
    results = {b.method: summary(b, s, memory_of(b)) for b, s in zip(benches, seconds, strict=True)}
    out = {
        "n_params": n,
        "shapes": shapes,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "methods": results,
        "note": "MB/s of fp32 (4 B x params / median seconds), one thread; old = bench/outer_reference.py",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
