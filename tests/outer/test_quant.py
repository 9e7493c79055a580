import pytest
import torch

from shoal.gossip.outer import quant
from shoal.gossip.outer.tensors import OuterError


def test_lattice_code_is_exact_to_half_a_step_within_reach_of_the_side_information():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    side = x + 0.05 * torch.randn(1000, generator=g)  # the receiver's nearby copy
    step, bits = 0.001, 8  # reach 2^7 · 0.001 = 0.128 covers most gaps of the 0.05σ noise
    close = (x - side).abs() < 2 ** (bits - 1) * step - step
    decoded = quant.lattice_decode(quant.lattice_encode(x, step, bits), step, side, bits)
    assert close.float().mean() > 0.9
    assert bool(((decoded - x).abs()[close] <= step / 2 + 1e-6).all())
    # Out of reach the code wraps: the error is a whole number of moduli, which is why the sender sizes
    # the step from its update's magnitude (compressed_noloco.make_message).
    far = ~close & ((x - side).abs() > 2 ** (bits - 1) * step + step)
    assert bool(((decoded - x).abs()[far] > 2 ** (bits - 1) * step).all())


def test_absmax_code_error_is_bounded_by_half_a_level_of_each_block():
    x = torch.randn(1000) * torch.linspace(0.01, 1, 1000)
    scales, codes = quant.absmax_encode(x, bits=8)
    y = quant.absmax_decode(scales, codes, bits=8)
    assert scales.numel() == (1000 + quant.BLOCK - 1) // quant.BLOCK
    assert bool(((y - x).abs() <= scales.repeat_interleave(quant.BLOCK)[:1000] / 2 + 1e-7).all())


def test_bad_parameters_are_refused():
    with pytest.raises(OuterError):
        quant.lattice_encode(torch.ones(3), step=0.0)
    with pytest.raises(OuterError):
        quant.absmax_encode(torch.ones(3), bits=9)
    with pytest.raises(OuterError):
        quant.lattice_decode(torch.zeros(3, dtype=torch.uint8), 0.1, torch.zeros(4))
