//! Always-valid treatment-vs-holdout tests.
//!
//! A guardrail looks at the treatment/holdout comparison after every window, forever. A
//! fixed-horizon test (z-test, chi-square) read that way raises false alarms far above its nominal
//! level: with enough looks, noise eventually crosses any fixed critical value. The tests here are
//! *always valid*, as in GrowthBook's and Optimizely's sequential engines: each statistic is a
//! nonnegative (super)martingale under the null, so by Ville's inequality the probability that it
//! *ever* crosses 1/alpha is at most alpha, however often and for however long we look. The price
//! is a somewhat later decision than a fixed-horizon test planned for exactly the right effect;
//! the gain is that nobody has to plan a horizon, and stopping at the first crossing is honest.
//!
//! - [`compare`]: a one-sided mixture SPRT (mSPRT, Robbins 1970; Johari et al. 2017) on the
//!   difference of rates, with the mixture only on the harmful side, so an improvement is never
//!   evidence of harm; plus the dual two-sided confidence sequence for the difference.
//! - [`srm`]: sample-ratio mismatch by a Beta-binomial Bayes factor (Lindon & Malek 2020): if
//!   the split itself is broken, no comparison between the arms can be trusted.
//! - [`simulate_run`] / [`run_report`]: the simulation that measures false alarms, power and
//!   delay, shared by the tests and `benches/holdout.rs`.
//!
//! The Gaussian approximation of the rate difference (with plug-in variances and a mixture scale
//! learnt from the pooled rate) makes the guarantee asymptotic rather than exact; the tests
//! measure the realised false-alarm rate under continuous monitoring for each family. Expect the
//! realised rate to approach alpha, not to sit far below it, when looks are frequent and runs
//! long: Ville's inequality is an equality for a martingale with continuous paths.

use crate::baseline::Family;
use crate::detect::Side;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;
use statrs::distribution::{ChiSquared, ContinuousCDF, Normal};
use statrs::function::erf::erfc;
use statrs::function::gamma::ln_gamma;

/// Minimum denominator (trials, exposure units) per arm for Binomial and Poisson comparisons.
pub const MIN_ARM_DEN: f64 = 1.0;
/// Minimum observations per arm for Gaussian comparisons (a sample variance needs two).
pub const MIN_GAUSSIAN_OBS: f64 = 2.0;
/// Binomial and Poisson: minimum expected events (and, for Binomial, non-events) in the thinner
/// arm at the pooled rate before the normal approximation of the difference is trusted (the
/// textbook rule of 5).
pub const MIN_EXPECTED_EVENTS: f64 = 5.0;
/// Pseudo-count added to the numerator of Binomial and Poisson arms in variance estimates, so
/// that an arm with zero successes/events still has a positive variance (Jeffreys-like).
pub const PSEUDO_COUNT: f64 = 0.5;
/// Relative floor on a Gaussian arm's observation variance, as a fraction of its mean square:
/// an arm of identical values is then very precise, not infinitely precise.
pub const GAUSSIAN_VAR_FLOOR_REL: f64 = 1e-12;
/// Absolute floor on a Gaussian arm's observation variance (all-zero arms).
pub const GAUSSIAN_VAR_FLOOR_ABS: f64 = 1e-150;
/// Prior strength k of the sample-ratio-mismatch test: the alternative's holdout fraction is
/// Beta(q k, (1 - q) k), centred on the configured split q with standard deviation about
/// sqrt(q (1 - q) / k) (3 points for a 10% holdout). Larger k looks for smaller mismatches but
/// needs more exposures to be convinced of a large one.
pub const SRM_PRIOR_STRENGTH: f64 = 100.0;
/// Minimum exposures (both arms) before the split is judged.
pub const MIN_SRM_TOTAL: f64 = 100.0;

/// Cumulative sums of one arm.
///
/// Binomial: `num` successes out of `den` trials. Poisson: `num` events over `den` exposure
/// units. Gaussian: `num` sum of values over `den` observations, `sumsq` sum of their squares.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ArmStats {
    pub num: f64,
    pub den: f64,
    pub sumsq: f64,
}

impl ArmStats {
    /// The arm's rate (or mean); NaN without data.
    pub fn rate(&self) -> f64 {
        if self.den > 0.0 {
            self.num / self.den
        } else {
            f64::NAN
        }
    }

    /// Variance of [`rate`](Self::rate) as an estimate of the arm's true rate (infinite without
    /// data).
    ///
    /// - Binomial: p(1-p)/n with p smoothed to (x + 0.5)/(n + 1), so 0/n and n/n are not certain.
    /// - Poisson: rate/exposure, with the events count raised by 0.5: (x + 0.5)/e².
    /// - Gaussian: sample variance / n, the sample variance floored at
    ///   [`GAUSSIAN_VAR_FLOOR_REL`] times the mean square (and [`GAUSSIAN_VAR_FLOOR_ABS`]).
    pub fn variance_of_rate(&self, family: Family) -> f64 {
        let n = self.den;
        if n.is_nan() || n <= 0.0 {
            return f64::INFINITY;
        }
        match family {
            Family::Binomial => {
                let p = ((self.num + PSEUDO_COUNT) / (n + 2.0 * PSEUDO_COUNT)).clamp(0.0, 1.0);
                p * (1.0 - p) / n
            }
            Family::Poisson => (self.num.max(0.0) + PSEUDO_COUNT) / (n * n),
            Family::Gaussian => self.observation_variance() / n,
        }
    }

    /// Gaussian: the (floored) sample variance of single observations.
    fn observation_variance(&self) -> f64 {
        let n = self.den;
        let mean = self.num / n;
        let ss = (self.sumsq - self.num * mean).max(0.0);
        let s2 = if n > 1.0 { ss / (n - 1.0) } else { 0.0 };
        let mean_square = (self.sumsq / n).max(mean * mean);
        s2.max(GAUSSIAN_VAR_FLOOR_REL * mean_square)
            .max(GAUSSIAN_VAR_FLOOR_ABS)
    }

    fn add(&mut self, num: f64, den: f64, sumsq: f64) {
        self.num += num;
        self.den += den;
        self.sumsq += sumsq;
    }
}

/// Configuration of [`compare`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MsprtConfig {
    /// Bound on the probability of ever declaring harm when there is none (and on the
    /// probability that the confidence sequence ever misses the true difference).
    pub alpha: f64,
    /// Scale of the mixture over effects, relative to the pooled rate (Binomial, Poisson) or to
    /// the pooled standard deviation of one observation (Gaussian). The test is most sensitive
    /// to differences around tau; set it near the smallest effect worth catching.
    pub tau_rel: f64,
}

