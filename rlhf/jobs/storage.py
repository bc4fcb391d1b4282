"""Where a run's outputs live: a local directory, or any URI pyarrow (and so Ray Train) can write.

``train.output_dir`` is either a path (local, or a shared filesystem mounted on every
node) or a URI such as ``s3://bucket/runs/sft`` or ``gs://bucket/runs/sft``; query
parameters pyarrow understands (``?endpoint_override=...&region=...``) are kept on every
location derived from it. Ray Train writes checkpoints there itself; the driver keeps
``metrics.jsonl``, TensorBoard logs, ``config.yaml`` and the curves in a local staging
directory while the run goes and uploads them at the end; rank 0 exports the final model
to a local temporary directory and uploads it to ``<output_dir>/final``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(location: str) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a filesystem path."""
    return bool(_SCHEME.match(location))


def redact(location: str) -> str:
    """``location`` with any ``user:secret@`` credentials removed, for messages and logs."""
    if not is_uri(location):
        return location
    parts = urlsplit(location)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class RunStorage:
    """The output location of one run, and the few operations a job needs on it."""

    def __init__(self, output_dir: str) -> None:
        self.remote = is_uri(output_dir) and not output_dir.startswith("file://")
        if self.remote:
            self.location = output_dir.rstrip("/") if "?" not in output_dir else output_dir
        else:
            path = output_dir.removeprefix("file://")
            self.location = str(Path(path).expanduser().resolve())

    def __str__(self) -> str:
        return redact(self.location)

    def child(self, *names: str) -> str:
        """The location of ``names`` under this run (a URI keeps its query parameters)."""
        if not self.remote:
            return str(Path(self.location, *names))
        parts = urlsplit(self.location)
        path = "/".join([parts.path.rstrip("/"), *names])
        return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))

    @property
    def staging(self) -> Path:
        """The driver-local directory holding metrics, logs and plots (the output_dir itself when local)."""
        if not self.remote:
            return Path(self.location)
        digest = hashlib.sha256(self.location.encode()).hexdigest()[:16]
        root = Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf"))
        return root / "runs" / digest

    def _fs(self, location: str) -> tuple[Any, str]:  # pyarrow ships no types
        import pyarrow.fs

        return pyarrow.fs.FileSystem.from_uri(location)

    def check_writable(self) -> None:
        """Create the location and write a probe there; OSError or ValueError when it cannot be written."""
        if not self.remote:
            local = Path(self.location)
            local.mkdir(parents=True, exist_ok=True)
            local_probe = local / f".write-test-{os.getpid()}"
            local_probe.write_text("ok")
            local_probe.unlink()
            return
        fs, path = self._fs(self.location)
        fs.create_dir(path, recursive=True)
        probe = f"{path}/.write-test-{os.getpid()}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"ok")
        fs.delete_file(probe)
        self.staging.mkdir(parents=True, exist_ok=True)

    def read_text(self, *names: str) -> str | None:
        """The text of the file ``names`` under this run, or None when it does not exist."""
        if not self.remote:
            target = Path(self.location, *names)
            return target.read_text() if target.is_file() else None
        fs, path = self._fs(self.child(*names))
        try:
            with fs.open_input_stream(path) as stream:
                return stream.read().decode()
        except (FileNotFoundError, OSError):
            return None

    def list_dirs(self, *names: str) -> list[str]:
        """Names of the sub-directories of ``names`` under this run (empty when it does not exist)."""
        if not self.remote:
            root = Path(self.location, *names)
            return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        import pyarrow.fs

        fs, path = self._fs(self.child(*names))
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        except OSError:
            return []
        return sorted(info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory)

    def upload(self, local: Path, *names: str) -> None:
        """Copy the local file or directory ``local`` to ``names`` under this run (a no-op in place)."""
        if not self.remote:
            target = Path(self.location, *names)
            if target.resolve() == local.resolve():
                return
            if local.is_dir():
                shutil.copytree(local, target, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, target)
            return
        import pyarrow.fs

        fs, path = self._fs(self.child(*names))
        fs.create_dir(path if local.is_dir() else path.rsplit("/", 1)[0], recursive=True)
        local_fs = pyarrow.fs.LocalFileSystem()
        pyarrow.fs.copy_files(str(local), path, source_filesystem=local_fs, destination_filesystem=fs)

    def download(self, local: Path, *names: str) -> bool:
        """Copy the file ``names`` under this run to ``local``; False when it does not exist."""
        text = self.read_text(*names)
        if text is None:
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text)
        return True

    def latest_checkpoint_step(self, name: str) -> int | None:
        """The optimizer step of the newest complete checkpoint of job ``name``, or None."""
        steps = []
        for directory in self.list_dirs("ray", name):
            if not directory.startswith("checkpoint_"):
                continue
            text = self.read_text("ray", name, directory, "progress.json")
            try:
                steps.append(int(json.loads(text or "")["step"]))
            except (ValueError, KeyError, TypeError):
                continue  # a checkpoint being written, or a foreign directory
        return max(steps) if steps else None


def export_to(storage: RunStorage, export: Callable[[Path], object], *names: str) -> None:
    """Run ``export(directory)`` into a local directory and place the result at ``names`` under ``storage``.

    Locally the export writes to a temporary directory beside the target that is renamed
    into place once complete (a crash mid-export leaves no partial ``final/``); for a URI
    it writes to a temporary directory that is uploaded and removed. Every rank may call
    it: only a rank whose ``export`` writes the directory places it.
    """
    if not storage.remote:
        from rlhf.jobs.rundir import atomic_dir

        with atomic_dir(Path(storage.child(*names))) as directory:
            export(directory)
        return
    with tempfile.TemporaryDirectory(prefix="rlhf-export-") as directory:
        if export(Path(directory)) is not None:
            storage.upload(Path(directory), *names)
