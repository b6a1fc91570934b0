"""Steering inside vLLM (vLLM's CPU build): the steered model classes against `steer.generate`, the refusals, the
engine of rollouts and evaluation, and `steer serve` over HTTP.

Tiny random models are saved to disk with the character tokenizer; a head planted with a large random correction
and tau = 0 changes their greedy output. vLLM's engine starts in its own processes (about 30 s each here), so the
engines are shared within the module.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
import transformers
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import steer
from steer import CorrectionHead, HeadMismatchError, SteerError
from steer.cli.main import main
from steer.pipeline.decoding import decode_batch
from steer.pipeline.folders.rollouts import RolloutFolder
from steer.pipeline.problems import Problem
from steer.pipeline.rollout import run_rollouts
from steer.settings import DecodingSettings, RolloutSettings
from steer.world.tokenizer import char_tokenizer

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (python -m steer.integrations.vllm.install_cpu)")

from steer.integrations.vllm import register, set_steering, steered_llm, steering_stats  # noqa: E402
from steer.integrations.vllm.decoding import VllmDecoder  # noqa: E402

PROMPTS = ["2+3=", "Let x be 7. Then", "ab", "The quick brown fox", "Count: 1 2 3"]
NEW_TOKENS = 12
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=256 << 20, seed=0)
# vLLM's CPU attention serves head sizes of 32 and up
CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=512)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512)),
}


def save_model(folder, arch: str, seed: int = 0):
    tokenizer = char_tokenizer()
    config_class, kwargs = CONFIGS[arch]
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                                 bos_token_id=2, **kwargs)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = 0
    return model, tokenizer


def planted_head(model, folder):
    head = CorrectionHead.for_model(model, rank=4, top_k=4, tau=0.0, seed=1)
    torch.nn.init.normal_(head.up, std=3.0, generator=torch.Generator().manual_seed(2))
    head.save_pretrained(folder)
    return head


def hf_greedy(model, tokenizer, head=None) -> list[list[int]]:
    """Each prompt alone, greedy, with `steer.generate` (or plain `generate`), up to NEW_TOKENS tokens. (No minimum
    length: transformers masks the end-of-sequence token before a logits processor runs, vLLM after the model.)"""
    outputs = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        kwargs = dict(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        out = steer.generate(model, head, **kwargs) if head is not None else model.generate(**kwargs)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


def vllm_greedy(llm, tokenizer) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    prompts = [TokensPrompt(prompt_token_ids=tokenizer(p)["input_ids"]) for p in PROMPTS]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def steered(request, tmp_path_factory):
    """(model folder, HF model, tokenizer, head, steered vLLM engine) for each architecture."""
    folder = tmp_path_factory.mktemp(f"vllm-{request.param}")
    model, tokenizer = save_model(folder / "model", request.param)
    head = planted_head(model, folder / "head")
    llm = steered_llm(str(folder / "model"), str(folder / "head"), **ENGINE)
    yield folder, model, tokenizer, head, llm
    del llm
    gc.collect()


def test_register_adds_a_steered_class_per_architecture():
    from vllm import ModelRegistry

    register()
    assert {"SteerLlamaForCausalLM", "SteerQwen2ForCausalLM", "SteerGemma2ForCausalLM"} <= set(
        ModelRegistry.get_supported_archs())


def test_steered_engine_decodes_as_steer_generate(steered):
    folder, model, tokenizer, head, llm = steered
    expected, base = hf_greedy(model, tokenizer, head), hf_greedy(model, tokenizer)
    assert expected != base, "the planted head changes nothing: the test could not fail"
    set_steering(llm, True)
    steering_stats(llm, reset=True)
    assert vllm_greedy(llm, tokenizer) == expected
    stats = steering_stats(llm)
    assert stats.steps >= NEW_TOKENS and stats.rows >= NEW_TOKENS * len(PROMPTS) and 0 < stats.changed <= stats.gated
    set_steering(llm, False)
    try:
        assert vllm_greedy(llm, tokenizer) == base
    finally:
        set_steering(llm, True)


def test_batching_does_not_mix_requests(steered):
    """Each prompt decoded in a batch of all of them, with other max lengths, equals it decoded alone."""
    _, _, tokenizer, _, llm = steered
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=tokenizer(p)["input_ids"]) for p in PROMPTS * 4]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i) for i in range(len(prompts))]
    together = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [list(llm.generate([p], [q], use_tqdm=False)[0].outputs[0].token_ids) for p, q in zip(prompts, params)]
    assert together == alone


def test_vllm_engine_writes_the_same_rollouts_and_reproduces_them(steered, tmp_path):
    folder, model, tokenizer, _, llm = steered
    decoder = VllmDecoder(llm, tokenizer, str(folder / "model"), steered=False)
    problems = [Problem(f"p{i}", q, "4", "toy") for i, q in enumerate(PROMPTS)]
    greedy = RolloutSettings(samples=1, batch_size=2, instruction="",
                             decoding=DecodingSettings(temperature=0.0, max_new_tokens=NEW_TOKENS))
    run_rollouts(decoder, tokenizer, problems, tmp_path / "greedy", greedy, progress=False)
    records = {r["problem_id"]: r for r in RolloutFolder(tmp_path / "greedy").records()}
    hf = decode_batch(model, tokenizer, [records[p.id]["prompt_ids"] for p in problems], greedy.decoding, 0)
    assert [records[p.id]["completion_ids"] for p in problems] == [c.token_ids for c in hf]
    assert [records[p.id]["completion"] for p in problems] == [c.text for c in hf]

    sampled = RolloutSettings(samples=3, batch_size=4, instruction="", seed=5,
                              decoding=DecodingSettings(temperature=1.0, max_new_tokens=NEW_TOKENS))
    run_rollouts(decoder, tokenizer, problems, tmp_path / "sampled", sampled, progress=False)
    store = RolloutFolder(tmp_path / "sampled").records_path
    first = {(r["problem_id"], r["sample"]): r["completion_ids"] for r in RolloutFolder(store.parent).records()}
    assert len(set(map(tuple, first.values()))) > len(problems), "samples of a problem are all the same"
    lines = store.read_text().splitlines(keepends=True)
    store.write_text("".join(lines[:5]) + lines[5][:20])  # what a kill -9 leaves: a partial last line
    run_rollouts(decoder, tokenizer, problems, tmp_path / "sampled", sampled, progress=False)
    again = {(r["problem_id"], r["sample"]): r["completion_ids"] for r in RolloutFolder(store.parent).records()}
    assert again == first, "a resumed run did not reproduce its samples"
    with pytest.raises(ValueError, match="engine"):  # the store was written by vLLM: hf may not complete it
        run_rollouts(model, tokenizer, problems, tmp_path / "sampled", sampled, progress=False)


def test_refusals_before_any_engine_starts(steered, tmp_path):
    folder, model, tokenizer, head, _ = steered
    other, _ = save_model(tmp_path / "other", "llama", seed=9)
    with pytest.raises(HeadMismatchError, match="fingerprint"):
        steered_llm(str(tmp_path / "other"), str(folder / "head"), **ENGINE)
    with pytest.raises(SteerError, match="tensor_parallel_size=1"):
        steered_llm(str(folder / "model"), str(folder / "head"), tensor_parallel_size=2)
    with pytest.raises(SteerError, match="speculative"):
        steered_llm(str(folder / "model"), str(folder / "head"), speculative_config={"method": "ngram"})
    neox = transformers.GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=2)
    AutoModelForCausalLM.from_config(neox).save_pretrained(tmp_path / "neox")
    with pytest.raises(SteerError, match="supports"):
        steered_llm(str(tmp_path / "neox"), head, **ENGINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`steer serve` on a free local port with the tiny Llama and its planted head; stopped after the module."""
    folder = tmp_path_factory.mktemp("serve")
    model, tokenizer = save_model(folder / "model", "llama")
    head = planted_head(model, folder / "head")
    template = folder / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}=")
    port = free_port()
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "steer", "serve", "-m", str(folder / "model"), "--head", str(folder / "head"),
         "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
         "--kv-cache-memory-bytes", str(256 << 20), "--chat-template", str(template), "--served-model-name", "tiny"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 240
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                log.close()
                raise RuntimeError(
                    f"steer serve did not come up:\n{(folder / 'server.log').read_text()[-3000:]}") from None
            time.sleep(1)
    yield port, model, tokenizer, head, folder
    process.terminate()
    process.wait(timeout=60)
    log.close()


