"""The steering folder on disk: `steering_config.json` + `steering.safetensors`, written as one
unit and read back only when every field and tensor is what a fit writes.

A save writes both files to temporary names, then renames the config (which names the sha256 of
its weights) and then the weights. Killed at any moment, the folder holds the old pair, the new
pair, or the new config with the old weights, which a load refuses because the digest differs.
Temporary files of killed saves are removed by the next save. Loading reads JSON and
safetensors only: it never executes code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from .config import SteeringConfig, config_document, probe_size, read_config_document
from .fingerprint import NUM_PROBE_VALUES
from .gate import Gate
from .io import fsync_directory, fsync_file, locked_directory, publish, remove_stale_temporaries, temporary_file
from .maps import map_class

CONFIG_NAME = "steering_config.json"
WEIGHTS_NAME = "steering.safetensors"
FINGERPRINT_KEY = "__fingerprint__"
_FIX = "the steering folder is damaged: fit and save the steering again"

# Test hook: DSAS_SAVE_PAUSE=<step> makes a save stop for a minute after that step, announced on
# stderr with its pid, so a test can kill it there (tests/core/test_artifact.py).
PAUSE_ENV = "DSAS_SAVE_PAUSE"
SAVE_STEPS = ("stale_removed", "weights_written", "config_written", "config_replaced", "weights_replaced")


class _Damaged(Exception):
    """One problem with the weights file; the entry points add the file name and the fix."""


# ---- saving --------------------------------------------------------------------------------------

def save_artifact(directory: str | os.PathLike, config: SteeringConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write the folder as one unit (see the module docstring). Nothing is written unless a load
    would accept the result."""
    pause_at = _pause_step()
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a folder path, got {directory!r} ({type(directory).__name__})")
    if not os.fspath(directory).strip():  # Path("") is the current folder: never where anyone meant to write
        raise ValueError("save_directory is empty; pass the folder to write the steering to (it is created if missing)")
    d = Path(directory).expanduser()
    if d.exists() and not d.is_dir():
        raise ValueError(f"save_directory {str(d)!r} is a file; pass a folder (it is created if missing)")
    config_document(config, "0" * 64)  # refuses a config that could not be loaded back
    try:
        split_tensors(config, tensors)
    except (_Damaged, ValueError) as e:
        raise ValueError(f"this steering cannot be saved: {e}") from None
    created = not d.exists()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"save_directory {str(d)!r} cannot be created: a part of its path is a file, not a "
                         "folder; pass a folder path") from None
    if created:
        fsync_directory(d.parent)
    with locked_directory(d, exclusive=True):
        remove_stale_temporaries(d, (CONFIG_NAME, WEIGHTS_NAME))
        _pause(pause_at, "stale_removed")
        with temporary_file(d, WEIGHTS_NAME) as weights_tmp, temporary_file(d, CONFIG_NAME) as config_tmp:
            save_file(tensors, weights_tmp, metadata={"format": "pt"})  # one key: identical fits, identical bytes
            fsync_file(weights_tmp)
            document = config_document(config, hashlib.sha256(Path(weights_tmp).read_bytes()).hexdigest())
            _pause(pause_at, "weights_written")
            with open(config_tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _pause(pause_at, "config_written")
            publish(config_tmp, d / CONFIG_NAME)  # from here the old weights no longer match: refused
            _pause(pause_at, "config_replaced")
            publish(weights_tmp, d / WEIGHTS_NAME)
            _pause(pause_at, "weights_replaced")


def _pause_step() -> str | None:
    step = os.environ.get(PAUSE_ENV)
    if not step:
        return None
    if step not in SAVE_STEPS:
        raise ValueError(f"{PAUSE_ENV}={step!r} names no step of a save; unset it or choose one of {list(SAVE_STEPS)}")
    return step


def _pause(wanted: str | None, step: str) -> None:
    if wanted == step:
        print(f"dsas: save_pretrained (pid {os.getpid()}) paused after {step} ({PAUSE_ENV})", file=sys.stderr,
              flush=True)
        time.sleep(60)


# ---- loading -------------------------------------------------------------------------------------

def load_artifact(path, hub_kwargs: dict) -> tuple[SteeringConfig, dict, dict, dict]:
    """(config, maps, gates, probes) of a saved steering, every field and tensor checked."""
    config_path, weights_path, local = resolve_files(path, hub_kwargs)
    if local:  # a save in progress finishes first; a stuck one is waited on briefly, then the digest decides
        with locked_directory(config_path.parent, exclusive=False, wait_s=10.0):
            config_bytes, weights_bytes = config_path.read_bytes(), weights_path.read_bytes()
    else:
        config_bytes, weights_bytes = config_path.read_bytes(), weights_path.read_bytes()
    config, digest = read_config_document(_parse_json(config_bytes, config_path), str(config_path))
    try:
        tensors = load(weights_bytes)
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{weights_path} is corrupt or truncated ({e}); fit and save the steering again") from None
    if digest is not None:
        actual = hashlib.sha256(weights_bytes).hexdigest()
        if actual != digest:
            raise ValueError(
                f"{config_path} does not belong to {weights_path}: the config was saved with weights of sha256 "
                f"{digest[:16]}..., this file's is {actual[:16]}... (a save into this folder was interrupted, or the "
                "files come from two different fits); fit and save the steering again"
            )
    try:
        return (config, *split_tensors(config, _owned(tensors)))
    except _Damaged as e:
        raise ValueError(f"{weights_path}: {e}; {_FIX}") from None
    except ValueError as e:  # a map's own check, which names the layer
        raise ValueError(f"{weights_path}: {e}") from None


def _parse_json(data: bytes, path: Path):
    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"repeats the keys {repeated}")
        return dict(pairs)

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_repeats)
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except RecursionError:
        problem = "is nested too deeply"
    except ValueError as e:  # JSONDecodeError, or a repeated key
        problem = f"is not valid JSON ({e})" if isinstance(e, json.JSONDecodeError) else str(e)
    raise ValueError(f"{path} {problem}; {_FIX}") from None


