"""Where to steer a transformers language model: named layer presets, found from the model's structure.

Every causal LM offers the same preset names where its blocks have the module, so `layers="o_proj"`
means "the attention output projection" on GPT-2 (`attn.c_proj`) as on Llama (`self_attn.o_proj`)
or GPT-NeoX (`attention.dense`):
- `residual`: the output of each decoder block (the residual stream), the default;
- `post_attention_layernorm`: the norm in front of the MLP (the authors' `.*post_attention_layernorm`);
- `o_proj`: the attention output projection (ITI's choice);
- `post_feedforward_layernorm`: the norm of the feed-forward branch's output, where a block has one.
How the blocks and their parts are found: `blocks.py`. The patterns are the ones the former
per-family table gave (`model\\.layers\\.\\d+` ...), so steerings fitted before keep their targets.
"""

from __future__ import annotations

from torch import nn

from ..core import find_modules
from .blocks import (FFN_OUTPUT_NORMS, MLP_NORMS, OUTPUT_PROJECTIONS, attention_output, block_classes, block_pattern,
                     decoder_blocks, exact_pattern, named_child)

# model_type -> default preset, where a family's default is not `residual`.
DEFAULT_PRESETS: dict[str, str] = {
    # Gemma-2 / 3 normalise each branch before adding it to the residual stream; steering the
    # feed-forward branch's norm is where the paper's Gemma-2 runs put the maps.
    "gemma2": "post_feedforward_layernorm",
    "gemma3": "post_feedforward_layernorm",
    "gemma3_text": "post_feedforward_layernorm",
    # Hyper-connection blocks carry several residual streams, (batch, tokens, streams, width): a
    # block's output is no (batch, tokens, width) activation; the norm in front of the MLP is one.
    "deepseek_v4": "post_attention_layernorm",
    "hy_v4": "post_attention_layernorm",
}
PRESET_NAMES = {  # preset -> what it names, for messages
    "residual": "decoder block",
    "post_attention_layernorm": "norm in front of an MLP",
    "o_proj": "attention output projection",
    "post_feedforward_layernorm": "norm of a feed-forward output",
}
_LOOKED_FOR = {
    "post_attention_layernorm": f"a norm child named one of {list(MLP_NORMS)}",
    "o_proj": f"a leaf named one of {list(OUTPUT_PROJECTIONS)} under a submodule named *attn* / *attention*",
    "post_feedforward_layernorm": f"a norm child named one of {list(FFN_OUTPUT_NORMS)}",
}


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _no_blocks_error(model: nn.Module, why: str) -> ValueError:
    classes = sorted(block_classes(model))
    examples = [n for n, _ in model.named_modules() if n][:8]
    return ValueError(
        f"{why}: found no decoder blocks in {type(model).__name__} (model_type={model_type(model)!r}). Looked for "
        f"an nn.ModuleList of the block classes in model._no_split_modules ({classes or 'none listed'}), or else "
        "any nn.ModuleList of modules of one class. Pass layers= a regular expression over the model's "
        f"module names, e.g. layers=r'model\\.layers\\.\\d+' (names look like: {', '.join(examples)} ...; list "
        "them with [n for n, _ in model.named_modules()])"
    )


def layer_presets(model: nn.Module) -> tuple[str, dict[str, str]]:
    """(default preset, {preset: regular expression}) for this model; only presets that match
    something are listed. Raises ValueError when the model has no recognisable decoder blocks."""
    found = decoder_blocks(model)
    if found is None:
        raise _no_blocks_error(model, "there is no default layer pattern")
    list_name, names = found
    blocks = [model.get_submodule(n) for n in names]
    parts = {
        "residual": [""] * len(blocks),
        "post_attention_layernorm": [named_child(b, MLP_NORMS) for b in blocks],
        "o_proj": [attention_output(b) for b in blocks],
        "post_feedforward_layernorm": [named_child(b, FFN_OUTPUT_NORMS) for b in blocks],
    }
    presets = {}
    for preset, relative in parts.items():
        wanted = [f"{n}.{p}" if p else n for n, p in zip(names, relative) if p is not None]
        if wanted:
            pattern = block_pattern(list_name, [p for p in relative if p is not None])
            presets[preset] = pattern if find_modules(model, pattern) == wanted else exact_pattern(wanted)
    default = DEFAULT_PRESETS.get(model_type(model), "residual")
    return (default if default in presets else "residual"), presets


def resolve_layers(model: nn.Module, layers: str | None = None) -> tuple[str, list[str]]:
    """(regular expression, matching module names) for `layers`: None (the model's default preset),
    a preset name (see the module docstring), or a regular expression over module names."""
    if layers is not None and not isinstance(layers, str):
        raise TypeError(f"layers must be a preset name or a regular expression string, got {type(layers).__name__}")
    if layers is None or layers in PRESET_NAMES:
        default, presets = layer_presets(model)
        layers = default if layers is None else layers
        if layers not in presets:
            raise ValueError(
                f"layers={layers!r} is a preset, but no module of the model ({type(model).__name__}) was found as "
                f"its {PRESET_NAMES[layers]}: looked in each decoder block for {_LOOKED_FOR[layers]}. Pass one of "
                f"the presets for {model_type(model)}: {sorted(presets)}, or a regular expression over module names"
            )
        return presets[layers], find_modules(model, presets[layers])
    try:
        return layers, find_modules(model, layers)
    except ValueError as e:
        try:
            hint = f" Or pass one of the presets for {model_type(model)}: {sorted(layer_presets(model)[1])}."
        except ValueError:
            hint = ""
        raise ValueError(f"{e}{hint}") from None
