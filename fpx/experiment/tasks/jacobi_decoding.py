"""Jacobi decoding of a character-level transformer, before and after consistency training (CLLM).

Data: the Python standard library's own sources, which ship with every interpreter (no
download). `CORPUS_TRAIN` and `CORPUS_VALID` name fixed top-level modules of
`os.path.dirname(os.__file__)` (present, as single files, in CPython 3.9-3.13); each list
is read in sorted order, decoded as UTF-8 and concatenated with one blank line between
files. Characters are their code points below 128 (a vocabulary of 128); anything else
becomes token 0. The text therefore depends on the interpreter's version (3.11.7 for the
committed results): `corpus()` returns it with its SHA-256, logged as `eval/corpus_hash32`.

Model: a pre-LayerNorm causal transformer in plain JAX (`init_params` / `logits`): token and
learned position embeddings, `num_layers` blocks of multi-head causal self-attention and a
GELU MLP (`mlp_ratio * d_model`), a final LayerNorm and an untied output head. Row `t` of
the logits depends on `tokens[:t+1]` only (masked scores are `-inf`; the masked
probabilities are exactly 0), so `fpx.parallel.jacobi_decode` gives exactly the greedy output.

One schedule of `train.steps` steps (the phase is a function of the step counter kept in
the state):

1. steps `[0, train.ar_steps)`: autoregressive (next-character cross-entropy) training on
   random windows of `data.seq_len` characters, Adam with a linear warm-up and a cosine
   decay of `optim.lr` to 10 %;
2. steps `[train.ar_steps, train.steps)`: consistency fine-tuning (CLLM, Kou et al. 2024):
   every step collects Jacobi trajectories (`fpx.parallel.jacobi_trajectories`) from the
   *current* model on `finetune.num_prompts` random training prompts, and minimises
   `fpx.parallel.consistency_loss` (global consistency loss with one random state per block,
   plus `finetune.ar_weight` times the AR loss on the trajectories' fixed points, label
   smoothing `finetune.label_smoothing`) plus `finetune.lm_weight` times the ordinary
   next-character loss on a batch of training text (which keeps the validation loss in
   place), at the constant rate `finetune.lr`.

The base model is the one evaluated at step `train.ar_steps` (the task requires an
evaluation there); the speed-up is the ratio of that record's iterations per block to the
final one's (`experiments/jacobi_decoding/table.py`). Every record carries `phase` (0: AR,
1: fine-tuned).

Each phase's update runs inside a `lax.while_loop` that executes zero or one times: under
the runner's `vmap` over sweep members a `lax.cond` would become a `select` that pays for
both phases every step; the loop runs only when some member is in that phase (all members
of one run share the schedule, so exactly one phase runs per step).

Evaluation (`evaluate`): validation loss (mean next-character cross-entropy on
`eval.valid_windows` fixed windows of the validation text); on `eval.num_prompts` fixed
prompts (evenly spaced windows of `decode.prompt_length` characters of the validation
text) `decode.num_tokens` characters by `jacobi_decode` and by `greedy_decode`: the number
of prompts (and tokens) where the two differ (must be 0), the mean Jacobi iterations per
block of `decode.block_size` tokens. (The model's causality is checked by the tests with
`jacobi_decode`'s probe, `tests/test_parallel_tasks.py`, and on every decoded token by the
mismatch count itself.)
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from ... import parallel as fpp
from .._config import NON_NEGATIVE, POSITIVE, POSITIVE_INT, ConfigError, one_of
from .._registry import build, register_task, set_learning_rate
from .._task import Task, config_dtype

# Fixed module lists (all single files in CPython 3.9-3.13), read in sorted order.
CORPUS_VALID = ("bisect.py", "colorsys.py", "fnmatch.py", "heapq.py", "queue.py", "sched.py", "shlex.py", "textwrap.py")
CORPUS_TRAIN = tuple(sorted((
    "abc.py", "argparse.py", "ast.py", "base64.py", "calendar.py", "cmd.py", "code.py", "codeop.py",
    "contextlib.py", "copy.py", "copyreg.py", "csv.py", "dataclasses.py", "difflib.py", "dis.py",
    "enum.py", "filecmp.py", "fileinput.py", "fractions.py", "functools.py", "getopt.py", "gettext.py",
    "glob.py", "graphlib.py", "hmac.py", "inspect.py", "ipaddress.py", "keyword.py", "linecache.py",
    "numbers.py", "operator.py", "optparse.py", "pprint.py", "random.py", "reprlib.py", "secrets.py",
    "selectors.py", "shutil.py", "stat.py", "statistics.py", "string.py", "tempfile.py", "threading.py",
    "timeit.py", "tokenize.py", "traceback.py", "types.py", "typing.py", "warnings.py", "weakref.py",
)))
VOCAB = 128


def stdlib_dir() -> pathlib.Path:
    return pathlib.Path(os.path.dirname(os.__file__))


def encode(text: str) -> np.ndarray:
    """Code points below 128 as int32 tokens; anything else becomes 0."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < VOCAB, codes, 0).astype(np.int32)


