"""An NQ-style question answering set for RAM, built offline from real text (by default the pydoc prose).

Each example's context is `passages` real passages (prose paragraphs, ~40-90 words each) from different source
documents; one of them, the positive, holds the answer. The question quotes the words leading up to a distinctive
word of one of its sentences and asks for the next word (the completion)::

    Complete the sentence from the text above: "The current code generator emits no code for an assert statement
    when                                                                       -> completion: " optimization"

The answer is a word of four letters or more, not a common word, that occurs (case-insensitively, as a substring) in
the positive passage and nowhere else in the context, its titles or the question: only the positive passage answers
it, and a model that reads it can copy the answer (what a 135M model can learn). Test examples come from source
documents that no training example uses (the split is by document; documents sharing a sentence, which pydoc has,
stay on the same side), and the whole set is a function of the seed.
The question is read with the template `QUESTION_TEMPLATE` (no "Answer:"): the answer continues the quote, which the
base SmolLM2-135M-Instruct already does when it reads the whole context (an "Answer:" line it does not).

Rows are the JSONL `training.ram_trainer` reads: ``{"question", "answers", "ctxs": [{"title", "text"}]}`` plus
``"positive"`` (index of the positive passage in `ctxs`), ``"documents"`` (source document of each passage) and,
when a tokenizer is given, ``"positive_segments"``: the `segment_size`-token segments of the context (as
`training.ram_trainer.context_text` joins it) that overlap the quoted words or the answer.

Usage::

    python -m training.ram_qa_data --output data/ram-pydoc --train 2000 --test 100      # pydoc prose
    python -m training.ram_qa_data --output DIR --text_files a.txt,b.txt --train 500 --test 50   # one doc per file
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from convert.atomic import atomic_file
from training.ram_trainer import context_text

QUESTION = 'Complete the sentence from the text above: "{prefix}'
# The template the decoder reads the question with (the recipe's `question_template`): the answer continues the quote.
QUESTION_TEMPLATE = "\n\n{question}"
# Frequent English and documentation words: never asked for (too guessable, and rarely unique in a context).
STOPWORDS = set(
    """
    about above after again against also although among another because been before being below between both
    cannot could does doing down during each either else even every from further have having here however into
    itself just more most much must neither never only other otherwise same should since some such than that
    their them then there these they this those though through under until upon used using very were what when
    where whether which while will with within without would your yours also example following given note only
    value values object objects name names first second last none true false case cases form same always
    """.split()
)
WORD = re.compile(r"[A-Za-z]{4,}")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


@dataclass(frozen=True)
class Passage:
    document: str  # title of the source document
    index: int  # position among the document's passages
    text: str


def pydoc_documents() -> list[tuple[str, str]]:
    """The standard library's pydoc topics as (title, text) pairs, in sorted title order."""
    from pydoc_data.topics import topics

    return [(key, topics[key]) for key in sorted(topics)]


def file_documents(paths: list[str]) -> list[tuple[str, str]]:
    """Plain-text files, one document each, titled by their file name without suffix."""
    documents = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        documents.append((path.stem, path.read_text(encoding="utf-8", errors="replace")))
    return documents


def _is_prose(block: str) -> bool:
    lines = block.splitlines()
    if not lines or any(line.startswith((" ", "\t")) for line in lines):  # code, grammar, indented lists
        return False
    if len(lines) > 1 and set(lines[-1].strip()) <= set("*=-~^"):  # a heading and its underline
        return False
    text = " ".join(lines)
    words = text.split()
    letters = sum(char.isalpha() or char.isspace() for char in text)
    return len(words) >= 12 and letters >= 0.85 * len(text) and text.rstrip().endswith((".", ":", "!", "?"))


