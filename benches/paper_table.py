"""The paper's table on the built-in world: base, GRPO and steer's head, with compute, footprint and intervention.

    pip install -e ".[rl,analysis]"
    python benches/paper_table.py      # trains the GRPO baseline first if benches/models/world-grpo is missing

Writes `benches/results/paper_table.md` and `benches/results/paper_table.json`, with the run's files under
`benches/runs/paper` (not committed). Steps:

1. the GRPO baseline (`benches/grpo.py --family world`), unless its model and result are there;
2. steer's heads: `steer demo` at the given seed (rollouts, scoring, head training), and the same on 25 problems
   with 8 samples each, their compute counted the way GRPO's is: 2N FLOPs per prompt or completion token of
   rollouts and of scoring, plus an upper bound on head training (6 FLOPs per head parameter, stored decision
   point and step);
3. base, both heads and GRPO on the demo's held-out test problems, `--samples` decodes each at temperature 0.6;
4. `steer analyze footprint` and `steer analyze intervene` of GRPO against the base model on the test problems.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from steer import world
from steer.analysis.footprint import FootprintSettings, footprint
from steer.analysis.intervention import intervene
from steer.files import atomic_write_json, atomic_write_text
from steer.head import CorrectionHead
from steer.models import load_model
from steer.pipeline.decoding import DecodingSettings
from steer.pipeline.evaluation import Arm, EvalSettings, evaluate
from steer.pipeline.folders.rollouts import RolloutFolder
from steer.pipeline.rollout import RolloutSettings
from steer.world.demo import DemoSettings, run_demo, world_problems

ROOT = Path(__file__).resolve().parent
GRPO_MODEL = ROOT / "models" / "world-grpo"
GRPO_RESULT = ROOT / "results" / "grpo-world.json"
RESULTS = ROOT / "results"


def grpo_baseline() -> dict:
    """The GRPO result, training it first when its model or result is missing."""
    if not (GRPO_MODEL / "config.json").exists() or not GRPO_RESULT.exists():
        subprocess.run([sys.executable, str(ROOT / "grpo.py"), "--family", "world"], check=True)
    return json.loads(GRPO_RESULT.read_text())


def head_compute(demo_dir: Path, parameters: int) -> dict:
    """Seconds and estimated FLOPs of the head's making: rollouts, scoring and head training."""
    demo = json.loads((demo_dir / "demo.json").read_text())
    training = json.loads((demo_dir / "head" / "training.json").read_text())
    rollouts = RolloutFolder(demo_dir / "rollouts").read_records()
    tokens = sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    head = CorrectionHead.from_pretrained(demo_dir / "head")
    head_parameters = sum(p.numel() for p in head.parameters())
    head_flops = 6 * head_parameters * training["pool"]["train_points"] * training["settings"]["steps"]
    stages = demo["stages"]
    return {
        "seconds": stages["rollouts"]["seconds"] + stages["scoring"]["seconds"] + stages["training"]["seconds"],
        "rollouts": len(rollouts),
        "tokens": tokens,
        "flops": 2 * parameters * tokens * 2 + head_flops,
        "head_training_flops": head_flops,
        "stages": stages,
    }