/// The result of one treatment-vs-holdout comparison.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    pub family: Family,
    pub treatment: ArmStats,
    pub holdout: ArmStats,
    /// rate(treatment) - rate(holdout).
    pub diff: f64,
    /// diff / rate(holdout); NaN if the holdout rate is 0.
    pub relative: f64,
    /// Standard error of `diff` (square root of the sum of the arms' own variances).
    pub se: f64,
    /// ln of the one-sided mixture likelihood ratio (evidence of harm).
    pub log_lambda: f64,
    /// ln(1/alpha): harm is proven when `log_lambda` reaches it.
    pub threshold: f64,
    /// Harm proven (rejected in the harmful direction).
    pub harmful: bool,
    /// Always-valid (1 - alpha) two-sided confidence sequence for `diff`.
    pub ci_low: f64,
    pub ci_high: f64,
    /// The confidence sequence divided by the holdout rate (its uncertainty ignored); NaN if the
    /// holdout rate is 0.
    pub rel_ci_low: f64,
    pub rel_ci_high: f64,
}

/// ln(Φ(w) · e^{w²/2}), stable for any w (Φ is the standard normal cdf).
fn ln_phi_times_gauss(w: f64) -> f64 {
    if w < -30.0 {
        // Mills ratio asymptotics: Φ(w) e^{w²/2} = (1/(√(2π)|w|)) (1 - 1/w² + 3/w⁴ - ...).
        let x = 1.0 / (w * w);
        let series = 1.0 - x + 3.0 * x * x - 15.0 * x * x * x + 105.0 * x * x * x * x;
        -(-w).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln() + series.ln()
    } else if w < 0.0 {
        (0.5 * erfc(-w / std::f64::consts::SQRT_2)).ln() + 0.5 * w * w
    } else {
        (-0.5 * erfc(w / std::f64::consts::SQRT_2)).ln_1p() + 0.5 * w * w
    }
}

/// ln Λ of the one-sided mixture likelihood ratio: the estimate d̂ ~ N(θ, V), the harmful-signed
/// estimate `s` (positive = harm), the null θ = 0 and the alternative θ ~ HalfNormal(`tau`) on
/// the harmful side:
///
/// Λ = ∫₀^∞ (2/τ) φ(θ/τ) exp((sθ - θ²/2)/V) dθ
///   = 2 sqrt(V/(V+τ²)) exp(s²τ²/(2V(V+τ²))) Φ(sτ/sqrt(V(V+τ²))).
///
/// Computed with r = τ²/V and w = (s/√V) sqrt(r/(1+r)) as ln 2 - ln(1+r)/2 + w²/2 + ln Φ(w),
/// which neither overflows nor loses the cancellation when s is far on the harmless side.
/// Under any θ ≤ 0 each component exp((sθ' - θ'²/2)/V), θ' > 0, has expectation ≤ 1, so Λ is a
/// supermartingale for the whole one-sided null, not only for θ = 0.
pub fn log_half_normal_mixture_lr(s: f64, v: f64, tau: f64) -> f64 {
    let r = tau * tau / v;
    let w = (s / v.sqrt()) * (r / (1.0 + r)).sqrt();
    std::f64::consts::LN_2 - 0.5 * r.ln_1p() + ln_phi_times_gauss(w)
}

/// Half-width of the always-valid (1 - alpha) confidence sequence for θ from d̂ ~ N(θ, V) with
/// a N(0, τ²) mixture (Robbins 1970; Howard et al. 2021, normal mixture boundary):
/// {θ : Λ_normal(d̂ - θ) < 1/alpha} with Λ_normal(x) = sqrt(V/(V+τ²)) exp(x²τ²/(2V(V+τ²))),
/// i.e. |d̂ - θ| < sqrt((V(V+τ²)/τ²) (ln((V+τ²)/V) + 2 ln(1/alpha))).
pub fn normal_mixture_cs_half_width(v: f64, tau: f64, alpha: f64) -> f64 {
    let r = tau * tau / v;
    (v * (1.0 + r) / r * (r.ln_1p() + 2.0 * (1.0 / alpha).ln())).sqrt()
}

fn arm_is_valid(family: Family, a: &ArmStats) -> bool {
    let finite = a.num.is_finite() && a.den.is_finite() && a.sumsq.is_finite();
    finite
        && match family {
            Family::Binomial => a.den >= MIN_ARM_DEN && a.num >= 0.0 && a.num <= a.den,
            Family::Poisson => a.den >= MIN_ARM_DEN && a.num >= 0.0,
            Family::Gaussian => a.den >= MIN_GAUSSIAN_OBS && a.sumsq >= 0.0,
        }
}

