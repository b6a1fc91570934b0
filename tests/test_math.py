"""The per-step math (entropy, top-k, steering adjustment) against a float64 oracle, on fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch

import steer
from steer import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [(1, 1), (1, 7), (3, 1000), (7, 4099), (2, 50_000)]


def random_logits(batch: int, vocab: int, dtype: torch.dtype, *, scale: float = 3.0, masked: float = 0.0,
                  ties: bool = False) -> torch.Tensor:
    """Random logits in `dtype`: spread by `scale`, a fraction `masked` of entries at -inf (never a whole row),
    and, with `ties`, values on a coarse grid so that many entries are equal."""
    x = torch.randn(batch, vocab) * scale
    if ties:
        x = (x * 2).round() / 2
    if masked:
        mask = torch.rand(batch, vocab) < masked
        mask[torch.arange(batch), torch.randint(vocab, (batch,))] = False
        x = x.masked_fill(mask, float("-inf"))
    return x.to(dtype)


def entropy_f64(logits: torch.Tensor) -> torch.Tensor:
    """Oracle: entropy as log-sum-exp minus the expected logit, in float64, over finite entries only."""
    x = logits.double()
    finite = torch.isfinite(x)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    p = torch.exp(x - lse)
    return (lse.squeeze(-1) - torch.where(finite, p * x, torch.zeros_like(x)).sum(-1))


def check_topk(logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, k: int) -> None:
    """Values are the k largest of each row (as a multiset, so ties pass), in order, and match their indices."""
    expected = logits.float().sort(dim=-1, descending=True).values[:, :k]
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (logits.shape[0], k)
    torch.testing.assert_close(values, expected, rtol=0, atol=0)
    torch.testing.assert_close(logits.float().gather(-1, indices), values, rtol=0, atol=0)
    assert all(len(set(row)) == k for row in indices.tolist()), "an index appears twice in a row"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,vocab", SIZES)
@pytest.mark.parametrize("masked,ties", [(0.0, False), (0.3, False), (0.0, True), (0.9, True)])
def test_entropy_topk_matches_float64(seed, dtype, batch, vocab, masked, ties):
    logits = random_logits(batch, vocab, dtype, scale=float(torch.empty(1).uniform_(0.1, 8)), masked=masked, ties=ties)
    for k in sorted({1, min(5, vocab), min(16, vocab)}):
        out = steer.entropy_topk(logits, k)
        assert out.entropy.dtype == torch.float32 and out.entropy.shape == (batch,)
        torch.testing.assert_close(out.entropy.double(), entropy_f64(logits), rtol=1e-5, atol=2e-5)
        check_topk(logits, out.values, out.indices, k)


def test_entropy_of_known_distributions():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), 0.0], [5.0, float("-inf"), float("-inf"), float("-inf")]])
    entropy = steer.entropy_topk(logits, 1).entropy
    torch.testing.assert_close(entropy, torch.tensor([math.log(3), 0.0]))


def test_entropy_is_nan_for_nan_rows_and_rows_without_a_finite_entry():
    logits = torch.randn(3, 10)
    logits[0, 4] = float("nan")
    logits[1] = float("-inf")
    entropy = steer.entropy_topk(logits, 2).entropy
    assert entropy[:2].isnan().all() and entropy[2].isfinite()


@pytest.mark.parametrize("bad,message", [
    (torch.zeros(4), "shape"), (torch.zeros(2, 3, dtype=torch.long), "floating"), (torch.zeros(2, 3), "k must be"),
])
def test_bad_input_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        steer.entropy_topk(bad, k=4 if message == "k must be" else 1)


def threshold_between_rows(entropy: torch.Tensor) -> float:
    """A random tau half-way between two rows' entropies (never on one); with several rows, some rows are gated and
    some are not."""
    ordered = entropy.sort().values.tolist()
    inner = [(a + b) / 2 for a, b in zip(ordered, ordered[1:])]
    cuts = inner or [ordered[0] - 0.5, ordered[0] + 0.5]
    return cuts[int(torch.randint(len(cuts), ()))]


def steer_oracle(logits, correction, embedding, indices, tau):
    """Oracle for `steer_logits`: float64 deltas added at `indices` (a top-k, checked separately, since among ties
    any choice is right) of the rows with float64 entropy > tau."""
    entropy = entropy_f64(logits)
    expected = logits.double().clone()
    for row in torch.nonzero(entropy > tau).flatten().tolist():
        delta = embedding.double()[indices[row]] @ correction[row].double()
        expected[row, indices[row]] += delta - delta.mean()  # centred over the k candidates
    return expected, entropy > tau


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,vocab", [(1, 7), (3, 1000), (7, 4099)])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_steer_logits_changes_only_topk_of_gated_rows(seed, dtype, batch, vocab, k):
    k = min(k, vocab)
    hidden = 24
    logits = random_logits(batch, vocab, dtype, scale=float(torch.empty(1).uniform_(0.3, 6)), masked=0.2)
    embedding = torch.randn(vocab, hidden).to(dtype)
    correction = torch.randn(batch, hidden)
    tau = threshold_between_rows(entropy_f64(logits))
    before = logits.clone()

    out = steer.steer_logits(logits, correction, embedding, k, tau)

    assert torch.equal(logits, before), "the input was modified"
    check_topk(logits, logits.float().gather(-1, out.indices), out.indices, k)
    expected, gated = steer_oracle(logits, correction, embedding, out.indices, tau)
    assert torch.equal(out.gated, gated)
    assert out.logits.dtype == dtype and out.logits.shape == logits.shape
    touched = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, out.indices, gated.unsqueeze(-1).expand(-1, k))
    assert torch.equal(out.logits[~touched], logits[~touched]), "a logit outside the gated top-k changed"
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(out.logits[touched].double(), expected[touched], rtol=tol, atol=tol)
    best = expected.gather(-1, out.indices).argmax(-1)  # before rounding to the logits' dtype, which can tie them
    assert torch.equal(out.changed, gated & (best != 0))


def test_steer_logits_with_infinite_tau_is_the_identity(seed):
    logits = random_logits(4, 300, torch.float32, masked=0.1)
    out = steer.steer_logits(logits, torch.randn(4, 8), torch.randn(300, 8), k=5, tau=float("inf"))
    assert torch.equal(out.logits, logits) and not out.gated.any() and not out.changed.any()


def test_steer_logits_leaves_nan_rows_alone():
    logits = torch.randn(2, 50)
    logits[0, 3] = float("nan")
    out = steer.steer_logits(logits, torch.ones(2, 4), torch.ones(50, 4), k=3, tau=-1.0)
    assert out.gated.tolist() == [False, True]
    assert torch.equal(out.logits[0].isnan(), logits[0].isnan())
    assert torch.equal(out.logits[0].nan_to_num(), logits[0].nan_to_num())


def test_reference_and_dispatch_agree(seed):
    logits = random_logits(3, 777, torch.bfloat16, masked=0.1)
    a, b = reference.entropy_topk(logits, 4), steer.entropy_topk(logits, 4)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)


@pytest.mark.parametrize("vocab", [129, 4099, 50_000])
def test_topk_of_rows_with_fewer_finite_entries_than_k(seed, vocab):
    logits = torch.full((4, vocab), float("-inf"))
    for row, finite in enumerate([0, 1, 3, 40]):
        logits[row, torch.randperm(vocab)[:finite]] = torch.randn(finite)
    out = steer.entropy_topk(logits, 5)
    check_topk(logits, out.values, out.indices, 5)
    assert out.entropy[0].isnan() and out.entropy[1] == 0 and out.entropy[2:].isfinite().all()
