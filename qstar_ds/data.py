"""Training text -> sequences of n tokens, identical on every rank, resumable exactly.

Sources: the built-in generated corpus ("arith"), local .jsonl/.json/.parquet/.txt files and hub
datasets (streamed) through `datasets`. Documents are tokenised and either packed (concatenated
with EOS between documents, cut every n tokens) or cropped and right-padded to n.

Every rank reads the same stream and takes its own part of each global batch, so the stream's
state (`SequenceStream.state()`: next document index and the packing buffer) is the same on all
ranks and goes into the checkpoint once; resuming restores it and continues at the exact next
sequence. Reading the whole stream on every rank costs tokenisation only, which is small next to
a Quiet-STaR step (t + K + 1 times the tokens of a plain step).
"""
from __future__ import annotations

import hashlib
import os
import random
from typing import Iterator

import torch

from .config import ConfigError

ARITH = "arith"
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


class DataError(ConfigError):
    """Training data that cannot be used as configured (missing file, column, bad row)."""


# ---- the built-in corpus ------------------------------------------------------------------
_NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun"]
_ITEMS = ["apples", "marbles", "books", "coins", "stamps", "pencils", "cards", "shells"]


def _statement(rng: random.Random) -> str:
    kind = rng.randrange(6)
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    if kind == 0:
        return f"Compute {a} + {b}. We have {a} + {b} = {a + b}."
    if kind == 1:
        hi, lo = max(a, b), min(a, b)
        return f"Compute {hi} - {lo}. We have {hi} - {lo} = {hi - lo}."
    if kind == 2:
        return f"Compute {a} * {c}. Since {a} * {c} = {a * c}, the product is {a * c}."
    if kind == 3:
        x, k, m = rng.randint(1, 20), rng.randint(2, 9), rng.randint(1, 30)
        return (f"Solve {k}x + {m} = {k * x + m}. Subtract {m} from both sides: {k}x = {k * x}. "
                f"Divide by {k}: x = {x}.")
    if kind == 4:
        who, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        return (f"{who} has {a} {item} and gets {b} more, then gives away {c}. "
                f"{who} now has {a} + {b} - {c} = {a + b - c} {item}.")
    return f"Evaluate ({a} + {b}) * {c}. First {a} + {b} = {a + b}, then {a + b} * {c} = {(a + b) * c}."


def arith_document(seed: int, index: int) -> str:
    """Document `index` of the built-in corpus: 3-6 arithmetic/algebra statements whose results
    are predictable only by computing them (where thinking should help). Deterministic."""
    rng = random.Random(f"qstar-arith-{seed}-{index}")
    return " ".join(_statement(rng) for _ in range(rng.randint(3, 6)))


# ---- documents ------------------------------------------------------------------------------
def _arith_documents(seed: int, start: int) -> Iterator[str]:
    i = start
    while True:
        yield arith_document(seed, i)
        i += 1


def iter_documents(source: str, split: str = "train", text_field: str = "text", subset: str | None = None,
                   seed: int = 0, start: int = 0) -> Iterator[str]:
    """Documents from `start` on (see module docstring for the sources). The source is opened
    and checked here, not at the first document: a bad path or field fails before training."""
    if source == ARITH:
        return _arith_documents(seed, start)
    import datasets

    ext = os.path.splitext(source)[1].lower()
    if ext in _FILE_BUILDERS or os.path.exists(source):
        if not os.path.isfile(source):
            raise DataError(f"data.source={source!r}: no such file")
        if ext not in _FILE_BUILDERS:
            raise DataError(f"data.source={source!r}: unsupported file type {ext!r}; "
                            f"use one of {sorted(_FILE_BUILDERS)}")
        if os.path.getsize(source) == 0:
            raise DataError(f"data.source={source!r}: the file is empty")
        try:
            ds = datasets.load_dataset(_FILE_BUILDERS[ext], data_files=source, split="train")
        except Exception as e:  # noqa: BLE001 - malformed/binary files: one line, not a datasets traceback
            cause = e.__cause__ or e.__context__ or e
            raise DataError(f"data.source={source!r}: cannot be read as {ext} ({type(cause).__name__}: "
                            f"{str(cause).splitlines()[0][:200] if str(cause) else ''})") from None
        where = source
    else:
        ds = datasets.load_dataset(source, subset, split=split, streaming=True)
        where = f"{source} ({split})"
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise DataError(f"data.text_field={text_field!r} is not a column of {where}; columns: {columns}")
    rows = (ds[i] for i in range(start, len(ds))) if hasattr(ds, "__len__") else iter(ds.skip(start))
    return _texts(rows, start, text_field, where)