/// Compares treatment `t` with holdout `h` (cumulative sums since the change started).
///
/// Harm is proven when ln Λ ≥ ln(1/alpha); see [`log_half_normal_mixture_lr`]. For the test, V
/// is the variance of the difference under the null (pooled rate) for Binomial/Poisson and the
/// sum of the arms' [`ArmStats::variance_of_rate`] for Gaussian. The confidence sequence uses
/// the larger of that and the sum of the arms' own variances, so it stays right under any
/// difference; `se` is the square root of the latter. tau is `tau_rel` times the pooled rate
/// (floored at 0.5 event over the pooled denominator) for Binomial/Poisson, or times the pooled
/// within-arm standard deviation for Gaussian.
///
/// None when an arm has too little data ([`MIN_ARM_DEN`], [`MIN_GAUSSIAN_OBS`],
/// [`MIN_EXPECTED_EVENTS`]), the data is impossible (negative counts, more successes than
/// trials, non-finite), or the configuration is invalid (alpha outside (0, 1), `tau_rel` not
/// positive).
pub fn compare(
    family: Family,
    harmful_side: Side,
    t: &ArmStats,
    h: &ArmStats,
    cfg: &MsprtConfig,
) -> Option<Comparison> {
    if !(cfg.alpha > 0.0 && cfg.alpha < 1.0 && cfg.tau_rel > 0.0 && cfg.tau_rel.is_finite()) {
        return None;
    }
    if !arm_is_valid(family, t) || !arm_is_valid(family, h) {
        return None;
    }
    let (rt, rh) = (t.rate(), h.rate());
    let diff = rt - rh;
    let den = t.den + h.den;
    let pooled_rate = (t.num + h.num) / den;
    // Too few expected events (or non-events) in the thinner arm for the normal approximation.
    // The expectation uses the pooled rate, which (unlike each arm's count) carries no
    // information about the difference under the null, so waiting on it costs no validity.
    let thin = t.den.min(h.den);
    let expected = match family {
        Family::Binomial => thin * pooled_rate.min(1.0 - pooled_rate),
        Family::Poisson => thin * pooled_rate,
        Family::Gaussian => f64::INFINITY,
    };
    if expected < MIN_EXPECTED_EVENTS {
        return None;
    }
    // V for the confidence sequence: each arm's own variance (right under any difference).
    let v = t.variance_of_rate(family) + h.variance_of_rate(family);
    // V for the test: the variance under the null of no difference, from the pooled rate. With
    // each arm's own variance, a holdout that is low by chance also looks precise, which
    // inflates the evidence exactly when it is spurious (measured at alpha 5%, 10 holdout
    // sessions per look, tau_rel 1: 9% false alarms, 14% without MIN_EXPECTED_EVENTS; see
    // `small_samples_with_a_wide_mixture_stay_within_alpha`).
    let (v_test, scale) = match family {
        Family::Binomial => {
            let p = (t.num + h.num + PSEUDO_COUNT) / (den + 2.0 * PSEUDO_COUNT);
            let inv = 1.0 / t.den + 1.0 / h.den;
            (p * (1.0 - p) * inv, pooled_rate.max(PSEUDO_COUNT / den))
        }
        Family::Poisson => {
            let rate = (t.num + h.num + PSEUDO_COUNT) / den;
            (
                rate * (1.0 / t.den + 1.0 / h.den),
                pooled_rate.max(PSEUDO_COUNT / den),
            )
        }
        Family::Gaussian => {
            // Arms may differ in spread without differing in mean, so no pooling for V.
            let pooled = ((t.den - 1.0) * t.observation_variance()
                + (h.den - 1.0) * h.observation_variance())
                / (den - 2.0);
            (v, pooled.sqrt())
        }
    };
    let tau = cfg.tau_rel * scale;
    let positive = |x: f64| x > 0.0 && x.is_finite();
    if !(positive(v) && positive(v_test) && positive(tau)) {
        return None;
    }
    let s = harmful_side.sign() * diff;
    let log_lambda = log_half_normal_mixture_lr(s, v_test, tau);
    let threshold = (1.0 / cfg.alpha).ln();
    // The confidence sequence takes the larger of the two: own variances alone under-cover
    // when an arm is low by chance (the same effect as above, measured at 6.7% misses for a
    // 5% sequence), the null variance alone is wrong under a large difference.
    let v_cs = v.max(v_test);
    let half = normal_mixture_cs_half_width(v_cs, tau, cfg.alpha);
    let (ci_low, ci_high) = (diff - half, diff + half);
    let (relative, rel_ci_low, rel_ci_high) = if rh != 0.0 {
        let (a, b) = (ci_low / rh, ci_high / rh);
        (diff / rh, a.min(b), a.max(b))
    } else {
        (f64::NAN, f64::NAN, f64::NAN)
    };
    Some(Comparison {
        family,
        treatment: *t,
        holdout: *h,
        diff,
        relative,
        se: v.sqrt(),
        log_lambda,
        threshold,
        harmful: log_lambda >= threshold,
        ci_low,
        ci_high,
        rel_ci_low,
        rel_ci_high,
    })
}

impl Comparison {
    /// One line for people, e.g. "treatment 4.51% vs holdout 5.02% (-10.2%, always-valid 95% CI
    /// -18.0%..-2.1%), mSPRT lnΛ 3.4 / 3.0".
    pub fn evidence(&self) -> String {
        let (rt, rh) = (self.treatment.rate(), self.holdout.rate());
        let rates = match self.family {
            Family::Binomial => format!(
                "treatment {}% vs holdout {}%",
                fmt_sig(rt * 100.0, 3),
                fmt_sig(rh * 100.0, 3)
            ),
            Family::Poisson => format!(
                "treatment {} vs holdout {} per unit of exposure",
                fmt_sig(rt, 3),
                fmt_sig(rh, 3)
            ),
            Family::Gaussian => format!(
                "treatment mean {} vs holdout mean {}",
                fmt_sig(rt, 4),
                fmt_sig(rh, 4)
            ),
        };
        let level = fmt_percent_level(1.0 - (-self.threshold).exp());
        let effect = if self.relative.is_finite() {
            format!(
                "{:+.1}%, always-valid {level}% CI {:+.1}%..{:+.1}%",
                self.relative * 100.0,
                self.rel_ci_low * 100.0,
                self.rel_ci_high * 100.0
            )
        } else {
            format!(
                "difference {}, always-valid {level}% CI {}..{}",
                fmt_sig(self.diff, 3),
                fmt_sig(self.ci_low, 3),
                fmt_sig(self.ci_high, 3)
            )
        };
        format!(
            "{rates} ({effect}), mSPRT lnΛ {:.1} / {:.1}",
            self.log_lambda, self.threshold
        )
    }
}

/// Sample-ratio mismatch verdict.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Srm {
    pub treatment: f64,
    pub holdout: f64,
    /// The configured holdout fraction q.
    pub expected_holdout: f64,
    /// holdout / (treatment + holdout).
    pub observed_holdout: f64,
    /// ln of the Beta-binomial Bayes factor against the configured split.
    pub log_bayes_factor: f64,
    /// ln(1/alpha).
    pub threshold: f64,
    /// Fixed-horizon chi-square (1 df) p-value, for people only: it is not valid under repeated
    /// looks, the Bayes factor is.
    pub p_value: f64,
    /// The split is broken (Bayes factor ≥ 1/alpha).
    pub mismatch: bool,
}

/// Sequential sample-ratio-mismatch test (Lindon & Malek 2020, two arms).
///
/// Under H0 each exposure goes to the holdout with probability q; under H1 that probability is
/// drawn once from Beta(q k, (1-q) k), k = [`SRM_PRIOR_STRENGTH`]. The Bayes factor
/// BF = B(a_h + n_h, a_t + n_t) / B(a_h, a_t) / (q^{n_h} (1-q)^{n_t}) is a martingale under H0
/// (the order of exposures does not matter, so batched counts are fine), so P(ever BF ≥ 1/alpha)
/// ≤ alpha. None if q is not in (0, 1), alpha not in (0, 1), a count is negative or not finite,
/// or there are fewer than [`MIN_SRM_TOTAL`] exposures.
pub fn srm(n_treatment: f64, n_holdout: f64, expected_holdout: f64, alpha: f64) -> Option<Srm> {
    let q = expected_holdout;
    if !(q > 0.0 && q < 1.0 && alpha > 0.0 && alpha < 1.0) {
        return None;
    }
    if !(n_treatment >= 0.0 && n_holdout >= 0.0 && n_treatment.is_finite() && n_holdout.is_finite())
    {
        return None;
    }
    let n = n_treatment + n_holdout;
    if n < MIN_SRM_TOTAL {
        return None;
    }
    let (a_h, a_t) = (q * SRM_PRIOR_STRENGTH, (1.0 - q) * SRM_PRIOR_STRENGTH);
    let ln_beta = |a: f64, b: f64| ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b);
    let log_bayes_factor = ln_beta(a_h + n_holdout, a_t + n_treatment)
        - ln_beta(a_h, a_t)
        - (n_holdout * q.ln() + n_treatment * (-q).ln_1p());
    let dev = n_holdout - n * q;
    let chi2 = dev * dev / (n * q * (1.0 - q));
    let p_value = ChiSquared::new(1.0).map(|d| d.sf(chi2)).unwrap_or(f64::NAN);
    let threshold = (1.0 / alpha).ln();
    Some(Srm {
        treatment: n_treatment,
        holdout: n_holdout,
        expected_holdout: q,
        observed_holdout: n_holdout / n,
        log_bayes_factor,
        threshold,
        p_value,
        mismatch: log_bayes_factor >= threshold,
    })
}

