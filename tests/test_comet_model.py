"""CoMeT model tests on tiny bases built in code (hidden 64, two layers)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from modeling_comet import CometCache, CometConfig, CometForCausalLM

# Prepended to a subprocess script: any import of this project fails there, as on a machine without it.
BLOCK_THIS_PACKAGE = """import sys
class BlockProject:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling_comet", "training", "convert", "evaluation"):
            raise ImportError("this package must not be importable here: " + name)
sys.meta_path.insert(0, BlockProject())
"""

VOCAB = 128
MEMORY = dict(chunk_size=16, global_mem_size=4, temp_beacon_stride=4, temp_mem_budget=8)
BASES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_base(arch="llama", attn="sdpa", tie=False, seed=0):
    config_cls, model_cls = BASES[arch]
    config = config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=tie,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return model_cls(config).eval()


def tiny_comet(arch="llama", attn="sdpa", tie=False, **fields):
    return CometForCausalLM.from_base(tiny_base(arch, attn, tie), **{**MEMORY, **fields}).eval()


def random_ids(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=g)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(BASES))
def test_input_shorter_than_a_chunk_gives_base_logits(arch, attn):
    base = tiny_base(arch, attn)
    model = CometForCausalLM.from_base(base, **MEMORY).eval()
    assert model.config.base_config._attn_implementation == attn
    ids = random_ids(2, 13)
    with torch.no_grad():
        expected = base(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(ids, use_cache=True).logits, expected, atol=1e-4, rtol=0)
    # Beyond one chunk the memory takes over: the logits must differ from the base model's.
    long_ids = random_ids(1, 40)
    with torch.no_grad():
        assert (model(long_ids).logits[:, 16:] - base(long_ids).logits[:, 16:]).abs().max() > 1e-3


# How the memory is written: the global memory (readouts or a window of token states) and the temporary memory
# (beacon outputs or the chunk's last token states).
WRITES = {
    "readout": dict(global_write="readout"),
    "window": dict(global_write="window"),
    "window+tail": dict(global_write="window", temp_write="tail"),
    "readout+tail": dict(global_write="readout", temp_write="tail"),
}
PATH_CASES = [(layout, stride, write) for layout in ("default", "epl") for stride in (4, -1) for write in WRITES
              if stride > 0 or "tail" not in write]  # (the tail is a temporary memory: none without one)


@pytest.mark.parametrize("layout,stride,write", PATH_CASES)
def test_chunk_major_layer_major_and_cache_paths_agree(layout, stride, write):
    model = tiny_comet(position_layout=layout, temp_beacon_stride=stride, **WRITES[write])
    ids = random_ids(2, 75)
    with torch.no_grad():
        chunk_major = model(ids, layer_major=False).logits
        layer_major = model(ids, layer_major=True).logits
        cached = model(ids, use_cache=True).logits
    torch.testing.assert_close(layer_major, chunk_major, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, chunk_major, atol=1e-5, rtol=0)


@pytest.mark.parametrize("write", ["readout", "window", "window+tail"])
def test_reading_in_pieces_equals_reading_at_once(write):
    model = tiny_comet(**WRITES[write])
    ids = random_ids(1, 90)
    cache = CometCache()
    with torch.no_grad():
        whole = model(ids).logits
        pieces = [model(ids[:, s:e], cache=cache).logits for s, e in [(0, 7), (7, 40), (40, 41), (41, 90)]]
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-5, rtol=0)


def test_memory_state_size_is_constant():
    model = tiny_comet()
    sizes = []
    for chunks in (2, 20, 200):
        cache = CometCache()
        with torch.no_grad():
            model(random_ids(1, chunks * MEMORY["chunk_size"], seed=chunks), cache=cache, logits_to_keep=1)
        assert cache.memory.temp_valid.all() and cache.memory.global_valid.all()
        sizes.append((cache.nbytes(), [tuple(t.shape) for t in cache.memory.tensors() + cache.keys]))
    assert sizes[0] == sizes[1] == sizes[2]


def test_logits_to_keep():
    model = tiny_comet()
    ids = random_ids(2, 50)
    with torch.no_grad():
        full = model(ids).logits
        assert model(ids, logits_to_keep=3).logits.shape == (2, 3, VOCAB)
        torch.testing.assert_close(model(ids, logits_to_keep=3).logits, full[:, -3:], atol=1e-5, rtol=0)
        picked = torch.tensor([0, 17, 49])
        torch.testing.assert_close(model(ids, logits_to_keep=picked).logits, full[:, picked], atol=1e-5, rtol=0)


def test_fact_in_chunk_one_reaches_loss_at_chunk_five():
    model = tiny_comet().train()
    ids = random_ids(2, 5 * 16 + 8)
    embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
    labels = torch.full_like(ids, -100)
    labels[:, 5 * 16 + 1 :] = ids[:, 5 * 16 + 1 :]  # loss only inside chunk 5 (0-based)
    loss = model(inputs_embeds=embeds, labels=labels).loss
    loss.backward()
    assert embeds.grad[:, 16:32].abs().sum() > 0  # chunk 1 influences chunk 5 through the memory
    for name, param in model.named_parameters():
        if "comet_memory." in name and "temp_" not in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_loss_equals_reference_and_ignores_padding():
    model = tiny_comet()
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    # A padding position predicts nothing, so the first real token of a padded row is not a target.
    targets = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    expected = torch.nn.functional.cross_entropy(logits, targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)


def test_activation_checkpointing_gives_same_gradients():
    model = tiny_comet().train()
    ids = random_ids(2, 60)

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert model.model.layers[0].gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("write", ["readout", "window", "window+tail"])
def test_generate_equals_greedy_reference_loop(write):
    model = tiny_comet(**WRITES[write])
    ids = random_ids(1, 37)  # generation crosses two window folds
    out = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(30):
            seq = torch.cat([seq, model(seq, logits_to_keep=1).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("write", ["readout", "window", "window+tail"])
def test_left_padded_batch_generation_equals_one_by_one(write):
    model = tiny_comet(**WRITES[write])
    prompts = [random_ids(n, seed=n) for n in (37, 10, 50)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=25, min_new_tokens=25, do_sample=False)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=25, min_new_tokens=25, do_sample=False)
        assert torch.equal(batch[i, width:], single[0, len(p) :])


@pytest.mark.parametrize("write", ["readout", "window", "window+tail"])
def test_beam_search_with_cache_equals_without(write):
    model = tiny_comet(**WRITES[write])
    ids = random_ids(2, 30)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, num_beams=3, do_sample=False)
    with_cache = model.generate(ids, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_remote_code_reload_in_fresh_process(tmp_path):
    model = tiny_comet(tie=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    for name in ("modeling_comet.py", "configuration_comet.py", "pipeline_comet.py", "position_layout.py",
                 "requirements.py"):
        assert (tmp_path / name).is_file()
    ids = random_ids(1, 70)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "reference.pt")
    script = BLOCK_THIS_PACKAGE + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
        ref = torch.load({str(tmp_path / "reference.pt")!r})
        with torch.no_grad():
            print((model(ref["ids"]).logits - ref["logits"]).abs().max().item())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) == 0.0


def test_peft_lora_with_memory_in_modules_to_save_saves_and_reloads(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = tiny_comet().train()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["comet_memory"])
    )
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("comet_memory" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(2, 48)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_comet(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_bad_inputs_raise_clear_errors():
    model = tiny_comet()
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[1, 2, VOCAB + 5]]))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    base_config = tiny_base().config
    for bad, message in [
        (dict(chunk_size=0), "chunk_size"),
        (dict(global_mem_size=-1), "global_mem_size"),
        (dict(chunk_size=16, temp_beacon_stride=5), "must divide"),
        (dict(temp_mem_budget=0), "temp_mem_budget"),
        (dict(position_layout="diagonal"), "position_layout"),
    ]:
        with pytest.raises(ValueError, match=message):
            CometConfig(base_config=base_config, **bad)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="Unsupported base architecture 'gpt2'.*llama, mistral, qwen2, qwen3"):
        CometForCausalLM.from_base(gpt2, **MEMORY)
    flash = tiny_base()
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'sdpa', 'eager' or 'flex_attention'"):
        CometForCausalLM.from_base(flash, **MEMORY)
    with pytest.raises(TypeError, match="CometCache"):
        from transformers import DynamicCache

        model(random_ids(1, 5), cache=DynamicCache())
