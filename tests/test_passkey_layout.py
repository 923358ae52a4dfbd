"""`scripts.passkey_layout`: where a passkey prompt's key sits in its chunk, and how each answer is classed."""

import pytest

from evaluation.passkey import PasskeyPrompt
from scripts.passkey_layout import analyse, classify, key_layout
from tests.evaluation_helpers import char_tokenizer


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.55, 1.0])
def test_offsets_match_the_prompt_text(depth):
    tokenizer = char_tokenizer()  # one token per character: token index = character index
    prompt = PasskeyPrompt.from_tokenizer(tokenizer)
    key, length, chunk = "12345", 700, 16
    text = tokenizer.decode(prompt.build(key, length, depth))
    first = text.index(f"The pass key is {key}") + len("The pass key is ")
    layout = key_layout(prompt, key, length, depth, chunk)
    assert (layout["key_first"], layout["key_last"], layout["dot"]) == (
        first % chunk,
        (first + 4) % chunk,
        (first + 5) % chunk,
    )
    assert layout["key_split"] == int(first // chunk != (first + 4) // chunk)
    assert layout["chunks_back"] == (length - 1) // chunk - first // chunk


def test_classes():
    inside = {"key_first": 20, "key_last": 24, "dot": 25, "key_split": 0}
    assert classify(inside, "12345", " 12345.", window=8) == "found"
    assert classify(inside, "12345", " 1234.", window=8) == "digits"
    assert classify(inside, "12345", " The pass key is 123", window=8) == "cut"
    assert classify(inside, "12345", " The pass key", window=8) == "other"
    assert classify({**inside, "dot": 6}, "12345", " 9.", window=8) == "fold"  # no window holds the key and its '.'
    assert classify({**inside, "dot": 7}, "12345", " 9.", window=8) == "digits"
    assert classify({**inside, "key_split": 1}, "12345", " 12345.", window=8) == "found"


def test_analyse_counts_every_class_per_length():
    tokenizer = char_tokenizer()
    result = {"models": {"m": {"cells": [
        {"length": 700, "depth": 0.0, "keys": ["11111"], "answers": [" 11111."]},
        {"length": 700, "depth": 1.0, "keys": ["22222"], "answers": [" 2222."]},
    ]}}}  # fmt: skip
    report = analyse(result, tokenizer, chunk_size=64, window=8)
    classes = [cell["class"] for cell in report["models"]["m"]["cells"]]
    assert classes[0] == "found" and classes[1] in ("digits", "fold")
    assert sum(report["models"]["m"]["counts"]["700"].values()) == 2
    with pytest.raises(ValueError, match="must be positive"):
        analyse(result, tokenizer, chunk_size=0, window=8)
