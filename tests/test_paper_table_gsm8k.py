"""`benches/paper_table_gsm8k.py`'s partial renders, which update the committed table in place where a run is rebuilt
on another machine without the other arms' folders: the footprint changes only its own keys and names the LoRA it
measured, a folder begun on another LoRA is refused, and a full render refuses to drop committed rows."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parents[1] / "benches"
sys.path.insert(0, str(BENCHES))
import paper_table_gsm8k as table  # noqa: E402

from steer.pipeline.folders.predictions import PredictionRecord  # noqa: E402
from steer.pipeline.folders.rollouts import RolloutRecord  # noqa: E402

TABLE_FILES = ("paper_table_gsm8k.json", "paper_table_gsm8k-gate.json")


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    """A copy of the committed table, which the stages under test read and write."""
    folder = tmp_path / "results"
    folder.mkdir()
    for name in TABLE_FILES:
        shutil.copy(BENCHES / "results" / name, folder / name)
    monkeypatch.setattr(table, "RESULTS", folder)
    return folder


def rollout(problem: int, sample: int, reward: float) -> RolloutRecord:
    return RolloutRecord(problem_id=str(problem), sample=sample, benchmark="train", gold="1", prompt="q",
                         prompt_ids=[1, 2], completion="a", completion_ids=[3, 4, 5][: 1 + sample % 3], answer="1",
                         reward=reward, finish_reason="length" if sample == 3 else "stop", num_tokens=1 + sample % 3)


def rebuilt_run(out: Path, step: int = 50) -> table.Setup:
    """A run folder with rollouts and a kept LoRA checkpoint, and none of the table's arms."""
    rollouts = out / "heads" / "rollouts"
    rollouts.mkdir(parents=True)
    records = [rollout(p, s, float((p + s) % 3 == 0)) for p in range(5) for s in range(4)]
    (rollouts / "rollouts.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
    keep_step(out, step)
    return table.Setup("model", Path("train.jsonl"), Path("test.jsonl"), out)


def begin_gate(out: Path) -> None:
    """A gate run begun in the rebuilt folder: two problems decoded, both arms."""
    folder = table.gate_folder(table.Setup("model", Path("train.jsonl"), Path("test.jsonl"), out))
    folder.mkdir(parents=True)
    records = [PredictionRecord(benchmark="test", problem_id=str(p), arm=arm, sample=0, completion="x", answer="1",
                                gold="1", correct=arm == "gate", finish_reason="stop", steps=3, gated=0, changed=0)
               for p in range(2) for arm in ("base", "gate")]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))


def keep_step(out: Path, step: int, trained: int = 149) -> None:
    """`selected.json` as `--stage lora` writes it, for a LoRA trained to step `trained` of 149."""
    (out / "lora").mkdir(parents=True, exist_ok=True)
    scores = {"50": 0.27, "100": 0.31 if step == 100 else 0.1, "149": 0.05}
    scores = {key: value for key, value in scores.items() if int(key) <= trained}
    (out / "lora" / "selected.json").write_text(json.dumps({"step": step, "merged": f"lora/merged-{step}",
                                                            "validation_greedy_accuracy": scores,
                                                            "trained_steps": trained, "of_steps": 149}))


