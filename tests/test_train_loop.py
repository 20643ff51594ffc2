import os
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.train.batches import collate
from jobs.train.engine import budget_learning_rate, deepspeed_config
from jobs.train.losses import answer_logits, answer_loss
from jobs.config import TrainSection


def test_answer_loss_equals_the_full_causal_lm_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rng = np.random.default_rng(0)
    examples = [rng.integers(3, 40000, size=n) for n in (12, 30, 21)]
    batch = collate({"input_ids": np.array(examples, dtype=object), "prompt_len": np.array([9, 26, 15])}, pad_id=2)
    with torch.no_grad():
        expected = model(**batch).loss
        actual = answer_loss(model, batch)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_label_word_loss_adds_a_cross_entropy_over_the_label_words_at_the_first_answer_token(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rng = np.random.default_rng(1)
    label_ids = [101, 202, 303]
    golds = [202, 101, 303]
    # Each example: a prompt, then its label word and an end token (the answer).
    examples = [np.concatenate([rng.integers(400, 40000, size=n), [gold, 2]]) for n, gold in zip((9, 14, 6), golds)]
    prompt_lens = np.array([9, 14, 6])
    batch = collate({"input_ids": np.array(examples, dtype=object), "prompt_len": prompt_lens}, pad_id=2)
    with torch.no_grad():
        plain = answer_loss(model, batch)
        combined = answer_loss(model, batch, label_ids, label_weight=0.5)
        logits = model(**batch).logits
    # By hand: the logits that predict each label word, restricted to the three label words.
    first = torch.stack([logits[row, prompt_lens[row] - 1, label_ids] for row in range(3)])
    expected = plain + 0.5 * torch.nn.functional.cross_entropy(first, torch.tensor([label_ids.index(g) for g in golds]))
    torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-5)
    assert answer_loss(model, batch, label_ids, label_weight=0.0) == plain


def test_deepspeed_config_follows_the_train_section_and_merges_overrides():
    train = TrainSection(zero_stage=3, micro_batch_size=4, gradient_accumulation_steps=3, max_steps=50, lr_schedule="linear",
                         deepspeed_overrides={"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.5})
    config = deepspeed_config(train.model_dump(), world_size=2, precision="fp32")
    assert config["train_batch_size"] == 4 * 3 * 2
    assert config["zero_optimization"] == {
        "stage": 3, "stage3_gather_16bit_weights_on_model_save": True, "reduce_bucket_size": 1000}
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["type"] == "AdamW" and config["scheduler"]["type"] == "WarmupDecayLR"
    assert config["scheduler"]["params"]["total_num_steps"] == 50
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False


def test_deepspeed_config_for_sgd_cosine_offload_and_half_precision():
    train = TrainSection(zero_stage=3, optimizer="sgd", momentum=0.8, lr_schedule="cosine", max_steps=100, offload_optimizer=True,
                         offload_parameters=True, gradient_clipping=0.0, use_gpu=True, precision="fp16")
    config = deepspeed_config(train.model_dump(), world_size=1, precision="fp16")
    assert config["optimizer"] == {"type": "SGD", "params": {"lr": train.learning_rate, "momentum": 0.8, "weight_decay": 0.0}}
    assert config["scheduler"]["type"] == "WarmupCosineLR" and config["scheduler"]["params"]["cos_min_ratio"] == 0.0
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["fp16"]["enabled"] and not config["bf16"]["enabled"] and config["gradient_clipping"] == 0.0


def test_a_constant_schedule_warms_up_then_holds_the_peak_rate():
    train = TrainSection(lr_schedule="constant", learning_rate=3e-4, warmup_steps=5)
    scheduler = deepspeed_config(train.model_dump(), world_size=2, precision="fp32")["scheduler"]
    assert scheduler == {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-4,
                                                        "warmup_num_steps": 5, "warmup_type": "linear"}}


def test_global_batch_size_sets_accumulation_for_any_worker_count():
    for workers, accumulation in ((1, 8), (2, 4), (4, 2)):
        train = TrainSection(num_workers=workers, micro_batch_size=4, global_batch_size=32)
        assert train.gradient_accumulation_steps == accumulation
        assert deepspeed_config(train.model_dump(), workers, "fp32")["train_batch_size"] == 32


def test_precision_auto_on_cpu_is_bf16_only_where_the_cpu_has_bf16_instructions(monkeypatch):
    from jobs.train import engine

    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
    assert engine.resolve_precision("auto", use_gpu=False) == "bf16"
    assert engine.resolve_precision("fp32", use_gpu=False) == "fp32"
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: False)
    assert engine.resolve_precision("auto", use_gpu=False) == "fp32"
    with pytest.raises(ValueError, match="AMX or AVX-512 BF16"):
        engine.resolve_precision("bf16", use_gpu=False)
    assert engine.resolve_precision("bf16", use_gpu=True) == "bf16"


