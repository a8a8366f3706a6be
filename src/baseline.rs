//! What normal looks like, per series: a seasonal, outlier-robust online baseline.
//!
//! Every metric kind reduces a window to a pair (numerator, denominator): conversions over
//! sessions, tickets over sessions (or over 1 window without exposure), sum of values over
//! observations. The baseline keeps exponentially weighted sums of both per season bucket (hour
//! of day; `hour_of_week` adds a day-of-week factor, or offset for means) and overall, so its
//! rate is volume-weighted and a thin window moves it little. Updates are Huber-clipped (a spike
//! cannot drag the level), the spread is learnt as a dispersion factor over the model's own
//! variance, and the whole thing is frozen while the series is in an incident or accumulating
//! evidence of one, so it never learns the anomaly.
//! A `gauge` (one value per window) is the exception: it learns every window, clipped, with its
//! spread from the residuals between windows (see `learn_gauge`).

use crate::config::Seasonality;

/// The statistical family a metric's windows follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// The overall level (packed: 14 bytes, not 16; fields are only read and written by value).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
#[repr(C, packed(2))]
struct Bucket {
    num: f32,
    den: f32,
    /// Decayed total of the information behind the estimate: events (binomial, Poisson) or
    /// observations (Gaussian). It sets how far the bucket is trusted over the overall level.
    mass: f32,
    n: u16,
}

impl Bucket {
    fn rate(&self) -> Option<f64> {
        (self.den > 0.0).then(|| self.num as f64 / self.den as f64)
    }
    fn update(&mut self, num: f64, den: f64, mass: f64, alpha_min: f64) {
        let alpha = (1.0 / (self.n as f64 + 1.0)).max(alpha_min);
        self.num = ((1.0 - alpha) * self.num as f64 + alpha * num) as f32;
        self.den = ((1.0 - alpha) * self.den as f64 + alpha * den) as f32;
        self.mass = ((1.0 - alpha_min) * self.mass as f64 + mass) as f32;
        self.n = self.n.saturating_add(1);
    }
}

/// Trust weight in 16-bit fixed point: `Season::w` / 65536.
const W_ONE: f64 = 65536.0;

/// A season bucket: 11 bytes (packed), as a baseline holds up to 31 per series.
/// The sums are f32 like the overall level's. Of the decayed mass the forecast only reads the
/// trust weight w = mass / (mass + BUCKET_PRIOR_MASS), so that is what is kept, in 16-bit fixed
/// point (the mass is recovered from it to be updated). Each store rounds w by at most 7.6e-6;
/// as the decayed sum can stall on smaller updates, w stays within 7.6e-6 / alpha_min of its
/// exact value (2.7e-4 at the default half-life), which moves the forecast by that times the
/// bucket's distance from the overall level: far below the bucket's own sampling error. The
/// count of windows learnt saturates at 255, which then stands for "past the warm-up": it only
/// sets the learning rate 1/(n+1) while that exceeds `alpha_min` (n < 35 at the default
/// half-life of 24 windows; with half-lives over 177 windows the warm-up average ends at 255).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
#[repr(C, packed(1))]
struct Season {
    num: f32,
    den: f32,
    w: u16,
    n: u8,
}

impl Season {
    fn rate(&self) -> Option<f64> {
        (self.den > 0.0).then(|| self.num as f64 / self.den as f64)
    }
    fn weight(&self) -> f64 {
        self.w as f64 / W_ONE
    }
    fn mass(&self) -> f64 {
        let w = self.weight();
        BUCKET_PRIOR_MASS * w / (1.0 - w)
    }
    fn set_mass(&mut self, mass: f64) {
        let w = mass.max(0.0) / (mass.max(0.0) + BUCKET_PRIOR_MASS);
        self.w = (w * W_ONE).round().min(u16::MAX as f64) as u16;
    }
    fn update(&mut self, num: f64, den: f64, mass: f64, alpha_min: f64) {
        let alpha = if self.n == u8::MAX {
            alpha_min
        } else {
            (1.0 / (self.n as f64 + 1.0)).max(alpha_min)
        };
        self.num = ((1.0 - alpha) * self.num as f64 + alpha * num) as f32;
        self.den = ((1.0 - alpha) * self.den as f64 + alpha * den) as f32;
        self.set_mass((1.0 - alpha_min) * self.mass() + mass);
        self.n = self.n.saturating_add(1);
    }
}

