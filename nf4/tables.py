"""The 4-bit code tables (NF4, FP4) and the decision thresholds bitsandbytes' CUDA quantizer uses.

NF4 ("4-bit NormalFloat", QLoRA paper arXiv 2305.14314, eq. 4) places its 16 levels at averaged
quantiles of N(0, 1), normalized into [-1, 1], with an exact zero:

    q_i = 1/2 * (Phi^-1(i / (2^k + 1)) + Phi^-1((i + 1) / (2^k + 1)))

bitsandbytes builds the asymmetric variant: 8 levels from the quantiles of the positive half
(probabilities linspace(delta, 1/2, 9)), 7 from the negative half (linspace(delta, 1/2, 8)) and one
shared 0, with delta = 1/2 * (1/32 + 1/30) = 0.9677083 taken from the top. `nf4_table_from_quantiles`
rebuilds the table from that recipe; the literal table below is what every kernel uses.

A value x in a block with absolute maximum m is coded as the number of thresholds T_i with
x * (1/m) > T_i. The thresholds are float32 literals in the CUDA kernel (not float32 midpoints of the
table: four of them differ by one ulp), so exact ties round like CUDA, not like a naive bucketize.
"""
import torch

NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# code -> value; codes 8..15 are the negated codes 0..7 (bit 3 is the sign)
FP4_TABLE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)

# float32 bit patterns of the 15 NF4 decision thresholds, ascending
NF4_THRESHOLD_BITS = (
    0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871, 0x3D22FAFF,
    0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF, 0x3F5C89D9,
)

# FP4 quantizes the sign separately (bit 3 = x < 0) and |x| against these float32 literals, ascending;
# FP4_MAGNITUDE_CODES[k] is the 3-bit magnitude code for |x| above k of them.
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_MAGNITUDE_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """The 16 float32 levels of `quant_type` ("nf4" or "fp4"), indexed by code."""
    if quant_type == "nf4":
        return torch.tensor(NF4_TABLE, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        return torch.tensor(FP4_TABLE, dtype=torch.float32, device=device)
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def nf4_thresholds(device=None) -> torch.Tensor:
    """The 15 NF4 decision thresholds as float32, ascending (exact CUDA literals)."""
    bits = torch.tensor(NF4_THRESHOLD_BITS, dtype=torch.int64).to(torch.int32)
    return bits.view(torch.float32).to(device)


def fp4_thresholds(device=None) -> torch.Tensor:
    """The 7 FP4 magnitude thresholds as float32, ascending."""
    return torch.tensor(FP4_THRESHOLDS, dtype=torch.float32, device=device)


def nf4_table_from_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """Rebuild the NF4 table from normal quantiles (QLoRA eq. 4, bitsandbytes' asymmetric recipe).

    p_pos = linspace(offset, 0.5, 9)[:-1]  (float32)  ->  8 levels  Phi^-1(p_pos)
    p_neg = linspace(offset, 0.5, 8)[:-1]  (float32)  ->  7 levels -Phi^-1(p_neg)
    table = sort(levels ++ [0]) / max      (float32)  ->  16 levels in [-1, 1]

    The probabilities are float32 and the normalization is done in float32, as in the paper's code;
    with those two roundings the result equals NF4_TABLE exactly.
    """
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double())
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return values / values.max()
