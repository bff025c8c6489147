"""Record how CUDA's approximate reciprocal (rcp.approx.ftz.f32) differs from the correctly rounded one.

bitsandbytes is compiled with --use_fast_math, so its quantizers compute `1.0f / absmax` with the
hardware's approximate reciprocal (MUFU.RCP), which differs from the correctly rounded float32
reciprocal by one ulp for about 13% of inputs. The result depends only on the 23-bit mantissa (the
exponent just shifts it), so one signed byte per mantissa records the difference in ulps. The CPU
reference (nf4/blockwise.py) adds that delta to torch's correctly rounded reciprocal and so
reproduces the GPU bit for bit. Run on a GPU (Hopper, sm_90):

    python3 tools/make_rcp_table.py nf4/data/rcp_approx_delta.bin

The output is zlib-compressed int8[2**23]; the script also checks exponent independence.
"""
import sys
import zlib

import torch
import triton
import triton.language as tl


@triton.jit
def _rcp_approx_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                  is_pure=True, pack=1)
    tl.store(out_ptr + offs, r, mask=mask)


def rcp_approx(x):
    out = torch.empty_like(x)
    _rcp_approx_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


def delta_ulps(x):
    approx = rcp_approx(x).view(torch.int32).long()
    exact = (1.0 / x.double()).float().view(torch.int32).long()
    return approx - exact


def main(path):
    mantissa = torch.arange(1 << 23, device="cuda", dtype=torch.int32)
    x = (mantissa | (127 << 23)).view(torch.float32)  # [1, 2)
    delta = delta_ulps(x)
    assert delta.abs().max() <= 1, delta.abs().max()
    print("mantissas whose approximate reciprocal is off by one ulp:", (delta != 0).sum().item())
    # the same delta at other exponents, as long as the reciprocal stays a normal float32
    bad = 0
    for e in range(-125, 126, 7):
        xe = (mantissa | ((127 + e) << 23)).view(torch.float32)
        bad += (delta_ulps(xe) != delta).sum().item()
    print("exponent-dependent mismatches:", bad)
    data = zlib.compress(delta.to(torch.int8).cpu().numpy().tobytes(), 9)
    with open(path, "wb") as f:
        f.write(data)
    print(f"wrote {path}: {len(data)} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
