import pytest

from shoal.gossip.outer.pairing import PairingError, pairing, partner_index

PEERS = [f"peer-{i}" for i in range(7)]


@pytest.mark.parametrize("n", [2, 3, 4, 7, 10])
def test_pairing_is_a_symmetric_matching_with_at_most_one_peer_left_out(n):
    for round_ in range(20):
        result = pairing(PEERS[:n] if n <= 7 else [f"p{i}" for i in range(n)], round_)
        assert len(result) == n
        sitting_out = [p for p, q in result.items() if q is None]
        assert len(sitting_out) == n % 2
        for a, b in result.items():
            if b is not None:
                assert a != b and result[b] == a


def test_every_peer_computes_the_same_pairing_from_its_own_view_order():
    reference = pairing(PEERS, 5, seed=9)
    assert pairing(list(reversed(PEERS)), 5, seed=9) == reference
    assert pairing(sorted(PEERS, key=hash), 5, seed=9) == reference


def test_pairing_changes_with_round_and_seed_so_partners_rotate():
    by_round = {tuple(sorted(pairing(PEERS, r).items(), key=str)) for r in range(30)}
    assert len(by_round) > 10
    assert pairing(PEERS, 3, seed=1) != pairing(PEERS, 3, seed=2)
    # Over many rounds of an odd run, the peer who sits out varies.
    out = {next(p for p, q in pairing(PEERS, r).items() if q is None) for r in range(40)}
    assert len(out) > 3


def test_partner_index_matches_pairing_over_replica_names():
    for r in range(4):
        p = partner_index(4, r, 7)
        assert p is not None and partner_index(4, p, 7) == r


def test_duplicate_or_negative_inputs_are_refused():
    with pytest.raises(PairingError, match="duplicate"):
        pairing(["a", "b", "a"], 0)
    with pytest.raises(PairingError):
        pairing(["a", "b"], -1)
