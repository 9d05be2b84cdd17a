"""A readable float64 reference of the NVFP4 quantizer (NumPy, one block at a time).

It restates the format of :mod:`impl.quant.nvfp4` the slow, obvious way: nearest grid value
by distance (ties to the even code), block scale by nearest E4M3 table entry, 4-over-6 by
trying both candidates. The fast paths must agree with it bit for bit; it is for tests.
"""

from __future__ import annotations

import numpy as np

from impl.quant.nvfp4_format import E2M1_VALUES, GROUP, get_rule


def e4m3_table() -> np.ndarray:
    """All finite non-negative E4M3 (fn) values, ascending; index parity = mantissa parity."""
    vals = [m / 8 * 2.0 ** -6 for m in range(8)]                       # subnormals (m/8 * 2^-6)
    vals += [(1 + m / 8) * 2.0 ** e for e in range(-6, 9) for m in range(8)]
    return np.array(vals[:127])                                         # 448 is the last finite


_E4M3 = e4m3_table()
_E2M1 = np.array(E2M1_VALUES)


def nearest(grid: np.ndarray, v: float) -> int:
    """Index of the grid value nearest to v (v >= 0), ties to the even index; saturating."""
    if v >= grid[-1]:
        return len(grid) - 1
    hi = int(np.searchsorted(grid, v, side="left"))
    if grid[hi] == v:
        return hi
    lo = hi - 1
    d_lo, d_hi = v - grid[lo], grid[hi] - v
    if d_lo < d_hi:
        return lo
    if d_hi < d_lo:
        return hi
    return lo if lo % 2 == 0 else hi


def _pairwise(e: np.ndarray) -> float:
    while e.size > 1:
        e = e[0::2] + e[1::2]
    return float(e[0])


def _quadtree(e: np.ndarray) -> float:
    while e.shape[0] > 1:
        e = (e[0::2, 0::2] + e[1::2, 1::2]) + (e[0::2, 1::2] + e[1::2, 0::2])
    return float(e[0, 0])


def _encode_block(xb: np.ndarray, gd: float, rule, uniform: np.ndarray | None):
    """Quantize one block (1-D of 16, or a 16x16 tile): returns (scale, magnitude codes)."""
    bmax = float(np.abs(xb).max())
    best = None
    for qb in rule.candidates:
        s = float(_E4M3[nearest(_E4M3, bmax / (qb * gd))]) if gd > 0 else 0.0
        if s == 0.0:
            mags = np.zeros(xb.shape, dtype=np.int64)
        else:
            mags = np.vectorize(lambda a: nearest(_E2M1, a / (s * gd)))(np.abs(xb))
        if rule.error is None:
            best = (s, mags)
            break
        e = np.abs(xb) - _E2M1[mags] * s * gd
        if rule.error == "abs_max":
            err = float(np.abs(e).max())
        else:
            e = e * e if rule.error == "mse" else np.abs(e)
            err = _quadtree(e) if xb.ndim == 2 else _pairwise(e)
        if best is None or err < best[2]:
            best = (s, mags, err)
    s, mags = best[0], best[1]
    if uniform is not None and s > 0:
        mags = np.array([_stochastic(abs(a) / (s * gd), u) for a, u in zip(xb.ravel(), uniform.ravel())])
        mags = mags.reshape(xb.shape)
    return s, mags


def _stochastic(r: float, u: float) -> int:
    if r >= _E2M1[-1]:
        return len(_E2M1) - 1
    lo = int(np.searchsorted(_E2M1, r, side="right")) - 1
    p = (r - _E2M1[lo]) / (_E2M1[lo + 1] - _E2M1[lo])
    return lo + 1 if u < p else lo


def quantize_reference(x: np.ndarray, rule: str = "static_6", *, amax: np.ndarray | float | None = None,
                       tile_2d: bool = False, uniform: np.ndarray | None = None):
    """Returns (codes uint8 [..., K] with sign bit, scales float64 [..., K/16], gd float32 array).

    ``amax`` as in :func:`impl.quant.nvfp4.quantize` (scalar or broadcastable to ``[..., 1]``).
    """
    r = get_rule(rule)
    x = np.asarray(x, dtype=np.float32)
    if amax is None:
        amax = np.abs(x).max()
    # fp32 division, exactly rounded (the f64 quotient cannot sit on an f32 midpoint).
    gd = (np.asarray(amax, dtype=np.float64) / (r.tensor_q * r.max_scale)).astype(np.float32)
    gd_full = np.broadcast_to(gd, x.shape[:-1] + (1,)) if gd.ndim else None
    xd = x.astype(np.float64)
    codes = np.zeros(x.shape, dtype=np.uint8)
    scales = np.zeros(x.shape[:-1] + (x.shape[-1] // GROUP,))
    if tile_2d:
        for i in range(0, x.shape[0], GROUP):
            for j in range(0, x.shape[1], GROUP):
                u = None if uniform is None else uniform[i:i + GROUP, j:j + GROUP]
                s, mags = _encode_block(xd[i:i + GROUP, j:j + GROUP], float(gd), r, u)
                scales[i:i + GROUP, j // GROUP] = s
                codes[i:i + GROUP, j:j + GROUP] = mags
    else:
        for idx in np.ndindex(*x.shape[:-1], x.shape[-1] // GROUP):
            row, blk = idx[:-1], idx[-1]
            sl = row + (slice(blk * GROUP, (blk + 1) * GROUP),)
            g = float(gd_full[row + (0,)]) if gd_full is not None else float(gd)
            u = None if uniform is None else uniform[sl]
            s, mags = _encode_block(xd[sl], g, r, u)
            scales[idx] = s
            codes[sl] = mags
    codes |= (np.signbit(x).astype(np.uint8) << 3)
    return codes, scales, gd


def dequantize_reference(codes: np.ndarray, scales: np.ndarray, gd) -> np.ndarray:
    mags = _E2M1[codes & 7] * np.where(codes & 8, -1.0, 1.0)
    gd = np.asarray(gd, dtype=np.float64)
    if gd.ndim:
        gd = gd[..., None]
    return (mags.reshape(*codes.shape[:-1], -1, GROUP) * scales[..., None] * gd).reshape(codes.shape)
