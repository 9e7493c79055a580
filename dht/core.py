"""The sans-I/O DHT node: answers requests, and turns lookups into requests and answers into results.

`DHTCore` owns the routing table and the record store; `Query` wraps one `Lookup` with what it is
looking for and checks every record an answer carries before it counts. Both the asyncio node
(`dht.node`) and the simulator (`dht.sim`) drive exactly this code: they only move the messages and
keep the clocks.
"""

import logging
import random
from collections import deque

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal.dht.errors import InvalidRecord, QuotaExceeded
from shoal.dht.keys import as_int, short
from shoal.dht.lookup import ALPHA, PATHS, Lookup
from shoal.dht.protocol import (
    FIND_NODE,
    FIND_VALUE,
    GET_PROVIDERS,
    MAX_PROVIDERS_RETURNED,
    MAX_RID,
    PING,
    STORE,
    Request,
    Response,
)
from shoal.dht.records import PROVIDER, VALUE, Record, RecordStore, public_bytes
from shoal.dht.routing import Contact, K, RoutingTable

log = logging.getLogger(__name__)

MAX_PENDING_PINGS = 64  # ping-before-evict requests waiting for the driver; more are dropped (the
# bucket just keeps its old contact, the conservative choice)
VALUE_QUORUM = 1  # valid value answers that end a GET early; seq ordering picks the newest among them
PROVIDER_QUORUM = 3  # holders whose provider lists a GET_PROVIDERS merges before it stops


class DHTCore:
    def __init__(
        self,
        key: Ed25519PrivateKey,
        addrs: list[str] | tuple[str, ...] = (),
        *,
        k: int = K,
        store: RecordStore | None = None,
        rng: random.Random | None = None,
        work: int = 0,
    ) -> None:
        """`work`: the nonce that proves this node's identity work (`keys.node_id`); the driver decodes
        messages with the bits the network requires, so it must prove them."""
        self.key = key
        self.peer_id = public_bytes(key)
        self.work = work
        self.contact = Contact.of(self.peer_id, addrs, work)
        self.table = RoutingTable(self.peer_id, k, work)
        self.store = store if store is not None else RecordStore()
        self.k = k
        self.pings: deque[Contact] = deque(maxlen=MAX_PENDING_PINGS)
        self._rng = rng or random.Random()
        self._rid = self._rng.randrange(MAX_RID)
        self.dropped = 0  # requests refused (bad records, quotas): for logs and tests

    def set_addrs(self, addrs: list[str] | tuple[str, ...]) -> None:
        self.contact = Contact.of(self.peer_id, addrs, self.work)

    def observe(self, contact: Contact, now: float) -> None:
        """`contact` showed it is alive; a full bucket may ask for a ping-before-evict."""
        if contact.peer_id == self.peer_id:
            return
        to_ping = self.table.update(contact, now)
        if to_ping is not None:
            self.pings.append(to_ping)

    def request(self, type_: int, key: bytes = b"", record: Record | None = None) -> Request:
        self._rid = (self._rid + 1) & MAX_RID
        return Request(type_, self._rid, self.contact, key, record)

    def handle(self, req: Request, sender_ip: str, now: float) -> Response:
        """Answer one request from a peer seen at `sender_ip` (its /24 is the quota unit).

        A sender that gives no address is a client (a peer behind a NAT, as libp2p's DHT client mode): it
        is answered but never enters the routing table, so no lookup waits on a relay to reach it."""
        if req.sender.addrs:
            self.observe(req.sender, now)
        if req.type == PING:
            return Response(req.rid)
        key_int = as_int(req.key) if req.key else 0
        if req.type == FIND_NODE:
            return Response(req.rid, self.table.closest(key_int, self.k, exclude=req.sender.peer_id))
        if req.type == FIND_VALUE:
            rec = self.store.get_value(req.key, now)
            nodes = [] if rec else self.table.closest(key_int, self.k, exclude=req.sender.peer_id)
            return Response(req.rid, nodes, rec)
        if req.type == GET_PROVIDERS:
            provs = self.store.get_providers(req.key, now, MAX_PROVIDERS_RETURNED, withdrawals=True)
            return Response(
                req.rid, self.table.closest(key_int, self.k, exclude=req.sender.peer_id), providers=provs
            )
        return Response(req.rid, ok=self._store(req, sender_ip, now))

    def _store(self, req: Request, sender_ip: str, now: float) -> bool:
        rec = req.record
        who = short(req.sender.peer_id)
        want_kind = VALUE if req.type == STORE else PROVIDER
        if rec is None or rec.kind != want_kind:
            log.info("DHT %s from %s carries the wrong record kind; dropped", req.type, who)
            self.dropped += 1
            return False
        if rec.publisher != req.sender.peer_id:
            # Publishers store their own records; a third party replaying them gains nothing and costs quota.
            log.info("DHT record from %s published by someone else (%s); dropped", who, short(rec.publisher))
            self.dropped += 1
            return False
        try:
            return self.store.put(rec, req.sender.peer_id, sender_ip, now)
        except (InvalidRecord, QuotaExceeded) as e:
            log.info("DHT store request from %s (%s) refused: %s", who, sender_ip, e)
            self.dropped += 1
            return False

    def query(
        self, type_: int, key: bytes, *, alpha: int | None = None, paths: int = PATHS, want: int | None = None
    ) -> "Query":
        """A lookup of `type_` for `key`.

        A GET stops at its first valid answer, so its alpha requests are shared by the paths: more
        would be wasted. Lookups that converge on the k closest (FIND_NODE, GET_PROVIDERS) keep
        alpha in flight on every path (S/Kademlia), which cuts their latency at the same message count.
        """
        if want is None:
            want = {FIND_VALUE: VALUE_QUORUM, GET_PROVIDERS: PROVIDER_QUORUM}.get(type_, 0)
        if alpha is None:
            alpha = ALPHA if type_ == FIND_VALUE else ALPHA * paths
        return Query(self, type_, key, alpha=alpha, paths=paths, want=want)


