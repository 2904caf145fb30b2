"""The persisted, validated description of a fitted `Steering` (steering_config.json)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .gate import GATE_KINDS
from .maps import MAPS, OUTSIDE_SOURCE_RANGE

# 1: the first format. 2: the config names the sha256 of the weights file it was saved with
# (`weights_sha256`), so a config never loads with weights it does not belong to. Format 1
# files still load, without that check.
# 3: learned maps and gates, gate activation, output elements, k-fold scores. 4: how Linear-AcT treats
# values outside its source range and how maps act on spatial layers (a format 3 reader refuses
# these fields as unknown, so it is told to upgrade instead of that the file is damaged).
FORMAT_VERSION = 4
DIGEST_KEY = "weights_sha256"

Gating = Literal["token", "causal", "sequence"]
LayerKind = Literal["tokens", "spatial"]
GateActivation = Literal["sigmoid", "relu"]
OutsideSourceRange = Literal["clamp", "identity"]
SpatialMap = Literal["per_position", "spatial_mean"]
SPATIAL_MAPS = ("per_position", "spatial_mean")
GATINGS = ("token", "causal", "sequence")
GATE_ACTIVATIONS = ("sigmoid", "relu")
# Fields added after format 2, by the format that requires them: a file of an earlier format may omit
# them and loads with these values, which are what every such file meant. (Format 3 files written
# before format 4 was fixed may hold the format 4 fields.)
_ADDED_FIELDS = {3: {"gate_activation": "sigmoid", "gates": "two_stage", "training": {}, "incremental": False,
                     "cv_folds": 0, "accuracy_scaling": False},
                 4: {"outside_source_range": "clamp", "spatial_map": "per_position"}}
_ADDED_LAYER_FIELDS = {3: {"element": 0, "gate_accuracy_std": None}}


def _optional(added: dict[int, dict], version: int) -> dict:
    """The added fields a file of `version` may omit, with what their absence means."""
    return {k: v for since, fields_ in added.items() if version < since for k, v in fields_.items()}


def _names(added: dict[int, dict]) -> set[str]:
    return {k for fields_ in added.values() for k in fields_}


@dataclass
class LayerInfo:
    """What was fitted at one module: its width, how its positions are laid out, the gate's score,
    and which element of the module's output is steered (a block returning a tuple such as
    (image stream, text stream) names the one the steering was fitted on; 0 for a tensor)."""

    width: int
    kind: LayerKind = "tokens"
    gate_accuracy: float = float("nan")
    steered: bool = True
    element: int = 0
    gate_accuracy_std: float = float("nan")  # over cross-validation folds (cv_folds); NaN with one split

    def __post_init__(self):
        if self.kind not in ("tokens", "spatial"):
            raise ValueError(f"layer kind must be 'tokens' or 'spatial', got {self.kind!r}")
        if isinstance(self.element, bool) or not isinstance(self.element, int) or self.element < 0:
            raise ValueError(f"layer element must be a non-negative integer (the index of the steered element "
                             f"of a tuple output, 0 for a tensor), got {self.element!r}")


@dataclass
class SteeringConfig:
    """Fit-time choices plus run-time defaults; every [choice] of the method is a field here.

    - method: steering map family, a name of core/registry.py's MAPS (`mean_shift`, `mean_act`,
      `linear_act`, `iti`, `lineas`).
    - gates: how the gates were obtained, a name of GATE_KINDS: `two_stage` (fitted after the maps)
      or `e2e` (learned with them through the model).
    - pca_rank / logistic_l2: the gate's PCA rank (paper: 5) and L2 penalty (1 / scikit-learn's C).
    - accuracy_threshold / held_out_fraction: layers whose held-out gate accuracy is below the
      threshold (paper: 0.75) are not steered; the held-out split is by prompt.
    - accuracy_scaling: instead of the hard threshold, each layer's map is weighed by its gate's
      held-out accuracy, 0 at chance (0.5) rising linearly to 1 at accuracy 1 (the reviewers'
      suggestion); layers at or below chance are not steered.
    - cv_folds: 0 scores each gate on one held-out split; k >= 2 by k-fold cross-validation over
      prompts (mean accuracy against the threshold, its spread recorded per layer).
    - gating: how lambda is read at each position: `token` (per position; padding positions take
      the sequence decision), `causal` (mean of the prefix <= k; for images the spatial mean),
      `sequence` (one decision per sequence / image).
    - skip_first_token: never steer the first real token (BOS), which looks the same in every prompt.
    - lambda_floor: lambdas below it snap to exactly 0, so clearly-absent inputs are bit-identical.
    - clamp_to_source_range: Linear-AcT keeps the source range [lo, hi] it was fitted on (False:
      the map is affine everywhere, and `outside_source_range` has nothing to act on).
    - outside_source_range: what Linear-AcT does to a value outside that range: `identity` leaves
      it untouched, as AcT does, or `clamp` shifts it as if it were at the nearest end of the range
      (files written before this field: clamp).
    - spatial_map: how closed-form maps act on spatial (image) layers, whose maps are fitted on
      per-image spatial means: `spatial_mean` transports each row's (image's) per-channel mean
      over its positions and adds that one shift to every position, as AcT does; `per_position`
      applies the map at each position (an affine map with slope != 1 then changes the contrast
      inside the image; files written before this field). Maps learned through the model are
      applied per position, as they were trained; shift maps are the same either way.
      [choice, measured: benchmarks/act_options.py] the default `clamp` / `spatial_mean`: in the
      toy LM `identity` removed almost no insult up to alpha 6 (about 80 % of the token values lie
      outside the range of the per-text means the maps are fitted on), while in the toy images it
      moved the fronts to less drift; `spatial_mean` tied with `per_position` under `clamp`, did
      better under `identity`, and keeps the contrast inside the image.
    - incremental: each layer's map was fitted on source activations already steered (plainly) by
      the maps of the layers before it, as AcT does; otherwise every map sees unsteered ones.
    - training: for maps or gates learned through the model, the options of that learning and
      how it went (core/learned.py: steps, lr, ..., steps_run, final_loss); empty otherwise.
    - gate_activation: how a gate logit becomes lambda (`core.gate.activate`): `sigmoid` (the
      two-stage logistic gate) or `relu` (clamped to [0, 1]: exactly 0 for negative logits).
    """

    method: str = "linear_act"
    gates: str = "two_stage"
    pca_rank: int = 5
    logistic_l2: float = 1.0
    accuracy_threshold: float = 0.75
    accuracy_scaling: bool = False
    held_out_fraction: float = 0.25
    cv_folds: int = 0
    gating: Gating = "token"
    skip_first_token: bool = True
    lambda_floor: float = 0.0
    clamp_to_source_range: bool = True
    outside_source_range: OutsideSourceRange = "clamp"
    spatial_map: SpatialMap = "spatial_mean"
    incremental: bool = False
    gate_activation: GateActivation = "sigmoid"
    seed: int = 0
    base_model: str | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)
    num_examples: dict[str, int] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)
    layers: dict[str, LayerInfo] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.method not in MAPS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of {sorted(MAPS)}")
        if self.gates not in GATE_KINDS:
            raise ValueError(f"gates={self.gates!r} is unknown; choose one of {sorted(GATE_KINDS)}")
        if not isinstance(self.pca_rank, int) or self.pca_rank < 1:
            raise ValueError(f"pca_rank must be a positive integer, got {self.pca_rank!r}")
        if not 0.0 <= self.accuracy_threshold <= 1.0:
            raise ValueError(f"accuracy_threshold must lie in [0, 1], got {self.accuracy_threshold!r}")
        if isinstance(self.cv_folds, bool) or not isinstance(self.cv_folds, int) or self.cv_folds < 0 \
                or self.cv_folds == 1:
            raise ValueError(f"cv_folds must be 0 (one held-out split) or an integer >= 2, got {self.cv_folds!r}")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must lie in [0, 1), got {self.held_out_fraction!r}")
        if self.gating not in GATINGS:
            raise ValueError(f"gating={self.gating!r} is unknown; choose one of {list(GATINGS)}")
        if not 0.0 <= self.lambda_floor < 1.0:
            raise ValueError(f"lambda_floor must lie in [0, 1), got {self.lambda_floor!r}")
        if self.outside_source_range not in OUTSIDE_SOURCE_RANGE:
            raise ValueError(f"outside_source_range={self.outside_source_range!r} is unknown; choose one of "
                             f"{list(OUTSIDE_SOURCE_RANGE)}")
        if self.spatial_map not in SPATIAL_MAPS:
            raise ValueError(f"spatial_map={self.spatial_map!r} is unknown; choose one of {list(SPATIAL_MAPS)}")
        if self.gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate_activation={self.gate_activation!r} is unknown; choose one of "
                             f"{list(GATE_ACTIVATIONS)}")
        if self.logistic_l2 <= 0:
            raise ValueError(f"logistic_l2 must be > 0, got {self.logistic_l2!r}")
        self.layers = {k: v if isinstance(v, LayerInfo) else LayerInfo(**v) for k, v in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for info in d["layers"].values():  # JSON has no NaN
            for key in ("gate_accuracy", "gate_accuracy_std"):
                if isinstance(info[key], float) and math.isnan(info[key]):
                    info[key] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "steering_config.json") -> "SteeringConfig":
        """A config from `to_dict()` or a saved steering_config.json, checked field by field (see
        `read_config_document`; the weights digest, which only a saved file has, is optional here)."""
        return read_config_document(d, source, digest_required=False)[0]


# ---- the JSON document: checked field by field on load, and before a save writes it --------------

_FIX = "the file is damaged: fit and save the steering again"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT_KEYS = {"class", "num_parameters", "probe_parameters", "probe_parameter"}
_RESERVED_PREFIX = "__fingerprint__"


class _Invalid(Exception):
    """One problem with one field; the entry points add the file's name and the fix."""


