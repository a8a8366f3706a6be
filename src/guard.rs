//! Guards: what guardrail watches besides the metric series.
//!
//! - [`ChangeGuard`]: opened when a change is applied, for `guards.watch_secs`. Events that carry
//!   the change's `change_id` and an `arm` feed per-arm sums for every metric; the engine
//!   compares treatment against holdout with an always-valid test after every window (so
//!   looking continuously does not inflate false alarms) and checks the exposure split for a
//!   sample-ratio mismatch first: a broken split makes the comparison untrustworthy. Without a
//!   holdout, the in-scope series' observed totals are set against the baseline's forecast for
//!   the same windows: an observational comparison, labelled as such.
//! - [`Sprawl`]: distinct variants live per surface within a window ("knowing when to stop").
//! - [`Pressure`]: messages per recipient per day, with unsubscribes beside them.
//!
//! Per-event work is a hash lookup and a few additions; everything else runs once per window.

use std::collections::HashMap;

use serde::Serialize;

use crate::attribute::{coverage, ChangeState, Coverage};
use crate::seqtest::{ArmStats, Comparison, Srm};
use crate::window::Hll;

pub const TREATMENT: usize = 0;
pub const HOLDOUT: usize = 1;

/// What scoping needs of a series: its metric, its dimensions, the metric's fixed surface.
pub type SeriesScope<'a> = (usize, &'a [(String, String)], Option<&'a str>);

/// Parses the contract's `arm` field.
pub fn arm_index(arm: &str) -> Option<usize> {
    match arm {
        "treatment" => Some(TREATMENT),
        "holdout" => Some(HOLDOUT),
        _ => None,
    }
}

/// Observed against forecast, summed over in-scope windows since the change.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct Observational {
    pub observed: f64,
    pub expected: f64,
    /// Variance of `observed` under the baseline.
    pub variance: f64,
    pub volume: f64,
    pub windows: u32,
}

/// A relative effect against the forecast and its standard error.
#[derive(Debug, Clone, Copy)]
pub struct RelEffect {
    pub rel: f64,
    pub se: f64,
}

impl Observational {
    /// Adds one closed window of one series: its count and volume, the forecast rate and the
    /// forecast's standard deviation. False (nothing added) when it has no forecast.
    pub fn add(&mut self, num: f64, den: f64, exp: f64, sd: f64) -> bool {
        if exp.is_nan() || sd.is_nan() {
            return false;
        }
        self.observed += num;
        self.expected += exp * den;
        self.variance += (sd * den).powi(2);
        self.volume += den;
        true
    }

    /// Relative effect and its standard error, when there is anything to compare.
    pub fn relative(&self) -> Option<RelEffect> {
        if self.windows == 0 || self.expected <= 0.0 {
            return None;
        }
        Some(RelEffect {
            rel: self.observed / self.expected - 1.0,
            se: self.variance.max(0.0).sqrt() / self.expected,
        })
    }

    /// Relative effect with a 95% interval, when there is anything to compare.
    pub fn effect(&self) -> Option<(f64, f64, f64)> {
        let RelEffect { rel, se } = self.relative()?;
        Some((rel, rel - 1.96 * se, rel + 1.96 * se))
    }
}

/// Per-metric state of a change's watch.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct MetricWatch {
    pub arms: [ArmStats; 2],
    pub observational: Observational,
    /// Latest treatment/holdout comparison.
    pub comparison: Option<Comparison>,
    /// A breach incident was opened for this metric.
    pub breached: bool,
    /// The series (indices into the engine's series) in the change's scope, and how they
    /// cover it; recomputed as series appear.
    pub in_scope: Vec<usize>,
    #[serde(deserialize_with = "crate::checkpoint::de_static_opt")]
    pub coverage: Option<crate::checkpoint::Label>,
}

