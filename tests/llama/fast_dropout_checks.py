"""Checks of the fast path's philox-family LoRA dropout in Triton's CPU interpreter (run as a script by
tests/llama/test_fast_dropout.py with TRITON_INTERPRET=1: the variable is read when kernels are decorated).

    TRITON_INTERPRET=1 python tests/llama/fast_dropout_checks.py [name ...]

prints one line per check, "ok <name>" or "FAIL <name>: <why>". The mask is checked bit for bit against an
independent numpy Philox-4x32-10, and every fused kernel against torch math with that same mask.
"""
from __future__ import annotations

import copy
import os
import sys
import traceback

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from llama import fast_path as fp  # noqa: E402


def philox_keep(N: int, K: int, p: float, seed: int) -> torch.Tensor:
    """The philox family's keep mask (N, K), bool, from its definition (see llama/fast_path.py): Q = ceil(K/4);
    counter m*Q + j -> Philox-4x32-10 words (u0..u3) with key (seed_lo, seed_hi); (m, q*Q + j) kept iff
    (u_q >> 1) >= floor(p * 2**31)."""
    Q = (K + 3) // 4
    M = np.uint64(0xFFFFFFFF)
    c0 = (np.arange(N, dtype=np.uint64)[:, None] * np.uint64(Q) + np.arange(Q, dtype=np.uint64)[None, :]) & M
    c1, c2, c3 = np.zeros_like(c0), np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    mul_a, mul_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p1 = mul_b * c2, mul_a * c0                      # 32 x 32 -> 64-bit products (no overflow)
        c0, c1, c2, c3 = ((p0 >> np.uint64(32)) ^ c1 ^ k0) & M, p0 & M, ((p1 >> np.uint64(32)) ^ c3 ^ k1) & M, p1 & M
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M, (k1 + np.uint64(0xBB67AE85)) & M
    t31 = np.uint64(min(int(p * 2**31), 2**31 - 1))
    keep = np.concatenate([(u >> np.uint64(1)) >= t31 for u in (c0, c1, c2, c3)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(keep[:, :K]))


def close(got, want, rtol, atol, what):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs() - (atol + rtol * want.abs())
    assert err.max().item() <= 0, f"{what}: max excess {err.max().item():.3g} (max |want| {want.abs().max():.3g})"


# ------------------------------------------------------------------------------------------------ checks
def check_mask_matches_numpy_philox():
    for N, K, p, seed in ((33, 37, 0.3, 424242), (5, 4096, 0.1, 7), (3, 11008, 0.1, 2**31 - 2), (17, 6, 0.5, 0)):
        x = torch.rand(N, K) + 1.0                            # no zeros: y != 0 is the keep mask
        y = fp._dropout_triton(x, p, seed)
        assert torch.equal(y != 0, philox_keep(N, K, p, seed)), f"mask differs from numpy Philox at {(N, K, p)}"
        k = y != 0
        assert torch.equal(y[k], x[k] * (1 / (1 - p))), "kept values are not x * 1/(1-p)"


def check_keep_rate_and_independence():
    N, K = 200, 1000                                          # 200k elements
    for p in (0.1, 0.5):
        keep = fp._dropout_triton(torch.ones(N, K), p, 99) != 0
        frac = keep.float().mean().item()
        sigma = (p * (1 - p) / keep.numel()) ** 0.5
        assert abs(frac - (1 - p)) < 5 * sigma, f"p={p}: keep rate {frac}, want {1 - p} +- {5 * sigma:.2g}"
        Q = K // 4
        quarters = [keep[:, q * Q:(q + 1) * Q].float() for q in range(4)]
        for q in range(4):                                    # each quarter (one Philox output word) on its own
            fq = quarters[q].mean().item()
            assert abs(fq - (1 - p)) < 5 * (p * (1 - p) / quarters[q].numel()) ** 0.5, f"quarter {q}: {fq}"
        for a in range(4):                                    # words of one call and neighbours uncorrelated
            for b in range(a + 1, 4):
                c = torch.corrcoef(torch.stack([quarters[a].flatten(), quarters[b].flatten()]))[0, 1].item()
                assert abs(c) < 0.02, f"quarters {a},{b} correlated: {c}"
        c = torch.corrcoef(torch.stack([keep[:, :-1].float().flatten(), keep[:, 1:].float().flatten()]))[0, 1]
        assert abs(c.item()) < 0.02, f"neighbouring columns correlated: {c.item()}"


def check_seed_determinism():
    x = torch.randn(64, 96)
    a, b, c = fp._dropout_triton(x, 0.2, 5), fp._dropout_triton(x, 0.2, 5), fp._dropout_triton(x, 0.2, 6)
    assert torch.equal(a, b), "same seed, different output"
    assert not torch.equal(a != 0, c != 0), "different seeds, same mask"
    acc = torch.randn(64, 96)
    acc0 = acc.clone()
    fp._dropout_triton(x, 0.2, 5, out=acc)
    close(acc, acc0 + a, 0, 1e-6, "accumulate form")


def check_fused_kernels_match_torch():
    """xa, dA and dx of the fused kernels and of the split path (elementwise dropout + matmul) vs torch math with
    the numpy Philox mask; row0 > 0: the input is a row chunk starting at row row0 of the masked tensor."""
    torch.manual_seed(0)
    p, seed = 0.25, 31337
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for N, K, R, row0 in ((33, 37, 4, 0), (70, 300, 64, 0), (16, 64, 16, 0), (20, 37, 5, 13)):
            x = torch.randn(N, K).to(dtype)
            A = (torch.randn(R, K) / K ** 0.5).to(dtype)
            d = torch.randn(N, R).to(dtype)
            dx0 = torch.randn(N, K).to(dtype)
            keep = philox_keep(row0 + N, K, p, seed)[row0:].float()
            xd = (x.float() * keep * (1 / (1 - p))).to(dtype).float()
            want_xa = xd @ A.float().t()
            want_da = d.float().t() @ xd
            want_dx = dx0.float() + (d.float() @ A.float()) * keep * (1 / (1 - p))
            for path in ("fused", "split"):
                fp._FORCE_PATH = path
                what = f"{path} {dtype} N={N} K={K} r={R} row0={row0}"
                close(fp._lora_xa(x, A, p, seed, "philox", row0), want_xa, tol, tol * want_xa.abs().max(),
                      f"xa {what}")
                close(fp._lora_da(d, x, p, seed, "philox", row0), want_da, tol, tol * want_da.abs().max(),
                      f"dA {what}")
                close(fp._lora_dx_(dx0.clone(), d, A, p, seed, "philox", row0), want_dx, tol,
                      tol * want_dx.abs().max(), f"dx {what}")
    fp._FORCE_PATH = None


def check_xa_programs_per_sm():
    """_xa_fused's PER_SM (programs per SM to aim for, i.e. its split-K count) changes the grid, not the result."""
    torch.manual_seed(6)
    N, K, R, p, seed = 40, 1024, 16, 0.25, 99
    x, A = torch.randn(N, K), torch.randn(R, K) / K ** 0.5
    keep = philox_keep(N, K, p, seed).float()
    want = (x * keep / (1 - p)) @ A.t()
    real, grids = fp._lora_xa_kernel, []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]
    fp._lora_xa_kernel = Spy()
    try:
        for per_sm in (1, 2, 8):
            got = fp._xa_fused(x, A, p, seed, 0, None, dict(fp._INTERP_CONFIG, PER_SM=per_sm))
            close(got, want, 1e-5, 1e-5 * want.abs().max(), f"xa with PER_SM={per_sm}")
    finally:
        fp._lora_xa_kernel = real
    assert [g[1] for g in grids] == [2, 3, 8], grids      # 3 row blocks of 16 on 4 "SMs" (the CPU's count)