def head_runs(seed: int) -> dict[str, DemoSettings]:
    """The heads compared with GRPO: the demo's, and one from 16 times fewer rollouts (25 problems, 8 samples)."""
    small = replace(DemoSettings(seed=seed), train_problems=25, samples=8)
    small.train = replace(small.train, pool_problems=25)
    return {"head": DemoSettings(seed=seed), "small head": small}


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(table: dict) -> str:
    acc, fp, iv, compute = table["accuracy"], table["footprint"], table["intervention"], table["compute"]
    lines = [
        "# The paper's table on the built-in world",
        "",
        f"`{table['command']}` on {table['device']}; {table['test_problems']} held-out test problems, "
        f"{table['samples']} samples each at temperature 0.6 (avg@{table['samples']}).",
        "",
        "| model | accuracy | 95% interval | compute (s) | compute (FLOPs) |",
        "|---|---|---|---|---|",
        f"| base | {acc['base']['accuracy']:.3f} | {acc['base']['interval']} | - | - |",
        f"| GRPO (TRL) | {acc['grpo']['accuracy']:.3f} | {acc['grpo']['interval']} | "
        f"{compute['grpo']['seconds']:.0f} | {compute['grpo']['flops']:.3g} |",
        *(f"| steer {name} ({compute[name]['rollouts']} rollouts) | {acc[name]['accuracy']:.3f} | "
          f"{acc[name]['interval']} | {compute[name]['seconds']:.0f} | {compute[name]['flops']:.3g} |"
          for name in table["heads"]),
        "",
        *(f"Compute ratio, {name} / GRPO: {compute[name]['ratio_flops']:.4f} in FLOPs, "
          f"{compute[name]['ratio_seconds']:.4f} in wall time." for name in table["heads"]),
        "GRPO's compute runs to its best validation checkpoint, validation excluded; a head's is its rollouts, "
        "their scoring and its training.",
        "",
        "## Footprint of GRPO (teacher-forced on GRPO's samples)",
        "",
        f"- positions whose top-1 changed: {percent(fp['differ_fraction'])} of {fp['positions']}",
        f"- GRPO's choice inside the base top-1 / top-5 / top-10: {percent(fp['rank_share']['1'])} / "
        f"{percent(fp['rank_share']['5'])} / {percent(fp['rank_share']['10'])}; at changed positions, inside the "
        f"top-5: {percent((fp['rank_share_differing'] or {}).get('5'))}",
        f"- base entropy at changed positions against all: "
        f"{'-' if fp['entropy']['ratio'] is None else format(fp['entropy']['ratio'], '.1f') + 'x'}",
        f"- entropy > {iv['tau']} as a predictor of change: precision {percent(fp['gate_at_tau']['precision'])}, "
        f"recall {percent(fp['gate_at_tau']['recall'])}",
        "",
        "## Intervention: GRPO's top-1 substituted into base decoding",
        "",
        "| arm | accuracy | substituted steps | RL gain recovered |",
        "|---|---|---|---|",
        *(f"| {arm} | {row['accuracy']:.3f} | {percent(row['gated']) if arm in ('gated', 'random') else '-'} | "
          f"{percent(row.get('recovered'))} |" for arm, row in iv["arms"].items()),
        "",
        "## Goals",
        "",
        *(f"- {'met' if ok else 'NOT met'}: {goal}" for goal, ok in table["goals"].items()),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=4, help="Decodes per test problem and arm.")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "paper")
    args = parser.parse_args()

    grpo = grpo_baseline()
    if not grpo["best"]["step"]:
        raise SystemExit("GRPO never beat the base model on validation: no baseline to compare with")
    runs = head_runs(args.seed)
    folders = {name: args.out / name.replace(" ", "-") for name in runs}
    heads = {name: CorrectionHead.from_pretrained(run_demo(folders[name], settings=settings).head)
             for name, settings in runs.items()}
    settings = runs["head"]
    _, test = world_problems(settings)
    base, tokenizer = load_model(world.model_path(), device="cpu")
    rl, _ = load_model(GRPO_MODEL, device="cpu")
    parameters = sum(p.numel() for p in base.parameters())
    head = heads["head"]
    decoding = DecodingSettings(max_new_tokens=settings.max_new_tokens)
    eval_settings = EvalSettings(samples=args.samples, batch_size=settings.batch_size, seed=args.seed,
                                 instruction=world.INSTRUCTION, decoding=decoding)
    arms = [Arm("base", base), *(Arm.steered(base, h, name) for name, h in heads.items()), Arm("grpo", rl)]
    summary = evaluate(base, tokenizer, {"test": test}, args.out / "eval", eval_settings,
                       arms=arms).to_json()["benchmarks"]["test"]["arms"]
    rollouts = RolloutSettings(samples=args.samples, batch_size=settings.batch_size, seed=args.seed,
                               instruction=world.INSTRUCTION, decoding=decoding)
    fp_result = footprint(base, rl, tokenizer, test, args.out / "footprint", FootprintSettings(rollouts=rollouts))
    fp = asdict(fp_result.report)
    iv = asdict(intervene(base, rl, tokenizer, {"test": test}, args.out / "intervene", eval_settings, tau=head.tau))
    fp["gate_at_tau"] = min(fp["gate"], key=lambda g: abs(g["tau"] - head.tau))

    compute = {"grpo": {"seconds": grpo["best"]["train_seconds"], "flops": grpo["best"]["flops"],
                        "step": grpo["best"]["step"]}}
    for name in heads:
        compute[name] = head_compute(folders[name], parameters)
        compute[name]["ratio_flops"] = compute[name]["flops"] / compute["grpo"]["flops"]
        compute[name]["ratio_seconds"] = compute[name]["seconds"] / compute["grpo"]["seconds"]
    accuracy = {arm: {"accuracy": summary[arm]["accuracy"],
                      "interval": "[" + ", ".join(f"{x:.3f}" for x in summary[arm]["interval_95"]) + "]"}
                for arm in ("base", *heads, "grpo")}
    within = {name: accuracy[name]["accuracy"] >= accuracy["grpo"]["accuracy"] - 0.02 for name in heads}
    arms = iv["benchmarks"]["test"]
    goals = {
        "GRPO changes the top-1 at a few percent of positions at most (<= 5%)": fp["differ_fraction"] <= 0.05,
        "at least 95% of GRPO's choices lie in the base top-5": fp["rank_share"]["5"] >= 0.95,
        "entropy-gated substitution recovers at least half of the RL gain":
            (arms["gated"].get("recovered") or 0) >= 0.5,
        "random substitution recovers little (under a quarter)":
            arms["random"].get("recovered") is not None and arms["random"]["recovered"] < 0.25,
        "the demo's head is within 2 points of GRPO": within["head"],
        "a head within 2 points of GRPO at 1/100 of its compute or less (FLOPs)":
            any(within[name] and compute[name]["ratio_flops"] <= 0.01 for name in heads),
    }
    table = {
        "command": "python benches/paper_table.py" + (f" --seed {args.seed}" if args.seed else ""),
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "test_problems": len(test), "samples": args.samples, "heads": list(heads), "accuracy": accuracy,
        "compute": compute,
        "footprint": {k: fp[k] for k in ("positions", "differ_fraction", "rank_share", "rank_share_differing",
                                         "entropy", "gate_at_tau", "rl_accuracy")},
        "intervention": {"tau": iv["tau"], "random_rate": iv["random_rate"], "arms": arms},
        "goals": goals, "grpo": {k: grpo[k] for k in ("best", "total", "trl")},
    }
    atomic_write_json(RESULTS / "paper_table.json", table)
    atomic_write_text(RESULTS / "paper_table.md", markdown(table))
    print(markdown(table))


if __name__ == "__main__":
    main()