/// Stage 2: a closed watch's verdicts gathered by its change's owner from the owners of its
/// metrics (see `Partial::WatchClosed`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WatchReport {
    pub change_id: String,
    pub opened_ms: i64,
    pub at_ms: i64,
    pub why: String,
    /// Partitions heard from.
    pub parts: Vec<i32>,
    /// (metric, verdict as JSON).
    pub metrics: Vec<(String, String)>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChangeGuard {
    pub change_id: String,
    pub opened_ms: i64,
    pub closes_ms: i64,
    /// Expected holdout share of exposures, from the change record.
    pub holdout: Option<f64>,
    pub metrics: Vec<MetricWatch>,
    /// Exposure events per arm, for the split check.
    pub exposure: [f64; 2],
    /// Stage 2: exposure per arm as read on each repartition partition. Stage 1 sends a batch's
    /// exposure to every partition that holds a metric of the watch (and to the change's own),
    /// so each partition's sum is the whole count whoever owns it, and an owner of several
    /// does not count it twice.
    pub exposure_at: Vec<(i32, [f64; 2])>,
    pub srm: Option<Srm>,
    /// An SRM incident was opened: comparisons are not trusted from then on.
    pub srm_flagged: bool,
    pub closed: bool,
    /// Series count when `in_scope` was last computed.
    scoped_at: usize,
}

impl ChangeGuard {
    /// Stage 2: adds exposure read on repartition partition `part`.
    pub fn add_exposure_at(&mut self, part: i32, e: [f64; 2]) {
        match self.exposure_at.iter_mut().find(|(p, _)| *p == part) {
            Some((_, x)) => {
                x[0] += e[0];
                x[1] += e[1];
            }
            None => self.exposure_at.push((part, e)),
        }
    }

    /// Stage 2: the exposure as read on repartition partition `part`.
    pub fn exposure_on(&self, part: i32) -> [f64; 2] {
        self.exposure_at
            .iter()
            .find(|(p, _)| *p == part)
            .map(|(_, e)| *e)
            .unwrap_or([0.0; 2])
    }

    /// Stage 2, on a handover: takes what another instance's copy of this watch learnt for the
    /// metrics and partitions now owned here (`metric` and `part` say which). Its series
    /// indices are the other's: the scope is worked out again here.
    pub fn take_over(
        &mut self,
        from: &ChangeGuard,
        metric: impl Fn(usize) -> bool,
        part: impl Fn(i32) -> bool,
        split: bool,
    ) {
        for (mi, (w, f)) in self.metrics.iter_mut().zip(&from.metrics).enumerate() {
            if metric(mi) {
                *w = MetricWatch {
                    in_scope: Vec::new(),
                    ..f.clone()
                };
            }
        }
        self.exposure_at.retain(|(p, _)| !part(*p));
        self.exposure_at
            .extend(from.exposure_at.iter().filter(|(p, _)| part(*p)));
        if split {
            self.srm = from.srm;
            self.srm_flagged = from.srm_flagged;
        }
        self.scoped_at = usize::MAX;
    }

    pub fn new(c: &ChangeState, opened_ms: i64, watch_ms: i64, metrics: usize) -> ChangeGuard {
        ChangeGuard {
            opened_ms,
            closes_ms: opened_ms + watch_ms,
            holdout: c.holdout.filter(|h| *h > 0.0),
            ..ChangeGuard::empty(&c.change_id, metrics)
        }
    }

    /// A watch with nothing seen yet, open forever and without a holdout.
    fn empty(change_id: &str, metrics: usize) -> ChangeGuard {
        ChangeGuard {
            change_id: change_id.to_string(),
            opened_ms: 0,
            closes_ms: i64::MAX,
            holdout: None,
            metrics: vec![MetricWatch::default(); metrics],
            exposure: [0.0; 2],
            exposure_at: Vec::new(),
            srm: None,
            srm_flagged: false,
            closed: false,
            scoped_at: usize::MAX,
        }
    }

