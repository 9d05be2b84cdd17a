"""Sequence parallelism: process groups, Ulysses all-to-all, Balanced and naive SP layouts,
SP-aware chunked VAE encoding. Every path runs under torchrun with NCCL on GPUs and gloo on
CPU, so the CPU test suite exercises it with real processes."""
