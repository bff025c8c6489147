"""llama: a minimal Llama-architecture model that loads Hugging Face checkpoints, tokenizes, chats and generates.

    from llama import load_model, load_tokenizer, generate
    model = load_model(None)                      # the embedded SmolLM2-135M-Instruct (imported once from its GGUF)
    model = load_model("path/to/Llama-2-7b-hf", quantize="nf4", device="cuda", dtype=torch.bfloat16)
    tok = load_tokenizer(None)
    new_ids = generate(model, [tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)])

Command lines: `python -m llama.generate --prompt "..."`, `python -m llama.quantize --model DIR --out DIR4`.
"""
from nf4.claim import claim_kernels as _claim_kernels

_claim_kernels()    # `kernels` is this project's package, wherever Python starts (nf4/claim.py)
import warnings

# `python -m llama.generate` imports this package, which imports llama.generate for the `generate` function, before
# runpy runs the module as __main__; runpy then warns that the module is already imported. It is harmless here.
warnings.filterwarnings("ignore", message="'llama.generate' found in sys.modules", category=RuntimeWarning)

from .chat import LLAMA2_CHAT_TEMPLATE, llama2_chat_ids, llama2_chat_prompt, render_chat_template
from .checkpoint import CheckpointError, load_model, resolve_model_dir, save_model
from .config import NAMED_SIZES, ModelArgs
from .generate import complete, generate, release_decode_graph, sample_next
from .gguf_import import embedded_model_dir, gguf_to_hf
from .kv_cache import KVCache
from .model import CausalLMOutput, LlamaForCausalLM, RMSNorm
from .tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

Llama = LlamaForCausalLM


__all__ = [
    "ModelArgs", "NAMED_SIZES", "LlamaForCausalLM", "Llama", "CausalLMOutput", "RMSNorm", "KVCache",
    "load_model", "save_model", "resolve_model_dir", "CheckpointError",
    "Tokenizer", "HFTokenizer", "SentencePieceTokenizer", "load_tokenizer",
    "render_chat_template", "llama2_chat_prompt", "llama2_chat_ids", "LLAMA2_CHAT_TEMPLATE",
    "generate", "complete", "sample_next", "release_decode_graph", "embedded_model_dir", "gguf_to_hf",
]
