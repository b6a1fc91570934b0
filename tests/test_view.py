"""`steer view` and `steer eval --trace`: the per-step trace is what the steering gate saw and did, the trace files
round-trip, the page embeds them, and the page works in a real browser (skipped where none is installed)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from click.testing import CliRunner

from steer import CorrectionHead
from steer.analysis.view import ArmView, ViewItem, ViewPage, embedded_data, render_html, view_from_prompt, view_from_run
from steer.cli.main import main
from steer.pipeline.decoding import DecodingSettings, decode_batch
from steer.pipeline.evaluation import EvalSettings, evaluate
from steer.pipeline.folders.predictions import PredictionFolder, StepTrace, TraceError
from steer.pipeline.problems import load_problems
from steer.pipeline.tracing import Tracer
from steer.processor import SteeringProcessor
from steer.reference import entropy_topk

GREEDY = DecodingSettings(temperature=0, max_new_tokens=16)


def test_trace_is_what_the_gate_saw_and_does_not_change_the_decode(model_and_head, tokenizer):
    model, head = model_and_head
    prompts = [tokenizer("Q: 12+30?")["input_ids"], tokenizer("Q: 75+16?")["input_ids"]]  # equal lengths: no padding
    plain: list[SteeringProcessor] = []

    def factory(batch):
        plain.append(SteeringProcessor(model, head, record_rows=True))
        return plain[-1]

    untraced = decode_batch(model, tokenizer, prompts, GREEDY, seed=0, processor=factory)
    gated, changed = plain[-1].row_masks()
    tracer = Tracer(factory, top_k=6)
    completions = decode_batch(model, tokenizer, prompts, GREEDY, seed=0, processor=tracer)
    traces = tracer.traces(completions)

    assert [c.token_ids for c in completions] == [c.token_ids for c in untraced]
    assert sum(int(t.gated.sum()) for t in traces) > 0 and sum(int(t.changed.sum()) for t in traces) > 0
    for row, (prompt, completion, trace) in enumerate(zip(prompts, completions, traces)):
        steps = completion.steps
        assert trace.tokens.tolist() == completion.token_ids and trace.topk_ids.shape == (steps, 6)
        assert torch.equal(trace.gated, gated[row, :steps]) and torch.equal(trace.changed, changed[row, :steps])
        # The base logits of each step, teacher-forced: steering chooses tokens, it does not change the model.
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion.token_ids])).logits[0, len(prompt) - 1 : -1]
        reference = entropy_topk(logits, 6)
        torch.testing.assert_close(trace.entropy, reference.entropy, atol=1e-4, rtol=1e-4)
        assert torch.equal(trace.topk_ids.long(), reference.indices)
        base = torch.softmax(logits.float(), -1).gather(-1, reference.indices)
        torch.testing.assert_close(trace.base_probs.float(), base, atol=2e-3, rtol=0)
        assert torch.equal(trace.gated, trace.entropy > head.tau)
        ungated = ~trace.gated
        assert torch.equal(trace.steered_probs[ungated], trace.base_probs[ungated])
        assert (trace.steered_probs[trace.changed].float().argmax(-1) != 0).all()


def test_eval_trace_round_trips_matches_records_and_leaves_them_unchanged(model_and_head, tokenizer, tmp_path,
                                                                          arithmetic_file):
    model, head = model_and_head
    problems = {"arith": load_problems(arithmetic_file, limit=4)}
    settings = EvalSettings(decoding=GREEDY, batch_size=2, instruction="")
    evaluate(model, tokenizer, problems, tmp_path / "plain", settings, head=head, progress=False)
    evaluate(model, tokenizer, problems, tmp_path / "traced", settings, head=head, progress=False, trace_top_k=3)
    shards = sorted(os.listdir(tmp_path / "traced" / "traces"))
    # Killed after the last batch's traces were written but before its records were: the batch is decoded again.
    predictions = tmp_path / "traced" / "predictions.jsonl"
    predictions.write_text("".join(predictions.read_text().splitlines(keepends=True)[:-4]))
    evaluate(model, tokenizer, problems, tmp_path / "traced", settings, head=head, progress=False, trace_top_k=3)
    assert sorted(os.listdir(tmp_path / "traced" / "traces")) == shards  # rewritten, not written twice

    folder = PredictionFolder(tmp_path / "traced")
    records = folder.records()
    assert records == PredictionFolder(tmp_path / "plain").records()
    traces = folder.traces()
    assert len(traces.by_key) == len(records) == 8
    for record in records:
        recorded = traces.by_key[record.key]
        trace = recorded.trace
        assert trace.steps == record.steps and trace.top_k == 3
        assert int(trace.gated.sum()) == record.gated and int(trace.changed.sum()) == record.changed
        assert tokenizer.decode(trace.tokens.tolist(), skip_special_tokens=True) == record.completion
        assert recorded.tau == (head.tau if record.arm == "steered" else None)
        assert recorded.question.startswith("What is")
        assert all(token in traces.tokens for token in trace.topk_ids.flatten().tolist())
    assert len(shards) == 4 and all(re.fullmatch(r"trace-[0-9a-f]+\.safetensors", name) for name in shards)


def test_view_of_a_run_embeds_its_traces_and_cli(model_and_head, tokenizer, tmp_path, arithmetic_file):
    model, head = model_and_head
    settings = EvalSettings(decoding=GREEDY, batch_size=4, instruction="")
    problems = {"arith": load_problems(arithmetic_file, limit=4)}
    evaluate(model, tokenizer, problems, tmp_path / "run", settings, head=head, progress=False, trace_top_k=4)
    page = view_from_run(tmp_path / "run")
    html = render_html(page)
    data = embedded_data(html)
    assert len(data["items"]) == 4 and [a["name"] for a in data["items"][0]["arms"]] == ["base", "steered"]
    traces = PredictionFolder(tmp_path / "run").traces().by_key
    for item in data["items"]:
        for arm in item["arms"]:
            benchmark, problem, _ = item["label"].split(" · ")
            trace = traces[benchmark, problem, arm["name"], 0].trace
            assert arm["tok"] == trace.tokens.tolist() and arm["k"] == 4
            assert arm["flag"] == (trace.gated.int() + 2 * trace.changed.int()).tolist()
            assert arm["ids"] == trace.topk_ids.flatten().tolist()
            assert arm["p"] == [round(p * 10_000) for p in trace.base_probs.float().flatten().tolist()]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "@import" not in html

    out = tmp_path / "view.html"
    result = CliRunner().invoke(main, ["view", "--run", str(tmp_path / "run"), "-o", str(out), "--limit", "2",
                                       "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["items"] == 2 and len(embedded_data(out.read_text())["items"]) == 2

    (tmp_path / "untraced").mkdir()
    evaluate(model, tokenizer, problems, tmp_path / "untraced", settings, progress=False)
    with pytest.raises(TraceError, match="steer eval --trace"):
        view_from_run(tmp_path / "untraced")
    result = CliRunner().invoke(main, ["view", "--run", str(tmp_path / "untraced"), "-o", str(out)])
    assert result.exit_code == 1 and "no traces" in result.output
    result = CliRunner().invoke(main, ["view", "-o", str(out)])
    assert result.exit_code == 2 and "--run" in result.output


def test_view_from_a_prompt_decodes_base_and_steered(model_and_head, tokenizer):
    model, head = model_and_head
    page = view_from_prompt(model, tokenizer, head, "What is 12+30?", GREEDY)
    (item,) = page.items
    base, steered = item.arms
    assert (base.name, steered.name) == ("base", "steered") and page.tau == head.tau
    assert not base.trace.gated.any() and torch.equal(steered.trace.gated, steered.trace.entropy > head.tau)
    data = embedded_data(render_html(page))
    assert data["items"][0]["question"] == "What is 12+30?" and data["items"][0]["arms"][1]["tau"] == head.tau


def test_view_cli_from_a_prompt(tiny_model_dir, tmp_path):
    from steer.models import load_model

    model, _ = load_model(tiny_model_dir, device="cpu")
    CorrectionHead.for_model(model, tau=0.0).save_pretrained(tmp_path / "head")
    out = tmp_path / "prompt.html"
    result = CliRunner().invoke(main, ["view", "-m", str(tiny_model_dir), "--head", str(tmp_path / "head"),
                                       "--prompt", "Hi </script>", "--max-new-tokens", "5", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = embedded_data(out.read_text())
    assert data["items"][0]["question"] == "Hi </script>"  # escaped in the page, intact in the data
    assert all(len(arm["tok"]) <= 5 for arm in data["items"][0]["arms"])


# ---------------------------------------------------------------------------------------------------------- browser

CHROMIUM = os.environ.get("STEER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync"]


def synthetic_page(items: int = 23, steps: int = 40, k: int = 4) -> ViewPage:
    """A page of made-up traces: item i is wrong when steered if i % 3 == 0, changed where i % 4 == 0."""
    generator = torch.Generator().manual_seed(0)
    entries = []
    for i in range(items):
        arms = []
        for name, tau in (("base", None), ("steered", 1.0)):
            entropy = torch.rand(steps, generator=generator) * 2
            gated = entropy > 1.0 if tau is not None else torch.zeros(steps, dtype=torch.bool)
            changed = gated & (torch.arange(steps) % 5 == 0) & (i % 4 == 0)
            probs = torch.softmax(torch.randn(steps, k, generator=generator), -1).half()
            trace = StepTrace(torch.randint(3, 60, (steps,), generator=generator, dtype=torch.int32), entropy, gated,
                              changed, torch.randint(3, 60, (steps, k), generator=generator, dtype=torch.int32),
                              probs, probs.flip(-1) if tau is not None else probs)
            arms.append(ArmView(name, trace, tau, correct=not (name == "steered" and i % 3 == 0), answer=str(i)))
        entries.append(ViewItem(f"synthetic · p{i} · sample 0", f"question {i} <b>not bold</b>", str(i), arms))
    return ViewPage("synthetic", "test", entries, {t: chr(ord("a") + t % 26) * (1 + t % 3) for t in range(64)}, 1.0)


def test_page_in_a_real_browser(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install .[test])")
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install chromium, or set STEER_CHROMIUM)")
    page_data = synthetic_page()
    path = tmp_path / "page.html"
    path.write_text(render_html(page_data), encoding="utf-8")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            errors, requests = [], []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(path.as_uri())
            assert page.locator(".item").count() == 10
            assert page.locator("#page-info").inner_text().startswith("page 1 of 3")
            assert page.locator(".item").first.locator(".question").inner_text() == "question 0 <b>not bold</b>"
            first = page.locator(".item").first.locator(".arm[data-arm=steered] .tok")
            assert first.count() == 40
            trace = page_data.items[0].arms[1].trace
            assert page.locator(".item").first.locator(".arm[data-arm=steered] .tok.gated").count() == int(
                trace.gated.sum())

            changed = page.locator(".arm[data-arm=steered] .tok.changed").first
            changed.hover()
            detail = page.locator("#detail")
            assert "steering changed the top-1" in detail.inner_text()
            assert detail.locator("tr").count() == 1 + 4 and "steered" in detail.locator("tr").first.inner_text()
            changed.click()  # pinned: hovering elsewhere keeps it
            page.locator(".arm[data-arm=base] .tok").first.hover()
            assert "steered · step" in detail.inner_text()

            page.click("#next")
            assert page.locator("#page-info").inner_text().startswith("page 2 of 3")
            page.select_option("#filter", "steered-failed")
            expected = sum(1 for i in range(23) if i % 3 == 0)
            assert page.locator(".item").count() == min(10, expected) and f"of {expected} (of 23)" in page.locator(
                "#page-info").inner_text()
            page.check("#changed-only")
            both = sum(1 for i in range(23) if i % 3 == 0 and i % 4 == 0)
            assert page.locator(".item").count() == both
            assert all(label.startswith("synthetic · p") for label in page.locator(".item .label").all_inner_texts())
            assert errors == [] and all(url.startswith("file:") for url in requests)
        finally:
            browser.close()
