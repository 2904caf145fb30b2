"""Generating the images of a run, shared by `dsas generate` and `dsas sweep`.

A unit is one prompt at one seed; each unit is drawn under every variant of the run (unsteered,
plain steering at strength alpha, DSAS at alpha) from the same seed, one image per pipeline call,
so the result of a unit never depends on which process drew it or what else was in its batch.
For DSAS images the lambdas are kept: a map over the image and the prompt's per-token values.

Files (paths in the records are relative to the output folder); the seed is in UNIT
(`concept-00000-s0`) and the strength in VARIANT (`dsas-a1`), so no file of one setting ever
replaces one of another:
  images/VARIANT/UNIT.png, overlays/VARIANT/UNIT.png (DSAS), compare/UNIT-aALPHA.png (with --compare),
  results.jsonl (one record per image; see `journal.py` for how it is written and resumed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..prompt_files import PromptRow
from .common import CLIError
from .journal import Journal

MODES = ("unsteered", "plain", "dsas")


@dataclass(frozen=True)
class Unit:
    key: str
    group: str
    row: int
    prompt: str
    seed: int
    guidance_scale: float


@dataclass(frozen=True)
class Variant:
    mode: str
    alpha: float = 0.0

    @property
    def name(self) -> str:
        return "unsteered" if self.mode == "unsteered" else f"{self.mode}-a{alpha_tag(self.alpha)}"

    @property
    def label(self) -> str:
        if self.mode == "unsteered":
            return "unsteered"
        return f"{'DSAS' if self.mode == 'dsas' else 'plain'} a={self.alpha:g}"


def alpha_tag(alpha: float) -> str:
    """alpha in a file name: short ('1', '0.25') where that gives it back exactly, else in full, so
    two strengths never share a name."""
    short = f"{alpha:g}"
    return short if float(short) == alpha else repr(float(alpha))


def comparison_path(unit: "Unit", alpha: float) -> Path:
    return Path("compare") / f"{unit.key}-a{alpha_tag(alpha)}.png"


def comparison_caption(prompt: str, seed: int, alpha: float) -> str:
    """What a comparison strip states under its images: the prompt, the seed and the strength."""
    return f'prompt: "{prompt}"   seed: {seed}   alpha: {alpha:g}'


def make_units(groups: dict[str, list[PromptRow]], seeds: list[int], guidance: float) -> list[Unit]:
    """Every prompt at every seed; a row's own seed (I2P files) replaces the seed list for that row."""
    units = []
    for group, rows in groups.items():
        for r in rows:
            for seed in ([r.seed] if r.seed is not None else seeds):
                g = r.guidance_scale if r.guidance_scale is not None else guidance
                units.append(Unit(f"{group}-{r.row:05d}-s{seed}", group, r.row, r.text, int(seed), float(g)))
    return units


def image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """The requested size, or the one the pipeline draws by default (its denoiser's sample size;
    FLUX's is fixed at 128 latents a side)."""
    sample = getattr(pipe, "default_sample_size", None) or _denoiser(pipe).config.sample_size
    default = sample * pipe.vae_scale_factor
    return height or default, width or default


def _denoiser(pipe):
    from dsas_diffusion.diffusion.families import family_of

    return getattr(pipe, family_of(pipe).denoiser)


def run_generation(pipe, units: list[Unit], variants: list[Variant], *, out: Path, journal: Journal, state,
                   steps: int, height: int, width: int, negative_prompt: str | None = None,
                   steer_negative: bool = False, compare: float | None = None, progress: bool = True) -> list[dict]:
    """Draw what is not done yet, this process's share of it; returns the records of this run's images
    (`units` x `variants`), merged across processes. `compare`: the alpha of the comparison strips to
    draw (None: none)."""
    from tqdm.auto import tqdm

    done = journal.open()
    order = [f"{v.name}/{u.key}" for u in units for v in variants]

    def finished(unit: Unit, variant: Variant) -> bool:
        rec = done.get(f"{variant.name}/{unit.key}")
        if rec is None:
            return False
        if (rec["prompt"], rec["seed"], rec["guidance_scale"]) != (unit.prompt, unit.seed, unit.guidance_scale):
            raise CLIError(f"{out} holds an image {rec['key']} of another prompt or seed ({rec['prompt']!r}, seed "
                           f"{rec['seed']}); the prompt files changed since: pass --overwrite or another --out")
        return (out / rec["image"]).is_file()

    def strip_missing(unit: Unit) -> bool:
        return compare is not None and not (out / comparison_path(unit, compare)).is_file()

    todo = [(u, [v for v in variants if not finished(u, v)]) for u in units]
    todo = [(u, vs) for u, vs in todo if vs or strip_missing(u)]
    state.wait_for_everyone()  # every process has read the files before any writes: the splits agree
    with state.split_between_processes(todo) as mine:
        desc = "generating" if state.num_processes == 1 else f"generating [{state.process_index}]"
        with tqdm(total=sum(len(vs) for _, vs in mine), desc=desc, unit="img", disable=not progress,
                  position=state.process_index) as bar:
            for unit, missing in mine:
                for variant in missing:
                    journal.append(render(pipe, unit, variant, out=out, steps=steps, height=height, width=width,
                                          negative_prompt=negative_prompt, steer_negative=steer_negative))
                    bar.update()
                if compare is not None:  # a strip is drawn again whenever one of its images was: never stale
                    compose_comparison(out, unit, variants, compare, force=bool(missing))
    return journal.finish(order)


