"""DAPO training: objective, advantages, shaping, dynamic sampling and the update step."""