def decode_text(tokens) -> str:
    return "".join(chr(int(t)) for t in np.asarray(tokens))


def corpus(files, root: pathlib.Path | None = None) -> tuple[np.ndarray, str]:
    """`(tokens, sha256 hex)` of `files` (sorted) under the stdlib directory (or `root`)."""
    root = stdlib_dir() if root is None else pathlib.Path(root)
    parts = []
    for name in sorted(files):
        path = root / name
        if not path.is_file():
            raise ConfigError(f"jacobi_decoding: the corpus file {path} does not exist in this Python installation.")
        parts.append(path.read_text(encoding="utf-8"))
    text = "\n\n".join(parts)
    return encode(text), hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------- the model


def init_params(key, *, d_model: int, num_layers: int, num_heads: int, mlp_ratio: int, max_len: int, vocab: int = VOCAB, dtype=jnp.float32):
    """Parameters of the causal transformer (layers stacked on axis 0 of each leaf)."""
    if d_model % num_heads:
        raise ConfigError(f"'model.d_model' ({d_model}) must be a multiple of 'model.num_heads' ({num_heads}).")
    d, h, L = d_model, mlp_ratio * d_model, num_layers
    k = jr.split(key, 7)
    normal = lambda key, shape, std: (std * jr.normal(key, shape)).astype(dtype)
    resid = 0.02 / math.sqrt(2 * L)
    return {
        "tok": normal(k[0], (vocab, d), 0.02),
        "pos": normal(k[1], (max_len, d), 0.01),
        "layers": {
            "ln1": jnp.ones((L, d), dtype), "ln1_b": jnp.zeros((L, d), dtype),
            "qkv": normal(k[2], (L, d, 3 * d), 0.02), "qkv_b": jnp.zeros((L, 3 * d), dtype),
            "proj": normal(k[3], (L, d, d), resid), "proj_b": jnp.zeros((L, d), dtype),
            "ln2": jnp.ones((L, d), dtype), "ln2_b": jnp.zeros((L, d), dtype),
            "fc1": normal(k[4], (L, d, h), 0.02), "fc1_b": jnp.zeros((L, h), dtype),
            "fc2": normal(k[5], (L, h, d), resid), "fc2_b": jnp.zeros((L, d), dtype),
        },
        "lnf": jnp.ones((d,), dtype), "lnf_b": jnp.zeros((d,), dtype),
        "head": normal(k[6], (d, vocab), 0.02), "head_b": jnp.zeros((vocab,), dtype),
    }