def check_first_use_correctness_check():
    """_fused_ok_names (the first-use check of the fused candidates against the split path) accepts the fused
    configs for every op, with and without keep codes, and rejects a candidate that is wrong: off by a few
    elements, or (xa with codes) writing the wrong codes."""
    for op in ("xa", "da", "dx"):
        for kc in (False, True):
            got = fp._fused_ok_names(op, 37, 5, torch.float32, torch.device("cpu"), ["fused0", "fused1"], kc)
            assert got == ["fused0", "fused1"], f"{op} kc={kc}: {got}"
    real = fp._CANDS["xa"]
    try:
        def wrong_codes(x, A, p, seed, row0, kc):
            out = real["fused0"](x, A, p, seed, row0, kc)
            if kc is not None:
                kc[row0] ^= 1
            return out

        def wrong_rows(*a):
            out = real["fused0"](*a).clone()
            out[:3] += 1.0
            return out
        def broken(*a):
            raise RuntimeError("PassManager::run failed\n(the MLIR dump)")
        fp._CANDS["xa"] = dict(real, bad_codes=wrong_codes, bad_rows=wrong_rows, broken=broken)
        for kc, want in ((False, ["fused0", "bad_codes"]), (True, ["fused0"])):
            why = {}
            got = fp._fused_ok_names("xa", 37, 5, torch.float32, torch.device("cpu"),
                                     ["fused0", "bad_codes", "bad_rows", "broken"], kc, why)
            assert got == want, f"kc={kc}: {got}"
            assert why == dict({"bad_codes": "wrong keep codes"} if kc else {},
                               bad_rows="results off the split path's",
                               broken="RuntimeError: PassManager::run failed"), why
    finally:
        fp._CANDS["xa"] = real


