"""RAM training on TRL's SFTTrainer: prompt-completion data, completion-only loss, RAM's own forward with the
contrastive term, and the TrlParser YAML recipe."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from modeling_comet.modeling_ram import RamForCausalLM, multi_positive_contrastive_loss
from training.ram_config import RamTrainingConfig
from training.ram_trainer import (
    RamSFTCollator,
    RamSFTTrainer,
    apply_finetuning,
    parse_config,
    prompt_completion_example,
)

ROOT = Path(__file__).resolve().parent.parent
WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["<pad>", "</s>", "<unk>"]
ANSWERS = ["alpha", "beta", "gamma"]  # no answer is a substring of another word (positives match by substring)
VOCAB = SPECIAL + WORDS + ANSWERS + ["Question", "Answer", ":"]


def word_tokenizer():
    tok = Tokenizer(models.WordLevel({token: index for index, token in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_ram(**fields):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(VOCAB), tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
    ))
    fields = {"encoder_layers": 1, "segment_size": 4, "keep_ratio": 0.5, "contrastive_temperature": 0.1, **fields}
    return RamForCausalLM.from_base(base, **fields)


def nq_rows(count=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        words = [WORDS[i] for i in torch.randint(0, 40, (14,), generator=generator).tolist()]
        answer = ANSWERS[index % 3]
        words[4 + index] = answer
        rows.append({"question": f"w3 {WORDS[4 + index]}", "answers": [answer],
                     "ctxs": [{"title": "", "text": " ".join(words[:8])}, {"title": "", "text": " ".join(words[8:])}]})
    return rows


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=5e-3, max_steps=12,
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, finetuning="full",
                  lr_scheduler_type="constant", seed=0, max_context_tokens=12, contrastive_weight=0.5)
    values.update(overrides)
    return RamTrainingConfig(**values)


def sft_trainer(tmp_path, model=None, **overrides):
    tokenizer = word_tokenizer()
    args = config(tmp_path, **overrides)
    dataset = Dataset.from_list(nq_rows()).map(
        prompt_completion_example, fn_kwargs={"tokenizer": tokenizer, "config": args},
        remove_columns=["question", "ctxs"],
    )
    model = model if model is not None else tiny_ram(contrastive_weight=args.contrastive_weight)
    return RamSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer), tokenizer


def test_prompt_completion_rows_and_trl_completion_only_labels(tmp_path):
    trainer, tokenizer = sft_trainer(tmp_path)
    row = nq_rows()[0]
    prepared = trainer.train_dataset[0]
    context = " ".join(row["ctxs"][0]["text"].split() + row["ctxs"][1]["text"].split())
    context_ids = tokenizer(context)["input_ids"][:12]  # max_context_tokens
    question_ids = tokenizer(f"\n\nQuestion: {row['question']}\nAnswer:")["input_ids"]
    answer_ids = tokenizer(" " + row["answers"][0])["input_ids"] + [tokenizer.eos_token_id]
    assert prepared["input_ids"] == context_ids + question_ids + answer_ids  # TRL tokenized prompt + completion + EOS
    if "labels" in prepared:  # TRL >= 1.10 builds the labels while preparing the data
        assert prepared["labels"] == [-100] * (len(context_ids) + len(question_ids)) + answer_ids  # completion only
    else:  # earlier TRL leaves a completion mask for the collator
        assert prepared["completion_mask"] == [0] * (len(context_ids) + len(question_ids)) + [1] * len(answer_ids)

    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    mask = batch["context_attention_mask"][0].bool()
    assert batch["context_ids"][0][mask].tolist() == context_ids
    assert batch["question_ids"][0][batch["question_attention_mask"][0].bool()].tolist() == question_ids
    assert batch["answer_ids"][0][batch["answer_attention_mask"][0].bool()].tolist() == answer_ids
    # the answer word sits at position 4 of the context: segment 1 of 3 (segment_size 4) is the positive
    assert batch["segment_labels"][0].tolist() == [0, 1, 0]


def test_sft_loss_is_rams_answer_nll_plus_weighted_contrastive(tmp_path):
    trainer, _ = sft_trainer(tmp_path)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)

    # by hand: every answer token predicted from the position before it (compressed input is left-padded)
    logits, answers, answer_mask = outputs.logits, batch["answer_ids"], batch["answer_attention_mask"].bool()
    log_probs, count = [], 0
    for row in range(len(answers)):
        answer = answers[row][answer_mask[row]]
        predicted = logits[row, -len(answer) - 1 : -1]
        log_probs.append(F.cross_entropy(predicted, answer, reduction="sum"))
        count += len(answer)
    nll = torch.stack(log_probs).sum() / count
    contrastive = multi_positive_contrastive_loss(outputs.relevance_scores, batch["segment_labels"] == 1,
                                                  outputs.segment_mask, temperature=0.1)
    assert contrastive is not None and contrastive.item() > 0
    torch.testing.assert_close(outputs.nll_loss, nll)
    torch.testing.assert_close(loss, nll + 0.5 * contrastive)


def test_sft_training_moves_encoder_and_alignment_and_logs_both_terms(tmp_path):
    args = config(tmp_path, finetuning="lora")
    model = apply_finetuning(tiny_ram(contrastive_weight=0.5), args)
    named = dict(model.named_parameters())
    watched = [name for name in named if named[name].requires_grad and ("encoder_layers" in name or "alignment" in name)]
    assert any("alignment" in name for name in watched) and any("encoder_layers" in name for name in watched)
    frozen = next(name for name in named if name.endswith("decoder.model.layers.0.mlp.up_proj.weight"))
    before = {name: named[name].detach().clone() for name in [*watched, frozen]}
    trainer, _ = sft_trainer(tmp_path, model=model, finetuning="lora")
    trainer.train()
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[name], after[name]) for name in watched if "alignment" in name)
    assert any(not torch.equal(before[name], after[name]) for name in watched if "encoder_layers" in name)
    assert torch.equal(before[frozen], after[frozen])  # LoRA leaves the base decoder weights alone
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("nll_loss" in entry and "contrastive_loss" in entry for entry in logs)
    assert sum(entry["loss"] for entry in logs[-3:]) < sum(entry["loss"] for entry in logs[:3])


def test_collator_refuses_labels_that_are_not_completion_only():
    collator = RamSFTCollator(word_tokenizer(), segment_size=4)
    example = {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8], "context": "w2 w3", "prompt": "w2 w3 w4",
               "answers": ["w5"], "positive_segments": None}
    with pytest.raises(ValueError, match="completion_only_loss"):
        collator([example])
    with pytest.raises(ValueError, match="completion_only_loss must stay True"):
        RamTrainingConfig(output_dir="unused", completion_only_loss=False, use_cpu=True, report_to=[])


def test_recipe_parsed_by_trl_parser_with_flag_overrides(tmp_path):
    recipe = ROOT / "training" / "recipes" / "ram_smollm2.yaml"
    parsed = parse_config(["--config", str(recipe), "--output_dir", str(tmp_path / "run"), "--max_steps", "3",
                           "--use_cpu"])
    assert isinstance(parsed, RamTrainingConfig)
    assert (parsed.max_steps, parsed.output_dir) == (3, str(tmp_path / "run"))  # flags win
    assert (parsed.keep_ratio, parsed.position_layout, parsed.finetuning, parsed.encoder_layers) == (0.25, "epl", "lora", 8)
    assert parsed.learning_rate == 1e-4 and parsed.completion_only_loss is True and parsed.max_length is None
    assert parsed.question_template == "\n\nQuestion: {question}\nAnswer:"
    with pytest.raises(FileNotFoundError, match="YAML recipe"):
        parse_config(["--config", str(tmp_path / "absent.yaml")])


def test_lora_run_saves_a_complete_merged_checkpoint_with_adapter_and_card(tmp_path):
    from training.ram_trainer import save_ram_checkpoint

    args = config(tmp_path, finetuning="lora", max_steps=4, lora_target_modules=r"decoder\..*\.(q_proj|v_proj|up_proj)")
    model = apply_finetuning(tiny_ram(contrastive_weight=0.5), args)
    trainer, tokenizer = sft_trainer(tmp_path, model=model, finetuning="lora", max_steps=4)
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_ram_checkpoint(trainer, tokenizer, trainer.args, ["--finetuning", "lora", "--max_steps", "4"])
    names = {path.name for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_ram.py", "pipeline_ram.py", "tokenizer.json",
            "README.md", "adapter"} <= names
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "adapter_config.json").exists()
    reloaded = RamForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert "python -m training.ram_trainer --finetuning lora --max_steps 4" in card and "4 steps" in card
