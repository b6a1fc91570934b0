"""vLLM as the decoding engine of `steer rollout` and `steer eval` (`--engine vllm`): a [`Decoder`] over a
`vllm.LLM`, steered or not.

Each prompt is decoded with its own seed (`SamplingParams(seed=...)`, derived from the run's seed, the problem and
the sample), so a sample is the same whatever batch it lands in, and a resumed run reproduces what it redoes. The
run folders are those of the transformers engine; the run's settings record the engine, so that a run cannot
resume on the other one. A steered sequence's gated and changed steps are counted in the workers
([`steer.integrations.vllm.worker.SequenceCounter`]) and read back after each batch.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from steer.integrations.vllm import SEQUENCE_KEY, set_steering, set_strength
from steer.pipeline.decoding import Completion
from steer.pipeline.distributed import Workers
from steer.settings import DecodingSettings

if TYPE_CHECKING:
    from vllm import LLM


@dataclass
class VllmDecoder:
    """Decodes through `llm`; with `steered` set, switches the steered engine's steering on or off first (one
    steered engine serves both arms of an evaluation).

    Args:
        llm (`vllm.LLM`): a plain engine, or one from [`steered_llm`].
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer (texts are decoded as the transformers engine
            decodes them).
        name_or_path (`str`): the model, as recorded in the run's settings.
        steered (`bool`, *optional*): steering on or off for this decoder's batches; `None` leaves the engine as is.
        extra_args (`dict`, *optional*): added to every request's `SamplingParams.extra_args`, where the engine's
            custom logits processors read per-request settings.
        strength (`float`, *optional*): the head's strength for this decoder's batches (a steered engine's
            [`set_strength`]); `None` leaves the engine's as is.
    """

    llm: LLM
    tokenizer: PreTrainedTokenizerBase
    name_or_path: str
    steered: bool | None = None
    extra_args: dict[str, Any] | None = None
    strength: float | None = None

    def decode(self, prompt_ids: Sequence[Sequence[int]], settings: DecodingSettings,
               seeds: Sequence[int]) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.steered is not None:
            set_steering(self.llm, self.steered)
        if self.strength is not None:
            set_strength(self.llm, self.strength)
        greedy = settings.temperature == 0
        keys = [f"{uuid.uuid4().hex}-{i}" for i in range(len(prompt_ids))] if self.steered else None
        params = [SamplingParams(temperature=0.0 if greedy else settings.temperature,
                                 top_p=1.0 if greedy else settings.top_p, max_tokens=settings.max_new_tokens,
                                 seed=seed % 2**63, extra_args=self._extra_args(keys[i] if keys else None))
                  for i, seed in enumerate(seeds)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], params,
                                    use_tqdm=False)
        counts = self._sequence_counts(keys) if keys else {}
        return [self._completion(output.outputs[0], counts.get(key, (0, 0)) if keys else (0, 0))
                for output, key in zip(outputs, keys or [None] * len(outputs))]

    def _extra_args(self, key: str | None) -> dict[str, Any] | None:
        """A request's `extra_args`: this decoder's, and the key its steered steps are counted under."""
        extra = {**(self.extra_args or {}), **({SEQUENCE_KEY: key} if key else {})}
        return extra or None

    def _sequence_counts(self, keys: list[str]) -> dict[str, tuple[int, int]]:
        """Gated and changed steps per sequence, summed over the workers."""
        counts: dict[str, list[int]] = {}
        for worker in self.llm.collective_rpc("steer_sequence_counts", args=(keys,)):
            for key, (gated, changed) in worker.items():
                total = counts.setdefault(key, [0, 0])
                total[0] += gated
                total[1] += changed
        return {key: (gated, changed) for key, (gated, changed) in counts.items()}

    def _completion(self, output: Any, counts: tuple[int, int]) -> Completion:
        token_ids = list(output.token_ids)
        finish = "stop" if output.finish_reason == "stop" else "length"
        return Completion(self.tokenizer.decode(token_ids, skip_special_tokens=True), token_ids, finish,
                          gated=counts[0], changed=counts[1])

    def run_settings(self) -> dict[str, Any]:
        return {"engine": "vllm", **({"extra_args": self.extra_args} if self.extra_args else {})}


def vllm_decoders(model: str, tokenizer: PreTrainedTokenizerBase, head: str | None, dtype: str, seed: int,
                  workers: Workers = Workers(), **llm_kwargs: Any) -> tuple[VllmDecoder, VllmDecoder | None]:
    """One engine for `model`, and its decoders: the base model's, and with `head` the steered model's (the same
    steered engine with steering off, then on).

    Args:
        model (`str`), tokenizer (`PreTrainedTokenizerBase`): the model and its tokenizer.
        head (`str`, *optional*): a head folder or Hub id.
        dtype (`str`): `"auto"` (float32 on a CPU, as `steer.models` loads models; vLLM's choice elsewhere) or a
            torch dtype name.
        seed (`int`): the engine's seed.
        workers ([`Workers`], *optional*): this process's place when several share a job (`accelerate launch`,
            `torchrun`): its engine is pinned to its own device (see [`steer.integrations.vllm.engine_environment`]).
        **llm_kwargs: more `vllm.LLM` arguments.
    """
    from steer.integrations.vllm import engine_defaults, engine_environment, require_vllm, steered_llm

    require_vllm()
    from vllm import LLM
    from vllm.platforms import current_platform

    if dtype == "auto" and current_platform.is_cpu():
        dtype = "float32"
    kwargs = {"dtype": dtype, "seed": seed, **llm_kwargs}
    if head is None:
        with engine_environment(workers, ranks=int(kwargs.get("tensor_parallel_size") or 1)):
            return VllmDecoder(LLM(model=model, **engine_defaults(model, kwargs)), tokenizer, model), None
    llm = steered_llm(model, head, workers=workers, **kwargs)
    return VllmDecoder(llm, tokenizer, model, steered=False), VllmDecoder(llm, tokenizer, model, steered=True)


