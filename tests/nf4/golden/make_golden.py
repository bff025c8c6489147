"""Record golden NF4/FP4 vectors from bitsandbytes 0.50.2 on CUDA.

How the committed fixture was made (on the project's lent H100, torch 2.11, CUDA 13):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/bitsandbytes-*.whl
    PYTHONPATH=/tmp/site python3 tests/nf4/golden/make_golden.py tests/nf4/golden/bnb_cuda_golden.safetensors

Every case stores its input (in its own dtype) and what bitsandbytes' CUDA kernels return:
packed codes, absmax (or the double-quantized state: uint8 codes, nested absmax, nested map, offset),
and the dequantized weight in each requested dtype. Case metadata (blocksize, quant type, shape, ...)
goes into the safetensors header as JSON under the key "cases". Tensors are named "<case>/<field>".
"""
import json
import sys

import torch
from safetensors.torch import save_file

import bitsandbytes as bnb
import bitsandbytes.functional as F

NF4_THRESHOLDS_HEX = ("bf591cd9 bf1c5270 beeb8480 beadea76 be703cec be0d38bc bd3a7871 3d22faff "
                      "3df64863 3e5067e0 3e9582d4 3ec753f9 3f006d03 3f248daf 3f5c89d9").split()
FP4_THRESHOLDS = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333]


def f32_from_hex(h):
    return torch.tensor([int(h, 16)], dtype=torch.int64).to(torch.int32).view(torch.float32)[0].item()


def neighbours(values):
    """Each value, and the float32 values one ulp below and above it, with both signs."""
    t = torch.tensor(values, dtype=torch.float32)
    up = torch.nextafter(t, torch.full_like(t, 2.0))
    down = torch.nextafter(t, torch.full_like(t, -2.0))
    out = torch.cat([t, up, down])
    return torch.cat([out, -out])


def special_input():
    """Blocks of 64 with edge values; blocksize 64 puts each group in its own block."""
    nf4_t = [f32_from_hex(h) for h in NF4_THRESHOLDS_HEX]
    nf4_table = F.get_4bit_type("nf4", device="cpu").tolist()
    fp4_table = F.get_4bit_type("fp4", device="cpu").abs().tolist()
    mids = [(a + b) / 2 for a, b in zip(nf4_table[:-1], nf4_table[1:])]
    fp4_sorted = sorted(set(fp4_table))
    fp4_mids = [(a + b) / 2 for a, b in zip(fp4_sorted[:-1], fp4_sorted[1:])]
    groups = []
    for vals in (nf4_t, mids, FP4_THRESHOLDS, fp4_mids):
        v = neighbours(vals)
        for i in range(0, v.numel(), 63):  # each block: 63 probes + 1.0 so absmax == 1
            chunk = v[i:i + 63]
            blk = torch.zeros(64)
            blk[: chunk.numel()] = chunk
            blk[63] = 1.0
            groups.append(blk)
            groups.append(blk * 3.7)  # the same probes through a non-trivial reciprocal
            groups.append(blk * -0.0123)
    tiny = 1e-39  # float32 denormal
    specials = [
        torch.zeros(64),                                        # all-zero block
        torch.full((64,), float("nan")),                        # all-NaN block
        torch.tensor([float("nan"), 1.0, -0.5, 0.25] * 16),     # NaN among finite values
        torch.tensor([float("inf"), 1.0, -0.5, 0.25] * 16),     # +inf
        torch.tensor([float("-inf"), 1.0, -0.5, 0.25] * 16),    # -inf
        torch.full((64,), tiny),                                # only denormals
        torch.tensor([tiny, -tiny, 2e-38, -3e-38] * 16),       # denormals and tiny normals
        torch.tensor([1.0, tiny, -tiny, 0.5] * 16),            # denormals beside normals
        torch.tensor([-0.0] * 63 + [1.0]),                      # negative zeros
        torch.full((64,), 1e-37),                               # tiny absmax
        torch.full((64,), 3e38),                                # huge absmax
        torch.linspace(-1, 1, 64),
    ]
    return torch.cat(groups + specials)


