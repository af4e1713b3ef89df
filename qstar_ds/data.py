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
import json
import os
import random
from typing import Iterator

import torch

from .config import ConfigError

ARITH = "arith"
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
STREAM_BYTES = 64 * 2**20
"""Local files larger than this are read as a stream (resuming skips rows) instead of being
converted into the datasets cache first."""


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
        try:   # large files are streamed: no converted copy in the datasets cache, no wait at start
            ds = datasets.load_dataset(_FILE_BUILDERS[ext], data_files=source, split="train",
                                       streaming=os.path.getsize(source) > STREAM_BYTES)
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


def json_line(line: str, where: str, error: type[Exception]):
    """One parsed line of a jsonl file, or `error` naming `where` and what is wrong with it."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None


def check_source(source: str, text_field: str = "text", key: str = "data.source", lines: int = 200) -> None:
    """Open a local data file and check its first documents (`lines` lines of .jsonl/.txt, the
    schema of .parquet) without `datasets`: cheap, before the model is built. One DataError line
    names the file, the line and the key. Hub names and the built-in corpus are not checked here."""
    if source == ARITH:
        return
    ext = os.path.splitext(source)[1].lower()
    if ext not in _FILE_BUILDERS and not os.path.exists(source):
        return                                          # a hub dataset name
    if not os.path.isfile(source):
        raise DataError(f"{key}={source!r}: no such file")
    if ext not in _FILE_BUILDERS:
        raise DataError(f"{key}={source!r}: unsupported file type {ext!r}; use one of {sorted(_FILE_BUILDERS)}")
    if os.path.getsize(source) == 0:
        raise DataError(f"{key}={source!r}: the file is empty")
    try:
        f = open(source, "rb")
    except OSError as e:
        raise DataError(f"{key}={source!r}: cannot be opened ({e.strerror})") from None
    with f:
        if ext == ".parquet":
            if f.read(4) != b"PAR1":
                raise DataError(f"{key}={source!r}: not a parquet file (no PAR1 magic)")
            import pyarrow.parquet as pq
            try:
                names = pq.ParquetFile(source).schema_arrow.names
            except Exception as e:  # noqa: BLE001 - a damaged file: one line
                raise DataError(f"{key}={source!r}: unreadable parquet ({str(e).splitlines()[0][:160]})") from None
            if text_field not in names:
                raise DataError(f"data.text_field={text_field!r} is not a column of {source}; columns: {names}")
            return
        for number, raw in enumerate(f, 1):
            if number > lines:
                break
            if b"\0" in raw:
                raise DataError(f"{key}={source!r} line {number}: binary data (NUL bytes), not text")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{key}={source!r} line {number}: not UTF-8 text (byte {raw[e.start]:#04x} "
                                f"at column {e.start + 1})") from None
            if ext != ".jsonl" or not line.strip():
                continue
            row = json_line(line, f"{key}={source!r} line {number}", DataError)
            if not isinstance(row, dict):
                raise DataError(f"{key}={source!r} line {number}: a JSON {type(row).__name__}, not an object")
            if not isinstance(row.get(text_field), str):
                got = "missing" if text_field not in row else type(row[text_field]).__name__
                raise DataError(f"{key}={source!r} line {number}: field data.text_field={text_field!r} is "
                                f"{got}, not a string (keys: {sorted(row)[:8]})")


def is_heldout(text: str, fraction: float, salt: int) -> bool:
    """Whether a document belongs to the held-out split: a hash of its text (salted with the data
    seed) below `fraction`. Decided by content, so a duplicated document lands on one side only."""
    h = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8, key=str(salt).encode()).digest()
    return int.from_bytes(h, "big") < fraction * 2**64


# ---- sequences ------------------------------------------------------------------------------
PIECE_CHARS = 1 << 15
"""Documents are tokenised in pieces of at most this many characters (cut before whitespace), so
one huge document never sits in memory as tokens, and the checkpointed position is an offset."""


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of <= size characters. A cut goes before a single space that follows
    a non-space character, in the second half of the piece, where there is one: there, BPE
    pre-tokenisers split anyway, so the pieces' tokens are the whole text's."""
    out, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind(" ", start + size // 2, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1:cut + 2].isspace()):
            cut = text.rfind(" ", start + size // 2, cut)
        end = cut if cut > start else end
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


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
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        if pack and self.eos is None:
            raise DataError("data.pack=true needs a tokenizer with an EOS token to separate documents")
        state = state or {}
        self.sequences = int(state.get("sequences", 0))
        # the packing buffer: segments [doc index, piece index, offset of the first token, tokens]
        self.segments: list[list] = []
        self.doc_index = int(state.get("doc_index", 0))     # the next document to read
        self._docs = iter_documents(start=self.doc_index, **self.source_args)
        self._pending: list[tuple[int, int, list[int]]] = []   # pieces of the current document not yet buffered
        if state.get("buffer"):                            # a checkpoint written before offsets
            self.segments.append([None, 0, 0, list(state["buffer"])])
        elif "offset" in state:                            # resume inside document doc_index
            self._skip_to(int(state["piece"]), int(state["offset"]))

    def state(self) -> dict:
        """Position of the first token not yet handed out: small (offsets, not text)."""
        if self.segments and self.segments[0][0] is None:   # a legacy buffer still being consumed
            return {"doc_index": self.doc_index, "buffer": [t for s in self.segments for t in s[3]],
                    "sequences": self.sequences, "source": self.source_args["source"]}
        if self.segments:
            doc, piece, offset, _ = self.segments[0]
        elif self._pending:
            doc, piece, offset = self._pending[0][0], self._pending[0][1], 0
        else:
            return {"doc_index": self.doc_index, "sequences": self.sequences, "source": self.source_args["source"]}
        return {"doc_index": doc, "piece": piece, "offset": offset, "sequences": self.sequences,
                "source": self.source_args["source"]}

    def _next_doc(self) -> tuple[int, str]:
        while True:
            try:
                text = next(self._docs)
            except StopIteration:
                side = " (held-out side)" if self.holdout and self.heldout_side else ""
                raise DataError(f"data.source={self.source_args['source']!r} ran out after "
                                f"{self.doc_index} documents ({self.sequences} sequences){side}") from None
            index = self.doc_index
            self.doc_index += 1
            if not self.holdout or is_heldout(text, self.holdout, self.source_args["seed"]) == self.heldout_side:
                return index, text

    def _queue_doc(self) -> None:
        """Split the next document into pieces (tokenised lazily, one at a time)."""
        index, text = self._next_doc()
        parts = pieces(text)
        self._pending = [(index, k, part) for k, part in enumerate(parts)]
        self._last_piece = len(parts) - 1

    def _next_piece(self) -> tuple[int, int, list[int]]:
        """(document, piece, tokens) of the next piece; the last piece of a document ends in EOS
        when packing."""
        while not self._pending:
            self._queue_doc()
        index, k, part = self._pending.pop(0)
        ids = self.tok(part, add_special_tokens=False)["input_ids"]
        if self.pack and k == self._last_piece:
            ids = ids + [self.eos]
        self._last_ids = ids
        return index, k, ids

    def _skip_to(self, piece: int, offset: int) -> None:
        """Resume inside document doc_index: drop its first `piece` pieces and `offset` tokens."""
        self._queue_doc()
        del self._pending[:piece]
        index, k, ids = self._next_piece()
        self.segments.append([index, k, offset, ids[offset:]])

    def _take(self, count: int) -> list[int]:
        """The next `count` tokens of the packed stream (documents joined by EOS)."""
        out = []
        while len(out) < count:
            if not self.segments:
                self.segments.append([*self._next_piece()[:2], 0, []])
                self.segments[0][3] = self._last_ids
            seg = self.segments[0]
            use = seg[3][:count - len(out)]
            out += use
            seg[2] += len(use)
            seg[3] = seg[3][len(use):]
            if not seg[3]:
                self.segments.pop(0)
        return out

    def next_sequence(self) -> tuple[list[int], list[int]]:
        """-> (ids, mask), each n long."""
        if self.pack:
            ids = self._take(self.n)
            mask = [1] * self.n
        else:
            ids = []
            while len(ids) < 2:  # a document of < 2 tokens has no next-token target at all
                self._pending = []
                ids = self._next_piece()[2][: self.n]
                while len(ids) < self.n and self._pending:          # a long document: only what fits
                    ids += self._next_piece()[2][: self.n - len(ids)]
                self._pending = []
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


def heldout_sequences(tokenizer, d, e, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out sequences a run evaluates on, from its data settings `d` (config.DataConfig)
    and evaluation settings `e` (config.EvalConfig): the first `count` (default e.sequences) of
    the held-out side of d.source, or of e.source read whole. -> input_ids, attention_mask (D, n)."""
    split = e.holdout_fraction if e.source is None else 0.0
    stream = SequenceStream(tokenizer, e.source or d.source, d.seq_len, d.pack, d.split, d.text_field, d.subset,
                            d.seed, holdout=split, heldout_side=True)
    return first_sequences(stream, count or e.sequences)
