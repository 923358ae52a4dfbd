"""A document state kept in a `CometCache`: save, load, copy, expand, and the checks that guard its reuse."""

import pytest
import torch

from modeling_comet import CometCache, CometConfig, CometForCausalLM
from tests.test_comet_model import MEMORY, VOCAB, random_ids, tiny_base, tiny_comet

GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)


@pytest.fixture(scope="module")
def model():
    return tiny_comet()


@pytest.fixture(scope="module")
def document():
    return random_ids(1, 3 * MEMORY["chunk_size"] + 5, seed=7)  # ends inside a window


def questions(n, length=6):
    return [random_ids(1, length, seed=100 + i) for i in range(n)]


def test_saved_state_gives_bitwise_the_same_next_token_logits(model, document, tmp_path):
    state = model.read(document)
    state.save(tmp_path / "doc.safetensors")
    loaded = CometCache.load(tmp_path / "doc.safetensors")
    assert loaded.seen_tokens == state.seen_tokens == document.shape[1]
    assert loaded.nbytes() == state.nbytes()
    question = questions(1)[0]
    with torch.no_grad():
        expected = model(question, cache=state.copy()).logits
        got = model(question, cache=loaded).logits
    assert torch.equal(got, expected)


def test_one_read_answers_several_questions(model, document):
    state = model.read(document)
    for question in questions(3):
        prompt = torch.cat([document, question], 1)
        from_state = model.generate(prompt, cache=state.copy(), **GREEDY)
        from_scratch = model.generate(prompt, **GREEDY)
        assert torch.equal(from_state, from_scratch)
    assert state.seen_tokens == document.shape[1]  # copies were consumed, the state was not


def test_state_expanded_to_a_batch_of_questions(model, document):
    state = model.read(document)
    asked = questions(3)
    asked[1] = asked[1][:, 2:]  # a shorter question: left-padded inside the batch, after the document
    width = max(q.shape[1] for q in asked)
    batch = torch.zeros(len(asked), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, q in enumerate(asked):
        batch[i, width - q.shape[1] :], mask[i, width - q.shape[1] :] = q, 1
    prompt = torch.cat([document.expand(len(asked), -1), batch], 1)
    attention_mask = torch.cat([torch.ones_like(document).expand(len(asked), -1), mask], 1)
    answers = model.generate(prompt, attention_mask=attention_mask, cache=state.expand(len(asked)), **GREEDY)
    for i, q in enumerate(asked):
        single = model.generate(torch.cat([document, q], 1), cache=state.copy(), **GREEDY)
        assert torch.equal(answers[i, prompt.shape[1] :], single[0, document.shape[1] + q.shape[1] :])


def test_state_refuses_another_model_or_a_prompt_that_does_not_extend_it(model, document, tmp_path):
    state = model.read(document)
    question = questions(1)[0]
    other = tiny_comet(chunk_size=8, temp_beacon_stride=4)
    with pytest.raises(ValueError, match="different configuration"):
        other.generate(torch.cat([document, question], 1), cache=state.copy(), **GREEDY)
    with pytest.raises(ValueError, match="different configuration"):
        other(question, cache=state.copy())
    changed = document.clone()
    changed[0, 5] = (changed[0, 5] + 1) % VOCAB
    with pytest.raises(ValueError, match="does not start with"):
        model.generate(torch.cat([changed, question], 1), cache=state.copy(), **GREEDY)
    with pytest.raises(ValueError, match="at least one new one"):
        model.generate(document, cache=state.copy(), **GREEDY)
    with pytest.raises(ValueError, match="expand"):
        model.generate(torch.cat([document, question], 1).expand(2, -1), cache=state.copy(), **GREEDY)
    # Reading in pieces records the same tokens as reading at once.
    pieces = CometCache()
    with torch.no_grad():
        for start, end in [(0, 5), (5, 30), (30, document.shape[1])]:
            model(document[:, start:end], cache=pieces)
    assert torch.equal(pieces.token_hash, state.token_hash)
    # The saved file keeps the record.
    state.save(tmp_path / "doc.safetensors")
    with pytest.raises(ValueError, match="different configuration"):
        other(question, cache=CometCache.load(tmp_path / "doc.safetensors"))


def test_bad_configs_and_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="needs base_config"):
        CometConfig()
    config = CometConfig(base_config=tiny_base().config, **MEMORY).to_dict()
    del config["temp_mem_budget"]
    with pytest.raises(ValueError, match=r"lacks the CoMeT memory field\(s\) \['temp_mem_budget'\]"):
        CometConfig.from_dict(config)
    with pytest.raises(ValueError, match="Unknown CometConfig field.*chunk_sise"):
        CometForCausalLM.from_base(tiny_base(), chunk_sise=16)
    ids = random_ids(2, 20)
    with pytest.raises(ValueError, match="labels must have the input's shape"):
        model(ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        model(torch.tensor([[3, -1, 4]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="non-empty"):
        model(ids[0])


def test_pipeline_answers_from_a_saved_state(model, document, tmp_path):
    from transformers import pipeline

    from tests.test_convert import tiny_tokenizer

    tokenizer = tiny_tokenizer(VOCAB)
    document = 30 + document % 70  # words w30..w99: none starts with the special tokens' w1 / w2
    text = " ".join(f"w{int(i)}" for i in document[0])
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, document)
    model.read(ids).save(tmp_path / "doc.safetensors")
    question = " ".join(f"w{30 + int(i) % 70}" for i in questions(1)[0][0])
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, return_full_text=False)
    from_state = generator(text + " " + question, cache=CometCache.load(tmp_path / "doc.safetensors"), **kwargs)
    assert from_state == generator(text + " " + question, **kwargs)
    other_document = CometCache.load(tmp_path / "doc.safetensors")
    with pytest.raises(ValueError, match="does not start with"):  # the pipeline hands the state to generate
        generator("w31 " + text + " " + question, cache=other_document, **kwargs)
