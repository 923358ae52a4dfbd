"""The offline QA builder for RAM (`training.ram_qa_data`): answerable from one passage only, split by document,
deterministic, written atomically."""

import json

import pytest

from training.ram_qa_data import QUESTION_TEMPLATE, SENTENCE_END, STOPWORDS, build, main, pydoc_documents
from training.ram_trainer import context_text


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from convert.smollm2 import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="module")
def data(tokenizer):
    return build(pydoc_documents(), train=40, test=20, seed=3, tokenizer=tokenizer)


def test_the_answer_is_in_the_positive_passage_only(data):
    for example in data["train"] + data["test"]:
        answer = example["answers"][0].lower()
        assert len(answer) >= 4 and answer.isalpha() and answer not in STOPWORDS
        for index, ctx in enumerate(example["ctxs"]):
            inside = answer in (ctx["title"] + "\n" + ctx["text"]).lower()
            assert inside == (index == example["positive"]), (example["question"], index)
        assert answer not in example["question"].lower()
        # the question quotes the words just before the answer in the positive passage: the quote continues with it
        quote = example["question"].split('"', 1)[1]
        assert f"{quote} {example['answers'][0]}" in example["ctxs"][example["positive"]]["text"]
        assert len(example["ctxs"]) == 5 and len(set(example["documents"])) == 5


def test_positive_segments_hold_the_answer(data, tokenizer):
    for example in data["test"]:
        segments = example["positive_segments"]
        assert segments == list(range(segments[0], segments[-1] + 1))  # the quote and the answer: one run
        ids = tokenizer(context_text(example), add_special_tokens=False)["input_ids"]
        assert 250 <= len(ids) <= 700
        assert example["answers"][0] in tokenizer.decode(ids[segments[0] * 32 : (segments[-1] + 1) * 32])


def test_the_split_is_by_document(data):
    train_documents = {doc for example in data["train"] for doc in example["documents"]}
    test_documents = {doc for example in data["test"] for doc in example["documents"]}
    assert train_documents and test_documents and not train_documents & test_documents
    # pydoc repeats some paragraphs under several topics: no test passage shares a sentence with a training document
    train_sentences = {s for example in data["train"] for ctx in example["ctxs"] for s in SENTENCE_END.split(ctx["text"])}
    test_sentences = {s for example in data["test"] for ctx in example["ctxs"] for s in SENTENCE_END.split(ctx["text"])}
    assert not train_sentences & test_sentences


def test_same_seed_same_data():
    first = build(pydoc_documents(), train=10, test=5, seed=7)
    assert first == build(pydoc_documents(), train=10, test=5, seed=7)
    assert first != build(pydoc_documents(), train=10, test=5, seed=8)
    assert "positive_segments" not in first["train"][0]  # only with a tokenizer


def test_the_full_prompt_ends_where_the_answer_continues(data):
    example = data["test"][0]
    prompt = context_text(example) + QUESTION_TEMPLATE.format(question=example["question"])
    assert prompt.endswith(example["question"]) and example["question"].startswith("Complete the sentence")


def test_cli_writes_user_text_and_refuses_to_overwrite(tmp_path):
    files = []
    for title, text in pydoc_documents()[:14]:
        files.append(tmp_path / f"{title}.txt")
        files[-1].write_text(text)
    output = tmp_path / "out"
    argv = ["--output", str(output), "--train", "6", "--test", "3", "--tokenizer", "none", "--test_fraction", "0.5",
            "--text_files", ",".join(map(str, files))]
    main(argv)
    rows = [json.loads(line) for line in (output / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {ctx["title"] for row in rows for ctx in row["ctxs"]} <= {f.stem for f in files}
    assert len((output / "test.jsonl").read_text().splitlines()) == 3
    before = (output / "train.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(argv[:3] + ["7"] + argv[4:])
    assert (output / "train.jsonl").read_bytes() == before
    main(argv[:3] + ["7"] + argv[4:] + ["--overwrite"])
    assert len((output / "train.jsonl").read_text().splitlines()) == 7
    assert sorted(p.name for p in output.iterdir()) == ["test.jsonl", "train.jsonl"]  # no temporary files left
