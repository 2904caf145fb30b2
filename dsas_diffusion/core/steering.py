"""`Steering`: the fitted artifact (per-layer map + gate, config, model fingerprint), saved as
`steering_config.json` + `steering.safetensors`, like a PEFT adapter folder."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import SteeringConfig
from .fingerprint import check_fingerprint
from .gate import Gate
from .io import atomic_path, write_text_atomic
from .maps import SteeringMap, map_class
from .modules import check_not_compiled
from .runtime import SteeringHandle
from .sequence import causal_lm_pre_forward, takes_attention_mask

CONFIG_NAME = "steering_config.json"
WEIGHTS_NAME = "steering.safetensors"
_FINGERPRINT_KEY = "__fingerprint__"


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
        self.config, self.maps, self.gates = config, maps, gates
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
        **options,
    ) -> SteeringHandle:
        """Hook `layers` of `model` (its names prefixed with `prefix`; default: the steered layers, or
        every fitted layer for `gated=False`, plain steering with lambda = 1); returns a handle usable
        as a context manager. Other options (gating, lambda_floor, skip_first_token, record_scales,
        pre_forward) override the config's run-time defaults for this attachment. A model attached
        under its own names (no prefix) whose forward takes an `attention_mask` (a transformers
        language model) gets `causal_lm_pre_forward` unless another pre_forward is given: padding
        is read from the mask and the gate state carried across the KV-cached calls of a generation."""
        what = prefix.rstrip(".") or "model"
        if check_model:
            self.check_model(model, prefix, what)
        chosen = layers if layers is not None else (self.layers if not gated else self.steered_layers)
        unknown = sorted(set(chosen) - set(self.layers))
        if unknown:
            raise ValueError(f"layers {unknown} are not in this steering; it has {self.layers}")
        names = {full: full[len(prefix):] for full in chosen if full.startswith(prefix)}
        if not prefix and "pre_forward" not in options and takes_attention_mask(model):
            options["pre_forward"] = causal_lm_pre_forward(model)
        return SteeringHandle(self, model, names, strength=strength, gated=gated, what=what, **options)

    # ---- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in self.layers:
            for k, v in self.maps[name].tensors().items():
                tensors[f"{name}.map.{k}"] = v
            for k, v in self.gates[name].tensors().items():
                tensors[f"{name}.gate.{k}"] = v
        for root, probe in self.probes.items():
            tensors[f"{_FINGERPRINT_KEY}.{root}"] = probe
        # copies: layers may share tensors (one map reused), which safetensors refuses to write
        return {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in tensors.items()}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the two files atomically; the config is written last, so a folder with a config
        always has the weights that belong to it."""
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_path(d / WEIGHTS_NAME) as tmp:
            save_file(self.state_dict(), tmp, metadata={"format": "pt"})  # one key: identical fits, identical bytes
        write_text_atomic(d / CONFIG_NAME, json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **hub_kwargs) -> "Steering":
        """Load from a folder (or a hub repo id through huggingface_hub). Reads JSON and
        safetensors only: loading never executes code."""
        config_path, weights_path = _resolve_files(path, hub_kwargs)
        try:
            with open(config_path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON ({e}); the steering folder is damaged: save it again") from None
        config = SteeringConfig.from_dict(raw)
        try:
            tensors = _owned(load_file(weights_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(
                f"{weights_path} is corrupt or truncated ({e}); save the steering again"
            ) from None
        probes = {k[len(_FINGERPRINT_KEY) + 1:]: v for k, v in tensors.items() if k.startswith(_FINGERPRINT_KEY + ".")}
        mcls = map_class(config.method)
        maps, gates = {}, {}
        for name, info in config.layers.items():
            mt = {k[len(name) + 5:]: v for k, v in tensors.items() if k.startswith(f"{name}.map.")}
            gt = {k[len(name) + 6:]: v for k, v in tensors.items() if k.startswith(f"{name}.gate.")}
            if not mt or set(gt) != {"weight", "bias"}:
                raise ValueError(f"{weights_path} has no tensors for layer {name!r}; the folder is damaged: save it again")
            maps[name] = mcls.from_tensors(mt)
            gates[name] = Gate(weight=gt["weight"], bias=gt["bias"], accuracy=info.gate_accuracy)
            if maps[name].width != info.width or gates[name].weight.shape != (info.width,):
                raise ValueError(f"layer {name!r}: tensor sizes do not match the config's width {info.width}; "
                                 "the folder is damaged: save it again")
        return cls(config, maps, gates, probes)


def _owned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor in memory of its own. safetensors may hand back views into one file buffer at
    offsets that are not 64-byte aligned, and CPU kernels round differently on unaligned data, so a
    loaded steering would not be bit-identical to the one that was saved."""
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}


def _natural_key(name: str) -> list:
    """"layers.2" before "layers.10": digit runs compare as numbers."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def _resolve_files(path, hub_kwargs) -> tuple[str, str]:
    p = Path(path)
    if p.is_dir():
        files = (p / CONFIG_NAME, p / WEIGHTS_NAME)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{p} is not a steering folder: {', '.join(missing)} missing "
                             "(a steering folder holds steering_config.json and steering.safetensors)")
        return str(files[0]), str(files[1])
    text = str(path)
    if p.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ValueError(f"{path} is not a steering folder (no such directory), nor a hub repo id like 'user/name'")
    from huggingface_hub import hf_hub_download  # a repo id such as "user/steering-no-banana"

    return (hf_hub_download(str(path), CONFIG_NAME, **hub_kwargs), hf_hub_download(str(path), WEIGHTS_NAME, **hub_kwargs))
