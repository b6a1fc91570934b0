"""The fused Triton kernel against a float64 reference, its dispatch, and the processor on both paths.

Without a GPU the kernel runs under Triton's interpreter (conftest sets `TRITON_INTERPRET=1`), which is exact but
slow: vocabularies stay at a few thousand entries and each configuration is fixed. Tests marked `gpu` repeat the
comparison at real sizes where CUDA is available.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import steer
from steer.cli.main import main
from steer.functional import KERNEL_ENV, kernel_path
from steer.kernels import fused_steer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_logits(batch: int, vocab: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Logits with the features that break kernels: a wide range, `-inf` entries (a masked vocabulary, one row
    masked but for three entries), and ties (a third of each row rounded to a coarse grid, the row's maximum
    repeated)."""
    x = torch.randn(batch, vocab, generator=generator, dtype=torch.float64) * 3
    coarse = torch.rand(batch, vocab, generator=generator) < 0.3
    x = torch.where(coarse, (x * 2).round() / 2, x)
    x[torch.rand(batch, vocab, generator=generator) < 0.1] = float("-inf")
    if batch > 1:
        x[1, 3:] = float("-inf")
    top = x.max(dim=-1, keepdim=True).values
    x.scatter_(-1, torch.randint(vocab, (batch, 2), generator=generator), top.expand(-1, 2))
    return x.to(dtype).to(DEVICE)


