//! `share` metrics: the mix of one dimension's values (device, channel, traffic source,
//! variant) within an event type, tested for drift against the baseline mix.
//!
//! The test is a G-test (likelihood ratio of the observed counts against the expected mix) over
//! the last hour of windows, at the per-window false-alarm probability that the configured
//! false alarms per series-week allow. It is sample-size aware: a few events cannot make a
//! "drift" the way a fixed PSI cut-off would on thin data. At high volume a G-test finds
//! trivial shifts significant, so an alarm also needs the effect size (PSI) to reach
//! `min_psi`; PSI and Jensen-Shannon divergence are reported as the effect size.
//!
//! The baseline mix is learnt per hour of day (device mix follows the clock) with exponential
//! forgetting, shrunk towards the overall mix, from windows at least `LEARN_LAG` old and never
//! from windows under an incident.

use std::collections::VecDeque;

use serde::Serialize;
use statrs::distribution::{ChiSquared, ContinuousCDF};

/// Distinct values tracked per share metric; the rest are pooled as `other`.
pub const MAX_CATEGORIES: usize = 12;
pub const OTHER: &str = "other";
/// Windows in the test (one hour of 5-minute windows).
pub const TEST_WINDOWS: usize = 12;
/// Windows a closed window waits before it is learnt.
const LEARN_LAG: usize = 12;
/// Expected count below which a category is pooled into the test's remainder.
const MIN_EXPECTED_PER_CELL: f64 = 5.0;
/// Shrinkage of an hour bucket towards the overall mix, in events.
const SHRINK_EVENTS: f64 = 500.0;

/// One segment's mix.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ShareSeries {
    pub metric: usize,
    pub dims: Vec<(String, String)>,
    pub label: String,
    /// Open windows: (window index, counts per category).
    open: VecDeque<(i64, Vec<f64>)>,
    /// Closed windows, newest last: (hour-of-day bucket, counts, expected proportions).
    recent: VecDeque<(usize, Vec<f64>, Option<Vec<f64>>)>,
    /// EWMA counts per hour bucket and overall.
    buckets: Vec<Vec<f64>>,
    overall: Vec<f64>,
    decay: f64,
    pub learnt: u32,
    pub incident: Option<usize>,
    /// Windows (of the current incident) since the mix looked normal again.
    calm: u32,
}

/// The registry of category names of one share metric (shared by its series).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Categories {
    pub names: Vec<String>,
}

impl Categories {
    /// Index of a category, registering it while there is room; `other` beyond.
    pub fn index(&mut self, v: &str) -> usize {
        if let Some(i) = self.names.iter().position(|n| n == v) {
            return i;
        }
        if self.names.len() < MAX_CATEGORIES {
            self.names.push(v.to_string());
            return self.names.len() - 1;
        }
        match self.names.iter().position(|n| n == OTHER) {
            Some(i) => i,
            None => {
                // Keep the last slot for `other`.
                let last = self.names.len() - 1;
                self.names[last] = OTHER.to_string();
                last
            }
        }
    }
}

/// The verdict on the last hour of a share series.
#[derive(Debug, Clone, Serialize)]
pub struct MixTest {
    pub observed: Vec<f64>,
    pub expected: Vec<f64>,
    pub total: f64,
    pub g: f64,
    pub df: usize,
    pub p_value: f64,
    pub psi: f64,
    pub js: f64,
    /// Category with the largest absolute change in share.
    pub top: usize,
}

impl ShareSeries {
    pub fn new(metric: usize, dims: Vec<(String, String)>, half_life_windows: f64) -> ShareSeries {
        let label = crate::engine::series_label(&dims);
        ShareSeries {
            metric,
            dims,
            label,
            open: VecDeque::new(),
            recent: VecDeque::new(),
            buckets: vec![vec![0.0; MAX_CATEGORIES]; 24],
            overall: vec![0.0; MAX_CATEGORIES],
            decay: 0.5f64.powf(1.0 / half_life_windows.max(1.0)),
            learnt: 0,
            incident: None,
            calm: 0,
        }
    }

    #[inline]
    pub fn add(&mut self, w: i64, cat: usize) {
        self.add_n(w, cat, 1.0)
    }

    /// Takes the open windows out (stage 1 of the two-stage aggregation hands them on).
    pub fn take_open(&mut self) -> VecDeque<(i64, Vec<f64>)> {
        std::mem::take(&mut self.open)
    }

