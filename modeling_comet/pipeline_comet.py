"""Text generation from prompts of any length with a [`CometForCausalLM`], in memory that does not grow with them.

`transformers`' own `"text-generation"` pipeline works with CoMeT models, but it tokenizes the whole prompt in one
call, and a fast tokenizer needs several hundred bytes per token while it does (the pre-tokenized pieces, offsets and
alignments of the whole text), so at a million tokens tokenizing costs more memory than the model. This pipeline
tokenizes the prompt piece by piece (`encode_long_text`: the same ids, checked at every cut) and keeps only the ids; it
is otherwise `TextGenerationPipeline`, with the same arguments and outputs::

    >>> from modeling_comet.pipeline_comet import CometTextGenerationPipeline  # doctest: +SKIP
    >>> generator = pipeline("text-generation", model=model, tokenizer=tokenizer,  # doctest: +SKIP
    ...                      pipeline_class=CometTextGenerationPipeline)
    >>> generator(book, max_new_tokens=32)[0]["generated_text"]  # doctest: +SKIP

A saved CoMeT checkpoint names it as the task ``"comet-text-generation"``, so that
``pipeline("comet-text-generation", model=path_or_repo, trust_remote_code=True)`` finds it in the checkpoint's own
copy of this file; importing this module registers the task for model objects too.
"""

from __future__ import annotations

from .requirements import MIN_TRANSFORMERS_VERSION  # noqa: F401  (importing it checks the installed transformers)

# isort: split

import logging
from array import array

import torch
from transformers import AutoModelForCausalLM, TextGenerationPipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.text_generation import Chat, ReturnType

logger = logging.getLogger(__name__)

COMET_TEXT_GENERATION_TASK = "comet-text-generation"
# Characters per tokenizer call, and how far each call reads past its cut to check it.
PIECE_CHARS = 1 << 14
OVERLAP_CHARS = 2048
# Tokens of agreement a cut needs between the two calls on either side of it, and cuts tried before giving up.
MIN_AGREEMENT = 8
MAX_CUT_TRIES = 8


