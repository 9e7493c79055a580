"""The routing table: k-buckets with replacement caches and ping-before-evict (Kademlia paper, 2.2 and 4.1).

Sans-I/O: the table never sends anything. When a full bucket meets a new contact, `update` returns
the bucket's least-recently-seen contact and the driver pings it; `ping_result` then keeps the old
contact (the paper's preference for long-lived nodes, which also resists flooding with fresh ids) or
evicts it for the newest replacement.
"""

import heapq
import random
from collections import OrderedDict
from dataclasses import dataclass, field

from shoal.dht.keys import KEY_BITS, as_int, bucket_index, node_id

K = 20  # bucket size and replication factor, the paper's k (section 2.2)
REPLACEMENTS = K  # per-bucket replacement cache, bounded like the bucket (section 4.1)
MAX_ADDRS = 8  # addresses kept per contact: enough for direct + relayed, not a memory sink
MAX_ADDR_LEN = 256  # a multiaddr with a relay hop fits in well under this
FAILS_TO_EVICT = 2  # one lost message must not evict a good contact; two failures in a row do, when a
# replacement is waiting (paper, section 4.1: otherwise stale contacts are only flagged, so that a node
# whose own link went down, or whose only contact is its bootstrap node, does not void its table)
REFRESH_S = 3600.0  # bucket refresh interval, the paper's hour (section 2.3)


@dataclass(frozen=True, slots=True)
class Contact:
    """A peer as the DHT knows it: its peer id, the addresses it says it listens on, the nonce that proves
    its identity work, and its node id (derived from the last two: `keys.node_id`)."""

    peer_id: bytes
    addrs: tuple[str, ...] = ()
    id: int = field(default=0, compare=False, hash=False)
    work: int = field(default=0, compare=False, hash=False)

    @staticmethod
    def of(peer_id: bytes, addrs: tuple[str, ...] | list[str] = (), work: int = 0) -> "Contact":
        return Contact(bytes(peer_id), tuple(addrs)[:MAX_ADDRS], as_int(node_id(peer_id, work)), work)


@dataclass(slots=True)
class _Bucket:
    live: "OrderedDict[int, Contact]" = field(default_factory=OrderedDict)  # least recently seen first
    replacements: "OrderedDict[int, Contact]" = field(default_factory=OrderedDict)  # newest last
    fails: dict[int, int] = field(default_factory=dict)
    pinging: int | None = None  # id of the head contact awaiting a ping-before-evict answer
    touched: float = 0.0  # last time a lookup or contact went through this bucket (for refresh)


class RoutingTable:
    """256 k-buckets indexed by the length of the XOR distance to our own id."""

    def __init__(self, own_peer_id: bytes, k: int = K, own_work: int = 0) -> None:
        self.own_peer_id = own_peer_id
        self.own = as_int(node_id(own_peer_id, own_work))
        self.k = k
        self._buckets = [_Bucket() for _ in range(KEY_BITS)]
        self._all: dict[int, Contact] = {}  # every live contact, flat: `closest` is the hot path

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, contact: Contact) -> bool:
        i = bucket_index(self.own, contact.id)
        return i >= 0 and contact.id in self._buckets[i].live

    def contacts(self) -> list[Contact]:
        return list(self._all.values())

    def update(self, contact: Contact, now: float) -> Contact | None:
        """Record that `contact` was seen alive. Returns a contact the driver must ping, or None."""
        i = bucket_index(self.own, contact.id)
        if i < 0:
            return None  # ourselves
        b = self._buckets[i]
        b.touched = now
        b.fails.pop(contact.id, None)
        if contact.id in b.live:
            b.live.pop(contact.id)
            b.live[contact.id] = contact  # move to the tail: most recently seen
            self._all[contact.id] = contact
            return None
        if len(b.live) < self.k:
            b.live[contact.id] = contact
            self._all[contact.id] = contact
            b.replacements.pop(contact.id, None)
            return None
        b.replacements.pop(contact.id, None)
        b.replacements[contact.id] = contact
        while len(b.replacements) > REPLACEMENTS:
            b.replacements.popitem(last=False)
        if b.pinging is None:
            head = next(iter(b.live.values()))
            b.pinging = head.id
            return head
        return None

    def ping_result(self, contact: Contact, alive: bool, now: float) -> None:
        """The answer to a ping-before-evict: keep a live head, replace a dead one."""
        i = bucket_index(self.own, contact.id)
        if i < 0:
            return
        b = self._buckets[i]
        if b.pinging == contact.id:
            b.pinging = None
        if alive:
            if contact.id in b.live:
                b.live.move_to_end(contact.id)
            return
        self._evict(b, contact.id)

    def is_fresh(self, contact: Contact) -> bool:
        """Whether `contact`'s last RPC did not fail (a stale one is kept only for want of a replacement)."""
        i = bucket_index(self.own, contact.id)
        return i >= 0 and contact.id in self._buckets[i].live and not self._buckets[i].fails.get(contact.id)

    def failed(self, contact: Contact) -> None:
        """An RPC to `contact` failed; after FAILS_TO_EVICT in a row it makes way for a replacement."""
        i = bucket_index(self.own, contact.id)
        if i < 0:
            return
        b = self._buckets[i]
        if contact.id not in b.live:
            b.replacements.pop(contact.id, None)
            return
        n = b.fails.get(contact.id, 0) + 1
        b.fails[contact.id] = n
        if n >= FAILS_TO_EVICT and b.replacements:
            self._evict(b, contact.id)

    def _evict(self, b: _Bucket, cid: int) -> None:
        if b.live.pop(cid, None) is None:
            return
        del self._all[cid]
        b.fails.pop(cid, None)
        if b.pinging == cid:
            b.pinging = None
        if b.replacements:
            _, newest = b.replacements.popitem(last=True)
            b.live[newest.id] = newest
            self._all[newest.id] = newest

    def closest(self, key: int, n: int | None = None, exclude: bytes | None = None) -> list[Contact]:
        """The `n` (default k) known contacts closest to `key` by XOR distance."""
        n = self.k if n is None else n
        best = heapq.nsmallest(n + 1, [(cid ^ key, cid) for cid in self._all])
        out = [self._all[cid] for _, cid in best]
        return [c for c in out if c.peer_id != exclude][:n]

    def touch(self, key: int, now: float) -> None:
        """A lookup for `key` ran: its bucket counts as refreshed (section 2.3)."""
        i = bucket_index(self.own, key)
        if i >= 0:
            self._buckets[i].touched = now

    def stale_buckets(self, now: float, interval: float = REFRESH_S) -> list[int]:
        """Buckets from our nearest neighbour's out to the farthest non-empty one that saw no lookup
        within `interval` seconds (section 2.3; buckets nearer than any node are empty by nature)."""
        used = [i for i, b in enumerate(self._buckets) if b.live]
        if not used:
            return []
        return [i for i in range(used[0], used[-1] + 1) if now - self._buckets[i].touched >= interval]

    def random_id_in_bucket(self, i: int, rng: random.Random) -> int:
        """A random id at distance [2**i, 2**(i+1)) from ours: the target of a bucket refresh."""
        return self.own ^ ((1 << i) | rng.getrandbits(i) if i > 0 else 1)
