"""One round's swap with the round's partner: the asyncio shell around the round protocol (gossip/rounds).

Each round the worker hands the daemon its payload; `RoundSwap.swap` picks the round (the worker's next
one, or the run's after a skip: gossip/rounds/clock.py), the partner (the seeded pairing over the live
members) and swaps under the exchange deadline, full duplex: both partners send their payload in an offer
at once (each on its own stream) and each answers the other's offer from `answer_offer`, which the
daemon's request dispatcher calls, with a payload-less accept once its own round is ready. An offer is a
small header followed by the payload's raw bytes (peer/offers.py): the sender streams them from the worker's
outbound segment and the receiver into the worker's inbound one, so the daemon never holds a payload. The
round is swapped when our offer was accepted and the partner's arrived: a whole, validated partner payload
or none. Invalid messages score their sender down; enough of them ban it here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from shoal.errors import ShoalError
from shoal.gossip.membership import Membership
from shoal.gossip.rounds import clock
from shoal.gossip.rounds import payload as dense
from shoal.gossip.rounds.pairing import partner_of
from shoal.gossip.rounds.swap import MAX_ROUNDS_AHEAD, SwapBook, Verdict, should_stop_waiting
from shoal.gossip.targets import GossipTargets
from shoal.peer import deadlines
from shoal.peer.config import PeerConfig
from shoal.peer.offers import RoundClosed, receive_body
from shoal.peer.reach import PeerReach, TransferTimer
from shoal.peer.status import StatusBoard
from shoal.transport.errors import TransportError
from shoal.transport.host import Stream
from shoal.transport.lograte import LogThrottle
from shoal.transport.messages import MessageError, write_message

T = TypeVar("T")
log = logging.getLogger(__name__)

CONTROL_MESSAGE_LIMIT = 1 << 20  # members/status requests and answers
PROBE_INTERVAL = 0.5  # how often a peer waiting for its partner's offer asks it how it is doing
ROUND_QUERY_TIMEOUT = 2.0  # seconds a member has to say which round it finished (or a partner, how it is)
# A partner that answers nothing at all for this long (no status, no offer) is given up for the round: a
# member that keeps its signed heartbeats going but never answers would otherwise cost each partner the
# whole exchange deadline (up to EXCHANGE_STRETCH × --exchange-timeout).
SILENT_PARTNER_S = 15.0
OFFERS_NOTED = 8  # senders noted per round whose offer arrived (the partner's among them, bar a flood)
ROUND_REPORTS_KEPT = 100
UNREACHABLE = "skipped a round: could not reach its partner"
MAX_STRIKES = 3  # invalid round messages before a peer is banned here (an honest peer sends none)

# request(target, message, limit[, progress][, body=view]) -> (answer, bytes sent, bytes received), on a
# fresh stream; progress(done, total) follows the answer's bytes; `body` is streamed after the message
Request = Callable[..., Awaitable[tuple[dict, int, int]]]
# inbox(nbytes) -> a writable view of the worker's inbound segment, where a partner's payload lands
Inbox = Callable[[int], memoryview]


@dataclass
class Arrival:
    """What became of the partner's offer in our round: its bytes off the wire, or why it was not taken."""

    payload_bytes: int = 0  # in the worker's inbound segment
    wire_bytes: int = 0  # the offer's header and payload
    failure: str | None = None


@dataclass
class RoundReport:
    number: int
    partner: str | None
    outcome: str  # "swapped" or "skipped: <reason>"
    bytes_sent: int
    bytes_received: int
    payload_bytes: int = 0  # when swapped: the size of the partner's payload, now in the worker's segment
    jumped_from: int | None = None  # the worker's round, when the peer moved to the run's round instead
    heard: bool = False  # the partner gave a sign of life this round: a status answer, its offer, a reply


