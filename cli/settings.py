"""Command-line options made from the library's settings dataclasses, in one place.

[`settings_options`] turns each field of a settings dataclass (nested dataclasses flattened) into a click option
whose default is the dataclass's own default, so the CLI never copies a default; [`settings_from`] builds the
dataclass back from the parsed options. Help texts and value checks live in [`FLAGS`], one entry per field name.

Example:

```python
@click.command()
@settings_options(ScoreSettings)
def score(**options):
    settings = settings_from(ScoreSettings, options)
```
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from steer.settings import LABEL_PLACEMENTS, LABEL_SOURCES, OBJECTIVES, check_scale

S = TypeVar("S")


class FloatList(click.ParamType):
    """Comma-separated numbers: `"0.5,1,2"` -> `(0.5, 1.0, 2.0)`, each checked by `check`, which `rule` describes."""

    name = "numbers"

    def __init__(self, check: Callable[[float], float] = float, rule: str = "") -> None:
        self.check = check
        self.rule = rule

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(self.check(float(part)) for part in str(value).split(","))
        except ValueError:
            rule = f", {self.rule}" if self.rule else ""
            self.fail(f"expected numbers separated by commas{rule}; got {value!r}", param, ctx)


@dataclass(frozen=True)
class Flag:
    """How one settings field appears on the command line: its help and, where the default's type is not enough,
    its click type."""

    help: str
    type: click.ParamType | None = None


POSITIVE = click.IntRange(min=1)
FRACTION = click.FloatRange(0, 1, min_open=True, max_open=True)

FLAGS: dict[str, Flag] = {
    # decoding (SamplingSettings, DecodingSettings)
    "samples": Flag("Decodes per problem.", POSITIVE),
    "temperature": Flag("Sampling temperature; 0 is greedy.", click.FloatRange(min=0)),
    "top_p": Flag("Nucleus sampling mass.", click.FloatRange(0, 1, min_open=True)),
    "max_new_tokens": Flag("Token budget per completion.", POSITIVE),
    "batch_size": Flag("Sequences decoded together.", POSITIVE),
    "seed": Flag("Base seed."),
    "instruction": Flag("Appended to each question."),
    # scoring (ScoreSettings)
    "floor": Flag("Store features where the entropy exceeds this (nats); keep it below any tau you will try."),
    "top_k": Flag("Candidates per position.", POSITIVE),
    "max_batch_tokens": Flag("Padded tokens per teacher-forced pass.", POSITIVE),
    "shard_rollouts": Flag("Rollouts per shard file.", POSITIVE),
    "report_tau": Flag("Threshold (nats) whose share of positions is reported."),
    # training (TrainSettings)
    "tau": Flag("Decision threshold in nats; when given, it replaces --tau-quantile."),
    "tau_quantile": Flag("Set tau as this quantile of the base entropy (0.95 gates the top 5% of positions).",
                         FRACTION),
    "rank": Flag("Rank of the head's low-rank map.", POSITIVE),
    "pool_problems": Flag("Problems in the training pool (those with pass rates nearest 0.5).", POSITIVE),
    "keep_shortest": Flag("Share of the pool problems' rollouts kept, shortest first.",
                          click.FloatRange(0, 1, min_open=True)),
    "advantage_clip": Flag("Advantages are clipped to [-this, this].", click.FloatRange(min=0, min_open=True)),
    "kl_weight": Flag("Weight of the anchor to the base candidate distribution.", click.FloatRange(min=0)),
    "lr": Flag("AdamW learning rate.", click.FloatRange(min=0, min_open=True)),
    "steps": Flag("Optimiser steps.", POSITIVE),
    "warmup_steps": Flag("Linear warm-up steps.", click.IntRange(min=0)),
    "rollouts_per_step": Flag("Rollouts whose decision points make one step's batch.", POSITIVE),
    "grad_clip": Flag("Gradient norm clip.", click.FloatRange(min=0, min_open=True)),
    "heldout_fraction": Flag("Share of pool problems held out to choose the checkpoint and strength.",
                             click.FloatRange(0, 1, max_open=True)),
    "null_margin": Flag("Standard errors by which the best held-out gain must exceed zero for a trained checkpoint "
                        "to be kept over the untrained head (which changes nothing).", click.FloatRange(min=0)),
    "scales": Flag("Correction strengths tried after training; the smallest within one standard error of the best "
                   "held-out gain is kept.",
                   FloatList(check_scale, "each finite and >= 0")),
    "eval_every": Flag("Steps between held-out evaluations.", POSITIVE),
    "objective": Flag("How worse-than-average choices are pushed down: bounded (unlikelihood) or the paper's loss.",
                      click.Choice(OBJECTIVES)),
    "labels": Flag("The head's targets: rollout advantages (the paper's) or branch continuations (`steer label`).",
                   click.Choice(LABEL_SOURCES)),
    # labels (LabelSettings)
    "placement": Flag("Which decision points of a rollout are labelled: its first ones, or a seeded random draw "
                      "among all of them.", click.Choice(LABEL_PLACEMENTS)),
    "continuations": Flag("Continuations per candidate: 1 greedy, or this many sampled at --temperature and --top-p "
                          "(the label: the share graded right).", POSITIVE),
    # analysis
    "points": Flag("Decision points branched per completion (its highest-entropy ones).", POSITIVE),
    "rounds": Flag("Switches in a row: a failed branch is branched again after its last switch.", POSITIVE),
    "beam": Flag("Failed branches per failure carried into the next round.", POSITIVE),
    "min_gain": Flag("Least accuracy gain of the ceiling over base for a go.", click.FloatRange(0, 1)),
    "taus": Flag("Thresholds (nats) at which the entropy gate's precision and recall are reported.", FloatList()),
}


def _fields(cls: type, default: Any) -> list[tuple[str, Any, type]]:
    """`(name, default, annotation)` of each leaf field of the dataclass `cls`, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for field in dataclasses.fields(cls):
        value = getattr(default, field.name)
        if dataclasses.is_dataclass(value):
            leaves += _fields(type(value), value)
        else:
            leaves.append((field.name, value, hints[field.name]))
    return leaves