def _special_tokens_around(tokenizer, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """The ids `tokenizer` puts before and after a text's own tokens (e.g. a BOS), found on a probe text."""
    if not add_special_tokens:
        return [], []
    bare = tokenizer("probe", add_special_tokens=False)["input_ids"]
    full = tokenizer("probe", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError("cannot tell where this tokenizer adds its special tokens")


def encode_long_text(
    tokenizer,
    text: str,
    add_special_tokens: bool = True,
    piece_chars: int | None = None,
    overlap_chars: int | None = None,
) -> torch.LongTensor:
    """`tokenizer(text, add_special_tokens=...)["input_ids"]` as a (1, L) tensor, tokenized in pieces.

    Each call reads `piece_chars + overlap_chars` characters (by default `PIECE_CHARS` and `OVERLAP_CHARS`), keeps the
    tokens before a cut near `piece_chars`, and the next call starts at the cut. A cut is taken only at a token
    boundary where the next call, reading on from there, gives the same tokens as this one over the overlap (at least
    `MIN_AGREEMENT` tokens, away from this call's end): this rules out a cut inside a word, inside a character split
    over byte-level tokens, or before a prefix that the tokenizer adds to the start of every text. Where no such cut
    is found (e.g. one word longer than the overlap, or a normalizer that prepends to every text), the whole text is
    tokenized at once, as `transformers` does, with a warning. Only fast tokenizers (which give offsets) are cut;
    others always tokenize the whole text.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    piece_chars = PIECE_CHARS if piece_chars is None else piece_chars
    overlap_chars = OVERLAP_CHARS if overlap_chars is None else overlap_chars
    if piece_chars < 1 or overlap_chars < 1:
        raise ValueError(f"piece_chars and overlap_chars must be positive, got {piece_chars} and {overlap_chars}")

    def whole() -> torch.LongTensor:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return torch.tensor([ids], dtype=torch.long)

    if len(text) <= piece_chars + overlap_chars or not getattr(tokenizer, "is_fast", False):
        return whole()

    def encode(start: int) -> tuple[list[int], list[tuple[int, int]], int]:
        end = min(len(text), start + piece_chars + overlap_chars)
        enc = tokenizer(
            text[start:end],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return enc["input_ids"], enc["offset_mapping"], end - start

    prefix, suffix = _special_tokens_around(tokenizer, add_special_tokens)
    # One growing buffer of int64 (a large array grows in place), shared with the returned tensor: no list of
    # per-piece tensors and no concatenated copy.
    kept = array("q", prefix)
    start = 0
    ids, offsets, width = encode(start)
    while start + width < len(text):
        # Tokens ending this close to the call's end may change once the text goes on: compare only those before.
        # (token ends do not decrease, so those tokens are the first `n_reliable`)
        reliable = width - overlap_chars // 2
        n_reliable = next((j for j, (_, end) in enumerate(offsets) if end > reliable), len(offsets))
        candidates = [
            k for k in range(1, n_reliable) if offsets[k][0] <= piece_chars and offsets[k - 1][1] <= offsets[k][0]
        ]
        for k in candidates[::-1][:MAX_CUT_TRIES]:
            cut = offsets[k][0]
            next_ids, next_offsets, next_width = encode(start + cut)
            compare = ids[k:n_reliable]  # the same tokens, read from the cut on
            if len(compare) >= MIN_AGREEMENT and next_ids[: len(compare)] == compare:
                kept.extend(ids[:k])
                start += cut
                ids, offsets, width = next_ids, next_offsets, next_width
                break
        else:
            logger.warning(
                "encode_long_text: no cut at which this tokenizer gives the same tokens on both sides was found near "
                "character %d; tokenizing the whole text (%d characters) at once",
                start + piece_chars,
                len(text),
            )
            return whole()
    kept.extend(ids)
    kept.extend(suffix)
    if not kept:  # (frombuffer refuses an empty buffer)
        return torch.zeros(1, 0, dtype=torch.long)
    return torch.frombuffer(kept, dtype=torch.long).unsqueeze(0)


class CometTextGenerationPipeline(TextGenerationPipeline):
    """`TextGenerationPipeline` that tokenizes long prompts piece by piece and keeps no per-token Python lists.

    Same arguments and outputs as `TextGenerationPipeline`. A prompt (or rendered chat) is tokenized with
    [`encode_long_text`] unless `truncation`, `padding`, `max_length`, `tokenizer_encode_kwargs` or
    `handle_long_generation` ask for the tokenizer's own handling, which then runs as in the parent. Only the generated
    tokens are decoded and turned into Python lists; the prompt's text is taken from the input, as the parent does.
    """

    def preprocess(
        self,
        prompt_text,
        prefix="",
        handle_long_generation=None,
        add_special_tokens=None,
        truncation=None,
        padding=None,
        max_length=None,
        continue_final_message=None,
        tokenizer_encode_kwargs=None,
        tools=None,
        documents=None,
        **generate_kwargs,
    ):
        plain = handle_long_generation is None and truncation is None and padding is None and max_length is None
        if plain and not tokenizer_encode_kwargs:
            if isinstance(prompt_text, Chat):
                if continue_final_message is None:
                    continue_final_message = prompt_text.messages[-1]["role"] == "assistant"
                rendered = self.tokenizer.apply_chat_template(
                    prompt_text.messages,
                    add_generation_prompt=not continue_final_message,
                    continue_final_message=continue_final_message,
                    tokenize=False,
                    tools=tools,
                    documents=documents,
                )
                input_ids = encode_long_text(self.tokenizer, rendered, add_special_tokens=False)
            else:
                special = True if add_special_tokens is None else add_special_tokens
                input_ids = encode_long_text(self.tokenizer, prefix + prompt_text, add_special_tokens=special)
            return {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "prompt_text": prompt_text,
            }
        return super().preprocess(
            prompt_text,
            prefix=prefix,
            handle_long_generation=handle_long_generation,
            add_special_tokens=add_special_tokens,
            truncation=truncation,
            padding=padding,
            max_length=max_length,
            continue_final_message=continue_final_message,
            tokenizer_encode_kwargs=tokenizer_encode_kwargs,
            tools=tools,
            documents=documents,
            **generate_kwargs,
        )

    def postprocess(self, model_outputs, return_type=ReturnType.FULL_TEXT, **kwargs):
        input_ids = model_outputs["input_ids"]
        # The parent turns whole sequences, prompt included, into Python lists before dropping the prompt's tokens.
        # For text it needs only the new ones (the prompt's text is the input's); a response template that parses
        # the decoded prompt is left to the parent.
        if (
            return_type in {ReturnType.NEW_TEXT, ReturnType.FULL_TEXT}
            and input_ids is not None
            and input_ids.shape[-1] > 0
            and getattr(self.tokenizer, "response_template", None) is None
        ):
            model_outputs = dict(model_outputs)
            model_outputs["generated_sequence"] = model_outputs["generated_sequence"][..., input_ids.shape[-1] :]
            model_outputs["input_ids"] = input_ids[..., :0]
        return super().postprocess(model_outputs, return_type=return_type, **kwargs)


# A checkpoint's copy of this file is imported again (as remote code) next to the installed package: register once.
if COMET_TEXT_GENERATION_TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(
        COMET_TEXT_GENERATION_TASK, pipeline_class=CometTextGenerationPipeline, pt_model=AutoModelForCausalLM
    )

__all__ = ["COMET_TEXT_GENERATION_TASK", "CometTextGenerationPipeline", "encode_long_text"]
