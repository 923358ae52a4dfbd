"""Recall training data for CoMeT: passkey retrieval and multi-key associative recall over real prose.

A memory learns to carry a fact across chunks only if training asks it to: these generators plant
facts at a controlled distance, in chunks, before the question that asks for them, and label the
answer tokens (optionally the text too, at a lower weight, for a denser signal that keeps language
modelling intact). A curriculum raises the distance as training goes (by step schedule or by answer
accuracy), and plain language-modelling samples can be mixed in.

Every sample is a pure function of ``(seed, index, curriculum stage)``, so a resumed run sees the same
data as an uninterrupted one. Samples are built lazily by a ``datasets.Dataset`` transform::

    stream = FillerStream.from_texts(texts, tokenizer)
    builder = RecallSampleBuilder(tokenizer, stream, chunk_size=256, task="passkey")
    curriculum = RecallCurriculum(max_distances=[1, 2, 4, 8], stage_steps=200)
    data = recall_dataset(builder, curriculum, num_rows=10_000, seed=0)
    data[0]  # {"input_ids": [...], "labels": [...], "label_weights": [...], "answer_spans": [...]}

Distances: the queried fact sits in chunk ``q - d`` where ``q`` is the chunk holding the question,
so ``d = 0`` means same chunk and ``d >= 1`` means it must have passed through memory.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

RECALL_TASKS = ("passkey", "associative", "mixed")
CURRICULUM_MODES = ("schedule", "accuracy", "none")

INSTRUCTIONS = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n",
    "Read the following text carefully. Some numbers in it will be asked about at the end.\n",
    "",
)
# (fact sentence, question that asks for it); the answer follows the question.
PASSKEY_TEMPLATES = (
    (" The pass key is {key}. Remember it. {key} is the pass key.", "\nWhat is the pass key? The pass key is"),
    (" The secret code is {key}. Keep it in mind.", "\nWhat is the secret code? The secret code is"),
    (" Remember this number: {key}.", "\nWhich number were you asked to remember? The number is"),
)
ASSOCIATIVE_TEMPLATES = (
    (" The pass key of {name} is {key}.", "\nWhat is the pass key of {name}? The pass key of {name} is"),
    (" {name} has the number {key}.", "\nWhich number does {name} have? {name} has the number"),
)
NAMES = (
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Leo",
    "Maria", "Nina", "Oscar", "Paul", "Quinn", "Rosa", "Sam", "Tina", "Uma", "Victor", "Wendy", "Yusuf",
)  # fmt: skip


@dataclass
class FillerStream:
    """One token stream of prose to cut filler from (the texts joined by EOS)."""

    tokens: list[int]

    @classmethod
    def from_texts(cls, texts, tokenizer, max_tokens: int | None = None) -> FillerStream:
        eos = tokenizer.eos_token_id
        tokens: list[int] = []
        for text in texts:
            tokens.extend(tokenizer(text, add_special_tokens=False).input_ids)
            if eos is not None:
                tokens.append(eos)
            if max_tokens is not None and len(tokens) >= max_tokens:
                break
        if len(tokens) < 1024:
            raise ValueError(f"the filler corpus has {len(tokens)} tokens; recall samples need at least 1024")
        return cls(tokens[:max_tokens] if max_tokens else tokens)

    def take(self, rng: random.Random, n: int) -> list[int]:
        """``n`` consecutive tokens from a random place (wrapping around the end)."""
        if n <= 0:
            return []
        start = rng.randrange(len(self.tokens))
        out = self.tokens[start : start + n]
        while len(out) < n:
            out += self.tokens[: n - len(out)]
        return out


# Short plain sentences for repetitive filler (`RepeatedFiller`). Written for this package; deliberately not the
# sentences of `evaluation.passkey.FILLER`, so that a passkey score measures a filler the model never trained on.
REPEAT_SENTENCES = (
    " The river runs to the sea.", " The road is long and dry.", " Rain falls on the old roof.",
    " The cat sleeps by the door.", " Snow is white and cold.", " The train leaves at noon.",
    " Bread is baked in the morning.", " The hills are quiet tonight.", " A bird sings in the tree.",
    " The lamp is on the table.", " Wind moves the tall grass.", " The boat is tied to the pier.",
    " Leaves turn red in autumn.", " The clock ticks on the wall.", " Fish swim in the pond.",
    " The market opens early.", " Stars fill the night sky.", " The bridge crosses the valley.",
    " Tea is served at four.", " The garden needs water.", " Clouds drift over the town.",
    " The book is on the shelf.", " A dog barks far away.", " The field is full of corn.",
    " Waves break on the rocks.", " The window faces east.", " Smoke rises from the chimney.",
    " The path leads to the woods.", " Apples grow on the farm.", " The moon is round tonight.",
    " Here we are again.", " Round and round it goes.", " This is how it always is.", " And so on and so forth.",
)  # fmt: skip


@dataclass
class RepeatedFiller:
    """Repetitive filler: a few short sentences (1 .. ``max_period``, drawn per call) tiled to any length, like the
    classic passkey prompt's filler. A memory trained only on prose can fail on such text, where every chunk looks
    like the last and a fact's state must survive many near-identical writes."""

    sentences: list[list[int]]
    max_period: int = 5

    @classmethod
    def from_tokenizer(cls, tokenizer, sentences: Sequence[str] = REPEAT_SENTENCES, max_period: int = 5):
        if not 1 <= max_period <= len(sentences):
            raise ValueError(f"max_period must lie in [1, {len(sentences)}], got {max_period}")
        return cls([tokenizer(s, add_special_tokens=False).input_ids for s in sentences], max_period)

    def take(self, rng: random.Random, n: int) -> list[int]:
        """``n`` tokens of a random period of sentences repeated, starting at a random offset into it."""
        if n <= 0:
            return []
        period = [t for s in rng.sample(self.sentences, rng.randint(1, self.max_period)) for t in s]
        start = rng.randrange(len(period))
        reps = (start + n) // len(period) + 1
        return (period * reps)[start : start + n]


