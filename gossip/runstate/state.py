"""`RunState`: one peer's replica of its run's shared state, as a sans-I/O state machine.

Bytes from peers go in through `on_message(sender, data, now)`, time through `tick(now)`; both return
the messages to send (`Outgoing`). Local changes (`set_member`, `set_config`, ...) return messages too.
Nothing here touches a socket, a clock or a file: the daemon picks connections and calls `store.save`.

What is replicated (see `docs.py` for the documents' rules):
- each peer's own document (membership record, addresses, capabilities, round, bans, ban votes);
- run documents, written by the run's creator and the delegates the creator names: configuration
  (LWW per key by revision), checkpoint manifest (by content hash), authoritative bans, delegates;
- per-peer signed records for fast-changing numbers (heartbeat, throughput, loss): newest counter wins;
- equivocation proofs: two signed entries for one slot, after which the writer is banned everywhere.

Sync is push (new entries, to `PUSH_FANOUT` random peers, forwarded while new) plus anti-entropy: every
`ANTI_ENTROPY_INTERVAL_S` a hash of my digests goes to a random peer; if it differs, the digests (the
state vector: generation, seq and head of every document, counter of every record) are exchanged and
each side pushes what the other lacks.

`now` is wall-clock seconds (`time.time()` in the daemon, simulated time in tests): it orders the
generations and record counters of this peer across restarts, and times the local failure detector.
"""

import enum
import hashlib
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pycrdt import Map

from . import wire
from .docs import DocReplica
from .envelope import KIND_PEER, KIND_RUN, Entry, MetricsRecord, public_bytes
from .errors import NotAuthorized, Rejected
from .evidence import note_strike, run_exclusions
from .limiter import Limiter
from .limits import (
    ANTI_ENTROPY_FANOUT,
    ANTI_ENTROPY_INTERVAL_S,
    COMPACT_AFTER_ENTRIES,
    COMPACT_GROWTH,
    COMPACT_MIN_BYTES,
    DEAD_AFTER_S,
    EVIDENCE_TTL_ROUNDS,
    HEARTBEAT_INTERVAL_S,
    MAX_DOCUMENTS,
    MAX_ITEMS_PER_PUSH,
    MAX_PENDING_PER_OWNER,
    MAX_PENDING_TOTAL,
    MAX_REASON_CHARS,
    MAX_SILENCE_ENTRIES,
    MAX_STRIKE_ENTRIES,
    MAX_SYNC_MESSAGE_BYTES,
    PUSH_FANOUT,
    SILENCE_TTL_ROUNDS,
    SUSPECT_AFTER_S,
)
from .wire import KEY_ID_BYTES

log = logging.getLogger(__name__)

DocKey = tuple[int, bytes]  # (kind, owner)
# Pushes are split so that each stays well under the message cap, envelope overhead included.
_PUSH_BUDGET = MAX_SYNC_MESSAGE_BYTES // 2


@dataclass(frozen=True, slots=True)
class Outgoing:
    dest: bytes  # the receiving peer's raw Ed25519 public key; the daemon maps it to a connection
    data: bytes


