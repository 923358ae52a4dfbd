"""transformers' own ModelTesterMixin, GenerationTesterMixin and ConfigTester on tiny CoMeT models.

The mixins come from the installed transformers release's `tests/` folder (see conftest.py), never from a copy in
this repository. Two configurations: inputs longer than one chunk (the memory is in play: several windows, folds
while generating) and inputs shorter than one chunk (CoMeT equals its base model). Run with `make test-transformers`.
"""

from __future__ import annotations

import json
import unittest

import torch
import transformers_tests.test_modeling_common as modeling_common
from transformers import LlamaConfig
from transformers_tests.generation.test_utils import GenerationTesterMixin
from transformers_tests.test_configuration_common import ConfigTester
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

from modeling_comet import CometConfig, CometForCausalLM, CometModel

# The mixins tell a base model from a head by transformers' own name tables (a base model has no loss to train, a
# causal-LM head gets labels). CoMeT registers with the Auto classes at run time, so add it to the mixin module's view
# of those tables, as an in-library model would be listed; transformers' own tables are left untouched.
modeling_common.MODEL_MAPPING_NAMES = {**modeling_common.MODEL_MAPPING_NAMES, "comet": "CometModel"}
modeling_common.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES = {
    **modeling_common.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "comet": "CometForCausalLM"
}


class CometModelTester:
    """Builds tiny CoMeT configurations (a 2-layer Llama base) and inputs, as transformers' model testers do."""

    def __init__(self, parent, seq_length: int, chunk_size: int, temp_beacon_stride: int, batch_size: int = 2):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.chunk_size = chunk_size
        self.temp_beacon_stride = temp_beacon_stride
        self.is_training = True
        self.use_input_mask = True
        self.use_labels = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 2
        self.intermediate_size = 37
        self.pad_token_id = 0
        self.bos_token_id = 1
        self.eos_token_id = 2

    def get_base_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=512, pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        )  # fmt: skip

    def base_config_dict(self) -> dict:
        """The base configuration as a `CometConfig` serialises it (what ConfigTester compares its input with)."""
        config = CometConfig(base_config=self.get_base_config(), chunk_size=self.chunk_size,
                             temp_beacon_stride=self.temp_beacon_stride)  # fmt: skip
        return json.loads(config.to_json_string())["base_config"]

    def get_config(self) -> CometConfig:
        return CometConfig(
            base_config=self.get_base_config(), chunk_size=self.chunk_size, global_mem_size=2,
            temp_beacon_stride=self.temp_beacon_stride, temp_mem_budget=4, adapter_rank=4,
        )  # fmt: skip

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        return self.get_config(), input_ids, input_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask = self.prepare_config_and_inputs()
        # CoMeT reads left-padded batches (right padding is refused for generation), so the mask is all ones here
        # and padding is exercised by the mixins' own left-padding tests.
        return config, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


class _CometMixinTests(ModelTesterMixin, GenerationTesterMixin):
    all_model_classes = (CometModel, CometForCausalLM)
    test_resize_embeddings = True
    seq_length = chunk_size = temp_beacon_stride = None

    def setUp(self):
        self.model_tester = CometModelTester(self, self.seq_length, self.chunk_size, self.temp_beacon_stride)
        self.config_tester = ConfigTester(
            self, config_class=CometConfig, has_text_modality=False, base_config=self.model_tester.base_config_dict(),
            chunk_size=self.chunk_size, global_mem_size=2, temp_beacon_stride=self.temp_beacon_stride,
            temp_mem_budget=4,
        )  # fmt: skip


def _config_check(name):
    def test(self):
        getattr(self.config_tester, name)()

    test.__name__ = f"test_config_{name}"
    test.__doc__ = f"ConfigTester.{name} of the installed transformers release."
    return test


# One test per ConfigTester check that `run_common_tests` runs, taken from the installed release.
for _name in [name for name in vars(ConfigTester) if name.startswith(("create_and_test_", "check_"))]:
    setattr(_CometMixinTests, f"test_config_{_name}", _config_check(_name))


class CometLongerThanOneChunkTest(_CometMixinTests, unittest.TestCase):
    """Inputs of 13 tokens, chunks of 4: every forward and generate folds windows into the memory."""

    seq_length, chunk_size, temp_beacon_stride = 13, 4, 2


class CometShorterThanOneChunkTest(_CometMixinTests, unittest.TestCase):
    """Inputs of 7 tokens, chunks of 32: one window, CoMeT equals its base model."""

    seq_length, chunk_size, temp_beacon_stride = 7, 32, 8
    # An input inside one chunk never folds into the memory, so the memory's parameters get no gradient here (they
    # do in CometLongerThanOneChunkTest, which keeps the check).
    test_all_params_have_gradient = False
