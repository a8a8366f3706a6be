//! The engine's side of checkpoints: which state is saved, and how it is put back.
//!
//! Saved: series (open windows, baselines, detectors, history, trends), share series, the
//! watermark and per-partition clocks, incidents with their decisions and deadlines, the change
//! registry, guards, sprawl and pressure, the circuit breaker's recent rollbacks, vetoes,
//! pending rollbacks, the dedup horizon and the newest audit records. Not saved: counters
//! (Prometheus counters restart with the process) and anything derived from config (schema,
//! thresholds), which a restore takes from the running config.
//!
//! What the state was built for is saved with it: the window and lateness, which shape every
//! series, as the file's fingerprint (a checkpoint of others is refused whole), and per metric
//! and per guard the settings their state is built from ([`Prints`]). A restore keeps the state
//! of each metric whose settings match, by name (metrics may be reordered, added or removed),
//! and starts the others fresh.

use std::path::Path;

use super::*;
use crate::checkpoint::{self, CheckpointError, Json};
use crate::sink::AuditRecord;

/// Audit records carried in a checkpoint for the API's change stories; the audit topic keeps
/// every record.
const AUDIT_RECORDS_KEPT: usize = 2_000;

/// Input position a checkpoint corresponds to: (topic, partition, next offset to read).
pub type Offsets = Vec<(String, i32, i64)>;

/// Stands for a held incident's target metric that is no longer configured, until the restore
/// publishes the incident without waiting for it.
const LOST: usize = usize::MAX;

/// What the saved state was built for, compared part by part on restore.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Prints {
    /// Per configured metric, in order.
    metrics: Vec<MetricPrint>,
    sprawl: u64,
    pressure: u64,
    /// The event change watches count as their arms' exposure.
    exposure: u64,
}

/// A metric's name and the hash of each part of the settings its series are built from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct MetricPrint {
    name: String,
    parts: Vec<(String, u64)>,
}

/// What a restore did with one metric's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricFate {
    /// Same settings: its series, baselines, detectors and incidents are as saved.
    Kept,
    /// Settings its state is built from changed (these parts): it starts fresh, and its open
    /// incidents end.
    Reset(Vec<String>),
    /// Not in the checkpoint: starts fresh.
    New,
    /// In the checkpoint, no longer configured: its state is dropped.
    Removed,
}

impl MetricFate {
    pub fn is_kept(&self) -> bool {
        *self == MetricFate::Kept
    }
}

impl std::fmt::Display for MetricFate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricFate::Kept => f.write_str("kept"),
            MetricFate::Reset(parts) => write!(f, "reset ({} changed)", parts.join(", ")),
            MetricFate::New => f.write_str("new (not in the checkpoint): starts fresh"),
            MetricFate::Removed => f.write_str("removed (no longer configured): state dropped"),
        }
    }
}

/// How a checkpoint's metrics map onto the configured ones.
struct Fit {
    /// Per metric of the checkpoint: its index here if its state is kept.
    kept: Vec<Option<usize>>,
    /// Per metric of the checkpoint: its index here by name, kept or not.
    named: Vec<Option<usize>>,
    /// Per configured metric: the checkpoint's metric whose state it keeps.
    origin: Vec<Option<usize>>,
    fates: Vec<(String, MetricFate)>,
}

