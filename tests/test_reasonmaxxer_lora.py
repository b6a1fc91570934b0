"""`benches/reasonmaxxer_lora.py`'s training across sittings: a run stopped early (`until`) and resumed ends where the
same run trained in one go ends, step for step, and only a finished run writes its record."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft", reason='peft is not installed (pip install -e ".[test]")')

BENCHES = Path(__file__).resolve().parents[1] / "benches"
sys.path.insert(0, str(BENCHES))
import reasonmaxxer_lora as lora  # noqa: E402

SETTINGS = lora.LoraSettings(rank=2, alpha=4, warmup_steps=2, steps=5, accumulation=2, checkpoints=(2, 5),
                             save_every=2)


def pool(seed: int = 0) -> list[lora.PoolRollout]:
    """Four rollouts of random tokens with decision points at random and advantages of both signs."""
    generator = torch.Generator().manual_seed(seed)
    rollouts = []
    for index, advantage in enumerate((1.0, -0.5, 0.8, -1.2)):
        prompt, completion = 3 + index, 6 + index
        ids = torch.randint(3, 60, (prompt + completion,), generator=generator).tolist()
        decision = torch.rand(completion, generator=generator) < 0.4
        rollouts.append(lora.PoolRollout(ids, prompt, decision, advantage))
    return rollouts


@pytest.fixture
def sequences(monkeypatch) -> list[lora.PoolRollout]:
    rollouts = pool()
    monkeypatch.setattr(lora, "training_sequences", lambda rollouts_dir, settings: rollouts)
    return rollouts


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_run_stopped_early_and_resumed_ends_as_one_trained_in_one_go(sequences, tiny_model_dir, tmp_path):
    whole = lora.train(str(tiny_model_dir), tmp_path / "rollouts", tmp_path / "whole", SETTINGS)

    stopped = lora.train(str(tiny_model_dir), tmp_path / "rollouts", tmp_path / "sittings", SETTINGS, until=3)
    assert stopped["steps"] == 3
    assert not (tmp_path / "sittings" / "lora.json").exists()  # unfinished: `--stage lora` trains on
    assert json.loads((tmp_path / "sittings" / lora.LATEST).read_text()) == {"state": "state-3"}  # not a save step
    assert list(stopped["checkpoints"]) == [2]
    resumed = lora.train(str(tiny_model_dir), tmp_path / "rollouts", tmp_path / "sittings", SETTINGS)

    assert resumed["steps"] == whole["steps"] == SETTINGS.steps
    assert (tmp_path / "sittings" / "lora.json").exists()
    curve = json.loads((tmp_path / "sittings" / "state-5" / "progress.json").read_text())["curve"]
    expected = json.loads((tmp_path / "whole" / "state-5" / "progress.json").read_text())["curve"]
    assert [c["lr"] for c in curve] == [c["lr"] for c in expected]  # the whole run's schedule in both
    torch.testing.assert_close(torch.tensor([c["loss"] for c in curve]), torch.tensor([c["loss"] for c in expected]))
    assert curve[-1]["loss"] != curve[0]["loss"]
    ours, theirs = adapter(tmp_path / "sittings" / "checkpoint-5"), adapter(tmp_path / "whole" / "checkpoint-5")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name])
    earlier = adapter(tmp_path / "whole" / "checkpoint-2")
    assert any(not torch.equal(earlier[name], theirs[name]) for name in theirs)  # training moved the adapter


def test_until_past_the_run_ends_it(sequences, tiny_model_dir, tmp_path):
    record = lora.train(str(tiny_model_dir), tmp_path / "rollouts", tmp_path / "run", SETTINGS, until=99)
    assert record["steps"] == SETTINGS.steps
    assert json.loads((tmp_path / "run" / "lora.json").read_text())["steps"] == SETTINGS.steps
