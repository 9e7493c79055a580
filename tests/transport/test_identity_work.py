"""Identity work: a member must prove a few bits of work bound to its peer id, checked with one hash."""

from __future__ import annotations

import pytest

from shoal.gossip.membership import Membership
from shoal.transport.identity import generate_key, peer_id_from_key
from shoal.transport.identity_work import meets, mine

BITS = 10


def test_a_mined_nonce_proves_work_for_its_peer_id_only():
    peer_id = str(peer_id_from_key(generate_key()))
    nonce = mine(peer_id, BITS)
    assert nonce is not None and meets(peer_id, nonce, BITS)
    other = str(peer_id_from_key(generate_key()))
    # Some nonce may prove work for another id by chance (1 in 2^10): not all of the first 16 do.
    assert not all(meets(other, n, BITS) for n in range(nonce, nonce + 16))
    assert meets(peer_id, 12345, 0) and not meets(peer_id, -1, BITS) and not meets(peer_id, 2**64, BITS)


def test_mining_stops_when_the_caller_gives_up():
    assert mine(str(peer_id_from_key(generate_key())), 32, between_chunks=lambda tried: False) is None
    with pytest.raises(ValueError):
        mine("x", 33)


def test_members_without_the_runs_identity_work_are_refused():
    def member(work_bits: int, mined: bool) -> Membership:
        key = generate_key()
        work = mine(str(peer_id_from_key(key)), work_bits) if mined else 0
        return Membership(key, "run", "/ip4/10.0.0.1/tcp/1", now=0.0, work_bits=work_bits, work=work or 0)

    me = member(BITS, mined=True)
    honest, lazy = member(BITS, mined=True), member(BITS, mined=False)
    while meets(lazy.peer_id, 0, BITS):  # 1 in 1024: a key whose nonce 0 happens to prove the work
        lazy = member(BITS, mined=False)
    assert me.merge(honest.table() + lazy.table(), now=0.0) == [honest.peer_id]
    assert any("identity work" in why for why in me.refused)
