"""ParaDiGMS-style Picard sampling against sequential DDIM with an MLP denoiser trained on
sklearn digits (task `parallel_sampling`)."""

import ml_collections

PRESETS = ("quick", "default", "full")


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "parallel-sampling"
    c.experiment = "parallel_sampling"
    c.seed = 0
    c.dtype = "float32"
    c.model = ml_collections.ConfigDict({"width": 256, "depth": 3, "time_features": 8})
    c.data = ml_collections.ConfigDict({"batch_size": 128, "split_seed": 0})
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 2e-3})
    c.sampling = ml_collections.ConfigDict(
        {"num_samples": 64, "window": 16, "steps": [25, 50, 100], "tols": [0.1, 1e-3], "etas": [0.0, 1.0]}
    )
    c.train = ml_collections.ConfigDict({"steps": 4000, "warmup_steps": 100, "eval_every": 1000, "checkpoint_every": 2000, "max_to_keep": 1})
    c.sweep = ml_collections.ConfigDict({"seed": [0]})
    if preset == "quick":
        c.model = ml_collections.ConfigDict({"width": 32, "depth": 2, "time_features": 4})
        c.data.batch_size = 32
        c.sampling = ml_collections.ConfigDict({"num_samples": 4, "window": 4, "steps": [12], "tols": [1e-3], "etas": [0.0]})
        c.train = ml_collections.ConfigDict({"steps": 20, "warmup_steps": 2, "eval_every": 10, "checkpoint_every": 20, "max_to_keep": 1})
    elif preset == "full":
        # GPU-sized: a wider denoiser, longer training, 1000-step samplers with larger windows.
        c.model = ml_collections.ConfigDict({"width": 1024, "depth": 4, "time_features": 16})
        c.data.batch_size = 256
        c.sampling = ml_collections.ConfigDict(
            {"num_samples": 256, "window": 64, "steps": [100, 250, 1000], "tols": [0.1, 1e-3], "etas": [0.0, 1.0]}
        )
        c.train = ml_collections.ConfigDict({"steps": 50000, "warmup_steps": 1000, "eval_every": 5000, "checkpoint_every": 10000, "max_to_keep": 2})
    return c
