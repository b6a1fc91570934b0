"""The fused Triton kernel against a float64 reference, its dispatch, and the processor on both paths.

Without a GPU the kernel runs under Triton's interpreter (conftest sets `TRITON_INTERPRET=1`), which is exact but
slow: vocabularies stay at a few thousand entries and each configuration is fixed. Tests marked `gpu` repeat the
comparison at real sizes where CUDA is available.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from click.testing import CliRunner

import steer
from steer import kernel_benchmark as benchmark
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
    masked = torch.rand(batch, vocab, generator=generator) < 0.1
    if batch > 1:
        masked[1, :3] = False  # the three survivors of row 1 stay finite (a row of only -inf is tested apart)
        masked[1, 3:] = True
    x[masked] = float("-inf")
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


# (batch, vocab, k, dtype, block, splits): every dtype, k in {1, 2, 5, 16}, B in {1, 3, 7}, vocabularies that are not
# a multiple of the tile, one split per row and several (including the launcher's own choice), and the launch
# configuration's own tile (block None).
CONFIGS = [
    (1, 1000, 1, torch.float32, 256, 1),
    (3, 2053, 5, torch.bfloat16, 512, 3),
    (7, 777, 16, torch.float16, 256, None),
    (3, 1500, 16, torch.float32, 1024, 2),
    (7, 300, 5, torch.bfloat16, 128, 2),
    (3, 1001, 2, torch.float16, 128, 4),
    (1, 3000, 1, torch.bfloat16, None, None),
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


@pytest.mark.parametrize("batch,vocab,k,dtype,block,splits", [CONFIGS[1], CONFIGS[2], CONFIGS[4], CONFIGS[5]])
def test_steer_logits_matches_float64_reference(batch, vocab, k, dtype, block, splits, seed):
    """Gated rows (entropy above tau, which splits the batch) get delta = <W[idx], c> (centred) added to their top-k;
    every other logit, and every logit of the other rows, is a bit-exact copy; the input is untouched."""
    logits, correction, embedding, tau = steering_inputs(batch, vocab, dtype, seed)
    before = logits.clone()
    out = fused_steer.steer_logits(logits, correction, embedding, k, tau, block=block, splits=splits)
    assert torch.equal(logits, before)
    gated = entropy64(logits) > tau
    assert torch.equal(out.gated, gated) and 0 < int(gated.sum()) <= batch
    torch.testing.assert_close(out.entropy.double(), entropy64(logits), rtol=1e-5, atol=1e-5)
    delta = torch.einsum("bkh,bh->bk", embedding.double()[out.indices], correction.double())
    delta = (delta - delta.mean(dim=-1, keepdim=True)) * gated.unsqueeze(-1)  # centred over the k candidates
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
    assert kernel_path("cuda", 5, torch.float32, torch.bfloat16) == "triton"  # the processor's float32 scores
    assert kernel_path("cuda", 5, torch.bfloat16, torch.float32) == "torch"  # a pair the kernel does not serve
    assert kernel_path("cuda", 17) == "torch"
    monkeypatch.setenv(KERNEL_ENV, "triton")
    assert kernel_path("cpu", k=16) == "triton"
    with pytest.raises(ValueError, match="supports k up to 16; got k=17"):
        kernel_path("cpu", k=17)
    with pytest.raises(ValueError, match="does not serve torch.bfloat16 logits with a torch.float32 output"):
        kernel_path("cpu", 5, torch.bfloat16, torch.float32)
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


def test_importing_steer_does_not_import_triton():
    """The kernel's limits live in a Triton-free module; the kernel itself is imported on the first Triton call."""
    code = "import sys, steer.functional; assert 'triton' not in sys.modules and steer.functional.MAX_K == 16"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


def test_kernel_refuses_bad_input():
    with pytest.raises(ValueError, match="supports k up to 16; got k=32"):
        fused_steer.entropy_topk(torch.zeros(2, 64), 32)
    with pytest.raises(ValueError, match=r"expected \[B, H\], \[V, H\] for logits \[B, V\]"):
        fused_steer.steer_logits(torch.zeros(2, 64), torch.zeros(2, 8), torch.zeros(63, 8), 4, 1.0)
    with pytest.raises(ValueError, match="logits must have shape"):
        fused_steer.entropy_topk(torch.zeros(64), 4)


