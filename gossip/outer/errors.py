"""Errors of the outer methods: one branch of the `ShoalError` tree, importable without torch."""

from shoal.errors import ShoalError


class OuterError(ShoalError):
    """An outer step was given tensors it cannot combine (missing names, wrong shapes, bad values)."""


class OuterMessageError(OuterError):
    """A received outer message is malformed, from another method or version, or does not fit the model."""