    /// Recomputes which series of each metric are in the change's scope, when series were
    /// added. The most specific series win: those the scope covers exactly; else the totals.
    pub fn rescope(&mut self, change: &ChangeState, series: &[SeriesScope<'_>]) {
        if self.scoped_at == series.len() {
            return;
        }
        self.scoped_at = series.len();
        for (mi, w) in self.metrics.iter_mut().enumerate() {
            let mut exact = Vec::new();
            let mut total = Vec::new();
            for (si, (metric, dims, surface)) in series.iter().enumerate() {
                if *metric != mi {
                    continue;
                }
                match coverage(&change.scope, dims, *surface) {
                    Coverage::Exact if !dims.is_empty() => exact.push(si),
                    Coverage::Exact | Coverage::Everything | Coverage::Partial
                        if dims.is_empty() =>
                    {
                        total.push(si)
                    }
                    _ => {}
                }
            }
            if change.scope.is_everything() || exact.is_empty() {
                w.coverage = (!total.is_empty()).then_some(if change.scope.is_everything() {
                    "the change applies everywhere: the metric's total"
                } else {
                    "no series matches the scope exactly: the metric's total, which dilutes the effect"
                });
                w.in_scope = total;
            } else {
                w.coverage = Some("the series the scope covers exactly");
                w.in_scope = exact;
            }
        }
    }
}

/// Open and closed guards, looked up by change id on the hot path.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Guards {
    pub all: Vec<ChangeGuard>,
    /// change id -> index in `all`, for open guards only.
    pub open: HashMap<String, usize>,
}

impl Guards {
    /// Opens (or re-opens, when a change is applied again) the watch on a change.
    pub fn open(&mut self, g: ChangeGuard) -> usize {
        if let Some(&i) = self.open.get(&g.change_id) {
            self.all[i].closed = true;
        }
        self.all.push(g);
        let i = self.all.len() - 1;
        self.open.insert(self.all[i].change_id.clone(), i);
        i
    }

    pub fn close(&mut self, i: usize) {
        self.all[i].closed = true;
        if self.open.get(&self.all[i].change_id) == Some(&i) {
            self.open.remove(&self.all[i].change_id);
        }
    }

    /// Stage 1 of the two-stage aggregation: a watch that only sums the arms of the events
    /// exposed to `change_id` (whether or not its watch is open: stage 2 decides), opened on
    /// first sight and drained with every batch.
    pub fn tally(&mut self, change_id: &str, metrics: usize) -> usize {
        if let Some(i) = self.lookup(change_id) {
            return i;
        }
        self.all.push(ChangeGuard::empty(change_id, metrics));
        let i = self.all.len() - 1;
        self.open.insert(change_id.to_string(), i);
        i
    }

    #[inline]
    pub fn lookup(&self, change_id: &str) -> Option<usize> {
        self.open.get(change_id).copied()
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }
}

/// Variants seen on one surface in the current and the previous sprawl window.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct SurfaceVariants {
    name: String,
    bucket: i64,
    variants: Vec<u64>,
    prev_bucket: i64,
    prev_count: usize,
    /// Incident index while fragmented.
    pub incident: Option<usize>,
}

/// Distinct variants per surface per window.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Sprawl {
    window_ms: i64,
    limit: usize,
    pub(crate) surfaces: Bounded<SurfaceVariants>,
}

/// Entries by surface key, at most `max` of them: a new key beyond is refused rather than
/// another evicted, so the surfaces already followed keep their evidence. Checkpointed as the
/// map alone; the bound comes from the config, also after a restore.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub(crate) struct Bounded<V> {
    map: HashMap<u64, V>,
    #[serde(skip, default = "unbounded")]
    max: usize,
}

fn unbounded() -> usize {
    usize::MAX
}

impl<V> Bounded<V> {
    pub fn new(max: usize) -> Self {
        Bounded {
            map: HashMap::new(),
            max,
        }
    }

