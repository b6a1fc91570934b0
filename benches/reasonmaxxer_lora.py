"""The paper's own method as a baseline with weight updates: ReasonMaxxer's LoRA, trained on the same scored
rollouts and pool as the heads. Needs peft (`pip install -e ".[lora]"`).

    python benches/reasonmaxxer_lora.py --model benches/models/Qwen2.5-Coder-0.5B-Instruct \
        --rollouts benches/runs/gsm8k-Qwen2.5-Coder-0.5B-Instruct/heads/rollouts \
        --out benches/runs/gsm8k-Qwen2.5-Coder-0.5B-Instruct/lora

The recipe (`../shared/PAPER.md`): LoRA of rank 32 and alpha 64 on the attention projections q, k, v and o; the loss
of a rollout with advantage A is the mean over its decision tokens (base entropy above tau = 1.4 nats) of
`-A log pi(y_t)`, plus 0.2 times the mean over its other generated positions of `KL(pi_base || pi)` over the whole
vocabulary; AdamW at lr 1e-4, 50 warm-up steps then linear decay, gradient clipping at 1.0, one rollout at a time
with 8 accumulated per step, at most 149 steps. The pool is the heads' pool ([`steer.pipeline.pool.select_pool`]
with the library's default settings: 50 problems nearest a pass rate of 0.5, their shortest 80% of rollouts,
advantages clipped at 2.5), and the entropies are those `steer score` stored. Differences from the recipe, forced by
2 CPU cores: float32 instead of bfloat16, and the KL term averaged per rollout, then over the step's 8 rollouts.

Training saves the adapter at `--checkpoints` (safetensors) and resumes from its last saved state (adapter,
optimiser moments, the step, the order of rollouts and the curve, every 5 steps), with the same settings only;
`--until STEP` ends a sitting after STEP (the schedule stays the whole run's).
`--merge STEP` writes the base model with that checkpoint's adapter merged in, as a plain folder any engine loads
(vLLM decodes it). Which checkpoint to keep is chosen on held-out problems by the table script, by greedy pass@1 as
the recipe does.

Training compute is counted as for the heads and GRPO: 2N FLOPs per token of a forward pass, and 4N for the forward
and backward of the adapted model (N the base model's parameters; the frozen weights take no weight gradient), summed
over the tokens each step reads. The rollouts and their scoring, which the LoRA shares with the heads, are added by
the table (`benches/paper_table_gsm8k.py`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from steer.files import atomic_write_json
from steer.pipeline.folders.rollouts import RolloutFolder
from steer.pipeline.pool import select_pool
from steer.pipeline.store import check_settings
from steer.settings import PAPER_TAU, TrainSettings

LATEST = "latest.json"  # names the last complete training state, inside --out
SETTINGS = "lora.settings.json"


@dataclass(frozen=True)
class LoraSettings:
    """The ReasonMaxxer recipe's LoRA training (see the module docstring)."""

    rank: int = 32
    alpha: int = 64
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lr: float = 1e-4
    warmup_steps: int = 50
    steps: int = 149
    accumulation: int = 8
    grad_clip: float = 1.0
    kl_weight: float = 0.2
    tau: float = PAPER_TAU
    checkpoints: tuple[int, ...] = (50, 100, 149)
    save_every: int = 5
    seed: int = 0
    pool: TrainSettings = field(default_factory=TrainSettings)  # the heads' pool settings


@dataclass(frozen=True)
class PoolRollout:
    """One pool rollout ready for training: its tokens, where the completion starts, which generated positions are
    decision points, and its advantage."""

    ids: list[int]
    prompt_length: int
    decision: torch.Tensor  # (completion tokens,) bool
    advantage: float


def training_sequences(rollouts_dir: Path, settings: LoraSettings) -> list[PoolRollout]:
    """The pool's rollouts with their decision masks (stored base entropy above `settings.tau`)."""
    folder = RolloutFolder(rollouts_dir)
    records = folder.read_records()
    pool = select_pool(records, settings.pool.pool_problems, settings.pool.keep_shortest,
                       settings.pool.advantage_clip)
    features = folder.scores.features(pool.keys)
    by_key = {r.key: r for r in records}
    sequences = []
    for key, entropy in zip(features.keys, features.entropy):
        record = by_key[key]
        completion = record.completion_ids[: len(entropy)]
        sequences.append(PoolRollout(record.prompt_ids + completion, len(record.prompt_ids),
                                   entropy[: len(completion)] > settings.tau, pool.advantages[key]))
    return sequences


