"""One span of the run's weights from one member: one `weights` request, into the worker's inbound segment,
under deadlines from the span's bytes and the path's measured rate.

The member answers with a header and then the raw bytes (peer/weights.py: `check_header`, `receive_span`);
peer/join_fetch.py asks several members for spans at once and checks what came. Here: one request. Its
deadline is the transfer deadline of the span's bytes at the path's measured rate (or the minimum), at most
WEIGHTS_CEILING_S, and it is cut after IDLE_TIMEOUT without a byte; a cut request raises TimeoutError with
one line saying what the link delivered and what the span would need.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from shoal.peer import deadlines
from shoal.peer.reach import PeerReach, TransferTimer
from shoal.peer.weights import Span, check_header, receive_span
from shoal.transport.host import Stream
from shoal.transport.messages import MessageError, read_frame, write_message

log = logging.getLogger("shoal.peer.daemon")

# A weights answer's header frame (the bytes follow it raw), or a probe's answer.
ANSWER_HEADER_LIMIT = 1 << 20
PROBE_TIMEOUT = 30.0  # a probe's answer: 16 KB, after the member read the asked spans from its disk


class WeightsFetcher:
    """Fetches spans of members' weights, and probes members' weights, for one joining peer.

    open_stream(peer): a fresh run-protocol stream to `peer` (connected within its own deadline);
    message(kind, **fields): a run-protocol message from us."""

    def __init__(
        self,
        peer_id: str,
        open_stream: Callable[[str], Awaitable[Stream]],
        message: Callable[..., dict[str, Any]],
        reach: PeerReach,
        connect_timeout: float,
    ):
        self.peer_id = peer_id
        self._open_stream = open_stream
        self._message = message
        self._reach = reach
        self._connect_timeout = connect_timeout

    async def attempt(self, peer: str, into: memoryview, span: Span, progress: Callable[[int], None]) -> int:
        """Fetches the rest of `span` of `peer`'s slow weights into `into`; returns their round.
        progress(bytes): each chunk's size as it lands."""
        nbytes = span.end - span.done
        rate = self._reach.rate_bps(peer)
        ceiling = deadlines.WEIGHTS_CEILING_S
        deadline = self._connect_timeout + deadlines.transfer_deadline(nbytes, rate, ceiling)
        timer = TransferTimer(from_first_byte=True)
        at = f"the measured {deadlines.mbit(rate)}" if rate else "an unmeasured rate"
        size = deadlines.megabytes(nbytes)
        log.info("[%s] fetching %s of the run's weights from %s: up to %s at %s",
                 self.peer_id, size, peer, deadlines.duration(deadline), at)  # fmt: skip
        first = span.done

        def arrived(size: int) -> None:
            progress(size)
            timer(span.done - first, span.end - first)
            pace.keep_up(
                span.done - first, span.end - first, timer.rate_bps(), self._connect_timeout + ceiling
            )

        try:
            async with deadlines.paced(deadline, idle_now=False) as pace:
                return await self._request(peer, into, span, arrived, pace)
        except TimeoutError:
            if not pace.expired():
                raise  # a connect's own deadline
            raise TimeoutError(self._why_cut(peer, nbytes, pace, timer)) from None
        finally:
            self._reach.record(timer, peer, partial=True)

    async def _request(
        self, peer: str, into: memoryview, span: Span, arrived: Callable[[int], None], pace: deadlines.Pace
    ) -> int:
        """One weights request on a fresh stream: the header, then the bytes, written into `into`."""
        stream = await self._open_stream(peer)
        try:
            # The span's bytes are read as they come: open the window for them with the request itself.
            stream.expect(span.end - span.done)
            await write_message(stream, self._message("weights", **span.request_fields()))
            await stream.close()  # our side is done: half-close
            pace.restart_idle()
            reader = pace.watch(stream)
            reply, _ = await read_frame(reader, ANSWER_HEADER_LIMIT)
            if reply.get("type") == "refuse":
                raise MessageError(f"refused: {str(reply.get('reason'))[:200]}")
            if reply.get("type") != "weights":
                raise MessageError(f"unexpected answer to a weights request: {reply.get('type')!r}")
            number = check_header(reply, len(into), span)
            await receive_span(reader, into, span, arrived)
            return number
        except BaseException:
            await stream.reset()
            raise

    async def probe(
        self, peer: str, indices: list[int], spans: list[list[int]]
    ) -> tuple[int, bytes, list[float]]:
        """A member's values at `indices` and sums of squares of `spans` (bytes) of its latest weights:
        (round, fp32 values, sums). MessageError for a refusal or a malformed answer."""
        stream = await self._open_stream(peer)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await write_message(stream, self._message("probe", indices=indices, spans=spans))
                await stream.close()
                reply, _ = await read_frame(stream, ANSWER_HEADER_LIMIT)
        except BaseException:
            await stream.reset()
            raise
        if reply.get("type") == "refuse":
            raise MessageError(f"refused: {str(reply.get('reason'))[:200]}")
        number, values, sums = reply.get("round"), reply.get("values"), reply.get("sumsq")
        if reply.get("type") != "probe" or not isinstance(number, int):
            raise MessageError(f"unexpected answer to a probe: {reply.get('type')!r}")
        if not isinstance(values, bytes) or len(values) != 4 * len(indices):
            raise MessageError("a probe answered with the wrong number of values")
        if (
            not isinstance(sums, list)
            or len(sums) != len(spans)
            or not all(isinstance(x, float) for x in sums)
        ):
            raise MessageError("a probe answered with the wrong sums")
        return number, values, sums

    @staticmethod
    def _why_cut(peer: str, nbytes: int, pace: deadlines.Pace, timer: TransferTimer) -> str:
        """Why a weights fetch was cut, in a line: the peer went silent, or its link is too slow."""
        got = f"{deadlines.megabytes(timer.nbytes)} of {deadlines.megabytes(nbytes)}"
        deadline = pace.total_at - pace.started  # as the transfer's pace left it
        if pace.idled:
            return f"it sent nothing for {pace.idle:.0f} s (after {got})"
        delivered = timer.rate_bps()
        if delivered is None:
            return f"no weights within {deadlines.duration(deadline)}"
        limit = f"a weights fetch (at most {deadlines.duration(deadlines.WEIGHTS_CEILING_S)})"
        return deadlines.describe_slow(f"the link to {peer}", nbytes, delivered, deadline, limit)
