"""The benchmark suites: attention, decode, kv_append, lstm, rnn_vs_attention (DESIGN §7).

Each suite adds rows to a Recorder. Providers are the seqkernels backends that run on the device and
the peers measured in the same run (torch SDPA per available backend, naive attention, FlashAttention /
xformers / FlexAttention when installed, torch's LSTM modules, a plain slice copy for the KV append).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import seqkernels
from seqkernels import backends, reference, testing

from .context_parallel import suite_context_parallel
from .harness import Recorder, Rounds, Settings, add_gemm_to_rounds, measure, rotations
from .varlen import suite_varlen

# ---------------------------------------------------------------------------------------------
# parity gate


def _gate(out, ref, base, *, grad=False) -> Optional[str]:
    """None when `out` passes the DESIGN §5 rule against `ref` (float64) with `base` as the
    low-precision baseline; else a one-line reason (the row is then reported, not timed)."""
    report = testing.compare(out, ref, base, grad=grad)
    if report.passed:
        return None
    worst = max(report.rows, key=lambda r: r.ratio)
    return f"parity FAILED: {worst.name} err {worst.max_err:.3g} > bound {worst.bound:.3g}"


def _seqkernels_backends(s: Settings, op_spec, call) -> List[str]:
    order = ("cuda", "triton") if s.is_cuda else ("cpu",)
    if s.backend:
        order = (s.backend,)
    return [b for b in order if backends.why_not(op_spec, b, torch.device(s.device), call) is None]


# ---------------------------------------------------------------------------------------------
# attention


def _sdpa_providers(s: Settings) -> Dict[str, Callable]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def with_backend(b):
        def f(q, k, v, causal):
            with sdpa_kernel([b]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return f

    provs = {}
    if s.is_cuda:
        for name, b in (
            ("torch_sdpa_flash", SDPBackend.FLASH_ATTENTION),
            ("torch_sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
            ("torch_sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
        ):
            provs[name] = with_backend(b)
    else:
        provs["torch_sdpa"] = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    provs["torch_sdpa_math"] = with_backend(SDPBackend.MATH)

    def naive(q, k, v, causal):
        s_ = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if causal:
            L, S = s_.shape[-2:]
            s_ = s_.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(S - L + 1), float("-inf"))
        # The softmax in float32, as models write it for float16/bfloat16, and in float64 for float64.
        return torch.softmax(s_.to(torch.promote_types(q.dtype, torch.float32)), -1).to(q.dtype) @ v

    provs["naive"] = naive
    try:
        from flash_attn import flash_attn_func

        provs["flash_attn"] = lambda q, k, v, causal: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
        ).transpose(1, 2)
    except ImportError:
        pass
    try:
        import xformers.ops as xops

        provs["xformers"] = lambda q, k, v, causal: xops.memory_efficient_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_bias=xops.LowerTriangularMask() if causal else None,
        ).transpose(1, 2)
    except ImportError:
        pass
    if s.is_cuda:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
            masks = {}

            def flex_fn(q, k, v, causal):
                if not causal:
                    return flex(q, k, v)
                key = (q.shape[-2], k.shape[-2])
                if key not in masks:
                    off = k.shape[-2] - q.shape[-2]
                    masks[key] = create_block_mask(
                        lambda b, h, i, j: j <= i + off, None, None, key[0], key[1], device=q.device
                    )
                return flex(q, k, v, block_mask=masks[key])

            provs["flex_attention"] = flex_fn
        except ImportError:
            pass
    return provs


def _attention_shapes(s: Settings):
    if s.is_cuda:
        D = 128
        lens = [1024, 4096] if s.quick else [512, 1024, 2048, 4096, 8192, 16384]
        return [(16384 // L, 16, L, D) for L in lens] + ([] if s.quick else [(4, 16, 4096, 64)])
    if s.quick:
        return [(1, 8, 1024, 64)]
    return [(1, 8, 1024, 64), (1, 8, 2048, 128), (4, 8, 512, 64)]


def _ref_slice(q, k, v, causal, dtype):
    """Reference for batch 0, head 0 (the parity gate): computed on the device in `dtype`."""
    return reference.attention_ref(
        q[:1, :1].to(dtype), k[:1, :1].to(dtype), v[:1, :1].to(dtype), window_left=-1, window_right=0 if causal else -1
    )[0]


def suite_attention(rec: Recorder, s: Settings, progress):
    for B, H, L, D in _attention_shapes(s):
        for causal in (False, True):
            shape = f"B{B} H{H} L{L} D{D}{' causal' if causal else ''}"
            flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
            nrot = rotations(s, 3 * B * H * L * D * s.dtype.itemsize)
            inputs = [
                tuple(torch.randn(B, H, L, D, device=s.device, dtype=s.dtype) for _ in range(3)) for _ in range(nrot)
            ]
            q0, k0, v0 = inputs[0]
            ref64 = _ref_slice(q0, k0, v0, causal, torch.float64)
            base = _ref_slice(q0, k0, v0, causal, s.dtype)
            call = seqkernels.ops.attention.prepare_attention(q0, k0, v0, causal=causal)
            provs = {
                f"seqkernels_{b}": (lambda b_: lambda q, k, v, c: seqkernels.attention(q, k, v, causal=c, backend=b_))(
                    b
                )
                for b in _seqkernels_backends(s, seqkernels.ops.attention.OP, call)
            }
            if not s.backend:
                provs.update(_sdpa_providers(s))
            g = torch.randn_like(q0)
            fwd_rounds, bwd_rounds = Rounds(s), Rounds(s)
            # "% of GEMM": against the GEMM timed in the same rounds as the providers.
            fwd_gemm, bwd_gemm = add_gemm_to_rounds(fwd_rounds, s), add_gemm_to_rounds(bwd_rounds, s)
            for name, fn in provs.items():
                progress(f"attention {name} {shape}")
                try:
                    out = fn(q0, k0, v0, causal)
                except Exception as e:  # a peer that does not support this shape/device is reported, not fatal
                    rec.add_failure("attention", "fwd", name, shape, f"unsupported: {type(e).__name__}: {str(e)[:80]}")
                    continue
                bad = _gate(out[:1, :1], ref64, base)
                if bad:
                    rec.add_failure("attention", "fwd", name, shape, bad)
                    continue
                fwd_rounds.add(
                    [lambda x=x, fn=fn: fn(*x, causal) for x in inputs],
                    lambda ms, name=name, flops=flops: rec.add_time(
                        "attention",
                        "fwd",
                        name,
                        shape,
                        ms,
                        per=[
                            ("tflops", "TFLOP/s", lambda t: flops / (t * 1e-3) / 1e12),
                            ("pct_gemm", "% of GEMM", lambda t: 100 * flops / (t * 1e-3) / 1e12 / fwd_gemm["tflops"]),
                        ],
                    ),
                )
                if name in ("naive",) and L > 4096:
                    continue
                # backward: time only autograd.grad through the retained graph of one forward
                qg, kg, vg = (t.detach().requires_grad_() for t in (q0, k0, v0))
                try:
                    outg = fn(qg, kg, vg, causal)
                    grads = torch.autograd.grad(outg, (qg, kg, vg), g, retain_graph=True)
                except Exception as e:
                    rec.add_failure("attention", "bwd", name, shape, f"unsupported: {type(e).__name__}: {str(e)[:80]}")
                    continue
                bad = _gate_bwd(q0, k0, v0, g, causal, grads)
                if bad:
                    rec.add_failure("attention", "bwd", name, shape, bad)
                    continue
                bwd_rounds.add(
                    [lambda o=outg, xs=(qg, kg, vg): torch.autograd.grad(o, xs, g, retain_graph=True)],
                    lambda ms, name=name, flops=flops: rec.add_time(
                        "attention",
                        "bwd",
                        name,
                        shape,
                        ms,
                        per=[
                            ("tflops", "TFLOP/s", lambda t: 2.5 * flops / (t * 1e-3) / 1e12),
                            (
                                "pct_gemm",
                                "% of GEMM",
                                lambda t: 100 * 2.5 * flops / (t * 1e-3) / 1e12 / bwd_gemm["tflops"],
                            ),
                        ],
                    ),
                )
                del outg, grads
            # The providers of this shape in alternating rounds (CPU): their ratio is a same-run one.
            fwd_rounds.run()
            bwd_rounds.run()
            rec.meta.setdefault("gemm_tflops_per_shape", {})[shape] = {
                "fwd": fwd_gemm.get("tflops"),
                "bwd": bwd_gemm.get("tflops"),
            }
            del inputs
    _attention_modifier_rows(rec, s, progress)


# ---------------------------------------------------------------------------------------------
# attention with score modifiers (softcap, ALiBi, sinks): seqkernels against torch's eager
# formulation of each (explicit scores, the modifier, softmax; the sink as an extra softmax
# column, as gpt-oss and Gemma 2 write it in transformers), and against plain attention.


def _modifier_kwargs(name: str, H: int, device) -> dict:
    if name == "sinks":
        return {"sinks": torch.randn(H, device=device)}
    if name == "alibi":
        return {"alibi_slopes": torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], device=device)}
    if name == "softcap":
        return {"softcap": 30.0}
    return {}


def eager_modified_attention(q, k, v, softcap=None, alibi_slopes=None, sinks=None):
    """torch's eager formulation of a modified attention (not causal): the peer of the modifier rows."""
    acc = torch.promote_types(q.dtype, torch.float32)  # float32 scores, float64 for float64 inputs
    s_ = (q @ k.transpose(-1, -2)).to(acc) * (q.shape[-1] ** -0.5)
    if softcap:
        s_ = softcap * torch.tanh(s_ / softcap)
    if alibi_slopes is not None:
        L, S = s_.shape[-2:]
        i = torch.arange(L, device=q.device).view(L, 1) + (S - L)
        j = torch.arange(S, device=q.device).view(1, S)
        s_ = s_ - alibi_slopes.to(acc).view(1, -1, 1, 1) * (i - j).abs()
    if sinks is not None:
        s_ = torch.cat([s_, sinks.to(acc).view(1, -1, 1, 1).expand(*s_.shape[:-1], 1)], dim=-1)
        return torch.softmax(s_, -1)[..., :-1].to(q.dtype) @ v
    return torch.softmax(s_, -1).to(q.dtype) @ v


