"""The RL footprint and the causal intervention on two models whose difference is planted at known positions.

Both models are exact bigram models: a one-layer Llama whose attention and MLP write nothing, whose embedding is the
identity and whose output embedding holds a table of next-token logits. After a digit d the next is d + 1 (mod 10),
with certainty; after any other token, "1". After "5" alone both models hesitate between "6" and "0" (high entropy),
the base model leaning to "6" and the RL model to "0". So the two differ exactly at the positions whose current token
is "5", where the RL choice is the base model's second.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from steer.analysis.footprint import (
    POSITIONS_FILE,
    FootprintSettings,
    GateQuality,
    Positions,
    Quartiles,
    RolloutSpread,
    compare_positions,
    footprint,
    footprint_report,
    rollout_spread,
)
from steer.analysis.intervention import SubstitutionProcessor, intervene, recovered_share, substitution
from steer.cli.analyze import spread_lines
from steer.cli.main import main
from steer.pipeline.decoding import DecodingSettings, decode_batch
from steer.pipeline.evaluation import EvalSettings
from steer.pipeline.folders.rollouts import RolloutFolder
from steer.pipeline.grading import extract_answer
from steer.pipeline.problems import Problem
from steer.pipeline.prompts import build_prompt, encode_prompt
from steer.pipeline.rollout import RolloutSettings
from steer.world.tokenizer import char_tokenizer

VOCAB = len(char_tokenizer())
HIDDEN = 108  # even head size for rotary embeddings; one dimension unused
TAU = 1.0  # between the certain rows (~1e-4 nats) and the hesitant one (~4.3 nats)


def bigram_model(table: torch.Tensor) -> LlamaForCausalLM:
    """A Llama whose logits after token c are exactly `table[c]`."""
    config = LlamaConfig(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=2, hidden_size=HIDDEN,
                         intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                         rms_norm_eps=1e-12)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(VOCAB, HIDDEN))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # the final norm scales the one-hot state e_c to sqrt(HIDDEN) e_c
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :VOCAB] = table.T / math.sqrt(HIDDEN)
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def digits(tokenizer) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list("0123456789"))


@pytest.fixture(scope="module")
def planted(digits):
    """`(base, rl)` bigram models that differ only after "5"."""
    table = torch.zeros(VOCAB, VOCAB)
    table[:, digits[1]] = 12.0
    for d in range(10):
        table[digits[d]] = 0.0
        table[digits[d], digits[(d + 1) % 10]] = 12.0
    rl_table = table.clone()
    five, six, zero = digits[5], digits[6], digits[0]
    table[five, six], table[five, zero] = 3.0, 2.5
    rl_table[five, six], rl_table[five, zero] = 2.5, 3.0
    return bigram_model(table), bigram_model(rl_table)


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return [Problem(f"p{i}", "What is " + "1 + " * i + "1?", "0", "planted") for i in range(5)]


def test_bigram_models_hold_their_tables(planted, digits):
    base, rl = planted
    logits = base(torch.tensor([[digits[5], digits[3]]])).logits[0]
    assert logits[0, digits[6]].item() == pytest.approx(3.0, abs=1e-4)
    assert logits[1, digits[4]].item() == pytest.approx(12.0, abs=1e-4)
    assert rl(torch.tensor([[digits[5]]])).logits[0, 0].argmax().item() == digits[0]


def test_footprint_finds_exactly_the_planted_positions(planted, digits, tokenizer, problems, tmp_path):
    base, rl = planted
    settings = FootprintSettings(
        rollouts=RolloutSettings(samples=3, batch_size=4, decoding=DecodingSettings(1.0, 1.0, max_new_tokens=24)),
        max_batch_tokens=200,  # several teacher-forced passes
        taus=(0.5, TAU, 5.0),
    )
    report = footprint(base, rl, tokenizer, problems, tmp_path, settings, progress=False).report

    rollouts = RolloutFolder(tmp_path / "rollouts").read_records()
    by_rollout = [[(r.prompt_ids + r.completion_ids)[len(r.prompt_ids) - 1 + t] == digits[5]
                   for t in range(len(r.completion_ids))] for r in rollouts]
    expected = torch.tensor([hit for row in by_rollout for hit in row])
    positions = Positions.load(tmp_path / POSITIONS_FILE)
    assert positions.lengths.tolist() == [len(row) for row in by_rollout]
    firsts = [row.index(True) for row in by_rollout if any(row)]
    assert report.spread.rollouts == len(rollouts)
    assert report.spread.with_any == pytest.approx(len(firsts) / len(rollouts))
    assert report.spread.per_rollout.mean == pytest.approx(sum(map(sum, by_rollout)) / len(rollouts))
    assert report.spread.first.median == pytest.approx(statistics.median(firsts))
    for right, share in ((True, report.spread.differ_fraction_right), (False, report.spread.differ_fraction_wrong)):
        rows = [row for row, r in zip(by_rollout, rollouts) if (r.reward > 0) == right]
        tokens = sum(map(len, rows))
        assert share == (pytest.approx(sum(map(sum, rows)) / tokens) if tokens else None)
    assert expected.any() and not expected.all()
    assert torch.equal(positions.differ, expected)
    assert torch.equal(positions.rank, torch.where(expected, 2, 1))
    assert report.positions == expected.numel()
    assert report.differ_fraction == pytest.approx(expected.float().mean().item())
    assert report.rank_share["1"] == pytest.approx(1 - report.differ_fraction)
    assert report.rank_share["5"] == report.rank_share_differing["5"] == 1.0
    assert report.entropy.ratio > 5
    gates = {g.tau: g for g in report.gate}
    assert gates[TAU].precision == gates[TAU].recall == 1.0
    assert gates[0.5].recall == 1.0 and gates[5.0].precision is None
    assert report.histograms["rank_differing"]["2"] == int(expected.sum())
    assert all((tmp_path / name).stat().st_size > 0 for name in ("entropy.png", "rank.png"))
    assert json.loads((tmp_path / "footprint.json").read_text())["report"]["differing"] == int(expected.sum())


class RecordingDecoder:
    """A [`Decoder`] that samples with a transformers model and counts its calls."""

    name_or_path = "recording-sampler"

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer, self.calls = model, tokenizer, 0

    def decode(self, prompt_ids, settings, seeds):
        self.calls += 1  # one seed for the whole batch (a real Decoder seeds each prompt): enough for this test
        return decode_batch(self.model, self.tokenizer, prompt_ids, settings, seeds[0])

    def run_settings(self):
        return {"engine": "recording"}


def test_footprint_compares_the_samplers_completions(planted, tokenizer, problems, tmp_path):
    """With `sampler` (an engine that decodes with the RL model's weights, vLLM in practice) the completions come
    from it, and both models are teacher-forced on exactly those."""
    base, rl = planted
    sampler = RecordingDecoder(rl, tokenizer)
    settings = FootprintSettings(
        rollouts=RolloutSettings(samples=2, batch_size=4, decoding=DecodingSettings(1.0, 1.0, max_new_tokens=24)))
    report = footprint(base, rl, tokenizer, problems, tmp_path, settings, sampler=sampler, progress=False).report
    stored = json.loads((tmp_path / "rollouts" / "rollouts.settings.json").read_text())
    rollouts = RolloutFolder(tmp_path / "rollouts").read_records()
    assert sampler.calls > 0 and stored["model"] == "recording-sampler" and stored["engine"] == "recording"
    assert len(rollouts) == 2 * len(problems)
    assert report.positions == sum(len(r.completion_ids) for r in rollouts) > 0


def test_footprint_report_counts_by_hand():
    positions = Positions(torch.tensor([0.1, 2.0, 0.3, 1.5, 3.0]), torch.tensor([False, True, False, False, True]),
                          torch.tensor([1, 3, 1, 1, 12]), lengths=torch.tensor([5]))
    report = footprint_report(positions, taus=(1.0, 2.5))
    assert report.differ_fraction == pytest.approx(0.4)
    assert report.rank_share == {"1": pytest.approx(0.6), "5": pytest.approx(0.8), "10": pytest.approx(0.8)}
    assert report.rank_share_differing == {"5": 0.5, "10": 0.5}
    assert report.entropy.mean_differing == pytest.approx(2.5)
    assert report.entropy.ratio == pytest.approx(2.5 / 1.38)
    assert report.gate[0] == GateQuality(tau=1.0, gated_fraction=0.6, precision=pytest.approx(2 / 3), recall=1.0)
    assert report.gate[1] == GateQuality(tau=2.5, gated_fraction=0.2, precision=1.0, recall=0.5)
    assert report.histograms["rank_differing"]["3"] == 1 and report.histograms["rank_differing"][">10"] == 1
    assert report.verdict == "dense" and "40.0% of positions" in report.reason
    with pytest.raises(ValueError, match="no positions"):
        footprint_report(Positions(torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
                                   lengths=torch.zeros(0, dtype=torch.long)))


def test_rollout_spread_counts_by_hand(tmp_path):
    differ = torch.tensor([False, False, True, True,  # rollout 0 (right): first at 2, places 2/4 and 3/4
                           False, False, False,       # rollout 1 (wrong): none
                           True, False])              # rollout 2 (wrong): first at 0, place 0/2
    positions = Positions(torch.rand(9), differ, torch.where(differ, 2, 1), lengths=torch.tensor([4, 3, 2]))
    spread = rollout_spread(positions, rewards=[1.0, 0.0, 0.0])
    assert spread.rollouts == 3 and spread.with_any == pytest.approx(2 / 3)
    assert spread.per_rollout == Quartiles(mean=1.0, q1=0.5, median=1.0, q3=1.5)
    assert spread.first == Quartiles(mean=1.0, q1=0.5, median=1.0, q3=1.5)
    assert spread.place == Quartiles(mean=pytest.approx(1.25 / 3), q1=0.25, median=0.5, q3=0.625)
    assert spread.differ_fraction_right == 0.5 and spread.differ_fraction_wrong == pytest.approx(1 / 5)
    assert rollout_spread(positions).differ_fraction_right is None
    with pytest.raises(ValueError, match="2 rewards for 3 rollouts"):
        rollout_spread(positions, rewards=[1.0, 0.0])
    with pytest.raises(ValueError, match="lengths sum to 8, but there are 9 positions"):
        Positions(torch.rand(9), differ, torch.ones(9, dtype=torch.long), lengths=torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="non-negative integers"):
        Positions(torch.rand(9), differ, torch.ones(9, dtype=torch.long), lengths=torch.tensor([4.5, 4.5]))
    nothing = Positions(torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
                        lengths=torch.zeros(0, dtype=torch.long))
    assert rollout_spread(nothing, rewards=[]) == RolloutSpread(0, 0.0, None, None, None)
    assert spread_lines(rollout_spread(nothing)) == ["no completions compared"]
    positions.save(tmp_path / POSITIONS_FILE)
    assert torch.equal(Positions.load(tmp_path / POSITIONS_FILE).lengths, positions.lengths)
    save_file({"entropy": torch.rand(2), "differ": torch.zeros(2, dtype=torch.bool),
               "rank": torch.ones(2, dtype=torch.long)}, tmp_path / "old.safetensors")
    with pytest.raises(ValueError, match="no rollout lengths"):
        Positions.load(tmp_path / "old.safetensors")
    assert spread_lines(spread) == [
        "per completion: 1.0 differing positions (quartiles 0.5, 1, 1.5); 67% of completions have one",
        "  the first at median token 1; their place in the completion, quartiles 25%, 50%, 62%",
        "  differing share of tokens: right completions (reward > 0) 50.00%, wrong 20.00%",
    ]


@pytest.mark.parametrize("differing, rank, verdict", [
    (0, 2, "none"),     # nothing to reproduce
    (3, 2, "sparse"),   # 3% of positions, all to the base's second choice: the paper's footprint
    (3, 7, "dense"),    # as few positions, but to tokens outside the base top-5: no re-ranking of the top-k finds them
    (12, 2, "dense"),   # 12% of positions: far more than a few decision points
])
def test_footprint_verdict_says_whether_a_head_can_reproduce_the_change(differing, rank, verdict):
    differ = torch.zeros(100, dtype=torch.bool)
    differ[torch.randperm(100)[:differing]] = True
    ranks = torch.where(differ, torch.tensor(rank), torch.tensor(1))
    report = footprint_report(Positions(torch.rand(100) * 3, differ, ranks, torch.tensor([60, 40])), taus=(1.0,))
    assert report.verdict == verdict, report.reason


def test_ties_and_padded_vocabularies_do_not_count_as_changes(planted, digits, tokenizer):
    """A choice tied for the base model's first place is the same choice; an RL model whose vocabulary is padded
    larger than the base model's (or the other way round) is compared over the shared part."""
    base, rl = planted
    rollout = SimpleNamespace(prompt_ids=[digits[1]], completion_ids=[digits[2], digits[5], digits[6]])
    tied = bigram_model(torch.zeros(VOCAB, VOCAB))  # every token tied everywhere
    assert not compare_positions(tied, rl, [rollout], progress=False).differ.any()
    padded = bigram_model(torch.zeros(VOCAB, VOCAB))
    padded.resize_token_embeddings(VOCAB + 5)
    with torch.no_grad():
        padded.lm_head.weight.copy_(torch.cat([rl.lm_head.weight, torch.zeros(5, HIDDEN)]))
        padded.model.embed_tokens.weight.copy_(torch.eye(VOCAB + 5, HIDDEN))
    for pair in ((base, padded), (padded, base)):
        positions = compare_positions(*pair, [rollout], progress=False)
        assert positions.differ.tolist() == [False, False, True]


def _prompts(tokenizer, problems):
    return [encode_prompt(tokenizer, build_prompt(tokenizer, p.question)) for p in problems]


GREEDY = DecodingSettings(temperature=0, max_new_tokens=20)


def test_gated_substitution_reproduces_the_rl_model(planted, digits, tokenizer, problems):
    base, rl = planted
    prompts = _prompts(tokenizer, problems)
    alone = {name: decode_batch(model, tokenizer, prompts, GREEDY, seed=0)
             for name, model in zip(("base", "rl"), planted)}
    gated = decode_batch(base, tokenizer, prompts, GREEDY, seed=0, processor=substitution(rl, tau=TAU))
    assert [c.token_ids for c in gated] == [c.token_ids for c in alone["rl"]] != [c.token_ids for c in alone["base"]]
    for completion in gated:
        fives = completion.token_ids[:-1].count(digits[5])  # the current token of every step but the first
        assert completion.gated == completion.changed == fives > 0
    never = decode_batch(base, tokenizer, prompts, GREEDY, seed=0, processor=substitution(rl, rate=0.0))
    assert [c.token_ids for c in never] == [c.token_ids for c in alone["base"]]
    assert all(c.gated == 0 for c in never)


def test_substitution_runs_the_other_model_in_lockstep(make_model, tokenizer, problems):
    """Substituting at every step must reproduce the other model's own greedy decoding: its KV cache, positions and
    mask follow `generate` through left padding."""
    base, other = make_model("llama", seed=1), make_model("llama", seed=2)
    prompts = _prompts(tokenizer, problems)
    assert len(set(map(len, prompts))) > 1
    own = decode_batch(other, tokenizer, prompts, GREEDY, seed=0)
    forced = decode_batch(base, tokenizer, prompts, GREEDY, seed=0, processor=substitution(other, rate=1.0))
    assert [c.token_ids for c in forced] == [c.token_ids for c in own]
    assert all(c.gated == c.steps for c in forced)


def test_random_steps_follow_the_decoding_seed(make_model, tokenizer, problems):
    base, other = make_model("llama", seed=1), make_model("llama", seed=2)
    prompts = _prompts(tokenizer, problems)
    factory = substitution(other, rate=0.5)
    masks = {seed: [c.gated for c in decode_batch(base, tokenizer, prompts, GREEDY, seed, factory)] for seed in (1, 2)}
    again = [c.gated for c in decode_batch(base, tokenizer, prompts, GREEDY, 1, factory)]
    assert again == masks[1] != masks[2]
    assert 0 < sum(masks[1]) < sum(c.steps for c in decode_batch(base, tokenizer, prompts, GREEDY, 1))


def test_substitution_refuses_bad_arguments(make_model):
    other = make_model("llama")
    mask = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        SubstitutionProcessor(other, mask)
    with pytest.raises(ValueError, match="rate"):
        SubstitutionProcessor(other, mask, rate=1.5)
    processor = SubstitutionProcessor(other, mask, tau=1.0)
    with pytest.raises(ValueError, match="beam search"):
        processor(torch.ones(4, 3, dtype=torch.long), torch.zeros(4, VOCAB))


def test_recovered_share():
    assert recovered_share(0.2, 0.6, 0.5) == pytest.approx(0.75)
    assert recovered_share(0.4, 0.4, 0.5) is None
    assert recovered_share(0.4, 0.3, 0.35) is None  # RL lost accuracy: nothing to recover


def test_intervention_recovers_the_planted_gain(planted, tokenizer, problems, tmp_path):
    base, rl = planted
    prompts = _prompts(tokenizer, problems)
    rl_answers = [extract_answer(c.text) for c in decode_batch(rl, tokenizer, prompts, GREEDY, seed=0)]
    graded = [Problem(p.id, p.question, answer, p.benchmark) for p, answer in zip(problems, rl_answers)]
    settings = EvalSettings(decoding=GREEDY, batch_size=2)
    report = intervene(base, rl, tokenizer, {"planted": graded}, tmp_path, settings, tau=TAU, progress=False)
    arms = report.benchmarks["planted"]
    assert (arms["base"].accuracy, arms["rl"].accuracy, arms["gated"].accuracy) == (0.0, 1.0, 1.0)
    assert arms["gated"].recovered == 1.0
    assert arms["gated"].gated == arms["gated"].changed == pytest.approx(report.random_rate)
    assert report.random_rate > 0
    assert 0 <= arms["random"].gated <= 1 and arms["random"].recovered is not None
    assert arms["base"].paired is None
    assert (arms["rl"].paired.gained, arms["rl"].paired.lost) == (len(problems), 0)
    assert arms["gated"].paired.difference == 1.0 and arms["gated"].paired.p_value < 0.1
    random_correct = round(arms["random"].accuracy * len(problems))  # paired with base across the two folders
    assert (arms["random"].paired.problems, arms["random"].paired.gained) == (len(problems), random_correct)
    assert json.loads((tmp_path / "intervention.json").read_text()) == dataclasses.asdict(report)
    again = intervene(base, rl, tokenizer, {"planted": graded}, tmp_path, settings, tau=TAU, progress=False)
    assert again == report


def test_analyze_commands_on_a_model_against_itself(tiny_model_dir, arithmetic_file, tmp_path):
    common = ["--base", str(tiny_model_dir), "--rl", str(tiny_model_dir), "--data", str(arithmetic_file),
              "--limit", "3", "--max-new-tokens", "8", "--json"]
    result = CliRunner().invoke(main, ["analyze", "footprint", *common, "--out", str(tmp_path / "f"),
                                       "--samples", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report = report["report"]
    assert report["differ_fraction"] == 0.0 and report["rank_share"]["1"] == 1.0 and report["positions"] > 0
    assert report["verdict"] == "none"
    assert report["spread"]["rollouts"] == 6 and report["spread"]["with_any"] == 0.0
    assert report["spread"]["first"] is None and report["spread"]["per_rollout"]["mean"] == 0.0
    result = CliRunner().invoke(main, ["analyze", "intervene", *common, "--out", str(tmp_path / "i"),
                                       "--temperature", "0", "--tau", "0"])
    assert result.exit_code == 0, result.output
    arms = json.loads(result.stdout.strip().splitlines()[-1])["benchmarks"]["arithmetic"]
    assert {arm: row["accuracy"] for arm, row in arms.items()} == {a: arms["base"]["accuracy"] for a in arms}
    assert arms["gated"]["gated"] == 1.0 and arms["gated"]["changed"] == 0.0
    assert arms["gated"]["recovered"] is None
    assert arms["random"]["paired"]["difference"] == 0.0 and arms["random"]["paired"]["p_value"] == 1.0
