"""`dsas generate`: images with DSAS, with each image's lambda map and per-token lambdas;
`--compare` also draws the unsteered and plain-steering images and puts the three side by side."""

from __future__ import annotations

from pathlib import Path

from . import arguments as types
from .common import add_generation_args, add_output_args, add_prompt_args, add_runtime_args, echo, process_state


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate images with a steering, with lambda overlays",
        description="Generate images with DSAS. Writes images/VARIANT/UNIT.png, overlays/VARIANT/UNIT.png (the "
                    "denoiser's lambda map over the image and the prompt's per-token lambdas, captioned with the "
                    "layers and steps they average) and results.jsonl (one record per "
                    "image, written as it goes); started again, it resumes where it stopped. A run with other "
                    "settings (another --alpha, --steps, steering ...) into the same --out is refused unless "
                    "--overwrite.")
    add_generation_args(p)
    add_prompt_args(p)
    p.add_argument("--alpha", type=types.strength, default=1.0, help="steering strength (default: 1.0)")
    p.add_argument("--compare", action="store_true",
                   help="also draw unsteered and plain-steering images; compare/UNIT-aALPHA.png shows the three side "
                        "by side, with the prompt, seed and alpha")
    add_output_args(p)
    add_runtime_args(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from .generation import Variant, prepare, run_generation
    from .journal import Journal

    state = process_state(args.cpu, args.threads)
    pipe, units, settings = prepare(args, state)
    settings["alpha"] = args.alpha  # another alpha is another run: refused into the same --out, like other settings
    variants = [Variant("dsas", args.alpha)]
    if args.compare:
        variants = [Variant("unsteered"), Variant("plain", args.alpha)] + variants
    out = Path(args.out)
    journal = Journal(out, "results", settings, state, overwrite=args.overwrite)
    records = run_generation(pipe, units, variants, out=out, journal=journal, state=state, steps=args.steps,
                             height=settings["height"], width=settings["width"], negative_prompt=args.negative_prompt,
                             steer_negative=args.steer_negative, compare=args.alpha if args.compare else None,
                             progress=args.progress)
    echo(state, f"{len(records)} images in {out} (results.jsonl, images/, overlays/"
                + (", compare/)" if args.compare else ")"), *_lambda_lines(records))
    return 0


def _lambda_lines(records: list[dict]) -> list[str]:
    lines = []
    for group in dict.fromkeys(r["group"] for r in records):
        seq = [r["sequence_lambda"] for r in records if r["group"] == group and r.get("sequence_lambda") is not None]
        img = [r["image_lambda"] for r in records if r["group"] == group and r.get("image_lambda") is not None]
        parts = []
        if seq:
            parts.append(f"prompt lambda {sum(seq) / len(seq):.3f}")
        if img:
            parts.append(f"image lambda {sum(img) / len(img):.3f}")
        if parts:
            lines.append(f"DSAS, {group} prompts: mean " + ", mean ".join(parts))
    return lines
