"""What the subcommands share: argument groups, the process layout (one process, or several under
`accelerate launch`), loading the pipeline and the steering, and small parsers.

Heavy imports (torch, diffusers, accelerate) happen inside the functions, so `dsas --help` is fast.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import warnings
from pathlib import Path

from ..prompt_files import PromptRow, is_table, prompt_set_file, read_prompt_rows, read_prompts

DTYPES = ("auto", "float32", "float16", "bfloat16")


class CLIError(Exception):
    """A user error the command explains; printed without a traceback, exit status 2."""


# ---- argument groups ---------------------------------------------------------------------------
def add_runtime_args(p: argparse.ArgumentParser, dtype_default: str = "auto") -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--dtype", choices=DTYPES, default=dtype_default,
                   help=f"model dtype; auto: float16 on a GPU, float32 on CPU (default: {dtype_default})")
    g.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--model", help="Stable Diffusion folder or hub id (default: the model the steering was fitted on)")
    g.add_argument("--steering", required=True, help="steering folder written by `dsas fit`")
    g.add_argument("--seeds", default="0", type=parse_seeds,
                   help="seeds per prompt: '0,1,2' or '0-3' (default: 0); a file's per-row seed replaces them")
    g.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    g.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance scale (default: 7.5); a file's per-row value replaces it")
    g.add_argument("--height", type=int, help="image height (default: the model's)")
    g.add_argument("--width", type=int, help="image width (default: the model's)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    g.add_argument("--steer-negative", action="store_true", help="also steer the unconditional (negative) branch")
    g.add_argument("--no-safety-checker", action="store_true", help="load the pipeline without its safety checker")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a concept prompt (repeatable)")
    g.add_argument("--prompts", metavar="FILE", help="concept prompts: .txt (one per line), .csv / .tsv / .jsonl "
                   "(column --column); I2P-style CSVs give each row its seed and guidance scale")
    g.add_argument("--control-prompts", metavar="FILE", help="control prompts (no concept), same formats")
    g.add_argument("--prompt-set", metavar="DIR", help="a prompt-set folder (assets/prompts/NAME): uses its "
                   "heldout_source.txt and heldout_control.txt unless --prompts / --control-prompts are given")
    g.add_argument("--column", help="column holding the prompts in CSV / JSONL files (default: 'prompt')")


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder; an interrupted run resumes when started again")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the results already in --out and start again (default: resume)")


def add_clip_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CLIP scoring")
    g.add_argument("--clip-backend", choices=("transformers", "open_clip"), default="transformers",
                   help="transformers CLIPModel (default) or open_clip (pip install \"dsas-diffusion[openclip]\")")
    g.add_argument("--clip-model", help="CLIP hub id or local folder (default: openai/clip-vit-base-patch32; "
                   "open_clip: ARCH:TAG, default ViT-B-32:laion2b_s34b_b79k)")
    g.add_argument("--concept", action="append", default=[], metavar="TEXT",
                   help="zero-shot text describing the concept, e.g. 'a photo of a banana' (repeatable)")
    g.add_argument("--anti-concept", action="append", default=[], metavar="TEXT",
                   help="zero-shot text without the concept, e.g. 'a photo of an apple' (repeatable)")
    g.add_argument("--concept-file", metavar="FILE", help="concept texts, one per line")
    g.add_argument("--anti-concept-file", metavar="FILE", help="anti-concept texts, one per line")
    g.add_argument("--concept-threshold", type=float, default=0.5,
                   help="an image shows the concept when P(concept) exceeds this (default: 0.5)")
    g.add_argument("--clip-batch-size", type=int, default=32, help="images per CLIP batch (default: 32)")


# ---- parsers ------------------------------------------------------------------------------------
def parse_seeds(text: str) -> list[int]:
    seeds = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                seeds += list(range(int(lo), int(hi) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds {text!r} are not non-negative integers; write '0,1,2' or '0-3'") from None
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds given; write '0,1,2' or '0-3'")
    return list(dict.fromkeys(seeds))


def parse_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. '0.5,1,2'") from None
    if not values:
        raise argparse.ArgumentTypeError("the list is empty; write numbers separated by commas, e.g. '0.5,1,2'")
    return values


# ---- prompts ------------------------------------------------------------------------------------
def prompt_groups(args) -> dict[str, list[PromptRow]]:
    """{"concept": rows, "control": rows} from --prompt / --prompts / --control-prompts / --prompt-set."""
    concept = [PromptRow(t.strip(), i) for i, t in enumerate(args.prompt) if t.strip()]
    if args.prompts:
        concept += [PromptRow(r.text, len(concept) + i, r.seed, r.guidance_scale)
                    for i, r in enumerate(read_prompt_rows(args.prompts, _column(args.prompts, args.column)))]
    elif args.prompt_set and not args.prompt:
        concept = read_prompt_rows(prompt_set_file(args.prompt_set, "heldout_source"))
    control = []
    if args.control_prompts:
        control = read_prompt_rows(args.control_prompts, _column(args.control_prompts, args.column))
    elif args.prompt_set:
        control = read_prompt_rows(prompt_set_file(args.prompt_set, "heldout_control"))
    groups = {name: rows for name, rows in (("concept", concept), ("control", control)) if rows}
    if not groups:
        raise CLIError("no prompts given; pass --prompt TEXT, --prompts FILE, --control-prompts FILE "
                       "or --prompt-set DIR")
    return groups


def _column(path: str, column: str | None) -> str | None:
    return column if is_table(path) else None  # --column names a column of the CSV / JSONL files only


def concept_texts(args) -> tuple[list[str], list[str]]:
    concept, anti = list(args.concept), list(args.anti_concept)
    if args.concept_file:
        concept += read_prompts(args.concept_file)
    if args.anti_concept_file:
        anti += read_prompts(args.anti_concept_file)
    prompt_set = getattr(args, "prompt_set", None)
    if prompt_set and not concept and not anti:
        concept = read_prompts(prompt_set_file(prompt_set, "concept"))
        anti = read_prompts(prompt_set_file(prompt_set, "anti_concept"))
    if bool(concept) != bool(anti):
        missing = "--anti-concept" if concept else "--concept"
        raise CLIError(f"concept rate needs texts on both sides; also pass {missing} TEXT (or the *-file option)")
    return concept, anti


# ---- processes, devices, models -----------------------------------------------------------------
def process_state(cpu: bool = False):
    """accelerate's PartialState: one process, or the layout `accelerate launch` set up. On a machine
    without a GPU, `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` gives N CPU
    processes (accelerate only makes CPU processes when told to use the CPU)."""
    import torch
    from accelerate import PartialState

    use_cpu = cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (
        "LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    return PartialState(cpu=use_cpu)


def device_for(state, cpu: bool = False):
    """The process's device; --cpu wins even when accelerate's state was set up earlier in this process."""
    import torch

    return torch.device("cpu") if cpu else state.device


def torch_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
    return getattr(torch, name)


def load_pipeline(model: str, *, dtype, device, safety_checker: bool = True):
    from dsas_diffusion import DSASStableDiffusionPipeline

    model = check_model_path(model)
    kwargs = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    try:
        with warnings.catch_warnings():  # recent diffusers call it dtype; older ones know only torch_dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = DSASStableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, **kwargs)
    except OSError as e:
        raise CLIError(f"could not load the model {model!r}: {e}\nPass --model with a Stable Diffusion folder "
                       "(model_index.json, unet/, text_encoder/ ...) or a hub id you can reach") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def local_path(name: str | os.PathLike) -> Path | None:
    """The local path `name` names, `~` expanded (the shell leaves `--model=~/sd` alone), or None when
    it reads as a hub id: 'user/name' that is no path here."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return path
    return None


