"""Errors of the run-state layer: one small branch of the `ShoalError` tree."""

from shoal.errors import ShoalError


class RunStateError(ShoalError):
    """Something about the run's shared state went wrong."""


class Rejected(RunStateError):
    """Bytes from a peer (or from disk) failed a check and changed nothing.

    Raised inside the state machine only; `RunState.on_message` turns it into a log line and a strike
    against the sender, never into an exception for the caller.
    """


class NotAuthorized(RunStateError):
    """A local change was asked of a key that may not make it (for example `set_config` by a plain member)."""
