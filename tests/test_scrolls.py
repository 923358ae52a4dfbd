import json
import math
import random
from pathlib import Path

import pytest

from evaluation import scrolls
from evaluation import scrolls_metrics as m
from tests.evaluation_helpers import InductionLM, TinyConfig, char_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "scrolls"
# Without NLTK's English Punkt data (a separate download) ROUGE-Lsum warns once per process and uses untrained
# Punkt; test_sentence_splitter_falls_back_with_a_warning checks that warning.
pytestmark = pytest.mark.filterwarnings("ignore:NLTK's English Punkt model:UserWarning")


# ------------------------------------------------------------------ metrics against values computed by hand
def test_rouge_by_hand():
    prediction, reference = "The cat sat on the mat.", "A cat sat on a mat today."
    # unigrams: 6 vs 7 tokens, overlap {cat, sat, on, mat} = 4 -> F1 = 2*4/(6+7)
    assert m.rouge_n(prediction, reference, 1) == pytest.approx(8 / 13)
    # bigrams: 5 vs 6, overlap {cat sat, sat on} = 2 -> F1 = 2*2/(5+6)
    assert m.rouge_n(prediction, reference, 2) == pytest.approx(4 / 11)
    # LCS: cat sat on mat = 4 -> F1 = 2*4/(6+7)
    assert m.rouge_l(prediction, reference) == pytest.approx(8 / 13)


def test_rouge_tokenisation_clipping_and_edge_cases():
    assert m.rouge_tokens("Hello, WORLD! it's 2024-05") == ["hello", "world", "it", "s", "2024", "05"]
    # "the" x3 against one "the": clipped overlap 1 -> F1 = 2*1/(3+2)
    assert m.rouge_n("the the the", "the cat", 1) == pytest.approx(0.4)
    assert m.rouge_n("", "the cat", 1) == 0.0 and m.rouge_l("!!!", "cat") == 0.0
    assert m.rouge_n("one", "one", 2) == 0.0  # no bigrams at all
    assert m.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert m.lcs_length(list("BDCABA"), list("ABCBDAB")) == 4


