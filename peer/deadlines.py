"""Deadlines from sizes and measured rates: how long a transfer may take, and how long a peer may go silent.

A fixed deadline caps the payload a slow path can ever carry (10 s to read a request meant 26 Mbit/s at
least for a 32 MB message). Here a transfer of S bytes gets `FLOOR_S + MARGIN * 8 S / rate`, where rate is
the path's measured throughput (`peer/reach.py`), or `MIN_RATE_BPS` while nothing has been measured,
within a ceiling: `EXCHANGE_STRETCH` times `--exchange-timeout` for a round's messages, `WEIGHTS_CEILING_S`
for a joiner's weights. A reader that sees no byte for `IDLE_TIMEOUT` gives up whatever is left of the
total, so a peer that stalls (or trickles nothing, a slowloris) is cut early. `paced()` applies both to the
reads of one message; `describe_slow` says, in one line, why a link cannot carry what a round needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Protocol

# Assumed for a path not measured yet: a slow home uplink. Conservative, as it only lengthens deadlines
# (within their ceiling) and an honest transfer cut short by it costs a round.
MIN_RATE_BPS = 1e6
# Added to every transfer's arithmetic: round trips, a slow start, an event loop busy with other requests.
FLOOR_S = 10.0
# A path's rate varies (cross traffic, the partner's own CPU load); a transfer gets twice what it should need.
MARGIN = 2.0
# Seconds without a single byte before a reader gives up, whatever is left of its total deadline.
IDLE_TIMEOUT = 10.0
# A round's exchange may take up to this many times --exchange-timeout when its bytes need it: the option
# stays the patience for a partner that is late, the stretch is for bytes that are on their way.
EXCHANGE_STRETCH = 4.0
# A joiner's weights fetch (and a member's answer to one) at most: a run's weights are worth a long wait,
# and a member serves one fetch at a time per joiner.
WEIGHTS_CEILING_S = 1800.0
# The idle deadline is moved forward at most this often, and at most a tenth of it (each move reschedules
# a timer): a silent peer is cut at most that much before its idle deadline.
RESCHEDULE_EVERY_S = 0.5


def transfer_seconds(nbytes: int, rate_bps: float) -> float:
    """How long `nbytes` take at `rate_bps` bits per second, without margin."""
    return 8 * nbytes / rate_bps


def transfer_deadline(nbytes: int, rate_bps: float | None, ceiling: float) -> float:
    """Seconds a transfer of `nbytes` may take: FLOOR_S + MARGIN × its time at the path's rate (or
    MIN_RATE_BPS when unmeasured), at most `ceiling`."""
    rate = rate_bps or MIN_RATE_BPS
    return min(ceiling, FLOOR_S + MARGIN * transfer_seconds(nbytes, rate))


def exchange_ceiling(exchange_timeout: float) -> float:
    return EXCHANGE_STRETCH * exchange_timeout


def exchange_deadline(nbytes: int, rate_bps: float | None, exchange_timeout: float) -> float:
    """A round's exchange of `nbytes` each way (the payloads are about equal in size): at least
    `exchange_timeout`, more when both transfers in turn need it, at most the exchange ceiling."""
    needed = transfer_deadline(2 * nbytes, rate_bps, exchange_ceiling(exchange_timeout))
    return max(exchange_timeout, needed)


def needed_rate_bps(nbytes: int, seconds: float) -> float:
    """The least rate at which `nbytes` arrive within `seconds` (a deadline at its ceiling has no margin)."""
    return 8 * nbytes / max(1e-3, seconds)


def mbit(rate_bps: float) -> str:
    return f"{rate_bps / 1e6:.2g} Mbit/s" if rate_bps < 1e7 else f"{rate_bps / 1e6:.0f} Mbit/s"


def megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.3g} MB"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def describe_slow(what: str, nbytes: int, rate_bps: float, allowed: float, limit: str) -> str:
    """One line on a link too slow for a transfer: what it delivered, what the bytes would take, what the
    limit allows and the rate they need, e.g. "the link to X delivered 2.1 Mbit/s; 344 MB would take
    22 min, more than the 30 min ...". `limit` names where `allowed` comes from."""
    return (
        f"{what} delivered {mbit(rate_bps)}; {megabytes(nbytes)} would take "
        f"{duration(transfer_seconds(nbytes, rate_bps))} at that rate, and {limit} allows "
        f"{duration(allowed)}: it needs at least {mbit(needed_rate_bps(nbytes, allowed))}"
    )


