"""The mark of the project's user-facing errors.

An error of a class that derives from :class:`UserError` is bad input (a config key, a data row,
a model, a request) or a failure outside the project's code (a dead actor, a full disk, an
endpoint that does not answer), and its message says what and where: the ``rlhf`` command prints
it as one line and exits 2. Any other exception is a bug of the project's own and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors whose message is all a user needs (see the module's docstring)."""
