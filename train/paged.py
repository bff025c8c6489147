"""Paged optimizer state: tensors in CUDA managed (unified) memory, through ctypes, no compiled extension.

    buf = paged_zeros((n,), torch.float32, device)   # managed memory on CUDA; a plain tensor on the CPU
    prefetch(buf, device)                              # cudaMemPrefetchAsync to the GPU before the update

Managed memory is allocated with cudaMallocManaged(ptr, nbytes, cudaMemAttachGlobal) from the CUDA runtime
library that torch ships (libcudart from torch/lib or the nvidia-cuda-runtime wheel). The driver migrates its
pages on demand, so under GPU memory pressure the optimizer states spill to host RAM instead of failing with
an out-of-memory error; prefetching before each step brings them back in one bulk transfer (what
bitsandbytes' paged optimizers do). The tensor wraps the pointer through `__cuda_array_interface__`; torch
keeps the owner alive, and the owner frees the memory with cudaFree when the last tensor goes away.
"""
from __future__ import annotations

import ctypes
import glob
import os
from typing import Optional

import torch

PAGE_THRESHOLD = 100_000  # bitsandbytes: states of parameters with >= 1e5 elements are paged

_cudart: Optional[ctypes.CDLL] = None
_cudart_error: Optional[str] = None

cudaMemAttachGlobal = 1
cudaMemAttachHost = 2
cudaMemLocationTypeDevice = 1


def _find_cudart() -> ctypes.CDLL:
    """Load the CUDA runtime that torch ships (or the system one)."""
    global _cudart, _cudart_error
    if _cudart is not None:
        return _cudart
    if _cudart_error is not None:
        raise RuntimeError(_cudart_error)
    candidates: list[str] = []
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    candidates += sorted(glob.glob(os.path.join(torch_lib, "libcudart*.so*")))
    try:  # the nvidia-cuda-runtime wheel torch depends on: nvidia/cuda_runtime/lib (12), nvidia/cu13/lib (13)
        import nvidia

        for base in list(getattr(nvidia, "__path__", [])):
            candidates += sorted(glob.glob(os.path.join(base, "**", "libcudart.so*"), recursive=True))
    except ImportError:
        pass
    candidates += ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]
    errors = []
    for c in candidates:
        try:
            lib = ctypes.CDLL(c)
            lib.cudaMallocManaged.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
            lib.cudaFree.argtypes = [ctypes.c_void_p]
            _cudart = lib
            return lib
        except (OSError, AttributeError) as e:
            errors.append(f"{c}: {e}")
    _cudart_error = "could not load the CUDA runtime (libcudart) for paged optimizer states: " + "; ".join(errors[-3:])
    raise RuntimeError(_cudart_error)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        lib = _find_cudart()
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"{what} failed: CUDA error {rc} ({lib.cudaGetErrorString(rc).decode()})")


def _runtime_version() -> int:
    v = ctypes.c_int(0)
    _find_cudart().cudaRuntimeGetVersion(ctypes.byref(v))
    return v.value


class _ManagedBuffer:
    """Owns one cudaMallocManaged allocation and exposes it through __cuda_array_interface__."""

    _TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1", torch.float16: "<f2", torch.int32: "<i4"}

    def __init__(self, numel: int, dtype: torch.dtype):
        if dtype not in self._TYPESTR:
            raise TypeError(f"paged buffers support {list(self._TYPESTR)}, not {dtype}")
        self.nbytes = max(1, numel * torch.empty((), dtype=dtype).element_size())
        self.ptr = ctypes.c_void_p()
        lib = _find_cudart()
        _check(lib.cudaMallocManaged(ctypes.byref(self.ptr), ctypes.c_size_t(self.nbytes), cudaMemAttachGlobal),
               f"cudaMallocManaged({self.nbytes} bytes)")
        self.__cuda_array_interface__ = {
            "shape": (numel,), "typestr": self._TYPESTR[dtype], "data": (self.ptr.value, False), "version": 3,
            "strides": None, "stream": None}

    def __del__(self):
        if getattr(self, "ptr", None) is not None and self.ptr.value and _cudart is not None:
            _cudart.cudaFree(self.ptr)
            self.ptr = None


def paged_zeros(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros in CUDA managed memory (CUDA device) or an ordinary tensor (any other device)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = 1
    for s in shape:
        numel *= int(s)
    with torch.cuda.device(device):
        owner = _ManagedBuffer(numel, dtype)
        t = torch.as_tensor(owner, device=device)  # keeps `owner` alive as long as t's storage lives
    t = t.view(tuple(shape))
    t.zero_()
    t.is_paged = True  # marker read by PagedAdamW.* and the tests
    return t


def prefetch(t: torch.Tensor, device: torch.device | str | None = None) -> None:
    """Asynchronously migrate a managed tensor's pages to `device` (its own GPU by default) on the current stream."""
    if not getattr(t, "is_paged", False) or t.device.type != "cuda":
        return
    dev = torch.device(device) if device is not None else t.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    lib = _find_cudart()
    stream = ctypes.c_void_p(torch.cuda.current_stream(dev).cuda_stream)
    nbytes = ctypes.c_size_t(t.numel() * t.element_size())
    ptr = ctypes.c_void_p(t.data_ptr())
    if _runtime_version() >= 13000:  # CUDA 13: (ptr, count, cudaMemLocation, flags, stream)
        class _Loc(ctypes.Structure):
            _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]

        rc = lib.cudaMemPrefetchAsync(ptr, nbytes, _Loc(cudaMemLocationTypeDevice, index), ctypes.c_uint(0), stream)
    else:  # CUDA 11/12: (ptr, count, dstDevice, stream)
        rc = lib.cudaMemPrefetchAsync(ptr, nbytes, ctypes.c_int(index), stream)
    _check(rc, "cudaMemPrefetchAsync")
