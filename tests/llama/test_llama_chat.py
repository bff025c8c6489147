"""Chat formats: the checkpoint's chat_template rendered like transformers' apply_chat_template, and Llama 2 [INST]
prompts (text form equal to the Llama-2-chat jinja template; ids equal to Meta's reference encoding)."""
import jinja2
import pytest

from llama import LLAMA2_CHAT_TEMPLATE, SentencePieceTokenizer, llama2_chat_ids, llama2_chat_prompt, load_tokenizer
from llama.chat import render_chat_template

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": " What is 2+2? "}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another, in 日本語 🙂"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
]


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_smollm2_chat_template_matches_transformers(smollm_dir, hf_gguf_tokenizer, i, gen):
    tok = load_tokenizer(smollm_dir)
    msgs = CONVERSATIONS[i]
    ours = tok.apply_chat_template(msgs, add_generation_prompt=gen)
    theirs = hf_gguf_tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    assert ours == theirs
    ids = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
    assert ids == hf_gguf_tokenizer(theirs, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_id == 1 and ids.count(tok.eos_id) == len(msgs) + (msgs[0]["role"] != "system")


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_llama2_chat_template_matches_transformers(hf_gguf_tokenizer, i):
    msgs = CONVERSATIONS[i]
    ours = render_chat_template(LLAMA2_CHAT_TEMPLATE, msgs, bos_token="<s>", eos_token="</s>")
    theirs = hf_gguf_tokenizer.apply_chat_template(msgs, chat_template=LLAMA2_CHAT_TEMPLATE, tokenize=False)
    assert ours == theirs.replace(hf_gguf_tokenizer.bos_token, "<s>").replace(hf_gguf_tokenizer.eos_token, "</s>")
    assert llama2_chat_prompt(msgs) == ours


def test_llama2_prompt_text():
    assert llama2_chat_prompt(CONVERSATIONS[1]) == \
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\n What is 2+2? [/INST]"  # strip() after the prefix
    assert llama2_chat_prompt(CONVERSATIONS[2]) == \
        "<s>[INST] Name a color. [/INST] Blue. </s><s>[INST] Another, in 日本語 🙂 [/INST]"


def test_llama2_ids_follow_meta_reference(sp_model_path):
    tok = SentencePieceTokenizer(sp_model_path)
    ids = llama2_chat_ids(tok, CONVERSATIONS[2])
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert ids == ([1] + enc("[INST] Name a color. [/INST] Blue. ") + [2]
                   + [1] + enc("[INST] Another, in 日本語 🙂 [/INST]"))
    # the text form tokenizes to the same ids except for sentencepiece's prefix space after each </s>
    assert ids.count(1) == 2 and ids.count(2) == 1


def test_chat_errors(smollm_dir, sp_model_path):
    with pytest.raises(ValueError, match="roles must alternate"):
        llama2_chat_prompt([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="last message must be from the user"):
        llama2_chat_ids(SentencePieceTokenizer(sp_model_path), CONVERSATIONS[3])
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        render_chat_template(LLAMA2_CHAT_TEMPLATE, [{"role": "assistant", "content": "x"}], bos_token="<s>",
                             eos_token="</s>")
    with pytest.raises(ValueError, match="no chat_template"):
        SentencePieceTokenizer(sp_model_path).apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(TypeError, match="chat messages must be dicts"):
        load_tokenizer(smollm_dir).apply_chat_template(["hello"])