    #[inline]
    pub fn add_n(&mut self, w: i64, cat: usize, n: f64) {
        let slot = match self.open.iter_mut().find(|(x, _)| *x == w) {
            Some(s) => s,
            None => {
                self.open.push_back((w, vec![0.0; MAX_CATEGORIES]));
                self.open.back_mut().expect("just pushed")
            }
        };
        slot.1[cat] += n;
    }

    fn expected_mix(&self, hour: usize) -> Option<Vec<f64>> {
        let tot: f64 = self.overall.iter().sum();
        if tot <= 0.0 {
            return None;
        }
        let b = &self.buckets[hour];
        let bt: f64 = b.iter().sum();
        let wgt = bt / (bt + SHRINK_EVENTS);
        Some(
            (0..MAX_CATEGORIES)
                .map(|c| {
                    let pb = if bt > 0.0 { b[c] / bt } else { 0.0 };
                    wgt * pb + (1.0 - wgt) * self.overall[c] / tot
                })
                .collect(),
        )
    }

    /// Closes window `w` (hour of day `hour`): records its counts with the mix expected for it,
    /// learns the window `LEARN_LAG` back unless `learn` is false, and tests the last hour.
    pub fn close(&mut self, w: i64, hour: usize, learn: bool) -> Option<MixTest> {
        let counts = match self.open.iter().position(|(x, _)| *x == w) {
            Some(i) => self.open.remove(i).expect("present").1,
            None => vec![0.0; MAX_CATEGORIES],
        };
        // Windows older than this one can no longer receive events.
        self.open.retain(|(x, _)| *x > w);
        let exp = self.expected_mix(hour);
        self.recent.push_back((hour, counts, exp));
        while self.recent.len() > LEARN_LAG.max(TEST_WINDOWS) + 1 {
            self.recent.pop_front();
        }
        if learn && self.recent.len() > LEARN_LAG {
            let (hb, c, _) = &self.recent[self.recent.len() - 1 - LEARN_LAG];
            let (hb, d) = (*hb, self.decay);
            let d_all = d.powf(1.0 / 24.0);
            for (k, &x) in c.iter().enumerate() {
                self.buckets[hb][k] = self.buckets[hb][k] * d + x;
                self.overall[k] = self.overall[k] * d_all + x;
            }
            self.learnt += 1;
        }
        self.test()
    }

    /// The G-test of the last `TEST_WINDOWS` windows against their expected mixes.
    pub fn test(&self) -> Option<MixTest> {
        let mut obs = [0.0; MAX_CATEGORIES];
        let mut exp = [0.0; MAX_CATEGORIES];
        let mut total = 0.0;
        for (_, c, e) in self.recent.iter().rev().take(TEST_WINDOWS) {
            let Some(e) = e else { continue };
            let n: f64 = c.iter().sum();
            total += n;
            for k in 0..MAX_CATEGORIES {
                obs[k] += c[k];
                exp[k] += n * e[k];
            }
        }
        if total <= 0.0 {
            return None;
        }
        // Cells with too little expectation are pooled so the chi-square approximation holds.
        let (mut g, mut cells, mut po, mut pe) = (0.0, 0usize, 0.0, 0.0);
        for k in 0..MAX_CATEGORIES {
            if exp[k] >= MIN_EXPECTED_PER_CELL {
                g += gterm(obs[k], exp[k]);
                cells += 1;
            } else {
                po += obs[k];
                pe += exp[k];
            }
        }
        if pe > 0.0 || po > 0.0 {
            g += gterm(po, pe.max(1e-9));
            cells += 1;
        }
        if cells < 2 {
            return None;
        }
        let df = cells - 1;
        let p_value = ChiSquared::new(df as f64).map(|d| d.sf(g)).unwrap_or(1.0);
        let (mut psi, mut js) = (0.0, 0.0);
        let mut top = 0;
        let mut top_d = -1.0;
        for k in 0..MAX_CATEGORIES {
            let o = obs[k] / total;
            let e = exp[k] / total;
            if o == 0.0 && e == 0.0 {
                continue;
            }
            // Small floors keep PSI finite when a category appears or vanishes.
            let (o2, e2) = (o.max(1e-4), e.max(1e-4));
            psi += (o2 - e2) * (o2 / e2).ln();
            let m = 0.5 * (o + e);
            if o > 0.0 {
                js += 0.5 * o * (o / m).log2();
            }
            if e > 0.0 {
                js += 0.5 * e * (e / m).log2();
            }
            if (o - e).abs() > top_d {
                top_d = (o - e).abs();
                top = k;
            }
        }
        Some(MixTest {
            observed: obs.iter().map(|x| x / total).collect(),
            expected: exp.iter().map(|x| x / total).collect(),
            total,
            g,
            df,
            p_value,
            psi,
            js,
            top,
        })
    }