def check_swiglu_down_chunked_same_mask():
    """SwiGLUDownFunction in the philox family with row chunks (recompute mode: xa by chunks, in-place dg/du)
    vs autograd over down(silu(g) * u) + LoRA with the numpy Philox mask of the whole tensor."""
    torch.manual_seed(2)
    N, F_, C, r, s, p, seed = 45, 40, 24, 6, 0.5, 0.3, 55555
    base = nn.Linear(F_, C, bias=False).requires_grad_(False)
    keep = philox_keep(N, F_, p, seed).float()
    old = fp._MLP_CHUNK_ROWS
    fp._MLP_CHUNK_ROWS = 16
    try:
        for recompute in (False, True):
            g, u = torch.randn(N, F_, requires_grad=True), torch.randn(N, F_, requires_grad=True)
            A, B = torch.randn(r, F_, requires_grad=True), torch.randn(C, r, requires_grad=True)
            y = fp.SwiGLUDownFunction.apply(g * 1, u * 1, A, B, base, C, s, p, seed, not recompute, recompute)
            dy = torch.randn(N, C)
            got = torch.autograd.grad(y, (g, u, A, B), dy)
            g2, u2, A2, B2 = (t.detach().clone().requires_grad_() for t in (g, u, A, B))
            h = torch.nn.functional.silu(g2) * u2
            y_ref = base(h) + s * ((h * keep / (1 - p)) @ A2.t()) @ B2.t()
            want = torch.autograd.grad(y_ref, (g2, u2, A2, B2), dy)
            if not recompute:
                close(y, y_ref, 1e-5, 1e-5 * y_ref.abs().max().item(), "y")
            for a, b, what in zip(got, want, ("dg", "du", "dA", "dB")):
                close(a, b, 1e-5, 1e-5 * b.abs().max().item(), f"{what} (recompute={recompute})")
    finally:
        fp._MLP_CHUNK_ROWS = old


def check_lora_function_grads_same_mask():
    """LoRAFunction in the philox family: y, dx, dA, dB equal autograd over the same math with the same mask,
    so forward and backward (and both kernels of the backward) used one mask."""
    torch.manual_seed(1)
    N, fin, fout, r, s, p, seed = 41, 48, 40, 6, 0.5, 0.3, 987654
    base = nn.Linear(fin, fout, bias=True).requires_grad_(False)
    keep = philox_keep(N, fin, p, seed).float()
    for path in ("fused", "split"):
        fp._FORCE_PATH = path
        x = torch.randn(N, fin, requires_grad=True)
        A = torch.randn(r, fin, requires_grad=True)
        B = torch.randn(fout, r, requires_grad=True)
        y = fp.LoRAFunction.apply(x, A, B, base, s, p, seed)
        dy = torch.randn_like(y)
        dx, dA, dB = torch.autograd.grad(y, (x, A, B), dy)
        x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, A, B))
        y_ref = base(x2) + s * ((x2 * keep / (1 - p)) @ A2.t()) @ B2.t()
        dx_r, dA_r, dB_r = torch.autograd.grad(y_ref, (x2, A2, B2), dy)
        for got, want, what in ((y, y_ref, "y"), (dx, dx_r, "dx"), (dA, dA_r, "dA"), (dB, dB_r, "dB")):
            close(got, want, 1e-5, 1e-5 * want.abs().max().item(), f"{what} ({path})")
    fp._FORCE_PATH = None


