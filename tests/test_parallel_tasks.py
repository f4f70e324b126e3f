"""The `jacobi_decoding` and `parallel_sampling` experiment tasks: corpus, model causality,
the evaluation's counting, the phase gate, and their `:quick` presets end to end."""

import json
import pathlib

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import fpx.parallel as fp
from fpx.cli import main
from fpx.experiment import load_config
from fpx.experiment.tasks import jacobi_decoding as jd
from fpx.experiment.tasks import parallel_sampling as ps

ROOT = pathlib.Path(__file__).resolve().parents[1]
JACOBI_QUICK = str(ROOT / "configs" / "parallel" / "jacobi_decoding.py") + ":quick"
SAMPLING_QUICK = str(ROOT / "configs" / "parallel" / "parallel_sampling.py") + ":quick"


# ------------------------------------------------------------------ corpus


def test_corpus_is_a_fixed_sorted_list_of_stdlib_files_read_deterministically():
    assert list(jd.CORPUS_TRAIN) == sorted(jd.CORPUS_TRAIN)
    assert not set(jd.CORPUS_TRAIN) & set(jd.CORPUS_VALID)
    for name in jd.CORPUS_TRAIN + jd.CORPUS_VALID:
        assert (jd.stdlib_dir() / name).is_file(), name
    a, hash_a = jd.corpus(jd.CORPUS_VALID)
    b, hash_b = jd.corpus(tuple(reversed(jd.CORPUS_VALID)))  # the order given does not matter
    np.testing.assert_array_equal(a, b)
    assert hash_a == hash_b and a.dtype == np.int32 and a.min() >= 0 and a.max() < jd.VOCAB
    # The text is the files' concatenation, in sorted order, one blank line between files.
    first = (jd.stdlib_dir() / sorted(jd.CORPUS_VALID)[0]).read_text(encoding="utf-8")
    assert jd.decode_text(a[: 200]) == "".join(c if ord(c) < 128 else "\0" for c in first[:200])


def test_encode_maps_ascii_to_code_points_and_the_rest_to_zero():
    tokens = jd.encode("def f(x):\n\treturn x  # é")
    assert tokens.tolist()[:4] == [ord(c) for c in "def "]
    assert tokens[-1] == 0 and jd.decode_text(tokens[:-1]) == "def f(x):\n\treturn x  # "


# ------------------------------------------------------------------ model


def _tiny(seed=0, layers=2):
    params = jd.init_params(jr.PRNGKey(seed), d_model=16, num_layers=layers, num_heads=2, mlp_ratio=2, max_len=24)
    # Larger weights than at initialisation: every position then visibly depends on the context.
    params = jax.tree_util.tree_map(lambda a: a * 6.0 if a.ndim >= 2 else a, params)
    return params, (lambda tokens: jd.logits(params, tokens, 2))


def test_transformer_is_causal_and_jacobi_equals_greedy():
    params, fn = _tiny()
    assert jd.num_params(params) == 128 * 16 + 24 * 16 + 2 * (4 * 16 + 16 * 48 + 48 + 16 * 16 + 16 + 2 * 16 * 32 + 32 + 16) + 2 * 16 + 16 * 128 + 128
    prompt = jnp.array([100, 101, 102, 40], jnp.int32)
    tokens, stats = fp.jacobi_decode(fn, prompt, 16, 8, check_causal=True)  # the library's probe
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(fp.greedy_decode(fn, prompt, 16)))
    # Changing later tokens leaves earlier rows bit-for-bit unchanged.
    seq = jr.randint(jr.PRNGKey(1), (20,), 0, 128)
    changed = seq.at[12:].set((seq[12:] + 7) % 128)
    np.testing.assert_array_equal(np.asarray(fn(seq)[:12]), np.asarray(fn(changed)[:12]))
    assert not np.array_equal(np.asarray(fn(seq)[12:]), np.asarray(fn(changed)[12:]))


def test_a_transformer_without_the_mask_is_caught_by_the_probe(monkeypatch):
    _, fn = _tiny()
    monkeypatch.setattr(jd.jnp, "tril", lambda a: jnp.ones_like(a))  # no causal mask
    with pytest.raises(ValueError, match="not causal"):
        fp.jacobi_decode(fn, jnp.array([1, 2, 3], jnp.int32), 8, 4)


# ------------------------------------------------------------------ counting


def test_decode_metrics_counts_mismatches_of_a_non_causal_toy():
    vocab = 11

    def peeking(tokens):  # row t predicts from tokens[t] and tokens[t+1]: not causal
        nxt = jnp.concatenate([tokens[1:], tokens[:1]])
        return jax.nn.one_hot((3 * tokens + nxt + 1) % vocab, vocab)

    prompts = jr.randint(jr.PRNGKey(2), (6, 3), 0, vocab).astype(jnp.int32)
    got = jd.decode_metrics(peeking, prompts, 8, 4, 0)
    jac = np.stack([np.asarray(fp.jacobi_decode(peeking, p, 8, 4, check_causal=False)[0]) for p in prompts])
    its = np.stack([np.asarray(fp.jacobi_decode(peeking, p, 8, 4, check_causal=False)[1]["iterations_per_block"]) for p in prompts])
    ref = np.stack([np.asarray(fp.greedy_decode(peeking, p, 8)) for p in prompts])
    differ = jac != ref
    assert differ.any()  # the toy must actually break the equality, else this test proves nothing
    assert int(got["mismatched_prompts"]) == int(differ.any(axis=1).sum())
    assert int(got["mismatched_tokens"]) == int(differ.sum())
    assert float(got["iterations_per_block"]) == pytest.approx(its.mean())
    assert float(got["first_block_iterations"]) == pytest.approx(its[:, 0].mean())
    assert float(got["later_block_iterations"]) == pytest.approx(its[:, 1:].mean())
    assert float(got["forward_passes_per_token"]) == pytest.approx(its.sum(1).mean() / 8)
    previous = np.concatenate([np.asarray(prompts)[:, -1:], ref[:, :-1]], axis=1)
    assert float(got["repeat_fraction"]) == pytest.approx((ref == previous).mean())

    causal = lambda tokens: jax.nn.one_hot((3 * tokens + 1) % vocab, vocab)
    ok = jd.decode_metrics(causal, prompts, 8, 4, 0)
    assert int(ok["mismatched_prompts"]) == 0 and int(ok["mismatched_tokens"]) == 0
    assert float(ok["iterations_per_block"]) == 4.0  # each token depends on the previous one


