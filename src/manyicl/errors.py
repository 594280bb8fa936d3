"""The one exception type users see: a single line that says where the problem is and what to do."""


class ManyICLError(Exception):
    """Bad input or configuration. The CLI prints ``error: <message>`` and exits with status 2."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding like Ctrl-C (locks released, temporary files removed)."""


class Interrupted(ManyICLError):
    """A run stopped by SIGINT or SIGTERM, its finished work kept; the CLI exits with 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
