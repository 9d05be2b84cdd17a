"""The LongLive-2.0 paper's published numbers, and like-for-like comparisons with our records.

Transcribed from the paper abstract (arXiv 2605.18739), the official release's README model
table and project page, and users' measurements of the release (public issue #103 of the
official repository); the repo must not read reference material at runtime, so the facts are
written down here. GPU is "not stated" wherever the sources do not state it.

What is known about how the paper's FPS were measured: the release's README table gives 24.8
(BF16), 29.7 (NVFP4 4-step) and 45.7 (NVFP4 2-step) FPS but names no GPU, no VAE and no timing
method; the project page states 45.7 FPS on GB200 with 2 steps. The release has no FPS harness:
an environment switch times each AR block with CUDA events (FPS = 32 frames / block time), so
a synchronous decode falls inside the block and an asynchronous one does not. Whether the table
is DiT-only or end to end is therefore unknown, and :func:`paper_table_markdown` shows both of
our figures side by side, each from one record (one commit, one named GPU).

The paper's "up to 1.84x" is 45.7 / 24.8: NVFP4 2-step against BF16 4-step. Our ratio rows
compare the same thing we can run: our best 2-step path against our BF16 4-step path with every
other setting equal, DiT-only and end to end, from one run where the records allow. Hopper has
no FP4 tensor cores, so our fast 2-step path uses FP8 W8A8 block linears.

The package: :mod:`repro.paper.numbers` (the published figures, and which of our paths and
measured twins stand beside each), :mod:`repro.paper.choose` (picking those records: per GPU
type, newest run, like-for-like pairs) and :mod:`repro.paper.table` (describing records and
writing ``results/tables/paper_vs_measured.md``).
"""

from repro.paper.numbers import PAPER_NUMBERS
from repro.paper.table import paper_table_markdown

__all__ = ["PAPER_NUMBERS", "paper_table_markdown"]