class RoundSwap:
    def __init__(
        self,
        peer_id: str,
        config: PeerConfig,
        board: StatusBoard,
        stopping: asyncio.Event,
        request: Request,
        message: Callable[..., dict[str, Any]],
        on_ban: Callable[[str, str], None],
    ):
        self.peer_id = peer_id
        self.config = config
        self.board = board
        self.stopping = stopping
        self._request = request
        self._message = message  # message(kind, **fields): a run-protocol message from us
        self._on_ban = on_ban  # on_ban(peer, why): we banned `peer` for invalid messages
        self.membership: Membership | None = None  # the daemon's, once it listens
        self.reach: PeerReach | None = None  # the daemon's, once the NAT layer is up: measured path rates
        self._named_slow: set[str] = set()  # partners whose slow link the log named (until they swap)
        self.book = SwapBook(peer_id)
        self.changed = asyncio.Condition()  # notified whenever the book changes
        self.incoming: dict[int, asyncio.Future[Arrival]] = {}  # round -> the partner's offer, once decided
        self.offered: dict[int, set[str]] = {}  # round -> peers whose offer for it arrived (while it is open)
        self.inbox: Inbox | None = None  # the daemon's, once the worker said hello
        self.reports: list[RoundReport] = []
        self.banned: set[str] = set()
        # Peers the run excluded from pairing on published evidence (the run state's `excluded`, which every
        # member computes alike, so the seeded pairing stays the same everywhere); the daemon sets it.
        self.excluded: Callable[[], set[str]] = set
        # accused(peer, now): we published it as silent lately (peer/silence.py): its rounds are skipped
        self.accused: Callable[[str, float], bool] = lambda peer, now: False
        self.strikes: dict[str, int] = {}  # invalid messages per peer
        self.spec: list[tuple[str, tuple[int, ...]]] = []  # the model's tensors, once the worker says
        self.method = ""  # the outer method, as the worker resolved it
        self.lattice_bits = 0  # bits per value of the method's lattice code, as the worker says
        self.max_offer_bytes = CONTROL_MESSAGE_LIMIT
        self._first_round = True
        # Partners we could not reach: a few lines a minute, then a summary (members at silent addresses
        # would make one a round); each round's event still says why it was skipped.
        self._unreachable = LogThrottle(log)
        self.targets = GossipTargets()  # who answered us lately; the daemon's gossip uses it too

    def use_model(self, spec: list[tuple[str, tuple[int, ...]]], method: str, lattice_bits: int) -> None:
        """What payloads must look like, from the worker's hello."""
        self.spec, self.method, self.lattice_bits = spec, method, lattice_bits
        # The payload travels raw after the offer's header: at most what the worker's segments hold.
        self.max_offer_bytes = dense.max_payload_bytes(spec)

    @property
    def _members(self) -> Membership:
        """The daemon's membership, which it sets before the first round."""
        if self.membership is None:
            raise RuntimeError("a round needs the daemon's membership, and it has not been set yet")
        return self.membership

    async def swap(self, proposed: int, payload: bytes | memoryview) -> RoundReport:
        """Swaps our payload for round `proposed` (or the run's round) with that round's partner."""
        number = await self._round_number(proposed)
        if number != proposed:
            log.info(
                "[%s] jumped from round %d to round %d: the run is there (a skipped round left us behind)",
                self.peer_id,
                proposed,
                number,
            )
        report = await self._exchange(number, payload)
        report.jumped_from = proposed if number != proposed else None
        if report.outcome == "swapped" and report.partner is not None:
            self._named_slow.discard(report.partner)  # it keeps up again: name it anew if it falls behind
        self.reports = [*self.reports[-ROUND_REPORTS_KEPT:], report]
        return report

    def flush_logs(self) -> None:
        """Sums up the throttled log lines whose minute is over."""
        self._unreachable.flush()

    def status(self, request: dict[str, Any]) -> dict[str, Any]:
        """Our answer to a STATUS request: where we are in the round it asks about."""
        return self.book.status(round_field(request))

    async def _round_number(self, proposed: int) -> int:
        """The worker's next round while we keep pace (we swapped last round). After a skip, or for the
        first round, the run's round if we are behind it and our partner is done with ours; if we are
        further ahead than partners hold offers for, we first wait for the run to catch up (or for our
        partner to come to our round), up to the exchange deadline, then go past our round if the run
        did meanwhile (gossip/rounds/clock.py)."""
        if not (self._first_round or (self.reports and self.reports[-1].outcome != "swapped")):
            return proposed
        self._first_round = False
        loop = asyncio.get_running_loop()
        run, partner = await self._ask_the_run(proposed)
        number = clock.next_round(proposed, run, self.config.rounds, _waits(proposed, partner))
        deadline = loop.time() + self.config.exchange_timeout
        waited = False
        while (
            clock.lead(number, run, _here(partner)) and loop.time() < deadline and not self.stopping.is_set()
        ):
            self.board.set_activity(
                "waiting", f"round {number} is ahead of the run (at round {run}): waiting for it to catch up"
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_INTERVAL):
                    await self.stopping.wait()
            run, partner = await self._ask_the_run(number)
            waited = True
        if waited:  # our partner may have given up our round meanwhile (it is done with it): go past it
            number = clock.next_round(number, run, self.config.rounds, _waits(number, partner))
        if clock.lead(number, run, _here(partner)) and not self.stopping.is_set():
            log.info("[%s] round %d: still ahead of the run (round %s); going on", self.peer_id, number, run)
        return number

    async def _ask_the_run(self, number: int) -> tuple[int | None, tuple[int, int] | None]:
        """The run's current round (the median of what a few live members say they finished, plus one;
        asked afresh, as gossip lags behind rounds that take a fraction of a second) and where our
        partner in round `number` is by its word, (finished, round), when it answered."""
        loop = asyncio.get_running_loop()
        members = self.eligible(loop.time())
        others = [p for p in members if p != self.peer_id]
        partner = partner_of(self.peer_id, members, self.config.run_id, number)
        # Members that answered lately first (gossip/targets.py): members that never answer would leave
        # too few answers, and their gossiped rounds (any number they like) would set the run's round.
        asked = self.targets.sample(others, clock.ROUND_SAMPLE, loop.time())
        # Our partner too, unless it just failed to answer us (its status would cost the round 2 s for
        # nothing: the exchange will try it anyway).
        if (
            partner is not None
            and partner not in asked
            and not self.targets.backing_off(partner, loop.time())
        ):
            asked.append(partner)
        replies = await asyncio.gather(*(self._status_of(p, number) for p in asked))
        answers = dict(zip(asked, replies, strict=True))
        for peer, answer in answers.items():
            (self.targets.failed if answer is None else self.targets.answered)(peer, loop.time())
        finished = [a[0] for a in answers.values() if a is not None]
        gossiped = [p for p in others if self.targets.responsive(p, loop.time())] or others
        run = clock.run_round(finished or [self._members.members[p].round for p in gossiped])
        return run, answers.get(partner) if partner is not None else None

    async def _status_of(self, peer: str, number: int) -> tuple[int, int] | None:
        """(the last round `peer` finished, the round it is in), by its own word; None if it does not
        answer in time."""
        ask = self._message("status", round=number)
        try:
            async with asyncio.timeout(ROUND_QUERY_TIMEOUT):
                reply, _, _ = await self._request(peer, ask, CONTROL_MESSAGE_LIMIT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, TransportError, MessageError,
                ShoalError, ValueError):  # fmt: skip
            return None
        finished, here = reply.get("finished"), reply.get("round")
        if reply.get("type") != "status" or not (isinstance(finished, int) and isinstance(here, int)):
            return None
        if not (0 <= finished < 2**40 and 0 <= here < 2**40):
            return None
        return finished, here

    async def _exchange(self, number: int, payload: bytes | memoryview) -> RoundReport:
        loop = asyncio.get_running_loop()
        partner = partner_of(self.peer_id, self.eligible(loop.time()), self.config.run_id, number)
        report = RoundReport(number, partner, "skipped: no partner this round", 0, 0)
        if partner is not None and self.accused(partner, loop.time()):  # its offer is refused too
            report.outcome = (
                f"skipped: partner {partner} never answered us before (published); not waited for"
            )
            partner = None
        self.incoming[number] = loop.create_future()
        async with self.changed:
            self.book.ready(number, partner)
            self.changed.notify_all()
        deadline = self.config.exchange_timeout
        limit: asyncio.Timeout | None = None
        try:
            if partner is not None:
                deadline, stretched = self.exchange_deadline(partner, len(payload))
                async with asyncio.timeout(deadline) as limit:
                    waiting = f"swapping round {number} with partner {partner}"
                    swap = self._both_ways(partner, number, payload, report)
                    if stretched:  # the bytes need longer than --exchange-timeout: say how long and why
                        log.info("[%s] round %d: %s", self.peer_id, number, stretched)
                        waiting = f"{waiting} ({stretched})"
                    self.board.set_activity("waiting", waiting)
                    finished, _ = await until_stopped(swap, self.stopping)
                    if not finished:
                        report.outcome = "skipped: the peer is stopping"
        except TimeoutError:
            assert partner is not None  # only an exchange with a partner has a deadline
            if limit is not None and limit.expired():
                # (what of its offer arrived told the path's rate: the daemon's request reader records it)
                report.outcome = f"skipped: partner {partner} did not answer within {deadline:.0f}s"
                self.check_link(partner, len(payload))
            else:  # a connect's own deadline, not the round's
                report.outcome = f"skipped: connection to partner {partner} failed (timed out)"
                self._unreachable.note(logging.INFO, UNREACHABLE, str(partner), f"round {number}: timed out")
        except (OSError, asyncio.IncompleteReadError, TransportError, ValueError) as error:
            # ValueError: a member id gossiped to us that is no peer id cannot be dialed
            why = f"{type(error).__name__}: {str(error)[:160]}" if str(error) else type(error).__name__
            report.outcome = f"skipped: connection to partner {partner} failed ({why})"
            self._unreachable.note(logging.INFO, UNREACHABLE, str(partner), f"round {number}: {why}")
        except (MessageError, dense.PayloadError) as error:
            report.outcome = f"skipped: partner {partner} sent an invalid answer ({error})"
            log.warning("[%s] round %d: %s", self.peer_id, number, report.outcome)
            assert partner is not None  # only an exchange with a partner gets an answer to find invalid
            self.strike(partner, str(error))
        finally:
            self.incoming.pop(number, None)
            for old in [n for n in self.offered if n <= number]:
                del self.offered[old]
            async with self.changed:
                self.book.finish(number)
                self._members.beat(loop.time(), self.book.last_finished)
                self.changed.notify_all()
        return report

    async def _both_ways(
        self, partner: str, number: int, payload: bytes | memoryview, report: RoundReport
    ) -> None:
        """Our offer to the partner and the partner's offer to us, at once (full duplex). The first side to
        give up (refused, the partner moved on) ends the other; swapped only when both went through."""
        sending = asyncio.ensure_future(self._offer(partner, number, payload, report))
        receiving = asyncio.ensure_future(self._await_offer(partner, number, report))
        try:
            pending = {sending, receiving}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.cancelled():  # not by us (we are still running): say so, not "stopping"
                        log.warning("[%s] round %d: a side of the swap was cancelled", self.peer_id, number)
                        report.outcome = "skipped: a side of the swap was cancelled"
                        return
                    reason = task.result()  # what it raised is raised here
                    if reason is not None:
                        report.outcome = f"skipped: {reason}"
                        return
            report.outcome = "swapped"
        finally:
            for task in (sending, receiving):
                task.cancel()
            await asyncio.gather(sending, receiving, return_exceptions=True)
        if report.outcome != "swapped":
            report.payload_bytes = 0

    async def _offer(
        self, partner: str, number: int, payload: bytes | memoryview, report: RoundReport
    ) -> str | None:
        """Sends our payload; None once the partner accepted it, else why not."""
        offer = self._message("offer", round=number, nbytes=len(payload))
        reply, sent, _ = await self._request(partner, offer, CONTROL_MESSAGE_LIMIT, body=memoryview(payload))
        report.bytes_sent, report.heard = sent, True
        if reply.get("type") == "refuse":
            return f"partner refused ({str(reply.get('reason'))[:200]})"
        if reply.get("type") != "accept" or reply.get("round") != number:
            raise MessageError(f"unexpected answer to an offer: type {reply.get('type')!r}")
        return None

    async def _await_offer(self, partner: str, number: int, report: RoundReport) -> str | None:
        """Waits for the partner's offer (answered by `answer_offer`); None once it is here, else why we
        stopped waiting (the partner's status says it will not come, or it answered nothing at all for
        SILENT_PARTNER_S: neither a status nor its offer)."""
        arrival = self.incoming[number]
        loop = asyncio.get_running_loop()
        heard = loop.time()  # when the partner last showed it is there
        while True:
            try:
                async with asyncio.timeout(PROBE_INTERVAL):
                    arrived = await asyncio.shield(arrival)
                break
            except TimeoutError:
                if partner in self.offered.get(number, ()):  # its offer is in: the transfer's deadlines rule
                    heard, report.heard = loop.time(), True
                elif loop.time() - heard > SILENT_PARTNER_S:
                    return f"partner {partner} answered nothing for {SILENT_PARTNER_S:.0f} s"
                try:
                    status = await self._status_unless(arrival, partner, number)
                except TimeoutError:  # no news, not bad news: its offer may fill a slow link
                    continue
                except (OSError, asyncio.IncompleteReadError, TransportError):
                    if arrival.done():  # its offer came in meanwhile (it may be gone since: its last round)
                        continue
                    raise
                if status is None:  # the offer came in while we asked: no need for the answer
                    continue
                heard, report.heard = loop.time(), True
                reason = should_stop_waiting(status, self.peer_id, number)
                if reason is not None and not arrival.done():
                    return reason
        report.heard = True
        if arrived.failure is not None:
            return arrived.failure
        report.payload_bytes = arrived.payload_bytes
        report.bytes_received = arrived.wire_bytes
        return None

    async def _status_unless(
        self, arrival: asyncio.Future[Arrival], partner: str, number: int
    ) -> dict[str, Any] | None:
        """The partner's status answer (TimeoutError after ROUND_QUERY_TIMEOUT), or None as soon as its
        offer arrives meanwhile: on a full link the answer waits behind the payloads, and the round would
        wait for it although the swap was done (0.4 s of a 0.55 s swap at 100 Mbit/s)."""
        asking = asyncio.ensure_future(
            self._request(partner, self._message("status", round=number), CONTROL_MESSAGE_LIMIT)
        )
        try:
            async with asyncio.timeout(ROUND_QUERY_TIMEOUT):
                pending: set[asyncio.Future[Any]] = {asking, arrival}
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if not asking.done():
                return None
            status, _, _ = asking.result()
            return status
        finally:
            asking.cancel()
            await asyncio.gather(asking, return_exceptions=True)

    def exchange_deadline(self, partner: str, nbytes: int) -> tuple[float, str]:
        """The round's deadline for `nbytes` each way with `partner` (`deadlines.exchange_deadline`) and,
        when the bytes rather than --exchange-timeout set it, why, for the log and `peer status`."""
        rate = self.reach.rate_bps(partner) if self.reach is not None else None
        timeout = self.config.exchange_timeout
        deadline = deadlines.exchange_deadline(nbytes, rate, timeout)
        self.check_link(partner, nbytes)
        if deadline <= timeout:
            return deadline, ""
        at = f"the measured {deadlines.mbit(rate)}" if rate else (
            f"an assumed {deadlines.mbit(deadlines.MIN_RATE_BPS)} (not measured yet)"
        )  # fmt: skip
        return deadline, f"waiting up to {deadline:.0f} s: 2 × {deadlines.megabytes(nbytes)} at {at}"

    def check_link(self, partner: str, nbytes: int) -> None:
        """Names the link to `partner` too slow when, at its measured rate, a round's bytes (`nbytes` each
        way) would take longer than the longest exchange allowed, however long it may be stretched."""
        rate = self.reach.rate_bps(partner) if self.reach is not None else None
        ceiling = deadlines.exchange_ceiling(self.config.exchange_timeout)
        if rate is None or deadlines.transfer_seconds(2 * nbytes, rate) <= ceiling:
            return
        limit = (
            f"a round ({deadlines.EXCHANGE_STRETCH:.0f} × --exchange-timeout "
            f"{self.config.exchange_timeout:.0f} s)"
        )
        text = deadlines.describe_slow(f"the link to {partner}", 2 * nbytes, rate, ceiling, limit)
        self.slow_link(partner, f"{text} (or a larger --exchange-timeout)")

    def slow_link(self, partner: str, text: str) -> None:
        """Says once per partner in the log, and in `peer status` until a swap with it goes through, that
        its link cannot carry a round in time."""
        self.board.slow_link(partner, text)
        if partner not in self._named_slow:
            self._named_slow.add(partner)
            log.warning("[%s] %s", self.peer_id, text)

    def strike(self, peer: str, why: str) -> None:
        """Scores a peer down for an invalid message; one that keeps sending them is banned here."""
        self.strikes[peer] = self.strikes.get(peer, 0) + 1
        if self.strikes[peer] >= MAX_STRIKES and peer not in self.banned:
            self.banned.add(peer)
            log.warning(
                "[%s] banned %s after %d invalid messages (last: %s)", self.peer_id, peer, MAX_STRIKES, why
            )
            self._on_ban(peer, f"{MAX_STRIKES} invalid round messages")

    def eligible(self, now: float) -> list[str]:
        """The members we would pair with: live, training (their worker is ready and they hold the run's
        weights), not banned by us and not excluded by the run."""
        excluded = self.excluded()
        return [p for p in self._members.ready(now) if p not in self.banned and p not in excluded]

    async def answer_offer(self, sender: str, request: dict[str, Any], size: int, stream: Stream) -> None:
        """Answers `sender`'s offer, whose payload follows its header on `stream`: held until our own round
        is ready, then refused without reading the payload, or read into the worker's inbound segment,
        checked, and accepted (or refused as invalid)."""
        number, nbytes = round_field(request), request.get("nbytes")
        if not isinstance(nbytes, int) or not 0 < nbytes <= self.max_offer_bytes:
            raise MessageError(f"an offer of {nbytes!r} bytes (at most {self.max_offer_bytes})")
        if not self.spec or self.inbox is None:  # our worker has not said what the model looks like yet
            await self._refuse_unread(stream, "not ready: the model is still loading")
            return
        if self.book.last_finished < number <= self.book.here + MAX_ROUNDS_AHEAD:
            seen = self.offered.setdefault(number, set())  # a partner waiting in it knows the sender is there
            if len(seen) < OFFERS_NOTED:
                seen.add(sender)
        held = False
        async with self.changed:
            try:
                async with asyncio.timeout(self.config.exchange_timeout):
                    while (decision := self.book.on_offer(sender, number)).verdict is Verdict.HOLD:
                        held = True
                        await self.changed.wait()
            except TimeoutError:
                decision = None
            if decision is None or decision.verdict is Verdict.REFUSE or not self.book.complete(number):
                reason = decision.reason if decision else f"not ready for round {number} in time"
                await self._refuse_unread(stream, reason or "duplicate")
                return
        arrival = self.incoming.get(number)
        outcome = Arrival(failure=f"the offer of round {number} was cut")
        try:
            try:
                await self._receive_payload(sender, number, nbytes, stream, timed=not held)
            except dense.PayloadError as error:
                log.warning(
                    "[%s] round %d: refused the payload of %s: %s", self.peer_id, number, sender, error
                )
                outcome.failure = f"partner {sender} sent an invalid payload ({error})"
                await write_message(stream, self._message("refuse", reason=f"invalid payload: {error}"))
                self.strike(sender, str(error))
                return
            except RoundClosed:
                outcome.failure = f"round {number} ended while the partner's payload arrived"
                await self._refuse_unread(stream, f"round {number} is over here")
                return
            await write_message(stream, self._message("accept", round=number))
            outcome = Arrival(nbytes, size + nbytes)
        finally:  # whatever happened, our side of the round hears it now, not at its deadline
            if arrival is not None and not arrival.done():
                arrival.set_result(outcome)

    async def _refuse_unread(self, stream: Stream, reason: str) -> None:
        """Refuses an offer whose payload we do not read: the answer, then a reset, so that the sender stops
        sending at once and the window's worth already here is dropped rather than held."""
        await write_message(stream, self._message("refuse", reason=reason))
        await stream.reset()

    async def _receive_payload(
        self, sender: str, number: int, nbytes: int, stream: Stream, timed: bool
    ) -> None:
        """The offer's payload, into the worker's inbound segment while round `number` is still ours, under
        a deadline from its size at the path's rate and an idle cut; then its checks (PayloadError).
        `timed`: the sender wrote it at once and we read it at once, so its arrival times the path."""
        assert self.inbox is not None  # the caller checked
        rate = self.reach.rate_bps(sender) if self.reach is not None else None
        ceiling = deadlines.exchange_ceiling(self.config.exchange_timeout)
        timer = TransferTimer()

        def still_open() -> bool:
            current = self.book.current
            return current is not None and current.number == number

        stream.expect(nbytes)  # read as it comes: the sender need not wait for the window to grow
        try:
            with self.inbox(nbytes) as into:
                async with deadlines.paced(deadlines.transfer_deadline(nbytes, rate, ceiling)) as pace:

                    def progress(done: int, total: int) -> None:
                        timer(done, total)
                        pace.keep_up(done, total, timer.rate_bps(), ceiling)

                    await receive_body(pace.watch(stream), into, still_open, progress)
                dense.check_message(into, self.method, self.spec, self.lattice_bits)
        finally:
            if timed and self.reach is not None:
                self.reach.record(timer, sender, partial=True)
                if timer.finished is None and timer.nbytes:
                    self.check_link(sender, nbytes)


def _waits(number: int, partner: tuple[int, int] | None) -> bool:
    """Whether our partner in round `number`, at (finished, round), has yet to swap it: it waits for us."""
    return partner is not None and clock.still_in(number, *partner)


def _here(partner: tuple[int, int] | None) -> int | None:
    return partner[1] if partner is not None else None


def round_field(request: dict[str, Any]) -> int:
    number = request.get("round")
    if not isinstance(number, int) or not 0 < number < 2**40:
        raise MessageError(f"bad round number {number!r}")
    return number


async def until_stopped(coroutine: Awaitable[T], stopping: asyncio.Event) -> tuple[bool, T | None]:
    """Runs `coroutine` until it ends or `stopping` is set: (True, what it returned), or (False, None) if
    it was cut short. What it raised is raised here.

    Whatever way this returns or is cancelled (by a deadline around it), no task is left behind."""
    task = asyncio.ensure_future(coroutine)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return False, None
    return True, task.result()