/// Per-series baseline: 11 bytes per season bucket that has learnt a window, plus a fixed ~70
/// bytes. `hour_of_week` is factorised into the 24 hours of the day and the 7 days of the week
/// (31 buckets at most, not 168): 168 buckets of 11 bytes alone would put an established series
/// at ~1.8 KiB, over the 2 KiB a series may take with everything else it keeps.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Baseline {
    family: Family,
    seasonality: Seasonality,
    /// Bit `b` is set when season bucket `b` has learnt (hours of the day 0..24, then days of
    /// the week 24..31); `buckets` holds those buckets in bucket order (sparse: a series pays
    /// for the hours it has data in, and a bucket that never learnt reads as empty, exactly as
    /// an allocated empty bucket would).
    present: u32,
    buckets: Box<[Season]>,
    global: Bucket,
    /// The dispersion factor (counts and ratios): the decayed sum of squared residuals of the
    /// (clipped) counts over the decayed sum of their model variances, both with
    /// [`DISPERSION_PRIOR`] added (see `learn_dispersion`). Read floored at 1.
    phi: f32,
    #[serde(default)]
    disp_resid: f32,
    #[serde(default)]
    disp_var: f32,
    sigma2: f32,
    tau2: f32,
    /// Windows learnt from.
    learnt: u32,
    alpha_min: f64,
    /// `gauge` metrics: one observation per window (its mean); `sigma2` is the between-window
    /// variance of the residuals, learnt robustly, and `tau2` stays 0.
    #[serde(default)]
    gauge: bool,
    /// Gauge: windows learnt before residuals are clipped (the warm-up).
    #[serde(default)]
    clip_after: u32,
}

/// A forecast's parts (`Baseline::level`).
struct Level {
    level: f64,
    day: Option<f64>,
    hour: Option<(f64, f64)>,
}

/// Hour-of-day buckets come first in the bitmap, day-of-week buckets after them.
const HOURS: usize = 24;
const DAYS: usize = 7;
/// A day-of-week bucket weighs in linearly over its first DAY_RAMP_WINDOWS windows (21 hours of
/// 5-minute windows; `Season::n` saturates there), on top of its mass-based trust: its first
/// windows rest on a few night hours. Trusted within three hours, and from the first week on,
/// the first Tuesday's factor (Tuesday against Monday's hour buckets alone) carried their noise
/// to the rest of the day and raised false alarms in the standard scenario; see `week_seen`.
const DAY_RAMP_WINDOWS: f64 = 255.0;

/// Shrinkage of a season bucket towards the overall level: the bucket's weight is
/// mass / (mass + BUCKET_PRIOR_MASS), so a bucket is trusted once it rests on this many events
/// (or observations). Sparse series thus forecast from the overall level, whose estimate is far
/// less noisy than the seasonality it would resolve; busy series become seasonal within hours.
const BUCKET_PRIOR_MASS: f64 = 50.0;
/// Huber clipping of residuals, in standard deviations (Gaussian).
const HUBER_C: f64 = 3.0;
/// E[min(z^2, HUBER_C^2)] for a standard normal z: a clipped mean square underestimates the
/// variance by this factor.
const HUBER_CONSISTENCY: f64 = 0.9950;
/// Gauge metrics: a season bucket is trusted once it has learnt this many windows (their
/// information is one observation per window, not a count of events), at most: a series with a
/// clear seasonal pattern trusts its buckets sooner (`Baseline::gauge_prior`), down to
/// GAUGE_BUCKET_PRIOR_MIN windows.
const GAUGE_BUCKET_PRIOR_WINDOWS: f64 = 12.0;
const GAUGE_BUCKET_PRIOR_MIN: f64 = 1.0;
/// Gauge metrics: windows learnt before residuals are clipped, at least.
const GAUGE_CLIP_AFTER: u32 = 12;
/// The dispersion estimate starts from 1 with the weight of this much model variance (in
/// events, about): a sparse series, whose windows carry little information about their spread,
/// stays near 1 instead of following the few windows that had an event; a busy one outweighs
/// it within a window or two.
const DISPERSION_PRIOR: f64 = 50.0;
/// The dispersion learns this many times more slowly than the level: it changes slowly, and a
/// noisier estimate would be floored at 1 more often, biasing it upwards.
const DISPERSION_SLOWER: f64 = 4.0;
/// Counts are clipped at this tail probability of their own distribution, not at a symmetric
/// z: small counts are skewed, and a symmetric clip would bias the level low.
const COUNT_TAIL: f64 = 1e-4;

impl Baseline {
    pub fn new(family: Family, seasonality: Seasonality, half_life_windows: f64) -> Baseline {
        let alpha_min = 1.0 - 0.5f64.powf(1.0 / half_life_windows.max(1.0));
        Baseline {
            family,
            seasonality,
            present: 0,
            buckets: Box::default(),
            global: Bucket::default(),
            phi: 1.0,
            disp_resid: 0.0,
            disp_var: 0.0,
            sigma2: 0.0,
            tau2: 0.0,
            learnt: 0,
            alpha_min,
            gauge: false,
            clip_after: 0,
        }
    }

