"""CuPy backend: raw CUDA kernels for per-tile top-k selection and the 2-bit quantizer (NVIDIA GPUs).

It writes the same bytes as the torch reference (kernels.codec) for the same input, by construction:
- selection follows the same rule (largest ``|x|`` by int32 bit pattern, lower position on ties; one thread
  block per tile runs a 4-digit radix select, then takes the entries above the k-th value and the first
  entries equal to it in position order, written ascending);
- the quantizer's float64 sums run in the reference's fixed order (sequentially over a tile's k values in a
  thread, then over tiles on the host with ``kernels.quantize``), with ``__dadd_rn``/``__dmul_rn`` so that no
  fused multiply-add changes a rounding, and codes are the same float32 comparisons;
- the error-feedback update and the subtraction of what was sent are the same torch operations, and the
  packing into the wire format is the shared numpy code of ``kernels.codec``.

CuPy is optional: this module imports without it, and :func:`available` says whether it can run.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
import torch

from shoal.kernels import quantize as qz
from shoal.kernels.chunking import TileLayout
from shoal.kernels.codec import CodecConfig, CodecError, Selection, torch_select
from shoal.kernels.codec import encode as _encode

try:  # CuPy is an optional dependency (extra "gpu"); without it the torch path runs.
    import cupy as cp
except ImportError:  # pragma: no cover - depends on the machine
    cp = None

# Threads per block of the selection kernel: 8 warps; each thread scans L / 256 consecutive entries.
SELECT_THREADS = 256
# Tiles are at most 64 x 64 (kernels.chunking.MAX_CHUNK), so a tile's keys fit in 16 KiB of shared memory.
MAX_TILE = 4096

_SOURCE = r"""
extern "C" __global__ void select_tiles(
    const float* __restrict__ e, const long long cols, const int h, const int w, const int tiles_x,
    const int k, int* __restrict__ out_pos, float* __restrict__ out_val, double* __restrict__ out_sum)
{
    extern __shared__ unsigned int keys[];           // tile_len entries
    __shared__ unsigned int hist[256];
    __shared__ int scan_equal[SELECT_THREADS];
    __shared__ int scan_chosen[SELECT_THREADS];
    __shared__ unsigned int s_prefix, s_mask;
    __shared__ int s_remaining;
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const long long tile = blockIdx.x;
    const int L = h * w;
    const long long ty = tile / tiles_x, tx = tile % tiles_x;
    const float* base = e + ty * h * cols + tx * w;
    for (int p = tid; p < L; p += nthreads) {
        const int r = p / w, c = p - r * w;
        keys[p] = __float_as_uint(base[r * cols + c]) & 0x7fffffffu;
    }
    if (tid == 0) { s_prefix = 0u; s_mask = 0u; s_remaining = k; }
    __syncthreads();
    // Radix select of the k-th largest key, 8 bits at a time from the top.
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += nthreads) hist[b] = 0u;
        __syncthreads();
        const unsigned int prefix = s_prefix, mask = s_mask;
        for (int p = tid; p < L; p += nthreads) {
            const unsigned int key = keys[p];
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            int rem = s_remaining;
            for (int b = 255; b >= 0; --b) {
                const int count = (int)hist[b];
                if (count >= rem) { s_prefix = prefix | ((unsigned int)b << shift); break; }
                rem -= count;
            }
            s_remaining = rem;
            s_mask = mask | (255u << shift);
        }
        __syncthreads();
    }
    const unsigned int kth = s_prefix;
    const int need_equal = s_remaining;              // entries equal to kth to keep, lowest positions first
    // Each thread owns a run of consecutive positions, so prefix sums over threads give position order.
    const int per = (L + nthreads - 1) / nthreads;
    const int lo = min(L, tid * per), hi = min(L, lo + per);
    int equal = 0;
    for (int p = lo; p < hi; ++p) equal += (keys[p] == kth);
    scan_equal[tid] = equal;
    __syncthreads();
    if (tid == 0) {
        int run = 0;
        for (int t = 0; t < nthreads; ++t) { const int x = scan_equal[t]; scan_equal[t] = run; run += x; }
    }
    __syncthreads();
    int equal_before = scan_equal[tid];
    int chosen = 0;
    for (int p = lo; p < hi; ++p) {
        const unsigned int key = keys[p];
        if (key > kth) chosen++;
        else if (key == kth) { if (equal_before < need_equal) chosen++; equal_before++; }
    }
    scan_chosen[tid] = chosen;
    __syncthreads();
    if (tid == 0) {
        int run = 0;
        for (int t = 0; t < nthreads; ++t) { const int x = scan_chosen[t]; scan_chosen[t] = run; run += x; }
    }
    __syncthreads();
    int slot = scan_chosen[tid];
    equal_before = scan_equal[tid];
    for (int p = lo; p < hi; ++p) {
        const unsigned int key = keys[p];
        bool take = key > kth;
        if (key == kth) { take = equal_before < need_equal; equal_before++; }
        if (take) {
            const int r = p / w, c = p - r * w;
            out_pos[tile * k + slot] = p;
            out_val[tile * k + slot] = base[r * cols + c];
            slot++;
        }
    }
    __syncthreads();
    if (tid == 0) {
        double acc = 0.0;
        for (int j = 0; j < k; ++j) acc = __dadd_rn(acc, (double)out_val[tile * k + j]);
        out_sum[tile] = acc;
    }
}

