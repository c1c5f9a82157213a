"""Rollout sidecar: an HTTP generation server with a JAX or vLLM engine (`python -m
rollout.server`)."""
