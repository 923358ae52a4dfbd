"""Model code of the library: CoMeT and RAM (and the files a Hub checkpoint carries).

Importing this package also registers the models with the transformers Auto classes, so that
`AutoModel` / `AutoModelForCausalLM.from_pretrained(folder)` work without `trust_remote_code` when it is installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_comet import SUPPORTED_BASE_MODEL_TYPES, CometConfig
from .configuration_ram import RamConfig
from .modeling_comet import CometCache, CometForCausalLM, CometMemoryState, CometModel
from .modeling_ram import RamForCausalLM, RamModel
from .pipeline_comet import CometTextGenerationPipeline, encode_long_text


def _register(config_cls, causal_lm_cls, backbone_cls=None) -> None:
    try:
        AutoConfig.register(config_cls.model_type, config_cls)
        AutoModelForCausalLM.register(config_cls, causal_lm_cls)
        if backbone_cls is not None:
            AutoModel.register(config_cls, backbone_cls)
    except ValueError:  # already registered (e.g. imported twice under different names)
        pass


_register(CometConfig, CometForCausalLM, CometModel)
_register(RamConfig, RamForCausalLM, RamModel)

__all__ = [
    "SUPPORTED_BASE_MODEL_TYPES",
    "CometCache",
    "CometConfig",
    "CometForCausalLM",
    "CometMemoryState",
    "CometModel",
    "CometTextGenerationPipeline",
    "RamConfig",
    "RamForCausalLM",
    "RamModel",
    "encode_long_text",
]
