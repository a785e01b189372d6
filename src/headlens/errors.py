"""The one exception type the CLI turns into a single error line and exit code 2."""


class HeadlensError(Exception):
    """Bad input or an unusable checkpoint: the message is shown to the user as one line."""