@triton.jit
def _row_offset_probe(out_ptr, stride):
    row = tl.program_id(0)
    tl.store(out_ptr + row, fused_steer._row_offset(row, stride))


def test_row_offsets_are_computed_in_int64():
    """`row * stride` of row 2 and a stride of 2^30 is 2^31: it must not wrap (a `[B, T, V]` view does this)."""
    out = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    _row_offset_probe[(3,)](out, 2**30)
    assert out.tolist() == [0, 2**30, 2**31]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_strided_view_is_read_and_steered_in_place(dtype, seed):
    """`logits[:, -1, :]` of a `[B, T, V]` output: rows a stride of T * V apart. Statistics match the reference
    and in-place steering writes into the 3-D tensor, nowhere but the last position's top-k."""
    generator = torch.Generator().manual_seed(seed)
    full = random_logits(3 * 4, 999, dtype, generator).reshape(3, 4, 999)
    view = full[:, -1, :]
    assert view.stride(0) == 4 * 999 and not view.is_contiguous()
    entropy, values, indices = fused_steer.entropy_topk(view, 5, block=256)
    torch.testing.assert_close(entropy.double().cpu(), entropy64(view).cpu(), rtol=1e-5, atol=1e-5)
    assert_topk_exact(view, values, indices, 5)
    before = full.clone()
    correction, embedding = torch.randn(3, 8, generator=generator), torch.randn(999, 8, generator=generator)
    out = fused_steer.steer_logits(view, correction.to(DEVICE), embedding.to(dtype).to(DEVICE), 5, -1.0,
                                   inplace=True, block=256)
    assert out.logits.data_ptr() == view.data_ptr() and out.gated.all()
    assert torch.equal(full[:, :-1], before[:, :-1])
    changed = (full[:, -1] != before[:, -1]).nonzero()
    assert set(map(tuple, changed.tolist())) <= {(r, c) for r in range(3) for c in indices[r].tolist()}


def test_launch_runs_on_the_logits_device(monkeypatch):
    """The launcher makes the logits' device current (a model split over GPUs hands a processor logits that are not
    on the current device); `device_guard` is `torch.cuda.device` for CUDA tensors."""
    guard = fused_steer.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    seen = []
    monkeypatch.setattr(fused_steer, "device_guard", lambda device: seen.append(device) or contextlib.nullcontext())
    logits = torch.randn(2, 300, device=DEVICE)
    fused_steer.entropy_topk(logits, 3)
    fused_steer.steer_logits(logits, torch.randn(2, 4, device=DEVICE), torch.randn(300, 4, device=DEVICE), 3, 0.0)
    assert seen == [logits.device, logits.device]


