"""CoMeT through the ecosystem's entry points: TRL's SFTTrainer, refused generation modes, streaming."""

from threading import Thread

import pytest
import torch
from datasets import Dataset
from transformers import TextIteratorStreamer

from tests.test_comet_model import MEMORY, random_ids, tiny_comet
from tests.test_convert import tiny_tokenizer


@pytest.fixture
def tokenizer():
    tok = tiny_tokenizer(128)
    tok.pad_token = "w0"
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} w1 {% endfor %}"
    return tok


def words(n, seed):
    return " ".join(f"w{int(i)}" for i in random_ids(n, seed=seed))


SFT_DATASETS = {
    "language_modeling": lambda: {"text": [words(40 + 3 * k, k) for k in range(8)]},
    "prompt_completion": lambda: {
        "prompt": [words(30 + k, k) for k in range(8)],
        "completion": [words(12, 50 + k) for k in range(8)],
    },
    "conversational": lambda: {
        "messages": [
            [{"role": "user", "content": words(30 + k, k)}, {"role": "assistant", "content": words(10, 50 + k)}]
            for k in range(8)
        ]
    },
}


@pytest.mark.parametrize("kind", sorted(SFT_DATASETS))
def test_trl_sft_trainer_trains_the_memory_with_comets_own_loss(kind, tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model = tiny_comet().train()
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, logging_steps=1,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(SFT_DATASETS[kind]()),
                         processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] > MEMORY["chunk_size"]  # the memory is in play
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch))
        comet_loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss
    torch.testing.assert_close(trl_loss, comet_loss, atol=1e-5, rtol=0)

    before = {n: p.detach().clone() for n, p in model.named_parameters() if "comet_memory." in n}
    trainer.train()
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("gate" in n for n in changed) and any("readout_embedding" in n for n in changed)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_lookup_num_tokens=3), "prompt-lookup"),
        (dict(assistant_model="draft"), "assisted"),
        (dict(cache_implementation="static"), "cache_implementation='static'"),
    ],
)
def test_refused_generation_modes_fail_before_generation_starts(kwargs, message):
    model = tiny_comet()
    if kwargs.get("assistant_model") == "draft":
        kwargs = dict(assistant_model=tiny_comet())
    calls = []
    hook = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            model.generate(random_ids(1, 40), max_new_tokens=5, do_sample=False, **kwargs)
    finally:
        hook.remove()
    assert not calls


def test_text_iterator_streamer_streams_what_generate_returns(tokenizer):
    model = tiny_comet()
    ids = random_ids(1, 3 * MEMORY["chunk_size"] + 3)  # generation crosses a window fold
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    expected = model.generate(ids, **kwargs)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = Thread(target=model.generate, kwargs=dict(inputs=ids, streamer=streamer, **kwargs))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(pieces) > 1
    assert "".join(pieces).split() == tokenizer.decode(expected[0, ids.shape[1] :]).split()


def test_generate_returns_hidden_states_and_attentions_per_step():
    model = tiny_comet(attn="eager")
    ids = random_ids(2, 30)  # longer than one chunk
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_hidden_states=True,
                         output_attentions=True, return_dict_in_generate=True)
    window = model.model._layout("cpu").size
    assert len(out.hidden_states) == len(out.attentions) == 4
    assert [h.shape for h in out.hidden_states[0]] == [(2, 30, 64)] * 3  # prefill: every prompt position
    assert [h.shape for h in out.hidden_states[1]] == [(2, 1, 64)] * 3
    assert [a.shape for a in out.attentions[1]] == [(2, 4, 1, window)] * 2
    assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False))


def test_config_exposes_the_base_sizes_at_the_top_level():
    import json

    from transformers import LlamaConfig

    from modeling_comet import CometConfig

    base = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96)
    config = CometConfig(base_config=base)
    sizes = ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "vocab_size")
    assert [getattr(config, n) for n in sizes] == [32, 4, 3, 2, 96]
    config.vocab_size = 100  # what resize_token_embeddings does: the base's value changes, the one place it lives
    assert config.base_config.vocab_size == 100
    saved = json.loads(config.to_json_string())
    assert not set(sizes) & set(saved) and saved["base_config"]["vocab_size"] == 100