def check_model_path(model: str) -> str:
    """`model` as `from_pretrained` needs it: a hub id as is, a local folder checked and `~` expanded."""
    path = local_path(model)
    if path is None:
        return model
    if not path.exists():
        raise CLIError(f"model folder {model} does not exist; pass a Stable Diffusion folder or a hub id like "
                       "'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    if not (path / "model_index.json").is_file():
        raise CLIError(f"{model} is not a diffusers pipeline folder (no model_index.json); pass the folder that "
                       "`save_pretrained` wrote")
    return os.path.expanduser(model)  # the name as given otherwise ('./sd' stays './sd')


def load_steering(path: str):
    """A steering folder (or a hub repo id 'user/name', as `Steering.from_pretrained` takes)."""
    from dsas_diffusion import Steering

    local = local_path(path)
    if local is not None and not local.exists():
        raise CLIError(f"steering folder {path} does not exist; create it with `dsas fit ... --out {path}`")
    return Steering.from_pretrained(path if local is None else local)


def steering_digest(steering) -> str:
    """A short hash of a steering's config and tensors: a run resumes only with the same steering."""
    import json

    h = hashlib.sha256(json.dumps(steering.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(steering.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


def echo(state, *lines: str) -> None:
    if state is None or state.is_main_process:
        for line in lines:
            print(line, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)