impl Fit {
    /// A per-metric list of the checkpoint laid out per configured metric: kept entries moved
    /// to their new place, fresh (default) ones for the rest.
    fn reorder<T: Default>(&self, saved: Vec<T>) -> Vec<T> {
        let mut saved: Vec<Option<T>> = saved.into_iter().map(Some).collect();
        self.origin
            .iter()
            .map(|o| {
                o.and_then(|oi| saved.get_mut(oi)?.take())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// An incident with the fields its API shape leaves out.
#[derive(serde::Serialize, serde::Deserialize)]
struct PersistedIncident {
    inc: Json<Incident>,
    metric_idx: Option<usize>,
    series_idx: Option<usize>,
    explained_by_outage: bool,
    recovery: Recovery,
    deadline_ms: Option<i64>,
    held: Option<Box<super::Held>>,
}

/// Everything a checkpoint holds. Large parts are moved out of the engine for encoding and
/// moved back afterwards, so a checkpoint copies no series.
#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    /// First, for [`offsets_of`].
    offsets: Offsets,
    prints: Prints,
    series: Vec<Series>,
    index: super::KeyMap<usize>,
    max_ts: Option<i64>,
    sources: Vec<SourceClock>,
    closed_upto: Option<i64>,
    incidents: Vec<PersistedIncident>,
    registry: Json<Registry>,
    pending_rollbacks: HashMap<String, String>,
    emitted_rollbacks: HashSet<String>,
    granted: HashMap<String, String>,
    watch_reports: Vec<crate::guard::WatchReport>,
    gain_hist: Vec<super::stage::GainPoint>,
    gain_asks: Vec<super::stage::GainAsk>,
    dedup: Dedup,
    audit_seq: u64,
    guards: Guards,
    sprawl: Option<Sprawl>,
    pressure: Option<Pressure>,
    auto_rollbacks: VecDeque<(i64, Vec<String>)>,
    audit_log: Json<Vec<AuditRecord>>,
    last_event_wall_ms: i64,
    vetoed: HashMap<String, String>,
    shares: Vec<crate::share::ShareSeries>,
    share_index: super::KeyMap<usize>,
    share_cats: Vec<crate::share::Categories>,
    /// Stage 2: series taken over whose state had closed more windows than this engine (see
    /// `Engine::resume_at`), and metrics taken over behind it (see `Engine::behind`). Saved so
    /// that a restart during a catch-up neither closes a window twice nor skips one.
    resume_at: HashMap<usize, i64>,
    behind: HashMap<usize, i64>,
}

/// What a restore brought back.
#[derive(Debug, Clone)]
pub struct Restored {
    pub offsets: Offsets,
    pub written_ms: i64,
    pub series: usize,
    pub incidents: usize,
    pub bytes: usize,
    /// Per metric (configured ones in order, then removed ones), what became of its state.
    pub metrics: Vec<(String, MetricFate)>,
}

/// The input offsets a checkpoint payload corresponds to, read without decoding the rest.
pub fn offsets_of(path: &Path, payload: &[u8]) -> Result<Offsets, CheckpointError> {
    postcard::take_from_bytes::<Offsets>(payload)
        .map(|(o, _)| o)
        .map_err(|e| CheckpointError::Decode {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

impl Engine {
    /// What each metric has learnt, by name: per series its label and the season buckets (a
    /// share series: windows) learnt, sorted. The state a restart keeps or resets per metric.
    pub fn learnt_by_metric(&self) -> HashMap<String, Vec<(String, usize)>> {
        let mut m: HashMap<String, Vec<(String, usize)>> = HashMap::new();
        let mut add = |metric: usize, label: &str, learnt: usize| {
            m.entry(self.metrics()[metric].name().to_string())
                .or_default()
                .push((label.to_string(), learnt));
        };
        for s in &self.series {
            add(s.metric, &s.label, s.season_buckets());
        }
        for s in &self.shares {
            add(s.metric, &s.label, s.learnt as usize);
        }
        m.values_mut().for_each(|v| v.sort());
        m
    }

    /// Identifies what every series' state is shaped by: the window (window indices, and the
    /// detectors' thresholds per window) and the allowed lateness (the open windows each series
    /// keeps). A checkpoint of other values is refused whole; what shapes one metric's or one
    /// guard's state is compared on restore, so that only that state starts again.
    pub fn state_fingerprint(&self) -> u64 {
        let e = &self.cfg.engine;
        hash64(&format!("{}|{}", e.window_secs, e.allowed_lateness_secs))
    }

    fn prints(&self) -> Prints {
        let g = &self.cfg.guards;
        let (sp, pr) = (&g.sprawl, &g.pressure);
        Prints {
            metrics: self.schema.metrics.iter().map(metric_print).collect(),
            // What the trackers were built with (limits, window) and what they count; their
            // severities and surface bounds are read from the config as they are used.
            sprawl: hash64(&format!(
                "{}|{}|{}",
                sp.enabled, sp.window_secs, sp.max_variants_per_surface
            )),
            pressure: hash64(&format!(
                "{}|{}|{}|{}|{}",
                pr.enabled,
                pr.message_event,
                pr.unsubscribe_event,
                pr.max_messages_per_user_day,
                pr.min_users
            )),
            exposure: hash64(&g.exposure_event),
        }
    }

    /// A framed checkpoint of the current state, tagged with the input `offsets` it
    /// corresponds to. Call between batches (no outputs pending).
    pub fn checkpoint(&mut self, offsets: Offsets, now_ms: i64) -> Vec<u8> {
        let incidents = self
            .incidents
            .iter()
            .map(|i| PersistedIncident {
                inc: Json(i.clone()),
                metric_idx: i.metric_idx,
                series_idx: i.series_idx,
                explained_by_outage: i.explained_by_outage,
                recovery: i.recovery,
                deadline_ms: i.decision.deadline_ms,
                held: i.held.clone(),
            })
            .collect();
        let skip = self.audit_log.len().saturating_sub(AUDIT_RECORDS_KEPT);
        let p = Persisted {
            offsets,
            prints: self.prints(),
            series: std::mem::take(&mut self.series),
            index: std::mem::take(&mut self.index),
            max_ts: self.max_ts,
            sources: std::mem::take(&mut self.sources),
            closed_upto: self.closed_upto,
            incidents,
            registry: Json(std::mem::take(&mut self.registry)),
            pending_rollbacks: std::mem::take(&mut self.pending_rollbacks),
            emitted_rollbacks: std::mem::take(&mut self.emitted_rollbacks),
            granted: std::mem::take(&mut self.granted),
            watch_reports: std::mem::take(&mut self.watch_reports),
            gain_hist: std::mem::take(&mut self.gain_hist),
            gain_asks: std::mem::take(&mut self.gain_asks),
            dedup: std::mem::replace(&mut self.dedup, Dedup::empty(0)),
            audit_seq: self.audit_seq,
            guards: std::mem::take(&mut self.guards),
            sprawl: self.sprawl.take(),
            pressure: self.pressure.take(),
            auto_rollbacks: std::mem::take(&mut self.auto_rollbacks),
            audit_log: Json(self.audit_log.iter().skip(skip).cloned().collect()),
            last_event_wall_ms: self.last_event_wall_ms,
            vetoed: std::mem::take(&mut self.vetoed),
            shares: std::mem::take(&mut self.shares),
            share_index: std::mem::take(&mut self.share_index),
            share_cats: std::mem::take(&mut self.share_cats),
            resume_at: self.resume_at.clone(),
            behind: self.behind.clone(),
        };
        let payload = checkpoint::encode(&p);
        self.put_back(p, false);
        checkpoint::frame(&payload, self.state_fingerprint(), now_ms)
    }

    /// Moves persisted state into the engine. `restoring`: also take the scalar fields and
    /// rebuild what is derived (incident index, audit log).
    fn put_back(&mut self, p: Persisted, restoring: bool) {
        self.series = p.series;
        self.index = p.index;
        self.sources = p.sources;
        self.registry = p.registry.0;
        self.pending_rollbacks = p.pending_rollbacks;
        self.emitted_rollbacks = p.emitted_rollbacks;
        self.granted = p.granted;
        self.watch_reports = p.watch_reports;
        self.gain_hist = p.gain_hist;
        self.gain_asks = p.gain_asks;
        self.dedup = p.dedup;
        self.guards = p.guards;
        self.sprawl = p.sprawl;
        self.pressure = p.pressure;
        // Bounds come from today's config, not from the checkpoint.
        if let Some(sp) = self.sprawl.as_mut() {
            sp.surfaces.set_max(self.cfg.guards.sprawl.max_surfaces);
        }
        if let Some(pr) = self.pressure.as_mut() {
            pr.surfaces.set_max(self.cfg.guards.pressure.max_surfaces);
        }
        self.auto_rollbacks = p.auto_rollbacks;
        self.vetoed = p.vetoed;
        self.shares = p.shares;
        self.share_index = p.share_index;
        self.share_cats = p.share_cats;
        if !restoring {
            return;
        }
        self.max_ts = p.max_ts;
        self.closed_upto = p.closed_upto;
        self.audit_seq = p.audit_seq;
        self.last_event_wall_ms = p.last_event_wall_ms;
        self.resume_at = p.resume_at;
        self.behind = p.behind;
        self.incidents = p
            .incidents
            .into_iter()
            .map(|pi| {
                let mut i = pi.inc.0;
                i.metric_idx = pi.metric_idx;
                i.series_idx = pi.series_idx;
                i.explained_by_outage = pi.explained_by_outage;
                i.recovery = pi.recovery;
                i.decision.deadline_ms = pi.deadline_ms;
                i.held = pi.held;
                i
            })
            .collect();
        self.incident_ids = self
            .incidents
            .iter()
            .enumerate()
            .map(|(k, i)| (i.id.clone(), k))
            .collect();
        self.audit_log = p.audit_log.0.into();
        self.dirty = true;
    }

    /// Replaces this (fresh) engine's state with a checkpoint's: of each metric whose settings
    /// match, its state; the other metrics start fresh. Checks that the state is consistent
    /// before taking any of it: on error the engine is unchanged.
    pub fn restore(
        &mut self,
        path: &Path,
        loaded: &checkpoint::Loaded,
    ) -> Result<Restored, CheckpointError> {
        let mut p: Persisted = checkpoint::decode(path, &loaded.payload)?;
        check(path, &p)?;
        let fit = self.plan(&p.prints);
        let orphans = self.refit(&mut p, &fit);
        if p.series
            .iter()
            .any(|s| s.hist_sumsq.is_some() != super::keeps_sumsq(&self.schema.metrics[s.metric]))
        {
            return Err(inconsistent(path, "a series state of the wrong shape"));
        }
        self.refit_trackers(&mut p);
        let r = Restored {
            offsets: p.offsets.clone(),
            written_ms: loaded.written_ms,
            series: p.series.len() + p.shares.len(),
            incidents: p.incidents.len(),
            bytes: loaded.payload.len(),
            metrics: fit.fates,
        };
        self.put_back(p, true);
        self.relink_series();
        self.settle(&orphans);
        Ok(r)
    }

    /// Sprawl and pressure built or counting otherwise than configured now start fresh (as
    /// this engine's own), and so do watches' exposure counts of another event.
    fn refit_trackers(&mut self, p: &mut Persisted) {
        let now = self.prints();
        if p.prints.sprawl != now.sprawl {
            p.sprawl = self.sprawl.take();
        }
        if p.prints.pressure != now.pressure {
            p.pressure = self.pressure.take();
        }
        if p.prints.exposure != now.exposure {
            for g in &mut p.guards.all {
                g.exposure = [0.0; 2];
                g.exposure_at.clear();
                g.srm = None;
            }
        }
    }

    /// Which of the checkpoint's metrics (`old`) keep their state here, by name.
    fn plan(&self, old: &Prints) -> Fit {
        let now: Vec<MetricPrint> = self.schema.metrics.iter().map(metric_print).collect();
        let named: Vec<Option<usize>> = old
            .metrics
            .iter()
            .map(|o| now.iter().position(|n| n.name == o.name))
            .collect();
        let kept: Vec<Option<usize>> = old
            .metrics
            .iter()
            .zip(&named)
            .map(|(o, n)| n.filter(|&n| now[n].parts == o.parts))
            .collect();
        let mut origin = vec![None; now.len()];
        for (oi, n) in kept.iter().enumerate() {
            if let Some(n) = *n {
                origin[n] = Some(oi);
            }
        }
        let mut fates: Vec<(String, MetricFate)> = now
            .iter()
            .enumerate()
            .map(|(ni, n)| {
                let fate = match old.metrics.iter().position(|o| o.name == n.name) {
                    None => MetricFate::New,
                    Some(_) if origin[ni].is_some() => MetricFate::Kept,
                    Some(oi) => MetricFate::Reset(
                        n.parts
                            .iter()
                            .filter(|p| !old.metrics[oi].parts.contains(p))
                            .map(|(k, _)| k.clone())
                            .collect(),
                    ),
                };
                (n.name.clone(), fate)
            })
            .collect();
        for (o, n) in old.metrics.iter().zip(&named) {
            if n.is_none() {
                fates.push((o.name.clone(), MetricFate::Removed));
            }
        }
        Fit {
            kept,
            named,
            origin,
            fates,
        }
    }

    /// Lays a checkpoint's state onto the configured metrics: series and share series of kept
    /// metrics under their index here, fresh totals for the others, and every reference to a
    /// metric or a series renumbered. Returns the incidents of the series dropped.
    fn refit(&self, p: &mut Persisted, fit: &Fit) -> Vec<usize> {
        let (smap, mut orphans) = self.refit_series(p, fit);
        orphans.extend(self.refit_shares(p, fit));
        let series = |j: usize| smap.get(j).copied().flatten();
        let metric = |m: usize| fit.kept.get(m).copied().flatten();
        p.resume_at = std::mem::take(&mut p.resume_at)
            .into_iter()
            .filter_map(|(j, w)| Some((series(j)?, w)))
            .collect();
        p.behind = std::mem::take(&mut p.behind)
            .into_iter()
            .filter_map(|(m, w)| Some((metric(m)?, w)))
            .collect();
        p.gain_hist
            .retain_mut(|g| metric(g.metric).map(|m| g.metric = m).is_some());
        p.gain_asks
            .retain_mut(|a| metric(a.metric).map(|m| a.metric = m).is_some());
        for pi in &mut p.incidents {
            pi.series_idx = pi.series_idx.and_then(series);
            // An incident stays about its metric while one of that name is configured.
            pi.metric_idx = pi
                .metric_idx
                .and_then(|m| fit.named.get(m).copied().flatten());
            if let Some((_, ti, _, _)) = pi.held.as_mut().and_then(|h| h.gain.as_mut()) {
                *ti = fit.named.get(*ti).copied().flatten().unwrap_or(LOST);
            }
        }
        let relaid =
            smap.len() != p.series.len() || smap.iter().enumerate().any(|(j, &n)| n != Some(j));
        for g in &mut p.guards.all {
            g.metrics = fit.reorder(std::mem::take(&mut g.metrics));
            if relaid {
                // The series in scope are indices: taking over from itself, with nothing to
                // take, is the way to have them found again.
                let same = g.clone();
                g.take_over(&same, |_| false, |_| false, false);
            }
        }
        orphans.sort_unstable();
        orphans.dedup();
        orphans
    }

    /// The series of kept metrics, totals first in metric order as `Engine::new` lays them out
    /// (fresh ones for the other metrics), then the others in saved order; their index
    /// rebuilt. Returns each saved series' new index and the incidents of those dropped.
    fn refit_series(&self, p: &mut Persisted, fit: &Fit) -> (Vec<Option<usize>>, Vec<usize>) {
        let mut slots: Vec<Option<Series>> = std::mem::take(&mut p.series)
            .into_iter()
            .map(Some)
            .collect();
        let mut smap = vec![None; slots.len()];
        let mut totals: HashMap<usize, usize> = HashMap::new();
        for (j, s) in slots.iter().enumerate() {
            let s = s.as_ref().expect("all there");
            if let (true, Some(m)) = (s.dims.is_empty(), fit.kept[s.metric]) {
                totals.insert(m, j);
            }
        }
        let mut series = Vec::with_capacity(slots.len());
        for (mi, m) in self.schema.metrics.iter().enumerate() {
            if m.total.is_none() {
                continue;
            }
            let saved = totals.get(&mi).and_then(|&j| Some((j, slots[j].take()?)));
            let total = match saved {
                Some((j, mut s)) => {
                    smap[j] = Some(series.len());
                    s.metric = mi;
                    s
                }
                None => make_series(&self.schema, mi, Vec::new(), i64::MIN),
            };
            push_series(&mut series, total);
        }
        let mut orphans = Vec::new();
        for (j, s) in slots.into_iter().enumerate() {
            let Some(mut s) = s else { continue };
            match fit.kept[s.metric] {
                Some(m) if !s.dims.is_empty() => {
                    s.metric = m;
                    smap[j] = Some(push_series(&mut series, s));
                }
                _ => orphans.extend(s.incident.into_iter().chain(s.trend.incident)),
            }
        }
        p.index = KeyMap::default();
        for (si, s) in series.iter().enumerate() {
            if !s.dims.is_empty() {
                p.index
                    .insert(self.series_key(s.metric, &s.dims, false), si);
            }
        }
        p.series = series;
        (smap, orphans)
    }

    /// The share series of kept metrics, their index and category names. Returns the
    /// incidents of those dropped.
    fn refit_shares(&self, p: &mut Persisted, fit: &Fit) -> Vec<usize> {
        let mut orphans = Vec::new();
        let mut shares = Vec::new();
        for mut s in std::mem::take(&mut p.shares) {
            match fit.kept[s.metric] {
                Some(m) => {
                    s.metric = m;
                    shares.push(s);
                }
                None => orphans.extend(s.incident),
            }
        }
        p.share_index = shares
            .iter()
            .enumerate()
            .map(|(i, s)| (self.series_key(s.metric, &s.dims, true), i))
            .collect();
        p.shares = shares;
        p.share_cats = fit.reorder(std::mem::take(&mut p.share_cats));
        orphans
    }

    /// A series' key in `index` (`share`: in `share_index`), as the hot path computes it.
    fn series_key(&self, metric: usize, dims: &[(String, String)], share: bool) -> u64 {
        let k = self.schema.series_key;
        let mut h = SipHasher13::new_with_keys(k.0, k.1);
        h.write_usize(metric);
        if share {
            h.write_u8(0xfe);
        }
        for (_, v) in dims {
            h.write(v.as_bytes());
            h.write_u8(0xff);
        }
        h.finish()
    }

    /// Points each metric at its total series and counts its others, from the series held.
    fn relink_series(&mut self) {
        for m in &mut self.schema.metrics {
            m.total = None;
            m.series_count = 0;
        }
        for (si, s) in self.series.iter().enumerate() {
            let m = &mut self.schema.metrics[s.metric];
            if s.dims.is_empty() {
                m.total = Some(si);
            } else {
                m.series_count += 1;
            }
        }
    }

    /// After a restore: incidents of series that were not kept end (nothing would ever end
    /// them), and holds waiting on a metric no longer configured stop waiting.
    fn settle(&mut self, orphans: &[usize]) {
        let end = self
            .closed_upto
            .map(|c| c * self.schema.window_ms)
            .or(self.max_ts)
            .unwrap_or(0);
        for &k in orphans {
            let why = match self.incidents[k].metric_idx {
                Some(_) => "the metric's settings changed; its series start again",
                None => "the metric is no longer configured",
            };
            self.resolve_incident(
                k,
                end,
                format!("reset: {why}"),
                serde_json::json!({"rule": "checkpoint-restore", "reason": why}),
            );
        }
        self.settle_lost_gains();
    }

    /// Stage 2: a held incident waiting for the effect on a target metric that is no longer
    /// configured is published without it, as when the wait times out.
    fn settle_lost_gains(&mut self) {
        for idx in 0..self.incidents.len() {
            let Some(h) = self.incidents[idx].held.as_mut() else {
                continue;
            };
            let Some((_, _, evidence, policy)) = h.gain.take_if(|g| g.1 == LOST) else {
                continue;
            };
            let mut evidence: serde_json::Value =
                serde_json::from_str(&evidence).unwrap_or(serde_json::Value::Null);
            if let Some(o) = evidence.as_object_mut() {
                o.insert(
                    "local_gain_global_loss_missing".into(),
                    "the change's target metric is no longer configured".into(),
                );
            }
            let policy = serde_json::from_str(&policy).unwrap_or(serde_json::Value::Null);
            self.audit_detection(idx, evidence, policy);
            self.release_held(idx);
        }
    }
}

fn hash64(text: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(text.as_bytes());
    u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"))
}

/// The settings a metric's series are built from, by part: what decides which series exist
/// and what they count, and what a series bakes in when it is created (its baseline's
/// seasonality and half-life, its detector's sides, threshold and tuning, a gauge's clipping
/// warm-up). Left out, as they change nothing saved: `name` (the key), `owner` and `severity`
/// (routing and presentation, read when an incident is raised), `min_psi`,
/// `min_volume_per_window`, `incident_max_secs` and, but for gauges, `warmup_windows` (read
/// from the config at every window).
fn metric_print(m: &MetricDef) -> MetricPrint {
    let (c, d) = (&m.cfg, &m.det);
    // The detector is tuned to one of the two smallest effects, by family.
    let min_effect = if m.family == Family::Gaussian {
        d.min_effect_sd
    } else {
        d.min_relative_effect
    };
    let gauge_warmup = (c.kind == MetricKind::Gauge).then_some(d.warmup_windows);
    let parts = [
        ("kind", format!("{:?}", c.kind)),
        (
            "events",
            format!("{:?}|{:?}|{:?}", c.numerator, c.denominator, c.exposure),
        ),
        (
            "dims",
            format!("{:?}|{}|{:?}", c.dims, c.include_total, c.share_of),
        ),
        ("direction", format!("{:?}", c.direction)),
        (
            "detection",
            format!(
                "{:?}|{}|{}|{}|{}|{:?}",
                d.seasonality,
                d.baseline_half_life_windows,
                d.false_alarms_per_series_week,
                min_effect,
                d.min_expected_events,
                gauge_warmup
            ),
        ),
    ];
    MetricPrint {
        name: c.name.clone(),
        parts: parts
            .into_iter()
            .map(|(k, v)| (k.to_string(), hash64(&v)))
            .collect(),
    }
}

fn inconsistent(path: &Path, what: &str) -> CheckpointError {
    CheckpointError::Decode {
        path: path.to_path_buf(),
        message: format!("inconsistent state: {what}"),
    }
}

/// Checks that a decoded checkpoint is consistent in itself (every reference in range, for
/// the metrics it was written for) before anything is taken from it.
fn check(path: &Path, p: &Persisted) -> Result<(), CheckpointError> {
    let metrics = p.prints.metrics.len();
    let (n_series, n_shares, n_inc) = (p.series.len(), p.shares.len(), p.incidents.len());
    if p.series.iter().any(|s| s.metric >= metrics) || p.shares.iter().any(|s| s.metric >= metrics)
    {
        return Err(inconsistent(path, "a series of a metric it does not list"));
    }
    if p.index.values().any(|&i| i >= n_series)
        || p.share_index.values().any(|&i| i >= n_shares)
        || p.resume_at.keys().any(|&i| i >= n_series)
        || p.behind.keys().any(|&m| m >= metrics)
    {
        return Err(inconsistent(path, "series index out of range"));
    }
    if p.series
        .iter()
        .any(|s| !s.baseline.consistent() || !s.detector.consistent())
    {
        return Err(inconsistent(path, "a series state of the wrong shape"));
    }
    let bad = |i: &Option<usize>| i.is_some_and(|i| i >= n_inc);
    if p.series
        .iter()
        .any(|s| bad(&s.incident) || bad(&s.trend.incident))
        || p.shares.iter().any(|s| bad(&s.incident))
        || p.incidents.iter().any(|i| {
            i.series_idx.is_some_and(|s| s >= n_series)
                || i.metric_idx.is_some_and(|m| m >= metrics)
        })
    {
        return Err(inconsistent(path, "incident reference out of range"));
    }
    Ok(())
}

/// What a handover import took over.
#[derive(Debug, Clone, Default)]
pub struct Imported {
    pub series: usize,
    pub incidents: usize,
}

impl Engine {
    /// Stage 2, on a rebalance: takes over the series (and share series, with their open
    /// incidents) of repartition partitions `parts` from another instance's checkpoint, which
    /// must be of this configuration. Series of those partitions this engine already holds
    /// (from an earlier ownership) are replaced. Windows the other instance closed are not
    /// closed again here.
    pub fn import_partitions(
        &mut self,
        path: &Path,
        loaded: &checkpoint::Loaded,
        parts: &[i32],
    ) -> Result<Imported, CheckpointError> {
        let Stage::Merge { partitions } = self.stage else {
            return Ok(Imported::default());
        };
        let mut p: Persisted = checkpoint::decode(path, &loaded.payload)?;
        check(path, &p)?;
        let fit = self.plan(&p.prints);
        // Incidents of series not kept stay with the instance that held them.
        let _ = self.refit(&mut p, &fit);
        let metrics = self.schema.metrics.len();
        // Metrics whose settings differ from the other instance's are not taken: they start
        // fresh here.
        let ours = |e: &Engine, metric: usize| {
            fit.origin[metric].is_some() && parts.contains(&e.partition_of(metric, partitions))
        };
        let mut incidents = p.incidents;
        let mut moved: HashMap<usize, usize> = HashMap::new();
        let mut take_incident = |e: &mut Engine, k: usize, series_idx: Option<usize>| -> usize {
            if let Some(&i) = moved.get(&k) {
                return i;
            }
            let pi = &mut incidents[k];
            let mut i = pi.inc.0.clone();
            i.metric_idx = pi.metric_idx;
            i.series_idx = series_idx;
            i.explained_by_outage = pi.explained_by_outage;
            i.recovery = pi.recovery;
            i.decision.deadline_ms = pi.deadline_ms;
            i.held = pi.held.clone();
            let idx = match e.incident_ids.get(&i.id) {
                Some(&old) => {
                    e.incidents[old] = i;
                    old
                }
                None => {
                    e.incident_ids.insert(i.id.clone(), e.incidents.len());
                    e.incidents.push(i);
                    e.incidents.len() - 1
                }
            };
            moved.insert(k, idx);
            idx
        };
        let mut done = Imported::default();
        let by_index: HashMap<usize, u64> = p.index.iter().map(|(k, &i)| (i, *k)).collect();
        // Up to which window each taken series' state has closed: the checkpoint's watermark,
        // less where that engine was itself still catching a metric up, more where it had
        // taken a series over from state ahead of it.
        let metric_closed = |mi: usize| -> Option<i64> {
            let c = p.closed_upto?;
            Some(p.behind.get(&mi).map_or(c, |&f| f.min(c)))
        };
        // Closed fewer windows than this engine: those are closed here once their partial sums
        // have been read again. (A series' own point is never lower than its metric's.)
        let taken: Vec<usize> = (0..metrics).filter(|&mi| ours(self, mi)).collect();
        for mi in taken {
            if let (Some(d), Some(mine)) = (metric_closed(mi), self.closed_upto) {
                if d < mine {
                    let f = self.behind.entry(mi).or_insert(d);
                    *f = (*f).min(d);
                }
            }
        }
        for (j, mut s) in p.series.into_iter().enumerate() {
            if !ours(self, s.metric) {
                continue;
            }
            let m = &self.schema.metrics[s.metric];
            let si = if s.dims.is_empty() {
                match m.total {
                    Some(t) => t,
                    None => continue,
                }
            } else {
                let Some(&key) = by_index.get(&j) else {
                    continue;
                };
                match self.index.get(&key) {
                    Some(&si) => si,
                    None => {
                        let fresh = make_series(&self.schema, s.metric, Vec::new(), 0);
                        let si = push_series(&mut self.series, fresh);
                        self.index.insert(key, si);
                        self.schema.metrics[s.metric].series_count += 1;
                        si
                    }
                }
            };
            s.incident = s.incident.map(|k| take_incident(self, k, Some(si)));
            s.trend.incident = s.trend.incident.map(|k| take_incident(self, k, Some(si)));
            let mi = s.metric;
            self.series[si] = s;
            if let Some(c) = metric_closed(mi) {
                let d = p.resume_at.get(&j).map_or(c, |&r| r.max(c));
                self.resume_at.insert(si, d);
            }
            done.series += 1;
        }
        let by_share: HashMap<usize, u64> = p.share_index.iter().map(|(k, &i)| (i, *k)).collect();
        for (j, mut s) in p.shares.into_iter().enumerate() {
            if !ours(self, s.metric) {
                continue;
            }
            let Some(&key) = by_share.get(&j) else {
                continue;
            };
            s.incident = s.incident.map(|k| take_incident(self, k, None));
            match self.share_index.get(&key) {
                Some(&i) => self.shares[i] = s,
                None => {
                    self.shares.push(s);
                    self.share_index.insert(key, self.shares.len() - 1);
                }
            }
            done.series += 1;
        }
        // Watches: what each learnt for the metrics and the change partitions taken over. Every
        // instance keeps a copy of every watch (changes are broadcast), so a copy is only
        // missing where this instance never saw the change: nothing to take it into then.
        let splits: Vec<bool> = p
            .guards
            .all
            .iter()
            .map(|g| parts.contains(&self.change_partition(&g.change_id, partitions)))
            .collect();
        for (pg, split) in p.guards.all.iter().zip(splits) {
            let Some(lg) = self
                .guards
                .all
                .iter_mut()
                .rev()
                .find(|g| g.change_id == pg.change_id && g.opened_ms == pg.opened_ms)
            else {
                continue;
            };
            let metric_part = &self.metric_part;
            lg.take_over(
                pg,
                |mi| metric_part.get(mi).is_some_and(|x| parts.contains(x)),
                |x| parts.contains(&x),
                split,
            );
        }
        // Metrics taken over: their effect history, and the questions about them.
        let taken = |e: &Engine, mi: usize| parts.contains(&e.partition_of(mi, partitions));
        let hist: Vec<_> = p
            .gain_hist
            .into_iter()
            .filter(|g| g.metric < metrics && taken(self, g.metric))
            .collect();
        let keep: Vec<bool> = self
            .gain_hist
            .iter()
            .map(|g| !taken(self, g.metric))
            .collect();
        let mut keep = keep.into_iter();
        self.gain_hist.retain(|_| keep.next().unwrap_or(true));
        self.gain_hist.extend(hist);
        let asks: Vec<_> = p
            .gain_asks
            .into_iter()
            .filter(|a| a.metric < metrics && taken(self, a.metric))
            .collect();
        self.gain_asks.extend(asks);
        // Watches closing on a change partition taken over: the verdicts gathered so far.
        for r in p.watch_reports {
            if parts.contains(&self.change_partition(&r.change_id, partitions))
                && !self
                    .watch_reports
                    .iter()
                    .any(|x| x.change_id == r.change_id && x.opened_ms == r.opened_ms)
            {
                self.watch_reports.push(r);
            }
        }
        // The decider's partition: what it granted and the breaker's count go with it.
        if parts.contains(&crate::repartition::DECIDER) {
            self.granted = p.granted;
            self.auto_rollbacks = p.auto_rollbacks;
            self.vetoed.extend(p.vetoed);
        }
        // Category names: a share series' counts are indexed by its metric's registry.
        for (mi, c) in p.share_cats.into_iter().enumerate() {
            if mi < self.share_cats.len() && c.names.len() > self.share_cats[mi].names.len() {
                self.share_cats[mi] = c;
            }
        }
        done.incidents = moved.len();
        self.settle_lost_gains();
        self.dirty = true;
        Ok(done)
    }
}

impl Dedup {
    pub(super) fn empty(span_ms: i64) -> Dedup {
        Dedup {
            cur: super::KeySet::default(),
            prev: super::KeySet::default(),
            gen_start: i64::MIN / 2,
            span_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{story_change, story_effect, Scenario, Sim};
    use crate::sink::Signer;

    const T0: i64 = 1_795_341_600_000; // 2026-11-22T10:00:00Z
    const H: i64 = 3_600_000;

    fn engine() -> Engine {
        let cfg =
            Config::from_str_named(crate::demo::DEFAULT_CONFIG, "config/guardrail.toml").unwrap();
        Engine::new(&cfg).unwrap()
    }

    /// Feeds the simulator from its current time to `to`, with `now` one minute after each
    /// event, and returns the encoded outputs.
    fn feed(e: &mut Engine, sim: &mut Sim, to: i64) -> Vec<String> {
        let signer = Signer::new("k", b"secret");
        let mut evs = Vec::new();
        sim.advance(to, &mut |_, v| evs.push(v.to_vec()));
        let mut out = Vec::new();
        for v in &evs {
            let ts = crate::event::decode_event(v, 65536).unwrap().ts_ms;
            let _ = e.process_event(v, ts + 60_000);
            // Wall-clock stamps (`at`, `emitted_at`, `time`) aside, outputs must match.
            out.extend(e.take_outputs().map(|o| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&o.encode(&signer).value).unwrap();
                for k in ["at", "emitted_at", "time"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v.to_string()
            }));
        }
        out
    }

    #[test]
    fn a_restored_engine_continues_exactly_like_the_original() {
        let scenario = Scenario {
            peak_sessions_per_min: 300.0,
            ..Scenario::default()
        };
        let mut a = engine();
        let mut sim = Sim::new(scenario, T0);
        feed(&mut a, &mut sim, T0 + 26 * H);
        let applied = T0 + 26 * H;
        a.process_change(story_change("chg-1", applied).as_bytes())
            .unwrap();
        sim.scenario_mut()
            .effects
            .push(story_effect("chg-1", applied));
        feed(&mut a, &mut sim, applied + 10 * 60_000);
        let _ = a.take_outputs().count();

        let offsets = vec![("events".to_string(), 0, 12345)];
        let bytes = a.checkpoint(offsets.clone(), applied);
        let dir = Path::new("mem");
        let loaded = checkpoint::unframe(dir, &bytes, a.state_fingerprint()).unwrap();
        let mut b = engine();
        let r = b.restore(dir, &loaded).unwrap();
        assert_eq!(r.offsets, offsets);
        assert_eq!(offsets_of(dir, &loaded.payload).unwrap(), offsets);
        assert!(r.series > 10, "{r:?}");

        // Both see the same rest of the afternoon.
        let mut sim_b = sim.clone();
        let out_a = feed(&mut a, &mut sim, applied + 4 * H);
        let out_b = feed(&mut b, &mut sim_b, applied + 4 * H);
        assert!(
            out_a
                .iter()
                .any(|o| o.contains("\"rollback\"") || o.contains("rollback")),
            "the injected drop is detected and acted on after the checkpoint: {out_a:?}"
        );
        assert_eq!(out_a, out_b, "same outputs, byte for byte");
        let ids = |e: &Engine| {
            e.incidents
                .iter()
                .map(|i| (i.id.clone(), i.kind, i.detected_ms))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&b));
        assert!(!a.incidents.is_empty());
        // A checkpoint holding incidents, decisions and audit records reads back whole.
        let bytes = a.checkpoint(offsets.clone(), applied);
        let loaded = checkpoint::unframe(dir, &bytes, a.state_fingerprint()).unwrap();
        let mut c = engine();
        c.restore(dir, &loaded).unwrap();
        assert_eq!(ids(&a), ids(&c));
        let decisions = |e: &Engine| {
            e.incidents
                .iter()
                .map(|i| i.decision.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(decisions(&a), decisions(&c));
        assert_eq!(a.audit_log.len(), c.audit_log.len());
    }

    #[test]
    fn a_checkpoint_of_another_window_is_refused_and_the_engine_kept_fresh() {
        let mut a = engine();
        let mut sim = Sim::new(Scenario::default(), T0);
        feed(&mut a, &mut sim, T0 + H);
        let bytes = a.checkpoint(Vec::new(), T0);
        let mut other = a.config().clone();
        other.engine.window_secs = 600;
        let b = Engine::new(&other).unwrap();
        let e = checkpoint::unframe(Path::new("p"), &bytes, b.state_fingerprint()).unwrap_err();
        assert_eq!(e.reason(), "config_changed");
        // A payload that decodes as something else entirely is refused before anything is
        // taken.
        let mut c = engine();
        let fresh = c.series.len();
        let junk = checkpoint::frame(&[1, 2, 3, 4], c.state_fingerprint(), 0);
        let l = checkpoint::unframe(Path::new("p"), &junk, c.state_fingerprint()).unwrap();
        assert_eq!(
            c.restore(Path::new("p"), &l).unwrap_err().reason(),
            "decode"
        );
        assert_eq!(c.series.len(), fresh);
    }

    /// The default config, edited: `conversion_rate`'s owner and severity, a metric inserted
    /// first, `click_through_rate`'s seasonality, `unsubscribe_rate` removed.
    fn edited() -> Engine {
        let mut text = crate::demo::DEFAULT_CONFIG
            .replacen("owner = \"team-growth\"", "owner = \"team-checkout\"", 1)
            .replacen("severity = \"critical\"", "severity = \"info\"", 1)
            .replace(
                "name = \"click_through_rate\"\n",
                "name = \"click_through_rate\"\ndetection = { seasonality = \"none\" }\n",
            )
            .replacen(
                "\n[[metrics]]\n",
                "\n[[metrics]]\nname = \"tickets\"\nkind = \"count\"\n\
                 numerator = { type = \"support_ticket\" }\n\n[[metrics]]\n",
                1,
            );
        let from = text
            .find("[[metrics]]\nname = \"unsubscribe_rate\"")
            .unwrap();
        let to = from + 1 + text[from + 1..].find("[[metrics]]").unwrap();
        text.replace_range(from..to, "");
        Engine::new(&Config::from_str_named(&text, "t.toml").unwrap()).unwrap()
    }

    #[test]
    fn a_restore_keeps_the_metrics_whose_settings_still_fit_by_name() {
        let mut a = engine();
        let mut sim = Sim::new(Scenario::default(), T0);
        feed(&mut a, &mut sim, T0 + 26 * H);
        let bytes = a.checkpoint(Vec::new(), T0);
        let mut b = edited();
        let l = checkpoint::unframe(Path::new("p"), &bytes, b.state_fingerprint()).unwrap();
        let r = b.restore(Path::new("p"), &l).unwrap();
        let fate = |n: &str| r.metrics.iter().find(|(m, _)| m == n).unwrap().1.clone();
        assert_eq!(fate("conversion_rate"), MetricFate::Kept, "{r:?}");
        assert_eq!(fate("support_tickets_per_session"), MetricFate::Kept);
        assert_eq!(fate("device_mix"), MetricFate::Kept);
        assert_eq!(
            fate("click_through_rate"),
            MetricFate::Reset(vec!["detection".into()])
        );
        assert_eq!(fate("tickets"), MetricFate::New);
        assert_eq!(fate("unsubscribe_rate"), MetricFate::Removed);
        let (before, after) = (a.learnt_by_metric(), b.learnt_by_metric());
        for m in [
            "conversion_rate",
            "support_tickets_per_session",
            "brand_sentiment",
            "device_mix",
        ] {
            assert!(before[m].len() > 1 || m == "brand_sentiment", "{m}");
            assert!(before[m].iter().any(|(_, learnt)| *learnt > 0), "{m}");
            assert_eq!(before[m], after[m], "{m} kept whole");
        }
        // Fresh: the total alone, nothing learnt.
        for m in ["click_through_rate", "tickets"] {
            assert_eq!(after[m], [("total".to_string(), 0)], "{m}");
        }
        assert!(!after.contains_key("unsubscribe_rate"));

        // The series kept are found again under their new metric index: the next day adds no
        // series to them, and what the original learns, the restored engine learns alike.
        let mut sim_b = sim.clone();
        feed(&mut a, &mut sim, T0 + 28 * H);
        feed(&mut b, &mut sim_b, T0 + 28 * H);
        let (before, after) = (a.learnt_by_metric(), b.learnt_by_metric());
        for m in [
            "conversion_rate",
            "support_tickets_per_session",
            "device_mix",
        ] {
            assert_eq!(before[m], after[m], "{m} goes on alike");
        }
        assert_eq!(
            after["click_through_rate"].len(),
            before["click_through_rate"].len(),
            "the reset metric's series come back as events arrive"
        );
    }

    #[test]
    fn sprawl_and_pressure_restart_alone_when_their_own_settings_change() {
        let mut a = engine();
        let mut sim = Sim::new(Scenario::default(), T0);
        feed(&mut a, &mut sim, T0 + 2 * H);
        let bytes = a.checkpoint(Vec::new(), T0);
        let tracked = |e: &Engine| {
            (
                e.sprawl.as_ref().map(|s| s.surfaces.len()),
                e.pressure.as_ref().map(|p| p.surfaces.len()),
                e.learnt_by_metric(),
            )
        };
        let (sprawl, pressure, metrics) = tracked(&a);
        assert!(
            sprawl > Some(0) && pressure > Some(0),
            "{sprawl:?} {pressure:?}"
        );
        let restore = |edit: &dyn Fn(&mut Config)| {
            let mut cfg = a.config().clone();
            edit(&mut cfg);
            let mut e = Engine::new(&cfg).unwrap();
            let l = checkpoint::unframe(Path::new("p"), &bytes, e.state_fingerprint()).unwrap();
            e.restore(Path::new("p"), &l).unwrap();
            tracked(&e)
        };
        // Severities and bounds are read as they are used: kept.
        let same = restore(&|c| {
            c.guards.sprawl.severity = crate::config::Severity::Critical;
            c.guards.pressure.max_surfaces = 5_000;
        });
        assert_eq!(same, (sprawl, pressure, metrics.clone()));
        // Another sprawl window, another message event: each starts fresh, nothing else.
        let fresh = restore(&|c| {
            c.guards.sprawl.window_secs = 7200;
            c.guards.pressure.message_event = "push_sent".into();
        });
        assert_eq!(fresh, (Some(0), Some(0), metrics.clone()));
        // Turned off: gone.
        let off = restore(&|c| c.guards.sprawl.enabled = false);
        assert_eq!(off, (None, pressure, metrics));
    }

    #[test]
    fn the_open_incidents_of_a_metric_reset_resolve_and_say_why() {
        let mut a = engine();
        let mut sim = Sim::new(Scenario::default(), T0);
        feed(&mut a, &mut sim, T0 + 26 * H);
        a.process_change(story_change("chg-1", T0 + 26 * H).as_bytes())
            .unwrap();
        sim.scenario_mut()
            .effects
            .push(story_effect("chg-1", T0 + 26 * H));
        feed(&mut a, &mut sim, T0 + 30 * H);
        let firing = |e: &Engine| -> Vec<(String, String)> {
            e.incidents
                .iter()
                .filter(|i| i.status == IncidentStatus::Firing && i.series_idx.is_some())
                .map(|i| (i.id.clone(), i.metric.clone()))
                .collect()
        };
        let open = firing(&a);
        assert!(!open.is_empty(), "the story's drop is firing");
        let metric = open[0].1.clone();
        let bytes = a.checkpoint(Vec::new(), T0);
        let mut cfg = a.config().clone();
        let m = cfg
            .metrics
            .iter_mut()
            .map(|m| m.get_mut())
            .find(|m| m.name == metric)
            .unwrap();
        m.detection.seasonality = Some(crate::config::Seasonality::None);
        let mut b = Engine::new(&cfg).unwrap();
        let l = checkpoint::unframe(Path::new("p"), &bytes, b.state_fingerprint()).unwrap();
        b.restore(Path::new("p"), &l).unwrap();
        let still: Vec<_> = firing(&b);
        assert!(still.iter().all(|(_, m)| *m != metric), "{still:?}");
        assert_eq!(
            still,
            open.iter()
                .filter(|(_, m)| *m != metric)
                .cloned()
                .collect::<Vec<_>>(),
            "the other metrics' incidents stay open"
        );
        let resolved: Vec<String> = b
            .take_outputs()
            .filter_map(|o| match o {
                Output::Alert(a) if a.status == "resolved" => Some(a.incident_id.clone()),
                _ => None,
            })
            .collect();
        for (id, m) in &open {
            let i = &b.incidents[b.incident_ids[id]];
            if *m == metric {
                assert!(resolved.contains(id), "{id}: {resolved:?}");
                let why = i.resolution.as_deref().unwrap_or_default();
                assert!(
                    why.starts_with("reset: the metric's settings changed"),
                    "{why}"
                );
                assert_eq!(i.series_idx, None);
            }
        }
    }
}
