"""Prompt data: built-in set, local files in Dolly/Alpaca/plain schemas, Hub ids offline, splits, errors."""
from __future__ import annotations

import csv
import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from common import hub
from common import data
from common.data import DataError, PromptSet, load_prompts, normalise

CATEGORIES = {"factual_recall", "reasoning", "maths", "code", "summarisation", "creative_writing",
              "how_to", "extraction", "dialogue"}

DOLLY_ROWS = [
    {"instruction": "When did Virgin Australia start operating?",
     "context": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue.",
     "response": "On 31 August 2000.", "category": "closed_qa"},
    {"instruction": "Which is a species of fish? Tope or Rope", "context": "",
     "response": "Tope", "category": "classification"},
    {"instruction": "Why can camels survive for long without water?", "context": "",
     "response": "They store fat in their humps.", "category": "open_qa"},
    {"instruction": "Give me three ideas for a rainy weekend.", "context": "",
     "response": "Museum, baking, board games.", "category": "brainstorming"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def texts(prompts: PromptSet) -> list[str]:
    return [p.text for p in prompts]


# ---------------------------------------------------------------- built-in set

@pytest.fixture(scope="module")
def builtin() -> PromptSet:
    return load_prompts("builtin")


def test_builtin_set_is_large_varied_and_clean(builtin):
    assert len(builtin) >= 150
    assert builtin.n_malformed == 0 and builtin.n_duplicates == 0
    assert set(Counter(p.category for p in builtin)) == CATEGORIES
    assert min(Counter(p.category for p in builtin).values()) >= 10
    assert sum(len(p.text.split()) > 150 for p in builtin) >= 40
    assert sum(len(p.text.split()) < 30 for p in builtin) >= 60
    assert len({p.id for p in builtin}) == len(builtin)
    assert sum(p.reference is not None for p in builtin) >= 50
    assert all(p.source == "builtin" for p in builtin)


def test_builtin_file_schema():
    lines = data.BUILTIN_PATH.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(set(r) <= {"id", "category", "prompt", "reference", "length"} for r in rows)
    assert all(r["length"] in ("short", "long") for r in rows)
    long_words = [len(r["prompt"].split()) for r in rows if r["length"] == "long"]
    assert min(long_words) > 100
    summaries = [len(r["prompt"].split()) for r in rows if r["category"] == "summarisation"]
    assert sum(300 <= n <= 600 for n in summaries) >= 5


# ---------------------------------------------------------------- real Alpaca subset

def test_real_alpaca_subset():
    path = data.data_root() / data.ALPACA_SUBSET
    if not path.is_file():
        pytest.skip(f"shared Alpaca subset not found at {path}; set {data.DATA_ENV} to the shared data folder")
    prompts = load_prompts(str(path))
    assert len(prompts) > 30_000
    assert "Give three tips for staying healthy." in set(texts(prompts))
    assert all(p.reference is None and p.category is None for p in prompts.prompts[:100])
    train, test = prompts.split(test_fraction=0.2, seed=0)
    assert not set(map(normalise, texts(train))) & set(map(normalise, texts(test)))
    assert 0.18 < len(test) / len(prompts) < 0.22


# ---------------------------------------------------------------- local schemas

def test_dolly_jsonl_with_context_malformed_and_duplicate_lines(tmp_path):
    path = tmp_path / "dolly.jsonl"
    good = [json.dumps(r).encode() for r in DOLLY_ROWS]
    lines = good + [
        b'{"instruction": "broken line", "context": ',                        # invalid JSON
        json.dumps({"instruction": 5, "response": "x"}).encode(),             # wrong type
        json.dumps(["a", "list"]).encode(),                                   # not an object
        b'{"instruction": "caf\xe9 au lait?", "context": ""}',                # Latin-1 byte
        json.dumps({**DOLLY_ROWS[2], "instruction": "  why can CAMELS survive for long without water? "}).encode(),
        b"",
    ]
    path.write_bytes(b"\n".join(lines))
    prompts = load_prompts(str(path))
    assert len(prompts) == 4
    assert prompts.n_malformed == 4 and prompts.n_duplicates == 1
    by_text = {p.text: p for p in prompts}
    with_context = by_text["When did Virgin Australia start operating?\n\n"
                           "Virgin Australia commenced services on 31 August 2000 as Virgin Blue."]
    assert with_context.reference == "On 31 August 2000." and with_context.category == "closed_qa"
    assert "Which is a species of fish? Tope or Rope" in by_text  # empty context adds nothing
    assert with_context.source == str(path.resolve())
    assert len({p.id for p in prompts}) == 4


def test_alpaca_json_list(tmp_path):
    rows = [{"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
            {"instruction": "Name a primary colour.", "input": "", "output": "Red"}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    prompts = {p.text: p for p in load_prompts(str(path))}
    assert prompts["Translate to French.\n\nGood morning"].reference == "Bonjour"
    assert prompts["Name a primary colour."].reference == "Red"


def test_jsonl_content_under_json_name(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", DOLLY_ROWS)
    assert len(load_prompts(str(path))) == len(DOLLY_ROWS)


@pytest.mark.parametrize("field", ["prompt", "text"])
def test_plain_prompt_field(tmp_path, field):
    path = write_jsonl(tmp_path / "plain.jsonl", [{field: "Say hello.", "reference": 42}, {field: "Count to 3."}])
    prompts = {p.text: p for p in load_prompts(str(path))}
    assert prompts["Say hello."].reference == "42" and prompts["Count to 3."].reference is None


def test_csv_dolly_schema(tmp_path):
    path = tmp_path / "dolly.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["instruction", "context", "response", "category"])
        writer.writeheader()
        writer.writerows(DOLLY_ROWS)
        writer.writerow({"instruction": "Summarise this.", "context": "Line one.\nLine two, with a comma.",
                         "response": "Two lines.", "category": "summarization"})
    with path.open("a", encoding="utf-8") as fh:
        fh.write("too,many,fields,here,and,more\n")
    prompts = load_prompts(str(path))
    assert len(prompts) == 5 and prompts.n_malformed == 1
    by_text = {p.text: p for p in prompts}
    assert by_text["Summarise this.\n\nLine one.\nLine two, with a comma."].category == "summarization"


def test_colliding_explicit_ids_are_made_unique(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"id": "a", "prompt": "One."}, {"id": "a", "prompt": "Two."}])
    ids = [p.id for p in load_prompts(str(path))]
    assert len(set(ids)) == 2 and "a" in ids


# ---------------------------------------------------------------- splits and limits

def test_split_is_disjoint_complete_and_deterministic(builtin):
    train, test = builtin.split(test_fraction=0.2, seed=0)
    assert not set(map(normalise, texts(train))) & set(map(normalise, texts(test)))
    assert sorted(texts(train) + texts(test)) == sorted(texts(builtin))
    again_train, again_test = load_prompts("builtin").split(test_fraction=0.2, seed=0)
    assert texts(again_train) == texts(train) and texts(again_test) == texts(test)
    other_train, _ = builtin.split(test_fraction=0.2, seed=1)
    assert set(texts(other_train)) != set(texts(train))


def test_split_and_order_ignore_file_order_and_limit(tmp_path):
    rows = [json.loads(line) for line in data.BUILTIN_PATH.read_text(encoding="utf-8").splitlines()]
    random.Random(7).shuffle(rows)
    shuffled = load_prompts(str(write_jsonl(tmp_path / "shuffled.jsonl", rows)), seed=3)
    original = load_prompts("builtin", seed=3)
    assert texts(shuffled) == texts(original)
    for a, b in zip(shuffled.split(seed=3), original.split(seed=3)):
        assert texts(a) == texts(b)
        assert texts(a.take(10)) == texts(b)[:10]
    full_test = set(texts(original.split(seed=3)[1]))
    limited = load_prompts("builtin", limit=60, seed=3)
    assert len(limited) == 60 and texts(limited) == texts(original)[:60]
    limited_train, limited_test = limited.split(seed=3)
    assert set(texts(limited_test)) <= full_test and not set(texts(limited_train)) & full_test


def test_duplicates_never_straddle_the_split():
    prompts = PromptSet([data.Prompt(str(i), t, None, None, "x") for i, t in
                         enumerate(["Same prompt.", "same   PROMPT.", "Other.", "Third one.", "Fourth."] * 4)], "x")
    train, test = prompts.split(test_fraction=0.5, seed=0)
    assert not set(map(normalise, texts(train))) & set(map(normalise, texts(test)))


def test_take(builtin):
    assert len(builtin.take(5)) == 5
    assert len(builtin.take(10_000)) == len(builtin)
    with pytest.raises(DataError, match="positive"):
        builtin.take(0)


# ---------------------------------------------------------------- Hub ids offline

def test_hub_id_offline_fails_fast_naming_alternatives():
    if not hub.is_offline():
        pytest.skip("the Hub is reachable here; this checks the offline path")
    started = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_prompts("databricks/databricks-dolly-15k")
    assert time.perf_counter() - started < 5.0
    message = str(err.value)
    assert "offline" in message and "--train-dataset builtin" in message
    assert str(data.ALPACA_SUBSET) in message


def test_alternatives_follow_data_env(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.data_root() == tmp_path
    assert str(tmp_path / data.ALPACA_SUBSET) in data.local_alternatives()


# ---------------------------------------------------------------- errors

def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_prompts("./missing_prompts")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match="empty"):
        load_prompts(str(path))


def test_empty_json_list(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(str(path))


def test_no_recognisable_prompt_field(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Why?", "answer": "Because."}])
    with pytest.raises(DataError) as err:
        load_prompts(str(path))
    message = str(err.value)
    assert "'answer'" in message and "'question'" in message
    assert all(field in message for field in data.PROMPT_FIELDS)


def test_all_lines_malformed(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": \n[1, 2]\n{"prompt": null}\n')
    with pytest.raises(DataError, match="no usable prompts.*3 malformed record"):
        load_prompts(str(path))


def test_latin1_file_says_reencode(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "Où est la gare ?"}\n{"prompt": "Ça va ?"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="iconv"):
        load_prompts(str(path))


def test_non_utf8_rows_skipped_in_csv(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"instruction,response\nGood row,yes\nBad caf\xe9 row,no\n")
    prompts = load_prompts(str(path))
    assert texts(prompts) == ["Good row"] and prompts.n_malformed == 1


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_must_be_positive(limit):
    with pytest.raises(DataError, match="positive"):
        load_prompts("builtin", limit=limit)


@pytest.mark.parametrize("name, content, pattern", [
    ("broken.json", '[{"prompt": "a"', "not valid JSON"),
    ("object.json", '{"prompt": "a", "more": 1}', "expected a JSON list"),
    ("prompts.txt", "hello", "unsupported file type"),
])
def test_bad_whole_files(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_prompts(str(path))


def test_directory_and_bad_split_arguments(tmp_path, builtin):
    with pytest.raises(DataError, match="directory"):
        load_prompts(str(tmp_path))
    with pytest.raises(DataError, match="between 0 and 1"):
        builtin.split(test_fraction=1.0)
    with pytest.raises(DataError, match="empty"):
        builtin.take(1).split()


def test_fuzzed_files_give_prompts_or_a_clean_error(tmp_path):
    """Truncated, byte-flipped and re-typed files: every one loads or raises DataError, nothing else."""
    rng = random.Random(0)
    valid = {".jsonl": "".join(json.dumps(r) + "\n" for r in DOLLY_ROWS).encode(),
             ".json": json.dumps(DOLLY_ROWS).encode(),
             ".csv": b"instruction,context,response\nA,B,C\nD,,F\n"}
    for case in range(150):
        suffix = rng.choice(sorted(valid))
        blob = bytearray(valid[suffix])
        kind = case % 3
        if kind == 0:
            blob = blob[:rng.randrange(len(blob))]
        elif kind == 1:
            for _ in range(rng.randint(1, 8)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
        else:
            blob = bytearray(rng.randbytes(rng.randint(1, 200)))
        path = tmp_path / f"fuzz{case}{suffix}"
        path.write_bytes(bytes(blob))
        try:
            assert len(load_prompts(str(path))) > 0
        except DataError:
            pass


@pytest.mark.parametrize("spec", ["./" + "x" * 5000 + ".jsonl", "bad\x00name.csv"])
def test_names_the_os_rejects_do_not_exist(spec):
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(spec)
