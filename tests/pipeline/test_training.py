"""Head training on synthetic decision points whose right candidate is a known function of the hidden state."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from steer import CorrectionHead, HeadConfig
from steer.pipeline.folders.scores import Features
from steer.pipeline.objective import MASKED, DecisionBatch, Losses, contrastive_loss, decision_batch
from steer.pipeline.pool import NoContrastError, select_pool
from steer.pipeline.training import (
    HELDOUT_PROBLEMS_WARNING,
    Estimate,
    TrainSettings,
    _schedule,
    choose_scale,
    fit_head,
    gate_warnings,
    problem_gain,
    select_within_one_se,
    selection_warnings,
    untrained_warnings,
)
from steer.settings import OBJECTIVES

HIDDEN, VOCAB, K, SAMPLES = 8, 12, 4, 8


@dataclasses.dataclass(frozen=True)
class Graded:
    """What the pool reads of a rollout (a `RolloutRecord` has more)."""

    problem_id: str
    sample: int
    reward: float
    num_tokens: int


class World:
    """Decision points with candidates 0..K-1 (plus noise tokens outside); candidate `right(h)` is the one a
    rollout must take to be rewarded. The base model is indifferent (uniform over the candidates)."""

    def __init__(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.embedding = torch.randn(VOCAB, HIDDEN, generator=generator)
        self.mixing = torch.randn(HIDDEN, HIDDEN, generator=generator)

    def right(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.mixing.T @ self.embedding[:K].T).argmax(dim=-1)

    def rollouts(self, problems: int, generator: torch.Generator, shuffle: bool = False):
        """One decision point per rollout; `SAMPLES` rollouts per problem, each taking a random candidate."""
        hidden = torch.randn(problems, HIDDEN, generator=generator).repeat_interleave(SAMPLES, dim=0)
        token = torch.randint(K, (problems * SAMPLES,), generator=generator)
        reward = (token == self.right(hidden)).float()
        if shuffle:
            reward = reward[torch.randperm(len(reward), generator=generator)]
        keys = [(f"p{i // SAMPLES}", i % SAMPLES) for i in range(problems * SAMPLES)]
        records = [Graded(p, s, float(r), 1) for (p, s), r in zip(keys, reward)]
        n = len(keys)
        logprobs = torch.full((n, VOCAB), -10.0)
        logprobs[:, :K] = -torch.log(torch.tensor(float(K)))
        features = Features(
            keys=keys, entropy=[torch.tensor([1.3])] * n, point_rollout=torch.arange(n),
            point_position=torch.zeros(n, dtype=torch.long), point_entropy=torch.full((n,), 1.3),
            point_hidden=hidden.half(), point_topk_ids=torch.arange(VOCAB).repeat(n, 1), point_topk_logprobs=logprobs,
            point_token=token, point_token_logprob=logprobs[torch.arange(n), token], floor=0.5,
            embedding_fingerprint=[],
        )
        return records, features


def train_and_score(world: World, shuffle: bool, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    records, features = world.rollouts(300, generator, shuffle=shuffle)
    pool = select_pool(records, problems=300, keep_shortest=1.0)
    points = decision_batch(features, pool.advantages, tau=1.0, top_k=K)
    head = CorrectionHead(HeadConfig(hidden_size=HIDDEN, vocab_size=VOCAB, rank=8, top_k=K, tau=1.0))
    settings = TrainSettings(steps=300, warmup_steps=20, rollouts_per_step=64, lr=1e-2, kl_weight=0.05)
    fit_head(head, points, points.select(torch.zeros(len(points), dtype=torch.bool)), world.embedding, settings)
    hidden = torch.randn(400, HIDDEN, generator=generator)  # fresh, held-out decision points
    with torch.no_grad():
        delta = head(hidden, world.embedding[:K].expand(400, -1, -1))
    return float((delta.argmax(dim=-1) == world.right(hidden)).float().mean())


def test_head_learns_the_right_candidate_from_the_hidden_state(seed):
    """The head picks the rewarded candidate at fresh decision points far above chance (0.25), and far above a head
    trained on the same rollouts with their rewards shuffled (which can only learn noise)."""
    world = World(seed)
    learned = train_and_score(world, shuffle=False, seed=seed)
    shuffled = train_and_score(world, shuffle=True, seed=seed)
    assert learned >= 0.5 and learned >= shuffled + 0.15, (learned, shuffled)


def test_pool_selection_follows_the_recipe():
    rates = {"a": [1, 0, 0, 0], "b": [1, 1, 0, 0], "c": [1, 1, 1, 1], "d": [0, 0, 0, 0], "e": [1, 1, 1, 0]}
    records = [Graded(p, s, float(r), 10 * s + len(p)) for p, rewards in rates.items() for s, r in enumerate(rewards)]
    pool = select_pool(records, problems=2, keep_shortest=0.75)
    assert sorted(pool.pass_rates) == ["a", "b"]  # b at 0.5 first, then a or e at 0.25/0.75 (ties by id)
    assert len(pool.advantages) == 6  # shortest 75% of 8 rollouts
    assert pool.advantages[("b", 0)] == pytest.approx(1.0) and pool.advantages[("b", 2)] == pytest.approx(-1.0)
    assert pool.advantages[("a", 0)] == pytest.approx(3 ** 0.5)  # (1 - 0.25) / std 0.433
    clipped = select_pool(records, problems=2, keep_shortest=1.0, clip=1.5)
    assert max(clipped.advantages.values()) == pytest.approx(1.5)


def test_no_contrast_is_refused_with_a_reason():
    records = [Graded(p, s, 0.0, 5) for p in "xy" for s in range(3)]
    with pytest.raises(NoContrastError, match="all wrong"):
        select_pool(records)
    with pytest.raises(NoContrastError, match="all right"):
        select_pool([dataclasses.replace(record, reward=1.0) for record in records])


def test_candidates_include_the_sampled_token_outside_the_top_k():
    features = Features(
        keys=[("p", 0), ("p", 1)], entropy=[torch.ones(1)] * 2, point_rollout=torch.tensor([0, 1]),
        point_position=torch.zeros(2, dtype=torch.long), point_entropy=torch.tensor([2.0, 2.0]),
        point_hidden=torch.zeros(2, 4, dtype=torch.float16), point_topk_ids=torch.tensor([[5, 6, 7], [5, 6, 7]]),
        point_topk_logprobs=torch.log(torch.tensor([[0.5, 0.3, 0.1]] * 2)), point_token=torch.tensor([6, 9]),
        point_token_logprob=torch.log(torch.tensor([0.3, 0.05])), floor=0.5, embedding_fingerprint=[],
    )
    batch = decision_batch(features, {("p", 0): 1.0, ("p", 1): -1.0}, tau=1.0, top_k=2)
    assert batch.ids.tolist() == [[5, 6, 0], [5, 6, 9]]
    assert batch.target.tolist() == [1, 2]
    assert batch.steerable.tolist() == [[True, True, False]] * 2
    assert batch.base[0, 2] < -1e8 and batch.base[1, 2] == pytest.approx(float(torch.log(torch.tensor(0.05))))
    assert batch.advantage.tolist() == [1.0, -1.0]
    assert len(decision_batch(features, {("p", 0): 1.0, ("p", 1): -1.0}, tau=2.5, top_k=2)) == 0


def test_learning_rate_schedule_warms_up_then_decays_to_zero():
    settings = TrainSettings(steps=10, warmup_steps=4)
    factors = [_schedule(step, settings) for step in range(10)]
    assert factors[:4] == sorted(factors[:4]) and factors[4] == 1.0
    assert factors[4:] == sorted(factors[4:], reverse=True) and factors[-1] > 0
    assert _schedule(10, settings) == 0.0


def loss_parts(shift: float, advantage: float, objective: str = "unlikelihood") -> Losses:
    """The loss at one decision point with two equally likely top-k candidates, of which the rollout took the first,
    when the head adds `shift` to the first and `-shift` to the second."""
    batch = DecisionBatch(
        hidden=torch.zeros(1, HIDDEN), ids=torch.tensor([[0, 1, 0]]), base=torch.tensor([[-0.7, -0.7, MASKED]]),
        steerable=torch.tensor([[True, True, False]]), target=torch.tensor([0]), advantage=torch.tensor([advantage]),
        rollout=torch.tensor([0]), objective=objective,
    )

    def head(hidden: torch.Tensor, embedding: torch.Tensor, steerable: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[shift, -shift, 0.0]])  # centred over the two steerable candidates

    return contrastive_loss(head, batch, torch.zeros(VOCAB, HIDDEN), 0.0)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_losses_push_choices_the_way_their_advantage_says(objective, advantage):
    """A positive advantage lowers the loss as the chosen candidate gains; a negative one as it loses."""
    losses = [float(loss_parts(advantage * shift, advantage, objective).loss) for shift in (1.0, 0.0, -1.0)]
    assert losses[0] < losses[1] < losses[2]


def test_unlikelihood_push_down_is_bounded_where_the_recipe_is_not():
    """Pushing a worse-than-average choice to probability 0 costs the recipe's loss -inf (it never stops), the
    unlikelihood loss approaches its floor of 0 (it stops)."""
    recipe, unlikelihood = ([float(loss_parts(-shift, -1.0, objective).loss) for shift in (5.0, 20.0, 80.0)]
                            for objective in ("recipe", "unlikelihood"))
    assert recipe[0] > recipe[1] > recipe[2] and recipe[2] < -100  # keeps falling, linearly in the shift
    assert all(0 <= value < 1e-3 for value in unlikelihood) and unlikelihood[0] > unlikelihood[2]


def test_gain_is_bounded_and_signed():
    """The held-out gain A (q/p - 1) is positive when the head favours a rewarded choice, at most A (1/p - 1)."""
    gains = [float(loss_parts(shift, 1.0).gain) for shift in (-3.0, 0.0, 3.0, 50.0)]  # one point: its gain
    assert gains[0] < 0 == gains[1] < gains[2] < gains[3] <= 1.0 + 1e-6


def test_strength_is_chosen_by_held_out_gain(seed):
    """A head that points the right way but timidly is made stronger; one that points the wrong way is damped to
    the smallest strength tried; the choice is the smallest strength within one standard error of the best."""
    world = World(seed)
    records, features = world.rollouts(200, torch.Generator().manual_seed(seed))
    pool = select_pool(records, problems=200, keep_shortest=1.0)
    points = decision_batch(features, pool.advantages, tau=1.0, top_k=K)
    groups = torch.tensor([int(features.keys[i][0][1:]) for i in points.rollout])
    head = CorrectionHead(HeadConfig(hidden_size=HIDDEN, vocab_size=VOCAB, rank=HIDDEN, top_k=K, tau=1.0))
    with torch.no_grad():  # delta_j = 0.01 <W_u[j], M h>: the right candidate's logit is the largest, barely
        head.down.copy_(torch.eye(HIDDEN))
        head.up.copy_(0.01 * world.mixing)
    settings = TrainSettings(scales=(0.5, 1.0, 10.0, 100.0))
    gains = choose_scale(head, points, world.embedding, settings, groups)
    best = max(gains.values(), key=lambda gain: gain.mean)
    assert gains[100.0].mean > gains[1.0].mean + gains[1.0].standard_error  # timid strengths are clearly worse
    assert head.scale == min(scale for scale, gain in gains.items() if gain.mean >= best.mean - best.standard_error)
    assert head.scale >= 10.0
    with torch.no_grad():
        head.up.neg_()
    choose_scale(head, points, world.embedding, settings, groups)
    assert head.scale == 0.5
    choose_scale(head, points.select(torch.zeros(len(points), dtype=torch.bool)), world.embedding, settings)
    assert head.scale == 1.0
    with pytest.raises(ValueError, match="scales"):
        TrainSettings(scales=())


def test_one_standard_error_rule_keeps_the_simplest_choice_the_data_cannot_tell_from_the_best():
    assert select_within_one_se([Estimate(0.0, 0.0), Estimate(0.05, 0.01), Estimate(0.055, 0.01)]) == 1
    assert select_within_one_se([Estimate(0.0, 0.0), Estimate(0.01, 0.02), Estimate(0.03, 0.04)]) == 0
    assert select_within_one_se([Estimate(-0.1, 0.0), Estimate(0.2, 0.01), Estimate(0.1, 0.05)]) == 1
    with pytest.raises(ValueError, match="no held-out estimates"):
        select_within_one_se([])


def test_the_null_choice_is_kept_unless_the_best_clears_it_by_the_margin():
    """GSM8K's advantage head on Qwen2.5-Coder-0.5B: the best held-out gain, +0.021 +- 0.0165 at step 40, cleared
    the untrained head by one standard error (step 20 was kept) but not by two."""
    curve = [Estimate(0.0, 0.0), Estimate(0.0014, 0.0018), Estimate(0.0113, 0.0089), Estimate(0.021, 0.0165)]
    assert select_within_one_se(curve) == 2
    assert select_within_one_se(curve, null_margin=2.0) == 0
    assert select_within_one_se(curve, null_margin=1.0) == 2
    clear = [Estimate(0.0, 0.0), Estimate(0.03, 0.01), Estimate(0.05, 0.01)]  # 5 standard errors above zero
    assert select_within_one_se(clear, null_margin=2.0) == 2
    assert select_within_one_se([Estimate(0.01, 0.0), Estimate(0.02, 0.004)], null_margin=2.0) == 1
    assert select_within_one_se([Estimate(0.02, 0.0), Estimate(0.025, 0.004)], null_margin=2.0) == 0  # from the null
    assert select_within_one_se([Estimate(0.0, 0.0), Estimate(0.001, 0.0)], null_margin=2.0) == 1  # exact: clears
    assert select_within_one_se([Estimate(0.0, 0.0), Estimate(0.01, 0.005)], null_margin=0.0) == 1
    assert select_within_one_se([Estimate(0.0, 0.0), Estimate(-0.01, 0.005)], null_margin=0.0) == 0
    with pytest.raises(ValueError, match="held-out estimate 1 is not finite"):
        select_within_one_se([Estimate(0.0, 0.0), Estimate(float("nan"), 0.01)], null_margin=2.0)
    for margin in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="null_margin must be finite and >= 0"):
            TrainSettings(null_margin=margin)


def test_one_held_out_problem_gives_no_standard_error_so_the_untrained_head_is_kept(seed):
    """On real rewards a trained step clears the margin over many held-out problems; held out on one problem, the
    same training has no standard error to clear it with."""
    world = World(seed)
    records, features = world.rollouts(200, torch.Generator().manual_seed(seed))
    pool = select_pool(records, problems=200, keep_shortest=1.0)
    points = decision_batch(features, pool.advantages, tau=1.0, top_k=K)
    problem = torch.tensor([int(features.keys[i][0][1:]) for i in points.rollout])
    settings = TrainSettings(steps=60, warmup_steps=10, rollouts_per_step=64, lr=1e-2, kl_weight=0.05)
    kept = {}
    for name, heldout in (("many", problem >= 150), ("one", problem == int(problem[problem >= 150][0]))):
        head = CorrectionHead(HeadConfig(hidden_size=HIDDEN, vocab_size=VOCAB, rank=8, top_k=K, tau=1.0))
        fit = fit_head(head, points.select(~heldout), points.select(heldout), world.embedding, settings,
                       heldout_groups=problem[heldout])
        kept[name] = fit.selected_step
    assert kept["many"] > 0 and kept["one"] == 0


def test_problem_gain_averages_each_problem_first():
    """Standard errors are over problems, not points: a problem with many points weighs as much as one with few."""
    gain = problem_gain(torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0]), torch.tensor([3, 3, 3, 3, 7]))
    assert gain.mean == pytest.approx(0.0) and gain.standard_error == pytest.approx(1.0)
    single = problem_gain(torch.tensor([0.5, 0.1]), torch.tensor([0, 0]))
    assert single.mean == pytest.approx(0.3) and single.standard_error == 0.0
    assert problem_gain(torch.tensor([0.2, 0.4]), None).mean == pytest.approx(0.3)


def test_training_keeps_a_trained_checkpoint_only_where_it_clearly_beats_the_untrained_head(seed):
    """Step 0 (the untrained head, which changes nothing) is a candidate: on real rewards a trained step beats it by
    more than `null_margin` standard errors and the earliest within one standard error of the best is kept; on
    shuffled rewards the rule is the same, and the head holds the kept evaluation's weights."""
    world = World(seed)
    settings = TrainSettings(steps=100, warmup_steps=10, rollouts_per_step=64, lr=1e-2, kl_weight=0.05)
    for shuffle in (False, True):
        records, features = world.rollouts(200, torch.Generator().manual_seed(seed), shuffle=shuffle)
        pool = select_pool(records, problems=200, keep_shortest=1.0)
        points = decision_batch(features, pool.advantages, tau=1.0, top_k=K)
        problem = torch.tensor([int(features.keys[i][0][1:]) for i in points.rollout])
        heldout = problem >= 150
        head = CorrectionHead(HeadConfig(hidden_size=HIDDEN, vocab_size=VOCAB, rank=8, top_k=K, tau=1.0))
        fit = fit_head(head, points.select(~heldout), points.select(heldout), world.embedding, settings,
                       heldout_groups=problem[heldout])
        first = fit.evaluations[0]
        assert first.step == 0 and first.gain == 0.0 and first.gain_se == 0.0
        best = max(fit.evaluations, key=lambda e: e.gain)
        if best.gain - settings.null_margin * best.gain_se <= 0:
            chosen = first
        else:
            chosen = next(e for e in fit.evaluations if e.gain >= best.gain - best.gain_se)
        assert fit.selected_step == chosen.step
        with torch.no_grad():
            now = points.select(heldout).loss(head, world.embedding, settings.kl_weight)
        assert problem_gain(now.point_gain, problem[heldout]).mean == pytest.approx(chosen.gain, abs=1e-6)
        if not shuffle:
            assert fit.selected_step > 0 and not untrained_warnings(fit.selected_step, 1, settings.null_margin)
    warning = untrained_warnings(0, 1, 2.0)
    assert warning and "2 standard errors" in warning[0] and not untrained_warnings(0, 0, 2.0)


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="objective must be one of unlikelihood, recipe; got 'ppo'"):
        TrainSettings(objective="ppo")


