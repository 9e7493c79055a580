"""Closed runs: only peers with a token signed by the run's creator become members."""

from __future__ import annotations

import pytest

from shoal.gossip.admission import ANYONE, Admission, TokenError, from_text, issue
from shoal.gossip.membership import Membership
from shoal.transport.identity import generate_key, peer_id_from_key

NOW = 1_800_000_000.0
DAY = 86_400


def _closed_member(creator: str, key=None, token: bytes | None = None) -> Membership:
    return Membership(
        key or generate_key(), "run", "/ip4/10.0.0.1/tcp/1", now=0.0, wall_clock=lambda: NOW,
        admission=Admission("run", creator), token=token,
    )  # fmt: skip


def test_a_token_survives_its_text_form_and_admits_only_its_peer_in_its_run():
    creator, peer = generate_key(), generate_key()
    peer_id = str(peer_id_from_key(peer))
    token = from_text(issue(creator, "run", peer_id, int(NOW) + DAY).text())
    creator_id = str(peer_id_from_key(creator))
    assert token.check("run", creator_id, peer_id, NOW) is None
    assert "not" in token.check("run", creator_id, str(peer_id_from_key(generate_key())), NOW)
    assert "run" in token.check("other", creator_id, peer_id, NOW)
    assert "expired" in token.check("run", creator_id, peer_id, NOW + 2 * DAY)
    assert "creator" in token.check("run", str(peer_id_from_key(generate_key())), peer_id, NOW)
    anyone = issue(creator, "run", ANYONE, int(NOW) + DAY)
    assert anyone.check("run", creator_id, peer_id, NOW) is None


@pytest.mark.parametrize(
    "text", ["", "hello", "shoal-token-1.!!!", "shoal-token-1.AAAA", "shoal-token-1." + "A" * 5000]
)
def test_a_damaged_token_is_one_clear_error(text):
    with pytest.raises(TokenError, match="token"):
        from_text(text)


def test_a_forged_token_does_not_verify():
    creator, thief = generate_key(), generate_key()
    peer_id = str(peer_id_from_key(generate_key()))
    real = issue(creator, "run", peer_id, int(NOW) + DAY)
    # The thief signs a token in the creator's name for itself.
    forged = issue(thief, "run", peer_id, int(NOW) + 10 * DAY)
    forged = type(forged)(
        forged.run, real.creator, forged.subject, forged.expires, forged.nonce, forged.signature
    )
    assert "signature" in forged.check("run", real.creator, peer_id, NOW)


def test_a_closed_run_takes_members_with_tokens_only():
    creator_key = generate_key()
    creator_id = str(peer_id_from_key(creator_key))
    creator = _closed_member(creator_id, key=creator_key)
    invited_key = generate_key()
    ticket = issue(creator_key, "run", str(peer_id_from_key(invited_key)), int(NOW) + DAY).packed()
    invited = _closed_member(creator_id, key=invited_key, token=ticket)
    stranger = _closed_member(creator_id)  # signs its own entry, as any open-run member would
    # Someone else's token, or a bearer token issued by a non-creator, buys nothing either.
    thief = _closed_member(creator_id, token=ticket)
    rogue_key = generate_key()
    rogue = _closed_member(
        creator_id, key=rogue_key, token=issue(generate_key(), "run", ANYONE, int(NOW) + DAY).packed()
    )
    for member in (invited, stranger, thief, rogue):
        creator.merge(member.table(), now=1.0)
    assert set(creator.members) == {creator_id, invited.peer_id}
    assert sum(creator.refused.values()) == 3
    # The invited peer accepts the creator without a token, and relays only what is admitted.
    assert invited.merge(creator.table(), now=1.0) == [creator_id]


def test_an_expired_token_drops_the_member_at_its_next_heartbeat():
    creator_key, peer_key = generate_key(), generate_key()
    creator_id = str(peer_id_from_key(creator_key))
    wall = [NOW]
    creator = Membership(
        creator_key, "run", "/ip4/10.0.0.1/tcp/1", now=0.0, wall_clock=lambda: wall[0],
        admission=Admission("run", creator_id), fail_after=5.0,
    )  # fmt: skip
    ticket = issue(creator_key, "run", str(peer_id_from_key(peer_key)), int(NOW) + 60).packed()
    peer = Membership(
        peer_key, "run", "/ip4/10.0.0.2/tcp/2", now=0.0, wall_clock=lambda: wall[0], token=ticket
    )
    assert creator.merge(peer.table(), now=0.0) == [peer.peer_id]
    wall[0] += 120.0
    peer.beat(1.0, round_number=1)
    creator.merge(peer.table(), now=1.0)
    assert creator.members[peer.peer_id].round == 0  # the new heartbeat was refused
    assert creator.live(10.0) == [creator_id]
