"""torch_xent.transformers: patched Hugging Face causal LMs against the same models unpatched.

Every model is built from a tiny config with random weights (nothing is downloaded). The unpatched
model (transformers' own head and ForCausalLMLoss, i.e. F.cross_entropy on float32 logits) is the
oracle; options transformers does not have (label smoothing, z_loss) are checked against
F.cross_entropy and the closed form of the z-loss on the unpatched model's logits.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import torch_xent  # noqa: E402
import torch_xent.transformers as txt  # noqa: E402

VOCAB = 320
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)


def _config(family):
    t = transformers
    if family == "llama":
        return t.LlamaConfig(**SMALL, tie_word_embeddings=False)
    if family == "mistral":
        return t.MistralConfig(**SMALL, sliding_window=None, tie_word_embeddings=False)
    if family == "qwen2":
        return t.Qwen2Config(**SMALL, tie_word_embeddings=True)
    if family == "qwen3":
        return t.Qwen3Config(**SMALL, head_dim=8, tie_word_embeddings=False)
    if family == "gemma":
        return t.GemmaConfig(**SMALL, head_dim=8)
    if family == "gemma2":
        # A small cap, so that softcapping changes the logits noticeably.
        return t.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0, sliding_window=8)
    if family == "gpt2":
        return t.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.1,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if family == "gpt_neox":
        return t.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64, initializer_range=0.1,
                               tie_word_embeddings=True, attention_dropout=0.0, hidden_dropout=0.0,
                               bos_token_id=0, eos_token_id=0)
    raise AssertionError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox"]


def make_model(family, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = _config(family)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    assert config.model_type in txt.COVERED
    return model.train()


def make_batch(batch=2, seq=12, seed=1, pad=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, -pad:] = -100  # padding at the end of the first row
    labels[-1, :2] = -100    # a prompt that is not trained on
    return ids, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_grads_close(got, want, dtype):
    assert got.keys() == want.keys()
    for name in want:
        g, w = got[name].double(), want[name].double()
        if dtype == torch.float32:
            tol = 1e-4 * w.abs().max().item() + 1e-8
            assert (g - w).abs().max().item() <= tol, name
        else:
            rel = ((g - w).norm() / w.norm().clamp_min(1e-12)).item()
            assert rel <= 5e-2, (name, rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_matches_unpatched(family, dtype):
    ref = make_model(family, dtype)
    model = txt.apply_torch_xent(copy.deepcopy(ref))
    ids, labels = make_batch()
    want, want_grads = loss_and_grads(ref, input_ids=ids, labels=labels)
    got, got_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert got.logits.shape == (2, 12, 0)  # the fused path ran: no logits were computed
    assert want.logits.shape == (2, 12, VOCAB)
    assert got.loss.dtype == want.loss.dtype == torch.float32
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.loss, want.loss, rtol=rtol, atol=0.0)
    assert_grads_close(got_grads, want_grads, dtype)
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_loss_hook_only_matches_unpatched():
    ref = make_model("llama")
    model = txt.apply_torch_xent(copy.deepcopy(ref), fused_linear=False)
    ids, labels = make_batch()
    want, want_grads = loss_and_grads(ref, input_ids=ids, labels=labels)
    got, got_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0.0)
    assert_grads_close(got_grads, want_grads, torch.float32)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_eval_with_labels_returns_logits(family):
    ref = make_model(family).eval()
    model = txt.apply_torch_xent(copy.deepcopy(ref)).eval()
    ids, labels = make_batch()
    with torch.no_grad():
        want, got = ref(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_accumulation_equals_full_batch(family):
    """Two micro-batches with num_items_in_batch (as Trainer passes it) give the full batch's mean loss
    and gradient, both for the patched model and for transformers' own loss."""
    ref = make_model(family)
    model = txt.apply_torch_xent(copy.deepcopy(ref))
    ids, labels = make_batch(batch=4, seed=3)
    labels[2, 5:] = -100  # micro-batches with different numbers of counted tokens
    full, full_grads = loss_and_grads(ref, input_ids=ids, labels=labels)
    num_items = (labels[:, 1:] != -100).sum()
    for m in (ref, model):
        m.zero_grad(set_to_none=True)
        total = 0.0
        for part in (slice(0, 1), slice(1, 4)):
            out = m(input_ids=ids[part], labels=labels[part], num_items_in_batch=num_items)
            out.loss.backward()
            total += out.loss.item()
        assert total == pytest.approx(full.loss.item(), rel=1e-5)
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        assert_grads_close(grads, full_grads, torch.float32)