    /// The bound comes from the config, also after a restore.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The entry of `key`, made with `make` if new; None when new and `max` are held.
    #[inline]
    fn entry(&mut self, key: u64, make: impl FnOnce() -> V) -> Option<&mut V> {
        if self.map.len() >= self.max && !self.map.contains_key(&key) {
            return None;
        }
        Some(self.map.entry(key).or_insert_with(make))
    }

    fn retain(&mut self, keep: impl FnMut(&u64, &mut V) -> bool) {
        self.map.retain(keep);
    }
}

/// A surface over (or back under) its variant limit.
#[derive(Debug, Clone)]
pub struct SprawlFinding {
    pub surface: String,
    pub variants: usize,
    pub limit: usize,
    pub window_start_ms: i64,
    pub key: u64,
}

impl Sprawl {
    pub fn new(window_ms: i64, limit: usize, max_surfaces: usize) -> Sprawl {
        Sprawl {
            window_ms,
            limit,
            surfaces: Bounded::new(max_surfaces),
        }
    }

    /// Forgets surfaces with no variant since the previous sprawl window and no incident: a
    /// surface seen once does not stay forever.
    pub fn prune(&mut self, end_ms: i64) {
        let cur = (end_ms - 1).div_euclid(self.window_ms);
        self.surfaces
            .retain(|_, s| s.bucket >= cur - 1 || s.incident.is_some());
    }

    /// Records that `variant` (hashed) was live on `surface` (hashed) at `ts`; false when the
    /// surface is new and `max_surfaces` are followed already (it is not followed).
    #[inline]
    pub fn observe(&mut self, surface_key: u64, surface: &str, variant: u64, ts: i64) -> bool {
        let b = ts.div_euclid(self.window_ms);
        let cap = 4 * self.limit + 1;
        let Some(s) = self.surfaces.entry(surface_key, || SurfaceVariants {
            name: surface.to_string(),
            bucket: b,
            variants: Vec::new(),
            prev_bucket: b - 1,
            prev_count: 0,
            incident: None,
        }) else {
            return false;
        };
        if b > s.bucket {
            s.prev_bucket = s.bucket;
            s.prev_count = s.variants.len();
            s.bucket = b;
            s.variants.clear();
        } else if b < s.bucket {
            // A late event of the previous window: it can only raise that window's count,
            // which was judged already; not worth a second set.
            return true;
        }
        if s.variants.len() < cap && !s.variants.contains(&variant) {
            s.variants.push(variant);
        }
        true
    }

    /// At the close of the engine window ending at `end_ms`: surfaces over the limit in the
    /// current sprawl window (fire as soon as it is exceeded), and fragmented surfaces whose
    /// last complete window came back under it.
    pub fn evaluate(&self, end_ms: i64) -> (Vec<SprawlFinding>, Vec<(u64, usize)>) {
        let mut over = Vec::new();
        let mut back = Vec::new();
        let cur = (end_ms - 1).div_euclid(self.window_ms);
        for (k, s) in &self.surfaces.map {
            let (count, b) = if s.bucket == cur {
                (s.variants.len(), s.bucket)
            } else {
                (0, cur)
            };
            if s.incident.is_none() && count > self.limit {
                over.push(SprawlFinding {
                    surface: s.name.clone(),
                    variants: count,
                    limit: self.limit,
                    window_start_ms: b * self.window_ms,
                    key: *k,
                });
            }
            // Resolve when a whole window ended under the limit.
            let window_ended = end_ms % self.window_ms == 0;
            if let Some(i) = s.incident {
                if window_ended && count <= self.limit {
                    back.push((*k, i));
                }
            }
        }
        over.sort_by(|a, b| a.surface.cmp(&b.surface));
        (over, back)
    }

    pub fn set_incident(&mut self, key: u64, incident: Option<usize>) {
        if let Some(s) = self.surfaces.map.get_mut(&key) {
            s.incident = incident;
        }
    }

    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// Variants counted for a surface in its last complete window (for evidence).
    pub fn previous(&self, key: u64) -> Option<(i64, usize)> {
        self.surfaces
            .map
            .get(&key)
            .map(|s| (s.prev_bucket * self.window_ms, s.prev_count))
    }
}

