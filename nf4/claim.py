"""This project's `kernels` package, claimed under its name before anything else can be.

The five packages (nf4, kernels, llama, lora, train) install side by side. Hugging Face's hub-kernels package,
which transformers >= 5.25 installs, is also named `kernels`. An editable install finds this project's packages
after site-packages, so outside the checkout `import kernels` would give theirs, and `from kernels import
NF4Linear` would fail. llama, lora and train import this module first, and it loads this project's `kernels`
into sys.modules under that name when the normal lookup would find another one. Inside the checkout, and in a
plain install without the other package, the normal lookup already finds ours and nothing is done.
"""
import importlib.util
import os
import sys

OURS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "__init__.py")


def _ours(path) -> bool:
    return bool(path) and os.path.abspath(path) == OURS


def claim_kernels() -> None:
    """Make `import kernels` this project's package (see the module docstring). A `kernels` already imported
    is left alone (whoever imported it holds it), and so is a checkout without a kernels/ beside nf4/."""
    if "kernels" in sys.modules or not os.path.exists(OURS):
        return
    spec = importlib.util.find_spec("kernels")
    if spec is not None and _ours(spec.origin):
        return
    spec = importlib.util.spec_from_file_location("kernels", OURS, submodule_search_locations=[os.path.dirname(OURS)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise
