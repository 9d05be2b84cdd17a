"""Streaming inference: one typed configuration (:mod:`impl.inference.config`, torch-free) and
one builder (:mod:`impl.inference.build`). Import from the submodules."""
