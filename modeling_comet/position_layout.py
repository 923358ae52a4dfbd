"""Position ids for compression tokens: the default layout and EPL (Enhanced Position Layout).

A span of context tokens with position ids ``x_1 .. x_n`` is summarised by ``m`` special tokens
(gist, memory, summary, beacon or readout tokens).

* The **default** layout appends the special tokens after the span with consecutive ids
  ``x_n + 1 .. x_n + m``.
* The **EPL** layout cuts the span into ``m`` equal groups of ``ratio = n / m`` ids and gives each
  special token the centre of its group, ``round(linspace(x_1 + (ratio-1)/2, x_n - (ratio-1)/2, m))``,
  so that a special token sits, in RoPE distance, next to the tokens it summarises. Tokens after the
  span keep their order: they continue from ``x_n + 1``.

Rounding is half-up (``floor(x + 0.5)``), so ids never depend on floating-point ties being broken
towards even numbers.

[`sequence_position_ids`] lays out a whole sequence of kept text spans, compressed spans and a trailing
prompt under either layout.

This file is part of the remote code a checkpoint carries: it depends on torch alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POSITION_LAYOUTS = ("default", "epl")


def default_special_position_ids(span_end: int, num_special: int, device=None) -> torch.Tensor:
    """Ids of ``num_special`` tokens appended after a span whose last id is ``span_end``.

    >>> default_special_position_ids(9, 3).tolist()
    [10, 11, 12]
    """
    if num_special < 0:
        raise ValueError(f"num_special must be >= 0, got {num_special}")
    return torch.arange(span_end + 1, span_end + 1 + num_special, device=device, dtype=torch.long)


def epl_special_position_ids(span_start: int, span_end: int, num_special: int, device=None) -> torch.Tensor:
    """EPL ids of ``num_special`` tokens summarising the span ``span_start .. span_end`` (inclusive).

    >>> epl_special_position_ids(0, 15, 4).tolist()   # four groups of four: centres 1.5, 5.5, 9.5, 13.5
    [2, 6, 10, 14]
    >>> epl_special_position_ids(10, 19, 1).tolist()  # one token: the centre of the span
    [15]
    """
    if num_special < 0:
        raise ValueError(f"num_special must be >= 0, got {num_special}")
    if span_end < span_start:
        raise ValueError(f"empty span: span_end ({span_end}) < span_start ({span_start})")
    if num_special == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    ratio = (span_end - span_start + 1) / num_special
    half = (ratio - 1) / 2
    centres = torch.linspace(span_start + half, span_end - half, num_special, dtype=torch.float64, device=device)
    return torch.floor(centres + 0.5).long()


def special_position_ids(
    layout: str, span_start: int, span_end: int, num_special: int, device=None
) -> torch.Tensor:
    """Ids for ``num_special`` tokens summarising ``span_start .. span_end`` under ``layout``."""
    if layout == "default":
        return default_special_position_ids(span_end, num_special, device=device)
    if layout == "epl":
        return epl_special_position_ids(span_start, span_end, num_special, device=device)
    raise ValueError(f"unknown position layout {layout!r}; expected one of {POSITION_LAYOUTS}")


def grouped_special_position_ids(
    layout: str, span_start: int, group_sizes: list[int], append_after: int | None = None, device=None
) -> torch.Tensor:
    """Ids for one special token per consecutive group of a span (e.g. a beacon after every stride tokens).

    Under EPL each token takes the centre of its own group, so a short last group is handled by its
    real extent. Under the default layout the tokens are appended with consecutive ids after
    ``append_after`` (defaults to the span's last id).

    >>> grouped_special_position_ids("epl", 0, [4, 4, 2]).tolist()
    [2, 6, 9]
    >>> grouped_special_position_ids("default", 0, [4, 4, 2]).tolist()
    [10, 11, 12]
    """
    span_end = span_start + sum(group_sizes) - 1
    if layout == "default":
        last = span_end if append_after is None else append_after
        return default_special_position_ids(last, len(group_sizes), device=device)
    if layout != "epl":
        raise ValueError(f"unknown position layout {layout!r}; expected one of {POSITION_LAYOUTS}")
    ids, start = [], span_start
    for size in group_sizes:
        if size <= 0:
            raise ValueError(f"group sizes must be positive, got {group_sizes}")
        ids.append(epl_special_position_ids(start, start + size - 1, 1, device=device))
        start += size
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=device)


@dataclass(frozen=True)
class LayoutPiece:
    """One piece of a sequence laid out by [`sequence_position_ids`].

    Args:
        length (`int`):
            Number of original (uncompressed) tokens the piece covers.
        num_special (`int`, *optional*, defaults to 0):
            Number of compression tokens summarising the piece; 0 means plain text.
        text_visible (`bool`, *optional*, defaults to `True`):
            Whether the piece's own tokens are in the sequence. `True` with `num_special > 0` is the
            beacon/gist form (text followed by its compression tokens); `False` is the replacement form
            (RAM skimming, ICAE): the text is gone and only the compression tokens stand for it.
    """

    length: int
    num_special: int = 0
    text_visible: bool = True

    def __post_init__(self):
        if self.length < 0 or self.num_special < 0:
            raise ValueError(f"LayoutPiece needs length >= 0 and num_special >= 0, got {self}")
        if self.num_special and not self.length:
            raise ValueError(f"compression tokens need a non-empty span to summarise, got {self}")

    @property
    def num_tokens(self) -> int:
        """Number of tokens this piece puts in the sequence."""
        return (self.length if self.text_visible else 0) + self.num_special


def sequence_position_ids(layout: str, pieces, start: int = 0, device=None) -> torch.Tensor:
    """Position ids of a whole sequence of text spans, compressed spans and a trailing prompt.

    * ``"default"``: ids count the tokens the model actually sees, ``start, start+1, ...``; compression
      tokens follow the text they summarise (or take the place of the text they replace) with consecutive ids.
    * ``"epl"``: every visible text token keeps the id it has in the uncompressed sequence; the
      compression tokens of a span get the EPL (linspace) ids over that span's real extent; what follows a
      span continues from the span's last id + 1.

    With no compressed piece both layouts give ``start .. start+n-1``.

    >>> pieces = [LayoutPiece(4), LayoutPiece(8, 1, text_visible=False), LayoutPiece(3)]
    >>> sequence_position_ids("default", pieces).tolist()   # 4 text, 1 summary vector, 3 prompt tokens
    [0, 1, 2, 3, 4, 5, 6, 7]
    >>> sequence_position_ids("epl", pieces).tolist()       # summary at the centre of ids 4..11
    [0, 1, 2, 3, 8, 12, 13, 14]
    >>> sequence_position_ids("epl", [LayoutPiece(4, 2), LayoutPiece(2)]).tolist()  # text + 2 beacons
    [0, 1, 2, 3, 1, 3, 4, 5]
    """
    if layout not in POSITION_LAYOUTS:
        raise ValueError(f"unknown position layout {layout!r}; expected one of {POSITION_LAYOUTS}")
    if layout == "default":
        total = sum(piece.num_tokens for piece in pieces)
        return torch.arange(start, start + total, device=device, dtype=torch.long)
    ids, next_id = [], start
    for piece in pieces:
        if piece.text_visible:
            ids.append(torch.arange(next_id, next_id + piece.length, device=device, dtype=torch.long))
        if piece.num_special:
            ids.append(epl_special_position_ids(next_id, next_id + piece.length - 1, piece.num_special, device=device))
        next_id += piece.length
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=device)


__all__ = [
    "POSITION_LAYOUTS",
    "LayoutPiece",
    "default_special_position_ids",
    "epl_special_position_ids",
    "grouped_special_position_ids",
    "sequence_position_ids",
    "special_position_ids",
]