class Query:
    """One lookup of a kind (FIND_NODE, FIND_VALUE, GET_PROVIDERS) for a key, with its validated results."""

    def __init__(self, core: DHTCore, type_: int, key: bytes, *, alpha: int, paths: int, want: int) -> None:
        self.core = core
        self.type = type_
        self.key = key
        target = as_int(key)
        seeds = core.table.closest(target, core.k)
        self.lookup = Lookup(
            target, seeds, own_peer_id=core.peer_id, k=core.k, alpha=alpha, paths=paths, want=want
        )
        self.value: Record | None = None
        self.provider_records: dict[bytes, Record] = {}  # publisher -> newest record, withdrawals too
        self.rejected = 0  # answers carrying records that failed verification

    @property
    def done(self) -> bool:
        return self.lookup.done

    def requests(self) -> list[tuple[Contact, Request]]:
        return [(c, self.core.request(self.type, self.key)) for c in self.lookup.next_queries()]

    def on_response(self, contact: Contact, resp: Response, now: float) -> None:
        self.core.observe(contact, now)
        found = False
        if self.type == FIND_VALUE and resp.record is not None:
            found = self._take_value(resp.record, contact, now)
        elif self.type == GET_PROVIDERS:
            for rec in resp.providers:
                found = self._take_provider(rec, contact, now) or found
        self.lookup.on_response(contact, resp.nodes, found)

    def on_failure(self, contact: Contact) -> None:
        self.core.table.failed(contact)
        self.lookup.on_failure(contact)

    def _valid(self, rec: Record, kind: int, contact: Contact, now: float) -> bool:
        if rec.kind != kind or rec.key != self.key:
            self.rejected += 1
            log.info(
                "DHT answer from %s holds a record for another key or kind; ignored", short(contact.peer_id)
            )
            return False
        try:
            rec.verify(now)
        except InvalidRecord as e:
            self.rejected += 1
            log.info("DHT answer from %s: %s", short(contact.peer_id), e)
            return False
        return True

    def _take_value(self, rec: Record, contact: Contact, now: float) -> bool:
        if not self._valid(rec, VALUE, contact, now):
            return False
        if self.value is None or rec.seq > self.value.seq:
            self.value = rec
        return True

    def _take_provider(self, rec: Record, contact: Contact, now: float) -> bool:
        if not self._valid(rec, PROVIDER, contact, now):
            return False
        # A withdrawal is kept too: newer than an announcement another holder still keeps, it wins.
        old = self.provider_records.get(rec.publisher)
        if old is None or rec.seq > old.seq:
            self.provider_records[rec.publisher] = rec
        return bool(rec.addrs)

    @property
    def providers(self) -> dict[bytes, Record]:
        """The publishers whose newest record seen is an announcement (not a withdrawal)."""
        return {p: r for p, r in self.provider_records.items() if r.addrs}

    def closest(self) -> list[Contact]:
        return self.lookup.closest()
