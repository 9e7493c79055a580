"""A joiner's fetch of the run's weights from one member: one `weights` request per attempt, into the worker's
inbound segment, under deadlines from the bytes left and the path's measured rate.

The member answers with a header and then the raw bytes (peer/weights.py: `check_header`, `receive_into`);
`fetch_resuming` there runs the attempts. Here: one attempt. Its deadline is the transfer deadline of the
bytes left at the path's measured rate (or the minimum), at most WEIGHTS_CEILING_S, and it is cut after
IDLE_TIMEOUT without a byte; a cut attempt raises TimeoutError with one line saying what the link
delivered and what the weights would need. The transfer shows as a bar on a terminal and in `peer status`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from shoal.peer import deadlines
from shoal.peer.progress import transfer_bar
from shoal.peer.reach import PeerReach, TransferTimer
from shoal.peer.weights import Fetch, check_header, receive_into
from shoal.transport.host import Stream
from shoal.transport.messages import MessageError, read_frame, write_message

log = logging.getLogger("shoal.peer.daemon")

ANSWER_HEADER_LIMIT = 1 << 20  # a weights answer's header frame (the bytes follow it raw)


class WeightsFetcher:
    """Fetches members' weights for one joining peer.

    open_stream(peer): a fresh run-protocol stream to `peer` (connected within its own deadline);
    message(kind, **fields): a run-protocol message from us; showing(peer, text): the fetch's progress for
    `peer status`; `bars`: draw a progress bar on the terminal."""

    def __init__(
        self,
        peer_id: str,
        open_stream: Callable[[str], Awaitable[Stream]],
        message: Callable[..., dict[str, Any]],
        reach: PeerReach,
        showing: Callable[[str, str], None],
        bars: bool,
        connect_timeout: float,
    ):
        self.peer_id = peer_id
        self._open_stream = open_stream
        self._message = message
        self._reach = reach
        self._showing = showing
        self._bars = bars
        self._connect_timeout = connect_timeout

    async def attempt(self, peer: str, into: memoryview, fetch: Fetch) -> int:
        """Fetches `peer`'s slow weights into `into` (the rest of them, when `fetch` resumes a cut one);
        returns the bytes received over all of `fetch`'s attempts."""
        nbytes, offset = len(into), fetch.done
        rate = self._reach.rate_bps(peer)
        ceiling = deadlines.WEIGHTS_CEILING_S
        deadline = self._connect_timeout + deadlines.transfer_deadline(nbytes - offset, rate, ceiling)
        timer = TransferTimer(from_first_byte=True)
        size = deadlines.megabytes(nbytes)
        at = f"the measured {deadlines.mbit(rate)}" if rate else "an unmeasured rate"
        part = f" from {deadlines.megabytes(offset)}" if offset else ""
        log.info("[%s] fetching the run's weights (%s%s) from %s: up to %s at %s",
                 self.peer_id, size, part, peer, deadlines.duration(deadline), at)  # fmt: skip
        with transfer_bar(f"weights from {peer[-8:]}", enabled=self._bars) as bar:

            def progress(done: int, total: int) -> None:
                bar(done, total)
                timer(done - offset, total - offset)  # this attempt's bytes: its rate
                limit = self._connect_timeout + ceiling
                pace.keep_up(done - offset, total - offset, timer.rate_bps(), limit)
                self._showing(peer, f"{done / 1e6:.1f} of {total / 1e6:.1f} MB")

            try:
                async with deadlines.paced(deadline, idle_now=False) as pace:
                    await self._request(peer, into, fetch, progress, pace)
            except TimeoutError:
                if not pace.expired():
                    raise  # a connect's own deadline
                raise TimeoutError(self._why_cut(peer, nbytes - offset, pace, timer)) from None
            finally:
                self._reach.record(timer, peer, partial=True)
        return fetch.received

    async def _request(
        self, peer: str, into: memoryview, fetch: Fetch, progress: Any, pace: deadlines.Pace
    ) -> None:
        """One weights request on a fresh stream: the header, then the bytes, written into `into`."""
        stream = await self._open_stream(peer)
        try:
            await write_message(stream, self._message("weights", **fetch.request_fields()))
            await stream.close()  # our side is done: half-close
            pace.restart_idle()
            reader = pace.watch(stream)
            reply, size = await read_frame(reader, ANSWER_HEADER_LIMIT)
            fetch.received += size
            if reply.get("type") == "refuse":
                raise MessageError(f"refused: {str(reply.get('reason'))[:200]}")
            if reply.get("type") != "weights":
                raise MessageError(f"unexpected answer to a weights request: {reply.get('type')!r}")
            fetch.partial = check_header(reply, len(into), fetch.partial)
            offset = fetch.partial.done
            progress(offset, len(into))
            try:
                await receive_into(reader, into, fetch.partial, progress)
            finally:
                fetch.received += fetch.partial.done - offset
        except BaseException:
            await stream.reset()
            raise

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
