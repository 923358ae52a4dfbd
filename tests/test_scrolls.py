import json
import math
from pathlib import Path

import pytest

from evaluation import scrolls
from evaluation import scrolls_metrics as m
from tests.evaluation_helpers import InductionLM, TinyConfig, char_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "scrolls"


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
    assert totals["f1"] == totals["score"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    totals, _ = m.score_examples("rouge", ["The cat sat on the mat."], [["A cat sat on a mat today.", "dog"]])
    r1, r2, rl = 800 / 13, 400 / 11, 800 / 13
    assert (totals["rouge1"], totals["rouge2"], totals["rougeL"]) == pytest.approx((r1, r2, rl))
    assert totals["score"] == pytest.approx((r1 * r2 * rl) ** (1 / 3))
    with pytest.raises(ValueError, match="Unknown metric"):
        m.score_examples("bleu", ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 predictions for 1"):
        m.score_examples("f1", ["a", "b"], [["a"]])


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
    assert (out / "scrolls.png").read_bytes()[:4] == b"\x89PNG"

    with pytest.raises(ValueError, match="Unknown SCROLLS task"):
        scrolls.main(args + ["--tasks", "arxiv"])
    with pytest.raises(ValueError, match="TASK=PATH"):
        scrolls.main(args + ["--tasks", "qasper", "quality", "--data-files", str(FIXTURES / "qasper.jsonl")])
    with pytest.raises(FileNotFoundError, match="not found"):
        scrolls.main(args + ["--tasks", "qasper", "--data-files", str(tmp_path / "missing.jsonl")])
