import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

from modeling_comet.configuration_ram import RamConfig
from modeling_comet.modeling_ram import RamForCausalLM

VOCAB = 120


def tiny_base(seed=0, vocab_size=VOCAB):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_ram(**fields):
    base = tiny_base()
    fields = {"encoder_layers": 1, "segment_size": 4, **fields}
    return base, RamForCausalLM.from_base(base, **fields).eval()


@pytest.mark.parametrize("layout", ["default", "epl"])
def test_keep_all_equals_base_logits_on_uncompressed_prompt(layout):
    base, ram = tiny_ram(keep_ratio=1.0, position_layout=layout)
    torch.manual_seed(1)
    context, question = torch.randint(3, VOCAB, (2, 19)), torch.randint(3, VOCAB, (2, 5))
    # second example: 4 context tokens of left padding
    context_mask = torch.ones_like(context)
    context_mask[1, :4] = 0
    with torch.no_grad():
        logits = ram(context_ids=context, question_ids=question, context_attention_mask=context_mask).logits
        for row, length in ((0, 19), (1, 15)):
            prompt = torch.cat([context[row, 19 - length :], question[row]]).unsqueeze(0)
            expected = base(prompt).logits[0]
            torch.testing.assert_close(logits[row, -len(expected) :], expected, atol=1e-4, rtol=0)


