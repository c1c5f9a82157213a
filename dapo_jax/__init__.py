"""dapo_jax: DAPO RL post-training for Qwen-family LLMs in JAX/Flax."""
