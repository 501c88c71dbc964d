"""The verdict rule's error rates, measured by simulation (awqnb.analysis.stats).

Per-window NLLs of a method A and a baseline B are simulated the way a comparison produces them:
a window difficulty both share (it cancels in the pairing), a method × window effect (the same
windows score every seed, so it does not average away over seeds), a per-seed calibration effect
of each method, and per-seed × window noise. Magnitudes are those measured on the H200 runs
(bench/results/quality/*_h200_*: per-window sd of the paired difference ≈ 0.01–0.03 nats between methods, a
seed sd of the difference of 0.003–0.04 nats, 148 windows). With NO true difference the rule may
say 'better' or 'worse' in at most 7% of 2,000 comparisons (nominal 5%); with a true difference
the test prints the power (`pytest -s tests/test_verdict_calibration.py`).
"""
import numpy as np
import pytest

from awqnb.analysis import stats

N_SIM = 2000
N_WIN = 148  # SmolLM2's WikiText-2 windows at seqlen 2048


def simulate(rng, k, tau, sig_v, sig_e=0.015, delta=0.0, shared_baseline=False, n=N_WIN, n_sim=N_SIM,
             seed_dist="normal"):
    """Per-window NLLs [n_sim, k, n] of A and B. tau: sd of the per-seed difference A − B (its seed
    effect); sig_v: sd of the method × window effect of the difference; sig_e: sd of the seed ×
    window noise of the difference; delta: the true difference of mean NLL (log ppl ratio).
    shared_baseline: B uses no calibration (rtn), one run for every seed."""
    half = np.sqrt(0.5)
    mu = rng.normal(3.2, 0.3, (n_sim, 1, n))  # window difficulty: cancels in the pairing

    def seed_effect(size):
        if seed_dist == "t3":  # heavy-tailed seeds (one bad calibration draw, as Gemma's awq seed 44)
            return rng.standard_t(3, size) / np.sqrt(3.0)
        return rng.normal(0, 1, size)

    gam_a = sig_v * half * rng.normal(0, 1, (n_sim, 1, n))  # method × window effects, shared by every seed
    gam_b = sig_v * half * rng.normal(0, 1, (n_sim, 1, n))
    if shared_baseline:  # A carries all the seed effect; B's one run (and its window noise) serves every seed
        a = mu + gam_a + tau * seed_effect((n_sim, k, 1)) + sig_e * half * rng.normal(0, 1, (n_sim, k, n)) + delta
        b = np.broadcast_to(mu + gam_b + sig_e * half * rng.normal(0, 1, (n_sim, 1, n)), (n_sim, k, n))
    else:
        a = mu + gam_a + tau * half * seed_effect((n_sim, k, 1)) + sig_e * half * rng.normal(0, 1, (n_sim, k, n)) + delta
        b = mu + gam_b + tau * half * seed_effect((n_sim, k, 1)) + sig_e * half * rng.normal(0, 1, (n_sim, k, n))
    return a, b


def called(a, b, calibrated=True):
    """Fraction of comparisons the rule calls better or worse, and the fraction it calls better."""
    r = stats.interval(a - b, None, calibrated)
    v = np.asarray(r["verdict"])
    return float(np.isin(v, [stats.BETTER, stats.WORSE]).mean()), float((v == stats.BETTER).mean()), r


NULL_CASES = [  # (k, tau, sig_v, shared_baseline, seed_dist)
    (k, tau, sig_v, shared, dist)
    for k in (3, 5)
    for tau, sig_v, shared, dist in [
        (0.0, 0.0, False, "normal"),      # no seed effect, no shared window effect
        (0.0, 0.02, False, "normal"),     # window term only
        (0.003, 0.02, False, "normal"),   # SmolLM2-like: gptq vs llmc_gptq, awq_gptq vs llmc_gptq
        (0.01, 0.01, False, "normal"),    # SmolLM2 gptq vs awq
        (0.03, 0.013, False, "normal"),   # Gemma: a flip method vs awq (seed sd 0.9 ppl)
        (0.03, 0.013, False, "t3"),       # the same with heavy-tailed seed effects
        (0.005, 0.025, True, "normal"),   # against rtn (one run stands for every seed)
    ]
]


@pytest.mark.parametrize("k,tau,sig_v,shared,dist", NULL_CASES)
def test_no_true_difference_is_called_at_most_7_percent(k, tau, sig_v, shared, dist):
    rng = np.random.default_rng(1000 * k + int(1e4 * tau) + int(1e3 * sig_v) + shared)
    a, b = simulate(rng, k, tau, sig_v, shared_baseline=shared, seed_dist=dist)
    rate, better, r = called(a, b)
    print(f"\nno difference, {k} seeds, seed sd {tau}, window-effect sd {sig_v}, "
          f"{'rtn-like baseline' if shared else 'paired seeds'}, {dist}: called {rate:.1%} (better {better:.1%})")
    assert rate <= 0.07
    assert abs(better - (rate - better)) < 0.03  # symmetric: no side is favoured
    assert np.all(r["ci_low"] <= r["delta_pct"]) and np.all(r["delta_pct"] <= r["ci_high"])


