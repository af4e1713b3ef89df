"""QuietStarModel: any HF causal LM plus two learned thought tokens and a mixing head.

Composition, not a fork: the HF model is held as `self.base` and run unmodified except that its
attention implementation is "qstar" (attention.py), which behaves like `sdpa` for plain calls and
dispatches our layouts to an attention backend.

Thought tokens. `<|startofthought|>`/`<|endofthought|>` are added to the tokenizer and to the
embedding matrix (and to an untied output head), initialised to the embedding of the first token
of "---". Their *trainable* values live in a separate (2, H) parameter `thought_embeds` (in the
small module `thought_embedding`; model.thought_init chooses another text), which
replaces the two rows on input: a separate parameter can get its own learning rate (ZeRO-3
partitions whole parameters, so two rows of the embedding matrix could not), see
ThoughtConfig.thought_lr_mult. `save_pretrained` writes them back into the embedding rows too,
so the exported HF directory is self-consistent.

The two markers are never predicted: their output logits are masked to -inf in every
distribution (thought sampling, talk, base NLL), so log-probs over the rest of the vocabulary are
exactly the base model's.

Mixing rule (model.mix_rule). "hidden", the paper's: the mixing head's w mixes the two hidden
states, i.e. (lm_head being linear) the two logit vectors; w is unbounded and starts at 0.
"prob": w = sigmoid(head + logit(mix_init)) mixes the two next-token distributions,
p = (1 - w) p_base + w p_thought, so a wrong thought costs at most -log(1 - w) nats where a
confident wrong thought under "hidden" costs up to w times its own NLL.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import attention
from .layout import Layout
from .logprobs import at_least_fp32, chunked_token_logprobs, token_logprobs

SOT_TOKEN = "<|startofthought|>"
EOT_TOKEN = "<|endofthought|>"
INIT_TEXT = "---"
META_FILE = "quiet_star.json"
WEIGHTS_FILE = "quiet_star.safetensors"
FORMAT_VERSION = 1
MIX_RULES = ("hidden", "prob")


def gathered(params, modifier_rank: int | None = 0):
    """Context in which ZeRO-3-partitioned `params` are whole (modifications on `modifier_rank`
    are broadcast on exit); a no-op for ordinary parameters. Writing through `.data` on a
    partitioned parameter silently does nothing, so every initialisation goes through here."""
    params = [p for p in params if p is not None]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # only reached when deepspeed created these parameters
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


class ChunkedLogprobHead(nn.Module):
    """Log-probs of targets under the output head, computed in chunks (logprobs.chunked_token_logprobs).
    A module of its own so that, under ZeRO-3, the output weight it reads directly can be
    registered as its external parameter and gathered for its forward."""

    def __init__(self, lm_head: nn.Linear, masked_ids: list[int]):
        super().__init__()
        self._lm_head = [lm_head]          # a list: not registered twice as a submodule
        self.register_buffer("masked", torch.tensor(masked_ids, dtype=torch.long), persistent=False)

    def forward(self, h: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
        head = self._lm_head[0]
        return chunked_token_logprobs(h, head.weight, head.bias, targets, self.masked.to(h.device),
                                      temperature, chunk)


class MixingHead(nn.Module):
    """w = MLP([h_base; h_thought]): 2H -> H -> H -> 1 with ReLU; unbounded (no sigmoid), as the
    reference. The last layer starts at zero, so w = 0 and the model equals the base LM at step 0."""

    def __init__(self, hidden: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.net = nn.Sequential(nn.Linear(2 * hidden, hidden, **kw), nn.ReLU(),
                                 nn.Linear(hidden, hidden, **kw), nn.ReLU(),
                                 nn.Linear(hidden, 1, **kw))
        last = self.net[-1]
        with gathered([last.weight, last.bias]), torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()

    def forward(self, h_base: torch.Tensor, h_thought: torch.Tensor) -> torch.Tensor:
        """(..., H), (..., H) -> (...,) mixing weight."""
        return self.net(torch.cat([h_base, h_thought], dim=-1)).squeeze(-1)


class ThoughtEmbedding(nn.Module):
    """The trainable vectors of <sot> and <eot>, swapped in for their embedding rows. A module
    (not a bare parameter) so that ZeRO-3's forward hooks gather it like any other weight."""

    def __init__(self, init: torch.Tensor, sot_id: int, eot_id: int):
        super().__init__()
        self.weight = nn.Parameter(init)
        self.sot_id, self.eot_id = sot_id, eot_id

    def forward(self, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """(..., S) ids, (..., S, H) embeddings -> embeddings with the two marker rows replaced."""
        te = self.weight.to(embeds.dtype)
        e = torch.where((ids == self.sot_id)[..., None], te[0], embeds)
        return torch.where((ids == self.eot_id)[..., None], te[1], e)


def shape_of(p: torch.Tensor) -> torch.Size:
    """A parameter's full shape, also when ZeRO-3 has partitioned it away (ds_shape)."""
    return getattr(p, "ds_shape", p.shape)


@dataclass
class ThoughtTokens:
    sot_id: int
    eot_id: int


def add_thought_tokens(tokenizer) -> ThoughtTokens:
    """Add the two markers to `tokenizer` (no-op if present) and return their ids."""
    missing = [t for t in (SOT_TOKEN, EOT_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids([SOT_TOKEN, EOT_TOKEN])
    return ThoughtTokens(int(ids[0]), int(ids[1]))


def filler_token_id(tokenizer, text: str) -> int:
    """The token that fills every thought slot in filler mode (thought.mode=filler): the first
    token of `text`."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        from .config import ConfigError
        raise ConfigError(f"thought.filler={text!r}: encodes to no tokens")
    return ids[0]


def _check_supported(base: nn.Module) -> None:
    cfg = base.config
    name = type(base).__name__
    if not isinstance(base.get_output_embeddings(), nn.Linear):
        raise ValueError(f"{name}: QuietStarModel needs a linear output head (lm_head)")
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, key, None) not in (None, 1.0):
            raise ValueError(f"{name}: config.{key}={getattr(cfg, key)!r} is not supported "
                             "(mixing assumes logits = lm_head(hidden))")
    if not base._can_set_attn_implementation():
        raise ValueError(f"{name} does not dispatch attention through transformers' AttentionInterface")


class QuietStarModel(nn.Module):
    def __init__(self, base: nn.Module, tokens: ThoughtTokens, thought_embeds: torch.Tensor | None = None,
                 mix_rule: str = "hidden", mix_init: float = 0.01):
        """Wrap `base` whose embedding matrix already has rows for `tokens`. `thought_embeds`
        (2, H) defaults to those rows (how a loaded model gets its trained values back).
        `mix_rule`, `mix_init`: see the module docstring (ModelConfig.mix_rule)."""
        super().__init__()
        self.set_mix_rule(mix_rule, mix_init)
        _check_supported(base)
        base.set_attn_implementation(attention.register())
        self.base = base
        self.sot_id, self.eot_id = tokens.sot_id, tokens.eot_id
        emb = base.get_input_embeddings().weight
        hidden = base.config.hidden_size
        with gathered([emb]):
            rows = emb.shape[0]
            if max(self.sot_id, self.eot_id) >= rows:
                raise ValueError(f"thought token ids {self.sot_id}, {self.eot_id} are outside the "
                                 f"embedding matrix ({rows} rows)")
            init = emb[[self.sot_id, self.eot_id]].detach().clone() if thought_embeds is None else thought_embeds
        self.thought_embedding = ThoughtEmbedding(init.to(dtype=emb.dtype, device=emb.device),
                                                  self.sot_id, self.eot_id)
        self.mixing_head = MixingHead(hidden, dtype=emb.dtype, device=emb.device)
        self.chunked_logprobs = ChunkedLogprobHead(base.get_output_embeddings(), [self.sot_id, self.eot_id])
        # transformers >= 5.24 calls the KV cache `cache`; earlier 5.x `past_key_values`
        params = inspect.signature(base.base_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: nn.Module, tokenizer, init_text: str = INIT_TEXT, **mix) -> "QuietStarModel":
        """Add the thought tokens to `tokenizer` and `base` (embedding rows = first token of
        `init_text`, model.thought_init) and wrap. Mutates both, like `tokenizer.add_tokens` +
        `resize_token_embeddings`."""
        dash = tokenizer.encode(init_text, add_special_tokens=False)
        if not dash:
            from .config import ConfigError
            raise ConfigError(f"model.thought_init={init_text!r}: the tokenizer encodes it to no tokens")
        tokens = add_thought_tokens(tokenizer)
        need = max(tokens.sot_id, tokens.eot_id) + 1
        if need > shape_of(base.get_input_embeddings().weight)[0]:
            base.resize_token_embeddings(need, mean_resizing=False)
        ids = [tokens.sot_id, tokens.eot_id]
        tables = [base.get_input_embeddings().weight]
        out = base.get_output_embeddings().weight
        if out is not tables[0]:
            tables.append(out)  # untied head: its marker rows are masked anyway; keep them sane
        with gathered(tables), torch.no_grad():
            for w in tables:
                w[ids] = w[dash[0]].expand(len(ids), -1)
        return cls(base, tokens, **mix)

    @classmethod
    def from_pretrained(cls, path: str, **hf_kwargs) -> "QuietStarModel":
        """Load a directory written by `save_pretrained`. Nothing is re-initialised."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        meta_path = os.path.join(path, META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: {path} is not a QuietStarModel directory")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        base = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **hf_kwargs)   # never a pickle
        state = load_file(os.path.join(path, WEIGHTS_FILE))
        model = cls(base, ThoughtTokens(meta["sot_id"], meta["eot_id"]), state.pop("thought_embeds"),
                    meta.get("mix_rule", "hidden"), meta.get("mix_init", 0.01))
        model.mixing_head.load_state_dict({k.removeprefix("mixing_head."): v for k, v in state.items()})
        return model

    def save_pretrained(self, path: str, tokenizer=None, extra: dict | None = None) -> None:
        """HF directory (base model, safetensors) + quiet_star.json + quiet_star.safetensors.
        `extra` (e.g. the training thought_len) is recorded in quiet_star.json."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        emb = self.base.get_input_embeddings().weight
        with gathered([emb, self.thought_embeds]), torch.no_grad():
            emb[[self.sot_id, self.eot_id]] = self.thought_embeds.detach().to(emb.dtype)
        self.base.save_pretrained(path)
        if tokenizer is not None:
            check_tokenizer(tokenizer, self.tokens)
            tokenizer.save_pretrained(path)
        state = {"thought_embeds": self.thought_embeds.detach().cpu().contiguous()}
        state.update({f"mixing_head.{k}": v.detach().cpu().contiguous()
                      for k, v in self.mixing_head.state_dict().items()})
        save_file(state, os.path.join(path, WEIGHTS_FILE))
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump({"format": FORMAT_VERSION, "sot_token": SOT_TOKEN, "eot_token": EOT_TOKEN,
                       "sot_id": self.sot_id, "eot_id": self.eot_id,
                       "hidden_size": self.base.config.hidden_size, "mix_rule": self.mix_rule,
                       "mix_init": self.mix_init, **(extra or {})}, f, indent=2)

    def forward(self, *, fn, **kwargs) -> dict:
        """Entry point for a wrapping engine (DeepSpeed): runs the pass `fn(self, **kwargs)`
        (rollout.rollout, learn.learn_pass, learn.base_pass) and returns its result's fields as a
        plain dict, the output type whose tensors DeepSpeed's ZeRO-3 hooks can find (rebuild
        with Rollout(**d) / LearnOutput(**d)). The passes are handed in, not imported: they
        build on this module."""
        return dict(vars(fn(self, **kwargs)))

    # ---- pieces used by rollout / learn -------------------------------------------------
    @property
    def tokens(self) -> ThoughtTokens:
        return ThoughtTokens(self.sot_id, self.eot_id)

    @property
    def thought_embeds(self) -> nn.Parameter:
        """(2, H) learned vectors of <sot>, <eot>."""
        return self.thought_embedding.weight

    @property
    def lm_head(self) -> nn.Linear:
        return self.base.get_output_embeddings()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., S) ids -> (..., S, H) input embeddings with the learned marker vectors."""
        return self.thought_embedding(ids, self.base.get_input_embeddings()(ids))

    def hidden(self, ids: torch.Tensor, layout: Layout, cache=None) -> torch.Tensor:
        """(B, Sq) ids laid out as `layout` -> (B, Sq, H) final (post-norm) hidden states.
        With `cache` (a transformers Cache), keys of earlier calls are reused and extended."""
        pos = layout.position_ids()
        window = getattr(self.base.config, "sliding_window", None)
        if window is not None and getattr(self.base.config, "use_sliding_window", True) \
                and int(pos.max()) >= window:
            raise ValueError(f"sliding_window={window} is shorter than the thought layout "
                             f"(position {int(pos.max())}); qstar layouts assume full attention")
        out = self.base.base_model(
            inputs_embeds=self.embed(ids), position_ids=pos,
            attention_mask=attention.placeholder_mask(ids.shape[0], ids.device),
            use_cache=cache is not None, qstar_layout=layout, **{self._cache_kwarg: cache})
        return out.last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) logits with the two markers masked out (never predicted)."""
        z = self.lm_head(h)                     # in place is safe: mm's backward never reads its output
        idx = torch.tensor([self.sot_id, self.eot_id], device=z.device)
        return z.index_fill_(-1, idx, float("-inf"))

    def token_logprobs(self, h: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       chunk: int = 0) -> torch.Tensor:
        """(..., H), (...) -> (...) log-probs of `targets` (markers masked), in row chunks of
        `chunk` with recomputation in backward when chunk > 0."""
        if chunk > 0:
            return self.chunked_logprobs(h, targets, temperature, chunk)
        return token_logprobs(self.logits(h), targets, temperature)

    def set_mix_rule(self, rule: str, init: float = 0.01) -> None:
        if rule not in MIX_RULES:
            raise ValueError(f"mix_rule={rule!r}: must be one of {', '.join(MIX_RULES)}")
        if not 0.0 < init < 1.0:
            raise ValueError(f"mix_init={init!r}: must be in (0, 1)")
        self.mix_rule, self.mix_init = rule, float(init)

    @property
    def mix_spec(self) -> str:
        """The rule as one value for checkpoint signatures: "hidden" or "prob:<mix_init>"."""
        return "hidden" if self.mix_rule == "hidden" else f"prob:{self.mix_init!r}"

    def mix(self, h_base: torch.Tensor, h_thought: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mixed hidden (..., H), w (...,)), the "hidden" rule: h = (1-w) h_base + w h_thought;
        since lm_head is linear this equals mixing the two logit vectors, at the cost of one
        projection."""
        if self.mix_rule != "hidden":
            raise ValueError(f"mix() is the hidden-state rule; this model mixes by {self.mix_rule!r} "
                             "(use mixed_token_logprobs / mixed_logits)")
        w = self.mixing_head(h_base, h_thought)
        return (1 - w)[..., None] * h_base + w[..., None] * h_thought, w

    def _prob_weight(self, h_base: torch.Tensor, h_thought: torch.Tensor, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (log(1 - w), log w, w), each (...,), for the "prob" rule."""
        s = self.mixing_head(h_base, h_thought).to(dtype) + math.log(self.mix_init / (1 - self.mix_init))
        return nn.functional.logsigmoid(-s), nn.functional.logsigmoid(s), torch.sigmoid(s)

    def mixed_token_logprobs(self, h_base: torch.Tensor, h_thought: torch.Tensor, targets: torch.Tensor,
                             chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., H), (..., H), (...) -> (log-probs of `targets` under the mixed prediction (...),
        mixing weights w (...))."""
        if self.mix_rule == "hidden":
            mixed, w = self.mix(h_base, h_thought)
            return self.token_logprobs(mixed, targets, 1.0, chunk), w
        lb = self.token_logprobs(h_base, targets, 1.0, chunk)
        lt = self.token_logprobs(h_thought, targets, 1.0, chunk)
        log1m, logw, w = self._prob_weight(h_base, h_thought, lb.dtype)
        return torch.logaddexp(log1m + lb, logw + lt), w

    def mixed_logits(self, h_base: torch.Tensor, h_thought: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., H), (..., H) -> (logits (..., V) in at least float32, w (...)): the whole mixed
        next-token distribution (generation, answer scoring); under "prob" the logits are the
        mixture's log-probs. Markers stay -inf."""
        if self.mix_rule == "hidden":
            mixed, w = self.mix(h_base, h_thought)
            return at_least_fp32(self.logits(mixed)), w
        lb = torch.log_softmax(at_least_fp32(self.logits(h_base)), dim=-1)
        lt = torch.log_softmax(at_least_fp32(self.logits(h_thought)), dim=-1)
        log1m, logw, w = self._prob_weight(h_base, h_thought, lb.dtype)
        return torch.logaddexp(log1m[..., None] + lb, logw[..., None] + lt), w

    def parameter_groups(self, lr: float, weight_decay: float, thought_lr_mult: float,
                         mixing_lr_mult: float = 1.0) -> list[dict]:
        """Optimizer groups: thought embeddings at lr * thought_lr_mult (no decay); the mixing
        head at lr * mixing_lr_mult; norms and biases without weight decay; the rest with it."""
        mixing = {id(p) for p in self.mixing_head.parameters()}
        groups: dict[str, list] = {"decay": [], "no_decay": [], "mixing_decay": [], "mixing_no_decay": []}
        for p in self.parameters():
            if not p.requires_grad or p is self.thought_embeds:
                continue
            name = ("mixing_" if id(p) in mixing else "") + ("no_decay" if len(shape_of(p)) < 2 else "decay")
            groups[name].append(p)
        return [
            {"params": groups["decay"], "lr": lr, "weight_decay": weight_decay, "name": "decay"},
            {"params": groups["no_decay"], "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
            {"params": groups["mixing_decay"], "lr": lr * mixing_lr_mult, "weight_decay": weight_decay,
             "name": "mixing_decay"},
            {"params": groups["mixing_no_decay"], "lr": lr * mixing_lr_mult, "weight_decay": 0.0,
             "name": "mixing_no_decay"},
            {"params": [self.thought_embeds], "lr": lr * thought_lr_mult, "weight_decay": 0.0,
             "name": "thought_embeds"},
        ]


MARKER_KEY = "thought_embeds"


def read_marker_file(path: str) -> torch.Tensor:
    """The (2, H) marker vectors (<sot>, <eot>) of a .safetensors file (model.thought_init_file):
    tensor data only, no code runs. Raises ConfigError naming the file and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .config import ConfigError
    if not os.path.isfile(path):
        raise ConfigError(f"model.thought_init_file={path!r}: no such file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"model.thought_init_file={path!r}: not a readable .safetensors file ({e})") from None
    w = tensors.get(MARKER_KEY)
    if w is None or w.dim() != 2 or w.shape[0] != 2 or not w.is_floating_point():
        what = "no such tensor" if w is None else f"shape {tuple(w.shape)}, {w.dtype}"
        raise ConfigError(f"model.thought_init_file={path!r}: needs a floating (2, hidden) tensor "
                          f"{MARKER_KEY!r} (<sot>, <eot>); found {what} (tensors: {sorted(tensors)})")
    if not torch.isfinite(w).all():
        raise ConfigError(f"model.thought_init_file={path!r}: {MARKER_KEY!r} has non-finite values")
    return w


def set_thought_embeds(model: "QuietStarModel", w: torch.Tensor, path: str) -> None:
    """Start both markers from `w` (2, H) (read_marker_file), also when ZeRO-3 has partitioned them."""
    from .config import ConfigError
    hidden = model.base.config.hidden_size
    if tuple(w.shape) != (2, hidden):
        raise ConfigError(f"model.thought_init_file={path!r}: {MARKER_KEY!r} is {tuple(w.shape)}, "
                          f"this model needs (2, {hidden})")
    p = model.thought_embeds
    with gathered([p]), torch.no_grad():
        p.copy_(w.to(dtype=p.dtype, device=p.device))


def randomize_mixing_head(model: QuietStarModel, std: float, seed: int) -> None:
    """N(0, std) mixing-head weights, identical on every rank (before the optimizer exists)."""
    params = list(model.mixing_head.parameters())
    g = torch.Generator().manual_seed(seed + 12345)
    with gathered(params), torch.no_grad():
        for p in params:
            p.copy_((torch.randn(tuple(p.shape), generator=g) * std).to(p.dtype))


def check_tokenizer(tokenizer, tokens: ThoughtTokens) -> None:
    """Raise if `tokenizer` does not map the markers to the model's ids."""
    got = tokenizer.convert_tokens_to_ids([SOT_TOKEN, EOT_TOKEN])
    if list(got) != [tokens.sot_id, tokens.eot_id]:
        raise ValueError(f"tokenizer maps {SOT_TOKEN}/{EOT_TOKEN} to {list(got)}, the model expects "
                         f"{[tokens.sot_id, tokens.eot_id]}")


def load_tokenizer(path: str, tokens: ThoughtTokens | None = None, **kwargs):
    """Load a tokenizer saved with a QuietStarModel and check its marker ids."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokens is None:
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
        tokens = ThoughtTokens(meta["sot_id"], meta["eot_id"])
    check_tokenizer(tok, tokens)
    return tok