def _modifier_shapes(s: Settings):
    if s.is_cuda:
        return [(4, 16, 2048, 128)] if s.quick else [(4, 16, 2048, 128), (16, 16, 512, 64)]
    return [(4, 8, 512, 64)] if s.quick else [(1, 8, 2048, 128), (4, 8, 512, 64)]


def _attention_modifier_rows(rec: Recorder, s: Settings, progress):
    for B, H, L, D in _modifier_shapes(s):
        q0, k0, v0 = (torch.randn(B, H, L, D, device=s.device, dtype=s.dtype) for _ in range(3))
        g = torch.randn_like(q0)
        for mod in ("plain", "sinks", "alibi", "softcap"):
            mk = _modifier_kwargs(mod, H, s.device)
            shape = f"B{B} H{H} L{L} D{D} {mod}"
            head0 = {n: (x[:1] if isinstance(x, torch.Tensor) else x) for n, x in mk.items()}
            leaves = lambda dtype: [t[:1, :1].to(dtype).detach().requires_grad_() for t in (q0, k0, v0)]  # noqa: E731
            refs = []
            for dtype in (torch.float64, s.dtype):
                xs = leaves(dtype)
                m64 = {n: (x.to(torch.float64) if isinstance(x, torch.Tensor) and dtype == torch.float64 else x)
                       for n, x in head0.items()}  # fmt: skip
                out = reference.attention_ref(*xs, **m64)[0]
                refs.append((out.detach(), torch.autograd.grad(out, xs, g[:1, :1].to(dtype))))
            call = seqkernels.ops.attention.prepare_attention(q0, k0, v0, **mk)
            provs = {
                f"seqkernels_{b}": (lambda b_: lambda q, k, v: seqkernels.attention(q, k, v, backend=b_, **mk))(b)
                for b in _seqkernels_backends(s, seqkernels.ops.attention.OP, call)
            }
            if not s.backend:
                provs["torch_eager"] = lambda q, k, v: eager_modified_attention(q, k, v, **mk)
            fwd_rounds, bwd_rounds = Rounds(s), Rounds(s)
            for name, fn in provs.items():
                progress(f"attention {name} {shape}")
                try:
                    out = fn(q0, k0, v0)
                except Exception as e:
                    rec.add_failure("attention", "fwd", name, shape, f"unsupported: {type(e).__name__}: {str(e)[:80]}")
                    continue
                bad = _gate(out[:1, :1], refs[0][0], refs[1][0])
                if bad:
                    rec.add_failure("attention", "fwd", name, shape, bad)
                    continue
                fwd_rounds.add(
                    [lambda fn=fn: fn(q0, k0, v0)],
                    lambda ms, name=name: rec.add_time("attention", "fwd", name, shape, ms),
                )
                qg, kg, vg = (t.detach().requires_grad_() for t in (q0, k0, v0))
                outg = fn(qg, kg, vg)
                grads = torch.autograd.grad(outg, (qg, kg, vg), g, retain_graph=True)
                bad = _gate(tuple(t[:1, :1] for t in grads), refs[0][1], refs[1][1], grad=True)
                if bad:
                    rec.add_failure("attention", "bwd", name, shape, bad)
                    continue
                bwd_rounds.add(
                    [lambda o=outg, xs=(qg, kg, vg): torch.autograd.grad(o, xs, g, retain_graph=True)],
                    lambda ms, name=name: rec.add_time("attention", "bwd", name, shape, ms),
                )
                del outg, grads
            fwd_rounds.run()
            bwd_rounds.run()


