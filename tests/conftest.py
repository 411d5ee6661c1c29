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
