"""The base of every error a user can cause or fix, for the whole host side.

It lives apart because every host part imports it: the runner imports the sandbox and the data
builder (never the other way round), and neither of those leans on the other. It
is not in contract.py, which belongs to the trusted harness: every base image carries
that file and is named by its hash, so a host-only class there would rebuild them all.
"""


class UserError(Exception):
    """A problem the user can cause or fix; the message is one sentence that says what to do."""


class MachineError(UserError):
    """A resource of the machine stopped working under a command (the ledger file, the disk, the sandbox):
    no experiment caused it, so a night stops until the user fixes it."""
