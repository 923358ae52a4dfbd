"""transformers' generic tests that CoMeT refuses by design, with the reason (shown in the README's Limitations).

`tests/test_transformers_refusals_documented.py` (default suite) checks that the README lists exactly these.
Each runs as a strict xfail in `make test-transformers`, in both configurations (inputs longer and shorter than one
chunk): it must fail, so a test that starts passing is reported and this list must shrink.
"""

_ATTENTION_WINDOW = (
    "attention maps are over the fixed-width chunk window (memory slots, text, beacons, readouts), not over the input "
    "tokens, and the head count lives in the nested `base_config`"
)
_STRICT_LOADING = (
    "loading a checkpoint that lacks weights raises instead of initialising them at random (a random memory silently "
    "reads nothing; fresh memory is built with `from_base`)"
)
_ASSISTED = "assisted decoding is refused: rejecting draft tokens crops the cache, and folded text cannot be un-read"
_SDPA_ATTENTIONS = "`output_attentions` needs eager attention (sdpa returns no weights), refused with a clear error"

REFUSED: dict[str, str] = {
    "test_assisted_decoding_matches_greedy_search_0_random": _ASSISTED,
    "test_assisted_decoding_matches_greedy_search_1_same": _ASSISTED,
    "test_assisted_decoding_sample": _ASSISTED,
    "test_attention_outputs": _ATTENTION_WINDOW,
    "test_greedy_generate_dict_outputs": _ATTENTION_WINDOW,
    "test_greedy_generate_dict_outputs_use_cache": _ATTENTION_WINDOW,
    "test_sample_generate_dict_output": _ATTENTION_WINDOW,
    "test_beam_search_generate_dict_output": _ATTENTION_WINDOW,
    "test_beam_search_generate_dict_outputs_use_cache": _ATTENTION_WINDOW,
    "test_beam_sample_generate_dict_output": _ATTENTION_WINDOW,
    "test_model_outputs_equivalence": _SDPA_ATTENTIONS,
    "test_eager_matches_sdpa_inference_24_fp32_pad_left_output_attentions": _SDPA_ATTENTIONS,
    "test_retain_grad_hidden_states_attentions": (
        "per-layer hidden states are gathered from the chunk windows into output buffers; the logits are computed "
        "from the windows, not from those buffers, so no gradient reaches them"
    ),
    "test_past_key_values_format": (
        "`CometCache` is a fixed-size window plus memory (constant memory while decoding), not one key/value entry "
        "per token"
    ),
    "test_correct_missing_keys": _STRICT_LOADING,
    "test_model_weights_reload_no_missing_tied_weights": _STRICT_LOADING,
    "test_base_model_prefix_loads_base_weights": _STRICT_LOADING + "; a `CometModel` checkpoint has no LM head",
    "test_config_check_config_can_be_init_without_params": (
        "`CometConfig` needs `base_config`: there is no meaningful default base model"
    ),
    "test_model_rope_scaling_from_config_1_dynamic": (
        "positions restart in every chunk, so dynamic RoPE scaling (active only past the original maximum position) "
        "never applies"
    ),
    "test_tp_plan_matches_params": (
        "no tensor-parallel plan: CoMeT runs on one device (the memory would have to follow each sharded layer)"
    ),
}


def readme_block() -> str:
    """The README's list of these tests: one line per reason, the tests that share it first (checked verbatim)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in REFUSED.items():
        by_reason.setdefault(reason, []).append(name)
    return "\n".join(
        "  - " + ", ".join(f"`{name}`" for name in names) + f": {reason}." for reason, names in by_reason.items()
    )
