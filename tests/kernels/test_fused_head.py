"""fused_linear_logprobs, the Triton fused lm_head: against the fp32 reference, then compiled for GPUs.

Off GPU every kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1), with the
operands of each tl.dot upcast to fp32 (the interpreter's bf16 dot is wrong, see DESIGN.md).

Tolerances, as in test_linear_logprobs.py. fp32: 1e-5 relative (against each tensor's largest
entry). bf16/fp16: the logits are fp32 sums of products of the input-dtype operands, so values are
no worse than there; EPS * max|z| for log-probs and entropy. The gradient matmuls take dlogits
rounded to the input dtype ("dlogits": stored in it; "atomic": cast for the dot on a GPU), so
gradients get rtol = 2 * EPS * (1 + max|z|) against their scale.

The compile test builds every kernel for sm_90 and sm_80 in a subprocess without the interpreter
(triton.compile with ASTSource, no GPU needed) and reads the cubin with Triton's own cuobjdump.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from fastalign.kernels import fused_head as fh
from fastalign.kernels import fused_head_kernels as fhk
from fastalign.kernels import linear_logprobs_reference
from fastalign.kernels.fused_head import Blocks, FusedHeadOptions, fused_linear_logprobs
from helpers import DEVICE, EPS, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCHEMES = ["dlogits", "atomic"]
# (tokens, hidden, vocabulary): one token; a hidden size no multiple of 16; more than one token
# block; vocabularies no multiple of the 128-wide tile.
SHAPES = [(1, 24, 7), (13, 24, 1037), (20, 40, 300)]


def _inputs(n, h, v, dtype, bias=True, scale=3.0):
    hidden = torch.randn(n, h)
    weight = torch.randn(v, h) * (scale / h**0.5)
    b = torch.randn(v) if bias else None
    labels = torch.randint(0, v, (n,))
    labels[n // 2] = -100
    to = dict(device=DEVICE, dtype=dtype)
    return hidden.to(**to), weight.to(**to), None if b is None else b.to(**to), labels.to(DEVICE)


def _check(hidden, weight, bias, labels, temperature=1.0, entropy=False, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    b, br = (leaves[2], refs[2]) if bias is not None else (None, None)
    kw = dict(temperature=temperature, return_entropy=entropy)
    out = fused_linear_logprobs(leaves[0], leaves[1], labels, b, options=FusedHeadOptions(**options), **kw)
    ref = linear_logprobs_reference(refs[0], refs[1], labels, br, **kw)
    out, ref = (out, ref) if entropy else ((out,), (ref,))

    dtype = hidden.dtype
    with torch.no_grad():
        z = refs[0].float() @ refs[1].float().t() + (0 if br is None else br.float())
        zmax = (z / temperature).abs().max().item()
    for name, o, r in zip(("logprobs", "entropy"), out, ref):
        assert o.dtype == torch.float32 and o.shape == labels.shape
        assert torch.isfinite(o).all(), name
        if dtype == torch.float32:
            assert_close(o, r, 1e-5, name)
        else:
            torch.testing.assert_close(o.detach(), r.detach(), rtol=0, atol=EPS[dtype] * zmax)

    gs = [torch.randn_like(r) for r in ref]
    grads = torch.autograd.grad(sum((o * g).sum() for o, g in zip(out, gs)), leaves)
    grads_ref = torch.autograd.grad(sum((r * g).sum() for r, g in zip(ref, gs)), refs)
    rtol = 1e-5 if dtype == torch.float32 else 2 * EPS[dtype] * (1 + zmax)
    for name, g, gr in zip(("hidden", "weight", "bias"), grads, grads_ref):
        assert g.dtype == dtype and g.shape == gr.shape
        assert_close(g, gr, rtol, f"grad {name}")
    return out, grads


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_matches_reference(scheme, dtype, n, h, v):
    _check(*_inputs(n, h, v, dtype), backward=scheme)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_entropy_temperature_no_bias(scheme, dtype):
    hidden, weight, _, labels = _inputs(11, 24, 1037, dtype, bias=False)
    for temperature in (1.0, 0.6, 2.5):
        _check(hidden, weight, None, labels, temperature=temperature, entropy=True, backward=scheme)


def test_fused_vocabulary_split_and_backward_chunks():
    # Forward: the vocabulary in 1..9 ranges (a combine over splits; 9 tiles of 128 at V=1037).
    # Backward: dlogits chunks of 128 or 256 columns; labels on both sides of tile edges.
    n, v = 10, 1037
    hidden, weight, bias, labels = _inputs(n, 24, v, torch.float32)
    labels[1:7] = torch.tensor([127, 128, 255, 256, 1023, 1036])
    elt = hidden.element_size()
    for split, chunk in ((1, None), (2, 128), (4, 256), (9, 128)):
        opts = dict(split=split) if chunk is None else dict(split=split, chunk_bytes=elt * n * chunk)
        _check(hidden, weight, bias, labels, temperature=0.8, entropy=True, **opts)
    _check(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), labels, entropy=True, split=3,
           chunk_bytes=2 * n * 256)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_all_ignored_gives_zero_and_no_gradient(scheme):
    hidden, weight, bias, labels = _inputs(7, 16, 1037, torch.float32)
    labels[:] = -100
    (out, ent), grads = _check(hidden, weight, bias, labels, entropy=True, backward=scheme, split=2)
    assert (out == 0).all() and (ent == 0).all()
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_extreme_logits(scheme, dtype):
    # hidden and weight scaled so that logits reach about +-1e4.
    hidden, weight, bias, labels = _inputs(9, 16, 1037, dtype, scale=3000.0)
    (out, ent), _ = _check(hidden, weight, bias, labels, entropy=True, backward=scheme, split=3)
    assert torch.isfinite(out).all() and out.abs().max() > 1e3
    assert torch.isfinite(ent).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_frozen_weight_entropy_only_and_leading_dims(scheme):
    opts = FusedHeadOptions(backward=scheme)
    hidden = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(300, 16, device=DEVICE)  # frozen lm_head (LoRA): no weight gradient
    labels = torch.randint(0, 300, (2, 5), device=DEVICE)
    out, ent = fused_linear_logprobs(hidden, weight, labels, return_entropy=True, options=opts)
    ref, ent_ref = linear_logprobs_reference(hidden, weight, labels, return_entropy=True)
    assert out.shape == ent.shape == (2, 5)
    assert_close(out, ref, 1e-5)
    assert_close(ent, ent_ref, 1e-5)
    # Only the entropy feeds the loss: the log-prob's upstream gradient is None.
    (g,) = torch.autograd.grad(ent.sum(), hidden)
    (gr,) = torch.autograd.grad(ent_ref.sum(), hidden)
    assert_close(g, gr, 1e-5)


def test_fused_bad_inputs():
    hidden, weight, bias, labels = _inputs(4, 8, 50, torch.float32)
    bad = labels.clone()
    bad[3] = 50
    with pytest.raises(ValueError, match=r"labels\[3\] = 50 is not a vocabulary id in \[0, 50\)"):
        fused_linear_logprobs(hidden, weight, bad)
    with pytest.raises(ValueError, match=r"must be \[\.\.\., H\] and \[V, H\]"):
        fused_linear_logprobs(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="must match hidden"):
        fused_linear_logprobs(hidden, weight, labels[:2])
    with pytest.raises(TypeError, match="share a dtype"):
        fused_linear_logprobs(hidden.double(), weight, labels)
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        fused_linear_logprobs(hidden.double(), weight.double(), labels)
    with pytest.raises(ValueError, match=r"bias \(49,\) must be \[V\]"):
        fused_linear_logprobs(hidden, weight, labels, bias[:49])
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="backward="):
        fused_linear_logprobs(hidden, weight, labels, options=FusedHeadOptions(backward="nope"))
    with pytest.raises(ValueError, match="power of two"):
        Blocks(n=16, v=96, h=16)
    mismatched = FusedHeadOptions(backward="atomic", blocks=Blocks(16, 128, 32), atomic_blocks=Blocks(16, 128, 16))
    with pytest.raises(ValueError, match="bit for bit"):
        fused_linear_logprobs(hidden, weight, labels, options=mismatched)


@pytest.mark.parametrize("n", [1, 512, 2048, 8192, 16384, 65536])
@pytest.mark.parametrize("v", [32000, 128256, 152064])
def test_forward_grid_fills_a_132_sm_gpu(n, v):
    blocks = fh.GPU_BLOCKS
    split, per = fh.forward_split(n, v, blocks, sms=132)
    assert per % blocks.v == 0 and (split - 1) * per < v <= split * per  # whole tiles, none empty
    programs = -(-n // blocks.n) * split
    # Two programs per SM, unless that would need ranges shorter than MIN_SPLIT_TILES.
    assert programs >= fh.PROGRAMS_PER_SM * 132 or per == fh.MIN_SPLIT_TILES * blocks.v
    if n >= 8192:
        assert programs >= 2 * 132


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90 and sm_80 (no GPU needed).
# ----------------------------------------------------------------------------------------------

BIN = None
try:
    import triton

    BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
except ImportError:  # pragma: no cover
    pass

# A Llama-3-8B head: H = 4096, V = 128256, 8192 tokens; bf16, no bias.
AOT_N, AOT_H, AOT_V = 8192, 4096, 128256


def _aot_launches():
    """``(name, kernel, example args, constexprs, blocks)`` for every launch the wrappers make at
    the AOT shape. Pointer arguments are given as their Triton type; ints and floats by value (an
    int divisible by 16 gets the divisibility hint Triton gives it at launch)."""
    n, h, v = AOT_N, AOT_H, AOT_V
    blocks, ablocks = fh.GPU_BLOCKS, fh.GPU_ATOMIC_BLOCKS
    split, per = fh.forward_split(n, v, blocks, sms=132)
    step = max(1, FusedHeadOptions().chunk_bytes // (2 * n * blocks.v)) * blocks.v
    ptrs = dict(HID="*bf16", W="*bf16", BIAS="*bf16", DZ="*bf16", LABELS="*i64", PART="*fp32", NORM="*fp32",
                ENT="*fp32", G_LOGP="*fp32", G_ENT="*fp32", GRAD_H="*fp32", GRAD_W="*fp32", GRAD_BIAS="*fp32",
                LOGP="*fp32")
    ints = dict(N=n, V=v, H=h, stride_hn=h, stride_wv=h, scale=1.4426950408889634, ignore_index=-100)
    dots = dict(HAS_BIAS=False, UPCAST=False, PRECISION="tf32")

    def tiles(b):
        return dict(BLOCK_N=b.n, BLOCK_V=b.v, BLOCK_H=b.h)

    out = []
    for ent in (True, False):
        out.append((f"fwd_ent{int(ent)}", fhk._fwd_kernel, {**ptrs, **ints, "v_per_split": per},
                    {**dots, "WITH_ENTROPY": ent, **tiles(blocks)}, blocks))
        out.append((f"dlogits_ent{int(ent)}", fhk._dlogits_kernel,
                    {**ptrs, **ints, "V": step, "stride_dz": step, "col0": 0},
                    {**dots, "NEED_BIAS": False, "WITH_ENTROPY": ent, **tiles(blocks)}, blocks))
    out.append(("atomic_ent1", fhk._atomic_bwd_kernel, {**ptrs, **ints},
                {**dots, "NEED_H": True, "NEED_W": True, "NEED_BIAS": False, "WITH_ENTROPY": True, **tiles(ablocks),
                 "BLOCK_HG": ablocks.h_grad or ablocks.h},
                ablocks))
    out.append(("combine_ent1", fhk._combine_kernel, {**ptrs, "N": n, "n_split": split, "ignore_index": -100},
                {"WITH_ENTROPY": True, "BLOCK": 128}, Blocks(n=128, v=128, h=64, num_warps=4, num_stages=1)))
    return out


def _aot_main(archs=(90, 80)):
    """Compile every launch for each arch; print one JSON object of what the cubins hold."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for name, kernel, args, constexprs, blocks in _aot_launches():
                sig, attrs = {}, {}
                for i, arg in enumerate(kernel.arg_names):
                    if arg in constexprs:
                        sig[arg] = "constexpr"
                        continue
                    val = args[arg]
                    if isinstance(val, str):
                        sig[arg] = val
                    else:
                        sig[arg] = "fp32" if isinstance(val, float) else "i32"
                    if isinstance(val, str) or (isinstance(val, int) and val % 16 == 0):
                        attrs[(i,)] = [["tt.divisibility", 16]]
                src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages})
                path = os.path.join(tmp, f"{name}_sm{arch}.cubin")
                with open(path, "wb") as f:
                    f.write(compiled.asm["cubin"])
                sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path],
                                      capture_output=True, text=True, check=True).stdout
                res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path],
                                     capture_output=True, text=True, check=True).stdout
                usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
                report[f"{name}_sm{arch}"] = dict(
                    regs=int(usage[1]), stack=int(usage[2]), local=int(usage[4]), shared=compiled.metadata.shared,
                    hgmma=len(re.findall(r"\bHGMMA\.", sass)), hmma=len(re.findall(r"\bHMMA\.", sass)),
                    ldl_stl=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
                    # Global-to-shared copies of the dot operands (cp.async), all and 128-bit wide.
                    ldgsts=len(re.findall(r"\bLDGSTS\.", sass)), ldgsts128=len(re.findall(r"\bLDGSTS\.\S*128\b", sass)),
                )
    print(json.dumps(report))