def num_params(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def _layer_norm(x, g, b):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * g[None] + b[None]


def logits(params, tokens, num_heads: int):
    """`[n] int tokens -> [n, vocab]` logits; row `t` scores the token at `t + 1` (causal)."""
    n = tokens.shape[0]
    x = params["tok"][tokens] + params["pos"][:n]
    d = x.shape[-1]
    hd = d // num_heads
    mask = jnp.tril(jnp.ones((n, n), bool))

    def block(x, p):
        y = _layer_norm(x, p["ln1"], p["ln1_b"])
        q, k, v = jnp.split(y @ p["qkv"] + p["qkv_b"][None], 3, axis=-1)
        q, k, v = (z.reshape(n, num_heads, hd).transpose(1, 0, 2) for z in (q, k, v))
        scores = jnp.where(mask, q @ k.transpose(0, 2, 1) / math.sqrt(hd), -jnp.inf)
        att = jax.nn.softmax(scores, axis=-1) @ v  # masked probabilities are exactly 0
        x = x + att.transpose(1, 0, 2).reshape(n, d) @ p["proj"] + p["proj_b"][None]
        y = _layer_norm(x, p["ln2"], p["ln2_b"])
        x = x + jax.nn.gelu(y @ p["fc1"] + p["fc1_b"][None]) @ p["fc2"] + p["fc2_b"][None]
        return x, None

    x, _ = jax.lax.scan(block, x, params["layers"])
    return _layer_norm(x, params["lnf"], params["lnf_b"]) @ params["head"] + params["head_b"][None]


def lm_loss(logits_fn, windows):
    """Mean next-token cross-entropy of `logits_fn` on int windows `[b, n]`."""
    out = jax.vmap(logits_fn)(windows)
    return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], windows[:, 1:]).mean()


# --------------------------------------------------------------------- decoding


def decode_metrics(logits_fn, prompts, num_tokens: int, block_size: int, fill_token: int):
    """Jacobi vs greedy decoding of `prompts` `[N, P]` with a (causal) `logits_fn`.

    Returns a dict of scalars: `mismatched_prompts` (prompts whose Jacobi output differs
    from the greedy output anywhere), `mismatched_tokens`, `iterations_per_block` (mean
    over prompts and blocks), `first_block_iterations`, `later_block_iterations` (mean of
    the first block / of the others; equal to the first when there is one block) and
    `forward_passes_per_token` (Jacobi `logits_fn` calls per decoded token; greedy: 1),
    and `repeat_fraction`: the fraction of greedy tokens equal to the token before them (a
    degenerate model that repeats one character converges in few Jacobi iterations).
    """
    jacobi = jax.vmap(lambda p: fpp.jacobi_decode(logits_fn, p, num_tokens, block_size, fill_token=fill_token, check_causal=False))
    greedy = jax.vmap(lambda p: fpp.greedy_decode(logits_fn, p, num_tokens, fill_token=fill_token))
    tokens, stats = jacobi(prompts)
    reference = greedy(prompts)
    out = mismatch_metrics(tokens, reference, stats["iterations_per_block"], num_tokens)
    out["repeat_fraction"] = repeat_fraction(prompts, reference)
    return out


def repeat_fraction(prompts, generated):
    """Fraction of `generated` `[N, n]` tokens equal to their predecessor (the prompt's last token for the first)."""
    previous = jnp.concatenate([prompts[:, -1:], generated[:, :-1]], axis=1)
    return jnp.mean((generated == previous).astype(jnp.float32))


def mismatch_metrics(tokens, reference, iterations, num_tokens: int):
    """The figures of `decode_metrics` from Jacobi `tokens`, greedy `reference` `[N, n]` and `iterations` `[N, blocks]`."""
    differ = tokens != reference
    it = iterations.astype(jnp.float32)
    later = it[:, 1:] if it.shape[1] > 1 else it[:, :1]
    return {
        "mismatched_prompts": jnp.sum(jnp.any(differ, axis=1)).astype(jnp.int32),
        "mismatched_tokens": jnp.sum(differ).astype(jnp.int32),
        "iterations_per_block": jnp.mean(it),
        "first_block_iterations": jnp.mean(it[:, 0]),
        "later_block_iterations": jnp.mean(later),
        "forward_passes_per_token": jnp.sum(it, axis=1).mean() / num_tokens,
    }


def _when(pred, fn, operand):
    """`fn(operand)` if `pred` else `operand`, as a `while_loop` run zero or one times.

    Under `vmap` (a batched `pred`) `lax.cond` evaluates both branches for everyone; this
    loop runs `fn` only if some member needs it (then once, kept for those members only).
    `fn` must return the structure of `operand`.
    """
    return jax.lax.while_loop(lambda c: c[0], lambda c: (jnp.zeros_like(c[0]), fn(c[1])), (pred, operand))[1]


