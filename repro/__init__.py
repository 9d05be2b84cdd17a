"""The LongLive-2.0 reproduction harness: specs, runner, records, reports and CLI.

The harness core (cli, spec, runner, records, report, paper, benchmark registry) imports only
the torch-free parts of ``impl`` at module level (impl.config, impl.modes, impl.errors,
impl.io, impl.inference.config: the typed configs and mode vocabulary it validates against),
so reports over existing records and argument parsing never load the model stack
(tests/test_repro_imports.py). Benchmark modules (``repro/benchmarks``), the quality proxy
(``repro/quality``) and the bodies of generate / profile run the system and import it freely.
"""

from __future__ import annotations

__all__ = ["benchmark", "hardware", "records", "report", "runner", "spec", "paper"]
