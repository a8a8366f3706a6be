//! Where a shift began, and how sure we are of it.
//!
//! When a detector fires, the onset is estimated by maximum likelihood over the series' recent
//! history: for every candidate onset `k`, the windows before `k` and the windows from `k` on
//! are each given their own level relative to the baseline's forecast (a rate factor for counts
//! and ratios, a mean shift for means; the later level on the harmful side of the earlier, the
//! earlier shrunk towards the forecast) and the profile log-likelihood is computed.
//! With a flat prior over windows, `exp(profile)` is the (profile) posterior of the onset; the
//! smallest set of windows holding [`COVERAGE`] of it gives the interval `[low, high]`. Its
//! realised coverage is measured by `bench detect` (BENCHMARKS.md).
//!
//! Ratios use the Poisson form of the likelihood divided by `1 - p` (the binomial's Fisher
//! information for a rate factor is the Poisson's over `1 - p`), so that a history can be summed
//! into two numbers per span: observed and expected events. Means use the Gaussian form with
//! each window's own variance: the sums of `(mean - forecast) / var` and `1 / var`.
//! Both are divided by the baseline's dispersion factor, as the detectors' are.

use crate::detect::Side;

/// Nominal posterior mass of the onset set.
pub const COVERAGE: f64 = 0.95;

/// Sufficient statistics of a span of windows: observed and expected events (counts,
/// ratios), or the sums of `(mean - forecast) / var` and `1 / var` (means).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Suff {
    pub x: f32,
    pub e: f32,
}

impl Suff {
    pub fn add(&mut self, o: Suff) {
        self.x += o.x;
        self.e += o.e;
    }
}

/// A span of consecutive windows of the history (one window, or a coarse bucket).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub first_window: i64,
    pub windows: i64,
    pub stat: Suff,
}

impl Span {
    fn last_window(&self) -> i64 {
        self.first_window + self.windows - 1
    }
}

/// Windows per coarse bucket (an hour of 5-minute windows).
pub const COARSE_WINDOWS: i64 = 12;
/// Coarse buckets kept at most (a week of them): the oldest are dropped first.
pub const COARSE_MAX: usize = 168;

/// Sums of consecutive windows in buckets of [`COARSE_WINDOWS`] (aligned to multiples of it):
/// the history beyond the per-window ring, kept while evidence builds there.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Coarse {
    /// First window summed, and one past the last.
    first: i64,
    next: i64,
    sums: std::collections::VecDeque<Suff>,
}

impl Coarse {
    pub fn new(first: i64) -> Coarse {
        Coarse {
            first,
            next: first,
            sums: Default::default(),
        }
    }

    /// Adds window `w` (the one after the last added; otherwise the history restarts at `w`).
    pub fn push(&mut self, w: i64, s: Option<Suff>) {
        if w != self.next {
            *self = Coarse::new(w);
        }
        let base = self.first.div_euclid(COARSE_WINDOWS);
        let idx = (w.div_euclid(COARSE_WINDOWS) - base) as usize;
        while self.sums.len() <= idx {
            self.sums.push_back(Suff::default());
        }
        if let Some(s) = s {
            self.sums[idx].add(s);
        }
        self.next = w + 1;
        if self.sums.len() > COARSE_MAX {
            self.sums.pop_front();
            self.first = (base + 1) * COARSE_WINDOWS;
        }
    }

    /// The buckets as spans, oldest first, from window `from` on.
    pub fn spans(&self, from: i64) -> Vec<Span> {
        let base = self.first.div_euclid(COARSE_WINDOWS);
        self.sums
            .iter()
            .enumerate()
            .filter_map(|(i, &stat)| {
                let b0 = (base + i as i64) * COARSE_WINDOWS;
                let first = b0.max(self.first).max(from);
                let last = (b0 + COARSE_WINDOWS - 1).min(self.next - 1);
                (last >= first).then_some(Span {
                    first_window: first,
                    windows: last - first + 1,
                    stat,
                })
            })
            .collect()
    }

    /// One past the last window summed.
    pub fn next_window(&self) -> i64 {
        self.next
    }
}

/// The likelihood's form.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Model {
    /// Counts and ratios: a rate factor. `scale` divides the log-likelihood: the dispersion
    /// factor, times `1 - p` for ratios.
    Rate { scale: f64 },
    /// Means: a shift of the mean, over the dispersion `scale`.
    Mean { scale: f64 },
}

