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
from pathlib import Path

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

from steer.integrations.vllm import (  # noqa: E402
    SEQUENCE_COUNTER,
    SEQUENCE_KEY,
    cpu_prefill_defaults,
    models,
    register,
    set_steering,
    set_strength,
    steered_llm,
    steering_stats,
)
from steer.integrations.vllm.decoding import VllmDecoder  # noqa: E402
from steer.integrations.vllm.load import MALFORMED, LoadRequest, mixed_requests, run_load, send  # noqa: E402
from steer.integrations.vllm.worker import SequenceCounter  # noqa: E402

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


def test_strength_is_set_in_every_worker_as_steer_generate_reads_it(steered):
    folder, model, tokenizer, head, llm = steered
    weaker = CorrectionHead.from_pretrained(folder / "head")
    weaker.scale = 0.25
    expected = hf_greedy(model, tokenizer, weaker)
    assert expected != hf_greedy(model, tokenizer, head), "the strength changes nothing: the test could not fail"
    try:
        set_strength(llm, 0.25)
        assert vllm_greedy(llm, tokenizer) == expected
        set_strength(llm, 0.0)
        assert vllm_greedy(llm, tokenizer) == hf_greedy(model, tokenizer)
    finally:
        set_strength(llm, head.scale)
    with pytest.raises(ValueError, match="strength"):
        set_strength(llm, -1.0)


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


def test_seeded_sampling_of_prompts_past_a_steps_token_budget(steered):
    """64 seeded, sampled prompts of about 200 tokens each (12,800 prompt tokens, three times the CPU's default step
    budget of 4096, which would prefill some of them in chunks): every one decodes, as it does alone."""
    folder, _, tokenizer, _, llm = steered
    config = llm.llm_engine.vllm_config.scheduler_config
    prompts = [tokenizer("word " * 40 + str(i))["input_ids"] for i in range(64)]
    assert sum(map(len, prompts)) > 3 * config.max_num_batched_tokens, "the prompts would fit in one step"
    decoder = VllmDecoder(llm, tokenizer, str(folder / "model"))
    settings = DecodingSettings(temperature=1.0, max_new_tokens=6)
    together = decoder.decode(prompts, settings, seeds=list(range(64)))
    assert len(set(tuple(c.token_ids) for c in together)) > 1
    for i in (0, 31, 63):
        assert decoder.decode([prompts[i]], settings, seeds=[i])[0].token_ids == together[i].token_ids


def test_cpu_prefill_defaults_keep_what_the_user_set(tmp_path):
    save_model(tmp_path / "model", "llama")
    model = str(tmp_path / "model")
    assert cpu_prefill_defaults(model, {"max_model_len": 300}) == {"enable_chunked_prefill": False,
                                                                    "max_num_batched_tokens": 4096}
    assert cpu_prefill_defaults(model, {"max_model_len": 9000}) == {"enable_chunked_prefill": False,
                                                                     "max_num_batched_tokens": 9000}
    assert cpu_prefill_defaults(model, {}) == {"enable_chunked_prefill": False, "max_num_batched_tokens": 4096}
    assert cpu_prefill_defaults(model, {"enable_chunked_prefill": True}) == {}
    assert cpu_prefill_defaults(model, {"max_num_batched_tokens": 512}) == {}


def test_serve_arguments_add_the_steering_parts_and_keep_what_the_user_set(tmp_path):
    """vLLM's server parser gives some options a non-None default (`worker_extension_cls=""`): only what the user
    typed may replace what a steered engine needs (the extension that `GET /steer/stats` calls)."""
    from steer.integrations.vllm import SEQUENCE_COUNTER, WORKER_EXTENSION
    from steer.integrations.vllm.serve import server_arguments

    model, _ = save_model(tmp_path / "model", "llama")
    planted_head(model, tmp_path / "head")
    args = server_arguments(str(tmp_path / "model"), str(tmp_path / "head"), "127.0.0.1", 8000, [])
    assert args.worker_extension_cls == WORKER_EXTENSION
    assert args.logits_processors == [SEQUENCE_COUNTER]
    assert args.enable_chunked_prefill is False and args.max_num_batched_tokens == 4096  # whole prefills on a CPU
    mine = server_arguments(str(tmp_path / "model"), str(tmp_path / "head"), "127.0.0.1", 8000,
                            ["--max-num-batched-tokens", "512", "--kv-cache-memory-bytes", str(64 << 20)])
    assert mine.max_num_batched_tokens == 512 and mine.kv_cache_memory_bytes == 64 << 20
    assert mine.worker_extension_cls == WORKER_EXTENSION