def split_passages(title: str, text: str, min_words: int = 40, max_words: int = 90) -> list[Passage]:
    """Prose passages of a document: consecutive prose paragraphs merged to at least `min_words` words, each cut at a
    sentence end to at most `max_words` words. Code blocks, headings and markup-heavy paragraphs are left out."""
    passages: list[Passage] = []
    current: list[str] = []

    def flush():
        if current:
            sentences = SENTENCE_END.split(" ".join(current))
            kept: list[str] = []
            for sentence in sentences:
                if kept and len(" ".join(kept + [sentence]).split()) > max_words:
                    break
                kept.append(sentence)
            passage = " ".join(" ".join(kept).split())
            if min_words <= len(passage.split()) <= max_words:
                passages.append(Passage(title, len(passages), passage))
            current.clear()

    for block in re.split(r"\n\s*\n", text):
        if not _is_prose(block.strip("\n")):
            flush()
            continue
        current.append(" ".join(line.strip() for line in block.strip("\n").splitlines()))
        if len(" ".join(current).split()) >= min_words:
            flush()
    flush()
    return passages


def document_groups(by_document: dict[str, list[Passage]]) -> list[list[str]]:
    """Documents joined, transitively, when they share a sentence (pydoc repeats paragraphs under several topics:
    "for" and "compound", "exceptions" and "execmodel"), each group sorted, the groups in order of first title."""
    parent = {title: title for title in by_document}

    def root(title: str) -> str:
        while parent[title] != title:
            title = parent[title]
        return title

    first_seen: dict[str, str] = {}
    for title in sorted(by_document):
        for passage in by_document[title]:
            for sentence in SENTENCE_END.split(passage.text):
                other = first_seen.setdefault(sentence, title)
                parent[root(title)] = root(other)
    groups: dict[str, list[str]] = {}
    for title in sorted(by_document):
        groups.setdefault(root(title), []).append(title)
    return sorted(groups.values())