def render(pipe, unit: Unit, variant: Variant, *, out: Path, steps: int, height: int, width: int,
           negative_prompt: str | None, steer_negative: bool) -> dict:
    """One image (and, for DSAS, its lambda overlay), written atomically; returns its record."""
    import torch

    from ..eval.overlays import averaged_over, lambda_map, lambda_overlay, token_lambdas

    dsas = variant.mode == "dsas"
    result = pipe(unit.prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                  guidance_scale=unit.guidance_scale, height=height, width=width,
                  generator=torch.Generator("cpu").manual_seed(unit.seed),
                  steering_strength=0.0 if variant.mode == "unsteered" else variant.alpha, gated=dsas,
                  steer_negative=steer_negative, return_steering_scales=dsas)
    image = result.images[0]
    rel = Path("images") / variant.name / f"{unit.key}.png"
    digest = save_png(image, out / rel)
    record = {"key": f"{variant.name}/{unit.key}", "unit": unit.key, "variant": variant.name, "mode": variant.mode,
              "alpha": variant.alpha, "group": unit.group, "row": unit.row, "prompt": unit.prompt, "seed": unit.seed,
              "guidance_scale": unit.guidance_scale, "image": rel.as_posix(), "image_sha256": digest}
    nsfw = getattr(result, "nsfw_content_detected", None)  # Stable Diffusion 1.x / 2.x only
    if nsfw is not None:
        record["nsfw"] = bool(nsfw[0])
    if dsas:
        lam = lambda_map(result.steering_scales, image.size)
        first = {k: v for k, v in result.steering_scales.items() if k.startswith("text_encoder.")}  # pipe.tokenizer's
        tokens, sequence = token_lambdas(first, pipe.tokenizer, unit.prompt)
        overlay = Path("overlays") / variant.name / f"{unit.key}.png"
        save_png(lambda_overlay(image, lam, tokens, caption=averaged_over(result.steering_scales)), out / overlay)
        record.update(overlay=overlay.as_posix(), token_lambdas=[list(t) for t in tokens], sequence_lambda=sequence,
                      image_lambda=None if lam is None else round(float(lam.mean()), 4))
    return record


def compose_comparison(out: Path, unit: Unit, variants: list[Variant], alpha: float, force: bool = False) -> None:
    """compare/UNIT-aALPHA.png: the unit's images side by side; an existing strip is kept unless `force`."""
    from PIL import Image

    from ..eval.overlays import compare_strip

    target = out / comparison_path(unit, alpha)
    paths = [out / "images" / v.name / f"{unit.key}.png" for v in variants]
    if (target.is_file() and not force) or not all(p.is_file() for p in paths):
        return
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    caption = comparison_caption(unit.prompt, unit.seed, alpha)
    save_png(compare_strip(images, [v.label for v in variants], caption=caption), target)


def save_png(image, path: str | os.PathLike) -> str:
    """Write a PNG atomically; returns a short hash of its bytes (scores are reused only for the same image)."""
    import hashlib
    import io

    from ..core.io import atomic_path

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()[:16]


def generation_settings(pipe, *, model: str, steering, steps: int, height: int, width: int,
                        negative_prompt: str | None, steer_negative: bool, safety_checker: bool) -> dict:
    """What every image of a run depends on besides its prompt, seed, guidance and variant."""
    from .common import steering_digest

    return {"model": model, "steering": steering_digest(steering), "steps": steps, "height": height,
            "width": width, "negative_prompt": negative_prompt, "steer_negative": steer_negative,
            "dtype": str(_denoiser(pipe).dtype).replace("torch.", ""), "scheduler": type(pipe.scheduler).__name__,
            "safety_checker": safety_checker}


def prepare(args, state):
    """(pipe, units, settings) for `generate` and `sweep`: prompts read and the pipeline loaded with
    the steering set (which refuses a steering fitted on another model)."""
    from .common import (call_default, check_model_path, check_steps, device_for, load_pipeline, load_steering,
                         prompt_groups, torch_dtype)

    groups = prompt_groups(args)
    steering = load_steering(args.steering)
    model = args.model or fitted_model(steering, args.steering, state)
    model = check_model_path(model)  # `~` expanded, so that --model=~/sd and --model ~/sd resume the same run
    device = device_for(state, args.cpu)
    pipe = load_pipeline(model, dtype=torch_dtype(args.dtype, device), device=device,
                         safety_checker=not args.no_safety_checker)
    check_steps(pipe, args.steps)
    pipe.set_steering(steering)
    units = make_units(groups, args.seeds, args.guidance if args.guidance is not None
                       else call_default(pipe, "guidance_scale"))
    height, width = image_size(pipe, args.height, args.width)
    settings = generation_settings(pipe, model=model, steering=steering, steps=args.steps, height=height,
                                   width=width, negative_prompt=args.negative_prompt,
                                   steer_negative=args.steer_negative, safety_checker=not args.no_safety_checker)
    return pipe, units, settings


def fitted_model(steering, name: str, state) -> str:
    """The model a steering says it was fitted on (its base_model), for a run without --model: said in
    the output, since the user did not name it, and refused when it is a local folder not here."""
    from .common import echo, local_path

    base = steering.config.base_model
    if not base:
        raise CLIError(f"the steering {name} does not record the model it was fitted on; pass --model")
    path = local_path(base)
    if path is not None and not path.exists():
        raise CLIError(f"the steering {name} was fitted on the local folder {base}, which does not exist here; pass "
                       "--model with that model (its folder here, or its hub id)")
    where = "a local folder" if path is not None else "a hub id: from the Hugging Face cache, or downloaded"
    echo(state, f"model: {base} ({where}), the model the steering was fitted on; pass --model to use another")
    return base
