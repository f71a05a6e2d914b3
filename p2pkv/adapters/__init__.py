"""Adapters that plug p2pkv into serving stacks (vLLM: :mod:`p2pkv.adapters.vllm`)."""
