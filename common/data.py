"""Prompt data for training and testing the controller: the built-in set, local files, Hub data sets.

Why one module: every mode must see the same prompts for the same spec and seed, and the
train/test split must never leak, so reading, de-duplication and splitting live together.

How the CLI maps onto it::

    prompts = load_prompts(args.train_dataset, seed=args.seed)
    train, test = prompts.split(test_fraction=0.2, seed=args.seed)
    train = train.take(args.train_samples)      # --train-samples
    test = test.take(args.test_samples)         # --test-samples

A prompt's side of the split depends only on its normalised text and the seed, and each side
is kept in a seeded order that also depends only on the text, so neither the file's order nor
the sample counts change which prompts a run sees: ``take(N)`` is always a prefix of
``take(N + k)``, and a test prompt can never turn up in training.
"""
from __future__ import annotations

from common import hub  # first: sets the HF offline flags before `datasets` is imported

import csv
import hashlib
import io
import json
import logging
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

BUILTIN = "builtin"
BUILTIN_PATH = hub.PROJECT_ROOT / "prompts" / "builtin.jsonl"
DATA_ENV = "ADAPTIVE_PRUNING_DATA"
ALPACA_SUBSET = Path("alpaca_subset_refusal_direction") / "alpaca.json"
FILE_SUFFIXES = (".jsonl", ".json", ".csv")

# Field names, in priority order. Dolly: instruction/context/response; Alpaca:
# instruction/input/output; plain files: prompt or text (+ reference).
PROMPT_FIELDS = ("instruction", "prompt", "text")
CONTEXT_FIELDS = ("context", "input")
REFERENCE_FIELDS = ("response", "output", "reference")


class DataError(ValueError):
    """Prompt data could not be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str | None
    reference: str | None   # the data set's answer: Dolly response, Alpaca output, builtin reference
    source: str             # "builtin", the file path, or the Hub id


@dataclass
class PromptSet:
    """De-duplicated prompts in a seeded order, with what was skipped while reading them."""
    prompts: list[Prompt]
    source: str
    n_malformed: int = 0     # records skipped as unusable (bad JSON, wrong types, bad bytes, ...)
    n_duplicates: int = 0    # records dropped because their normalised text was already seen

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[PromptSet, PromptSet]:
        """(train, test) by a seeded hash of each prompt's normalised text.

        Hashing the text, not the position, keeps a prompt on the same side whatever the file
        order or sample count; equal texts always hash alike, so the sides cannot share one.
        """
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
        keyed = sorted(((normalise(p.text), p) for p in self.prompts),
                       key=lambda kp: _unit_hash(seed, "order", kp[0]))
        train = [p for key, p in keyed if _unit_hash(seed, "split", key) >= test_fraction]
        test = [p for key, p in keyed if _unit_hash(seed, "split", key) < test_fraction]
        if not train or not test:
            raise DataError(
                f"{self.source}: {len(self.prompts)} prompts give an empty "
                f"{'train' if not train else 'test'} split at test_fraction={test_fraction}; "
                "use a larger data set (e.g. builtin) or a different test fraction")
        return (PromptSet(train, self.source, self.n_malformed, self.n_duplicates),
                PromptSet(test, self.source, self.n_malformed, self.n_duplicates))

    def take(self, n: int) -> PromptSet:
        """The first ``n`` prompts (the seeded order), e.g. for --train-samples/--test-samples."""
        if n <= 0:
            raise DataError(f"the number of prompts must be positive, got {n}")
        if n > len(self.prompts):
            log.info("%s: %d prompts requested, %d available; using all", self.source, n, len(self.prompts))
        return PromptSet(self.prompts[:n], self.source, self.n_malformed, self.n_duplicates)


def data_root() -> Path:
    """The shared real data sets (pointed at, never copied): $ADAPTIVE_PRUNING_DATA or ../shared/data."""
    return Path(os.environ.get(DATA_ENV, hub.PROJECT_ROOT.parent / "shared" / "data")).expanduser()


def local_alternatives() -> str:
    """The hint every Hub failure ends with, so an offline user knows what works instead."""
    return (f"Use a local alternative: `--train-dataset {BUILTIN}` (the prompt set shipped with the project), "
            f"or a local .jsonl/.json/.csv file in Dolly's or Alpaca's schema such as "
            f"{data_root() / ALPACA_SUBSET} (set {DATA_ENV} to the shared data folder if it is elsewhere).")


def normalise(text: str) -> str:
    """Case, Unicode form and whitespace do not make two prompts different."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def load_prompts(spec: str, limit: int | None = None, seed: int = 0) -> PromptSet:
    """Load ``builtin``, a local .jsonl/.json/.csv file, or a Hugging Face data set id.

    Returns de-duplicated prompts in a seeded order that does not depend on the file's order;
    ``limit`` keeps the first ``limit`` of them (for quick looks; runs limit each split instead).
    ``n_malformed`` and ``n_duplicates`` count the whole source, before ``limit``.
    """
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be a positive number of prompts, got {limit}; omit it to use all prompts")
    spec = spec.strip()
    if not spec:
        raise DataError(f"no data set given. {local_alternatives()}")
    malformed = _Malformed()
    path = Path(spec).expanduser()
    if spec == BUILTIN:
        source, stem, records = BUILTIN, BUILTIN, _read_file(BUILTIN_PATH, malformed)
    elif _exists(path) or _looks_like_path(spec):
        records = _read_file(path, malformed)
        source, stem = str(path.resolve()), path.stem  # absolute, so a checkpoint can name it from any cwd
    else:
        source, stem, records = spec, spec.rstrip("/").rsplit("/", 1)[-1], _read_hub(spec)
    prompts, n_duplicates = _to_prompts(records, source, stem, malformed)
    prompts.sort(key=lambda p: _unit_hash(seed, "order", normalise(p.text)))
    if limit is not None:
        prompts = prompts[:limit]
    log.info("loaded %d prompts from %s (%d malformed records skipped, %d duplicates dropped)",
             len(prompts), source, malformed.count, n_duplicates)
    return PromptSet(prompts, source, malformed.count, n_duplicates)