def _owned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor in memory of its own. safetensors may hand back views into one file buffer at
    offsets that are not 64-byte aligned, and CPU kernels round differently on unaligned data, so a
    loaded steering would not be bit-identical to the one that was saved."""
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}


def split_tensors(config: SteeringConfig, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(maps, gates, probes) from the flat tensors of a weights file: exactly the tensors the
    config's layers and fingerprint call for, each of its declared shape, floating and finite;
    read as float32 (a half-precision file loads like any other)."""
    mcls = map_class(config.method)
    expected = set()
    maps, gates, probes = {}, {}, {}
    for name, info in config.layers.items():
        keys = [f"{name}.map.{f.name}" for f in fields(mcls)] + [f"{name}.gate.weight", f"{name}.gate.bias"]
        missing = [k for k in keys if k not in tensors]
        prefix = f"{name}.map."
        if missing:
            held = sorted(k[len(prefix):] for k in tensors if k.startswith(prefix))
            raise _Damaged(f"has no tensors {missing} for layer {name!r} (a {config.method} map"
                           + (f"; the file holds map tensors {held} for it)" if held else ")"))
        expected.update(keys)
        maps[name] = mcls.from_tensors({k[len(prefix):]: tensors[k] for k in keys if k.startswith(prefix)},
                                       width=info.width, layer=name)
        gates[name] = Gate(weight=_vector(tensors[f"{name}.gate.weight"], (info.width,), f"{name}.gate.weight"),
                           bias=_vector(tensors[f"{name}.gate.bias"], (), f"{name}.gate.bias"),
                           accuracy=info.gate_accuracy)
    for root, entry in config.fingerprint.items():
        key = f"{FINGERPRINT_KEY}.{root}"
        if key not in tensors:
            raise _Damaged(f"has no fingerprint probe {key!r} for {root or 'the model'!r} (its fingerprint is listed "
                           "in the config)")
        expected.add(key)
        probes[root] = _vector(tensors[key], (probe_size(entry, NUM_PROBE_VALUES),), key)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise _Damaged(_describe_extra(extra, config))
    return maps, gates, probes


