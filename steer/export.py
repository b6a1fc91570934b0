"""Sharing a head the Hugging Face way: a folder that `model.generate(custom_generate=...)` runs without steer.

[`export_head`] writes, into one folder (a local directory, or what you push to a Hub repository):

- `head.safetensors`, `config.json`: the head, loadable with `steer.CorrectionHead.from_pretrained`;
- `custom_generate/generate.py`, `custom_generate/requirements.txt`: a self-contained decoding method (torch,
  safetensors and transformers only), so that
  `model.generate(**inputs, custom_generate=FOLDER_OR_REPO, trust_remote_code=True)` decodes with steering;
- `custom_generate/steer_head.py`: the head's settings and weights (safetensors, base64) for `generate.py`.
  transformers copies a `custom_generate` module into its module cache and calls it without saying where it came
  from, so the weights travel with the code, as a module that `generate.py` imports relatively;
- `README.md`: a model card with the base model, the head's size, tau, top-k, strength and its evaluation.

`custom_generate` needs transformers >= 5.17.0 ([`MIN_TRANSFORMERS`]): from that version on, transformers checks
`trust_remote_code` before it fetches a repository's custom generation code (and earlier 5.x releases ran a local
folder's `generate.py` without it). `requirements.txt` and `generate.py` both refuse older versions.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save

from steer.errors import SteerError
from steer.files import atomic_write_text
from steer.head import CorrectionHead
from steer.pipeline.summary import ArmSummary, EvalSummary

MIN_TRANSFORMERS = "5.17.0"
TEMPLATE_FILES = ("generate.py", "requirements.txt")
HEAD_MODULE = "steer_head.py"
NO_EVALUATION = "no evaluation recorded"


class ExportError(SteerError, ValueError):
    """Raised when a head cannot be exported: its base model or its evaluation does not fit it."""


@dataclass(frozen=True)
class Evaluation:
    """A `steer eval` run of the head: its summary, and its settings (`eval.settings.json`; empty if absent)."""

    summary: EvalSummary
    settings: dict


@dataclass(frozen=True)
class ExportResult:
    """What [`export_head`] wrote.

    Attributes:
        out_dir (`Path`): the folder.
        files (`list[str]`): the files written, relative to `out_dir`.
        base_model (`str`): the model the head steers.
        head_parameters (`int`), model_parameters (`int`): parameter counts; `share` is their ratio.
        evaluation (`str`): the `steer eval` folder the card reports, or [`NO_EVALUATION`].
    """

    out_dir: Path
    files: list[str]
    base_model: str
    head_parameters: int
    model_parameters: int
    share: float
    evaluation: str


def export_head(
    head: CorrectionHead | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    eval_dir: str | os.PathLike | None = None,
) -> ExportResult:
    """Write a head, its `custom_generate/` method and its model card into `out_dir` (files are replaced atomically).

    Args:
        head ([`CorrectionHead`], `str` or `os.PathLike`): the head, or a folder / Hub id to load it from.
        out_dir (`str` or `os.PathLike`): the folder to write (created if missing).
        base_model (`str`, *optional*): the base model's folder or Hub id, for its parameter count; defaults to the
            model the head records. Only its configuration is read.
        eval_dir (`str` or `os.PathLike`, *optional*): a `steer eval` output folder (with `summary.json`) of this
            head, reported in the card; checked against the head when its `eval.settings.json` is there.

    Returns:
        [`ExportResult`].

    Example:

    ```python
    >>> from steer.export import export_head
    >>> result = export_head("runs/head", "my-head", eval_dir="runs/eval")  # doctest: +SKIP
    >>> # then, with transformers >= 5.17.0 and without steer:
    >>> model.generate(**inputs, custom_generate="my-head", trust_remote_code=True)  # doctest: +SKIP
    ```
    """
    if not isinstance(head, CorrectionHead):
        head = CorrectionHead.from_pretrained(head)
    base_model = base_model or head.config.model_name_or_path
    if not base_model:
        raise ExportError("the head does not record its base model: pass it (--model)")
    model_parameters = count_model_parameters(base_model, head)
    evaluation = read_evaluation(eval_dir, head) if eval_dir is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head.save_pretrained(out)  # head.safetensors, config.json
    for name in TEMPLATE_FILES:
        atomic_write_text(out / "custom_generate" / name, template(name))
    atomic_write_text(out / "custom_generate" / HEAD_MODULE, head_module(head))
    head_parameters = sum(p.numel() for p in head.parameters())
    atomic_write_text(out / "README.md", model_card(head, base_model, head_parameters, model_parameters, evaluation))
    files = ["head.safetensors", "config.json", *(f"custom_generate/{name}" for name in (*TEMPLATE_FILES, HEAD_MODULE)),
             "README.md"]
    return ExportResult(out, files, base_model, head_parameters, model_parameters,
                        head_parameters / model_parameters, str(eval_dir) if evaluation else NO_EVALUATION)


def template(name: str) -> str:
    """The text of a file of the `custom_generate/` template shipped with steer (`generate.py`, `requirements.txt`)."""
    return resources.files("steer").joinpath("custom_generate").joinpath(name).read_text(encoding="utf-8")


def head_module(head: CorrectionHead) -> str:
    """`steer_head.py`: the head's config (`HEAD_CONFIG`) and its weights as base64 safetensors (`HEAD_WEIGHTS`)."""
    weights = save({name: t.detach().to("cpu", torch.float32).contiguous() for name, t in head.state_dict().items()})
    text = base64.b64encode(weights).decode("ascii")
    lines = "\n".join(f'    "{text[i:i + 96]}"' for i in range(0, len(text), 96))
    config = json.dumps(asdict(head.config), sort_keys=True)
    return (
        '"""The correction head run by generate.py, written by `steer export`: its settings and its weights '
        '(safetensors, base64)."""\n\nimport json\n\n'
        f"HEAD_CONFIG = json.loads({config!r})\n\nHEAD_WEIGHTS = (\n{lines}\n)\n"
    )


