//! What normal looks like, per series: a seasonal, outlier-robust online baseline.
//!
//! Every metric kind reduces a window to a pair (numerator, denominator): conversions over
//! sessions, tickets over sessions (or over 1 window without exposure), sum of values over
//! observations. The baseline keeps exponentially weighted sums of both per season bucket (hour
//! of day or hour of week) and overall, so its rate is volume-weighted and a thin window moves
//! it little. Updates are Huber-clipped (a spike cannot drag the level), the spread is learnt as
//! a dispersion factor over the model's own variance, and the whole thing is frozen while the
//! series is in an incident or accumulating evidence of one, so it never learns the anomaly.

use crate::config::Seasonality;

/// The statistical family a metric's windows follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Successes out of trials (ratios).
    Binomial,
    /// Events over exposure (counts, distinct counts).
    Poisson,
    /// Sum of real values over observations (means).
    Gaussian,
}

/// One window of one series, reduced.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Obs {
    /// Successes, events, or sum of values.
    pub num: f64,
    /// Trials, exposure (1.0 per window when a count has none), or observations.
    pub den: f64,
    /// Sum of squared values (Gaussian only).
    pub sumsq: f64,
}

/// The baseline's forecast for one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Expect {
    /// Expected rate: p for binomial, events per unit exposure for Poisson, mean for Gaussian.
    pub rate: f64,
    /// Dispersion factor (>= 1) over the family's variance, learnt from residuals.
    pub phi: f64,
    /// Per-observation variance (Gaussian).
    pub sigma2: f64,
    /// Between-window variance of the mean beyond sampling noise (Gaussian).
    pub tau2: f64,
}

