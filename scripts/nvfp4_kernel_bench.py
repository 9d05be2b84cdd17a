"""Time the Triton NVFP4 kernels (impl/quant/triton_nvfp4.py) at the LongLive-2.0 5B shapes.

Needs a CUDA GPU and Triton. Prints one line per measurement as it goes and a table at the end;
``--out FILE`` also writes the numbers as JSON. Times are medians of triton.testing.do_bench.

    PYTHONPATH=. python scripts/nvfp4_kernel_bench.py --out bench.json [--sweep]

Bytes counted: quantize = x read + packed + scales written; dequantize = packed + scales read +
output written; copy = read + write of a 1 GiB buffer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from impl.quant import nvfp4 as Q  # noqa: E402
from impl.quant import triton_nvfp4 as T  # noqa: E402

ROWS: list[dict] = []
TOKENS = 7040                   # 5B: tokens of one chunk
KV_SHAPE = (1, 24, 28160, 128)  # 5B KV cache: B, H, T, D


def bench(fn) -> float:
    import triton.testing
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def record(name: str, ms: float, nbytes: float | None = None, flops: float | None = None, **extra) -> dict:
    row = {"name": name, "ms": ms, **extra}
    if nbytes is not None:
        row["GB/s"] = nbytes / ms / 1e6
    if flops is not None:
        row["TFLOP/s"] = flops / ms / 1e9
    ROWS.append(row)
    msg = f"{name:58s} {ms * 1e3:10.1f} us"
    if nbytes is not None:
        msg += f"  {row['GB/s']:8.0f} GB/s"
    if flops is not None:
        msg += f"  {row['TFLOP/s']:7.1f} TFLOP/s"
    for k, v in extra.items():
        msg += f"  {k}={v}"
    print(msg, flush=True)
    return row


def quant_bytes(n: int, elt: int) -> int:
    return n * elt + n // 2 + n // 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true", help="also time a few launch configurations")
    ap.add_argument("--skip-mm", action="store_true")
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)

    # ---- reference: device-to-device copy
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    copy = record("copy 1 GiB (dst.copy_(src))", bench(lambda: dst.copy_(src)), 2 * src.numel())
    del src, dst
    copy_bw = copy["GB/s"]

    # ---- quantize
    shapes = {"kv [7040*24,128]": (TOKENS * 24, 128), "act [7040,3072]": (TOKENS, 3072),
              "act [7040,14336]": (TOKENS, 14336)}
    for label, shape in shapes.items():
        x = torch.randn(shape, dtype=torch.bfloat16, device=dev)
        amax = x.abs().amax().float()
        nb = quant_bytes(x.numel(), 2)
        for rule in ("static_6", "mse"):
            record(f"quantize {rule:8s} {label} (amax given)", bench(lambda: T.quantize(x, rule, amax=amax)), nb)
            record(f"quantize {rule:8s} {label} (+amax pass)", bench(lambda: T.quantize(x, rule)), nb)
        if args.sweep and label != "act [7040,14336]":
            for rule, cfgs in (("static_6", [(2048, 4, 128), (4096, 4, 128), (4096, 8, 128), (8192, 8, 128),
                                             (4096, 4, 256)]),
                               ("mse", [(2048, 4, 128), (4096, 4, 128), (4096, 8, 128), (2048, 4, 64)])):
                for el, nw, bk in cfgs:
                    if bk > shape[1]:
                        continue
                    tune = T.QuantTuning(block_k=bk, elems=el, warps=nw)
                    ms = bench(lambda: T.quantize(x, rule, amax=amax, tuning=tune))
                    record(f"  sweep quantize {rule} {label} elems={el} warps={nw} bk={bk}", ms, nb)
        del x

    # ---- dequantize (generic) and KV dequantize
    x = torch.randn(TOKENS, 3072, dtype=torch.bfloat16, device=dev)
    t = T.quantize(x, "static_6")
    nb = t.packed.numel() + t.scales.numel() + x.numel() * 2
    out = torch.empty_like(x)
    record("dequantize [7040,3072] -> bf16", bench(lambda: T.dequantize(t, torch.bfloat16, out=out)), nb)
    record("torch nvfp4.dequantize [7040,3072] -> bf16 (reference path)",
           bench(lambda: Q.dequantize(t, torch.bfloat16)), nb)
    if args.sweep:
        for el, nw in ((4096, 4), (16384, 8)):
            tune = T.DequantTuning(elems=el, warps=nw)
            ms = bench(lambda: T.dequantize(t, torch.bfloat16, out=out, tuning=tune))
            record(f"  sweep dequantize elems={el} warps={nw}", ms, nb)
    del x, t, out

    B, H, Tn, D = KV_SHAPE
    Tmax = Tn + 1024                              # views over a bigger cache buffer (T prefix)
    pbuf = torch.randint(0, 256, (B, H, Tmax, D // 2), dtype=torch.uint8, device=dev)
    sbuf = torch.randint(0, 0x7F, (B, H, Tmax, D // 16), dtype=torch.uint8, device=dev).view(torch.float8_e4m3fn)
    tpb = 1760
    gd = torch.rand(B, (Tmax + tpb - 1) // tpb, device=dev) * 1e-2
    packed, scales = pbuf[:, :, :Tn], sbuf[:, :, :Tn]
    kv_out = torch.empty(B, H, Tn, D, dtype=torch.bfloat16, device=dev)
    nb = packed.numel() + scales.numel() + kv_out.numel() * 2
    record(f"dequantize_kv B{B} H{H} T{Tn} D{D} -> bf16",
           bench(lambda: T.dequantize_kv(kv_out, packed, scales, gd, tpb)), nb)
    if args.sweep:
        for bt, nw in ((8, 2), (16, 4), (32, 4), (32, 8)):
            tune = T.KVDequantTuning(block_t=bt, warps=nw)
            ms = bench(lambda: T.dequantize_kv(kv_out, packed, scales, gd, tpb, tuning=tune))
            record(f"  sweep dequantize_kv block_t={bt} warps={nw}", ms, nb)
    del pbuf, sbuf, kv_out

    # ---- weight-only GEMM vs cuBLAS bf16
    if not args.skip_mm:
        for (N, K) in ((3072, 3072), (14336, 3072), (3072, 14336)):
            W = torch.randn(N, K, device=dev) * 0.02
            w = T.quantize(W, "static_6")
            Wb = Q.dequantize(w, torch.bfloat16)
            for M in (TOKENS, 16):
                xa = torch.randn(M, K, dtype=torch.bfloat16, device=dev)
                fl = 2.0 * M * N * K
                y = T.weight_only_matmul(xa, w)     # autotunes
                ref = xa.float() @ Q.dequantize(w, torch.float32).T
                rel = float((y.float() - ref).norm() / ref.norm())
                record(f"weight_only_matmul M{M} N{N} K{K}", bench(lambda: T.weight_only_matmul(xa, w)),
                       flops=fl, rel_err=f"{rel:.1e}")
                record(f"torch bf16 matmul (cuBLAS) M{M} N{N} K{K}", bench(lambda: xa @ Wb.T), flops=fl)
                record(f"dequantize + cuBLAS M{M} N{N} K{K}",
                       bench(lambda: xa @ T.dequantize(w, torch.bfloat16).T), flops=fl)
            del W, w, Wb

    print("\n==== summary (copy bandwidth %.0f GB/s) ====" % copy_bw)
    print(f"{'kernel':58s} {'us':>10s} {'GB/s':>8s} {'%copy':>6s} {'TFLOP/s':>8s}")
    for r in ROWS:
        if r["name"].startswith("  sweep"):
            continue
        gbs = r.get("GB/s")
        print(f"{r['name']:58s} {r['ms'] * 1e3:10.1f} "
              f"{'' if gbs is None else f'{gbs:8.0f}':>8s} "
              f"{'' if gbs is None else f'{100 * gbs / copy_bw:5.0f}%':>6s} "
              f"{'' if 'TFLOP/s' not in r else format(r['TFLOP/s'], '8.1f'):>8s}")
    sweeps = [r for r in ROWS if r["name"].startswith("  sweep")]
    if sweeps:
        print("---- sweeps ----")
        for r in sweeps:
            print(f"{r['name']:70s} {r['ms'] * 1e3:9.1f} us {r['GB/s']:7.0f} GB/s")
    if args.out:
        Path(args.out).write_text(json.dumps({"copy_GBps": copy_bw, "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