def count_model_parameters(base_model: str, head: CorrectionHead) -> int:
    """The parameter count of `base_model`, built from its configuration on the meta device (no weights read), after
    checking that its output embedding has the head's sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read the configuration of the base model {base_model!r} ({err}); pass a local "
                          "copy with --model") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    vocab_size, hidden_size = model.get_output_embeddings().weight.shape
    if (vocab_size, hidden_size) != (head.config.vocab_size, head.config.hidden_size):
        raise ExportError(f"{base_model} has vocabulary {vocab_size} and hidden size {hidden_size}; the head was made "
                          f"for vocabulary {head.config.vocab_size} and hidden size {head.config.hidden_size}")
    return sum(p.numel() for p in model.parameters())


def read_evaluation(eval_dir: str | os.PathLike, head: CorrectionHead) -> Evaluation:
    """The summary of a `steer eval` folder with a steered arm, checked to come from `head` when the folder's
    settings record which head it ran (`eval.settings.json`)."""
    from steer.pipeline.evaluation import head_digest
    from steer.pipeline.folders.predictions import SUMMARY_FILE, PredictionFolder

    folder = PredictionFolder(eval_dir)
    try:
        summary = folder.summary()
    except FileNotFoundError:
        raise ExportError(f"{folder.path} has no {SUMMARY_FILE}: pass the folder of a finished `steer eval`") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ExportError(f"{folder.path / SUMMARY_FILE} is not a `steer eval` summary ({err})") from None
    if not summary.benchmarks or not all("steered" in b.arms for b in summary.benchmarks.values()):
        raise ExportError(f"{folder.path / SUMMARY_FILE} has no steered results: run `steer eval` with --head")
    settings = json.loads(folder.settings_path.read_text(encoding="utf-8")) if folder.settings_path.is_file() else {}
    recorded = settings.get("arms", {}).get("steered", {}).get("processor")
    if recorded is not None and recorded != head_digest(head):
        raise ExportError(f"{folder.path} evaluated another head (or this one with another tau, top-k or strength): "
                          "its numbers do not describe this head")
    return Evaluation(summary, settings)


def model_card(
    head: CorrectionHead,
    base_model: str,
    head_parameters: int,
    model_parameters: int,
    evaluation: Evaluation | None,
) -> str:
    """The folder's `README.md`: Hub metadata, what the head is, how to use it, and its evaluation."""
    config = head.config
    tau = f"{config.tau:g} nats" + (f" (the {config.tau_quantile:g} quantile of the base entropy over the training "
                                    "rollouts)" if config.tau_quantile is not None else "")
    lines = [
        "---",
        *([] if Path(base_model).exists() else [f"base_model: {json.dumps(base_model)}"]),  # Hub ids only
        "library_name: transformers",
        "tags:",
        "- custom_generate",
        "- steer",
        "- correction-head",
        "---",
        "",
        f"# Correction head for {base_model}",
        "",
        "A `steer` correction head: at decision points (steps where the entropy of the base model's next-token",
        "distribution exceeds tau) it re-scores the base model's top-k candidates from the final hidden state, adding",
        "`<W_u[j], scale * U V^T h>` to candidate `j`. Everywhere else the model decodes as it always does.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base_model}` |",
        f"| head parameters | {head_parameters:,} (rank {config.rank}; {head_parameters / model_parameters:.4%} of the "
        f"model's {model_parameters:,}) |",
        f"| tau | {tau} |",
        f"| top-k | {config.top_k} |",
        f"| strength (scale) | {config.scale:g} |",
        "",
        "## Use it without steer",
        "",
        f"Needs transformers >= {MIN_TRANSFORMERS} and trust in this repository's `custom_generate/generate.py`:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{base_model}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base_model}")',
        'inputs = tokenizer(["What is 12 * 7?"], return_tensors="pt")',
        'output = model.generate(**inputs, custom_generate="THIS_FOLDER_OR_REPO", trust_remote_code=True,',
        "                        max_new_tokens=64)",
        "```",
        "",
        "Greedy search, sampling and beam search are steered; modes that cannot be (assisted decoding, continuous",
        "batching, ...) raise an error rather than decode unsteered. With steer installed:",
        '`steer.generate(model, steer.CorrectionHead.from_pretrained("THIS_FOLDER_OR_REPO"), **inputs)`.',
        "",
        "## Evaluation",
        "",
        *(evaluation_lines(evaluation) if evaluation else [f"{NO_EVALUATION.capitalize()}."]),
    ]
    return "\n".join(lines) + "\n"


