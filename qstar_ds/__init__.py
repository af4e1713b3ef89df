"""qstar_ds: Quiet-STaR (Zelikman et al. 2024) as a distributed trainer.

The core (this package's config, layout, attention, model, rollout, learn, losses, reference
modules) is pure torch + transformers and imports without deepspeed.
"""
from .config import ConfigError, ThoughtConfig
from .learn import LearnOutput, learn_pass
from .model import EOT_TOKEN, SOT_TOKEN, QuietStarModel, load_tokenizer
from .rollout import Rollout, rollout

__all__ = ["ConfigError", "ThoughtConfig", "LearnOutput", "learn_pass", "EOT_TOKEN", "SOT_TOKEN",
           "QuietStarModel", "load_tokenizer", "Rollout", "rollout"]
__version__ = "0.1.0"
