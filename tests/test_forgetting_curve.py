import json
import math

import pytest
import torch

from evaluation import forgetting_curve as fc
from tests.evaluation_helpers import BigramLM, InductionLM, PositionOracleLM, TinyConfig, char_tokenizer, markov_corpus

BOS = 1
LENGTHS = [8, 13, 21, 34, 55]


def bigram_table(corpus: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Most frequent successor of each token in the corpus: the best a context-blind model can do."""
    counts = torch.zeros(vocab_size, vocab_size)
    counts.index_put_((corpus[:-1], corpus[1:]), torch.ones(len(corpus) - 1), accumulate=True)
    return counts.argmax(1)


def test_length_grid_log_and_linear():
    log_grid = fc.length_grid(4096, 32, "log")
    assert log_grid[0] == 8 and log_grid[-1] == 4096 and log_grid == sorted(set(log_grid))
    assert 25 <= len(log_grid) <= 32
    assert fc.length_grid(80, 10, "linear") == [8, 16, 24, 32, 40, 48, 56, 64, 72, 80]


@pytest.mark.parametrize(
    "bad", [dict(max_length=7), dict(max_length=100, scale="cubic"), dict(max_length=9, min_length=4)]
)
def test_length_grid_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        fc.length_grid(num_points=8, **bad)


def test_inputs_follow_the_design():
    span, unrelated = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
    copy_ids, lm_ids = fc.copy_and_lm_inputs(BOS, span, unrelated)
    assert copy_ids.tolist() == [[1, 5, 6, 7, 1, 5, 6, 7]]
    assert lm_ids.tolist() == [[1, 8, 9, 10, 1, 5, 6, 7]]


@pytest.mark.parametrize("length", [8, 9, 15])
@pytest.mark.parametrize("logits_to_keep", [True, False])
def test_scoring_reads_exactly_the_last_half_of_the_second_span(length, logits_to_keep):
    total = 2 * length + 2
    scored = math.ceil(length / 2)

    def build(rule):
        model = PositionOracleLM(TinyConfig(), rule)
        if not logits_to_keep:  # the generic path: full logits, sliced here
            forward = model.forward
            model.forward = lambda input_ids, attention_mask=None: forward(input_ids, attention_mask)
        return model

    ids = torch.randint(3, 100, (1, total))
    inside = build(lambda target, T: target >= T - scored)
    outside = build(lambda target, T: target < T - scored)
    even = build(lambda target, T: target % 2 == 0)
    assert fc.second_half_accuracy(inside, ids, length) == 1.0
    assert fc.second_half_accuracy(outside, ids, length) == 0.0
    expected = sum(1 for target in range(total - scored, total) if target % 2 == 0) / scored
    assert fc.second_half_accuracy(even, ids, length) == pytest.approx(expected)


def test_spans_are_disjoint_and_corpus_size_is_checked():
    import numpy as np

    generator = np.random.default_rng(0)
    for _ in range(200):
        a, b = fc.sample_spans(100, 30, generator)
        assert 0 <= a <= 70 and 0 <= b <= 70 and (a + 30 <= b or b + 30 <= a)
    with pytest.raises(ValueError, match="too few"):
        fc.sample_spans(50, 30, generator)


def test_perfect_copier_has_copy_accuracy_one_and_full_memory():
    corpus = markov_corpus(3000)
    model = InductionLM(TinyConfig())
    accuracies = fc.measure(model, corpus, BOS, LENGTHS, samples=6, seed=1, progress=False)
    summary = fc.summarise(LENGTHS, accuracies)
    assert all(value == 1.0 for row in accuracies["copy"] for value in row)
    assert all(row["lm_mean"] < 0.9 for row in summary["per_length"])
    assert summary["fine_memory_length"] == LENGTHS[-1]
    assert summary["coarse_memory_length"] == LENGTHS[-1]
    # Each forward saw the full 2L+2 input, once for copy and once for LM.
    assert model.forward_lengths == [2 * L + 2 for L in LENGTHS for _ in range(12)]


def test_context_blind_model_has_equal_curves_and_no_memory():
    corpus = markov_corpus(3000)
    model = BigramLM(TinyConfig(), bigram_table(corpus, 103))
    accuracies = fc.measure(model, corpus, BOS, LENGTHS, samples=6, seed=1, progress=False)
    summary = fc.summarise(LENGTHS, accuracies)
    assert accuracies["copy"] == accuracies["lm"]
    assert all(0.2 < row["copy_mean"] < 0.9 for row in summary["per_length"])
    assert all(row["p_value"] == 1.0 for row in summary["per_length"])
    assert summary["fine_memory_length"] == 0 and summary["coarse_memory_length"] == 0


def test_memory_lengths_stop_at_the_first_failure():
    lengths = [8, 16, 32, 64]
    accuracies = {
        "copy": [[1.0, 1.0, 1.0], [1.0, 0.99, 1.0], [0.9, 0.8, 0.95], [1.0, 1.0, 1.0]],
        "lm": [[0.3, 0.2, 0.4], [0.3, 0.25, 0.35], [0.1, 0.2, 0.15], [1.0, 1.0, 1.0]],
    }
    summary = fc.summarise(lengths, accuracies, copy_threshold=0.99, alpha=0.05)
    assert summary["fine_memory_length"] == 16  # 32 falls below 0.99 (and 64 after it does not count)
    assert summary["coarse_memory_length"] == 32  # 64: copy == LM, not significant
    from scipy import stats

    assert summary["per_length"][1]["p_value"] == pytest.approx(
        stats.ttest_rel([1.0, 0.99, 1.0], [0.3, 0.25, 0.35], alternative="greater").pvalue
    )
    assert summary["per_length"][0]["copy_std"] == 0.0


def test_command_line_writes_json_and_png(tmp_path):
    model_dir = tmp_path / "model"
    InductionLM(TinyConfig(max_position_embeddings=200)).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog while a cat sleeps in the sun. " * 20)
    (model_dir / "config.json").write_text(
        json.dumps({**json.loads((model_dir / "config.json").read_text()), "architectures": ["InductionLM"]})
    )
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("tiny_eval", TinyConfig, exist_ok=True)
    AutoModelForCausalLM.register(TinyConfig, InductionLM, exist_ok=True)
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--output-dir", str(out), "--text-files", str(text), "--no-progress"]
    result = fc.main(args + ["--max-length", "40", "--num-points", "4", "--samples", "3", "--train-length", "64"])
    saved = json.loads((out / "forgetting_curve.json").read_text())
    assert saved["lengths"] == result["lengths"] and saved["lengths"][0] == 8 and saved["lengths"][-1] == 40
    assert saved["bos_token_id"] == 1 and saved["fine_memory_length"] == 40 and saved["complete"]
    assert (out / "forgetting_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.tmp"))
    with pytest.raises(ValueError, match="exceeds the model's 200 positions"):
        fc.main(args + ["--max-length", "120"])
    with pytest.raises(FileNotFoundError):
        fc.main(["--model", str(model_dir), "--output-dir", str(out), "--max-length", "16", "--text-files", "nope.txt"])