def test_sequence_counter_loads_under_both_model_runners():
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    assert _load_v2_logitsprocs_by_fqcns([SEQUENCE_COUNTER]) == [SequenceCounter]
    assert SequenceCounter in _load_logitsprocs_by_fqcns([SEQUENCE_COUNTER])


def v2_context(slots: list[int]):
    """The V2 runner's `LogitsContext` of a step whose logits rows belong to these request slots."""
    import numpy as np
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

    mapping = torch.tensor(slots)
    return LogitsContext(expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=np.array(slots),
                         expanded_local_pos=torch.zeros(len(slots), dtype=torch.long), input_ids=mapping,
                         pos=mapping, seq_lens_upper_bound_np=np.array(slots))


def test_sequence_counter_counts_by_request_slot_under_the_v2_runner(monkeypatch):
    from vllm import SamplingParams

    monkeypatch.setattr(SequenceCounter, "counts", {})
    counter = SequenceCounter(None, None)  # V2 passes (vllm_config, req_states)
    assert counter.add_request(7, SamplingParams(extra_args={SEQUENCE_KEY: "a"}))
    assert counter.add_request(3, SamplingParams(extra_args={SEQUENCE_KEY: "b"}))
    assert not counter.add_request(5, SamplingParams())
    logits = torch.zeros(3, 10)
    for gated, changed in (([True, True, False], [True, False, False]), ([True, False, True], [False, False, True])):
        monkeypatch.setattr(models, "latest_masks", (torch.tensor(gated), torch.tensor(changed)))
        assert counter.apply(logits, v2_context([7, 5, 3])) is logits  # rows 0, 1, 2 are slots 7, 5, 3
    assert SequenceCounter.counts == {"a": [2, 1], "b": [1, 1]}
    assert not counter.add_request(3, SamplingParams())  # slot 3 recycled for a request without a key
    monkeypatch.setattr(models, "latest_masks", (torch.tensor([True, True]), torch.tensor([True, True])))
    counter.apply(torch.zeros(2, 10), v2_context([3, 7]))
    assert SequenceCounter.counts == {"a": [3, 2], "b": [1, 1]}


def test_steered_models_leave_batch_sharded_sampling_off():
    """vLLM's V2 runner shards sampling across tensor-parallel ranks where a model has `compute_logits_local`, a
    path that skips `compute_logits` and the steering: a steered model must not have it."""
    from vllm.model_executor.models.llama import LlamaForCausalLM

    assert hasattr(LlamaForCausalLM, "compute_logits_local"), "vLLM's Llama no longer shards: the test checks nothing"
    steered_model = object.__new__(models.SteerLlamaForCausalLM)
    torch.nn.Module.__init__(steered_model)
    assert not hasattr(steered_model, "compute_logits_local")


def test_vllm_engine_writes_the_same_rollouts_and_reproduces_them(steered, tmp_path):
    folder, model, tokenizer, _, llm = steered
    decoder = VllmDecoder(llm, tokenizer, str(folder / "model"), steered=False)
    problems = [Problem(f"p{i}", q, "4", "toy") for i, q in enumerate(PROMPTS)]
    greedy = RolloutSettings(samples=1, batch_size=2, instruction="",
                             decoding=DecodingSettings(temperature=0.0, max_new_tokens=NEW_TOKENS))
    run_rollouts(decoder, tokenizer, problems, tmp_path / "greedy", greedy, progress=False)
    records = {r.problem_id: r for r in RolloutFolder(tmp_path / "greedy").read_records()}
    hf = decode_batch(model, tokenizer, [records[p.id].prompt_ids for p in problems], greedy.decoding, 0)
    assert [records[p.id].completion_ids for p in problems] == [c.token_ids for c in hf]
    assert [records[p.id].completion for p in problems] == [c.text for c in hf]

    sampled = RolloutSettings(samples=3, batch_size=4, instruction="", seed=5,
                              decoding=DecodingSettings(temperature=1.0, max_new_tokens=NEW_TOKENS))
    run_rollouts(decoder, tokenizer, problems, tmp_path / "sampled", sampled, progress=False)
    store = RolloutFolder(tmp_path / "sampled").records_path
    first = {r.key: r.completion_ids for r in RolloutFolder(store.parent).read_records()}
    assert len(set(map(tuple, first.values()))) > len(problems), "samples of a problem are all the same"
    lines = store.read_text().splitlines(keepends=True)
    store.write_text("".join(lines[:5]) + lines[5][:20])  # what a kill -9 leaves: a partial last line
    run_rollouts(decoder, tokenizer, problems, tmp_path / "sampled", sampled, progress=False)
    again = {r.key: r.completion_ids for r in RolloutFolder(store.parent).read_records()}
    assert again == first, "a resumed run did not reproduce its samples"
    with pytest.raises(ValueError, match="engine"):  # the store was written by vLLM: hf may not complete it
        run_rollouts(model, tokenizer, problems, tmp_path / "sampled", sampled, progress=False)


