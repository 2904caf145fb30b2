"""The persisted, validated description of a fitted `Steering` (steering_config.json)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .maps import MAPS

FORMAT_VERSION = 1

Gating = Literal["token", "causal", "sequence"]
LayerKind = Literal["tokens", "spatial"]
GATINGS = ("token", "causal", "sequence")


@dataclass
class LayerInfo:
    """What was fitted at one module: its width, how its positions are laid out, the gate's score."""

    width: int
    kind: LayerKind = "tokens"
    gate_accuracy: float = float("nan")
    steered: bool = True

    def __post_init__(self):
        if self.kind not in ("tokens", "spatial"):
            raise ValueError(f"layer kind must be 'tokens' or 'spatial', got {self.kind!r}")


@dataclass
class SteeringConfig:
    """Fit-time choices plus run-time defaults; every [choice] of the method is a field here.

    - method: steering map family (`mean_shift`, `mean_act`, `linear_act`, `iti`).
    - pca_rank / logistic_l2: the gate's PCA rank (paper: 5) and L2 penalty (1 / scikit-learn's C).
    - accuracy_threshold / held_out_fraction: layers whose held-out gate accuracy is below the
      threshold (paper: 0.75) are not steered; the held-out split is by prompt.
    - gating: how lambda is read at each position: `token` (per position; padding positions take
      the sequence decision), `causal` (mean of the prefix <= k; for images the spatial mean),
      `sequence` (one decision per sequence / image).
    - skip_first_token: never steer the first real token (BOS), which looks the same in every prompt.
    - lambda_floor: lambdas below it snap to exactly 0, so clearly-absent inputs are bit-identical.
    - clamp_to_source_range: Linear-AcT evaluates the map on inputs clamped to the source range.
    """

    method: str = "linear_act"
    pca_rank: int = 5
    logistic_l2: float = 1.0
    accuracy_threshold: float = 0.75
    held_out_fraction: float = 0.25
    gating: Gating = "token"
    skip_first_token: bool = True
    lambda_floor: float = 0.0
    clamp_to_source_range: bool = True
    seed: int = 0
    base_model: str | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)
    num_examples: dict[str, int] = field(default_factory=dict)
    layers: dict[str, LayerInfo] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.method not in MAPS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of {sorted(MAPS)}")
        if not isinstance(self.pca_rank, int) or self.pca_rank < 1:
            raise ValueError(f"pca_rank must be a positive integer, got {self.pca_rank!r}")
        if not 0.0 <= self.accuracy_threshold <= 1.0:
            raise ValueError(f"accuracy_threshold must lie in [0, 1], got {self.accuracy_threshold!r}")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must lie in [0, 1), got {self.held_out_fraction!r}")
        if self.gating not in GATINGS:
            raise ValueError(f"gating={self.gating!r} is unknown; choose one of {list(GATINGS)}")
        if not 0.0 <= self.lambda_floor < 1.0:
            raise ValueError(f"lambda_floor must lie in [0, 1), got {self.lambda_floor!r}")
        if self.logistic_l2 <= 0:
            raise ValueError(f"logistic_l2 must be > 0, got {self.logistic_l2!r}")
        self.layers = {k: v if isinstance(v, LayerInfo) else LayerInfo(**v) for k, v in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for info in d["layers"].values():  # JSON has no NaN
            if isinstance(info["gate_accuracy"], float) and math.isnan(info["gate_accuracy"]):
                info["gate_accuracy"] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SteeringConfig":
        version = d.get("format_version")
        if not isinstance(version, int):
            raise ValueError("steering_config.json has no integer 'format_version'; it was not written by dsas-diffusion")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"this steering was saved in format version {version} by a newer dsas-diffusion; this version reads "
                f"format <= {FORMAT_VERSION}. Upgrade with `pip install -U dsas-diffusion`"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"steering_config.json has unknown fields {unknown}; it is damaged or from another tool")
        d = dict(d)
        d["layers"] = {
            k: LayerInfo(**{**v, "gate_accuracy": float("nan") if v.get("gate_accuracy") is None else v["gate_accuracy"]})
            for k, v in d.get("layers", {}).items()
        }
        return cls(**d)
