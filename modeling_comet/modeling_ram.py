"""RAM (Read As HuMan): query-aware context compression in front of a pretrained decoder.

The context is cut into fixed-width segments. An encoder (a trainable copy of the base's first `encoder_layers`
layers) reads the query and every segment as separate rows of one batch, each with positions from 0. Segments whose
mean-pooled encoding is most similar (cosine) to the query's are *kept* and reach the decoder as their token
embeddings ("close reading"); every other segment is *skimmed* into a single query-weighted summary vector mapped
into the decoder's embedding space. The decoder reads the segments in their original order, then the question.

The encoder reads token embeddings from the decoder's embedding table (shared, not copied): the table is the
largest tensor of a small model and RAM's relevance is trained through the encoder layers, so a second copy would
cost memory without a clear gain. Fine-tuning the embedding table therefore changes both sides.

This file is part of the remote code a checkpoint carries: it depends on torch and transformers alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .requirements import MIN_TRANSFORMERS_VERSION  # noqa: F401  (importing it checks the installed transformers)

# isort: split

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_ram import RamConfig
from .pipeline_ram import RamQuestionAnsweringPipeline  # noqa: F401  (makes save_pretrained ship the pipeline file)
from .position_layout import LayoutPiece, sequence_position_ids


@dataclass
class RamCompression:
    """Decoder input built from a batch of (context, question[, answer]) triples, left-padded.

    Args:
        inputs_embeds (`torch.FloatTensor` of shape `(batch, length, hidden)`): decoder input embeddings.
        attention_mask (`torch.LongTensor` of shape `(batch, length)`): 1 on real positions, 0 on left padding.
        position_ids (`torch.LongTensor` of shape `(batch, length)`): ids under `config.position_layout`.
        labels (`torch.LongTensor` of shape `(batch, length)`, *optional*): answer tokens, -100 elsewhere.
        relevance_scores (`torch.FloatTensor` of shape `(batch, max_segments)`): cosine query-segment scores,
            0 past an example's last segment.
        segment_mask (`torch.BoolTensor` of shape `(batch, max_segments)`): which entries of the scores are segments.
        kept_segments (`torch.BoolTensor` of shape `(batch, max_segments)`): segments the decoder reads as tokens.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    relevance_scores: torch.Tensor
    segment_mask: torch.Tensor
    kept_segments: torch.Tensor


@dataclass
class RamCausalLMOutput(CausalLMOutputWithPast):
    """[`CausalLMOutputWithPast`] plus RAM's loss terms and selection.

    Args:
        nll_loss (`torch.FloatTensor`, *optional*): mean negative log-likelihood of the answer tokens.
        contrastive_loss (`torch.FloatTensor`, *optional*): multi-positive contrastive loss over segment scores.
        relevance_scores (`torch.FloatTensor` of shape `(batch, max_segments)`, *optional*): cosine scores.
        segment_mask (`torch.BoolTensor` of shape `(batch, max_segments)`, *optional*): real segments.
        kept_segments (`torch.BoolTensor` of shape `(batch, max_segments)`, *optional*): segments kept as tokens.
    """

    nll_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    relevance_scores: torch.Tensor | None = None
    segment_mask: torch.Tensor | None = None
    kept_segments: torch.Tensor | None = None