def _gate_bwd(q, k, v, g, causal, grads):
    def ref_grads(dtype):
        xs = [t[:1, :1].to(dtype).detach().requires_grad_() for t in (q, k, v)]
        out = reference.attention_ref(*xs, window_left=-1, window_right=0 if causal else -1)[0]
        return torch.autograd.grad(out, xs, g[:1, :1].to(dtype))

    return _gate(tuple(t[:1, :1] for t in grads), ref_grads(torch.float64), ref_grads(q.dtype), grad=True)


# ---------------------------------------------------------------------------------------------
# decode and KV append


def _decode_shapes(s: Settings):
    # A full run starts with one sequence early in a chat (128 cached tokens): microseconds of
    # kernel, where the per-call host work (argument checks, backend choice, the op dispatch)
    # decides the ratio to torch.
    short = [] if s.quick else [(1, 32, 8, 128, 128)]
    if s.is_cuda:
        return (
            short
            + [(64, 32, 8, S, 128) for S in ([4096] if s.quick else [1024, 4096, 16384])]
            + ([] if s.quick else [(8, 32, 8, 65536, 128)])
        )
    return short + [(4, 32, 8, S, 128) for S in ([2048] if s.quick else [1024, 4096, 8192])]


def _bandwidth_rows(nbytes: int, bw: float) -> list:
    """The derived rows of a memory-bound op that moves `nbytes` per call: GB/s and the share of the
    same-run copy bandwidth `bw`."""
    return [
        ("gbps", "GB/s", lambda t: nbytes / (t * 1e-3) / 1e9),
        ("pct_copy", "% of copy BW", lambda t: 100 * nbytes / (t * 1e-3) / 1e9 / bw),
    ]


