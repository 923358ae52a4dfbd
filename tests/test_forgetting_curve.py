import json
import math
import random

import pytest
import torch

from evaluation import forgetting_curve as fc
from tests.evaluation_helpers import (
    BigramLM,
    InductionLM,
    PositionOracleLM,
    RecallOrEvenLM,
    TinyConfig,
    char_tokenizer,
    markov_corpus,
)

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
        fc.main(args + ["--max-length", "120", "--overwrite"])
    with pytest.raises(FileNotFoundError):
        fc.main(["--model", str(model_dir), "--output-dir", str(out), "--max-length", "16", "--text-files", "nope.txt"])


# ----------------------------------------------------------------------------------------------- both protocols
EOS = 2
N = 60
CORPUS = torch.arange(3, 3 + N)  # distinct tokens 3..62: recall is exact, parity decides the rest


def t_cdf_df3(t: float) -> float:
    """Student's t CDF with 3 degrees of freedom in closed form (no scipy): 1/2 + (x/(1+x^2) + atan x)/pi."""
    x = t / math.sqrt(3)
    return 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi


def test_paper_grid_is_draw_py_grid():
    # np.linspace(8, 100, 5, dtype=int): 8 + 23k, truncated, duplicates kept.
    assert fc.paper_length_grid(100, 5, "linear") == [8, 31, 54, 77, 100]
    assert fc.paper_length_grid(10, 4, "linear") == [8, 8, 9, 10]  # 8, 8.67, 9.33, 10 truncated
    # np.unique(np.geomspace(8, 4096, 10, dtype=int)): 8·2^k, but 8·2 comes out as 15.99... and truncates to 15.
    assert fc.paper_length_grid(4096, 10, "log") == [8, 15, 31, 63, 127, 255, 511, 1023, 2047, 4096]
    with pytest.raises(ValueError, match="at least 8"):
        fc.paper_length_grid(7, 4)
    with pytest.raises(ValueError, match="scale"):
        fc.paper_length_grid(100, 4, "cubic")


def test_paper_corpus_is_one_newline_joined_stream_with_the_tokenizers_specials():
    from tokenizers import processors

    tokenizer = char_tokenizer()
    newline, a, b, c = (tokenizer.convert_tokens_to_ids(char) for char in "\nabc")
    assert fc.paper_corpus(tokenizer, ["ab", "c"]).tolist() == [a, b, newline, c, newline]
    assert fc.tokenize_corpus(tokenizer, ["ab", "c"]).tolist() == [a, b, c]  # default: no separator
    # A tokenizer that adds BOS to every call adds it before every document, as draw.py's tokenizer(text) does.
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert fc.paper_corpus(tokenizer, ["ab", "c"]).tolist() == [1, a, b, newline, 1, c, newline]
    with pytest.raises(ValueError, match="empty"):
        fc.paper_corpus(tokenizer, [])


def test_paper_spans_follow_python_random_after_seeding():
    starts = fc.paper_span_starts(N, [8, 9], samples=4, seed=0)
    assert starts == [[24, 26, 2, 16], [32, 31, 25, 19]]
    random.seed(0)  # draw.py: random.seed(seed), then randint(0, N - 3L) per sample, length after length
    assert starts == [[random.randint(0, N - 3 * length) for _ in range(4)] for length in (8, 9)]
    assert fc.paper_span_starts(N, [20], 1, seed=5)[0][0] == 0  # N - 3L = 0: the only start
    with pytest.raises(ValueError, match="N >= 3L"):
        fc.paper_span_starts(N, [8, 21], 1, seed=0)


def test_paper_inputs_end_with_eos_and_score_before_it():
    copy_ids, lm_ids = fc.paper_inputs(BOS, EOS, torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]))
    assert copy_ids.tolist() == [[1, 5, 6, 7, 1, 5, 6, 7, 2]]
    assert lm_ids.tolist() == [[1, 8, 9, 10, 1, 5, 6, 7, 2]]
    for length in (8, 9):
        total, scored = 2 * length + 3, math.ceil(length / 2)
        ids = torch.randint(3, 100, (1, total))
        # Scored targets are the h tokens before the trailing EOS: indices T-1-h .. T-2.
        window = PositionOracleLM(TinyConfig(), lambda target, T, h=scored: T - 1 - h <= target < T - 1)
        assert fc.second_half_accuracy(window, ids, length, trailing=1) == 1.0
        eos_only = PositionOracleLM(TinyConfig(), lambda target, T: target == T - 1)
        assert fc.second_half_accuracy(eos_only, ids, length, trailing=1) == 0.0