def test_attention_auto_is_eager_on_cpu_and_sdpa_on_gpu():
    from jobs.train.engine import resolve_attention

    assert resolve_attention("auto", use_gpu=False) == "eager"
    assert resolve_attention("auto", use_gpu=True) == "sdpa"
    assert resolve_attention("sdpa", use_gpu=False) == "sdpa"


def test_cpu_bf16_is_autocast_over_fp32_weights_not_deepspeeds_bf16_mode(tiny_model_dir):
    """On CPU the engine keeps fp32 weights and optimizer (DeepSpeed's bf16 mode stays off) and its
    forward runs under torch.autocast in bf16 (DeepSpeed's torch_autocast section: an autocast
    opened around the engine is switched off inside it). On GPU it is DeepSpeed's bf16 mode."""
    from transformers import AutoModelForCausalLM

    train = TrainSection().model_dump()
    cpu = deepspeed_config({**train, "use_gpu": False}, 2, "bf16")
    assert cpu["bf16"] == {"enabled": False}
    assert cpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    gpu = deepspeed_config({**train, "use_gpu": True}, 2, "bf16")
    assert gpu["bf16"] == {"enabled": True} and not gpu["torch_autocast"]["enabled"]
    assert not deepspeed_config({**train, "use_gpu": False}, 2, "fp32")["torch_autocast"]["enabled"]
    # What that autocast does to the objective: bf16 logits close to fp32's, fp32 gradients.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = collate({"input_ids": [list(range(3, 20)), list(range(5, 12))], "prompt_len": [10, 4]}, pad_id=2)
    fp32_logits, _, _ = answer_logits(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logits, _, _ = answer_logits(model, batch)
        loss = answer_loss(model, batch)
    assert fp32_logits.dtype == torch.float32 and bf16_logits.dtype == torch.bfloat16
    torch.testing.assert_close(bf16_logits.float(), fp32_logits, atol=0.1, rtol=0.05)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(grad.dtype == torch.float32 for grad in grads)

def test_prepare_model_trains_only_what_the_method_says(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from jobs.train.engine import prepare_model

    def trainable(model) -> set[str]:
        return {name for name, parameter in model.named_parameters() if parameter.requires_grad}

    lora = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         TrainSection(method="lora", lora={"rank": 4, "target_modules": ["q_proj", "v_proj"]}).model_dump())
    assert trainable(lora) and all("lora_" in name for name in trainable(lora))
    assert {name.split(".")[-4] for name in trainable(lora)} == {"q_proj", "v_proj"}

    frozen = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           TrainSection(freeze_embeddings=True, freeze_layers=1).model_dump())
    names = trainable(frozen)
    assert not any("embed_tokens" in name or ".layers.0." in name for name in names)
    assert any(".layers.1." in name for name in names) and "model.norm.weight" in names

    full = trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    every_weight = TrainSection(trainable_layers=None, freeze_embeddings=False)
    assert trainable(prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), every_weight.model_dump())) == full
    # The recipe's defaults (top 10 layers, embeddings fixed) on a model of 2 layers: every layer trains.
    recipe = trainable(prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), TrainSection().model_dump()))
    assert recipe == {name for name in full if "embed_tokens" not in name}
    with pytest.raises(ValueError, match="freeze_layers=5 but the model has 2 layers"):
        prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), TrainSection(freeze_layers=5).model_dump())
    # trainable_layers counts from the top, so one recipe fits models of any depth.
    top = trainable(prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), TrainSection(trainable_layers=1).model_dump()))
    assert any(".layers.1." in name for name in top) and not any(".layers.0." in name for name in top)
    assert trainable(prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                   TrainSection(trainable_layers=10, freeze_embeddings=False).model_dump())) == full
    with pytest.raises(ValueError, match="not both"):
        TrainSection(trainable_layers=2, freeze_layers=1)


