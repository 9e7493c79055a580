"""Tensors parked in a spill file (peer/worker/spill.py) come back equal, each on its own mapping."""

from __future__ import annotations

import torch

from shoal.peer.worker import spill


def test_tensors_come_back_equal_after_the_file_is_gone_and_writes_stay_in_memory(tmp_path):
    g = torch.Generator().manual_seed(0)
    groups = {
        "slow": {"w": torch.randn(33, 7, generator=g), "b": torch.randn(5, generator=g)},
        "error": {},
        "fast": {"half": torch.randn(3, 3, generator=g).bfloat16(), "empty": torch.empty(0, 4)},
    }
    path = tmp_path / "spill"
    spans = spill.write(path, groups)
    assert all(span.offset % spill.ALIGN == 0 for span in spans)
    back = spill.read(path, spans)
    path.unlink()  # the mappings keep the data
    for group, tensors in groups.items():
        for name, tensor in tensors.items():
            got = back[group][name]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)
    back["slow"]["w"].add_(1.0)  # copy-on-write: the caller may step on them in place
    assert torch.equal(back["slow"]["w"], groups["slow"]["w"] + 1.0)