impl Srm {
    /// One line for people, e.g. "holdout got 6.1% of 48,210 exposures, expected 10.0%
    /// (p = 3e-42, Bayes factor e^85): the split is broken; treatment/holdout comparisons are
    /// not trustworthy".
    pub fn evidence(&self) -> String {
        let verdict = if self.mismatch {
            "the split is broken; treatment/holdout comparisons are not trustworthy"
        } else {
            "consistent with the configured split"
        };
        format!(
            "holdout got {:.1}% of {} exposures, expected {:.1}% (p = {}, Bayes factor {}): {verdict}",
            self.observed_holdout * 100.0,
            fmt_thousands(self.treatment + self.holdout),
            self.expected_holdout * 100.0,
            fmt_p(self.p_value),
            fmt_bayes_factor(self.log_bayes_factor),
        )
    }
}

/// A treatment-vs-holdout experiment on a conversion rate, looked at every
/// `sessions_per_look` sessions until `max_sessions`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct HoldoutSim {
    /// Holdout conversion rate.
    pub base_rate: f64,
    /// Treatment rate = base_rate (1 + relative_effect); e.g. -0.10.
    pub relative_effect: f64,
    /// Probability that a session goes to the holdout.
    pub holdout_fraction: f64,
    pub sessions_per_look: u64,
    pub max_sessions: u64,
    pub alpha: f64,
    pub tau_rel: f64,
}

impl HoldoutSim {
    fn treatment_rate(&self) -> f64 {
        (self.base_rate * (1.0 + self.relative_effect)).clamp(0.0, 1.0)
    }
}

/// One simulated experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HoldoutRunResult {
    /// Sessions (both arms) at the first look where harm was proven.
    pub rejected_at: Option<u64>,
}

fn draw_binomial(rng: &mut impl Rng, n: u64, p: f64) -> u64 {
    if n == 0 || p <= 0.0 {
        return 0;
    }
    if p >= 1.0 {
        return n;
    }
    rand_distr::Binomial::new(n, p)
        .map(|d| d.sample(rng))
        .unwrap_or(0)
}

/// One look's sessions: (holdout sessions, holdout conversions, treatment sessions, treatment
/// conversions).
fn draw_look(sim: &HoldoutSim, n: u64, rng: &mut impl Rng) -> (u64, u64, u64, u64) {
    let nh = draw_binomial(rng, n, sim.holdout_fraction);
    let nt = n - nh;
    let ch = draw_binomial(rng, nh, sim.base_rate);
    let ct = draw_binomial(rng, nt, sim.treatment_rate());
    (nh, ch, nt, ct)
}

/// Runs one experiment: each look splits its sessions at random (holdout with probability
/// `holdout_fraction`), draws conversions per arm, and runs [`compare`] (Binomial, harm = drop)
/// on the cumulative sums; stops at the first rejection.
pub fn simulate_run(sim: &HoldoutSim, rng: &mut impl Rng) -> HoldoutRunResult {
    let cfg = MsprtConfig {
        alpha: sim.alpha,
        tau_rel: sim.tau_rel,
    };
    let look = sim.sessions_per_look.max(1);
    let (mut t, mut h) = (ArmStats::default(), ArmStats::default());
    let mut sessions = 0u64;
    while sessions < sim.max_sessions {
        let n = look.min(sim.max_sessions - sessions);
        let (nh, ch, nt, ct) = draw_look(sim, n, rng);
        h.add(ch as f64, nh as f64, 0.0);
        t.add(ct as f64, nt as f64, 0.0);
        sessions += n;
        if compare(Family::Binomial, Side::Down, &t, &h, &cfg).is_some_and(|c| c.harmful) {
            return HoldoutRunResult {
                rejected_at: Some(sessions),
            };
        }
    }
    HoldoutRunResult { rejected_at: None }
}

/// Power, delays and false alarms of the sequential test, against the fixed-horizon test and
/// the information-theoretic minimum delay.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HoldoutReport {
    pub sim: HoldoutSim,
    pub runs: usize,
    pub seed: u64,
    /// Fraction of runs with the effect where harm was proven by `max_sessions`.
    pub power: f64,
    /// Mean, median and 90th percentile of the sessions at rejection, over rejected runs only.
    pub mean_delay: Option<f64>,
    pub median_delay: Option<f64>,
    pub p90_delay: Option<f64>,
    /// Fraction of rejected-or-not runs that rejected by `fixed_horizon_sessions`.
    pub power_at_fixed_horizon: f64,
    /// Fraction of runs without effect (same design, `relative_effect` = 0) that ever rejected
    /// by `max_sessions`, and its binomial standard error.
    pub false_alarm_rate: f64,
    pub false_alarm_se: f64,
    /// Sessions a one-sided fixed-horizon z-test at the same alpha needs for 80% power:
    /// N = (z_{1-alpha} + z_{0.8})² (p_t(1-p_t)/(1-q) + p_h(1-p_h)/q) / d².
    pub fixed_horizon_sessions: f64,
    /// Simulated power of that z-test, looked at once at `fixed_horizon_sessions`.
    pub fixed_horizon_power: f64,
    /// KL divergence per session of the observation (arm, converted) between the alternative and
    /// the nearest null (both arms at a common rate); see [`kl_per_session`].
    pub kl_per_session: f64,
    /// ln(1/alpha) / KL: the lower bound (asymptotic, as alpha -> 0) on the *expected* sessions
    /// to reject of any test with false-alarm probability alpha, even one that knew the effect in
    /// advance. Compare with `mean_delay`; at moderate alpha a median may fall below it.
    pub min_delay_sessions: f64,
}

/// Bernoulli KL divergence KL(Ber(a) || Ber(b)).
fn kl_bernoulli(a: f64, b: f64) -> f64 {
    let term = |x: f64, y: f64| if x > 0.0 { x * (x / y).ln() } else { 0.0 };
    term(a, b) + term(1.0 - a, 1.0 - b)
}

