import json
import math

import numpy as np
import pytest
import torch

from evaluation import passkey
from tests.evaluation_helpers import BigramLM, InductionLM, TinyConfig, char_tokenizer, tiny_comet

LENGTHS = [300, 450]
DEPTHS = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def test_prompt_has_exact_length_and_key_at_depth(tokenizer):
    prompt = passkey.PasskeyPrompt.from_tokenizer(tokenizer)
    needle = passkey.NEEDLE.format(key="12345")
    for length in (prompt.min_length(), 400, 1000):
        for depth in DEPTHS:
            ids = prompt.build("12345", length, depth)
            assert len(ids) == length
            text = tokenizer.decode(ids)
            assert text.startswith(passkey.INSTRUCTION) and text.endswith(passkey.QUESTION)
            filler = length - prompt.min_length()
            assert text.index(needle) == len(passkey.INSTRUCTION) + round(depth * filler)
    with pytest.raises(ValueError, match="at least"):
        prompt.build("12345", prompt.min_length() - 1, 0.5)
    with pytest.raises(ValueError, match="Depth"):
        prompt.build("12345", 400, 1.5)


def test_extract_key_and_lengths():
    assert passkey.extract_key(" 12345. Remember it") == "12345"
    assert passkey.extract_key(" is 1234 5") == "1234"
    assert passkey.extract_key(" nothing") is None
    assert [passkey.parse_length(text) for text in ("4096", "32k", "1M")] == [4096, 32768, 1 << 20]
    with pytest.raises(Exception, match="not a length"):
        passkey.parse_length("lots")


def test_copying_model_retrieves_every_key(tokenizer):
    model = InductionLM(TinyConfig())
    result = passkey.evaluate_model(model, tokenizer, LENGTHS, DEPTHS, samples=2, seed=3, progress=False)
    assert result["accuracy"] == [[1.0, 1.0]] * 3
    assert result["mean_accuracy"] == 1.0
    cell = result["cells"][0]
    assert cell["answers"][0].startswith(f" {cell['keys'][0]}.")
    # Keys are random 5-digit strings, fixed by the seed and different across cells.
    keys = [key for cell in result["cells"] for key in cell["keys"]]
    assert all(len(key) == 5 for key in keys) and len(set(keys)) > 1


def test_context_blind_model_retrieves_nothing(tokenizer):
    model = BigramLM(TinyConfig())
    result = passkey.evaluate_model(model, tokenizer, LENGTHS, DEPTHS, samples=2, progress=False)
    assert result["accuracy"] == [[0.0, 0.0]] * 3 and result["accuracy_per_length"] == [0.0, 0.0]


def test_cells_beyond_max_positions_are_marked_not_run(tokenizer):
    model = InductionLM(TinyConfig(max_position_embeddings=400))
    result = passkey.evaluate_model(model, tokenizer, LENGTHS, DEPTHS, max_new_tokens=10, progress=False)
    assert [row[1] for row in result["accuracy"]] == [None] * 3
    assert [row[0] for row in result["accuracy"]] == [1.0] * 3
    assert result["accuracy_per_length"] == [1.0, None]
    assert max(model.forward_lengths) < 400  # never ran a 450-token prompt
    forced = passkey.evaluate_model(model, tokenizer, LENGTHS, [0.5], score_beyond_max_positions=True, progress=False)
    assert forced["accuracy"] == [[1.0, 1.0]] and forced["cells"][1]["exceeds_max_positions"]