def test_phase_gate_runs_only_for_members_that_need_it():
    calls = []

    def fn(x):
        jax.debug.callback(lambda: calls.append(1))
        return x + 1.0

    gated = jax.jit(jax.vmap(jd._when, in_axes=(0, None, 0)), static_argnums=1)
    out = gated(jnp.array([True, False]), fn, jnp.array([1.0, 5.0]))
    np.testing.assert_array_equal(np.asarray(out), [2.0, 5.0])
    jax.effects_barrier()
    assert len(calls) == 1  # one loop iteration for the batch
    calls.clear()
    out = gated(jnp.array([False, False]), fn, jnp.array([1.0, 5.0]))
    np.testing.assert_array_equal(np.asarray(out), [1.0, 5.0])
    jax.effects_barrier()
    assert calls == []  # nobody in that phase: not run at all


# ------------------------------------------------------------------ sampling


def test_schedule_and_sampler_comparison_on_an_exact_gaussian_denoiser():
    t = jnp.linspace(0.0, 1.0, 101)
    abar = ps.alpha_bar(t)
    assert float(abar[0]) == pytest.approx(np.exp(-10.05)) and float(abar[-1]) == 1.0
    assert bool(jnp.all(jnp.diff(abar) > 0))
    mu, s = 0.3, 0.5  # data ~ N(mu, s^2): the exact denoiser is linear in x

    def eps(x, t):
        a = ps.alpha_bar(t)
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s**2 + 1 - a)

    noises = jr.normal(jr.PRNGKey(0), (3, 64))
    figures, ref = ps.compare_samplers(eps, noises, 40, window=8, tol=1e-4, eta=0.0, key=jr.PRNGKey(1))
    direct = jax.vmap(lambda x: fp.ddim_sample(eps, x, jnp.linspace(0.0, 1.0, 41), ps.alpha_bar))(noises)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(direct), rtol=0, atol=0)
    sols = [fp.picard_sample(eps, x, jnp.linspace(0.0, 1.0, 41), ps.alpha_bar, window=8, tol=1e-4) for x in noises]
    assert float(figures["max_dev"]) == pytest.approx(max(float(jnp.max(jnp.abs(q.value - r))) for q, r in zip(sols, ref)))
    assert float(figures["rounds"]) == pytest.approx(np.mean([int(q.stats["num_steps"]) for q in sols]))
    assert float(figures["evals"]) == pytest.approx(np.mean([int(q.stats["num_fn_evals"]) for q in sols]))
    assert float(figures["speedup"]) == pytest.approx(40 / float(figures["rounds"]))
    assert float(figures["converged"]) == 1.0 and float(figures["max_dev"]) < 1e-3
    assert ps.tag(1e-3) == "0.001" and ps.tag(0.1) == "0.1" and ps.tag(1.0) == "1" and ps.tag(0.0) == "0"


def test_nearest_distance():
    ref = jnp.array([[0.0, 0.0], [3.0, 4.0]])
    assert float(ps.nearest_distance(jnp.array([[0.0, 1.0], [3.0, 4.0]]), ref)) == pytest.approx(0.5)


# ------------------------------------------------------------------ quick presets end to end


def run(spec, tmp_path):
    workdir = tmp_path / "run"
    assert main(["run", spec, "--workdir", str(workdir), "--quiet"]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert summary["success_mask"] == [True]
    return summary["members"][0], records


def test_jacobi_decoding_quick_preset(tmp_path):
    config = load_config(JACOBI_QUICK)
    row, records = run(JACOBI_QUICK, tmp_path)
    assert row["step"] == config.train.steps
    assert [r["eval/phase"] for r in records] == [int(r["step"] > config.train.ar_steps) for r in records]
    assert [r["train/phase"] for r in records] == [float(r["step"] > config.train.ar_steps) for r in records]
    for r in records:
        assert r["eval/mismatched_prompts"] == 0 and r["eval/mismatched_tokens"] == 0
        assert r["eval/iterations_per_block"] >= 1
        assert r["eval/iterations_per_block"] <= config.decode.block_size
        assert np.isfinite(r["eval/val_loss"])
    tuned = [r for r in records if r["step"] > config.train.ar_steps]
    assert tuned and all(r["train/consistency"] >= 0 and r["train/train_iterations_per_block"] >= 1 for r in tuned)
    assert all(r["train/consistency"] == 0 for r in records if r["step"] <= config.train.ar_steps)


def test_parallel_sampling_quick_preset(tmp_path):
    config = load_config(SAMPLING_QUICK)
    row, records = run(SAMPLING_QUICK, tmp_path)
    assert row["step"] == config.train.steps
    T = config.sampling.steps[0]
    key = f"eval/T{T}_tol0.001_eta0_"
    assert row[key + "converged"] == 1.0
    assert row[key + "max_dev"] < 1e-2
    assert row[key + "rounds"] >= 1
    assert row[key + "rounds"] <= T
    assert row[key + "evals"] >= row[key + "rounds"]
    assert records[0]["train/loss"] > 0