def dq_tie_input():
    """Inputs on the exact midpoints of the signed dynamic 8-bit map (for the binary-search tie rule)."""
    code = F.create_dynamic_map(signed=True)
    mids = (code[:-1] + code[1:]) / 2
    probes = torch.cat([code, mids, torch.nextafter(mids, torch.ones_like(mids)),
                        torch.nextafter(mids, -torch.ones_like(mids))])
    n_blocks = -(-probes.numel() // 255)
    x = torch.zeros(n_blocks * 256)
    for b in range(n_blocks):
        chunk = probes[b * 255:(b + 1) * 255]
        x[b * 256: b * 256 + chunk.numel()] = chunk
        x[b * 256 + 255] = 1.0
    return x


def main(path):
    torch.manual_seed(1234)
    dev = "cuda"
    tensors, cases = {}, {}

    def add_4bit(name, x, blocksize, quant_type, dq, out_dtypes, input_id):
        xg = x.to(dev)
        packed, qs = F.quantize_4bit(xg, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq)
        tensors[f"input/{input_id}"] = x.contiguous()
        tensors[f"{name}/packed"] = packed.cpu()
        meta = dict(kind="4bit", input=input_id, blocksize=blocksize, quant_type=quant_type, double_quant=dq,
                    shape=list(x.shape), dtype=str(x.dtype).replace("torch.", ""), out_dtypes=out_dtypes)
        if dq:
            tensors[f"{name}/absmax_q"] = qs.absmax.cpu()
            tensors[f"{name}/nested_absmax"] = qs.state2.absmax.cpu()
            tensors[f"{name}/nested_code"] = qs.state2.code.cpu()
            tensors[f"{name}/offset"] = qs.offset.reshape(1).cpu()
            # the first-level absmax bitsandbytes restores on dequantize
            tensors[f"{name}/absmax_restored"] = (F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).cpu()
            # the raw first-level absmax, from a non-double-quantized run on the same input
            _, qs_raw = F.quantize_4bit(xg, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
            tensors[f"{name}/absmax"] = qs_raw.absmax.cpu()
        else:
            tensors[f"{name}/absmax"] = qs.absmax.cpu()
        for dt in out_dtypes:
            qs.dtype = getattr(torch, dt)
            tensors[f"{name}/dequant_{dt}"] = F.dequantize_4bit(packed, qs).cpu()
        cases[name] = meta

    # 1. random normal weights of several shapes and dtypes
    # (96, 176) has 264 blocks of 64: two second-level blocks of 256 under double quantization
    shapes = [(96, 176), (64, 64), (33, 47), (1, 1), (3,), (2, 5, 7)]
    for shape in shapes:
        for dt in ("float32", "float16", "bfloat16"):
            if shape == (96, 176) and dt != "bfloat16":
                continue
            x = (torch.randn(shape) * 0.02).to(getattr(torch, dt))
            sname = f"{'x'.join(map(str, shape))}_{dt}"
            for qt in ("nf4", "fp4"):
                for dq in (False, True):
                    outs = ["float32", "float16", "bfloat16"] if shape == (64, 64) else [dt]
                    add_4bit(f"randn_{sname}_{qt}_{'dq' if dq else 'nodq'}", x, 64, qt, dq, outs, sname)
    # 2. every blocksize, partial last block, both quant types, DQ on and off
    x = torch.randn(2051) * 3.0
    for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        for qt in ("nf4", "fp4"):
            for dq in (False, True):
                add_4bit(f"blocksize{bs}_{qt}_{'dq' if dq else 'nodq'}", x, bs, qt, dq, ["float32"], "sweep")
    # 3. edge values: thresholds and their neighbours, midpoints, zero/NaN/inf/denormal blocks
    xs = special_input()
    for qt in ("nf4", "fp4"):
        for dq in (False, True):
            add_4bit(f"special_{qt}_{'dq' if dq else 'nodq'}", xs, 64, qt, dq, ["float32"], "special")
    for dt in ("float16", "bfloat16"):
        add_4bit(f"special_nf4_nodq_{dt}", xs.to(getattr(torch, dt)), 64, "nf4", False, [dt], f"special_{dt}")
    # 4. the 8-bit blockwise quantizer that double quantization uses, on exact ties
    x = dq_tie_input()
    code = F.create_dynamic_map(signed=True)
    q, st = F.quantize_blockwise(x.to(dev), code=code.to(dev), blocksize=256)
    tensors["dqtie/input"] = x
    tensors["dqtie/q"] = q.cpu()
    tensors["dqtie/absmax"] = st.absmax.cpu()
    tensors["dqtie/code"] = code
    tensors["dqtie/dequant"] = F.dequantize_blockwise(q, st).cpu()
    cases["dqtie"] = dict(kind="8bit", blocksize=256)

    meta = dict(cases=json.dumps(cases), bitsandbytes=bnb.__version__, torch=torch.__version__,
                gpu=torch.cuda.get_device_name(0))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    print(f"{len(cases)} cases, {len(tensors)} tensors -> {path}")


if __name__ == "__main__":
    main(sys.argv[1])
