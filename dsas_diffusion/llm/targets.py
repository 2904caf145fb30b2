"""Where to steer a transformers language model: named layer patterns per architecture.

Keys are `model.config.model_type`. Every family offers the same preset names where it has the
module, so `layers="o_proj"` means "the attention output projection" on GPT-2 (`attn.c_proj`)
as on Llama (`self_attn.o_proj`). Module names were read off tiny models of each family built
with transformers 5 (the layouts are those of the hub checkpoints).
"""

from __future__ import annotations

from torch import nn

from ..core import find_modules

_LLAMA_LIKE = {
    # residual stream after each decoder layer (the layer returns a tensor or a tuple)
    "residual": r"model\.layers\.\d+",
    # the norm in front of the MLP (the authors' `.*post_attention_layernorm`)
    "post_attention_layernorm": r"model\.layers\.\d+\.post_attention_layernorm",
    # the attention output projection (ITI's choice)
    "o_proj": r"model\.layers\.\d+\.self_attn\.o_proj",
}
_GEMMA2_LIKE = {
    # Gemma-2 normalises each branch before adding it to the residual stream; steering the
    # feed-forward branch's norm is where the paper's Gemma-2 runs put the maps.
    "post_feedforward_layernorm": r"model\.layers\.\d+\.post_feedforward_layernorm",
    "post_attention_layernorm": r"model\.layers\.\d+\.post_attention_layernorm",
    "residual": r"model\.layers\.\d+",
    "o_proj": r"model\.layers\.\d+\.self_attn\.o_proj",
}
_GPT2 = {
    "residual": r"transformer\.h\.\d+",
    "o_proj": r"transformer\.h\.\d+\.attn\.c_proj",
}

# model_type -> (default preset, presets)
LAYER_PRESETS: dict[str, tuple[str, dict[str, str]]] = {
    "llama": ("residual", _LLAMA_LIKE),
    "mistral": ("residual", _LLAMA_LIKE),
    "qwen2": ("residual", _LLAMA_LIKE),
    "qwen3": ("residual", _LLAMA_LIKE),
    "gemma": ("residual", _LLAMA_LIKE),
    "gemma2": ("post_feedforward_layernorm", _GEMMA2_LIKE),
    "gemma3_text": ("post_feedforward_layernorm", _GEMMA2_LIKE),
    "gpt2": ("residual", _GPT2),
}


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def resolve_layers(model: nn.Module, layers: str | None = None) -> tuple[str, list[str]]:
    """(regular expression, matching module names) for `layers`: None (the architecture's
    default), a preset name of this architecture, or a regular expression over module names."""
    kind = model_type(model)
    default, presets = LAYER_PRESETS.get(kind, (None, {}))
    if layers is None:
        if default is None:
            raise ValueError(
                f"there is no default layer pattern for model_type={kind!r} (known: {sorted(LAYER_PRESETS)}); pass "
                "layers= a regular expression over the model's module names, e.g. layers=r'model\\.layers\\.\\d+' "
                "(list them with [n for n, _ in model.named_modules()])"
            )
        layers = default
    if not isinstance(layers, str):
        raise TypeError(f"layers must be a preset name or a regular expression string, got {type(layers).__name__}")
    pattern = presets.get(layers, layers)
    try:
        names = find_modules(model, pattern)
    except ValueError as e:
        origin = f"layers={layers!r} is a preset of {kind}, but " if layers in presets else ""
        hint = f" Or pass one of the presets for {kind}: {sorted(presets)}." if presets else ""
        raise ValueError(f"{origin}{e}{hint}") from None
    return pattern, names
