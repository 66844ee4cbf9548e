"""The shared world-modality core in pure torch: Prophet, gated cross-attention, memory modes and world loss."""
