"""Property tests of CoMeT's invariants over random tiny configurations, layouts, batch shapes and left padding.

Bounded to keep CI fast (a few examples per property, no deadline, the whole file well under a minute on one
thread). Only the public API is used (`from_base`, `model(...)`, `layer_major=`, `read`, `save_pretrained` /
`from_pretrained`), so the properties hold whatever the internals look like.

- short input = base logits: an input no longer than one chunk gives exactly the base model's logits;
- chunk-major = layer-major: both execution orders give the same logits, with or without left padding;
- two-piece read = one read: reading an input in two calls leaves the same state as reading it in one;
- cache path = no-cache path: the generation path (a `CometCache`) gives the whole-input path's logits;
- left padding = no padding: a left-padded row's logits are the row's own, read alone;
- save/load = identity: a saved and reloaded model gives the same logits.
"""

import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from modeling_comet import CometCache, CometForCausalLM

VOCAB = 48
ATOL = 2e-5
BOUNDED = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)


@st.composite
def tiny_models(draw):
    """(base, CoMeT model) on a random tiny Llama or Qwen2 with random memory fields and layout."""
    arch = draw(st.sampled_from(["llama", "qwen2"]))
    heads = draw(st.sampled_from([2, 4]))
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(
        hidden_size=8 * heads, intermediate_size=32, num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads, num_key_value_heads=draw(st.sampled_from([1, heads])), vocab_size=VOCAB,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=draw(st.booleans()),
    )  # fmt: skip
    config._attn_implementation = draw(st.sampled_from(["sdpa", "eager"]))
    chunk = draw(st.sampled_from([4, 6, 8, 12]))
    stride = draw(st.sampled_from([-1, *[d for d in (2, 3, 4) if chunk % d == 0]]))
    global_mem = draw(st.integers(0 if stride != -1 else 1, 3))
    fields = dict(
        chunk_size=chunk, global_mem_size=global_mem, temp_beacon_stride=stride,
        temp_mem_budget=draw(st.integers(1, 8)), adapter_rank=draw(st.integers(1, 4)),
        position_layout=draw(st.sampled_from(["default", "epl"])),
    )  # fmt: skip
    torch.manual_seed(draw(st.integers(0, 2**16)))
    base = model_cls(config).eval()
    model = CometForCausalLM.from_base(base, **fields).eval()
    with torch.no_grad():  # fresh memory starts near identity; perturb it so that it really changes the logits
        for name, param in model.named_parameters():
            if "comet_memory." in name:
                param.add_(0.5 * torch.randn_like(param))
    return base, model


@st.composite
def batches(draw, max_chunks=4):
    """(ids, attention_mask or None) of a random batch shape, left-padded rows of random lengths."""
    batch = draw(st.integers(1, 3))
    width = draw(st.integers(1, 40))
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(3, VOCAB - 1), min_size=width, max_size=width),
                                     min_size=batch, max_size=batch)))  # fmt: skip
    if not draw(st.booleans()):
        return ids, None
    pads = draw(st.lists(st.integers(0, width - 1), min_size=batch, max_size=batch))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-4)


@BOUNDED
@given(pair=tiny_models(), data=st.data())
def test_short_input_gives_the_base_logits(pair, data):
    base, model = pair
    width = data.draw(st.integers(1, model.config.chunk_size))
    ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(3, VOCAB - 1), min_size=width, max_size=width),
                                          min_size=1, max_size=3)))  # fmt: skip
    with torch.no_grad():
        close(model(ids).logits, base(ids).logits)


@BOUNDED
@given(pair=tiny_models(), batch=batches())
def test_chunk_major_equals_layer_major_and_the_cache_path(pair, batch):
    _, model = pair
    ids, mask = batch
    with torch.no_grad():
        chunk_major = model(ids, attention_mask=mask, layer_major=False).logits
        close(model(ids, attention_mask=mask, layer_major=True).logits, chunk_major)
        close(model(ids, attention_mask=mask, use_cache=True).logits, chunk_major)
        close(model(ids, attention_mask=mask, cache=CometCache()).logits, chunk_major)


@BOUNDED
@given(pair=tiny_models(), batch=batches())
def test_a_left_padded_row_gives_its_own_logits(pair, batch):
    _, model = pair
    ids, mask = batch
    if mask is None:
        mask = torch.ones_like(ids)
    with torch.no_grad():
        together = model(ids, attention_mask=mask).logits
        for row in range(ids.shape[0]):
            real = ids[row][mask[row].bool()][None]
            close(together[row, ids.shape[1] - real.shape[1] :][None], model(real).logits)


@BOUNDED
@given(pair=tiny_models(), data=st.data())
def test_reading_in_two_pieces_equals_reading_at_once(pair, data):
    _, model = pair
    batch = data.draw(st.integers(1, 3))
    width = data.draw(st.integers(2, 5 * model.config.chunk_size))
    ids = torch.randint(3, VOCAB, (batch, width), generator=torch.Generator().manual_seed(width))
    cut = data.draw(st.integers(1, width - 1))
    follow = torch.randint(3, VOCAB, (batch, data.draw(st.integers(1, 6))), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        once = model.read(ids)
        twice = model.read(ids[:, cut:], cache=model.read(ids[:, :cut]))
        close(model(follow, cache=twice).logits, model(follow, cache=once).logits)
        # and both equal the whole-input path over the concatenation
        whole = model(torch.cat([ids, follow], 1)).logits[:, width:]
        close(model(follow, cache=model.read(ids)).logits, whole)


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(pair=tiny_models(), batch=batches())
def test_save_and_load_is_the_identity(pair, batch):
    _, model = pair
    ids, mask = batch
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = CometForCausalLM.from_pretrained(folder).eval()
    def fields(config):  # what a reload may legitimately change: where it came from, the recorded dtype, versions
        volatile = ("_name_or_path", "dtype", "transformers_version")
        values = {key: value for key, value in config.to_dict().items() if key not in volatile}
        values["base_config"] = {key: value for key, value in values["base_config"].items() if key not in volatile}
        return values

    assert fields(reloaded.config) == fields(model.config)
    for (name, expected), (other, actual) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert name == other and torch.equal(actual, expected), name
    with torch.no_grad():
        close(reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