def test_flops_per_token_count_only_the_backward_pass_the_trained_weights_need(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from jobs.train.engine import prepare_model
    from jobs.train.flops import train_flops_per_token

    def model(**settings):
        return prepare_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), TrainSection(**settings).model_dump())

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layer = sum(p.numel() for p in base.model.layers[0].parameters())
    non_embedding = sum(p.numel() for p in base.parameters()) - base.get_input_embeddings().weight.numel()
    # Every weight trains: forward 2N, activation gradients 2N, weight gradients 2N.
    assert train_flops_per_token(model(trainable_layers=None, freeze_embeddings=False)) == 6 * non_embedding
    # The top layer only: no gradient at all through the bottom layer, weight gradients for the top layer and the norm.
    top = model(trainable_layers=1)
    trained = sum(p.numel() for p in top.parameters() if p.requires_grad)
    assert train_flops_per_token(top) == 2 * non_embedding + 2 * (non_embedding - layer) + 2 * trained
    assert train_flops_per_token(top) < 5 * non_embedding
    # LoRA: gradients flow through every layer to the adapters, the base weights get none: about 4N.
    lora = model(method="lora", lora={"rank": 4, "target_modules": ["q_proj", "v_proj"]})
    assert 4 * non_embedding < train_flops_per_token(lora) < 4.1 * non_embedding


def test_export_check_rejects_weights_that_do_not_reproduce_the_trained_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from jobs.train.export import verify_export
    from jobs.train.export import PROBE_IDS

    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=PROBE_IDS).logits[0, -1]
    assert verify_export(tiny_model_dir, logits, tolerance=1e-4) <= 1e-4
    with pytest.raises(RuntimeError, match="does not reproduce the trained model"):
        verify_export(tiny_model_dir, logits + 0.5, tolerance=1e-4)


def _random_examples(lengths, prompt_lens):
    rng = np.random.default_rng(0)
    examples = [rng.integers(3, 40000, size=n) for n in lengths]
    return {"input_ids": np.array(examples, dtype=object), "prompt_len": np.array(prompt_lens)}


def test_packing_lays_every_example_once_into_rows_no_longer_than_the_limit():
    batch = _random_examples((12, 30, 21, 7, 50, 3), (9, 26, 15, 3, 40, 1))
    packed = collate(batch, pad_id=2, packed_length=48)
    padded = collate(batch, pad_id=2)
    assert packed["input_ids"].shape[0] < len(batch["input_ids"])  # fewer rows than examples
    # 50 > 48 sets the row limit; the others share rows of at most 48.
    row_tokens = packed["attention_mask"].sum(dim=1)
    assert sorted(row_tokens.tolist())[-1] == 50 and sorted(row_tokens.tolist())[-2] <= 48
    # The same real tokens and the same answer tokens, in fewer token slots.
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum() == sum(len(ids) for ids in batch["input_ids"])
    assert sorted(packed["labels"][packed["labels"] != -100].tolist()) == sorted(padded["labels"][padded["labels"] != -100].tolist())
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    # Positions restart at 0 at the start of every example.
    assert int((packed["position_ids"] == 0).logical_and(packed["attention_mask"] == 1).sum()) == len(batch["input_ids"])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # train.attention: eager is CPU workers' default