def split_documents(by_document: dict[str, list[Passage]], test_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
    """Hold out about `test_fraction` of the documents (at least one) for testing, whole `document_groups` at a time
    in an order shuffled by `seed`, so that no test passage shares a sentence with a training document."""
    groups = document_groups(by_document)
    random.Random(seed).shuffle(groups)
    target = max(1, round(len(by_document) * test_fraction))
    test: list[str] = []
    for group in groups:
        if len(test) >= target:
            break
        test += group
    return sorted(set(by_document) - set(test)), sorted(test)


def _questions(passage: Passage, others: list[str], max_prefix_words: int) -> list[tuple[str, str, str]]:
    """(question, answer, quoted words + answer) candidates in `passage` whose answer no text in `others` contains."""
    haystack = " ".join(others).lower()
    candidates = []
    for sentence in SENTENCE_END.split(passage.text):
        words = sentence.split()
        for position in range(5, len(words)):
            match = WORD.fullmatch(words[position].rstrip(".,;:!?)\"'"))
            if not match or not words[position - 1][-1:].isalnum():
                continue
            answer = match.group(0)
            prefix = " ".join(words[max(0, position - max_prefix_words) : position])
            question = QUESTION.format(prefix=prefix)
            lowered = answer.lower()
            if lowered in STOPWORDS or lowered in haystack or lowered in question.lower():
                continue
            candidates.append((question, answer, f"{prefix} {answer}"))
    return candidates


def make_example(rng: random.Random, by_document: dict[str, list[Passage]], passages: int, max_prefix_words: int,
                 tokenizer=None, segment_size: int = 32) -> dict | None:
    """One example drawn from the documents of `by_document`, or None when the drawn positive has no usable word."""
    documents = rng.sample(sorted(by_document), passages)
    chosen = [rng.choice(by_document[document]) for document in documents]
    positive = rng.randrange(passages)
    others = [text for index, passage in enumerate(chosen) if index != positive for text in (passage.document,
                                                                                           passage.text)]
    candidates = _questions(chosen[positive], others + [chosen[positive].document], max_prefix_words)
    if not candidates:
        return None
    question, answer, quoted = rng.choice(candidates)
    example = {
        "question": question,
        "answers": [answer],
        "ctxs": [{"title": passage.document, "text": passage.text} for passage in chosen],
        "positive": positive,
        "documents": documents,
    }
    if tokenizer is not None:
        example["positive_segments"] = positive_segments(example, quoted, tokenizer, segment_size)
    return example


def positive_segments(example: dict, quoted: str, tokenizer, segment_size: int) -> list[int]:
    """Segments of the tokenized context that overlap `quoted` (the question's words and the answer) in the positive
    passage."""
    text = context_text(example)
    passage_start = text.index(example["ctxs"][example["positive"]]["text"])
    start = text.index(quoted, passage_start)
    end = start + len(quoted)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return sorted({index // segment_size for index, (a, b) in enumerate(offsets) if a < end and b > start})


def build(documents: list[tuple[str, str]], train: int, test: int, seed: int = 0, passages: int = 5,
          test_fraction: float = 0.2, max_prefix_words: int = 12, tokenizer=None,
          segment_size: int = 32) -> dict[str, list[dict]]:
    """`{"train": [...], "test": [...]}` from `documents`, split by document, a function of `seed` alone."""
    by_document: dict[str, list[Passage]] = {}
    for title, text in documents:
        found = split_passages(title, text)
        if found:
            by_document.setdefault(title, []).extend(found)
    train_titles, test_titles = split_documents(by_document, test_fraction, seed)
    if len(test_titles) < passages or len(train_titles) < passages:
        raise ValueError(f"need at least {passages} documents with prose on each side of the split, got "
                         f"{len(train_titles)} train and {len(test_titles)} test: give more text or fewer --passages")
    result = {}
    for split, titles, count, offset in (("train", train_titles, train, 1), ("test", test_titles, test, 2)):
        rng = random.Random(seed * 1000 + offset)
        pool = {title: by_document[title] for title in titles}
        examples, attempts = [], 0
        while len(examples) < count:
            attempts += 1
            if attempts > 50 * count + 100:
                raise RuntimeError(f"could not draw {count} {split} examples from {len(titles)} documents")
            example = make_example(rng, pool, passages, max_prefix_words, tokenizer, segment_size)
            if example is not None:
                examples.append(example)
        result[split] = examples
    return result


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=2000, help="training examples")
    parser.add_argument("--test", type=int, default=100, help="test examples")
    parser.add_argument("--text_files", default=None, help="comma-separated plain-text files (default: pydoc prose)")
    parser.add_argument("--passages", type=int, default=5, help="passages per context")
    parser.add_argument("--test_fraction", type=float, default=0.2, help="share of documents held out for testing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default="smollm2",
                        help="tokenizer for positive_segments: 'smollm2' (embedded), a path, or 'none'")
    parser.add_argument("--segment_size", type=int, default=32)
    parser.add_argument("--overwrite", action="store_true", help="replace existing train/test files")
    args = parser.parse_args(argv)

    output = Path(args.output)
    paths = {"train": output / "train.jsonl", "test": output / "test.jsonl"}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass --overwrite to replace them")
    documents = file_documents([p for p in args.text_files.split(",") if p.strip()]) if args.text_files else (
        pydoc_documents())
    tokenizer = None
    if args.tokenizer != "none":
        from transformers import AutoTokenizer

        if args.tokenizer == "smollm2":
            from convert.smollm2 import smollm2_path

            args.tokenizer = str(smollm2_path())
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    data = build(documents, args.train, args.test, args.seed, args.passages, args.test_fraction,
                 tokenizer=tokenizer, segment_size=args.segment_size)
    for split, path in paths.items():
        write_jsonl(path, data[split])
        print(f"{path}: {len(data[split])} examples")
    return paths


if __name__ == "__main__":
    main()


__all__ = ["Passage", "build", "file_documents", "main", "make_example", "positive_segments", "pydoc_documents",
           "document_groups", "split_documents", "split_passages"]
