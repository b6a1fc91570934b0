"""`steer view`: a self-contained HTML page that shows where steering acted, token by token.

A page is made from [`StepTrace`]s (:mod:`steer.pipeline.folders.predictions`), either of a `steer eval --trace` run
([`view_from_run`]) or of one prompt decoded base and steered side by side ([`view_from_prompt`]). Each generated
token is coloured by its base entropy; the steps where the head's gate opened are underlined, those where steering
changed the top-1 are outlined, and hovering or clicking a token shows the base top-k candidates with their base and
steered probabilities. Long runs are paginated and can be filtered (failed only, changed only).

The page is one file: its CSS and script are inline, its data is embedded as JSON, nothing is fetched, and it opens
from disk in any browser. The template is `view.html` beside this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.files import atomic_write_text
from steer.head import CorrectionHead
from steer.pipeline.decoding import DecodingSettings, decode_batch, steering
from steer.pipeline.folders.predictions import PredictionFolder, PredictionRecord, StepTrace
from steer.pipeline.prompts import build_prompt, encode_prompt
from steer.pipeline.tracing import Tracer, token_texts

TEMPLATE = "view.html"
DATA_MARKER = "__STEER_VIEW_DATA__"
PROBABILITY_SCALE = 10_000
"""Probabilities are embedded as integers in units of 1/`PROBABILITY_SCALE`, entropies in millinats."""


@dataclass(frozen=True)
class ArmView:
    """One arm's decode of an item.

    Attributes:
        name (`str`): the arm (`"base"`, `"steered"`, ...).
        trace ([`StepTrace`]): its per-step trace.
        tau (`float`, *optional*): the arm's gate threshold (`None` for an arm without a head).
        correct (`bool`, *optional*), answer (`str`, *optional*), finish_reason (`str`, *optional*): from the
            evaluation record, where there is one.
    """

    name: str
    trace: StepTrace
    tau: float | None = None
    correct: bool | None = None
    answer: str | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class ViewItem:
    """One problem (or prompt) with its decodes, shown side by side.

    Attributes:
        label (`str`): what the item is (benchmark, problem id, sample).
        question (`str`): the question or prompt.
        gold (`str`, *optional*): the gold answer.
        arms (`list[ArmView]`): its decodes, base first.
    """

    label: str
    question: str
    gold: str | None
    arms: list[ArmView]


@dataclass(frozen=True)
class ViewPage:
    """Everything a page shows.

    Attributes:
        title (`str`), source (`str`): the page's title and where its data came from.
        items (`list[ViewItem]`): in display order.
        tokens (`dict[int, str]`): the text of every token the traces refer to.
        tau (`float`, *optional*): the head's gate threshold, marked on the entropy scale.
    """

    title: str
    source: str
    items: list[ViewItem]
    tokens: dict[int, str]
    tau: float | None = None

    @property
    def steps(self) -> int:
        return sum(arm.trace.steps for item in self.items for arm in item.arms)

    @property
    def changed(self) -> int:
        return sum(int(arm.trace.changed.sum()) for item in self.items for arm in item.arms)


@dataclass(frozen=True)
class ViewResult:
    """What `steer view` wrote.

    Attributes:
        out (`Path`): the HTML file.
        items (`int`): problems (or prompts) on the page; steps (`int`): traced tokens over all arms;
        changed (`int`): steps where steering changed the top-1; bytes (`int`): the file's size.
    """

    out: Path
    items: int
    steps: int
    changed: int
    bytes: int
    source: str = field(default="")


def view_from_run(path: str | os.PathLike, limit: int | None = None) -> ViewPage:
    """The page of a `steer eval --trace` folder: one item per (benchmark, problem, sample) that has a trace, in
    the order of `predictions.jsonl`, its arms side by side.

    Args:
        path (`str` or `os.PathLike`): the evaluation folder.
        limit (`int`, *optional*): keep only the first `limit` items.

    Raises:
        [`TraceError`]: the folder has no traces (run `steer eval --trace`).
    """
    folder = PredictionFolder(path)
    traces = folder.traces()
    groups: dict[tuple, list[PredictionRecord]] = {}
    for record in folder.records():
        if record.key in traces.by_key:
            groups.setdefault((record.benchmark, record.problem_id, record.sample), []).append(record)
    items = []
    for (benchmark, problem, sample), records in list(groups.items())[:limit]:
        arms = []
        for record in records:
            recorded = traces.by_key[record.key]
            arms.append(ArmView(record.arm, recorded.trace, recorded.tau, record.correct, record.answer,
                                record.finish_reason))
        question = traces.by_key[records[0].key].question
        items.append(ViewItem(f"{benchmark} · {problem} · sample {sample}", question, records[0].gold, arms))
    taus = [arm.tau for item in items for arm in item.arms if arm.tau is not None]
    return ViewPage(f"steer view: {Path(path).name}", f"steer eval run {Path(path)}", items, traces.tokens,
                    taus[0] if taus else None)


def view_from_prompt(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    head: CorrectionHead,
    prompt: str,
    settings: DecodingSettings = DecodingSettings(temperature=0, max_new_tokens=256),
    instruction: str = "",
    seed: int = 0,
) -> ViewPage:
    """The page of one prompt, decoded by the base model and steered by `head` (greedy by default), side by side.

    Args:
        model (`PreTrainedModel`), tokenizer (`PreTrainedTokenizerBase`): the base model.
        head ([`CorrectionHead`]): the head to steer with; its `top_k` candidates are recorded per step.
        prompt (`str`): the question, put in the tokenizer's chat template as in `steer eval` ([`build_prompt`]).
        settings ([`DecodingSettings`], defaults to greedy, 256 new tokens): how to decode.
        instruction (`str`, defaults to none): appended to the prompt.
        seed (`int`, defaults to 0): seeds sampling (both arms draw the same numbers).
    """
    ids = [encode_prompt(tokenizer, build_prompt(tokenizer, prompt, instruction))]
    arms = []
    for name, factory, tau in (("base", None, None), ("steered", steering(model, head), head.tau)):
        tracer = Tracer(factory, head.top_k)
        completions = decode_batch(model, tokenizer, ids, settings, seed, tracer)
        arms.append(ArmView(name, tracer.traces(completions)[0], tau, finish_reason=completions[0].finish_reason))
    tokens = token_texts(tokenizer, [arm.trace for arm in arms])
    return ViewPage("steer view", f"{model.name_or_path}, steered by a head (tau {head.tau:.3g} nats, top-k "
                    f"{head.top_k})", [ViewItem("prompt", prompt, None, arms)], tokens, head.tau)


def page_data(page: ViewPage) -> dict[str, Any]:
    """The JSON the page embeds: arrays per arm (token ids, entropies in millinats, flags with bit 0 gated and bit
    1 changed, flattened top-k ids and probabilities in units of 1/`PROBABILITY_SCALE`), token texts once."""
    used = {token for item in page.items for arm in item.arms
            for token in (*arm.trace.tokens.tolist(), *arm.trace.topk_ids.flatten().tolist())}
    return {
        "title": page.title,
        "source": page.source,
        "tau": page.tau,
        "emax": entropy_scale_max([arm.trace for item in page.items for arm in item.arms], page.tau),
        "vocab": {str(token): text for token, text in page.tokens.items() if token in used},
        "items": [
            {"label": item.label, "question": item.question, "gold": item.gold,
             "arms": [_arm_data(arm) for arm in item.arms]}
            for item in page.items
        ],
    }


def entropy_scale_max(traces: Sequence[StepTrace], tau: float | None) -> float:
    """The top of the colour scale (nats): the 99th percentile of the entropies, and at least 1.5 tau."""
    values = torch.cat([trace.entropy.float() for trace in traces]) if traces else torch.zeros(0)
    values = values[values.isfinite()]
    top = float(values.quantile(0.99)) if values.numel() else 1.0
    return round(max(top, 1.5 * tau if tau is not None else 0.0, 1e-3), 3)


def _arm_data(arm: ArmView) -> dict[str, Any]:
    trace = arm.trace
    flags = trace.gated.to(torch.uint8) | (trace.changed.to(torch.uint8) << 1)
    entropy = torch.nan_to_num(trace.entropy.float(), nan=0.0, posinf=0.0)
    return {
        "name": arm.name, "tau": arm.tau, "correct": arm.correct, "answer": arm.answer, "finish": arm.finish_reason,
        "k": trace.top_k,
        "tok": trace.tokens.tolist(),
        "ent": (entropy * 1000).round().int().tolist(),
        "flag": flags.tolist(),
        "ids": trace.topk_ids.flatten().tolist(),
        "p": _probabilities(trace.base_probs),
        "q": _probabilities(trace.steered_probs),
    }


def _probabilities(probs: torch.Tensor) -> list[int]:
    return (torch.nan_to_num(probs.float(), nan=0.0) * PROBABILITY_SCALE).round().int().flatten().tolist()


def render_html(page: ViewPage) -> str:
    """The page as one HTML document (inline CSS and script, data embedded as JSON)."""
    template = resources.files("steer.analysis").joinpath(TEMPLATE).read_text(encoding="utf-8")
    data = json.dumps(page_data(page), ensure_ascii=False, separators=(",", ":"))
    # Inside <script>, only "</script" (or "<!--") could end the block early; JSON may spell "<" as \u003c.
    data = data.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    title = page.title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return template.replace("__STEER_VIEW_TITLE__", title).replace(DATA_MARKER, data)


def write_view(page: ViewPage, out: str | os.PathLike) -> ViewResult:
    """Render `page` into the file `out` (written atomically)."""
    out = Path(out)
    html = render_html(page)
    atomic_write_text(out, html)
    return ViewResult(out, len(page.items), page.steps, page.changed, len(html.encode("utf-8")), page.source)


def embedded_data(html: str) -> dict[str, Any]:
    """The data embedded in a page written by [`render_html`] (for tests and tools)."""
    start = html.index('<script id="steer-data" type="application/json">')
    start = html.index(">", start) + 1
    end = html.index("</script>", start)
    return json.loads(html[start:end])
