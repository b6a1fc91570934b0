"""Shared fixtures: tiny random causal LMs of many architectures, built from configs (no hub), and a local tokenizer."""

from __future__ import annotations

import math
import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter; it must be on before a kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM

from steer.head import CorrectionHead  # noqa: E402
from steer.world.tokenizer import char_tokenizer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 107  # the char tokenizer's size over printable ASCII
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=2)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

# name -> (config class, kwargs). Covers tied and untied output embeddings, soft-capped logits (Gemma-2), a logit
# scale (Cohere, Granite), mixture-of-experts blocks (Mixtral, Qwen2-MoE), and learned or rotary positions.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {**DECODER, "tie_word_embeddings": False}),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "gemma2": (
        "Gemma2Config",
        {**DECODER, "head_dim": 8, "final_logit_softcapping": 2.0, "attn_logit_softcapping": 50.0,
         "sliding_window": 16, "query_pre_attn_scalar": 8},
    ),
    "cohere": ("CohereConfig", {**DECODER, "logit_scale": 0.25}),
    "granite": ("GraniteConfig", {**DECODER, "logits_scaling": 4.0}),
    "mixtral": ("MixtralConfig", {**DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {**DECODER, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
         "shared_expert_intermediate_size": 32},
    ),
    "qwen2": ("Qwen2Config", {**DECODER, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {**DECODER, "pad_token_id": 0}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                   "num_attention_heads": 4}),
    "opt": ("OPTConfig", {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "word_embed_proj_dim": 32}),
}


def build_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random model of architecture `name`, in eval mode."""
    config_class, kwargs = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**{**COMMON, **kwargs})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    tok = char_tokenizer()
    assert len(tok) == VOCAB
    return tok


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param


@pytest.fixture
def seed() -> int:
    """A fresh random seed for each test, printed so that a failure can be replayed."""
    value = int.from_bytes(os.urandom(4), "little")
    print(f"seed={value}")
    torch.manual_seed(value)
    return value


@pytest.fixture(scope="session")
def make_model():
    """The factory `build_model(name, seed=0, dtype=torch.float32)` of tiny random models."""
    return build_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny Llama with the character tokenizer: a model folder like any other, loadable by path."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = build_model("llama", seed=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def arithmetic_file(tmp_path):
    """A GSM8K-style JSONL file of 12 small problems."""
    import json

    path = tmp_path / "arithmetic.jsonl"
    lines = [json.dumps({"question": f"What is {a} + {a + 1}?", "answer": f"Add them.\n#### {2 * a + 1}"})
             for a in range(12)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def planted_choice(tokenizer):
    """A bigram model over characters with one planted decision: after the assistant marker it writes "1", then
    1 -> 2 -> 3 -> 4 -> 5 with certainty; after "5" it hesitates between "6" (favoured, logit 3) and "7" (logit 1);
    after "6" or "7" it ends. Greedy decoding answers 123456; the rank-2 choice at the decision point gives 123457."""
    vocab = len(tokenizer)
    digit = dict(zip("0123456789", tokenizer.convert_tokens_to_ids(list("0123456789"))))
    table = torch.full((vocab, vocab), -20.0)
    table[:, digit["1"]] = 12.0  # after anything else: "1"
    for a, b in ("12", "23", "34", "45"):
        table[digit[a]] = -20.0
        table[digit[a], digit[b]] = 12.0
    table[digit["5"]] = -20.0
    table[digit["5"], digit["6"]], table[digit["5"], digit["7"]] = 3.0, 1.0
    for end in "67":
        table[digit[end]] = -20.0
        table[digit[end], tokenizer.eos_token_id] = 12.0
        table[digit[end], digit["8"]] = -4.0  # the certain rows' second candidates differ from the decision's
    config = transformers.LlamaConfig(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                      hidden_size=108, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                                      rms_norm_eps=1e-12)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, 108))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :vocab] = table.T / math.sqrt(108)
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def model_and_head(make_model):
    """A tiny Llama and a random head that gates about half of the steps and changes some top-1s."""
    model = make_model("llama", seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a random model is nearly uniform; this spreads its entropies over 0-2.5 nats
    torch.manual_seed(1)
    head = CorrectionHead.for_model(model, rank=4, top_k=4, tau=1.0)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(std=1.0)
    return model, head