def suite_decode(rec: Recorder, s: Settings, progress):
    from seqkernels.ops import kv_cache as kv_ops

    bw = rec.meta["copy_gbps"]
    for B, Hq, Hkv, S, D in _decode_shapes(s):
        shape = f"B{B} Hq{Hq} Hkv{Hkv} S{S} D{D}"
        kc = torch.randn(B, Hkv, S, D, device=s.device, dtype=s.dtype)
        vc = torch.randn_like(kc)
        q = torch.randn(B, Hq, 1, D, device=s.device, dtype=s.dtype)
        lens = torch.full((B,), S, dtype=torch.int32, device=s.device)
        nbytes = 2 * kc.numel() * kc.element_size() + 2 * q.numel() * q.element_size()
        ref64 = reference.decode_attention_ref(q[:1].double(), kc[:1].double(), vc[:1].double(), lens[:1])[0]
        base = reference.decode_attention_ref(q[:1], kc[:1], vc[:1], lens[:1])[0]
        call = kv_ops.prepare_decode(q, kc, vc, lens)
        provs = {
            f"seqkernels_{b}": (lambda b_: lambda: seqkernels.decode_attention(q, kc, vc, lens, backend=b_))(b)
            for b in _seqkernels_backends(s, kv_ops.DECODE_OP, call)
        }
        if not s.backend:
            provs["torch_sdpa_slice"] = lambda: F.scaled_dot_product_attention(
                q, kc[:, :, :S], vc[:, :, :S], enable_gqa=True
            )
        rounds = Rounds(s)
        for name, fn in provs.items():
            progress(f"decode {name} {shape}")
            out = fn()
            bad = _gate(out[:1], ref64, base)
            if bad:
                rec.add_failure("decode", "decode", name, shape, bad)
                continue
            rounds.add(
                [fn],
                lambda ms, name=name, nbytes=nbytes: rec.add_time(
                    "decode",
                    "decode",
                    name,
                    shape,
                    ms,
                    per=_bandwidth_rows(nbytes, bw),
                ),
            )
        rounds.run()