def test_packed_examples_see_only_themselves(tiny_model_dir, attention):
    """Each example's logits inside a packed row equal its logits when run alone, and the packed
    batch's answer loss equals the padded batch's, with either attention kernel."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    assert model.config._attn_implementation == attention
    batch = _random_examples((12, 30, 21, 7), (9, 26, 15, 3))
    packed = collate(batch, pad_id=2, packed_length=64)
    assert packed["input_ids"].shape[0] == 2  # 70 tokens in two rows of at most 64: examples share rows
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        checked = 0
        for row in range(packed["input_ids"].shape[0]):
            starts = ((packed["position_ids"][row] == 0) & (packed["attention_mask"][row] == 1)).nonzero().flatten().tolist()
            for start in starts:
                ids = next(torch.as_tensor(np.asarray(e, dtype=np.int64)) for e in batch["input_ids"]
                           if torch.equal(packed["input_ids"][row, start: start + len(e)], torch.as_tensor(np.asarray(e, dtype=np.int64))))
                alone = model(input_ids=ids.unsqueeze(0)).logits[0]
                torch.testing.assert_close(logits[row, start: start + len(ids)], alone, rtol=0, atol=1e-5)
                checked += 1
        assert checked == len(batch["input_ids"])
        torch.testing.assert_close(answer_loss(model, packed), answer_loss(model, collate(batch, pad_id=2)), rtol=1e-5, atol=1e-6)
        # The label-word loss counts every example's answer, also the ones packed after another.
        label_ids = sorted({int(ids[length]) for ids, length in zip(batch["input_ids"], batch["prompt_len"])})
        torch.testing.assert_close(answer_loss(model, packed, label_ids, 0.5),
                                   answer_loss(model, collate(batch, pad_id=2), label_ids, 0.5), rtol=1e-5, atol=1e-6)
        # Every example in one row: the columns between two answers hold no answer in any row and are
        # dropped before the loss, yet each answer's first token must still count on its own.
        one_row = collate(batch, pad_id=2, packed_length=128)
        assert one_row["input_ids"].shape[0] == 1
        torch.testing.assert_close(answer_loss(model, one_row, label_ids, 0.5),
                                   answer_loss(model, collate(batch, pad_id=2), label_ids, 0.5), rtol=1e-5, atol=1e-6)


def test_a_budget_schedule_warms_up_by_steps_then_falls_with_the_share_of_the_time_budget_spent():
    train = TrainSection(lr_schedule="linear_budget", learning_rate=4e-4, warmup_steps=4, max_train_seconds=100).model_dump()
    assert budget_learning_rate(train, 0, 0.0) == pytest.approx(1e-4)  # the first step is a quarter of the way up
    assert budget_learning_rate(train, 3, 0.0) == pytest.approx(4e-4)
    assert budget_learning_rate(train, 50, 25.0) == pytest.approx(3e-4)
    assert budget_learning_rate(train, 90, 99.0) == pytest.approx(4e-6)
    assert budget_learning_rate(train, 95, 130.0) == 0.0  # past the budget: never negative
    # DeepSpeed gets no step-counting scheduler: the loop sets the rate.
    assert "scheduler" not in deepspeed_config(train, world_size=2, precision="fp32")
    with pytest.raises(ValueError, match="linear_budget decays over max_train_seconds"):
        TrainSection(lr_schedule="linear_budget", max_steps=10)  # max_steps alone leaves no time budget


# One DeepSpeed engine per ZeRO stage, in a child process (DeepSpeed wants its own process group):
# the rate set_learning_rate writes is the one the optimizer step applies (plain SGD: w -= lr * grad).
_SET_LR_SCRIPT = """
import os, sys, torch, deepspeed
from jobs.config import TrainSection
from jobs.train.engine import deepspeed_config, set_learning_rate
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
deepspeed.init_distributed(dist_backend="gloo")
train = TrainSection(lr_schedule="linear_budget", optimizer="sgd", momentum=0.0, micro_batch_size=1,
                     zero_stage=int(sys.argv[1]), gradient_clipping=0.0, max_train_seconds=60).model_dump()
model = torch.nn.Linear(4, 1, bias=False)
torch.nn.init.ones_(model.weight)
engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                  config=deepspeed_config(train, world_size=1, precision="fp32"))
set_learning_rate(engine, 0.25)
engine.backward(engine(torch.ones(1, 4)).sum())  # d(sum w)/dw = 1 for every weight
engine.step()
assert engine.get_lr()[0] == 0.25, engine.get_lr()
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
    weights = engine.module.weight.detach().clone()
assert torch.allclose(weights, torch.full((1, 4), 0.75)), weights
print("ok")
"""


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_the_rate_set_by_the_loop_is_the_one_deepspeed_steps_with(zero_stage, tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, "-c", _SET_LR_SCRIPT, str(zero_stage), str(port)], capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-4000:]