def _click_type(name: str, value: Any, annotation: Any) -> click.ParamType | type:
    flag = FLAGS[name]
    if flag.type is not None:
        return flag.type
    if value is None:  # an optional field: its type is the annotation's other member
        value_types = [t for t in typing.get_args(annotation) if t is not type(None)]
        return value_types[0]
    return type(value)


def settings_options(cls: type, help: dict[str, str] | None = None, **defaults: Any) -> Callable[[Callable], Callable]:
    """Decorate a click command with one option per field of the settings dataclass `cls` (`--top-p` for `top_p`).

    Args:
        cls (`type`): a dataclass whose fields all have defaults.
        help (`dict[str, str]`, *optional*): help texts that replace [`FLAGS`]' for this command.
        **defaults: defaults that replace the dataclass's for this command (for example `samples=4`).
    """
    help = help or {}
    options = []
    for name, value, annotation in _fields(cls, cls()):
        if name not in FLAGS:
            raise KeyError(f"no FLAGS entry for the settings field {cls.__name__}.{name}")
        default = defaults.get(name, value)
        options.append(click.option(
            f"--{name.replace('_', '-')}", name, default=default, show_default=default is not None,
            type=_click_type(name, value, annotation), help=help.get(name, FLAGS[name].help),
        ))

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def settings_from(cls: type[S], options: dict[str, Any]) -> S:
    """Build `cls` from parsed options, removing the fields it uses from `options` (nested dataclasses rebuilt)."""
    default = cls()
    values = {}
    for field in dataclasses.fields(cls):
        nested = getattr(default, field.name)
        if dataclasses.is_dataclass(nested):
            values[field.name] = settings_from(type(nested), options)
        elif field.name in options:
            values[field.name] = options.pop(field.name)
    return cls(**values)

