"""The paper's table on a real model: base, GRPO and two heads on two task families, with compute, power, footprint
and intervention.

    pip install -e ".[rl,analysis]"
    python benches/grpo.py --family arithmetic                 # first: the GRPO baseline (hours; resumable)
    python benches/paper_table_real.py --family arithmetic     # then this (resumable); the same for word_problems

A family's file (`benches/data/<family>.jsonl`) is split by position: the first 100 problems for the heads'
rollouts, the next 100 for validation (GRPO's stopping, and the power pilot here), the last 200 held out for the
table. Steps, each resuming in `benches/runs/table-<family>`:

1. the heads (`benches/heads.py`): 8 rollouts per problem at temperature 0.6, scoring, branch labels, and a head from
   rollout advantages and one from branch labels, with the library's default training settings (no tuning);
2. the number of samples N: a pilot on the validation problems (4 samples at temperature 0.6, every arm) measures,
   for each arm against base, the variance of the per-problem difference between problems and within them; N is
   the least that detects a 5-point difference over 200 problems at p < 0.05 with 80% power, for every arm (at most
   `--max-samples`);
3. base, GRPO and both heads on the held-out problems, greedy and avg@N at temperature 0.6, each paired against
   base (exact McNemar greedy, sign-flip permutation over per-problem means for avg@N);
4. `steer analyze footprint` of GRPO against base (its samples on the held-out problems) and `steer analyze
   intervene` (greedy), gated at the advantage head's tau.

Writes `benches/results/paper_table_real-<family>.json`, then `benches/results/paper_table_real.md`, `.json` and
`.png` from every family done so far.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from families import FAMILIES
from heads import make_heads

from steer.analysis.footprint import footprint, sparsity_verdict
from steer.analysis.intervention import intervene
from steer.files import atomic_write_json, atomic_write_text
from steer.models import load_model
from steer.pipeline.evaluation import Arm, evaluate
from steer.pipeline.folders.predictions import PredictionFolder, PredictionRecord
from steer.pipeline.problems import load_problems
from steer.settings import (
    DecodingSettings,
    EvalSettings,
    FootprintSettings,
    LabelSettings,
    RolloutSettings,
)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
EFFECT, ALPHA, POWER = 0.05, 0.05, 0.8
Z = 1.959964 + 0.841621  # two-sided alpha 0.05, power 0.8


def required_samples(records: list[PredictionRecord], arms: list[str], problems: int, max_samples: int) -> dict:
    """Samples per problem that detect an `EFFECT` difference of each arm against base over `problems` problems.

    With per-problem means over N paired samples (sample s of every arm shares its random draws), the variance of
    the mean difference is (B + W / N) / problems: B the variance of the problems' true differences, W the mean
    variance of one sample's difference within a problem. The pilot's records estimate W (per problem, over its
    samples) and B (the variance of the pilot's per-problem means, less W over the pilot's samples)."""
    outcome: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in records:
        outcome[r.arm, r.problem_id][r.sample] = float(r.correct)
    ids = sorted({pid for _, pid in outcome})
    target = problems * (EFFECT / Z) ** 2
    report = {}
    for arm in arms:
        x = np.array([[outcome[arm, pid][s] - outcome["base", pid][s] for s in sorted(outcome["base", pid])]
                      for pid in ids])
        pilot = x.shape[1]
        within = float(x.var(axis=1, ddof=1).mean())
        between = max(0.0, float(x.mean(axis=1).var(ddof=1)) - within / pilot)
        needed = math.ceil(within / (target - between)) if target > between else None
        report[arm] = {"between": between, "within": within, "pilot_samples": pilot,
                       "samples": None if needed is None else max(1, needed)}
    # An arm whose per-problem differences vary more between problems than the test allows gets no N (more samples
    # only shrink the within-problem part); N serves the others.
    wanted = [r["samples"] for r in report.values() if r["samples"] is not None]
    chosen = min(max_samples, max(wanted, default=max_samples))
    return {"arms": report, "samples": chosen, "problems": problems, "effect": EFFECT, "alpha": ALPHA, "power": POWER,
            "capped": max(wanted, default=0) > max_samples,
            "unreachable": [arm for arm, r in report.items() if r["samples"] is None]}


@dataclass(frozen=True)
class Table:
    """One family's run: the problem file and its split (first `train` for the heads' rollouts, next `validation`
    for the pilot, last `test` held out), sampling, and where things go."""

    family: str
    model: str
    data: Path
    grpo_result: Path
    out: Path
    train: int = 100
    validation: int = 100
    test: int = 200
    rollout_samples: int = 8
    pilot_samples: int = 4
    max_samples: int = 16
    max_new_tokens: int = 96
    instruction: str | None = None  # the library's default
    seed: int = 0

    def eval_settings(self, samples: int, temperature: float) -> EvalSettings:
        extra = {} if self.instruction is None else {"instruction": self.instruction}
        return EvalSettings(samples=samples, batch_size=64, seed=self.seed, **extra,
                            decoding=DecodingSettings(temperature=temperature, max_new_tokens=self.max_new_tokens))


def arm_rows(summary: dict) -> dict:
    """Accuracy, interval and the paired test against base, per arm, from an evaluation summary."""
    arms, paired = summary["arms"], summary["paired"]
    return {arm: {"accuracy": a["accuracy"], "interval_95": a["interval_95"], "truncated": a["truncated"],
                  "gated_fraction": a["gated_fraction"], "changed_fraction": a["changed_fraction"],
                  "difference": paired.get(arm, {}).get("difference"), "p_value": paired.get(arm, {}).get("p_value")}
            for arm, a in arms.items()}


def run_family(table: Table) -> dict:
    problems = load_problems(table.data)
    train, validation = problems[: table.train], problems[table.train : table.train + table.validation]
    test = problems[-table.test :]
    if not table.grpo_result.exists():
        raise SystemExit(f"no GRPO baseline at {table.grpo_result}: run `python benches/grpo.py --family "
                         f"{table.family}` first")
    grpo = json.loads(table.grpo_result.read_text())
    if grpo["settings"]["max_new_tokens"] != table.max_new_tokens:
        print(f"warning: GRPO trained with completions of up to {grpo['settings']['max_new_tokens']} tokens and this "
              f"table decodes up to {table.max_new_tokens}: pass --max-new-tokens {grpo['settings']['max_new_tokens']} "
              "to compare them on the same budget")
    out = table.out
    model, tokenizer = load_model(table.model, device="cpu", dtype=torch.float32)
    rl, _ = load_model(grpo["model"], device="cpu", dtype=torch.float32)
    decoding = DecodingSettings(temperature=0.6, max_new_tokens=table.max_new_tokens)
    extra = {} if table.instruction is None else {"instruction": table.instruction}
    heads = make_heads(model, tokenizer, train, out / "heads",
                       RolloutSettings(samples=table.rollout_samples, batch_size=64, seed=table.seed,
                                       decoding=decoding, **extra),
                       LabelSettings(max_new_tokens=table.max_new_tokens, seed=table.seed))
    arms = [Arm("base", model), *(Arm.steered(model, run.head, name) for name, run in heads.items()), Arm("grpo", rl)]
    others = [arm.name for arm in arms if arm.name != "base"]

    evaluate(model, tokenizer, {"validation": validation}, out / "pilot",
             table.eval_settings(table.pilot_samples, 0.6), arms=arms)
    power = required_samples(PredictionFolder(out / "pilot").records(), others, len(test), table.max_samples)
    greedy = evaluate(model, tokenizer, {"test": test}, out / "greedy", table.eval_settings(1, 0.0), arms=arms)
    sampled = evaluate(model, tokenizer, {"test": test}, out / "sampled", table.eval_settings(power["samples"], 0.6),
                       arms=arms)
    tau = heads["advantage head"].head.tau
    rl_samples = RolloutSettings(samples=2, batch_size=64, seed=table.seed, decoding=decoding, **extra)
    fp = footprint(model, rl, tokenizer, test, out / "footprint", FootprintSettings(rollouts=rl_samples)).report
    iv = intervene(model, rl, tokenizer, {"test": test}, out / "intervene", table.eval_settings(1, 0.0), tau=tau)

    grpo_flops, grpo_seconds = grpo["best"]["flops"], grpo["best"]["train_seconds"]
    trained = grpo["best"]["step"] > 0  # GRPO's best model is the base model when no step beat it on validation
    compute = {"grpo": {"flops": grpo_flops, "seconds": grpo_seconds, "step": grpo["best"]["step"],
                        "median_step_seconds_x_steps": grpo["best"].get("median_step_seconds_x_steps")}}
    for name, run in heads.items():
        compute[name] = {"flops": run.flops, "seconds": run.seconds, "tokens": run.tokens, "tau": run.head.tau,
                         "ratio_flops": run.flops / grpo_flops if trained else None,
                         "ratio_seconds": run.seconds / grpo_seconds if trained else None}
    gate = min(fp.gate, key=lambda g: abs(g.tau - tau))
    record = {
        "family": table.family, "model": table.model,
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "problems": {"train": len(train), "validation": len(validation), "test": len(test)},
        "power": power,
        "greedy": arm_rows(greedy.to_json()["benchmarks"]["test"]),
        "sampled": arm_rows(sampled.to_json()["benchmarks"]["test"]),
        "compute": compute,
        "footprint": {"positions": fp.positions, "differ_fraction": fp.differ_fraction, "rank_share": fp.rank_share,
                      "rank_share_differing": fp.rank_share_differing, "entropy": asdict(fp.entropy),
                      "gate_at_tau": asdict(gate)},
        "intervention": {"tau": iv.tau, "arms": {arm: asdict(row) for arm, row in iv.benchmarks["test"].items()}},
        "grpo": {key: grpo[key] for key in ("best", "total", "settings", "train_problems", "validation_problems")},
    }
    record["goals"] = goals(record)
    return record


def goals(record: dict) -> dict[str, dict]:
    """The issue's goals for one family, each `met` or not, with the figures it rests on."""
    rows, compute = record["sampled"], record["compute"]
    gain = rows["grpo"]["difference"]
    rl_gain = gain is not None and gain > 0 and rows["grpo"]["p_value"] < ALPHA
    checks = {}
    for name in ("advantage head", "branch head"):
        row = rows[name]
        recovered = row["difference"] / gain if rl_gain else None
        checks[f"{name}: at least half of GRPO's gain at <= 1/10 of its compute, p < 0.05"] = {
            "met": bool(rl_gain and recovered >= 0.5 and row["p_value"] < ALPHA
                        and compute[name]["ratio_flops"] is not None and compute[name]["ratio_flops"] <= 0.1),
            "recovered": recovered, "difference": row["difference"], "p_value": row["p_value"],
            "ratio_flops": compute[name]["ratio_flops"],
            "note": None if rl_gain else "no RL gain to recover: GRPO's own gain is not significant",
        }
        checks[f"{name}: does not lower held-out accuracy significantly"] = {
            "met": not (row["difference"] < 0 and row["p_value"] < ALPHA),
            "difference": row["difference"], "p_value": row["p_value"],
        }
    return checks


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def signed(row: dict) -> str:
    if row["difference"] is None:
        return "-"
    return f"{row['difference']:+.3f} (p = {row['p_value']:.2g})"


