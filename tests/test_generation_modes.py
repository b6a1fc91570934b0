"""Decoding paths that would not steer are refused, never run unsteered: continuous batching, custom_generate, the
generation modes transformers moved to the Hub, and any path that skips the logits processors."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList

import steer
from steer.generation import check_supported
from steer.processor import SteeringError, SteeringProcessor

PROMPT = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])


@pytest.fixture
def model(make_model):
    return make_model("llama", seed=3)


@pytest.fixture
def head(model):
    """A head that changes greedy tokens of the tiny Llama (checked in `test_the_head_changes_tokens`)."""
    head = steer.CorrectionHead.for_model(model, rank=4, top_k=5, tau=0.0, seed=0)
    with torch.no_grad():
        head.up.copy_(torch.randn(head.up.shape, generator=torch.Generator().manual_seed(1)) * 3.0)
    return head


def count_forwards(model) -> list[int]:
    calls = [0]
    model.get_output_embeddings().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_head_changes_tokens(model, head):
    plain = model.generate(input_ids=PROMPT, max_new_tokens=8, do_sample=False)
    steered = steer.generate(model, head, input_ids=PROMPT, max_new_tokens=8, do_sample=False)
    assert not torch.equal(plain, steered)


def test_generate_batch_is_refused_while_a_processor_is_attached(model, head):
    with SteeringProcessor(model, head):
        with pytest.raises(SteeringError, match="continuous batching"):
            model.generate_batch([[5, 6, 7, 8]], max_new_tokens=4)
        with pytest.raises(SteeringError, match="continuous batching"):
            model.init_continuous_batching()
        with pytest.raises(SteeringError, match="continuous batching"):
            with model.continuous_batching_context_manager():
                pass
    # Closed: the model's own method is back (running it takes over 10 s on a CPU, so it is not run here).
    assert model.init_continuous_batching.__func__ is type(model).init_continuous_batching


def test_paged_generate_with_a_processor_is_refused(model, head):
    """Without the refusal, `generate(cache_implementation="paged")` drops `logits_processor` and decodes unsteered."""
    with SteeringProcessor(model, head) as steering:
        with pytest.raises(SteeringError, match="continuous batching"):
            model.generate(input_ids=PROMPT[:1], max_new_tokens=4, cache_implementation="paged",
                           logits_processor=LogitsProcessorList([steering]))
        assert steering.stats.steps == 0


def test_steer_generate_refuses_paged_before_decoding(model, head):
    forwards = count_forwards(model)
    with pytest.raises(SteeringError, match="continuous batching"):
        steer.generate(model, head, input_ids=PROMPT, max_new_tokens=4, cache_implementation="paged")
    assert forwards[0] == 0


def test_refusal_lasts_until_the_last_processor_is_closed(model, head):
    outer = SteeringProcessor(model, head)
    with SteeringProcessor(model, head):
        pass
    assert "init_continuous_batching" in model.__dict__
    outer.close()
    outer.close()  # idempotent
    assert "init_continuous_batching" not in model.__dict__


def test_a_dropped_processor_releases_continuous_batching(model, head):
    SteeringProcessor(model, head)
    gc.collect()
    assert "init_continuous_batching" not in model.__dict__


@pytest.mark.parametrize("custom", ["some-org/some-method", lambda model, **kwargs: None], ids=["repo", "callable"])
def test_custom_generate_is_refused(model, head, custom):
    with pytest.raises(SteeringError, match="custom_generate"):
        steer.generate(model, head, input_ids=PROMPT, max_new_tokens=4, custom_generate=custom)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dola_layers": "high"},
        {"penalty_alpha": 0.6, "top_k": 4},
        {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.5},
        {"num_beams": 2, "force_words_ids": [[5]]},
    ],
    ids=["dola", "contrastive", "group-beam", "constrained-beam"],
)
def test_modes_moved_to_the_hub_are_refused_before_decoding(model, head, kwargs):
    forwards = count_forwards(model)
    with pytest.raises(SteeringError, match="steering supports"):
        steer.generate(model, head, input_ids=PROMPT, max_new_tokens=4, **kwargs)
    assert forwards[0] == 0


def test_modes_set_in_the_generation_config_are_refused(model, head):
    config = GenerationConfig(penalty_alpha=0.6, top_k=4, max_new_tokens=4)
    with pytest.raises(SteeringError, match="contrastive_search"):
        steer.generate(model, head, input_ids=PROMPT, generation_config=config)


@pytest.mark.parametrize(
    "kwargs", [{"do_sample": False}, {"do_sample": True}, {"num_beams": 2}, {"num_beams": 2, "do_sample": True}],
    ids=["greedy", "sample", "beam", "beam-sample"],
)
def test_steerable_modes_pass_and_steer(model, head, kwargs):
    check_supported(model, kwargs)
    _, stats = steer.generate(model, head, input_ids=PROMPT, max_new_tokens=3, return_stats=True, **kwargs)
    assert stats.steps == 3 and stats.gated > 0


def test_a_path_that_skips_the_processors_is_refused_after_the_fact(model, head, monkeypatch):
    """The backstop for paths no check knows: tokens came back, the processor never ran."""

    def unsteered_generate(input_ids, logits_processor=None, **kwargs):
        return torch.cat([input_ids, input_ids[:, :2]], dim=-1)

    monkeypatch.setattr(model, "generate", unsteered_generate)
    with pytest.raises(SteeringError, match="without calling the logits processors"):
        steer.generate(model, head, input_ids=PROMPT, max_new_tokens=2)
