"""What arrives from a partner is hostile: a bad message raises MessageError and changes nothing."""

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.convergence.research import RESEARCH_METHODS
from shoal.gossip.outer.errors import OuterMessageError as MessageError
from shoal.gossip.outer.methods import METHODS, OuterConfig, OuterState, make_message, outer_step
from shoal.gossip.outer.wire import unpack


def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"w": 0.05 * torch.randn(32, 16), "b": 0.05 * torch.randn(16)}


def corruptions(good: bytes, method: str) -> list[bytes]:
    body = msgpack.unpackb(good, raw=False)
    out = [good[: len(good) // 2], b"\x00" * 40, b"", msgpack.packb({**body, "v": 99})]
    out.append(msgpack.packb({**body, "k": "other-method"}))
    if "t" in body:  # dense tensors: one byte short, one tensor missing, NaN values
        out.append(msgpack.packb({**body, "t": [t[:-1] for t in body["t"]]}))
        out.append(msgpack.packb({**body, "t": body["t"][:-1]}))
        if method in ("diloco", "noloco"):
            nan = torch.full((16,), float("nan")).numpy().tobytes()
            out.append(msgpack.packb({**body, "t": [nan, *body["t"][1:]]}))
    if "u" in body:
        out.append(msgpack.packb({**body, "u": body["u"][:-3]}))
        out.append(msgpack.packb({k: v for k, v in body.items() if k != "u"}))
    if "c" in body:
        out.append(msgpack.packb({**body, "c": {"s": [], "q": []}}))
    if "h" in body:  # lattice block checks: one short, all missing
        out.append(msgpack.packb({**body, "h": [h[:-1] for h in body["h"]]}))
        out.append(msgpack.packb({k: v for k, v in body.items() if k != "h"}))
    return out


@pytest.mark.parametrize("method", METHODS + RESEARCH_METHODS)  # the research ones: bench/convergence
def test_a_bad_partner_message_is_refused_before_anything_changes(method):
    config = OuterConfig.tuned(method)
    me = OuterState.fresh("me", weights())
    other = OuterState.fresh("other", weights())
    fast = {k: v + 0.01 for k, v in me.slow.items()}
    own = make_message(config, me, fast)
    good = make_message(config, other, fast)
    before = {k: v.clone() for k, v in me.slow.items()}
    for bad in corruptions(good, method):
        with pytest.raises(MessageError):
            outer_step(config, me, own, [bad])
        assert me.round == 0
        for k in before:
            assert torch.equal(me.slow[k], before[k])
    outer_step(config, me, own, [good])  # the intact message still applies
    assert me.round == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_parse_into_a_message(data):
    with pytest.raises(MessageError):
        unpack(data, "noloco")


def test_a_partner_claiming_a_huge_lattice_step_is_refused():
    config = OuterConfig.tuned("compressed-noloco")
    me, other = OuterState.fresh("me", weights()), OuterState.fresh("other", weights())
    fast = {k: v + 0.01 for k, v in me.slow.items()}
    own = make_message(config, me, fast)
    body = msgpack.unpackb(make_message(config, other, fast), raw=False)
    with pytest.raises(MessageError, match="implausible"):
        outer_step(config, me, own, [msgpack.packb({**body, "s": [1e3 * s for s in body["s"]]})])
