"""The correction head: a tiny low-rank module that re-scores the base model's top-k candidates at decision points.

For a final hidden state `h` (the input of the model's output embedding `W_u`) and a candidate token `j`, the head
adds

    delta_j = <W_u[j], U V^T h> - mean_i <W_u[i], U V^T h>

to the candidate's logit (the mean over the k candidates i: the head re-ranks them, it does not move them together),
with `U, V` of shape `[hidden_size, rank]`. `U` starts at zero, so a fresh head changes nothing. Only `U` and `V`
are learned; `W_u` is the model's own, frozen, output embedding.

A head records what it was made for (hidden size, vocabulary size, the model's name, and a fingerprint of its output
embedding), and refuses to work with another model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin, hf_hub_download
from safetensors.torch import load_file, save_file
from torch import nn

from steer.errors import SteerError
from steer.files import atomic_write_json
from steer.reference import center_deltas
from steer.settings import check_scale

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "head.safetensors"
FINGERPRINT_ROWS = 32
FINGERPRINT_SEED = 20260511
FINGERPRINT_TOLERANCE = 0.02


class HeadMismatchError(SteerError, ValueError):
    """Raised when a correction head is used with a model it was not made for."""


@dataclass
class HeadConfig:
    """What a correction head is and what it was made for; saved as `config.json` beside the weights.

    Args:
        hidden_size (`int`): width of the model's final hidden state.
        vocab_size (`int`): number of rows of the model's output embedding.
        rank (`int`, defaults to 16): rank of the low-rank map `U V^T`.
        top_k (`int`, defaults to 5): number of base candidates re-scored at a decision point.
        tau (`float`, defaults to 1.4): entropy threshold (nats) above which a position is a decision point.
        tau_quantile (`float`, *optional*): if `tau` was resolved from a quantile of the base entropy over the
            training rollouts, that quantile (for the record; `tau` is what decoding uses).
        scale (`float`, defaults to 1.0): the correction's strength, a factor on `U V^T h`; training chooses it on
            held-out decision points (see [`TrainSettings.scales`]).
        model_name_or_path (`str`, *optional*): the model the head was made for.
        embedding_fingerprint (`list[float]`): a few projections of the output embedding (see
            [`embedding_fingerprint`]); empty for a head built without a model.
    """

    hidden_size: int
    vocab_size: int
    rank: int = 16
    top_k: int = 5
    tau: float = 1.4
    tau_quantile: float | None = None
    scale: float = 1.0
    model_name_or_path: str | None = None
    embedding_fingerprint: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "vocab_size", "rank", "top_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"HeadConfig.{name} must be a positive integer; got {getattr(self, name)!r}")
            setattr(self, name, int(getattr(self, name)))
        if math.isnan(self.tau):
            raise ValueError("HeadConfig.tau must be a number of nats (float('inf') disables steering); got nan")
        self.tau = float(self.tau)
        self.scale = check_scale(self.scale)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> HeadConfig:
        """Read a config written by [`CorrectionHead.save_pretrained`], with an error naming the file if it is bad."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object with the head's config")
        known = {f.name for f in fields(cls)}
        missing = {"hidden_size", "vocab_size"} - data.keys()
        if missing:
            raise ValueError(f"{path}: not a steer head config (missing {', '.join(sorted(missing))})")
        try:
            return cls(**{key: value for key, value in data.items() if key in known})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None


def output_embedding(model: nn.Module) -> torch.Tensor:
    """The weight `[vocab_size, hidden_size]` of `model.get_output_embeddings()`, with a clear error if it has none."""
    module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{type(model).__name__} has no output embedding with a 2-D weight (model.get_output_embeddings()); "
            "steering needs a causal language model with an LM head"
        )
    return weight


def embedding_fingerprint(weight: torch.Tensor) -> list[float]:
    """A dtype-robust fingerprint of an output embedding: `FINGERPRINT_ROWS` evenly spaced rows projected on a fixed
    random direction.

    Args:
        weight (`torch.Tensor` of shape `(vocab_size, hidden_size)`): any float dtype, any device.

    Returns:
        `list[float]` of length `min(FINGERPRINT_ROWS, vocab_size)`. The same embedding in float32, float16 or
        bfloat16 gives values within [`FINGERPRINT_TOLERANCE`] of each other (relative to their RMS).
    """
    vocab_size, hidden_size = weight.shape
    rows = torch.linspace(0, vocab_size - 1, min(FINGERPRINT_ROWS, vocab_size)).round().long()
    generator = torch.Generator().manual_seed(FINGERPRINT_SEED)
    direction = torch.randn(hidden_size, generator=generator, dtype=torch.float64) / math.sqrt(hidden_size)
    sample = weight.detach()[rows.to(weight.device)].to("cpu", torch.float64)
    return (sample @ direction).tolist()


