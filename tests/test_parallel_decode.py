"""Jacobi decoding (`fpx.parallel.jacobi_decode`) against greedy autoregressive decoding.

Test models (plain JAX, all causal unless named otherwise):

- a one-layer causal transformer with random weights (vocab 23, width 16);
- a causal convolution: the logits at `t` are a sum of tables of tokens `t`, `t-1`, `t-2`;
- a tie-heavy model: integer-valued logits from a causal cumulative sum, so the argmax
  has ties on most rows (they must be broken identically, first maximum);
- the successor model `next = (previous + 1) % V`: every token depends on the one before,
  so each block of `B` tokens takes exactly `B` iterations (known answer, below);
- the constant model: one iteration per block once the guess is right (two for the first
  block when the guess starts wrong).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fpx.parallel as fp

VOCAB = 23


def make_transformer(key, vocab=VOCAB, width=16, max_len=64, scale=2.0):
    ks = jax.random.split(key, 8)
    normal = lambda k, shape, s: s * jax.random.normal(k, shape)
    params = {
        "emb": normal(ks[0], (vocab, width), 1.0),
        "pos": normal(ks[1], (max_len, width), 0.5),
        "wq": normal(ks[2], (width, width), scale / math.sqrt(width)),
        "wk": normal(ks[3], (width, width), scale / math.sqrt(width)),
        "wv": normal(ks[4], (width, width), 1 / math.sqrt(width)),
        "w1": normal(ks[5], (width, 2 * width), 1 / math.sqrt(width)),
        "w2": normal(ks[6], (2 * width, width), 1 / math.sqrt(2 * width)),
        "out": normal(ks[7], (width, vocab), scale),
    }

    def logits_fn(params, tokens, causal=True):
        n = tokens.shape[0]
        h = params["emb"][tokens] + params["pos"][:n]
        scores = (h @ params["wq"]) @ (h @ params["wk"]).T / math.sqrt(width)
        if causal:
            scores = jnp.where(jnp.tril(jnp.ones((n, n), bool)), scores, -jnp.inf)
        h = h + jax.nn.softmax(scores, axis=-1) @ (h @ params["wv"])
        h = h + jnp.tanh(h @ params["w1"]) @ params["w2"]
        return h @ params["out"]

    return params, logits_fn


PARAMS, TRANSFORMER = make_transformer(jax.random.key(0))


def transformer(tokens):
    return TRANSFORMER(PARAMS, tokens)


_CONV = jax.random.normal(jax.random.key(1), (3, VOCAB, VOCAB))


def conv(tokens):
    padded = jnp.concatenate([jnp.zeros((2,), tokens.dtype), tokens])
    n = tokens.shape[0]
    return _CONV[0][padded[2:]] + _CONV[1][padded[1 : n + 1]] + _CONV[2][padded[:n]]


def ties(tokens):
    c = jnp.cumsum(tokens)
    return ((c[:, None] * (jnp.arange(VOCAB)[None, :] + 1)) % 3).astype(jnp.float64)


def successor(tokens, vocab=VOCAB):
    return jax.nn.one_hot((tokens + 1) % vocab, vocab)


def constant(tokens, token=5):
    return jnp.broadcast_to(jax.nn.one_hot(token, VOCAB), (tokens.shape[0], VOCAB))


PROMPTS = jax.random.randint(jax.random.key(2), (8, 5), 0, VOCAB)


def _decode_batch(fn, prompts, num_tokens, block_size):
    # The causality probe (an extra copy of the model to compile) is exercised, also under
    # jit and vmap, by the causality tests below.
    run = jax.jit(jax.vmap(lambda p: fp.jacobi_decode(fn, p, num_tokens, block_size, check_causal=False)))
    return run(prompts)


def _greedy_batch(fn, prompts, num_tokens):
    return jax.jit(jax.vmap(lambda p: fp.greedy_decode(fn, p, num_tokens)))(prompts)


@pytest.mark.parametrize("name", ["transformer", "conv", "ties"])
def test_equals_greedy_for_every_block_size_under_jit_and_vmap(name):
    fn = {"transformer": transformer, "conv": conv, "ties": ties}[name]
    num_tokens = 20
    expected = np.asarray(_greedy_batch(fn, PROMPTS, num_tokens))
    if name == "ties":  # the test is only meaningful if ties actually occur
        logits = np.asarray(jax.vmap(fn)(jnp.concatenate([PROMPTS, jnp.asarray(expected)], axis=1)))
        top = logits.max(axis=-1, keepdims=True)
        assert np.mean(np.sum(logits == top, axis=-1) > 1) > 0.5
    for block_size in [1, 3, 8, 40] if name == "transformer" else [3, 8]:
        tokens, stats = _decode_batch(fn, PROMPTS, num_tokens, block_size)
        np.testing.assert_array_equal(np.asarray(tokens), expected, err_msg=f"block_size={block_size}")
        block = min(block_size, num_tokens)
        iters = np.asarray(stats["iterations_per_block"])
        sizes = [min(block, num_tokens - b * block) for b in range(math.ceil(num_tokens / block))]
        assert iters.shape == (PROMPTS.shape[0], len(sizes))
        assert np.all(iters >= 1) and np.all(iters <= np.asarray(sizes)[None, :])
        np.testing.assert_array_equal(np.asarray(stats["num_forward_passes"]), iters.sum(axis=1))
        if block_size == 1:
            assert np.all(iters == 1)
        if name == "transformer" and block_size == 8:
            # A random transformer often repeats itself: some iterations accept several tokens.
            assert int(np.sum(stats["num_forward_passes"])) < PROMPTS.shape[0] * num_tokens


def test_eager_single_prompt_matches_greedy():
    prompt = PROMPTS[0]
    tokens, stats = fp.jacobi_decode(transformer, prompt, 24, block_size=8)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(fp.greedy_decode(transformer, prompt, 24)))
    assert tokens.dtype == prompt.dtype and tokens.shape == (24,)
    assert stats["iterations_per_block"].shape == (3,)
    assert int(stats["num_forward_passes"]) == int(jnp.sum(stats["iterations_per_block"]))


@pytest.mark.parametrize("block_size", [4, 6])
def test_successor_model_needs_exactly_block_size_iterations(block_size):
    # With guess 0 everywhere, after K iterations the undecided positions all hold K % V while
    # the exact token there differs by a shift: nothing is ever right by accident as long as
    # the last prompt token is not V - 1, so exactly one more token is exact per iteration.
    prompt = jnp.array([4, 7])
    num_tokens = 14
    tokens, stats = fp.jacobi_decode(successor, prompt, num_tokens, block_size)
    assert tokens.tolist() == [(7 + i + 1) % VOCAB for i in range(num_tokens)]
    sizes = [min(block_size, num_tokens - b * block_size) for b in range(math.ceil(num_tokens / block_size))]
    assert stats["iterations_per_block"].tolist() == sizes
    assert int(stats["num_forward_passes"]) == num_tokens


def test_constant_model_needs_one_or_two_iterations():
    # Guess 0 is wrong for a model that always says 5: two iterations for the first block
    # (the second confirms the fixed point), then the guesses left behind are already right.
    tokens, stats = fp.jacobi_decode(constant, jnp.array([1, 2, 3]), 12, block_size=4)
    assert tokens.tolist() == [5] * 12
    assert stats["iterations_per_block"].tolist() == [2, 1, 1]
    # With the right guess, one iteration per block.
    tokens, stats = fp.jacobi_decode(constant, jnp.array([1, 2, 3]), 12, block_size=4, fill_token=5)
    assert stats["iterations_per_block"].tolist() == [1, 1, 1]


def _peeks_ahead(tokens):
    """Not causal: row t also sees token t + 1 (a bidirectional attention bug in miniature)."""
    following = jnp.concatenate([tokens[1:], tokens[:1]])
    return jax.nn.one_hot((tokens + following) % VOCAB, VOCAB)


def test_non_causal_logits_fn_raises_eagerly():
    message = r"logits_fn is not causal: on a random probe sequence its logits at position \d+ changed"
    with pytest.raises(ValueError, match=message):
        fp.jacobi_decode(_peeks_ahead, jnp.array([1, 2]), 8, block_size=4)
    bidirectional = lambda t: TRANSFORMER(PARAMS, t, causal=False)
    with pytest.raises(ValueError, match="not causal"):
        fp.jacobi_decode(bidirectional, jnp.array([1, 2]), 8, block_size=4)
    # Opting out skips the check (the output is then whatever the iteration converged to).
    tokens, _ = fp.jacobi_decode(_peeks_ahead, jnp.array([1, 2]), 8, block_size=4, check_causal=False)
    assert tokens.shape == (8,)


def test_non_causal_logits_fn_raises_at_run_time_under_jit_and_vmap():
    run = jax.jit(lambda p: fp.jacobi_decode(_peeks_ahead, p, 8, block_size=4)[0])
    with pytest.raises(Exception, match="logits_fn is not causal"):
        jax.block_until_ready(run(jnp.array([1, 2])))
    batched = jax.jit(jax.vmap(lambda p: fp.jacobi_decode(_peeks_ahead, p, 8, block_size=4)[0]))
    with pytest.raises(Exception, match="logits_fn is not causal"):
        jax.block_until_ready(batched(PROMPTS[:3, :2]))
    # A causal model under the same transformations raises nothing.
    good = jax.jit(jax.vmap(lambda p: fp.jacobi_decode(conv, p, 8, block_size=4)[0]))
    jax.block_until_ready(good(PROMPTS[:3, :2]))


def _sneaky(tokens):
    """Causal everywhere except that row 0 reacts to the *last* token being 9.

    The probe's random sequences happen not to show it (checked below), but decoding does:
    with the guess 0 and the successor rule, the last position holds 9 after nine
    iterations, which changes the already accepted first decoded token.
    """
    n = tokens.shape[0]
    bump = jnp.where((jnp.arange(n) == 0) & (tokens[-1] == 9), 1, 0)
    return jax.nn.one_hot((tokens + 1 + bump) % VOCAB, VOCAB)


def test_accepted_token_that_changes_is_reported_during_decoding():
    message = r"during decoding, an accepted token was not reproduced: the prediction for position 1 changed"
    with pytest.raises(ValueError, match=message):
        fp.jacobi_decode(_sneaky, jnp.array([3]), 12, block_size=12)


def test_bad_arguments_raise_clear_errors():
    prompt = jnp.array([1, 2, 3])
    with pytest.raises(ValueError, match=r"`jacobi_decode\(num_tokens=...\)` must be a positive integer"):
        fp.jacobi_decode(conv, prompt, 0)
    with pytest.raises(ValueError, match=r"`jacobi_decode\(num_tokens=...\)` must be a positive integer"):
        fp.jacobi_decode(conv, prompt, -3)
    with pytest.raises(ValueError, match=r"`jacobi_decode\(block_size=...\)` must be a positive integer"):
        fp.jacobi_decode(conv, prompt, 8, block_size=0)
    with pytest.raises(TypeError, match=r"`jacobi_decode\(prompt=...\)` must hold integer token ids, got dtype float"):
        fp.jacobi_decode(conv, jnp.array([1.0, 2.0]), 8)
    with pytest.raises(ValueError, match="is empty"):
        fp.jacobi_decode(conv, jnp.zeros((0,), jnp.int32), 8)
    with pytest.raises(ValueError, match="must be a 1-D array of token ids, got shape"):
        fp.jacobi_decode(conv, jnp.zeros((2, 3), jnp.int32), 8)
    with pytest.raises(ValueError, match=r"token ids in \[1, 99\], outside logits_fn's vocabulary \[0, 23\)"):
        fp.jacobi_decode(conv, jnp.array([1, 99]), 8)
    with pytest.raises(ValueError, match=r"fill_token=...\)` must be a token id in \[0, 23\)"):
        fp.jacobi_decode(conv, prompt, 8, fill_token=23)
    with pytest.raises(TypeError, match="must be a function"):
        fp.jacobi_decode("model", prompt, 8)
    with pytest.raises(ValueError, match=r"must map tokens of shape \[n\] to logits of shape \[n, vocab\]"):
        fp.jacobi_decode(lambda t: jnp.zeros((VOCAB,)), prompt, 8)
    with pytest.raises(TypeError, match="floating-point logits"):
        fp.jacobi_decode(lambda t: jnp.zeros((t.shape[0], VOCAB), jnp.int32), prompt, 8)
    with pytest.raises(ValueError, match=r"`greedy_decode\(num_tokens=...\)` must be a positive integer"):
        fp.greedy_decode(conv, prompt, 0)


# ----------------------------------------------------------------------------------------
# Trajectories and the consistency loss
# ----------------------------------------------------------------------------------------


def test_trajectories_record_every_state_and_end_at_the_fixed_point():
    prompt = PROMPTS[1]
    traj = fp.jacobi_trajectories(transformer, prompt, 13, block_size=5)
    tokens, stats = fp.jacobi_decode(transformer, prompt, 13, block_size=5)
    np.testing.assert_array_equal(np.asarray(traj.generated), np.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(traj.iterations), np.asarray(stats["iterations_per_block"]))
    assert traj.states.shape == (3, 6, 5)
    states = np.asarray(traj.states)
    for b, k in enumerate(np.asarray(traj.iterations)):
        start = 5 + 5 * b
        size = min(5, 18 - start)
        fixed = np.asarray(traj.tokens)[start : start + size]
        np.testing.assert_array_equal(states[b, k, :size], fixed)
        np.testing.assert_array_equal(states[b, k:, :size], np.broadcast_to(fixed, (6 - k, size)))
        # The prefix property: after j iterations at least j tokens are final.
        for j in range(k + 1):
            assert np.all(states[b, j, : min(j, size)] == fixed[: min(j, size)])


def _position_table(w):
    """Causal and trivially so: the logits of row t are `w[t]`, whatever the tokens."""
    return lambda tokens: w[: tokens.shape[0]]


def test_consistency_loss_is_zero_for_a_model_that_ignores_its_context():
    w = jax.random.normal(jax.random.key(3), (12, VOCAB))
    fn = _position_table(w)
    traj = fp.jacobi_trajectories(fn, jnp.array([1, 2]), 10, block_size=4)
    # Everything is exact after one iteration: the first block needs a second one to see its
    # guess confirmed, the later ones start from the exact guesses that iteration left.
    assert traj.iterations.tolist() == [2, 1, 1]
    loss, parts = fp.consistency_loss(fn, traj)
    assert float(parts["consistency"]) == 0.0
    # The AR part: the mean cross-entropy of rows 1..10 at their own argmax.
    log_q = jax.nn.log_softmax(w[1:11], axis=-1)
    expected_ar = -jnp.mean(jnp.max(log_q, axis=-1))
    np.testing.assert_allclose(float(parts["ar"]), float(expected_ar), rtol=1e-12)
    np.testing.assert_allclose(float(loss), float(expected_ar), rtol=1e-12)
    # Label smoothing: (1 - e) CE + e * mean over the vocabulary of -log q.
    _, smoothed = fp.consistency_loss(fn, traj, label_smoothing=0.1, ar_weight=10.0)
    expected = jnp.mean(0.9 * -jnp.max(log_q, axis=-1) + 0.1 * -jnp.mean(log_q, axis=-1))
    np.testing.assert_allclose(float(smoothed["ar"]), float(expected), rtol=1e-12)


def test_consistency_loss_is_zero_when_no_state_differs_from_the_fixed_point():
    fn = lambda t: constant(t)
    traj = fp.jacobi_trajectories(fn, jnp.array([1]), 8, block_size=4, fill_token=5)
    assert traj.iterations.tolist() == [1, 1]
    _, parts = fp.consistency_loss(fn, traj)
    assert float(parts["consistency"]) == 0.0


def _bigram(params, tokens):
    """A causal bigram-plus-position model: logits[t] = E[tokens[t]] + P[t]."""
    return params["E"][tokens] + params["P"][: tokens.shape[0]]


def _bigram_params(seed, length):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"E": 2.0 * jax.random.normal(k1, (VOCAB, VOCAB)), "P": 0.1 * jax.random.normal(k2, (length, VOCAB))}


def test_consistency_loss_known_value_finite_gradients_and_sampled_states():
    params = _bigram_params(4, 16)
    fn = lambda t: _bigram(params, t)
    traj = fp.jacobi_trajectories(fn, jnp.array([3]), 8, block_size=4)
    loss, parts = fp.consistency_loss(fn, traj)
    # Independent evaluation of the definition: every intermediate state, every row whose
    # input prefix differs from the fixed point, KL(fixed-point row || state row).
    tokens = np.asarray(traj.tokens)
    target = jax.nn.log_softmax(fn(traj.tokens), axis=-1)
    kls = []
    for b in range(2):
        start = 1 + 4 * b
        for k in range(int(traj.iterations[b])):
            u = tokens.copy()
            u[start : start + 4] = np.asarray(traj.states[b, k])
            logq = jax.nn.log_softmax(fn(jnp.asarray(u)), axis=-1)
            for t in range(start - 1, start + 3):
                if np.any(u[: t + 1] != tokens[: t + 1]):
                    kls.append(float(jnp.sum(jnp.exp(target[t]) * (target[t] - logq[t]))))
    assert kls and max(kls) > 0
    np.testing.assert_allclose(float(parts["consistency"]), np.mean(kls), rtol=1e-10)
    assert np.isfinite(float(loss)) and float(loss) > 0

    grads = jax.grad(lambda p: fp.consistency_loss(lambda t: _bigram(p, t), traj)[0])(params)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert float(jnp.abs(grads["E"]).max()) > 0
    # One random state per block: finite, non-negative, differentiable.
    sampled, sampled_parts = fp.consistency_loss(fn, traj, key=jax.random.key(0))
    assert np.isfinite(float(sampled)) and float(sampled_parts["consistency"]) >= 0
    assert float(sampled_parts["ar"]) == pytest.approx(float(parts["ar"]), rel=1e-12)


def _fine_tune(params, trajs, *, steps, ar_weight):
    """Adam on the mean loss over a batch of trajectories: (params, first loss, last loss)."""

    def loss_fn(p):
        run = lambda tr: fp.consistency_loss(lambda t: _bigram(p, t), tr, ar_weight=ar_weight)[0]
        return jnp.mean(jax.vmap(run)(trajs))

    opt = optax.adam(3e-2)

    @jax.jit
    def train(p):
        def step(carry, _):
            p, s = carry
            value, g = jax.value_and_grad(loss_fn)(p)
            updates, s = opt.update(g, s, p)
            return (optax.apply_updates(p, updates), s), value

        (p, _), values = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
        return p, values[0], loss_fn(p)

    p, first, last = train(params)
    return p, float(first), float(last)


def test_consistency_fine_tuning_cuts_iterations_and_keeps_the_greedy_output():
    # CLLM in miniature: one prompt whose 16-token blocks need all 16 iterations; a bigram +
    # position model fine-tuned on its own trajectories (AR weight 10, as CLLM) learns to
    # predict the fixed point from the trajectory states: far fewer iterations, same output.
    params = _bigram_params(11, 40)
    prompts = jax.random.randint(jax.random.key(9), (1, 2), 0, VOCAB)

    @jax.jit
    def decode(p):
        return jax.vmap(lambda q: fp.jacobi_decode(lambda t: _bigram(p, t), q, 32, 16, check_causal=False))(prompts)

    before, stats_before = decode(params)
    assert stats_before["iterations_per_block"].tolist() == [[16, 16]]
    trajs = jax.vmap(lambda q: fp.jacobi_trajectories(lambda t: _bigram(params, t), q, 32, 16))(prompts)
    tuned, first, last = _fine_tune(params, trajs, steps=100, ar_weight=10.0)
    assert last < 0.5 * first
    after, stats_after = decode(tuned)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    assert float(jnp.mean(stats_after["iterations_per_block"])) <= 4.0