def entropy64(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in float64, straight from the definition: -sum p log p over entries with p > 0."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return -torch.where(log_p > float("-inf"), log_p.exp() * log_p, 0.0).sum(dim=-1)


def assert_topk_exact(logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, k: int) -> None:
    """Values equal the float64 top-k exactly; indices point at them, are distinct, and among equal values are
    the smallest indices holding that value, in increasing order."""
    x = logits.double().cpu()
    expected = torch.topk(x, k, dim=-1).values
    torch.testing.assert_close(values.double().cpu(), expected, rtol=0, atol=0)
    indices = indices.cpu()
    assert indices.dtype == torch.int64
    torch.testing.assert_close(x.gather(-1, indices), expected, rtol=0, atol=0)
    for row, (index_row, value_row) in enumerate(zip(indices.tolist(), expected.tolist())):
        assert len(set(index_row)) == k
        for value in set(value_row):
            chosen = [i for i, v in zip(index_row, value_row) if v == value]
            holders = (x[row] == value).nonzero().flatten().tolist()
            assert chosen == holders[: len(chosen)]


# (batch, vocab, k, dtype, block, splits): every dtype, k in {1, 5, 16}, B in {1, 3, 7}, vocabularies that are not a
# multiple of the tile, one split per row and several (including the launcher's own choice).
CONFIGS = [
    (1, 1000, 1, torch.float32, 256, 1),
    (3, 2053, 5, torch.bfloat16, 512, 3),
    (7, 777, 16, torch.float16, 256, None),
    (3, 1500, 16, torch.float32, 1024, 2),
    (7, 300, 5, torch.bfloat16, 128, 2),
]


@pytest.mark.parametrize("batch,vocab,k,dtype,block,splits", CONFIGS)
def test_entropy_topk_matches_float64_reference(batch, vocab, k, dtype, block, splits, seed):
    logits = random_logits(batch, vocab, dtype, torch.Generator().manual_seed(seed))
    entropy, values, indices = fused_steer.entropy_topk(logits, k, block=block, splits=splits)
    assert entropy.dtype == values.dtype == torch.float32
    torch.testing.assert_close(entropy.double().cpu(), entropy64(logits).cpu(), rtol=1e-5, atol=1e-5)
    assert_topk_exact(logits, values, indices, k)


def steering_inputs(batch: int, vocab: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    logits = random_logits(batch, vocab, dtype, generator)
    correction = torch.randn(batch, 24, generator=generator).to(DEVICE)
    embedding = torch.randn(vocab, 24, generator=generator).to(dtype).to(DEVICE)
    entropies = entropy64(logits).sort().values.tolist()
    tau = (entropies[batch // 2 - 1] + entropies[batch // 2]) / 2 if batch > 1 else entropies[0] - 0.5
    return logits, correction, embedding, tau


@pytest.mark.parametrize("batch,vocab,k,dtype,block,splits", [CONFIGS[1], CONFIGS[2], CONFIGS[4]])
def test_steer_logits_matches_float64_reference(batch, vocab, k, dtype, block, splits, seed):
    """Gated rows (entropy above tau, which splits the batch) get delta = <W[idx], c> added to their top-k logits;
    every other logit, and every logit of the other rows, is a bit-exact copy; the input is untouched."""
    logits, correction, embedding, tau = steering_inputs(batch, vocab, dtype, seed)
    before = logits.clone()
    out = fused_steer.steer_logits(logits, correction, embedding, k, tau, block=block, splits=splits)
    assert torch.equal(logits, before)
    gated = entropy64(logits) > tau
    assert torch.equal(out.gated, gated) and 0 < int(gated.sum()) <= batch
    torch.testing.assert_close(out.entropy.double(), entropy64(logits), rtol=1e-5, atol=1e-5)
    delta = torch.einsum("bkh,bh->bk", embedding.double()[out.indices], correction.double()) * gated.unsqueeze(-1)
    torch.testing.assert_close(out.delta.double(), delta, rtol=1e-5, atol=1e-4)
    values = logits.double().gather(-1, out.indices)
    adjusted = values + delta
    expected = logits.clone().scatter_(-1, out.indices, adjusted.to(dtype))
    steered = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, out.indices, gated.unsqueeze(-1).expand(-1, k))
    assert torch.equal(out.logits[~steered], logits[~steered])
    torch.testing.assert_close(out.logits[steered], expected[steered])
    assert torch.equal(out.changed, gated & (adjusted.argmax(dim=-1) != 0))
    assert_topk_exact(logits, values, out.indices, k)


def test_inplace_adjusts_the_input_itself(seed):
    logits, correction, embedding, tau = steering_inputs(3, 700, torch.float32, seed)
    copy = fused_steer.steer_logits(logits, correction, embedding, 5, tau, block=256)
    inplace = fused_steer.steer_logits(logits, correction, embedding, 5, tau, inplace=True, block=256)
    assert inplace.logits.data_ptr() == logits.data_ptr()
    assert torch.equal(logits, copy.logits)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_nan_and_fully_masked_rows_are_never_steered(seed):
    """A row with a NaN, or of only -inf, has NaN entropy, is not gated, and comes back unchanged."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 600, generator=generator).to(DEVICE)
    logits[0, 17] = float("nan")
    logits[1] = float("-inf")
    correction, embedding = torch.randn(3, 8).to(DEVICE), torch.randn(600, 8).to(DEVICE)
    out = fused_steer.steer_logits(logits, correction, embedding, 4, -1.0, block=256, splits=2)
    assert out.entropy[:2].isnan().all() and not out.entropy[2].isnan()
    assert out.gated.tolist() == [False, False, True]
    assert torch.equal(out.logits[:2].nan_to_num(), logits[:2].nan_to_num())


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_processor_gives_the_same_scores_on_both_paths(arch, make_model, monkeypatch):
    """Greedy decoding with a trained-looking head: the same tokens, the same scores, the same counters."""
    model = make_model(arch)
    head = steer.CorrectionHead.for_model(model, rank=4, top_k=5, tau=0.5)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(std=2.0)
    inputs = {"input_ids": torch.tensor([[5, 9, 12, 30], [0, 7, 8, 40]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])}
    runs = {}
    for path in ("torch", "triton"):
        monkeypatch.setenv(KERNEL_ENV, path)
        out, stats = steer.generate(model, head, **inputs, max_new_tokens=6, do_sample=False, output_scores=True,
                                    return_dict_in_generate=True, return_stats=True)
        runs[path] = (out, stats)
    (torch_out, torch_stats), (triton_out, triton_stats) = runs["torch"], runs["triton"]
    assert torch.equal(torch_out.sequences, triton_out.sequences)
    for a, b in zip(torch_out.scores, triton_out.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch_stats == triton_stats and torch_stats.gated > 0


def test_dispatch_follows_the_environment(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "auto")
    assert kernel_path("cpu") == "torch"
    monkeypatch.setenv(KERNEL_ENV, "triton")
    assert kernel_path("cpu", k=16) == "triton"
    with pytest.raises(ValueError, match="supports k up to 16; got k=17"):
        kernel_path("cpu", k=17)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs Triton's interpreter: set TRITON_INTERPRET=1"):
        kernel_path("cpu")
    monkeypatch.setenv(KERNEL_ENV, "cuda-please")
    with pytest.raises(ValueError, match="STEER_KERNEL='cuda-please' is not one of auto, triton, torch"):
        steer.entropy_topk(torch.zeros(1, 4), 1)


def test_entropy_topk_dispatches_to_the_kernel(monkeypatch, seed):
    """Forced to Triton, `steer.entropy_topk` returns the kernel's tie order (smallest index first)."""
    monkeypatch.setenv(KERNEL_ENV, "triton")
    logits = torch.zeros(2, 64)
    assert steer.entropy_topk(logits, 4).indices.tolist() == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize("setting,expected", [("torch", "torch"), ("triton", "triton (interpreter)")])
def test_info_reports_the_kernel_path(setting, expected, monkeypatch):
    if torch.cuda.is_available():
        expected = expected.replace("interpreter", "cuda")
    monkeypatch.setenv(KERNEL_ENV, setting)
    result = CliRunner().invoke(main, ["info", "--json"])
    assert json.loads(result.stdout)["kernel"] == expected


def test_kernel_refuses_bad_input():
    with pytest.raises(ValueError, match="supports k up to 16; got k=32"):
        fused_steer.entropy_topk(torch.zeros(2, 64), 32)
    with pytest.raises(ValueError, match=r"expected \[B, H\], \[V, H\] for logits \[B, V\]"):
        fused_steer.steer_logits(torch.zeros(2, 64), torch.zeros(2, 8), torch.zeros(63, 8), 4, 1.0)
    with pytest.raises(ValueError, match="logits must have shape"):
        fused_steer.entropy_topk(torch.zeros(64), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 7, 32, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1, 8, 16])
def test_real_sizes_on_gpu(batch, dtype, k, seed):
    """At V = 151936 with the launcher's own split, steering and statistics match the float64 reference."""
    logits, correction, embedding, tau = steering_inputs(batch, 151936, dtype, seed)
    entropy, values, indices = fused_steer.entropy_topk(logits, k)
    torch.testing.assert_close(entropy.double(), entropy64(logits), rtol=1e-5, atol=1e-4)
    assert_topk_exact(logits, values, indices, k)
    out = fused_steer.steer_logits(logits, correction, embedding, k, tau)
    assert torch.equal(out.indices, indices) and torch.equal(out.gated, entropy64(logits) > tau)
    delta = torch.einsum("bkh,bh->bk", embedding.double()[indices], correction.double()) * out.gated.unsqueeze(-1)
    torch.testing.assert_close(out.delta.double(), delta, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager(seed):
    """The launcher allocates nothing that a captured graph cannot replay: replay on new logits gives the results
    of an eager call."""
    logits, correction, embedding, tau = steering_inputs(8, 32000, torch.bfloat16, seed)
    static = logits.clone()
    fused_steer.steer_logits(static, correction, embedding, 8, tau)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_steer.steer_logits(static, correction, embedding, 8, tau)
    fresh, *_ = steering_inputs(8, 32000, torch.bfloat16, seed + 1)
    static.copy_(fresh)
    graph.replay()
    eager = fused_steer.steer_logits(fresh, correction, embedding, 8, tau)
    assert torch.equal(captured.logits, eager.logits) and torch.equal(captured.indices, eager.indices)


def test_bench_kernels_smoke(tmp_path):
    """`steer bench kernels` on a tiny grid: every rival that can run here is timed, figures are derived, the JSON
    file and the last printed line agree."""
    out = tmp_path / "kernel.json"
    args = ["--batch", "1,3", "--vocab", "600", "--dtype", "fp32,bf16", "--k", "4", "--rivals", "eager,fused,read",
            "--runs", "1", "--out", str(out), "--json"]
    result = CliRunner().invoke(main, ["bench", "kernels", *args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert [(r["batch"], r["dtype"]) for r in report["results"]] == [(1, "fp32"), (1, "bf16"), (3, "fp32"),
                                                                     (3, "bf16")]
    for row in report["results"]:
        assert row["eager_us"] > 0 and row["fused_us"] > 0 and row["read_us"] > 0 and row["compile_us"] is None
        assert row["speedup_eager"] == pytest.approx(row["eager_us"] / row["fused_us"])
    result = CliRunner().invoke(main, ["bench", "kernels", "--rivals", "eager,cublas"])
    assert result.exit_code == 2 and "unknown rival cublas" in result.output