/// One surface's messaging in one UTC day.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct DayPressure {
    name: String,
    day: i64,
    messages: f64,
    recipients: Hll,
    unsubscribes: f64,
    prev: Option<PressureDay>,
    incident: Option<usize>,
}

/// A finished (or running) day of messaging on a surface.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct PressureDay {
    pub messages: f64,
    pub recipients: f64,
    pub unsubscribes: f64,
}

impl PressureDay {
    pub fn per_user(&self) -> f64 {
        self.messages / self.recipients.max(1.0)
    }

    /// Unsubscribes per recipient.
    pub fn unsubscribe_rate(&self) -> f64 {
        self.unsubscribes / self.recipients.max(1.0)
    }
}

#[derive(Debug, Clone)]
pub struct PressureFinding {
    pub surface: String,
    pub key: u64,
    pub day_start_ms: i64,
    pub today: PressureDay,
    pub yesterday: Option<PressureDay>,
    pub cap: f64,
}

pub const DAY_MS: i64 = 86_400_000;

/// Two standard errors of the recipients' estimate (1.04 / sqrt(1024 registers)).
pub const HLL_MARGIN: f64 = 0.065;

/// Messages per recipient per day, per surface.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Pressure {
    cap: f64,
    min_users: f64,
    pub(crate) surfaces: Bounded<DayPressure>,
}

impl Pressure {
    pub fn new(cap: f64, min_users: u64, max_surfaces: usize) -> Pressure {
        Pressure {
            cap,
            min_users: min_users as f64,
            surfaces: Bounded::new(max_surfaces),
        }
    }

    /// Forgets surfaces with no message yesterday or today and no incident.
    pub fn prune(&mut self, end_ms: i64) {
        let today = (end_ms - 1).div_euclid(DAY_MS);
        self.surfaces
            .retain(|_, s| s.day >= today - 1 || s.incident.is_some());
    }

    /// The surface's running day if `ts` falls in it (None: a late event of an earlier day);
    /// None outside when the surface is new and `max_surfaces` are followed already.
    fn day(&mut self, key: u64, surface: &str, ts: i64) -> Option<Option<&mut DayPressure>> {
        let d = ts.div_euclid(DAY_MS);
        let s = self.surfaces.entry(key, || DayPressure {
            name: surface.to_string(),
            day: d,
            messages: 0.0,
            recipients: Hll::default(),
            unsubscribes: 0.0,
            prev: None,
            incident: None,
        })?;
        if d > s.day {
            s.prev = Some(PressureDay {
                messages: s.messages,
                recipients: s.recipients.estimate(),
                unsubscribes: s.unsubscribes,
            });
            s.day = d;
            s.messages = 0.0;
            s.unsubscribes = 0.0;
            s.recipients.clear();
        }
        Some((d == s.day).then_some(s))
    }

    /// False when the surface is new and `max_surfaces` are followed already.
    #[inline]
    pub fn message(&mut self, key: u64, surface: &str, user: u64, ts: i64) -> bool {
        let Some(day) = self.day(key, surface, ts) else {
            return false;
        };
        if let Some(s) = day {
            s.messages += 1.0;
            s.recipients.add(user);
        }
        true
    }

    /// False when the surface is new and `max_surfaces` are followed already.
    #[inline]
    pub fn unsubscribe(&mut self, key: u64, surface: &str, ts: i64) -> bool {
        let Some(day) = self.day(key, surface, ts) else {
            return false;
        };
        if let Some(s) = day {
            s.unsubscribes += 1.0;
        }
        true
    }