def test_real_llama_generate_path(tokenizer):
    """A tiny random Llama exercises generate() with a real KV cache; its answers are just scored."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    result = passkey.evaluate_model(LlamaForCausalLM(config).eval(), tokenizer, [300], [0.5], progress=False)
    assert result["accuracy"][0][0] in (0.0, 1.0) and isinstance(result["cells"][0]["answers"][0], str)


def test_command_line_compares_models_and_writes_outputs(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("tiny_eval", TinyConfig, exist_ok=True)
    AutoModelForCausalLM.register(TinyConfig, InductionLM, exist_ok=True)
    folders = []
    for name, limit in (("long", 4096), ("short", 400)):
        folder = tmp_path / name
        InductionLM(TinyConfig(max_position_embeddings=limit)).save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
        folders.append(str(folder))
    out = tmp_path / "out"
    payload = passkey.main(
        ["--model", *folders, "--output-dir", str(out), "--lengths", "450", "300", "--num-depths", "2", "--no-progress"]
    )
    saved = json.loads((out / "passkey.json").read_text())
    assert saved["lengths"] == [300, 450] and saved["depths"] == [0.0, 1.0] and saved["complete"]
    assert saved["models"][folders[0]]["accuracy"] == [[1.0, 1.0], [1.0, 1.0]]
    assert saved["models"][folders[1]]["accuracy_per_length"] == [1.0, None]
    long_keys = [cell["keys"] for cell in payload["models"][folders[0]]["cells"]]
    assert long_keys == [cell["keys"] for cell in payload["models"][folders[1]]["cells"]]  # same prompts
    assert (out / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="shorter than a passkey prompt"):
        passkey.main(["--model", folders[0], "--output-dir", str(out), "--lengths", "50", "--no-progress", "--overwrite"])
    with pytest.raises(FileNotFoundError):
        passkey.main(["--model", str(tmp_path / "missing"), "--output-dir", str(out), "--no-progress", "--overwrite"])


def test_merge_joins_runs_of_different_lengths_into_one_grid(tmp_path):
    """Two real CLI runs (300 tokens; 450 and 600 tokens) merge into one 3-length grid equal to each run's columns;
    a model past its position limit is marked so at lengths no run gave it; mismatched or overlapping runs refuse."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from evaluation import passkey_merge

    AutoConfig.register("tiny_eval", TinyConfig, exist_ok=True)
    AutoModelForCausalLM.register(TinyConfig, InductionLM, exist_ok=True)
    long, short = tmp_path / "long", tmp_path / "short"
    for folder, limit in ((long, 4096), (short, 400)):
        InductionLM(TinyConfig(max_position_embeddings=limit)).save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
    common = ["--num-depths", "2", "--no-progress"]
    passkey.main(["--model", str(long), str(short), "--output-dir", str(tmp_path / "a"), "--lengths", "300", *common])
    passkey.main(["--model", str(long), "--output-dir", str(tmp_path / "b"), "--lengths", "450", "600", *common])
    merged = passkey_merge.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output-dir", str(tmp_path / "m")])
    saved = json.loads((tmp_path / "m" / "passkey.json").read_text())
    assert saved == json.loads(json.dumps(merged)) and saved["lengths"] == [300, 450, 600]
    assert saved["merged_from"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert saved["models"][str(long)]["accuracy"] == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    short_result = saved["models"][str(short)]
    assert short_result["accuracy_per_length"] == [1.0, None, None]
    assert {(c["length"], c["exceeds_max_positions"]) for c in short_result["cells"]} == {(300, False), (450, True),
                                                                                          (600, True)}  # fmt: skip
    assert (tmp_path / "m" / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match="--overwrite"):
        passkey_merge.main([str(tmp_path / "a"), "--output-dir", str(tmp_path / "m")])
    named = passkey_merge.main([str(tmp_path / "a"), "--output-dir", str(tmp_path / "n"), "--name", f"{long}=long"])
    assert sorted(named["models"]) == sorted(["long", str(short)])
    assert named["models"]["long"]["accuracy"] == [[1.0], [1.0]] and named["lengths"] == [300]
    for bad, message in ((f"{tmp_path}/nope=x", "no run holds"), (f"{long}={short}", "same label"), ("x", "MODEL=LABEL")):
        with pytest.raises(ValueError, match=message):
            passkey_merge.main([str(tmp_path / "a"), "--output-dir", str(tmp_path / "o"), "--name", bad])
    import shutil

    shutil.copytree(tmp_path / "b", tmp_path / "b2")
    with pytest.raises(ValueError, match="in both"):
        passkey_merge.main([str(tmp_path / "b"), str(tmp_path / "b2"), "--output-dir", str(tmp_path / "x")])
    passkey.main(["--model", str(long), "--output-dir", str(tmp_path / "c"), "--lengths", "500", "--num-depths", "3",
                  "--no-progress"])  # fmt: skip
    with pytest.raises(ValueError, match="differ in 'depths'"):
        passkey_merge.main([str(tmp_path / "a"), str(tmp_path / "c"), "--output-dir", str(tmp_path / "y")])
    with pytest.raises(FileNotFoundError):
        passkey_merge.main([str(tmp_path / "missing"), "--output-dir", str(tmp_path / "z")])


def test_depth_grid():
    assert passkey.depth_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert passkey.depth_grid(1) == [0.5]
    assert np.isclose(sum(passkey.depth_grid(3)), 1.5)


def test_comet_reads_a_128k_prompt_one_chunk_at_a_time(tokenizer):
    """CoMeT prompts are read chunk by chunk, so a 128k-token cell runs with one chunk of activations at a time."""
    model = tiny_comet(chunk_size=256)
    seen = []  # tokens fed to each forward call
    forward = model.forward

    def recording_forward(*args, **kwargs):
        seen.append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1])
        return forward(*args, **kwargs)

    model.forward = recording_forward
    result = passkey.evaluate_model(model, tokenizer, [4096, 131072], [0.5], progress=False)
    assert result["max_positions"] is None and result["chunked_forward"]
    assert [cell["exceeds_max_positions"] for cell in result["cells"]] == [False, False]
    assert all(isinstance(cell["answers"][0], str) and cell["accuracy"] in (0.0, 1.0) for cell in result["cells"])
    assert max(seen) == 256  # never more than one chunk, whatever the prompt length
    # read(): all but the last prompt token, 256 at a time; generate(): one forward per new token (10 per cell).
    assert len(seen) == math.ceil(4095 / 256) + math.ceil(131071 / 256) + 2 * 10
    # Reading first gives exactly the tokens generate() gives on the whole prompt at once.
    prompt = passkey.PasskeyPrompt.from_tokenizer(tokenizer).build("12345", 4096, 0.5)
    ids = torch.tensor([prompt])
    model.forward = forward
    whole = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    expected = tokenizer.decode(whole[0, 4096:], skip_special_tokens=True)
    assert len(expected) == 10 and passkey.generate_answer(model, tokenizer, prompt, 10) == expected


def test_lengths_up_to_128k_are_accepted_and_marked_beyond_positions(tokenizer):
    args = passkey.build_parser().parse_args(["--model", "m", "--output-dir", "o", "--lengths", "1k", "128k"])
    assert args.lengths == [1024, 131072]
    prompt = passkey.PasskeyPrompt.from_tokenizer(tokenizer).build("12345", 131072, 0.25)
    assert len(prompt) == 131072
    model = InductionLM(TinyConfig(max_position_embeddings=8192))
    result = passkey.evaluate_model(model, tokenizer, [300, 131072], [0.5], progress=False)
    assert result["accuracy"] == [[1.0, None]] and result["cells"][1]["exceeds_max_positions"]
    assert max(model.forward_lengths) < 8192  # the 128k cell was marked, not run
