"""The run protocol's request slots: a few per peer, and a full table evicts a parked request."""

from shoal.peer.request_slots import RequestSlots


def test_one_peer_holds_at_most_its_share():
    slots: RequestSlots[str] = RequestSlots(total=64, per_peer=4)
    assert all(slots.admit("greedy", f"g{i}")[0] for i in range(4))
    admitted, victim, why = slots.admit("greedy", "g4")
    assert not admitted and victim is None and "4 requests at once" in why
    assert slots.admit("honest", "h0") == (True, None, "")


def test_a_full_table_evicts_the_oldest_unread_request_and_never_one_being_answered():
    slots: RequestSlots[str] = RequestSlots(total=3, per_peer=4)
    slots.admit("a", "a0", now=0.0)
    slots.read("a0")  # arrived whole: being answered
    slots.admit("b", "b0", now=1.0)  # parked, unread
    slots.admit("c", "c0", now=2.0)  # parked, unread
    assert slots.admit("d", "d0", now=3.0) == (True, "b0", "")  # the oldest parked one goes
    slots.read("c0")
    slots.read("d0")
    admitted, victim, why = slots.admit("e", "e0", now=4.0)
    assert not admitted and victim is None and "answering" in why
    slots.release("a0")
    assert slots.admit("e", "e0", now=5.0) == (True, None, "")
