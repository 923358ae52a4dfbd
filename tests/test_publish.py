"""`python -m convert.publish`: the built Hub folder, its validation, the (intercepted) upload, and loading it by repo
id from a Hugging Face cache, offline, in a process where this package cannot be imported."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import convert.publish as publish_module
from convert.publish import PublishOptions, blocked_import_preamble, build_folder, check_files, main, publish

VOCAB = 96
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_tokenizer():
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1", bos_token="w2",
                                        pad_token="w0")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_base():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def write_source(kind: str, folder: Path) -> Path:
    """A checkpoint folder as the converters write it (weights, code, tokenizer, card without a Hub base id)."""
    if kind == "comet":
        from modeling_comet import CometForCausalLM

        model = CometForCausalLM.from_base(tiny_base(), chunk_size=16, global_mem_size=4, temp_beacon_stride=4,
                                           temp_mem_budget=8)
    else:
        from modeling_comet.modeling_ram import RamForCausalLM

        model = RamForCausalLM.from_base(tiny_base(), encoder_layers=1, segment_size=4, keep_ratio=0.5)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "stray_notes.py").write_text("# not part of the model\n")  # must not be published
    return folder


OPTIONS = PublishOptions(base_model_id=BASE_ID, license="apache-2.0",
                         results=["results/passkey/smollm2-comet-trained-memory/passkey.json"],
                         training_command="python -m training.comet_trainer --finetuning memory",
                         datasets=["HuggingFaceFW/fineweb-edu"])


@pytest.fixture(params=["comet", "ram"])
def source(request, tmp_path):
    return request.param, write_source(request.param, tmp_path / f"src-{request.param}")


def expected_code(kind):
    common = {"configuration_comet.py", "pipeline_comet.py", "position_layout.py"}
    if kind == "comet":
        return common | {"modeling_comet.py", "requirements.py"}
    return common | {"configuration_ram.py", "modeling_ram.py", "pipeline_ram.py", "requirements.py"}


def test_dry_run_builds_validates_and_leaves_the_folder(source, tmp_path, capsys, monkeypatch):
    kind, src = source
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # --results paths are relative to the repository

    def no_hub(*args, **kwargs):
        raise AssertionError("a dry run must not touch the Hub")

    monkeypatch.setattr(publish_module, "HfApi", no_hub)
    report = main([str(src), "me/tiny", "--dry-run", "--base-model-id", BASE_ID, "--license", "apache-2.0",
                   "--results", "results/passkey/smollm2-comet-trained-memory/passkey.json"])
    folder = Path(report["folder"])
    try:
        names = set(report["files"])
        assert {n for n in names if n.endswith(".py")} == expected_code(kind)  # stray_notes.py left out
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja", "README.md"} <= names
        assert not any(n.endswith((".bin", ".pt")) for n in names)
        assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATE
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"].endswith("ForCausalLM")
        if kind == "ram":
            assert config["auto_map"]["AutoModel"] == "modeling_ram.RamModel"
            assert config["custom_pipelines"]["ram-question-answering"]["impl"] == "pipeline_ram.RamQuestionAnsweringPipeline"
        card = ModelCard.load(folder / "README.md")
        assert card.data.base_model == BASE_ID and card.data.license == "apache-2.0"
        assert card.data.eval_results and card.data.eval_results[0].dataset_type == "passkey"
        assert 'repo = "me/tiny"' in card.text
        out = capsys.readouterr().out
        assert "dry run: would upload to me/tiny@main" in out and "model.safetensors" in out and str(folder) in out
    finally:
        shutil.rmtree(folder)


class FakeApi:
    """Records what `HfApi` would be asked to do; `upload_folder` keeps a copy of the folder it was given."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        FakeApi.calls.append(("upload_folder", repo_id, {**kwargs, "files": files}))
        return type("CommitInfo", (), {"oid": COMMIT})()

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        FakeApi.calls.append(("upload_file", repo_id, {**kwargs, "path": path_in_repo, "content": path_or_fileobj}))
        return type("CommitInfo", (), {"oid": "f" * 40})()


