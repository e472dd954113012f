"""Errors whose message is the whole story: the CLI prints them without a traceback (unless --debug)."""


class UserError(RuntimeError):
    """A run cannot start or go on; the message names the cause and what to do."""
