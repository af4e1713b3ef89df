"""Data: the built-in corpus, local files through `datasets`, packing/cropping, exact resume."""
import json

import pytest
import torch

from qstar_ds.config import ConfigError
from qstar_ds.data import SequenceStream, arith_document
from qstar_ds.tiny import tiny_tokenizer

from conftest import shared_file
from helpers import assert_equal

def test_arith_corpus_is_deterministic_and_varied():
    assert arith_document(0, 5) == arith_document(0, 5)
    docs = {arith_document(0, i) for i in range(50)}
    assert len(docs) == 50 and arith_document(1, 5) != arith_document(0, 5)
    assert "=" in arith_document(0, 0)


@pytest.mark.parametrize("pack", [True, False])
def test_resume_continues_at_the_exact_next_sequence(pack):
    tok = tiny_tokenizer()
    n = 40 if pack else 400       # crop mode: longer than most documents, so some are padded
    a = SequenceStream(tok, "arith", n, pack=pack)
    first = a.next_batch(3)
    state = json.loads(json.dumps(a.state()))          # as stored in a checkpoint
    rest = a.next_batch(4)
    b = SequenceStream(tok, "arith", n, pack=pack, state=state)
    again = b.next_batch(4)
    assert_equal(rest[0], again[0], "resumed ids")
    assert_equal(rest[1], again[1], "resumed mask")
    assert not torch.equal(first[0][:1], rest[0][:1])
    if pack:
        assert bool(rest[1].all())
    else:
        assert not bool(rest[1].all())                  # short documents are right-padded


def test_packing_loses_no_tokens():
    tok = tiny_tokenizer()
    s = SequenceStream(tok, "arith", 16, pack=True)
    x, _ = s.next_batch(30)
    flat = x.flatten().tolist()
    eos = tok.eos_token_id
    docs, cur = [], []
    for t in flat:
        if t == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    for i, d in enumerate(docs):
        assert d == tok(arith_document(0, i), add_special_tokens=False)["input_ids"]


def test_local_jsonl_from_shared_data():
    path = shared_file("owm_sample/text_tiny.jsonl")
    tok = tiny_tokenizer()
    s = SequenceStream(tok, path, 64, pack=False)
    x, am = s.next_batch(4)
    with open(path) as f:
        first = json.loads(f.readline())["text"]
    ids = tok(first, add_special_tokens=False)["input_ids"][:64]
    assert x[0, :len(ids)].tolist() == ids and int(am[0].sum()) == len(ids)


def test_local_file_errors_name_the_problem(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match="no such file"):
        SequenceStream(tok, str(tmp_path / "nope.jsonl"), 16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ConfigError, match=r"data.text_field='text' is not a column of .*bad.jsonl; columns: \['question'\]"):
        SequenceStream(tok, str(bad), 16)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"text": "a b c d e f"}) + "\n" + json.dumps({"text": None}) + "\n")
    s = SequenceStream(tok, str(mixed), 4, pack=False)
    s.next_sequence()
    with pytest.raises(ConfigError, match="row 1 has no string field 'text'"):
        s.next_sequence()


def test_a_huge_document_streams_in_pieces_with_a_small_resumable_state(tmp_path):
    """A document far longer than a piece is tokenised piece by piece: the tokens are those of the
    whole document, and the checkpointed state is an offset (not the remaining tokens)."""
    from qstar_ds.data import PIECE_CHARS
    text = " ".join(arith_document(0, i) for i in range(2000))
    assert len(text) > 8 * PIECE_CHARS
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "a short last document"}) + "\n")
    tok = tiny_tokenizer()
    whole = tok(text, add_special_tokens=False)["input_ids"]
    a = SequenceStream(tok, str(path), 64)
    got = a.next_batch(len(whole) // 64 // 2)[0].flatten().tolist()
    assert got == whole[:len(got)]
    state = json.dumps(a.state())
    assert len(state) < 200, state
    short = tok("a short last document", add_special_tokens=False)["input_ids"]
    rest = a.next_batch((len(whole) + len(short) + 2) // 64 - len(got) // 64)   # into the next document
    b = SequenceStream(tok, str(path), 64, state=json.loads(state))
    again = b.next_batch(rest[0].shape[0])
    assert_equal(rest[0], again[0], "rest[0]")
    assert (got + rest[0].flatten().tolist())[:len(whole) + 1] == whole + [tok.eos_token_id]
    crop = SequenceStream(tok, str(path), 64, pack=False).next_sequence()[0]
    assert crop == whole[:64]


def test_a_checkpoint_with_the_older_token_buffer_still_resumes():
    tok = tiny_tokenizer()
    a = SequenceStream(tok, "arith", 40)
    a.next_batch(3)
    new = a.state()
    # what the stream used to checkpoint: the remaining tokens of the buffered documents
    b = SequenceStream(tok, "arith", 40, state=new)
    legacy = {"doc_index": new["doc_index"] + 1, "sequences": 3,
              "buffer": b._take(len(tok(arith_document(0, new["doc_index"]), add_special_tokens=False)["input_ids"])
                                + 1 - new["offset"])}
    want = a.next_batch(5)
    got = SequenceStream(tok, "arith", 40, state=legacy).next_batch(5)
    assert_equal(want[0], got[0], "want[0]")


def test_large_local_files_are_streamed_with_the_same_documents(tmp_path, monkeypatch):
    import qstar_ds.data as data
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": arith_document(3, i)}) + "\n" for i in range(40)))
    tok = tiny_tokenizer()
    ref = SequenceStream(tok, str(path), 32)
    want = ref.next_batch(6)
    state = ref.state()
    want_next = ref.next_batch(6)
    import datasets
    calls, load = [], datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(k.get("streaming")) or load(*a, **k))
    monkeypatch.setattr(data, "STREAM_BYTES", 0)
    streamed = SequenceStream(tok, str(path), 32)
    assert_equal(streamed.next_batch(6)[0], want[0], "streamed.next_batch(6)[0]")
    assert_equal(SequenceStream(tok, str(path), 32, state=state).next_batch(6)[0], want_next[0], "resumed streamed ids")
    assert calls == [True, True]          # read as a stream (no converted copy), resumed by skipping rows