def measure(setup: table.Setup) -> None:
    """What `--stage footprint` leaves: the measured LoRA, the footprint's report and the intervention's."""
    table.check_measured_lora(setup)
    report = {"positions": 2000, "differing": 60, "differ_fraction": 0.03, "rank_share": {"1": 0.97, "5": 0.99},
              "rank_share_differing": {"5": 0.9, "10": 0.95}, "verdict": "sparse", "reason": "few positions",
              "entropy": {"mean_all": 0.3, "mean_differing": 1.25, "ratio": 4.2},
              "gate": [{"tau": tau / 10, "gated_fraction": 0.5 - tau / 100, "recall": 1 - tau / 20, "precision": 0.1}
                       for tau in range(1, 31)],
              "spread": {"rollouts": 20, "with_any": 0.95, "per_rollout": {"mean": 3.0, "q1": 2, "median": 3, "q3": 4},
                         "first": {"mean": 30.0, "q1": 10, "median": 21, "q3": 40},
                         "place": {"mean": 0.4, "q1": 0.17, "median": 0.33, "q3": 0.64},
                         "differ_fraction_right": 0.034, "differ_fraction_wrong": 0.033}}
    (setup.out / "footprint" / "footprint.json").write_text(json.dumps(
        {"base": "model", "rl": "lora/merged-50", "rollouts": 20, "rl_accuracy": 0.3, "report": report, "plots": []}))
    arms = {"base": {"predictions": 20, "accuracy": 0.25, "gated": 0.0, "changed": 0.0, "recovered": None},
            "rl": {"predictions": 20, "accuracy": 0.35, "gated": 0.0, "changed": 0.0, "recovered": None},
            "gated": {"predictions": 20, "accuracy": 0.3, "gated": 0.05, "changed": 0.02, "recovered": 0.6,
                      "paired": {"test": "mcnemar", "problems": 20, "difference": 0.05, "p_value": 0.625,
                                 "gained": 3, "lost": 2}}}
    (setup.out / "intervention").mkdir()
    (setup.out / "intervention" / "intervention.json").write_text(json.dumps(
        {"tau": 1.4, "random_rate": 0.02, "benchmarks": {"test": arms}}))


def test_footprint_render_changes_only_its_own_keys(results, tmp_path):
    setup = rebuilt_run(tmp_path / "run")
    begin_gate(setup.out)  # unfinished: the committed gate stays as it is
    before = {name: (results / name).read_bytes() for name in TABLE_FILES}
    with pytest.raises(SystemExit, match="nothing to render"):
        table.stage_footprint_render(setup, [])
    measure(setup)
    table.stage_footprint_render(setup, [])

    old, new = (json.loads(before[TABLE_FILES[0]]), json.loads((results / TABLE_FILES[0]).read_text()))
    assert {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)} == {
        "footprint", "footprint_lora", "intervention"}
    assert new["footprint"]["differ_fraction"] == 0.03
    assert new["footprint_lora"]["rollouts"]["rollouts"] == 20
    assert (results / TABLE_FILES[1]).read_bytes() == before[TABLE_FILES[1]]  # the gate's pairs as committed
    markdown = (results / "paper_table_gsm8k.md").read_text()
    assert "top-1 differs at 3.00% of 2000 positions" in markdown
    assert ("Base entropy there averages 1.25 nats against 0.30 overall; the recipe's gate (above 1.4 nats) takes "
            "36.0% of positions and finds 30% of those where the top-1 differs (precision 10%). By sample: 95% of "
            "samples have such positions, 3.0 on average (quartiles 2, 3, 4), the first at median token 21; "
            "quartiles of their place in the completion 17%, 33%, 64%; they are 3.4% of the tokens of right samples "
            "and 3.3% of those of wrong ones.") in markdown
    assert "| gated | 0.300 | +0.050, p = 0.62 (3 gained, 2 lost) | 5.0% | 2.0% | 60% |" in markdown
    assert "| base | 0.250 | - |" in markdown  # and a report written before the paired tests: no test
    assert "no gain for the substitution arms to recover" not in markdown  # the LoRA gains here
    assert "measured a rebuilt run's LoRA, not the one in the rows above: its own 20 rollouts" in markdown


def test_an_intervention_without_a_gain_to_recover_says_so():
    row = {"predictions": 20, "accuracy": 0.25, "gated": 0.0, "changed": 0.0, "recovered": None}
    intervention = {"tau": 1.4, "random_rate": 0.02, "benchmarks": {"test": {"base": row, "rl": row}}}
    lines = table.lora_section({"compute": {}, "intervention": intervention})
    assert any("there is no gain for the substitution arms to recover" in line for line in lines)