    /// Surfaces whose running day is over the cap (not yet in an incident), and incidents of
    /// surfaces whose day has ended (the cap is per day), at event time `end_ms`.
    pub fn evaluate(&self, end_ms: i64) -> (Vec<PressureFinding>, Vec<(u64, usize)>) {
        let today = (end_ms - 1).div_euclid(DAY_MS);
        let mut over = Vec::new();
        let mut ended = Vec::new();
        for (k, s) in &self.surfaces.map {
            if let Some(i) = s.incident {
                if s.day < today || end_ms % DAY_MS == 0 {
                    ended.push((*k, i));
                    continue;
                }
            }
            if s.day != today || s.incident.is_some() {
                continue;
            }
            let d = PressureDay {
                messages: s.messages,
                recipients: s.recipients.estimate(),
                unsubscribes: s.unsubscribes,
            };
            // Recipients are an estimate (HyperLogLog, ~3% standard error): the cap is passed
            // only when the ratio clears it by two standard errors.
            if d.recipients >= self.min_users && d.per_user() > self.cap * (1.0 + HLL_MARGIN) {
                over.push(PressureFinding {
                    surface: s.name.clone(),
                    key: *k,
                    day_start_ms: s.day * DAY_MS,
                    today: d,
                    yesterday: s.prev,
                    cap: self.cap,
                });
            }
        }
        over.sort_by(|a, b| a.surface.cmp(&b.surface));
        (over, ended)
    }

    pub fn set_incident(&mut self, key: u64, incident: Option<usize>) {
        if let Some(s) = self.surfaces.map.get_mut(&key) {
            s.incident = incident;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sprawl_fires_within_the_window_and_clears_after_a_calm_one() {
        let mut s = Sprawl::new(3_600_000, 3, usize::MAX);
        for v in 0..5u64 {
            s.observe(7, "checkout", v, 1000 + v as i64);
        }
        let (over, _) = s.evaluate(300_000);
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].variants, 5);
        s.set_incident(7, Some(0));
        // Still fragmented in the same window: no second finding, no resolution.
        let (over, back) = s.evaluate(600_000);
        assert!(over.is_empty() && back.is_empty());
        // Next hour: two variants only; resolved when that hour ends.
        s.observe(7, "checkout", 1, 3_600_000 + 5);
        s.observe(7, "checkout", 2, 3_600_000 + 6);
        assert!(s.evaluate(3_900_000).1.is_empty());
        assert_eq!(s.evaluate(7_200_000).1, vec![(7, 0)]);
        assert_eq!(s.previous(7), Some((0, 5)));
    }

    #[test]
    fn pressure_needs_recipients_and_resets_daily() {
        let mut p = Pressure::new(3.0, 10, usize::MAX);
        // 20 users x 4 messages on day 0.
        for u in 0..20u64 {
            for k in 0..4 {
                p.message(
                    1,
                    "email",
                    u.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    1000 * k + u as i64,
                );
            }
        }
        p.unsubscribe(1, "email", 5000);
        let (over, _) = p.evaluate(600_000);
        assert_eq!(over.len(), 1);
        let f = &over[0];
        assert!((f.today.per_user() - 4.0).abs() < 0.3, "{:?}", f.today);
        assert_eq!(f.today.unsubscribes, 1.0);
        p.set_incident(1, Some(3));
        // The day ends: the incident ends with it.
        assert_eq!(p.evaluate(DAY_MS).1, vec![(1, 3)]);
        // Few recipients: not judged.
        let mut q = Pressure::new(3.0, 10, usize::MAX);
        for k in 0..50 {
            q.message(1, "email", 42, k);
        }
        assert!(q.evaluate(600_000).0.is_empty());
    }

    #[test]
    fn observational_effect_has_an_interval() {
        let o = Observational {
            observed: 900.0,
            expected: 1000.0,
            variance: 1000.0,
            volume: 20_000.0,
            windows: 10,
        };
        let (rel, lo, hi) = o.effect().unwrap();
        assert!((rel + 0.1).abs() < 1e-12);
        assert!(lo < rel && rel < hi && hi < 0.0);
        assert!(Observational::default().effect().is_none());
    }
}
