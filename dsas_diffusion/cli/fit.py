"""`dsas fit`: fit a Steering on a Stable Diffusion pipeline from three prompt files.

Under `accelerate launch` every process collects the activations of a share of the prompt batches
(the costly part: the UNet stage runs the denoising loop for every prompt); the activations are
gathered, every process fits the same steering, bit-identical to a one-process fit, and the main
process saves it. Steering learned through the text encoders (`--method lineas`, `--gates e2e`) is
then trained by every process alike, on the whole prompt sets.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.config import GATE_ACTIVATIONS, SPATIAL_MAPS, SteeringConfig
from ..core.maps import OUTSIDE_SOURCE_RANGE, map_class
from ..core.registry import gate_kinds, methods
from . import arguments as types
from .common import CLIError, add_runtime_args, device_for, echo, process_state, torch_dtype


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fit", help="fit a steering from source / target / control prompt files",
        description="Fit DSAS maps (source -> target) and gates (source vs control) on a Stable Diffusion pipeline "
                    "and save them as a steering folder (steering_config.json + steering.safetensors).")
    p.add_argument("--model", required=True,
                   help="diffusers pipeline folder or hub id: Stable Diffusion 1.x / 2.x, SDXL, SD3, FLUX or PixArt-Σ "
                        "(read from its model_index.json)")
    g = p.add_argument_group("prompts (text: one per line; CSV / TSV / JSONL: the --column column)")
    g.add_argument("--source", metavar="FILE", help="prompts showing the concept")
    g.add_argument("--target", metavar="FILE", help="the same prompts with the desired change")
    g.add_argument("--control", metavar="FILE", help="prompts without the concept, to be left untouched")
    g.add_argument("--prompt-set", metavar="DIR",
                   help="a folder with source.txt, target.txt, control.txt (e.g. assets/prompts/banana); "
                        "--source / --target / --control override its files")
    g.add_argument("--column", help="column of the prompts in CSV / JSONL files (default: 'prompt')")
    g = p.add_argument_group("fitting")
    g.add_argument("--method", choices=methods(), default="linear_act",
                   help="steering map family (default: linear_act); lineas is learned through the text encoders")
    g.add_argument("--steer", choices=("both", "text_encoder", "denoiser", "unet", "transformer"),
                   help="where to steer: text encoder layers, the denoiser's (the UNet's or the transformer's), or "
                        "both (default: both; text_encoder, the only place, for steering learned through the model)")
    g.add_argument("--pca-rank", type=types.positive_int, default=5, help="PCA rank of each gate (default: 5)")
    g.add_argument("--threshold", type=types.fraction, default=0.75,
                   help="layers whose held-out gate accuracy is below this are not steered (default: 0.75)")
    g.add_argument("--gating", choices=("token", "causal", "sequence"), default="token",
                   help="how lambda is read at each position (default: token)")
    g.add_argument("--outside-source-range", choices=OUTSIDE_SOURCE_RANGE,
                   default=SteeringConfig.outside_source_range,
                   help="what Linear-AcT does to a value outside the source range it was fitted on: clamp (shift it as "
                        "if at the nearest end of the range) or identity (leave it untouched, as AcT does) "
                        f"(default: {SteeringConfig.outside_source_range})")
    g.add_argument("--spatial-map", choices=SPATIAL_MAPS, default=SteeringConfig.spatial_map,
                   help="how closed-form maps act on the denoiser's spatial layers: spatial_mean (one shift per image "
                        "from its per-channel spatial mean, as AcT does) or per_position (the map at every position) "
                        f"(default: {SteeringConfig.spatial_map})")
    g.add_argument("--text-encoder-layers", type=types.regex,
                   help="regex of text encoder modules (default: every encoder layer)")
    g.add_argument("--denoiser-layers", type=types.regex,
                   help="regex of denoiser modules (default: the family's: UNet cross-attention, DiT attention)")
    g.add_argument("--unet-layers", type=types.regex, help="--denoiser-layers, by its older name")
    g.add_argument("--steps", type=types.positive_int, default=10,
                   help="denoising steps per prompt when collecting denoiser activations (default: 10)")
    g.add_argument("--guidance", type=types.guidance,
                   help="guidance scale when collecting denoiser activations (default: the pipeline's own)")
    g.add_argument("--height", type=types.image_side,
                   help="image height when collecting denoiser activations (default: the model's)")
    g.add_argument("--width", type=types.image_side,
                   help="image width when collecting denoiser activations (default: the model's)")
    g.add_argument("--batch-size", type=types.positive_int, default=8, help="prompts per forward pass (default: 8)")
    g.add_argument("--seed", type=types.seed, default=0,
                   help="seed of the held-out split, the UNet runs and the learning (default: 0)")
    g = p.add_argument_group("gates")
    g.add_argument("--gates", choices=gate_kinds(), default="two_stage",
                   help="two_stage: fitted on source vs control activations; e2e: learned with the maps through the "
                        "text encoders (default: two_stage)")
    g.add_argument("--gate-activation", choices=GATE_ACTIVATIONS, default="sigmoid",
                   help="how a gate's logit becomes lambda (default: sigmoid)")
    g.add_argument("--gate-source", metavar="FILE",
                   help="fit the gates on these prompts instead of --source: the map of one concept applied where "
                        "the gate of another fires (two-stage gates only)")
    g.add_argument("--gate-control", metavar="FILE", help="the gates' control prompts instead of --control")
    g = p.add_argument_group("learning (--method lineas or --gates e2e)")
    g.add_argument("--training-steps", type=types.positive_int,
                   help="optimiser steps of what is learned through the text encoders (default: 1000)")
    g.add_argument("--learning-rate", type=types.learning_rate,
                   help="learning rate of what is learned through the text encoders (default: 1e-3)")
    p.add_argument("--out", required=True, type=types.output_folder, help="steering folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a steering already in --out")
    p.add_argument("--report", metavar="FILE", type=types.output_file,
                   help="also write the per-layer report (.json or .md)")
    add_runtime_args(p, dtype_default="float32")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..core import CONFIG_NAME
    from ..core.io import write_text_atomic
    from ..prompt_files import is_table, prompt_set_file, read_prompts
    from ..diffusion.families import family_of
    from .common import check_steps, load_pipeline

    training = _training(args)
    state = process_state(args.cpu, args.threads)  # under accelerate, every process collects a share of the activations
    files = {}
    for role in ("source", "target", "control"):
        path = getattr(args, role) or (prompt_set_file(args.prompt_set, role) if args.prompt_set else None)
        if path is None:
            raise CLIError(f"no {role} prompts; pass --{role} FILE or --prompt-set DIR")
        files[role] = path
    files.update({role: getattr(args, role) for role in ("gate_source", "gate_control") if getattr(args, role)})
    out = Path(args.out)
    if (out / CONFIG_NAME).exists() and not args.overwrite:
        raise CLIError(f"{out} already holds a steering; pass --overwrite to replace it, or choose another --out")
    prompts = {role: read_prompts(path, args.column if is_table(path) else None) for role, path in files.items()}
    gate_sets = {role: prompts[role] for role in ("gate_source", "gate_control") if role in prompts}
    echo(state, "prompts: " + ", ".join(f"{len(v)} {k}" for k, v in prompts.items()))

    device = device_for(state, args.cpu)
    pipe = load_pipeline(args.model, dtype=torch_dtype(args.dtype, device), device=device)
    check_steps(pipe, args.steps)
    if args.denoiser_layers and args.unet_layers:
        raise CLIError("--unet-layers is --denoiser-layers by its older name; pass one of them")
    layer_args = {k: v for k, v in (("text_encoder_layers", args.text_encoder_layers),
                                    ("denoiser_layers", args.denoiser_layers or args.unet_layers)) if v}
    denoiser = family_of(pipe).denoiser
    if args.steer in ("unet", "transformer") and args.steer != denoiser:
        raise CLIError(f"--steer {args.steer}: this {family_of(pipe).name} pipeline's denoiser is a {denoiser}; pass "
                       f"--steer {denoiser} (or denoiser)")
    steering = pipe.fit_steering(
        prompts["source"], prompts["target"], prompts["control"], method=args.method, steer=args.steer,
        pca_rank=args.pca_rank, accuracy_threshold=args.threshold, gating=args.gating,
        outside_source_range=args.outside_source_range, spatial_map=args.spatial_map,
        num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width,
        batch_size=args.batch_size, seed=args.seed, progress=args.progress and state.is_main_process, state=state,
        gates=args.gates, gate_activation=args.gate_activation, training=training, **gate_sets, **layer_args)
    if not state.is_main_process:
        return 0  # every process fitted the same steering; the main one saves it
    steering.save_pretrained(out)
    report = steering.report()
    if args.report:
        write_text_atomic(args.report, _report_text(steering, args.report))
    echo(state, report, f"saved the steering to {out}")
    return 0


def _training(args) -> dict | None:
    """The learning options given, refused (before any model loads) where nothing is learned or the
    steering could not be learned as asked."""
    learned = map_class(args.method).learned or args.gates == "e2e"
    given = {k: v for k, v in (("steps", args.training_steps), ("lr", args.learning_rate)) if v is not None}
    if given and not learned:
        raise CLIError(f"--training-steps / --learning-rate set how steering is learned through the text encoders; "
                       f"--method {args.method} with --gates {args.gates} learns nothing: pass --method lineas or "
                       "--gates e2e, or drop them")
    if learned and args.steer not in (None, "text_encoder"):
        raise CLIError(f"--method {args.method} with --gates {args.gates} is learned through the text encoders only; "
                       "pass --steer text_encoder (or leave --steer out), or a closed-form --method with two-stage "
                       "gates to steer the denoiser")
    if args.gates == "e2e" and (args.gate_source or args.gate_control):
        raise CLIError("--gate-source / --gate-control give two-stage gates of another concept; end-to-end gates learn "
                       "from source, target and control alone: pass --gates two_stage, or drop them")
    return given if learned else None


def _report_text(steering, path: str) -> str:
    if str(path).lower().endswith(".json"):
        layers = {name: {"width": info.width, "kind": info.kind, "steered": info.steered,
                         "gate_accuracy": None if info.gate_accuracy != info.gate_accuracy else info.gate_accuracy}
                  for name, info in steering.config.layers.items()}
        return json.dumps({"method": steering.config.method, "accuracy_threshold": steering.config.accuracy_threshold,
                           "steered": steering.steered_layers, "layers": layers}, indent=2, sort_keys=True) + "\n"
    return "```\n" + steering.report() + "\n```\n"
