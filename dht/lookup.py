"""The iterative lookup as a sans-I/O state machine (Kademlia paper 2.3; S/Kademlia 4.4 disjoint paths).

The driver (the asyncio node or the simulator) asks `next_queries()` for contacts to send a request
to, and reports each answer with `on_response` or `on_failure` (timeouts are the driver's clock, not
ours). The lookup runs `paths` independent walks; a node is queried by at most one path, so a path
that meets a liar stays the liar's, and the others still reach the key's true neighbourhood. The
`alpha` requests in flight are shared out over the paths (at least one each), and a path ends when its
k closest live candidates have all answered.
"""

import heapq
from dataclasses import dataclass, field

from shoal.dht.routing import Contact, K

ALPHA = 3  # requests in flight per lookup, shared by its paths: the paper's alpha (section 2.3)
PATHS = 3  # disjoint paths: S/Kademlia's d; 3 keeps lookups succeeding with 20 % liars at ~3x the cost
MAX_NODES_PER_ANSWER = K  # a responder's node list is cut to k before it can grow our state
TRIES = 2  # a contact that times out is asked once more: one lost message must not hide the key's
# holder; a dead one costs two timeouts


@dataclass(slots=True)
class _Path:
    candidates: dict[int, Contact] = field(default_factory=dict)  # learned, not failed
    queried: set[int] = field(default_factory=set)
    responded: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)
    done: bool = False


class Lookup:
    """One iterative lookup for `target`; finds its k closest nodes, or stops early once it found enough.

    `want` is how many answers carrying the looked-for item (a value or providers, already validated
    by the driver) end the lookup early; 0 means run to convergence (a FIND_NODE).
    """

    def __init__(
        self,
        target: int,
        seeds: list[Contact],
        *,
        own_peer_id: bytes = b"",
        k: int = K,
        alpha: int = ALPHA,
        paths: int = PATHS,
        want: int = 0,
    ) -> None:
        self.target = target
        self.k = k
        self.alpha = alpha
        self._per_path = 1  # set once the number of paths is known
        self.want = want
        self.found = 0
        self.messages = 0
        self.found_hops: int | None = None
        self._own = own_peer_id
        self._hop: dict[int, int] = {}
        self._owner: dict[int, int] = {}  # node id -> index of the path that claimed it
        self._fails: dict[int, int] = {}
        seeds = sorted((c for c in seeds if c.peer_id != own_peer_id), key=lambda c: c.id ^ target)
        self._paths = [_Path() for _ in range(max(1, min(paths, len(seeds))))]
        self._per_path = max(1, -(-alpha // len(self._paths)))
        for i, c in enumerate(seeds):
            if c.id not in self._owner:
                self._claim(i % len(self._paths), c, 1)

    def _claim(self, p: int, c: Contact, hop: int) -> None:
        self._owner[c.id] = p
        self._hop[c.id] = hop
        self._paths[p].candidates[c.id] = c

    @property
    def done(self) -> bool:
        if self.want and self.found >= self.want:
            return True
        return all(self._path_done(p) for p in self._paths)

    def _path_done(self, p: _Path) -> bool:
        if p.done:
            return True
        if p.in_flight:
            return False
        p.done = not self._next_for(p, 1)
        return p.done

    def _next_for(self, p: _Path, n: int) -> list[Contact]:
        t = self.target
        best = heapq.nsmallest(self.k, [(cid ^ t, cid) for cid in p.candidates])
        return [p.candidates[cid] for _, cid in best if cid not in p.queried][:n]

    def next_queries(self) -> list[Contact]:
        """Contacts to send the request to now; each must later get `on_response` or `on_failure`."""
        if self.done:
            return []
        out = []
        for p in self._paths:
            if p.done:
                continue
            for c in self._next_for(p, self._per_path - len(p.in_flight)):
                p.queried.add(c.id)
                p.in_flight.add(c.id)
                out.append(c)
        self.messages += len(out)
        return out

    def on_response(self, contact: Contact, nodes: list[Contact], found: bool = False) -> None:
        """`contact` answered with `nodes` (closer contacts) and, if `found`, the looked-for item."""
        p_idx = self._owner.get(contact.id)
        if p_idx is None:
            return
        p = self._paths[p_idx]
        if contact.id not in p.in_flight:
            return  # an answer we did not ask for, or a late one after a timeout
        p.in_flight.discard(contact.id)
        p.responded.add(contact.id)
        hop = self._hop[contact.id]
        if found:
            self.found += 1
            if self.found_hops is None:
                self.found_hops = hop
        for c in nodes[:MAX_NODES_PER_ANSWER]:
            if c.id not in self._owner and c.peer_id != self._own:
                self._claim(p_idx, c, hop + 1)

    def on_failure(self, contact: Contact) -> None:
        """`contact` timed out or answered garbage: after TRIES failures it leaves its path's candidates."""
        p_idx = self._owner.get(contact.id)
        if p_idx is None:
            return
        p = self._paths[p_idx]
        if contact.id not in p.in_flight:
            return
        p.in_flight.discard(contact.id)
        fails = self._fails[contact.id] = self._fails.get(contact.id, 0) + 1
        if fails < TRIES:
            p.queried.discard(contact.id)  # ask again
        else:
            p.candidates.pop(contact.id, None)

    def closest(self) -> list[Contact]:
        """The k closest contacts that answered, over all paths."""
        answered = (p.candidates[i] for p in self._paths for i in p.responded if i in p.candidates)
        return heapq.nsmallest(self.k, answered, key=lambda c: c.id ^ self.target)

    def hops(self) -> int:
        """Hops to the result: of the first answer that held the item, else of the closest answer."""
        if self.found_hops is not None:
            return self.found_hops
        best = self.closest()
        return self._hop[best[0].id] if best else 0