def evaluation_lines(evaluation: Evaluation) -> list[str]:
    """The card's evaluation section: base against steered accuracy per benchmark, and how it was decoded."""
    lines = ["From `steer eval` (accuracy with 95% interval; paired test of steered against base; share of decoding",
             "steps gated by the head):", "",
             "| benchmark | problems | base | steered | difference | test | gated |", "|---|---|---|---|---|---|---|"]
    for name, benchmark in evaluation.summary.benchmarks.items():
        steered, paired = benchmark.arms["steered"], benchmark.paired.get("steered")
        test = f"{paired.test} p = {paired.p_value:.3g}" if paired else "-"
        difference = f"{paired.difference:+.3f}" if paired else "-"
        lines.append(f"| {name} | {steered.problems} | {_accuracy(benchmark.arms.get('base'))} | "
                     f"{_accuracy(steered)} | {difference} | {test} | {steered.gated_fraction:.1%} |")
    decoding = evaluation.settings.get("decoding", {})
    if decoding:
        mode = "greedy" if decoding.get("temperature") == 0 else (
            f"temperature {decoding.get('temperature')}, top-p {decoding.get('top_p')}")
        lines += ["", f"Decoding: {mode}, up to {decoding.get('max_new_tokens')} new tokens, "
                      f"{evaluation.summary.samples} sample(s) per problem."]
    return lines


def _accuracy(arm: ArmSummary | None) -> str:
    if arm is None:
        return "-"
    low, high = arm.interval_95
    return f"{arm.accuracy:.3f} [{low:.3f}, {high:.3f}]"
