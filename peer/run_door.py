"""Whether this peer's run is open or closed, and what a joiner checks at the door.

An open run (the default) takes any peer that signs its own membership entry. A closed run takes peers
whose entry carries a join token from the run's creator (gossip/admission.py): the creator starts it with
`--closed`, the others join with `--token`. Each side learns the mode from what it was started with,
never from what others say; at join, what the bootstrap peers say only turns a silent failure (a peer
nobody admits) into one clear error.
"""

from __future__ import annotations

import time
from typing import Any

from shoal.errors import ShoalError
from shoal.gossip.admission import Admission, JoinToken, from_text


class DoorError(ShoalError):
    """This peer cannot enter the run: no token for a closed run, or a token that does not admit it."""


class RunDoor:
    def __init__(
        self, run: str, peer_id: str, token_text: str | None, closed: bool, creator: str | None,
        work_bits: int = 0,
    ):  # fmt: skip
        self.run = run
        self.work_bits = work_bits
        self.peer_id = peer_id
        self.token: JoinToken | None = from_text(token_text) if token_text else None
        if self.token is not None:
            why = self.token.check(run, self.token.creator, peer_id, time.time())
            if why is not None:
                raise DoorError(
                    f"cannot join run {run!r} with this token: {why}; ask the run's creator for one with "
                    f"`peer token --run {run} --for {peer_id}`"
                )
            creator = self.token.creator
        self.creator = creator  # known from the start by the creator itself and by token holders
        closed = closed or self.token is not None
        self.admission = Admission(run, creator) if closed and creator is not None else None

    @property
    def mode(self) -> str:
        """What members tell joiners: "token" for a closed run, "open" otherwise."""
        return "token" if self.admission is not None else "open"

    @property
    def packed_token(self) -> bytes | None:
        return self.token.packed() if self.token is not None else None

    def check_run(self, reply: dict[str, Any], address: str) -> None:
        """At join: a clear error if the run at `address` will not take us."""
        said, creator, work_bits = reply.get("admission"), reply.get("creator"), reply.get("work_bits")
        if isinstance(work_bits, int) and work_bits != self.work_bits:
            raise DoorError(
                f"run {self.run!r} asks each member for {work_bits} bits of identity work, this peer for "
                f"{self.work_bits}; join with --identity-bits {work_bits}"
            )
        if said == "token" and self.token is None:
            raise DoorError(
                f"run {self.run!r} is closed: it takes only peers with a join token from its creator. Ask "
                f"them to run `peer token --run {self.run} --for {self.peer_id}` and pass what it prints "
                "with --token"
            )
        if self.token is not None and isinstance(creator, str) and creator != self.token.creator:
            raise DoorError(
                f"the join token was issued by {self.token.creator}, but {address} says run {self.run!r} "
                f"was created by {creator}; ask that run's creator for a token"
            )
