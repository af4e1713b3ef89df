"""Tiny random models and a small self-made tokenizer, for tests and the debug preset.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in a few milliseconds
on a built-in text, and the models are random HF configs of the supported architectures.
"""
from __future__ import annotations

import torch

_TEXT = (
    "Let x = 3 and y = 4. Then x + y = 7 and x * y = 12. --- The sum of the first n odd numbers "
    "is n^2, so 1 + 3 + 5 = 9. If 2a - 5 = 11 then a = 8. The quick brown fox jumps over the lazy "
    "dog. Therefore the answer is 42. A prime number has exactly two divisors: 1 and itself. "
) * 4


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (PreTrainedTokenizerFast) with `vocab_size` tokens; eos/pad
    token "<|endoftext|>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


ARCHS = ("llama", "mistral", "qwen2")


def tiny_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 64, tie: bool = False):
    """A small random config of `arch` (full attention: no sliding window)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=512, tie_word_embeddings=tie, pad_token_id=0,
                  bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; known: {ARCHS}")


def tiny_causal_lm(arch: str, vocab_size: int, dtype: torch.dtype = torch.float32, seed: int = 0, **kw):
    """A random HF causal LM of `arch` (attention `sdpa`)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **kw), attn_implementation="sdpa",
                                            dtype=dtype)


def smollm2_shaped_config(vocab_size: int = 49152):
    """A LlamaConfig with SmolLM2-135M's shape (for benchmarks with random weights, no download)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                       max_position_embeddings=8192, rms_norm_eps=1e-5)