def _texts(rows, start: int, text_field: str, where: str) -> Iterator[str]:
    for k, row in enumerate(rows, start):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"{where}: row {k} has no string field {text_field!r} (got {type(text).__name__})")
        yield text


def is_heldout(text: str, fraction: float, salt: int) -> bool:
    """Whether a document belongs to the held-out split: a hash of its text (salted with the data
    seed) below `fraction`. Decided by content, so a duplicated document lands on one side only."""
    h = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8, key=str(salt).encode()).digest()
    return int.from_bytes(h, "big") < fraction * 2**64


# ---- sequences ------------------------------------------------------------------------------
class SequenceStream:
    """Sequences of n token ids (+ attention mask) from a document stream, with a resumable state."""

    def __init__(self, tokenizer, source: str, seq_len: int, pack: bool = True, split: str = "train",
                 text_field: str = "text", subset: str | None = None, seed: int = 0, state: dict | None = None,
                 holdout: float = 0.0, heldout_side: bool = False):
        """holdout > 0: split the documents by `is_heldout`; this stream reads the held-out side
        when `heldout_side`, else the training side (skipped documents still count in doc_index,
        so a resumed stream continues at the same place)."""
        self.tok, self.n, self.pack = tokenizer, seq_len, pack
        self.holdout, self.heldout_side = holdout, heldout_side
        self.source_args = dict(source=source, split=split, text_field=text_field, subset=subset, seed=seed)
        state = state or {}
        self.doc_index = int(state.get("doc_index", 0))
        self.buffer: list[int] = list(state.get("buffer", []))
        self.sequences = int(state.get("sequences", 0))
        self._docs = iter_documents(start=self.doc_index, **self.source_args)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        if pack and self.eos is None:
            raise DataError("data.pack=true needs a tokenizer with an EOS token to separate documents")

    def state(self) -> dict:
        return {"doc_index": self.doc_index, "buffer": list(self.buffer), "sequences": self.sequences,
                "source": self.source_args["source"]}

    def _next_doc_tokens(self) -> list[int]:
        while True:
            try:
                text = next(self._docs)
            except StopIteration:
                side = " (held-out side)" if self.holdout and self.heldout_side else ""
                raise DataError(f"data.source={self.source_args['source']!r} ran out after "
                                f"{self.doc_index} documents ({self.sequences} sequences){side}") from None
            self.doc_index += 1
            if not self.holdout or is_heldout(text, self.holdout, self.source_args["seed"]) == self.heldout_side:
                break
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def next_sequence(self) -> tuple[list[int], list[int]]:
        """-> (ids, mask), each n long."""
        if self.pack:
            while len(self.buffer) < self.n:
                self.buffer += self._next_doc_tokens() + [self.eos]
            ids, self.buffer = self.buffer[: self.n], self.buffer[self.n:]
            mask = [1] * self.n
        else:
            ids = []
            while len(ids) < 2:  # a document of < 2 tokens has no next-token target at all
                ids = self._next_doc_tokens()[: self.n]
            mask = [1] * len(ids) + [0] * (self.n - len(ids))
            ids = ids + [self.pad] * (self.n - len(ids))
        self.sequences += 1
        return ids, mask

    def next_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids, attention_mask: (batch, n) long tensors (CPU)."""
        seqs = [self.next_sequence() for _ in range(batch)]
        return (torch.tensor([s[0] for s in seqs], dtype=torch.long),
                torch.tensor([s[1] for s in seqs], dtype=torch.long))


def first_sequences(stream: SequenceStream, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `count` sequences of `stream` (fewer when the source ends first; a source without a
    single one raises DataError). -> input_ids, attention_mask (rows, n)."""
    rows = []
    try:
        while len(rows) < count:
            rows.append(stream.next_sequence())
    except DataError:
        if not rows:
            raise
    return (torch.tensor([r[0] for r in rows], dtype=torch.long),
            torch.tensor([r[1] for r in rows], dtype=torch.long))
