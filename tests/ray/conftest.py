"""Ray Train settings for the job tests (the shared cluster fixture is in tests/conftest.py)."""

from __future__ import annotations

import os

import pytest

# Ray Train's controller registers reported checkpoints (and notices dead workers) at this
# interval, 2 s by default. The tiny models here train a step in ~0.1 s, so the tests poll
# 10x faster to keep "a checkpoint is durable within a step of being written" true, as it
# is with real step times.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="module")
def s3_bucket():
    """A local S3 server (moto, on 127.0.0.1) holding the bucket ``runs``: pyarrow's query options that reach it,
    and a pyarrow filesystem on it. moto takes any credentials."""
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://key:secret@runs/?{query}&allow_bucket_creation=true")
    fs.create_dir("runs")
    yield query, fs
    server.stop()