def rollout_loss(model, sequence: PoolRollout, kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The recipe's loss on one rollout: `-A log pi(y_t)` averaged over its decision tokens, plus `kl_weight` times
    `KL(pi_base || pi)` averaged over its other generated positions (the base is the model with its adapter off)."""
    ids = torch.tensor([sequence.ids])
    generated = len(sequence.ids) - sequence.prompt_length
    keep = generated + 1  # the logits at the last prompt position predict the first generated token
    with torch.no_grad(), model.disable_adapter():
        base = torch.log_softmax(model(input_ids=ids, logits_to_keep=keep).logits[0, :-1].float(), dim=-1)
    log_pi = torch.log_softmax(model(input_ids=ids, logits_to_keep=keep).logits[0, :-1].float(), dim=-1)
    targets = ids[0, sequence.prompt_length:]
    decision = sequence.decision
    chosen = log_pi.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    zero = log_pi.new_zeros(())
    policy = -(sequence.advantage * chosen[decision]).mean() if decision.any() else zero
    other = ~decision
    kl = (base[other].exp() * (base[other] - log_pi[other])).sum(-1).mean() if other.any() else zero
    loss = policy + kl_weight * kl
    return loss, {"loss": float(loss.detach()), "policy": float(policy.detach()), "kl": float(kl.detach()),
                  "decision_tokens": int(decision.sum()), "tokens": len(sequence.ids)}


def schedule(step: int, settings: LoraSettings) -> float:
    """Learning-rate multiplier at optimiser step `step` (0-based): linear warm-up, then linear decay to 0."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    return max(0.0, (settings.steps - step) / max(1, settings.steps - settings.warmup_steps))


def adapted_model(model_path: str, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.targets),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def save_state(out: Path, model, optimiser: torch.optim.Optimizer, step: int, order: list[int],
               curve: list[dict]) -> None:
    """The resumable state after `step`: the adapter, AdamW's moments (safetensors) and the progress (JSON: the step,
    the order of rollouts, the curve), written whole into `state-<step>/` (a folder renamed into place), then named
    by `latest.json`; older states are removed after. A kill at any moment leaves the last complete state named."""
    final = out / f"state-{step}"
    tmp = out / f".state-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "adapter")
    moments = {}
    for index, param in enumerate(p for p in model.parameters() if p.requires_grad):
        entry = optimiser.state.get(param)
        if entry:
            moments[f"{index}.exp_avg"] = entry["exp_avg"].contiguous()
            moments[f"{index}.exp_avg_sq"] = entry["exp_avg_sq"].contiguous()
    save_file(moments, str(tmp / "optimizer.safetensors"))
    atomic_write_json(tmp / "progress.json", {"step": step, "order": order, "curve": curve})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write_json(out / LATEST, {"state": final.name})
    for old in out.glob("state-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_state(out: Path, model, optimiser: torch.optim.Optimizer) -> tuple[int, list[int] | None, list[dict]]:
    """Resume what [`save_state`] last named: the step reached, the order of rollouts, the curve."""
    latest = out / LATEST
    if not latest.exists():
        return 0, None, []
    from peft import set_peft_model_state_dict

    state = out / json.loads(latest.read_text())["state"]
    set_peft_model_state_dict(model, load_file(str(state / "adapter" / "adapter_model.safetensors")))
    saved = json.loads((state / "progress.json").read_text())
    moments = load_file(str(state / "optimizer.safetensors"))
    for index, param in enumerate(p for p in model.parameters() if p.requires_grad):
        if f"{index}.exp_avg" in moments:
            optimiser.state[param] = {"step": torch.tensor(float(saved["step"])),
                                      "exp_avg": moments[f"{index}.exp_avg"],
                                      "exp_avg_sq": moments[f"{index}.exp_avg_sq"]}
    return saved["step"], saved["order"], saved["curve"]


def train(model_path: str, rollouts_dir: Path, out: Path, settings: LoraSettings, until: int | None = None) -> dict:
    """Train (or resume) the LoRA; returns the run's record (also `out/lora.json` once all `settings.steps` are
    trained). A run resumes only with the settings and rollouts it started with (`lora.settings.json`). `until`
    ends this sitting after that step, its state saved: the learning-rate schedule stays the whole run's, and a
    later call goes on from there."""
    check_settings(out / SETTINGS, {"model": model_path, "rollouts": str(rollouts_dir), **asdict(settings)})
    sequences = training_sequences(rollouts_dir, settings)
    torch.manual_seed(settings.seed)
    model = adapted_model(model_path, settings)
    parameters = sum(p.numel() for p in model.get_base_model().parameters() if not p.requires_grad)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    step, order, curve = load_state(out, model, optimiser)
    if order is None:
        rng = random.Random(settings.seed)
        epochs = math.ceil(settings.steps * settings.accumulation / len(sequences))
        order = [i for _ in range(epochs) for i in rng.sample(range(len(sequences)), len(sequences))]
    model.train()
    stop = settings.steps if until is None else min(until, settings.steps)
    while step < stop:
        start = time.perf_counter()
        lr = settings.lr * schedule(step, settings)
        for group in optimiser.param_groups:
            group["lr"] = lr
        optimiser.zero_grad()
        parts = []
        for index in order[step * settings.accumulation:(step + 1) * settings.accumulation]:
            loss, values = rollout_loss(model, sequences[index], settings.kl_weight)
            (loss / settings.accumulation).backward()
            parts.append(values)
        norm = float(torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip))
        optimiser.step()
        step += 1
        tokens = sum(p["tokens"] for p in parts)
        curve.append({"step": step, "lr": lr, "grad_norm": norm,
                      "loss": sum(p["loss"] for p in parts) / len(parts),
                      "policy": sum(p["policy"] for p in parts) / len(parts),
                      "kl": sum(p["kl"] for p in parts) / len(parts),
                      "decision_tokens": sum(p["decision_tokens"] for p in parts), "tokens": tokens,
                      "flops": 6 * parameters * tokens, "seconds": time.perf_counter() - start})
        print(json.dumps(curve[-1]), flush=True)
        if step in settings.checkpoints:
            model.save_pretrained(out / f"checkpoint-{step}")
        if step % settings.save_every == 0 or step == stop:
            save_state(out, model, optimiser, step, order, curve)
    record = {"settings": asdict(settings), "rollouts": str(rollouts_dir), "pool_rollouts": len(sequences),
              "decision_fraction": float(torch.cat([s.decision for s in sequences]).float().mean()),
              "parameters": parameters, "trainable_parameters": sum(p.numel() for p in trainable),
              "steps": step, "flops": sum(c["flops"] for c in curve), "seconds": sum(c["seconds"] for c in curve),
              "checkpoints": {s: str(out / f"checkpoint-{s}") for s in settings.checkpoints if s <= step},
              "command": (f"python benches/reasonmaxxer_lora.py --model {model_path} --rollouts {rollouts_dir} "
                          f"--out {out} --steps {settings.steps} "
                          f"--checkpoints {','.join(map(str, settings.checkpoints))}")}
    if step == settings.steps:
        atomic_write_json(out / "lora.json", record)
    return record


def merge(model_path: str, checkpoint: Path, out: Path) -> Path:
    """The base model with the adapter in `checkpoint` merged into its weights, saved (with the tokenizer) to
    `out`."""
    from peft import PeftModel

    base: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rollouts", type=Path, required=True, help="a scored rollouts folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=LoraSettings.steps)
    parser.add_argument("--checkpoints", default=",".join(map(str, LoraSettings.checkpoints)))
    parser.add_argument("--until", type=int, help="end this sitting after this step (the schedule unchanged)")
    parser.add_argument("--merge", type=int, help="write the model merged with this checkpoint to OUT/merged-STEP")
    args = parser.parse_args()
    if args.merge is not None:
        print(merge(args.model, args.out / f"checkpoint-{args.merge}", args.out / f"merged-{args.merge}"))
        return
    settings = LoraSettings(steps=args.steps, checkpoints=tuple(int(s) for s in args.checkpoints.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    record = train(args.model, args.rollouts, args.out, settings, until=args.until)
    print(json.dumps({k: v for k, v in record.items() if k != "settings"}, indent=1))


if __name__ == "__main__":
    main()
