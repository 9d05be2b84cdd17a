"""Training: data layer, teacher-forcing losses and the sequence-parallel training loop."""