class _Source(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class Pace:
    """The deadlines of one message's reads: a total one, which `extend` moves once the size is known,
    and an idle one, which every byte that arrives through `watch` pushes forward."""

    def __init__(self, total: float, idle: float, idle_now: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        self.started = self._loop.time()
        self.total_at = self.started + total
        self.idle = idle
        self._idle_on = idle_now  # else from `restart_idle` on
        self.last_byte = self.started
        self.nbytes = 0  # bytes that arrived through `watch`
        self.first_byte: float | None = None  # time.perf_counter() of the first one
        self._timeout: asyncio.Timeout | None = None
        self._moved = self.started

    def when(self) -> float:
        return min(self.total_at, self.last_byte + self.idle) if self._idle_on else self.total_at

    def extend(self, total: float) -> None:
        """The whole read may take `total` seconds from its start (the length prefix says how large it is)."""
        self.total_at = self.started + total
        self._reschedule()

    def expired(self) -> bool:
        """Whether one of these deadlines passed (rather than some other deadline inside them)."""
        return self._timeout is not None and self._timeout.expired()

    @property
    def idled(self) -> bool:
        """Whether the deadline that passed was the idle one (the peer sent nothing for `idle` seconds)."""
        return self._idle_on and self.last_byte + self.idle < self.total_at

    def waited(self) -> float:
        return self._loop.time() - self.started

    def keep_up(self, done: int, total: int, rate_bps: float | None, ceiling: float) -> None:
        """While a body arrives: what is left of it gets the time it needs at the rate seen so far, so an
        unmeasured path that turns out slow but steady is not cut at the minimum rate's arithmetic. Only
        ever lengthens the total, and never past `ceiling` from the start."""
        if not rate_bps:
            return
        need = self.waited() + FLOOR_S + MARGIN * transfer_seconds(total - done, rate_bps)
        if self.started + need > self.total_at:
            self.extend(min(ceiling, need))

    def arrived(self, n: int) -> None:
        now = self._loop.time()
        if self.first_byte is None:
            self.first_byte = time.perf_counter()
        self.nbytes += n
        self.last_byte = now
        if now - self._moved >= min(RESCHEDULE_EVERY_S, self.idle / 10):
            self._moved = now
            self._reschedule()

    def restart_idle(self) -> None:
        """Starts the idle clock now (the reads begin after a wait that is not the peer's to fill)."""
        self.last_byte = self._moved = self._loop.time()
        self._idle_on = True
        self._reschedule()

    def watch(self, source: _Source) -> Watched:
        return Watched(source, self)

    def _reschedule(self) -> None:
        if self._timeout is not None and not self._timeout.expired():
            self._timeout.reschedule(self.when())


class Watched:
    """A reader (an asyncio or transport stream) whose every arriving byte counts as progress."""

    def __init__(self, source: _Source, pace: Pace) -> None:
        self._source = source
        self._pace = pace

    async def read(self, n: int = -1) -> bytes:
        chunk = await self._source.read(n)
        if chunk:
            self._pace.arrived(len(chunk))
        return chunk

    async def readexactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = await self._source.read(n - got)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            self._pace.arrived(len(chunk))
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)


@contextlib.asynccontextmanager
async def paced(total: float, idle: float = IDLE_TIMEOUT, idle_now: bool = True) -> AsyncIterator[Pace]:
    """Reads under a total and an idle deadline; TimeoutError when either passes (`Pace.idled` says which).
    With `idle_now` False the idle clock starts at `Pace.restart_idle` (after a connect, say)."""
    pace = Pace(total, idle, idle_now)
    async with asyncio.timeout_at(pace.when()) as timeout:
        pace._timeout = timeout
        yield pace
