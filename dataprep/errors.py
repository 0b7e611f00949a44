"""The one error of data building."""

from common.errors import UserError


class PrepareError(UserError):
    """A problem the user can fix (missing input, no package access); the message is one sentence."""
