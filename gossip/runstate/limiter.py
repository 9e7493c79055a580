"""Per-sender token buckets and strikes: a peer that floods or keeps sending garbage is dropped."""

import logging
from dataclasses import dataclass

from .limits import (
    DROP_FOR_S,
    MAX_STRIKES,
    MAX_TRACKED_SENDERS,
    SENDER_BYTES_BURST,
    SENDER_BYTES_PER_S,
    SENDER_MESSAGE_BURST,
    SENDER_MESSAGES_PER_S,
    STRIKE_DECAY_PER_S,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Sender:
    at: float
    messages: float = SENDER_MESSAGE_BURST
    bytes: float = SENDER_BYTES_BURST
    strikes: float = 0.0
    dropped_until: float = 0.0


class Limiter:
    def __init__(self) -> None:
        self._senders: dict[bytes, _Sender] = {}

    def _get(self, sender: bytes, now: float) -> _Sender:
        s = self._senders.get(sender)
        if s is None:
            if len(self._senders) >= MAX_TRACKED_SENDERS:
                # Forget the sender seen longest ago that is not dropped; drops are kept to be enforced.
                idle = min(
                    (k for k, v in self._senders.items() if v.dropped_until <= now),
                    key=lambda k: self._senders[k].at,
                    default=None,
                )
                if idle is not None:
                    del self._senders[idle]
            s = self._senders[sender] = _Sender(at=now)
        dt = max(0.0, now - s.at)
        s.at = now
        s.messages = min(SENDER_MESSAGE_BURST, s.messages + dt * SENDER_MESSAGES_PER_S)
        s.bytes = min(SENDER_BYTES_BURST, s.bytes + dt * SENDER_BYTES_PER_S)
        s.strikes = max(0.0, s.strikes - dt * STRIKE_DECAY_PER_S)
        return s

    def admit(self, sender: bytes, size: int, now: float) -> bool:
        """Charge one message of `size` bytes; False if the sender is dropped or over its rate."""
        s = self._get(sender, now)
        if s.dropped_until > now:
            return False
        if s.messages < 1 or s.bytes < size:
            log.info(
                "runstate: sender %s over its rate limit; message of %d bytes dropped",
                sender.hex()[:16],
                size,
            )
            return False
        s.messages -= 1
        s.bytes -= size
        return True

    def strike(self, sender: bytes, now: float, reason: str) -> None:
        s = self._get(sender, now)
        s.strikes += 1
        log.info("runstate: rejected input from %s: %s", sender.hex()[:16], reason)
        if s.strikes >= MAX_STRIKES and s.dropped_until <= now:
            s.dropped_until = now + DROP_FOR_S
            log.warning(
                "runstate: sender %s sent %d bad messages; ignoring it for %.0f s",
                sender.hex()[:16],
                MAX_STRIKES,
                DROP_FOR_S,
            )

    def dropped(self, now: float) -> set[bytes]:
        return {k for k, v in self._senders.items() if v.dropped_until > now}
