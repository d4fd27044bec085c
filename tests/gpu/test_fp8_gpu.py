"""FP8 projections on a GPU with FP8 matrix units: the real GEMM against the exact emulation."""

import pytest
import torch

from tp_runtime.comm import NoComm
from tp_runtime.config import AttentionConfig
from tp_runtime.fp8 import FP8ColumnLinear, fp8_gemm_supported

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not fp8_gemm_supported(torch.device("cuda")),
    reason="needs a CUDA GPU with FP8 matrix units (sm_89+)",
)


@pytest.mark.parametrize("scaling", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scaled_mm_matches_emulation(scaling, dtype):
    torch.manual_seed(0)
    w, x = torch.randn(4096, 1024, device="cuda").to(dtype), torch.randn(333, 1024, device="cuda").to(dtype)
    gpu = FP8ColumnLinear(1024, 4096, comm=NoComm(), bias=False, dtype=dtype, device="cuda", weight_scaling=scaling)
    gpu.load_weights(w)
    assert gpu.use_fp8_gemm
    emu = FP8ColumnLinear(1024, 4096, comm=NoComm(), bias=False, dtype=dtype, device="cuda", weight_scaling=scaling)
    emu.load_weights(w)
    emu.use_fp8_gemm = False  # the exact emulation, same quantized operands
    got, ref = gpu(x).float(), emu(x).float()
    rel = (got - ref).norm() / ref.norm()
    assert torch.isfinite(got).all()
    assert rel < 1e-2, f"FP8 GEMM vs emulation relative error {rel:.2e}"


@pytest.mark.parametrize("pe,heads,kv", [("rope_gpt_neox", 32, 32), ("rope_gpt_neox", 32, 8), ("alibi", 16, 16)])
def test_attention_fp8_close_to_bf16(pe, heads, kv):
    from tp_runtime.attention import Attention
    from tp_runtime.kv_cache import KVCache
    from tp_runtime.step import Step

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
        layer = Attention(cfg, comm=NoComm(), device=dev, backend="reference")
        layer.load_weights(
            qkv_weight=w_qkv, dense_weight=w_d, qkv_bias=b, dense_bias=torch.zeros(hidden, device=dev, dtype=dt)
        )
        cache = KVCache(config=cfg, head_layout=layer.layout, num_layers=1, max_batch=3, max_seq_len=1024, device=dev)
        outs[q] = layer(x, step, cache).float()
    rel = ((outs["fp8_qdq"] - outs["none"]).norm() / outs["none"].norm()).item()
    cos = torch.nn.functional.cosine_similarity(outs["fp8_qdq"].flatten(), outs["none"].flatten(), dim=0).item()
    print(f"FP8 attention {pe} H={heads} KV={kv}: relative error {rel:.3e}, cosine {cos:.5f}")
    assert rel < 0.08 and cos > 0.995