def read_config_document(d: Any, source: str = "steering_config.json",
                         digest_required: bool = True) -> tuple[SteeringConfig, str | None]:
    """(config, sha256 of its weights file or None for a format 1 file) from a parsed
    steering_config.json. Every field must be there with its declared JSON type: `"false"` is
    not false, `true` is not the integer 1, and numbers are finite and in range."""
    if not isinstance(d, dict):
        kind = {type(None): "null", str: "string", list: "array", bool: "boolean", int: "number",
                float: "number"}.get(type(d), type(d).__name__)
        raise ValueError(f"{source} holds a JSON {kind}, not an object; {_FIX}")
    version = d.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{source} has no integer 'format_version'; it was not written by dsas-diffusion "
                         "(fit and save the steering again)")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"this steering was saved in format version {version} by a newer dsas-diffusion; this version reads "
            f"format <= {FORMAT_VERSION}. Upgrade with `pip install -U dsas-diffusion`"
        )
    try:
        return _read(d, version, digest_required)
    except _Invalid as e:
        raise ValueError(f"{source}: {e}; {_FIX}") from None


def config_document(config: SteeringConfig, weights_sha256: str) -> dict[str, Any]:
    """The JSON document a save writes, checked as a load will check it, so a save never writes a
    folder that cannot be loaded."""
    doc = {**config.to_dict(), "format_version": FORMAT_VERSION, DIGEST_KEY: weights_sha256}
    try:
        _read(doc, FORMAT_VERSION)
    except _Invalid as e:
        raise ValueError(f"this steering cannot be saved: its config's {e}; build the config with valid values "
                         "(a fit does) and do not change its fields afterwards") from None
    return doc