/// Per-session KL divergence of the observation (arm, converted) under the alternative
/// (holdout rate p, treatment rate p (1 + effect)) from the nearest null in which both arms
/// share a rate r. The arm is drawn the same way under both (holdout with probability q), so
/// KL(r) = (1-q) KL(Ber(p_t) || Ber(r)) + q KL(Ber(p) || Ber(r)); its minimum over r is at the
/// session-weighted mean rate r* = (1-q) p_t + q p (the derivative is (r - r*)/(r(1-r))).
/// This is the right rate for the composite null "no difference whatever the common rate";
/// for small effects it is about q(1-q) d² / (2 r*(1-r*)).
pub fn kl_per_session(base_rate: f64, relative_effect: f64, holdout_fraction: f64) -> f64 {
    let q = holdout_fraction;
    let p = base_rate;
    let pt = (p * (1.0 + relative_effect)).clamp(0.0, 1.0);
    let r = (1.0 - q) * pt + q * p;
    (1.0 - q) * kl_bernoulli(pt, r) + q * kl_bernoulli(p, r)
}

/// Sessions for a one-sided fixed-horizon z-test at `alpha` to have `power` against the
/// simulated effect (variance under the alternative); infinite without effect.
pub fn fixed_horizon_sessions(sim: &HoldoutSim, power: f64) -> f64 {
    let (p, pt, q) = (sim.base_rate, sim.treatment_rate(), sim.holdout_fraction);
    let d = pt - p;
    if d == 0.0 {
        return f64::INFINITY;
    }
    let std = Normal::new(0.0, 1.0).expect("standard normal");
    let z = std.inverse_cdf(1.0 - sim.alpha) + std.inverse_cdf(power);
    z * z * (pt * (1.0 - pt) / (1.0 - q) + p * (1.0 - p) / q) / (d * d)
}

/// Quantile with linear interpolation between order statistics (`xs` sorted).
fn quantile(xs: &[f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let pos = p * (xs.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo as f64))
}

const NULL_STREAM: u64 = 0x9E37_79B9_7F4A_7C15;
const FIXED_STREAM: u64 = 0xD1B5_4A32_D192_ED03;

/// `runs` experiments with the effect, `runs` without, and `runs` fixed-horizon z-tests, each
/// stream seeded from `seed` (same seed, same report).
pub fn run_report(sim: &HoldoutSim, runs: usize, seed: u64) -> HoldoutReport {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut delays: Vec<f64> = (0..runs)
        .filter_map(|_| simulate_run(sim, &mut rng).rejected_at.map(|s| s as f64))
        .collect();
    delays.sort_by(f64::total_cmp);

    let null = HoldoutSim {
        relative_effect: 0.0,
        ..*sim
    };
    let mut rng = SmallRng::seed_from_u64(seed ^ NULL_STREAM);
    let false_alarms = (0..runs)
        .filter(|_| simulate_run(&null, &mut rng).rejected_at.is_some())
        .count();

    let n_fixed = fixed_horizon_sessions(sim, 0.8);
    let std = Normal::new(0.0, 1.0).expect("standard normal");
    let z_crit = std.inverse_cdf(1.0 - sim.alpha);
    let fixed_power = if n_fixed.is_finite() && n_fixed <= u64::MAX as f64 {
        let n = n_fixed.ceil() as u64;
        let mut rng = SmallRng::seed_from_u64(seed ^ FIXED_STREAM);
        let hits = (0..runs)
            .filter(|_| {
                let (nh, ch, nt, ct) = draw_look(sim, n, &mut rng);
                let t = ArmStats {
                    num: ct as f64,
                    den: nt as f64,
                    sumsq: 0.0,
                };
                let h = ArmStats {
                    num: ch as f64,
                    den: nh as f64,
                    sumsq: 0.0,
                };
                let v = t.variance_of_rate(Family::Binomial) + h.variance_of_rate(Family::Binomial);
                nt > 0 && nh > 0 && (h.rate() - t.rate()) / v.sqrt() >= z_crit
            })
            .count();
        hits as f64 / runs.max(1) as f64
    } else {
        f64::NAN
    };

    let kl = kl_per_session(sim.base_rate, sim.relative_effect, sim.holdout_fraction);
    let runs_f = runs.max(1) as f64;
    let fa = false_alarms as f64 / runs_f;
    HoldoutReport {
        sim: *sim,
        runs,
        seed,
        power: delays.len() as f64 / runs_f,
        mean_delay: (!delays.is_empty()).then(|| delays.iter().sum::<f64>() / delays.len() as f64),
        median_delay: quantile(&delays, 0.5),
        p90_delay: quantile(&delays, 0.9),
        power_at_fixed_horizon: delays.iter().filter(|&&d| d <= n_fixed).count() as f64 / runs_f,
        false_alarm_rate: fa,
        false_alarm_se: (fa * (1.0 - fa) / runs_f).sqrt(),
        fixed_horizon_sessions: n_fixed,
        fixed_horizon_power: fixed_power,
        kl_per_session: kl,
        min_delay_sessions: if kl > 0.0 {
            (1.0 / sim.alpha).ln() / kl
        } else {
            f64::INFINITY
        },
    }
}

impl HoldoutReport {
    /// A markdown table (header and this report's row) for the README.
    pub fn table(&self) -> String {
        markdown_table(std::slice::from_ref(self))
    }
}

/// A markdown table with one row per report.
pub fn markdown_table(reports: &[HoldoutReport]) -> String {
    let mut out = String::from(
        "| alpha | effect | runs | power by max | mean delay | median delay | p90 delay | \
         power by N_fixed | null false alarms | N_fixed (z-test, 80%) | z-test power (sim) | \
         ln(1/alpha)/KL |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let sessions = |x: Option<f64>| x.map_or_else(|| "-".to_string(), fmt_thousands);
    for r in reports {
        out.push_str(&format!(
            "| {} | {:+.0}% at {}% | {} | {:.1}% by {} | {} | {} | {} | {:.1}% | {:.2}% ± {:.2}% | {} | {:.1}% | {} |\n",
            r.sim.alpha,
            r.sim.relative_effect * 100.0,
            fmt_sig(r.sim.base_rate * 100.0, 3),
            r.runs,
            r.power * 100.0,
            fmt_thousands(r.sim.max_sessions as f64),
            sessions(r.mean_delay),
            sessions(r.median_delay),
            sessions(r.p90_delay),
            r.power_at_fixed_horizon * 100.0,
            r.false_alarm_rate * 100.0,
            r.false_alarm_se * 100.0,
            sessions(Some(r.fixed_horizon_sessions).filter(|x| x.is_finite())),
            r.fixed_horizon_power * 100.0,
            sessions(Some(r.min_delay_sessions).filter(|x| x.is_finite())),
        ));
    }
    out
}

/// `x` with `digits` significant digits, no exponent for ordinary magnitudes.
fn fmt_sig(x: f64, digits: i32) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    if x == 0.0 {
        return "0".to_string();
    }
    let magnitude = x.abs().log10().floor() as i32;
    if !(-6..=12).contains(&magnitude) {
        return format!("{:.*e}", (digits - 1).max(0) as usize, x);
    }
    let decimals = (digits - 1 - magnitude).max(0) as usize;
    format!("{x:.decimals$}")
}

