"""How often greedy decoding through vLLM and through `steer.generate` part ways, with the same head, and why.

    python benches/vllm_agreement.py --model benches/models/SmolLM2-135M-Instruct
    python benches/vllm_agreement.py --model benches/models/Qwen2.5-Coder-0.5B-Instruct --problems 32 \
        --tensor-parallel-size 2        # two tensor-parallel ranks (one CPU core each here)

Both engines decode `--problems` arithmetic prompts greedily in float32, `--new-tokens` each, with a random head
gating every step (tau = 0) and without one. For each sequence that differs, the step where it first does and the
margin there between the two best candidates of the transformers engine's (steered) scores, recomputed by one
forward pass over the shared prefix: a margin of a few 1e-5 is a near-tie that the engines' float32 arithmetic (other
kernels, other summation orders, batched against alone) breaks differently. With `--tensor-parallel-size N`
vLLM runs N ranks (each steers the logits gathered from all of them). Writes
`benches/results/vllm-agreement-<model>[-tpN].json`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import steer
from steer.files import atomic_write_json
from steer.head import CorrectionHead
from steer.models import load_model
from steer.pipeline.problems import load_problems
from steer.pipeline.prompts import build_prompt, encode_prompt

ROOT = Path(__file__).resolve().parent


def hf_greedy(model, prompts, new_tokens, head=None) -> list[list[int]]:
    """Each prompt alone (no padding), greedy."""
    outputs = []
    for ids in prompts:
        kwargs = dict(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
        out = steer.generate(model, head, **kwargs) if head is not None else model.generate(**kwargs)
        outputs.append(out[0, len(ids):].tolist())
    return outputs


def margin_at(model, head, prompt: list[int], prefix: list[int]) -> float:
    """The gap between the two best (steered, if `head`) next-token scores after `prompt + prefix`."""
    with torch.no_grad():
        out = model(torch.tensor([prompt + prefix]), output_hidden_states=True)
    logits = out.logits[:, -1].float()
    if head is not None:
        hidden = out.hidden_states[-1][:, -1]
        weight = model.get_output_embeddings().weight
        logits = steer.steer_logits(logits, head.project(hidden), weight, head.top_k, head.tau).logits
    top = logits.topk(2).values[0]
    return float(top[0] - top[1])


def compare(model, head, prompts, hf, vllm) -> dict:
    differing = []
    for prompt, a, b in zip(prompts, hf, vllm):
        if a == b:
            continue
        step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        differing.append({"step": step, "margin": margin_at(model, head, prompt, a[:step])})
    return {"sequences": len(prompts), "differing": len(differing), "first_difference": differing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "arithmetic.jsonl")
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    args = parser.parse_args()

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from steer.integrations.vllm import set_steering, steered_llm

    model, tokenizer = load_model(args.model, device="cpu", dtype=torch.float32)
    prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, p.question))
               for p in load_problems(args.data)[: args.problems]]
    head = CorrectionHead.for_model(model, rank=16, top_k=5, tau=0.0, seed=0)
    torch.nn.init.normal_(head.up, std=0.05, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as folder:
        head.save_pretrained(folder)
        parallel = ({"tensor_parallel_size": args.tensor_parallel_size, "distributed_executor_backend": "mp"}
                    if args.tensor_parallel_size > 1 else {})
        llm = steered_llm(args.model, folder, dtype="float32", enforce_eager=True, seed=0, max_model_len=1024,
                          **parallel)
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        decoded = {}
        for steered in (True, False):
            set_steering(llm, steered)
            decoded[steered] = [list(o.outputs[0].token_ids) for o in llm.generate(requests, params, use_tqdm=False)]
    record = {"command": " ".join(["python benches/vllm_agreement.py", *sys.argv[1:]]),
              "arguments": {k: str(v) for k, v in vars(args).items()}}
    hf = {True: hf_greedy(model, prompts, args.new_tokens, head), False: hf_greedy(model, prompts, args.new_tokens)}
    for steered, name in ((True, "steered"), (False, "base")):
        record[name] = compare(model, head if steered else None, prompts, hf[steered], decoded[steered])
        print(name, {k: v for k, v in record[name].items() if k != "first_difference"},
              sorted(d["margin"] for d in record[name]["first_difference"])[:10])
    record["changed_by_the_head"] = sum(a != b for a, b in zip(hf[True], hf[False]))
    suffix = f"-tp{args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    atomic_write_json(ROOT / "results" / f"vllm-agreement-{Path(args.model).name}{suffix}.json", record)


if __name__ == "__main__":
    main()