def _read(d: dict, version: int, digest_required: bool = True) -> tuple[SteeringConfig, str | None]:
    if version < 1:
        raise _Invalid(f"'format_version' must be 1 or more, got {version}")
    names = [f.name for f in fields(SteeringConfig)]
    allowed = set(names) | ({DIGEST_KEY} if version >= 2 else set())
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise _Invalid(f"unknown fields {unknown} (is it damaged or from another tool?)")
    omitted = _optional(_ADDED_FIELDS, version)
    missing = [n for n in sorted(allowed) if n not in d and n not in omitted
               and (n != DIGEST_KEY or digest_required)]
    if missing:
        raise _Invalid(f"required fields {missing} are missing")
    d = {**omitted, **d}
    digest = None
    if DIGEST_KEY in d:
        digest = _string(d[DIGEST_KEY], repr(DIGEST_KEY))
        if not _HEX64.fullmatch(digest):
            raise _Invalid(f"{DIGEST_KEY!r} must be 64 lowercase hex digits (a sha256), got {digest!r}")
    values = {
        "method": _choice(d["method"], "'method'", sorted(MAPS)),
        "gates": _choice(d["gates"], "'gates'", sorted(GATE_KINDS)),
        "pca_rank": _integer(d["pca_rank"], "'pca_rank'", 1),
        "logistic_l2": _real(d["logistic_l2"], "'logistic_l2'", 0.0, math.inf, low_open=True),
        "accuracy_threshold": _real(d["accuracy_threshold"], "'accuracy_threshold'", 0.0, 1.0),
        "accuracy_scaling": _boolean(d["accuracy_scaling"], "'accuracy_scaling'"),
        "held_out_fraction": _real(d["held_out_fraction"], "'held_out_fraction'", 0.0, 1.0, high_open=True),
        "cv_folds": _integer(d["cv_folds"], "'cv_folds'", 0),
        "gating": _choice(d["gating"], "'gating'", list(GATINGS)),
        "skip_first_token": _boolean(d["skip_first_token"], "'skip_first_token'"),
        "lambda_floor": _real(d["lambda_floor"], "'lambda_floor'", 0.0, 1.0, high_open=True),
        "clamp_to_source_range": _boolean(d["clamp_to_source_range"], "'clamp_to_source_range'"),
        "outside_source_range": _choice(d["outside_source_range"], "'outside_source_range'",
                                        list(OUTSIDE_SOURCE_RANGE)),
        "spatial_map": _choice(d["spatial_map"], "'spatial_map'", list(SPATIAL_MAPS)),
        "incremental": _boolean(d["incremental"], "'incremental'"),
        "gate_activation": _choice(d["gate_activation"], "'gate_activation'", list(GATE_ACTIVATIONS)),
        "seed": _integer(d["seed"], "'seed'"),
        "base_model": None if d["base_model"] is None else _string(d["base_model"], "'base_model'"),
        "fingerprint": {k: _fingerprint_entry(v, f"fingerprint[{k!r}]")
                        for k, v in _mapping(d["fingerprint"], "'fingerprint'").items()},
        "targets": {k: _string(v, f"targets[{k!r}]") for k, v in _mapping(d["targets"], "'targets'").items()},
        "num_examples": {k: _integer(v, f"num_examples[{k!r}]", 0)
                         for k, v in _mapping(d["num_examples"], "'num_examples'").items()},
        "training": {k: v if isinstance(v, int) and not isinstance(v, bool) else
                     _real(v, f"training[{k!r}]", -math.inf, math.inf)
                     for k, v in _mapping(d["training"], "'training'").items()},
        "layers": {k: _layer(v, k, version) for k, v in _mapping(d["layers"], "'layers'").items()},
        "format_version": version,
    }
    if not values["layers"]:
        raise _Invalid("'layers' lists no layer")
    try:
        return SteeringConfig(**values), digest
    except ValueError as e:  # a rule of the dataclass itself
        raise _Invalid(str(e)) from None


