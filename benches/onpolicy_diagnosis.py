"""Why a head moves accuracy so little, measured where it acts: at the steps of held-out steered decodes.

    python benches/onpolicy_diagnosis.py --model benches/models/SmolLM2-135M-Instruct \\
        --data benches/data/arithmetic.jsonl --heads benches/runs/table-arithmetic/heads

(word problems: `--data benches/data/word_problems.jsonl --heads benches/runs/table-word_problems/heads
--max-new-tokens 256`, the table's budget for that family)

Issue 15's diagnosis scored the heads at labelled decision points of *sampled pool rollouts*. Here the unit is the
head's own greedy decode of problems it never trained on (the validation slice, problems 100-199 of the file, not
the test slice), traced step by step (`steer eval --trace`). The chain from a head to a gained answer, link by link:

1. gate: how many steps of a completion the head is asked about (gated), for completions the base model gets
   wrong and right;
2. change: how many of them it changes the top-1 at;
3. choice: at each changed step, the head's token and the base top-1 are each continued by the steered model
   (greedy, same budget) and graded: how often the head's branch succeeds where the base choice's does not, and the
   reverse;
4. outcome: base against steered accuracy on the same problems.

With `--engine vllm` (the GSM8K table's engine: `python benches/onpolicy_diagnosis.py --model
benches/models/Qwen2.5-Coder-0.5B-Instruct --data ../shared/data/gsm8k/train.jsonl --problems 160:260 --heads H
--max-new-tokens 512 --engine vllm`) both decodes and every continuation run in vLLM's steered engine, and the trace
of each steered decode is recorded after the fact: one teacher-forced pass of the transformers model over its
re-tokenised completion, the head applied at every position as the steering processor applies it
([`teacher_forced_trace`]). The report's `replay` says how far that agrees with the decode (vLLM's own gated and
changed counts beside the replay's; [`Replay`]), and only changed steps whose decoded token is the replay's steered
top-1 are branched on. One head per run: each vLLM engine lives as long as its process.

Writes `benches/results/onpolicy-<model>-<data>.json` (`-vllm.json` with `--engine vllm`; per head) and prints the
chain. Resumes in `benches/runs/onpolicy-<data>/<heads>-<head>/<engine>`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from steer.files import atomic_write_json
from steer.functional import steer_logits
from steer.head import CorrectionHead, output_embedding
from steer.models import load_model
from steer.pipeline.branching import Branch, BranchDecoding, Outcome, branch_batches, continue_branches
from steer.pipeline.decoding import steering
from steer.pipeline.evaluation import Arm, evaluate, head_digest
from steer.pipeline.folders import Record, RunFolder
from steer.pipeline.folders.predictions import PredictionFolder, PredictionRecord, StepTrace
from steer.pipeline.folders.rollouts import Tokens
from steer.pipeline.jobs import Job, run_job
from steer.pipeline.metrics import mcnemar
from steer.pipeline.problems import load_problems
from steer.pipeline.prompts import build_prompt, encode_prompt
from steer.pipeline.scoring import teacher_force
from steer.settings import DecodingSettings, EvalSettings

ROOT = Path(__file__).resolve().parent
MAX_NEW_TOKENS = 96


@dataclass(frozen=True)
class Choice:
    """A changed step of a steered decode, and which token continues it: the head's or the base top-1."""

    problem_id: str
    position: int
    choice: str
    entropy: float


@dataclass(frozen=True)
class ChoiceRecord(Record):
    """A continued choice (see [`Choice`]), and its outcome."""

    problem_id: str
    position: int
    choice: str
    entropy: float
    completion: str
    completion_ids: list[int]
    correct: bool


def choice_record(branch: Branch[Choice], outcome: Outcome) -> ChoiceRecord:
    return ChoiceRecord(**asdict(branch.tag), **asdict(outcome))


class ChoiceFolder(RunFolder[ChoiceRecord]):
    """The continued choices: one record per (problem, changed step, choice), `choice` "head" or "base"."""

    records_file = "choices.jsonl"
    settings_file = "choices.settings.json"
    record_type = ChoiceRecord
    key = ("problem_id", "position", "choice")
    writer = "benches/onpolicy_diagnosis.py"


