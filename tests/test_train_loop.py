import numpy as np
import pytest
import torch

from jobs.train_loop import answer_loss, collate, deepspeed_config
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


def test_deepspeed_config_follows_the_train_section_and_merges_overrides():
    train = TrainSection(zero_stage=3, micro_batch_size=4, gradient_accumulation_steps=3, max_steps=50,
                         deepspeed_overrides={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "gradient_clipping": 0.5})
    config = deepspeed_config(train.model_dump(), world_size=2)
    assert config["train_batch_size"] == 4 * 3 * 2
    assert config["zero_optimization"] == {
        "stage": 3, "stage3_gather_16bit_weights_on_model_save": True, "offload_optimizer": {"device": "cpu"}}
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["type"] == "AdamW" and config["scheduler"]["params"]["total_num_steps"] == 50
    assert config["bf16"]["enabled"] is False


def test_export_check_rejects_weights_that_do_not_reproduce_the_trained_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from jobs.finetune import verify_export
    from jobs.train_loop import PROBE_IDS

    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=PROBE_IDS).logits[0, -1]
    assert verify_export(tiny_model_dir, logits, tolerance=1e-4) <= 1e-4
    with pytest.raises(RuntimeError, match="does not reproduce the trained model"):
        verify_export(tiny_model_dir, logits + 0.5, tolerance=1e-4)