    /// Tracks recovery while in an incident: true once the mix has looked normal for a whole
    /// test span.
    pub fn calm_step(&mut self, normal: bool) -> bool {
        self.calm = if normal { self.calm + 1 } else { 0 };
        self.calm as usize >= TEST_WINDOWS
    }

    /// After an incident expired: the new mix is normal; forget the old one.
    pub fn relearn(&mut self) {
        for b in self.buckets.iter_mut() {
            b.iter_mut().for_each(|x| *x = 0.0);
        }
        self.overall.iter_mut().for_each(|x| *x = 0.0);
        self.learnt = 0;
        for r in self.recent.iter_mut() {
            r.2 = None;
        }
    }

    pub fn reset_calm(&mut self) {
        self.calm = 0;
    }
}

fn gterm(o: f64, e: f64) -> f64 {
    if o <= 0.0 {
        // 2 * (E - O) contribution of an empty cell in the full likelihood ratio.
        2.0 * e
    } else {
        2.0 * (o * (o / e).ln() - (o - e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// Feeds `windows` windows of `n` events drawn from `mix`, starting at window `w0`.
    fn feed(
        s: &mut ShareSeries,
        rng: &mut SmallRng,
        w0: i64,
        windows: i64,
        n: usize,
        mix: &[f64],
    ) -> Vec<Option<MixTest>> {
        let mut out = Vec::new();
        for w in w0..w0 + windows {
            for _ in 0..n {
                let u: f64 = rng.gen();
                let mut acc = 0.0;
                let mut cat = mix.len() - 1;
                for (i, p) in mix.iter().enumerate() {
                    acc += p;
                    if u < acc {
                        cat = i;
                        break;
                    }
                }
                s.add(w, cat);
            }
            out.push(s.close(w, ((w / 12) % 24) as usize, true));
        }
        out
    }

    fn alpha() -> f64 {
        // 0.01 false alarms per series-week at 2016 windows a week.
        0.01 / 2016.0
    }

    #[test]
    fn stable_mix_stays_quiet_and_a_shift_is_found_with_its_size() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut s = ShareSeries::new(0, vec![], 24.0 * 12.0);
        let base = [0.6, 0.3, 0.1];
        let null = feed(&mut s, &mut rng, 0, 2016, 200, &base);
        let alarms = null
            .iter()
            .flatten()
            .skip(200)
            .filter(|t| t.p_value < alpha() && t.psi >= 0.1)
            .count();
        assert_eq!(alarms, 0, "a week of a stable mix");
        // Mobile share 0.6 -> 0.45, desktop 0.3 -> 0.45.
        let shifted = feed(&mut s, &mut rng, 2016, 24, 200, &[0.45, 0.45, 0.1]);
        let first = shifted
            .iter()
            .position(|t| {
                t.as_ref()
                    .map(|t| t.p_value < alpha() && t.psi >= 0.05)
                    .unwrap_or(false)
            })
            .expect("the shift is found within two hours");
        assert!(first < 12, "found within the hour: {first}");
        let t = shifted[first].as_ref().unwrap();
        assert!(t.top == 0 || t.top == 1);
        assert!(t.js > 0.0 && t.psi > 0.0);
    }

    #[test]
    fn thin_data_cannot_make_a_drift() {
        let mut rng = SmallRng::seed_from_u64(8);
        let mut s = ShareSeries::new(0, vec![], 288.0);
        feed(&mut s, &mut rng, 0, 600, 5, &[0.5, 0.5]);
        // A window of 5 events, all in one category: a PSI rule would fire; the test does not.
        for _ in 0..5 {
            s.add(600, 0);
        }
        let t = s.close(600, 2, true).unwrap();
        assert!(t.p_value > alpha(), "{t:?}");
    }

    #[test]
    fn categories_pool_overflow_into_other() {
        let mut c = Categories::default();
        for i in 0..MAX_CATEGORIES + 5 {
            c.index(&format!("v{i}"));
        }
        assert_eq!(c.names.len(), MAX_CATEGORIES);
        assert_eq!(c.names[MAX_CATEGORIES - 1], OTHER);
        assert_eq!(c.index("v0"), 0);
        assert_eq!(c.index("new"), MAX_CATEGORIES - 1);
    }
}
