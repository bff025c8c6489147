"""LoRA over dense or NF4 base linears, PEFT-compatible adapter files, merging into a dense model.

    from lora import LoraConfig, inject_lora, trainable_parameters_report, save_adapter, load_adapter
    model = inject_lora(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM"))
    print(trainable_parameters_report(model))
    ... train ...
    save_adapter(model, "out/adapter")                         # peft.PeftModel.from_pretrained reads it
    merged = merge_and_unload(model)                            # dense base: W += (alpha/r) B A
    save_merged_checkpoint(merged, "out/merged", base_dir="base_model_dir")

Files: config.py (LoraConfig, adapter_config.json), layer.py (LoRALinear), inject.py (targeting, freezing,
parameter counts), adapter_io.py (adapter files), merge.py (merge / unload / dense checkpoint; its command line
is `python -m train.merge`).
"""
from nf4.claim import claim_kernels as _claim_kernels

_claim_kernels()    # `kernels` is this project's package, wherever Python starts (nf4/claim.py)
from .adapter_io import adapter_state_dict, load_adapter, read_adapter_weights, save_adapter
from .config import LoraConfig
from .inject import (count_parameters, disable_adapters, find_target_modules, inject_lora, lora_layers,
                     mark_only_lora_trainable, print_trainable_parameters, trainable_parameters,
                     trainable_parameters_report)
from .layer import LoRALinear, lora_scaling
from .merge import (dequantize_linears, merge_adapter, merge_and_unload, merge_layer, save_merged_checkpoint,
                    unload, unmerge_layer)

__all__ = [
    "LoraConfig", "LoRALinear", "lora_scaling", "inject_lora", "find_target_modules", "lora_layers",
    "mark_only_lora_trainable", "count_parameters", "trainable_parameters", "trainable_parameters_report",
    "print_trainable_parameters", "disable_adapters", "adapter_state_dict", "save_adapter", "load_adapter",
    "read_adapter_weights", "merge_layer", "unmerge_layer", "merge_adapter", "unload", "merge_and_unload",
    "dequantize_linears", "save_merged_checkpoint",
]
