"""What keeps a run directory trustworthy: files written whole or not at all, one run at a time, no secrets.

**Atomic writes.** Every file a resume or a refusal reads (a PPO checkpoint's ``state.json``,
``summary.json``, ``config.yaml``, a generated dataset, ``final/``) is written under a
temporary name in the same directory and renamed into place (:func:`write_atomic`,
:func:`atomic_dir`): a crash leaves the previous version or the new one, never a part.

**One run per directory.** :func:`lock_run_directory` holds ``<dir>/.run.lock``: an
``flock`` (the kernel releases it when the process ends, however it ends) over a file that
names the owner (host, pid, start time, command). A second run on the directory is refused
naming the owner while it runs; a lock left by a process that is gone is taken over with a
warning. The lock guards the drivers of one machine (and of several on a shared filesystem
whose ``flock`` reaches every client, as NFS v4's does); a run directory that is a storage
URI is locked through its local staging directory, which does not guard two drivers on two
machines.

**Secrets.** :func:`scrub` masks the credentials of every URL in a text: the user and
password (``s3://KEY:SECRET@bucket``, ``https://user:pw@host``) and the values of query
parameters that name a key, secret, token, signature, password or credential
(``?key=...``, ``X-Amz-Signature=...``, ``sig=...``). What a run writes (``config.yaml``,
``manifest.json``, provenance columns, the lock's command line) goes through it; the run
itself uses the real values, so nothing that resumes a run reads them back.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from cluster.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
MASK = "REDACTED"

# ---- atomic writes ---------------------------------------------------------------------


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file object on a temporary file next to ``path`` that replaces ``path`` when the block ends without error.

    A reader (or a crash) sees the old file or the new one, never a part; on an error the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 applies the umask, as a plain open() would (mkstemp would make it owner-only)
    handle = os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), mode)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the name points at it
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all (:func:`atomic_open`); the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)
    return Path(path)


def write_json(path: str | Path, value: Any, **dumps: Any) -> Path:
    """``json.dumps(value, **dumps)`` written whole or not at all; the path."""
    return write_atomic(path, json.dumps(value, **dumps))


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """A temporary directory path next to ``target`` that becomes ``target`` when the block ends without error.

    The block writes the directory (it need not exist before: when the block did not create
    it, nothing changes). What was at ``target`` stays whole until the new directory is
    complete, and is then replaced; on an error the partial directory is removed.
    """
    target = Path(target)
    staging = target.with_name(f".{target.name}.partial-{secrets.token_hex(4)}")
    try:
        yield staging
        if staging.exists():
            replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(source: Path, target: Path) -> None:
    """Move the complete directory ``source`` to ``target`` (same filesystem), replacing what is there."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.rename(target, old)
    os.rename(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- what a run deploys ------------------------------------------------------------------


def run_app_name(configured: str, prefix: str) -> str:
    """The Serve application a run deploys: ``configured`` when the user named one (a running application of that
    name is shared), else ``<prefix>-<8 hex digits>``, a name of this run alone."""
    return configured or f"{prefix}-{secrets.token_hex(4)}"


# ---- secrets ---------------------------------------------------------------------------

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_SECRET_PARAMETER = re.compile(r"key|secret|token|passw|pwd|sig|credential|auth|session", re.IGNORECASE)


def scrub_url(url: str) -> str:
    """``url`` with its user/password and the values of secret-looking query parameters replaced by ``REDACTED``."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable: keep only the scheme
        return f"{url.split('://', 1)[0]}://{MASK}"
    netloc = f"{MASK}@{parts.netloc.rsplit('@', 1)[1]}" if "@" in parts.netloc else parts.netloc
    items = []
    for item in parts.query.split("&") if parts.query else []:
        name, equals, _ = item.partition("=")
        items.append(f"{name}={MASK}" if equals and _SECRET_PARAMETER.search(unquote(name)) else item)
    return urlunsplit((parts.scheme, netloc, parts.path, "&".join(items), parts.fragment))


def scrub(value: Any) -> Any:
    """``value`` with every URL in it scrubbed (:func:`scrub_url`): a string, or dicts, lists and tuples of them."""
    if isinstance(value, str):
        return _URL.sub(lambda match: scrub_url(match.group(0)), value) if "://" in value else value
    if isinstance(value, dict):
        return {key: scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(scrub(item) for item in value)
    return value


# ---- one run per directory ---------------------------------------------------------------


class RunDirectoryInUse(UserError, RuntimeError):
    """Another run holds the directory's lock; the message names it."""


class _Lock:
    """The open, flock-ed lock file of a directory this process runs in."""

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self.descriptor = descriptor


_held: dict[Path, _Lock] = {}
_held_guard = threading.Lock()


def _owner() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": scrub(" ".join(sys.argv)),
    }


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "a process that is starting (its details are not written yet)"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}: {owner.get('command')}"


def _read_owner(descriptor: int) -> dict[str, Any] | None:
    text = os.pread(descriptor, 1 << 16, 0).decode(errors="replace").strip()
    try:
        return json.loads(text) if text else None
    except ValueError:
        return {"command": text[:200]}  # a foreign or torn lock file: shown as it is


def lock_run_directory(directory: str | Path) -> Path:
    """Take ``directory``'s run lock for this process (again: a no-op); the lock file's path.

    Raises :class:`RunDirectoryInUse` naming the owner when another live process holds it, or
    when a lock left on another host cannot be checked from here. A lock whose process is gone
    is taken over with a warning. :func:`unlock_run_directory` (or the end of the process)
    releases it.
    """
    import fcntl

    directory = Path(directory).resolve()
    with _held_guard:
        if directory in _held:
            return _held[directory].path
        path = directory / LOCK_FILE
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirectoryInUse(
                    f"{directory} is in use by another run ({_describe(_read_owner(descriptor))}); one run per "
                    f"output directory: wait for it to end, stop it, or choose another output_dir (lock file {path})"
                ) from None
            previous = _read_owner(descriptor)
            if previous and previous.get("host", socket.gethostname()) != socket.gethostname():
                raise RunDirectoryInUse(
                    f"{directory} was locked by a run on another host ({_describe(previous)}), which this machine "
                    f"cannot check; if that run is gone, delete {path}"
                )
            if previous and previous.get("pid") != os.getpid():
                log.warning("%s: taking over the lock of a run that is gone (%s)", directory, _describe(previous))
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(_owner()).encode(), 0)
            os.fsync(descriptor)
        except BaseException:
            os.close(descriptor)  # closing drops the flock too
            raise
        _held[directory] = _Lock(path, descriptor)
        return path


def unlock_run_directory(directory: str | Path) -> None:
    """Release ``directory``'s run lock if this process holds it (the file stays, emptied)."""
    import fcntl

    with _held_guard:
        lock = _held.pop(Path(directory).resolve(), None)
        if lock is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(lock.descriptor, 0)  # emptied: the next run finds no owner to warn about
        fcntl.flock(lock.descriptor, fcntl.LOCK_UN)
        os.close(lock.descriptor)


@atexit.register
def _unlock_all() -> None:
    for directory in list(_held):
        unlock_run_directory(directory)