TP_SCRIPT = """
import json, sys
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from steer.integrations.vllm import steered_llm, steering_stats

if __name__ == "__main__":  # vLLM's workers start by spawning: the script must be importable without side effects
    model, head, prompts, new_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    llm = steered_llm(model, head, tensor_parallel_size=2, distributed_executor_backend="mp", dtype="float32",
                      enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=128 << 20, seed=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                           SamplingParams(temperature=0.0, max_tokens=new_tokens), use_tqdm=False)
    stats = steering_stats(llm)
    print("RESULT", json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                                "gated": stats.gated, "changed": stats.changed}))
"""


def test_tensor_parallel_steering_equals_one_rank_and_steer_generate(tmp_path):
    """Two tensor-parallel ranks on two CPU cores: greedy steered tokens equal `steer.generate`'s, and the steering
    counters count each row once."""
    model, tokenizer = save_model(tmp_path / "model", "llama")
    head = planted_head(model, tmp_path / "head")
    expected, base = hf_greedy(model, tokenizer, head), hf_greedy(model, tokenizer)
    assert expected != base, "the planted head changes nothing: the test could not fail"
    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # steered_llm binds one core to each rank
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "head"),
                             json.dumps(prompts), str(NEW_TOKENS)], env=env, capture_output=True, text=True,
                            timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    found = json.loads(lines[-1].removeprefix("RESULT "))
    assert found["tokens"] == expected
    steps = sum(len(tokens) for tokens in expected)  # tau = 0: every decoding step of every prompt is gated
    assert steps <= found["gated"] < 2 * steps, found


