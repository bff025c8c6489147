"""Diagnostic: is CUDA's approximate reciprocal (rcp.approx.ftz.f32, what --use_fast_math makes of 1.0f/x)
equal to the correctly rounded float32 reciprocal? And does torch's CUDA mean equal the CPU mean?"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rcp_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=1.0)
    r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    tl.store(out_ptr + offs, r, mask=m)


def main():
    torch.manual_seed(0)
    n = 1 << 24
    x = torch.rand(n, device="cuda") * torch.exp2(torch.randint(-60, 60, (n,), device="cuda").float())
    r_approx = torch.empty_like(x)
    _rcp_kernel[(triton.cdiv(n, 1024),)](x, r_approx, n, BLOCK=1024)
    r_exact = (x.double().reciprocal()).float()
    r_torch = 1.0 / x
    print("rcp.approx != correctly rounded:", (r_approx != r_exact).sum().item(), "of", n)
    print("torch 1/x != correctly rounded:", (r_torch != r_exact).sum().item(), "of", n)
    diff = 0
    for k in (65, 264, 4096, 65536, 1 << 20):
        a = torch.rand(k) * 0.1
        d = (a.cuda().mean().cpu() != a.mean()).item()
        d64 = (a.cuda().mean().cpu() != a.double().mean().float()).item()
        print(f"mean of {k}: cuda!=cpu {d}, cuda!=fp64-rounded {d64}")


if __name__ == "__main__":
    main()