def test_paper_protocol_spans_and_statistics_by_hand():
    model = RecallOrEvenLM(TinyConfig(vocab_size=128))
    rows = fc.measure(model, CORPUS, BOS, [8, 9], samples=4, seed=0, progress=False, protocol="paper", eos_id=EOS)
    assert rows["x_start"] == [[24, 26, 2, 16], [32, 31, 25, 19]]
    assert rows["r_start"] == [[52] * 4, [51] * 4]  # R: always the last L tokens of the stream
    # First sample: X = corpus[24:32] = tokens 27..34, R = corpus[52:60] = tokens 55..62; copy then LM input.
    x, r = list(range(27, 35)), list(range(55, 63))
    assert model.inputs[0] == [1, *x, 1, *x, 2]
    assert model.inputs[1] == [1, *r, 1, *x, 2]
    assert len(model.inputs) == 16
    # Copy: every scored token was seen in the first X. LM: right on even tokens only. L = 8 scores 4
    # consecutive tokens (always 2 even); L = 9 scores tokens s+7 .. s+11 (3 even if s is odd, else 2).
    assert rows["copy"] == [[1.0] * 4, [1.0] * 4]
    assert rows["lm"][0] == [0.5] * 4
    assert rows["lm"][1] == pytest.approx([0.4, 0.6, 0.6, 0.6])  # float32 means, as draw.py's .float().mean()
    summary = fc.summarise([8, 9], rows, protocol="paper")
    first, second = summary["per_length"]
    assert first["p_value"] == 0.0  # constant gap: t = inf
    assert second["lm_mean"] == pytest.approx(0.55)
    assert second["lm_std"] == pytest.approx(math.sqrt((0.15**2 + 3 * 0.05**2) / 4))  # population std
    assert second["copy_std"] == 0.0
    # Differences 0.6, 0.4, 0.4, 0.4: mean 0.45, sample sd 0.1, t = 0.45 / (0.1 / 2) = 9, df 3, two-sided.
    assert second["p_value"] == pytest.approx(2 * (1 - t_cdf_df3(9.0)), rel=1e-5)
    assert second["x_start"] == [32, 31, 25, 19] and second["r_start"] == [51] * 4
    assert summary["protocol"] == "paper" and summary["t_test"] == "paired, two-sided"
    assert summary["fine_memory_length"] == 9 and summary["coarse_memory_length"] == 9


def test_default_protocol_spans_and_statistics_by_hand():
    model = RecallOrEvenLM(TinyConfig(vocab_size=128))
    rows = fc.measure(model, CORPUS, BOS, [8, 9], samples=4, seed=0, progress=False)
    # numpy's default_rng(0): X anywhere in [0, N - L], R a disjoint span of the same length.
    assert rows["x_start"] == [[45, 27, 16, 3], [9, 33, 26, 50]]
    assert rows["r_start"] == [[24, 10, 1, 11], [45, 48, 38, 30]]
    x, r = list(range(48, 56)), list(range(27, 35))
    assert model.inputs[0] == [1, *x, 1, *x]  # no EOS
    assert model.inputs[1] == [1, *r, 1, *x]
    assert rows["lm"][0] == [0.5] * 4
    assert rows["lm"][1] == pytest.approx([0.6, 0.6, 0.4, 0.4])  # X starts 9, 33 odd; 26, 50 even
    second = fc.summarise([8, 9], rows)["per_length"][1]
    assert second["lm_std"] == pytest.approx(0.2 / math.sqrt(3))  # sample std of 0.6, 0.6, 0.4, 0.4
    # Differences 0.4, 0.4, 0.6, 0.6: mean 0.5, sd 0.2/sqrt(3), t = 5*sqrt(3), df 3, one-sided.
    assert second["p_value"] == pytest.approx(1 - t_cdf_df3(5 * math.sqrt(3)), rel=1e-5)
    assert fc.summarise([8, 9], rows)["per_length"][0]["p_value"] == 0.0