/// The onset estimate of one detection.
#[derive(Debug, Clone, PartialEq)]
pub struct Onset {
    /// Window where the shift most likely began (maximum likelihood).
    pub window: i64,
    /// First and last window of the onset set (inclusive).
    pub low_window: i64,
    pub high_window: i64,
    /// Profile log-likelihood ratio of each span as the onset, oldest first.
    profile: Vec<(Span, f64)>,
    best: f64,
}

impl Onset {
    /// The onset's likelihood in windows `[from, to]` relative to the best onset's, averaged
    /// over the windows (a uniform prior over a change source's clock error). None when no
    /// span of the history meets the range.
    pub fn mean_ratio_in(&self, from: i64, to: i64) -> Option<f64> {
        let (mut sum, mut n) = (0.0, 0i64);
        for (s, l) in &self.profile {
            let k = s.last_window().min(to) - s.first_window.max(from) + 1;
            if k > 0 {
                sum += k as f64 * (l - self.best).exp();
                n += k;
            }
        }
        (n > 0).then(|| sum / n as f64)
    }

    /// [`Onset::mean_ratio_in`] over the best such average of any range as long: in (0, 1], 1
    /// for a change whose time (give or take the clock skew) is where the shift most likely
    /// began, however sharp or flat the likelihood is.
    pub fn fit_in(&self, from: i64, to: i64) -> Option<f64> {
        let mine = self.mean_ratio_in(from, to)?;
        let len = (to - from + 1).max(1) as usize;
        let per: Vec<f64> = self
            .profile
            .iter()
            .flat_map(|(s, l)| std::iter::repeat((l - self.best).exp()).take(s.windows as usize))
            .collect();
        let mut best = 0.0f64;
        let mut sum: f64 = per.iter().take(len).sum();
        best = best.max(sum / len.min(per.len()).max(1) as f64);
        for i in len..per.len() {
            sum += per[i] - per[i - len];
            best = best.max(sum / len as f64);
        }
        Some((mine / best.max(1e-300)).min(1.0))
    }

    /// First window of the history searched.
    pub fn searched_from(&self) -> Option<i64> {
        self.profile.first().map(|(s, _)| s.first_window)
    }
}

/// The level before the onset is estimated too (a forecast a few percent off would otherwise
/// pull the onset back to where the forecast began to err), shrunk towards the forecast with the
/// weight of this many expected events: busy series correct the forecast from their own recent
/// windows, sparse ones keep it.
const PRE_PRIOR_EVENTS: f64 = 100.0;
/// The same for means, in windows' worth of information.
const PRE_PRIOR_WINDOWS: f64 = 24.0;

/// Log-likelihood (up to a constant) of a rate factor `lam` on `x` observed of `e` expected.
fn pois(x: f64, e: f64, lam: f64) -> f64 {
    let xl = if x > 0.0 {
        x * lam.max(1e-12).ln()
    } else {
        0.0
    };
    xl - (lam - 1.0) * e
}

/// Profile log-likelihood of "the level moved from `pre` to `tail`": each level estimated
/// (the earlier one shrunk towards the forecast by `prior`), the later one on the harmful side
/// of the earlier; when the data put it on the other side, one level for both.
fn profile(model: Model, side: Side, pre: Suff, tail: Suff, prior: f64) -> f64 {
    let (xp, ep) = (pre.x as f64, pre.e as f64);
    let (xt, et) = (tail.x as f64, tail.e as f64);
    let harmful = |before: f64, after: f64| match side {
        Side::Down => after < before,
        Side::Up => after > before,
    };
    match model {
        Model::Rate { scale } => {
            let l0 = (xp + prior) / (ep + prior);
            let l1 = if et > 0.0 { xt / et } else { l0 };
            let ll = if harmful(l0, l1) {
                pois(xp, ep, l0) + prior * pois(1.0, 1.0, l0) + pois(xt, et, l1)
            } else {
                let l = (xp + xt + prior) / (ep + et + prior);
                pois(xp + xt, ep + et, l) + prior * pois(1.0, 1.0, l)
            };
            ll / scale.max(1e-12)
        }
        Model::Mean { scale } => {
            // Gaussian: sum of a d - b d^2 / 2 over the spans, with d the level's shift.
            let d0 = xp / (ep + prior);
            let d1 = if et > 0.0 { xt / et } else { d0 };
            let g = |a: f64, b: f64, d: f64| a * d - 0.5 * b * d * d;
            let ll = if harmful(d0, d1) {
                g(xp, ep + prior, d0) + g(xt, et, d1)
            } else {
                let d = (xp + xt) / (ep + et + prior);
                g(xp + xt, ep + et + prior, d)
            };
            ll / scale.max(1e-12)
        }
    }
}