class Liveness(enum.StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Member:
    key: bytes
    addrs: list[str]
    caps: dict[str, Any]
    round: int
    joined_ms: int
    liveness: Liveness
    last_heard: float | None  # local time a fresh heartbeat or entry from it last arrived
    metrics: dict[str, Any] = field(default_factory=dict)  # its newest signed record


@dataclass(frozen=True, slots=True)
class Checkpoint:
    hash: str
    round: int
    size: int
    files: list[Any]
    by: bytes


def _ms(now: float) -> int:
    return int(now * 1000)


class RunState:
    def __init__(
        self,
        key: Ed25519PrivateKey,
        run_id: bytes,
        creator: bytes,
        now: float,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.key = key
        self.me = public_bytes(key)
        self.run_id = run_id
        self.creator = creator
        self.rng = rng or random.Random()
        self.docs: dict[DocKey, DocReplica] = {}
        self.pending: dict[DocKey, dict[tuple[int, int], Entry]] = {}
        self.records: dict[bytes, MetricsRecord] = {}
        self.proofs: dict[bytes, tuple[Entry, Entry]] = {}
        self.heard: dict[bytes, float] = {}
        self.peers: set[bytes] = set()  # keys to gossip with besides members (seeds from the DHT)
        self.limiter = Limiter()
        self._by_id: dict[bytes, bytes] = {}  # 8-byte key id -> key
        self._metrics: dict[str, Any] = {}
        self._counter = 0
        self._run_version = 0  # bumped whenever a run document changes: keys the caches below
        self._run_cache: dict[str, Any] = {}
        self._pruned_at = 0
        # Bumped on every change of documents/proofs and of records: key the digest and read caches,
        # so that a steady-state replica does not re-sort a thousand entries for every exchange.
        self._docs_version = 0
        self._records_version = 0
        self._cache: dict[str, tuple[Any, Any]] = {}
        self._next_ae = now
        self._next_heartbeat = now
        self._start(KIND_PEER, {"member": {"joined": _ms(now)}}, _ms(now))
        if self.me == creator:
            self._start(KIND_RUN, {}, _ms(now))

    # --- read API ------------------------------------------------------------------------------------

    def _read(self, kind: int, owner: bytes) -> dict[str, dict[str, Any]]:
        r = self.docs.get((kind, owner))
        return r.read() if r else {}

    def _cached(self, name: str, compute: Callable[[], Any]) -> Any:
        hit = self._run_cache.get(name)
        if hit is None or hit[0] != self._run_version:
            hit = self._run_cache[name] = (self._run_version, compute())
        return hit[1]

    def _memo(self, name: str, key: Any, compute: Callable[[], Any]) -> Any:
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            hit = self._cache[name] = (key, compute())
        return hit[1]

    def delegates(self) -> set[bytes]:
        """Keys the creator named as writers of the run's configuration and manifest."""
        return self._cached(
            "delegates",
            lambda: {
                bytes.fromhex(h)
                for h in self._read(KIND_RUN, self.creator).get("delegates", {})
                if _is_key_hex(h)
            },
        )

    def _writers(self) -> list[bytes]:
        return [self.creator, *sorted(self.delegates() - {self.creator})]

    def config(self) -> dict[str, Any]:
        """The run's configuration: per key, the value with the highest revision among run writers."""
        return dict(self._cached("config", self._config))

    def _config(self) -> dict[str, Any]:
        best: dict[str, tuple[int, bytes, Any]] = {}
        for w in self._writers():
            for k, v in self._read(KIND_RUN, w).get("config", {}).items():
                if isinstance(v, dict) and "rev" in v:
                    cand = (int(v["rev"]), w, _norm(v.get("v")))
                    if k not in best or cand[:2] > best[k][:2]:
                        best[k] = cand
        return {k: v[2] for k, v in sorted(best.items())}

    def admitted(self, key: bytes) -> bool:
        """Admission rule from the config: {"open": true} (the default) or {"keys": [hex, ...]}.
        The creator and its delegates are always admitted."""
        open_, allowed = self._cached("admission", self._admission)
        return open_ or key in allowed

    def _admission(self) -> tuple[bool, frozenset[bytes]]:
        rule = self._config().get("admission") or {"open": True}
        writers = {self.creator, *self.delegates()}
        if not isinstance(rule, dict):
            return False, frozenset(writers)
        keys = rule.get("keys") or []
        listed = (
            {bytes.fromhex(h) for h in keys if isinstance(h, str) and _is_key_hex(h)}
            if isinstance(keys, list)
            else set()
        )
        return rule.get("open") is True, frozenset(writers | listed)

    def checkpoints(self) -> list[Checkpoint]:
        out = []
        for w in self._writers():
            for h, v in self._read(KIND_RUN, w).get("manifest", {}).items():
                if isinstance(v, dict):
                    out.append(
                        Checkpoint(
                            h, int(v.get("round", 0)), int(v.get("size", 0)), _norm(v.get("files", [])), w
                        )
                    )
        return sorted(out, key=lambda c: (c.round, c.hash, c.by))

    def manifest(self) -> Checkpoint | None:
        """The current checkpoint: the highest round announced by a run writer."""
        cps = self.checkpoints()
        return cps[-1] if cps else None

    def bans(self) -> dict[bytes, str]:
        """Keys banned from the run, with the reason: run-writer bans, proven equivocation, majority vote."""
        return dict(self._memo("bans", (self._docs_version, self._run_version), self._bans))

    def _hard_bans(self) -> dict[bytes, str]:
        """Bans that need no member document read: proven equivocation and run-writer bans."""
        out: dict[bytes, str] = {
            k: "equivocation: signed two different entries for one slot" for k in self.proofs
        }
        for w in self._writers():
            for h, reason in self._read(KIND_RUN, w).get("bans", {}).items():
                # The creator is never banned by a run document (it is always admitted): every replica
                # keeps gossiping with it, so anti-entropy stays connected however many others are
                # banned. Were it bannable, a creator banning everyone, itself included, left no
                # replica anyone gossips with, and records stopped spreading.
                if _is_key_hex(h) and h != self.creator.hex():
                    out.setdefault(bytes.fromhex(h), f"banned by {w.hex()[:16]}: {reason}")
        return out

    def _bans(self) -> dict[bytes, str]:
        out = self._hard_bans()
        voters = [o for (kind, o) in self.docs if kind == KIND_PEER and o not in out and self.admitted(o)]
        tally: dict[bytes, int] = {}
        for v in voters:
            for h in self._read(KIND_PEER, v).get("votes", {}):
                if _is_key_hex(h):
                    tally[bytes.fromhex(h)] = tally.get(bytes.fromhex(h), 0) + 1
        for target, n in tally.items():
            if 2 * n > len(voters):
                out.setdefault(target, f"voted out by {n} of {len(voters)} members")
        return out

    def evidence(self) -> dict[bytes, dict[bytes, dict[str, Any]]]:
        """Published evidence of poisoned updates: accused key -> accuser key -> {"round", "why"}, from
        admitted, unbanned members' own signed documents."""
        return self._memo(
            "evidence", (self._docs_version, self._run_version), lambda: self._accusations("evidence")
        )

    def silence(self) -> dict[bytes, dict[bytes, dict[str, Any]]]:
        """Published evidence of silence (a partner that stays in the run and never answers): accused key ->
        accuser key -> {"round", "why"}, read as `evidence`."""
        return self._memo(
            "silence", (self._docs_version, self._run_version), lambda: self._accusations("silent")
        )

    def strikes(self) -> dict[bytes, dict[bytes, dict[str, Any]]]:
        """Published strikes (refusals by a guard rule whose word holds alone): accused key -> striker key ->
        {"round", "strikes", "why"}, read as `evidence`."""
        return self._memo(
            "struck", (self._docs_version, self._run_version), lambda: self._accusations("struck")
        )

    def _accusations(self, root: str) -> dict[bytes, dict[bytes, dict[str, Any]]]:
        banned = self.bans()
        out: dict[bytes, dict[bytes, dict[str, Any]]] = {}
        for kind, accuser in sorted(self.docs):
            if kind != KIND_PEER or accuser in banned or not self.admitted(accuser):
                continue
            for h, item in self._read(KIND_PEER, accuser).get(root, {}).items():
                if _is_key_hex(h) and isinstance(item, dict) and bytes.fromhex(h) != accuser:
                    why = item.get("why")
                    out.setdefault(bytes.fromhex(h), {})[accuser] = {
                        "round": _int(item.get("round")),
                        "why": why[:MAX_REASON_CHARS] if isinstance(why, str) else "",
                        **({"strikes": _int(item.get("strikes"))} if "strikes" in item else {}),
                    }
        return out

    def excluded(self) -> dict[bytes, str]:
        """Peers excluded from pairing on the members' evidence, with the reason (`evidence.run_exclusions`:
        a quorum of accusers, never one; an accuser nobody backs loses its voice; strikes by a quorum of
        members adding up to three; and, for a while, silence). Deterministic in the state, so every
        replica that holds the same documents pairs the same peers."""
        return dict(self._memo("excluded", (self._docs_version, self._run_version), self._excluded))

    def _excluded(self) -> dict[bytes, str]:
        banned = self.bans()
        rounds = [
            _int(self._read(KIND_PEER, o).get("member", {}).get("round"))
            for k, o in self.docs
            if k == KIND_PEER and o not in banned and self.admitted(o)
        ]
        return run_exclusions(self.evidence(), self.strikes(), self.silence(), rounds)

    def liveness(self, key: bytes, now: float) -> Liveness:
        if key == self.me:
            return Liveness.ALIVE
        t = self.heard.get(key)
        if t is None or now - t >= DEAD_AFTER_S:
            return Liveness.DEAD if t is not None else Liveness.SUSPECT
        return Liveness.ALIVE if now - t < SUSPECT_AFTER_S else Liveness.SUSPECT

    def members(self, now: float) -> list[Member]:
        """Admitted, unbanned peers with a document, sorted by key, with local liveness."""
        banned = self.bans()
        out = []
        for kind, owner in sorted(self.docs):
            if kind != KIND_PEER or owner in banned or not self.admitted(owner):
                continue
            m = self._read(KIND_PEER, owner).get("member", {})
            rec = self.records.get(owner)
            addrs = m.get("addrs")
            caps = m.get("caps")
            out.append(
                Member(
                    owner,
                    [a for a in addrs if isinstance(a, str)] if isinstance(addrs, list) else [],
                    _norm(caps) if isinstance(caps, dict) else {},
                    _int(m.get("round")),
                    _int(m.get("joined")),
                    self.liveness(owner, now),
                    self.heard.get(owner),
                    _norm(rec.data) if rec else {},
                )
            )
        return out

    def peer_bans(self, key: bytes) -> dict[str, str]:
        """The peers `key` refuses to work with (its own published list)."""
        return dict(self._read(KIND_PEER, key).get("bans", {}))

    def size_bytes(self) -> int:
        """Bytes of replicated state held: every chain, record and proof, as stored and sent."""
        return (
            sum(r.bytes for r in self.docs.values())
            + sum(len(r.encode()) for r in self.records.values())
            + sum(len(a.encode()) + len(b.encode()) for a, b in self.proofs.values())
        )

    # --- local changes -------------------------------------------------------------------------------

    def set_member(
        self, *, addrs: Sequence[str] | None = None, caps: dict[str, Any] | None = None
    ) -> list[Outgoing]:
        def mutate(roots: dict[str, Map]) -> None:
            if addrs is not None:
                roots["member"]["addrs"] = [str(a) for a in addrs]
            if caps is not None:
                roots["member"]["caps"] = dict(caps)

        return self._write(KIND_PEER, mutate)

    def set_round(self, n: int) -> list[Outgoing]:
        return self._write(KIND_PEER, lambda roots: roots["member"].__setitem__("round", int(n)))

    def refuse_peer(self, key: bytes, reason: str) -> list[Outgoing]:
        """Publish that this peer will not work with `key` (its own ban list)."""
        return self._write(KIND_PEER, lambda r: r["bans"].__setitem__(key.hex(), reason[:MAX_REASON_CHARS]))

    def vote_ban(self, key: bytes, reason: str) -> list[Outgoing]:
        """Vote to ban `key` from the run; a majority of members' votes bans it."""
        return self._write(KIND_PEER, lambda r: r["votes"].__setitem__(key.hex(), reason[:MAX_REASON_CHARS]))

    def accuse(self, key: bytes, round_: int, why: str) -> list[Outgoing]:
        """Publish evidence that `key` sent poisoned updates (this peer's guard excluded it at `round_`)."""
        item = {"round": int(round_), "why": why[:MAX_REASON_CHARS]}
        return self._write(KIND_PEER, lambda r: r["evidence"].__setitem__(key.hex(), item))

    def report_silence(self, key: bytes, round_: int, why: str) -> list[Outgoing]:
        """Publish that `key`, this peer's partner in `round_`, stayed in the run but never answered; this
        peer's accusations older than SILENCE_TTL_ROUNDS, or beyond the MAX_SILENCE_ENTRIES newest, go."""
        item = {"round": int(round_), "why": why[:MAX_REASON_CHARS]}
        return self._write(
            KIND_PEER,
            lambda r: _put_newest(r["silent"], key, item, round_ - SILENCE_TTL_ROUNDS, MAX_SILENCE_ENTRIES),
        )

    def report_strike(self, key: bytes, round_: int, why: str) -> list[Outgoing]:
        """Publish that this peer's guard struck `key`, its partner in `round_` (refused it by a rule whose
        word holds alone); strike records older than EVIDENCE_TTL_ROUNDS, or beyond the MAX_STRIKE_ENTRIES
        newest, go."""

        def mutate(roots: dict[str, Map]) -> None:
            struck = roots["struck"]
            item = note_strike(struck.get(key.hex()), round_, why)
            _put_newest(struck, key, item, round_ - EVIDENCE_TTL_ROUNDS, MAX_STRIKE_ENTRIES)

        return self._write(KIND_PEER, mutate)

    def withdraw_vote(self, key: bytes) -> list[Outgoing]:
        return self._write(KIND_PEER, lambda r: r["votes"].pop(key.hex(), None))

    def set_config(self, values: dict[str, Any]) -> list[Outgoing]:
        """Change run configuration keys (creator or delegate only)."""
        current: dict[str, int] = {}
        for w in self._writers():
            for k, v in self._read(KIND_RUN, w).get("config", {}).items():
                if isinstance(v, dict) and "rev" in v:
                    current[k] = max(current.get(k, 0), int(v["rev"]))

        def mutate(roots: dict[str, Map]) -> None:
            for k in sorted(values):
                roots["config"][k] = {"v": values[k], "rev": current.get(k, 0) + 1}

        return self._write(KIND_RUN, mutate)

    def add_checkpoint(self, content_hash: str, round_: int, size: int, files: list[Any]) -> list[Outgoing]:
        entry = {"round": int(round_), "size": int(size), "files": files}
        return self._write(KIND_RUN, lambda r: r["manifest"].__setitem__(content_hash, entry))

    def ban(self, key: bytes, reason: str) -> list[Outgoing]:
        """Ban `key` from the run with the authority of a run writer."""
        return self._write(KIND_RUN, lambda r: r["bans"].__setitem__(key.hex(), reason[:MAX_REASON_CHARS]))

    def unban(self, key: bytes) -> list[Outgoing]:
        return self._write(KIND_RUN, lambda r: r["bans"].pop(key.hex(), None))

    def set_delegates(self, keys: Iterable[bytes]) -> list[Outgoing]:
        """Name the keys that may write the run's configuration and manifest (creator only)."""
        if self.me != self.creator:
            raise NotAuthorized("only the run's creator names delegates; ask the creator to run this")
        want = {k.hex() for k in keys}

        def mutate(roots: dict[str, Map]) -> None:
            for h in set(roots["delegates"].keys()) - want:
                del roots["delegates"][h]
            for h in sorted(want):
                roots["delegates"][h] = True

        return self._write(KIND_RUN, mutate)

    def set_metrics(self, **values: Any) -> None:
        """Fast-changing numbers for the next heartbeat record (throughput, loss, ...)."""
        self._metrics.update(values)

    def heartbeat(self, now: float) -> list[Outgoing]:
        """Sign a fresh record now and push it."""
        self._counter = max(self._counter + 1, _ms(now))
        rec = MetricsRecord.sign(self.key, self.run_id, self._counter, dict(self._metrics))
        self.records[self.me] = rec
        self._records_version += 1
        self._next_heartbeat = now + HEARTBEAT_INTERVAL_S
        return self._push([], [rec], rumour=False)

    def announce(self) -> list[Outgoing]:
        """Push my documents to a few peers at once (after joining or restarting) instead of waiting
        for anti-entropy to carry them."""
        mine = [e for (_, o), r in sorted(self.docs.items()) if o == self.me for e in r.entries]
        return self._push(mine, [], rumour=True)

    def add_peers(self, keys: Iterable[bytes]) -> None:
        """Peers to gossip with besides known members (for example the DHT's providers for the run)."""
        for k in keys:
            if len(k) == 32 and k != self.me and (k in self.peers or len(self.peers) < MAX_DOCUMENTS):
                self.peers.add(k)
                self._by_id[k[:KEY_ID_BYTES]] = k

    def _write(self, kind: int, mutate: Callable[[dict[str, Map]], None]) -> list[Outgoing]:
        own = self.docs.get((kind, self.me))
        if own is None and kind == KIND_RUN and self.me in self.delegates():
            self._start(KIND_RUN, {}, self._counter + 1)
            own = self.docs[(kind, self.me)]
        if own is None:
            raise NotAuthorized(
                f"{self.me.hex()[:16]} may not write the run document: only the creator and its delegates can"
            )
        if kind == KIND_RUN and self.me != self.creator and self.me not in self.delegates():
            raise NotAuthorized(f"{self.me.hex()[:16]} is no longer a delegate of this run; ask the creator")
        entry = own.write(self.key, mutate)
        if entry is None:
            return []
        self._run_version += kind == KIND_RUN
        self._docs_version += 1
        new = [entry]
        if own.seq >= COMPACT_AFTER_ENTRIES or own.bytes > max(
            COMPACT_MIN_BYTES, COMPACT_GROWTH * len(own.entries[0].encode())
        ):
            new.append(self._start(kind, own.read(), own.gen + 1))
        return self._push(new, [], rumour=True)

    def _start(self, kind: int, content: dict[str, dict[str, Any]], gen: int) -> Entry:
        """Begin a new generation of one of my documents (startup, restart, compaction)."""
        old = self.docs.get((kind, self.me))
        gen = max(gen, old.gen + 1 if old else 0)
        replica, snapshot = DocReplica.start(self.key, kind, self.me, gen, self.run_id, content)
        self.docs[(kind, self.me)] = replica
        self._run_version += kind == KIND_RUN
        self._docs_version += 1
        self._by_id[self.me[:KEY_ID_BYTES]] = self.me
        return snapshot

    # --- incoming ------------------------------------------------------------------------------------

    def on_message(self, sender: bytes, data: bytes, now: float) -> list[Outgoing]:
        """Handle one sync message from `sender` (the transport-authenticated key of the connection)."""
        if not self.limiter.admit(sender, len(data), now):
            return []
        try:
            msg = wire.decode(data)
        except Rejected as exc:
            self.limiter.strike(sender, now, str(exc))
            return []
        if isinstance(msg, wire.AntiEntropy):
            _, _, dh, d_blob, p_blob = self._doc_digest()
            _, rh, r_blob, _ = self._record_digest()
            if dh == msg.docs_hash and rh == msg.records_hash:
                return []
            differ = dh != msg.docs_hash
            return [
                self._send(
                    sender,
                    wire.Digest(
                        d_blob if differ else None,
                        p_blob if differ else None,
                        r_blob if rh != msg.records_hash else None,
                        True,
                    ),
                )
            ]
        if isinstance(msg, wire.Digest):
            return self._answer(sender, msg)
        return self._receive(sender, msg, now)

    def _receive(self, sender: bytes, msg: wire.Push, now: float) -> list[Outgoing]:
        fresh: list[Entry] = []
        strikes = 0
        for a, b in msg.proofs:
            try:
                self._accept_proof(Entry.decode(a, self.run_id), Entry.decode(b, self.run_id))
            except Rejected as exc:
                strikes += 1
                self.limiter.strike(sender, now, str(exc))
        for raw in msg.entries:
            try:
                entry = Entry.decode(raw, self.run_id, verify=False)
                # Most of what gossip brings is already known: skip it before paying for the signature.
                if not self._known(entry):
                    entry.verify(self.run_id)
                    fresh.extend(self._accept(entry, now))
            except Rejected as exc:
                strikes += 1
                self.limiter.strike(sender, now, str(exc))
            if strikes > 3:
                break  # a message this bad is not worth finishing
        for raw in msg.records:
            try:
                rec = MetricsRecord.decode(raw, self.run_id, verify=False)
                old = self.records.get(rec.owner)
                if old is None or old.counter < rec.counter:
                    rec.verify(self.run_id)
                    self._accept_record(rec, now)
            except Rejected as exc:
                self.limiter.strike(sender, now, str(exc))
                break
        if not (msg.rumour and fresh):
            return []
        return self._push(fresh, [], rumour=True, exclude=sender)

    def _known(self, entry: Entry) -> bool:
        """Already applied, or of a generation compacted away: nothing it could change."""
        r = self.docs.get((entry.kind, entry.owner))
        if r is None or entry.gen > r.gen:
            return False
        return entry.gen < r.gen or (entry.seq < r.seq and r.ids[entry.seq] == entry.id(self.run_id))

    def _accept_proof(self, a: Entry, b: Entry) -> None:
        if a.slot != b.slot or a.id(self.run_id) == b.id(self.run_id):
            raise Rejected("equivocation proof does not hold two different entries for one slot")
        if a.owner in self.proofs:
            return
        log.warning(
            "runstate: %s signed two different entries for %s; banning it", a.owner.hex()[:16], a.slot[2:]
        )
        self.proofs[a.owner] = (a, b)
        for kind in (KIND_PEER, KIND_RUN):
            if a.owner != self.me:
                self.docs.pop((kind, a.owner), None)
                self.pending.pop((kind, a.owner), None)
        self.records.pop(a.owner, None)
        self._run_version += 1
        self._docs_version += 1
        self._records_version += 1

    def _authorized(self, kind: int, owner: bytes) -> bool:
        if kind == KIND_RUN:
            return owner == self.creator or owner in self.delegates()
        return self.admitted(owner)

    def _accept(self, entry: Entry, now: float) -> list[Entry]:
        """Take one verified entry; return the entries it newly applied (it and any pending it unblocked)."""
        key: DocKey = (entry.kind, entry.owner)
        if entry.owner in self.proofs:
            return []
        if entry.owner == self.me:
            return self._own_echo(entry)
        if not self._authorized(entry.kind, entry.owner):
            log.debug(
                "runstate: entry of %s for a document it may not write; ignored", entry.owner.hex()[:16]
            )
            return []
        r = self.docs.get(key)
        if r is not None and entry.gen < r.gen:
            return []  # an older generation: compacted away
        if r is not None and entry.gen == r.gen and entry.seq < r.seq:
            if r.ids[entry.seq] != entry.id(self.run_id):
                self._accept_proof(r.entries[entry.seq], entry)
            return []
        if (r is None or entry.gen > r.gen) and entry.seq == 0:
            if r is None and len(self.docs) >= MAX_DOCUMENTS:
                log.warning(
                    "runstate: %d documents held; document of %s refused",
                    MAX_DOCUMENTS,
                    entry.owner.hex()[:16],
                )
                return []
            fresh_replica = DocReplica(entry.kind, entry.owner, entry.gen, self.run_id)
            fresh_replica.apply(entry)
            self.docs[key] = fresh_replica
            self._run_version += entry.kind == KIND_RUN
            self._docs_version += 1
            self._by_id[entry.owner[:KEY_ID_BYTES]] = entry.owner
            self.heard[entry.owner] = now
            return [entry, *self._drain(key, now)]
        if r is not None and entry.gen == r.gen and entry.seq == r.seq:
            r.apply(entry)
            self._run_version += entry.kind == KIND_RUN
            self._docs_version += 1
            self.heard[entry.owner] = now
            return [entry, *self._drain(key, now)]
        self._hold(key, entry)
        return []

    def _own_echo(self, entry: Entry) -> list[Entry]:
        """An entry signed with my key came back: if it is not one I hold, my state was lost or my clock
        ran backwards; start a generation above it so nobody keeps the stale one."""
        own = self.docs.get((entry.kind, self.me))
        if own is None and not self._authorized(entry.kind, self.me):
            return []  # a run document from when I was a delegate: not mine to write any more
        if own is not None and (
            entry.gen < own.gen
            or (entry.gen == own.gen and entry.seq < own.seq and own.ids[entry.seq] == entry.id(self.run_id))
        ):
            return []
        content = own.read() if own else {}
        log.warning(
            "runstate: saw my own entry of generation %d that I do not hold; moving past it", entry.gen
        )
        return [self._start(entry.kind, content, entry.gen + 1)]

    def _hold(self, key: DocKey, entry: Entry) -> None:
        held = self.pending.setdefault(key, {})
        if (
            len(held) >= MAX_PENDING_PER_OWNER
            or sum(len(v) for v in self.pending.values()) >= MAX_PENDING_TOTAL
        ):
            log.info(
                "runstate: pending buffer full; entry %s of %s dropped (anti-entropy will refetch)",
                entry.seq,
                entry.owner.hex()[:16],
            )
            return
        held[(entry.gen, entry.seq)] = entry

    def _drain(self, key: DocKey, now: float) -> list[Entry]:
        out: list[Entry] = []
        held = self.pending.get(key)
        while held:
            r = self.docs[key]
            for slot in [s for s in held if s[0] < r.gen or (s[0] == r.gen and s[1] < r.seq)]:
                del held[slot]
            nxt = held.pop((r.gen, r.seq), None)
            if nxt is None:
                newer = sorted(s for s in held if s[0] > r.gen and s[1] == 0)
                nxt = held.pop(newer[-1]) if newer else None
            if nxt is None:
                break
            try:
                out.extend(self._accept(nxt, now))
            except Rejected as exc:
                log.info("runstate: held entry of %s rejected: %s", key[1].hex()[:16], exc)
        if not held:
            self.pending.pop(key, None)
        return out

    def _accept_record(self, rec: MetricsRecord, now: float) -> None:
        if rec.owner == self.me:
            self._counter = max(self._counter, rec.counter)  # never sign a counter below one already out
            return
        if rec.owner in self.proofs or not self.admitted(rec.owner):
            return
        old = self.records.get(rec.owner)
        if old is not None and old.counter >= rec.counter:
            return
        if old is None and len(self.records) >= MAX_DOCUMENTS:
            return
        self.records[rec.owner] = rec
        self._records_version += 1
        self._by_id[rec.owner[:KEY_ID_BYTES]] = rec.owner
        self.heard[rec.owner] = now

    # --- anti-entropy --------------------------------------------------------------------------------

    def _digests(self) -> tuple[list, list, list]:
        """(documents, proofs, records): the state vector of this replica, as compared by anti-entropy."""
        docs, proofs = self._doc_digest()[:2]
        return docs, proofs, self._record_digest()[0]

    def _hashes(self) -> tuple[bytes, bytes]:
        """Hashes of my document and record digests, as sent in the first anti-entropy message."""
        return self._doc_digest()[2], self._record_digest()[1]

    def _doc_digest(self) -> tuple[list, list, bytes, bytes, bytes]:
        """Documents and proofs, their hash and their packed blobs; cached until they change."""

        def compute() -> tuple[list, list, bytes, bytes, bytes]:
            # Only what this replica would serve: documents of keys that may write them.
            docs = sorted(
                (k, o[:KEY_ID_BYTES], r.gen, r.seq, r.head[:8].ljust(8, b"\0"))
                for (k, o), r in self.docs.items()
                if self._authorized(k, o)
            )
            proofs = sorted(o[:KEY_ID_BYTES] for o in self.proofs)
            d_blob, p_blob = wire._pack(docs, wire.DOC_ITEM), wire._pack(proofs, wire.PROOF_ITEM)
            h = hashlib.blake2b(d_blob + b"|" + p_blob, digest_size=16).digest()
            return docs, proofs, h, d_blob, p_blob

        return self._memo("doc_digest", (self._docs_version, self._run_version), compute)

    def _record_digest(self) -> tuple[list, bytes, bytes, dict[bytes, int]]:
        """Records (key id, counter), their hash, packed blob and a lookup; cached until they change."""

        def compute() -> tuple[list, bytes, bytes, dict[bytes, int]]:
            mine = {o[:KEY_ID_BYTES]: r.counter for o, r in self.records.items() if self.admitted(o)}
            records = sorted(mine.items())
            blob = wire._pack(records, wire.REC_ITEM)
            return records, hashlib.blake2b(blob, digest_size=16).digest(), blob, mine

        return self._memo("record_digest", (self._records_version, self._run_version), compute)

    def _prune(self) -> None:
        """After the admission rule or the delegates changed: forget what may no longer be written."""
        self._pruned_at = self._run_version
        for kind, owner in [k for k in self.docs if k[1] != self.me and not self._authorized(*k)]:
            log.info("runstate: %s may no longer write its document; forgetting it", owner.hex()[:16])
            del self.docs[(kind, owner)]
            self.pending.pop((kind, owner), None)
        for owner in [o for o in self.records if not self.admitted(o)]:
            del self.records[owner]
        self._docs_version += 1
        self._records_version += 1

    def _answer(self, sender: bytes, d: wire.Digest) -> list[Outgoing]:
        entries: list[Entry] = []
        records: list[MetricsRecord] = []
        proofs: list[tuple[Entry, Entry]] = []
        lacking = False
        if d.proofs is not None:
            theirs = set(d.proofs)
            proofs = [p for o, p in sorted(self.proofs.items()) if o[:KEY_ID_BYTES] not in theirs]
            lacking = any(p not in {o[:KEY_ID_BYTES] for o in self.proofs} for p in theirs)
        if isinstance(d.docs, list):  # a decoded digest holds lists; packed blobs are for sending
            theirs_docs = {(k, o): (g, s, h) for k, o, g, s, h in d.docs}
            for (kind, owner), r in sorted(self.docs.items()):
                if owner in self.proofs or not self._authorized(kind, owner):
                    continue
                have = theirs_docs.pop((kind, owner[:KEY_ID_BYTES]), None)
                if have is None or have[0] < r.gen:
                    entries.extend(r.entries)
                elif have[0] == r.gen:
                    _, s, h = have
                    if s > r.seq or (s == r.seq and h != r.head[:8].ljust(8, b"\0")):
                        lacking = True
                    if s < r.seq or (s == r.seq and h != r.head[:8].ljust(8, b"\0")):
                        # A prefix of mine: send the rest; a fork: send the whole chain for the proof.
                        prefix = s == 0 or (s <= r.seq and r.ids[s - 1][:8] == h)
                        entries.extend(r.entries[s:] if prefix else r.entries)
                else:
                    lacking = True
            lacking = lacking or any(
                o not in self._by_id or self._by_id[o] not in self.proofs for (_, o) in theirs_docs
            )
        if isinstance(d.records, list):
            theirs_rec = dict(d.records)
            records = [r for o, r in self.records.items() if theirs_rec.get(o[:KEY_ID_BYTES], -1) < r.counter]
            mine = self._record_digest()[3]
            lacking = lacking or any(mine.get(o, -1) < c for o, c in theirs_rec.items())
        out = self._push_to(sender, entries, records, proofs, rumour=False)
        if d.want_reply and lacking:
            _, _, _, d_blob, p_blob = self._doc_digest()
            r_blob = self._record_digest()[2]
            out.append(
                self._send(
                    sender,
                    wire.Digest(
                        d_blob if d.docs is not None else None,
                        p_blob if d.docs is not None else None,
                        r_blob if d.records is not None else None,
                        False,
                    ),
                )
            )
        return out

    def tick(self, now: float, candidates: Sequence[bytes] | None = None) -> list[Outgoing]:
        """Time passes: heartbeat and anti-entropy when due. `candidates` limits whom to gossip with
        (for example the peers the daemon is connected to); by default, every known peer."""
        out: list[Outgoing] = []
        if self._pruned_at != self._run_version:
            self._prune()
        if now >= self._next_heartbeat:
            out += self.heartbeat(now)
        if now >= self._next_ae:
            self._next_ae = now + ANTI_ENTROPY_INTERVAL_S
            msg = wire.encode(wire.AntiEntropy(*self._hashes()))
            out += [Outgoing(p, msg) for p in self._targets(ANTI_ENTROPY_FANOUT, candidates)]
        return out

    # --- sending -------------------------------------------------------------------------------------

    def gossip_peers(self) -> list[bytes]:
        """Everyone known to be in the run (documents, records, seeds), banned keys excepted."""

        def compute() -> list[bytes]:
            # Vote bans would need every member's document built; gossip with those peers is harmless.
            banned = self._hard_bans()
            known = self.peers | {o for (_, o) in self.docs} | set(self.records)
            return sorted(k for k in known if k != self.me and k not in banned)

        key = (self._docs_version, self._run_version, len(self.peers), len(self.records))
        return list(self._memo("peers", key, compute))

    def _targets(
        self, n: int, candidates: Sequence[bytes] | None, exclude: bytes | None = None
    ) -> list[bytes]:
        pool = [k for k in (candidates if candidates is not None else self.gossip_peers()) if k != exclude]
        return self.rng.sample(pool, min(n, len(pool)))

    def _push(
        self,
        entries: list[Entry],
        records: list[MetricsRecord],
        *,
        rumour: bool,
        exclude: bytes | None = None,
    ) -> list[Outgoing]:
        out: list[Outgoing] = []
        for p in self._targets(PUSH_FANOUT, None, exclude):
            out += self._push_to(p, entries, records, [], rumour=rumour)
        return out

    def _push_to(
        self,
        dest: bytes,
        entries: list[Entry],
        records: list[MetricsRecord],
        proofs: list[tuple[Entry, Entry]],
        *,
        rumour: bool,
    ) -> list[Outgoing]:
        out: list[Outgoing] = []
        e_raw = [e.encode() for e in entries]
        r_raw = [r.encode() for r in records]
        q_raw = [(a.encode(), b.encode()) for a, b in proofs]
        while e_raw or r_raw or q_raw:
            # One loop below fills all three (proof pairs, entries, records): mypy cannot pair each
            # source with its batch, so the batches hold Any.
            batch_q: list[Any] = []
            batch_e: list[Any] = []
            batch_r: list[Any] = []
            size, n = 0, 0
            for src, dst, cost in (
                (q_raw, batch_q, lambda x: len(x[0]) + len(x[1])),
                (e_raw, batch_e, len),
                (r_raw, batch_r, len),
            ):
                while src and n < MAX_ITEMS_PER_PUSH - 2 and (size + cost(src[0]) <= _PUSH_BUDGET or n == 0):
                    item = src.pop(0)
                    size += cost(item)
                    n += 2 if dst is batch_q else 1
                    dst.append(item)
            out.append(self._send(dest, wire.Push(batch_e, batch_r, batch_q, rumour)))
        return out

    def _send(self, dest: bytes, msg: wire.Message) -> Outgoing:
        return Outgoing(dest, wire.encode(msg))

    # --- persistence (the bytes; `store.py` does the file) -------------------------------------------

    def export(self) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "me": self.me,
            "counter": self._counter,
            "gens": {str(k): r.gen for (k, o), r in self.docs.items() if o == self.me},
            "entries": [e.encode() for _, r in sorted(self.docs.items()) for e in r.entries],
            "records": [r.encode() for r in self.records.values()],
            "proofs": [[a.encode(), b.encode()] for a, b in self.proofs.values()],
        }

    @classmethod
    def restore(
        cls,
        blob: dict[str, Any],
        key: Ed25519PrivateKey,
        run_id: bytes,
        creator: bytes,
        now: float,
        *,
        rng: random.Random | None = None,
    ) -> "RunState":
        """Rebuild from `export()` output, checking every entry as if it came from the network, then
        start a new generation of my documents (a new Yjs client id) from what was saved."""
        state = cls(key, run_id, creator, now, rng=rng)
        if blob.get("run") != run_id or blob.get("me") != state.me:
            raise Rejected(
                "saved run state belongs to another run or key; move it away or pick the right one"
            )
        own: dict[int, list[Entry]] = {}
        # A damaged item is skipped with a log line: the rest of the run's state is still good, and
        # anti-entropy refetches whatever is missing.
        for a, b in blob.get("proofs", []):
            _skip_bad(lambda a=a, b=b: state._accept_proof(Entry.decode(a, run_id), Entry.decode(b, run_id)))
        for raw in blob.get("entries", []):
            e = _skip_bad(lambda raw=raw: Entry.decode(raw, run_id))
            if isinstance(e, Entry) and e.owner == state.me:
                own.setdefault(e.kind, []).append(e)
            elif isinstance(e, Entry):
                _skip_bad(lambda e=e: state._accept(e, now))
        for raw in blob.get("records", []):
            _skip_bad(lambda raw=raw: state._accept_record(MetricsRecord.decode(raw, run_id), now))
        state.heard.clear()  # liveness is local and fresh: nobody has been heard in this process yet
        state._counter = max(state._counter, int(blob.get("counter", 0)))
        for kind, chain in sorted(own.items()):
            replica = DocReplica(kind, state.me, chain[0].gen, run_id)
            for e in chain:
                if _skip_bad(lambda e=e, r=replica: r.apply(e)) is False:
                    break
            saved_gen = int(blob.get("gens", {}).get(str(kind), replica.gen))
            state._start(kind, replica.read(), max(saved_gen + 1, _ms(now)))
        return state


def _skip_bad(fn: Callable[..., Any]) -> Any:
    """Run one restore step; a `Rejected` item is logged and skipped (returns False).

    `fn` is called without arguments; it is typed `...` because the steps are lambdas that bind loop
    variables as defaults, which mypy cannot match against `Callable[[], Any]`."""
    try:
        result = fn()
    except Rejected as exc:
        log.warning("runstate: skipped a damaged item of the saved state: %s", exc)
        return False
    return True if result is None else result


def _is_key_hex(h: str) -> bool:
    return len(h) == 64 and all(c in "0123456789abcdef" for c in h)


def _put_newest(entries: Map, key: bytes, item: dict[str, Any], oldest_round: int, cap: int) -> None:
    """Sets `entries[key]`, keeping beside it only the cap − 1 newest others from `oldest_round` on."""
    entries[key.hex()] = item
    kept = sorted(
        ((_int(v.get("round")), h) for h, v in entries.items() if isinstance(v, dict) and h != key.hex()),
        reverse=True,
    )
    keep = {key.hex()} | {h for r, h in kept[: cap - 1] if r >= oldest_round}
    for h in set(entries.keys()) - keep:
        del entries[h]


def _int(v: Any) -> int:
    return int(v) if isinstance(v, (int, float)) and v == v and abs(v) < 2**63 else 0


def _norm(v: Any) -> Any:
    """pycrdt reads integers back as floats; give callers back the integers they wrote."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v