def test_squad_f1_and_exact_match_by_hand():
    assert m.normalize_answer("The  Eiffel Tower, in Paris!") == "eiffel tower in paris"
    # 4 vs 2 tokens, overlap 2 -> F1 = 2*2/(4+2)
    assert m.token_f1("The Eiffel Tower, in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    assert m.token_f1("The Eiffel Tower, in Paris", "Paris, France") == pytest.approx(1 / 3)
    assert m.token_f1("an", "the") == 0.0
    assert m.exact_match("Entailment.", "entailment") == 1.0
    assert m.exact_match("An apple", "apple") == 1.0
    assert m.exact_match("Not mentioned", "Contradiction") == 0.0


def test_aggregation_takes_best_reference_and_geometric_mean():
    totals, per_example = m.score_examples(
        "f1", ["The Eiffel Tower, in Paris", "no"], [["Paris, France", "Eiffel Tower"], ["No"]]
    )
    assert per_example == [{"f1": pytest.approx(2 / 3)}, {"f1": 1.0}]
    assert totals["f1"] == totals["score"] == 83.3333  # 100 * (2/3 + 1) / 2 = 83.33333..., rounded to 4 decimals
    totals, per_example = m.score_examples("rouge", ["The cat sat on the mat."], [["A cat sat on a mat today.", "dog"]])
    r1, r2, rl = 800 / 13, 400 / 11, 800 / 13  # 61.538461..., 36.363636..., 61.538461...
    assert (totals["rouge1"], totals["rouge2"], totals["rougeL"]) == (61.5385, 36.3636, 61.5385)
    assert totals["rougeLsum"] == 61.5385  # one sentence each: summary-level LCS = LCS
    # The geometric mean is taken before rounding (official order): 51.9615... from the unrounded means.
    assert totals["score"] == totals["geometric_mean"] == round((r1 * r2 * rl) ** (1 / 3), 4)
    assert per_example[0]["rouge1"] == pytest.approx(8 / 13)  # per-example scores stay unrounded, 0-1
    with pytest.raises(ValueError, match="Unknown metric"):
        m.score_examples("bleu", ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        m.score_examples("f1", ["a", "b"], [["a"]])


def test_rouge_lsum_by_hand():
    # Sentences in swapped order: ROUGE-L finds one 3-token LCS (F1 = 2*3/12); ROUGE-Lsum unites the LCS of
    # the reference sentence with each predicted sentence and finds all 6 tokens.
    prediction, reference = "on the mat\nthe cat sat", "the cat sat on the mat"
    assert m.rouge_l(prediction, reference) == pytest.approx(0.5)
    assert m.rouge_lsum(prediction, reference) == 1.0
    # No double counting: "the cat" predicted once, referenced twice -> 2 hits; P = 2/2, R = 2/4, F1 = 2/3.
    assert m.rouge_lsum("the cat", "the cat\nthe cat") == pytest.approx(2 / 3)
    # Empty lines are dropped; texts without tokens score 0.
    assert m.rouge_lsum("\n\nthe cat\n", "the cat") == 1.0
    assert m.rouge_lsum("!!!", "the cat") == 0.0 and m.rouge_lsum("the cat", "") == 0.0
    # rouge_score's tie-break: of the LCS candidates, backtracking keeps the reference's last match.
    assert m.lcs_indices(["a", "b", "a"], ["a"]) == [2]
    assert m.lcs_indices(["a", "b", "c", "b"], ["b", "c"]) == [1, 2]


def test_sentences_are_split_before_rouge_lsum(monkeypatch):
    assert m.split_sentences("The cat sat. The dog ran!  Where is it?") == "The cat sat.\nThe dog ran!\nWhere is it?"
    # score_examples splits predictions and references: these two sentences in swapped order score 1.0
    # only because each became its own line.
    totals, _ = m.score_examples("rouge", ["On the mat. The cat sat."], [["The cat sat on the mat."]])
    assert totals["rougeLsum"] == 100.0 and totals["rougeL"] == 50.0
    # The official splitter is nltk.sent_tokenize (English Punkt) whenever its model is installed.
    import nltk

    monkeypatch.setattr(nltk, "sent_tokenize", lambda text: text.split(" | "))
    m.sentence_splitter.cache_clear()
    try:
        assert m.sentence_splitter()[1].startswith("nltk.sent_tokenize")
        assert m.split_sentences("one | two") == "one\ntwo"
    finally:
        m.sentence_splitter.cache_clear()


def test_sentence_splitter_falls_back_with_a_warning(monkeypatch):
    import nltk

    def missing(text):
        raise LookupError("Resource punkt_tab not found.")

    monkeypatch.setattr(nltk, "sent_tokenize", missing)
    m.sentence_splitter.cache_clear()
    try:
        with pytest.warns(UserWarning, match="English Punkt model is not installed"):
            split, name = m.sentence_splitter()
        assert "without trained parameters" in name
        assert split("It rained. We stayed in.") == ["It rained.", "We stayed in."]
    finally:
        m.sentence_splitter.cache_clear()


def _random_text(generator: random.Random, vocabulary: list[str]) -> str:
    words = [generator.choice(vocabulary) for _ in range(generator.randint(0, 30))]
    pieces = []
    for word in words:
        pieces.append(word)
        pieces.append(generator.choice([" ", " ", " ", ", ", ". ", "\n", "\n\n", " - "]))
    return "".join(pieces)


def test_rouge_matches_rouge_score_without_stemming():
    """Our ROUGE-1/2/L/Lsum F1 against the rouge_score package (what the official metric wraps), no stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    generator = random.Random(0)
    wide = ["The", "cat", "sat", "on", "mat", "dog's", "RAN", "2024", "x1", "café", "naïve", "U.S.", "a", "an", "—"]
    narrow = ["a", "b", "c", "A", "b."]  # many repeats: LCS ties, union overlaps, double-count guard
    checked = 0
    for index in range(300):
        vocabulary = wide if index % 2 else narrow
        prediction, reference = _random_text(generator, vocabulary), _random_text(generator, vocabulary)
        expected = scorer.score(reference, prediction)
        ours = {
            "rouge1": m.rouge_n(prediction, reference, 1),
            "rouge2": m.rouge_n(prediction, reference, 2),
            "rougeL": m.rouge_l(prediction, reference),
            "rougeLsum": m.rouge_lsum(prediction, reference),
        }
        for name, value in ours.items():
            assert value == pytest.approx(expected[name].fmeasure, abs=1e-12), (name, prediction, reference)
        checked += ours["rougeLsum"] != ours["rougeL"]
    assert checked > 30  # the summary-level score really differs from ROUGE-L on many pairs


def test_scrolls_score_is_the_mean_of_the_seven_tasks():
    assert set(m.SCROLLS_TASKS) == set(scrolls.TASKS)
    scores = dict(zip(m.SCROLLS_TASKS, [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.5], strict=True))
    assert m.scrolls_score(scores) == pytest.approx(280.5 / 7)
    del scores["quality"]
    assert m.scrolls_score(scores) is None


# ------------------------------------------------------------------ data, prompts, end to end
def test_examples_group_references_by_id():
    examples = scrolls.load_examples("qasper", "validation", str(FIXTURES / "qasper.jsonl"))
    assert [example["id"] for example in examples] == ["q1", "q2"]
    assert examples[0]["references"] == ["Eiffel Tower", "Paris, France"]


def test_prompt_keeps_the_query_and_the_instruction_when_cut():
    tokenizer = char_tokenizer()
    task = scrolls.TASKS["qasper"]
    text = "Which tower?\n\n" + "filler " * 100
    full, cut = scrolls.build_prompt(tokenizer, task, text, None)
    assert not cut and tokenizer.decode(full) == f"{text}\n\n{task.instruction}\n{task.answer_prefix}"
    short, cut = scrolls.build_prompt(tokenizer, task, text, len(full) - 50)
    assert cut and len(short) == len(full) - 50
    assert tokenizer.decode(short).startswith("Which tower?") and short[-len(full) + len(text) :] == full[len(text) :]
    with pytest.raises(ValueError, match="no room"):
        scrolls.build_prompt(tokenizer, task, text, 10)


def test_summary_task_scored_with_rouge():
    """The copying model continues the document's 'Summary:' line; its 24 new tokens are the summary."""
    examples = scrolls.load_examples("gov_report", "validation", str(FIXTURES / "gov_report.jsonl"))
    result = scrolls.evaluate_task(
        InductionLM(TinyConfig()), char_tokenizer(), "gov_report", examples, None, max_new_tokens=24, progress=False
    )
    assert result["examples"][0]["prediction"] == "The cat sat on the mat."
    r1, r2, rl = 800 / 13, 400 / 11, 800 / 13
    assert result["metrics"]["score"] == pytest.approx((r1 * r2 * rl) ** (1 / 3))


def test_command_line_on_local_fixtures(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("tiny_eval", TinyConfig, exist_ok=True)
    AutoModelForCausalLM.register(TinyConfig, InductionLM, exist_ok=True)
    folder = tmp_path / "model"
    InductionLM(TinyConfig()).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    files = [f"qasper={FIXTURES / 'qasper.jsonl'}", f"contract_nli={FIXTURES / 'contract_nli.jsonl'}"]
    args = ["--model", str(folder), "--output-dir", str(out), "--no-progress"]
    scrolls.main(args + ["--tasks", "qasper", "contract_nli", "--data-files", *files])
    saved = json.loads((out / "scrolls.json").read_text())
    # qasper: "The Eiffel Tower, in Paris" (best of F1 2/3 and 1/3) and "no" vs "No" (F1 1).
    assert [e["prediction"] for e in saved["tasks"]["qasper"]["examples"]] == ["The Eiffel Tower, in Paris", "no"]
    assert saved["scores"]["qasper"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    # contract_nli: "Entailment." matches, "Not mentioned" does not match "Contradiction".
    assert saved["scores"]["contract_nli"] == pytest.approx(50.0)
    assert saved["tasks"]["qasper"]["max_input_tokens"] == 4096 - 32 and not math.isnan(saved["seconds"])
    assert saved["scrolls_score"] is None and saved["rouge_sentence_splitter"] is None  # two tasks, no ROUGE
    assert (out / "scrolls.png").read_bytes()[:4] == b"\x89PNG"

    # All seven tasks (any SCROLLS-format file serves any task): the SCROLLS score is their mean.
    gov, qasper, nli = (str(FIXTURES / f"{name}.jsonl") for name in ("gov_report", "qasper", "contract_nli"))
    files = {"gov_report": gov, "summ_screen_fd": gov, "qmsum": gov, "qasper": qasper, "narrative_qa": qasper,
             "quality": nli, "contract_nli": nli}  # fmt: skip
    everything = scrolls.main(
        args + ["--tasks", "all", "--max-new-tokens", "24", "--data-files", *(f"{t}={p}" for t, p in files.items()),
                "--overwrite"]
    )
    scores = everything["scores"]
    assert list(scores) == list(scrolls.TASKS) and scores["contract_nli"] == 50.0 and scores["qasper"] == 83.3333
    assert scores["gov_report"] == round((800 / 13 * 400 / 11 * 800 / 13) ** (1 / 3), 4)
    assert everything["scrolls_score"] == pytest.approx(sum(scores.values()) / 7)
    assert json.loads((out / "scrolls.json").read_text())["scrolls_score"] == everything["scrolls_score"]
    assert everything["rouge_sentence_splitter"].startswith("nltk")

    with pytest.raises(ValueError, match="Unknown SCROLLS task"):
        scrolls.main(args + ["--tasks", "arxiv"])
    with pytest.raises(ValueError, match="TASK=PATH"):
        scrolls.main(args + ["--tasks", "qasper", "quality", "--data-files", str(FIXTURES / "qasper.jsonl")])
    with pytest.raises(FileNotFoundError, match="not found"):
        scrolls.main(args + ["--tasks", "qasper", "--data-files", str(tmp_path / "missing.jsonl")])