/// Estimates the onset over `spans` (oldest first, consecutive, ending with the window that
/// fired). None without any span.
pub fn estimate(spans: &[Span], model: Model, side: Side, coverage: f64) -> Option<Onset> {
    if spans.is_empty() {
        return None;
    }
    let mut total = Suff::default();
    for s in spans {
        total.add(s.stat);
    }
    let prior = match model {
        Model::Rate { .. } => PRE_PRIOR_EVENTS,
        Model::Mean { .. } => {
            let windows: i64 = spans.iter().map(|s| s.windows).sum();
            PRE_PRIOR_WINDOWS * total.e as f64 / windows.max(1) as f64
        }
    };
    let mut prof = vec![0.0; spans.len()];
    let mut tail = Suff::default();
    for (i, s) in spans.iter().enumerate().rev() {
        tail.add(s.stat);
        let pre = Suff {
            x: total.x - tail.x,
            e: total.e - tail.e,
        };
        prof[i] = profile(model, side, pre, tail, prior);
    }
    let (bi, best) = prof
        .iter()
        .copied()
        .enumerate()
        // The latest of equal maxima: a flat stretch before the shift carries no evidence.
        .fold((0, f64::NEG_INFINITY), |acc, (i, l)| {
            if l >= acc.1 {
                (i, l)
            } else {
                acc
            }
        });
    // Posterior per window (flat prior over windows): a span weighs its windows.
    let weight: Vec<f64> = spans
        .iter()
        .zip(&prof)
        .map(|(s, l)| s.windows as f64 * (l - best).exp())
        .collect();
    let total: f64 = weight.iter().sum();
    let mut order: Vec<usize> = (0..spans.len()).collect();
    // Highest density (per window) first.
    order.sort_by(|&a, &b| prof[b].total_cmp(&prof[a]).then(b.cmp(&a)));
    let (mut low, mut high) = (spans[bi].first_window, spans[bi].last_window());
    let mut mass = 0.0;
    for i in order {
        if mass >= coverage * total {
            break;
        }
        mass += weight[i];
        low = low.min(spans[i].first_window);
        high = high.max(spans[i].last_window());
    }
    Some(Onset {
        window: spans[bi].first_window,
        low_window: low,
        high_window: high,
        profile: spans.iter().copied().zip(prof).collect(),
        best,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use statrs::distribution::{Normal, Poisson};

    fn spans(xs: &[(f64, f64)]) -> Vec<Span> {
        xs.iter()
            .enumerate()
            .map(|(i, &(x, e))| Span {
                first_window: i as i64,
                windows: 1,
                stat: Suff {
                    x: x as f32,
                    e: e as f32,
                },
            })
            .collect()
    }

    #[test]
    fn finds_a_clear_step() {
        let mut xs = vec![(100.0, 100.0); 30];
        xs.extend(vec![(70.0, 100.0); 10]);
        let o = estimate(
            &spans(&xs),
            Model::Rate { scale: 1.0 },
            Side::Down,
            COVERAGE,
        )
        .unwrap();
        assert_eq!(o.window, 30);
        assert!(o.low_window >= 29 && o.high_window <= 31, "{o:?}");
        assert_eq!(o.mean_ratio_in(30, 30), Some(1.0));
        assert!(o.mean_ratio_in(20, 20).unwrap() < (-10.0f64).exp());
        assert!(o.mean_ratio_in(100, 100).is_none());
    }

    #[test]
    fn a_coarse_bucket_spans_its_windows() {
        let mut s = vec![Span {
            first_window: 0,
            windows: 12,
            stat: Suff { x: 12.0, e: 12.0 },
        }];
        s.extend(spans(&[(0.0, 1.0); 12]).into_iter().map(|mut x| {
            x.first_window += 12;
            x
        }));
        let o = estimate(&s, Model::Rate { scale: 1.0 }, Side::Down, COVERAGE).unwrap();
        assert!(o.low_window >= 6, "{o:?}");
        assert_eq!(o.mean_ratio_in(0, 3).map(|l| l < 1.0), Some(true));
    }

    /// Coverage of the onset set on simulated sparse and busy steps, with the history cut
    /// where a detector would have fired (the posterior is checked, not assumed).
    #[test]
    fn onset_set_covers_the_true_onset() {
        let mut rng = SmallRng::seed_from_u64(11);
        for (mu, factor, after) in [(0.5, 2.0, 60), (5.0, 0.7, 20), (200.0, 0.9, 12)] {
            let c = coverage(&mut rng, 400, 40, after, mu, |w| {
                if w >= 40 {
                    factor
                } else {
                    1.0
                }
            });
            eprintln!("mu {mu} x{factor}: coverage {c:.3}");
            assert!(c >= 0.88, "mu {mu}: coverage {c}");
        }
    }

    /// Share of `runs` Poisson series (forecast `mu`, true rate `mu * factor(w)`, `at + after`
    /// windows, the shift at `at`) whose onset set holds `at`.
    fn coverage(
        rng: &mut SmallRng,
        runs: usize,
        at: usize,
        after: usize,
        mu: f64,
        factor: impl Fn(usize) -> f64,
    ) -> f64 {
        let side = if factor(at) > factor(at - 1) {
            Side::Up
        } else {
            Side::Down
        };
        let mut covered = 0;
        for _ in 0..runs {
            let xs: Vec<(f64, f64)> = (0..at + after)
                .map(|w| (rng.sample(Poisson::new(mu * factor(w)).unwrap()), mu))
                .collect();
            let o = estimate(&spans(&xs), Model::Rate { scale: 1.0 }, side, COVERAGE).unwrap();
            covered += (o.low_window <= at as i64 && at as i64 <= o.high_window) as usize;
        }
        covered as f64 / runs as f64
    }

    #[test]
    fn coarse_buckets_align_and_stay_bounded() {
        let mut c = Coarse::new(5);
        for w in 5..30 {
            c.push(w, Some(Suff { x: 1.0, e: 2.0 }));
        }
        let sp = c.spans(0);
        assert_eq!(
            sp.iter()
                .map(|s| (s.first_window, s.windows))
                .collect::<Vec<_>>(),
            vec![(5, 7), (12, 12), (24, 6)]
        );
        assert_eq!(sp[1].stat, Suff { x: 12.0, e: 24.0 });
        // A gap restarts it.
        c.push(40, None);
        assert_eq!(c.spans(0).len(), 1);
        let mut c = Coarse::new(0);
        for w in 0..(COARSE_MAX as i64 + 5) * COARSE_WINDOWS {
            c.push(w, Some(Suff { x: 1.0, e: 1.0 }));
        }
        assert_eq!(c.spans(0).len(), COARSE_MAX);
    }

    /// A forecast 5% too high for the last hours before a -18% drop on a busy series (the
    /// seasonal baseline is seldom exact): the onset set still holds the true onset.
    #[test]
    fn a_biased_forecast_does_not_pull_the_onset_back() {
        let mut rng = SmallRng::seed_from_u64(5);
        let c = coverage(&mut rng, 300, 40, 8, 96.0, |w| match w {
            w if w >= 40 => 0.82,
            w if w >= 29 => 0.95,
            _ => 1.0,
        });
        eprintln!("biased forecast: coverage {c:.3}");
        assert!(c >= 0.85, "{c}");
    }

    #[test]
    fn means_shift_down() {
        let mut rng = SmallRng::seed_from_u64(3);
        let n = Normal::new(0.0, 1.0).unwrap();
        // Per window: (mean - forecast) / var with var 1, and 1 / var.
        let xs: Vec<(f64, f64)> = (0..60)
            .map(|w| {
                let d = if w >= 40 { -1.0 } else { 0.0 };
                (d + rng.sample(n), 1.0)
            })
            .collect();
        let o = estimate(
            &spans(&xs),
            Model::Mean { scale: 1.0 },
            Side::Down,
            COVERAGE,
        )
        .unwrap();
        assert!(o.low_window <= 40 && 40 <= o.high_window, "{o:?}");
        assert!((o.window - 40).abs() <= 3, "{o:?}");
    }
}