def test_serve_answers_completions_and_chat_steered(server):
    port, model, tokenizer, head, folder = server
    assert "steering head" in (folder / "server.log").read_text(), "the server did not log the head it loaded"
    expected = tokenizer.decode(hf_greedy(model, tokenizer, head)[0], skip_special_tokens=True)
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0}
    assert post(port, "/v1/completions", body)["choices"][0]["text"] == expected
    chat = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[0][:-1]}], "max_tokens": NEW_TOKENS,
            "temperature": 0}
    assert post(port, "/v1/chat/completions", chat)["choices"][0]["message"]["content"] == expected


def test_serve_under_load_answers_each_request_as_alone(server):
    port = server[0]
    bodies = [{"model": "tiny", "prompt": PROMPTS[i % len(PROMPTS)] + "x" * (i % 7), "max_tokens": 3 + i % 11,
               "temperature": 0} for i in range(32)]
    alone = [post(port, "/v1/completions", body)["choices"][0]["text"] for body in bodies]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda body: post(port, "/v1/completions", body)["choices"][0]["text"], bodies))
    assert together == alone


def test_eval_engine_vllm_matches_hf(tmp_path):
    folder = tmp_path
    model, tokenizer = save_model(folder / "model", "llama")
    planted_head(model, folder / "head")
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "question": q, "answer": "4"}) + "\n"
                            for i, q in enumerate(PROMPTS)))
    outputs = {}
    for engine in ("hf", "vllm"):
        args = ["eval", "-m", str(folder / "model"), "-d", str(data), "-o", str(folder / engine), "--head",
                str(folder / "head"), "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS), "--instruction", "",
                "--engine", engine, "--dtype", "float32", "--json"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (folder / engine / "predictions.jsonl").read_text().splitlines()]
        outputs[engine] = {(r["problem_id"], r["arm"]): (r["completion"], r["gated"], r["changed"]) for r in records}
    assert outputs["vllm"] == outputs["hf"], "completions or their per-sequence steering counts differ"
    assert any(outputs["hf"][p, "steered"][0] != outputs["hf"][p, "base"][0] for p, _ in outputs["hf"])
    assert all(outputs["hf"][p, "steered"][1] > 0 for p, _ in outputs["hf"])
