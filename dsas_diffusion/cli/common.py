"""What the subcommands share: argument groups (their value checks: `arguments.py`), the process
layout (one process, or several under `accelerate launch`), loading the pipeline and the steering.

Heavy imports (torch, diffusers, accelerate) happen inside the functions, so `dsas --help` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pickle
import sys
import warnings
from pathlib import Path

from ..prompt_files import PromptRow, is_table, prompt_set_file, read_prompt_rows, read_prompts
from . import arguments as types

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
    g.add_argument("--threads", type=types.threads, metavar="N",
                   help="torch CPU threads per process (default: torch's choice in one process, 1 per process under "
                        "`accelerate launch`); CPU results differ in the last bits between thread counts")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--model", help="Stable Diffusion folder or hub id (default: the model the steering was fitted on)")
    g.add_argument("--steering", required=True, help="steering folder written by `dsas fit`")
    g.add_argument("--seeds", default="0", type=types.seeds,
                   help=f"seeds per prompt: '0,1,2' or '0-3' (default: 0; at most {types.MAX_SEEDS:,}); a file's "
                        "per-row seed replaces them")
    g.add_argument("--steps", type=types.positive_int, default=30, help="denoising steps (default: 30)")
    g.add_argument("--guidance", type=types.guidance,
                   help="guidance scale (default: the pipeline's own, 7.5 for Stable Diffusion); a file's per-row "
                        "value replaces it")
    g.add_argument("--height", type=types.image_side, help="image height, a multiple of 8 (default: the model's)")
    g.add_argument("--width", type=types.image_side, help="image width, a multiple of 8 (default: the model's)")
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
    p.add_argument("--out", required=True, type=types.output_folder,
                   help="output folder; an interrupted run resumes when started again")
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
    g.add_argument("--concept-threshold", type=types.probability_threshold, default=0.5,
                   help="an image shows the concept when P(concept) exceeds this (default: 0.5)")
    g.add_argument("--clip-batch-size", type=types.positive_int, default=32,
                   help="images per scoring batch (default: 32)")


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
    # a set's zero-shot texts are for the clip scorer; a set judged otherwise (the toy rules) has none
    if prompt_set and not concept and not anti and "clip" in getattr(args, "scorers", ["clip"]):
        concept = read_prompts(prompt_set_file(prompt_set, "concept"))
        anti = read_prompts(prompt_set_file(prompt_set, "anti_concept"))
    if bool(concept) != bool(anti):
        missing = "--anti-concept" if concept else "--concept"
        raise CLIError(f"concept rate needs texts on both sides; also pass {missing} TEXT (or the *-file option)")
    return concept, anti


# ---- processes, devices, models -----------------------------------------------------------------
def process_state(cpu: bool = False, threads: int | None = None):
    """accelerate's PartialState: one process, or the layout `accelerate launch` set up. On a machine
    without a GPU, `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` gives N CPU
    processes (accelerate only makes CPU processes when told to use the CPU). The torch thread count
    is set here too (see `set_threads`)."""
    import torch
    from accelerate import PartialState

    use_cpu = cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (
        "LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    state = PartialState(cpu=use_cpu)
    set_threads(state, threads)
    return state


def set_threads(state, threads: int | None) -> None:
    """CPU results differ in the last bits between torch thread counts (sums are split otherwise),
    so a run split between processes fixes its count: `threads`, or 1 per process whatever the
    launcher chose. It is then byte-identical to a 1-process run given the same `--threads` (1 for
    the default). One process keeps torch's choice unless `threads` is given."""
    import torch

    if threads is None and state.num_processes > 1:
        threads = 1
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


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
    """The named DSAS pipeline of the model's family, read from its model_index.json."""
    from diffusers import DiffusionPipeline

    from dsas_diffusion.diffusion.families import family_of_index
    from dsas_diffusion.pipelines import NAMED_PIPELINES

    model = check_model_path(model)
    with loading_model(model, "--model", "a diffusers pipeline folder (model_index.json, text_encoder/ ...) of a "
                                         "supported family, or a hub id you can reach"):
        try:
            family = family_of_index(DiffusionPipeline.load_config(_absolute(model)), model)
        except ValueError as e:
            raise CLIError(f"{e}; pass --model with one of those") from None
        kwargs = {}
        if family.name == "stable_diffusion" and not safety_checker:
            kwargs = {"safety_checker": None, "requires_safety_checker": False}
        with warnings.catch_warnings():  # recent diffusers call it dtype; older ones know only torch_dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = NAMED_PIPELINES[family.name].from_pretrained(_absolute(model), torch_dtype=dtype, **kwargs)
        _check_complete(pipe, model)
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_default(pipe, argument: str):
    """The default of one of the pipeline's `__call__` arguments (guidance_scale differs by family)."""
    import inspect

    from dsas_diffusion.diffusion.families import family_of

    stock = next(c for c in type(pipe).__mro__ if c.__name__ == family_of(pipe).pipeline)
    return inspect.signature(stock.__call__).parameters[argument].default


