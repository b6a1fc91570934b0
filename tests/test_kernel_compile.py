"""The kernels compile for real GPUs, on a machine without one.

Triton's interpreter (which the other kernel tests run under) never runs the code generator, so it accepts kernels
that a GPU compile rejects. Here every variant the launchers can pick is compiled to PTX and cubin for sm_80 and
sm_90 by `steer.kernels.compile_check`, in two processes (about 20 s on two cores), and the compiled code is checked
for the design's shape: one exponential per entry and at most four block-wide barriers per tile on the common path.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from steer.cli.main import main
from steer.kernels import compile_check, fused_steer, roofline


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return compile_check.compile_all(["sm_80", "sm_90"], workers=2)


def test_every_variant_compiles_for_sm80_and_sm90(compiled):
    names = [name for _, _, name in compile_check.variants()]
    assert len(names) == len(set(names)) == len(fused_steer.specializations()) + len(roofline.specializations())
    assert sorted((row["kernel"], row["arch"]) for row in compiled) == sorted(
        (name, arch) for name in names for arch in ("sm_80", "sm_90"))


def test_the_tile_loop_has_one_exponential_per_entry_and_few_barriers(compiled):
    """Static evidence of the design, read off the PTX: per tile without a top-k candidate, one `ex2` per entry a
    thread holds and the barriers of a single block-wide reduction (the tile's maximum)."""
    for spec in fused_steer.specializations():
        per_thread = spec.config.block // (32 * spec.config.num_warps)
        for row in (row for row in compiled if row["kernel"] == spec.name):
            assert row["ex2_per_tile"] == per_thread, row
            assert 1 <= row["bar_sync_per_tile"] <= 4, row


def test_compile_source_matches_the_kernel_arguments():
    for module in (fused_steer, roofline):
        for spec in module.specializations():
            fn, signature, constexprs, attrs = module.compile_source(spec)
            assert list(signature) == fn.arg_names
            assert set(constexprs) == {name for name, kind in signature.items() if kind == "constexpr"}


def test_a_broken_kernel_fails_the_check(monkeypatch):
    """A compile error is reported with the variant's name, not swallowed."""
    monkeypatch.setattr(compile_check, "KERNEL_MODULES", ("roofline",))
    monkeypatch.setattr(compile_check, "ARCHS", {"sm_90": 90, "sm_1": 1})
    with pytest.raises(compile_check.CompileCheckError, match=r"read-bf16-aligned-b\d+w\d+ \(sm_1\)"):
        compile_check.compile_all(["sm_1"], workers=1)


def test_bench_compile_only_reports_each_variant(compiled):
    """`steer bench kernels --compile-only --arch sm_90 --json`: one row per variant with registers and spills."""
    result = CliRunner().invoke(main, ["bench", "kernels", "--compile-only", "--arch", "sm_90", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["triton"] and report["archs"] == ["sm_90"]
    assert [row["kernel"] for row in report["results"]] == [name for _, _, name in compile_check.variants()]
    for row in report["results"]:
        assert row["registers"] > 0 and row["spill_stores"] is not None and row["shared_bytes"] >= 0