/// A confidence level as a percentage without spurious decimals: 0.95 -> "95", 0.995 -> "99.5".
fn fmt_percent_level(level: f64) -> String {
    let s = format!("{:.2}", level * 100.0);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Rounded to an integer, with thousands separators: 48,210.
fn fmt_thousands(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

fn fmt_p(p: f64) -> String {
    if p.is_nan() {
        "n/a".to_string()
    } else if p == 0.0 {
        "< 1e-300".to_string()
    } else if p < 1e-3 {
        format!("{p:.0e}")
    } else {
        fmt_sig(p, 2)
    }
}

fn fmt_bayes_factor(log_bf: f64) -> String {
    if log_bf.abs() > 1000f64.ln() {
        format!("e^{log_bf:.0}")
    } else {
        fmt_sig(log_bf.exp(), 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw_poisson(rng: &mut impl Rng, lambda: f64) -> f64 {
        if lambda <= 0.0 {
            return 0.0;
        }
        rand_distr::Poisson::new(lambda)
            .map(|d| d.sample(rng))
            .unwrap_or(0.0)
    }

    fn binomial_arm(num: u64, den: u64) -> ArmStats {
        ArmStats {
            num: num as f64,
            den: den as f64,
            sumsq: 0.0,
        }
    }

    /// Simpson's rule for ∫₀^∞ (2/τ) φ(θ/τ) exp((sθ - θ²/2)/V) dθ, over the bulk of the
    /// integrand (the posterior is N(b/a, 1/a) truncated at 0).
    fn integrated_lr(s: f64, v: f64, tau: f64) -> f64 {
        let a = 1.0 / v + 1.0 / (tau * tau);
        let b = s / v;
        let hi = (b / a).max(0.0) + 40.0 / a.sqrt();
        let n = 200_000;
        let step = hi / n as f64;
        let f = |x: f64| {
            let prior = 2.0 / (tau * (2.0 * std::f64::consts::PI).sqrt())
                * (-x * x / (2.0 * tau * tau)).exp();
            prior * ((s * x - x * x / 2.0) / v).exp()
        };
        let mut sum = f(0.0) + f(hi);
        for i in 1..n {
            let w = if i % 2 == 1 { 4.0 } else { 2.0 };
            sum += w * f(i as f64 * step);
        }
        sum * step / 3.0
    }

    #[test]
    fn mixture_formula_matches_numerical_integration() {
        let cases = [
            (0.0, 1.0, 1.0),
            (2.0, 0.5, 3.0),
            (-1.5, 0.5, 0.7),
            (0.01, 1e-5, 0.005),
            (-0.003, 4e-6, 0.002),
            (0.004, 2.5e-5, 0.005),
            (0.02, 1e-5, 0.005),
            (-0.02, 1e-5, 0.005),
        ];
        for (s, v, tau) in cases {
            let closed = log_half_normal_mixture_lr(s, v, tau);
            let numeric = integrated_lr(s, v, tau).ln();
            assert!(
                (closed - numeric).abs() < 1e-6,
                "s {s} V {v} tau {tau}: closed {closed} numeric {numeric}"
            );
        }
        // Far on the harmless side: finite and negative, no NaN from inf - inf.
        let far = log_half_normal_mixture_lr(-1.0, 1e-6, 0.005);
        assert!(far.is_finite() && far < 0.0, "{far}");
        // No harm at all: Λ = 1 when τ → 0.
        assert!(log_half_normal_mixture_lr(0.3, 1.0, 1e-9).abs() < 1e-6);
    }

    #[test]
    fn confidence_sequence_half_width_inverts_the_normal_mixture() {
        let (v, tau, alpha): (f64, f64, f64) = (2e-5, 0.004, 0.05);
        let hw = normal_mixture_cs_half_width(v, tau, alpha);
        let ln_normal_mixture = |x: f64| {
            0.5 * (v / (v + tau * tau)).ln() + x * x * tau * tau / (2.0 * v * (v + tau * tau))
        };
        assert!((ln_normal_mixture(hw) - (1.0 / alpha).ln()).abs() < 1e-9);
    }

    fn null_false_alarm_rate(
        family: Family,
        side: Side,
        runs: usize,
        looks: usize,
        seed: u64,
        mut draw: impl FnMut(&mut SmallRng) -> (ArmStats, ArmStats),
    ) -> f64 {
        let cfg = MsprtConfig {
            alpha: 0.05,
            tau_rel: 0.1,
        };
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut alarms = 0;
        for _ in 0..runs {
            let (mut t, mut h) = (ArmStats::default(), ArmStats::default());
            for _ in 0..looks {
                let (dt, dh) = draw(&mut rng);
                t.add(dt.num, dt.den, dt.sumsq);
                h.add(dh.num, dh.den, dh.sumsq);
                if compare(family, side, &t, &h, &cfg).is_some_and(|c| c.harmful) {
                    alarms += 1;
                    break;
                }
            }
        }
        alarms as f64 / runs as f64
    }

    fn assert_within_alpha(name: &str, rate: f64, runs: usize, alpha: f64) {
        let se = (alpha * (1.0 - alpha) / runs as f64).sqrt();
        println!("{name}: realised false-alarm rate {rate:.4} over {runs} runs (alpha {alpha})");
        assert!(rate <= alpha + 3.0 * se, "{name}: {rate} > {alpha} + 3 se");
    }

    fn binomial_look(rng: &mut SmallRng, n: u64, q: f64, p: f64) -> (ArmStats, ArmStats) {
        let nh = draw_binomial(rng, n, q);
        let nt = n - nh;
        let t = binomial_arm(draw_binomial(rng, nt, p), nt);
        let h = binomial_arm(draw_binomial(rng, nh, p), nh);
        (t, h)
    }

    #[test]
    fn binomial_null_false_alarms_under_continuous_looks_within_alpha() {
        // 50 looks of 2,000 sessions: V crosses τ² (where the mixture is most tempted) mid-run.
        let runs = 2000;
        let down = null_false_alarm_rate(Family::Binomial, Side::Down, runs, 50, 1, |rng| {
            binomial_look(rng, 2000, 0.1, 0.05)
        });
        assert_within_alpha("binomial, harm = drop", down, runs, 0.05);
        let up = null_false_alarm_rate(Family::Binomial, Side::Up, runs, 50, 2, |rng| {
            binomial_look(rng, 2000, 0.1, 0.05)
        });
        assert_within_alpha("binomial, harm = rise", up, runs, 0.05);
        // Rare events, thin holdout, looks from the very first sessions: the normal
        // approximation is at its worst.
        let rare = null_false_alarm_rate(Family::Binomial, Side::Up, 1000, 100, 3, |rng| {
            binomial_look(rng, 500, 0.1, 0.01)
        });
        assert_within_alpha("binomial rare, harm = rise", rare, 1000, 0.05);
    }

    #[test]
    fn small_samples_with_a_wide_mixture_stay_within_alpha() {
        // Regression: with each arm's own variance in the test, this design (10 holdout sessions
        // per look, tau = the whole rate) raised 14% false alarms at alpha 5% on the "rise" side:
        // a holdout low by chance also looked precise.
        let cfg = MsprtConfig {
            alpha: 0.05,
            tau_rel: 1.0,
        };
        let runs = 1000;
        for (side, seed) in [(Side::Up, 21), (Side::Down, 22)] {
            let mut rng = SmallRng::seed_from_u64(seed);
            let (mut alarms, mut misses) = (0, 0);
            for _ in 0..runs {
                let (mut t, mut h) = (ArmStats::default(), ArmStats::default());
                let (mut alarmed, mut missed) = (false, false);
                for _ in 0..300 {
                    let (dt, dh) = binomial_look(&mut rng, 100, 0.1, 0.05);
                    t.add(dt.num, dt.den, 0.0);
                    h.add(dh.num, dh.den, 0.0);
                    if let Some(c) = compare(Family::Binomial, side, &t, &h, &cfg) {
                        alarmed |= c.harmful;
                        missed |= !(c.ci_low <= 0.0 && 0.0 <= c.ci_high);
                    }
                    if alarmed && missed {
                        break;
                    }
                }
                alarms += alarmed as usize;
                misses += missed as usize;
            }
            let name = format!("binomial small samples tau_rel 1, {side:?}");
            assert_within_alpha(&name, alarms as f64 / runs as f64, runs, 0.05);
            let name = format!("confidence sequence small samples tau_rel 1, {side:?}");
            assert_within_alpha(&name, misses as f64 / runs as f64, runs, 0.05);
        }
    }

    #[test]
    fn poisson_and_gaussian_null_false_alarms_within_alpha() {
        let runs = 1000;
        let poisson = |side: Side, seed: u64| {
            null_false_alarm_rate(Family::Poisson, side, runs, 50, seed, |rng| {
                // Exposure split 90/10 per look, 0.2 events per unit of exposure.
                let (et, eh) = (900.0, 100.0);
                let t = ArmStats {
                    num: draw_poisson(rng, 0.2 * et),
                    den: et,
                    sumsq: 0.0,
                };
                let h = ArmStats {
                    num: draw_poisson(rng, 0.2 * eh),
                    den: eh,
                    sumsq: 0.0,
                };
                (t, h)
            })
        };
        assert_within_alpha("poisson, harm = drop", poisson(Side::Down, 4), runs, 0.05);
        assert_within_alpha("poisson, harm = rise", poisson(Side::Up, 5), runs, 0.05);

        // Values N(10, 3²): the look's mean and within-look sum of squares drawn exactly
        // (x̄ ~ N(μ, σ²/n), Σ(x - x̄)² ~ σ² χ²(n-1), independent).
        let gaussian_arm = |rng: &mut SmallRng, n: f64| {
            let (mu, sigma) = (10.0, 3.0);
            let mean: f64 = rand_distr::Normal::new(mu, sigma / n.sqrt())
                .unwrap()
                .sample(rng);
            let within: f64 = rand_distr::ChiSquared::new(n - 1.0).unwrap().sample(rng);
            ArmStats {
                num: mean * n,
                den: n,
                sumsq: sigma * sigma * within + n * mean * mean,
            }
        };
        let gaussian = |side: Side, seed: u64| {
            null_false_alarm_rate(Family::Gaussian, side, runs, 50, seed, |rng| {
                (gaussian_arm(rng, 180.0), gaussian_arm(rng, 20.0))
            })
        };
        assert_within_alpha("gaussian, harm = drop", gaussian(Side::Down, 6), runs, 0.05);
        assert_within_alpha("gaussian, harm = rise", gaussian(Side::Up, 7), runs, 0.05);
    }

    fn power_sim() -> HoldoutSim {
        HoldoutSim {
            base_rate: 0.05,
            relative_effect: -0.10,
            holdout_fraction: 0.1,
            sessions_per_look: 10_000,
            max_sessions: 2_000_000,
            alpha: 0.05,
            tau_rel: 0.1,
        }
    }

    #[test]
    fn ten_percent_drop_is_proven_in_most_runs() {
        let sim = power_sim();
        let mut rng = SmallRng::seed_from_u64(11);
        let runs = 200;
        let mut delays: Vec<u64> = (0..runs)
            .filter_map(|_| simulate_run(&sim, &mut rng).rejected_at)
            .collect();
        delays.sort_unstable();
        let power = delays.len() as f64 / runs as f64;
        println!(
            "power {power:.3}, median delay {:?} sessions",
            delays.get(delays.len() / 2)
        );
        assert!(power >= 0.9, "power {power}");
    }

    #[test]
    fn improvements_are_never_harm() {
        // A 20% rise when harm is a drop, and a 20% drop when harm is a rise.
        let cfg = MsprtConfig {
            alpha: 0.05,
            tau_rel: 0.1,
        };
        let mut rng = SmallRng::seed_from_u64(12);
        for (effect, side) in [(0.2, Side::Down), (-0.2, Side::Up)] {
            for _ in 0..100 {
                let (mut t, mut h) = (ArmStats::default(), ArmStats::default());
                for _ in 0..100 {
                    let nh = draw_binomial(&mut rng, 10_000, 0.1);
                    let nt = 10_000 - nh;
                    h.add(draw_binomial(&mut rng, nh, 0.05) as f64, nh as f64, 0.0);
                    t.add(
                        draw_binomial(&mut rng, nt, 0.05 * (1.0 + effect)) as f64,
                        nt as f64,
                        0.0,
                    );
                    let c = compare(Family::Binomial, side, &t, &h, &cfg).unwrap();
                    assert!(!c.harmful, "{}", c.evidence());
                    assert!(c.log_lambda.is_finite());
                }
            }
        }
    }

    #[test]
    fn confidence_sequence_covers_uniformly_over_looks() {
        let alpha = 0.05;
        let cfg = MsprtConfig {
            alpha,
            tau_rel: 0.1,
        };
        let (p, pt, q) = (0.05, 0.045, 0.1);
        let truth = pt - p;
        let mut rng = SmallRng::seed_from_u64(13);
        let runs = 1000;
        let mut misses = 0;
        for _ in 0..runs {
            let (mut t, mut h) = (ArmStats::default(), ArmStats::default());
            for _ in 0..100 {
                let nh = draw_binomial(&mut rng, 5_000, q);
                let nt = 5_000 - nh;
                h.add(draw_binomial(&mut rng, nh, p) as f64, nh as f64, 0.0);
                t.add(draw_binomial(&mut rng, nt, pt) as f64, nt as f64, 0.0);
                let c = compare(Family::Binomial, Side::Down, &t, &h, &cfg).unwrap();
                if !(c.ci_low <= truth && truth <= c.ci_high) {
                    misses += 1;
                    break;
                }
            }
        }
        let rate = misses as f64 / runs as f64;
        println!("confidence sequence: missed the truth at some look in {rate:.4} of runs");
        assert_within_alpha("confidence sequence", rate, runs, alpha);
    }

    #[test]
    fn compare_needs_data_and_a_valid_config() {
        let cfg = MsprtConfig {
            alpha: 0.05,
            tau_rel: 0.1,
        };
        let some = binomial_arm(5, 100);
        assert!(compare(
            Family::Binomial,
            Side::Down,
            &some,
            &ArmStats::default(),
            &cfg
        )
        .is_none());
        assert!(compare(
            Family::Binomial,
            Side::Down,
            &binomial_arm(5, 3),
            &some,
            &cfg
        )
        .is_none());
        let one = ArmStats {
            num: 3.0,
            den: 1.0,
            sumsq: 9.0,
        };
        assert!(compare(Family::Gaussian, Side::Down, &one, &one, &cfg).is_none());
        let bad = MsprtConfig { alpha: 1.5, ..cfg };
        assert!(compare(Family::Binomial, Side::Down, &some, &some, &bad).is_none());
        // Too few expected events in the thinner arm (100 x 4% = 4 < 5), then enough.
        assert!(compare(
            Family::Binomial,
            Side::Up,
            &binomial_arm(36, 900),
            &binomial_arm(4, 100),
            &cfg
        )
        .is_none());
        assert!(compare(
            Family::Binomial,
            Side::Up,
            &binomial_arm(45, 900),
            &binomial_arm(5, 100),
            &cfg
        )
        .is_some());
        // A holdout without a single event: defined, relative effect undefined.
        let c = compare(
            Family::Poisson,
            Side::Down,
            &ArmStats {
                num: 90.0,
                den: 900.0,
                sumsq: 0.0,
            },
            &ArmStats {
                num: 0.0,
                den: 100.0,
                sumsq: 0.0,
            },
            &cfg,
        )
        .unwrap();
        assert!(!c.harmful && c.se > 0.0 && c.relative.is_nan());
        assert!(c.evidence().contains("difference 0.1"), "{}", c.evidence());
    }

    #[test]
    fn evidence_reads_well() {
        let cfg = MsprtConfig {
            alpha: 0.05,
            tau_rel: 0.1,
        };
        let c = compare(
            Family::Binomial,
            Side::Down,
            &binomial_arm(40_590, 900_000),
            &binomial_arm(5_020, 100_000),
            &cfg,
        )
        .unwrap();
        let e = c.evidence();
        println!("{e}");
        assert!(e.starts_with("treatment 4.51% vs holdout 5.02% (-10.2%, always-valid 95% CI "));
        assert!(e.contains("mSPRT lnΛ") && e.ends_with("/ 3.0"), "{e}");
        assert!(c.harmful && c.rel_ci_low < c.relative && c.relative < c.rel_ci_high);

        let s = srm(45_269.0, 2_941.0, 0.1, 0.05).unwrap();
        println!("{}", s.evidence());
        assert!(s
            .evidence()
            .starts_with("holdout got 6.1% of 48,210 exposures, expected 10.0% (p = "));
        assert!(s.evidence().ends_with("not trustworthy"));
    }

    #[test]
    fn srm_passes_a_healthy_split_and_flags_a_broken_one() {
        let ok = srm(45_000.0, 5_000.0, 0.1, 0.01).unwrap();
        assert!(
            !ok.mismatch && ok.log_bayes_factor < 0.0,
            "{}",
            ok.evidence()
        );
        assert!((ok.p_value - 1.0).abs() < 1e-9);
        let broken = srm(46_000.0, 4_000.0, 0.1, 0.01).unwrap();
        assert!(broken.mismatch, "{}", broken.evidence());
        assert!(broken.p_value < 1e-20, "{}", broken.p_value);
        assert!(srm(90.0, 5.0, 0.1, 0.01).is_none());
        assert!(srm(900.0, 100.0, 1.0, 0.01).is_none());
    }

    #[test]
    fn srm_null_false_alarms_under_continuous_looks_within_alpha() {
        let (alpha, q, runs) = (0.05, 0.1, 1000);
        let mut rng = SmallRng::seed_from_u64(14);
        let mut alarms = 0;
        for _ in 0..runs {
            let (mut nt, mut nh) = (0u64, 0u64);
            for _ in 0..200 {
                let h = draw_binomial(&mut rng, 500, q);
                nh += h;
                nt += 500 - h;
                if srm(nt as f64, nh as f64, q, alpha).is_some_and(|s| s.mismatch) {
                    alarms += 1;
                    break;
                }
            }
        }
        assert_within_alpha("srm", alarms as f64 / runs as f64, runs, alpha);
    }

    #[test]
    fn run_report_is_deterministic_by_seed() {
        let sim = HoldoutSim {
            sessions_per_look: 20_000,
            max_sessions: 600_000,
            ..power_sim()
        };
        let a = run_report(&sim, 40, 7);
        let b = run_report(&sim, 40, 7);
        assert_eq!(a, b);
        let c = run_report(&sim, 40, 8);
        assert_ne!(a, c);
        let table = a.table();
        println!("{table}");
        assert_eq!(table.lines().count(), 3);
        // The KL minimum and the closed-form N are in the right ballpark.
        assert!(a.kl_per_session > 0.0 && a.min_delay_sessions < a.fixed_horizon_sessions);
        assert!(
            (a.fixed_horizon_sessions - 129_300.0).abs() < 1_000.0,
            "{}",
            a.fixed_horizon_sessions
        );
    }

    #[test]
    fn kl_minimiser_is_the_weighted_rate() {
        let (p, e, q) = (0.05, -0.1, 0.1);
        let pt = p * (1.0 + e);
        let kl = |r: f64| (1.0 - q) * kl_bernoulli(pt, r) + q * kl_bernoulli(p, r);
        let best = kl_per_session(p, e, q);
        for r in [0.044, 0.045, 0.0454, 0.0456, 0.046, 0.05] {
            assert!(kl(r) >= best - 1e-15, "r {r}");
        }
        let d = pt - p;
        let r = (1.0 - q) * pt + q * p;
        let approx = q * (1.0 - q) * d * d / (2.0 * r * (1.0 - r));
        assert!((best / approx - 1.0).abs() < 0.05, "{best} vs {approx}");
    }
}