def expected_codes(keep: torch.Tensor) -> torch.Tensor:
    """Keep codes (N, Q) uint8 of a (N, K) bool keep mask by their definition: bit q of [m, j] = keep[m, q*Q + j]
    (bits whose element is past K are left 0; compare with valid_bits)."""
    N, K = keep.shape
    Q = (K + 3) // 4
    out = torch.zeros(N, Q, dtype=torch.uint8)
    for q in range(4):
        cols = torch.arange(Q) + q * Q
        ok = cols < K
        out[:, ok] |= keep[:, cols[ok]].to(torch.uint8) << q
    return out


def valid_bits(K: int) -> torch.Tensor:
    Q = (K + 3) // 4
    return sum(((torch.arange(Q) + q * Q) < K).to(torch.uint8) << q for q in range(4)).to(torch.uint8)


def check_keep_codes_round_trip():
    """xa with kc_out stores the keep codes of the numpy Philox mask (fused and split paths, row chunks); dA and
    dx with kc_in then equal the Philox-regenerating kernels bit for bit, and read the codes (wrong codes give
    a different result)."""
    torch.manual_seed(3)
    p, seed = 0.25, 4242
    for N, K, R, row0 in ((33, 37, 4, 0), (20, 70, 16, 13)):
        x = torch.randn(N, K)
        A = torch.randn(R, K) / K ** 0.5
        d = torch.randn(N, R)
        dx0 = torch.randn(N, K)
        want = expected_codes(philox_keep(row0 + N, K, p, seed))[row0:]
        for path in ("fused", "split"):
            fp._FORCE_PATH = path
            what = f"{path} N={N} K={K} row0={row0}"
            kc = torch.full((row0 + N, (K + 3) // 4), 0xF0, dtype=torch.uint8)
            xa = fp._lora_xa(x, A, p, seed, "philox", row0, kc_out=kc)
            assert torch.equal(kc[row0:] & valid_bits(K), want), f"keep codes differ from numpy Philox ({what})"
            assert torch.equal(kc[:row0], torch.full_like(kc[:row0], 0xF0)), f"rows before row0 written ({what})"
            assert torch.equal(xa, fp._lora_xa(x, A, p, seed, "philox", row0)), f"xa changed by kc_out ({what})"
            da = fp._lora_da(d, x, p, seed, "philox", row0)
            assert torch.equal(fp._lora_da(d, x, p, seed, "philox", row0, kc_in=kc), da), f"dA from codes ({what})"
            dx = fp._lora_dx_(dx0.clone(), d, A, p, seed, "philox", row0)
            got = fp._lora_dx_(dx0.clone(), d, A, p, seed, "philox", row0, kc_in=kc)
            assert torch.equal(got, dx), f"dx from codes ({what})"
            flipped = kc ^ 1
            assert not torch.equal(fp._lora_da(d, x, p, seed, "philox", row0, kc_in=flipped), da), \
                f"dA ignores kc_in ({what})"
            assert not torch.equal(fp._lora_dx_(dx0.clone(), d, A, p, seed, "philox", row0, kc_in=flipped), dx), \
                f"dx ignores kc_in ({what})"
    fp._FORCE_PATH = None


def check_keep_codes_in_the_nodes():
    """LoRAFunction and SwiGLUDownFunction (row chunks, recompute) with codes=True: the same y and grads, bit for
    bit, as regenerating the mask in backward (codes=False)."""
    torch.manual_seed(4)
    N, fin, fout, r, s, p, seed = 41, 48, 40, 6, 0.5, 0.3, 777
    base = nn.Linear(fin, fout, bias=True).requires_grad_(False)
    x, A, B = torch.randn(N, fin), torch.randn(r, fin), torch.randn(fout, r)
    dy = torch.randn(N, fout)
    for path in ("fused", "split"):
        fp._FORCE_PATH = path
        res = []
        for codes in (False, True):
            xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
            y = fp.LoRAFunction.apply(xs, As, Bs, base, s, p, seed, codes)
            res.append((y,) + torch.autograd.grad(y, (xs, As, Bs), dy))
        for a, b, what in zip(res[0], res[1], ("y", "dx", "dA", "dB")):
            assert torch.equal(a, b), f"LoRAFunction {what} with codes ({path})"
    fp._FORCE_PATH = None
    F_, C = 40, 24
    base = nn.Linear(F_, C, bias=False).requires_grad_(False)
    g, u, A, B = torch.randn(N, F_), torch.randn(N, F_), torch.randn(r, F_), torch.randn(C, r)
    dy = torch.randn(N, C)
    old = fp._MLP_CHUNK_ROWS
    fp._MLP_CHUNK_ROWS = 16
    try:
        for recompute in (False, True):
            res = []
            for codes in (False, True):
                gs, us, As, Bs = (t.clone().requires_grad_() for t in (g, u, A, B))
                y = fp.SwiGLUDownFunction.apply(gs * 1, us * 1, As, Bs, base, C, s, p, seed, not recompute,
                                                recompute, codes)
                res.append(torch.autograd.grad(y, (gs, us, As, Bs), dy))
            for a, b, what in zip(res[0], res[1], ("dg", "du", "dA", "dB")):
                assert torch.equal(a, b), f"SwiGLUDownFunction {what} with codes (recompute={recompute})"
    finally:
        fp._MLP_CHUNK_ROWS = old


def check_model_keep_codes_same_grads():
    """Tiny Llama, dropout 0.3, fast path with and without checkpointing: KEEP_CODES "never", "recompute" and
    "always" give the same loss and LoRA grads bit for bit; the codes are made exactly where the policy says."""
    from llama.fast_path import enable_fast_path
    ids = torch.randint(0, 256, (2, 12))
    made = []
    orig = fp.keep_codes

    def spy(*a, **k):
        made.append(fp._RECOMPUTING[0] > 0)
        return orig(*a, **k)

    fp.keep_codes = spy
    try:
        for ckpt in (False, True):
            out = []
            for mode in ("never", "recompute", "always"):
                fp.KEEP_CODES = mode
                made.clear()
                model = enable_fast_path(_tiny(0.3), checkpointing=ckpt)
                out.append(_loss_grads(model, ids))
                want = {"never": 0, "recompute": 14 if ckpt else 0, "always": 14}[mode]
                assert len(made) == want and all(f == ckpt for f in made), \
                    f"{len(made)} keep-code buffers with {mode} (checkpointing={ckpt}), want {want}"
            for o, mode in zip(out[1:], ("recompute", "always")):
                assert torch.equal(out[0][0], o[0]), f"loss differs with keep codes {mode} (checkpointing={ckpt})"
                for n in out[0][1]:
                    assert torch.equal(out[0][1][n], o[1][n]), f"grad {n} differs with {mode} (ckpt={ckpt})"
    finally:
        fp.keep_codes, fp.KEEP_CODES = orig, "recompute"
    fp.KEEP_CODES = "sometimes"
    try:
        enable_fast_path(_tiny(0.3), checkpointing=False)(ids, labels=ids).loss.backward()
        raise AssertionError("an unknown KEEP_CODES was accepted")
    except ValueError as e:
        assert "KEEP_CODES" in str(e)
    finally:
        fp.KEEP_CODES = "recompute"


def _tiny(dropout, seed=0):
    from llama import LlamaForCausalLM, ModelArgs
    from lora import LoraConfig, inject_lora

    torch.manual_seed(seed)
    model = LlamaForCausalLM(ModelArgs.from_name("tiny"))
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]))
    return model.train()


