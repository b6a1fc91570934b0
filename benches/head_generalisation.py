"""Does a head learn anything that holds on problems it never saw? Cross-validation over the pool's problems.

    python benches/head_generalisation.py --model benches/models/Qwen2.5-Coder-0.5B-Instruct \\
        --rollouts benches/runs/gsm8k-Qwen2.5-Coder-0.5B-Instruct/heads/rollouts

The pool's problems (the library's pool: 50 problems nearest a pass rate of 0.5) are split into `--folds` folds; a
head is trained on the others' decision points with the library's settings (one variant at a time: label source,
objective, rank) and evaluated on the fold's, at every checkpoint, with no selection. Pooled over folds, every pool
problem is held out once, so the held-out figures rest on all of them, not on the handful a single split holds
out. Reported per variant and checkpoint: the held-out policy loss against the untrained head's (the base model's
own choice: a head that generalises lowers it), and the held-out gain with its standard error over problems.

With branch labels (`steer label`), the signal itself is measured at the labelled points: how often the base
top-1's continuation succeeds, how often the best candidate's does (the oracle), how often the candidates disagree,
and whether a linear probe on the hidden state, cross-validated over the same folds, picks a better candidate than
the base top-1; with several sampled continuations per candidate (`steer label --continuations N`), how much the
candidates' own success rates differ beyond sampling noise; with `--compare-labels`, how far another labelling of
the same points agrees with it.

Writes `benches/results/generalisation-<model>.json`, keeping the variants (each with its command) and the branch
signal that an earlier run on the same pool, folds and seed recorded there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from steer.files import atomic_write_json
from steer.head import CorrectionHead, HeadConfig, output_embedding
from steer.models import load_model
from steer.pipeline.folders.labels import LabelFolder, LabelPoint
from steer.pipeline.folders.rollouts import RolloutFolder
from steer.pipeline.objective import BranchBatch, Points, branch_batch, decision_batch
from steer.pipeline.pool import resolve_tau, select_pool
from steer.pipeline.training import fit_head
from steer.settings import TrainSettings

ROOT = Path(__file__).resolve().parent
VARIANTS = {  # name -> what differs from the library's TrainSettings
    "advantage": {},
    "advantage-recipe": {"objective": "recipe"},
    "advantage-rank2": {"rank": 2},
    "branches": {"labels": "branches"},
    "branches-rank2": {"labels": "branches", "rank": 2},
}


@dataclass(frozen=True)
class Checkpoint:
    """A variant at one step, pooled over folds: held-out loss (mean over problems) less the untrained head's, the
    held-out gain with its standard error over problems, and what the head does to the base top-1 there: the share
    of points where it changes the top-1, and the mean log-ratio of the top-1's probability, steered over base
    (above 0: the head sharpens the base choice, as a lower temperature would)."""

    step: int
    loss_vs_base: float
    loss_vs_base_se: float
    gain: float
    gain_se: float
    problems: int
    top1_changed: float
    top1_logratio: float


def top1_effect(points: Points, head: CorrectionHead, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point: whether the head changes the top-1, and the log-ratio of the base top-1's probability (steered
    over base). Column 0 of the candidates is the base top-1 in both kinds of points."""
    with torch.no_grad():
        if isinstance(points, BranchBatch):
            delta = head(points.hidden, embedding[points.ids])
        else:
            delta = head(points.hidden, embedding[points.ids], points.steerable)
        log_p = torch.log_softmax(points.base, dim=-1)
        log_q = torch.log_softmax(points.base + delta, dim=-1)
    return (log_q.argmax(-1) != log_p.argmax(-1)).float(), log_q[:, 0] - log_p[:, 0]


def folds_of(problems: list[str], folds: int, seed: int) -> list[set[str]]:
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed)).tolist()
    return [{problems[i] for i in order[f::folds]} for f in range(folds)]


