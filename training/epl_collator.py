"""A data collator that pads token batches and adds position ids for compression tokens (EPL or default)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modeling_comet.position_layout import POSITION_LAYOUTS, LayoutPiece, sequence_position_ids


def pieces_from_token_ids(input_ids, compression_token_ids) -> list[LayoutPiece]:
    """Read a token sequence as layout pieces: each run of compression tokens summarises the text before it.

    The text summarised by a run is the text between the previous run (or the start) and this run.

    >>> pieces_from_token_ids([5, 6, 7, 99, 8, 9], {99})
    [LayoutPiece(length=3, num_special=1, text_visible=True), LayoutPiece(length=2, num_special=0, text_visible=True)]
    """
    pieces, text_run, special_run = [], 0, 0
    for token in input_ids:
        if token in compression_token_ids:
            special_run += 1
            continue
        if special_run:
            pieces.append(_summarised_piece(text_run, special_run))
            text_run, special_run = 0, 0
        text_run += 1
    if special_run:
        pieces.append(_summarised_piece(text_run, special_run))
    elif text_run:
        pieces.append(LayoutPiece(text_run))
    return pieces


def _summarised_piece(text_run: int, special_run: int) -> LayoutPiece:
    if not text_run:
        raise ValueError("a run of compression tokens must follow at least one text token it summarises")
    return LayoutPiece(text_run, special_run)


@dataclass
class EplDataCollator:
    """Pad `input_ids` (and `labels`) and add `position_ids` laid out around compression tokens.

    Each run of compression tokens (ids in `compression_token_ids`) summarises the text since the previous run.
    Under `"epl"` the run's tokens sit at the centres of that text in position-id space and the text after it
    continues from the text's last id + 1; under `"default"` ids simply count the tokens. Padding gets position
    id 0, attention mask 0 and label -100.

    Args:
        pad_token_id (`int`):
            Token id used for padding `input_ids`.
        compression_token_ids (`set[int]`):
            Ids of the compression tokens (gist, memory, beacon, ...).
        position_layout (`str`, *optional*, defaults to `"epl"`):
            `"epl"` or `"default"`.
        padding_side (`str`, *optional*, defaults to `"right"`):
            `"right"` for training, `"left"` for batched generation.
        label_pad_token_id (`int`, *optional*, defaults to -100):
            Label given to padding positions (ignored by the loss).

    >>> collator = EplDataCollator(pad_token_id=0, compression_token_ids={99})
    >>> batch = collator([{"input_ids": [5, 6, 7, 8, 99, 99, 3]}, {"input_ids": [5, 6, 99, 3]}])
    >>> batch["input_ids"]
    tensor([[ 5,  6,  7,  8, 99, 99,  3],
            [ 5,  6, 99,  3,  0,  0,  0]])
    >>> batch["position_ids"]
    tensor([[0, 1, 2, 3, 1, 3, 4],
            [0, 1, 1, 2, 0, 0, 0]])
    >>> batch["attention_mask"]
    tensor([[1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0, 0, 0]])
    """

    pad_token_id: int
    compression_token_ids: set[int] = field(default_factory=set)
    position_layout: str = "epl"
    padding_side: str = "right"
    label_pad_token_id: int = -100

    def __post_init__(self):
        if self.position_layout not in POSITION_LAYOUTS:
            raise ValueError(f"position_layout must be one of {POSITION_LAYOUTS}, got {self.position_layout!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        self.compression_token_ids = set(self.compression_token_ids)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of features")
        has_labels = "labels" in features[0]
        width = max(len(feature["input_ids"]) for feature in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        position_ids = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), self.label_pad_token_id, dtype=torch.long) if has_labels else None
        for row, feature in enumerate(features):
            ids = list(feature["input_ids"])
            if has_labels and len(feature["labels"]) != len(ids):
                raise ValueError(f"feature {row}: labels ({len(feature['labels'])}) and input_ids ({len(ids)}) differ")
            columns = slice(0, len(ids)) if self.padding_side == "right" else slice(width - len(ids), width)
            pieces = pieces_from_token_ids(ids, self.compression_token_ids)
            input_ids[row, columns] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, columns] = 1
            position_ids[row, columns] = sequence_position_ids(self.position_layout, pieces)
            if has_labels:
                labels[row, columns] = torch.tensor(list(feature["labels"]), dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if has_labels:
            batch["labels"] = labels
        return batch


__all__ = ["EplDataCollator", "pieces_from_token_ids"]
