"""Language-modelling data for CoMeT training: text sources, tokenisation and packing through `datasets`.

A source is one text column, as a `datasets.Dataset` (memory-mapped Arrow, cached on disk) or, with
`streaming=True`, a `datasets.IterableDataset` that reads rows as training consumes them, so a corpus larger
than memory (or than the disk) trains::

    texts = load_text_dataset(config)                          # local files, a `datasets` source or pydoc prose
    rows = pack_dataset(texts, tokenizer, sample_tokens=1536)  # {"input_ids": [...], "labels": [...]} rows
    train, held_out = split_eval(rows, n_eval=4, seed=0)

Packing (`pack_dataset`) is one `.map(batched=True)`: the texts of a map batch are tokenised together
(without special tokens), each followed by EOS, concatenated, and cut into rows of exactly `sample_tokens`
tokens. The tokens left over at the end of a map batch (fewer than `sample_tokens`) are dropped: at most
`sample_tokens - 1` tokens per `batch_size` texts (the old loop dropped them once, at the end of the corpus).
The same code runs on a `Dataset` and an `IterableDataset`, and both give the same rows in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset, IterableDataset

if TYPE_CHECKING:
    from .comet_config import CometTrainingConfig

TEXT_COLUMN = "text"
# Local-file extensions and the `datasets` builder that reads them; anything else is read as plain text.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def pydoc_texts() -> list[str]:
    """The standard library's pydoc topics (~90k tokens of English prose): always present, no download."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _local_files(train_files: str) -> tuple[str, list[str]]:
    paths = [Path(p.strip()) for p in train_files.split(",") if p.strip()]
    if not paths:
        raise ValueError("--train_files is empty")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"training files not found: {missing}")
    builders = {FILE_BUILDERS.get(p.suffix.lower(), "text") for p in paths}
    if len(builders) > 1:
        raise ValueError(f"--train_files mixes file types ({sorted(builders)}); give files of one type")
    return builders.pop(), [str(p) for p in paths]


def load_text_dataset(config: CometTrainingConfig, streaming: bool | None = None) -> Dataset | IterableDataset:
    """The training text of `config` as a dataset with one column, `"text"`.

    Sources, in order of precedence:

    - `train_files`: comma-separated local files. Plain-text files are one document each (as before);
      `.json`/`.jsonl`, `.csv`, `.parquet` and `.arrow` files are read by their `datasets` builder and their
      `text_field` column is used, one document per row (the form to use for a corpus larger than memory).
    - `dataset_name` (+ `dataset_config`, `dataset_split`, `text_field`): any `datasets.load_dataset` source,
      a Hub name or a local folder.
    - otherwise the standard library's pydoc prose.

    `streaming` (default: `config.streaming`) returns an `IterableDataset` that reads lazily.
    """
    from datasets import load_dataset

    streaming = config.streaming if streaming is None else streaming
    if config.train_files:
        builder, paths = _local_files(config.train_files)
        kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
        data = load_dataset(builder, data_files={"train": paths}, split="train", streaming=streaming, **kwargs)
        text_field = TEXT_COLUMN if builder == "text" else config.text_field
        source = f"--train_files {config.train_files}"
    elif config.dataset_name:
        data = load_dataset(
            config.dataset_name, config.dataset_config, split=config.dataset_split, streaming=streaming
        )
        text_field = config.text_field
        source = f"dataset {config.dataset_name!r}" + (f" (config {config.dataset_config!r})" if config.dataset_config else "")
    else:
        data = Dataset.from_dict({TEXT_COLUMN: pydoc_texts()})
        return data.to_iterable_dataset() if streaming else data
    return _text_column(data, text_field, source)


def _text_column(data: Dataset | IterableDataset, text_field: str, source: str) -> Dataset | IterableDataset:
    """`data` reduced to its `text_field` column, renamed `"text"`; a clear error if the column is missing."""
    columns = data.column_names
    if columns is None:  # a stream whose features are unknown until read: look at its first row
        columns = list(next(iter(data.take(1)), {}).keys())
    if text_field not in columns:
        raise ValueError(f"{source} has no column {text_field!r} (columns: {columns}); set --text_field")
    data = data.select_columns([text_field])
    return data.rename_column(text_field, TEXT_COLUMN) if text_field != TEXT_COLUMN else data


def iter_texts(config: CometTrainingConfig) -> Iterator[str]:
    """The training texts of `config` one at a time; a `dataset_name` source is streamed, so that a consumer
    that stops early (the recall filler reads `filler_tokens` tokens) downloads only what it reads."""
    if not config.train_files and not config.dataset_name:
        yield from pydoc_texts()
        return
    streaming = config.streaming or bool(config.dataset_name)
    for row in load_text_dataset(config, streaming=streaming):
        yield row[TEXT_COLUMN]


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):  # one call for the batch (the Rust tokenizer in parallel)
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [tokenizer(text, add_special_tokens=False).input_ids for text in texts]


