"""The one exception type the CLI turns into a single error line and exit code 2.

Library messages name the caller's parameters in backticks (```layer` 9 is out of range``), so a notebook user
reads the argument to change; the command line shows the same message with its flags (``--layer 9 ...``).
"""

from __future__ import annotations

import re

_PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


class HeadlensError(Exception):
    """Bad input or an unusable checkpoint: the message is shown to the user as one line."""


def as_flags(message: str, renames: dict[str, str] | None = None) -> str:
    """``message`` with each backticked parameter name written as its command-line flag (``num_heads`` ->
    ``--num-heads``); ``renames`` maps the parameters whose flag is spelled otherwise."""
    renames = renames or {}
    return _PARAM.sub(lambda m: renames.get(m.group(1), "--" + m.group(1).replace("_", "-")), message)