    /// A baseline for a `gauge` metric: windows reduced to one observation each (den = 1).
    /// Residuals are not clipped before `warmup_windows` (at least GAUGE_CLIP_AFTER) are learnt.
    pub fn new_gauge(
        seasonality: Seasonality,
        half_life_windows: f64,
        warmup_windows: u32,
    ) -> Baseline {
        Baseline {
            gauge: true,
            clip_after: warmup_windows.max(GAUGE_CLIP_AFTER),
            ..Baseline::new(Family::Gaussian, seasonality, half_life_windows)
        }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// Windows this baseline has learnt from.
    /// The EWMA weight floor (from the half-life).
    pub fn alpha_min(&self) -> f64 {
        self.alpha_min
    }

    pub fn learnt(&self) -> u32 {
        self.learnt
    }

    /// Hour-of-day bucket of a window starting at `start_ms` (bucket 0 without seasonality).
    fn hour_of(&self, start_ms: i64) -> usize {
        match self.seasonality {
            Seasonality::None => 0,
            _ => start_ms.div_euclid(3_600_000).rem_euclid(HOURS as i64) as usize,
        }
    }

    /// Day-of-week bucket of a window starting at `start_ms` (`hour_of_week` only).
    fn day_of(&self, start_ms: i64) -> Option<usize> {
        // 1970-01-01 was a Thursday; shift so that day 0 is Monday (UTC).
        (self.seasonality == Seasonality::HourOfWeek)
            .then(|| HOURS + (start_ms.div_euclid(86_400_000) + 3).rem_euclid(DAYS as i64) as usize)
    }

    /// Position of season bucket `b` in `buckets`, and whether it is there.
    fn slot(&self, b: usize) -> (usize, bool) {
        let below = (self.present & ((1u32 << b) - 1)).count_ones() as usize;
        (below, self.present & (1u32 << b) != 0)
    }

    /// Season bucket `b` (empty if it never learnt).
    fn bucket(&self, b: usize) -> Season {
        match self.slot(b) {
            (i, true) => self.buckets[i],
            _ => Season::default(),
        }
    }

    /// Season bucket `b`, allocated (empty) if it was not there.
    fn bucket_mut(&mut self, b: usize) -> &mut Season {
        let (i, there) = self.slot(b);
        if !there {
            let mut v = std::mem::take(&mut self.buckets).into_vec();
            v.reserve_exact(1);
            v.insert(i, Season::default());
            self.buckets = v.into_boxed_slice();
            self.present |= 1u32 << b;
        }
        &mut self.buckets[i]
    }

    /// The hour-of-day buckets that have learnt (they come first).
    fn hour_buckets(&self) -> &[Season] {
        let n = (self.present & ((1u32 << HOURS) - 1)).count_ones() as usize;
        &self.buckets[..n]
    }

    /// Season buckets that have learnt.
    pub fn buckets_used(&self) -> usize {
        self.buckets.len()
    }

    /// The sparse buckets agree with their bitmap (a restored checkpoint is checked with it).
    pub fn consistent(&self) -> bool {
        let slots = match self.seasonality {
            Seasonality::None => 1,
            Seasonality::HourOfDay => HOURS,
            Seasonality::HourOfWeek => HOURS + DAYS,
        };
        self.present.count_ones() as usize == self.buckets.len() && self.present >> slots == 0
    }

    /// Means and gauges take the day of the week as an offset to their level; ratios and
    /// counts as a factor on their rate (a quieter Sunday scales every hour alike).
    fn additive(&self) -> bool {
        self.family == Family::Gaussian
    }

    /// The hour-of-day level (the overall level shrunk towards the hour's bucket by its trust),
    /// the day of the week's effect on it when there is one (a factor, or an offset for means
    /// and gauges, already shrunk by its trust), and the hour bucket's own rate and trust.
    /// None before any data.
    fn level(&self, start_ms: i64) -> Option<Level> {
        let g = self.global.rate()?;
        let b = &self.bucket(self.hour_of(start_ms));
        let (level, hour) = match b.rate() {
            Some(r) => {
                // The stored weight is for BUCKET_PRIOR_MASS; a gauge's mass is in windows.
                let w = if self.gauge {
                    let m = b.mass();
                    m / (m + self.gauge_prior(g))
                } else {
                    b.weight()
                };
                (w * r + (1.0 - w) * g, Some((r, w)))
            }
            None => (g, None),
        };
        let day = self.day_of(start_ms).and_then(|d| {
            let d = self.bucket(d);
            let f = d.rate()?;
            let w = self.day_weight(&d);
            Some(if self.additive() {
                w * f
            } else {
                1.0 + w * (f - 1.0)
            })
        });
        Some(Level { level, day, hour })
    }

    /// Every day of the week has learnt. A day's factor is relative to the other days, so
    /// none weighs in on a forecast before (a first week forecasts from the hours of the day
    /// alone): against Monday's hour buckets alone, the first Tuesday's factor is mostly their
    /// noise. The hour buckets still learn without the factors as they are, so that a first
    /// weekend does not stay in them as a dip for the next days' factors to learn against.
    fn week_seen(&self) -> bool {
        self.present >> HOURS == (1 << DAYS) - 1
    }

    /// Trust in a day-of-week bucket: the hour buckets' mass-based weight (a gauge's mass is
    /// in windows), ramped in over the day's first DAY_RAMP_WINDOWS windows.
    fn day_weight(&self, d: &Season) -> f64 {
        let w = if self.gauge {
            let m = d.mass();
            m / (m + GAUGE_BUCKET_PRIOR_WINDOWS)
        } else {
            d.weight()
        };
        let ramp = if d.n == u8::MAX {
            1.0
        } else {
            (d.n as f64 / DAY_RAMP_WINDOWS).min(1.0)
        };
        w * ramp
    }

    /// The forecast rate: the level with the day's effect.
    fn with_day(&self, level: f64, day: Option<f64>) -> f64 {
        match day {
            None => level,
            Some(o) if self.additive() => level + o,
            Some(f) => level * f,
        }
    }

    /// The forecast for the window starting at `start_ms`, or None before any data.
    pub fn expect(&self, start_ms: i64) -> Option<Expect> {
        let l = self.level(start_ms)?;
        let day = l.day.filter(|_| self.week_seen());
        Some(self.expect_rate(self.with_day(l.level, day)))
    }

    fn expect_rate(&self, rate: f64) -> Expect {
        let rate = match self.family {
            Family::Binomial => rate.clamp(1e-9, 1.0 - 1e-9),
            Family::Poisson => rate.max(1e-9),
            Family::Gaussian => rate,
        };
        Expect {
            rate,
            phi: (self.phi as f64).max(1.0),
            sigma2: (self.sigma2 as f64).max(1e-12),
            tau2: self.tau2 as f64,
        }
    }

    /// A day-of-week bucket learns at 1/24 of the hour buckets' rate: it sees every window of
    /// its day where an hour bucket sees one hour's, so both forget over the same number of
    /// occurrences (two weeks for a day at the default half-life, as the 168 hour-of-week
    /// buckets did). Its warm-up average ends at 255 windows (`Season::n` saturates), where
    /// 1/(n+1) is still above this rate: from there it forgets at this rate.
    fn day_alpha(&self) -> f64 {
        self.alpha_min / HOURS as f64
    }

    /// Learns a window's (clipped) numerator into its season buckets and the overall level.
    /// With a day of the week, its bucket learns the window against the hour bucket's own rate
    /// (observed over expected, or their difference for means), weighted by that bucket's
    /// trust: against the shrunk level, or an hour bucket still learning its first windows,
    /// the first days would learn the lag of the hour levels as their own effect (a Monday
    /// learnt on the first day came out 1.3 sd high). The hour bucket and the overall level
    /// learn the window without the day's effect as it is forecast now.
    fn learn_buckets(&mut self, start_ms: i64, num: f64, den: f64, mass: f64) {
        let alpha_min = self.alpha_min;
        let mut num_h = num;
        if let Some(d) = self.day_of(start_ms) {
            if let Some(l) = self.level(start_ms) {
                if let Some((r, w)) = l.hour.filter(|&(_, w)| w > 0.0) {
                    let (dn, dd) = if self.additive() {
                        (w * (num - r * den), w * den)
                    } else {
                        (w * num, w * r * den)
                    };
                    let alpha = self.day_alpha();
                    self.bucket_mut(d).update(dn, dd, w * mass, alpha);
                }
                // The mass stays the events seen: it is what the hour bucket's estimate rests on.
                num_h = match l.day {
                    Some(o) if self.additive() => num - o * den,
                    Some(f) if f > 0.0 => num / f,
                    _ => num,
                };
            }
        }
        let b = self.hour_of(start_ms);
        self.bucket_mut(b).update(num_h, den, mass, alpha_min);
        let ga = self.alpha_min / self.seasonality.buckets() as f64;
        self.global.update(num_h, den, mass, ga);
    }

    /// Gauge: how many windows a season bucket must have learnt before it weighs as much as
    /// the overall level (its weight is m / (m + prior) after m windows). Empirical Bayes: the
    /// prior is the noise variance over the variance of the buckets' levels around the overall
    /// level (beyond their own sampling noise), so a strong daily pattern is trusted after a
    /// window or two while a series without one stays on its overall level. Clamped to
    /// [GAUGE_BUCKET_PRIOR_MIN, GAUGE_BUCKET_PRIOR_WINDOWS]: one window never outweighs the
    /// overall level, and 12 is the trust of a series with no measurable pattern.
    fn gauge_prior(&self, g: f64) -> f64 {
        let s2 = self.sigma2 as f64;
        let (mut sum, mut k) = (0.0, 0.0);
        for b in self.hour_buckets() {
            if let Some(r) = b.rate() {
                sum += (r - g) * (r - g) - s2 / b.mass().max(1.0);
                k += 1.0;
            }
        }
        if k < 2.0 {
            return GAUGE_BUCKET_PRIOR_WINDOWS;
        }
        let between = (sum / k).max(0.0);
        if between <= 0.0 {
            return GAUGE_BUCKET_PRIOR_WINDOWS;
        }
        (s2 / between).clamp(GAUGE_BUCKET_PRIOR_MIN, GAUGE_BUCKET_PRIOR_WINDOWS)
    }

    /// Learns from one closed window (callers skip this while the series is frozen).
    pub fn learn(&mut self, start_ms: i64, obs: Obs) {
        if obs.den <= 0.0 {
            return;
        }
        if self.gauge {
            self.learn_gauge(start_ms, obs.num / obs.den);
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
                num = match self.family {
                    Family::Gaussian => (e.rate + zc * sd) * obs.den,
                    _ => {
                        // Within 3 sd of the mean a count is never clipped: skip the quantiles.
                        let mu = e.rate * obs.den;
                        if (obs.num - mu).abs() <= 3.0 * (e.phi * mu.max(1.0)).sqrt() {
                            obs.num
                        } else {
                            let (lo, hi) = count_clip(self.family, e.rate, obs.den, e.phi);
                            obs.num.clamp(lo, hi)
                        }
                    }
                };
                let a = self.alpha_min.max(1.0 / (self.learnt as f64 + 1.0));
                match self.family {
                    Family::Gaussian => {
                        let noise = e.sigma2 / obs.den;
                        let lim = (HUBER_C * HUBER_C) * (noise + e.tau2);
                        let excess = (resid * resid).min(lim) - noise;
                        self.tau2 = ewma(self.tau2, excess.max(0.0), a);
                    }
                    _ => self.learn_dispersion(num, obs.den, &e),
                }
            }
        } else if self.family == Family::Gaussian && obs.den >= 2.0 {
            let within = ((obs.sumsq - obs.num * obs.num / obs.den) / (obs.den - 1.0)).max(0.0);
            self.sigma2 = within as f32;
        }
        let mass = match self.family {
            Family::Gaussian => obs.den,
            _ => num,
        };
        self.learn_buckets(start_ms, num, obs.den, mass);
        self.learnt = self.learnt.saturating_add(1);
    }

