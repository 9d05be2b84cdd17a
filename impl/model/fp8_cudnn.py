"""cuDNN's FP8 SDPA forward through the cuDNN frontend's Python graph API (``import cudnn``).

One graph per (shapes, device), built on first use and cached. cuDNN takes one scalar descale
per tensor, so Q, K and V are quantized with one amax scale each (not per head, unlike the
Triton path); the probabilities are scaled by 448 into e4m3 inside the kernel (``scale_s``)
and descaled after (``descale_s``). On Hopper cuDNN's FP8 forward writes an FP8 output (a
BF16 / FP16 output needs Blackwell), so O is written as e4m3 with V's scale (|O| <= max |V|:
softmax weights average rows of V) and converted back to the input dtype afterwards.
"""

from __future__ import annotations

import math

import torch

from impl.model.fp8_scaling import FP8_MAX, fp8_scales, to_fp8


class CudnnFP8Attention:
    """Callable (q, k, v) -> o for BF16 / FP16 inputs [B, H, S, D] on a CUDA GPU."""

    def __init__(self) -> None:
        import cudnn
        self._cudnn = cudnn
        self._handle = cudnn.create_handle()
        self._graphs: dict[tuple, tuple] = {}
        self._const: dict[tuple, torch.Tensor] = {}

    def _graph(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, out: torch.Tensor):
        key = (tuple(q8.shape), tuple(k8.shape), q8.device)
        if key in self._graphs:
            return self._graphs[key]
        cudnn = self._cudnn
        io = cudnn.data_type.FP8_E4M3
        g = cudnn.pygraph(io_data_type=cudnn.data_type.HALF, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=self._handle)

        def fp8(name: str, t: torch.Tensor):
            return g.tensor(name=name, dim=list(t.shape), stride=list(t.stride()),
                            data_type=cudnn.data_type.FP8_E4M3)

        def scalar(name: str):
            return g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)

        tq, tk, tv = fp8("q", q8), fp8("k", k8), fp8("v", v8)
        scales = {n: scalar(n) for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
        o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, **scales, is_inference=True,
                                          attn_scale=1.0 / math.sqrt(q8.shape[-1]), use_causal_mask=False)
        o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(io)
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        workspace = torch.empty(max(g.get_workspace_size(), 1), dtype=torch.uint8, device=q8.device)
        self._graphs[key] = (g, tq, tk, tv, scales, o, amax_s, amax_o, workspace)
        return self._graphs[key]

    def _scalar(self, value: float, device: torch.device) -> torch.Tensor:
        key = (value, device)
        if key not in self._const:   # a fresh device tensor per call would be a host sync
            self._const[key] = torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)
        return self._const[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sq, sk, sv = (fp8_scales(x, per_head=False) for x in (q, k, v))
        q8, k8, v8 = (to_fp8(x, s).contiguous() for x, s in ((q, sq), (k, sk), (v, sv)))
        out = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device)
        g, tq, tk, tv, scales, o, amax_s, amax_o, workspace = self._graph(q8, k8, v8, out)
        amax = torch.empty((2, 1, 1, 1, 1), dtype=torch.float32, device=q.device)
        pack = {tq: q8, tk: k8, tv: v8, o: out, amax_s: amax[0], amax_o: amax[1],
                scales["descale_q"]: 1.0 / sq, scales["descale_k"]: 1.0 / sk, scales["descale_v"]: 1.0 / sv,
                scales["descale_s"]: self._scalar(1.0 / FP8_MAX, q.device),
                scales["scale_s"]: self._scalar(FP8_MAX, q.device), scales["scale_o"]: sv}
        self._cudnn.set_stream(handle=self._handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        g.execute(pack, workspace, handle=self._handle)
        return (out.float() / sv).to(q.dtype)
