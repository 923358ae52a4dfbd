"""Long prompts through `pipeline`: tokenized piece by piece into the same ids, with the same outputs as transformers'.

`encode_long_text` must give exactly `tokenizer(text)["input_ids"]` for every tokenizer family it may meet (word
level, byte-level BPE with a BOS/EOS template, Metaspace), cutting where it can and tokenizing the whole text where a
cut cannot be checked; `CometTextGenerationPipeline` must answer as `TextGenerationPipeline` does while no tokenizer
call sees more than one piece.
"""

import logging
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, pipeline

import modeling_comet.pipeline_comet as pipeline_comet
from modeling_comet.pipeline_comet import CometTextGenerationPipeline, encode_long_text
from tests.test_comet_model import VOCAB, tiny_comet
from tests.test_convert import tiny_tokenizer

# Pieces a tokenizer may split differently at a text's edges: multi-byte characters (byte-level tokens split them),
# runs of spaces and newlines, digits, contractions, long words and a special token written in the text.
PARTS = ["hello", " world", "  ", "\n\n", " 1234567", "über", " 日本語", "🙂", "<|im_start|>", " " + "x" * 40,
         "\t", " don't", "'s", ".", "   a", " naïve", ",", " the", " cat"]


def random_text(seed, n_parts):
    rng = random.Random(seed)
    return "".join(rng.choice(PARTS) for _ in range(n_parts))


def byte_level_bpe():
    """A GPT-2/SmolLM2-style tokenizer: byte-level BPE, and a template adding <s> ... </s>."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>", "<|im_start|>"], show_progress=False)
    backend.train_from_iterator([random_text(seed, 400) for seed in range(20)], trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def metaspace_unigram(prepend_normalizer=False):
    """A sentencepiece-style tokenizer; with `prepend_normalizer`, the Llama-2 layout that puts '▁' before every
    text, which no cut inside a text can reproduce."""
    backend = Tokenizer(models.Unigram())
    if prepend_normalizer:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>"], unk_token="<unk>",
                                      show_progress=False)
    backend.train_from_iterator([random_text(seed, 400) for seed in range(20)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


TOKENIZERS = {
    "word_level": lambda: tiny_tokenizer(VOCAB),
    "byte_level_bpe": byte_level_bpe,
    "metaspace_unigram": metaspace_unigram,
    "prepend_normalizer": lambda: metaspace_unigram(prepend_normalizer=True),
}


@pytest.fixture
def calls(monkeypatch):
    """The lengths of the texts every tokenizer call gets."""
    lengths = []
    original = PreTrainedTokenizerFast.__call__

    def recording(self, text=None, *args, **kwargs):
        if isinstance(text, str):
            lengths.append(len(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", recording)
    return lengths


def word_text(seed, n_words):
    generator = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (n_words,), generator=generator))


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_piecewise_ids_equal_one_call(name, add_special_tokens, calls, caplog):
    tokenizer = TOKENIZERS[name]()
    for seed in range(4):
        text = word_text(seed, 700) if name == "word_level" else random_text(seed, 600)
        expected = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        calls.clear()
        with caplog.at_level(logging.WARNING, logger=pipeline_comet.__name__):
            caplog.clear()
            ids = encode_long_text(tokenizer, text, add_special_tokens=add_special_tokens, piece_chars=300,
                                   overlap_chars=300)
        assert ids.dtype == torch.long and ids.shape == (1, len(expected))
        assert ids[0].tolist() == expected
        fell_back = "tokenizing the whole text" in caplog.text
        if name == "prepend_normalizer":
            # Every text gets '▁' in front, so no cut gives the same tokens on both sides: one call, with a warning.
            assert fell_back and max(calls) == len(text)
        else:
            assert not fell_back, caplog.text
            assert max(calls) <= 600 < len(text)  # it really went piece by piece


def test_short_text_and_bad_arguments():
    tokenizer = tiny_tokenizer(VOCAB)
    assert encode_long_text(tokenizer, "w5 w6")[0].tolist() == tokenizer("w5 w6")["input_ids"]
    assert encode_long_text(tokenizer, "")[0].tolist() == tokenizer("")["input_ids"]
    blank = " " * 1000  # no tokens at all (whitespace is dropped), so no cut can be checked
    assert encode_long_text(tokenizer, blank, piece_chars=100, overlap_chars=100).shape == (1, 0)
    mostly_blank = " " * 1000 + "w5 w6"
    assert encode_long_text(tokenizer, mostly_blank, piece_chars=100, overlap_chars=100)[0].tolist() == [5, 6]
    with pytest.raises(TypeError, match="must be a str"):
        encode_long_text(tokenizer, ["w5"])
    with pytest.raises(ValueError, match="must be positive"):
        encode_long_text(tokenizer, "w5 " * 100, piece_chars=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_comet().eval()


def pipelines(model):
    tokenizer = tiny_tokenizer(VOCAB)
    tokenizer.pad_token, tokenizer.padding_side = "w0", "left"  # for batch_size > 1
    tokenizer.chat_template = ("{% for m in messages %}w3 {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}w4{% endif %}")
    plain = pipeline("text-generation", model=model, tokenizer=tokenizer)
    long = pipeline("text-generation", model=model, tokenizer=tokenizer, pipeline_class=CometTextGenerationPipeline)
    return plain, long


def test_pipeline_answers_as_transformers_does_while_tokenizing_in_pieces(model, calls, monkeypatch):
    monkeypatch.setattr(pipeline_comet, "PIECE_CHARS", 400)
    monkeypatch.setattr(pipeline_comet, "OVERLAP_CHARS", 200)
    plain, long = pipelines(model)
    assert isinstance(long, CometTextGenerationPipeline)
    # Registered as a task too: a model object needs no pipeline_class.
    assert isinstance(pipeline("comet-text-generation", model=model, tokenizer=plain.tokenizer),
                      CometTextGenerationPipeline)
    prompt = word_text(0, 1500)  # 94 chunks of 16 tokens, ~6k characters
    chat = [{"role": "user", "content": word_text(1, 900)}]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for args, extra in [
        (prompt, {}),
        (prompt, {"return_full_text": False}),
        (prompt, {"return_tensors": True}),
        (prompt, {"prefix": "w7 w8 "}),
        ([prompt, word_text(2, 300)], {}),
        ([prompt, word_text(2, 300)], {"batch_size": 2}),  # padded together
        (chat, {}),
    ]:
        expected = plain(args, **kwargs, **extra)
        calls.clear()
        assert long(args, **kwargs, **extra) == expected, extra
        assert calls and max(calls) <= 600, max(calls)  # no call saw more than one piece and its overlap
    # Asking for the tokenizer's own truncation hands the prompt to transformers' preprocessing unchanged.
    truncated = dict(kwargs, truncation=True, max_length=64)
    assert long(prompt, **truncated) == plain(prompt, **truncated)