def _loss_grads(model, ids, seed=5):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}


def check_model_recompute_replays_philox_masks():
    """Tiny Llama, dropout 0.3, philox family: checkpointed (recompute in backward, MLP output skipped, in-place
    SwiGLU backward) and non-checkpointed fast paths give the same loss and LoRA grads (same masks)."""
    from llama.fast_path import enable_fast_path

    base = _tiny(0.3)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    fp._MLP_CHUNK_ROWS = 16                                   # 40 tokens: the MLP tail runs in 3 row chunks
    for path in ("fused",):                                   # (the split path: check_fused_kernels_match_torch)
        fp._FORCE_PATH = path
        a = enable_fast_path(copy.deepcopy(base), checkpointing=False)
        b = enable_fast_path(copy.deepcopy(base), checkpointing=True)
        la, ga = _loss_grads(a, ids)
        lb, gb = _loss_grads(b, ids)
        close(lb, la, 0, 0, f"loss ({path})")
        assert len(ga) == 2 * 7 * 2
        for name in ga:
            close(gb[name], ga[name], 1e-5, 1e-6 * ga[name].abs().max().item(), f"grad {name} ({path})")
    fp._FORCE_PATH = None


def check_model_nf4_inplace_rope_recompute():
    """Tiny Llama with NF4 bases (their forward returns a reshape view of its buffer), dropout 0.3, philox
    family, and the GPU branch of the attention: RoPE in place into the fused LoRA outputs of q and k. The
    checkpointed and non-checkpointed fast paths agree, and the LoRA node's output is not a view (autograd
    forbids in-place writes into views made inside a custom Function)."""
    from kernels import NF4Linear
    from llama.fast_path import enable_fast_path

    base = _tiny(0.3)
    for name, mod in list(base.named_modules()):
        if type(mod).__name__ == "LoRALinear":
            mod.base_layer = NF4Linear.from_linear(mod.base_layer)
    x = torch.randn(6, 64)
    q = base.model.layers[0].self_attn.q_proj
    y = fp.LoRAFunction.apply(x, q.lora_A.weight, q.lora_B.weight, q.base_layer, q.scaling, 0.3, 5)
    assert not y._is_view(), "the fused LoRA output is a view"
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    fp._FORCE_PATH = "fused"
    a = enable_fast_path(copy.deepcopy(base), checkpointing=False)
    b = enable_fast_path(copy.deepcopy(base), checkpointing=True)
    la, ga = _loss_grads(a, ids)
    lb, gb = _loss_grads(b, ids)
    fp._FORCE_PATH = None
    close(lb, la, 0, 0, "loss (nf4, in-place rope)")
    for name in ga:
        close(gb[name], ga[name], 1e-5, 1e-6 * ga[name].abs().max().item(), f"grad {name} (nf4, in-place rope)")


