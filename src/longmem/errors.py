"""The one exception type users see for bad input."""


class LongMemError(Exception):
    """Bad input or an incompatible file; its message is one clear line."""
