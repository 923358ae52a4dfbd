"""The SCROLLS metrics in pure Python, computed as the official scorer computes them.

- ROUGE (GovReport, SummScreenFD, QMSum): the prediction and every reference are first split into
  sentences and re-joined with newlines (``"\\n".join(nltk.sent_tokenize(text))``, as the official
  ``metrics/rouge.py`` does). Tokenisation as ``rouge_score`` without stemming: lowercase, runs of
  ``[a-z0-9]``. ROUGE-N F1 from clipped n-gram counts, ROUGE-L F1 from the longest common subsequence,
  ROUGE-Lsum F1 from the summary-level union LCS over the newline-separated sentences (``rouge_score``'s
  algorithm, tie-breaking included). The task score is the geometric mean of ROUGE-1, -2 and -L
  (ROUGE-Lsum is reported, not scored).
- F1 / EM (Qasper, NarrativeQA / QuALITY, ContractNLI): SQuAD normalisation (lowercase, drop punctuation
  and the articles a/an/the, squeeze spaces).
- With several references the best score per example is kept, separately for each metric. Aggregates are
  ×100 and rounded to 4 decimals, in the official order of operations (the geometric mean is taken before
  rounding). The SCROLLS score is the plain mean of the seven rounded task scores.
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)

# The seven tasks in the order the official benchmark evaluator averages them.
SCROLLS_TASKS = ("gov_report", "summ_screen_fd", "qmsum", "narrative_qa", "qasper", "quality", "contract_nli")
ROUND_DIGITS = 4


# ----------------------------------------------------------------------------------------------- sentences
@lru_cache(maxsize=1)
def sentence_splitter() -> tuple[Callable[[str], list[str]], str]:
    """``(split, name)``: NLTK's English Punkt model (``nltk.sent_tokenize``, what the official metric uses)
    when its data is installed, else NLTK's Punkt algorithm without trained parameters, with a warning."""
    try:
        import nltk
        from nltk.tokenize.punkt import PunktSentenceTokenizer
    except ImportError as error:  # pragma: no cover - nltk is a dependency of this package
        raise ImportError("ROUGE-Lsum splits sentences with NLTK: pip install nltk") from error
    try:
        nltk.sent_tokenize("Probe. Probe.")  # loads the English model (punkt_tab, or punkt on older NLTK)
        return nltk.sent_tokenize, "nltk.sent_tokenize (Punkt, English model)"
    except LookupError:
        pass
    warnings.warn(
        "NLTK's English Punkt model is not installed (python -m nltk.downloader punkt_tab); ROUGE-Lsum splits "
        "sentences with untrained Punkt, which may split after abbreviations such as 'Dr.' where the official "
        "metric does not. ROUGE-1/2/L and the SCROLLS score do not depend on it.",
        stacklevel=2,
    )
    return PunktSentenceTokenizer().tokenize, "nltk Punkt without trained parameters (English model not installed)"


def split_sentences(text: str) -> str:
    """One sentence per line, as the official ``postprocess_text`` prepares text for ROUGE-Lsum."""
    split, _ = sentence_splitter()
    return "\n".join(split(text))


# ----------------------------------------------------------------------------------------------- rouge
def rouge_tokens(text: str) -> list[str]:
    return _ROUGE_TOKEN.findall(text.lower())


