"""Frames -> world latents: encoders, the on-disk cache, precompute, training views and the processor step."""
