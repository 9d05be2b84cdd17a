"""Benchmark modules. Deliberately imports nothing: ``repro.benchmark.get_benchmark`` imports
each module by name on demand, so one broken module never breaks the others."""
