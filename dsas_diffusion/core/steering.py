"""`Steering`: the fitted artifact (per-layer map + gate, config, model fingerprint), saved as
`steering_config.json` + `steering.safetensors`, like a PEFT adapter folder."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import torch

from .artifact import CONFIG_NAME, FINGERPRINT_KEY, WEIGHTS_NAME, load_artifact, save_artifact  # noqa: F401 (re-exported)
from .attachments import attach_exclusively
from .config import SteeringConfig
from .fingerprint import check_fingerprint
from .gate import Gate
from .maps import SteeringMap, map_class
from .modules import check_not_compiled, get_module
from .options import RunOptions, check_bool, check_layers, check_option_names
from .runtime import SteeringHandle

if TYPE_CHECKING:
    from .hooks import PreForward

_FINGERPRINT_KEY = FINGERPRINT_KEY
_ATTACH_OPTIONS = ("strength", "prefix", "gated", "layers", "check_model", "owner", "gating", "lambda_floor",
                   "skip_first_token", "record_scales", "pre_forward")
_AUTO = object()  # pre_forward not given: chosen from the model
# How a model attached under its own names is read, offered by integrations: the core knows no model
# family's conventions (`dsas_diffusion.llm.sequence` registers transformers causal LMs)
_DEFAULT_PRE_FORWARDS: list[Callable[[torch.nn.Module], "PreForward | None"]] = []


def register_default_pre_forward(factory: Callable[[torch.nn.Module], "PreForward | None"]):
    """Register `factory(model) -> pre_forward or None`, asked in order when `attach` gets no
    pre_forward for a model attached under its own names; the first that answers is used."""
    _DEFAULT_PRE_FORWARDS.append(factory)
    return factory


def _default_pre_forward(model: torch.nn.Module) -> "PreForward | None":
    for factory in _DEFAULT_PRE_FORWARDS:
        found = factory(model)
        if found is not None:
            return found
    return None


class Steering:
    """Maps and gates for a set of named layers, fitted for one concept on one model.

    Layer names are full module paths; in a diffusers pipeline they start with the component
    name (`text_encoder.`, `unet.`), on a language model they are the model's own names.
    """

    def __init__(
        self,
        config: SteeringConfig,
        maps: dict[str, SteeringMap],
        gates: dict[str, Gate],
        probes: dict[str, torch.Tensor] | None = None,
    ):
        if set(maps) != set(gates) or set(maps) != set(config.layers):
            raise ValueError("maps, gates and config.layers must name the same layers")
        wrong = {type(m).__name__ for m in maps.values() if not isinstance(m, map_class(config.method))}
        if wrong:
            raise ValueError(f"config.method={config.method!r} but the maps are {sorted(wrong)}: build the steering "
                             "with the config its maps were fitted with")
        # one layer order whatever built the steering (a fit, a load from sorted-key JSON, a subset)
        config.layers = dict(sorted(config.layers.items(), key=lambda item: _natural_key(item[0])))
        # each map applied as the config says (e.g. Linear-AcT outside its source range), also where
        # code calls map.delta directly (training, incremental refits), not only once attached
        self.config, self.gates = config, gates
        self.maps = {name: m.configured(config) for name, m in maps.items()}
        self.probes = probes or {}

    # ---- inspection -------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.config.layers)

    @property
    def steered_layers(self) -> list[str]:
        return [n for n, info in self.config.layers.items() if info.steered]

    def subset(self, prefix: str) -> "Steering":
        """The layers whose names start with `prefix` (e.g. "text_encoder."), as a Steering of their own."""
        keep = [n for n in self.layers if n.startswith(prefix)]
        if not keep:
            raise ValueError(f"no layer of this steering starts with {prefix!r}; its layers: {self.layers[:4]} ...")
        roots = {n.split(".", 1)[0] for n in keep}  # pipeline components; a language model keeps its one root ""

        def own(d: dict) -> dict:
            return {k: v for k, v in d.items() if k in roots} or dict(d)

        config = replace(self.config, layers={n: self.config.layers[n] for n in keep},
                         fingerprint=own(self.config.fingerprint), targets=own(self.config.targets))
        return Steering(config, {n: self.maps[n] for n in keep}, {n: self.gates[n] for n in keep}, dict(self.probes))

    def report(self) -> str:
        """A per-layer table: width, held-out gate accuracy, and whether the layer is steered."""
        width = max(len(n) for n in self.layers)
        rows = [f"{'layer':<{width}}  width  gate acc  steered"]
        for n, info in self.config.layers.items():
            rows.append(f"{n:<{width}}  {info.width:>5}  {info.gate_accuracy:>8.3f}  {'yes' if info.steered else 'no'}")
        rows.append(f"{len(self.steered_layers)}/{len(self.layers)} layers steered "
                    f"(gate accuracy >= {self.config.accuracy_threshold})")
        return "\n".join(rows)

    def __repr__(self):
        c = self.config
        return (f"Steering(method={c.method!r}, base_model={c.base_model!r}, layers={len(self.layers)}, "
                f"steered={len(self.steered_layers)}, gating={c.gating!r})")

    # ---- attaching ----------------------------------------------------------------------------
    def check_model(self, root: torch.nn.Module, prefix: str = "", what: str = "model") -> None:
        """Raise a ValueError explaining why `root` is not the model this steering was fitted on."""
        check_not_compiled(root, what)
        key = prefix.rstrip(".")
        if key not in self.config.fingerprint:
            fitted = sorted(self.config.fingerprint) or ["?"]
            raise ValueError(
                f"this steering holds no layers for {what!r}; it was fitted on {', '.join(k or 'a language model' for k in fitted)}"
            )
        check_fingerprint(self.config.fingerprint[key], self.probes.get(key, torch.zeros(0)), root, what,
                          self.config.base_model)

    def attach(
        self,
        model: torch.nn.Module,
        strength: float = 1.0,
        *,
        prefix: str = "",
        gated: bool = True,
        layers: list[str] | None = None,
        check_model: bool = True,
        owner: object | None = None,
        **options,
    ) -> SteeringHandle:
        """Hook `layers` of `model` (its names prefixed with `prefix`; default: the steered layers, or
        every fitted layer for `gated=False`, plain steering with lambda = 1); returns a handle usable
        as a context manager. Other options (gating, lambda_floor, skip_first_token, record_scales,
        pre_forward) override the config's run-time defaults for this attachment. A model attached
        under its own names (no prefix) with no pre_forward given gets the one an integration
        registered for it (`register_default_pre_forward`): a transformers language model gets
        `dsas_diffusion.llm.causal_lm_pre_forward`, which reads padding from its attention mask and
        carries the gate state across the KV-cached calls of a generation.

        A module already steered by a live attachment is refused (it would be steered twice), except
        between attachments of one `owner`: an integration (a pipeline) that keeps its attachments
        at strength 0 outside its own calls and switches on one at a time."""
        check_option_names(options, _ATTACH_OPTIONS, "attach() option")
        pre_forward = options.pop("pre_forward", _AUTO)
        run = RunOptions.from_config(self.config, strength=strength, gated=gated, **options)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the model to steer), got {type(model).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string such as 'unet.' (or '' for a model's own names), got {prefix!r}")
        check_bool(check_model, "check_model")
        layers = check_layers(layers)
        if pre_forward is not _AUTO and pre_forward is not None and not callable(pre_forward):
            raise TypeError(f"pre_forward must be a callable (hookset, args, kwargs) or None, got {pre_forward!r}")
        what = prefix.rstrip(".") or "model"
        if check_model:
            self.check_model(model, prefix, what)
        chosen = layers if layers is not None else (self.layers if not run.gated else self.steered_layers)
        unknown = sorted(set(chosen) - set(self.layers))
        if unknown:
            raise ValueError(f"layers {unknown} are not in this steering; it has {self.layers}")
        names = {full: full[len(prefix):] for full in chosen if full.startswith(prefix)}
        if not names:
            raise ValueError(f"none of the chosen layers starts with prefix={prefix!r}, so nothing would be steered; "
                             f"this steering's layers: {self.layers[:4]} ...")
        if pre_forward is _AUTO:
            pre_forward = _default_pre_forward(model) if not prefix else None
        modules = {full: get_module(model, local, what) for full, local in names.items()}
        return attach_exclusively(modules, self, what, owner, lambda: SteeringHandle(
            self, model, names, **run.as_kwargs(), pre_forward=pre_forward, what=what))

    # ---- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in self.layers:
            for k, v in self.maps[name].tensors().items():
                tensors[f"{name}.map.{k}"] = v
            for k, v in self.gates[name].tensors().items():
                tensors[f"{name}.gate.{k}"] = v
        for root, probe in self.probes.items():
            if root in self.config.fingerprint:  # a subset keeps every probe, but only its roots' fingerprints
                tensors[f"{_FINGERPRINT_KEY}.{root}"] = probe
        # copies: layers may share tensors (one map reused), which safetensors refuses to write
        return {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in tensors.items()}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the folder as one unit: killed at any moment, it loads as the old steering or the
        new one, or is refused with a clear message (core/artifact.py)."""
        save_artifact(save_directory, self.config, self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **hub_kwargs) -> "Steering":
        """Load from a folder, or a hub repo id ('user/name', through huggingface_hub; the local
        folder is looked for first, and HF_HUB_OFFLINE is respected). Reads JSON and safetensors
        only: loading never executes code. Every field and tensor is checked against what a fit
        writes, and a config is only accepted with the weights it was saved with."""
        config, maps, gates, probes = load_artifact(path, hub_kwargs)
        return cls(config, maps, gates, probes)


def _natural_key(name: str) -> list:
    """"layers.2" before "layers.10": digit runs compare as numbers."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]