extern "C" __global__ void tile_square_sums(
    const float* __restrict__ values, const float shift, const int k, const long long n_tiles,
    double* __restrict__ out_sum)
{
    const long long tile = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tile >= n_tiles) return;
    double acc = 0.0;
    for (int j = 0; j < k; ++j) {
        const double c = (double)__fsub_rn(values[tile * k + j], shift);
        acc = __dadd_rn(acc, __dmul_rn(c, c));
    }
    out_sum[tile] = acc;
}

extern "C" __global__ void tile_codes(
    const float* __restrict__ values, const float shift, const float t0, const float t1, const float t2,
    const int k, const long long n_tiles, unsigned char* __restrict__ codes, double* __restrict__ bin_sum,
    long long* __restrict__ bin_count)
{
    const long long tile = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tile >= n_tiles) return;
    double sums[4] = {0.0, 0.0, 0.0, 0.0};
    long long counts[4] = {0, 0, 0, 0};
    for (int j = 0; j < k; ++j) {
        const float c = __fsub_rn(values[tile * k + j], shift);
        const int q = (c >= t0) + (c >= t1) + (c >= t2);
        codes[tile * k + j] = (unsigned char)q;
        sums[q] = __dadd_rn(sums[q], (double)c);
        counts[q]++;
    }
    for (int b = 0; b < 4; ++b) { bin_sum[tile * 4 + b] = sums[b]; bin_count[tile * 4 + b] = counts[b]; }
}
""".replace("SELECT_THREADS", str(SELECT_THREADS))

_module: Any = None


def available() -> bool:
    """Whether CuPy is installed and a CUDA device is present."""
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except cp.cuda.runtime.CUDARuntimeError:
        return False


def _kernels() -> Any:
    global _module
    if _module is None:
        _module = cp.RawModule(code=_SOURCE, options=("--std=c++14", "--fmad=false"))
    return _module


def _block_threads(tile_len: int) -> int:
    return min(SELECT_THREADS, max(32, (tile_len + 31) // 32 * 32))


def cupy_select(e: torch.Tensor, lay: TileLayout, quantized: bool) -> Selection:
    """Selection and quantization of one CUDA tensor with the raw kernels (contract of codec.torch_select)."""
    if lay.n_kept == 0 or not e.is_cuda:
        return torch_select(e, lay, quantized)
    mod = _kernels()
    n_tiles, k = lay.n_tiles, lay.k
    stream = cp.cuda.ExternalStream(torch.cuda.current_stream(e.device).cuda_stream)
    with cp.cuda.Device(e.device.index), stream:
        e_cp = cp.asarray(e.detach())
        pos = cp.empty(n_tiles * k, dtype=cp.int32)
        val = cp.empty(n_tiles * k, dtype=cp.float32)
        sums = cp.empty(n_tiles, dtype=cp.float64)
        threads = _block_threads(lay.tile_len)
        mod.get_function("select_tiles")(
            (n_tiles,),
            (threads,),
            (
                e_cp,
                np.int64(lay.cols),
                np.int32(lay.h),
                np.int32(lay.w),
                np.int32(lay.tiles_x),
                np.int32(k),
                pos,
                val,
                sums,
            ),
            shared_mem=4 * lay.tile_len,
        )
        values = torch.as_tensor(val, device=e.device)
        positions = cp.asnumpy(pos).astype(np.int64).reshape(n_tiles, k)
        q = None
        if quantized and bool(cp.isfinite(val).all()):
            q = _quantize(mod, val, cp.asnumpy(sums), n_tiles, k)
    ty = torch.arange(lay.tiles_y, device=e.device).view(-1, 1, 1)
    tx = torch.arange(lay.tiles_x, device=e.device).view(1, -1, 1)
    p = torch.as_tensor(positions, device=e.device).view(lay.tiles_y, lay.tiles_x, k)
    flat = ((ty * lay.h + p // lay.w) * lay.cols + tx * lay.w + p % lay.w).view(-1)
    return positions, flat, values, q


def _quantize(mod: Any, val: Any, tile_sums: np.ndarray, n_tiles: int, k: int) -> qz.Quantized:
    n = n_tiles * k
    blocks = ((n_tiles + 255) // 256,)
    shift = qz.shift_of(qz.total(tile_sums), n)
    sq = cp.empty(n_tiles, dtype=cp.float64)
    mod.get_function("tile_square_sums")(blocks, (256,), (val, shift, np.int32(k), np.int64(n_tiles), sq))
    t = qz.thresholds_of(qz.total(cp.asnumpy(sq)), n)
    codes = cp.empty(n, dtype=cp.uint8)
    bin_sum = cp.empty((n_tiles, qz.BINS), dtype=cp.float64)
    bin_count = cp.empty((n_tiles, qz.BINS), dtype=cp.int64)
    mod.get_function("tile_codes")(
        blocks,
        (256,),
        (val, shift, t[0], t[1], t[2], np.int32(k), np.int64(n_tiles), codes, bin_sum, bin_count),
    )
    lut = qz.lut_of(cp.asnumpy(bin_sum), cp.asnumpy(bin_count))
    return qz.Quantized(cp.asnumpy(codes), shift, lut)


def encode(
    deltas: Mapping[str, torch.Tensor],
    error_feedback: MutableMapping[str, torch.Tensor],
    config: CodecConfig,
    beta: float = 0.95,
) -> bytes:
    """:func:`kernels.codec.encode` with the CuPy kernels for CUDA tensors (byte-identical output)."""
    if not available():
        raise CodecError("the CuPy backend needs cupy and a CUDA device; use kernels.codec.encode instead")
    return _encode(deltas, error_feedback, config, beta, select_fn=cupy_select)