def test_a_footprint_without_a_spread_says_nothing_of_it():
    assert table._spread_text({"entropy": {}}) == ""  # a report written before the spread
    no_difference = {"rollouts": 4, "with_any": 0.0, "per_rollout": {"mean": 0.0, "q1": 0, "median": 0, "q3": 0},
                     "first": None, "place": None, "differ_fraction_right": 0.0, "differ_fraction_wrong": 0.0}
    assert table._spread_text({"spread": no_difference}) == ""


def test_a_lora_trained_in_part_is_named_so(results, tmp_path):
    setup = rebuilt_run(tmp_path / "run")
    keep_step(setup.out, 50, trained=50)  # `--stage lora --lora-until 50`
    measure(setup)
    table.stage_footprint_render(setup, [])
    markdown = (results / "paper_table_gsm8k.md").read_text()
    assert ("kept checkpoint 50 (greedy accuracy on the validation problems: step 50 0.270, trained to step 50 of "
            "149)") in markdown


def test_a_lora_trained_again_on_the_tables_rollouts_is_the_tables_where_its_choice_is():
    rollouts = {"rollouts": 1280, "mean_reward": 0.265, "mixed_problems": 82, "truncated": 0.037, "median_tokens": 276}
    kept = {"step": 50, "validation_greedy_accuracy": {"50": 0.29, "100": 0.07, "149": 0.06}}
    again = {"step": 50, "validation_greedy_accuracy": {"50": 0.29}, "trained_steps": 50, "of_steps": 149}

    def text(measured_rollouts: dict, selected: dict) -> str:
        return table._measured_lora_text({"rollouts": rollouts, "compute": {"lora": {"selected": kept}},
                                          "footprint_lora": {"rollouts": measured_rollouts, "selected": selected}})

    assert text(rollouts, again) == ("The footprint and the intervention measured a LoRA trained on the table's "
                                     "rollouts that keeps its checkpoint 50 at the same validation accuracy (0.290), "
                                     "trained again to step 50 of 149.")
    assert text(rollouts, kept).endswith("at the same validation accuracy (0.290).")
    other_score = {**again, "validation_greedy_accuracy": {"50": 0.28}}
    assert "a rebuilt run's LoRA" in text(rollouts, other_score)
    assert "a rebuilt run's LoRA" in text({**rollouts, "mean_reward": 0.27}, again)


def test_a_folder_begun_on_another_lora_is_refused(results, tmp_path):
    setup = rebuilt_run(tmp_path / "run")
    measure(setup)
    table.check_measured_lora(setup)  # the same LoRA resumes
    keep_step(setup.out, 100)
    with pytest.raises(SystemExit, match="names another LoRA"):
        table.check_measured_lora(setup)


def test_a_full_render_may_not_drop_committed_rows():
    committed = {"greedy": {"base": {}, "lora": {}}, "sampled, unfinished": {"base": {}},
                 "one sample": {"base": {}, "gate": {}}}
    assert table.dropped_rows(committed, {"greedy": {"base": {}, "lora": {}}, "one sample": {"base": {}, "gate": {}},
                                          "sampled": {"base": {}}}) == []
    assert table.dropped_rows(committed, {"greedy": {"base": {}}, "sampled": {}}) == [
        "greedy: lora", "one sample: base", "one sample: gate"]


def test_an_unfinished_gate_renders_before_the_power_pilot(tmp_path):
    """Before the pilot sets avg@N's N, no averaged arm is planned, and the gate's progress renders on its own."""
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": "#### 1"}) + "\n" for i in range(3)))
    out = tmp_path / "run"
    begin_gate(out)
    setup = table.Setup("model", data, data, out, test_problems=3, gate_tau=1.0)
    progress, begun = table.unfinished(setup)
    assert progress == {"gate": {"done": 4, "planned": 6}}
    assert set(begun) == {"gate"}
    assert table.sampled_so_far(setup) == (progress, {})


def test_the_gate_render_needs_gate_decodes(results, tmp_path):
    setup = rebuilt_run(tmp_path / "run")
    with pytest.raises(SystemExit, match="no gate decodes"):
        table.stage_gate_render(setup, [])
