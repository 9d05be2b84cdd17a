"""The harness core stays light: it imports only the torch-free parts of ``impl`` at module level.

Reports over existing records, spec listing and argument parsing must work without loading
the model stack; benchmark modules (repro/benchmarks), the quality proxy and the run bodies
of generate / profile import the system when they run it.
"""

from __future__ import annotations

import subprocess
import sys

LIGHT_IMPL = {"impl", "impl.config", "impl.modes", "impl.errors", "impl.io", "impl.inference", "impl.inference.config"}
CORE = ["repro.cli", "repro.spec", "repro.runner", "repro.records", "repro.report", "repro.paper", "repro.benchmark",
        "repro.errors", "repro.generate", "repro.profile"]


def test_harness_core_imports_only_torch_free_impl_modules():
    code = ("import sys, importlib\n"
            f"for m in {CORE!r}: importlib.import_module(m)\n"
            "from repro.cli import build_parser; build_parser()\n"
            "print(sorted(m for m in sys.modules if m == 'impl' or m.startswith('impl.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(eval(out.stdout.strip().splitlines()[-1]))  # noqa: S307 - our own printed list
    assert loaded <= LIGHT_IMPL, sorted(loaded - LIGHT_IMPL)


def test_light_impl_modules_do_not_import_torch():
    code = ("import sys\n"
            "import impl.config, impl.modes, impl.errors, impl.io, impl.inference.config\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