def test_fused_kernels_compile_for_sm90_and_sm80():
    """wgmma (HGMMA) on sm_90, mma (HMMA) on sm_80, no spills and no local memory, operands
    copied to shared memory 128 bits at a time, at H=4096, V=128256 in bf16, for the forward,
    its combine and both backward schemes."""
    if BIN is None or not os.path.exists(os.path.join(BIN, "cuobjdump")):
        pytest.skip(f"Triton's bundled cuobjdump not found under {BIN}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path[:0] = [{tests_dir!r}, {os.path.dirname(os.path.abspath(__file__))!r}]; "
            "import test_fused_head as t; t._aot_main()")
    run = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print("\n".join(f"{k}: {v}" for k, v in report.items()))
    for key, r in report.items():
        assert r["stack"] == 0 and r["local"] == 0 and r["ldl_stl"] == 0, f"{key} spills: {r}"
        if key.startswith("combine"):
            continue
        assert r["ldgsts"] > 0 and r["ldgsts128"] == r["ldgsts"], f"{key}: operand loads not all 128-bit: {r}"
        if key.endswith("sm90"):
            assert r["hgmma"] > 0 and r["hmma"] == 0, f"{key}: no wgmma in the SASS: {r}"
        else:
            assert r["hmma"] > 0, f"{key}: no mma in the SASS: {r}"


def test_linear_logprobs_runs_the_fused_path_only_when_asked(monkeypatch):
    from fastalign.kernels import linear_logprobs
    from fastalign.kernels._dispatch import TRITON_INTERPRETER
    from fastalign.kernels.linear_logprobs import head_choice

    hidden, weight, bias, labels = _inputs(13, 24, 1037, torch.float32)
    out = linear_logprobs(hidden, weight, labels, bias, backend="fused")
    assert_close(out, linear_logprobs_reference(hidden, weight, labels, bias), 1e-5, "logprobs")
    device = torch.device(DEVICE)
    assert head_choice(device)[0] == "chunked"  # opt-in until measured on a GPU
    monkeypatch.setenv("FASTALIGN_FUSED_HEAD", "1")
    assert head_choice(device)[0] == ("fused" if device.type == "cuda" or TRITON_INTERPRETER else "chunked")
    assert head_choice(device, "torch")[0] == "chunked"  # an explicit backend wins