def _trainer_run(model, tmp_path):
    pytest.importorskip("accelerate")
    ids, labels = make_batch(batch=8, seed=11)
    labels[3, 4:] = -100
    labels[6, :9] = -100  # micro-batches with different numbers of counted tokens
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    assert trainer.model_accepts_loss_kwargs  # so Trainer passes num_items_in_batch to the model
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_with_gradient_accumulation_matches_unpatched(tmp_path):
    """transformers' Trainer, 2 optimiser steps of 2 accumulated micro-batches each: the logged losses
    and the trained weights of the patched model equal the unpatched model's."""
    ref = make_model("llama")
    model = txt.apply_torch_xent(copy.deepcopy(ref))
    initial = {n: p.detach().clone() for n, p in ref.named_parameters()}
    want_losses, want = _trainer_run(ref, tmp_path / "ref")
    got_losses, got = _trainer_run(model, tmp_path / "patched")
    assert len(got_losses) == len(want_losses) == 2
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    assert (want["lm_head.weight"] - initial["lm_head.weight"]).abs().max().item() > 1e-4  # training moved it
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)


def test_shift_labels_and_int_num_items():
    ref = make_model("qwen3")
    model = txt.apply_torch_xent(copy.deepcopy(ref))
    ids, labels = make_batch(seed=5)
    shifted = torch.roll(labels, -1, dims=1)
    shifted[:, -1] = -100
    want, want_grads = loss_and_grads(ref, input_ids=ids, labels=labels, shift_labels=shifted, num_items_in_batch=7)
    got, got_grads = loss_and_grads(model, input_ids=ids, labels=labels, shift_labels=shifted, num_items_in_batch=7)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0.0)
    assert_grads_close(got_grads, want_grads, torch.float32)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_label_smoothing_and_z_loss(family, fused):
    """Against F.cross_entropy with label_smoothing plus z_loss * mean(lse^2) over the counted tokens,
    on the unpatched model's (softcapped, for Gemma2) logits."""
    ref = make_model(family)
    model = txt.apply_torch_xent(copy.deepcopy(ref), fused_linear=fused, label_smoothing=0.1, z_loss=1e-2)
    ids, labels = make_batch(seed=7)
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    got = model(input_ids=ids, labels=labels).loss
    logits = ref(input_ids=ids).logits.float().reshape(-1, VOCAB)
    target = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    valid = target != -100
    want = (F.cross_entropy(logits, target, label_smoothing=0.1)
            + 1e-2 * (torch.logsumexp(logits[valid], dim=1) ** 2).mean())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
    got.backward()
    want.backward()
    assert_grads_close({n: p.grad for n, p in model.named_parameters()},
                       {n: p.grad for n, p in ref.named_parameters()}, torch.float32)


@pytest.mark.parametrize("family", ["gemma2", "gpt_neox"])
def test_generation_after_patching(family):
    ref = make_model(family).eval()
    model = txt.apply_torch_xent(copy.deepcopy(ref)).eval()
    ids, _ = make_batch(batch=1, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want, got = ref.generate(ids, **kw), model.generate(ids, **kw)
    assert got.shape == (1, 11)
    assert torch.equal(got, want)
    # In training mode without labels the head still returns the logits.
    model.train()
    out = model(input_ids=ids)
    assert out.loss is None and out.logits.shape == (1, 5, VOCAB)


def test_patch_twice_and_remove():
    ref = make_model("llama")
    model = copy.deepcopy(ref)
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    txt.apply_torch_xent(model)
    txt.apply_torch_xent(model, z_loss=1e-3)  # replaces the options, installs nothing twice
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (hooks[0] + 1, hooks[1] + 1)
    assert txt.is_patched(model)
    ids, labels = make_batch()
    with_z = model(input_ids=ids, labels=labels).loss
    txt.apply_torch_xent(model)
    plain = model(input_ids=ids, labels=labels).loss
    assert with_z.item() > plain.item()
    state_keys = set(model.state_dict())
    assert state_keys == set(ref.state_dict())

    txt.remove_torch_xent(model)
    txt.remove_torch_xent(model)  # a no-op the second time
    assert not txt.is_patched(model)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    assert "forward" not in model.lm_head.__dict__ and "_loss_function" not in model.__dict__
    assert model.loss_function is transformers.loss.loss_utils.ForCausalLMLoss
    want, got = ref(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    assert got.logits.shape == (2, 12, VOCAB)
    torch.testing.assert_close(got.loss, want.loss, rtol=0.0, atol=0.0)
    torch.testing.assert_close(plain, want.loss, rtol=1e-5, atol=0.0)


def test_user_loss_function_restored_and_deepcopy():
    model = make_model("llama")

    def custom(logits, labels, vocab_size, **kw):
        return logits.sum() * 0

    model.loss_function = custom
    txt.apply_torch_xent(model)
    twin = copy.deepcopy(model)  # carries its own patch, bound to itself
    assert txt.is_patched(twin) and twin.__dict__["_torch_xent_state"].model is twin
    ids, labels = make_batch()
    a, b = model(input_ids=ids, labels=labels).loss, twin(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(a, b)
    assert a.item() > 0
    txt.remove_torch_xent(model)
    assert model.loss_function is custom
    assert txt.is_patched(twin)


def test_all_ignored_labels_give_nan_loss_like_transformers():
    """transformers' mean over zero counted tokens is NaN (0/0); so is the fused loss, whose gradient is
    exactly 0 where transformers' is NaN (torch_xent's documented choice for ignored rows)."""
    ref = make_model("gpt2")
    model = txt.apply_torch_xent(copy.deepcopy(ref))
    ids, _ = make_batch()
    labels = torch.full_like(ids, -100)
    want = ref(input_ids=ids, labels=labels).loss
    got = model(input_ids=ids, labels=labels).loss
    assert torch.isnan(want) and torch.isnan(got)
    got.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters() if p.grad is not None)


def test_logits_to_keep_with_labels_is_an_error():
    model = txt.apply_torch_xent(make_model("llama"))
    ids, labels = make_batch()
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)


def test_autocast_bfloat16_matches_unpatched():
    ref = make_model("mistral")
    model = txt.apply_torch_xent(copy.deepcopy(ref))
    ids, labels = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = loss_and_grads(ref, input_ids=ids, labels=labels)
        got, got_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert got.logits.shape[-1] == 0
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-2, atol=0.0)
    assert_grads_close(got_grads, want_grads, torch.bfloat16)