    /// Dispersion of counts and ratios, as the ratio of decayed sums: squared residuals of the
    /// clipped count over the family's variance (a Pearson X^2 over its degrees of freedom),
    /// each with DISPERSION_PRIOR of variance at phi = 1 added. A ratio of sums is unbiased
    /// where an average of per-window ratios is not: on sparse counts most windows are empty
    /// (z^2 small) and a few hold an event (z^2 large), and flooring such an average at 1 after
    /// every step, as before, pushed it up to ~1.4 on null series with 0.25 events a window.
    fn learn_dispersion(&mut self, num: f64, den: f64, e: &Expect) {
        let mu = e.rate * den;
        let var = match self.family {
            Family::Binomial => mu * (1.0 - e.rate),
            _ => mu,
        };
        if !(var > 0.0 && var.is_finite()) {
            return;
        }
        let keep = 1.0 - self.alpha_min / DISPERSION_SLOWER;
        let r = (num - mu) * (num - mu);
        self.disp_resid = (keep * self.disp_resid as f64 + r.min(1e12)) as f32;
        self.disp_var = (keep * self.disp_var as f64 + var) as f32;
        let phi =
            (self.disp_resid as f64 + DISPERSION_PRIOR) / (self.disp_var as f64 + DISPERSION_PRIOR);
        self.phi = phi.clamp(0.0, 1e4) as f32;
    }

