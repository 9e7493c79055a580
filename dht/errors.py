"""The DHT's errors: one branch of Shoal's hierarchy."""

from shoal.errors import ShoalError


class DHTError(ShoalError):
    """Something in the DHT layer failed."""


class InvalidMessage(DHTError):
    """A peer sent bytes that are not a well-formed, bounded DHT message; the message is dropped."""


class InvalidRecord(DHTError):
    """A record is malformed, oversized, expired or wrongly signed; it is refused, never stored."""


class QuotaExceeded(DHTError):
    """Storing a record would give one peer or one /24 more than its share of the store."""


class RPCFailed(DHTError):
    """A remote peer did not answer a DHT request in time, or answered with garbage."""
