"""The steering processor on tiny random models of many architectures and every decoding mode it supports."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

import steer
from steer import CorrectionHead, HeadMismatchError, SteeringError, SteeringProcessor

PROMPTS = ["2+3=", "Let x be 7. Then", "ab"]
FLOAT32_ONLY = {"gemma2", "mixtral", "qwen2_moe"}


def random_head(model, tau: float, top_k: int = 5, scale: float = 3.0) -> CorrectionHead:
    head = CorrectionHead.for_model(model, rank=4, top_k=top_k, tau=tau)
    torch.nn.init.normal_(head.up, std=scale)
    return head


def encode(tokenizer, prompts=PROMPTS):
    return dict(tokenizer(prompts, return_tensors="pt", padding=True))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()
    lse = torch.logsumexp(x, -1, keepdim=True)
    p = torch.exp(x - lse)
    return lse.squeeze(-1) - torch.where(torch.isfinite(x), p * x, torch.zeros_like(x)).sum(-1)


def median_entropy(model, inputs) -> float:
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    return float(entropy(logits).median())


class HiddenRecorder:
    """Test-side hook, independent of the processor's: the last-position input of the LM head at every forward."""

    def __init__(self, model):
        self.states: list[torch.Tensor] = []
        self.handle = model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: self.states.append(args[0][:, -1].detach().clone())
        )


def sequences(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.sequences


def test_fresh_head_gives_plain_generate_output(arch, make_model, tokenizer):
    model = make_model(arch)
    inputs = encode(tokenizer)
    for tau in (0.0, float("inf")):  # tau=0 gates every row: the adjustment runs, and adds zero
        head = CorrectionHead.for_model(model, tau=tau)
        plain = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(steer.generate(model, head, **inputs, max_new_tokens=8, do_sample=False), plain)
        torch.manual_seed(11)
        plain = model.generate(**inputs, max_new_tokens=8, do_sample=True, top_p=0.9, temperature=0.8)
        torch.manual_seed(11)
        steered = steer.generate(model, head, **inputs, max_new_tokens=8, do_sample=True, top_p=0.9, temperature=0.8)
        assert torch.equal(steered, plain)


def test_random_head_changes_only_topk_logits_of_gated_rows(arch, make_model, tokenizer, seed):
    model = make_model(arch)
    inputs = encode(tokenizer)
    head = random_head(model, tau=median_entropy(model, inputs), top_k=3)
    weight = model.get_output_embeddings().weight
    recorder = HiddenRecorder(model)
    out, stats = steer.generate(
        model, head, **inputs, max_new_tokens=6, do_sample=False, return_stats=True,
        return_dict_in_generate=True, output_logits=True, output_scores=True,
    )
    recorder.handle.remove()
    assert len(recorder.states) == len(out.logits) == stats.steps == 6
    gated_rows = 0
    for raw, steered, hidden in zip(out.logits, out.scores, recorder.states):
        base_entropy = entropy(raw)
        clear = (base_entropy - head.tau).abs() > 1e-4  # rows too close to tau may gate either way in float32
        gated = (steered != raw).any(-1)
        assert torch.equal(gated[clear], (base_entropy > head.tau)[clear])
        gated_rows += int(gated.sum())
        top = raw.topk(head.top_k, dim=-1).indices
        outside = torch.ones_like(raw, dtype=torch.bool).scatter(-1, top, False)
        assert torch.equal(steered[outside], raw[outside]), "a logit outside the top-k changed"
        with torch.no_grad():
            delta = torch.einsum("bkh,bh->bk", weight[top].float(), head.project(hidden))
            delta = delta - delta.mean(dim=-1, keepdim=True)  # centred over the k candidates
        expected = torch.where(gated.unsqueeze(-1), raw.gather(-1, top) + delta, raw.gather(-1, top))
        torch.testing.assert_close(steered.gather(-1, top), expected, rtol=1e-5, atol=1e-5)
    assert stats.rows == 6 * len(PROMPTS) and stats.gated == gated_rows
    assert 0 < stats.gated < stats.rows, "tau at the median entropy should gate some rows but not all"


class LogitsRecorder:
    """Test-side hook on the whole model: the last-position logits of every forward, as the model returned them."""

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self.handle = model.register_forward_hook(
            lambda module, args, output: self.logits.append(output.logits[:, -1].detach().float().clone())
        )


def generate_with_processor(model, processor, inputs) -> tuple[object, list[torch.Tensor]]:
    """`generate` as the README's direct use of the processor, keeping raw logits and processed scores."""
    recorder = LogitsRecorder(model)
    try:
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([processor]), max_new_tokens=6,
                             do_sample=False, output_logits=True, output_scores=True, return_dict_in_generate=True)
    finally:
        recorder.handle.remove()
    return out, recorder.logits


