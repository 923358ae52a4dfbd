import doctest

import pytest
import torch

from training import epl_collator
from training.epl_collator import EplDataCollator


def test_doctests():
    assert doctest.testmod(epl_collator).failed == 0


def test_left_padding_and_labels():
    collator = EplDataCollator(pad_token_id=0, compression_token_ids={50, 51}, padding_side="left")
    features = [
        {"input_ids": [1, 2, 3, 4, 50, 51, 7], "labels": [-100] * 6 + [7]},
        {"input_ids": [1, 2, 50, 9], "labels": [-100, -100, -100, 9]},
    ]
    batch = collator(features)
    assert batch["input_ids"][1].tolist() == [0, 0, 0, 1, 2, 50, 9]
    assert batch["attention_mask"][1].tolist() == [0, 0, 0, 1, 1, 1, 1]
    # EPL: the two tokens after 4 text tokens sit at the centres 1 and 3; text resumes at 4
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 1, 3, 4]
    assert batch["position_ids"][1].tolist() == [0, 0, 0, 0, 1, 1, 2]
    assert batch["labels"][1].tolist() == [-100, -100, -100, -100, -100, -100, 9]


def test_default_layout_counts_tokens():
    collator = EplDataCollator(pad_token_id=0, compression_token_ids={50}, position_layout="default")
    batch = collator([{"input_ids": [1, 2, 3, 50, 4]}])
    assert torch.equal(batch["position_ids"], torch.arange(5).unsqueeze(0))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="position_layout"):
        EplDataCollator(pad_token_id=0, position_layout="linear")
    collator = EplDataCollator(pad_token_id=0, compression_token_ids={50})
    with pytest.raises(ValueError, match="at least one text token"):
        collator([{"input_ids": [50, 1, 2]}])
    with pytest.raises(ValueError, match="labels"):
        collator([{"input_ids": [1, 2], "labels": [1]}])