def _f1(overlap: int, predicted: int, reference: int) -> float:
    if overlap == 0 or predicted == 0 or reference == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F1 with clipped n-gram counts."""
    predicted, expected = _ngrams(rouge_tokens(prediction), n), _ngrams(rouge_tokens(reference), n)
    overlap = sum((predicted & expected).values())
    return _f1(overlap, sum(predicted.values()), sum(expected.values()))


def lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(first)·len(second)) time, O(len(second)) memory."""
    if len(second) > len(first):
        first, second = second, first
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0]
        for j, other in enumerate(second):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 from the longest common subsequence of the two token lists."""
    predicted, expected = rouge_tokens(prediction), rouge_tokens(reference)
    return _f1(lcs_length(predicted, expected), len(predicted), len(expected))


def lcs_indices(reference: Sequence[str], candidate: Sequence[str]) -> list[int]:
    """Indices into ``reference`` of one longest common subsequence, chosen as ``rouge_score`` chooses it
    (full table, backtracking from the end, moving left only when that keeps a strictly longer LCS)."""
    rows, cols = len(reference), len(candidate)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            if reference[i - 1] == candidate[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    indices, i, j = [], rows, cols
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            indices.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return indices[::-1]


def rouge_lsum(prediction: str, reference: str) -> float:
    """Summary-level ROUGE-L F1 (ROUGE-Lsum) over newline-separated sentences.

    For every reference sentence, the union of its LCS with each predicted sentence; a token counts as a hit
    only while both texts still have an unmatched copy of it (ROUGE 1.5.5's guard against double counting).
    """
    references = [rouge_tokens(line) for line in reference.split("\n") if line]
    predictions = [rouge_tokens(line) for line in prediction.split("\n") if line]
    reference_total, prediction_total = sum(map(len, references)), sum(map(len, predictions))
    if not reference_total or not prediction_total:
        return 0.0
    reference_left = Counter(token for sentence in references for token in sentence)
    prediction_left = Counter(token for sentence in predictions for token in sentence)
    hits = 0
    for sentence in references:
        union = sorted(set().union(*(lcs_indices(sentence, other) for other in predictions)))
        for token in (sentence[index] for index in union):
            if reference_left[token] > 0 and prediction_left[token] > 0:
                hits += 1
                reference_left[token] -= 1
                prediction_left[token] -= 1
    return _f1(hits, prediction_total, reference_total)


# ----------------------------------------------------------------------------------------------- f1 / em
def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    return _f1(overlap, len(predicted), len(expected))


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


# ----------------------------------------------------------------------------------------------- aggregation
def best_over_references(metric: Callable[[str, str], float], prediction: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("An example needs at least one reference.")
    return max(metric(prediction, reference) for reference in references)


METRIC_FUNCTIONS: dict[str, dict[str, Callable[[str, str], float]]] = {
    "rouge": {
        "rouge1": lambda p, r: rouge_n(p, r, 1),
        "rouge2": lambda p, r: rouge_n(p, r, 2),
        "rougeL": rouge_l,
        "rougeLsum": rouge_lsum,
    },
    "f1": {"f1": token_f1},
    "exact_match": {"exact_match": exact_match},
}


def score_examples(
    kind: str, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Aggregate scores and per-example scores (0–1, unrounded).

    Aggregates are ×100 and rounded to 4 decimals as the official metric rounds them; ``score`` is the task's
    headline number (ROUGE: ``geometric_mean`` of ROUGE-1/2/L, taken before rounding). ROUGE texts are split
    into sentences first (see :func:`split_sentences`).
    """
    if kind not in METRIC_FUNCTIONS:
        raise ValueError(f"Unknown metric {kind!r}; choose from {sorted(METRIC_FUNCTIONS)}.")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists.")
    if not predictions:
        raise ValueError("Nothing to score.")
    functions = METRIC_FUNCTIONS[kind]
    if kind == "rouge":
        predictions = [split_sentences(prediction) for prediction in predictions]
        references = [[split_sentences(reference) for reference in refs] for refs in references]
    per_example = [
        {name: best_over_references(function, prediction, refs) for name, function in functions.items()}
        for prediction, refs in zip(predictions, references, strict=True)
    ]
    if kind == "rouge":
        # Official: each pair's F-measure ×100, best per example, then sum(...) / n; geometric mean unrounded.
        means = {name: sum(100 * s[name] for s in per_example) / len(per_example) for name in functions}
        means["geometric_mean"] = (means["rouge1"] * means["rouge2"] * means["rougeL"]) ** (1.0 / 3.0)
        totals = {name: round(value, ROUND_DIGITS) for name, value in means.items()}
        totals["score"] = totals["geometric_mean"]
    else:
        # Official compute_f1 / compute_exact_match: a running total, then 100.0 * total / n.
        name = next(iter(functions))
        total = 0.0
        for scores in per_example:
            total += scores[name]
        totals = {name: round(100.0 * total / len(per_example), ROUND_DIGITS)}
        totals["score"] = totals[name]
    return totals, per_example


def scrolls_score(task_scores: Mapping[str, float]) -> float | None:
    """The SCROLLS score: the mean of the seven tasks' (rounded) scores, or ``None`` unless all seven are there."""
    if any(task not in task_scores for task in SCROLLS_TASKS):
        return None
    return sum([task_scores[task] for task in SCROLLS_TASKS]) / len(SCROLLS_TASKS)
