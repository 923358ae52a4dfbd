"""Tiny models and a character tokenizer, built in code, for the evaluation tests.

- ``InductionLM`` predicts, at every position, the token that followed the earlier position whose
  preceding tokens match the current suffix the longest: a perfect copier that truly reads its context.
- ``BigramLM`` predicts from the current token alone, so context beyond one token cannot help it.
Both are ``PreTrainedModel`` + ``GenerationMixin`` so that ``generate()`` works on them (without a cache).
"""

from __future__ import annotations

import string

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus ``<unk>`` (0), ``<s>`` (1, BOS) and ``</s>`` (2, EOS)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


class TinyConfig(PreTrainedConfig):
    model_type = "tiny_eval"

    def __init__(self, vocab_size: int = 103, max_position_embeddings: int = 4096, **kwargs):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.num_hidden_layers = 1  # read by generate(); these models keep no cache
        kwargs.setdefault("use_cache", False)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("pad_token_id", 2)
        super().__init__(**kwargs)


class _OneHotLM(PreTrainedModel, GenerationMixin):
    config_class = TinyConfig
    main_input_name = "input_ids"

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device and dtype
        self.forward_lengths: list[int] = []  # input length of every forward call, for the tests
        self.post_init()

    def predictions(self, ids: torch.Tensor) -> torch.Tensor:  # (T,) -> (T,)
        raise NotImplementedError

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0, **kwargs):
        self.forward_lengths.append(input_ids.shape[1])
        predicted = torch.stack([self.predictions(row) for row in input_ids])  # (B, T)
        logits = torch.nn.functional.one_hot(predicted, self.config.vocab_size).float() + self.anchor
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class InductionLM(_OneHotLM):
    """Next token = the one after the earlier position sharing the longest suffix with the current one."""

    def predictions(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = ids.cpu().numpy()
        length = len(tokens)
        matches = tokens[:, None] == tokens[None, :]  # (T, T)
        suffix = np.zeros((length, length), dtype=np.int64)  # length of the common suffix ending at (t, s)
        suffix[0] = matches[0]
        for t in range(1, length):
            suffix[t, 0] = matches[t, 0]
            suffix[t, 1:] = matches[t, 1:] * (1 + suffix[t - 1, :-1])
        scores = np.where(np.tri(length, k=-1, dtype=bool), suffix, -1)  # only s < t
        # Prefer the most recent among equally long matches: argmax over reversed columns.
        best = length - 1 - scores[:, ::-1].argmax(1)
        found = scores.max(1) > 0
        following = tokens[np.minimum(best + 1, length - 1)]
        return torch.from_numpy(np.where(found, following, 0)).to(ids.device)


class BigramLM(_OneHotLM):
    """Next token from the current token only, through a fixed table."""

    def __init__(self, config: TinyConfig, table: torch.Tensor | None = None):
        super().__init__(config)
        if table is None:
            table = (torch.arange(config.vocab_size) * 7 + 3) % config.vocab_size
        self.register_buffer("table", table.long(), persistent=False)

    def predictions(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


class PositionOracleLM(_OneHotLM):
    """Reads the true next token and is right only at positions whose *target* index passes ``rule``."""

    def __init__(self, config: TinyConfig, rule):
        super().__init__(config)
        self.rule = rule

    def predictions(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[0]
        following = torch.cat([ids[1:], ids[-1:]])
        wrong = (following + 1) % self.config.vocab_size
        right = torch.tensor([bool(self.rule(t + 1, length)) for t in range(length)])
        return torch.where(right, following, wrong)


class RecallOrEvenLM(_OneHotLM):
    """Reads the true next token and is right on it when it occurred earlier in the input or is even.

    On a corpus of distinct tokens its copy accuracy is 1 and its LM accuracy is the share of even tokens in
    the scored window: both can be worked out by hand from where the spans start. Records every input row.
    """

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.inputs: list[list[int]] = []

    def predictions(self, ids: torch.Tensor) -> torch.Tensor:
        self.inputs.append(ids.tolist())
        following = torch.cat([ids[1:], ids[-1:]])
        seen = torch.tensor([bool((ids[: t + 1] == following[t]).any()) for t in range(len(ids))])
        right = seen | (following % 2 == 0)
        return torch.where(right, following, (following + 1) % self.config.vocab_size)


def tiny_comet(vocab_size: int = len(SPECIAL_TOKENS) + len(string.printable), chunk_size: int = 256, seed: int = 0):
    """A CoMeT model on a random two-layer Llama (hidden 64) whose vocabulary fits ``char_tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_comet import CometForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).eval()
    return CometForCausalLM.from_base(
        base, chunk_size=chunk_size, global_mem_size=4, temp_beacon_stride=16, temp_mem_budget=32
    ).eval()


def markov_corpus(num_tokens: int, vocab_size: int = 50, first_id: int = 3, seed: int = 0) -> torch.Tensor:
    """A token stream from a random sparse Markov chain (ids >= ``first_id``, so never BOS/EOS)."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(first_id, first_id + vocab_size, (first_id + vocab_size, 3), generator=generator)
    stream = [first_id]
    choices = torch.randint(0, 3, (num_tokens,), generator=generator)
    for choice in choices[1:]:
        stream.append(int(successors[stream[-1], choice]))
    return torch.tensor(stream)
