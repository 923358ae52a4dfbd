import doctest

import pytest
import torch

from modeling_comet import position_layout
from modeling_comet.position_layout import (
    LayoutPiece,
    epl_special_position_ids,
    sequence_position_ids,
    special_position_ids,
)


def test_doctests():
    assert doctest.testmod(position_layout).failed == 0


def test_epl_ids_are_group_centres_over_the_real_span():
    # 10 tokens, 3 special tokens: groups of 10/3 ids, centres 1.17, 4.5, 7.83 (not padded past the span)
    assert epl_special_position_ids(0, 9, 3).tolist() == [1, 5, 8]
    ids = epl_special_position_ids(100, 131, 4)
    assert ids.min() >= 100 and ids.max() <= 131


def test_default_special_ids_follow_the_span():
    assert special_position_ids("default", 0, 9, 2).tolist() == [10, 11]


def test_whole_sequence_without_compression_is_plain_positions():
    pieces = [LayoutPiece(5), LayoutPiece(3)]
    for layout in ("default", "epl"):
        assert sequence_position_ids(layout, pieces, start=2).tolist() == list(range(2, 10))


def test_epl_replaced_spans_keep_original_positions_of_what_follows():
    # kept segment 0..3, skimmed segment 4..11 (one vector), kept 12..15, prompt 16..17
    pieces = [LayoutPiece(4), LayoutPiece(8, 1, text_visible=False), LayoutPiece(4), LayoutPiece(2)]
    epl = sequence_position_ids("epl", pieces)
    assert epl.tolist() == [0, 1, 2, 3, 8, 12, 13, 14, 15, 16, 17]
    default = sequence_position_ids("default", pieces)
    assert default.tolist() == list(range(11))
    assert len(epl) == sum(piece.num_tokens for piece in pieces)


def test_epl_short_last_span_stays_inside_its_extent():
    pieces = [LayoutPiece(8, 2, text_visible=False), LayoutPiece(3, 2, text_visible=False)]
    assert sequence_position_ids("epl", pieces).tolist() == [2, 6, 8, 10]  # 8..10: centres 8.25, 9.75


def test_bad_input_raises():
    with pytest.raises(ValueError, match="layout"):
        sequence_position_ids("rope", [LayoutPiece(3)])
    with pytest.raises(ValueError):
        LayoutPiece(0, 2)
    with pytest.raises(ValueError):
        LayoutPiece(-1)


def test_device_and_dtype():
    ids = sequence_position_ids("epl", [LayoutPiece(4, 1)], device=torch.device("cpu"))
    assert ids.dtype == torch.long
