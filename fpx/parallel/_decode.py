"""Jacobi decoding: greedy autoregressive decoding as a fixed point, n tokens per iteration.

Greedy decoding of a causal model, `y_i = argmax logits_fn(y_{<i})[i-1]`, is the fixed point
of the map that replaces every token of a block by the model's greedy prediction given the
current guess of all earlier tokens (Santilli et al., 2023; Kou et al., 2024, "CLLMs"). The
map has the *prefix property*: after `k` iterations the first `k` tokens of the block are
exact, so a block of `B` tokens needs at most `B` iterations, and the fixed point reached is
exactly the greedy autoregressive output (same `argmax`, ties broken identically).

`consistency_loss` is CLLM's consistency distillation: the model, fed any intermediate state
of a Jacobi trajectory, should predict what it predicts at the fixed point (global
consistency loss), plus the autoregressive loss on the fixed point that keeps the model's
own greedy output in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

from .. import _validate as checks
from .._errors import unvmapped_worst

LogitsFn = Callable[[Int[Array, " n"]], Float[Array, "n vocab"]]

# Seed of the random token sequences the causality probe feeds `logits_fn` (fixed, so the
# probe is deterministic and costs the same on every call).
_PROBE_SEED = 0x1AC0B1


class JacobiTrajectories(eqx.Module):
    """The Jacobi trajectories of one decoded prompt, as collected by `jacobi_trajectories`.

    **Attributes:**

    - `tokens`: int `[n]`, the prompt followed by the decoded tokens (`n = prompt_length +
      num_tokens`): the fixed point of every block, equal to greedy autoregressive decoding.
    - `states`: int `[num_blocks, block_size + 1, block_size]`; `states[b, k]` is block `b`
      after `k` Jacobi iterations (`k = 0`: its initial guess). Rows past
      `iterations[b]` repeat the final state; in the last block, entries past the end of the
      sequence are padding and carry no meaning.
    - `iterations`: int `[num_blocks]`, the Jacobi iterations each block took (between 1 and
      its size); `states[b, iterations[b]]` is the fixed point of block `b`.
    - `prompt_length`, `block_size`: static; block `b` covers positions
      `prompt_length + b * block_size` onward.

    Under `jax.vmap` of `jacobi_trajectories` every array gains a leading batch axis.

    ```python
    import jax, jax.numpy as jnp
    import fpx.parallel

    logits_fn = lambda tokens: jax.nn.one_hot((tokens + 1) % 9, 9)
    prompts = jnp.array([[1], [4]])
    batch = jax.vmap(lambda p: fpx.parallel.jacobi_trajectories(logits_fn, p, 5, block_size=2))(prompts)
    assert batch.tokens.shape == (2, 6) and batch.states.shape == (2, 3, 3, 2)
    assert batch.generated[1].tolist() == [5, 6, 7, 8, 0]
    assert batch.iterations.tolist() == [[2, 2, 1], [2, 2, 1]]
    ```
    """

    tokens: Int[Array, " n"]
    states: Int[Array, "blocks steps block"]
    iterations: Int[Array, " blocks"]
    prompt_length: int = eqx.field(static=True)
    block_size: int = eqx.field(static=True)

    @property
    def generated(self) -> Int[Array, " num_tokens"]:
        """The decoded tokens (without the prompt)."""
        return self.tokens[..., self.prompt_length :]


_EMPTY = "`{owner}(prompt=...)` is empty; decoding needs at least one prompt token (e.g. a BOS token)."


class _Carry(eqx.Module):
    buf: Array
    block: Array
    steps: Array
    accepted: Array
    iterations: Array
    broken_at: Array  # the first position whose accepted token was not reproduced, or -1
    states: Array | None


def _check_prompt(owner: str, prompt) -> Array:
    if isinstance(prompt, (list, tuple)) and len(prompt) == 0:
        raise ValueError(_EMPTY.format(owner=owner))
    try:
        prompt = prompt if isinstance(prompt, jax.Array) else jnp.asarray(prompt)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`{owner}(prompt=...)` must be a 1-D array of integer token ids, got {prompt!r}.") from e
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(
            f"`{owner}(prompt=...)` must hold integer token ids, got dtype {prompt.dtype}; "
            f"cast it, e.g. `jnp.asarray(prompt, jnp.int32)`."
        )
    if prompt.ndim != 1:
        raise ValueError(
            f"`{owner}(prompt=...)` must be a 1-D array of token ids, got shape {prompt.shape}; "
            f"for a batch of prompts use `jax.vmap`."
        )
    if prompt.shape[0] == 0:
        raise ValueError(_EMPTY.format(owner=owner))
    return prompt


def _vocab_size(owner: str, logits_fn, n: int, dtype) -> int:
    """Trace `logits_fn` on `[n]` tokens; its output must be floating `[n, vocab]`."""
    try:
        out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((n,), dtype))
    except Exception as e:
        e.add_note(f"(raised while tracing {owner}'s logits_fn on int tokens of shape ({n},))")
        raise
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(
            f"`{owner}`: logits_fn(tokens) must return one array of logits of shape [n, vocab], "
            f"got {type(out).__name__}."
        )
    if out.ndim != 2 or out.shape[0] != n or out.shape[1] < 1:
        raise ValueError(
            f"`{owner}`: logits_fn(tokens) must map tokens of shape [n] to logits of shape "
            f"[n, vocab] (row t scores the token at position t+1); for n={n} it returned shape "
            f"{out.shape}."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"`{owner}`: logits_fn(tokens) must return floating-point logits, got dtype {out.dtype}.")
    return int(out.shape[1])


def _check_token_range(owner: str, prompt: Array, vocab: int) -> None:
    if isinstance(prompt, jax.core.Tracer):
        return
    low, high = int(jnp.min(prompt)), int(jnp.max(prompt))
    if low < 0 or high >= vocab:
        raise ValueError(
            f"`{owner}(prompt=...)` holds token ids in [{low}, {high}], outside logits_fn's "
            f"vocabulary [0, {vocab})."
        )


_ADVICE = (
    "Jacobi decoding equals greedy decoding only for a causal logits_fn, whose row t may "
    "depend on tokens[:t+1] only (use a causal attention mask / left-padded convolution). "
    "Pass check_causal=False to skip this check."
)


def _probe_message(cut, position, change) -> str:
    return (
        f"logits_fn is not causal: on a random probe sequence its logits at position "
        f"{int(position)} changed (by up to {float(change):.3g}) when only tokens after position "
        f"{int(cut)} changed. {_ADVICE}"
    )


def _decoding_message(position) -> str:
    return (
        f"logits_fn is not causal (or not deterministic): during decoding, an accepted token "
        f"was not reproduced: the prediction for position {int(position)} changed while "
        f"tokens[:{int(position)}] stayed the same and only later tokens changed. {_ADVICE}"
    )


def _report(flag, values, message) -> None:
    """Raise `ValueError(message(*values))` now (concrete values) or at run time (traced,
    also under `jit` and `vmap`, with the worst values over the failed members)."""
    if not isinstance(flag, jax.core.Tracer) and not any(isinstance(v, jax.core.Tracer) for v in values):
        failed = np.asarray(flag)
        if failed.any():
            pick = (np.argmax(failed),) if failed.ndim else ()
            raise ValueError(message(*(np.asarray(v)[pick] for v in values)))
        return

    def check(any_failed, *worst):
        if bool(any_failed):
            raise ValueError(message(*worst))

    any_failed, worst = unvmapped_worst(flag, *values)
    jax.debug.callback(check, any_failed, *worst)


def _causality_probe(logits_fn, n: int, vocab: int, dtype):
    """Evaluate logits_fn on a random sequence and on copies re-drawn after a cut.

    Cuts at 0, (n-1)//2 and n-2: any row `t <= cut` that changes by more than rounding
    (64 eps of the largest logit) is a dependence on a later token. Returns
    `(violated, cut, position, change)` for the first violated cut.
    """
    if vocab < 2:
        zero = jnp.zeros((), jnp.int32)
        return jnp.zeros((), bool), zero, zero, jnp.zeros(())
    key_base, key_shift = jax.random.split(jax.random.key(_PROBE_SEED))
    base = jax.random.randint(key_base, (n,), 0, vocab).astype(dtype)
    shift = jax.random.randint(key_shift, (n,), 1, vocab).astype(dtype)
    cuts = sorted({0, (n - 1) // 2, n - 2})
    pos = jnp.arange(n)
    variants = [jnp.where(pos > c, (base + shift) % vocab, base) for c in cuts]
    logits = jax.vmap(logits_fn)(jnp.stack([base, *variants]))
    ref = logits[0]
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(ref)))
    tol = 64 * jnp.finfo(ref.dtype).eps * scale
    diff = jnp.max(jnp.abs(logits[1:] - ref[None]), axis=-1)  # [cuts, n]
    diff = jnp.where(pos[None, :] <= jnp.asarray(cuts)[:, None], diff, 0.0)
    change = jnp.max(diff, axis=-1)
    violated = change > tol
    first = jnp.argmax(violated)
    position = jnp.argmax(diff[first]).astype(jnp.int32)
    return jnp.any(violated), jnp.asarray(cuts, jnp.int32)[first], position, change[first]


def _setup(owner, logits_fn, prompt, num_tokens, block_size, fill_token):
    checks.function(owner, "logits_fn", logits_fn, what="a function logits_fn(tokens) -> logits")
    prompt = _check_prompt(owner, prompt)
    num_tokens = checks.integer(owner, "num_tokens", num_tokens, minimum=1)
    block_size = checks.integer(owner, "block_size", block_size, minimum=1)
    fill_token = checks.integer(owner, "fill_token", fill_token, minimum=0)
    n = prompt.shape[0] + num_tokens
    vocab = _vocab_size(owner, logits_fn, n, prompt.dtype)
    if fill_token >= vocab:
        raise ValueError(f"`{owner}(fill_token=...)` must be a token id in [0, {vocab}), got {fill_token}.")
    _check_token_range(owner, prompt, vocab)
    return prompt, num_tokens, min(block_size, num_tokens), fill_token, vocab


def _jacobi(logits_fn, prompt, num_tokens, block, fill_token, vocab, record):
    """The decoding loop: one `logits_fn` call per iteration, one `while_loop` for all blocks.

    The buffer holds the whole sequence (plus `block` padding entries so every block can be
    sliced at a fixed size); `logits_fn` always sees its first `n` entries. Every iteration
    replaces every undecided token (the current block *and* everything after it) by the
    greedy prediction from the current guess, so the next block starts from the guess the
    last iterations left there; the block's accepted prefix is frozen.
    """
    plen = prompt.shape[0]
    n = plen + num_tokens
    num_blocks = math.ceil(num_tokens / block)
    dtype = prompt.dtype
    positions = jnp.arange(n + block)
    offsets = jnp.arange(block)

    carry0 = _Carry(
        buf=jnp.full((n + block,), fill_token, dtype).at[:plen].set(prompt),
        block=jnp.zeros((), jnp.int32),
        steps=jnp.zeros((), jnp.int32),
        accepted=jnp.zeros((), jnp.int32),
        iterations=jnp.zeros((num_blocks,), jnp.int32),
        broken_at=jnp.full((), -1, jnp.int32),
        states=jnp.zeros((num_blocks, block + 1, block), dtype) if record else None,
    )

    def cond(c):
        return c.block < num_blocks

    def body(c):
        start = plen + c.block * block
        size = jnp.minimum(block, n - start)
        logits = logits_fn(c.buf[:n])
        prediction = jnp.argmax(logits, axis=-1).astype(dtype)  # row t: the token at t+1
        proposal = jnp.concatenate([c.buf[:1], prediction[:-1], c.buf[n:]])
        frozen_end = start + c.accepted
        new = jnp.where((positions >= frozen_end) & (positions < n), proposal, c.buf)
        # An accepted (exact) token is recomputed from the same exact prefix: if the model
        # now predicts something else, a later token changed it.
        changed = (positions >= start) & (positions < frozen_end) & (proposal != c.buf)
        broken_at = jnp.where((c.broken_at < 0) & jnp.any(changed), jnp.argmax(changed), c.broken_at)
        old_block = jax.lax.dynamic_slice(c.buf, (start,), (block,))
        new_block = jax.lax.dynamic_slice(new, (start,), (block,))
        same = (old_block == new_block) | (offsets >= size)
        # The longest unchanged prefix is exact, and so is the token after it (its inputs
        # are exact): that many tokens are accepted (fast-forward).
        matched = jnp.sum(jnp.cumprod(same.astype(jnp.int32)))
        accepted = jnp.minimum(matched + 1, size).astype(jnp.int32)
        steps = c.steps + 1
        done = accepted >= size
        states = c.states
        if record:
            first = jnp.where(c.steps == 0, old_block, states[c.block, 0])
            states = states.at[c.block, 0].set(first).at[c.block, steps].set(new_block)
        return _Carry(
            buf=new,
            block=c.block + done.astype(jnp.int32),
            steps=jnp.where(done, 0, steps),
            accepted=jnp.where(done, 0, accepted),
            iterations=c.iterations.at[c.block].set(steps),
            broken_at=broken_at.astype(jnp.int32),
            states=states,
        )

    final = jax.lax.while_loop(cond, body, carry0)
    tokens = final.buf[:n]
    states = None
    if record:
        rows = jnp.arange(block + 1)[None, :, None]
        last = jnp.take_along_axis(final.states, final.iterations[:, None, None], axis=1)
        states = jnp.where(rows <= final.iterations[:, None, None], final.states, last)
    return tokens, final.iterations, states, final.broken_at


# Compiled separately: the probe of one logits_fn is reused by every call (e.g. other block
# sizes) while the function is the same object without closed-over arrays.
_jacobi_compiled = eqx.filter_jit(_jacobi)
_probe_compiled = eqx.filter_jit(_causality_probe)


def _run(logits_fn, prompt, num_tokens, block, fill_token, vocab, check_causal, record):
    """Compile the loop once per call (closed-over arrays of `logits_fn` become inputs) and
    report causality violations: eagerly as a ValueError, or at run time when traced."""
    n = prompt.shape[0] + num_tokens
    fn = eqx.filter_closure_convert(logits_fn, jax.ShapeDtypeStruct((n,), prompt.dtype))
    tokens, iterations, states, broken_at = _jacobi_compiled(
        fn, prompt, num_tokens, block, fill_token, vocab, record
    )
    if check_causal:
        violated, cut, position, change = _probe_compiled(fn, n, vocab, prompt.dtype)
        _report(violated, (cut, position, change), _probe_message)
        _report(broken_at >= 0, (broken_at,), _decoding_message)
    return tokens, iterations, states


def jacobi_decode(
    logits_fn: LogitsFn,
    prompt: Int[Array, " prompt_length"],
    num_tokens: int,
    block_size: int = 16,
    *,
    fill_token: int = 0,
    check_causal: bool = True,
) -> tuple[Int[Array, " num_tokens"], dict[str, Array]]:
    """Greedy decoding by Jacobi iteration, block by block: exactly greedy autoregressive output.

    **Arguments:**

    - `logits_fn`: a causal model, `logits_fn(tokens) -> logits` mapping int tokens of shape
      `[n]` to logits of shape `[n, vocab]`, whose row `t` scores the token at position
      `t + 1` and depends on `tokens[:t+1]` only. It is always called on the full length
      `n = len(prompt) + num_tokens` (positions not yet decoded hold guesses, which a causal
      model ignores), and may close over traced parameters.
    - `prompt`: int `[prompt_length]` token ids, at least one (e.g. a BOS token).
    - `num_tokens`: how many tokens to decode.
    - `block_size`: tokens decoded per block (clamped to `num_tokens`; the last block may be
      shorter).
    - `fill_token`: the initial guess of every undecided position.
    - `check_causal`: probe `logits_fn` for causality and check, while decoding, that every
      accepted token is reproduced (below).

    **The iteration.** Block `b` covers positions `s .. s+B-1`. Each iteration is one call of
    `logits_fn` on the current sequence, and every undecided token (the block and all later
    positions) is replaced by the greedy prediction `argmax logits[t-1]` from the current
    guess. Because the model is causal, the first token of the block is exact after one
    iteration and each unchanged prefix is exact: after an iteration whose longest unchanged
    prefix of the block has `m` tokens, `m + 1` tokens are exact and are accepted and frozen
    (fast-forward). The block is done once all its tokens are accepted: at most `B`
    iterations (the prefix property), one if the guess already was the fixed point. The next
    block starts from the guesses the last iterations left there.

    **Causality check** (`check_causal=True`, the default): `logits_fn` is evaluated on a
    fixed random token sequence and on three copies whose tokens after position 0, `(n-1)//2`
    and `n-2` are re-drawn (one batched call, `jax.vmap(logits_fn)`); a row at or before the
    cut that changes by more than rounding (64 machine epsilons of the largest logit) raises
    a `ValueError` naming the position. While decoding, an accepted token that the model no
    longer predicts from its (unchanged) prefix raises the same way. Called eagerly, the
    error is raised before `jacobi_decode` returns; under `jax.jit` / `jax.vmap` (traced
    values) it is raised at run time, wrapped in JAX's `JaxRuntimeError` carrying the same
    message. The check costs four extra evaluations of `logits_fn` per call.

    **Returns:** `(tokens, stats)` with `tokens` int `[num_tokens]` (the decoded tokens,
    without the prompt, of the prompt's dtype) and `stats`:

    - `iterations_per_block`: int `[num_blocks]`, each in `[1, block size]`;
    - `num_forward_passes`: the total number of `logits_fn` calls for decoding (greedy
      autoregressive decoding needs `num_tokens`), not counting the causality probe.

    Under `jax.vmap` over prompts (of one length) every member decodes its own blocks; the
    loop runs until the slowest member is done.

    ```python
    import jax, jax.numpy as jnp
    import fpx.parallel

    vocab = 11

    def logits_fn(tokens):  # causal: the next token is (2 * previous + 1) % vocab
        return jax.nn.one_hot((2 * tokens + 1) % vocab, vocab)

    prompt = jnp.array([3])
    tokens, stats = fpx.parallel.jacobi_decode(logits_fn, prompt, num_tokens=8, block_size=4)
    assert (tokens == fpx.parallel.greedy_decode(logits_fn, prompt, 8)).all()
    assert tokens.tolist() == [7, 4, 9, 8, 6, 2, 5, 0]
    assert stats["iterations_per_block"].tolist() == [4, 4]  # each token depends on the last
    ```
    """
    owner = "jacobi_decode"
    if not isinstance(check_causal, (bool, np.bool_)):
        raise TypeError(f"`{owner}(check_causal=...)` must be True or False, got {check_causal!r}.")
    prompt, num_tokens, block, fill_token, vocab = _setup(owner, logits_fn, prompt, num_tokens, block_size, fill_token)
    tokens, iterations, _ = _run(logits_fn, prompt, num_tokens, block, fill_token, vocab, bool(check_causal), False)
    passes = jnp.sum(iterations).astype(jnp.int32)
    stats = {"iterations_per_block": iterations, "num_forward_passes": passes}
    return tokens[prompt.shape[0] :], stats


def jacobi_trajectories(
    logits_fn: LogitsFn,
    prompt: Int[Array, " prompt_length"],
    num_tokens: int,
    block_size: int = 16,
    *,
    fill_token: int = 0,
    check_causal: bool = True,
) -> JacobiTrajectories:
    """Decode like `jacobi_decode` and keep every intermediate state of every block.

    The arguments are those of `jacobi_decode`. The result, a `JacobiTrajectories`, is the
    training data of `consistency_loss` (CLLM collects it once with the model to be
    fine-tuned). Under `jax.vmap` over prompts it holds a batch of trajectories.

    ```python
    import jax, jax.numpy as jnp
    import fpx.parallel

    vocab = 7
    logits_fn = lambda tokens: jax.nn.one_hot((tokens + 1) % vocab, vocab)
    traj = fpx.parallel.jacobi_trajectories(logits_fn, jnp.array([2]), num_tokens=3, block_size=3)
    assert traj.generated.tolist() == [3, 4, 5]
    assert traj.iterations.tolist() == [3]
    # From the all-zero guess, one more token is exact after each iteration:
    assert traj.states[0].tolist() == [[0, 0, 0], [3, 1, 1], [3, 4, 2], [3, 4, 5]]
    ```
    """
    owner = "jacobi_trajectories"
    if not isinstance(check_causal, (bool, np.bool_)):
        raise TypeError(f"`{owner}(check_causal=...)` must be True or False, got {check_causal!r}.")
    prompt, num_tokens, block, fill_token, vocab = _setup(owner, logits_fn, prompt, num_tokens, block_size, fill_token)
    tokens, iterations, states = _run(logits_fn, prompt, num_tokens, block, fill_token, vocab, bool(check_causal), True)
    return JacobiTrajectories(
        tokens=tokens, states=states, iterations=iterations, prompt_length=prompt.shape[0], block_size=block
    )


def greedy_decode(
    logits_fn: LogitsFn,
    prompt: Int[Array, " prompt_length"],
    num_tokens: int,
    *,
    fill_token: int = 0,
) -> Int[Array, " num_tokens"]:
    """Greedy autoregressive decoding, one token per `logits_fn` call: the reference.

    `logits_fn` is called `num_tokens` times on the full length `len(prompt) + num_tokens`
    (undecided positions hold `fill_token`), exactly the calls `jacobi_decode` makes, and
    token `i` is `argmax logits[len(prompt) + i - 1]` (the first maximum on ties, like
    `jacobi_decode`). Returns the `num_tokens` decoded tokens (without the prompt).

    ```python
    import jax, jax.numpy as jnp
    import fpx.parallel

    logits_fn = lambda tokens: jax.nn.one_hot((tokens + 2) % 5, 5)
    assert fpx.parallel.greedy_decode(logits_fn, jnp.array([0]), 4).tolist() == [2, 4, 1, 3]
    ```
    """
    owner = "greedy_decode"
    checks.function(owner, "logits_fn", logits_fn, what="a function logits_fn(tokens) -> logits")
    prompt = _check_prompt(owner, prompt)
    num_tokens = checks.integer(owner, "num_tokens", num_tokens, minimum=1)
    fill_token = checks.integer(owner, "fill_token", fill_token, minimum=0)
    plen = prompt.shape[0]
    n = plen + num_tokens
    vocab = _vocab_size(owner, logits_fn, n, prompt.dtype)
    if fill_token >= vocab:
        raise ValueError(f"`{owner}(fill_token=...)` must be a token id in [0, {vocab}), got {fill_token}.")
    _check_token_range(owner, prompt, vocab)
    fn = eqx.filter_closure_convert(logits_fn, jax.ShapeDtypeStruct((n,), prompt.dtype))
    return _greedy_compiled(fn, prompt, num_tokens, fill_token)


@eqx.filter_jit
def _greedy_compiled(logits_fn, prompt, num_tokens, fill_token):
    plen = prompt.shape[0]
    buf = jnp.full((plen + num_tokens,), fill_token, prompt.dtype).at[:plen].set(prompt)

    def step(i, buf):
        row = jax.lax.dynamic_index_in_dim(logits_fn(buf), plen + i - 1, keepdims=False)
        return buf.at[plen + i].set(jnp.argmax(row).astype(buf.dtype))

    return jax.lax.fori_loop(0, num_tokens, step, buf)[plen:]


def _kl_rows(target_logits, logits):
    """KL(softmax(target) || softmax(logits)) per row; exactly 0 where the rows are equal."""
    log_p = jax.nn.log_softmax(target_logits, axis=-1)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def consistency_loss(
    logits_fn: LogitsFn,
    trajectories: JacobiTrajectories,
    *,
    key: PRNGKeyArray | None = None,
    ar_weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[Scalar, dict[str, Scalar]]:
    """CLLM consistency distillation on collected Jacobi trajectories (Kou et al., 2024).

    `loss = consistency + ar_weight * ar`, with

    - `consistency` (CLLM's *global* consistency loss): for an intermediate state `y` of a
      block (any `states[b, k]` with `k < iterations[b]`), the sequence `u` is the fixed
      point with that block replaced by `y`. At each position `t` of the block whose input
      prefix `u[:t+1]` differs from the fixed point `u*` (earlier rows are equal for a causal
      model and carry no signal; CLLM masks them too), the loss is
      `KL(softmax(logits_fn(u*)[t]) || softmax(logits_fn(u)[t]))`, with the fixed point's
      logits held constant (`stop_gradient`): from anywhere on the trajectory the model
      should predict what it predicts at the fixed point. The average is over all such rows
      of all states used. Being a KL divergence (CLLM's soft cross-entropy minus the
      target's entropy: same gradient), it is 0 exactly when every state already predicts
      like the fixed point, and 0 when no state differs from it.
    - `ar`: the autoregressive cross-entropy of `logits_fn(tokens)` predicting the decoded
      tokens `tokens[prompt_length:]` (the fixed point the trajectories were collected
      for), with optional label smoothing; it keeps the fine-tuned model's greedy output
      where it was. (CLLM uses `ar_weight=10`, `label_smoothing=0.1`.)

    **Arguments:**

    - `logits_fn`: the model being trained (close over its parameters and differentiate
      with respect to them).
    - `trajectories`: one `JacobiTrajectories` from `jacobi_trajectories` (for a batch,
      `jax.vmap` this function and average).
    - `key`: if given, one intermediate state per block is drawn at random (CLLM's
      estimator; `num_blocks + 1` calls of `logits_fn`); if `None`, every intermediate
      state is used (`num_blocks * (block_size + 1) + 1` calls, batched with `jax.vmap`).
    - `ar_weight`, `label_smoothing`: as above.

    **Returns:** `(loss, {"consistency": ..., "ar": ...})`.

    ```python
    import jax, jax.numpy as jnp
    import fpx.parallel

    vocab = 5
    def model(w, tokens):  # causal: a learned table of next-token logits
        return w[tokens]

    w = 3.0 * jax.nn.one_hot((jnp.arange(vocab) + 1) % vocab, vocab)
    traj = fpx.parallel.jacobi_trajectories(lambda t: model(w, t), jnp.array([0]), 6, block_size=3)
    loss, parts = fpx.parallel.consistency_loss(lambda t: model(w, t), traj)
    assert parts["consistency"] > 0 and parts["ar"] > 0
    grad = jax.grad(lambda w: fpx.parallel.consistency_loss(lambda t: model(w, t), traj)[0])(w)
    assert jnp.isfinite(grad).all() and jnp.abs(grad).max() > 0
    ```
    """
    owner = "consistency_loss"
    checks.function(owner, "logits_fn", logits_fn, what="a function logits_fn(tokens) -> logits")
    if not isinstance(trajectories, JacobiTrajectories):
        raise TypeError(
            f"`{owner}(trajectories=...)` must be the JacobiTrajectories returned by "
            f"fpx.parallel.jacobi_trajectories, got {type(trajectories).__name__}."
        )
    if trajectories.tokens.ndim != 1:
        raise ValueError(
            f"`{owner}` takes the trajectories of one prompt (tokens of shape [n]), got tokens of "
            f"shape {trajectories.tokens.shape}; for a batch, `jax.vmap` consistency_loss over it."
        )
    checks.real(owner, "ar_weight", ar_weight, low=0)
    checks.real(owner, "label_smoothing", label_smoothing, low=0, high=1)
    n = trajectories.tokens.shape[0]
    fn = eqx.filter_closure_convert(logits_fn, jax.ShapeDtypeStruct((n,), trajectories.tokens.dtype))
    return _consistency(fn, trajectories, key, ar_weight, label_smoothing)


@eqx.filter_jit
def _consistency(logits_fn, trajectories, key, ar_weight, label_smoothing):
    tokens, states, iterations = trajectories.tokens, trajectories.states, trajectories.iterations
    plen, block = trajectories.prompt_length, trajectories.block_size
    n = tokens.shape[0]
    num_blocks = states.shape[0]
    starts = plen + block * jnp.arange(num_blocks)
    sizes = jnp.minimum(block, n - starts)

    if key is None:
        block_ids = jnp.repeat(jnp.arange(num_blocks), block + 1)
        steps = jnp.tile(jnp.arange(block + 1), num_blocks)
        used = steps < iterations[block_ids]
    else:
        block_ids = jnp.arange(num_blocks)
        steps = jnp.floor(jax.random.uniform(key, (num_blocks,)) * iterations).astype(jnp.int32)
        steps = jnp.minimum(steps, iterations - 1)
        used = jnp.ones((num_blocks,), bool)

    full_logits = logits_fn(tokens)
    target = jax.lax.stop_gradient(full_logits)
    offsets = jnp.arange(block)
    rows = jnp.arange(n)

    def one_state(b, k, use):
        start, size = starts[b], sizes[b]
        state = states[b, k]
        u = tokens.at[start + offsets].set(state, mode="drop")
        differs = (state != tokens[jnp.minimum(start + offsets, n - 1)]) & (offsets < size)
        first = jnp.where(jnp.any(differs), jnp.argmax(differs), block)
        # Row t = start + i - 1 scores block token i; its prefix differs once i - 1 >= first.
        mask = use & (rows >= start + first) & (rows <= start + size - 2)
        kl = _kl_rows(target, logits_fn(u))
        return jnp.sum(jnp.where(mask, kl, 0.0)), jnp.sum(mask)

    total, count = jax.vmap(one_state)(block_ids, steps, used)
    consistency = jnp.sum(total) / jnp.maximum(jnp.sum(count), 1).astype(total.dtype)

    log_q = jax.nn.log_softmax(full_logits[plen - 1 : n - 1], axis=-1)
    labels = tokens[plen:]
    nll = -jnp.take_along_axis(log_q, labels[:, None], axis=-1)[:, 0]
    smooth = -jnp.mean(log_q, axis=-1)
    ar = jnp.mean((1.0 - label_smoothing) * nll + label_smoothing * smooth)
    loss = consistency + ar_weight * ar
    return loss, {"consistency": consistency, "ar": ar}

