"""The scores folder: per-token entropies of every rollout and the features of its decision-point candidates.

Layout of `ROLLOUTS_DIR/scores/`:

- `settings.json`: the model and scoring settings (a resumed run must use the same);
- `model.json`: the fingerprint of the model's output embedding, checked when a head is trained on these scores;
- `shard-*.safetensors`: tensors for a group of rollouts, named as in [`TENSORS`];
- `shards.jsonl`: the index, one [`ShardRecord`] per shard: its `file`, and a [`ShardRollout`] for each of its
  rollouts.

Shards are written atomically and indexed after they are complete, so an interrupted run resumes where it stopped.
[`Features`] carries the same names as the shard tensors.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file

from steer.files import atomic_write_json
from steer.pipeline.folders import Record, RolloutKey, RunFolder
from steer.pipeline.store import StoreError

INDEX_FILE = "shards.jsonl"
SETTINGS_FILE = "settings.json"
MODEL_FILE = "model.json"
INDEX_KEY = ("file",)
TENSORS = {
    "entropy": "[tokens] float32: entropy at every generated position, rollouts concatenated",
    "offsets": "[rollouts + 1] int64: where each rollout's positions start in `entropy`",
    "point_rollout": "[points] int64: the rollout (index within the shard) of each stored position",
    "point_position": "[points] int64: the position within the rollout's completion",
    "point_entropy": "[points] float32",
    "point_topk_ids": "[points, top_k] int64: base candidates, best first",
    "point_topk_logprobs": "[points, top_k] float32",
    "point_token": "[points] int64: the token the rollout took",
    "point_token_logprob": "[points] float32",
    "point_hidden": "[points, hidden_size] float16: the final hidden state the logits came from",
}
POINT_TENSORS = tuple(name for name in TENSORS if name.startswith("point_") and name != "point_rollout")


@dataclass
class Features:
    """Stored features of the positions above the storage floor, for a set of rollouts. Tensor attributes carry
    the names of [`TENSORS`]; `point_rollout` indexes `keys` (not a shard's rollouts).

    Attributes:
        keys (`list[RolloutKey]`): the rollouts, in the order `point_rollout` refers to.
        entropy (`list[torch.Tensor]`): each rollout's entropy at every generated position.
        point_rollout (`torch.LongTensor` of shape `(points,)`): index into `keys` of each point.
        point_position, point_entropy, point_topk_ids, point_topk_logprobs, point_token, point_token_logprob,
            point_hidden: see [`TENSORS`].
        floor (`float`): entropy above which points were stored.
        embedding_fingerprint (`list[float]`): of the model that scored them.
    """

    keys: list[RolloutKey]
    entropy: list[torch.Tensor]
    point_rollout: torch.Tensor
    point_position: torch.Tensor
    point_entropy: torch.Tensor
    point_topk_ids: torch.Tensor
    point_topk_logprobs: torch.Tensor
    point_token: torch.Tensor
    point_token_logprob: torch.Tensor
    point_hidden: torch.Tensor
    floor: float
    embedding_fingerprint: list[float]


@dataclass(frozen=True)
class ShardRollout:
    """A rollout of a shard: its `key`, its generated tokens (`num_tokens`), their `mean_entropy`, the share of them
    above the scoring's `report_tau` (`above_tau`), and the decision-point features stored (`points`)."""

    key: RolloutKey
    num_tokens: int
    mean_entropy: float
    above_tau: float
    points: int


@dataclass(frozen=True)
class ShardRecord(Record):
    """The index record of one shard: its `file` and its `rollouts`, in the order of the shard's tensors."""

    file: str
    rollouts: list[ShardRollout]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardRecord:
        rollouts = [ShardRollout(**{**r, "key": tuple(r["key"])}) for r in data["rollouts"]]
        return cls(file=data["file"], rollouts=rollouts)


class ScoreFolder(RunFolder[ShardRecord]):
    """The `scores/` folder of a rollouts folder (see the module docstring); its records are the shard index.

    Args:
        path (`str` or `os.PathLike`): the `scores` folder itself.

    Example:

    ```python
    >>> scores = RolloutFolder("runs/rollouts").scores  # doctest: +SKIP
    >>> features = scores.features([("p1", 0), ("p1", 1)])  # doctest: +SKIP
    ```
    """

    records_file = INDEX_FILE
    settings_file = SETTINGS_FILE
    record_type = ShardRecord
    key = INDEX_KEY
    writer = "steer score"

    def write_fingerprint(self, fingerprint: list[float]) -> None:
        atomic_write_json(self.path / MODEL_FILE, {"embedding_fingerprint": fingerprint})

    def write_shard(self, rank: int, keys: Sequence[RolloutKey], tensors: dict[str, torch.Tensor],
                    report_tau: float) -> ShardRecord:
        """Save one shard's [`TENSORS`] atomically and return its index record (not yet appended to the index)."""
        name = f"shard-{rank:03d}-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = self.path / f".{name}.tmp"
        save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(tmp))
        os.replace(tmp, self.path / name)
        offsets = tensors["offsets"].tolist()
        rollouts = []
        for index, key in enumerate(keys):
            entropy = tensors["entropy"][offsets[index] : offsets[index + 1]]
            rollouts.append(ShardRollout(
                key=(key[0], key[1]), num_tokens=entropy.numel(),
                mean_entropy=float(entropy.mean()) if entropy.numel() else 0.0,
                above_tau=float((entropy > report_tau).float().mean()) if entropy.numel() else 0.0,
                points=int((tensors["point_rollout"] == index).sum()),
            ))
        return ShardRecord(name, rollouts)

    def features(self, keys: Sequence[RolloutKey]) -> Features:
        """The stored features of the rollouts `keys`, in that order.

        Raises `FileNotFoundError` if the folder was not scored, and [`StoreError`] naming a rollout that was not.
        """
        wanted: dict[RolloutKey, int] = {(key[0], key[1]): position for position, key in enumerate(keys)}
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        entropy: list[torch.Tensor | None] = [None] * len(wanted)
        for shard in self.read_records():
            local = [wanted.get(r.key) for r in shard.rollouts]
            if all(position is None for position in local):
                continue
            tensors = load_file(str(self.path / shard.file))
            offsets = tensors["offsets"].tolist()
            for index, position in enumerate(local):
                if position is not None:
                    entropy[position] = tensors["entropy"][offsets[index] : offsets[index + 1]]
            owner = torch.tensor([-1 if p is None else p for p in local])[tensors["point_rollout"]]
            keep = owner >= 0
            parts["point_rollout"].append(owner[keep])
            for name in POINT_TENSORS:
                parts[name].append(tensors[name][keep])
        missing = [key for key, position in wanted.items() if entropy[position] is None]
        if missing:
            raise StoreError(
                f"{self.path}: {len(missing)} rollouts were not scored (first: {missing[0]}): run `steer score` again"
            )
        settings = json.loads(self.settings_path.read_text(encoding="utf-8"))
        return Features(
            keys=list(wanted), entropy=cast(list[torch.Tensor], entropy),
            **{name: torch.cat(tensors) for name, tensors in parts.items()},
            floor=float(settings["floor"]), embedding_fingerprint=self.fingerprint(),
        )

    def fingerprint(self) -> list[float]:
        """The output-embedding fingerprint of the model that scored the rollouts."""
        return json.loads((self.path / MODEL_FILE).read_text(encoding="utf-8"))["embedding_fingerprint"]
