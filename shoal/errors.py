"""The root of Shoal's error hierarchy, below every layer so that each can derive its own errors from it."""


class ShoalError(Exception):
    """Base class of every error Shoal raises on purpose.

    Messages say what happened, to what, and what to do about it.
    """
