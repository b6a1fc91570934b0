"""lm-evaluation-harness model type `steer`: a Hugging Face causal LM whose decision points a correction head steers.

Importing this module registers `steer` ([`SteerLM`], a subclass of lm-eval's `HFLM`). Its `model_args` are those
of lm-eval's `hf` model plus `head` (a head folder or Hub id, required) and optional overrides `tau`, `top_k` and
`scale`. Base and steered numbers, one command each:

    python -m steer.integrations.lm_eval --model hf --model_args pretrained=M --tasks gsm8k
    python -m steer.integrations.lm_eval --model steer --model_args pretrained=M,head=H --tasks gsm8k

`python -m steer.integrations.lm_eval` is the `lm_eval` command with `steer` registered (lm-eval 0.4.13 does not
discover model types of other packages). steer also declares the entry point `steer` in the group `lm_eval.models`,
which lm-eval versions that read it discover without the import, so that there `lm_eval --model steer` works as is.

What is steered:

- `generate_until` requests decode with a [`SteeringProcessor`] ahead of lm-eval's own processing; generation
  settings that could not be steered raise [`SteeringError`] (see [`steer.generation.check_supported`]);
- `loglikelihood` and `loglikelihood_rolling` requests (multiple choice, perplexity) are scored with the steered
  distribution: at every position, the head's correction is added to the top-k logits where the base entropy
  exceeds tau, the function decoding applies at each step.

The counters of both end up in the results, under `config.steering`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import torch
from transformers import LogitsProcessorList

from steer.errors import SteerError
from steer.functional import steer_logits
from steer.generation import check_steered, check_supported
from steer.head import CorrectionHead, output_embedding
from steer.processor import SteeringError, SteeringProcessor, SteeringStats

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('steer.integrations.lm_eval needs lm-evaluation-harness: pip install "steer-lm[lm_eval]"'
                      ) from err

MODEL_TYPE = "steer"
# Scoring steers the logits of a batch in chunks of at most this many entries (float32: 256 MiB per buffer).
CHUNK_ENTRIES = 1 << 26


class SteerLMError(SteerError, ValueError):
    """Raised when the `steer` model type is given arguments it cannot steer with."""


class SteerLM(HFLM):
    """lm-eval's `HFLM` with a [`CorrectionHead`] steering generation and scoring (see the module docstring).

    Args:
        pretrained (`str` or `PreTrainedModel`): the base model, as for lm-eval's `hf` model type.
        head (`str` or [`CorrectionHead`]): the head (a folder or Hub id), made for `pretrained` (checked).
        tau (`float`, *optional*), top_k (`int`, *optional*), scale (`float`, *optional*): override the head's.
        **kwargs: the other arguments of lm-eval's `HFLM` (`device`, `dtype`, `batch_size`, ...).

    Attributes:
        generation_stats ([`SteeringStats`]): decoding steps, rows, gated and changed rows so far.
        scoring_stats ([`SteeringStats`]): scored batches (`steps`), positions (`rows`, padding included), gated
            and changed positions so far.

    Example:

    ```python
    >>> import lm_eval
    >>> import steer.integrations.lm_eval  # registers the model type `steer`
    >>> results = lm_eval.simple_evaluate(  # doctest: +SKIP
    ...     model="steer", model_args="pretrained=M,head=H", tasks=["gsm8k"])
    >>> results["config"]["steering"]["generation"]["gated_fraction"]  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        pretrained: Any,
        head: str | CorrectionHead | None = None,
        tau: float | None = None,
        top_k: int | None = None,
        scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        if head is None:
            raise SteerLMError("the `steer` model type needs a correction head: --model_args pretrained=M,head=H "
                               "(for the base model's numbers, use --model hf)")
        super().__init__(pretrained=pretrained, **kwargs)
        self.head_source = None if isinstance(head, CorrectionHead) else str(head)
        self.head = head if isinstance(head, CorrectionHead) else CorrectionHead.from_pretrained(str(head))
        if tau is not None:
            self.head.tau = float(tau)
        if top_k is not None:
            self.head.top_k = int(top_k)
        if scale is not None:
            self.head.scale = float(scale)
        self.head.check_compatible(self.model)
        self.head.to(output_embedding(self.model).device)
        self.generation_stats = SteeringStats()
        self.scoring_stats = SteeringStats()

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any):
        """lm-eval's generation, with a [`SteeringProcessor`] first among the logits processors."""
        config = check_supported(self.model, generation_kwargs)
        # as in steer.generate: in place unless generate keeps the scores as its raw logits
        with SteeringProcessor(self.model, self.head, inplace=not config.output_logits) as steering:
            processors = LogitsProcessorList([steering, *(generation_kwargs.pop("logits_processor", None) or [])])
            output = super()._model_generate(context, max_length, stop, logits_processor=processors,
                                             **generation_kwargs)
            stats = steering.stats
        check_steered(stats, output, {"input_ids": context})
        self.generation_stats = _plus(self.generation_stats, stats)
        return output

    @torch.no_grad()
    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """lm-eval's forward pass for scoring, with the steered logits `[batch, sequence, vocab]` at every position."""
        captured: list[torch.Tensor] = []
        hook = self.model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: captured.append(args[0].detach()))
        try:
            logits = super()._model_call(inps, attn_mask, labels)
        finally:
            hook.remove()
        if len(captured) != 1 or captured[0].shape[:-1] != logits.shape[:-1]:
            raise SteeringError(f"scoring ran the output embedding {len(captured)} times for one batch: steering "
                                "cannot tell which hidden states the logits came from")
        return self._steer_scores(logits, captured[0])

    def _steer_scores(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Steer `logits` `[..., vocab]` from their final hidden states `[..., hidden]`, in chunks of positions."""
        flat_logits, flat_hidden = logits.reshape(-1, logits.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
        weight = output_embedding(self.model).to(logits.device)
        out = torch.empty_like(flat_logits)
        rows = max(1, CHUNK_ENTRIES // flat_logits.shape[-1])
        gated = changed = 0
        for start in range(0, flat_logits.shape[0], rows):
            chunk = slice(start, start + rows)
            correction = self.head.project(flat_hidden[chunk]).to(logits.device)
            steered = steer_logits(flat_logits[chunk], correction, weight, self.head.top_k, self.head.tau)
            out[chunk] = steered.logits
            gated += int(steered.gated.sum())
            changed += int(steered.changed.sum())
        self.scoring_stats = _plus(self.scoring_stats, SteeringStats(1, flat_logits.shape[0], gated, changed))
        return out.view_as(logits)

    def get_model_info(self) -> dict:
        """lm-eval's model information, plus the head and the steering counters (`steering`)."""
        return {
            **super().get_model_info(),
            "steering": {
                "head": self.head_source,
                "tau": self.head.tau,
                "top_k": self.head.top_k,
                "scale": self.head.scale,
                "generation": _report(self.generation_stats),
                "scoring": _report(self.scoring_stats),
            },
        }


def _plus(a: SteeringStats, b: SteeringStats) -> SteeringStats:
    return SteeringStats(a.steps + b.steps, a.rows + b.rows, a.gated + b.gated, a.changed + b.changed)


def _report(stats: SteeringStats) -> dict:
    return {**asdict(stats), "gated_fraction": stats.gated_fraction, "changed_fraction": stats.changed_fraction}


def main(argv: list[str] | None = None) -> None:
    """The `lm_eval` command with the `steer` model type registered: `python -m steer.integrations.lm_eval ...`.

    Args:
        argv (`list[str]`, *optional*): the command's arguments (defaults to `sys.argv[1:]`).
    """
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    # Run as a script, this file is `__main__`; the model type is registered by the importable module.
    from steer.integrations.lm_eval import main as _main

    _main()
else:
    register_model(MODEL_TYPE)(SteerLM)