def test_processor_used_directly_leaves_generate_raw_logits_alone(arch, make_model, tokenizer):
    """With the processor in `logits_processor` and `output_logits=True`, `generate`'s raw logits are what the model
    produced, and its processed scores differ from them at the gated rows only."""
    model = make_model(arch)
    inputs = encode(tokenizer)
    head = random_head(model, tau=median_entropy(model, inputs), top_k=3)
    with SteeringProcessor(model, head, record_rows=True) as steering:
        out, produced = generate_with_processor(model, steering, inputs)
        gated_steps, _ = steering.row_masks()
    assert len(out.logits) == len(produced) == gated_steps.shape[1] == 6
    for step, (raw, processed, model_logits) in enumerate(zip(out.logits, out.scores, produced)):
        assert torch.equal(raw, model_logits), f"step {step}: generate's raw logits are not the model's"
        differs = (processed != raw).any(-1)
        assert torch.equal(differs, gated_steps[:, step]), f"step {step}: steered rows are not the gated rows"
    assert 0 < int(gated_steps.sum()) < gated_steps.numel()

    # the opt-in in-place mode writes into the very tensor generate keeps: the test above would see it
    with SteeringProcessor(model, head, inplace=True) as steering:
        out, produced = generate_with_processor(model, steering, inputs)
    assert any(not torch.equal(raw, model_logits) for raw, model_logits in zip(out.logits, produced))


def test_left_padded_row_steers_as_the_same_row_alone(arch, make_model, tokenizer, seed):
    # float64, so that padding cannot flip a near-tie, where the architecture runs in it (MoE grouped matmuls do not;
    # Gemma-2's eager attention gives NaN on padded rows).
    model = make_model(arch, dtype=torch.float32 if arch in FLOAT32_ONLY else torch.float64)
    inputs = encode(tokenizer)
    head = random_head(model, tau=median_entropy(model, inputs))
    fixed_length = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)  # no early EOS: rows stay comparable
    batch = steer.generate(model, head, **inputs, **fixed_length)
    for row, prompt in enumerate(PROMPTS):
        alone = steer.generate(model, head, **encode(tokenizer, [prompt]), **fixed_length)
        assert torch.equal(batch[row, -6:], alone[0, -6:]), f"row {row} ({prompt!r}) steered differently when padded"


