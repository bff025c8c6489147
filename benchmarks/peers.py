"""Peer libraries (transformers, peft, bitsandbytes) as this repository's tests and benchmarks import them.

This repository's Triton package is named `kernels` (the layout of shared/DESIGN.md), as is Hugging Face's
hub-kernels distribution, which transformers >= 5.25 installs as a dependency. With that distribution's
metadata present, transformers finds "kernels" importable at a supported version and imports names from it
(transformers/integrations/hub_kernels.py: `from kernels import CUDAProperties, ...`); the import reaches this
repository's kernels/ and fails, and with it every transformers model class; and `from_pretrained` defaults
to `use_kernels=True`, which raises where they are unavailable. `shield_transformers()` tells transformers
that hub kernels are unavailable and disabled (USE_HUB_KERNELS=0; the peers never use them here) before it
first looks.
"""
from __future__ import annotations

import importlib.metadata
import os


def hub_kernels_installed() -> bool:
    """Whether Hugging Face's `kernels` distribution is installed (its metadata, whatever `import kernels` finds)."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def shield_transformers() -> bool:
    """Make transformers' is_kernels_available() false where the hub-kernels distribution is installed; returns
    whether it did. Call before transformers imports its integrations (any model class). USE_HUB_KERNELS=0 is
    set in any case (unless the environment sets it): from_pretrained then does not ask for hub kernels."""
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    if not hub_kernels_installed():
        return False
    try:
        import transformers.utils as tu
        import transformers.utils.import_utils as iu
    except Exception:  # noqa: BLE001 -- transformers absent or broken: nothing to shield
        return False

    def is_kernels_available(*args, **kwargs) -> bool:
        return False

    iu.is_kernels_available = is_kernels_available
    tu.is_kernels_available = is_kernels_available
    return True