def choice_branches(records: dict[str, PredictionRecord], traces: dict[str, StepTrace],
                    prompts: dict[str, list[int]], per_completion: int) -> list[Branch[Choice]]:
    """At the first `per_completion` changed steps of each steered decode (`traces` by problem id): the head's token
    and the base top-1."""
    branches = []
    for problem_id, trace in traces.items():
        tokens = trace.tokens.tolist()
        for t in trace.changed.nonzero().squeeze(-1).tolist()[:per_completion]:
            for choice, token in (("head", tokens[t]), ("base", int(trace.topk_ids[t, 0]))):
                branches.append(Branch((problem_id, t, choice), prompts[problem_id], tokens[:t] + [token],
                                       records[problem_id].gold,
                                       Choice(problem_id, t, choice, float(trace.entropy[t]))))
    return branches


@torch.no_grad()
def teacher_forced_trace(model, head: CorrectionHead, prompt_ids: list[int],
                         completion_ids: list[int]) -> tuple[StepTrace, torch.Tensor]:
    """The trace a steered greedy decode of `completion_ids` would have recorded, from one teacher-forced pass: at
    every position the base entropy and top-k, and the head's correction applied as the steering processor applies
    it (the same function on the same logits and final hidden state); `tokens` are `completion_ids`. Also returns
    which steps' steered top-1 is the token in `completion_ids` (`torch.BoolTensor` of shape `(steps,)`)."""
    (logits, hidden), = teacher_force(model, [Tokens(prompt_ids, completion_ids)])
    logits = logits.float()
    out = steer_logits(logits, head.project(hidden).to(logits.dtype), output_embedding(model), head.top_k, head.tau)
    tokens = torch.tensor(completion_ids)
    probs = lambda scores: torch.softmax(scores, dim=-1).gather(-1, out.indices).half()  # noqa: E731
    trace = StepTrace(tokens.int(), out.entropy, out.gated, out.changed, out.indices.int(), probs(logits),
                      probs(out.logits))
    return trace, out.logits.argmax(-1) == tokens


@dataclass(frozen=True)
class Replay:
    """How far the teacher-forced replay of vLLM's steered decodes ([`replayed_traces`]) agrees with them.

    Attributes:
        completions (`int`): steered completions replayed.
        retokenised_to_another_length (`int`): completions whose text re-tokenises to another number of tokens than
            decoded (less the end-of-sequence step, which the text lacks).
        live_gated (`int`), live_changed (`int`): gated and changed steps as vLLM's steering counted them.
        replayed_gated (`int`), replayed_changed (`int`): the same, as the replay finds them.
        agreement_at_gated_steps (`float`): share of the replay's gated steps whose steered top-1 is the
            (re-tokenised) decoded token.
        changed_where_decoded (`int`): replayed changed steps whose decoded token is the replay's steered top-1:
            the only changed steps branched on.
    """

    completions: int
    retokenised_to_another_length: int
    live_gated: int
    live_changed: int
    replayed_gated: int
    replayed_changed: int
    agreement_at_gated_steps: float | None
    changed_where_decoded: int


def replayed_traces(model, tokenizer, head: CorrectionHead, records: list[PredictionRecord],
                    prompts: dict[str, list[int]]) -> tuple[dict[str, StepTrace], Replay]:
    """[`teacher_forced_trace`] of each steered record's completion, re-tokenised from its text (vLLM's token ids are
    not stored), and how far the replay agrees with the decode ([`Replay`]). In the traces returned, a step counts
    as changed only where the replay changed the top-1 *and* the decoded token is the replay's steered top-1, so that
    a head branch never continues the base top-1."""
    traces, agree_gated, relength, gated, changed = {}, [], 0, 0, 0
    for record in records:
        ids = tokenizer(record.completion, add_special_tokens=False)["input_ids"]
        relength += len(ids) + (record.finish_reason == "stop") != record.steps  # the decode's steps end on EOS
        if not ids:
            continue
        trace, agrees = teacher_forced_trace(model, head, prompts[record.problem_id], ids)
        gated, changed = gated + int(trace.gated.sum()), changed + int(trace.changed.sum())
        agree_gated.append(agrees[trace.gated].float())
        traces[record.problem_id] = replace(trace, changed=trace.changed & agrees)
    at_gated = torch.cat(agree_gated) if agree_gated else torch.zeros(0)
    return traces, Replay(len(records), relength, sum(r.gated for r in records), sum(r.changed for r in records),
                          gated, changed, float(at_gated.mean()) if at_gated.numel() else None,
                          sum(int(t.changed.sum()) for t in traces.values()))


