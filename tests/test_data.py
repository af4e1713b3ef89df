"""Data: the built-in corpus, local files through `datasets`, packing/cropping, exact resume."""
import json

import pytest
import torch

from qstar_ds.config import ConfigError
from qstar_ds.data import SequenceStream, arith_document
from qstar_ds.tiny import tiny_tokenizer

from conftest import shared_file

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
    assert torch.equal(rest[0], again[0]) and torch.equal(rest[1], again[1])
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
