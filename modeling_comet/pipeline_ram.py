"""A `transformers` pipeline answering a question over a long context with a [`RamForCausalLM`], from strings.

Importing this module registers the task ``"ram-question-answering"``::

    >>> import modeling_comet.pipeline_ram  # doctest: +SKIP
    >>> from transformers import pipeline  # doctest: +SKIP
    >>> answer = pipeline("ram-question-answering", model=ram_model, tokenizer=tokenizer)(  # doctest: +SKIP
    ...     {"context": long_text, "question": "Who wrote it?"}, max_new_tokens=16)
    >>> answer[0]["answer"]  # doctest: +SKIP

The context is tokenized without special tokens after `context_prefix`; the question is formatted with
`question_template`, which is the text the decoder reads after the (compressed) context.
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

RAM_TASK = "ram-question-answering"
DEFAULT_QUESTION_TEMPLATE = "\n\nQuestion: {question}\nAnswer:"


class RamQuestionAnsweringPipeline(Pipeline):
    """Answer `{"context": str, "question": str}` inputs with `RamForCausalLM.generate`.

    Call options: `question_template` (`str`, defaults to `"\\n\\nQuestion: {question}\\nAnswer:"`),
    `context_prefix` (`str`, defaults to `""`) and any generation keyword (`max_new_tokens`, `do_sample`, ...).
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        vocab_size = self.model.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary has {vocab_size}: "
                "use the base model's tokenizer"
            )

    def _sanitize_parameters(self, question_template=None, context_prefix=None, **generate_kwargs):
        preprocess_params = {}
        if question_template is not None:
            if "{question}" not in question_template:
                raise ValueError(f"question_template must contain '{{question}}', got {question_template!r}")
            preprocess_params["question_template"] = question_template
        if context_prefix is not None:
            preprocess_params["context_prefix"] = context_prefix
        return preprocess_params, generate_kwargs, {}

    def preprocess(self, inputs, question_template=DEFAULT_QUESTION_TEMPLATE, context_prefix=""):
        if not isinstance(inputs, dict) or not {"context", "question"} <= inputs.keys():
            raise ValueError(f"expected a dict with 'context' and 'question', got {type(inputs).__name__}")
        context = self.tokenizer(context_prefix + inputs["context"], add_special_tokens=False, return_tensors="pt")
        question = self.tokenizer(
            question_template.format(question=inputs["question"]), add_special_tokens=False, return_tensors="pt"
        )
        return {"context_ids": context["input_ids"], "question_ids": question["input_ids"]}

    def _forward(self, model_inputs, **generate_kwargs):
        return {"answer_ids": self.model.generate(**model_inputs, **generate_kwargs)}

    def postprocess(self, model_outputs):
        texts = self.tokenizer.batch_decode(model_outputs["answer_ids"], skip_special_tokens=True)
        return [{"answer": text.strip()} for text in texts]


# A checkpoint's copy of this file is imported again (as remote code) next to the installed package: register once.
if RAM_TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(
        RAM_TASK, pipeline_class=RamQuestionAnsweringPipeline, pt_model=AutoModelForCausalLM
    )

__all__ = ["DEFAULT_QUESTION_TEMPLATE", "RAM_TASK", "RamQuestionAnsweringPipeline"]
