"""Per-step traces of a decode: what the steering gate read and what steering did at every generated token.

[`TracingProcessor`] wraps the logits processor of a decoding arm (or none, for the base model). At every step and
for every row it records, before the wrapped processor runs, the entropy of the scores it is handed (the base
distribution the steering gate reads) and the base top-k candidates with their probabilities; after the wrapped
processor has run, the probabilities of those same candidates under the processed scores. The wrapped processor's
row masks give the gated and changed steps. It returns what the wrapped processor returns, so tracing never changes
a decode.

[`Tracer`] is a [`ProcessorFactory`] for [`decode_batch`]: it builds one [`TracingProcessor`] per batch and cuts its
recordings into one [`StepTrace`] per completion, the format `steer eval --trace` stores
(:mod:`steer.pipeline.folders.predictions`, which owns it) and `steer view` renders (:mod:`steer.analysis.view`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from steer.pipeline.decoding import Completion, ProcessorFactory, RecordingProcessor
from steer.pipeline.folders.predictions import StepTrace
from steer.reference import entropy_topk

DEFAULT_TRACE_TOP_K = 5
"""Candidates recorded per step when no head says how many it re-scores."""


class TracingProcessor:
    r"""A [`RecordingProcessor`] that records per-step entropy and top-k around another one (or none).

    Args:
        inner ([`RecordingProcessor`], *optional*): the processor whose steps are traced (for example a
            [`SteeringProcessor`]); without one, the scores pass through unchanged.
        top_k (`int`, defaults to 5): base candidates recorded per step.

    Example:

    ```python
    >>> tracing = TracingProcessor(SteeringProcessor(model, head, record_rows=True), top_k=head.top_k)  # doctest: +SKIP
    >>> out = model.generate(**inputs, logits_processor=LogitsProcessorList([tracing]))  # doctest: +SKIP
    >>> traces = tracing.traces([row for row in out[:, inputs["input_ids"].shape[1]:].tolist()])  # doctest: +SKIP
    ```
    """

    def __init__(self, inner: RecordingProcessor | None = None, top_k: int = DEFAULT_TRACE_TOP_K) -> None:
        if top_k < 1:
            raise ValueError(f"a trace needs at least one candidate per step; got top_k={top_k}")
        self.inner = inner
        self.top_k = top_k
        self._entropy: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._base: list[torch.Tensor] = []
        self._steered: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = min(self.top_k, scores.shape[-1])
        stats = entropy_topk(scores, k)  # before the inner processor, which may steer `scores` in place
        base = (stats.values - torch.logsumexp(scores.float(), dim=-1, keepdim=True)).exp()
        out = self.inner(input_ids, scores) if self.inner is not None else scores
        if self.inner is None:
            steered = base
        else:
            processed = out.float()
            steered = (processed.gather(-1, stats.indices) - torch.logsumexp(processed, dim=-1, keepdim=True)).exp()
        self._entropy.append(stats.entropy)
        self._ids.append(stats.indices.int())
        self._base.append(base.half())
        self._steered.append(steered.half())
        return out

    @property
    def steps(self) -> int:
        return len(self._entropy)

    def row_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The wrapped processor's `(gated, changed)` masks, all `False` without one."""
        if self.inner is not None:
            return self.inner.row_masks()
        rows = self._entropy[0].shape[0] if self._entropy else 0
        empty = torch.zeros(rows, self.steps, dtype=torch.bool)
        return empty, empty.clone()

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()

    def traces(self, token_ids: Sequence[Sequence[int]]) -> list[StepTrace]:
        """One [`StepTrace`] per row, cut to that row's generated tokens `token_ids[row]` (as in
        [`Completion.token_ids`]). Rows are taken in order: beam search, which reorders them, is not traced."""
        if not self._entropy:
            raise RuntimeError("the tracing processor was never called: nothing was decoded through it")
        entropy, ids = torch.stack(self._entropy, 1).cpu(), torch.stack(self._ids, 1).cpu()
        base, steered = torch.stack(self._base, 1).cpu(), torch.stack(self._steered, 1).cpu()
        gated, changed = self.row_masks()
        if len(token_ids) != entropy.shape[0]:
            raise ValueError(f"{len(token_ids)} sequences for a trace of {entropy.shape[0]} rows")
        traces = []
        for row, tokens in enumerate(token_ids):
            steps = len(tokens)
            if steps > self.steps:
                raise ValueError(f"row {row} has {steps} tokens but only {self.steps} steps were traced")
            traces.append(StepTrace(
                tokens=torch.tensor(list(tokens), dtype=torch.int32), entropy=entropy[row, :steps].clone(),
                gated=gated[row, :steps].clone(), changed=changed[row, :steps].clone(),
                topk_ids=ids[row, :steps].clone(), base_probs=base[row, :steps].clone(),
                steered_probs=steered[row, :steps].clone(),
            ))
        return traces


class Tracer:
    """A [`ProcessorFactory`] that wraps another (or none) in a [`TracingProcessor`] per batch, and keeps the
    latest, so that the batch's completions can be traced after [`decode_batch`].

    Args:
        factory ([`ProcessorFactory`], *optional*): the arm's own processor factory (`None` for the base model).
        top_k (`int`, defaults to 5): base candidates recorded per step.

    Example:

    ```python
    >>> tracer = Tracer(steering(model, head), top_k=head.top_k)  # doctest: +SKIP
    >>> completions = decode_batch(model, tokenizer, ids, settings, seed, tracer)  # doctest: +SKIP
    >>> traces = tracer.traces(completions)  # doctest: +SKIP
    ```
    """

    def __init__(self, factory: ProcessorFactory | None = None, top_k: int = DEFAULT_TRACE_TOP_K) -> None:
        self.factory = factory
        self.top_k = top_k
        self.latest: TracingProcessor | None = None

    def __call__(self, batch: dict[str, torch.Tensor]) -> TracingProcessor:
        inner = self.factory(batch) if self.factory is not None else None
        self.latest = TracingProcessor(inner, self.top_k)
        return self.latest

    def traces(self, completions: Sequence[Completion]) -> list[StepTrace]:
        """The traces of the completions of the latest batch, in their order."""
        if self.latest is None:
            raise RuntimeError("the tracer has not decoded a batch yet")
        return self.latest.traces([c.token_ids for c in completions])


def token_texts(tokenizer: PreTrainedTokenizerBase, traces: Iterable[StepTrace]) -> dict[int, str]:
    """The text of every token the traces name (generated tokens and candidates), each decoded on its own."""
    ids: set[int] = set()
    for trace in traces:
        ids.update(trace.tokens.tolist())
        ids.update(trace.topk_ids.flatten().tolist())
    return {token: tokenizer.decode([token]) for token in sorted(ids)}