def test_kv_cache_does_not_change_steering(make_model, tokenizer, seed):
    model = make_model("llama", dtype=torch.float64)
    inputs = encode(tokenizer)
    head = random_head(model, tau=median_entropy(model, inputs))
    cached = steer.generate(model, head, **inputs, max_new_tokens=6, do_sample=False)
    uncached = steer.generate(model, head, **inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert not torch.equal(cached, model.generate(**inputs, max_new_tokens=6, do_sample=False)), "nothing steered"
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch_name", ["llama", "gpt2", "mixtral"])
def test_beam_search_and_several_return_sequences(arch_name, make_model, tokenizer):
    model = make_model(arch_name)
    inputs = encode(tokenizer)
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    fresh = CorrectionHead.for_model(model, tau=0.0)
    assert torch.equal(steer.generate(model, fresh, **inputs, **beams), model.generate(**inputs, **beams))
    steered, stats = steer.generate(model, random_head(model, tau=0.0), **inputs, **beams, return_stats=True)
    assert steered.shape[0] == 2 * len(PROMPTS)
    assert stats.rows == stats.gated == 5 * 3 * len(PROMPTS) and stats.changed > 0
    torch.manual_seed(3)
    sampled = steer.generate(model, fresh, **inputs, max_new_tokens=5, do_sample=True, num_return_sequences=3)
    torch.manual_seed(3)
    assert torch.equal(sampled, model.generate(**inputs, max_new_tokens=5, do_sample=True, num_return_sequences=3))


class Recorder(LogitsProcessor):
    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return scores


def test_runs_first_among_other_processors(make_model, tokenizer):
    model = make_model("llama")
    inputs = encode(tokenizer)
    penalty = RepetitionPenaltyLogitsProcessor(1.5)
    fresh = CorrectionHead.for_model(model, tau=0.0)
    plain = model.generate(**inputs, max_new_tokens=6, do_sample=False, logits_processor=[penalty])
    assert torch.equal(steer.generate(model, fresh, **inputs, max_new_tokens=6, do_sample=False,
                                      logits_processor=[penalty]), plain)
    recorder = Recorder()
    out = steer.generate(model, random_head(model, tau=0.0), **inputs, max_new_tokens=3, do_sample=False,
                         logits_processor=[recorder], return_dict_in_generate=True, output_scores=True)
    for seen, final in zip(recorder.seen, out.scores):
        assert torch.equal(seen, final), "a later processor did not see the steered scores"


def test_counters_and_row_masks(make_model, tokenizer):
    model = make_model("gpt2")
    inputs = encode(tokenizer)
    with SteeringProcessor(model, random_head(model, tau=-1.0), record_rows=True) as steering:
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                       logits_processor=LogitsProcessorList([steering]))
        stats = steering.stats
        gated, changed = steering.row_masks()
        assert (stats.steps, stats.rows, stats.gated) == (4, 12, 12)
        assert gated.shape == changed.shape == (3, 4) and gated.all()
        assert stats.changed == int(changed.sum()) and stats.changed_fraction == stats.changed / 12
        steering.reset()
        assert steering.stats == steer.SteeringStats()


def hooks(model) -> int:
    return len(model.get_output_embeddings()._forward_hooks)


def test_hook_is_removed_on_close_and_when_generate_raises(make_model, tokenizer):
    model = make_model("llama")
    head = CorrectionHead.for_model(model)
    steering = SteeringProcessor(model, head)
    assert hooks(model) == 1
    steering.close()
    steering.close()
    assert hooks(model) == 0

    class Boom(LogitsProcessor):
        def __call__(self, input_ids, scores):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        steer.generate(model, head, **encode(tokenizer), max_new_tokens=4, logits_processor=[Boom()])
    assert hooks(model) == 0
    with pytest.raises(KeyboardInterrupt), SteeringProcessor(model, head) as steering:
        model.generate(**encode(tokenizer), max_new_tokens=4, logits_processor=LogitsProcessorList([steering, Boom()]))
    assert hooks(model) == 0


def test_head_for_another_model_is_refused_at_construction(make_model):
    head = CorrectionHead.for_model(make_model("llama", seed=0))
    with pytest.raises(HeadMismatchError):
        SteeringProcessor(make_model("llama", seed=5), head)
    with pytest.raises(HeadMismatchError):
        steer.generate(make_model("gpt2"), head, input_ids=torch.tensor([[5, 6]]))


def test_modes_with_several_positions_per_step_are_refused(make_model, tokenizer):
    model, draft = make_model("llama", seed=0), make_model("llama", seed=1)
    head = CorrectionHead.for_model(model)
    inputs = encode(tokenizer, ["2+3="])
    with pytest.raises(SteeringError, match="assisted generation"):
        steer.generate(model, head, **inputs, assistant_model=draft, max_new_tokens=4)
    with pytest.raises(SteeringError, match="classifier-free guidance"):
        steer.generate(model, head, **inputs, guidance_scale=2.0, max_new_tokens=4)
    # The same modes reached through model.generate directly are caught at run time.
    with SteeringProcessor(model, head) as steering, pytest.raises(SteeringError, match="several positions"):
        model.generate(**inputs, assistant_model=draft, max_new_tokens=4, do_sample=False,
                       logits_processor=LogitsProcessorList([steering]))
    with SteeringProcessor(model, head) as steering, pytest.raises(SteeringError, match="forward passes"):
        model.generate(**inputs, guidance_scale=2.0, max_new_tokens=4, do_sample=False,
                       logits_processor=LogitsProcessorList([steering]))
    assert hooks(model) == 0