def test_not_covered_models_are_refused():
    torch.manual_seed(0)
    seq_cls = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**SMALL, num_labels=3))
    with pytest.raises(ValueError, match="not covered; covered causal LMs: llama"):
        txt.apply_torch_xent(seq_cls)
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                             ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32))
    with pytest.raises(ValueError, match=r"OPTForCausalLM \(model_type 'opt'\) is not covered"):
        txt.apply_torch_xent(opt)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        txt.apply_torch_xent(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="label_smoothing"):
        txt.apply_torch_xent(make_model("llama"), label_smoothing=1.5)
    assert not txt.is_patched(seq_cls) and "forward" not in opt.lm_head.__dict__


def _run(code):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_fresh_process_import_and_first_step():
    """`import torch_xent` leaves transformers alone; the first patched step of a fresh process trains."""
    code = f"""
import sys, torch, torch_xent
assert "transformers" not in sys.modules and "torch_xent.transformers" not in sys.modules
import torch_xent.transformers as txt, transformers
torch.manual_seed(0)
cfg = transformers.LlamaConfig(**{SMALL!r})
model = txt.apply_torch_xent(transformers.LlamaForCausalLM(cfg).train())
ids = torch.randint(0, {VOCAB}, (2, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.5)
losses = []
for _ in range(3):
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 10, 0)
    opt.zero_grad(); out.loss.backward(); opt.step(); losses.append(out.loss.item())
assert losses[2] < losses[0], losses
print("ok", losses)
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")


def test_missing_transformers_is_a_clear_import_error():
    res = _run("import sys; sys.modules['transformers'] = None\n"
               "import torch_xent\n"
               "try:\n    import torch_xent.transformers\nexcept ImportError as e:\n    print('IMPORT ERROR:', e)\n")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "IMPORT ERROR: torch_xent.transformers needs the 'transformers' package" in res.stdout
    assert "torch_xent[transformers]" in res.stdout


def test_example_trains_and_logs(tmp_path):
    """examples/hf_tiny_llama.py end to end, a few steps: TensorBoard gets train.py's tags, and at step 0
    the random model's statistics are those of a near-uniform softmax over 256 bytes (lse = log 256 + a
    little, p_target about 1/256)."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "examples", "hf_tiny_llama.py"), "--steps", "4", "--batch-size", "4",
           "--grad-accum", "2", "--seq-len", "32", "--hidden", "32", "--log-every", "2", "--eval-every", "4",
           "--device", "cpu", "--logdir", str(tmp_path / "run")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torch_xent fused loss" in res.stdout and "val loss" in res.stdout
    acc = ea.EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"train/loss", "train/accuracy", "train/lse", "train/entropy", "train/p_target", "opt/lr", "opt/grad_norm",
            "perf/tokens_per_sec", "val/loss", "val/accuracy", "val/lse", "val/entropy", "val/p_target"}
    assert want <= tags, want - tags
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3]
    assert [e.step for e in acc.Scalars("train/lse")] == [0, 2, 3]
    import math
    lse0, p0 = acc.Scalars("train/lse")[0].value, acc.Scalars("train/p_target")[0].value
    assert math.log(256) - 1e-3 < lse0 < math.log(256) + 0.5, lse0
    assert 0.1 / 256 < p0 < 10 / 256, p0
    loss0 = acc.Scalars("train/loss")[0].value
    assert abs(loss0 - math.log(256)) < 0.5, loss0
    assert all(math.isfinite(e.value) for t in want for e in acc.Scalars(t))