@dataclass
class _Malformed:
    """Skipped records by reason, plus the first one, so the warning says where to look."""
    reasons: Counter = field(default_factory=Counter)
    first: str | None = None

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def add(self, where: str, reason: str) -> None:
        self.reasons[reason.split(":")[0]] += 1
        if self.first is None:
            self.first = f"{where}: {reason}"

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.reasons.most_common())
        return f"{self.count} malformed record(s) skipped ({kinds}); first at {self.first}"


class _Skip(Exception):
    """One record is unusable; it is counted and skipped, not fatal."""


def _unit_hash(seed: int, purpose: str, key: str) -> float:
    """A stable pseudo-random number in [0, 1) (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}\x1f{purpose}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def _looks_like_path(spec: str) -> bool:
    """A missing file should say "does not exist", not be looked up on the Hub."""
    return spec.lower().endswith(FILE_SUFFIXES) or spec.startswith((".", "/", "~"))


def _exists(path: Path) -> bool:
    """Path.exists() raises on names the OS rejects (too long, NUL bytes); such files do not exist."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _read_file(path: Path, malformed: _Malformed) -> list[tuple[str, Any]]:
    """Raw records with their location ("line 7"); lines unusable already while reading go to ``malformed``."""
    if not _exists(path):
        raise DataError(f"data file {path} does not exist: check the path. {local_alternatives()}")
    if path.is_dir():
        raise DataError(f"{path} is a directory: give a {', '.join(FILE_SUFFIXES)} file inside it")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(FILE_SUFFIXES)}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read data file {path}: {err.strerror}; check its permissions") from err
    if not raw.strip():
        raise DataError(f"data file {path} is empty: fill it with prompts or pick another data set")
    if suffix == ".jsonl":
        return _read_jsonl(raw, malformed)
    text, lossy = _decode(raw)
    records = (_read_json if suffix == ".json" else _read_csv)(path, text, malformed)
    if lossy:  # the bytes were not UTF-8: a record touched by a replacement character is garbled
        records = [(where, _lossy_marker(rec)) for where, rec in records]
    return records


def _decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 (BOM tolerated); otherwise replace bad bytes and say so, so records can be skipped."""
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8-sig", errors="replace"), True


def _lossy_marker(record: Any) -> Any:
    if isinstance(record, dict) and any(isinstance(v, str) and "\ufffd" in v for v in record.values()):
        return _NotUtf8()
    return record


class _NotUtf8:
    """Stands in for a record whose text held bytes that were not UTF-8."""


def _read_jsonl(raw: bytes, malformed: _Malformed) -> list[tuple[str, Any]]:
    records = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            records.append((where, json.loads(line.decode("utf-8-sig"))))
        except UnicodeDecodeError:
            malformed.add(where, "not UTF-8: invalid bytes")
        except json.JSONDecodeError as err:
            malformed.add(where, f"invalid JSON: {err.msg} at column {err.colno}")
        except (ValueError, RecursionError) as err:  # e.g. a 5,000-digit number, absurd nesting
            malformed.add(where, f"invalid JSON: {err}")
    return records


def _read_json(path: Path, text: str, malformed: _Malformed) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):  # JSONL under a .json name
            log.info("%s holds one JSON object per line; reading it as JSONL", path)
            return _read_jsonl(text.encode(), malformed)
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): "
                        "fix it, or write one object per line in a .jsonl file") from err
    except (ValueError, RecursionError) as err:
        raise DataError(f"{path} is not usable JSON ({err}): fix it, or write one object per line "
                        "in a .jsonl file") from err
    if not isinstance(data, list):
        found = f"an object with keys {sorted(data)[:10]}" if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a JSON list of objects, found {found}")
    return [(f"item {i}", rec) for i, rec in enumerate(data)]


def _read_csv(path: Path, text: str, malformed: _Malformed) -> list[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        for row in reader:
            where = f"line {reader.line_num}"
            if None in row:
                malformed.add(where, "wrong number of CSV fields: more values than header columns")
                continue
            records.append((where, {k.strip(): v for k, v in row.items() if k is not None}))
    except csv.Error as err:
        raise DataError(f"{path} is not a readable CSV file (line {reader.line_num}: {err})") from err
    return records


def _read_hub(spec: str) -> list[tuple[str, Any]]:
    """A Hub data set's rows; offline this fails at once (no retries) with the local alternatives."""
    import datasets  # imported here: ~1 s, and only Hub ids need it

    try:
        loaded = datasets.load_dataset(spec)
    except Exception as err:  # datasets raises many unrelated types (ConnectionError, FileNotFoundError, ...)
        why = ("the Hugging Face Hub is unreachable (offline) and it is not in the local cache"
               if hub.is_offline() else f"{type(err).__name__}: {err}")
        raise DataError(f"cannot load data set '{spec}': {why}. It is not a local file either. "
                        f"{local_alternatives()}") from err
    splits = list(loaded)
    name = "train" if "train" in splits else splits[0] if len(splits) == 1 else None
    if name is None:
        raise DataError(f"data set '{spec}' has splits {splits} and none is 'train'; save the one you "
                        "want as a local .jsonl file and pass its path")
    log.info("using split '%s' of %s (%d rows)", name, spec, len(loaded[name]))
    return [(f"row {i}", rec) for i, rec in enumerate(loaded[name].to_list())]