    /// Gauge: one value per window. The level is learnt from the residual clipped at HUBER_C
    /// robust sd, and the variance is the EWMA of the same clipped squared residuals (a Huber
    /// scale: one spike cannot inflate it, a regime with a wider spread raises it within a few
    /// windows since a clipped residual still counts 9 variances). Nothing is clipped during
    /// the warm-up: a spread from the first regime seen is too unreliable to clip against (a
    /// flat night would otherwise be the only level ever learnt).
    fn learn_gauge(&mut self, start_ms: i64, x: f64) {
        let mut v = x;
        if let Some(e) = self.expect(start_ms) {
            let resid = x - e.rate;
            let sd = (self.sigma2 as f64).sqrt();
            let rc = if self.learnt >= self.clip_after && sd > 0.0 {
                resid.clamp(-HUBER_C * sd, HUBER_C * sd)
            } else {
                resid
            };
            let a = self.alpha_min.max(1.0 / (self.learnt as f64 + 1.0));
            self.sigma2 = ewma(self.sigma2, rc * rc / HUBER_CONSISTENCY, a);
            v = e.rate + rc;
        }
        self.learn_buckets(start_ms, v, 1.0, 1.0);
        self.learnt = self.learnt.saturating_add(1);
    }

    /// Forget quickly: used when an incident outlives `incident_max_secs` and its level is
    /// accepted as the new normal.
    /// The day-of-week factors are kept: they are relative to the level, which is what moved.
    pub fn relearn(&mut self) {
        let hours = (self.present & ((1u32 << HOURS) - 1)).count_ones() as usize;
        for b in self.buckets[..hours].iter_mut() {
            b.n = b.n.min(2);
            b.set_mass(b.mass().min(5.0));
        }
        self.global.n = self.global.n.min(2);
    }
}

