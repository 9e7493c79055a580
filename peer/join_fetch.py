"""A joiner's fetch of the run's weights: spans from several members at once, then checked against others.

Home uplinks are the slow end of a fetch (10 Mbit/s carries gpt2-small's 344 MB in about 5 minutes), so
the model's bytes are cut into SPAN pieces and up to PARALLEL members send different ones at once. A member
that is cut leaves the rest of its span to whoever is free next and may go on (RESUMES times, while it
delivers something); one that refuses, answers badly or sends non-finite values is dropped and the next
candidate takes its place. The result is a mosaic of members' weights: each member's φ is its own, but
pairwise averaging keeps them near one another, and a span of one beside a span of another is as good a
start as either.

A member could send weights it made up. Before the worker gets them, each member's spans are checked
against members that did not send them: a `probe` asks those for their values at CHECK_VALUES coordinates
drawn at random inside the spans (after the spans arrived, so the sender could not know which) and for
each span's sum of squares (which catches a few huge values the sampled coordinates would miss). `judge`
compares. Refused spans are fetched again from other members, and their sender is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from shoal.peer.weights import CHUNK, PROBE_SPANS, PROBE_VALUES, Span, WeightsError, sum_of_squares
from shoal.transport.errors import TransportError
from shoal.transport.messages import MessageError

log = logging.getLogger("shoal.peer.daemon")

SPAN = 16 * CHUNK  # bytes one request asks for: a few seconds at home-uplink rates, a fraction at 100 Mbit/s
PARALLEL = 3  # members sending at once
RESUMES = 3  # cuts a member may have (each after delivering bytes) before it is dropped
CHECKERS = 3  # members that judge each sender's spans: CHECKERS + 1 are probed, a sender may be among them
CHECK_VALUES = 1024  # coordinates checked per member that sent spans
# `judge`'s bounds, relative to the norm of the checkers' values. Measured on live runs: `tiny` (4 peers,
# round 12) a member is 0.011 from the partner it just averaged with and 0.08-0.12 from the others, and
# moves 0.08-0.10 in two rounds; `small` (3 peers, round 4) 0.05-0.13 apart. Made-up weights are far: noise
# of the weights' own norm 1.0-1.4, zeros 1, a sign flip 2.
TOLERANCE_FACTOR = 3.0  # times how far apart the two nearest checkers are
TOLERANCE_FLOOR = 0.25  # at least: the checkers may just have averaged with one another
LONE_TOLERANCE = 0.4  # one checker: nothing to compare its distance with

CUT = (OSError, TimeoutError, asyncio.IncompleteReadError, TransportError)  # a link that failed, not a lie
BAD = (MessageError, WeightsError, ValueError)  # an answer that cannot be used

FetchSpan = Callable[[str, memoryview, Span, Callable[[int], None]], Awaitable[int]]
Probe = Callable[[str, list[int], list[list[int]]], Awaitable[tuple[int, bytes, list[float]]]]


class FetchFailed(Exception):
    """No member was left to send the rest of the weights."""


@dataclass(frozen=True)
class Judgement:
    ok: bool
    why: str
    distance: float | None = None  # of the sender's values from the checkers', relative to their norm
    tolerance: float | None = None


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """How far `a` is from `b`, relative to `b`'s norm."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / max(float(np.linalg.norm(b64)), 1e-12))


