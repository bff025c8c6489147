"""The training loop: parity with transformers + peft + torch AdamW + get_scheduler, resume, checkpoints, errors."""
import math
import os

import pytest
import torch

from llama import LlamaForCausalLM, ModelArgs
from lora import LoraConfig, inject_lora
from train import checkpoint as ckpt_mod
from train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from train.config import TrainConfig
from train.data import tokenize_texts
from train.dataset_builtin import builtin_dataset
from train.loop import Trainer, TrainingError

ARGS = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)


def tiny_model(seed=0, dropout=0.0, targets=("q_proj", "v_proj")):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(ModelArgs(**ARGS))
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets)))
    return model


def tiny_data(tok, n=80, max_len=48):
    train, _ = builtin_dataset()
    return tokenize_texts([r["text"] for r in train[:n]], tok, max_seq_length=max_len)


def cfg_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-3, lr_scheduler_type="cosine", warmup_ratio=0.1, max_steps=20, logging_steps=5,
                save_steps=0, report_to="none", optim="adamw_torch", lora_dropout=0.0, seed=7)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------------------
def _reference_losses(model_ours, ds, cfg):
    """transformers LlamaForCausalLM + peft LoRA + torch AdamW + get_scheduler + LengthGroupedSampler,
    accumulation normalised by num_items_in_batch, clip_grad_norm_ -- the tutorial's stack, by hand."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers.trainer_pt_utils import LengthGroupedSampler

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in ARGS.items()}, attention_dropout=0.0,
                                      attn_implementation="eager", bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    base_sd = {k.replace(".base_layer.", "."): v for k, v in model_ours.state_dict().items() if "lora_" not in k}
    missing, unexpected = hf.load_state_dict(base_sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    ours = dict(model_ours.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(ours[n.replace("base_model.model.", "").replace(".default", "")])
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    N = cfg.max_steps
    sched = transformers.get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=math.ceil(N * cfg.warmup_ratio),
                                       num_training_steps=N)
    bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    order = list(LengthGroupedSampler(bs * accum, lengths=ds.lengths,
                                      generator=torch.Generator().manual_seed(cfg.seed)))
    micro = [order[i: i + bs] for i in range(0, len(order), bs)]
    pm.train()
    losses, lrs = [], []
    for step in range(N):
        lrs.append(opt.param_groups[0]["lr"])
        mbs = micro[step * accum: (step + 1) * accum]
        batches = []
        for idx in mbs:
            seqs = [torch.tensor(ds[i]["input_ids"]) for i in idx]
            ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=2)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
            labels = ids.masked_fill(mask == 0, -100)
            batches.append((ids, mask, labels))
        n_items = sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in batches)
        total = 0.0
        for ids, mask, labels in batches:
            out = pm(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items)
            out.loss.backward()
            total += float(out.loss.detach())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    return losses, lrs


@pytest.mark.parametrize("optim", ["adamw_torch", "paged_adamw_32bit"])
def test_parity_with_transformers_peft_reference(tmp_path, byte_tok, optim):
    ds = tiny_data(byte_tok)
    cfg = cfg_for(tmp_path, optim=optim)
    model = tiny_model(seed=1)
    ref_losses, ref_lrs = _reference_losses(model, ds, cfg)
    res = Trainer(model, cfg, ds, pad_id=byte_tok.pad_id).train()
    assert len(res.losses) == 20
    torch.testing.assert_close(torch.tensor(res.losses, dtype=torch.float64),
                               torch.tensor(ref_losses, dtype=torch.float64), rtol=1e-5, atol=0)
    assert res.learning_rates == ref_lrs
    assert res.losses[-1] < res.losses[0]  # it learns


def test_accumulation_normalised_like_transformers(tmp_path, byte_tok):
    """bs 4 x accum 1 and bs 2 x accum 2 see the same examples per step: same loss, same update."""
    ds = tiny_data(byte_tok, n=16)
    r1 = Trainer(m1 := tiny_model(2), cfg_for(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                              max_steps=2), ds, pad_id=2).train()
    r2 = Trainer(m2 := tiny_model(2), cfg_for(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                              max_steps=2), ds, pad_id=2).train()
    torch.testing.assert_close(torch.tensor(r1.losses), torch.tensor(r2.losses), rtol=1e-6, atol=0)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted(tmp_path, byte_tok):
    ds = tiny_data(byte_tok, n=24)  # 6 steps per epoch: the run crosses an epoch boundary
    kw = dict(max_steps=10, save_steps=4, optim="paged_adamw_8bit", lora_dropout=0.1, save_total_limit=5)
    full = Trainer(tiny_model(3, dropout=0.1), cfg_for(tmp_path / "a", **kw), ds, pad_id=2).train()
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "a" / "out"))] == ["checkpoint-4",
                                                                                              "checkpoint-8"]
    torch.manual_seed(123)  # resume must not depend on the RNG state it starts with
    resumed_model = tiny_model(3, dropout=0.1)
    with torch.no_grad():  # scramble the adapter: everything trainable must come from the checkpoint
        for n, p in resumed_model.named_parameters():
            if p.requires_grad:
                p.normal_()
    cp = str(tmp_path / "a" / "out" / "checkpoint-4")
    part = Trainer(resumed_model, cfg_for(tmp_path / "b", **kw), ds, pad_id=2).train(resume_from=cp)
    assert part.losses == full.losses  # bit-identical, including dropout masks and 8-bit optimizer state


def test_ctrl_c_saves_and_resumes(tmp_path, byte_tok):
    ds = tiny_data(byte_tok, n=24)
    kw = dict(max_steps=8, lora_dropout=0.1)
    full = Trainer(tiny_model(4, dropout=0.1), cfg_for(tmp_path / "a", **kw), ds, pad_id=2).train()

    def interrupt(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    t = Trainer(tiny_model(4, dropout=0.1), cfg_for(tmp_path / "b", **kw), ds, pad_id=2, on_step=interrupt)
    res = t.train()
    assert res.interrupted and res.global_step == 5
    assert res.last_checkpoint.endswith("checkpoint-5")
    res2 = Trainer(tiny_model(4, dropout=0.1), cfg_for(tmp_path / "b", **kw), ds, pad_id=2).train(resume_from="latest")
    assert res2.losses == full.losses


def test_failed_save_keeps_previous_checkpoint(tmp_path, byte_tok, monkeypatch):
    ds = tiny_data(byte_tok, n=16)
    cfg = cfg_for(tmp_path, max_steps=6, save_steps=2)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(CheckpointError, match=r"checkpoint-4 failed .*No space left.*checkpoint-2 is intact"):
        Trainer(tiny_model(6), cfg, ds, pad_id=2).train()
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # no partial checkpoint-4, no temporary directory
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    t = Trainer(tiny_model(7), cfg, ds, pad_id=2)
    st = load_checkpoint(str(out / "checkpoint-2"), t.model, t.optimizer, t.scheduler, t.scaler)
    assert st["global_step"] == 2 and len(st["losses"]) == 2
    assert os.path.isfile(out / "checkpoint-2" / "adapter" / "adapter_config.json")


def test_nan_loss_stops_with_checkpoint(tmp_path, byte_tok):
    ds = tiny_data(byte_tok, n=16)
    model = tiny_model(8)

    def poison(step, loss):
        if step == 2:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"loss is nan at step 3 .*saved in .*checkpoint-2"):
        Trainer(model, cfg_for(tmp_path, max_steps=5), ds, pad_id=2, on_step=poison).train()
    assert os.path.isdir(tmp_path / "out" / "checkpoint-2")


def test_unwritable_output_dir(tmp_path, byte_tok):
    (tmp_path / "afile").write_text("x")
    cfg = cfg_for(tmp_path, output_dir=str(tmp_path / "afile" / "out"))
    with pytest.raises(CheckpointError, match="is not writable"):
        Trainer(tiny_model(9), cfg, tiny_data(byte_tok, n=8), pad_id=2).train()


def test_keep_last_n_and_logging(tmp_path, byte_tok):
    ds = tiny_data(byte_tok, n=16)
    res = Trainer(tiny_model(10), cfg_for(tmp_path, max_steps=8, save_steps=1, save_total_limit=2, logging_steps=4),
                  ds, pad_id=2).train()
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "out"))] == ["checkpoint-6", "checkpoint-7"]
    assert [r["step"] for r in res.log_history] == [4, 8]
    rec = res.log_history[0]
    assert set(rec) >= {"loss", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_mb"}
    assert rec["loss"] == pytest.approx(sum(res.losses[:4]) / 4)


def test_deadline_stops_early_and_logs_the_partial_window(tmp_path, byte_tok):
    import time
    res = Trainer(tiny_model(11), cfg_for(tmp_path, max_steps=10, logging_steps=5), tiny_data(byte_tok, n=16),
                  pad_id=2).train(deadline=time.time())
    assert res.stopped_by_deadline and res.global_step == 1 and len(res.losses) == 1
    assert res.log_history[-1]["step"] == 1


# ---------------------------------------------------------------------------------------------------------
def _fast(model, checkpointing=True):
    from llama.fast_path import enable_fast_path

    return enable_fast_path(model, checkpointing=checkpointing)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_fast_path_trains_like_the_plain_path(tmp_path, byte_tok, accumulate):
    """--fast_path: the loop takes the chunked loss's sum (no logits) and normalises it as the plain path
    does (label tokens of the whole accumulated step), so without dropout the losses and the adapter match
    the plain path's to float32 rounding."""
    ds = tiny_data(byte_tok, n=24)
    kw = dict(max_steps=6, gradient_accumulation_steps=accumulate)
    plain_model, fast_model = tiny_model(5), _fast(tiny_model(5))
    plain = Trainer(plain_model, cfg_for(tmp_path / "p", **kw), ds, pad_id=2).train()
    fast = Trainer(fast_model, cfg_for(tmp_path / "f", **kw), ds, pad_id=2).train()
    assert len(fast.losses) == 6
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    for (n, a), (_, b) in zip(plain_model.named_parameters(), fast_model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=n)