def test_upload_sends_the_validated_folder_then_pins_the_card(tmp_path, monkeypatch):
    src = write_source("ram", tmp_path / "src")
    FakeApi.calls = []
    monkeypatch.setattr(publish_module, "HfApi", FakeApi)
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    report = publish(src, "me/tiny-ram", OPTIONS, private=True, revision="v1", commit_message="first",
                     workdir=tmp_path)
    kinds = [call[0] for call in FakeApi.calls]
    assert kinds == ["create_repo", "create_branch", "upload_folder", "upload_file"]
    assert FakeApi.calls[0][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert FakeApi.calls[1][2]["branch"] == "v1"
    upload = FakeApi.calls[2][2]
    assert upload["revision"] == "v1" and upload["commit_message"] == "first" and upload["delete_patterns"] == ["*"]
    files = upload["files"]
    assert {n for n in files if n.endswith(".py")} == expected_code("ram")
    assert "stray_notes.py" not in files and "model.safetensors" in files
    first_card = ModelCard(files["README.md"].decode())
    assert "revision=" not in first_card.text  # the commit is not known yet
    pin = FakeApi.calls[3][2]
    assert pin["path"] == "README.md" and pin["parent_commit"] == COMMIT and pin["revision"] == "v1"
    pinned = ModelCard(pin["content"].decode())
    assert f'revision = "{COMMIT}"' in pinned.text and pinned.data.base_model == BASE_ID
    assert pinned.data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert report["commit"] == COMMIT and not Path(report["folder"]).exists()  # temporary folder removed


def test_refuses_what_cannot_be_published(tmp_path):
    src = write_source("comet", tmp_path / "src")
    with pytest.raises(ValueError, match="license"):
        build_folder(src, tmp_path / "out", "me/x", PublishOptions(base_model_id=BASE_ID))
    with pytest.raises(ValueError, match="base-model-id"):
        build_folder(src, tmp_path / "out2", "me/x", PublishOptions(license="apache-2.0"))
    with pytest.raises(FileNotFoundError, match="not found"):
        publish(tmp_path / "absent", "me/x", OPTIONS, dry_run=True)
    folder = build_folder(src, tmp_path / "out3", "me/x", PublishOptions(base_model_id=BASE_ID, license="mit"))
    (folder / "extra_module.py").write_text("x = 1\n")
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="extra_module.py.*|pytorch_model.bin"):
        check_files(folder, tokenizer_has_chat_template=True)