def suite_kv_append(rec: Recorder, s: Settings, progress):
    from seqkernels.ops import kv_cache as kv_ops

    bw = rec.meta["copy_gbps"]
    shapes = (
        [(64, 8, 4096, 1, 128), (8, 8, 4096, 512, 128)]
        if s.is_cuda
        else [(16, 8, 2048, 1, 128), (4, 8, 2048, 256, 128)]
    )
    if s.quick:
        shapes = shapes[1:]
    for B, H, S, T, D in shapes:
        shape = f"B{B} H{H} S{S} T{T} D{D}"
        kc = torch.randn(B, H, S, D, device=s.device, dtype=s.dtype)
        vc = torch.randn_like(kc)
        kn = torch.randn(B, H, T, D, device=s.device, dtype=s.dtype)
        vn = torch.randn_like(kn)
        lens = torch.full((B,), S // 2, dtype=torch.int32, device=s.device)
        nbytes = 4 * kn.numel() * kn.element_size()  # read k_new, v_new; write the same into the caches
        call = kv_ops.prepare_append(kc, vc, kn, vn, lens)
        p0 = S // 2

        def torch_slice():
            kc[:, :, p0 : p0 + T] = kn
            vc[:, :, p0 : p0 + T] = vn

        provs = {
            f"seqkernels_{b}": (
                lambda b_: lambda: seqkernels.kv_cache_append(kc, vc, kn, vn, lens, check=False, backend=b_)
            )(b)
            for b in _seqkernels_backends(s, kv_ops.APPEND_OP, call)
        }
        if not s.backend:
            provs["torch_slice_copy"] = torch_slice
        rounds = Rounds(s)
        for name, fn in provs.items():
            progress(f"kv_append {name} {shape}")
            kc.uniform_()
            vc.uniform_()
            fn()
            if not (torch.equal(kc[:, :, p0 : p0 + T], kn) and torch.equal(vc[:, :, p0 : p0 + T], vn)):
                rec.add_failure("kv_append", "append", name, shape, "parity FAILED: appended tokens differ")
                continue
            rounds.add(
                [fn],
                lambda ms, name=name, nbytes=nbytes: rec.add_time(
                    "kv_append",
                    "append",
                    name,
                    shape,
                    ms,
                    per=_bandwidth_rows(nbytes, bw),
                ),
            )
        rounds.run()


# ---------------------------------------------------------------------------------------------
# LSTM


def suite_lstm(rec: Recorder, s: Settings, progress):
    from seqkernels.nn.lstm import LSTM as SkLSTM
    from seqkernels.ops import lstm as lstm_ops

    dtype = s.dtype
    cells = [(32, 512), (64, 1024)] if s.quick else [(32, 512), (64, 512), (32, 1024), (64, 1024)]
    for B, H in cells:
        shape = f"B{B} H{H}"
        torch_cell = torch.nn.LSTMCell(H, H, device=s.device, dtype=dtype)
        x, h, c = (torch.randn(B, H, device=s.device, dtype=dtype) for _ in range(3))
        args = (x, h, c, torch_cell.weight_ih, torch_cell.weight_hh, torch_cell.bias_ih, torch_cell.bias_hh)
        call = lstm_ops.prepare_lstm_cell(*args)
        with torch.no_grad():
            ref = reference.lstm_cell_ref(*(a.double() for a in args))
            base = reference.lstm_cell_ref(*args)
            provs = {
                f"seqkernels_{b}": (lambda b_: lambda: seqkernels.lstm_cell(*args, backend=b_))(b)
                for b in _seqkernels_backends(s, lstm_ops.OP, call)
            }
            if not s.backend:
                provs["torch_LSTMCell"] = lambda: torch_cell(x, (h, c))
            rounds = Rounds(s)
            for name, fn in provs.items():
                progress(f"lstm cell {name} {shape}")
                bad = _gate(tuple(fn()), ref, base)
                if bad:
                    rec.add_failure("lstm", "cell_step", name, shape, bad)
                    continue
                rounds.add([fn], lambda ms, name=name: rec.add_time("lstm", "cell_step", name, shape, ms))
            rounds.run()
    layers, H, L, B = 2, 256, 128, 32
    shape = f"layers{layers} H{H} L{L} B{B}"
    tl = torch.nn.LSTM(H, H, num_layers=layers, device=s.device, dtype=dtype)
    x = torch.randn(L, B, H, device=s.device, dtype=dtype)
    with torch.no_grad():
        ref = tl.double()(x.double())[0]
        tl.to(dtype)
        base = tl(x)[0]
        provs = {}
        for b in (("cuda", "triton") if s.is_cuda else ("cpu",)) if not s.backend else (s.backend,):
            try:
                m = SkLSTM(H, H, num_layers=layers, device=s.device, dtype=dtype, backend=b)
                m.load_state_dict(tl.state_dict())
                m(x[:2])
                provs[f"seqkernels_{b}"] = (lambda m_: lambda: m_(x)[0])(m)
            except backends.BackendError:
                continue
        if not s.backend:
            provs["torch_LSTM"] = lambda: tl(x)[0]
        rounds = Rounds(s)
        for name, fn in provs.items():
            progress(f"lstm sequence {name}")
            bad = _gate(fn(), ref, base)
            if bad:
                rec.add_failure("lstm", "sequence", name, shape, bad)
                continue
            rounds.add(
                [fn],
                lambda ms, name=name: rec.add_time(
                    "lstm", "sequence", name, shape, ms, per=[("ms_per_step", "ms/step", lambda t: t / L)]
                ),
            )
        rounds.run()


# ---------------------------------------------------------------------------------------------
# RNN vs attention


class _AttentionLayer(torch.nn.Module):
    """One self-attention layer of width d: fused QKV projection, seqkernels.attention, output projection."""

    def __init__(self, d, heads, device, dtype, causal=False):
        super().__init__()
        self.h, self.causal = heads, causal
        self.qkv = torch.nn.Linear(d, 3 * d, device=device, dtype=dtype)
        self.out = torch.nn.Linear(d, d, device=device, dtype=dtype)

    def forward(self, x):  # (B, L, d)
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        return self.out(seqkernels.attention(q, k, v, causal=self.causal).transpose(1, 2).reshape(B, L, d))


def suite_rnn_vs_attention(rec: Recorder, s: Settings, progress):
    d, heads = 512, 8
    B = 32 if s.is_cuda else (4 if s.quick else 8)
    dtype = s.dtype
    lens = [16, 64, 256, 1024] if (s.quick and not s.is_cuda) else [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    lstm = torch.nn.LSTM(d, d, device=s.device, dtype=dtype)
    att = _AttentionLayer(d, heads, s.device, dtype)
    enc = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, device=s.device, dtype=dtype),
        num_layers=6,
        enable_nested_tensor=False,
    ).eval()
    models = {
        "lstm_1layer": lambda x: lstm(x.transpose(0, 1)),
        "attention_layer": att,
        "transformer_encoder_6layer": enc,
    }
    if s.quick and not s.is_cuda:
        lens_enc = [l_ for l_ in lens if l_ <= 256]
    else:
        lens_enc = lens
    with torch.no_grad():
        for L in lens:
            shape = f"B{B} d{d} L{L}"
            x = torch.randn(B, L, d, device=s.device, dtype=dtype)
            for name, m in models.items():
                if name == "transformer_encoder_6layer" and L not in lens_enc:
                    continue
                progress(f"rnn_vs_attention {name} L={L}")
                if s.is_cuda:
                    torch.cuda.reset_peak_memory_stats()
                    base_mem = torch.cuda.memory_allocated()
                ms = measure([lambda: m(x)], s, min_time=0.1 if s.quick else 0.5, max_reps=5 if s.quick else 20)
                rec.add_time(
                    "rnn_vs_attention",
                    "sequence",
                    name,
                    shape,
                    ms,
                    per=[("us_per_token", "us/token", lambda t: t * 1e3 / (B * L))],
                )
                if s.is_cuda:
                    rec.add(
                        "rnn_vs_attention",
                        "sequence",
                        name,
                        shape,
                        "peak_mem",
                        "MiB",
                        *[(torch.cuda.max_memory_allocated() - base_mem) / 2**20] * 3,
                    )
        _generation_latency(rec, s, d, heads, dtype, progress)
    _crossovers(rec, s, B, d, lens)