impl Expect {
    /// Variance of the window's observed rate num/den under the baseline.
    pub fn rate_variance(&self, family: Family, den: f64) -> f64 {
        let den = den.max(1e-9);
        match family {
            Family::Binomial => self.phi * self.rate * (1.0 - self.rate) / den,
            Family::Poisson => self.phi * self.rate.max(1e-12) / den,
            Family::Gaussian => self.sigma2 / den + self.tau2,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    num: f32,
    den: f32,
    n: u16,
}

impl Bucket {
    fn rate(&self) -> Option<f64> {
        (self.den > 0.0).then(|| self.num as f64 / self.den as f64)
    }
    fn update(&mut self, num: f64, den: f64, alpha_min: f64) {
        let alpha = (1.0 / (self.n as f64 + 1.0)).max(alpha_min);
        self.num = ((1.0 - alpha) * self.num as f64 + alpha * num) as f32;
        self.den = ((1.0 - alpha) * self.den as f64 + alpha * den) as f32;
        self.n = self.n.saturating_add(1);
    }
}

/// Per-series baseline. About 10 bytes per season bucket plus a fixed ~40 bytes.
#[derive(Debug, Clone)]
pub struct Baseline {
    family: Family,
    seasonality: Seasonality,
    buckets: Box<[Bucket]>,
    global: Bucket,
    /// EWMA of squared (clipped) Pearson residuals: the dispersion factor.
    phi: f32,
    sigma2: f32,
    tau2: f32,
    /// Windows learnt from.
    learnt: u32,
    alpha_min: f64,
}

/// Bucket weight reaches 1/2 once a bucket has seen this many windows; before that the
/// non-seasonal level fills in, so a cold bucket never forecasts from one window.
const BUCKET_PRIOR: f64 = 4.0;
/// Huber clipping of residuals, in standard deviations.
const HUBER_C: f64 = 3.0;

impl Baseline {
    pub fn new(family: Family, seasonality: Seasonality, half_life_windows: f64) -> Baseline {
        let alpha_min = 1.0 - 0.5f64.powf(1.0 / half_life_windows.max(1.0));
        Baseline {
            family,
            seasonality,
            buckets: vec![Bucket::default(); seasonality.buckets()].into_boxed_slice(),
            global: Bucket::default(),
            phi: 1.0,
            sigma2: 0.0,
            tau2: 0.0,
            learnt: 0,
            alpha_min,
        }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// Windows this baseline has learnt from.
    pub fn learnt(&self) -> u32 {
        self.learnt
    }

    /// Season bucket of a window starting at `start_ms`.
    pub fn bucket_of(&self, start_ms: i64) -> usize {
        let hour = start_ms.div_euclid(3_600_000);
        match self.seasonality {
            Seasonality::None => 0,
            Seasonality::HourOfDay => hour.rem_euclid(24) as usize,
            // 1970-01-01 was a Thursday; shift so that bucket 0 is Monday 00:00 UTC.
            Seasonality::HourOfWeek => (hour + 72).rem_euclid(168) as usize,
        }
    }

    /// The forecast for the window starting at `start_ms`, or None before any data.
    pub fn expect(&self, start_ms: i64) -> Option<Expect> {
        let g = self.global.rate()?;
        let b = &self.buckets[self.bucket_of(start_ms)];
        let rate = match b.rate() {
            Some(r) => {
                let w = b.n as f64 / (b.n as f64 + BUCKET_PRIOR);
                w * r + (1.0 - w) * g
            }
            None => g,
        };
        let rate = match self.family {
            Family::Binomial => rate.clamp(1e-9, 1.0 - 1e-9),
            Family::Poisson => rate.max(1e-9),
            Family::Gaussian => rate,
        };
        Some(Expect {
            rate,
            phi: (self.phi as f64).max(1.0),
            sigma2: (self.sigma2 as f64).max(1e-12),
            tau2: self.tau2 as f64,
        })
    }

    /// Learns from one closed window (callers skip this while the series is frozen).
    pub fn learn(&mut self, start_ms: i64, obs: Obs) {
        if obs.den <= 0.0 {
            return;
        }
        let mut num = obs.num;
        if let Some(e) = self.expect(start_ms) {
            let rate = obs.num / obs.den;
            let var = e.rate_variance(self.family, obs.den);
            let sd = var.sqrt();
            let resid = rate - e.rate;
            // Gaussian: per-observation variance from within the window, and the extra
            // between-window variance from the residual beyond sampling noise.
            if self.family == Family::Gaussian && obs.den >= 2.0 {
                let within = ((obs.sumsq - obs.num * obs.num / obs.den) / (obs.den - 1.0)).max(0.0);
                self.sigma2 = ewma(
                    self.sigma2,
                    within,
                    self.alpha_min.max(1.0 / (self.learnt as f64 + 1.0)),
                );
            }
            if sd > 0.0 && self.learnt >= 2 {
                let z = resid / sd;
                let zc = z.clamp(-HUBER_C, HUBER_C);
                num = (e.rate + zc * sd) * obs.den;
                let a = self.alpha_min.max(1.0 / (self.learnt as f64 + 1.0));
                match self.family {
                    Family::Gaussian => {
                        let noise = e.sigma2 / obs.den;
                        let lim = (HUBER_C * HUBER_C) * (noise + e.tau2);
                        let excess = (resid * resid).min(lim) - noise;
                        self.tau2 = ewma(self.tau2, excess.max(0.0), a);
                    }
                    _ => {
                        // Dispersion: the model variance already includes phi, so z^2 estimates
                        // phi_true / phi; fold that ratio into phi.
                        let est = self.phi as f64 * (zc * zc);
                        self.phi = ewma(self.phi, est.clamp(0.0, 1e4), a).max(1.0);
                    }
                }
            }
        } else if self.family == Family::Gaussian && obs.den >= 2.0 {
            let within = ((obs.sumsq - obs.num * obs.num / obs.den) / (obs.den - 1.0)).max(0.0);
            self.sigma2 = within as f32;
        }
        let b = self.bucket_of(start_ms);
        self.buckets[b].update(num, obs.den, self.alpha_min);
        let ga = self.alpha_min / self.buckets.len() as f64;
        self.global.update(num, obs.den, ga);
        self.learnt = self.learnt.saturating_add(1);
    }

    /// Forget quickly: used when an incident outlives `incident_max_secs` and its level is
    /// accepted as the new normal.
    pub fn relearn(&mut self) {
        for b in self.buckets.iter_mut() {
            b.n = b.n.min(2);
        }
        self.global.n = self.global.n.min(2);
    }
}

fn ewma(old: f32, x: f64, alpha: f64) -> f32 {
    ((1.0 - alpha) * old as f64 + alpha * x) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_seasonal_rate() {
        let mut b = Baseline::new(Family::Poisson, Seasonality::HourOfDay, 24.0);
        // Counts of 100 per window at hour 10, 10 at hour 3, over several days.
        for day in 0..10i64 {
            for w in 0..288i64 {
                let start = day * 86_400_000 + w * 300_000;
                let hour = (w / 12) as usize;
                let c = if hour == 10 { 100.0 } else { 10.0 };
                b.learn(
                    start,
                    Obs {
                        num: c,
                        den: 1.0,
                        sumsq: 0.0,
                    },
                );
            }
        }
        let at10 = b.expect(10 * 3_600_000).unwrap().rate;
        let at3 = b.expect(3 * 3_600_000).unwrap().rate;
        assert!((at10 - 100.0).abs() < 5.0, "{at10}");
        assert!((at3 - 10.0).abs() < 1.0, "{at3}");
    }

    #[test]
    fn outlier_does_not_drag_level() {
        let mut b = Baseline::new(Family::Binomial, Seasonality::None, 24.0);
        for w in 0..500 {
            b.learn(
                w * 300_000,
                Obs {
                    num: 50.0,
                    den: 1000.0,
                    sumsq: 0.0,
                },
            );
        }
        let before = b.expect(0).unwrap().rate;
        b.learn(
            501 * 300_000,
            Obs {
                num: 900.0,
                den: 1000.0,
                sumsq: 0.0,
            },
        );
        let after = b.expect(0).unwrap().rate;
        assert!((after - before).abs() < 0.002, "{before} -> {after}");
    }

    #[test]
    fn gaussian_learns_spread() {
        let mut b = Baseline::new(Family::Gaussian, Seasonality::None, 24.0);
        for w in 0..200 {
            // 10 observations of mean 0.3 and variance 0.25 (values 0.8 / -0.2 alternating).
            b.learn(
                w * 300_000,
                Obs {
                    num: 3.0,
                    den: 10.0,
                    sumsq: 5.0 * 0.64 + 5.0 * 0.04,
                },
            );
        }
        let e = b.expect(0).unwrap();
        assert!((e.rate - 0.3).abs() < 1e-3);
        assert!((e.sigma2 - 0.2778).abs() < 0.01, "{}", e.sigma2);
    }
}