def test_a_tau_that_gates_many_steps_is_warned_about():
    features = Features(
        keys=[("p", 0)], entropy=[torch.tensor([0.1, 0.2, 2.0, 3.0])], point_rollout=torch.zeros(0, dtype=torch.long),
        point_position=torch.zeros(0, dtype=torch.long), point_entropy=torch.zeros(0),
        point_hidden=torch.zeros(0, 4, dtype=torch.float16), point_topk_ids=torch.zeros(0, 2, dtype=torch.long),
        point_topk_logprobs=torch.zeros(0, 2), point_token=torch.zeros(0, dtype=torch.long),
        point_token_logprob=torch.zeros(0), floor=0.0, embedding_fingerprint=[],
    )
    assert gate_warnings(features, tau=3.5) == []
    [warning] = gate_warnings(features, tau=1.0)
    assert "gates 50%" in warning and "--tau-quantile" in warning
    assert TrainSettings().tau is None and TrainSettings().tau_quantile == 0.95


def test_a_choice_made_on_few_heldout_problems_is_warned_about():
    assert selection_warnings(HELDOUT_PROBLEMS_WARNING, 300) == []
    [warning] = selection_warnings(4, 177)
    assert "4 held-out problems (177 decision points)" in warning and "--heldout-fraction" in warning
