"""Install the five packages of qlora-from-scratch: nf4, kernels, llama, lora, train."""
from setuptools import setup

setup(
    name="qlora-from-scratch",
    version="0.1.0",
    description="QLoRA fine-tuning for Llama-family models from scratch: NF4, Triton kernels, LoRA, training",
    packages=["nf4", "kernels", "llama", "lora", "train"],
    package_data={"nf4": ["data/*.bin"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "huggingface_hub>=0.23",
        "numpy>=1.24",
        "gguf>=0.10",
        "jinja2>=3.0",
        "pyyaml>=6.0",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7", "bitsandbytes==0.50.2", "transformers>=4.45", "peft>=0.13", "accelerate"],
        "bench": ["bitsandbytes==0.50.2", "transformers>=4.45", "peft>=0.13", "matplotlib"],
        "train": ["tensorboard", "matplotlib", "pyarrow", "pandas"],
    },
)