def _got(value: Any) -> str:
    return f"got {value!r} (a JSON {_json_type(value)})"


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"{where} must be true or false, {_got(value)}")
    return value


def _integer(value: Any, where: str, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(f"{where} must be an integer, {_got(value)}")
    if minimum is not None and value < minimum:
        raise _Invalid(f"{where} must be >= {minimum}, got {value}")
    return value


def _real(value: Any, where: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Invalid(f"{where} must be a number, {_got(value)}")
    value = float(value)
    inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not math.isfinite(value) or not inside:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise _Invalid(f"{where} must be a finite number in {bounds}, got {value!r}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{where} must be a string, {_got(value)}")
    return value


def _choice(value: Any, where: str, choices: list[str]) -> str:
    if _string(value, where) not in choices:
        raise _Invalid(f"{where} must be one of {choices}, got {value!r}")
    return value


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise _Invalid(f"{where} must be an object, {_got(value)}")
    return value


def _exact_keys(value: dict, where: str, required: set[str], optional: set[str] = frozenset()) -> None:
    missing, unknown = sorted(required - set(value)), sorted(set(value) - required - set(optional))
    if missing or unknown:
        raise _Invalid(f"{where} must hold {sorted(required)}" + (f"; {missing} missing" if missing else "")
                       + (f"; unknown {unknown}" if unknown else ""))


def _layer(value: Any, name: str, version: int) -> LayerInfo:
    where = f"layers[{name!r}]"
    if name.startswith(_RESERVED_PREFIX):
        raise _Invalid(f"{where}: a layer name must be a module path such as 'blocks.0', not start with "
                       f"{_RESERVED_PREFIX!r} (the weights file's fingerprint entries)")
    value = _mapping(value, where)
    omitted = _optional(_ADDED_LAYER_FIELDS, version)
    required = {"width", "kind", "gate_accuracy", "steered"} | (_names(_ADDED_LAYER_FIELDS) - set(omitted))
    _exact_keys(value, where, required, set(omitted))
    value = {**omitted, **value}
    accuracy = value["gate_accuracy"]  # JSON has no NaN: a gate scored on no held-out prompt saves null
    spread = value["gate_accuracy_std"]
    return LayerInfo(
        width=_integer(value["width"], f"{where}.width", 1),
        kind=_choice(value["kind"], f"{where}.kind", ["tokens", "spatial"]),
        gate_accuracy=float("nan") if accuracy is None else _real(accuracy, f"{where}.gate_accuracy", 0.0, 1.0),
        steered=_boolean(value["steered"], f"{where}.steered"),
        element=_integer(value["element"], f"{where}.element", 0),
        gate_accuracy_std=float("nan") if spread is None else _real(spread, f"{where}.gate_accuracy_std", 0.0, 1.0),
    )


def _fingerprint_entry(value: Any, where: str) -> dict:
    value = _mapping(value, where)
    _exact_keys(value, where, {"class", "num_parameters"}, _FINGERPRINT_KEYS)
    entry = {"class": _string(value["class"], f"{where}.class"),
             "num_parameters": _integer(value["num_parameters"], f"{where}.num_parameters", 0)}
    if ("probe_parameters" in value) == ("probe_parameter" in value):
        raise _Invalid(f"{where} must name its probed parameters in 'probe_parameters'")
    if "probe_parameters" in value:  # files written before the middle and last probes name one 'probe_parameter'
        names = value["probe_parameters"]
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise _Invalid(f"{where}.probe_parameters must be a list of parameter names, {_got(names)}")
        entry["probe_parameters"] = list(names)
    else:
        name = value["probe_parameter"]
        entry["probe_parameter"] = None if name is None else _string(name, f"{where}.probe_parameter")
    return entry


def probe_size(entry: dict, values_per_parameter: int) -> int:
    """How many probe values the weights file holds for one fingerprint entry."""
    if "probe_parameters" in entry:
        return values_per_parameter * len(entry["probe_parameters"])
    return values_per_parameter if entry.get("probe_parameter") else 0