def _absolute(model: str) -> str:
    """A local folder by its absolute path, so that a steering fitted on it records where it is
    (its base_model) and `dsas generate` can tell later whether that folder is still there."""
    return model if local_path(model) is None else os.path.abspath(model)


def check_steps(pipe, steps: int) -> None:
    trained = getattr(pipe.scheduler.config, "num_train_timesteps", None)
    if trained and steps > trained:
        raise CLIError(f"--steps {steps} is more than the {trained} timesteps the model's scheduler knows; pass "
                       f"--steps {trained} or fewer (30 to 50 is usual)")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@contextlib.contextmanager
def loading_model(model: str, option: str, expected: str, explained: tuple[type[Exception], ...] = ()):
    """Whatever loading `model` raises becomes one CLIError naming the model and the fix (DSAS_DEBUG=1
    shows the original traceback): a model that cannot be loaded is a user's problem to solve, with
    a message, not a traceback from deep inside diffusers, transformers or torch. Errors of the
    `explained` types (already worded for the user by the loader) pass unchanged, unless they come
    from refused pickled weights."""
    try:
        yield
    except (CLIError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 - translated, with the original kept as the cause
        if any(isinstance(c, pickle.UnpicklingError) or "weights_only" in str(c) for c in _chain(e)):
            raise CLIError(_pickled_weights_message(model, option)) from e
        if isinstance(e, explained):
            raise
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hub = " (no folder of that name here, so it was taken as a hub id)" if local_path(model) is None else ""
        raise CLIError(f"could not load the model {model}{hub}: {first_line}\nPass {option} with {expected} "
                       "(set DSAS_DEBUG=1 for the traceback)") from e


def _chain(error: BaseException):
    """The error and those it was raised from or while handling (diffusers wraps torch's)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _pickled_weights_message(model: str, option: str) -> str:
    path = local_path(model)
    files = []
    if path is not None and path.is_dir():
        files = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.suffix in PICKLE_SUFFIXES)
    where = f" ({', '.join(files[:4])}{', ...' if len(files) > 4 else ''})" if files else ""
    return (f"could not load the model {model}: torch refused to unpickle its weights{where}. A pickle can run "
            "code, so only plain tensors are loaded from one (torch's weights_only), and this file holds something "
            "else: it is damaged or was not written by save_pretrained. Use a copy of the model saved as safetensors "
            f"(load it once where you trust its files and save it with `save_pretrained`), or pass {option} with "
            "another model")


def _check_complete(pipe, model: str) -> None:
    """Weights missing from a folder are left on the meta device by diffusers: say which."""
    import torch

    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            missing = [n for n, p in component.named_parameters() if p.is_meta]
            if missing:
                raise CLIError(f"the model {model} is incomplete: {name}/ lacks the weights of {len(missing)} "
                               f"parameters (e.g. {missing[0]}); save the pipeline again, or pass --model with "
                               "another folder")


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

