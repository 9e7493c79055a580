"""One owner's document: its chain of signed entries and the pycrdt `Doc` they build.

Each document has exactly one writer (its owner's key), so every replica applies the same entries in
the same order (seq order within one generation). That order is what keeps yrs convergent: it can
leave updates stuck forever when they arrive out of causal order (measured: docs/design.md, "Measured
facts"), and here they never do. A generation starts with a snapshot under a fresh Yjs client id;
compaction and every process restart start a new one, so no client id is ever reused with lost state.
"""

import logging
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pycrdt import Doc, Map

from .envelope import KIND_PEER, KIND_RUN, Entry, client_id
from .errors import Rejected
from .limits import MAX_CHAIN_ENTRIES
from .yupdate import parse

log = logging.getLogger(__name__)

# The root maps each kind of document may hold; an update touching anything else is rejected.
ROOTS = {
    KIND_PEER: frozenset({"member", "bans", "votes", "evidence", "silent", "struck"}),
    KIND_RUN: frozenset({"config", "manifest", "bans", "delegates"}),
}


def guarded(what: str, fn: Callable[[], Any]) -> Any:
    """Run a pycrdt call; turn any failure, including pyo3's `PanicException` (a `BaseException`
    that `except Exception` misses), into `Rejected`. Interrupts and cancellation still propagate."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        if type(exc).__name__ == "CancelledError":
            raise
        raise Rejected(f"pycrdt failed to {what}: {type(exc).__name__}: {exc}") from exc


def _varuint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class DocReplica:
    """The current generation of one (kind, owner) document."""

    def __init__(self, kind: int, owner: bytes, gen: int, run_id: bytes, *, writer: bool = False) -> None:
        self.kind = kind
        self.owner = owner
        self.gen = gen
        self.run_id = run_id
        self.client = client_id(owner, gen)
        self.entries: list[Entry] = []
        self.ids: list[bytes] = []
        self.clock = 0  # next Yjs clock of this generation's client
        self.bytes = 0  # encoded size of the chain: what a replica stores and sends for this document
        # Only the owner's own document writes with the bound client id; replicas never write. A
        # replica builds its pycrdt Doc when first read: a peer that relays a document it never reads
        # (and a simulator holding a thousand replicas) pays only for the checked entries.
        self.doc: Doc | None = None
        self.roots: dict[str, Map] = {}
        self._cache: dict[str, dict[str, Any]] | None = None
        self._captured: list[bytes] = []
        if writer:
            self._materialize(Doc(client_id=self.client))

    @property
    def head(self) -> bytes:
        return self.ids[-1] if self.ids else b""

    @property
    def seq(self) -> int:
        """The next seq this replica expects."""
        return len(self.entries)

    def apply(self, entry: Entry) -> None:
        """Append the next entry of the chain: check it fully, then hand its update to pycrdt."""
        if (entry.kind, entry.owner, entry.gen) != (self.kind, self.owner, self.gen) or entry.seq != self.seq:
            raise Rejected(f"entry {entry.seq} does not extend chain at {self.seq}")  # caller orders first
        if entry.prev != self.head:
            raise Rejected(f"entry {entry.seq} of {entry.owner.hex()[:16]} does not follow its predecessor")
        if self.seq >= MAX_CHAIN_ENTRIES:
            raise Rejected(
                f"chain of {entry.owner.hex()[:16]} passed {MAX_CHAIN_ENTRIES} entries uncompacted"
            )
        info = parse(entry.update, ROOTS[self.kind])
        if info.client is not None and (info.client != self.client or info.clock != self.clock):
            raise Rejected(
                f"update of {entry.owner.hex()[:16]} writes client {info.client} clock {info.clock}, "
                f"expected its own client {self.client} at clock {self.clock}"
            )
        end = self.clock + info.length
        for c, clock, n in info.deletes:
            if c != self.client or clock + n > end:
                raise Rejected(f"update of {entry.owner.hex()[:16]} deletes items that are not its own")
        if self.doc is not None:
            self._integrate(self.doc, entry, end)
        self.clock = end
        self.entries.append(entry)
        self.ids.append(entry.id(self.run_id))
        self.bytes += len(entry.encode())
        self._cache = None

    @staticmethod
    def _integrate(doc: Doc, entry: Entry, end: int) -> None:
        guarded("apply an update", lambda: doc.apply_update(entry.update))
        client = client_id(entry.owner, entry.gen)
        expected = _varuint(1) + _varuint(client) + _varuint(end) if end else _varuint(0)
        if guarded("read a state vector", doc.get_state) != expected:
            # Cannot happen after the checks in `apply`; if yrs disagrees, say so rather than diverge.
            raise Rejected(f"yrs did not integrate entry {entry.seq} of {entry.owner.hex()[:16]}")

    def _materialize(self, doc: Doc) -> None:
        self.doc = doc
        self.roots = {name: doc.get(name, type=Map) for name in sorted(ROOTS[self.kind])}

    def _build(self) -> None:
        """Build the pycrdt Doc from the checked chain. Should yrs refuse an entry the checks passed,
        the chain is cut there on every replica alike (same entries, same refusal), and only the
        owner, who signed it, loses anything."""
        doc: Doc[Map] = Doc()  # Shoal documents hold root maps only
        clock = 0
        for i, e in enumerate(self.entries):
            end = clock + parse(e.update, ROOTS[self.kind]).length
            try:
                self._integrate(doc, e, end)
            except Rejected as exc:
                log.warning("runstate: chain of %s cut at entry %d: %s", self.owner.hex()[:16], i, exc)
                del self.entries[i:], self.ids[i:]
                self.clock = clock
                self.bytes = sum(len(x.encode()) for x in self.entries)
                self._build()
                return
            clock = end
        self._materialize(doc)

    def read(self) -> dict[str, dict[str, Any]]:
        """The document's content (cached until the next entry)."""
        if self._cache is None:
            if self.doc is None:
                self._build()
            self._cache = {name: guarded("read a map", root.to_py) or {} for name, root in self.roots.items()}
        return self._cache

    # --- the owner's side ----------------------------------------------------------------------------

    def write(self, key: Ed25519PrivateKey, mutate: Callable[[dict[str, Map]], None]) -> Entry | None:
        """Run one local transaction and sign its update as the next entry; None if nothing changed."""
        assert self.doc is not None, "only the owner's replica writes"
        self._captured.clear()
        doc = self.doc
        sub = doc.observe(lambda event: self._captured.append(event.update))

        def transact() -> None:
            with doc.transaction():
                mutate(self.roots)

        try:
            guarded("write the document", transact)
        except Rejected:
            # Part of the transaction may be committed but is neither signed nor sent: rebuild the
            # document from the chain (same client, same clocks) so that it never diverges from it.
            self._captured.clear()
            rebuilt: Doc[Map] = Doc(client_id=self.client)
            for e in self.entries:
                rebuilt.apply_update(e.update)
            self._materialize(rebuilt)
            self._cache = None
            raise
        finally:
            doc.unobserve(sub)
        if not self._captured or self._captured[0] == b"\x00\x00":
            return None
        self._cache = None
        update = self._captured[0]
        entry = Entry.sign(key, self.run_id, self.kind, self.gen, self.seq, self.head, update)
        info = parse(update, ROOTS[self.kind])  # our own writes obey the rules we impose on others
        self.clock += info.length
        self.entries.append(entry)
        self.ids.append(entry.id(self.run_id))
        self.bytes += len(entry.encode())
        return entry

    @classmethod
    def start(
        cls,
        key: Ed25519PrivateKey,
        kind: int,
        owner: bytes,
        gen: int,
        run_id: bytes,
        content: dict[str, dict[str, Any]],
    ) -> tuple["DocReplica", Entry]:
        """A new generation: a fresh client id, `content` written as the seq-0 snapshot."""
        replica = cls(kind, owner, gen, run_id, writer=True)

        def fill(roots: dict[str, Map]) -> None:
            for name in sorted(content):
                for k in sorted(content[name]):
                    roots[name][k] = content[name][k]

        entry = replica.write(key, fill)
        if entry is None:  # empty content: the snapshot is the empty update
            assert replica.doc is not None  # a writer's replica holds its document from the start
            entry = Entry.sign(key, run_id, kind, gen, 0, b"", replica.doc.get_update())
            replica.entries.append(entry)
            replica.ids.append(entry.id(run_id))
            replica.bytes += len(entry.encode())
        return replica, entry
