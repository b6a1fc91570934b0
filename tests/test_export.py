"""`steer export`: a folder that `model.generate(custom_generate=FOLDER, trust_remote_code=True)` decodes with,
exactly as `steer.generate` does, without steer; its model card; its refusals."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import steer
from steer.cli.main import main
from steer.export import MIN_TRANSFORMERS, ExportError, export_head, template
from steer.pipeline.decoding import DecodingSettings
from steer.pipeline.evaluation import EvalSettings, evaluate
from steer.pipeline.problems import load_problems

PROMPTS = ["What is 3+4?", "Name a colour:"]
SELF_CONTAINED_IMPORTS = {"__future__", "base64", "copy", "json", "math", "torch", "transformers", "packaging",
                          "safetensors"}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def head(model):
    """A head whose correction changes the tiny model's greedy tokens (checked below)."""
    head = steer.CorrectionHead.for_model(model, rank=4, top_k=5, tau=0.5, seed=0)
    with torch.no_grad():
        head.up.copy_(torch.randn(head.up.shape, generator=torch.Generator().manual_seed(1)) * 3.0)
    head.scale = 1.5
    return head


@pytest.fixture(scope="module")
def exported(head, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exported") / "my-head"
    export_head(head, folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tokenizer):
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


@pytest.mark.parametrize(
    "kwargs", [{"do_sample": False}, {"do_sample": True, "temperature": 0.8}, {"num_beams": 3, "do_sample": False}],
    ids=["greedy", "sample", "beam"],
)
def test_custom_generate_decodes_exactly_like_steer_generate(model, head, exported, inputs, kwargs):
    torch.manual_seed(0)
    custom = model.generate(**inputs, max_new_tokens=12, custom_generate=str(exported), trust_remote_code=True,
                            **kwargs)
    torch.manual_seed(0)
    steered, stats = steer.generate(model, head, **inputs, max_new_tokens=12, return_stats=True, **kwargs)
    torch.manual_seed(0)
    plain = model.generate(**inputs, max_new_tokens=12, **kwargs)
    assert torch.equal(custom, steered)
    assert stats.changed > 0 and not torch.equal(custom, plain)  # the head did change tokens


def test_the_exported_method_runs_where_steer_cannot_be_imported(model, head, exported, inputs, tiny_model_dir):
    script = (
        "import sys, json\n"
        "sys.modules['steer'] = None  # `import steer` now fails\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})\n"
        f"inputs = AutoTokenizer.from_pretrained({str(tiny_model_dir)!r})({PROMPTS!r}, return_tensors='pt', "
        "padding=True)\n"
        f"out = model.generate(**inputs, max_new_tokens=12, do_sample=False, custom_generate={str(exported)!r}, "
        "trust_remote_code=True)\n"
        "print(json.dumps(out.tolist()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=exported.parent,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    steered = steer.generate(model, head, **inputs, max_new_tokens=12, do_sample=False)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == steered.tolist()


def test_the_method_is_self_contained(exported):
    for name in ("generate.py", "steer_head.py"):
        tree = ast.parse((exported / "custom_generate" / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert imported <= SELF_CONTAINED_IMPORTS, name


def test_the_folder_is_also_a_steer_head(head, exported):
    loaded = steer.CorrectionHead.from_pretrained(exported)
    assert torch.equal(loaded.up, head.up) and (loaded.tau, loaded.top_k, loaded.scale) == (0.5, 5, 1.5)


def test_without_trust_remote_code_transformers_refuses_the_folder(model, exported, inputs):
    with pytest.raises(ValueError, match="trust_remote_code"):
        model.generate(**inputs, max_new_tokens=2, custom_generate=str(exported), trust_remote_code=False)


def test_older_transformers_are_refused(model, exported, inputs, monkeypatch):
    import transformers
    from transformers.dynamic_module_utils import check_python_requirements

    assert f"transformers>={MIN_TRANSFORMERS}" in template("requirements.txt").splitlines()
    assert f'MIN_TRANSFORMERS = "{MIN_TRANSFORMERS}"' in template("generate.py")
    check_python_requirements(str(exported), requirements_file="custom_generate/requirements.txt")
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "5.16.0" if name == "transformers" else version(name))
    with pytest.raises(ImportError, match=f"transformers>={MIN_TRANSFORMERS}"):
        check_python_requirements(str(exported), requirements_file="custom_generate/requirements.txt")
    monkeypatch.undo()
    monkeypatch.setattr(transformers, "__version__", "5.16.0")
    with pytest.raises(RuntimeError, match=f"needs transformers >= {MIN_TRANSFORMERS}"):
        model.generate(**inputs, max_new_tokens=2, custom_generate=str(exported), trust_remote_code=True)


@pytest.mark.parametrize(
    "kwargs", [{"cache_implementation": "paged"}, {"prompt_lookup_num_tokens": 2}, {"penalty_alpha": 0.6, "top_k": 4}],
    ids=["continuous-batching", "prompt-lookup", "contrastive"],
)
def test_the_method_refuses_what_it_cannot_steer(model, exported, inputs, kwargs):
    with pytest.raises(RuntimeError, match="steering"):
        model.generate(**inputs, max_new_tokens=2, custom_generate=str(exported), trust_remote_code=True, **kwargs)


def test_the_method_refuses_another_model(make_model, exported, inputs):
    other = make_model("llama", seed=4)  # same sizes, other weights
    with pytest.raises(RuntimeError, match="another output embedding"):
        other.generate(**inputs, max_new_tokens=2, custom_generate=str(exported), trust_remote_code=True)


def test_model_card_without_evaluation(head, exported, tiny_model_dir):
    card = (exported / "README.md").read_text()
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert f"| base model | `{tiny_model_dir}` |" in card and "- custom_generate" in card
    assert "base_model:" not in card  # the Hub's metadata names Hub models, not local folders
    assert f"| head parameters | 256 (rank 4; {256 / parameters:.4%} of the model's {parameters:,}) |" in card
    assert "| tau | 0.5 nats |" in card and "| top-k | 5 |" in card and "| strength (scale) | 1.5 |" in card
    assert "No evaluation recorded." in card and f"transformers >= {MIN_TRANSFORMERS}" in card


def test_model_card_reports_the_heads_evaluation(model, head, tokenizer, arithmetic_file, tmp_path):
    problems = load_problems(arithmetic_file, limit=3)
    settings = EvalSettings(decoding=DecodingSettings(temperature=0, max_new_tokens=4), batch_size=4)
    summary = evaluate(model, tokenizer, {"arith": problems}, tmp_path / "eval", settings, head=head, progress=False)
    result = export_head(head, tmp_path / "out", eval_dir=tmp_path / "eval")
    card = (tmp_path / "out" / "README.md").read_text()
    steered = summary.benchmarks["arith"].arms["steered"]
    assert result.evaluation == str(tmp_path / "eval")
    assert "| arith | 3 | " in card and f"{steered.accuracy:.3f} [{steered.interval_95[0]:.3f}" in card
    assert "mcnemar p = " in card and "Decoding: greedy, up to 4 new tokens, 1 sample(s) per problem." in card

    other = steer.CorrectionHead.for_model(model, rank=4, top_k=5, tau=0.5, seed=7)
    with pytest.raises(ExportError, match="evaluated another head"):
        export_head(other, tmp_path / "out2", eval_dir=tmp_path / "eval")


def test_an_evaluation_folder_without_summary_is_refused(head, tmp_path):
    (tmp_path / "eval").mkdir()
    with pytest.raises(ExportError, match="no summary.json"):
        export_head(head, tmp_path / "out", eval_dir=tmp_path / "eval")
    assert not (tmp_path / "out").exists()


def test_a_head_for_another_model_is_refused(make_model, tiny_model_dir, tmp_path):
    config = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config
    config.hidden_size, config.intermediate_size = 16, 32
    narrow = AutoModelForCausalLM.from_config(config)
    narrow.save_pretrained(tmp_path / "narrow")
    head = steer.CorrectionHead.for_model(make_model("llama"), rank=2)
    with pytest.raises(ExportError, match="hidden size 16"):
        export_head(head, tmp_path / "out", base_model=str(tmp_path / "narrow"))


def test_export_command(head, tmp_path):
    head.save_pretrained(tmp_path / "head")
    result = CliRunner().invoke(main, ["export", "--head", str(tmp_path / "head"), "--out", str(tmp_path / "out"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["head_parameters"] == 256 and report["evaluation"] == "no evaluation recorded"
    assert sorted(report["files"]) == sorted(
        ["head.safetensors", "config.json", "README.md", "custom_generate/generate.py",
         "custom_generate/requirements.txt", "custom_generate/steer_head.py"])
    assert all((tmp_path / "out" / name).is_file() for name in report["files"])
    missing = CliRunner().invoke(main, ["export", "--head", str(tmp_path / "head"), "--out", str(tmp_path / "o2"),
                                        "--eval", str(tmp_path / "head")])
    assert missing.exit_code == 1 and "no summary.json" in missing.output
