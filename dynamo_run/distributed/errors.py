"""The error type of the distributed layer."""


class NatsError(Exception):
    """A NATS problem the user can act on; its message is one line, without a traceback."""
