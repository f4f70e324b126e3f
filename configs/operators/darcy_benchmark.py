"""One Darcy benchmark protocol, every operator: FNO, TFNO, T1, MgNO, Galerkin and Fourier transformers, an iterated FNO block.

Task `darcy_operators` (fpx/experiment/tasks/darcy_operators.py): the operator named by
`model.name`, built from its section `model.<name>`, trained on `fpx.data.darcy` with the
same data, optimizer, schedule and steps as every other; the sweep over `model.name` runs
them one after another (each a separately compiled group; `seed` could be vmapped within
a group). Results and the table: experiments/darcy_benchmark/README.md.

Presets:
- `quick`: suite-sized (17^2 grid, 16 train / 8 test, 20 steps, tiny widths); seconds per operator.
- `default`: the CPU figure: 43^2 (85^2 subsampled by 2, as the FNO paper subsamples 421),
  400 train / 100 test, batch 20, 500 steps (25 epochs), Adam lr 1e-3, weight decay 1e-4,
  cosine schedule; each operator with 134-168 k parameters; 0.05-0.9 s per step on a shared
  2-core CPU (about 3-7 min each) except MgNO, whose convolutions run 6-13 s per step inside
  the runner's scan on XLA:CPU (1-2 h; see the README). The Fourier transformer is not in
  this sweep: its O(n^2) attention over the 1849 grid points takes ~9 s per step here.
- `full`: the standard protocol: 85^2, 1000 train / 200 test, batch 20, 500 epochs (25000
  steps), lr 1e-3 halved every 100 epochs, weight decay 1e-4 (Li et al., 2020); each
  operator with 2.2-2.8 M parameters (the paper's FNO, width 32 and 12 modes, has
  2.37 M). For a GPU; not run on CPU.

Parameter budget: the depth of each operator is fixed (4 Fourier layers, 4 T1 layers, 4
MgNO V-cycle layers (5 in `full`), 4 attention + 2 spectral decoder layers, k = 4 block
applications) and the width (and mode count) is set so that every operator has within
-11 % / +18 % of the preset's FNO's parameters (counts in the comments below and in
experiments/darcy_benchmark/README.md).
"""

import ml_collections

PRESETS = ("quick", "default", "full")
MODELS = ("fno", "tfno", "t1", "mgno", "galerkin", "fourier_transformer", "iterated_fno")


def _models(preset):
    if preset == "quick":
        return {
            "fno": {"modes": 4, "width": 8, "layers": 2, "padding": 2, "projection_width": 16},
            "tfno": {"modes": 4, "width": 8, "layers": 2, "padding": 2, "projection_width": 16, "rank": 0.5},
            "t1": {"modes": 4, "width": 8, "layers": 2, "projection_width": 16},
            "mgno": {"width": 8, "levels": 3, "num_layers": 2},
            "galerkin": {"modes": 4, "width": 8, "heads": 2, "layers": 1, "decoder_layers": 1},
            "fourier_transformer": {"modes": 4, "width": 8, "heads": 2, "layers": 1, "decoder_layers": 1},
            "iterated_fno": {"kind": "iterate", "k": 2, "modes": 4, "width": 8, "padding": 2, "projection_width": 16,
                             "init_scale": 0.5},
        }
    if preset == "default":  # ~0.13-0.17 M parameters each (CPU-sized; see the module docstring)
        return {
            "fno": {"modes": 8, "width": 12, "layers": 4, "padding": 5, "projection_width": 128},  # 149,921
            "tfno": {"modes": 12, "width": 24, "layers": 4, "padding": 5, "projection_width": 128, "rank": 0.1},  # 137,017
            "t1": {"modes": 12, "width": 16, "layers": 4, "projection_width": 128},  # 168,128
            "mgno": {"width": 16, "levels": 4, "num_layers": 4},  # 133,948
            "galerkin": {"modes": 8, "width": 16, "heads": 2, "layers": 4, "decoder_layers": 2},  # 141,121
            "fourier_transformer": {"modes": 8, "width": 16, "heads": 2, "layers": 4, "decoder_layers": 2},  # 141,121
            "iterated_fno": {"kind": "iterate", "k": 4, "modes": 12, "width": 16, "padding": 5,
                             "projection_width": 128, "init_scale": 0.5},  # 150,097
        }
    return {  # full: ~2.2-2.8 M parameters each
        "fno": {"modes": 12, "width": 32, "layers": 4, "padding": 9, "projection_width": 128},  # 2.368 M
        "tfno": {"modes": 12, "width": 64, "layers": 4, "padding": 9, "projection_width": 128, "rank": 0.25},  # 2.279 M
        "t1": {"modes": 16, "width": 48, "layers": 4, "projection_width": 128},  # 2.464 M
        "mgno": {"width": 64, "levels": 4, "num_layers": 5},  # 2.789 M
        "galerkin": {"modes": 8, "width": 64, "heads": 4, "layers": 4, "decoder_layers": 2},  # 2.246 M
        "fourier_transformer": {"modes": 8, "width": 64, "heads": 4, "layers": 4, "decoder_layers": 2},  # 2.246 M
        "iterated_fno": {"kind": "iterate", "k": 4, "modes": 12, "width": 64, "padding": 9,
                         "projection_width": 128, "init_scale": 0.5},  # 2.372 M
    }


def get_config(arg=None):
    preset = arg or "default"
    c = ml_collections.ConfigDict()
    c.name = "darcy-benchmark"
    c.experiment = "darcy_operators"
    c.seed = 0
    c.dtype = "float32"
    c.measure_memory = True
    c.data = ml_collections.ConfigDict({"n_train": 400, "n_test": 100, "s": 85, "stride": 2, "seed": 0, "batch_size": 20})
    c.model = ml_collections.ConfigDict({"name": "fno", **_models(preset)})
    # Only for model.iterated_fno.kind = "deq".
    c.solver = ml_collections.ConfigDict({"name": "anderson", "memory": 5, "rtol": 1e-3, "atol": 1e-6})
    c.adjoint = ml_collections.ConfigDict({"name": "implicit"})
    c.max_steps = 60
    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3, "weight_decay": 1e-4})
    c.schedule = ml_collections.ConfigDict({"name": "cosine", "every_epochs": 100, "factor": 0.5})
    # 20 steps per epoch (400 / 20): 25 epochs, evaluated every 2.5 epochs.
    c.train = ml_collections.ConfigDict({"steps": 500, "eval_every": 50, "checkpoint_every": 250, "max_to_keep": 1})
    c.sweep = ml_collections.ConfigDict({"model": {"name": list(MODELS)}, "seed": [0]})
    if preset == "default":
        # The Fourier transformer's softmax-free attention is O(n^2) in the 43^2 = 1849 grid points:
        # 9 s per step here (vs 0.3-0.9 s for the others), so it is left to `full` (GPU) and `quick`.
        c.sweep.model.name = [m for m in MODELS if m != "fourier_transformer"]
    if preset == "quick":
        c.data.update({"n_train": 16, "n_test": 8, "s": 17, "stride": 1, "batch_size": 4})
        c.optim.lr = 3e-3
        c.schedule.name = "constant"
        c.max_steps = 10
        c.train.update({"steps": 20, "eval_every": 10, "checkpoint_every": 20})
    elif preset == "full":
        c.data.update({"n_train": 1000, "n_test": 200, "s": 85, "stride": 1, "batch_size": 20})
        c.schedule.name = "step"
        c.train.update({"steps": 25000, "eval_every": 500, "checkpoint_every": 2500})
    return c