def _node_count(t, name):
    seen, todo, n = set(), [t.grad_fn], 0
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        n += type(f).__name__ == name
        todo.extend(g for g, _ in f.next_functions)
    return n


def check_model_fused_nodes_match_separate():
    """Tiny Llama (NF4 bases, dropout 0.3, the Triton kernels in the interpreter): the fused residual norms
    (kernels.rms_norm.ResidualRMSNormFunction, Triton) and sibling projections (SiblingsFunction) give the loss of
    the separate add / norm / projection nodes bit for bit and the same LoRA grads to fp32 summation order, with
    and without checkpointing; with dropout 0 both agree with the plain model."""
    from kernels import NF4Linear
    from llama.fast_path import enable_fast_path

    for dropout in (0.3, 0.0):
        base = _tiny(dropout, seed=2)
        for name, mod in list(base.named_modules()):
            if type(mod).__name__ == "LoRALinear" and "k_proj" not in name:      # k_proj keeps a dense base
                mod.base_layer = NF4Linear.from_linear(mod.base_layer)
        ids = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(6))
        n = len(base.model.layers)
        for ckpt in (False, True):
            fast = enable_fast_path(copy.deepcopy(base), checkpointing=ckpt)
            if not ckpt:  # the first layer's input needs no gradient (frozen embeddings): its input norm has no node
                loss = fast(ids, labels=ids).loss
                assert _node_count(loss, "ResidualRMSNormFunctionBackward") == 2 * n - 1
                assert _node_count(loss, "SiblingsFunctionBackward") == 2 * n - 1
            lf, gf = _loss_grads(fast, ids)
            fp.FUSE_RESIDUAL_NORMS, fp.GROUP_SIBLINGS = False, False
            try:
                ls, gs = _loss_grads(fast, ids)
            finally:
                fp.FUSE_RESIDUAL_NORMS, fp.GROUP_SIBLINGS = True, True
            close(lf, ls, 0, 0, f"loss (dropout {dropout}, checkpointing {ckpt})")
            assert len(gf) == 2 * 7 * 2
            for name in gf:
                scale = gs[name].abs().max().item()
                assert scale > 0, name
                close(gf[name], gs[name], 1e-5, 1e-6 * scale, f"grad {name} (dropout {dropout}, ckpt {ckpt})")
            if dropout == 0.0:
                lp, gp = _loss_grads(base, ids)
                close(lf, lp, 1e-5, 1e-6, "loss vs plain")
                for name in gp:
                    close(gf[name], gp[name], 1e-4, 1e-5 * gp[name].abs().max().item(), f"grad {name} vs plain")