/// The range a count is clipped to before it is learnt: the COUNT_TAIL quantiles of its own
/// distribution under the baseline, widened by the dispersion factor.
fn count_clip(family: Family, rate: f64, den: f64, phi: f64) -> (f64, f64) {
    use statrs::distribution::{Binomial, DiscreteCDF, Poisson};
    let mu = rate * den;
    let n = den.round().max(1.0) as u64;
    let cdf = |k: u64| -> f64 {
        match family {
            Family::Binomial => Binomial::new(rate.clamp(0.0, 1.0), n)
                .map(|d| d.cdf(k))
                .unwrap_or(1.0),
            _ => Poisson::new(mu.max(1e-9)).map(|d| d.cdf(k)).unwrap_or(1.0),
        }
    };
    // Smallest k with cdf(k) >= p, by bisection (statrs' generic inverse_cdf can fail to
    // bracket for small means).
    let quantile = |p: f64| -> f64 {
        let (mut lo, mut hi) = (0u64, (mu + 12.0 * mu.sqrt() + 12.0) as u64);
        if family == Family::Binomial {
            hi = hi.min(n);
        }
        if cdf(lo) >= p {
            return 0.0;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if cdf(mid) >= p {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi as f64
    };
    let s = phi.max(1.0).sqrt();
    let (lo, hi) = (quantile(COUNT_TAIL), quantile(1.0 - COUNT_TAIL));
    // At least three counts of slack above the mean: a near-zero estimate must still be able to
    // learn that events happen (otherwise it would clip every count to zero and never recover).
    let slack = 3.0 * s * mu.max(1.0).sqrt();
    let lo = (mu - s * (mu - lo)).clamp(0.0, mu.max(0.0));
    let hi = (mu + s * (hi - mu)).max(mu + slack);
    (lo, hi)
}

fn ewma(old: f32, x: f64, alpha: f64) -> f32 {
    ((1.0 - alpha) * old as f64 + alpha * x) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weeks of 5-minute windows the hour-of-week tests learn.
    const WEEKS: i64 = 2;

    #[test]
    fn season_bucket_keeps_the_trust_weight() {
        assert_eq!(std::mem::size_of::<Season>(), 11);
        for m in [0.0, 0.01, 0.5, 1.0, 5.0, 49.0, 50.0, 300.0, 1e4, 1e6, 1e9] {
            let mut b = Season::default();
            b.set_mass(m);
            let w = m / (m + BUCKET_PRIOR_MASS);
            assert!(
                (b.weight() - w).abs() <= 1.0 / W_ONE,
                "{m}: {} vs {w}",
                b.weight()
            );
            if m <= 1e4 {
                assert!(
                    (b.mass() - m).abs() <= 1e-3 * m.max(1.0),
                    "{m}: {}",
                    b.mass()
                );
            }
        }
    }

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

    /// A baseline that starts on empty windows must still learn a sparse rate.
    #[test]
    fn sparse_counts_recover_from_a_zero_start() {
        let mut b = Baseline::new(Family::Poisson, Seasonality::HourOfDay, 24.0);
        for w in 0..20i64 {
            b.learn(
                w * 300_000,
                Obs {
                    num: 0.0,
                    den: 30.0,
                    sumsq: 0.0,
                },
            );
        }
        for w in 20..3000i64 {
            let x = if w % 8 == 0 { 1.0 } else { 0.0 };
            b.learn(
                w * 300_000,
                Obs {
                    num: x,
                    den: 30.0,
                    sumsq: 0.0,
                },
            );
        }
        let r = b.expect(0).unwrap().rate * 30.0;
        assert!((r - 0.125).abs() < 0.03, "{r}");
    }

    /// Small counts are skewed: the level must not be biased low by clipping.
    #[test]
    fn sparse_counts_are_learnt_without_bias() {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(3);
        let mut b = Baseline::new(Family::Poisson, Seasonality::HourOfDay, 24.0);
        for w in 0..20_000i64 {
            let x: f64 = rng.sample(statrs::distribution::Poisson::new(0.6).unwrap());
            b.learn(
                w * 300_000,
                Obs {
                    num: x,
                    den: 150.0,
                    sumsq: 0.0,
                },
            );
        }
        let r = b.expect(0).unwrap().rate * 150.0;
        assert!((r - 0.6).abs() < 0.06, "{r}");
    }

    /// On null sparse series the dispersion factor as forecasts read it (floored at 1) stays
    /// within 10% of 1, averaged over the windows after a warm-up, for counts and ratios from
    /// 0.1 to 5 expected events a window; and an over-dispersed busy series is still seen as
    /// over-dispersed.
    #[test]
    fn dispersion_is_unbiased_on_sparse_null_series() {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        use statrs::distribution::{Binomial, Gamma, Poisson};
        let mut rng = SmallRng::seed_from_u64(17);
        for (family, mean) in [
            (Family::Poisson, 0.1),
            (Family::Poisson, 0.25),
            (Family::Poisson, 1.0),
            (Family::Binomial, 0.3),
            (Family::Binomial, 5.0),
        ] {
            let (mut sum, mut k) = (0.0, 0.0);
            for _ in 0..20 {
                let mut b = Baseline::new(family, Seasonality::HourOfDay, 24.0);
                for w in 0..3000i64 {
                    let (num, den) = match family {
                        Family::Binomial => {
                            let n = 20u64;
                            (
                                rng.sample(Binomial::new(mean / n as f64, n).unwrap()),
                                n as f64,
                            )
                        }
                        _ => (rng.sample(Poisson::new(mean).unwrap()), 1.0),
                    };
                    b.learn(
                        w * 300_000,
                        Obs {
                            num,
                            den,
                            sumsq: 0.0,
                        },
                    );
                    if w >= 500 {
                        sum += b.expect(w * 300_000).unwrap().phi;
                        k += 1.0;
                    }
                }
            }
            let phi = sum / k;
            eprintln!("{family:?} {mean} expected events a window: mean dispersion {phi:.3}");
            assert!(phi <= 1.1, "{family:?} {mean}: {phi}");
        }
        // Gamma-mixed Poisson at 200 a window with 10% rate noise: phi = 1 + 200 * 0.01 = 3.
        let mut b = Baseline::new(Family::Poisson, Seasonality::None, 24.0);
        let g = Gamma::new(100.0, 100.0).unwrap();
        for w in 0..3000i64 {
            let r: f64 = rng.sample(g);
            let x = rng.sample(Poisson::new(200.0 * r).unwrap());
            b.learn(
                w * 300_000,
                Obs {
                    num: x,
                    den: 1.0,
                    sumsq: 0.0,
                },
            );
        }
        let phi = b.expect(0).unwrap().phi;
        assert!((2.3..3.7).contains(&phi), "{phi}");
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

    fn gauge_obs(x: f64) -> Obs {
        Obs {
            num: x,
            den: 1.0,
            sumsq: x * x,
        }
    }

    /// A gauge starting on a flat regime must still learn a second one: its spread is not
    /// clipped against the first regime's zero variance.
    #[test]
    fn gauge_learns_past_a_flat_first_regime() {
        let mut b = Baseline::new_gauge(Seasonality::None, 288.0, 288);
        for w in 0..288i64 {
            // 9 hours at 20, then 9 hours at 80, then 20 again (5-minute windows).
            let x = if (108..216).contains(&w) { 80.0 } else { 20.0 };
            b.learn(w * 300_000, gauge_obs(x));
        }
        let e = b.expect(0).unwrap();
        assert!(e.rate > 30.0 && e.rate < 60.0, "{}", e.rate);
        assert!(e.sigma2.sqrt() > 10.0, "{}", e.sigma2);
        assert_eq!(e.tau2, 0.0);
    }

    /// Gaussian noise of sd 2 around 50: the gauge's variance is the between-window variance,
    /// and one huge spike moves neither the level nor the spread much.
    #[test]
    fn gauge_spread_is_between_windows_and_robust() {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(7);
        let normal = statrs::distribution::Normal::new(50.0, 2.0).unwrap();
        let mut b = Baseline::new_gauge(Seasonality::None, 72.0, 24);
        for w in 0..2000i64 {
            b.learn(w * 300_000, gauge_obs(rng.sample(normal)));
        }
        let e = b.expect(0).unwrap();
        assert!((e.rate - 50.0).abs() < 0.6, "{}", e.rate);
        assert!((e.sigma2.sqrt() - 2.0).abs() < 0.4, "{}", e.sigma2.sqrt());
        b.learn(2000 * 300_000, gauge_obs(5000.0));
        let e2 = b.expect(0).unwrap();
        assert!((e2.rate - e.rate).abs() < 0.2, "{} -> {}", e.rate, e2.rate);
        assert!(
            e2.sigma2.sqrt() < 1.2 * e.sigma2.sqrt(),
            "{}",
            e2.sigma2.sqrt()
        );
    }

    /// A strong daily pattern (a 2-hour gauge at 100 by day, 0 by night, noise sd 1): its
    /// season buckets are trusted after a window each (prior at its floor), so after three
    /// days the forecast is within a few sd of the hour's level. Pure noise has no measurable
    /// pattern: the prior stays at its ceiling and the forecast is the overall level.
    #[test]
    fn gauge_trusts_a_clear_daily_pattern_soon() {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        let normal = statrs::distribution::Normal::new(0.0, 1.0).unwrap();
        let mut rng = SmallRng::seed_from_u64(5);
        let w_ms = 7_200_000;
        let mut seasonal = Baseline::new_gauge(Seasonality::HourOfDay, 36.0, 12);
        let mut flat = Baseline::new_gauge(Seasonality::HourOfDay, 36.0, 12);
        for w in 0..36i64 {
            let hour = (w * 2) % 24;
            let day = if (8..20).contains(&hour) { 100.0 } else { 0.0 };
            seasonal.learn(w * w_ms, gauge_obs(day + rng.sample(normal)));
            flat.learn(w * w_ms, gauge_obs(50.0 + rng.sample(normal)));
        }
        let g = seasonal.global.rate().unwrap();
        let p = seasonal.gauge_prior(g);
        assert!(p < 1.5, "{p}");
        // Day 4, 10:00 and 02:00.
        let noon = seasonal.expect((36 + 5) * w_ms).unwrap();
        let night = seasonal.expect((36 + 1) * w_ms).unwrap();
        assert!(
            noon.rate > 70.0 && night.rate < 30.0,
            "{} {}",
            noon.rate,
            night.rate
        );
        let g = flat.global.rate().unwrap();
        let p = flat.gauge_prior(g);
        assert!(p > 4.0, "{p}");
    }

    /// Hour-of-week, factorised: a daily peak at 10:00 and a weekend dip (Saturday at 60%,
    /// Sunday at 50% of a weekday, every hour alike). After two weeks the forecast has both:
    /// the weekday and weekend peaks and nights within 5%, from 31 buckets.
    #[test]
    fn hour_of_week_learns_a_weekend_dip_as_a_factor() {
        const DAY: i64 = 86_400_000;
        // 2026-10-05 was a Monday.
        let monday = 1_791_158_400_000i64;
        let rate = |t: i64| {
            let hour = t.div_euclid(3_600_000).rem_euclid(24);
            let dow = (t - monday).div_euclid(DAY).rem_euclid(7);
            let level = if hour == 10 { 100.0 } else { 30.0 };
            level
                * match dow {
                    5 => 0.6,
                    6 => 0.5,
                    _ => 1.0,
                }
        };
        let mut b = Baseline::new(Family::Poisson, Seasonality::HourOfWeek, 24.0);
        for w in 0..(WEEKS * 7 * 288) {
            let t = monday + w * 300_000;
            b.learn(
                t,
                Obs {
                    num: rate(t),
                    den: 1.0,
                    sumsq: 0.0,
                },
            );
        }
        assert!(b.consistent());
        assert_eq!(b.buckets_used(), 31);
        for (day, hour) in [(16, 10), (16, 3), (19, 10), (19, 22), (20, 10), (20, 3)] {
            let t = monday + day * DAY + hour * 3_600_000;
            let e = b.expect(t).unwrap().rate;
            let want = rate(t);
            assert!(
                (e / want - 1.0).abs() < 0.05,
                "day {day} {hour}h: {e} vs {want}"
            );
        }
    }

    /// Means take the day of the week as an offset: a level 2 higher at weekends, on an hourly
    /// pattern, is forecast after two weeks with a weekend offset within 0.3 of the per-event
    /// sd. It is learnt against the hour buckets' own levels, not the first days' lag (which
    /// put Monday 1.3 high); what is left is the first Sunday, learnt against hour buckets that
    /// still held part of the first Saturday (1.7 after two weeks, 1.8 after three).
    #[test]
    fn hour_of_week_mean_is_additive() {
        const DAY: i64 = 86_400_000;
        let monday = 1_791_158_400_000i64;
        let mean = |t: i64| {
            let hour = t.div_euclid(3_600_000).rem_euclid(24);
            let dow = (t - monday).div_euclid(DAY).rem_euclid(7);
            10.0 + hour as f64 * 0.5 + if dow >= 5 { 2.0 } else { 0.0 }
        };
        let mut b = Baseline::new(Family::Gaussian, Seasonality::HourOfWeek, 24.0);
        for w in 0..(WEEKS * 7 * 288) {
            let t = monday + w * 300_000;
            let m = mean(t);
            // 20 observations of sd 1 around the mean.
            b.learn(
                t,
                Obs {
                    num: 20.0 * m,
                    den: 20.0,
                    sumsq: 20.0 * (m * m + 1.0),
                },
            );
        }
        let at = |day: i64, hour: i64| {
            let t = monday + day * DAY + hour * 3_600_000;
            (b.expect(t).unwrap().rate, mean(t))
        };
        for hour in [4, 20] {
            let (weekday, want_weekday) = at(15, hour);
            for day in [19, 20] {
                let (weekend, want) = at(day, hour);
                // The hours' levels are shrunk towards the overall level by their trust (0.93
                // at this volume), as with `hour_of_day`: 0.07 x their distance from it; and
                // Sunday's offset is short, as above.
                assert!(
                    (weekend - want).abs() < 0.5,
                    "day {day} {hour}h: {weekend} vs {want}"
                );
                let dip = weekend - weekday;
                assert!((dip - 2.0).abs() < 0.3, "day {day} {hour}h: {dip}");
            }
            assert!((weekday - want_weekday).abs() < 0.4, "{hour}h: {weekday}");
        }
    }

    /// Before the whole week has been seen, day-of-week factors do not weigh in: a first week
    /// forecasts from the hours of the day alone (a day's factor is relative to the other days,
    /// and a Tuesday against Monday's hours alone is noise), and the factors do once it has.
    #[test]
    fn day_of_week_factors_wait_for_a_whole_week() {
        let monday = 1_791_158_400_000i64;
        let mut how = Baseline::new(Family::Poisson, Seasonality::HourOfWeek, 24.0);
        let obs = |t: i64| Obs {
            // Sundays at half the volume.
            num: if (t - monday) / 86_400_000 % 7 == 6 {
                100.0
            } else {
                200.0
            },
            den: 1.0,
            sumsq: 0.0,
        };
        for w in 0..(6 * 288) {
            let t = monday + w * 300_000;
            assert!(!how.week_seen(), "window {w}");
            if let Some(l) = how.level(t) {
                assert_eq!(how.expect(t), Some(how.expect_rate(l.level)), "window {w}");
            }
            how.learn(t, obs(t));
        }
        for w in (6 * 288)..(7 * 288) {
            let t = monday + w * 300_000;
            how.learn(t, obs(t));
        }
        assert!(how.week_seen());
        let next_sunday = monday + 13 * 86_400_000 + 12 * 3_600_000;
        let e = how.expect(next_sunday).unwrap().rate;
        assert!((e - 100.0).abs() < 10.0, "{e}");
    }
}