def per_problem(values: torch.Tensor, groups: torch.Tensor) -> dict[int, float]:
    """Mean of `values` per problem index."""
    sums: dict[int, list[float]] = defaultdict(list)
    for value, group in zip(values.tolist(), groups.tolist()):
        sums[group].append(value)
    return {group: sum(v) / len(v) for group, v in sums.items()}


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def cross_validate(points: Points, groups: torch.Tensor, problem_ids: list[str], folds: list[set[str]],
                   embedding: torch.Tensor, settings: TrainSettings, hidden: int) -> list[Checkpoint]:
    """Train on all folds but one, evaluate on that one at every checkpoint (step 0: the untrained head, whose
    choice is the base model's); pool the held-out problems over folds."""
    loss_delta: dict[int, dict[int, float]] = defaultdict(dict)  # step -> problem -> policy loss less base's
    gains: dict[int, dict[int, float]] = defaultdict(dict)
    effects: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for fold_index, fold in enumerate(folds):
        held = torch.tensor([problem_ids[g] in fold for g in groups.tolist()])
        train, heldout = points.select(~held), points.select(held)
        if not len(heldout) or not len(train):
            continue
        config = HeadConfig(hidden_size=hidden, vocab_size=embedding.shape[0], rank=settings.rank,
                            top_k=settings.top_k, tau=0.0)
        torch.manual_seed(settings.seed + fold_index)
        fit = fit_head(CorrectionHead(config), train, heldout, embedding, settings, heldout_groups=groups[held])
        head = CorrectionHead(config)
        base_loss = None
        for evaluation, state in zip(fit.evaluations, fit.states):
            head.load_state_dict(state)
            with torch.no_grad():
                objective = heldout.loss(head, embedding, settings.kl_weight)
            losses = per_problem(objective.point_policy, groups[held])
            base_loss = base_loss or losses  # the first evaluation is step 0
            step = evaluation.step
            effects[step].append(top1_effect(heldout, head, embedding))
            for problem, value in per_problem(objective.point_gain, groups[held]).items():
                gains[step][problem] = value
                loss_delta[step][problem] = losses[problem] - base_loss[problem]
    result = []
    for step in sorted(gains):
        lmean, lse = mean_se(list(loss_delta[step].values()))
        gmean, gse = mean_se(list(gains[step].values()))
        changed = torch.cat([c for c, _ in effects[step]])
        logratio = torch.cat([r for _, r in effects[step]])
        result.append(Checkpoint(step, lmean, lse, gmean, gse, len(gains[step]), float(changed.mean()),
                                 float(logratio.mean())))
    return result


def candidate_effect(success: torch.Tensor, continuations: int, groups: torch.Tensor) -> tuple[float, float]:
    """How much the candidates' own success rates differ at a point, beyond the sampling noise of `continuations`
    graded continuations each: per point, the sample variance (divisor k - 1) of the candidates' shares `success`
    `(points, k)` less its expected sampling part (s(1 - s)/(n - 1) estimates p(1 - p)/n without bias), which
    estimates the same variance of their true rates p; the mean over problems and its standard error. 0 means the
    candidates at a point do not differ at all; at most k / (4(k - 1)) for even k and (k + 1) / (4k) for odd
    k (0.3 for k = 5: two certain candidates and three hopeless ones)."""
    noise = (success * (1 - success)).mean(-1) / (continuations - 1)
    effect = success.var(-1) - noise
    return mean_se(list(per_problem(effect, groups).values()))


def branch_signal(points: BranchBatch, groups: torch.Tensor, problem_ids: list[str],
                  folds: list[set[str]], continuations: int) -> dict:
    """What the branch labels say at their points, and what a cross-validated linear probe reads of it; with
    several continuations per candidate, how much the candidates' own success rates differ ([`candidate_effect`]).
    The other figures take the shares as they are: with sampled continuations their noise raises the oracle and
    the disagreements; the candidate effect alone is corrected for it."""
    success = points.success
    chosen_probe = torch.zeros(len(points))
    for fold in folds:
        held = torch.tensor([problem_ids[g] in fold for g in groups.tolist()])
        if not held.any() or held.all():
            continue
        train, heldout = points.select(~held), points.select(held)
        torch.manual_seed(0)
        mean, std = train.hidden.mean(0), train.hidden.std(0) + 1e-6
        probe = torch.nn.Linear(train.hidden.shape[1], train.success.shape[1])
        optimiser = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
        for _ in range(300):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(probe((train.hidden - mean) / std),
                                                                        train.success)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            scores = probe((heldout.hidden - mean) / std) + 1e-3 * heldout.base  # ties go to the likelier
        chosen_probe[held] = success[held].gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)
    base = success[:, 0]  # the candidates are the base top-k in order: column 0 is the base top-1
    effect = candidate_effect(success, continuations, groups) if continuations > 1 else None
    return {
        "continuations": continuations,
        "candidate_effect_variance": effect,
        "points": len(points),
        "problems": len(set(groups.tolist())),
        "base_top1_succeeds": float(base.mean()),
        "oracle_succeeds": float(success.max(-1).values.mean()),
        "candidates_disagree": float((success.max(-1).values != success.min(-1).values).float().mean()),
        "another_candidate_better": float((success.max(-1).values > base).float().mean()),
        "top1_better_than_all_others": float((base > success[:, 1:].max(-1).values).float().mean()),
        "probe_choice_succeeds": float(chosen_probe.mean()),
        "per_rank_success": success.mean(0).tolist(),
    }