def test_fewer_than_three_seeds_never_give_a_verdict():
    rng = np.random.default_rng(7)
    for k in (1, 2):
        a, b = simulate(rng, k, 0.003, 0.02, delta=0.05, n_sim=200)  # even a 5% difference
        v = stats.interval(a - b)["verdict"]
        assert set(np.asarray(v).ravel()) == {stats.NO_SEEDS}
    # neither side calibrated (fp vs rtn): the window term alone, and a verdict
    a, b = simulate(rng, 1, 0.0, 0.02, delta=0.05, n_sim=200)
    assert set(np.asarray(stats.interval(a - b, calibrated=False)["verdict"]).ravel()) == {stats.WORSE}
    # one evaluation unit: its sampling noise is unknown, so no difference is claimed
    one = stats.interval(np.full((3, 1), 0.05))
    assert one["verdict"] == stats.NOISE and one["ci_high"] == np.inf


POWER_CASES = [  # (k, tau, sig_v, true delta in %): a clear effect is a few seed sd
    (3, 0.003, 0.02, 2.0), (5, 0.003, 0.02, 2.0),     # SmolLM2-like seed spread, a 2% effect
    (3, 0.003, 0.02, 1.0), (5, 0.003, 0.02, 1.0),
    (3, 0.01, 0.013, 3.0), (5, 0.01, 0.013, 3.0),     # 1% seed sd, a 3% effect
    (3, 0.03, 0.013, 5.0), (5, 0.03, 0.013, 5.0),     # Gemma awq-like 3% seed sd, a 5% effect
]


def test_power_against_a_true_difference():
    rng = np.random.default_rng(11)
    power = {}
    print("\npower (share of 2,000 comparisons called 'better' when A is truly better):")
    for k, tau, sig_v, pct in POWER_CASES:
        a, b = simulate(rng, k, tau, sig_v, delta=np.log1p(-pct / 100))
        _, better, r = called(a, b)
        power[(k, tau, pct)] = better
        cover = np.mean((r["ci_low"] <= -pct) & (-pct <= r["ci_high"]))
        print(f"  {k} seeds, seed sd {tau}, true −{pct}%: power {better:.1%}, 95% interval covers the truth "
              f"{cover:.1%}")
        assert cover >= 0.93
    assert power[(3, 0.003, 2.0)] >= 0.8 and power[(5, 0.003, 2.0)] >= 0.95  # a clear SmolLM2-sized effect
    assert power[(5, 0.01, 3.0)] >= 0.9
    for k3, k5 in [((3, t, p), (5, t, p)) for _, t, _, p in POWER_CASES[::2]]:
        assert power[k5] > power[k3]  # more seeds, more power


def test_the_rule_on_known_numbers():
    """Three seeds, equal windows: D ± √(t²_{2} V_s + t²_{39} V_w) with the terms written out."""
    import scipy.stats as ss  # the rule's own t quantile has no scipy; check it against scipy

    rng = np.random.default_rng(3)
    x = rng.normal(-0.02, 0.01, (3, 40)) + np.array([[0.004], [-0.003], [0.001]]) + rng.normal(0, 0.02, 40)
    r = stats.interval(x)
    d = x.mean(1)
    assert r["D"] == pytest.approx(d.mean())
    assert r["V_s"] == pytest.approx(d.var(ddof=1) / 3)
    W = (x.mean(0) - d.mean()).var(ddof=1) / 40
    E = (x - d[:, None]).var(0, ddof=1).mean() / 40 / 3
    assert W > E and r["V_w"] == pytest.approx(W - E)
    half = np.sqrt(ss.t.ppf(0.975, 2) ** 2 * r["V_s"] + ss.t.ppf(0.975, 39) ** 2 * r["V_w"])
    assert r["ci_low"] == pytest.approx(100 * np.expm1(d.mean() - half))
    assert r["ci_high"] == pytest.approx(100 * np.expm1(d.mean() + half))
    assert r["delta_pct"] == pytest.approx(100 * np.expm1(d.mean()))
    for df in (1.0, 2.0, 2.37, 4.0, 30.0, 147.0, 2000.0):
        assert stats.t_quantile(0.975, df) == pytest.approx(ss.t.ppf(0.975, df), rel=1e-9)
    # one seed, neither side calibrated: the window interval alone, t with n − 1 df
    r1 = stats.interval(x[:1], calibrated=False)
    se = np.sqrt(x[0].var(ddof=1) / 40)
    assert r1["ci_high"] == pytest.approx(100 * np.expm1(x[0].mean() + ss.t.ppf(0.975, 39) * se))