def _to_prompts(records: list[tuple[str, Any]], source: str, stem: str,
                malformed: _Malformed) -> tuple[list[Prompt], int]:
    """Records -> unique prompts in the records' order; counts duplicates, skips malformed records."""
    keys = set().union(*(rec.keys() for _, rec in records if isinstance(rec, dict)))
    prompt_field = next((f for f in PROMPT_FIELDS if f in keys), None)
    if prompt_field is None and keys:
        raise DataError(f"{source}: no recognisable prompt field; found fields {sorted(map(str, keys))[:20]}, "
                        f"accepted: {', '.join(PROMPT_FIELDS)} (Dolly: instruction/context/response, "
                        "Alpaca: instruction/input/output). Rename the prompt column to one of them")
    prompts: list[Prompt] = []
    seen_texts: set[str] = set()
    seen_ids: set[str] = set()
    n_duplicates = 0
    for where, record in records:
        try:
            prompt = _to_prompt(record, prompt_field, source, stem)
        except _Skip as skip:
            malformed.add(where, str(skip))
            continue
        key = normalise(prompt.text)
        if key in seen_texts:
            n_duplicates += 1
            continue
        seen_texts.add(key)
        if prompt.id in seen_ids:  # ids key per-prompt caches and records, so they must be unique
            prompt = replace(prompt, id=f"{prompt.id}-{_digest(key)}")
        seen_ids.add(prompt.id)
        prompts.append(prompt)
    if not prompts:
        if malformed.count:
            hint = (" The file does not look like UTF-8: re-encode it (e.g. `iconv -f latin1 -t utf-8`)."
                    if malformed.reasons.get("not UTF-8") == malformed.count else "")
            raise DataError(f"{source}: no usable prompts; {malformed.summary()}. Fix those records.{hint}")
        raise DataError(f"{source} contains no prompts: fill it with records or pick another data set")
    if malformed.count:
        log.warning("%s: %s", source, malformed.summary())
    return prompts, n_duplicates


def _to_prompt(record: Any, prompt_field: str | None, source: str, stem: str) -> Prompt:
    if isinstance(record, _NotUtf8):
        raise _Skip("not UTF-8: invalid bytes replaced in its text")
    if not isinstance(record, dict):
        raise _Skip(f"wrong type: expected an object, got {type(record).__name__}")
    main = _text(record, prompt_field) if prompt_field else ""
    if not main:
        raise _Skip(f"missing prompt: '{prompt_field}' is absent or empty")
    context = next((c for c in (_text(record, f) for f in CONTEXT_FIELDS) if c), None)
    text = f"{main}\n\n{context}" if context else main
    reference = next((r for r in (_text(record, f, numbers=True) for f in REFERENCE_FIELDS) if r), None)
    category = _text(record, "category") or None
    raw_id = record.get("id")
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        raise _Skip(f"wrong type: 'id' is {type(raw_id).__name__}, expected a string or integer")
    prompt_id = str(raw_id) if raw_id not in (None, "") else f"{stem}-{_digest(normalise(text))}"
    return Prompt(prompt_id, text, category, reference, source)


def _text(record: dict, name: str, numbers: bool = False) -> str:
    """A field as stripped text; other types make the record malformed (a numeric answer may be a number)."""
    value = record.get(name)
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _Skip(f"wrong type: '{name}' is {type(value).__name__}, expected text")


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=5).hexdigest()