def _vector(t, shape: tuple, key: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise _Damaged(f"tensor {key!r} must be floating point, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != shape:
        raise _Damaged(f"tensor {key!r} must have shape {shape}, got {tuple(t.shape)}")
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise _Damaged(f"tensor {key!r} holds {'NaN' if t.isnan().any() else 'an infinite value'}")
    return t


def _describe_extra(extra: list[str], config: SteeringConfig) -> str:
    key = extra[0]
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    if key.startswith(FINGERPRINT_KEY + "."):
        root = key[len(FINGERPRINT_KEY) + 1:]
        return f"holds a fingerprint probe for {root!r}{more}, which the config's fingerprint does not list"
    m = re.fullmatch(r"(.*)\.(map|gate)\.([^.]+)", key)
    if m and m.group(1) in config.layers:
        return f"holds an unexpected tensor {key!r} for layer {m.group(1)!r}{more}"
    if m:
        return f"holds tensors for layer {m.group(1)!r}{more}, which steering_config.json does not list"
    return f"holds an unexpected tensor {key!r}{more}"


# ---- finding the files ---------------------------------------------------------------------------

def resolve_files(path, hub_kwargs: dict) -> tuple[Path, Path, bool]:
    """(config file, weights file, whether they are a local folder): a local folder first; only a
    path that is not one and looks like a hub repo id ('user/name') goes to the hub, and not at all
    under HF_HUB_OFFLINE, where only the local hub cache is read."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise TypeError(f"path must be a steering folder or a hub repo id ('user/name'), got {path!r} "
                        f"({type(path).__name__})")
    text = os.fspath(path)
    if not text.strip():
        raise ValueError("path is empty; pass a steering folder or a hub repo id ('user/name')")
    p = Path(text).expanduser()
    if p.is_dir():
        files = (p / CONFIG_NAME, p / WEIGHTS_NAME)
        missing = [f.name + (" (a folder, not a file)" if f.is_dir() else "") for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{p} is not a steering folder: {', '.join(missing)} missing "
                             "(a steering folder holds steering_config.json and steering.safetensors)")
        return files[0], files[1], True
    if p.exists():
        raise ValueError(f"{text!r} is a file, not a steering folder; pass the folder that holds {CONFIG_NAME} "
                         f"and {WEIGHTS_NAME}")
    local = f"no steering folder {text!r} here ({p.absolute()} does not exist)"
    if not isinstance(path, str):  # a Path names a folder on this machine, never a hub repo
        raise ValueError(f"{local}, and a Path is not a hub repo id like 'user/name' (pass a repo id as a string); "
                         "check the path")
    if not _looks_like_repo_id(text):
        raise ValueError(f"{local}, and it is not a hub repo id like 'user/name'; check the path")
    return (*_hub_files(text, hub_kwargs, local), False)


def _looks_like_repo_id(text: str) -> bool:
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or "\\" in text:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(text)
    except Exception:  # HFValidationError, or a huggingface_hub without it
        return False
    return True


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _hub_files(repo_id: str, hub_kwargs: dict, local: str) -> tuple[Path, Path]:
    from huggingface_hub import errors, hf_hub_download

    offline = _hub_offline()
    kwargs = {**hub_kwargs, "local_files_only": True} if offline else dict(hub_kwargs)
    files = []
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            files.append(Path(hf_hub_download(repo_id, name, **kwargs)))
    except TypeError:  # a keyword hf_hub_download does not take: the caller's mistake, shown as is
        raise
    except Exception as e:  # not found, no connection, gated, not cached: one answer, the cause chained
        missing_file = getattr(errors, "RemoteEntryNotFoundError", ())
        if isinstance(e, missing_file):
            raise ValueError(f"{local}; the hub repo {repo_id!r} holds no {name}, so it is not a steering repo (one "
                             f"holds {CONFIG_NAME} and {WEIGHTS_NAME})") from e
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        where = ("not in the local hub cache (HF_HUB_OFFLINE is set, so the hub was not asked)" if offline
                 else f"not reachable on the hub ({type(e).__name__}: {reason[:200]})")
        raise ValueError(f"{local}, and the hub repo {repo_id!r} is {where}; check the path or the repo id") from e
    return files[0], files[1]