def test_two_processes_with_one_vllm_engine_each_write_the_records_of_one(tmp_path):
    """`torchrun --nproc-per-node 2 -m steer rollout --engine vllm`: two engines (one CPU core each), the job loop
    sharing the batches, the main process merging the part files: the same records as one process writes."""
    save_model(tmp_path / "model", "llama")
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "question": q, "answer": "4"}) + "\n"
                            for i, q in enumerate(PROMPTS * 2)))
    engine = ["--engine", "vllm", "--engine-arg", "enforce_eager=true", "--engine-arg", "max_model_len=256",
              "--engine-arg", f"kv_cache_memory_bytes={128 << 20}"]
    command = ["-m", "steer", "rollout", "-m", str(tmp_path / "model"), "-d", str(data), "--samples", "3",
               "--batch-size", "2", "--temperature", "1.0", "--max-new-tokens", str(NEW_TOKENS), "--instruction", "",
               "--dtype", "float32", *engine]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    records = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc-per-node", "2"])):
        result = subprocess.run([sys.executable, *launcher, *command, "-o", str(tmp_path / name)], env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        records[name] = {r.key: (r.completion_ids, r.reward) for r in RolloutFolder(tmp_path / name).read_records()}
    assert len(records["one"]) == 3 * len(PROMPTS) * 2
    assert len({ids for ids, _ in records["one"].values() for ids in [tuple(ids)]}) > len(PROMPTS)
    assert records["two"] == records["one"]
    assert not list((tmp_path / "two").glob("parts/*")), "part files were left behind"


def test_refusals_before_any_engine_starts(steered, tmp_path):
    folder, model, tokenizer, head, _ = steered
    other, _ = save_model(tmp_path / "other", "llama", seed=9)
    with pytest.raises(HeadMismatchError, match="fingerprint"):
        steered_llm(str(tmp_path / "other"), str(folder / "head"), **ENGINE)
    with pytest.raises(SteerError, match="pipeline_parallel_size=1"):
        steered_llm(str(folder / "model"), str(folder / "head"), pipeline_parallel_size=2)
    for spread in ({"nnodes": 2}, {"distributed_executor_backend": "ray"}):
        with pytest.raises(SteerError, match="other machines"):
            steered_llm(str(folder / "model"), head, **spread)
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


def get_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/steer/stats", timeout=60) as response:
        return json.loads(response.read())


def test_serve_under_mixed_load_loses_nothing(server):
    """A bounded operator's load: 160 requests at concurrency 1, 8 and 32, mixed lengths, greedy and sampled,
    streamed and not, malformed ones and clients that hang up mid-stream. Every well-formed request is answered,
    each greedy one as the same prompt decoded alone, malformed ones get a 4xx, and the steering counters add up."""
    port = server[0]
    requests = mixed_requests([p + "x" * n for p in PROMPTS for n in (0, 5, 30)], count=160, model="tiny", seed=3,
                              max_tokens=NEW_TOKENS, malformed_share=0.08, hang_up_share=0.08)
    kinds = {r.malformed for r in requests} | {r.hang_up_after for r in requests}
    assert set(MALFORMED) <= kinds and 1 in kinds, "the load lacks a kind of request: the test checks less"
    alone = {i: send(port, r.unstreamed()).text for i, r in enumerate(requests) if r.greedy}
    assert None not in alone.values(), "a greedy request alone was not answered"

    whole = [i for i, r in enumerate(requests) if r.hang_up_after is None]  # first without hang-ups: exact counts
    before = get_stats(port)
    results = {}
    for concurrency, part in zip((1, 8, 32), (whole[:20], whole[20:60], whole[60:])):
        results.update(zip(part, run_load(port, [requests[i] for i in part], concurrency)))
    after = get_stats(port)
    rest = [i for i in range(len(requests)) if i not in results]
    results.update(zip(rest, run_load(port, [requests[i] for i in rest], 32)))

    for i, request in enumerate(requests):
        result = results[i]
        if request.malformed:
            assert 400 <= result.status < 500, (request.malformed, result)
        elif request.hang_up_after is None:
            assert result.status == 200 and result.error is None and result.completion_tokens, (request, result)
            if request.greedy:
                assert result.text == alone[i], request
    generated = sum(results[i].completion_tokens for i in whole if not requests[i].malformed)
    # tau = 0: every row is a decision point; one logits row per generated token (the CPU prefills whole prompts)
    assert after["rows"] - before["rows"] == generated
    assert after["gated"] - before["gated"] == generated
    assert 0 < after["changed"] - before["changed"] <= generated
    assert send(port, LoadRequest({"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 2})).status == 200


def planted_toy_run(folder: Path) -> Path:
    """A tiny Llama in `folder/model`, a planted head in `folder/head`, the prompts as a benchmark file (returned)."""
    model, _ = save_model(folder / "model", "llama")
    planted_head(model, folder / "head")
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "question": q, "answer": "4"}) + "\n"
                            for i, q in enumerate(PROMPTS)))
    return data


def test_eval_engine_vllm_matches_hf(tmp_path):
    folder = tmp_path
    data = planted_toy_run(folder)
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


def test_tune_engine_vllm_matches_hf(tmp_path):
    """`steer tune --engine vllm` sets one steered engine's strength per arm: every strength's decodes equal the
    transformers engine's."""
    folder = tmp_path
    data = planted_toy_run(folder)
    outputs = {}
    for engine in ("hf", "vllm"):
        args = ["tune", "-m", str(folder / "model"), "-d", str(data), "-o", str(folder / engine), "--head",
                str(folder / "head"), "--max-new-tokens", str(NEW_TOKENS), "--instruction", "", "--scales",
                "0.25,1", "--engine", engine, "--dtype", "float32", "--json"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (folder / engine / "predictions.jsonl").read_text().splitlines()]
        outputs[engine] = {(r["problem_id"], r["arm"]): r["completion"] for r in records}
    assert outputs["vllm"] == outputs["hf"]
    assert {arm for _, arm in outputs["hf"]} == {"base", "x0.25", "x1"}
    assert any(outputs["hf"][p, "x1"] != outputs["hf"][p, "x0.25"] for p, _ in outputs["hf"]), "strengths agree"
