"""The CoMeT backbone (`CometModel`), checkpoint layout and transformers output conventions on tiny models."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModel, AutoModelForCausalLM

from modeling_comet import CometCache, CometForCausalLM, CometModel
from tests.test_comet_model import BLOCK_THIS_PACKAGE, MEMORY, VOCAB, random_ids, tiny_base, tiny_comet


def test_causal_lm_is_backbone_plus_head():
    model = tiny_comet()
    assert isinstance(model.model, CometModel) and model.base_model is model.model
    assert model.comet_memory is model.model.comet_memory
    ids = random_ids(2, 50)
    with torch.no_grad():
        hidden = model.model(ids, use_cache=False).last_hidden_state
        logits = model(ids, use_cache=False).logits
    assert hidden.shape == (2, 50, 64)
    torch.testing.assert_close(model.lm_head(hidden), logits, atol=1e-6, rtol=0)


def test_key_layout_and_auto_classes(tmp_path):
    model = tiny_comet()
    keys = set(model.state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= keys
    assert "model.layers.1.self_attn.q_proj.weight" in keys and "model.comet_memory.readout_embedding" in keys
    assert not any(k.startswith("comet_memory.") for k in keys)
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_comet.CometModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_comet.CometForCausalLM"
    assert set(load_file(tmp_path / "model.safetensors")) == keys
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(backbone, CometModel)
    ids = random_ids(1, 40)
    with torch.no_grad():
        torch.testing.assert_close(
            model.lm_head(backbone(ids).last_hidden_state), model(ids).logits, atol=1e-6, rtol=0
        )


def test_checkpoint_with_top_level_memory_keys_still_loads(tmp_path):
    model = tiny_comet()
    with torch.no_grad():
        model.comet_memory.layers[0].gate.bias.fill_(2.5)  # not the initial value: it must come from the file
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    legacy = {k.removeprefix("model.") if k.startswith("model.comet_memory.") else k: v for k, v in state.items()}
    assert "comet_memory.layers.0.gate.bias" in legacy
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.comet_memory.layers[0].gate.bias.item() == 2.5
    ids = random_ids(1, 70)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)
    # It saves in the current layout, and plain load_state_dict takes the old keys too.
    reloaded.save_pretrained(tmp_path / "resaved")
    assert set(load_file(tmp_path / "resaved" / "model.safetensors")) == set(state)
    fresh = tiny_comet()
    fresh.load_state_dict(legacy)
    assert fresh.comet_memory.layers[0].gate.bias.item() == 2.5


@pytest.mark.parametrize("use_cache", [False, True])
def test_hidden_states_and_attentions_match_the_base_model_within_one_chunk(use_cache):
    base = tiny_base(attn="eager")
    model = CometForCausalLM.from_base(base, **MEMORY).eval()
    ids = random_ids(2, 13)
    with torch.no_grad():
        expected = base.model(ids, output_hidden_states=True, output_attentions=True)
        out = model.model(ids, output_hidden_states=True, output_attentions=True, use_cache=use_cache)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, atol=0, rtol=0)
    layout = model.model._layout("cpu")
    for ours, theirs in zip(out.attentions, expected.attentions, strict=True):
        assert ours.shape == (2, 4, 13, layout.size)
        text = ours[..., layout.text_start : layout.text_start + 13]
        torch.testing.assert_close(text, theirs, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.sum(-1), torch.ones_like(ours.sum(-1)), atol=1e-5, rtol=0)


def test_hidden_states_and_attentions_agree_across_paths_beyond_one_chunk():
    model = tiny_comet(attn="eager")
    ids = random_ids(2, 45)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    kwargs = dict(attention_mask=mask, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        chunk_major = model(ids, layer_major=False, **kwargs)
        layer_major = model(ids, layer_major=True, **kwargs)
        cached = model(ids, use_cache=True, **kwargs)
    for other in (layer_major, cached):
        for name in ("hidden_states", "attentions"):
            for a, b in zip(getattr(chunk_major, name), getattr(other, name), strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert chunk_major.hidden_states[0][1, :6].abs().max() == 0  # padding positions stay empty
    assert chunk_major.attentions[0][0, :, 30].sum(-1).allclose(torch.ones(4))


def test_output_attentions_needs_eager():
    model = tiny_comet(attn="sdpa")
    with pytest.raises(ValueError, match="eager"):
        model(random_ids(1, 5), output_attentions=True)


def test_return_dict_false_and_use_cache_default():
    model = tiny_comet()
    ids = random_ids(1, 20)
    with torch.no_grad():
        out = model(ids)
        assert isinstance(out.past_key_values, CometCache)  # use_cache defaults to config.use_cache (True)
        as_tuple = model(ids, return_dict=False)
        assert isinstance(as_tuple, tuple) and isinstance(as_tuple[1], CometCache)
        torch.testing.assert_close(as_tuple[0], out.logits, atol=0, rtol=0)
        with_loss = model(ids, labels=ids, return_dict=False)
        assert with_loss[0].dim() == 0 and with_loss[1].shape == (1, 20, VOCAB)
        model.config.use_cache = False
        assert model(ids).past_key_values is None
        assert model.model(ids, return_dict=False)[0].shape == (1, 20, 64)
        model.config.use_cache = True


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_long_input_is_embedded_and_processed_one_window_at_a_time():
    """Through generate and a forward without labels, no call sees more than one window's tokens and no
    tensor of the input's length times the hidden size is ever allocated."""
    model = tiny_comet()
    chunk, length, hidden = MEMORY["chunk_size"], 40 * MEMORY["chunk_size"], 64
    window = model.model._layout("cpu").size
    ids = random_ids(1, length)
    widths = []

    def record(module, args, kwargs):
        tensor = args[0] if args else kwargs["hidden_states"]
        widths.append((module.__class__.__name__, tensor.shape[-1] if tensor.dim() == 2 else tensor.shape[1]))

    hooks = [model.model.embed_tokens.register_forward_pre_hook(record, with_kwargs=True)]
    hooks += [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in model.model.layers]
    try:
        for run in (
            lambda: model.generate(ids, max_new_tokens=3, do_sample=False),
            lambda: model(ids, logits_to_keep=1),
            lambda: model(ids, logits_to_keep=1, use_cache=False),
        ):
            widths.clear()
            with torch.no_grad(), LargestTensor() as probe:
                run()
            assert widths and all(w <= chunk for name, w in widths if name == "Embedding"), widths
            assert all(w <= window for _, w in widths), widths
            assert probe.largest < length * hidden // 4, probe.largest  # the largest is the (vocab, d) lm_head weight
    finally:
        for hook in hooks:
            hook.remove()


