"""`ban` and `unban` take a full peer id or a unique prefix of a known one, and record nothing otherwise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shoal.peer.commands import parse_peer_id, resolve_peer
from shoal.peer.control import ControlError
from shoal.peer.daemon import Daemon
from shoal.transport.identity import generate_key, peer_id_from_key

KNOWN = sorted(str(peer_id_from_key(generate_key())) for _ in range(6))
STRANGER = str(peer_id_from_key(generate_key()))


def test_a_full_peer_id_is_checked_and_a_prefix_of_one_is_not_a_peer_id():
    assert parse_peer_id(STRANGER) == STRANGER
    # The first 12 characters of every Ed25519 id parse as a short identity multihash: not a peer id.
    assert all(parse_peer_id(STRANGER[:n]) is None for n in range(1, len(STRANGER)))
    assert parse_peer_id(STRANGER + "1") is None


def test_full_ids_and_unique_prefixes_with_or_without_12D3KooW_resolve():
    peer = KNOWN[3]
    assert resolve_peer(peer, KNOWN) == peer
    assert resolve_peer(STRANGER, KNOWN) == STRANGER  # any valid peer id, member or not
    assert resolve_peer(peer[8:16], KNOWN) == peer  # as the REPL shows it
    assert resolve_peer(peer[:16], KNOWN) == peer
    assert resolve_peer(f" {peer[8:14]} ", KNOWN) == peer


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("nosuchpeer", "no member of this run has a peer id starting with 'nosuchpeer'"),
        ("pdeadbeef", "no member of this run"),
        ("0OIl-peer", "cannot occur in one"),
        ("12D3Ko", "every Ed25519 peer id starts with 12D3KooW"),
        ("12D3KooWab", "too short"),
        ("ab", "too short"),
    ],
)
def test_unknown_malformed_and_too_short_names_are_refused_with_a_reason(text, says):
    with pytest.raises(ControlError, match=says):
        resolve_peer(text, KNOWN)


def test_an_ambiguous_prefix_is_refused_and_lists_the_candidates():
    twins = ["12D3KooWAbcdXq1", "12D3KooWAbcdYr2"]  # resolve_peer only compares the text of known ids
    with pytest.raises(ControlError, match=r"could be any of 2 peers \(AbcdXq1…, AbcdYr2…\)"):
        resolve_peer("Abcd", twins)
    assert resolve_peer("AbcdX", twins) == twins[0]


def stub_daemon() -> SimpleNamespace:
    published: list[tuple[str, str]] = []
    return SimpleNamespace(
        peer_id=KNOWN[0],
        swap=SimpleNamespace(banned=set()),
        known_peers=lambda: set(KNOWN),
        publish_ban=lambda peer, why: published.append((peer, why)),
        published=published,
    )


def test_the_daemon_bans_by_prefix_and_records_nothing_for_a_refused_name():
    daemon = stub_daemon()
    for text in ("nosuchpeer", STRANGER[:12], KNOWN[0][8:16]):  # unknown, a stranger's cut id, itself
        with pytest.raises(ControlError):
            Daemon.ban(daemon, text, "test")  # type: ignore[arg-type]
    assert daemon.swap.banned == set() and daemon.published == []

    assert Daemon.ban(daemon, KNOWN[1][:12], "test") == KNOWN[1]  # type: ignore[arg-type]
    assert Daemon.unban(daemon, KNOWN[1]) == KNOWN[1]  # type: ignore[arg-type]
    assert Daemon.ban(daemon, KNOWN[2][8:16], "test") == KNOWN[2]  # type: ignore[arg-type]
    assert daemon.swap.banned == {KNOWN[2]} and daemon.published == [(KNOWN[1], "test"), (KNOWN[2], "test")]

    with pytest.raises(ControlError, match="no banned peer"):
        Daemon.unban(daemon, KNOWN[3][8:16])  # type: ignore[arg-type]
    with pytest.raises(ControlError, match="is not banned"):
        Daemon.unban(daemon, KNOWN[3])  # type: ignore[arg-type]
    assert Daemon.unban(daemon, KNOWN[2][8:16]) == KNOWN[2]  # type: ignore[arg-type]
    assert daemon.swap.banned == set()