def power_note(power: dict) -> str:
    """What the power pilot asked for, per arm, and whether N had to be capped below it."""
    asks = ", ".join(f"{arm} {'none suffices' if a['samples'] is None else a['samples']}"
                     for arm, a in power["arms"].items())
    pilot = next(iter(power["arms"].values()))["pilot_samples"]
    verdict = (f"capped at {power['samples']}, below what the pilot asks" if power["capped"]
               else f"N = {power['samples']} serves every arm that some N serves")
    unreachable = power.get("unreachable") or [a for a, r in power["arms"].items() if r["samples"] is None]
    if unreachable:
        verdict += (f"; for {', '.join(unreachable)} no N does, because its per-problem differences vary more between "
                    "problems than a 5-point test over these problems allows")
    return (f"Samples N from a power pilot ({pilot} samples per validation problem): to detect a 5-point difference "
            f"over {power['problems']} problems at p < 0.05 with 80% power, N needed per arm: {asks}; {verdict}.")


def markdown(records: list[dict]) -> str:
    lines = ["# The paper's table on a real model", ""]
    for r in records:
        s, g, c, fp, iv = r["sampled"], r["greedy"], r["compute"], r["footprint"], r["intervention"]
        n = r["power"]["samples"]
        lines += [
            f"## {r['model'].split('/')[-1]} on {r['family']} ({r['problems']['test']} held-out problems)",
            "",
            f"avg@{n} at temperature 0.6, and greedy. Differences are paired against base. {power_note(r['power'])}",
            "",
            f"| arm | avg@{n} | vs base | greedy | vs base | compute (FLOPs) | compute (s) | / GRPO (FLOPs) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines.append(f"| base | {s['base']['accuracy']:.3f} | - | {g['base']['accuracy']:.3f} | - | - | - | - |")
        for arm in ("grpo", "advantage head", "branch head"):
            cost = c[arm]
            ratio = "1" if arm == "grpo" else "-" if cost["ratio_flops"] is None else f"{cost['ratio_flops']:.4f}"
            lines.append(f"| {arm} | {s[arm]['accuracy']:.3f} | {signed(s[arm])} | {g[arm]['accuracy']:.3f} | "
                         f"{signed(g[arm])} | {cost['flops']:.3g} | {cost['seconds']:.0f} | {ratio} |")
        gate = fp["gate_at_tau"]
        verdict, reason = sparsity_verdict(fp["differ_fraction"], (fp["rank_share_differing"] or {}).get("5"))
        lines += [
            "",
            f"Footprint of GRPO (its samples, teacher-forced): top-1 differs at {percent(fp['differ_fraction'])} of "
            f"{fp['positions']} positions (paper: 1-3%); GRPO's choice in the base top-5 at "
            f"{percent(fp['rank_share']['5'])} of all positions and "
            f"{percent((fp['rank_share_differing'] or {}).get('5'))} of changed ones (paper: all); base entropy where "
            "they differ "
            f"{'-' if fp['entropy']['ratio'] is None else format(fp['entropy']['ratio'], '.1f') + 'x'} the mean; gate "
            f"entropy > {gate['tau']}: precision {percent(gate['precision'])}, recall {percent(gate['recall'])}. "
            f"Verdict of `steer analyze footprint`: {verdict} ({reason}).",
            "",
            f"Intervention (greedy; GRPO's top-1 substituted into base decoding where base entropy > {iv['tau']:.3f}):",
            "",
            "| arm | accuracy | substituted steps | RL gain recovered |",
            "|---|---|---|---|",
            *(f"| {arm} | {row['accuracy']:.3f} | {percent(row['gated']) if arm in ('gated', 'random') else '-'} | "
              f"{percent(row.get('recovered'))} |" for arm, row in iv["arms"].items()),
            "",
            "Goals:",
            "",
            *(f"- {'met' if check['met'] else 'NOT met'}: {goal}"
              + (f" ({check['note']})" if check.get("note") else "") for goal, check in r["goals"].items()),
            "",
        ]
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """Held-out avg@N of each arm per family, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = ("base", "grpo", "advantage head", "branch head")
    fig, axes = plt.subplots(1, len(records), figsize=(4.5 * len(records), 3.5), squeeze=False)
    for ax, r in zip(axes[0], records):
        rows = r["sampled"]
        values = [rows[a]["accuracy"] for a in arms]
        errors = [[v - rows[a]["interval_95"][0] for v, a in zip(values, arms)],
                  [rows[a]["interval_95"][1] - v for v, a in zip(values, arms)]]
        ax.bar(range(len(arms)), values, yerr=errors, capsize=4, color=["C7", "C3", "C0", "C2"])
        ax.set_xticks(range(len(arms)), [a.replace(" head", "\nhead") for a in arms])
        ax.set(title=f"{r['family']} (avg@{r['power']['samples']})", ylabel="held-out accuracy", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES)
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pilot-samples", type=int, default=4, help="Samples per problem in the power pilot.")
    parser.add_argument("--max-samples", type=int, default=16, help="The most samples N the power pilot may ask for.")
    parser.add_argument("--max-new-tokens", type=int, default=Table.max_new_tokens,
                        help="Completion budget of every decode; GRPO's run should have used the same "
                             "(default: %(default)s).")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Where the tables go (default: %(default)s).")
    parser.add_argument("--grpo-result", type=Path, help="GRPO's result (default: the one grpo.py writes).")
    parser.add_argument("--smoke", action="store_true", help="A few problems and samples, to check the script runs.")
    parser.add_argument("--render", action="store_true",
                        help="Only rebuild the tables and the plot from the families' results already written.")
    args = parser.parse_args()
    if args.family is None and not args.render:
        parser.error("--family is required unless --render is given")
    if args.smoke:
        args.results = ROOT / "runs" / "table-smoke-results"  # a smoke run never touches the recorded tables
    if not args.render:
        run(args)
    records = [json.loads(p.read_text()) for family in FAMILIES
               if (p := args.results / f"paper_table_real-{family}.json").exists()]
    atomic_write_json(args.results / "paper_table_real.json", {
        "command": "python benches/paper_table_real.py --family FAMILY", "families": records})
    atomic_write_text(args.results / "paper_table_real.md", markdown(records))
    plot(records, args.results / "paper_table_real.png")
    print(markdown(records))


def run(args: argparse.Namespace) -> None:
    """One family's table, written to `<results>/paper_table_real-<family>.json`."""
    model_name = Path(args.model).name
    table = Table(args.family, args.model, ROOT / "data" / f"{args.family}.jsonl",
                  args.grpo_result or RESULTS / f"grpo-{model_name}-{args.family}.json",
                  ROOT / "runs" / f"table-{args.family}",
                  pilot_samples=args.pilot_samples, max_samples=args.max_samples, max_new_tokens=args.max_new_tokens,
                  seed=args.seed)
    if args.smoke:
        table = replace(table, out=ROOT / "runs" / f"table-smoke-{args.family}", train=12, validation=6, test=8,
                        rollout_samples=4, pilot_samples=2, max_samples=2, max_new_tokens=48)
    record = {"command": " ".join(["python benches/paper_table_real.py", *sys.argv[1:]]), **run_family(table)}
    atomic_write_json(args.results / f"paper_table_real-{args.family}.json", record)


if __name__ == "__main__":
    main()
