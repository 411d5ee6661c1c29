"""maxgpt: a JAX pretraining stack for GPT-family language models."""

from maxgpt.config import Config, ConfigError, load_config
from maxgpt.model import Transformer

__all__ = ["Config", "ConfigError", "Transformer", "load_config"]
__version__ = "0.1.0"