def test_generate_hands_the_prompt_on_without_copying_it(monkeypatch):
    """transformers clones the ids it passes to the model; for the prompt CoMeT takes a view instead, and the
    greedy continuation is the one token-by-token decoding gives."""
    model = tiny_comet()
    ids = random_ids(2, 5 * MEMORY["chunk_size"] + 3)
    clones = []
    clone = torch.Tensor.clone

    def recording_clone(self, *args, **kwargs):
        clones.append(tuple(self.shape))
        return clone(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", recording_clone)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert tuple(ids.shape) not in clones, clones
    monkeypatch.undo()
    with torch.no_grad():
        state, step = model(ids[:, :-1], use_cache=True).cache, ids[:, -1:]
        expected = [ids]
        for _ in range(4):
            output = model(step, cache=state)
            state, step = output.cache, output.logits[:, -1:].argmax(-1)
            expected.append(step)
    assert torch.equal(out, torch.cat(expected, 1))


@pytest.mark.slow  # torch compiles flex attention for every new query/key shape (about a minute on one CPU thread)
def test_flex_attention_block_mask_equals_sdpa():
    sdpa = tiny_comet(attn="sdpa")
    flex = tiny_comet(attn="flex_attention")
    flex.load_state_dict(sdpa.state_dict())
    assert flex.model.layers[0].self_attn.config._attn_implementation == "flex_attention"
    ids = random_ids(2, 45)
    with torch.no_grad():
        for kwargs in (dict(use_cache=False), dict(use_cache=True)):
            torch.testing.assert_close(flex(ids, **kwargs).logits, sdpa(ids, **kwargs).logits, atol=1e-5, rtol=0)
    greedy = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(flex.generate(ids, **greedy), sdpa.generate(ids, **greedy))


def test_device_map_split_is_refused_clearly(tmp_path):
    tiny_comet().save_pretrained(tmp_path)
    one_device = CometForCausalLM.from_pretrained(tmp_path, device_map={"": "cpu"})
    assert one_device.device.type == "cpu"
    split = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
             "model.comet_memory": "cpu", "lm_head": "disk"}
    with pytest.raises(ValueError, match="CoMeT runs on one device"):
        CometForCausalLM.from_pretrained(tmp_path, device_map=split, offload_folder=str(tmp_path / "offload"))


def test_automodel_remote_code_in_a_fresh_process(tmp_path):
    """`AutoModel.from_pretrained(folder, trust_remote_code=True)` gives the backbone without this package."""
    import os
    import subprocess
    import sys
    import textwrap

    model = tiny_comet()
    model.save_pretrained(tmp_path)
    ids = random_ids(1, 40)
    with torch.no_grad():
        torch.save({"ids": ids, "hidden": model.model(ids).last_hidden_state}, tmp_path / "reference.pt")
    script = BLOCK_THIS_PACKAGE + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "CometModel" and type(model).__module__.startswith("transformers_modules")
        ref = torch.load({str(tmp_path / "reference.pt")!r})
        with torch.no_grad():
            print((model(ref["ids"]).last_hidden_state - ref["hidden"]).abs().max().item())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) == 0.0


def test_a_long_prompt_read_inside_generate_shows_progress(monkeypatch, capsys):
    """generate() and pipelines read a long prompt without `read(progress=True)`: from PROGRESS_MIN_TOKENS on the
    read shows a bar, which transformers' progress-bar switch turns off, and shorter inputs show none."""
    from transformers.utils import logging as hf_logging

    import modeling_comet.modeling_comet as modeling

    model = tiny_comet()
    ids = random_ids(1, 6 * MEMORY["chunk_size"])
    monkeypatch.setattr(modeling, "PROGRESS_MIN_TOKENS", ids.shape[1])
    greedy = dict(max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, **greedy)
        assert "CoMeT reading" in capsys.readouterr().err
        model.generate(ids[:, 1:], **greedy)  # one token short of the threshold
        assert "CoMeT reading" not in capsys.readouterr().err
        hf_logging.disable_progress_bar()
        try:
            assert torch.equal(model.generate(ids, **greedy), out)  # the bar changes nothing else
            assert "CoMeT reading" not in capsys.readouterr().err
        finally:
            hf_logging.enable_progress_bar()
