"""The root of Shoal's error hierarchy.

It lives in `kernels`, the one layer that imports nothing else of Shoal, so that every layer
(transport, dht, gossip, peer) can derive its own errors from it without breaking the rule that
dependencies point down.
"""


class ShoalError(Exception):
    """Base class of every error Shoal raises on purpose.

    Messages say what happened, to what, and what to do about it.
    """
