"""Fixed Point Diffusion Models (Bai & Melas-Kyriazi, CVPR 2024) on sklearn digits (task `fpdm`):
S-JFB training, DDIM sampling with the fixed point reused across timesteps (warm) against
cold starts, Picard against Anderson, sample quality against the per-timestep iteration budget."""

import ml_collections

PRESETS = ("quick", "default", "full")


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "fpdm-digits"
    c.experiment = "fpdm"
    c.seed = 0
    c.dtype = "float32"
    c.data = ml_collections.ConfigDict({"batch_size": 128, "split_seed": 0})
    c.diffusion = ml_collections.ConfigDict({"timesteps": 100})
    c.model = ml_collections.ConfigDict({
        "width": 256, "gamma": 0.97, "time_features": 8, "explicit_layers": 2,
        # S-JFB: a random number of iterations without gradient, then a few with it
        "no_grad_min": 0, "no_grad_max": 10, "with_grad_min": 1, "with_grad_max": 3,
    })
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 2e-3, "weight_decay": 0.0})
    c.sampling = ml_collections.ConfigDict({
        "num_samples": 500, "steps": 50, "rtol": 1e-3, "atol": 1e-5, "max_steps": 100, "anderson_memory": 5,
        "solvers": ["picard", "anderson"], "budgets": [1, 2, 3, 4, 6, 8], "budget_solvers": ["picard", "anderson"],
    })
    c.train = ml_collections.ConfigDict({"steps": 6000, "warmup_steps": 100, "eval_every": 6000,
                                         "checkpoint_every": 6000, "max_to_keep": 1})
    c.sweep = ml_collections.ConfigDict({"seed": [0, 1, 2]})
    if preset == "quick":
        c.model.width = 32
        c.data.batch_size = 32
        c.sampling.num_samples = 16
        c.sampling.steps = 10
        c.sampling.budgets = [2]
        c.sampling.budget_solvers = ["picard"]
        c.train = ml_collections.ConfigDict({"steps": 40, "warmup_steps": 5, "eval_every": 40,
                                             "checkpoint_every": 40, "max_to_keep": 1})
        c.sweep = ml_collections.ConfigDict({"seed": [0]})
    elif preset == "full":
        # GPU-sized: a wider block, 1000 training timesteps, longer training, more samples.
        c.model.width = 512
        c.diffusion.timesteps = 1000
        c.data.batch_size = 512
        c.sampling.num_samples = 5000
        c.sampling.steps = 250
        c.sampling.budgets = [1, 2, 3, 4, 6, 8, 12, 16, 24]
        c.train = ml_collections.ConfigDict({"steps": 100000, "warmup_steps": 1000, "eval_every": 10000,
                                             "checkpoint_every": 20000, "max_to_keep": 2})
    return c