class JacobiDecoding(Task):
    dynamic = ("seed",)
    constraints = {
        "model.d_model": POSITIVE_INT,
        "model.num_layers": POSITIVE_INT,
        "model.num_heads": POSITIVE_INT,
        "model.mlp_ratio": POSITIVE_INT,
        "data.seq_len": (lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
        "data.batch_size": POSITIVE_INT,
        "decode.prompt_length": POSITIVE_INT,
        "decode.num_tokens": POSITIVE_INT,
        "decode.block_size": POSITIVE_INT,
        "decode.fill_token": (lambda v: isinstance(v, int) and 0 <= v < VOCAB, f"a token id in [0, {VOCAB})"),
        "eval.num_prompts": POSITIVE_INT,
        "eval.valid_windows": POSITIVE_INT,
        "optim.lr": POSITIVE,
        "optim.weight_decay": NON_NEGATIVE,
        "train.ar_steps": POSITIVE_INT,
        "train.warmup_steps": (lambda v: isinstance(v, int) and v >= 0, "a non-negative integer"),
        "finetune.lr": POSITIVE,
        "finetune.num_prompts": POSITIVE_INT,
        "finetune.ar_weight": NON_NEGATIVE,
        "finetune.lm_weight": NON_NEGATIVE,
        "finetune.lm_batch_size": POSITIVE_INT,
        "finetune.label_smoothing": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "dtype": one_of("float32"),
    }

    def __init__(self, config):
        self.config = config
        self.dtype = config_dtype(config.dtype)
        m, dec, tr = config.model, config.decode, config.train
        if tr.ar_steps > tr.steps:
            raise ConfigError(f"'train.ar_steps' ({tr.ar_steps}) exceeds 'train.steps' ({tr.steps}).")
        if tr.ar_steps % tr.eval_every:
            raise ConfigError(
                f"'train.ar_steps' ({tr.ar_steps}) must be a multiple of 'train.eval_every' ({tr.eval_every}), "
                "so that an evaluation falls on the last step of AR training."
            )
        train_tokens, self.train_hash = corpus(CORPUS_TRAIN)
        valid_tokens, self.valid_hash = corpus(CORPUS_VALID)
        self.train_text = jnp.asarray(train_tokens)
        self.valid_text = jnp.asarray(valid_tokens)
        self.decode_length = dec.prompt_length + dec.num_tokens
        self.max_len = max(config.data.seq_len, self.decode_length)
        plen = dec.prompt_length
        # Evenly spaced, fixed windows of the validation text: the decoding prompts and the
        # validation-loss windows.
        span = len(valid_tokens) - self.max_len - 1
        starts = np.linspace(0, span, config.eval.num_prompts).astype(np.int64)
        self.eval_prompts = jnp.asarray(np.stack([valid_tokens[s : s + plen] for s in starts]))
        vstarts = np.linspace(0, len(valid_tokens) - config.data.seq_len - 1, config.eval.valid_windows).astype(np.int64)
        self.valid_windows = jnp.asarray(np.stack([valid_tokens[s : s + config.data.seq_len] for s in vstarts]))
        self.optimizer = build("optim", config.optim.to_dict())

    # ------------------------------------------------------------------ helpers
    def init_params(self, key):
        m = self.config.model
        return init_params(key, d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads,
                           mlp_ratio=m.mlp_ratio, max_len=self.max_len, dtype=self.dtype)

    def logits_fn(self, params):
        heads = self.config.model.num_heads
        return lambda tokens: logits(params, tokens, heads)

    def _windows(self, key, count, length):
        starts = jr.randint(key, (count,), 0, self.train_text.shape[0] - length)
        return jax.vmap(lambda s: jax.lax.dynamic_slice(self.train_text, (s,), (length,)))(starts)

    def _ar_lr(self, step):
        cfg = self.config
        lr, warm, total = cfg.optim.lr, cfg.train.warmup_steps, cfg.train.ar_steps
        s = step.astype(jnp.float32)
        ramp = jnp.minimum(1.0, (s + 1) / max(warm, 1))
        cosine = 0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(s - warm, 0, None) / max(total - warm, 1)))
        return lr * jnp.where(s < warm, ramp, cosine)

    def _decode(self, params):
        dec = self.config.decode
        return decode_metrics(self.logits_fn(params), self.eval_prompts, dec.num_tokens, dec.block_size, dec.fill_token)

    def _measure(self, params):
        out = self._decode(params)
        out["val_loss"] = lm_loss(self.logits_fn(params), self.valid_windows)
        return out

    # --------------------------------------------------------------------- task
    def init(self, hp, key):
        params = self.init_params(key)
        return {
            "params": params,
            "opt_state": self.optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
        }

    def _metrics_template(self):
        zero = jnp.zeros((), jnp.float32)
        return {k: zero for k in ("loss", "lm_loss", "consistency", "fixed_point_ar", "phase", "train_iterations_per_block")}

    def _update(self, state, loss_fn, lr, key):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], key)
        opt_state = set_learning_rate(state["opt_state"], lr)
        updates, opt_state = self.optimizer.update(grads, opt_state, state["params"])
        return optax.apply_updates(state["params"], updates), opt_state, loss, parts

    def _ar_phase(self, carry):
        state, metrics, key = carry
        cfg = self.config

        def loss_fn(params, key):
            windows = self._windows(key, cfg.data.batch_size, cfg.data.seq_len)
            loss = lm_loss(self.logits_fn(params), windows)
            return loss, {"lm_loss": loss}

        params, opt_state, loss, parts = self._update(state, loss_fn, self._ar_lr(state["step"]), key)
        metrics = dict(self._metrics_template(), loss=loss, lm_loss=parts["lm_loss"])
        return {**state, "params": params, "opt_state": opt_state}, metrics, key

    def _consistency_phase(self, carry):
        state, metrics, key = carry
        cfg, dec, ft = self.config, self.config.decode, self.config.finetune
        k_prompts, k_states, k_lm = jr.split(key, 3)
        prompts = self._windows(k_prompts, ft.num_prompts, dec.prompt_length)
        frozen = jax.lax.stop_gradient(state["params"])
        collect = lambda p: fpp.jacobi_trajectories(
            self.logits_fn(frozen), p, dec.num_tokens, dec.block_size, fill_token=dec.fill_token, check_causal=False
        )
        trajs = jax.vmap(collect)(prompts)

        def loss_fn(params, key):
            fn = self.logits_fn(params)
            keys = jr.split(k_states, ft.num_prompts)
            one = lambda tr, k: fpp.consistency_loss(fn, tr, key=k, ar_weight=ft.ar_weight, label_smoothing=ft.label_smoothing)
            total, parts = jax.vmap(one)(trajs, keys)
            lm = lm_loss(fn, self._windows(k_lm, ft.lm_batch_size, cfg.data.seq_len))
            loss = jnp.mean(total) + ft.lm_weight * lm
            return loss, {"lm_loss": lm, "consistency": jnp.mean(parts["consistency"]), "fixed_point_ar": jnp.mean(parts["ar"])}

        params, opt_state, loss, parts = self._update(state, loss_fn, jnp.asarray(ft.lr, jnp.float32), key)
        metrics = dict(
            self._metrics_template(), loss=loss, phase=jnp.ones((), jnp.float32),
            train_iterations_per_block=jnp.mean(trajs.iterations.astype(jnp.float32)), **parts,
        )
        return {**state, "params": params, "opt_state": opt_state}, metrics, key

    def train_step(self, state, hp, key):
        ar_steps = self.config.train.ar_steps
        step = state["step"]
        carry = (state, self._metrics_template(), key)
        carry = _when(step < ar_steps, self._ar_phase, carry)
        carry = _when(step >= ar_steps, self._consistency_phase, carry)
        state, metrics, _ = carry
        return {**state, "step": step + 1}, metrics

    def evaluate(self, state, hp):
        out = self._measure(state["params"])
        out["phase"] = (state["step"] > self.config.train.ar_steps).astype(jnp.int32)
        out["num_params"] = jnp.asarray(num_params(state["params"]), jnp.int32)
        out["corpus_hash32"] = jnp.asarray(int(self.train_hash[:7], 16), jnp.int32)
        return out


@register_task("jacobi_decoding")
def build_jacobi_decoding(config):
    return JacobiDecoding(config)


build_jacobi_decoding.dynamic = JacobiDecoding.dynamic
build_jacobi_decoding.constraints = JacobiDecoding.constraints
build_jacobi_decoding.headline = (
    "eval/iterations_per_block",
    "eval/mismatched_prompts",
    "eval/val_loss",
    "eval/forward_passes_per_token",
)
