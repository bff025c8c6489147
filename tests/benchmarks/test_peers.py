"""benchmarks/peers.py: transformers does not take this repository's kernels/ for Hugging Face's hub kernels."""
import importlib

from benchmarks.peers import hub_kernels_installed, shield_transformers


def test_transformers_model_classes_import_beside_kernels():
    """tests/conftest.py shields transformers first. Where the hub-kernels distribution is installed (a dependency
    of transformers >= 5.25), transformers reports hub kernels unavailable and its integration module (which
    would import names from kernels/) imports; the repository's kernels/ is what `import kernels` finds."""
    import os

    import kernels
    import transformers.utils as tu

    assert hasattr(kernels, "nf4_matmul"), "import kernels must find this repository's package"
    if hub_kernels_installed():
        assert shield_transformers() is True
        assert tu.is_kernels_available() is False
    else:
        assert shield_transformers() is False
    assert os.environ.get("USE_HUB_KERNELS") is not None        # from_pretrained must not ask for hub kernels
    importlib.import_module("transformers.integrations.hub_kernels")
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert sum(p.numel() for p in model.parameters()) > 0
