"""A simulated network that runs thousands of DHT nodes in one process over the real sans-I/O core.

Discrete events on a simulated clock: every RPC takes a per-pair latency each way, is lost with a
fixed probability (the caller then sees a timeout), and meets a dead node as a timeout too. Churn
kills and adds nodes while lookups run; adversaries collude, answering lookups with each other's
contacts and forged records, or not at all, and discarding what they are asked to store.

The nodes are `dht.core.DHTCore` objects and the lookups `dht.core.Query`: the code under test is the
code the asyncio node runs. With `wire=True` every message also goes through the msgpack codec.
"""

import functools
import heapq
import logging
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal.dht.core import DHTCore, Query
from shoal.dht.keys import as_int, run_key
from shoal.dht.lookup import PATHS
from shoal.dht.protocol import (
    ADD_PROVIDER,
    FIND_NODE,
    FIND_VALUE,
    GET_PROVIDERS,
    PING,
    STORE,
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from shoal.dht.records import PROVIDER, VALUE, Record, RecordStore
from shoal.dht.routing import Contact

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 1.0  # the asyncio node's timeout; a lost or dead peer costs this much simulated time
TTL_S = 6 * 3600.0  # records outlive any simulated run, so misses are routing failures, not expiry


@dataclass
class SimConfig:
    nodes: int = 1000
    churn: float = 0.0  # share of the initial nodes that leave during the lookup phase (as many join)
    adversarial: float = 0.0  # share of nodes that lie or stay silent
    loss: float = 0.01  # per-message loss probability, each way
    latency_ms: tuple[float, float] = (5.0, 80.0)  # one-way latency range
    values: int = 100  # value records PUT before the lookups
    runs: int = 20  # runs whose peers announce themselves as providers
    providers_per_run: int = 5
    lookups: int = 1000  # GETs, provider lookups and node lookups, mixed
    window_s: float = 600.0  # simulated time over which lookups and churn events are spread
    wire: bool = False  # also push every message through the msgpack codec (slower)
    paths: int = PATHS  # disjoint lookup paths; 1 is plain Kademlia (the benchmark's baseline)
    seed: int = 1


@dataclass
class SimNode:
    core: DHTCore
    ip: str
    adversary: bool = False
    alive: bool = True
    delay: float = 0.0  # half of this node's share of one-way latency, in seconds


@dataclass
class LookupStats:
    attempts: int = 0
    successes: int = 0
    hops: list[int] = field(default_factory=list)
    messages: list[int] = field(default_factory=list)

    def add(self, ok: bool, hops: int, messages: int) -> None:
        self.attempts += 1
        self.messages.append(messages)
        if ok:
            self.successes += 1
            self.hops.append(hops)

    def summary(self) -> dict:
        return {
            "attempts": self.attempts,
            "success": self.successes / self.attempts if self.attempts else 1.0,
            "median_hops": statistics.median(self.hops) if self.hops else None,
            "messages_per_lookup": statistics.fmean(self.messages) if self.messages else 0.0,
        }


class Simulation:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.nodes: dict[bytes, SimNode] = {}
        self.adversaries: list[SimNode] = []
        self.messages = 0
        self.stats = {k: LookupStats() for k in ("put", "get", "providers", "node")}
        self.replicas: list[int] = []  # STOREs acknowledged per PUT

    # --- event loop -------------------------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, fn))

    def run_until_idle(self) -> None:
        while self._events:
            t, _, fn = heapq.heappop(self._events)
            self.now = max(self.now, t)
            fn()

    def _latency(self, a: SimNode, b: SimNode) -> float:
        # Each node sits behind its own access delay; a pair's one-way latency is the sum of both.
        return a.delay + b.delay

    # --- nodes ------------------------------------------------------------------------------------

    def add_node(self, adversary: bool = False) -> SimNode:
        key = Ed25519PrivateKey.from_private_bytes(self.rng.randbytes(32))  # seeded: runs repeat exactly
        n = len(self.nodes)
        ip = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        core = DHTCore(
            key, [f"/ip4/{ip}/tcp/4001"], rng=random.Random(self.rng.getrandbits(64)), store=RecordStore()
        )
        lo, hi = self.cfg.latency_ms
        node = SimNode(core, ip, adversary, delay=self.rng.uniform(lo, hi) / 2000.0)
        self.nodes[core.peer_id] = node
        if adversary:
            self.adversaries.append(node)
        return node

    def alive_honest(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive and not n.adversary]

    def join(self, node: SimNode, bootstrap: SimNode | None, done: Callable[[], None] | None = None) -> None:
        """Kademlia join (section 2.3): learn the bootstrap node, then look up our own id."""
        if bootstrap is not None:
            node.core.observe(bootstrap.core.contact, self.now)
        self.run_query(node, self._query(node, FIND_NODE, _own_key(node)), lambda q: done() if done else None)

    # --- RPC --------------------------------------------------------------------------------------

    def rpc(
        self,
        src: SimNode,
        contact: Contact,
        req: Request,
        on_resp: Callable[[Response], None],
        on_fail: Callable[[], None],
    ) -> None:
        self.messages += 1
        settled = False

        def fail() -> None:
            nonlocal settled
            if not settled:
                settled = True
                on_fail()

        def answer(resp: Response) -> None:
            nonlocal settled
            if not settled:
                settled = True
                on_resp(resp)

        self.at(self.now + RPC_TIMEOUT_S, fail)
        dst = self.nodes.get(contact.peer_id)
        if dst is None or not dst.alive or self.rng.random() < self.cfg.loss:
            return
        lat = self._latency(src, dst)

        def deliver() -> None:
            if not dst.alive or not src.alive:
                return
            r = decode_request(encode_request(req)) if self.cfg.wire else req
            resp = self._adversary_answer(dst, r) if dst.adversary else dst.core.handle(r, src.ip, self.now)
            self._drain_pings(dst)
            if resp is None or self.rng.random() < self.cfg.loss:
                return
            if self.cfg.wire:
                resp = decode_response(encode_response(resp))
            self.at(self.now + lat, lambda: answer(resp))

        self.at(self.now + lat, deliver)

    def _drain_pings(self, node: SimNode) -> None:
        while node.core.pings:
            c = node.core.pings.popleft()

            def answered(_r: Response, c: Contact = c) -> None:
                node.core.table.ping_result(c, True, self.now)

            def failed(c: Contact = c) -> None:
                node.core.table.ping_result(c, False, self.now)

            self.rpc(node, c, node.core.request(PING), answered, failed)

    def _adversary_answer(self, node: SimNode, req: Request) -> Response | None:
        """Colluding liars: silence half the time, else fellow liars closest to the key and forged records."""
        if req.type == PING:
            return Response(req.rid)
        if req.type in (STORE, ADD_PROVIDER):
            return Response(req.rid)  # claims to store, keeps nothing
        if self.rng.random() < 0.5:
            return None
        target = as_int(req.key)
        liars = heapq.nsmallest(
            node.core.k,
            (a for a in self.adversaries if a.alive and a is not node),
            key=lambda a: a.core.contact.id ^ target,
        )
        nodes = [a.core.contact for a in liars]
        if req.type == FIND_VALUE:
            forged = Record(
                VALUE, req.key, node.core.peer_id, 2**40, self.now + 60, b"x", b"lie", (), bytes(64)
            )
            return Response(req.rid, [], forged)
        if req.type == GET_PROVIDERS:
            forged = Record(
                PROVIDER,
                req.key,
                node.core.peer_id,
                2**40,
                self.now + 60,
                addrs=("/ip4/6.6.6.6",),
                sig=bytes(64),
            )
            return Response(req.rid, nodes, providers=[forged])
        return Response(req.rid, nodes)

    # --- queries ----------------------------------------------------------------------------------

    def _query(self, node: SimNode, type_: int, key: bytes) -> Query:
        return node.core.query(type_, key, paths=self.cfg.paths)

    def run_query(self, node: SimNode, q: Query, done: Callable[[Query], None]) -> None:
        finished = False

        def pump() -> None:
            nonlocal finished
            if finished:
                return
            if q.done:
                finished = True
                done(q)
                return
            for contact, req in q.requests():

                def answered(resp: Response, c: Contact = contact) -> None:
                    q.on_response(c, resp, self.now)
                    self._drain_pings(node)
                    pump()

                def failed(c: Contact = contact) -> None:
                    q.on_failure(c)
                    pump()

                self.rpc(node, contact, req, answered, failed)
            if q.done:
                finished = True
                done(q)

        pump()

    def store_at_closest(self, node: SimNode, rec: Record, type_: int) -> None:
        """PUT: find the k closest nodes to the record's key, then STORE at each; counted in stats["put"]
        (success: at least one node acknowledged; `replicas`: how many did)."""

        def stored(q: Query) -> None:
            targets = q.closest()
            pending = len(targets)
            acked = 0

            def settle(ok: bool) -> None:
                nonlocal pending, acked
                pending -= 1
                acked += ok
                if pending == 0:
                    self.stats["put"].add(acked > 0, q.lookup.hops(), q.lookup.messages + len(targets))
                    self.replicas.append(acked)

            for c in targets:
                self.rpc(
                    node,
                    c,
                    node.core.request(type_, record=rec),
                    lambda r: settle(r.ok),
                    lambda: settle(False),
                )
            if not targets:
                self.stats["put"].add(False, 0, q.lookup.messages)

        self.run_query(node, self._query(node, FIND_NODE, rec.key), stored)

    # --- the experiment ---------------------------------------------------------------------------

    def build(self) -> None:
        """Nodes join one at a time, each through a random node already in the network."""
        cfg = self.cfg
        n_adv = round(cfg.nodes * cfg.adversarial)
        kinds = [True] * n_adv + [False] * (cfg.nodes - n_adv)
        self.rng.shuffle(kinds)
        kinds[0] = False  # the first node is honest, so the network has a start
        members: list[SimNode] = []
        for adversary in kinds:
            node = self.add_node(adversary)
            # A joining node bootstraps from an honest node: its configured bootstrap addresses are the
            # one trust it starts with (a node that bootstraps only through liars sees only liars).
            honest = [m for m in members if not m.adversary]
            boot = self.rng.choice(honest) if honest else None
            members.append(node)
            self.join(node, boot)
            self.run_until_idle()
        # Every node then refreshes its buckets once (section 2.3): one lookup of a random id in a few
        # of its emptiest far buckets, which is what an hour of ordinary traffic would do.
        for node in members:
            for i in node.core.table.stale_buckets(self.now + 1.0, interval=0.0)[-3:]:
                target = node.core.table.random_id_in_bucket(i, self.rng).to_bytes(32, "big")
                self.run_query(node, self._query(node, FIND_NODE, target), lambda q: None)
            self.run_until_idle()

    def run(self) -> dict:
        cfg = self.cfg
        self.build()
        honest = self.alive_honest()
        values: list[tuple[bytes, int]] = []  # (key, seq)
        for i in range(cfg.values):
            pub = self.rng.choice(honest)
            rec = Record.value_record(
                pub.core.key, b"v%d" % i, b"value %d" % i, seq=1, expires=self.now + TTL_S
            )
            values.append((rec.key, rec.seq))
            self.store_at_closest(pub, rec, STORE)
        runs: list[tuple[bytes, set[bytes]]] = []
        for r in range(cfg.runs):
            key = run_key(f"run-{r}")
            members = self.rng.sample(honest, cfg.providers_per_run)
            for m in members:
                rec = Record.provider_record(m.core.key, key, list(m.core.contact.addrs), 1, self.now + TTL_S)
                self.store_at_closest(m, rec, ADD_PROVIDER)
            runs.append((key, {m.core.peer_id for m in members}))
        self.run_until_idle()
        self.messages = 0

        start = self.now
        initial = [n for n in self.nodes.values() if n.alive]
        leavers = self.rng.sample(initial, round(len(initial) * cfg.churn))
        for node in leavers:
            self.at(start + self.rng.uniform(0, cfg.window_s), functools.partial(self._leave, node))
            self.at(start + self.rng.uniform(0, cfg.window_s), self._churn_join)
        for _ in range(cfg.lookups):
            self.at(start + self.rng.uniform(0, cfg.window_s), lambda: self._random_lookup(values, runs))
        self.run_until_idle()
        out = {k: s.summary() for k, s in self.stats.items()}
        out["put"]["median_replicas"] = statistics.median(self.replicas) if self.replicas else 0
        total = LookupStats()  # the judged figure: lookups during the run (PUTs happen before it)
        for s in (self.stats[k] for k in ("get", "providers", "node")):
            total.attempts += s.attempts
            total.successes += s.successes
            total.hops += s.hops
            total.messages += s.messages
        out.update(total.summary())
        out["config"] = {k: v for k, v in vars(cfg).items() if k != "latency_ms"}
        return out

    def _leave(self, node: SimNode) -> None:
        node.alive = False

    def _churn_join(self) -> None:
        bootstrap = self.rng.choice(self.alive_honest())  # chosen before the newcomer exists
        node = self.add_node(adversary=self.rng.random() < self.cfg.adversarial)
        self.join(node, bootstrap)

    def _random_lookup(self, values: list[tuple[bytes, int]], runs: list[tuple[bytes, set[bytes]]]) -> None:
        node = self.rng.choice(self.alive_honest())
        kind = self.rng.random()
        if kind < 0.5 and values:
            key, seq = self.rng.choice(values)
            self.run_query(
                node,
                self._query(node, FIND_VALUE, key),
                lambda q: self.stats["get"].add(
                    q.value is not None and q.value.seq == seq, q.lookup.hops(), q.lookup.messages
                ),
            )
        elif kind < 0.8 and runs:
            key, members = self.rng.choice(runs)
            self.run_query(
                node,
                self._query(node, GET_PROVIDERS, key),
                lambda q: self.stats["providers"].add(
                    members <= set(q.providers), q.lookup.hops(), q.lookup.messages
                ),
            )
        else:
            target = self.rng.choice([n for n in self.alive_honest() if n is not node])
            tid = target.core.peer_id
            self.run_query(
                node,
                self._query(node, FIND_NODE, _own_key(target)),
                lambda q: self.stats["node"].add(
                    any(c.peer_id == tid for c in q.closest()), q.lookup.hops(), q.lookup.messages
                ),
            )


def _own_key(node: SimNode) -> bytes:
    return node.core.contact.id.to_bytes(32, "big")
