"""The one exception type users see: a single line that says where the problem is and what to do."""


class ManyICLError(Exception):
    """Bad input or configuration. The CLI prints ``error: <message>`` and exits with status 2."""