def check_swiglu_backward_kernel_in_place():
    """kernels.swiglu.swiglu_backward (the MLP tail's backward on CUDA, fast_path._swiglu_grads_) vs the torch
    formula, into new buffers and in place into g and u."""
    from kernels.swiglu import swiglu_backward
    torch.manual_seed(3)
    n = 3000
    dh, g, u = torch.randn(n), torch.randn(n) * 3, torch.randn(n)
    s = torch.sigmoid(g)
    want_g, want_u = dh * u * s * (1 + g * (1 - s)), dh * g * s
    dg, du = swiglu_backward(dh, g, u)
    close(dg, want_g, 1e-5, 1e-6, "dg")
    close(du, want_u, 1e-5, 1e-6, "du")
    g2, u2 = g.clone(), u.clone()
    swiglu_backward(dh, g2, u2, out=(g2, u2))
    assert torch.equal(g2, dg) and torch.equal(u2, du), "in place differs"


def check_model_masks_are_per_linear():
    """Each LoRA linear draws its own seed (peft: one dropout module per target), so q/k/v masks differ."""
    seeds = []
    orig = fp._lora_xa

    def spy(x2, Ac, p, seed, fam, *a, **k):
        seeds.append(seed)
        return orig(x2, Ac, p, seed, fam, *a, **k)

    fp._lora_xa = spy
    try:
        from llama.fast_path import enable_fast_path
        m = enable_fast_path(_tiny(0.3), checkpointing=False)
        m(torch.randint(0, 256, (1, 8)), labels=torch.randint(0, 256, (1, 8)))
    finally:
        fp._lora_xa = orig
    assert len(seeds) == 2 * 7 and len(set(seeds)) == len(seeds), seeds


def check_seed_slots_match_host_seeds():
    """Seeds in device memory (SeedSlots, as a CUDA-graph step uses them). The kernels reading the seed from
    memory give the host seed's mask. A model step under seed_slots (checkpointed layers rewinding to their
    forward's slots) gives the eager step's loss and grads bit for bit from the same CPU generator state, and a
    "replay" (refill(), then a step that draws nothing, as the captured graph runs) gives the next eager step's."""
    from llama.fast_path import SeedSlots, enable_fast_path, seed_slots

    x, d = torch.randn(33, 37), torch.randn(33, 4)
    A = torch.randn(4, 37) / 6
    t = torch.tensor([0, 424242, 0])
    close(fp._dropout_triton(x, 0.3, t[1:2]), fp._dropout_triton(x, 0.3, 424242), 0, 0, "dropout, seed in memory")
    fp._FORCE_PATH = "fused"
    try:
        close(fp._lora_xa(x, A, 0.3, t[1:2], "philox", 3), fp._lora_xa(x, A, 0.3, 424242, "philox", 3), 0, 0,
              "xa, seed in memory")
        close(fp._lora_da(d, x, 0.3, t[1:2], "philox"), fp._lora_da(d, x, 0.3, 424242, "philox"), 0, 0,
              "dA, seed in memory")
        close(fp._lora_dx_(x.clone(), d, A, 0.3, t[1:2], "philox"), fp._lora_dx_(x.clone(), d, A, 0.3, 424242,
                                                                                   "philox"), 0, 0, "dx, seed in memory")
        base = _tiny(0.3)
        ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))

        def step(model):
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids).loss
            loss.backward()
            return loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}

        for ckpt in (1,):                                     # layer 0 recomputed (rewinds), layer 1 not
            m = enable_fast_path(copy.deepcopy(base), checkpointing=ckpt)
            torch.manual_seed(5)
            eager = [step(m), step(m)]
            slots = SeedSlots(torch.device("cpu"), capacity=64)
            torch.manual_seed(5)
            slots.begin_step()
            with seed_slots(slots):
                first = step(m)
            assert slots.used == 2 * 7, f"slots used {slots.used}, want one per LoRA call (14)"
            slots.refill()
            slots.begin_step(capturing=True)
            with seed_slots(slots):
                replay = step(m)
            for (le, ge), (ls, gs), what in ((eager[0], first, "slots"), (eager[1], replay, "refill + replay")):
                close(ls, le, 0, 0, f"loss ({what}, checkpointing={ckpt})")
                for name in ge:
                    close(gs[name], ge[name], 0, 0, f"grad {name} ({what}, checkpointing={ckpt})")
            assert not torch.equal(eager[0][1][next(iter(eager[0][1]))], eager[1][1][next(iter(eager[1][1]))]), \
                "two steps drew the same masks"
    finally:
        fp._FORCE_PATH = None