def lay_out_as_cached_repo(folder: Path, cache: Path, repo_id: str) -> None:
    """Put `folder` where `hf_hub_download` would have put repo `repo_id` at commit COMMIT (main)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def comet_exports_backbone() -> bool:
    import modeling_comet

    return hasattr(modeling_comet, "CometModel")


def test_published_folders_load_by_repo_id_offline_without_this_package(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    cache = tmp_path / "hub"
    for kind in ("comet", "ram"):
        src = write_source(kind, tmp_path / f"src-{kind}")
        folder = build_folder(src, tmp_path / f"built-{kind}", f"me/tiny-{kind}", OPTIONS)
        lay_out_as_cached_repo(folder, cache, f"me/tiny-{kind}")
    comet_config = json.loads((tmp_path / "built-comet" / "config.json").read_text())
    check_comet_auto_model = comet_exports_backbone()
    if check_comet_auto_model:
        assert "AutoModel" in comet_config["auto_map"]
    script = blocked_import_preamble() + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

        text = " ".join(f"w{{i % 90 + 3}}" for i in range(40))
        # CoMeT
        repo = "me/tiny-comet"
        model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
        assert type(model).__name__ == "CometForCausalLM" and type(model).__module__.startswith("transformers_modules")
        tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
        assert tokenizer.chat_template is not None
        generator = pipeline("text-generation", model=repo, trust_remote_code=True)
        out = generator(text, max_new_tokens=3, do_sample=False)[0]["generated_text"]
        assert out.startswith(text) and len(out) > len(text), out
        long = pipeline("comet-text-generation", model=repo, trust_remote_code=True)
        assert type(long).__name__ == "CometTextGenerationPipeline", type(long)
        assert long(text, max_new_tokens=3, do_sample=False)[0]["generated_text"] == out
        if {check_comet_auto_model}:
            backbone = AutoModel.from_pretrained(repo, trust_remote_code=True)
            assert type(backbone).__name__ == "CometModel", type(backbone)
        # RAM
        repo = "me/tiny-ram"
        model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
        assert type(model).__name__ == "RamForCausalLM"
        backbone = AutoModel.from_pretrained(repo, trust_remote_code=True)
        assert type(backbone).__name__ == "RamModel"
        tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        hidden = backbone(context_ids=ids, question_ids=ids[:, :3]).last_hidden_state
        assert hidden.shape[-1] == 64
        qa = pipeline("ram-question-answering", model=repo, trust_remote_code=True)
        answer = qa({{"context": text, "question": "w5 w6"}}, max_new_tokens=3, do_sample=False)
        expected = model.generate(context_ids=ids, question_ids=tokenizer("\\n\\nQuestion: w5 w6\\nAnswer:",
                                  add_special_tokens=False, return_tensors="pt").input_ids, max_new_tokens=3,
                                  do_sample=False)
        assert answer[0]["answer"] == tokenizer.decode(expected[0], skip_special_tokens=True).strip(), answer
        print("ok")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("ok")


def test_card_inputs_come_from_the_source_card_when_not_given(tmp_path):
    src = write_source("ram", tmp_path / "src")
    (src / "README.md").write_text(
        "---\nbase_model: org/base\nlicense: mit\ndatasets:\n- org/qa\n---\n# x\n\n## Training\n\nTrained for 3 steps.\n\n"
        "```bash\npython -m training.ram_trainer --max_steps 3\n```\n\nData: org/qa.\n\n## Requirements\n\nnone\n"
    )
    folder = build_folder(src, tmp_path / "out", "me/x")
    card = ModelCard.load(folder / "README.md")
    assert (card.data.base_model, card.data.license, card.data.datasets) == ("org/base", "mit", ["org/qa"])
    assert "Trained for 3 steps." in card.text and "python -m training.ram_trainer --max_steps 3" in card.text
    assert card.text.count("Data: org/qa.") == 1
    options = PublishOptions(license="apache-2.0", training_note="Other.", training_command="cmd")
    card = ModelCard.load(build_folder(src, tmp_path / "out2", "me/x", options) / "README.md")
    assert card.data.license == "apache-2.0" and "Other." in card.text and "Trained for 3" not in card.text


def test_the_card_takes_only_results_measured_on_the_published_weights(tmp_path, monkeypatch):
    from evaluation.common import weights_fingerprint

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    src = write_source("comet", tmp_path / "src")
    measured_on = weights_fingerprint(str(src))  # what an evaluation of SRC records
    payload = json.loads(Path(OPTIONS.results[0]).read_text())
    (name, model), *_ = payload["models"].items()
    results = tmp_path / "passkey.json"
    results.write_text(json.dumps({**payload, "models": {name: {**model, "weights": measured_on}}}))
    options = replace(OPTIONS, results=[str(results)])
    folder = build_folder(src, tmp_path / "out", "me/tiny", options)
    assert f"Measured on these weights and settings (`{measured_on[:19]}…`" in (folder / "README.md").read_text()

    results.write_text(json.dumps({**payload, "models": {name: {**model, "weights": "sha256:" + "0" * 64}}}))
    with pytest.raises(ValueError, match="measured on other weights"):
        build_folder(src, tmp_path / "out2", "me/tiny", options)