def fingerprints_match(expected: list[float], actual: list[float]) -> bool:
    """Whether two fingerprints come from the same embedding, up to a change of float precision."""
    if len(expected) != len(actual):
        return False
    a, b = torch.tensor(expected, dtype=torch.float64), torch.tensor(actual, dtype=torch.float64)
    scale = a.pow(2).mean().sqrt().clamp(min=1e-12)
    return bool(((a - b).abs().max() / scale) <= FINGERPRINT_TOLERANCE)


def _model_name(model: nn.Module) -> str | None:
    config_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return getattr(model, "name_or_path", None) or config_name or None


class _ConfigSetting:
    """A head attribute stored in its [`HeadConfig`]; setting it rebuilds the config, which checks the value."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, head: CorrectionHead | None, owner: type | None = None):
        return self if head is None else getattr(head.config, self.name)

    def __set__(self, head: CorrectionHead, value: object) -> None:
        head.config = replace(head.config, **{self.name: value})


class CorrectionHead(
    nn.Module,
    ModelHubMixin,
    library_name="steer",
    tags=["steer", "correction-head", "reasoning"],
    paper_url="https://arxiv.org/abs/2605.06241",
):
    """Low-rank correction head: `delta_j = <W_u[j], U V^T h>`, centred over the candidates, for each candidate
    token `j` at a decision point.

    Args:
        config ([`HeadConfig`]): sizes, gating parameters and what the head was made for.

    Attributes `top_k`, `tau` and `scale` can be changed after construction (for sweeps); `rank` is fixed by the
    weights.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from steer import CorrectionHead
    >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
    >>> head = CorrectionHead.for_model(model, rank=16, top_k=5, tau=1.4)  # doctest: +SKIP
    >>> head.save_pretrained("my-head")  # doctest: +SKIP
    >>> head = CorrectionHead.from_pretrained("my-head")  # doctest: +SKIP
    ```
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.up = nn.Parameter(torch.zeros(config.hidden_size, config.rank))
        self.down = nn.Parameter(torch.randn(config.hidden_size, config.rank) / math.sqrt(config.hidden_size))

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        rank: int = 16,
        top_k: int = 5,
        tau: float = 1.4,
        seed: int | None = None,
    ) -> CorrectionHead:
        """Build a fresh head (it changes nothing until trained) sized for `model` and fingerprinted to it.

        Args:
            model (`PreTrainedModel`): a causal LM with an output embedding.
            rank (`int`, defaults to 16), top_k (`int`, defaults to 5), tau (`float`, defaults to 1.4): see
                [`HeadConfig`].
            seed (`int`, *optional*): seed for the random initialisation of `V`.
        """
        weight = output_embedding(model)
        config = HeadConfig(
            hidden_size=weight.shape[1],
            vocab_size=weight.shape[0],
            rank=rank,
            top_k=top_k,
            tau=tau,
            model_name_or_path=_model_name(model),
            embedding_fingerprint=embedding_fingerprint(weight),
        )
        if seed is None:
            return cls(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)

    @property
    def rank(self) -> int:
        return self.config.rank

    top_k = _ConfigSetting()
    tau = _ConfigSetting()
    scale = _ConfigSetting()

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The part of the correction that does not depend on the candidates: `scale * U V^T h`.

        Args:
            hidden (`torch.Tensor` of shape `(..., hidden_size)`): final hidden states, any float dtype.

        Returns:
            `torch.FloatTensor` of shape `(..., hidden_size)`, on the head's device.
        """
        hidden = hidden.to(self.up.device, self.up.dtype)
        projected = (hidden @ self.down) @ self.up.T
        return projected if self.scale == 1.0 else projected * self.scale

    def forward(self, hidden: torch.Tensor, candidate_embeddings: torch.Tensor,
                steerable: torch.Tensor | None = None) -> torch.Tensor:
        """The correction of each candidate, centred over the candidates it adjusts (see [`center_deltas`]), as
        decoding applies it.

        Args:
            hidden (`torch.Tensor` of shape `(batch_size, hidden_size)`): final hidden states.
            candidate_embeddings (`torch.Tensor` of shape `(batch_size, num_candidates, hidden_size)`): the output
                embedding rows of the candidates.
            steerable (`torch.BoolTensor` of shape `(batch_size, num_candidates)`, *optional*): the candidates the
                head adjusts (the base top-k); the others get 0. All by default.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_candidates)`.
        """
        correction = self.project(hidden)
        raw = torch.einsum("bkh,bh->bk", candidate_embeddings.to(correction.dtype), correction)
        return center_deltas(raw, steerable)

    def check_compatible(self, model: nn.Module) -> None:
        """Raise [`HeadMismatchError`] unless `model` has the output embedding this head was made for."""
        self.check_embedding(output_embedding(model), _model_name(model) or type(model).__name__)

    def check_embedding(self, weight: torch.Tensor, model_name: str) -> None:
        """Raise [`HeadMismatchError`] unless `weight` (`[vocab_size, hidden_size]`, the output embedding of the model
        called `model_name` in the message) is the one this head was made for (sizes only for a `meta` tensor)."""
        made_for = self.config.model_name_or_path or "an unnamed model"
        vocab_size, hidden_size = weight.shape
        if (hidden_size, vocab_size) != (self.config.hidden_size, self.config.vocab_size):
            raise HeadMismatchError(
                f"this head was made for {made_for} (hidden size {self.config.hidden_size}, vocabulary "
                f"{self.config.vocab_size}), but {model_name} has hidden size {hidden_size} and vocabulary {vocab_size}"
            )
        fingerprint = self.config.embedding_fingerprint
        if fingerprint and not weight.is_meta and not fingerprints_match(fingerprint, embedding_fingerprint(weight)):
            raise HeadMismatchError(
                f"this head was made for {made_for}, and {model_name} has the same sizes but a different output "
                "embedding (fingerprint mismatch): it is another model, or other weights of it"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> CorrectionHead:
        """Load a head saved by [`save_pretrained`], from a local directory or a Hub repository id.

        Args:
            pretrained_model_name_or_path (`str` or `Path`): a directory, or a repository on the Hugging Face Hub.
            **kwargs: `map_location` (defaults to `"cpu"`), and the Hub download options of
                `huggingface_hub.ModelHubMixin.from_pretrained` (`revision`, `cache_dir`, `token`, ...).
        """
        config_file = Path(pretrained_model_name_or_path) / CONFIG_NAME
        if config_file.is_file():
            HeadConfig.from_json_file(config_file)  # a broken local config is reported with its file and line
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write `head.safetensors` and `config.json`, each atomically (written beside, then renamed)."""
        weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in self.state_dict().items()}
        tmp = save_directory / f".{WEIGHTS_NAME}.tmp"
        save_file(weights, str(tmp), metadata={"format": "pt", "library": "steer"})
        os.replace(tmp, save_directory / WEIGHTS_NAME)
        atomic_write_json(save_directory / CONFIG_NAME, asdict(self.config))

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str | torch.device = "cpu",
        **model_kwargs,
    ) -> CorrectionHead:
        download = {"revision": revision, "cache_dir": cache_dir, "force_download": force_download,
                    "local_files_only": local_files_only, "token": token}
        config_file, weights_file = (_resolve(model_id, name, download) for name in (CONFIG_NAME, WEIGHTS_NAME))
        head = cls(HeadConfig.from_json_file(config_file))
        state = load_file(weights_file, device=str(map_location))
        expected = {name: tuple(tensor.shape) for name, tensor in head.state_dict().items()}
        found = {name: tuple(tensor.shape) for name, tensor in state.items()}
        if found != expected:
            raise ValueError(f"{weights_file}: weights {found} do not match the config's shapes {expected}")
        head.load_state_dict(state)
        return head.to(map_location)


def _resolve(model_id: str, filename: str, download: dict[str, Any]) -> str:
    """Path of `filename` in a local head directory, or downloaded from the Hub repository `model_id`."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_id} is not a steer head directory: {filename} is missing")
        return path
    return hf_hub_download(repo_id=model_id, filename=filename, **download)
