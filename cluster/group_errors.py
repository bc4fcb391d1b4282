"""How a failed call on an actor group is reported: a :class:`GroupError` with its root cause in one line.

:class:`~cluster.groups.ActorGroup` and :class:`~cluster.placement.Placement` raise it for a
timeout, a dead actor, an exception raised in a method or a placement that is not granted.
The private helpers here turn what Ray raised (a ``RayTaskError`` wrapping the method's
exception, or a ``RayActorError`` with Ray's account of a process's end) into that one line.
"""

from __future__ import annotations

from typing import Any, Literal

from cluster.errors import UserError

FailureKind = Literal["timeout", "died", "error", "placement", "broken"]


class GroupError(UserError, RuntimeError):
    """A call on an actor group failed: timeout, dead actor, or an exception in the method.

    ``role``, ``method``, ``ranks`` and ``kind`` say what failed; ``cause`` is the root
    cause in one line (for an exception: its type and the first line of its message), and
    ``exception`` the exception the method raised on the failed rank, when Ray could rebuild it,
    so that a caller can tell an error of its own domain from a broken actor by its type.
    """

    def __init__(
        self,
        message: str,
        role: str,
        method: str,
        ranks: list[int],
        kind: FailureKind,
        cause: str = "",
        exception: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.role = role
        self.method = method
        self.ranks = ranks
        self.kind = kind
        self.cause = cause
        self.exception = exception

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable (e.g. raised inside a Ray task), which needs all constructor arguments
        return (type(self), (str(self), self.role, self.method, self.ranks, self.kind, self.cause, self.exception))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _exception_line(traceback_text: str) -> str:
    """The ``Type: message`` line that ends a formatted traceback (its first line when the message has several)."""
    lines = traceback_text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    for line in lines[frames[-1] + 1 :] if frames else []:
        if line.strip() and not line[0].isspace():
            return line.strip()
    return _first_line(lines[-1]) if lines else ""


def _innermost(error: BaseException) -> BaseException:
    """The exception a remote call raised, unwrapped from Ray's ``RayTaskError`` where Ray rebuilt it."""
    from ray.exceptions import RayTaskError

    while isinstance(error, RayTaskError) and isinstance(error.cause, BaseException) and error.cause is not error:
        error = error.cause
    return error


def _rebuilt(error: BaseException) -> BaseException | None:
    """``error`` itself unless it is Ray's wrapper of an exception that could not be rebuilt."""
    from ray.exceptions import RayTaskError

    return None if isinstance(error, RayTaskError) else error


def _root_cause(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception from :func:`_innermost`."""
    from ray.exceptions import RayTaskError

    if isinstance(error, RayTaskError):  # the cause could not be rebuilt: its traceback names it
        return _exception_line(str(error)) or type(error).__name__
    message = _first_line(str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _death_reason(error: BaseException) -> str:
    """One line on why an actor died: its constructor's exception, or Ray's account of the process's end."""
    from ray.exceptions import ActorDiedError, RayActorError

    text = str(error)
    if isinstance(error, RayActorError) and error.actor_init_failed:
        return f"its constructor raised {_exception_line(text) or 'an exception'}"
    details = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.startswith("\t") and line.strip() != ActorDiedError.BASE_ERROR_MSG
    ]
    reason = details[0] if details else (_first_line(text) or type(error).__name__)
    # Ray appends a paragraph of generic advice (OOM killer, ray stop, segfaults)
    return reason.split(" Some common causes include")[0]
