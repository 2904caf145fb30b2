"""Train the toy language model of `lm_world` and save it as a standard transformers folder.

    python -m dsas_diffusion.toy.train_lm                 # writes assets/toy-lm (about 2 minutes on one CPU core)
    python -m dsas_diffusion.toy.train_lm --out /tmp/lm --steps 500

A small GPT-2 (`GPT2LMHeadModel` from a `GPT2Config`) learns the world's sentences from a fixed
seed: the data are drawn in a fixed order from `lm_world.training_texts`, the weights initialised
after `torch.manual_seed`. The folder holds the model (safetensors) and the word-level tokenizer;
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load it.

At the end the script prints the final training loss and, on the held-out prompts, how often the
continuations show the concept (greedy and sampled) and how often they are well-formed sentences.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import lm_eval, lm_world

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "assets" / "toy-lm"


def build_model(vocab_size: int, *, layers: int = 4, hidden: int = 96, heads: int = 4, context: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=context, n_embd=hidden, n_layer=layers, n_head=heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=lm_world.BOS_ID, eos_token_id=lm_world.EOS_ID, pad_token_id=lm_world.PAD_ID,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = lm_world.PAD_ID
    model.generation_config.bos_token_id = lm_world.BOS_ID
    model.generation_config.eos_token_id = lm_world.EOS_ID
    return model


def encode(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels): "[BOS] text [EOS]", padding ignored by the loss."""
    ids = [row + [lm_world.EOS_ID] for row in tokenizer(texts)["input_ids"]]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), lm_world.PAD_ID, dtype=torch.long)
    for r, row in enumerate(ids):
        input_ids[r, :len(row)] = torch.tensor(row)
    labels = input_ids.masked_fill(input_ids == lm_world.PAD_ID, -100)
    return input_ids, labels


def train(*, steps: int = 1500, batch_size: int = 64, lr: float = 3e-3, warmup: int = 100, seed: int = 0,
          layers: int = 4, hidden: int = 96, heads: int = 4, progress: bool = True):
    """(model, tokenizer, mean loss of the last 50 steps) trained from `seed`."""
    tokenizer = lm_world.build_tokenizer()
    torch.manual_seed(seed)
    model = build_model(len(tokenizer), layers=layers, hidden=hidden, heads=heads)
    input_ids, labels = encode(tokenizer, lm_world.training_texts(steps * batch_size, seed=seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="training toy LM", disable=not progress)
    for step in bar:
        rows = slice(step * batch_size, (step + 1) * batch_size)
        x, y = input_ids[rows], labels[rows]
        width = int((y != -100).sum(1).max())
        loss = model(input_ids=x[:, :width], attention_mask=(x[:, :width] != lm_world.PAD_ID).long(),
                     labels=y[:, :width]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    tail = losses[-50:]
    return model, tokenizer, sum(tail) / len(tail)


def report(model, tokenizer) -> dict[str, float]:
    """Concept rates and well-formedness on the held-out prompts, greedy and sampled."""
    out = {}
    for mode, sample in (("greedy", False), ("sampled", True)):
        for label, prompts in (("source", lm_world.EVAL_SOURCE_PROMPTS), ("control", lm_world.EVAL_CONTROL_PROMPTS)):
            conts = lm_eval.generate_continuations(model, tokenizer, prompts, do_sample=sample, seed=0)
            out[f"{mode}_concept_rate_{label}"] = lm_world.concept_rate(conts)
            out[f"{mode}_well_formed_{label}"] = sum(lm_world.continuation_kind(c, p) is not None
                                                     for p, c in zip(prompts, conts)) / len(conts)
    return out


def _portable_tokenizer_class(folder: Path) -> None:
    """transformers 5 records `TokenizersBackend`, a class transformers 4 lacks; both load a
    tokenizer.json through `PreTrainedTokenizerFast`, so record that."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    from ..cli import arguments as types

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=types.output_folder, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--steps", type=types.positive_int, default=1500)
    p.add_argument("--batch-size", type=types.positive_int, default=64)
    p.add_argument("--lr", type=types.learning_rate, default=3e-3)
    p.add_argument("--seed", type=types.seed, default=0)
    p.add_argument("--layers", type=types.positive_int, default=4)
    p.add_argument("--hidden", type=types.positive_int, default=96)
    p.add_argument("--heads", type=types.positive_int, default=4)
    p.add_argument("--threads", type=types.threads, default=1,
                   help="torch CPU threads (default 1: the shipped checkpoint was trained so; results can differ "
                        "in the last bits with another count)")
    args = p.parse_args(argv)
    args.out = Path(args.out)
    if args.hidden % args.heads:
        p.error(f"argument --hidden: {args.hidden} is not a multiple of --heads {args.heads}; each head takes an "
                "equal share of the width")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer, loss = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                   layers=args.layers, hidden=args.hidden, heads=args.heads)
    minutes = (time.perf_counter() - start) / 60
    print(f"final training loss (mean of the last 50 steps): {loss:.4f}  [{minutes:.1f} min]")
    for key, value in report(model, tokenizer).items():
        print(f"{key:<32} {value:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    _portable_tokenizer_class(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"saved to {args.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