CHECKS = {n[len("check_"):]: f for n, f in dict(globals()).items() if n.startswith("check_") and callable(f)}


def gpu_preflight() -> bool:
    """On a CUDA GPU (compiled kernels, not the interpreter): the mask equals the numpy Philox, the keep rate is
    1 - p, and xa, dA, dx of the chosen paths match torch with the same mask at Llama-2-7B shapes (bf16, r=64);
    prints the path choices and their timings. `python tests/llama/fast_dropout_checks.py --gpu`."""
    dev, dt, p, seed, ok = torch.device("cuda"), torch.bfloat16, 0.1, 20241127, True
    y = fp._dropout_triton(torch.ones(64, 11008, device=dev, dtype=dt), p, seed)
    same = torch.equal((y != 0).cpu(), philox_keep(64, 11008, p, seed))
    frac = (fp._dropout_triton(torch.ones(8192, 4096, device=dev, dtype=dt), p, 3) != 0).float().mean().item()
    print(f"gpu mask == numpy philox: {same}; keep rate {frac:.5f} (want {1 - p})", flush=True)
    ok &= same and abs(frac - (1 - p)) < 1e-3
    for N, K, row0 in ((8192, 4096, 0), (2048, 11008, 6144)):
        x = torch.randn(N, K, device=dev, dtype=dt)
        A = (torch.randn(64, K, device=dev) / K ** 0.5).to(dt)
        d = torch.randn(N, 64, device=dev, dtype=dt)
        dx0 = torch.randn(N, K, device=dev, dtype=dt)
        xd = fp._dropout_triton(x, p, seed, row0=row0).float()
        keep = (fp._dropout_triton(torch.ones_like(x), p, seed, row0=row0) != 0).float()
        want = {"xa": xd @ A.float().t(), "da": d.float().t() @ xd,
                "dx": dx0.float() + (d.float() @ A.float()) * keep / (1 - p)}
        got = {"xa": fp._lora_xa(x, A, p, seed, "philox", row0), "da": fp._lora_da(d, x, p, seed, "philox", row0),
               "dx": fp._lora_dx_(dx0.clone(), d, A, p, seed, "philox", row0)}
        for k in want:
            rel = ((got[k].float() - want[k]).abs().mean() / want[k].abs().mean()).item()
            print(f"  N={N} K={K} row0={row0} {k}: mean rel err {rel:.2e}", flush=True)
            ok &= rel < 1e-2
    for key, v in fp.lora_kernel_paths().items():
        print(f"  {key}: {v}", flush=True)
    print("gpu preflight", "ok" if ok else "FAILED", flush=True)
    return ok


def main(names):
    fp._PHILOX_ON_CPU = True
    torch.set_num_threads(1)
    for name in names or list(CHECKS):
        try:
            CHECKS[name]()
            print(f"ok {name}", flush=True)
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}".replace("\n", " | ")
            print(f"FAIL {name}: {msg} | {traceback.format_exc()[-1500:]!r}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--gpu"]:
        sys.exit(0 if gpu_preflight() else 1)
    main(sys.argv[1:])
