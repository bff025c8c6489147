"""TrainConfig: tutorial defaults, YAML + flag precedence, --help, clear errors."""
import pytest

from train.config import ConfigError, TrainConfig, parse_args


def test_defaults_are_the_tutorials():
    c = TrainConfig()
    assert (c.lora_r, c.lora_alpha, c.lora_dropout) == (64, 16, 0.1)
    assert c.use_4bit and c.bnb_4bit_compute_dtype == "float16" and c.bnb_4bit_quant_type == "nf4"
    assert not c.use_nested_quant and c.num_train_epochs == 1 and not c.fp16 and not c.bf16
    assert (c.per_device_train_batch_size, c.gradient_accumulation_steps) == (4, 1)
    assert c.gradient_checkpointing and c.max_grad_norm == 0.3
    assert (c.learning_rate, c.weight_decay, c.optim) == (2e-4, 0.001, "paged_adamw_32bit")
    assert (c.lr_scheduler_type, c.max_steps, c.warmup_ratio) == ("constant", -1, 0.03)
    assert c.group_by_length and (c.save_steps, c.logging_steps) == (25, 25)
    assert c.max_seq_length is None and not c.packing and c.dataset_text_field == "text"
    assert c.report_to == "tensorboard"


def test_yaml_then_flags_override(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lora_r: 16\nlearning_rate: 1.0e-3\npacking: true\nmax_seq_length: 128\n")
    c = parse_args(["--config", str(f), "--lora_r", "8", "--fp16", "--max-seq-length", "none"])
    assert c.lora_r == 8 and c.learning_rate == 1e-3 and c.packing and c.fp16 and c.max_seq_length is None
    c = parse_args(["--packing", "false", "--max_steps", "5"])
    assert c.packing is False and c.max_steps == 5


def test_help_lists_every_field_with_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    import dataclasses
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name in out, f.name
    assert "(default: 64)" in out and "LoRA attention dimension" in out


@pytest.mark.parametrize("argv, msg", [
    (["--optim", "sgd"], "'optim' = 'sgd': expected one of paged_adamw_32bit"),
    (["--lora_r", "x"], "'lora_r' got 'x': expected int"),
    (["--lora_r", "0"], "'lora_r' = 0: expected an integer >= 1"),
    (["--lora_dropout", "1.5"], "'lora_dropout' = 1.5"),
    (["--learning_rate", "-1"], "'learning_rate' = -1.0"),
    (["--fp16", "--bf16"], "both true"),
    (["--fp16", "maybe"], None),
    (["--no_such_field", "1"], "unknown argument"),
    (["--max_steps", "0"], "'max_steps' = 0"),
    (["--lr_scheduler_type", "step"], "'lr_scheduler_type'"),
    (["--offload_saved_layers", "-2", "--fast_path", "--gradient_checkpointing", "false"],
     "'offload_saved_layers' = -2: expected an integer >= 0"),
    (["--offload_saved_layers", "4"], "'offload_saved_layers' needs fast_path"),
    (["--offload_saved_layers", "4", "--fast_path"], "needs gradient_checkpointing false"),
])
def test_bad_values_give_clear_errors(argv, msg):
    with pytest.raises((ConfigError, SystemExit)) as e:
        parse_args(argv)
    if msg is not None:
        assert e.type is ConfigError and msg in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lora_rank: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config field\(s\) \['lora_rank'\]"):
        parse_args(["--config", str(f)])
    f.write_text("lora_r: [1, 2]\n")
    with pytest.raises(ConfigError, match="bad.yaml: field 'lora_r'"):
        parse_args(["--config", str(f)])
    with pytest.raises(ConfigError, match="no such file"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