def test_paper_statistics_on_a_small_table():
    copy, lm = [1.0, 0.5, 0.75], [0.25, 0.5, 0.0]
    # Population std of copy: sqrt((0.25^2 + 0.25^2 + 0) / 3); sample std: sqrt(0.125 / 2) = 0.25.
    paper = fc.summarise([8], {"copy": [copy], "lm": [lm]}, protocol="paper")["per_length"][0]
    default = fc.summarise([8], {"copy": [copy], "lm": [lm]})["per_length"][0]
    assert paper["copy_std"] == pytest.approx(math.sqrt(0.125 / 3)) and default["copy_std"] == pytest.approx(0.25)
    # Differences 0.75, 0, 0.75: t = 0.5 / (sqrt(0.1875) / sqrt(3)) = 2 with 2 degrees of freedom, whose CDF is
    # 1/2 + t / (2 sqrt(2 + t^2)): two-sided p = 1 - 2/sqrt(6), one-sided half of it.
    assert paper["p_value"] == pytest.approx(1 - 2 / math.sqrt(6))
    assert default["p_value"] == pytest.approx((1 - 2 / math.sqrt(6)) / 2)
    # Undefined tests: draw.py turns NaN into 1.
    single = fc.summarise([8], {"copy": [[1.0]], "lm": [[0.0]]}, protocol="paper")["per_length"][0]
    assert single["p_value"] == 1.0 and single["copy_std"] == 0.0
    same = fc.summarise([8], {"copy": [[0.5, 0.5]], "lm": [[0.5, 0.5]]}, protocol="paper")["per_length"][0]
    assert same["p_value"] == 1.0
    with pytest.raises(ValueError, match="protocol"):
        fc.summarise([8], {"copy": [copy], "lm": [lm]}, protocol="authors")
    with pytest.raises(ValueError, match="eos_id"):
        fc.measure(InductionLM(TinyConfig()), CORPUS, BOS, [8], protocol="paper", progress=False)


def test_command_line_paper_protocol(tmp_path):
    model_dir = tmp_path / "model"
    InductionLM(TinyConfig(max_position_embeddings=200)).save_pretrained(model_dir)
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(model_dir)
    (model_dir / "config.json").write_text(
        json.dumps({**json.loads((model_dir / "config.json").read_text()), "architectures": ["InductionLM"]})
    )
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("tiny_eval", TinyConfig, exist_ok=True)
    AutoModelForCausalLM.register(TinyConfig, InductionLM, exist_ok=True)
    docs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    docs[0].write_text("the quick brown fox jumps over the lazy dog. " * 4)
    docs[1].write_text("a cat sleeps in the warm afternoon sun. " * 4)
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--output-dir", str(out), "--text-files", *map(str, docs), "--no-progress"]
    result = fc.main(args + ["--protocol", "paper", "--max-length", "40", "--num-points", "4", "--samples", "3"])
    saved = json.loads((out / "forgetting_curve.json").read_text())
    corpus_tokens = len(docs[0].read_text()) + len(docs[1].read_text()) + 2  # one char per token, plus two "\n"
    assert saved["protocol"] == "paper" and saved["grid"] == "linear" and saved["complete"]
    assert saved["lengths"] == [8, 18, 29, 40] == result["lengths"]  # np.linspace(8, 40, 4, dtype=int)
    assert saved["bos_token_id"] == 1 and saved["eos_token_id"] == 2 and saved["corpus_tokens"] == corpus_tokens
    random.seed(0)
    for row in saved["per_length"]:
        assert row["x_start"] == [random.randint(0, corpus_tokens - 3 * row["length"]) for _ in range(3)]
        assert row["r_start"] == [corpus_tokens - row["length"]] * 3
        assert row["copy"] == [1.0] * 3
    assert saved["std"] == "population (ddof 0)" and saved["fine_memory_length"] == 40
    with pytest.raises(ValueError, match="2\\*99\\+3 = 201 tokens.*--max-length 98"):
        fc.main(args + ["--protocol", "paper", "--max-length", "99", "--overwrite"])
    with pytest.raises(ValueError, match="starts at 8"):
        fc.main(args + ["--protocol", "paper", "--max-length", "40", "--min-length", "16"])
    with pytest.raises(ValueError, match="N >= 3L"):
        fc.main(args[:-3] + [str(docs[0]), "--no-progress", "--protocol", "paper", "--max-length", "98",
                             "--allow-beyond-max-positions", "--overwrite"])  # fmt: skip
