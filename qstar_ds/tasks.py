"""Evaluation tasks: GSM8K and CommonsenseQA items, prompts, answer-token sets and answer parsing.

Pure Python + a tokenizer (no torch model here). Prompts follow ../shared/QUIET_STAR.md:

    GSM8K  "Q: {question}\\nA:"                                   gold answer " {number}\\n"
    CSQA   "Q: {stem}\\nAnswer choices: (A) .. (E) ..\\nA:"        gold answer " {letter}\\n"

The soft score's valid answer tokens come from the tokenizer: every token whose text, stripped
of spaces, is a run of digits (GSM8K) or one of the letters A-E (CSQA), plus every token that is
only newlines. Never hard-coded ids: the sets are built for whichever vocabulary is loaded.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .data import json_line

TASKS = ("gsm8k", "csqa", "gsm8k_cot")
LOCAL_FILES = {"gsm8k": os.path.join("gsm8k", "test.jsonl"), "csqa": os.path.join("commonsenseqa", "dev.jsonl")}
HUB = {"gsm8k": ("openai/gsm8k", "main", "test"), "csqa": ("tau/commonsense_qa", None, "validation")}
LETTERS = "ABCDE"
COT_TRIGGER = " Let's think step by step."
COT_ANSWER = "\nTherefore, the answer (arabic numerals) is"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class TaskError(ValueError):
    """Bad evaluation data or arguments; the message names the file/line or value."""


@dataclass
class Item:
    index: int
    """Position in the task's file (results are reported in this order)."""
    id: str
    prompt: str
    """Text up to and including "A:"."""
    answer: str
    """Gold direct answer, as scored after the prompt (" 18\\n", " B\\n")."""
    gold: str
    """Normalised gold value: a number without commas, or a letter."""
    question: str


def normalise_number(s: str) -> str:
    s = s.replace(",", "").strip()
    if re.fullmatch(r"-?\d+\.0*", s):
        s = s.split(".")[0]
    return s


def first_number(text: str) -> str | None:
    """The first number in `text` (commas dropped, "12.0" -> "12"), or None."""
    m = _NUMBER.search(text)
    return normalise_number(m.group(0).rstrip(".")) if m else None


def gsm8k_item(index: int, row: dict, where: str) -> Item:
    try:
        q, a = row["question"], row["answer"]
    except (KeyError, TypeError):
        raise TaskError(f"{where}: a GSM8K row needs 'question' and 'answer'") from None
    m = re.search(r"####\s*(.+?)\s*$", a)
    if not m:
        raise TaskError(f"{where}: answer has no final '#### <number>' line")
    gold = normalise_number(m.group(1))
    return Item(index, str(row.get("id", index)), f"Q: {q}\nA:", f" {gold}\n", gold, q)


def csqa_item(index: int, row: dict, where: str) -> Item:
    try:
        q = row["question"]
        stem = q["stem"] if isinstance(q, dict) else q
        choices = q["choices"] if isinstance(q, dict) else row["choices"]
        if isinstance(choices, dict):                       # hub format: {"label": [...], "text": [...]}
            choices = [{"label": lab, "text": txt} for lab, txt in zip(choices["label"], choices["text"])]
        key = row["answerKey"]
    except (KeyError, TypeError):
        raise TaskError(f"{where}: a CommonsenseQA row needs question.stem, question.choices and answerKey") from None
    labels = [c["label"] for c in choices]
    if labels != list(LETTERS) or key not in LETTERS:
        raise TaskError(f"{where}: expected choices A-E and an answerKey among them, got {labels} / {key!r}")
    opts = " ".join(f"({c['label']}) {c['text']}" for c in choices)
    return Item(index, str(row.get("id", index)), f"Q: {stem}\nAnswer choices: {opts}\nA:", f" {key}\n", key, stem)


def load_items(task: str, path: str | None = None, data_dir: str | None = None, limit: int | None = None) -> list[Item]:
    """Items of `task` from a jsonl file (`path`, or the task's file under `data_dir`), else from
    the hub (datasets.load_dataset). `limit` keeps the first N."""
    base = "gsm8k" if task == "gsm8k_cot" else task
    if base not in LOCAL_FILES:
        raise TaskError(f"task {task!r}: unknown; known: {', '.join(TASKS)}")
    make = gsm8k_item if base == "gsm8k" else csqa_item
    if path is None and data_dir is not None:
        path = os.path.join(data_dir, LOCAL_FILES[base])
    items = []
    if path is not None:
        if not os.path.isfile(path):
            raise TaskError(f"task {task}: data file {path} not found")
        with open(path) as f:
            for ln, line in enumerate(f, 1):
                if limit is not None and len(items) >= limit:
                    break
                if not line.strip():
                    continue
                items.append(make(len(items), json_line(line, f"{path}:{ln}", TaskError), f"{path}:{ln}"))
    else:
        from datasets import load_dataset
        name, sub, split = HUB[base]
        try:
            ds = load_dataset(name, sub, split=split)
        except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
            raise TaskError(f"task {task}: could not load {name} from the hub ({type(e).__name__}: "
                            f"{str(e)[:200]}); pass --data_dir or --data") from None
        for i, row in enumerate(ds):
            if limit is not None and i >= limit:
                break
            items.append(make(i, row, f"{name}[{i}]"))
    if not items:
        raise TaskError(f"task {task}: no items in {path or HUB[base][0]}")
    return items


@dataclass
class AnswerTokens:
    valid: list[int]
    """Token ids the soft score renormalises over."""
    choices: dict[int, str]
    """For CSQA: letter token id -> letter (the exact-match argmax runs over these)."""


def answer_tokens(tokenizer, task: str, vocab_size: int) -> AnswerTokens:
    """The valid answer tokens of `task` in this tokenizer's vocabulary (see module docstring)."""
    texts = tokenizer.batch_decode([[i] for i in range(vocab_size)])
    newline = [i for i, s in enumerate(texts) if s and set(s) <= {"\n"}]
    if task.startswith("gsm8k"):
        ans = [i for i, s in enumerate(texts) if s.strip(" ").isdigit() and s.strip(" ").isascii()]
        choices = {}
    else:
        choices = {i: s.strip(" ") for i, s in enumerate(texts) if s.strip(" ") in set(LETTERS)}  # one letter
        ans = list(choices)
    if not ans or not newline:
        raise TaskError(f"task {task}: the tokenizer has no {'digit' if task.startswith('gsm8k') else 'A-E'} "
                        f"or newline tokens")
    return AnswerTokens(sorted(set(ans + newline)), choices)


def majority(values: list[str | None]) -> str | None:
    """Most common non-None value (ties: the one seen first)."""
    counts: dict[str, int] = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    return max(counts, key=counts.get) if counts else None
