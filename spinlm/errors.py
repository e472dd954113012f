"""Errors whose message is the whole story: the CLI prints them without a traceback (unless --debug)."""


class UserError(RuntimeError):
    """A run cannot start or go on; the message names the cause and what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (the CLI's handler): it unwinds like Ctrl-C, so trackers close, the lock
    is released and temporary files are removed on the way out."""