class _Packer:
    """The batched map function of `pack_dataset` (a class, so that `datasets` can fingerprint it)."""

    def __init__(self, tokenizer, sample_tokens: int):
        self.tokenizer = tokenizer
        self.sample_tokens = sample_tokens
        self.eos = tokenizer.eos_token_id

    def __call__(self, batch: dict[str, list]) -> dict[str, list[list[int]]]:
        texts = [text for text in batch[TEXT_COLUMN] if text]
        eos = [] if self.eos is None else [self.eos]
        stream = list(chain.from_iterable(ids + eos for ids in _token_ids(self.tokenizer, texts)))
        n = self.sample_tokens
        rows = [stream[i : i + n] for i in range(0, len(stream) - n + 1, n)]
        return {"input_ids": rows, "labels": [list(row) for row in rows]}


def pack_dataset(
    texts: Dataset | IterableDataset,
    tokenizer,
    sample_tokens: int,
    batch_size: int = 1000,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Tokenise the `"text"` column and pack it into rows of exactly `sample_tokens` tokens (`input_ids` and
    `labels`, equal): see the module docstring for what is dropped.

    Args:
        texts: a dataset with a `"text"` column (`load_text_dataset`); other columns are dropped.
        tokenizer: a `transformers` tokenizer, or any callable `tokenizer(text, add_special_tokens=False)`
            returning an object with `input_ids`; its `eos_token_id` (if any) ends every text.
        sample_tokens: tokens per row.
        batch_size: texts tokenised and packed together; the remainder of each batch is dropped.
        num_proc: processes for a `Dataset` (ignored for an `IterableDataset`, which packs as it is read).
    """
    if sample_tokens < 2:
        raise ValueError(f"sample_tokens must be at least 2, got {sample_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if texts.column_names is not None and TEXT_COLUMN not in texts.column_names:
        raise ValueError(f"pack_dataset needs a {TEXT_COLUMN!r} column, got {texts.column_names}")
    texts = texts.select_columns([TEXT_COLUMN])
    kwargs: dict[str, Any] = {"batched": True, "batch_size": batch_size, "remove_columns": [TEXT_COLUMN]}
    if isinstance(texts, Dataset):
        kwargs.update(num_proc=num_proc, desc=f"Packing into rows of {sample_tokens} tokens")
    packed = texts.map(_Packer(tokenizer, sample_tokens), **kwargs)
    if isinstance(packed, Dataset) and len(packed) == 0:
        total = sum(len(ids) + 1 for ids in _token_ids(tokenizer, texts[:batch_size][TEXT_COLUMN]))
        raise ValueError(
            f"the corpus gives no sample of {sample_tokens} tokens (its first {min(len(texts), batch_size)} "
            f"texts hold {total} tokens); lower --sample_tokens or add text"
        )
    return packed


def split_eval(
    rows: Dataset | IterableDataset, n_eval: int, seed: int, shuffle_buffer_size: int = 1000
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None]:
    """(train, eval) rows. A `Dataset` is shuffled and its first `n_eval` rows held out (at most all but one).
    A stream holds out its first `n_eval` rows (`.take`), trains on the rest (`.skip`), and shuffles the
    training rows in a buffer of `shuffle_buffer_size` (0: stream order)."""
    if n_eval < 0:
        raise ValueError(f"eval_samples must be non-negative, got {n_eval}")
    if isinstance(rows, Dataset):
        rows = rows.shuffle(seed=seed)
        n_eval = min(n_eval, len(rows) - 1)
        held_out = rows.select(range(n_eval)) if n_eval > 0 else None
        return rows.select(range(n_eval, len(rows))), held_out
    held_out = rows.take(n_eval) if n_eval > 0 else None
    train = rows.skip(n_eval) if n_eval > 0 else rows
    if shuffle_buffer_size > 0:
        train = train.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return train, held_out


def lm_datasets(config: CometTrainingConfig, tokenizer) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None]:
    """(train, eval) packed rows of `config` for `--task lm`."""
    rows = pack_dataset(
        load_text_dataset(config), tokenizer, config.sample_tokens, batch_size=config.pack_batch_size,
        num_proc=config.dataset_num_proc,
    )  # fmt: skip
    return split_eval(rows, config.eval_samples, config.seed, config.shuffle_buffer_size)


__all__ = ["iter_texts", "lm_datasets", "load_text_dataset", "pack_dataset", "pydoc_texts", "split_eval"]
