"""Learned proximal networks for plug-and-play on sklearn digits (Fang, Buchanan & Sulam, ICLR 2024;
task `lpn_pnp`): a dense LPN denoiser (64 pixels) trained with proximal matching is the prox of
PnP-ADMM, written as a fixed-point map on (z, u) and solved by `fpx.fixed_point` (Picard and
Anderson), for Gaussian deblurring and random inpainting, against Tikhonov and TV."""

import ml_collections

PRESETS = ("quick", "default", "full")


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "lpn-pnp"
    c.experiment = "lpn_pnp"
    c.seed = 0
    c.dtype = "float32"
    # Pixels in [0, 1]; the denoiser is trained at noise 0.1. The test split's first num_val images tune
    # every method's weight, the next num_test are the test images.
    c.data = ml_collections.ConfigDict({"split_seed": 0, "batch_size": 128, "noise": 0.1, "num_val": 40, "num_test": 100})
    c.model = ml_collections.ConfigDict({"hidden": 256, "layers": 2, "beta": 10.0, "alpha": 0.01, "init": "small"})
    # The reference's image schedule: L1 pretraining, then gamma = 0.08 sqrt(64) * 2^(3 - stage) in 4 stages
    # (gamma on the Euclidean norm of the error image).
    c.loss = ml_collections.ConfigDict({
        "kind": "prox_matching", "pretrain": "l1", "pretrain_fraction": 0.5,
        "gamma_start": 5.12, "gamma_end": 0.64, "gamma_stages": 4, "lr_start": 0.1, "lr_end": 0.1,
    })
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3})
    c.train = ml_collections.ConfigDict({"steps": 8000, "eval_every": 4000, "checkpoint_every": 4000, "max_to_keep": 1,
                                         "lr_decay": 1.0})
    # The accelerated solver of the PnP fixed point; Picard with the same tolerances is run alongside.
    c.solver = ml_collections.ConfigDict({"name": "anderson", "memory": 5, "rtol": 1e-4, "atol": 1e-6})
    c.pnp = ml_collections.ConfigDict({
        "blur_sigma": 1.0, "blur_width": 5, "blur_noise": 0.02, "keep": 0.5, "inpaint_noise": 0.02,
        "max_steps": 500, "tv_steps": 1000,
        "weight_factors": [0.25, 0.5, 1.0, 2.0, 4.0],
        "tikhonov_weights": [1e-7, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03],
        "tv_weights": [3e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 0.016, 0.032],
    })
    c.sweep = ml_collections.ConfigDict({"seed": [0]})
    if preset == "quick":
        c.data.update({"batch_size": 32, "num_val": 8, "num_test": 16})
        c.model.hidden = 32
        c.train = ml_collections.ConfigDict({"steps": 200, "eval_every": 200, "checkpoint_every": 200, "max_to_keep": 1,
                                             "lr_decay": 1.0})
        c.pnp.update({"max_steps": 100, "tv_steps": 100, "weight_factors": [0.5, 2.0],
                      "tikhonov_weights": [0.01, 0.1], "tv_weights": [0.01, 0.04]})
    elif preset == "full":
        # GPU-sized: a wider, deeper LPN, the reference's 40000 steps, the whole test split, 3 seeds.
        c.data.update({"batch_size": 256, "num_val": 60, "num_test": 300})
        c.model.update({"hidden": 1024, "layers": 3})
        c.train = ml_collections.ConfigDict({"steps": 40000, "eval_every": 10000, "checkpoint_every": 10000, "max_to_keep": 1,
                                             "lr_decay": 1.0})
        c.pnp.update({"max_steps": 1000, "tv_steps": 1000})
        c.sweep = ml_collections.ConfigDict({"seed": [0, 1, 2]})
    return c
