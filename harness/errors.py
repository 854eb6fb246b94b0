"""The one exception type for bad input: the CLI turns it into a one-line message and exit code 2."""


class HarnessError(Exception):
    """A user-facing error: bad input, missing file, refused configuration.

    The message must say what is wrong and, where possible, what to do instead, in one line.
    """
