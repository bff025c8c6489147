"""`python -m train.run` end to end on a tiny local Llama + tokenizer.json + JSONL data (CPU, seconds)."""
import json
import os

import pytest
import torch

from llama import LlamaForCausalLM, ModelArgs, save_model
from train.dataset_builtin import builtin_dataset
from train.run import TokenizerAdapter, main

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tiny-llama")
    train, _ = builtin_dataset()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["text"] for r in train[:300]], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "chat_template": CHATML}))
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    save_model(LlamaForCausalLM(args), d)
    return d


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train, _ = builtin_dataset()
    p = d / "train.jsonl"
    p.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in train[:60]))
    return p


def _args(model_dir, data, out, *extra):
    return ["--model_name", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "4", "--per_device_train_batch_size", "2", "--lora_r", "4", "--lora_alpha", "8",
            "--learning_rate", "1e-2", "--logging_steps", "2", "--save_steps", "2", "--max_new_tokens", "4",
            "--eval_fraction", "0.1", "--max_seq_length", "64", "--use_4bit", "false", *extra]


def test_end_to_end(tiny_model_dir, jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(_args(tiny_model_dir, jsonl, out, "--lora_target_modules", "all-linear", "--merge"))
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "eval loss: before" in text and "--- sample 1:" in text and "after:" in text
    adapter = out / "qlora-adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA" and os.path.isfile(adapter / "adapter_model.safetensors")
    assert os.path.isfile(out / "loss_curve.png")
    assert os.path.isdir(out / "checkpoint-2") and any(f.startswith("events") for f in os.listdir(out / "runs"))
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["losses"]) == 4
    assert summary["eval_loss_after"] < summary["eval_loss_before"]  # lr 1e-2 on a tiny model: it learns
    merged = out / "qlora-adapter-merged"
    assert os.path.isfile(merged / "config.json") and any(f.endswith(".safetensors") for f in os.listdir(merged))
    from safetensors.torch import load_file
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in sd)


def test_from_adapter_and_eval_only(tiny_model_dir, jsonl, tmp_path, capsys):
    """--from_adapter --eval_only: the saved adapter (its own r and targets) evaluated on the same held-out split
    gives the trained run's eval loss after training; nothing is trained or written. --from_adapter alone continues
    training from the adapter's values."""
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir, jsonl, out, "--lora_target_modules", "q_proj,v_proj", "--lora_r", "2")) == 0
    trained = json.loads((out / "run_summary.json").read_text())["eval_loss_after"]
    capsys.readouterr()
    fresh = tmp_path / "eval"
    assert main(_args(tiny_model_dir, jsonl, fresh, "--from_adapter", str(out / "qlora-adapter"), "--eval_only",
                      "true")) == 0
    text = capsys.readouterr().out
    assert "(r 2, alpha 8" in text and "answer:" in text and "eval only: nothing trained or written" in text
    loss = float(text.split("eval loss: ")[1].split()[0])
    assert abs(loss - trained) < 1e-4, (loss, trained)
    assert not os.path.exists(fresh) or not os.listdir(fresh)
    more = tmp_path / "more"
    assert main(_args(tiny_model_dir, jsonl, more, "--from_adapter", str(out / "qlora-adapter"))) == 0
    summary = json.loads((more / "run_summary.json").read_text())
    assert abs(summary["eval_loss_before"] - trained) < 1e-4           # training started from the adapter
    assert json.loads((more / "qlora-adapter" / "adapter_config.json").read_text())["r"] == 2


def test_from_adapter_bad_input(tiny_model_dir, jsonl, tmp_path, capsys):
    assert main(_args(tiny_model_dir, jsonl, tmp_path / "o", "--from_adapter", str(tmp_path))) != 0
    assert "no adapter_config.json there" in capsys.readouterr().err


def test_bad_inputs_exit_with_clear_errors(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    assert main(_args(tiny_model_dir, bad, tmp_path / "o1")) == 1
    assert "bad.jsonl:2: line does not parse" in capsys.readouterr().out
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"prompt": "a"}\n')
    assert main(_args(tiny_model_dir, nofield, tmp_path / "o2")) == 1
    assert "has no 'text' field" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    assert main(_args(tiny_model_dir, bad, tmp_path / "file" / "out")) == 1
    assert "not writable" in capsys.readouterr().out
    assert main(["--optim", "sgd"]) == 2


def test_tokenizer_adapter_follows_model_convention(tiny_model_dir):
    from llama import load_tokenizer
    a = TokenizerAdapter(load_tokenizer(str(tiny_model_dir)))
    assert not a.model_adds_bos and a.pad_id == a.eos_id == 2
    ids = a.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 1 and ids[-1] != 2 or ids.count(2) == 1  # chat text already ends with EOS: none appended
    assert a.encode("plain text")[-1] == 2                        # plain text gets EOS


def test_fast_path_run(tiny_model_dir, jsonl, tmp_path, capsys):
    """`python -m train.run --fast_path`: the fused modules train the same model (CPU: their torch references),
    save a PEFT adapter and generate; the flags that need the fast path say so."""
    out = tmp_path / "fast"
    rc = main(_args(tiny_model_dir, jsonl, out, "--fast_path", "--lora_target_modules", "all-linear"))
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "fast path (llama/fast_path.py): {'checkpointed_layers': '2 of 2'" in text and "after:" in text
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_loss_after"] < summary["eval_loss_before"]
    assert os.path.isfile(out / "qlora-adapter" / "adapter_model.safetensors")
    assert main(_args(tiny_model_dir, jsonl, tmp_path / "o", "--offload_activations")) == 2
    assert "'offload_activations' needs fast_path" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, jsonl, tmp_path / "o", "--fast_path", "--distributed", "fsdp")) == 2
    assert "'fast_path' and distributed='fsdp'" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, jsonl, tmp_path / "o", "--cuda_graph")) == 2
    assert "'cuda_graph' needs fast_path" in capsys.readouterr().err
    assert main(_args(tiny_model_dir, jsonl, tmp_path / "o", "--fast_path", "--cuda_graph", "--device", "cpu")) == 1
    assert "--cuda_graph: CUDA graphs need one CUDA GPU in one process; this run has device cpu" in \
        capsys.readouterr().out
    rc = main(_args(tiny_model_dir, jsonl, tmp_path / "s", "--fast_path", "--gradient_checkpointing", "false",
                    "--offload_saved_layers", "1", "--max_steps", "1", "--eval_fraction", "0"))
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "'offloaded_saved_layers': '0 of 2'" in text and "--offload_saved_layers needs CUDA: not offloading" in text


def test_speed_hint_names_what_is_off():
    """A single-GPU run without the fused, graphed step is told which flags turn it on; nothing is suggested
    where they cannot apply (CPU, several processes, fp16) or are already on."""
    from train.config import TrainConfig
    from train.run import speed_hint

    cuda = torch.device("cuda")
    hint = speed_hint(TrainConfig(), cuda, distributed=False)
    assert hint is not None and "--fast_path --cuda_graph" in hint
    hint = speed_hint(TrainConfig(fast_path=True), cuda, distributed=False)
    assert "--cuda_graph" in hint and "--fast_path" not in hint
    assert speed_hint(TrainConfig(fast_path=True, cuda_graph=True), cuda, distributed=False) is None
    assert speed_hint(TrainConfig(), torch.device("cpu"), distributed=False) is None
    assert speed_hint(TrainConfig(), cuda, distributed=True) is None
    assert speed_hint(TrainConfig(fp16=True), cuda, distributed=False) is None
    assert speed_hint(TrainConfig(eval_only=True), cuda, distributed=False) is None