def chain(records: list[PredictionRecord], choices: list[ChoiceRecord]) -> dict:
    """The four links (see the module docstring) from the evaluation's records and the continued choices."""
    by_arm = {arm: {r.problem_id: r for r in records if r.arm == arm} for arm in ("base", "steered")}
    problems = sorted(by_arm["base"])
    steered = [by_arm["steered"][p] for p in problems]
    base_wrong = [p for p in problems if not by_arm["base"][p].correct]
    pairs: dict[tuple, dict[str, bool]] = defaultdict(dict)
    for c in choices:
        pairs[c.problem_id, c.position][c.choice] = bool(c.correct)
    complete = [v for v in pairs.values() if len(v) == 2]
    head_only = sum(v["head"] and not v["base"] for v in complete)
    base_only = sum(v["base"] and not v["head"] for v in complete)
    outcome = mcnemar([by_arm["base"][p].correct for p in problems], [r.correct for r in steered])
    return {
        "problems": len(problems),
        "gate": {
            "gated_per_completion": float(np.mean([r.gated for r in steered])),
            "gated_share_of_steps": sum(r.gated for r in steered) / max(1, sum(r.steps for r in steered)),
            "completions_without_a_gated_step": sum(r.gated == 0 for r in steered) / len(steered),
            "gated_per_completion_where_base_fails": float(np.mean(
                [by_arm["steered"][p].gated for p in base_wrong])) if base_wrong else None,
        },
        "change": {
            "changed_per_completion": float(np.mean([r.changed for r in steered])),
            "changed_share_of_gated": sum(r.changed for r in steered) / max(1, sum(r.gated for r in steered)),
            "completions_with_a_change": sum(r.changed > 0 for r in steered) / len(steered),
        },
        "choice": {
            "changed_steps_continued": len(complete),
            "head_choice_succeeds": sum(v["head"] for v in complete) / max(1, len(complete)),
            "base_choice_succeeds": sum(v["base"] for v in complete) / max(1, len(complete)),
            "head_only": head_only, "base_only": base_only,
            "p_value": mcnemar([v["base"] for v in complete], [v["head"] for v in complete]).p_value,
        },
        "outcome": {
            "base_accuracy": sum(by_arm["base"][p].correct for p in problems) / len(problems),
            "steered_accuracy": sum(r.correct for r in steered) / len(steered),
            "base_truncated": sum(by_arm["base"][p].finish_reason == "length" for p in problems) / len(problems),
            "steered_truncated": sum(r.finish_reason == "length" for r in steered) / len(steered),
            **asdict(outcome),
        },
    }


@dataclass(frozen=True)
class Decoded:
    """The base and steered greedy decodes of the problems, the steered ones' traces by problem id, and what
    continues a branch: the steered model (with its `processor`) or the steered engine (`processor` None)."""

    records: list[PredictionRecord]
    traces: dict[str, StepTrace]
    continuing: object
    processor: object
    replay: Replay | None = None


def decoded_live(model, tokenizer, head: CorrectionHead, problems, out: Path, greedy: EvalSettings) -> Decoded:
    """Decode in transformers' generate, each steered decode traced as it runs."""
    evaluate(model, tokenizer, {"validation": problems}, out, greedy, head=head, trace_top_k=head.top_k,
             progress=False)
    folder = PredictionFolder(out)
    traces = {problem_id: recorded.trace for (_, problem_id, arm, _), recorded in folder.traces().by_key.items()
              if arm == "steered"}
    return Decoded(folder.records(), traces, model, steering(model, head))


def decoded_in_vllm(model, tokenizer, head: CorrectionHead, head_folder: Path, problems, out: Path,
                    greedy: EvalSettings, prompts: dict[str, list[int]]) -> Decoded:
    """Decode in vLLM's steered engine, each steered decode traced after the fact ([`replayed_traces`])."""
    from steer.integrations.vllm.decoding import vllm_decoders

    base, steered = vllm_decoders(model.name_or_path, tokenizer, str(head_folder), "float32", greedy.seed)
    evaluate(base, tokenizer, {"validation": problems}, out, greedy,
             arms=[Arm("base", base), Arm("steered", steered, digest=head_digest(head))], progress=False)
    records = PredictionFolder(out).records()
    traces, replay = replayed_traces(model, tokenizer, head, [r for r in records if r.arm == "steered"], prompts)
    return Decoded(records, traces, steered, None, replay)


