"""Token masks and KV-cache state of causal-LM calls; they live in the core (no transformers import)."""

from ..core.sequence import cache_length, call_tokens, causal_lm_pre_forward, takes_attention_mask

__all__ = ["cache_length", "call_tokens", "causal_lm_pre_forward", "takes_attention_mask"]
