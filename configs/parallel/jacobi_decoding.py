"""Jacobi decoding of a character-level transformer trained on the Python standard library's
sources, before and after CLLM consistency fine-tuning (task `jacobi_decoding`)."""

import ml_collections

PRESETS = ("quick", "default", "full")


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "jacobi-decoding"
    c.experiment = "jacobi_decoding"
    c.seed = 0
    c.dtype = "float32"
    # ~0.6 M parameters: 3 blocks of width 128.
    c.model = ml_collections.ConfigDict({"d_model": 128, "num_layers": 3, "num_heads": 4, "mlp_ratio": 4})
    c.data = ml_collections.ConfigDict({"seq_len": 64, "batch_size": 32})
    c.decode = ml_collections.ConfigDict({"prompt_length": 16, "num_tokens": 32, "block_size": 16, "fill_token": 32})
    c.eval = ml_collections.ConfigDict({"num_prompts": 100, "valid_windows": 64})
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 3e-3, "b1": 0.9, "b2": 0.99})
    c.finetune = ml_collections.ConfigDict({
        "lr": 5e-4, "num_prompts": 8, "ar_weight": 1.0, "label_smoothing": 0.0, "lm_weight": 3.0, "lm_batch_size": 16,
    })
    c.train = ml_collections.ConfigDict(
        {"steps": 1800, "ar_steps": 1500, "warmup_steps": 100, "eval_every": 300, "checkpoint_every": 1500, "max_to_keep": 2}
    )
    c.sweep = ml_collections.ConfigDict({"seed": [0]})
    if preset == "quick":
        c.model = ml_collections.ConfigDict({"d_model": 32, "num_layers": 1, "num_heads": 2, "mlp_ratio": 2})
        c.data = ml_collections.ConfigDict({"seq_len": 32, "batch_size": 8})
        c.decode = ml_collections.ConfigDict({"prompt_length": 8, "num_tokens": 16, "block_size": 8, "fill_token": 32})
        c.eval = ml_collections.ConfigDict({"num_prompts": 8, "valid_windows": 8})
        c.finetune.num_prompts = 2
        c.finetune.lm_batch_size = 4
        c.train = ml_collections.ConfigDict(
            {"steps": 12, "ar_steps": 8, "warmup_steps": 2, "eval_every": 4, "checkpoint_every": 12, "max_to_keep": 1}
        )
    elif preset == "full":
        # GPU-sized: ~3.2 M parameters, longer training, the 100 prompts of 4 blocks.
        c.model = ml_collections.ConfigDict({"d_model": 256, "num_layers": 4, "num_heads": 8, "mlp_ratio": 4})
        c.data = ml_collections.ConfigDict({"seq_len": 256, "batch_size": 64})
        c.decode = ml_collections.ConfigDict({"prompt_length": 32, "num_tokens": 64, "block_size": 16, "fill_token": 32})
        c.finetune.num_prompts = 32
        c.finetune.lm_batch_size = 32
        c.train = ml_collections.ConfigDict(
            {"steps": 20000, "ar_steps": 15000, "warmup_steps": 500, "eval_every": 1000, "checkpoint_every": 5000, "max_to_keep": 2}
        )
    return c
