"""The one error of data building."""


class PrepareError(Exception):
    """A problem the user can fix (missing input, no package access); the message is one sentence."""