def test_a_step_is_one_launch_without_fills_or_casts(monkeypatch, seed):
    """After the first call (which allocates the per-row ticket counters), a step launches the kernel once and
    neither fills nor casts a tensor: outputs are written whole by the kernel, flags are bool from the start."""
    logits, correction, embedding, tau = steering_inputs(3, 700, torch.bfloat16, seed)
    fused_steer.steer_logits(logits.clone(), correction, embedding, 5, tau, inplace=True)
    launches = []
    real = fused_steer.jitted
    monkeypatch.setattr(fused_steer, "jitted", lambda aligned: launches.append(aligned) or real(aligned))

    def forbidden(*args, **kwargs):
        raise AssertionError("a step filled or cast a tensor")

    for name in ("zeros", "zeros_like", "ones", "full"):
        monkeypatch.setattr(torch, name, forbidden)
    for name in ("bool", "zero_", "fill_"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = fused_steer.steer_logits(logits, correction, embedding, 5, tau, inplace=True)
    stats = fused_steer.entropy_topk(logits, 5)
    assert len(launches) == 2  # one launch per call
    assert out.gated.dtype == out.changed.dtype == torch.bool and stats.values.dtype == torch.float32


def test_ticket_counters_are_back_to_zero_after_a_step(seed):
    """The last program of each row resets its counter: the next launch (or a CUDA graph replay) starts clean."""
    logits = random_logits(7, 1500, torch.float32, torch.Generator().manual_seed(seed))
    fused_steer.entropy_topk(logits, 4, block=128, splits=5)
    fused_steer.steer_logits(logits, torch.randn(7, 4, device=DEVICE), torch.randn(1500, 4, device=DEVICE), 4, 0.0,
                             block=256, splits=3)
    assert all(not counters.any() for counters in fused_steer._tickets.values())


def test_launcher_picks_only_listed_specializations(monkeypatch, seed):
    """Every variant the launcher picks (dtype pairs, aligned or not) is one that `specializations()` lists, so
    the compile check covers it; aligned rows take the aligned variant."""
    listed = set(fused_steer.specializations())
    picked = []
    real = fused_steer.specialization
    monkeypatch.setattr(fused_steer, "specialization", lambda *args: picked.append(real(*args)) or picked[-1])
    generator = torch.Generator().manual_seed(seed)
    for logits_dtype, weights in fused_steer.WEIGHT_DTYPES.items():
        for vocab in (512, 509):  # a multiple of 16 (aligned rows) and not
            logits = random_logits(2, vocab, logits_dtype, generator)
            fused_steer.entropy_topk(logits, 3)
            for weight_dtype in weights:
                embedding = torch.randn(vocab, 4, generator=generator).to(weight_dtype).to(DEVICE)
                fused_steer.steer_logits(logits, torch.randn(2, 4, device=DEVICE), embedding, 3, 0.0)
    assert set(picked) <= listed and {spec.aligned for spec in picked} == {True, False}
    assert len(set(picked)) == len(listed)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_processor_steers_the_scores_it_is_handed_in_place(path, make_model, monkeypatch):
    """The processor adjusts the scores tensor it receives and returns it (no copy of `[B, V]` per step);
    `inplace=False` leaves it untouched."""
    monkeypatch.setenv(KERNEL_ENV, path)
    model = make_model("llama")
    head = steer.CorrectionHead.for_model(model, rank=4, top_k=5, tau=-1.0)  # every row gated
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(std=2.0)
    input_ids = torch.tensor([[5, 9, 12, 30], [7, 8, 40, 41]])
    for inplace in (True, False):
        with steer.SteeringProcessor(model, head, inplace=inplace) as processor, torch.no_grad():
            scores = model(input_ids).logits[:, -1].float().clone()
            before = scores.clone()
            out = processor(input_ids, scores)
        assert (out.data_ptr() == scores.data_ptr()) == inplace
        assert not torch.equal(out, before)
        assert torch.equal(scores, out if inplace else before)


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
    delta = torch.einsum("bkh,bh->bk", embedding.double()[indices], correction.double())
    delta = (delta - delta.mean(dim=-1, keepdim=True)) * out.gated.unsqueeze(-1)
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


@pytest.mark.gpu
def test_row_offsets_past_2_31_on_gpu(seed):
    """`logits[:, -1, :]` of a `[3, T, V]` bf16 tensor whose last row starts past 2^31 elements (6.4 GB)."""
    vocab, positions = 151936, 7100
    full = torch.zeros(3, positions, vocab, device="cuda", dtype=torch.bfloat16)
    view = full[:, -1, :]
    assert 2 * view.stride(0) >= 2**31
    view.copy_(random_logits(3, vocab, torch.bfloat16, torch.Generator().manual_seed(seed)))
    entropy, values, indices = fused_steer.entropy_topk(view, 5)
    torch.testing.assert_close(entropy.double(), entropy64(view), rtol=1e-5, atol=1e-4)
    assert_topk_exact(view, values, indices, 5)
    before = view.clone()
    embedding = torch.arange(vocab, device="cuda", dtype=torch.bfloat16).remainder(7).unsqueeze(-1).expand(vocab, 8)
    out = fused_steer.steer_logits(view, torch.ones(3, 8, device="cuda"), embedding, 5, -1.0, inplace=True)
    assert out.gated.all()
    raw = 8 * indices.remainder(7).double()  # delta = <W[j], 1> over 8 dims, then centred
    expected = before.gather(-1, indices).double() + raw - raw.mean(dim=-1, keepdim=True)
    torch.testing.assert_close(view.gather(-1, indices).double(), expected, rtol=0, atol=0.07)  # bf16 rounding
    del full


@pytest.mark.gpu
def test_a_step_is_one_kernel_on_gpu(seed):
    """In place, a step is one kernel on the GPU: no fills, copies or casts around it."""
    logits, correction, embedding, tau = steering_inputs(8, 151936, torch.bfloat16, seed)
    steer.steer_logits(logits, correction, embedding, 5, tau, inplace=True)  # compile, allocate the counters
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        steer.steer_logits(logits, correction, embedding, 5, tau, inplace=True)
        torch.cuda.synchronize()
    kernels = [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and "_steer" in kernels[0], kernels


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launch_on_a_second_gpu(seed):
    """Logits on cuda:1 while cuda:0 is current (a model split over GPUs): the kernel runs on the logits' device."""
    logits, correction, embedding, tau = (x.to("cuda:1") if isinstance(x, torch.Tensor) else x
                                          for x in steering_inputs(4, 32000, torch.bfloat16, seed))
    with torch.cuda.device(0):
        out = fused_steer.steer_logits(logits, correction, embedding, 5, tau)
    torch.testing.assert_close(out.entropy.double(), entropy64(logits), rtol=1e-5, atol=1e-4)


def test_bench_kernels_smoke(tmp_path):
    """`steer bench kernels` on a tiny grid: every rival that can run here is timed, figures are derived from the
    bytes each moves, the JSON file and the last printed line agree."""
    out = tmp_path / "kernel.json"
    args = ["--batch", "1,3", "--vocab", "600", "--dtype", "fp32,bf16", "--k", "4", "--rivals", "eager,fused,read,copy",
            "--runs", "1", "--out", str(out), "--json"]
    result = CliRunner().invoke(main, ["bench", "kernels", *args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert [(r["batch"], r["dtype"]) for r in report["results"]] == [(1, "fp32"), (1, "bf16"), (3, "fp32"),
                                                                     (3, "bf16")]
    for row in report["results"]:
        assert row["eager_us"] > 0 and row["fused_us"] > 0 and row["read_us"] > 0 and "compile_us" not in row
        assert row["speedup_eager"] == pytest.approx(row["eager_us"] / row["fused_us"])
        logit_bytes = row["batch"] * row["vocab"] * (4 if row["dtype"] == "fp32" else 2)
        assert row["copy_gb_s"] == pytest.approx(2 * logit_bytes / (row["copy_us"] * 1e3))
        assert row["fused_gb_s"] == pytest.approx(logit_bytes / (row["fused_us"] * 1e3))
        assert row["roofline_share"] == pytest.approx(row["read_us"] / row["fused_us"])
    assert report["goals"] == []  # measured on the goal configuration only
    result = CliRunner().invoke(main, ["bench", "kernels", "--rivals", "eager,cublas"])
    assert result.exit_code == 2 and "unknown rival cublas" in result.output


def test_goals_are_checked_on_the_goal_configuration():
    row = {"vocab": 151936, "dtype": "bf16", "k": 5, "fused_graph_us": 4.0, "read_graph_us": 3.0,
           "roofline_share": 0.75, "speedup_eager": 6.0, "speedup_compile": 0.9}
    checks = {(g["goal"], g["batch"]): g["met"] for b in (8, 32, 256) for g in benchmark.goals([{**row, "batch": b}])}
    assert checks[("step us (B <= 8)", 8)] and checks[("step / roofline time (B = 32)", 32)]
    assert not checks[("share of roofline read bandwidth (B = 256)", 256)]
    assert checks[("speed-up over eager PyTorch", 8)] and not checks[("speed-up over torch.compile", 8)]
    assert benchmark.goals([{**row, "batch": 8, "k": 8}]) == []


def test_generate_overhead_smoke():
    """The 1B-class generate comparison, on a tiny random Llama on the CPU."""
    (result,) = benchmark.generate_overhead(torch.device("cpu"), size="tiny", batches=(2,), new_tokens=3, runs=1)
    assert result["plain_s"] > 0 and result["steered_s"] > 0 and result["overhead"] > -1
