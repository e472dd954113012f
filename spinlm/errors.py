"""Errors whose message is the whole story: the CLI prints them without a traceback (unless --debug)."""


class ConfigError(ValueError):
    """A configuration problem (or several): each line names the key, its value and the rule broken."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(f"- {p}" for p in self.problems))


class UserError(RuntimeError):
    """A run cannot start or go on; the message names the cause and what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (the CLI's handler): it unwinds like Ctrl-C, so trackers close, the lock
    is released and temporary files are removed on the way out."""
