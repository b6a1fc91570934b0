"""`steer demo`: the whole method in one command, on the built-in world or on a given model and benchmark; and
`steer world`, which exports the built-in world's problems."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import click

from steer.cli.options import emit, json_option
from steer.settings import DemoSettings

if TYPE_CHECKING:
    from steer.world.demo import DemoResult, StageReport


def result_lines(result: DemoResult) -> list[str]:
    """The demo's outcome as text: the accuracy table, the paired test, and where the files went."""
    from steer.world.demo import RESULT_FILE

    paired = result.paired_test
    return [
        f"held-out problems: {result.test_problems}    tau = {result.tau:.3f} nats    strength x{result.scale:g}",
        f"  base     accuracy {result.base_accuracy:.3f}",
        f"  steered  accuracy {result.steered_accuracy:.3f}   "
        f"({result.steered_accuracy - result.base_accuracy:+.3f}, {paired.test} p = {paired.p_value:.3g})",
        f"  steering gated {result.gated_fraction:.1%} of decoding steps and changed the top-1 at "
        f"{result.changed_fraction:.1%}: {paired.verdict()}",
        f"{result.seconds:.0f} s; head -> {result.head}, everything -> {result.out_dir / RESULT_FILE}",
        *stage_lines(result.stages),
    ]


def stage_lines(stages: dict[str, StageReport]) -> list[str]:
    """One line per step that ran: its seconds, and its tokens per second where it decodes or scores."""
    lines = []
    for name, stage in stages.items():
        rate = f" ({stage.tokens_per_second:.0f} tokens/s)" if stage.tokens_per_second is not None else ""
        lines.append(f"  {name:<10} {stage.seconds:7.1f} s{rate}")
    return lines


WORLD, OTHER = DemoSettings(), DemoSettings.for_model()


def _defaults(name: str) -> str:
    """`(default: 16 on the world, 8 otherwise)`, read off the two default settings."""
    world_value, other_value = getattr(WORLD, name), getattr(OTHER, name)
    if world_value == other_value:
        return f"(default: {world_value})"
    return f"(default: {world_value} on the world, {other_value} otherwise)"


def default_out_dir(model: str | None, seed: int) -> Path:
    """`steer-demo/world-seed-0` for the built-in world, `steer-demo/<model's last path part>-seed-0` otherwise."""
    name = "world" if model is None else Path(model.rstrip("/")).name
    return Path("steer-demo") / f"{name}-seed-{seed}"


@click.command()
@click.option("--seed", default=WORLD.seed, show_default=True, type=int,
              help="Seeds the problems, sampling and training.")
@click.option("--out", "-o", type=click.Path(file_okay=False),
              help="Folder for rollouts, scores, the head and the evaluation (default: steer-demo/RUN, RUN naming the "
              "model and seed).")
@click.option("--model", "-m", help="Model folder or Hugging Face id (default: the built-in world's model).")
@click.option("--data", "-d", help="Benchmark to learn from and test on (needed with --model).")
@click.option("--train-problems", type=click.IntRange(min=1), help=f"Training problems {_defaults('train_problems')}.")
@click.option("--test-problems", type=click.IntRange(min=1), help=f"Held-out problems {_defaults('test_problems')}.")
@click.option("--samples", type=click.IntRange(min=1), help=f"Rollouts per training problem {_defaults('samples')}.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help=f"Per completion {_defaults('max_new_tokens')}.")
@click.option("--batch-size", type=click.IntRange(min=1), help=f"Sequences decoded together {_defaults('batch_size')}.")
@click.option("--instruction", help="Appended to each question (default: none on the world, a request to reason "
              "step by step and answer in \\boxed{} otherwise).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@json_option
def demo(seed, out, model, data, train_problems, test_problems, samples, max_new_tokens, batch_size, instruction, quiet,
         as_json):
    """Run the method end to end: rollouts on training problems, scoring, head training, and base against steered
    on held-out problems.

    With no options it uses the built-in reasoning world and its shipped model (a few minutes on a laptop CPU).
    With --model and --data it splits the benchmark into training and held-out problems and runs the same loop.
    Files go to OUT: rollouts/, head/, eval/ and demo.json. A finished step is not redone when run again.
    """
    from steer.world.demo import run_demo

    overrides = {name: value for name, value in [
        ("seed", seed), ("train_problems", train_problems), ("test_problems", test_problems), ("samples", samples),
        ("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("instruction", instruction)]
        if value is not None}
    if model is None:
        settings = dataclasses.replace(DemoSettings(), **overrides)
    else:
        settings = DemoSettings.for_model(**overrides)
    out = out or default_out_dir(model, seed)
    result = run_demo(out, model, data, settings, progress=not quiet)
    emit(result, as_json, result_lines(result))


@click.command("world")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--count", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@json_option
def world_command(out, split, count, seed, as_json):
    """Write problems of the built-in reasoning world as a JSONL benchmark (id, question, answer) that `steer
    rollout` and `steer eval` read like any other, and show where its base model is."""
    from steer import world

    path = world.write_benchmark(out, split, count, seed)
    emit({"benchmark": path, "problems": count, "split": split, "model": world.model_path()}, as_json,
         [f"{count} {split} problems -> {path}", f"base model: {world.model_path()}"])