def test_fast_path_resume_equals_uninterrupted(tmp_path, byte_tok):
    """The fast path's dropout seeds come from the CPU generator that checkpoints save: a resumed run repeats
    the uninterrupted one's losses bit for bit, masks included."""
    ds = tiny_data(byte_tok, n=24)
    kw = dict(max_steps=6, save_steps=3, lora_dropout=0.1)
    full = Trainer(_fast(tiny_model(3, dropout=0.1)), cfg_for(tmp_path / "a", **kw), ds, pad_id=2).train()
    torch.manual_seed(99)
    cp = str(tmp_path / "a" / "out" / "checkpoint-3")
    part = Trainer(_fast(tiny_model(3, dropout=0.1)), cfg_for(tmp_path / "b", **kw), ds, pad_id=2).train(resume_from=cp)
    assert part.losses == full.losses


def test_cuda_graph_needs_fast_path_bf16_and_one_cuda_device(tmp_path, byte_tok):
    """--cuda_graph: config errors name the fields; on the CPU the Trainer and GraphedStep refuse with the device.
    (The graphed step itself runs in tests/train/test_cuda_graph_cuda.py on a GPU.)"""
    from train.config import ConfigError
    from train.cuda_graph import GraphedStep

    with pytest.raises(ConfigError, match="'cuda_graph' needs fast_path"):
        cfg_for(tmp_path, cuda_graph=True).validate()
    with pytest.raises(ConfigError, match="'cuda_graph' and 'fp16'"):
        cfg_for(tmp_path, cuda_graph=True, fast_path=True, fp16=True).validate()
    ds = tiny_data(byte_tok, n=8)
    model = _fast(tiny_model(1))
    with pytest.raises(ValueError, match="one CUDA device in one process; this run has device cpu"):
        Trainer(model, cfg_for(tmp_path, cuda_graph=True, fast_path=True), ds, pad_id=2)
    with pytest.raises(ValueError, match="one CUDA device"):
        GraphedStep(model, [p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="llama.fast_path"):
        GraphedStep(tiny_model(1), [torch.nn.Parameter(torch.zeros(2))])


def test_graph_padding_adds_only_ignored_positions(tmp_path, byte_tok):
    """--cuda_graph pads micro-batches to a multiple of 64 tokens: the padded batch gives the same summed loss and
    label count (the padding is masked and unlabelled), so the graphed step trains on the same objective."""
    from train.data import collate
    from train.loop import _pad_to_multiple

    ds = tiny_data(byte_tok, n=6)
    b = collate([ds[i] for i in range(3)], 2)
    ids, mask, labels = _pad_to_multiple(b["input_ids"], b["attention_mask"], b["labels"], 64, 2)
    assert ids.shape[1] % 64 == 0 and ids.shape[1] - b["input_ids"].shape[1] < 64
    assert torch.equal(ids[:, :b["input_ids"].shape[1]], b["input_ids"]) and (mask[:, b["input_ids"].shape[1]:] == 0).all()
    model = _fast(tiny_model(2), checkpointing=False).eval()
    with torch.no_grad():
        s0 = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], loss_reduction="sum").loss
        s1 = model(ids, attention_mask=mask, labels=labels, loss_reduction="sum").loss
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-5)
    assert int((labels[:, 1:] != -100).sum()) == int((b["labels"][:, 1:] != -100).sum())
    same = _pad_to_multiple(ids, mask, labels, 64, 2)
    assert same[0] is ids


def test_right_padded_masks():
    from train.loop import _right_padded

    assert _right_padded(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert not _right_padded(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))      # left padding
    assert not _right_padded(torch.tensor([[1, 0, 1, 0]]))                    # a hole