def lower_median(values: list[float]) -> float:
    """The median, the lower of the two middle values for an even count: of two checkers, the one that
    agrees more with the sender (a single lying checker cannot have an honest sender refused)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def judge(
    mine: np.ndarray, theirs: list[np.ndarray], my_sums: list[float], their_sums: list[list[float]]
) -> Judgement:
    """Whether the values a member sent (`mine`, at sampled coordinates; `my_sums`, each of its spans'
    sum of squares) are the run's, judged by checkers that did not send them (`theirs`, `their_sums`).

    The distance is the (lower) median over checkers, so one lying checker of three cannot have honest
    weights refused nor made-up ones taken. The tolerance scales with the two nearest checkers' distance,
    which liars can only shrink (to TOLERANCE_FLOOR), not stretch."""
    if not theirs:
        return Judgement(True, "unchecked: no other member answered a probe")
    distance = lower_median([relative(mine, other) for other in theirs])
    pairs = [relative(a, b) for a, b in itertools.combinations(theirs, 2)]
    tolerance = LONE_TOLERANCE if not pairs else max(TOLERANCE_FACTOR * min(pairs), TOLERANCE_FLOOR)
    if not distance <= tolerance:  # NaN included
        apart = f"; the nearest two are {min(pairs):.3f} apart" if pairs else ""
        why = f"its values are {distance:.3f} of their norm from other members' (at most {tolerance:.3f}"
        return Judgement(False, f"{why}{apart})", distance, tolerance)
    for number, mine_sum in enumerate(my_sums):
        norm = float(np.sqrt(lower_median([float(sums[number]) for sums in their_sums])))
        gap = abs(float(np.sqrt(mine_sum)) - norm) / max(norm, 1e-12)
        if not gap <= tolerance:
            why = f"a span's norm is {gap:.3f} off other members' (at most {tolerance:.3f})"
            return Judgement(False, why, distance, tolerance)
    return Judgement(
        True, f"{distance:.3f} from other members' (at most {tolerance:.3f})", distance, tolerance
    )


@dataclass
class Sender:
    peer: str
    spans: list[tuple[int, int]] = field(default_factory=list)  # the bytes it delivered, [start, end)
    round: int = 0  # the newest round it sent
    cuts: int = 0

    @property
    def delivered(self) -> int:
        return sum(end - start for start, end in self.spans)


@dataclass
class Fetched:
    round: int  # the newest round of the weights that make it up, by the senders' word
    senders: dict[str, int]  # member -> bytes of the weights it sent
    refused: dict[str, str]  # member whose weights were refused -> why
    checks: dict[str, str]  # member that sent weights -> how they compared
    received: int  # bytes of weights that arrived, refused ones included


class JoinFetch:
    """Fills `into` (the model's bytes) from `candidates` (members, best first),
    checked against `checkers` (members to probe, best first).

    fetch_span(peer, into, span, progress): fetches the rest of `span` from `peer`, returns its round;
    probe(peer, indices, spans): a member's (round, values, sums of squares); progress(done, total):
    bytes in so far."""

    def __init__(
        self,
        candidates: list[str],
        checkers: list[str],
        fetch_span: FetchSpan,
        probe: Probe,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self._candidates: Iterator[Sender] = (Sender(peer) for peer in candidates)
        self._checkers = checkers
        self._fetch_span = fetch_span
        self._probe = probe
        self._progress = progress or (lambda done, total: None)
        self.senders: dict[str, Sender] = {}
        self.dropped: dict[str, str] = {}  # member -> why it sends no more (a cut, a refusal, a bad answer)
        self.refused: dict[str, str] = {}  # member whose weights the check refused -> why
        self.checks: dict[str, str] = {}
        self._done = 0  # bytes in place
        self.received = 0  # bytes that arrived

    async def run(self, into: memoryview) -> Fetched:
        """FetchFailed when the members ran out before every byte came and passed the check."""
        nbytes = len(into)
        # Spans of SPAN, or smaller for a small model: two for each member sending at once, whole chunks.
        span = min(SPAN, CHUNK * max(1, -(-nbytes // (2 * PARALLEL * CHUNK))))
        pending = deque(Span(start, min(start + span, nbytes)) for start in range(0, nbytes, span))
        while True:
            await self._gather(into, pending)
            refused = await self._check(into)
            if not refused:
                break
            for peer, why in refused.items():
                log.warning("the run's weights from %s were refused: %s; fetching them from other members",
                            peer, why)  # fmt: skip
                sender = self.senders.pop(peer)
                self.refused[peer] = why
                pending.extend(Span(start, end) for start, end in sender.spans)
                self._done -= sender.delivered
        senders = {peer: s.delivered for peer, s in self.senders.items() if s.spans}
        number = max(self.senders[peer].round for peer in senders)
        return Fetched(number, senders, dict(self.refused), dict(self.checks), self.received)

    def _next_sender(self) -> Sender | None:
        sender = next(self._candidates, None)
        if sender is not None:
            self.senders[sender.peer] = sender
        return sender

    async def _gather(self, into: memoryview, pending: deque[Span]) -> None:
        """Fetches the pending spans, PARALLEL members at once, each taking the next span when free."""
        changed = asyncio.Condition()
        in_flight = 0

        def ready() -> bool:  # a span to take, or none left to come back
            return bool(pending) or not in_flight

        async def slot(sender: Sender | None) -> None:
            nonlocal in_flight
            while sender is not None:
                async with changed:
                    await changed.wait_for(ready)
                    if not pending:
                        return
                    span = pending.popleft()
                    in_flight += 1
                try:
                    why = await self._one(sender, into, span, pending)
                finally:
                    async with changed:
                        in_flight -= 1
                        changed.notify_all()
                if why is not None:
                    self.dropped[sender.peer] = why
                    log.info("the weights fetch goes on without %s: %s", sender.peer, why)
                    sender = self._next_sender()

        free = [s for s in self.senders.values() if s.peer not in self.dropped]
        while len(free) < PARALLEL and (sender := self._next_sender()) is not None:
            free.append(sender)
        async with asyncio.TaskGroup() as group:
            for sender in free[:PARALLEL]:
                group.create_task(slot(sender))
        if pending:
            left = sum(span.end - span.done for span in pending)
            why = "; ".join(f"{peer}: {reason}" for peer, reason in {**self.dropped, **self.refused}.items())
            raise FetchFailed(f"no member left to send the last {left} bytes ({why or 'no member asked'})")

    async def _one(self, sender: Sender, into: memoryview, span: Span, pending: deque[Span]) -> str | None:
        """One span from `sender`; puts back what did not come. Why `sender` is dropped, or None."""
        start, nbytes = span.done, len(into)

        def arrived(size: int) -> None:
            self._done += size
            self.received += size
            self._progress(self._done, nbytes)

        try:
            number = await self._fetch_span(sender.peer, into, span, arrived)
        except CUT as error:
            if span.done > start:
                sender.spans.append((start, span.done))
            pending.appendleft(Span(span.done, span.end))
            sender.cuts += 1
            if span.done == start or sender.cuts > RESUMES:
                return f"cut ({error or type(error).__name__})"
            return None
        except BAD as error:
            self._done -= span.done - start
            pending.appendleft(Span(start, span.end))
            return str(error) or type(error).__name__
        sender.spans.append((start, span.end))
        sender.round = max(sender.round, number)
        return None

    async def _check(self, into: memoryview) -> dict[str, str]:
        """Probes up to CHECKERS members for their values where the senders' spans were sampled; returns
        the senders whose weights `judge` refuses, and why."""
        senders = [s for s in self.senders.values() if s.spans]  # again after a refusal: new spans came
        samples = {s.peer: _sample(s.spans, min(CHECK_VALUES, PROBE_VALUES // len(senders))) for s in senders}
        spans = {s.peer: _merged(s.spans, PROBE_SPANS // len(senders)) for s in senders}
        # Our side first, copied out (no view of `into` may outlive this call, cancelled or not: the daemon
        # releases it); the sums read the weights once (about 0.3 s for gpt2-small's 344 MB).
        values = np.frombuffer(into, dtype="<f4")
        mine = {peer: values[picked] for peer, picked in samples.items()}
        del values
        my_sums = {peer: [sum_of_squares(into, a, b) for a, b in spans[peer]] for peer in spans}
        indices = [int(i) for s in senders for i in samples[s.peer]]
        asked = [list(span) for s in senders for span in spans[s.peer]]
        probed = [peer for peer in self._checkers if peer not in self.refused][: CHECKERS + 1]
        answers = await asyncio.gather(
            *(self._probe(peer, indices, asked) for peer in probed), return_exceptions=True
        )
        answered: dict[str, tuple[np.ndarray, list[float]]] = {}
        for peer, answer in zip(probed, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, (*CUT, *BAD)):
                    raise answer
                log.info("%s did not answer a probe of the weights: %s", peer, answer)
                continue
            _, raw, sums = answer
            answered[peer] = (np.frombuffer(raw, dtype="<f4"), sums)
        refused: dict[str, str] = {}
        at, span_at = 0, 0
        for sender in senders:
            count, span_count = len(samples[sender.peer]), len(spans[sender.peer])
            others = {peer: a for peer, a in answered.items() if peer != sender.peer}
            verdict = judge(
                mine[sender.peer],
                [raw[at : at + count] for raw, _ in others.values()],
                my_sums[sender.peer],
                [sums[span_at : span_at + span_count] for _, sums in others.values()],
            )
            at, span_at = at + count, span_at + span_count
            self.checks[sender.peer] = verdict.why
            if not verdict.ok:
                refused[sender.peer] = verdict.why
        return refused


def _sample(spans: list[tuple[int, int]], count: int) -> np.ndarray:
    """`count` coordinates (fp32 indices) drawn at random from the spans' bytes, sorted; from the system's
    randomness, so that a sender cannot predict them."""
    rng = np.random.default_rng(secrets.randbits(64))
    sizes = np.array([(end - start) // 4 for start, end in spans], dtype=np.int64)
    picks = rng.integers(0, int(sizes.sum()), size=count)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(offsets, picks, side="right") - 1
    starts = np.array([start // 4 for start, _ in spans], dtype=np.int64)
    return np.sort(starts[which] + picks - offsets[which])


def _merged(spans: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    """The spans with adjacent ones joined; at most `most` (the first ones: the rest go unchecked by norm)."""
    joined: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if joined and joined[-1][1] == start:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return joined[: max(1, most)]
