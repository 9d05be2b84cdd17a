"""Expected NVFP4 quantization error on i.i.d. Gaussian data, by numerical integration.

Model (docs/nvfp4.md derives it): x ~ N(0, 1) i.i.d.; blocks of 16; the tensor decode factor
``gd`` is fixed by the tensor's max |x| ``amax``. In a block with max magnitude ``m`` the step
is ``d(m) = s(m) * gd`` with ``s(m) = RN_e4m3(m / (Qb * gd))``; the max element has error
``h(m)`` and the other 15 magnitudes are half-normal truncated to [0, m]. So

    E[e^2] = 1/16 * integral f(m) [ h(m) + 15 / G(m) * integral_0^m h(a) g(a) da ] dm

with ``g`` the half-normal density, ``G`` its CDF, ``f(m) = 16 g(m) G(m)^15`` the density of
the block max, and ``h(a) = (a - d(m) * RN_e2m1(a / d(m)))^2``. SQNR = -10 log10 E[e^2].
Valid for single-candidate rules (static_6, static_4); 4-over-6 picks per block jointly.
"""

from __future__ import annotations

import math

import torch

from impl.quant.nvfp4 import E2M1_VALUES, e2m1_magnitude_code, get_rule, round_to_e4m3


def expected_sqnr_gaussian(amax: float, rule: str = "static_6", *, m_points: int = 12000,
                           a_points: int = 1500, m_max: float = 9.0) -> float:
    """Predicted SQNR (dB) of NVFP4 on standard-normal data whose tensor max is ``amax``."""
    r = get_rule(rule)
    if r.error is not None:
        raise ValueError(f"expected_sqnr_gaussian: rule {rule!r} chooses scales jointly per block; "
                         f"only single-candidate rules have this closed form")
    qb = r.candidates[0]
    gd = float(torch.tensor(amax, dtype=torch.float32) / (r.tensor_q * r.max_scale))
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    g = lambda a: 2.0 * torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)   # half-normal pdf
    G = lambda a: torch.erf(a / math.sqrt(2.0))                            # half-normal cdf

    def sq_err(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return (a - d * grid[e2m1_magnitude_code(a / d).long()]) ** 2

    m = torch.linspace(1e-4, min(m_max, amax), m_points, dtype=torch.float64)
    d = round_to_e4m3(m / (qb * gd)) * gd                       # step of a block with max m
    total = torch.empty_like(m)
    u = torch.linspace(0.0, 1.0, a_points, dtype=torch.float64)
    for lo in range(0, m_points, 1000):                          # chunks bound the memory
        mm, dd = m[lo:lo + 1000, None], d[lo:lo + 1000, None]
        a = mm * u                                               # [chunk, a_points] over [0, m]
        inner = torch.trapezoid(sq_err(a, dd) * g(a), a, dim=1)
        total[lo:lo + 1000] = sq_err(mm, dd)[:, 0] + 15.0 * inner / G(mm[:, 0])
    f = 16.0 * g(m) * G(m) ** 15
    mse = float(torch.trapezoid(f * total, m)) / 16.0
    return -10.0 * math.log10(mse)


def main() -> None:
    """``python -m impl.quant.nvfp4_theory [--samples N] [--seed S]``: measured vs predicted SQNR."""
    import argparse

    from impl.quant.nvfp4 import SCALE_RULES, dequantize, quantize, sqnr_db
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--samples", type=int, default=1 << 22, help="Gaussian samples (multiple of 1024)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.samples % 1024:
        ap.error("--samples must be a multiple of 1024")
    x = torch.randn(args.samples // 1024, 1024, generator=torch.Generator().manual_seed(args.seed))
    print(f"{'rule':<10}{'measured dB':>13}{'predicted dB':>14}")
    for name, rule in SCALE_RULES.items():
        measured = sqnr_db(x, dequantize(quantize(x, name)))
        predicted = expected_sqnr_gaussian(float(x.abs().max()), name) if rule.error is None else float("nan")
        print(f"{name:<10}{measured:>13.3f}{predicted:>14.3f}")


if __name__ == "__main__":
    main()