def _generation_latency(rec, s, d, heads, dtype, progress):
    """Per-token latency at batch 1: an LSTM step vs cached decode attention vs a full recompute."""
    contexts = [16, 128, 1024] if (s.quick and not s.is_cuda) else [16, 64, 256, 1024, 4096]
    cell = torch.nn.LSTMCell(d, d, device=s.device, dtype=dtype)
    att = _AttentionLayer(d, heads, s.device, dtype, causal=True)
    Dh = d // heads
    x1 = torch.randn(1, d, device=s.device, dtype=dtype)
    h, c = torch.randn(1, d, device=s.device, dtype=dtype), torch.randn(1, d, device=s.device, dtype=dtype)
    for n in contexts:
        shape = f"B1 d{d} context{n}"
        progress(f"generation latency context={n}")
        rec.add_time("rnn_vs_attention", "generate_token", "lstm_step", shape, measure([lambda: cell(x1, (h, c))], s))
        xs = torch.randn(1, n + 1, d, device=s.device, dtype=dtype)
        rec.add_time(
            "rnn_vs_attention",
            "generate_token",
            "attention_full_recompute",
            shape,
            measure([lambda: att(xs)], s, max_reps=10 if s.quick else 30),
        )
        kc = torch.randn(1, heads, max(contexts) + 1, Dh, device=s.device, dtype=dtype)
        vc = torch.randn_like(kc)
        lens = torch.tensor([n], dtype=torch.int32, device=s.device)
        lens_next = lens + 1

        def cached_step():
            q, k, v = att.qkv(x1).view(1, 3, heads, 1, Dh).unbind(1)
            seqkernels.kv_cache_append(kc, vc, k, v, lens, check=False)
            o = seqkernels.decode_attention(q, kc, vc, lens_next)
            return att.out(o.reshape(1, d))

        rec.add_time("rnn_vs_attention", "generate_token", "attention_kv_cache", shape, measure([cached_step], s))
        lstm_t = rec.value("rnn_vs_attention", "generate_token", "lstm_step", shape)
        full_t = rec.value("rnn_vs_attention", "generate_token", "attention_full_recompute", shape)
        cache_t = rec.value("rnn_vs_attention", "generate_token", "attention_kv_cache", shape)
        line = f"per-token generation at context {n}: LSTM step {lstm_t:.3f} ms, full recompute {full_t:.3f} ms"
        if cache_t:
            line += f", KV-cached decode {cache_t:.3f} ms (cache {full_t / cache_t:.1f}x faster than recompute, {cache_t / lstm_t:.1f}x the LSTM step)"
        rec.meta.setdefault("findings", []).append(line)


