"""FP8 projections on a GPU with FP8 matrix units: the real GEMM against the exact emulation."""

import pytest
import torch

from tp_runtime.backends import get_backend, reference
from tp_runtime.config import AttentionConfig
from tp_runtime.distributed.comm import NoComm
from tp_runtime.layers.fp8 import FP8ColumnLinear
from tp_runtime.quant import quantize_e4m3, scale_from_amax

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with FP8 matrix units (sm_89+)",
)
KERNEL_VARIANTS = [(f, {"dtype": d}) for f in ("fp8_amax", "fp8_quantize") for d in ("float16", "bfloat16")]


def _wide_random(n: int, dtype, seed: int) -> torch.Tensor:
    """Values over many binades (e4m3 subnormals, clipping at 448 with a small static scale), signed."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    mag = torch.exp(torch.randn(n, generator=g, device="cuda") * 3)
    return (torch.randn(n, generator=g, device="cuda").sign() * mag).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,offset", [((333, 1024), 0), ((7, 13), 0), ((1000, 4096), 1), ((1,), 0), ((5, 8), 3)])
@pytest.mark.parametrize("static", [False, True])
def test_quantizer_kernel_equals_torch_ops(dtype, shape, offset, static):
    """kernels/fp8_quant.cu against the specification (quant.py), bit for bit: aligned (vector) and
    unaligned (scalar) inputs, odd sizes, dynamic and static scales; output memory poisoned first."""
    from tp_runtime.backends import cuda_fp8

    n = torch.Size(shape).numel()
    x = _wide_random(n + offset, dtype, seed=n + offset)[offset:].view(shape)  # offset: not 16-byte aligned
    s = torch.tensor([0.37], device="cuda") if static else None
    torch.full((4 * n + 4096,), 0x7F, dtype=torch.uint8, device="cuda")  # e4m3 NaN bytes, freed for reuse
    got_q, got_s = cuda_fp8.fp8_quantize(x, s)
    ref_s = s if static else scale_from_amax(x.abs().amax()).reshape(1)
    ref_q = quantize_e4m3(x, ref_s)
    assert torch.equal(got_s, ref_s), (got_s, ref_s)
    assert got_q.shape == x.shape and got_q.dtype == torch.float8_e4m3fn
    bad = (got_q.view(torch.uint8) != ref_q.view(torch.uint8)).sum().item()
    assert bad == 0, f"{bad} of {n} quantized values differ from quantize_e4m3"


@pytest.mark.parametrize("fill", [0.0, float("nan")])
def test_quantizer_kernel_special_inputs(fill):
    """All zeros: scale 1 (as scale_from_amax). A NaN: amax is NaN, so the scale is 1, and the NaN
    stays NaN while every other value quantizes as usual -- the torch ops' behaviour."""
    from tp_runtime.backends import cuda_fp8

    x = (
        _wide_random(4099, torch.bfloat16, seed=7)
        if fill != fill
        else torch.zeros(4099, dtype=torch.bfloat16, device="cuda")
    )
    if fill != fill:
        x[1234] = fill
    got_q, got_s = cuda_fp8.fp8_quantize(x)
    ref_s = scale_from_amax(x.abs().amax()).reshape(1)
    assert torch.equal(got_s, ref_s) and ref_s.item() == 1.0
    torch.testing.assert_close(got_q.float(), quantize_e4m3(x, ref_s).float(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("scaling", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scaled_mm_matches_emulation(scaling, dtype):
    torch.manual_seed(0)
    w, x = torch.randn(4096, 1024, device="cuda").to(dtype), torch.randn(333, 1024, device="cuda").to(dtype)
    kw = dict(comm=NoComm(), bias=False, dtype=dtype, device="cuda", weight_scaling=scaling)
    gpu = FP8ColumnLinear(1024, 4096, **kw)
    gpu.load_weights(w)
    assert gpu.backend is get_backend("cuda", "cuda", dtype) and gpu.backend.fp8_units
    emu = FP8ColumnLinear(1024, 4096, **kw, backend=reference.BACKEND)  # the exact emulation
    emu.load_weights(w)  # the same quantized operands: the quantizers agree bit for bit
    got, ref = gpu(x).float(), emu(x).float()
    rel = (got - ref).norm() / ref.norm()
    assert torch.isfinite(got).all()
    assert rel < 1e-2, f"FP8 GEMM vs emulation relative error {rel:.2e}"


@pytest.mark.parametrize("pe,heads,kv", [("rope_gpt_neox", 32, 32), ("rope_gpt_neox", 32, 8), ("alibi", 16, 16)])
def test_attention_fp8_close_to_bf16(pe, heads, kv):
    from tp_runtime.batch.kv_cache import KVCache
    from tp_runtime.batch.step import Step
    from tp_runtime.layers.attention import Attention

    torch.manual_seed(1)
    hidden, dt, dev = heads * 128, torch.bfloat16, "cuda"
    base = dict(hidden_size=hidden, num_heads=heads, num_kv_heads=kv, position_embedding=pe, dtype=dt)
    cfgs = {q: AttentionConfig(**base, quant_mode=q) for q in ("none", "fp8_qdq")}
    w_qkv = torch.randn(cfgs["none"].qkv_size, hidden, device=dev).to(dt) / hidden**0.5
    w_d = torch.randn(hidden, hidden, device=dev).to(dt) / hidden**0.5
    b = torch.randn(cfgs["none"].qkv_size, device=dev).to(dt) * 0.1
    step = Step(new_lens=[257, 64, 1000], device=dev)
    x = torch.randn(step.num_tokens, hidden, device=dev).to(dt)
    outs = {}
    for q, cfg in cfgs.items():
        layer = Attention(cfg, comm=NoComm(), device=dev)
        layer.load_weights(
            qkv_weight=w_qkv, dense_weight=w_d, qkv_bias=b, dense_bias=torch.zeros(hidden, device=dev, dtype=dt)
        )
        cache = KVCache(
            config=cfg, head_layout=layer.head_layout, num_layers=1, max_batch=3, max_seq_len=1024, device=dev
        )
        outs[q] = layer(x, step, cache).float()
    rel = ((outs["fp8_qdq"] - outs["none"]).norm() / outs["none"].norm()).item()
    cos = torch.nn.functional.cosine_similarity(outs["fp8_qdq"].flatten(), outs["none"].flatten(), dim=0).item()
    print(f"FP8 attention {pe} H={heads} KV={kv}: relative error {rel:.3e}, cosine {cos:.5f}")
    assert rel < 0.08 and cos > 0.995