def test_encoder_is_the_base_first_layers_on_each_row():
    base, ram = tiny_ram(encoder_layers=1)
    row = torch.randint(3, VOCAB, (7,))
    states, mask = ram.encode_rows([row, row[:3]])
    with torch.no_grad():
        expected = base(row.unsqueeze(0), output_hidden_states=True).hidden_states[1][0]
    torch.testing.assert_close(states[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(states[1, :3], expected[:3], atol=1e-5, rtol=0)  # padding never leaks in
    assert mask.sum(1).tolist() == [7, 3]


@pytest.mark.parametrize("keep_ratio,kept", [(0.25, 1), (0.5, 2), (0.3, 1), (0.125, 0)])
def test_selection_skimming_and_epl_positions(keep_ratio, kept):
    _, ram = tiny_ram(keep_ratio=keep_ratio, position_layout="epl")
    torch.manual_seed(2)
    context, question = torch.randint(3, VOCAB, (1, 15)), torch.randint(3, VOCAB, (1, 3))  # 3 full + 1 short segment
    with torch.no_grad():
        compressed = ram.compress(context, question)
        states, mask = ram.encode_rows([question[0], *context[0].split(4)])
    pooled = (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    scores = F.cosine_similarity(pooled[1:], pooled[:1], dim=-1)
    torch.testing.assert_close(compressed.relevance_scores[0], scores)
    expected_kept = torch.zeros(4, dtype=torch.bool)
    expected_kept[scores.topk(kept).indices] = True
    assert torch.equal(compressed.kept_segments[0], expected_kept)

    embeds, positions, segment_start, column = [], [], 0, 0
    for index, length in enumerate([4, 4, 4, 3]):
        if expected_kept[index]:
            embeds.append(ram.get_input_embeddings()(context[0, segment_start : segment_start + length]))
            positions += list(range(segment_start, segment_start + length))
        else:
            h, valid = states[index + 1, :length], pooled[0]
            weights = F.cosine_similarity(h, valid.unsqueeze(0), dim=-1).softmax(0)
            embeds.append(ram.alignment(weights @ h).unsqueeze(0))
            positions.append(int(segment_start + (length - 1) / 2 + 0.5))  # centre of the span
        segment_start += length
    embeds.append(ram.get_input_embeddings()(question[0]))
    positions += [15, 16, 17]  # the question continues after the uncompressed context
    expected_embeds = torch.cat(embeds).detach()
    column = compressed.inputs_embeds.shape[1] - len(expected_embeds)
    assert column == 0 and compressed.attention_mask.all()
    torch.testing.assert_close(compressed.inputs_embeds[0], expected_embeds, atol=1e-6, rtol=0)
    assert compressed.position_ids[0].tolist() == positions


def test_default_layout_counts_decoder_tokens():
    _, ram = tiny_ram(keep_ratio=0.5)
    context, question = torch.randint(3, VOCAB, (1, 16)), torch.randint(3, VOCAB, (1, 3))
    compressed = ram.compress(context, question)
    length = 2 * 4 + 2 + 3
    assert compressed.position_ids[0].tolist() == list(range(length))


def test_generate_keep_all_matches_base_generate():
    base, ram = tiny_ram(keep_ratio=1.0, position_layout="epl")
    context, question = torch.randint(3, VOCAB, (1, 12)), torch.randint(3, VOCAB, (1, 4))
    options = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    answer = ram.generate(context_ids=context, question_ids=question, **options)
    expected = base.generate(torch.cat([context, question], 1), **options)[:, 16:]
    assert torch.equal(answer, expected)


def test_generate_compressed_epl_matches_greedy_reference():
    _, ram = tiny_ram(keep_ratio=0.25, position_layout="epl")
    torch.manual_seed(3)
    context, question = torch.randint(3, VOCAB, (1, 16)), torch.randint(3, VOCAB, (1, 4))
    options = {"max_new_tokens": 5, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    answer = ram.generate(context_ids=context, question_ids=question, **options)[0].tolist()
    with torch.no_grad():
        compressed = ram.compress(context, question)
        embeds, positions, reference = compressed.inputs_embeds, compressed.position_ids, []
        for _ in range(5):
            token = ram.decoder(inputs_embeds=embeds, position_ids=positions).logits[0, -1].argmax()
            reference.append(int(token))
            embeds = torch.cat([embeds, ram.get_input_embeddings()(token.view(1, 1))], 1)
            positions = torch.cat([positions, positions[:, -1:] + 1], 1)
    assert answer == reference
    assert compressed.position_ids[0, -1].item() == 19  # EPL: question ends at the uncompressed length


def test_batched_generate_with_padding_matches_single_examples():
    _, ram = tiny_ram(keep_ratio=0.5, position_layout="epl")
    torch.manual_seed(4)
    context, question = torch.randint(3, VOCAB, (2, 16)), torch.randint(3, VOCAB, (2, 4))
    context_mask = torch.ones_like(context)
    context_mask[0, 12:] = 0  # right padding on the first context
    options = {"max_new_tokens": 4, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    batched = ram.generate(
        context_ids=context, question_ids=question, context_attention_mask=context_mask, **options
    )
    first = ram.generate(context_ids=context[:1, :12], question_ids=question[:1], **options)
    second = ram.generate(context_ids=context[1:], question_ids=question[1:], **options)
    assert torch.equal(batched, torch.cat([first, second]))


def test_loss_terms_and_gradients_reach_encoder():
    _, ram = tiny_ram(keep_ratio=0.5)
    ram.train()
    context, question = torch.randint(3, VOCAB, (2, 16)), torch.randint(3, VOCAB, (2, 3))
    answer = torch.randint(3, VOCAB, (2, 2))
    labels = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0]])
    out = ram(context_ids=context, question_ids=question, answer_ids=answer, segment_labels=labels)
    torch.testing.assert_close(out.loss, out.nll_loss + ram.config.contrastive_weight * out.contrastive_loss)
    out.loss.backward()
    assert ram.encoder_layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert ram.alignment.weight.grad.abs().sum() > 0


def test_bad_input_raises():
    base = tiny_base()
    with pytest.raises(ValueError, match="keep_ratio"):
        RamConfig(base_config=base.config.to_dict(), encoder_layers=1, keep_ratio=1.5)
    with pytest.raises(ValueError, match="segment_size"):
        RamConfig(base_config=base.config.to_dict(), encoder_layers=1, segment_size=0)
    with pytest.raises(ValueError, match="encoder_layers"):
        RamConfig(base_config=base.config.to_dict(), encoder_layers=3)
    with pytest.raises(ValueError, match="position_layout"):
        RamConfig(base_config=base.config.to_dict(), encoder_layers=1, position_layout="alibi")
    with pytest.raises(ValueError, match="Unsupported base"):
        RamConfig(base_config=GPT2Config(n_layer=2).to_dict(), encoder_layers=1)
    _, ram = tiny_ram()
    with pytest.raises(ValueError, match="vocabulary"):
        ram(context_ids=torch.full((1, 8), VOCAB + 5), question_ids=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="question_ids"):
        ram(context_ids=torch.ones(1, 8, dtype=torch.long))


def test_save_and_reload_as_remote_code_in_fresh_process(tmp_path):
    _, ram = tiny_ram(keep_ratio=0.5, position_layout="epl")
    folder = tmp_path / "ram"
    ram.save_pretrained(folder)
    files = set(os.listdir(folder))
    assert {"modeling_ram.py", "configuration_ram.py", "position_layout.py", "model.safetensors"} <= files
    assert not any(name.endswith(".bin") for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_ram.RamConfig",
        "AutoModel": "modeling_ram.RamModel",
        "AutoModelForCausalLM": "modeling_ram.RamForCausalLM",
    }
    context, question = torch.randint(3, VOCAB, (1, 16)), torch.randint(3, VOCAB, (1, 3))
    with torch.no_grad():
        expected = ram(context_ids=context, question_ids=question).logits
    torch.save({"context": context, "question": question, "logits": expected}, tmp_path / "reference.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules['modeling_comet'] = None  # the repo may be installed editable: forbid importing it
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        reference = torch.load({str(tmp_path / 'reference.pt')!r})
        with torch.no_grad():
            logits = model(context_ids=reference['context'], question_ids=reference['question']).logits
        torch.testing.assert_close(logits, reference['logits'], atol=1e-5, rtol=0)
        print(type(model).__module__)
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "transformers_modules" in result.stdout


def smollm2_folder():
    from convert.smollm2 import smollm2_path

    return smollm2_path()  # converts the embedded GGUF on first use


def test_pipeline_answers_from_strings_like_generate():
    from transformers import AutoTokenizer, pipeline

    import modeling_comet.pipeline_ram  # noqa: F401  (registers the task)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    base = tiny_base(vocab_size=len(tokenizer))
    ram = RamForCausalLM.from_base(base, encoder_layers=1, segment_size=8, keep_ratio=0.5).eval()
    answerer = pipeline("ram-question-answering", model=ram, tokenizer=tokenizer)
    inputs = {"context": "The mill stood by the river. " * 6, "question": "Where was the mill?"}
    options = {"max_new_tokens": 4, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    answer = answerer(inputs, **options)
    context = tokenizer(inputs["context"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    question = tokenizer("\n\nQuestion: Where was the mill?\nAnswer:", add_special_tokens=False, return_tensors="pt")
    expected = ram.generate(context_ids=context, question_ids=question["input_ids"], **options)
    assert answer == [{"answer": tokenizer.decode(expected[0], skip_special_tokens=True).strip()}]
    with pytest.raises(ValueError, match="vocabulary"):
        pipeline("ram-question-answering", model=tiny_ram()[1], tokenizer=tokenizer)


@pytest.mark.slow
def test_smollm2_keep_all_equals_base_logits():
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32).eval()
    ram = RamForCausalLM.from_base(base, encoder_layers=2, keep_ratio=1.0, position_layout="epl").eval()
    torch.manual_seed(0)
    context, question = torch.randint(100, 40000, (1, 96)), torch.randint(100, 40000, (1, 8))
    with torch.no_grad():
        logits = ram(context_ids=context, question_ids=question, logits_to_keep=16).logits
        expected = base(torch.cat([context, question], 1), logits_to_keep=16).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