def _crossovers(rec: Recorder, s: Settings, B, d, lens):
    notes = []

    def t(op, prov, shape):
        return rec.value("rnn_vs_attention", op, prov, shape)

    for other in ("attention_layer", "transformer_encoder_6layer"):
        faster = [
            L
            for L in lens
            if (a := t("sequence", other, f"B{B} d{d} L{L}"))
            and (r := t("sequence", "lstm_1layer", f"B{B} d{d} L{L}"))
            and a < r
        ]
        slower = [
            L
            for L in lens
            if (a := t("sequence", other, f"B{B} d{d} L{L}"))
            and (r := t("sequence", "lstm_1layer", f"B{B} d{d} L{L}"))
            and a >= r
        ]
        if faster and slower:
            notes.append(f"{other} is faster than the LSTM at L in {faster}, slower at L in {slower}")
        elif faster:
            notes.append(f"{other} is faster than the LSTM at every measured length ({lens[0]}..{lens[-1]})")
        elif slower:
            notes.append(f"{other} is slower than the LSTM at every measured length ({slower[0]}..{slower[-1]})")
    for L in (200, 1000):
        near = min(lens, key=lambda x: abs(x - L))
        a, r = (
            t("sequence", "transformer_encoder_6layer", f"B{B} d{d} L{near}"),
            t("sequence", "lstm_1layer", f"B{B} d{d} L{near}"),
        )
        if a and r:
            notes.append(
                f"at L={near}: LSTM {r:.2f} ms vs 6-layer encoder {a:.2f} ms "
                f"({'encoder' if a < r else 'LSTM'} {max(r / a, a / r):.2f}x faster; the claim: encoder 3.7x at 200, 1.9x at 1000 on a GPU)"
            )
    rec.meta.setdefault("findings", []).extend(notes)


SUITES = {
    "attention": suite_attention,
    "decode": suite_decode,
    "kv_append": suite_kv_append,
    "lstm": suite_lstm,
    "rnn_vs_attention": suite_rnn_vs_attention,
    "context_parallel": suite_context_parallel,
    "varlen": suite_varlen,
}
