"""The decoder blocks of a causal LM and the parts of a block that the layer presets name, found from
the model's structure, so a family needs no entry of its own.

Blocks: a `ModuleList` whose members are classes that transformers lists in `_no_split_modules`
(the unit it never splits across devices: the decoder layer), outermost lists only, the text
decoder's when the model has several stacks (a vision tower, say).
Parts of a block: found by name among the block's submodules (see the tuples below), since modules
say nothing about where their output goes.
"""

from __future__ import annotations

import re

from torch import nn

# The attention output projection: a submodule with one of these names inside a submodule whose
# name says attention (GPT-2 attn.c_proj, Llama self_attn.o_proj, GPT-NeoX attention.dense,
# Falcon self_attention.dense, OPT self_attn.out_proj, GPT-Neo attn.attention.out_proj).
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "proj")
ATTENTION_WORDS = ("attn", "attention")
# The norm in front of the MLP, in order of preference. `post_attention_layernorm` comes first
# because it is the authors' pattern (`.*post_attention_layernorm`): on sandwich- or post-norm
# blocks (Gemma-2, OLMo-2) the module of that name normalises the attention output instead.
MLP_NORMS = ("post_attention_layernorm", "ln_2", "ln_mlp", "pre_feedforward_layernorm", "feedforward_layernorm",
             "ffn_norm", "post_attention_norm", "pre_mlp_layernorm", "ln2", "norm2")
# The norm of the feed-forward branch's output (sandwich- and post-norm blocks only).
FFN_OUTPUT_NORMS = ("post_feedforward_layernorm",)


def block_classes(model: nn.Module) -> set[str]:
    """The class names transformers keeps whole on one device, over the model and its sub-models."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def _text_layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    return count if isinstance(count, int) else None


def _decoder_name(model: nn.Module) -> str | None:
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except Exception:  # some wrappers raise instead of returning None
        return None
    return next((n for n, m in model.named_modules() if m is decoder), None) if decoder is not model else None


def _inside(name: str, prefix: str) -> bool:
    return not prefix or name.startswith(prefix + ".")


def decoder_blocks(model: nn.Module) -> tuple[str, list[str]] | None:
    """(name of the block ModuleList, block names), or None when no list of blocks is found.

    Where `_no_split_modules` names no listed class (older encoder-decoder families, models that are
    not transformers PreTrainedModels), lists of modules of one class stand in; among several lists,
    the one of `config.num_hidden_layers` blocks, then the largest, wins.
    """
    classes, count = block_classes(model), _text_layer_count(model)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    found = [(n, m) for n, m in lists if all(type(b).__name__ in classes for b in m)]
    if not found:
        found = [(n, m) for n, m in lists if len({type(b) for b in m}) == 1]
    found = [(n, m) for n, m in found if not any(_inside(n, o) and n != o for o, _ in found)]  # outermost
    decoder = _decoder_name(model)
    if decoder is not None and any(_inside(n, decoder) for n, _ in found):
        found = [(n, m) for n, m in found if _inside(n, decoder)]
    if not found:
        return None
    name, blocks = max(found, key=lambda f: (len(f[1]) == count, sum(p.numel() for p in f[1].parameters())))
    return name, [f"{name}.{i}" for i in range(len(blocks))]


def attention_output(block: nn.Module) -> str | None:
    """Relative name of the block's attention output projection: self- before cross-attention, then
    the shallowest, then by the order of OUTPUT_PROJECTIONS."""
    found = []
    for name, module in block.named_modules():
        parts = name.split(".")
        # any module with weights, not only leaves: a LoRA-wrapped projection has children
        if (len(parts) > 1 and parts[-1] in OUTPUT_PROJECTIONS and next(module.parameters(), None) is not None
                and any(w in p.lower() for p in parts[:-1] for w in ATTENTION_WORDS)):
            cross = any(w in p.lower() for p in parts for w in ("cross", "encoder"))
            found.append((cross, len(parts), OUTPUT_PROJECTIONS.index(parts[-1]), name))
    return min(found)[-1] if found else None


def named_child(block: nn.Module, names: tuple[str, ...]) -> str | None:
    """The first of `names` that is a direct child of the block and a normalisation layer."""
    children = dict(block.named_children())
    return next((n for n in names if n in children and "norm" in type(children[n]).__name__.lower()), None)


def block_pattern(list_name: str, parts: list[str]) -> str:
    """A regular expression over full module names: `parts` (relative names, "" for the block
    itself) inside any block of the list."""
    prefix = re.escape(list_name) + r"\.\d+"
    distinct = sorted(set(parts))
    if distinct == [""]:
        return prefix
    if len(distinct) == 1:
        return prefix + r"\." + re.escape(distinct[0])
    return prefix + r"\.(?:" + "|".join(re.escape(p) for p in distinct) + ")"


def exact_pattern(names: list[str]) -> str:
    """A regular expression matching exactly these module names (when no shorter one does)."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"