def diagnose(model, tokenizer, head: CorrectionHead, head_folder: Path, problems, out: Path, per_completion: int,
             seed: int, max_new_tokens: int, engine: str) -> dict:
    greedy = EvalSettings(samples=1, batch_size=64, seed=seed,
                          decoding=DecodingSettings(temperature=0.0, max_new_tokens=max_new_tokens))
    prompts = {p.id: encode_prompt(tokenizer, build_prompt(tokenizer, p.question, greedy.instruction))
               for p in problems}
    if engine == "vllm":
        decoded = decoded_in_vllm(model, tokenizer, head, head_folder, problems, out / "eval", greedy, prompts)
    else:
        decoded = decoded_live(model, tokenizer, head, problems, out / "eval", greedy)
    branches = choice_branches({r.problem_id: r for r in decoded.records}, decoded.traces, prompts, per_completion)
    decoding = BranchDecoding(max_new_tokens, seed=seed)
    job = Job(label="choices", unit="branch", folder=ChoiceFolder(out / "choices"),
              settings={"model": model.name_or_path, "per_completion": per_completion, "seed": seed},
              units=branches, unit_keys=lambda b: [b.key],
              batches=lambda pending: branch_batches(pending, 64),
              work=lambda batch: continue_branches(decoded.continuing, tokenizer, batch, decoding, choice_record,
                                                   decoded.processor))
    keys = {branch.key for branch in branches}  # a folder may hold branches of an earlier replay: only this one's
    choices = [c for c in run_job(job, progress=False).records if (c.problem_id, c.position, c.choice) in keys]
    return {**chain(decoded.records, choices), **({"replay": asdict(decoded.replay)} if decoded.replay else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--heads", type=Path, required=True, help="Folder holding head folders (benches/heads.py).")
    parser.add_argument("--per-completion", type=int, default=3, help="Changed steps continued per completion.")
    parser.add_argument("--problems", default="100:200", help="START:END of the data file's problems to decode (the "
                        "validation slice: never the rollouts' problems nor the test's; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                        help="Token budget of every decode and continuation (the family's, as in the table).")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                        help="What decodes: transformers' generate, traced live, or vLLM's steered engine, traced "
                        "after the fact (default: %(default)s).")
    parser.add_argument("--out", type=Path, help="The report (default: benches/results/onpolicy-<model>-<data>.json, "
                        "-vllm.json with --engine vllm).")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device="cpu", dtype=torch.float32)
    start, end = (int(x) for x in args.problems.split(":"))
    problems = load_problems(args.data)[start:end]
    folders = sorted(p for p in args.heads.iterdir() if (p / "head.safetensors").exists())
    if args.engine == "vllm" and len(folders) != 1:
        sys.exit(f"--engine vllm diagnoses one head per run (each engine lives as long as its process); "
                 f"{args.heads} holds {len(folders)}: {[f.name for f in folders]}")
    report = {"command": " ".join(["python benches/onpolicy_diagnosis.py", *sys.argv[1:]]), "engine": args.engine,
              "problems": f"validation slice ({start}-{end - 1})", "max_new_tokens": args.max_new_tokens, "heads": {}}
    for folder in folders:
        head = CorrectionHead.from_pretrained(folder)
        out = ROOT / "runs" / f"onpolicy-{args.data.stem}" / f"{args.heads.name}-{folder.name}" / args.engine
        report["heads"][folder.name] = {"tau": head.tau, "top_k": head.top_k, "scale": head.scale,
                                        **diagnose(model, tokenizer, head, folder, problems, out, args.per_completion,
                                                   args.seed, args.max_new_tokens, args.engine)}
        print(folder.name, json.dumps(report["heads"][folder.name], indent=1))
    suffix = "" if args.engine == "hf" else f"-{args.engine}"
    atomic_write_json(args.out or ROOT / "results" / f"onpolicy-{Path(args.model).name}-{args.data.stem}{suffix}.json",
                      report)


if __name__ == "__main__":
    main()
