"""Trained-weights files (memory + LoRA factors): a trained PEFT model's behaviour carries over to a fresh build."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from convert.trained_weights import (
    apply_trained_weights,
    load_lora_factors,
    lora_modules,
    read_metadata,
    remap_memory_keys,
    save_trained_weights,
)
from modeling_comet import CometForCausalLM

MEMORY = dict(chunk_size=8, global_mem_size=2, temp_beacon_stride=4, temp_mem_budget=4)


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64))


def fresh(**fields):
    base = tiny_llama()
    torch.manual_seed(1)
    return CometForCausalLM.from_base(base, **{**MEMORY, **fields}).eval()


def trained_peft():
    model = get_peft_model(fresh(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               modules_to_save=["comet_memory"]))
    with torch.no_grad():  # stand-in for training: move every trainable weight
        g = torch.Generator().manual_seed(2)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=g))
    return model.eval()


def test_saved_memory_and_lora_reproduce_the_trained_model_on_a_fresh_build(tmp_path):
    peft_model = trained_peft()
    ids = torch.randint(3, 64, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = peft_model(input_ids=ids, use_cache=False).logits
    path = save_trained_weights(peft_model, tmp_path / "trained.safetensors")
    meta = read_metadata(path)
    assert meta["lora"] == {"r": 4, "alpha": 8} and meta["memory"]["chunk_size"] == 8
    model = fresh()
    with torch.no_grad():
        assert (model(ids, use_cache=False).logits - expected).abs().max() > 1e-3
        apply_trained_weights(model, path)
        torch.testing.assert_close(model(ids, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_file_for_other_memory_settings_or_modules_is_refused_before_any_change(tmp_path):
    path = save_trained_weights(trained_peft(), tmp_path / "trained.safetensors")
    other = fresh(global_mem_size=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="global_mem_size"):
        apply_trained_weights(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(FileNotFoundError):
        apply_trained_weights(fresh(), tmp_path / "missing.safetensors")


def test_memory_keys_of_the_old_layout_map_to_the_backbone():
    model = get_peft_model(fresh(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["comet_memory"]))
    old = {"base_model.model.comet_memory.layers.0.gate.bias": torch.zeros(1),
           "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}
    new = remap_memory_keys(old, model)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in new
    assert any(k.endswith("model.comet_memory.layers.0.gate.bias") and "base_model.model.model." in k for k in new)


def test_continuing_lora_starts_from_the_files_factors_and_exports_the_whole_change(tmp_path):
    """init_trained_weights with LoRA of the same rank: memory loaded, factors copied into the new adapter (not
    merged), so the continued model equals the trained one and its export carries everything."""
    peft_model = trained_peft()
    ids = torch.randint(3, 64, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = peft_model(input_ids=ids, use_cache=False).logits
    path = save_trained_weights(peft_model, tmp_path / "trained.safetensors")
    assert lora_modules(path) == {"q_proj", "v_proj"}
    model = fresh()
    apply_trained_weights(model, path, merge_lora=False)
    base_q = model.model.layers[0].self_attn.q_proj.weight.clone()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["comet_memory"])
    continued = get_peft_model(model, lora)
    assert load_lora_factors(continued, path) == 8  # 2 layers x (q, v) x (A, B)
    assert torch.equal(continued.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base_q)
    with torch.no_grad():
        torch.testing.assert_close(continued.eval()(input_ids=ids, use_cache=False).logits, expected)
    again = save_trained_weights(continued, tmp_path / "again.safetensors")
    rebuilt = fresh()
    apply_trained_weights(rebuilt, again)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)
    other_rank = get_peft_model(fresh(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="r=4"):
        load_lora_factors(other_rank, path)


def test_a_memory_only_continuation_exports_its_memory_with_the_init_files_lora(tmp_path):
    """finetuning: memory merges the init file's LoRA into a frozen base and trains the memory: its export holds the
    new memory and the init file's factors, and rebuilds the continued model from the plain base."""
    init = save_trained_weights(trained_peft(), tmp_path / "init.safetensors")
    model = fresh()
    apply_trained_weights(model, init)
    with torch.no_grad():  # stand-in for memory-only training
        g = torch.Generator().manual_seed(5)
        for param in model.model.comet_memory.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g))
    ids = torch.randint(3, 64, (1, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    path = save_trained_weights(model, tmp_path / "continued.safetensors", lora_from=init)
    assert read_metadata(path)["lora"] == {"r": 4, "alpha": 8} and lora_modules(path) == {"q_proj", "v_proj"}
    rebuilt = fresh()
    apply_trained_weights(rebuilt, path)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="global_mem_size"):
        save_trained_weights(fresh(global_mem_size=3), tmp_path / "other.safetensors", lora_from=init)
    with pytest.raises(ValueError, match="LoRA factors of its own"):
        save_trained_weights(trained_peft(), tmp_path / "twice.safetensors", lora_from=init)
    assert not (tmp_path / "other.safetensors").exists() and not (tmp_path / "twice.safetensors").exists()


def test_export_of_a_memory_only_checkpoint_folder(tmp_path):
    """`training.export_weights` on a memory-only run's checkpoint (whole model saved) writes memory + init LoRA."""
    from tests.test_convert import save_tiny_base
    from training.comet_trainer import build_model, parse_config
    from training.export_weights import export

    base = save_tiny_base(tmp_path / "base")
    recipe = ["--model_name_or_path", str(base), "--chunk_size", "8", "--global_mem_size", "2",
              "--temp_beacon_stride", "4", "--temp_mem_budget", "4", "--output_dir", str(tmp_path / "run")]
    lora_run, _ = build_model(parse_config([*recipe, "--lora_r", "4", "--lora_alpha", "8",
                                            "--lora_target_modules", "q_proj,v_proj"]))
    with torch.no_grad():
        for param in lora_run.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    init = save_trained_weights(lora_run, tmp_path / "init.safetensors")
    memory_recipe = [*recipe, "--finetuning", "memory", "--init_trained_weights", str(init)]
    continued, _ = build_model(parse_config(memory_recipe))
    with torch.no_grad():
        for param in continued.model.comet_memory.parameters():
            param.add_(0.05 * torch.randn_like(param))
    continued.save_pretrained(tmp_path / "checkpoint-1")
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = continued.eval()(ids, use_cache=False).logits
    start, _ = build_model(parse_config(memory_recipe))
    with torch.no_grad():
        assert (start.eval()(ids, use_cache=False).logits - expected).abs().max() > 1e-3  # the memory did change
    out = export(memory_recipe, tmp_path / "checkpoint-1", tmp_path / "exported.safetensors")
    rebuilt, _ = build_model(parse_config([*recipe, "--finetuning", "memory", "--init_trained_weights", str(out)]))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(ids, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        export(memory_recipe, tmp_path / "base-missing", tmp_path / "x.safetensors")


def test_convert_reads_with_a_longer_chunk_only_when_asked(tmp_path):
    """`convert(read_fields=("chunk_size",))` applies weights trained on 8-token chunks to a model that reads 16 at
    a time: the same parameters, so within 8 tokens the two give the same logits; without it, and for a setting
    that shapes parameters, conversion is refused before anything is written."""
    from convert.to_comet import convert
    from tests.test_convert import tiny_tokenizer

    path = save_trained_weights(trained_peft(), tmp_path / "trained.safetensors")
    base_folder = tmp_path / "base"
    tiny_llama().save_pretrained(base_folder)  # the base the weights were trained on
    tiny_tokenizer(64).save_pretrained(base_folder)
    longer = {**MEMORY, "chunk_size": 16}
    with pytest.raises(ValueError, match="chunk_size=8"):
        convert(base_folder, tmp_path / "refused", trained_weights=path, **longer)
    with pytest.raises(ValueError, match="read_fields may name"):
        convert(base_folder, tmp_path / "refused", trained_weights=path, read_fields=("global_mem_size",), **longer)
    assert not (tmp_path / "refused").exists()

    out = convert(base_folder, tmp_path / "read16", trained_weights=path, read_fields=("chunk_size",), **longer)
    reader = CometForCausalLM.from_pretrained(out).eval()
    trained = fresh()
    apply_trained_weights(trained, path)
    assert reader.config.chunk_size == 16 and trained.config.chunk_size == 8
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    long_ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(reader(ids).logits, trained(ids).logits, atol=1e-5, rtol=1e-5)
        assert (reader(long_ids).logits[:, 8:] - trained(long_ids).logits[:, 8:]).abs().max() > 1e-4  # 1 chunk vs 2


def test_the_default_folder_is_rebuilt_when_the_model_code_changes(tmp_path, monkeypatch):
    """The cached default carries copies of modeling_comet/*.py for trust_remote_code loading: a change to that
    code must change the stamp that decides whether the folder is rebuilt (the weights alone would not)."""
    import shutil

    from convert import comet_default

    code = tmp_path / "modeling_comet"
    shutil.copytree(comet_default.MODEL_CODE, code, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(comet_default, "MODEL_CODE", code)
    first = comet_default._fingerprint()
    assert comet_default._fingerprint() == first
    (code / "pipeline_comet.py").write_text((code / "pipeline_comet.py").read_text() + "\n# changed\n")
    changed = comet_default._fingerprint()
    assert changed["model_code_sha256"] != first["model_code_sha256"]
    assert {k: v for k, v in changed.items() if k != "model_code_sha256"} == {
        k: v for k, v in first.items() if k != "model_code_sha256"}
