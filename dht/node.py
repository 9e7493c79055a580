"""The asyncio DHT node: a thin driver around `dht.core` that moves its messages over streams.

RPCs run over any stream with ``readexactly``/``write``/``close``: one length-prefixed msgpack request,
one response, and the stream may carry the next request. `DHTNode.on_host` runs the DHT on the secure
transport Host (Noise-authenticated yamux streams on PROTOCOL_ID): a request's sender must be the peer
the connection proved. `DHTNode.start(secure=False)` runs it over plain asyncio TCP instead, where a
peer's id is only what it claims (records stay signed, so a liar can misroute lookups but not forge
what they find): the baseline of `bench.dht` and a fallback for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal.dht.core import DHTCore, Query
from shoal.dht.errors import DHTError, InvalidMessage, RPCFailed
from shoal.dht.keys import DHT_WORK_BITS, KEY_BYTES, record_key, run_key, short
from shoal.dht.protocol import (
    ADD_PROVIDER,
    FIND_NODE,
    FIND_VALUE,
    GET_PROVIDERS,
    MAX_DHT_MESSAGE_BYTES,
    PING,
    PROTOCOL_ID,
    STORE,
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from shoal.dht.records import MAX_TTL_S, PROVIDER, Record, public_bytes
from shoal.dht.routing import REFRESH_S, Contact
from shoal.errors import ShoalError
from shoal.transport.host import Host
from shoal.transport.identity import PeerID, b58encode
from shoal.transport.identity_work import meets, mine, valid_nonce
from shoal.transport.lograte import LogThrottle
from shoal.transport.messages import LENGTH_PREFIX

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 5.0  # one request/response; a live peer on any continent answers well within this
IDLE_STREAM_S = 60.0  # an inbound stream with no request for this long is closed
MAX_INBOUND_STREAMS = 512  # concurrent inbound DHT streams; a newcomer evicts the heaviest peer's idlest
MAX_INBOUND_PER_PEER = 8  # one identity: a further stream evicts its idlest (a client pools at most 2)
MAX_INBOUND_PER_ADDRESS = 64  # on plain TCP, where only the address is known: many nodes may share one
MAX_IDLE_PER_PEER = 2  # pooled idle outbound streams per peer (reused by the next RPC) ...
MAX_IDLE_STREAMS = 64  # ... and in all: each holds a connection open, and the Host caps connections
RECORD_TTL_S = 3600.0  # our own records live an hour ...
REPUBLISH_S = RECORD_TTL_S / 2  # ... and are republished every half hour, well before expiry
MAINTENANCE_S = 30.0  # how often to sweep the store, refresh stale buckets and republish
MAX_REFRESH_PER_PASS = 4  # bucket refresh lookups per maintenance pass: bounded background traffic
MAX_TABLE_FILE = 1 << 20  # a routing table file bigger than this is not ours
MAX_BOOT_CONTACTS = 64  # contacts from a saved table tried at start

assert RECORD_TTL_S <= MAX_TTL_S


class Stream(Protocol):
    async def readexactly(self, n: int) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...


Dial = Callable[[Contact], Awaitable[Stream]]


async def read_frame(stream: Stream) -> bytes:
    (n,) = LENGTH_PREFIX.unpack(await stream.readexactly(LENGTH_PREFIX.size))
    if n > MAX_DHT_MESSAGE_BYTES:
        raise InvalidMessage(f"DHT frame of {n} bytes exceeds {MAX_DHT_MESSAGE_BYTES}; stream closed")
    return await stream.readexactly(n)


def frame(body: bytes) -> bytes:
    return LENGTH_PREFIX.pack(len(body)) + body


def parse_tcp_addr(addr: str) -> tuple[str, int]:
    """('/ip4/1.2.3.4/tcp/5' or '/ip6/::1/tcp/5') -> (host, port)."""
    parts = addr.split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp" or not parts[4].isdigit():
        raise DHTError(f"address {addr!r} is not /ip4|ip6/<host>/tcp/<port>; give a TCP multiaddr")
    return parts[2], int(parts[4])


class TCPStream:
    """An asyncio TCP connection as a DHT stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.remote_ip = (writer.get_extra_info("peername") or ("",))[0]

    async def readexactly(self, n: int) -> bytes:
        return await self._reader.readexactly(n)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class TCPTransport:
    """Plain TCP: listens for inbound streams and dials contacts' /tcp addresses (stand-in for the Host)."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self.listen_addrs: list[str] = []

    async def listen(self, addr: str, handler: Callable[[TCPStream], Awaitable[None]]) -> list[str]:
        host, port = parse_tcp_addr(addr)

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            # The top of a per-connection task: a cancel at shutdown ends it here, nothing waits on it.
            with contextlib.suppress(asyncio.CancelledError):
                await handler(TCPStream(r, w))

        self._server = await asyncio.start_server(on_conn, host, port, limit=MAX_DHT_MESSAGE_BYTES + 16)
        proto = "ip6" if ":" in host else "ip4"
        self.listen_addrs = [
            f"/{proto}/{s.getsockname()[0]}/tcp/{s.getsockname()[1]}" for s in self._server.sockets
        ]
        return self.listen_addrs

    async def dial(self, contact: Contact) -> TCPStream:
        err: Exception | None = None
        for addr in contact.addrs:
            try:
                host, port = parse_tcp_addr(addr)
                r, w = await asyncio.open_connection(host, port, limit=MAX_DHT_MESSAGE_BYTES + 16)
                return TCPStream(r, w)
            except (OSError, DHTError) as e:
                err = e
        raise RPCFailed(f"could not reach {short(contact.peer_id)} at {list(contact.addrs)}: {err}")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


class DHTNode:
    """One DHT node: serve requests, run lookups, keep our records and run announcements alive."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        dial: Dial,
        addrs: list[str],
        *,
        table_path: str | os.PathLike[str] | None = None,
        work: int | None = None,
    ) -> None:
        """`work`: the nonce proving this identity's DHT_WORK_BITS (the daemon's proven identity work);
        mined here when not given (about 0.07 s)."""
        peer = b58encode(public_bytes(key))
        if work is None:
            work = mine(peer, DHT_WORK_BITS)
        if work is None or not meets(peer, work, DHT_WORK_BITS):
            raise DHTError(f"the DHT needs a nonce proving {DHT_WORK_BITS} bits of identity work for {peer}")
        self.core = DHTCore(key, addrs, work=work)
        self._dial = dial
        self.table_path = Path(table_path) if table_path else None
        self._pool: OrderedDict[bytes, list[Stream]] = OrderedDict()  # least recently used first
        self._pooled = 0
        # Inbound streams being served: who holds each, and since when it waits for a request (None while
        # one is answered). Slots are shared fairly: nobody holding idle streams keeps a newcomer waiting.
        self._serving: dict[asyncio.Task, _Inbound] = {}
        self._values: dict[bytes, Record] = {}  # our own value records, by key: republished until close
        self._runs: dict[str, list[str]] = {}
        # Where our last announcement of each run key went: a withdrawal goes there too, so that a
        # holder no longer among the closest (the network changed meanwhile) does not keep us listed.
        self._holders: dict[bytes, list[Contact]] = {}
        self._seq = 0
        self._tasks: set[asyncio.Task] = set()
        self._main: asyncio.Task | None = None
        self._join_task: asyncio.Task | None = None
        self._bootstrap: list[str] = []  # configured addresses, tried again whenever no contact answers
        self._transport: TCPTransport | None = None
        self._host: Host | None = None  # closed with the node only when the node created it
        self._rng = random.Random()
        self._bad_messages = LogThrottle(log)  # a flood of bad messages becomes one summary line a minute

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        key: Ed25519PrivateKey | None = None,
        listen: str = "/ip4/127.0.0.1/tcp/0",
        bootstrap: Sequence[str] = (),
        table_path: str | os.PathLike[str] | None = None,
        *,
        secure: bool = True,
        work: int | None = None,
    ) -> DHTNode:
        """A node of its own listening on `listen`, joined through `bootstrap` addresses and any saved table.

        `secure` runs it on a transport Host of its own (closed with the node); otherwise on plain TCP.
        With no bootstrap address and no saved table the node starts a new network of its own.
        """
        key = key or Ed25519PrivateKey.generate()
        if secure:
            host = await Host.create(key, [listen])
            try:
                node = await cls.on_host(host, key, bootstrap=bootstrap, table_path=table_path, work=work)
            except BaseException:
                await host.close()
                raise
            node._host = host
            return node
        transport = TCPTransport()
        node = cls(key, transport.dial, [], table_path=table_path, work=work)
        node._transport = transport
        addrs = await transport.listen(listen, node.serve_stream)
        node.core.set_addrs(addrs)
        await node._begin(list(bootstrap))
        return node

    @classmethod
    async def on_host(
        cls,
        host: Host,
        key: Ed25519PrivateKey,
        *,
        bootstrap: Sequence[str] = (),
        table_path: str | os.PathLike[str] | None = None,
        addrs: list[str] | None = None,
        reach: Callable[[PeerID, list[str]], Awaitable[object]] | None = None,
        work: int | None = None,
    ) -> DHTNode:
        """Run the DHT on the daemon's Host (whose identity `key` is); `addrs` default to its listen addrs.

        `reach(peer, addrs)`, when given, connects to a contact first by whatever path works (the NAT
        layer: direct, punched or relayed); without it contacts are dialed directly."""
        if PeerID.from_public_key(key.public_key()) != host.peer_id:
            raise DHTError("the DHT key is not the Host's identity; pass the key the Host was created with")

        async def dial(c: Contact) -> Stream:
            if c.peer_id:
                peer = PeerID.from_bytes(c.peer_id)
                if reach is not None:
                    await reach(peer, list(c.addrs))
                return await host.new_stream(peer, PROTOCOL_ID, list(c.addrs))
            return await host.new_stream(await host.connect(c.addrs[0]), PROTOCOL_ID)  # bootstrap address

        node = cls(
            key,
            dial,
            addrs if addrs is not None else [str(a) for a in host.listen_addrs],
            table_path=table_path,
            work=work,
        )
        host.set_stream_handler(PROTOCOL_ID, node.serve_stream)
        await node._begin(list(bootstrap))
        return node

    @property
    def peer_id(self) -> bytes:
        return self.core.peer_id

    @property
    def addrs(self) -> list[str]:
        return list(self.core.contact.addrs)

    async def _begin(self, bootstrap: list[str]) -> None:
        """Reach the seeds, then finish joining in the background: the node serves and routes (through
        its seeds) as soon as one answered; the self-lookup fills its table meanwhile (`joined()`)."""
        self._bootstrap = list(bootstrap)
        await self._ping_seeds(bootstrap)
        self._join_task = asyncio.create_task(self._self_lookup())
        self._main = asyncio.create_task(self._maintain())

    async def joined(self) -> int:
        """Wait until the background self-lookup of start-up is done; returns the routing table's size."""
        if self._join_task is not None:
            await asyncio.shield(self._join_task)
        return len(self.core.table)

    async def join(self, bootstrap: list[str]) -> int:
        """Ping the bootstrap addresses and saved contacts, then look up our own id (paper, section 2.3).

        Returns the number of contacts in the routing table afterwards.
        """
        await self._ping_seeds(bootstrap)
        await self._self_lookup()
        return len(self.core.table)

    async def _ping_seeds(self, bootstrap: list[str]) -> None:
        seeds = [Contact(b"", (a,), 0) for a in bootstrap] + self._load_table()
        async with asyncio.TaskGroup() as tg:
            for c in seeds:
                tg.create_task(self._ping_seed(c))
        if seeds and not len(self.core.table):
            log.warning(
                "DHT node %s reached none of %d bootstrap contacts; starting alone",
                short(self.peer_id),
                len(seeds),
            )

    async def _self_lookup(self) -> None:
        if len(self.core.table):
            await self._run_query(self.core.query(FIND_NODE, self.core.contact.id.to_bytes(KEY_BYTES, "big")))

    async def _ping_seed(self, c: Contact) -> None:
        try:
            resp = await self.rpc(c, self.core.request(PING))
        except RPCFailed as e:
            log.info("DHT bootstrap contact %s unreachable: %s", list(c.addrs), e)
            return
        # A PING answer names its sender, which is how an address-only bootstrap entry becomes a contact.
        for n in resp.nodes[:1]:
            self.core.observe(n, time.time())

    async def close(self) -> None:
        for t in (self._main, self._join_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for streams in self._pool.values():
            for s in streams:
                await s.close()
        self._pool.clear()
        self._pooled = 0
        if self._transport is not None:
            await self._transport.close()
        if self._host is not None:
            await self._host.close()
        self.save_table()

    # --- serving ---------------------------------------------------------------------------------

    async def serve_stream(self, stream: Stream) -> None:
        """Answer requests on one inbound stream until it ends, idles out or misbehaves."""
        ip = _remote_ip(stream)
        remote = getattr(stream, "remote_peer_id", None)  # proven by the Host's Noise handshake
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)  # so close() ends inbound streams too
            me.add_done_callback(self._tasks.discard)
            if remote is not None:
                slot = self._admit(me, remote.multihash.hex(), MAX_INBOUND_PER_PEER)
            else:
                slot = self._admit(me, ip, MAX_INBOUND_PER_ADDRESS)
        else:
            slot = _Inbound("", time.monotonic())
        try:
            try:
                while True:
                    slot.idle_since = time.monotonic()
                    async with asyncio.timeout(IDLE_STREAM_S):
                        body = await read_frame(stream)
                    slot.idle_since = None
                    req = decode_request(body, DHT_WORK_BITS)
                    if remote is not None and req.sender.peer_id != remote.multihash:
                        raise InvalidMessage(
                            f"request claims to come from {short(req.sender.peer_id)} but "
                            f"the connection proved {remote.short()}; stream closed"
                        )
                    resp = self.core.handle(req, ip, time.time())
                    if req.type == PING:
                        resp = Response(resp.rid, [self.core.contact])
                    await stream.write(frame(encode_response(resp)))
                    self._drain_pings()
            except InvalidMessage as e:
                self._bad_messages.note(logging.INFO, "DHT: a bad message", ip, str(e))
            except (asyncio.IncompleteReadError, TimeoutError, OSError, ShoalError):
                pass  # peer closed, went idle, vanished or reset the stream: nothing to answer
            finally:
                await stream.close()
        finally:
            if me is not None:
                self._serving.pop(me, None)

    def _admit(self, task: asyncio.Task, holder: str, share: int) -> _Inbound:
        """Registers an inbound stream; evicts an idle one of the same holder, or of the heaviest holder,
        when a share is used up (a stream that is answering a request is never evicted)."""
        mine = [t for t, s in self._serving.items() if s.holder == holder]
        victim = _idlest(self._serving, mine) if len(mine) >= share else None
        if victim is None and len(self._serving) >= MAX_INBOUND_STREAMS:
            heaviest, _ = Counter(s.holder for s in self._serving.values()).most_common(1)[0]
            victim = _idlest(self._serving, [t for t, s in self._serving.items() if s.holder == heaviest])
        if victim is not None:
            log.debug("DHT node %s: evicting an idle inbound stream of %s", short(self.peer_id), holder[:16])
            self._serving.pop(victim, None)
            victim.cancel()
        slot = _Inbound(holder, time.monotonic())
        self._serving[task] = slot
        return slot

    def _drain_pings(self) -> None:
        while self.core.pings:
            c = self.core.pings.popleft()
            self._spawn(self._ping_evict(c))

    async def _ping_evict(self, c: Contact) -> None:
        try:
            await self.rpc(c, self.core.request(PING))
            alive = True
        except RPCFailed:
            alive = False
        self.core.table.ping_result(c, alive, time.time())

    def _spawn(self, coro: Awaitable[object]) -> None:  # the result, if any, is not used
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # --- calling ---------------------------------------------------------------------------------

    async def rpc(self, contact: Contact, req: Request) -> Response:
        """Send one request to `contact` and return its answer; raises RPCFailed on any failure."""
        pooled = self._pool.get(contact.peer_id) if contact.peer_id else None
        stream = pooled.pop() if pooled else None
        if stream is not None:
            self._pooled -= 1
        try:
            async with asyncio.timeout(RPC_TIMEOUT_S):
                if stream is None:
                    stream = await self._dial(contact)
                await stream.write(frame(encode_request(req)))
                resp = decode_response(await read_frame(stream), DHT_WORK_BITS)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ShoalError) as e:
            if stream is not None:
                await stream.close()
            raise RPCFailed(f"DHT {req.type} to {short(contact.peer_id)} failed: {e!r}") from e
        except asyncio.CancelledError:
            if stream is not None:  # half a request is on it: it can never be reused
                self._spawn(stream.close())
            raise
        if resp.rid != req.rid:
            await stream.close()
            raise RPCFailed(f"DHT answer from {short(contact.peer_id)} is for another request; dropped")
        await self._release(contact.peer_id or (resp.nodes[0].peer_id if resp.nodes else b""), stream)
        return resp

    async def _release(self, peer: bytes, stream: Stream) -> None:
        """Keep a finished stream for the next RPC to `peer`, within the per-peer and total bounds."""
        idle = self._pool.setdefault(peer, []) if peer else []
        if not peer or len(idle) >= MAX_IDLE_PER_PEER:
            await stream.close()
            return
        idle.append(stream)
        self._pool.move_to_end(peer)
        self._pooled += 1
        while self._pooled > MAX_IDLE_STREAMS:
            _, oldest = self._pool.popitem(last=False)
            self._pooled -= len(oldest)
            for s in oldest:
                await s.close()

    async def _call(self, contact: Contact, req: Request) -> tuple[Contact, Response | None]:
        try:
            return contact, await self.rpc(contact, req)
        except RPCFailed as e:
            log.debug("%s", e)
            return contact, None

    async def _run_query(self, q: Query) -> Query:
        """Drive one lookup: keep its requests in flight, feed answers back, stop when it is done."""
        in_flight: set[asyncio.Task] = set()
        try:
            while True:
                for contact, req in q.requests():
                    in_flight.add(asyncio.create_task(self._call(contact, req)))
                if q.done or not in_flight:
                    break
                finished, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for t in finished:
                    contact, resp = t.result()
                    if resp is None:
                        q.on_failure(contact)
                    else:
                        q.on_response(contact, resp, time.time())
                self._drain_pings()
        except BaseException:
            for t in in_flight:
                t.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
            raise
        # Done early (the value was found): the requests still out finish in the background, owned by
        # the node (close() cancels them), so their connections go back to the pool instead of dying.
        for t in in_flight:
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        self.core.table.touch(q.lookup.target, time.time())
        return q

    async def _store_at_closest(self, rec: Record, type_: int, also: Iterable[Contact] = ()) -> int:
        """Store `rec` at the key's closest nodes found now, and at `also`; returns how many stored it."""
        q = await self._run_query(self.core.query(FIND_NODE, rec.key))
        targets = q.closest()
        if rec.kind == PROVIDER and rec.addrs:
            self._holders[rec.key] = list(targets)
        seen = {c.peer_id for c in targets}
        targets += [c for c in also if c.peer_id not in seen]
        calls = (self._call(c, self.core.request(type_, record=rec)) for c in targets)
        results = await asyncio.gather(*calls)
        stored = sum(1 for _, r in results if r is not None and r.ok)
        # We hold a copy too when we are among the closest (small networks) or alone.
        if len(targets) < self.core.k:
            self.core.store.put(rec, self.peer_id, "self", time.time())
            stored += 1
        return stored

    def _next_seq(self) -> int:
        # Milliseconds since the epoch: a restarted node's records still replace its older ones.
        self._seq = max(self._seq + 1, int(time.time() * 1000))
        return self._seq

    # --- the public API --------------------------------------------------------------------------

    async def put(self, name: bytes, value: bytes) -> int:
        """Publish `value` under our key for `name`; returns how many nodes stored it.

        Republished before it expires, until the node closes.
        """
        rec = Record.value_record(self.core.key, name, value, self._next_seq(), time.time() + RECORD_TTL_S)
        self._values[rec.key] = rec
        return await self._store_at_closest(rec, STORE)

    async def get(self, publisher: bytes, name: bytes) -> bytes | None:
        """The newest value `publisher` put under `name`, or None if the network holds none."""
        key = record_key(publisher, name)
        local = self.core.store.get_value(key, time.time())
        q = await self._run_query(self.core.query(FIND_VALUE, key))
        best = q.value
        if local is not None and (best is None or local.seq > best.seq):
            best = local
        return best.value if best is not None else None

    async def announce_run(self, run_id: str, addrs: list[str]) -> int:
        """Announce us as a peer of `run_id` reachable at `addrs`; republished until `withdraw_run`."""
        self._runs[run_id] = list(addrs)
        return await self._provide(run_id, addrs)

    async def _provide(self, run_id: str, addrs: list[str], also: Iterable[Contact] = ()) -> int:
        rec = Record.provider_record(
            self.core.key, run_key(run_id), addrs, self._next_seq(), time.time() + RECORD_TTL_S
        )
        return await self._store_at_closest(rec, ADD_PROVIDER, also)

    async def find_run_peers(self, run_id: str) -> list[tuple[bytes, list[str]]]:
        """The peers (peer id, addresses) that announced themselves in `run_id`, us excluded."""
        key = run_key(run_id)
        q = await self._run_query(self.core.query(GET_PROVIDERS, key))
        provs = dict(q.provider_records)
        for rec in self.core.store.get_providers(key, time.time(), limit=1 << 16, withdrawals=True):
            if rec.publisher not in provs or rec.seq > provs[rec.publisher].seq:
                provs[rec.publisher] = rec
        return [(p, list(r.addrs)) for p, r in provs.items() if p != self.peer_id and r.addrs]

    def withdraw_run(self, run_id: str) -> None:
        """Stop announcing `run_id`, and tell the key's holders (in the background) that we left."""
        if self._runs.pop(run_id, None) is not None:
            self._spawn(self._provide(run_id, [], also=self._holders.pop(run_key(run_id), [])))

    # --- maintenance -----------------------------------------------------------------------------

    async def _maintain(self) -> None:
        last_publish = time.time()
        while True:
            await asyncio.sleep(MAINTENANCE_S)
            now = time.time()
            self.core.store.expire(now)
            if self._bootstrap and not any(self.core.table.is_fresh(c) for c in self.core.table.contacts()):
                await self.join(self._bootstrap)  # cut off (our link, or every contact left): start over
            for i in self.core.table.stale_buckets(now, REFRESH_S)[:MAX_REFRESH_PER_PASS]:
                target = self.core.table.random_id_in_bucket(i, self._rng).to_bytes(KEY_BYTES, "big")
                await self._run_query(self.core.query(FIND_NODE, target))
            if now - last_publish >= REPUBLISH_S:
                last_publish = now
                await self._republish()
            self.save_table()

    async def _republish(self) -> None:
        for key, rec in list(self._values.items()):
            fresh = Record.value_record(
                self.core.key, rec.name, rec.value, self._next_seq(), time.time() + RECORD_TTL_S
            )
            self._values[key] = fresh
            await self._store_at_closest(fresh, STORE)
        for run_id, addrs in list(self._runs.items()):
            await self._provide(run_id, addrs)

    # --- persistence -----------------------------------------------------------------------------

    def save_table(self) -> None:
        """Write the routing table's contacts to `table_path` (atomically), if one was given."""
        if self.table_path is None:
            return
        data = [
            {"peer_id": c.peer_id.hex(), "addrs": list(c.addrs), "work": c.work}
            for c in self.core.table.contacts()
        ]
        tmp = self.table_path.with_suffix(self.table_path.suffix + ".tmp")
        try:
            tmp.write_text(json.dumps({"version": 2, "contacts": data}))
            os.replace(tmp, self.table_path)
        except OSError as e:  # a full disk must not stop the DHT; the next save retries
            log.warning("DHT routing table not saved to %s: %s", self.table_path, e)

    def _load_table(self) -> list[Contact]:
        if self.table_path is None or not self.table_path.exists():
            return []
        try:
            if self.table_path.stat().st_size > MAX_TABLE_FILE:
                raise ValueError(f"larger than {MAX_TABLE_FILE} bytes")
            doc = json.loads(self.table_path.read_text())
            # Seeds only: each is pinged, and its answer names it with its proven work (a version-1 file
            # has no work: 0 is as good a placeholder).
            out = [
                Contact.of(
                    bytes.fromhex(e["peer_id"]), [str(a) for a in e["addrs"]], _saved_work(e.get("work"))
                )
                for e in doc["contacts"][:MAX_BOOT_CONTACTS]
            ]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("DHT routing table file %s is unreadable (%s); ignoring it", self.table_path, e)
            return []
        return out


def _saved_work(work: object) -> int:
    return work if valid_nonce(work) else 0


@dataclass
class _Inbound:
    holder: str  # the proven peer id (hex multihash), or the address on plain TCP
    idle_since: float | None  # waiting for a request since; None while answering one


def _idlest(serving: dict[asyncio.Task, _Inbound], tasks: list[asyncio.Task]) -> asyncio.Task | None:
    idle = [t for t in tasks if serving[t].idle_since is not None]
    return min(idle, key=lambda t: serving[t].idle_since or 0.0, default=None)


def _remote_ip(stream: Stream) -> str:
    """The IP a stream comes from (the quota unit); '' when the stream cannot tell."""
    ip = getattr(stream, "remote_ip", None)
    if ip is not None:
        return ip
    # transport.host.Stream keeps its connection's observed address there (no public accessor yet).
    addr = getattr(getattr(stream, "_conn", None), "remote_addr", None)
    try:
        return addr.tcp_endpoint()[0] if addr is not None else ""
    except (ShoalError, AttributeError, ValueError):
        return ""