@dataclass
class MixedFiller:
    """Prose filler, or for a ``repeat_fraction`` of samples repetitive filler (`RepeatedFiller`)."""

    prose: FillerStream
    repeated: RepeatedFiller
    repeat_fraction: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.repeat_fraction <= 1.0:
            raise ValueError(f"repeat_fraction must lie in [0, 1], got {self.repeat_fraction}")

    def pick(self, rng: random.Random) -> FillerStream | RepeatedFiller:
        """The source of one sample's filler."""
        return self.repeated if rng.random() < self.repeat_fraction else self.prose

    def take(self, rng: random.Random, n: int) -> list[int]:
        return self.pick(rng).take(rng, n)


@dataclass
class RecallSampleBuilder:
    """Builds one training sample: prose filler with facts planted at chosen chunk distances, questions at the end.

    Args:
        tokenizer: the model's tokenizer (digits and names are tokenised in context).
        filler: where filler comes from (`FillerStream` prose, `RepeatedFiller`, or `MixedFiller` for both).
        chunk_size: the model's `chunk_size`; distances are counted in chunks of this many tokens.
        task: `"passkey"` (one key, one question), `"associative"` (`num_keys` name→key facts, `num_queries`
            of them asked) or `"mixed"` (either, half the time each).
        num_chunks: (min, max) length of a sample in chunks; a sample is always longer than the farthest fact.
        lead_chunks: (min, max) chunks of filler before the chunk of the farthest asked fact (sampled per sample;
            the sample grows to fit). With (0, 0) a fact far back often lands in the first chunk, where the global
            memory is empty and written whole; leading filler makes the gate replace a filler state with the fact,
            as in a long document.
        key_digits: digits per key.
        num_keys, num_queries: facts planted and facts asked in associative samples.
        boundary_fraction: share of samples whose first answer crosses a chunk boundary: the window folds after
            0 .. len(answer) - 1 of its tokens (uniformly), so that the rest is generated in a fresh window that
            sees the question only through memory. This is what happens at inference whenever a prompt ends within
            a few tokens of a multiple of `chunk_size` (e.g. a 8,000-token prompt with 64-token chunks).
        lm_fraction: share of plain language-modelling samples (no facts, every token labelled).
        lm_loss_weight: total weight of the language-modelling loss on a recall sample's text, relative to 1 for
            its answers (0 labels the answers only).

    Samples whose filler is repetitive (`RepeatedFiller`, or the repeated share of a `MixedFiller`) label only
    their answers and carry a ``distill_mask`` that is 0 over the instruction and filler: a loss on text that
    repeats teaches the model to repeat (a first run that had one answered ``780444`` for ``78044``), so
    context distillation (`training.comet_trainer.distillation_losses`) reads only their questions and answers.
    """

    tokenizer: Any
    filler: FillerStream | RepeatedFiller | MixedFiller
    chunk_size: int
    task: str = "passkey"
    num_chunks: tuple[int, int] = (6, 8)
    lead_chunks: tuple[int, int] = (0, 0)
    key_digits: int = 5
    num_keys: int = 4
    num_queries: int = 2
    boundary_fraction: float = 0.25
    lm_fraction: float = 0.0
    lm_loss_weight: float = 0.0
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.task not in RECALL_TASKS:
            raise ValueError(f"task must be one of {RECALL_TASKS}, got {self.task!r}")
        lo, hi = self.num_chunks
        if not 1 <= lo <= hi:
            raise ValueError(f"num_chunks must be (min, max) with 1 <= min <= max, got {self.num_chunks}")
        if not 0 <= self.lead_chunks[0] <= self.lead_chunks[1]:
            raise ValueError(f"lead_chunks must be (min, max) with 0 <= min <= max, got {self.lead_chunks}")
        if not 1 <= self.num_queries <= self.num_keys <= len(NAMES):
            raise ValueError(f"need 1 <= num_queries ({self.num_queries}) <= num_keys ({self.num_keys}) <= {len(NAMES)}")
        for name in ("boundary_fraction", "lm_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.lm_loss_weight < 0:
            raise ValueError(f"lm_loss_weight must be >= 0, got {self.lm_loss_weight}")

    def _encode(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._cache[text]

    def _prefix(self, rng: random.Random) -> list[int]:
        """An instruction, with the special tokens the tokenizer adds to a text's start (e.g. BOS)."""
        return list(self.tokenizer(rng.choice(INSTRUCTIONS), add_special_tokens=True).input_ids)

    def _source(self, rng: random.Random) -> FillerStream | RepeatedFiller:
        """Where one sample's filler comes from (a `MixedFiller` picks per sample)."""
        return self.filler.pick(rng) if isinstance(self.filler, MixedFiller) else self.filler

    def lm_sample(self, rng: random.Random) -> dict[str, list]:
        n = rng.randint(*self.num_chunks) * self.chunk_size
        ids = (self.filler.prose if isinstance(self.filler, MixedFiller) else self.filler).take(rng, n)
        return {"input_ids": ids, "labels": list(ids), "label_weights": [1.0 / n] * n, "answer_spans": [],
                "distill_mask": [1] * n}

    def build(self, rng: random.Random, max_distance: int, min_distance: int = 0) -> dict[str, list]:
        """One sample; the asked facts lie ``min_distance .. max_distance`` chunks before the question's chunk.

        Layout: ``prefix | prose with the facts planted | question answer [question answer ...]``. The first
        question ends in the last chunk of a ``num_chunks``-chunk prompt (for a ``boundary_fraction`` of samples
        so close to its end that the first answer crosses into the next chunk); every asked fact is planted ``d`` chunks before that chunk.
        """
        if self.lm_fraction and rng.random() < self.lm_fraction:
            return self.lm_sample(rng)
        task = self.task if self.task != "mixed" else rng.choice(("passkey", "associative"))
        C = self.chunk_size
        facts, questions = self._facts_and_questions(rng, task)
        distances = [rng.randint(min_distance, max_distance) for _ in questions]
        lead = rng.randint(*self.lead_chunks) if self.lead_chunks[1] else 0
        num_chunks = max(rng.randint(*self.num_chunks), max(distances) + 1 + lead)
        prefix = self._prefix(rng)
        first_question = questions[0][0]
        if rng.random() < self.boundary_fraction:
            # The window folds after `fold_after` answer tokens; the rest of the answer starts a fresh window.
            fold_after = rng.randrange(min(len(questions[0][1]), C))
            prompt_end = num_chunks * C - fold_after
        else:
            # Leave room in the question's chunk for the question and the facts asked at distance 0.
            room = min(len(first_question) + sum(len(f) for f in facts[: len(questions)]) + 1, C - 1)
            prompt_end = (num_chunks - 1) * C + rng.randint(room, C - 1) if C > 1 else num_chunks * C
        question_chunk = (prompt_end - 1) // C
        body_len = prompt_end - len(first_question) - len(prefix)
        if body_len < sum(len(f) for f in facts):
            raise ValueError(f"samples of {num_chunks} chunks of {C} tokens are too short for {len(facts)} facts")
        # The asked facts come first in `facts`; distractors go anywhere before the question.
        chunk_of = [
            question_chunk - distances[i] if i < len(questions) else rng.randint(0, question_chunk)
            for i in range(len(facts))
        ]
        # Each fact starts at a random place in its chunk (relative to the body), ending inside it where it fits.
        starts = []
        for chunk, fact in zip(chunk_of, facts, strict=True):
            lo = max(chunk * C - len(prefix), 0)
            hi = min((chunk + 1) * C - len(prefix), body_len) - len(fact)
            starts.append(rng.randint(lo, max(lo, hi)))
        filler_len = body_len - sum(len(f) for f in facts)
        source = self._source(rng)
        repetitive = isinstance(source, RepeatedFiller)
        filler = source.take(rng, filler_len)
        body: list[int] = []
        used = 0
        for i in sorted(range(len(facts)), key=lambda i: starts[i]):
            n = max(0, min(starts[i] - len(body), filler_len - used))
            body += filler[used : used + n] + facts[i]
            used += n
        body += filler[used:]
        ids = prefix + body
        distill_mask = [0 if repetitive else 1] * len(ids)
        labels = [-100] * len(ids)
        spans = []
        for question, answer in questions:
            ids += question
            labels += [-100] * len(question)
            spans.append([len(ids), len(ids) + len(answer)])
            ids += answer
            labels += answer
        distill_mask += [1] * (len(ids) - len(distill_mask))
        answer_tokens = sum(e - s for s, e in spans)
        weights = [0.0 if lab == -100 else 1.0 / answer_tokens for lab in labels]
        if self.lm_loss_weight and not repetitive:
            text = [i for i, lab in enumerate(labels) if lab == -100 and i > 0]
            for i in text:
                labels[i] = ids[i]
                weights[i] = self.lm_loss_weight / len(text)
        return {"input_ids": ids, "labels": labels, "label_weights": weights, "answer_spans": spans,
                "distill_mask": distill_mask}

    def _key(self, rng: random.Random) -> str:
        return str(rng.randrange(10 ** (self.key_digits - 1), 10**self.key_digits))

    def _facts_and_questions(self, rng: random.Random, task: str):
        """Token ids of the facts (asked ones first) and of (question, answer) pairs."""
        if task == "passkey":
            fact, question = rng.choice(PASSKEY_TEMPLATES)
            key = self._key(rng)
            return [self._encode(fact.format(key=key))], [(self._encode(question), self._answer_ids(question, key))]
        fact, question = rng.choice(ASSOCIATIVE_TEMPLATES)
        names = rng.sample(NAMES, self.num_keys)
        keys = [self._key(rng) for _ in names]
        facts = [self._encode(fact.format(name=n, key=k)) for n, k in zip(names, keys, strict=True)]
        asked = range(self.num_queries)
        pairs = [(self._encode(question.format(name=names[i])), self._answer_ids(question, keys[i])) for i in asked]
        return facts, pairs

    def _answer_ids(self, question: str, key: str) -> list[int]:
        """The answer's tokens as they follow the question (its leading space tokenised in context)."""
        q = self._encode(question)
        full = self._encode(question + " " + key + ".")
        if full[: len(q)] != q:
            raise ValueError(f"the tokenizer merges the question {question!r} with its answer")
        return full[len(q) :]


class RecallCurriculum(TrainerCallback, ExportableState):
    """How far back the asked facts may lie, raised by step schedule or by answer accuracy.

    Stage ``s`` allows distances ``0 .. max_distances[s]`` (in chunks). ``mode="schedule"`` moves up every
    ``stage_steps`` optimizer steps; ``mode="accuracy"`` moves up once the exact-match answer accuracy averaged
    over the last ``window`` logged batches reaches ``threshold``; ``mode="none"`` stays on the last stage. The
    stage is saved in every checkpoint, so a resumed run continues where it stopped.
    """

    def __init__(
        self,
        max_distances: Sequence[int] = (1, 2, 4, 8),
        mode: str = "schedule",
        stage_steps: int = 200,
        threshold: float = 0.9,
        window: int = 20,
        min_distance: int = 0,
    ):
        if mode not in CURRICULUM_MODES:
            raise ValueError(f"curriculum mode must be one of {CURRICULUM_MODES}, got {mode!r}")
        if not max_distances or any(d < 0 for d in max_distances) or list(max_distances) != sorted(max_distances):
            raise ValueError(f"max_distances must be a non-empty non-decreasing list of distances, got {max_distances}")
        if min_distance < 0 or min_distance > max_distances[0]:
            raise ValueError(f"min_distance must lie in [0, {max_distances[0]}], got {min_distance}")
        self.max_distances = list(max_distances)
        self.mode = mode
        self.stage_steps = stage_steps
        self.threshold = threshold
        self.window = window
        self.min_distance = min_distance
        self.stage = len(self.max_distances) - 1 if mode == "none" else 0
        self.recent: deque[float] = deque(maxlen=window)

    @property
    def max_distance(self) -> int:
        return self.max_distances[self.stage]

    def record(self, exact_accuracy: float) -> None:
        """Feed one batch's exact-match answer accuracy (used by the accuracy mode)."""
        self.recent.append(exact_accuracy)
        last = len(self.max_distances) - 1
        if self.mode == "accuracy" and self.stage < last and len(self.recent) == self.window:
            if sum(self.recent) / self.window >= self.threshold:
                self.stage += 1
                self.recent.clear()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.mode == "schedule":
            self.stage = min(state.global_step // max(self.stage_steps, 1), len(self.max_distances) - 1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["curriculum_max_distance"] = self.max_distance

    def state(self) -> dict:
        return {
            "args": {
                "max_distances": self.max_distances,
                "mode": self.mode,
                "stage_steps": self.stage_steps,
                "threshold": self.threshold,
                "window": self.window,
                "min_distance": self.min_distance,
            },
            "attributes": {"stage": self.stage, "recent": list(self.recent)},
        }

    @classmethod
    def from_state(cls, state: dict) -> RecallCurriculum:
        curriculum = cls(**state["args"])
        curriculum.stage = state["attributes"]["stage"]
        curriculum.recent.extend(state["attributes"]["recent"])
        return curriculum

    def load_state(self, state: dict) -> None:
        """Take the stage and recent accuracies from a checkpoint (the arguments stay this run's own)."""
        self.stage = min(state["attributes"]["stage"], len(self.max_distances) - 1)
        self.recent.clear()
        self.recent.extend(state["attributes"]["recent"])


def recall_dataset(builder: RecallSampleBuilder, curriculum: RecallCurriculum, num_rows: int, seed: int = 0) -> Dataset:
    """A ``datasets.Dataset`` of ``num_rows`` recall samples built on access from the curriculum's current stage."""

    def build(batch: dict[str, list]) -> dict[str, list]:
        rows = [
            builder.build(random.Random(f"{seed}/{index}/{curriculum.stage}"), curriculum.max_distance, curriculum.min_distance)
            for index in batch["index"]
        ]
        return {key: [row[key] for row in rows] for key in rows[0]}

    return Dataset.from_dict({"index": list(range(num_rows))}).with_transform(build)


@dataclass
class RecallCollator:
    """Left-pads recall samples into a batch, so that every sample's answers end at the last column.

    >>> batch = RecallCollator(pad_token_id=0)([
    ...     {"input_ids": [5, 6, 7], "labels": [-100, -100, 7], "label_weights": [0, 0, 1.0], "answer_spans": [[2, 3]]},
    ...     {"input_ids": [8, 9], "labels": [-100, 9], "label_weights": [0, 1.0], "answer_spans": [[1, 2]]},
    ... ])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["answer_tail"]
    ([[5, 6, 7], [0, 8, 9]], [[1, 1, 1], [0, 1, 1]], 2)
    """

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        ids, mask, labels, weights, spans = [], [], [], [], []
        for r in rows:
            pad = width - len(r["input_ids"])
            ids.append([self.pad_token_id] * pad + list(r["input_ids"]))
            mask.append([0] * pad + [1] * len(r["input_ids"]))
            labels.append([-100] * pad + list(r["labels"]))
            weights.append([0.0] * pad + list(r["label_weights"]))
            spans.append([(s + pad, e + pad) for s, e in r["answer_spans"]])
        firsts = [s for row in spans for s, _ in row]
        extra = {}
        if any(0 in r.get("distill_mask", ()) for r in rows):  # only batches with repetitive filler carry it
            extra["distill_mask"] = torch.tensor(
                [[0] * (width - len(r["input_ids"])) + list(r.get("distill_mask", [1] * len(r["input_ids"])))
                 for r in rows]
            )
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels),
            "label_weights": torch.tensor(weights, dtype=torch.float32),
            "answer_spans": spans,
            # Logits needed to score the answers: from the column before the first answer token to the end.
            "answer_tail": width - min(firsts) + 1 if firsts else 0,
            **extra,
        }


def answer_accuracy(logits: torch.Tensor, input_ids: torch.Tensor, spans, tail: int) -> tuple[float, float]:
    """(token accuracy, exact-match accuracy) of greedy predictions on the answer spans.

    ``logits`` (B, tail, V) are the last ``tail`` positions' logits; the token at column t is predicted at t-1.
    """
    width = input_ids.shape[1]
    predicted = logits.argmax(-1)  # (B, tail) for columns width-tail .. width-1
    tokens = exact = answers = 0
    for b, row in enumerate(spans):
        for s, e in row:
            pred = predicted[b, s - 1 - (width - tail) : e - 1 - (width - tail)]
            hits = pred == input_ids[b, s:e]
            tokens += int(hits.sum())
            exact += int(bool(hits.all()))
            answers += 1
    n_tokens = sum(e - s for row in spans for s, e in row)
    return (tokens / n_tokens if n_tokens else 0.0), (exact / answers if answers else 0.0)


__all__ = [
    "CURRICULUM_MODES",
    "RECALL_TASKS",
    "FillerStream",
    "RecallCollator",
    "RecallCurriculum",
    "RecallSampleBuilder",
    "answer_accuracy",
    "recall_dataset",
]