def label_agreement(labels: dict[LabelPoint, list[float]], other: dict[LabelPoint, list[float]]) -> dict:
    """How far two labellings of the same points (say greedy and sampled continuations) agree on which candidate is
    better: the correlation of the candidates' labels once each point's mean is taken out, over the points both
    hold with as many candidates."""
    common = sorted(key for key in labels if len(other.get(key, [])) == len(labels[key]))
    if len(common) < 2:
        return {"points": len(common), "within_point_correlation": None}
    a, b = (torch.tensor([source[key] for key in common]) for source in (labels, other))
    centred = torch.stack([(x - x.mean(-1, keepdim=True)).flatten() for x in (a, b)])
    return {"points": len(common), "within_point_correlation": float(torch.corrcoef(centred)[0, 1])}


def same_pool(earlier: dict, record: dict) -> bool:
    """Whether an earlier results file was made on the same pool and folds (tau compared to float32 precision: it is
    resolved from float32 entropies)."""
    if not earlier or "pool" not in earlier:
        return False
    same = all(earlier.get(key) == record[key] for key in ("pool", "folds", "seed"))
    return same and math.isclose(earlier["tau"], record["tau"], rel_tol=1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rollouts", type=Path, required=True, help="a scored rollouts folder")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--out", type=Path, help="the results file (default: results/generalisation-<model>.json; "
                        "name another for labels made differently on the same pool)")
    parser.add_argument("--compare-labels", type=Path, help="another rollouts folder with labels of the same "
                        "rollouts (for example greedy continuations at the same points): records how far the two "
                        "labellings agree on which candidate is better")
    args = parser.parse_args()
    model, _ = load_model(args.model, device="cpu", dtype=torch.float32)
    embedding = output_embedding(model).detach()
    hidden = model.config.get_text_config().hidden_size
    del model
    folder = RolloutFolder(args.rollouts)
    defaults = TrainSettings()
    pool = select_pool(folder.read_records(), defaults.pool_problems, defaults.keep_shortest, defaults.advantage_clip)
    features = folder.scores.features(pool.keys)
    tau = resolve_tau(defaults, torch.cat(features.entropy), features.floor)
    problem_ids = sorted(pool.pass_rates)
    rollout_problem = torch.tensor([problem_ids.index(key[0]) for key in features.keys])
    folds = folds_of(problem_ids, args.folds, args.seed)
    labels = LabelFolder.of(folder.path)
    has_labels = labels.records_path.exists()
    success = labels.success() if has_labels else {}
    out = args.out or ROOT / "results" / f"generalisation-{Path(args.model).name}.json"
    command = " ".join(["python benches/head_generalisation.py", *sys.argv[1:]])
    record = {"tau": tau, "pool_problems": len(problem_ids), "folds": args.folds, "seed": args.seed,
              "pool": problem_ids, "labels": labels.recorded_settings() if has_labels else None, "variants": {}}
    earlier = json.loads(out.read_text()) if out.exists() else {}
    if same_pool(earlier, record):  # the variants an earlier run on the same folds (and labels) recorded stay
        same_labels = earlier.get("labels") == record["labels"]
        record["variants"] = {name: variant for name, variant in earlier["variants"].items()
                              if same_labels or VARIANTS[name].get("labels") != "branches"}
    for name in args.variants.split(","):
        settings = replace(defaults, **VARIANTS[name])
        if settings.labels == "branches":
            if not has_labels:
                continue
            points = branch_batch(features, success, tau, settings.top_k)
        else:
            points = decision_batch(features, pool.advantages, tau, settings.top_k, settings.objective)
        groups = rollout_problem[points.rollout]
        curve = cross_validate(points, groups, problem_ids, folds, embedding, settings, hidden)
        record["variants"][name] = {"settings": VARIANTS[name], "points": len(points), "command": command,
                                    "checkpoints": [asdict(c) for c in curve]}
        best = max(curve, key=lambda c: c.gain)
        print(f"{name}: {len(points)} points; held-out gain at step {best.step}: {best.gain:+.4f} "
              f"+- {best.gain_se:.4f}; loss vs base there {best.loss_vs_base:+.4f} +- {best.loss_vs_base_se:.4f}",
              flush=True)
    if has_labels:
        points = branch_batch(features, success, tau, defaults.top_k)
        continuations = labels.recorded_settings()["continuations"]
        record["branch_signal"] = branch_signal(points, rollout_problem[points.rollout], problem_ids, folds,
                                                continuations)
        if args.compare_labels:
            record["branch_signal"]["agreement"] = {
                "labels": str(args.compare_labels),
                **label_agreement(success, LabelFolder.of(args.compare_labels).success())}
        print(json.dumps(record["branch_signal"], indent=1))
    atomic_write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
