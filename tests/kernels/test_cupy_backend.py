"""The CuPy backend writes the torch reference's bytes (skipped without cupy and a CUDA device)."""

from __future__ import annotations

import pytest
import torch

from shoal.kernels import cupy_backend
from shoal.kernels.codec import CodecConfig, CodecError, decode, encode, expected_of

gpu = pytest.mark.skipif(not cupy_backend.available(), reason="needs cupy and a CUDA device")


def _model(device: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    model = {
        "embed": torch.randn(1000, 256, generator=g, device=device),
        "w": torch.randn(512, 1536, generator=g, device=device),
        "odd": torch.randn(61, 131, generator=g, device=device),
        "norm": torch.randn(4099, generator=g, device=device),
        "conv": torch.randn(8, 3, 5, 5, generator=g, device=device),
    }
    model["embed"][100:400] = 0.0  # unused rows: all-tie tiles (docs/outer-methods.md, P8)
    model["w"][:, :64] = torch.randint(-2, 3, (512, 64), generator=g, device=device).float()  # many ties
    return model


def test_module_imports_and_refuses_cleanly_without_a_gpu() -> None:
    if cupy_backend.available():
        pytest.skip("a GPU is present")
    with pytest.raises(CodecError, match="CuPy backend needs"):
        cupy_backend.encode({"w": torch.zeros(4)}, {}, CodecConfig())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("coding", ["fixed12", "entropy"])
def test_cupy_payload_is_byte_identical_to_torch_on_cuda(coding: str) -> None:
    cfg = CodecConfig(index_coding=coding)
    ef_t: dict[str, torch.Tensor] = {}
    ef_c: dict[str, torch.Tensor] = {}
    for seed in range(3):  # later rounds start from a non-zero error feedback
        deltas = _model("cuda", seed)
        p_t = encode(deltas, ef_t, cfg)
        p_c = cupy_backend.encode(deltas, ef_c, cfg)
        assert p_t == p_c
        for name in deltas:
            assert torch.equal(ef_t[name], ef_c[name])
    update = decode(p_c, expected_of(deltas))
    assert set(update) == set(deltas)


@gpu
@pytest.mark.gpu
def test_cuda_torch_path_selects_like_the_cpu_path() -> None:
    """Selection is defined, so CPU and GPU pick the same indices (values may differ in rounding)."""
    deltas = _model("cuda", 7)
    update_gpu = decode(encode(deltas, {}, CodecConfig(quantize=False)), expected_of(deltas))
    cpu = {k: v.cpu() for k, v in deltas.items()}
    update_cpu = decode(encode(cpu, {}, CodecConfig(quantize=False)), expected_of(cpu))
    for name in deltas:
        assert torch.equal(update_gpu[name].indices, update_cpu[name].indices)