def multi_positive_contrastive_loss(
    scores: torch.Tensor, positives: torch.Tensor, segment_mask: torch.Tensor, temperature: float
) -> torch.Tensor | None:
    """``-log(sum_{i in P} exp(s_i/tau) / sum_j exp(s_j/tau))`` averaged over examples with a positive.

    Negatives are the other segments of the same example. Examples without a positive segment, or whose every
    segment is positive, carry no contrast and are skipped; returns ``None`` when no example is left.

    Args:
        scores (`torch.FloatTensor` of shape `(batch, max_segments)`): query-segment scores `s`.
        positives (`torch.BoolTensor` of shape `(batch, max_segments)`): the positive set `P` of each example.
        segment_mask (`torch.BoolTensor` of shape `(batch, max_segments)`): which entries are real segments.
        temperature (`float`): `tau`.
    """
    positives = positives & segment_mask
    has_contrast = positives.any(-1) & (positives != segment_mask).any(-1)
    if not has_contrast.any():
        return None
    logits = (scores / temperature).masked_fill(~segment_mask, float("-inf"))
    log_all = torch.logsumexp(logits, dim=-1)
    log_positive = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=-1)
    return (log_all - log_positive)[has_contrast].mean()


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `states` (R, T, d) over the positions where `mask` (R, T) is 1."""
    weights = mask.to(states.dtype).unsqueeze(-1)  # (R, T, 1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1)


class RamPreTrainedModel(PreTrainedModel):
    """RAM's weights and its compression (encoder, selection, skimming), shared by [`RamModel`] and
    [`RamForCausalLM`]. Both hold the base causal LM as `decoder`, the copy of its first layers as `encoder_layers`
    and the `alignment`, so each loads the other's checkpoint.

    `base_model_prefix` is `"decoder"`: the base model is the backbone that reads the compressed input, and every base
    weight lives under it (`decoder.model.layers.0...`). `_no_split_modules` is the base's decoder-layer class (the
    encoder layers are the same class), and activation checkpointing covers the encoder layers as well as the
    decoder's.
    """

    config_class = RamConfig
    base_model_prefix = "decoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _tied_weights_keys = {"decoder.lm_head.weight": "decoder.model.embed_tokens.weight"}


    def _init_weights(self, module):
        # The alignment starts as the identity: encoder states of a copied backbone already live in the
        # decoder's residual space, so a summary vector is usable before any training.
        if module is getattr(self, "alignment", None):
            init.eye_(module.weight)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def __init__(self, config: RamConfig):
        super().__init__(config)
        # Either class loads any RAM checkpoint, so a saved config maps both (saving adds only its own class).
        auto_map = dict(getattr(config, "auto_map", None) or {})
        for auto_class, model_class in (("AutoModel", "RamModel"), ("AutoModelForCausalLM", "RamForCausalLM")):
            auto_map.setdefault(auto_class, f"{__name__.rsplit('.', 1)[-1]}.{model_class}")
        config.auto_map = auto_map
        self.decoder = AutoModelForCausalLM.from_config(config.base_config)
        decoder_layer_class = type(self.decoder.base_model.layers[0])
        self._no_split_modules = [decoder_layer_class.__name__]
        self.encoder_layers = nn.ModuleList(
            decoder_layer_class(self.decoder.config, layer_idx) for layer_idx in range(config.encoder_layers)
        )
        hidden_size = config.base_config.hidden_size
        self.alignment = nn.Linear(hidden_size, hidden_size)
        self.post_init()

    @classmethod
    def from_base(cls, base_model_or_path, dtype=torch.float32, **ram_fields):
        """Build RAM on a pretrained base: the decoder gets its weights, the encoder a copy of its first layers.

        Args:
            base_model_or_path (`PreTrainedModel`, `str` or `Path`): the base causal LM or its folder.
            dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype when loading from a folder.
            **ram_fields: [`RamConfig`] fields (`encoder_layers`, `segment_size`, `keep_ratio`, ...).
        """
        if isinstance(base_model_or_path, (str, Path)):
            base = AutoModelForCausalLM.from_pretrained(base_model_or_path, dtype=dtype)
        else:
            base = base_model_or_path
        config = RamConfig(base_config=base.config.to_dict(), **ram_fields)
        model = cls(config).to(base.dtype)
        model.decoder.load_state_dict(base.state_dict())
        for encoder_layer, base_layer in zip(model.encoder_layers, base.base_model.layers, strict=False):
            encoder_layer.load_state_dict(base_layer.state_dict())
        if base.generation_config is not None:
            model.generation_config = base.generation_config
        return model

    def get_input_embeddings(self):
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.decoder.set_input_embeddings(value)

    # ----- encoder -----------------------------------------------------------------------------------------------

    def encode_rows(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode token rows in parallel, each from position 0; returns states (R, T, d) and mask (R, T)."""
        device = self.decoder.device
        width = max(len(row) for row in rows)
        token_ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for index, row in enumerate(rows):
            token_ids[index, : len(row)] = row
            mask[index, : len(row)] = 1
        hidden_states = self.get_input_embeddings()(token_ids)  # (R, T, d)
        position_ids = torch.arange(width, device=device).unsqueeze(0).expand(len(rows), -1)
        causal_mask = create_causal_mask(
            config=self.decoder.config,
            inputs_embeds=hidden_states,
            attention_mask=mask,
            cache=None,
            position_ids=position_ids,
        )
        position_embeddings = self.decoder.base_model.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.encoder_layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
            )
        return hidden_states, mask

    def _check_token_ids(self, token_ids: torch.Tensor, name: str):
        vocab_size = self.get_input_embeddings().num_embeddings
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= vocab_size):
            raise ValueError(
                f"{name} holds token ids outside the model's vocabulary [0, {vocab_size}): got range "
                f"[{int(token_ids.min())}, {int(token_ids.max())}]; is the tokenizer the base model's?"
            )

    def num_kept_segments(self, num_segments: int) -> int:
        """``floor(keep_ratio * num_segments)``, robust to floating-point error (0.29 * 100 keeps 29)."""
        return min(num_segments, math.floor(self.config.keep_ratio * num_segments + 1e-9))

    def compress(
        self,
        context_ids: torch.Tensor,
        question_ids: torch.Tensor,
        context_attention_mask: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        answer_ids: torch.Tensor | None = None,
        answer_attention_mask: torch.Tensor | None = None,
    ) -> RamCompression:
        """Select, skim and lay out a batch of contexts; see [`RamCompression`].

        Padding may be on either side: real tokens are those where the attention masks are 1.
        """
        if context_ids.dim() != 2 or question_ids.dim() != 2 or len(context_ids) != len(question_ids):
            raise ValueError(
                f"context_ids and question_ids must be (batch, length) with the same batch size, got "
                f"{tuple(context_ids.shape)} and {tuple(question_ids.shape)}"
            )
        for name, ids in (("context_ids", context_ids), ("question_ids", question_ids), ("answer_ids", answer_ids)):
            if ids is not None:
                self._check_token_ids(ids, name)
        contexts = _unpad(context_ids, context_attention_mask)
        questions = _unpad(question_ids, question_attention_mask)
        answers = _unpad(answer_ids, answer_attention_mask) if answer_ids is not None else [None] * len(contexts)
        if any(len(question) == 0 for question in questions):
            raise ValueError("every example needs a non-empty question")
        segments = [list(context.split(self.config.segment_size)) for context in contexts]

        rows = [row for question, example in zip(questions, segments, strict=True) for row in (question, *example)]
        states, mask = self.encode_rows(rows)  # (R, T, d), (R, T)
        pooled = masked_mean(states, mask)  # (R, d)

        embed = self.get_input_embeddings()
        batch_size, max_segments = len(contexts), max((len(example) for example in segments), default=0)
        device = context_ids.device
        scores = torch.zeros((batch_size, max_segments), dtype=pooled.dtype, device=device)
        segment_mask = torch.zeros((batch_size, max_segments), dtype=torch.bool, device=device)
        kept = torch.zeros((batch_size, max_segments), dtype=torch.bool, device=device)
        sequences, row = [], 0
        for index, (example, question, answer) in enumerate(zip(segments, questions, answers, strict=True)):
            query_row, first, count = row, row + 1, len(example)
            row += 1 + count
            query = pooled[query_row]  # (d,)
            example_scores = F.cosine_similarity(pooled[first : first + count], query.unsqueeze(0), dim=-1)  # (N,)
            scores[index, :count] = example_scores
            segment_mask[index, :count] = True
            keep = self.num_kept_segments(count)
            if keep:
                kept[index, example_scores.topk(keep).indices] = True
            pieces, embeds = [], []
            for position, segment in enumerate(example):
                if kept[index, position]:
                    pieces.append(LayoutPiece(len(segment)))
                    embeds.append(embed(segment))
                else:
                    pieces.append(LayoutPiece(len(segment), 1, text_visible=False))
                    embeds.append(self.skim(states[first + position], mask[first + position], query))
            pieces.append(LayoutPiece(len(question)))
            embeds.append(embed(question))
            if answer is not None:
                pieces.append(LayoutPiece(len(answer)))
                embeds.append(embed(answer))
            labels = None
            if answer is not None:
                labels = torch.full((sum(piece.num_tokens for piece in pieces),), -100, dtype=torch.long, device=device)
                labels[len(labels) - len(answer) :] = answer
            positions = sequence_position_ids(self.config.position_layout, pieces, device=device)
            sequences.append((torch.cat(embeds), positions, labels))

        return RamCompression(
            *_left_pad(sequences, with_labels=answer_ids is not None),
            relevance_scores=scores,
            segment_mask=segment_mask,
            kept_segments=kept,
        )

    def _contrastive_loss(self, compression: RamCompression, segment_labels: torch.Tensor | None):
        """`L_con` of a compressed batch against `segment_labels` (1 = relevant), or `None` without labels."""
        if segment_labels is None:
            return None
        positives = segment_labels.to(compression.segment_mask.device)[:, : compression.segment_mask.shape[1]] == 1
        return multi_positive_contrastive_loss(
            compression.relevance_scores, positives, compression.segment_mask, self.config.contrastive_temperature
        )

    def skim(self, segment_states: torch.Tensor, segment_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """One summary vector for a segment: ``align(sum_t softmax_t(cos(h_t, r_q)) h_t)``, shape (1, d_dec)."""
        similarity = F.cosine_similarity(segment_states, query.unsqueeze(0), dim=-1)  # (T,)
        weights = similarity.masked_fill(segment_mask == 0, float("-inf")).softmax(-1)
        summary = weights @ segment_states  # (d,)
        return self.alignment(summary).unsqueeze(0)


@dataclass
class RamModelOutput(BaseModelOutputWithPast):
    """[`BaseModelOutputWithPast`] of the decoder's backbone over the compressed input, plus RAM's selection.

    Args:
        contrastive_loss (`torch.FloatTensor`, *optional*): multi-positive contrastive loss over segment scores.
        relevance_scores (`torch.FloatTensor` of shape `(batch, max_segments)`, *optional*): cosine scores.
        segment_mask (`torch.BoolTensor` of shape `(batch, max_segments)`, *optional*): real segments.
        kept_segments (`torch.BoolTensor` of shape `(batch, max_segments)`, *optional*): segments kept as tokens.
        attention_mask (`torch.LongTensor` of shape `(batch, length)`, *optional*): 1 on the real positions of
            `last_hidden_state` (the compressed input is left-padded).
    """

    contrastive_loss: torch.Tensor | None = None
    relevance_scores: torch.Tensor | None = None
    segment_mask: torch.Tensor | None = None
    kept_segments: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


class RamModel(RamPreTrainedModel):
    """RAM without the language-model head (what `AutoModel` loads): compress the context, then return the decoder
    backbone's hidden states over `[segments (kept or skimmed)][question]`, e.g. to embed a question read against a
    long context. It loads a [`RamForCausalLM`] checkpoint as is (the unused head weight, if untied, is skipped).
    """

    _keys_to_ignore_on_load_unexpected = [r"^decoder\.lm_head\."]

    def forward(
        self,
        context_ids: torch.LongTensor,
        question_ids: torch.LongTensor,
        context_attention_mask: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        segment_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> RamModelOutput:
        r"""
        context_ids (`torch.LongTensor` of shape `(batch, context_length)`): long context to compress.
        question_ids (`torch.LongTensor` of shape `(batch, question_length)`): question (also the encoder's query).
        segment_labels (`torch.Tensor` of shape `(batch, max_segments)`, *optional*):
            1 for relevant segments; enables `contrastive_loss`.
        """
        compression = self.compress(context_ids, question_ids, context_attention_mask, question_attention_mask)
        outputs = self.decoder.base_model(
            inputs_embeds=compression.inputs_embeds,
            attention_mask=compression.attention_mask,
            position_ids=compression.position_ids,
            **kwargs,
        )
        return RamModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            contrastive_loss=self._contrastive_loss(compression, segment_labels),
            relevance_scores=compression.relevance_scores,
            segment_mask=compression.segment_mask,
            kept_segments=compression.kept_segments,
            attention_mask=compression.attention_mask,
        )


class RamForCausalLM(RamPreTrainedModel, GenerationMixin):
    """A base causal LM (`decoder`) reading contexts compressed by a RAM encoder (`encoder_layers` + `alignment`).

    Two ways in:

    * `forward(context_ids=..., question_ids=..., answer_ids=...)` compresses the context and runs the decoder;
      with `answer_ids` it returns the training loss `NLL(answer) + contrastive_weight * L_con` (the contrastive
      term needs `segment_labels`).
    * `forward(input_ids=... / inputs_embeds=...)` is the plain decoder, which is what `GenerationMixin` calls.

    `generate(context_ids=..., question_ids=..., **generation_kwargs)` answers a question over a long context and
    returns only the new tokens.
    """

    def get_output_embeddings(self):
        return self.decoder.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.decoder.set_output_embeddings(new_embeddings)

    # ----- decoder -----------------------------------------------------------------------------------------------

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        context_ids: torch.LongTensor | None = None,
        question_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        answer_ids: torch.LongTensor | None = None,
        answer_attention_mask: torch.Tensor | None = None,
        segment_labels: torch.Tensor | None = None,
        relevance_only: bool = False,
        **kwargs,
    ) -> RamCausalLMOutput:
        r"""
        context_ids (`torch.LongTensor` of shape `(batch, context_length)`, *optional*):
            Long context to compress. When given, `question_ids` is required and `input_ids`/`inputs_embeds`,
            `position_ids`, `labels` and `cache` must not be passed (the decoder input is built here).
        question_ids (`torch.LongTensor` of shape `(batch, question_length)`, *optional*):
            Question prompt read after the context; it is also the encoder's query.
        answer_ids (`torch.LongTensor` of shape `(batch, answer_length)`, *optional*):
            Answer tokens appended after the question; the NLL is taken over them only.
        segment_labels (`torch.Tensor` of shape `(batch, max_segments)`, *optional*):
            1 for segments relevant to the question (positives), 0 otherwise; enables the contrastive term.
        relevance_only (`bool`, *optional*, defaults to `False`):
            Skip the decoder: return only the relevance scores, the selection and (with `segment_labels`) the
            contrastive loss. A cheap way to train the encoder's relevance alone.
        """
        if context_ids is None:
            outputs = self.decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
            return RamCausalLMOutput(**outputs)
        if question_ids is None:
            raise ValueError("context_ids needs question_ids: RAM selects segments by their relevance to the question")
        if any(value is not None for value in (input_ids, inputs_embeds, position_ids, labels, cache)):
            raise ValueError(
                "pass either context_ids/question_ids/answer_ids or input_ids/inputs_embeds/position_ids/labels/cache"
            )
        compression = self.compress(
            context_ids, question_ids, context_attention_mask, question_attention_mask, answer_ids, answer_attention_mask
        )
        contrastive_loss = self._contrastive_loss(compression, segment_labels)
        if relevance_only:
            return RamCausalLMOutput(
                loss=None if contrastive_loss is None else self.config.contrastive_weight * contrastive_loss,
                contrastive_loss=contrastive_loss,
                relevance_scores=compression.relevance_scores,
                segment_mask=compression.segment_mask,
                kept_segments=compression.kept_segments,
            )
        outputs = self.decoder(
            inputs_embeds=compression.inputs_embeds,
            attention_mask=compression.attention_mask,
            position_ids=compression.position_ids,
            labels=compression.labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        loss = outputs.loss
        if contrastive_loss is not None:
            weighted = self.config.contrastive_weight * contrastive_loss
            loss = weighted if loss is None else loss + weighted
        return RamCausalLMOutput(
            loss=loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            nll_loss=outputs.loss,
            contrastive_loss=contrastive_loss,
            relevance_scores=compression.relevance_scores,
            segment_mask=compression.segment_mask,
            kept_segments=compression.kept_segments,
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        context_ids: torch.LongTensor | None = None,
        question_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        **generation_kwargs,
    ):
        """Answer `question_ids` over `context_ids`: compress, then decode with `GenerationMixin.generate`.

        The compressed prompt goes in as `inputs_embeds` with its `position_ids` (decoding continues from the last
        id), so every generation option works; the result holds only the new tokens. Without `context_ids` this is
        the base model's `generate`.
        """
        if context_ids is None:
            return super().generate(inputs, **generation_kwargs)
        if inputs is not None:
            raise ValueError("pass the prompt as context_ids/question_ids, not as inputs, when compressing")
        compression = self.compress(context_ids, question_ids, context_attention_mask, question_attention_mask)
        return super().generate(
            inputs_embeds=compression.inputs_embeds,
            attention_mask=compression.attention_mask,
            position_ids=compression.position_ids,
            **generation_kwargs,
        )


RamModel.register_for_auto_class("AutoModel")
RamForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def _unpad(token_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    if attention_mask is None:
        return list(token_ids)
    if attention_mask.shape != token_ids.shape:
        raise ValueError(f"attention mask {tuple(attention_mask.shape)} does not match ids {tuple(token_ids.shape)}")
    return [ids[row_mask.bool()] for ids, row_mask in zip(token_ids, attention_mask, strict=True)]


def _left_pad(sequences, with_labels: bool):
    """Left-pad (embeds, positions, labels) triples into batch tensors (generation appends on the right)."""
    width = max(len(embeds) for embeds, _, _ in sequences)
    first = sequences[0][0]
    batch = len(sequences)
    inputs_embeds = first.new_zeros((batch, width, first.shape[-1]))
    attention_mask = torch.zeros((batch, width), dtype=torch.long, device=first.device)
    position_ids = torch.zeros((batch, width), dtype=torch.long, device=first.device)
    labels = torch.full((batch, width), -100, dtype=torch.long, device=first.device) if with_labels else None
    for index, (embeds, positions, row_labels) in enumerate(sequences):
        inputs_embeds[index, width - len(embeds) :] = embeds
        attention_mask[index, width - len(embeds) :] = 1
        position_ids[index, width - len(embeds) :] = positions
        if with_labels:
            labels[index, width - len(embeds) :] = row_labels
    return inputs_embeds, attention_mask, position_ids, labels


__all__ = [
    "RamCausalLMOutput",
    "RamCompression",
    "RamForCausalLM",
    "RamModel",
    "RamModelOutput",
    "RamPreTrainedModel",
    "multi_positive_contrastive_loss",
]
