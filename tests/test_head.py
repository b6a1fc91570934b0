"""The correction head: construction, the zero start, save/load, and the wrong-model error."""

from __future__ import annotations

import json
import math

import pytest
import torch

from steer import CorrectionHead, HeadConfig, HeadMismatchError
from steer.head import embedding_fingerprint, fingerprints_match


def test_for_model_records_what_it_was_made_for(make_model):
    model = make_model("llama")
    head = CorrectionHead.for_model(model, rank=4, top_k=3, tau=0.7)
    assert (head.config.hidden_size, head.config.vocab_size) == (32, model.config.vocab_size)
    assert (head.rank, head.top_k, head.tau) == (4, 3, 0.7)
    assert head.up.shape == head.down.shape == (32, 4)
    assert len(head.config.embedding_fingerprint) == 32


def test_fresh_head_adds_nothing(make_model, seed):
    head = CorrectionHead.for_model(make_model("gpt2"))
    delta = head(torch.randn(5, 32), torch.randn(5, 7, 32))
    assert delta.shape == (5, 7) and torch.equal(delta, torch.zeros(5, 7))


def test_forward_is_the_bilinear_form_centred_over_the_candidates(seed):
    head = CorrectionHead(HeadConfig(hidden_size=6, vocab_size=10, rank=2))
    torch.nn.init.normal_(head.up)
    hidden, candidates = torch.randn(3, 6), torch.randn(3, 4, 6)
    raw = torch.einsum("bkh,hg,bg->bk", candidates, head.up @ head.down.T, hidden)
    torch.testing.assert_close(head(hidden, candidates), raw - raw.mean(dim=-1, keepdim=True))
    steerable = torch.tensor([[True, True, True, False]] * 3)
    expected = (raw - raw[:, :3].mean(dim=-1, keepdim=True)) * steerable
    torch.testing.assert_close(head(hidden, candidates, steerable), expected)


def test_scale_multiplies_the_correction(seed):
    head = CorrectionHead(HeadConfig(hidden_size=6, vocab_size=10, rank=2))
    torch.nn.init.normal_(head.up)
    hidden, candidates = torch.randn(3, 6), torch.randn(3, 4, 6)
    plain = head(hidden, candidates)
    head.scale = 2.5
    torch.testing.assert_close(head(hidden, candidates), 2.5 * plain)
    torch.testing.assert_close(head.project(hidden), 2.5 * (hidden @ head.down @ head.up.T))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            head.scale = bad


def test_settable_gating_parameters_are_validated():
    head = CorrectionHead(HeadConfig(hidden_size=4, vocab_size=8))
    head.tau, head.top_k = float("inf"), 2
    assert (head.tau, head.top_k) == (math.inf, 2)
    with pytest.raises(ValueError, match="tau"):
        head.tau = float("nan")
    with pytest.raises(ValueError, match="top_k"):
        head.top_k = 0
    with pytest.raises(AttributeError):
        head.rank = 3
    with pytest.raises(ValueError, match="rank"):
        HeadConfig(hidden_size=4, vocab_size=8, rank=0)


def test_save_and_load_round_trip(make_model, tmp_path, seed):
    head = CorrectionHead.for_model(make_model("qwen2"), rank=3, top_k=4, tau=1.1)
    torch.nn.init.normal_(head.up)
    head.tau, head.scale = 0.9, 4.0  # changes after construction are saved too
    head.save_pretrained(tmp_path / "head")
    files = sorted(p.name for p in (tmp_path / "head").iterdir())
    assert "head.safetensors" in files and "config.json" in files and not [f for f in files if f.endswith(".tmp")]
    loaded = CorrectionHead.from_pretrained(tmp_path / "head")
    assert loaded.config == head.config
    assert torch.equal(loaded.up, head.up) and torch.equal(loaded.down, head.down)


def test_loading_reports_bad_files(tmp_path):
    head = CorrectionHead(HeadConfig(hidden_size=4, vocab_size=8, rank=2))
    head.save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 4,\n "vocab_size": 8,\n "rank": }')
    with pytest.raises(ValueError, match=r"config.json:3: not valid JSON"):
        CorrectionHead.from_pretrained(tmp_path)
    config.write_text(json.dumps({"hidden_size": 4, "vocab_size": 8, "rank": 3}))
    with pytest.raises(ValueError, match="do not match the config"):
        CorrectionHead.from_pretrained(tmp_path)
    config.write_text(json.dumps({"rank": 3}))
    with pytest.raises(ValueError, match="missing hidden_size, vocab_size"):
        CorrectionHead.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="head.safetensors is missing"):
        (tmp_path / "head.safetensors").unlink()
        config.write_text(json.dumps({"hidden_size": 4, "vocab_size": 8}))
        CorrectionHead.from_pretrained(tmp_path)


def test_head_for_another_model_is_refused(make_model):
    head = CorrectionHead.for_model(make_model("llama", seed=0))
    head.check_compatible(make_model("llama", seed=0))
    with pytest.raises(HeadMismatchError, match="different output embedding"):
        head.check_compatible(make_model("llama", seed=1))
    model = make_model("llama")
    expected = f"vocabulary 99.*has hidden size 32 and vocabulary {model.config.vocab_size}"
    with pytest.raises(HeadMismatchError, match=expected):
        CorrectionHead(HeadConfig(hidden_size=32, vocab_size=99)).check_compatible(model)


def test_fingerprint_survives_a_change_of_precision_only(make_model):
    weight = make_model("phi3").get_output_embeddings().weight
    reference = embedding_fingerprint(weight)
    for dtype in (torch.float16, torch.bfloat16):
        assert fingerprints_match(reference, embedding_fingerprint(weight.to(dtype)))
    assert not fingerprints_match(reference, embedding_fingerprint(weight + 0.1 * torch.randn_like(weight)))
