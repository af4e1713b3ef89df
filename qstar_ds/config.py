"""Configuration of the Quiet-STaR algorithm (thoughts, talk, losses).

Defaults follow ../shared/QUIET_STAR.md (the authors' training run) except where a field's
docstring says otherwise. Every field is validated in `__post_init__`; an impossible value stops
with one line naming the key and the value.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the value."""


def _require(cond: bool, key: str, value, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


@dataclass
class ThoughtConfig:
    """How thoughts are sampled and scored, and how the loss is weighted."""

    thought_len: int = 8
    """t: sampled thought tokens per thought. <|startofthought|> and <|endofthought|> come on top,
    so a thought occupies thought_len + 2 positions."""
    n_thoughts: int = 2
    """r: thoughts sampled after each position (the reference's n_passes). The REINFORCE
    baseline is the mean over these r thoughts, so r = 1 gives zero rewards."""
    talk_len: int = 4
    """K: true tokens predicted after a thought (non-myopic, teacher-forced talk window)."""
    temperature: float = 1.0
    """Sampling temperature of thought tokens (> 0)."""
    top_k: int = 0
    """If > 0, sample thought tokens from the top_k most likely tokens only. The REINFORCE
    log-probability stays that of the untruncated tempered distribution."""
    reinforce_temperature: float | None = None
    """Temperature of the log-probabilities in the REINFORCE term. None = the sampling
    temperature (the policy that sampled the thoughts). The authors used 3 with sampling at 1."""
    clip_negative_rewards: bool = True
    """Drop thoughts whose reward (talk log-prob minus the mean over the r thoughts) is negative
    from the REINFORCE term (the reference default: more stable, slightly biased)."""
    w_talk: float = 0.5
    """Weight of L_talk, the mixed (post-thought) NLL of the K talk tokens, averaged per token."""
    w_base: float = 0.5
    """Weight of L_base, the ordinary next-token NLL of the base model."""
    beta: float = 1e6
    """Weight of L_reinforce. L_reinforce is averaged over valid thoughts *and* their tokens, the
    reference's normalisation, so its beta keeps its meaning."""
    thought_lr_mult: float = 100.0
    """Learning-rate multiplier of the two thought-token embeddings (their own parameter group).
    The reference stored them /100 and multiplied by 100 in forward: under Adam that is ~100x
    learning rate. A gradient multiplier would do almost nothing under Adam (scale-invariant per
    element) and would inflate the global grad norm used for clipping, so we use the LR."""
    attention_backend: str = "dense"
    """Attention backend for thought layouts (see qstar_ds/attention.py)."""

    def __post_init__(self) -> None:
        _require(isinstance(self.thought_len, int) and self.thought_len >= 1, "thought_len",
                 self.thought_len, "must be an integer >= 1")
        _require(isinstance(self.n_thoughts, int) and self.n_thoughts >= 1, "n_thoughts",
                 self.n_thoughts, "must be an integer >= 1")
        _require(isinstance(self.talk_len, int) and self.talk_len >= 1, "talk_len",
                 self.talk_len, "must be an integer >= 1")
        _require(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k,
                 "must be an integer >= 0 (0 = off)")
        _require(self.reinforce_temperature is None or self.reinforce_temperature > 0,
                 "reinforce_temperature", self.reinforce_temperature, "must be > 0 or None")
        for key in ("w_talk", "w_base", "beta", "thought_lr_mult"):
            _require(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        from .attention import BACKENDS
        _require(self.attention_backend in BACKENDS, "attention_backend", self.attention_backend,
                 f"must be one of {sorted(BACKENDS)}")

    @property
    def stream_len(self) -> int:
        """Tokens of one stream in the learn pass: <sot>, t thought tokens, <eot>, K-1 talk inputs."""
        return self.thought_len + self.talk_len + 1

    @property
    def policy_temperature(self) -> float:
        return self.temperature if self.reinforce_temperature is None else self.reinforce_temperature

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
