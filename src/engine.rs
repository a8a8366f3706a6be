//! The engine: decode -> window -> baseline -> detect -> attribute -> policy, in event time.
//!
//! One engine instance is single-threaded and deterministic given its inputs (except the wall
//! clock used for `emitted_at` and the future-skew check, both passed in). The live service and
//! replay drive the same engine. Per event the hot path does a hash-map lookup per routed metric,
//! adds to a window slot and compares a watermark: no allocation (unless a JSON string has
//! escapes or a new series appears) and no lock. Windows close when the watermark passes them;
//! closing a window runs the baseline and the detector of every series once.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hasher;

use serde::Serialize;
use siphasher::sip::SipHasher13;
use statrs::distribution::{ContinuousCDF, Normal};

use crate::attribute::{human_duration, Candidate, Query, Registry, Timing};
use crate::baseline::{Baseline, Expect, Family, Obs};
use crate::config::{
    Config, DetectionDefaults, Direction, MetricConfig, MetricKind, Selector, Tier, TOP_LEVEL_DIMS,
};
use crate::detect::{Alarm, Detector, Recovery, Side};
use crate::event::{
    decode_change, decode_event, fmt_time, Actor, Change, ChangeAction, ErrorCode, Event, Reject,
};
use crate::guard::{Guards, Pressure, Sprawl};
use crate::onset::{Coarse, Model, Onset, Span, Suff};
use crate::policy::{self, Decision, DecisionAction};
use crate::sink::{
    stable_id, Alert, AuditRecord, Output, RollbackData, RollbackMetric, RollbackRequest,
    TopSegment,
};
use crate::window::Ring;

mod drift;
mod fasthash;
mod govern;
mod persist;
mod stage;
use fasthash::{FastState, KeyMap, KeySet};
pub use persist::{offsets_of, Imported, Offsets, Restored};
pub use stage::{Held, Stage};

/// Dimensions read from the `dims` object, across all metrics.
const MAX_OBJ_DIMS: usize = 16;
/// The rollback request id of (incident, change): the contract's idempotency key.
fn rollback_id(incident_id: &str, change_id: &str) -> String {
    stable_id("rb-", &[incident_id, change_id])
}

/// Windows of per-series history kept for drill-down and the API.
pub const HISTORY: usize = 48;
/// Windows a closed window waits before the baseline learns it (must be < HISTORY).
pub const LEARN_LAG: i64 = 12;
/// The same for `gauge` metrics: the next window. Their updates are clipped at 3 sd, so a fresh
/// anomaly barely moves the baseline it is tested against, and a 12-window lag would hold a
/// new regime (or the first day of a daily pattern) out of the baseline for 12 windows.
pub const GAUGE_LEARN_LAG: i64 = 1;
/// Value used for a tracked dimension the event does not carry.
pub const MISSING_DIM: &str = "unknown";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("metric {metric}: tracks {count} dims read from the `dims` object in total across metrics; at most {MAX_OBJ_DIMS}")]
    TooManyDims { metric: String, count: usize },
    #[error("no signing secret: set [signing].secret or the environment variable {0} (rollback requests must be signed)")]
    NoSecret(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopField {
    Surface,
    Variant,
    ChangeId,
    Arm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DimSrc {
    Top(TopField),
    Obj(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Num,
    Den,
}

#[derive(Debug, Clone)]
struct Filter {
    surface: Option<String>,
    name: Option<String>,
    dims: Vec<(DimSrc, String)>,
}

#[derive(Debug, Clone)]
struct Route {
    metric: usize,
    role: Role,
    filter: Filter,
}

/// A configured metric, resolved.
#[derive(Debug, Clone)]
pub struct MetricDef {
    pub cfg: MetricConfig,
    pub family: Family,
    pub det: DetectionDefaults,
    dims: Vec<DimSrc>,
    /// Count metrics without exposure measure events per window.
    per_window: bool,
    total: Option<usize>,
    series_count: usize,
    /// `share` metrics: where the watched dimension's value is read.
    share_of: Option<DimSrc>,
}

impl MetricDef {
    pub fn name(&self) -> &str {
        &self.cfg.name
    }
}

/// One closed window in a series' history: 14 bytes (packed; fields are only read and written
/// by value), as every series keeps [`HISTORY`] of them. The sum of squares is only read by the
/// baseline of a mean metric, so it lives apart, in [`Series::hist_sumsq`], for those alone.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[repr(C, packed(2))]
struct HistEntry {
    num: f32,
    den: f32,
    /// Expected rate (NaN when the baseline had no forecast).
    exp: f32,
    /// Standard deviation of the window's rate under the baseline, see [`pack_sd`].
    sd: u16,
}

impl HistEntry {
    const EMPTY: HistEntry = HistEntry {
        num: 0.0,
        den: 0.0,
        exp: f32::NAN,
        sd: SD_NAN,
    };
}

/// The series an incident opened on and how far it moved, for weighing candidate changes.
#[derive(Debug, Clone, Copy)]
struct Shifted {
    series: usize,
    /// The window of detection.
    window: i64,
    /// Observed minus expected (rate, or mean).
    shift: f64,
}

/// A closed window read back from the history.
#[derive(Debug, Clone, Copy)]
struct HistPoint {
    num: f32,
    den: f32,
    /// 0 for metrics other than means (their baselines do not read it).
    sumsq: f32,
    exp: f32,
    sd: f32,
}

/// [`pack_sd`] of NaN.
const SD_NAN: u16 = (0x7FC0_0000u32 >> 15) as u16;

/// A standard deviation (never negative, or NaN) in 16 bits: an f32 without its sign bit and
/// the low 15 bits of its mantissa, rounded to nearest (relative error at most 2^-9 = 0.2%).
/// It only draws the band on charts and weighs a window in a guard's observational comparison,
/// where 0.2% of the spread is immaterial; the expected value beside it stays an f32, as excess
/// and guard sums difference it against the observed count.
fn pack_sd(sd: f32) -> u16 {
    if sd.is_nan() {
        return SD_NAN;
    }
    let b = sd.max(0.0).to_bits();
    // Round half to even; a carry out of the mantissa rounds up the exponent, as it should, and
    // the largest finite values round to infinity.
    ((b + 0x3FFF + ((b >> 15) & 1)) >> 15) as u16
}

fn unpack_sd(x: u16) -> f32 {
    f32::from_bits((x as u32) << 15)
}

/// Latest closed window of a series, as exported to gauges and the API.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct LastWindow {
    pub window_start_ms: i64,
    pub observed: f64,
    pub expected: f64,
    pub expected_low: f64,
    pub expected_high: f64,
    pub volume: f64,
    pub score: f64,
}

/// One tracked series: a metric over one combination of segment values (or the total).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Series {
    pub metric: usize,
    pub dims: Vec<(String, String)>,
    pub label: String,
    ring: Ring,
    first_window: i64,
    baseline: Baseline,
    detector: Detector,
    pub incident: Option<usize>,
    /// Windows before this are never learnt (they belong to a past incident).
    learn_from: i64,
    /// Boxed: it is half of the series, and `Vec<Series>` keeps up to an eighth more in growth
    /// slack (`push_series`); only window closes and charts touch it.
    #[serde(with = "crate::checkpoint::boxed_array")]
    hist: Box<[HistEntry; HISTORY]>,
    /// Sums of squares of the same windows: mean metrics only (their baselines learn the
    /// within-window variance from them).
    #[serde(with = "crate::checkpoint::opt_boxed_array")]
    hist_sumsq: Option<Box<[f32; HISTORY]>>,
    pub last: LastWindow,
    /// Smoothed volume, to pick which series get gauges.
    pub volume: f32,
    /// Daily level against a long reference: slow drifts.
    pub trend: crate::trend::Trend,
    /// Gauge metrics: the fit of their windows' row extremes (`extreme.rs`).
    extremes: Option<Box<crate::extreme::Extremes>>,
    /// Hourly sums of the windows that left `hist` while the detector's evidence reaches back
    /// beyond it (sparse series take hours to detect): the onset is searched there too. None
    /// the rest of the time, so a quiet series pays 8 bytes for it.
    coarse: Option<Box<Coarse>>,
}

impl Series {
    /// Season buckets of the baseline that have learnt (they are allocated as they do).
    pub fn season_buckets(&self) -> usize {
        self.baseline.buckets_used()
    }

    fn hist_at(&self, w: i64, last_w: i64) -> Option<HistPoint> {
        if w > last_w || last_w - w >= HISTORY as i64 || w < self.first_window {
            return None;
        }
        let i = w.rem_euclid(HISTORY as i64) as usize;
        let h = self.hist[i];
        Some(HistPoint {
            num: h.num,
            den: h.den,
            sumsq: self.hist_sumsq.as_ref().map_or(0.0, |s| s[i]),
            exp: h.exp,
            sd: unpack_sd(h.sd),
        })
    }

    /// The last closed windows of this series (up to [`HISTORY`]), oldest first.
    pub fn history(&self, last_w: i64, window_ms: i64, z: f64) -> Vec<HistoryPoint> {
        let mut out = Vec::new();
        for w in (last_w - HISTORY as i64 + 1)..=last_w {
            if let Some(h) = self.hist_at(w, last_w) {
                let exp = (!h.exp.is_nan()).then_some(h.exp as f64);
                let sd = (!h.sd.is_nan()).then_some(h.sd as f64);
                out.push(HistoryPoint {
                    start_ms: w * window_ms,
                    observed: (h.den > 0.0).then(|| (h.num / h.den) as f64),
                    volume: h.den as f64,
                    expected: exp,
                    expected_low: exp.zip(sd).map(|(e, sd)| e - z * sd),
                    expected_high: exp.zip(sd).map(|(e, sd)| e + z * sd),
                });
            }
        }
        out
    }
}

/// One closed window of a series, for charts.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HistoryPoint {
    pub start_ms: i64,
    /// Observed rate; None when the window had no denominator.
    pub observed: Option<f64>,
    pub volume: f64,
    pub expected: Option<f64>,
    /// The 99% band of the window's rate under the baseline.
    pub expected_low: Option<f64>,
    pub expected_high: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentStatus {
    Firing,
    Resolved,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Incident {
    pub id: String,
    pub metric: String,
    /// The metric and series the incident is about; None for guards that are not a metric
    /// series (sample-ratio mismatch, sprawl, pressure).
    #[serde(skip)]
    pub metric_idx: Option<usize>,
    #[serde(skip)]
    pub series_idx: Option<usize>,
    /// Human label of the series (`country=FR`, `change_id=chg-1`).
    pub label: String,
    pub series: serde_json::Map<String, serde_json::Value>,
    pub status: IncidentStatus,
    #[serde(deserialize_with = "crate::checkpoint::de_static")]
    pub kind: crate::checkpoint::Label,
    /// Raised by one step when nobody decided in time.
    #[serde(deserialize_with = "crate::checkpoint::de_static")]
    pub severity: crate::checkpoint::Label,
    /// Owner of the metric and of the top candidate change, for routing.
    pub owner: Option<String>,
    pub change_owner: Option<String>,
    /// How the effect was established: `treatment_vs_holdout` or `observational` (against
    /// the seasonal forecast), when a change is blamed.
    #[serde(deserialize_with = "crate::checkpoint::de_static_opt")]
    pub comparison: Option<crate::checkpoint::Label>,
    /// The main evidence in one line (test statistic, intervals, split).
    pub evidence: Option<String>,
    /// The change's target metric improved while this one worsened.
    pub local_gain_global_loss: Option<serde_json::Value>,
    pub onset_ms: i64,
    /// The onset's confidence set (window starts, inclusive), for drops, spikes and shifts.
    pub onset_low_ms: Option<i64>,
    pub onset_high_ms: Option<i64>,
    /// Incidents with one cause share it: the same top candidate change, or without one, an
    /// overlapping onset set on nested series.
    pub group_id: String,
    pub detected_ms: i64,
    pub resolved_ms: Option<i64>,
    pub resolution: Option<String>,
    pub observed: f64,
    pub expected: f64,
    pub expected_low: f64,
    pub expected_high: f64,
    pub effect: f64,
    pub score: f64,
    /// Windows from onset to detection, and events read in them.
    pub delay_windows: i64,
    pub delay_events: f64,
    pub candidates: Vec<Candidate>,
    pub top_segments: Vec<TopSegment>,
    pub decision: Decision,
    pub rollback_id: Option<String>,
    /// Every audit record written about this incident, in order: the decision trail.
    pub trail: Vec<TrailEntry>,
    /// Event time until which escalation and re-notification are muted (`silence`).
    pub silenced_until_ms: Option<i64>,
    /// A data-quality incident that only reflects a tracking outage on another series of the
    /// same metric (e.g. the total, when one country's events stopped).
    #[serde(skip)]
    pub explained_by_outage: bool,
    /// Stage 2: its alert and records wait for answers from other owners.
    #[serde(skip)]
    pub held: Option<Box<Held>>,
    #[serde(skip)]
    recovery: Recovery,
}

/// What identifies an incident; [`Incident::blank`] fills the rest with "nothing known yet".
pub struct IncidentHead {
    pub id: String,
    pub metric: String,
    pub metric_idx: Option<usize>,
    pub series_idx: Option<usize>,
    pub label: String,
    pub series: serde_json::Map<String, serde_json::Value>,
    pub kind: &'static str,
    pub severity: &'static str,
    pub onset_ms: i64,
    pub detected_ms: i64,
}

impl Incident {
    /// A firing incident with no figures, candidates or decision yet.
    pub fn blank(h: IncidentHead) -> Incident {
        Incident {
            id: h.id,
            metric: h.metric,
            metric_idx: h.metric_idx,
            series_idx: h.series_idx,
            label: h.label,
            series: h.series,
            status: IncidentStatus::Firing,
            kind: h.kind,
            severity: h.severity,
            owner: None,
            change_owner: None,
            comparison: None,
            evidence: None,
            local_gain_global_loss: None,
            onset_ms: h.onset_ms,
            onset_low_ms: None,
            onset_high_ms: None,
            group_id: String::new(),
            detected_ms: h.detected_ms,
            resolved_ms: None,
            resolution: None,
            observed: 0.0,
            expected: 0.0,
            expected_low: 0.0,
            expected_high: 0.0,
            effect: 0.0,
            score: 0.0,
            delay_windows: 0,
            delay_events: 0.0,
            candidates: Vec::new(),
            top_segments: Vec::new(),
            decision: Decision::new(DecisionAction::NoCandidate, "no-candidate", String::new()),
            rollback_id: None,
            trail: Vec::new(),
            silenced_until_ms: None,
            explained_by_outage: false,
            held: None,
            recovery: Recovery::new(0.0),
        }
    }
}

/// One step of an incident's decision trail (mirrors its audit record).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TrailEntry {
    pub audit_id: String,
    pub at: String,
    #[serde(deserialize_with = "crate::checkpoint::de_static")]
    pub action: crate::checkpoint::Label,
    pub actor: Actor,
    pub change_id: Option<String>,
}

/// Plain counters, bumped on the hot path without atomics; telemetry folds them into
/// Prometheus once per batch.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub events: u64,
    pub accepted: u64,
    /// Inputs of the events topic (stage 2: of the repartition topic) dead-lettered, by code.
    pub rejected: [u64; ErrorCode::ALL.len()],
    /// Change records dead-lettered, by code.
    pub changes_rejected: [u64; ErrorCode::ALL.len()],
    pub unselected: u64,
    pub missing_value: u64,
    pub missing_user: u64,
    pub series_overflow: u64,
    /// Event times that jumped ahead of their partition's clock alone and were held.
    pub clock_jumps_held: u64,
    /// Events on surfaces not followed because `max_surfaces` were: sprawl, pressure.
    pub untracked_surfaces: [u64; 2],
    /// Changes forgotten to keep the registry within `policy.max_changes`.
    pub untracked_changes: u64,
    /// Stage 2: alerts published after `[scale] hold_max_secs` without an owner's answer.
    pub holds_expired: u64,
    pub windows_closed: u64,
    pub changes: u64,
    /// Changes by action: applied, rolled back, superseded.
    pub changes_by_action: [u64; 3],
    pub alerts_firing: u64,
    pub alerts_resolved: u64,
    pub rollbacks_requested: u64,
    pub rollbacks_confirmed: u64,
    /// Decisions by (action, tier) as labels.
    pub decisions: HashMap<(&'static str, &'static str), u64>,
    /// Incidents opened, by kind.
    pub incidents_by_kind: HashMap<&'static str, u64>,
    /// Calls by people: approve, veto, acknowledge, silence.
    pub human_calls: HashMap<&'static str, u64>,
    /// Event time from detection to a person's approve or veto, in seconds; drained by
    /// telemetry into a histogram.
    pub human_decision_secs: Vec<f64>,
    pub escalations: u64,
    pub breaker_trips: u64,
    /// Closed watches by verdict.
    pub guard_verdicts: HashMap<&'static str, u64>,
    /// Two-stage: the decider's answers, by verdict.
    pub decider_verdicts: HashMap<&'static str, u64>,
}

/// A partition stops holding the watermark back after this long without messages (wall time).
pub const SOURCE_IDLE_MS: i64 = 10_000;

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct SourceClock {
    source: i32,
    max_ts: i64,
    seen_ms: i64,
    /// Stage 2 only: stage 1's last word on whether this input partition is idle. Stage 2
    /// does not judge idleness by its own clock: markers stop during a rebalance, and the
    /// partition's windows must wait for its next reader then.
    idle: bool,
    /// An event time that jumped ahead of `max_ts` by more than the allowed lateness, with no
    /// ingestion time to vouch for it: it moves the clock only once the next event confirms
    /// it (a stream resuming after a gap), never alone (one fast clock).
    #[serde(default = "no_jump")]
    jump: i64,
}

fn no_jump() -> i64 {
    i64::MIN
}

/// How far an event's time may run ahead of the broker's receipt and still move event time:
/// the clocks of producers and brokers differ by that much without being wrong.
pub const INGEST_TOLERANCE_MS: i64 = 1_000;

/// Event times before 2000-01-01 are no product's events (a zero or year-0001 clock).
pub const MIN_PLAUSIBLE_TS: i64 = 946_684_800_000;

#[derive(serde::Serialize, serde::Deserialize)]
struct Dedup {
    cur: KeySet,
    prev: KeySet,
    gen_start: i64,
    span_ms: i64,
}

impl Dedup {
    /// True if `h` was seen within the horizon; records it otherwise.
    fn seen(&mut self, h: u64, ts: i64) -> bool {
        if ts - self.gen_start > self.span_ms {
            self.prev = std::mem::take(&mut self.cur);
            self.gen_start = ts;
        }
        if self.prev.contains(&h) {
            return true;
        }
        !self.cur.insert(h)
    }
}

/// Immutable after construction: what to read and how.
struct Schema {
    metrics: Vec<MetricDef>,
    routes: HashMap<String, Vec<Route>, FastState>,
    obj_dims: Vec<String>,
    window_ms: i64,
    lateness_ms: i64,
    skew_ms: i64,
    max_bytes: usize,
    max_series: usize,
    ring_slots: usize,
    dedup: bool,
    user_key: (u64, u64),
    series_key: (u64, u64),
    z99: f64,
    exposure_event: String,
    message_event: String,
    unsubscribe_event: String,
}

pub struct Engine {
    cfg: Config,
    schema: Schema,
    pub series: Vec<Series>,
    index: KeyMap<usize>,
    max_ts: Option<i64>,
    /// Per input partition: latest event time and the wall time it was last heard from. The
    /// watermark follows the slowest partition that is not idle, so a lagging partition's
    /// events are not declared late because another partition ran ahead.
    sources: Vec<SourceClock>,
    closed_upto: Option<i64>,
    pub incidents: Vec<Incident>,
    incident_ids: HashMap<String, usize>,
    pub registry: Registry,
    /// change id -> rollback request id, while waiting for confirmation.
    pending_rollbacks: HashMap<String, String>,
    emitted_rollbacks: HashSet<String>,
    /// Stage 2, on the owner of the decider partition: change id -> the incident whose
    /// rollback request it granted, until the change is rolled back.
    granted: HashMap<String, String>,
    /// Stage 2, on a metric's owner: each watch's effect on the metrics merged here, as of the
    /// windows it changed in (a short history), and other owners' questions about windows not
    /// closed here yet: their incidents' "local gain, global loss".
    gain_hist: Vec<stage::GainPoint>,
    gain_asks: Vec<stage::GainAsk>,
    /// Stage 2, on a change's owner: closed watches whose metrics' verdicts are still coming in.
    watch_reports: Vec<crate::guard::WatchReport>,
    outputs: Vec<Output>,
    pub stats: EngineStats,
    dedup: Dedup,
    audit_seq: u64,
    /// Something the API shows changed since the last `take_dirty`.
    dirty: bool,
    windows_since_view: u64,
    /// Changes from a file, applied in event-time order as events pass their timestamps.
    scheduled: std::collections::VecDeque<Change>,
    pub guards: Guards,
    sprawl: Option<Sprawl>,
    pressure: Option<Pressure>,
    /// Automatic rollbacks requested within the last hour of event time, with the surfaces of
    /// their changes, for the circuit breaker.
    auto_rollbacks: VecDeque<(i64, Vec<String>)>,
    /// Recent audit records, for the story of one change (`/api/changes/{id}/audit`).
    audit_log: VecDeque<AuditRecord>,
    /// Wall time of the last event read: when input stops, decision deadlines still come due.
    last_event_wall_ms: i64,
    /// Changes whose rollback a person vetoed (until they are applied again): the reason,
    /// cited in the decisions of later incidents blamed on them.
    vetoed: HashMap<String, String>,
    /// `share` metrics' series, their index by key, and category names per metric.
    pub shares: Vec<crate::share::ShareSeries>,
    share_index: KeyMap<usize>,
    share_cats: Vec<crate::share::Categories>,
    /// Which part of the pipeline this engine runs (from the configuration, not checkpointed).
    stage: Stage,
    /// Stage 2: the repartition partitions this instance owns.
    owned: Vec<i32>,
    /// Two stages: the repartition partition of each metric's series (derived from the names).
    metric_part: Vec<i32>,
    /// Stage 2: series taken over from another instance, and the first window this engine
    /// closes for them (the other closed those before).
    resume_at: HashMap<usize, i64>,
    /// Stage 2: metrics taken over from a checkpoint that had closed fewer windows than this
    /// engine, and the first window their series still have to close. Their partial sums from
    /// there on are read again (not refused as late), and those windows are closed for them
    /// alone, in order, before the next window: by then the taken-over partition's clocks,
    /// which hold the watermark, have passed them.
    behind: HashMap<usize, i64>,
}

/// Events expected in a window before their complete absence is read as a tracking outage
/// (P(0 | Poisson mean 20) = 2e-9).
pub const DQ_MIN_EXPECTED: f64 = 20.0;

/// Audit records kept in memory for the API (the audit topic keeps them all).
pub const AUDIT_LOG_MAX: usize = 50_000;

fn family_of(kind: MetricKind) -> Family {
    match kind {
        MetricKind::Ratio => Family::Binomial,
        MetricKind::Count | MetricKind::Distinct => Family::Poisson,
        MetricKind::Mean | MetricKind::Gauge | MetricKind::Share => Family::Gaussian,
    }
}

fn key_from(s: &str) -> (u64, u64) {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(s.as_bytes());
    (
        u64::from_le_bytes(d[0..8].try_into().unwrap()),
        u64::from_le_bytes(d[8..16].try_into().unwrap()),
    )
}

impl Engine {
    pub fn new(cfg: &Config) -> Result<Engine, EngineError> {
        let mut obj_dims: Vec<String> = Vec::new();
        let mut src_of = |name: &str, metric: &str| -> Result<DimSrc, EngineError> {
            Ok(match name {
                "surface" => DimSrc::Top(TopField::Surface),
                "variant" => DimSrc::Top(TopField::Variant),
                "change_id" => DimSrc::Top(TopField::ChangeId),
                "arm" => DimSrc::Top(TopField::Arm),
                other => {
                    let i = match obj_dims.iter().position(|d| d == other) {
                        Some(i) => i,
                        None => {
                            obj_dims.push(other.to_string());
                            obj_dims.len() - 1
                        }
                    };
                    if i >= MAX_OBJ_DIMS {
                        return Err(EngineError::TooManyDims {
                            metric: metric.to_string(),
                            count: i + 1,
                        });
                    }
                    DimSrc::Obj(i)
                }
            })
        };
        debug_assert!(TOP_LEVEL_DIMS.len() == 4);
        let mut metrics = Vec::new();
        let mut routes: HashMap<String, Vec<Route>, FastState> = HashMap::default();
        for (mi, m) in cfg.metrics().enumerate() {
            let share_of = match (&m.share_of, m.kind) {
                (Some(d), MetricKind::Share) => Some(src_of(d, &m.name)?),
                _ => None,
            };
            let dims = m
                .dims
                .iter()
                .map(|d| src_of(d, &m.name))
                .collect::<Result<Vec<_>, _>>()?;
            let mut add = |sel: &Selector, role: Role| -> Result<(), EngineError> {
                let filter = Filter {
                    surface: sel.surface.clone(),
                    name: sel.name.clone(),
                    dims: sel
                        .dims
                        .iter()
                        .map(|(k, v)| Ok((src_of(k, &m.name)?, v.clone())))
                        .collect::<Result<Vec<_>, EngineError>>()?,
                };
                routes
                    .entry(sel.event_type.clone())
                    .or_default()
                    .push(Route {
                        metric: mi,
                        role,
                        filter,
                    });
                Ok(())
            };
            add(&m.numerator, Role::Num)?;
            if let Some(d) = m.denominator.as_ref().or(m.exposure.as_ref()) {
                add(d, Role::Den)?;
            }
            metrics.push(MetricDef {
                family: family_of(m.kind),
                det: m.detection.resolve(&cfg.detection),
                dims,
                per_window: m.kind == MetricKind::Distinct
                    || (m.kind == MetricKind::Count && m.exposure.is_none()),
                total: None,
                series_count: 0,
                share_of,
                cfg: m.clone(),
            });
        }
        let e = &cfg.engine;
        let window_ms = e.window_secs as i64 * 1000;
        let lateness_ms = e.allowed_lateness_secs as i64 * 1000;
        let user_key = cfg
            .privacy
            .user_hash_key_env
            .as_ref()
            .and_then(|v| std::env::var(v).ok())
            .or_else(|| cfg.privacy.user_hash_key.clone())
            .map(|k| key_from(&k))
            .unwrap_or_else(|| (rand::random(), rand::random()));
        let schema = Schema {
            metrics,
            routes,
            obj_dims,
            window_ms,
            lateness_ms,
            skew_ms: e.max_future_skew_secs as i64 * 1000,
            max_bytes: e.max_event_bytes,
            max_series: e.max_series_per_metric,
            ring_slots: (lateness_ms / window_ms) as usize + 2,
            dedup: e.dedup_by_id,
            user_key,
            series_key: key_from("guardrail-series"),
            z99: Normal::new(0.0, 1.0).unwrap().inverse_cdf(0.995),
            exposure_event: cfg.guards.exposure_event.clone(),
            message_event: cfg.guards.pressure.message_event.clone(),
            unsubscribe_event: cfg.guards.pressure.unsubscribe_event.clone(),
        };
        let mut eng = Engine {
            cfg: cfg.clone(),
            schema,
            series: Vec::new(),
            index: KeyMap::default(),
            max_ts: None,
            sources: Vec::new(),
            closed_upto: None,
            incidents: Vec::new(),
            incident_ids: HashMap::new(),
            registry: Registry::default(),
            pending_rollbacks: HashMap::new(),
            emitted_rollbacks: HashSet::new(),
            granted: HashMap::new(),
            watch_reports: Vec::new(),
            gain_hist: Vec::new(),
            gain_asks: Vec::new(),
            outputs: Vec::new(),
            stats: EngineStats::default(),
            dedup: Dedup::empty(lateness_ms + window_ms),
            audit_seq: 0,
            dirty: false,
            windows_since_view: 0,
            scheduled: Default::default(),
            guards: Guards::default(),
            sprawl: cfg.guards.sprawl.enabled.then(|| {
                Sprawl::new(
                    cfg.guards.sprawl.window_secs as i64 * 1000,
                    cfg.guards.sprawl.max_variants_per_surface as usize,
                    cfg.guards.sprawl.max_surfaces,
                )
            }),
            pressure: cfg.guards.pressure.enabled.then(|| {
                Pressure::new(
                    cfg.guards.pressure.max_messages_per_user_day,
                    cfg.guards.pressure.min_users,
                    cfg.guards.pressure.max_surfaces,
                )
            }),
            auto_rollbacks: VecDeque::new(),
            audit_log: VecDeque::new(),
            vetoed: HashMap::new(),
            last_event_wall_ms: i64::MIN,
            shares: Vec::new(),
            share_index: KeyMap::default(),
            share_cats: vec![Default::default(); cfg.metrics.len()],
            stage: Stage::Single,
            owned: Vec::new(),
            metric_part: Vec::new(),
            resume_at: HashMap::new(),
            behind: HashMap::new(),
        };
        for mi in 0..eng.schema.metrics.len() {
            if eng.schema.metrics[mi].cfg.kind == MetricKind::Share {
                continue;
            }
            if eng.schema.metrics[mi].cfg.include_total || eng.schema.metrics[mi].dims.is_empty() {
                let si = eng.new_series(mi, Vec::new(), i64::MIN);
                eng.schema.metrics[mi].total = Some(si);
            }
        }
        Ok(eng)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn metrics(&self) -> &[MetricDef] {
        &self.schema.metrics
    }

    pub fn window_ms(&self) -> i64 {
        self.schema.window_ms
    }

    /// z of the 99% two-sided band used for `expected_low` / `expected_high`.
    pub fn band_z(&self) -> f64 {
        self.schema.z99
    }

    /// The watermark: windows ending at or before it are closed.
    pub fn watermark_ms(&self) -> Option<i64> {
        self.closed_upto.map(|c| c * self.schema.window_ms)
    }

    pub fn max_event_time_ms(&self) -> Option<i64> {
        self.max_ts
    }

    /// Index of the last closed window.
    pub fn last_closed_window(&self) -> Option<i64> {
        self.closed_upto.map(|c| c - 1)
    }

    pub fn take_outputs(&mut self) -> std::vec::Drain<'_, Output> {
        self.outputs.drain(..)
    }

    pub fn has_outputs(&self) -> bool {
        !self.outputs.is_empty()
    }

    /// True (once) if incidents, changes or series views changed since the last call.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Windows closed since the last call (to refresh gauges only when needed).
    pub fn take_windows_closed(&mut self) -> u64 {
        std::mem::take(&mut self.windows_since_view)
    }

    fn new_series(
        &mut self,
        metric: usize,
        dims: Vec<(String, String)>,
        first_window: i64,
    ) -> usize {
        // Totals do not count against max_series_per_metric (segments do).
        let s = make_series(&self.schema, metric, dims, first_window);
        push_series(&mut self.series, s)
    }

    /// Decodes and applies one event. `source` names it in dead letters; `now_ms` is the wall
    /// clock for the future-skew check.
    pub fn process_event(&mut self, bytes: &[u8], now_ms: i64) -> Result<(), Reject> {
        self.process_event_from(0, bytes, now_ms)
    }

    /// As [`Engine::process_event`], for an event read from input partition `source`.
    pub fn process_event_from(
        &mut self,
        source: i32,
        bytes: &[u8],
        now_ms: i64,
    ) -> Result<(), Reject> {
        self.process_event_ingested(source, bytes, now_ms, None)
    }

    /// As [`Engine::process_event_from`], for an event the broker received at `ingest_ms`
    /// (the record's timestamp): event time is trusted up to that, so devices with fast
    /// clocks cannot move the watermark past what has arrived, and the future is judged
    /// against it as well as against the wall clock.
    pub fn process_event_ingested(
        &mut self,
        source: i32,
        bytes: &[u8],
        now_ms: i64,
        ingest_ms: Option<i64>,
    ) -> Result<(), Reject> {
        self.stats.events += 1;
        self.last_event_wall_ms = now_ms;
        let r = self.process_event_inner(source, bytes, now_ms, ingest_ms);
        match &r {
            Ok(()) => self.stats.accepted += 1,
            Err(e) => self.stats.rejected[e.code.index()] += 1,
        }
        r
    }

    fn process_event_inner(
        &mut self,
        source: i32,
        bytes: &[u8],
        now_ms: i64,
        ingest_ms: Option<i64>,
    ) -> Result<(), Reject> {
        let ev = decode_event(bytes, self.schema.max_bytes)?;
        while self
            .scheduled
            .front()
            .map(|c| c.ts <= ev.ts_ms)
            .unwrap_or(false)
        {
            let c = self.scheduled.pop_front().expect("front exists");
            self.apply_change(&c);
        }
        let sc = &self.schema;
        if ev.ts_ms < MIN_PLAUSIBLE_TS {
            return Err(Reject::new(
                ErrorCode::BadTimestamp,
                format!(
                    "ts {} is before 2000-01-01: not a plausible event time",
                    fmt_time(ev.ts_ms)
                ),
            ));
        }
        let (clock, which) = match ingest_ms.filter(|&i| i < now_ms) {
            Some(i) => (i, "the time the broker received it"),
            None => (now_ms, "the clock"),
        };
        if ev.ts_ms > clock + sc.skew_ms {
            return Err(Reject::new(
                ErrorCode::FutureTimestamp,
                format!(
                    "ts {} is {} ahead of {which} (limit {} s)",
                    fmt_time(ev.ts_ms),
                    human_duration(ev.ts_ms - clock),
                    sc.skew_ms / 1000
                ),
            ));
        }
        let w = ev.ts_ms.div_euclid(sc.window_ms);
        if let Some(c) = self.closed_upto {
            if w < c {
                return Err(Reject::new(
                    ErrorCode::TooLate,
                    format!(
                        "ts {} falls in a closed window (watermark {}); allowed lateness is {} s",
                        fmt_time(ev.ts_ms),
                        fmt_time(c * sc.window_ms),
                        sc.lateness_ms / 1000
                    ),
                ));
            }
        }
        if sc.dedup {
            if let Some(id) = &ev.id {
                let mut h = SipHasher13::new_with_keys(sc.series_key.0, sc.series_key.1);
                h.write(id.as_bytes());
                if self.dedup.seen(h.finish(), ev.ts_ms) {
                    return Err(Reject::new(
                        ErrorCode::Duplicate,
                        format!(
                            "duplicate event id {:?}",
                            id.chars().take(64).collect::<String>()
                        ),
                    ));
                }
            }
        }
        self.apply(&ev, w);
        let trusted = match ingest_ms {
            Some(i) => Some(ev.ts_ms.min(i.saturating_add(INGEST_TOLERANCE_MS))),
            None => self.confirmed(source, ev.ts_ms),
        };
        if let Some(t) = trusted {
            self.advance(source, t, now_ms);
        }
        Ok(())
    }

    /// `ts` if it may move `source`'s clock: at most the allowed lateness ahead of it, or
    /// confirmed by the event before (both ahead). A lone event far ahead is counted in its
    /// window but held, so one fast clock cannot declare the rest of the stream late.
    fn confirmed(&mut self, source: i32, ts: i64) -> Option<i64> {
        let lateness = self.schema.lateness_ms;
        let Some(c) = self.sources.iter_mut().find(|c| c.source == source) else {
            return Some(ts);
        };
        if c.max_ts == i64::MIN || ts <= c.max_ts.saturating_add(lateness) {
            c.jump = i64::MIN;
            return Some(ts);
        }
        if c.jump != i64::MIN && ts >= c.jump.saturating_sub(lateness) {
            let t = ts.min(c.jump);
            c.jump = i64::MIN;
            return Some(t);
        }
        self.stats.clock_jumps_held += 1;
        c.jump = ts;
        None
    }

    fn apply(&mut self, ev: &Event<'_>, w: i64) {
        let Engine {
            schema: sc,
            series,
            index,
            stats,
            guards,
            sprawl,
            pressure,
            shares,
            share_index,
            share_cats,
            stage,
            ..
        } = self;
        let aggregate = matches!(stage, Stage::Aggregate { .. });
        let (sk, uk) = (sc.series_key, sc.user_key);
        let keyed = |s: &str| {
            let mut h = SipHasher13::new_with_keys(sk.0, sk.1);
            h.write(s.as_bytes());
            h.finish()
        };
        let user_of = |u: &str| {
            let mut h = SipHasher13::new_with_keys(uk.0, uk.1);
            h.write(u.as_bytes());
            h.finish()
        };
        // The watch on the change this event is exposed to, and its arm.
        let arm = match (&ev.change_id, &ev.arm) {
            (Some(c), Some(a)) if aggregate => {
                crate::guard::arm_index(a).map(|a| (guards.tally(c, sc.metrics.len()), a))
            }
            (Some(c), Some(a)) if !guards.open.is_empty() => {
                guards.lookup(c).zip(crate::guard::arm_index(a))
            }
            _ => None,
        };
        if let Some((gi, a)) = arm {
            if ev.ty.as_ref() == sc.exposure_event.as_str() {
                guards.all[gi].exposure[a] += 1.0;
            }
        }
        if let (Some(sp), Some(surface), Some(variant)) =
            (sprawl.as_mut(), &ev.surface, &ev.variant)
        {
            if !sp.observe(keyed(surface), surface, keyed(variant), ev.ts_ms) {
                stats.untracked_surfaces[0] += 1;
            }
        }
        if let Some(p) = pressure.as_mut() {
            let surface = ev.surface.as_deref().unwrap_or(MISSING_DIM);
            let tracked = if ev.ty.as_ref() == sc.message_event.as_str() {
                match &ev.user {
                    Some(u) => p.message(keyed(surface), surface, user_of(u), ev.ts_ms),
                    None => true,
                }
            } else if ev.ty.as_ref() == sc.unsubscribe_event.as_str() {
                p.unsubscribe(keyed(surface), surface, ev.ts_ms)
            } else {
                true
            };
            if !tracked {
                stats.untracked_surfaces[1] += 1;
            }
        }
        let Some(routes) = sc.routes.get(ev.ty.as_ref()) else {
            stats.unselected += 1;
            return;
        };
        let mut vals: [Option<Cow<'_, str>>; MAX_OBJ_DIMS] = Default::default();
        if !sc.obj_dims.is_empty() {
            ev.scan_dims(&sc.obj_dims, &mut vals);
        }
        let get = |src: DimSrc| -> Option<&str> {
            match src {
                DimSrc::Top(TopField::Surface) => ev.surface.as_deref(),
                DimSrc::Top(TopField::Variant) => ev.variant.as_deref(),
                DimSrc::Top(TopField::ChangeId) => ev.change_id.as_deref(),
                DimSrc::Top(TopField::Arm) => ev.arm.as_deref(),
                DimSrc::Obj(i) => vals[i].as_deref(),
            }
        };
        let mut user_hash: Option<u64> = None;
        let mut any = false;
        for r in routes {
            let f = &r.filter;
            if let Some(s) = &f.surface {
                if ev.surface.as_deref() != Some(s.as_str()) {
                    continue;
                }
            }
            if let Some(n) = &f.name {
                if ev.name.as_deref() != Some(n.as_str()) {
                    continue;
                }
            }
            if !f.dims.iter().all(|(src, v)| get(*src) == Some(v.as_str())) {
                continue;
            }
            let m = &sc.metrics[r.metric];
            // Selected: from here on it is either aggregated or counted as incomplete.
            any = true;
            if let Some(src) = m.share_of {
                let cat = share_cats[r.metric].index(get(src).unwrap_or(MISSING_DIM));
                let mut add_share = |key: u64, dims: &dyn Fn() -> Vec<(String, String)>| {
                    let i = match share_index.get(&key) {
                        Some(&i) => i,
                        None => {
                            if shares.iter().filter(|x| x.metric == r.metric).count()
                                >= sc.max_series
                            {
                                stats.series_overflow += 1;
                                return;
                            }
                            shares.push(crate::share::ShareSeries::new(
                                r.metric,
                                dims(),
                                m.det.baseline_half_life_windows * 12.0,
                            ));
                            share_index.insert(key, shares.len() - 1);
                            shares.len() - 1
                        }
                    };
                    shares[i].add(w, cat);
                };
                let mut h = SipHasher13::new_with_keys(sk.0, sk.1);
                h.write_usize(r.metric);
                h.write_u8(0xfe);
                if m.cfg.include_total || m.dims.is_empty() {
                    add_share(h.finish(), &Vec::new);
                }
                if !m.dims.is_empty() {
                    for d in &m.dims {
                        h.write(get(*d).unwrap_or(MISSING_DIM).as_bytes());
                        h.write_u8(0xff);
                    }
                    add_share(h.finish(), &|| {
                        m.cfg
                            .dims
                            .iter()
                            .zip(&m.dims)
                            .map(|(n, d)| (n.clone(), get(*d).unwrap_or(MISSING_DIM).to_string()))
                            .collect()
                    });
                }
                continue;
            }
            // What this event adds to the window.
            let (dn, dd, dsq, user) = match (m.cfg.kind, r.role) {
                (MetricKind::Mean | MetricKind::Gauge | MetricKind::Share, Role::Num) => {
                    match ev.value {
                        Some(v) => (v, 1.0, v * v, None),
                        None => {
                            stats.missing_value += 1;
                            continue;
                        }
                    }
                }
                (MetricKind::Distinct, Role::Num) => match &ev.user {
                    Some(u) => {
                        let h = *user_hash.get_or_insert_with(|| user_of(u));
                        (0.0, 0.0, 0.0, Some(h))
                    }
                    None => {
                        stats.missing_user += 1;
                        continue;
                    }
                },
                (_, Role::Num) => (1.0, 0.0, 0.0, None),
                (_, Role::Den) => (0.0, 1.0, 0.0, None),
            };
            if let (Some((gi, a)), None) = (arm, user) {
                let x = &mut guards.all[gi].metrics[r.metric].arms[a];
                x.num += dn;
                x.den += dd;
                x.sumsq += dsq;
            }
            let gauge = m.cfg.kind == MetricKind::Gauge;
            let add = |s: &mut Series| {
                let a = s.ring.slot(w);
                a.num += dn;
                a.den += dd;
                a.sumsq += dsq;
                if gauge {
                    a.extremes(dn);
                }
                if let Some(h) = user {
                    s.ring.add_user(w, h);
                }
            };
            if let Some(t) = m.total {
                add(&mut series[t]);
            }
            if m.dims.is_empty() {
                continue;
            }
            let mut h = SipHasher13::new_with_keys(sc.series_key.0, sc.series_key.1);
            h.write_usize(r.metric);
            for d in &m.dims {
                h.write(get(*d).unwrap_or(MISSING_DIM).as_bytes());
                h.write_u8(0xff);
            }
            let key = h.finish();
            let si = match index.get(&key) {
                Some(&si) => si,
                None => {
                    if m.series_count >= sc.max_series {
                        stats.series_overflow += 1;
                        continue;
                    }
                    let dims: Vec<(String, String)> = m
                        .cfg
                        .dims
                        .iter()
                        .zip(&m.dims)
                        .map(|(n, d)| (n.clone(), get(*d).unwrap_or(MISSING_DIM).to_string()))
                        .collect();
                    let s = make_series(sc, r.metric, dims, w);
                    let si = push_series(series, s);
                    index.insert(key, si);
                    sc.metrics[r.metric].series_count += 1;
                    si
                }
            };
            let s = &mut series[si];
            if w < s.first_window {
                s.first_window = w;
            }
            add(s);
        }
        if !any {
            stats.unselected += 1;
        }
    }

    /// Moves event time forward and closes the windows the watermark has passed. The watermark
    /// is the minimum over active partitions of their latest event time, minus the lateness.
    fn advance(&mut self, source: i32, ts: i64, now_ms: i64) {
        self.advance_at(source, Some(ts), now_ms, None, now_ms)
    }

    /// As `advance`, for a source last heard from at `heard_ms`. Stage 2 (`idle` given): a
    /// marker relays when stage 1 last read the input partition and whether it is idle;
    /// `ts` None when stage 1 has read nothing from it yet.
    fn advance_at(
        &mut self,
        source: i32,
        ts: Option<i64>,
        heard_ms: i64,
        idle: Option<bool>,
        now_ms: i64,
    ) {
        let clock = match self.sources.iter_mut().find(|c| c.source == source) {
            Some(c) => c,
            None => {
                self.sources.push(SourceClock {
                    source,
                    max_ts: i64::MIN,
                    seen_ms: heard_ms,
                    idle: false,
                    jump: i64::MIN,
                });
                self.sources.last_mut().expect("just pushed")
            }
        };
        clock.seen_ms = clock.seen_ms.max(heard_ms);
        let was_idle = std::mem::replace(&mut clock.idle, idle.unwrap_or(false));
        let raised = ts.is_some_and(|t| t > clock.max_ts);
        if let (true, Some(t)) = (raised, ts) {
            clock.max_ts = t;
        }
        if let Some(t) = ts.filter(|t| self.max_ts.map(|m| *t > m).unwrap_or(true)) {
            self.max_ts = Some(t);
        }
        if matches!(self.stage, Stage::Aggregate { .. }) {
            // Stage 1 closes nothing: its clocks travel to stage 2 as markers.
            return;
        }
        let released = idle == Some(true) && !was_idle;
        if !raised && !released && self.closed_upto.is_some() {
            return;
        }
        let merge = matches!(self.stage, Stage::Merge { .. });
        let idle_before = now_ms - SOURCE_IDLE_MS;
        let mut slowest = i64::MAX;
        for c in self.sources.iter().filter(|c| {
            if merge {
                !c.idle
            } else {
                c.seen_ms >= idle_before
            }
        }) {
            if c.max_ts == i64::MIN {
                // An assigned partition not heard from yet holds event time still.
                return;
            }
            slowest = slowest.min(c.max_ts);
        }
        if slowest == i64::MAX {
            // Every partition idle: event time is the latest any of them delivered.
            match ts.or(self.max_ts) {
                Some(t) => slowest = t,
                None => return,
            }
        }
        let target = (slowest - self.schema.lateness_ms).div_euclid(self.schema.window_ms);
        if self.closed_upto.map(|c| target > c).unwrap_or(true) {
            self.close_until(target);
        }
    }

    /// Registers assigned partitions: each holds the watermark back until it delivers an event
    /// or stays silent for [`SOURCE_IDLE_MS`], so a partition read late after a (re)start does
    /// not find its events declared late.
    pub fn assign_sources(&mut self, sources: &[i32], now_ms: i64) {
        for &source in sources {
            // Known (restored from a checkpoint, or assigned again): it was heard from before
            // this process or this assignment, so it counts as heard from now, or it would
            // look idle and let the other partitions run the watermark past it.
            if let Some(c) = self.sources.iter_mut().find(|c| c.source == source) {
                c.seen_ms = now_ms;
                // Stage 2: idle again only on the word of whoever reads it now.
                c.idle = false;
            } else {
                self.sources.push(SourceClock {
                    source,
                    max_ts: i64::MIN,
                    seen_ms: now_ms,
                    idle: false,
                    jump: i64::MIN,
                });
            }
        }
    }

    /// Entries held per bounded map, for `guardrail_tracked_entries{map}`.
    pub fn tracked_entries(&self) -> [(&'static str, usize); 5] {
        [
            ("series", self.series.len()),
            ("incidents", self.incidents.len()),
            ("changes", self.registry.len()),
            (
                "sprawl_surfaces",
                self.sprawl.as_ref().map_or(0, |s| s.surfaces.len()),
            ),
            (
                "pressure_surfaces",
                self.pressure.as_ref().map_or(0, |p| p.surfaces.len()),
            ),
        ]
    }

    /// Forgets a partition's clock (it was revoked), so it no longer holds the watermark back.
    pub fn forget_source(&mut self, source: i32) {
        self.sources.retain(|c| c.source != source);
    }

    /// Closes every window with index < `target`.
    fn close_until(&mut self, target: i64) {
        let mut c = match self.closed_upto {
            Some(c) => c,
            None => {
                // The first watermark. Windows before it that already hold data are closed
                // too: stage 2 hears its last clock only after partial sums for earlier
                // windows have arrived on the partitions heard first, and skipping them
                // would lose those windows (and delay the warm-up by as many).
                let earliest = self
                    .series
                    .iter()
                    .map(|s| s.first_window)
                    .filter(|&f| f != i64::MIN)
                    .min();
                for s in self.series.iter_mut() {
                    if s.first_window == i64::MIN {
                        s.first_window = target;
                    }
                }
                match earliest {
                    Some(f) if f < target => f,
                    _ => {
                        self.closed_upto = Some(target);
                        return;
                    }
                }
            }
        };
        // A gap longer than two weeks is skipped rather than closed window by window.
        let max_gap = 2 * 7 * 86_400_000 / self.schema.window_ms;
        if target - c > max_gap {
            tracing::warn!(
                from = %fmt_time(c * self.schema.window_ms),
                to = %fmt_time(target * self.schema.window_ms),
                "event time jumped by more than two weeks; skipping the empty windows"
            );
            c = target - max_gap;
        }
        if c < target && !self.behind.is_empty() {
            self.catch_up(c);
        }
        while c < target {
            self.close_window(c);
            c += 1;
            self.closed_upto = Some(c);
        }
    }

    /// Closes all windows that end at or before the latest event (end of a replay): the
    /// lateness no longer matters because no more events will come.
    pub fn finish(&mut self) {
        while let Some(c) = self.scheduled.pop_front() {
            self.apply_change(&c);
        }
        // The stream has ended: a jump held for confirmation was its last word.
        let held: Vec<(i32, i64)> = self
            .sources
            .iter()
            .filter(|c| c.jump != i64::MIN)
            .map(|c| (c.source, c.jump))
            .collect();
        for (source, t) in held {
            self.advance(source, t, self.last_event_wall_ms);
        }
        if let Some(t) = self.max_ts {
            let target = t.div_euclid(self.schema.window_ms);
            self.close_until(target);
        }
    }

    /// Stage 2: closes the windows before `upto` that metrics taken over behind this engine
    /// still have open, for those metrics only (see `behind`).
    fn catch_up(&mut self, upto: i64) {
        let behind = std::mem::take(&mut self.behind);
        let Some(from) = behind.values().copied().min() else {
            return;
        };
        tracing::info!(
            metrics = behind.len(),
            from = %fmt_time(from * self.schema.window_ms),
            windows = upto - from,
            "closing the windows taken-over metrics had still open"
        );
        tracing::debug!(
            clocks = ?self
                .sources
                .iter()
                .map(|c| (c.source >> 16, c.source & 0xffff, c.max_ts, c.idle))
                .collect::<Vec<_>>(),
            "the clocks that let the watermark past the taken-over windows"
        );
        for w in from..upto {
            let only: Vec<bool> = (0..self.schema.metrics.len())
                .map(|mi| behind.get(&mi).is_some_and(|&f| f <= w))
                .collect();
            self.close_window_for(w, Some(&only));
        }
    }

    fn close_window(&mut self, w: i64) {
        self.close_window_for(w, None);
    }

    /// Closes window `w` for every series, or (`only`) for the series of some metrics, whose
    /// window it is later than the others': the rest of the engine closed it already.
    fn close_window_for(&mut self, w: i64, only: Option<&[bool]>) {
        let start = w * self.schema.window_ms;
        let mut alarms: Vec<(usize, Alarm, Expect)> = Vec::new();
        let mut resolutions: Vec<(usize, &'static str)> = Vec::new();
        // Series whose events stopped arriving: (series, what stopped, expected per window).
        let mut outages: Vec<(usize, &'static str, f64)> = Vec::new();
        // Slow drifts found at the end of a day, and drift incidents that ended.
        let mut drifts: Vec<(usize, crate::trend::DriftAlarm)> = Vec::new();
        let mut drift_ends: Vec<(usize, bool)> = Vec::new();
        if only.is_none() {
            self.stats.windows_closed += 1;
            self.windows_since_view += 1;
        }
        // The API's view (watermark, series histories) moves with every closed window.
        self.dirty = true;
        for si in 0..self.series.len() {
            if self.foreign(si, false) {
                continue;
            }
            if only.is_some_and(|o| !o[self.series[si].metric]) {
                continue;
            }
            if !self.resume_at.is_empty() {
                match self.resume_at.get(&si) {
                    Some(&c) if w < c => continue,
                    Some(_) => {
                        self.resume_at.remove(&si);
                    }
                    None => {}
                }
            }
            let s = &mut self.series[si];
            if s.first_window == i64::MIN {
                s.first_window = w;
            }
            if w < s.first_window {
                continue;
            }
            let m = &self.schema.metrics[s.metric];
            let (agg, distinct) = s.ring.take(w);
            let mut obs = agg.obs();
            if m.per_window {
                if let Some(d) = distinct {
                    obs.num = d;
                }
                obs.den = 1.0;
            }
            if m.cfg.kind == MetricKind::Gauge && obs.den > 0.0 {
                // One observation per window: its mean.
                let x = obs.num / obs.den;
                obs = Obs {
                    num: x,
                    den: 1.0,
                    sumsq: x * x,
                };
            }
            let e = s.baseline.expect(start);
            let volume = match (m.per_window, e) {
                (true, Some(e)) => e.rate,
                (true, None) => obs.num,
                (false, _) => obs.den,
            };
            let volume_before = s.volume as f64;
            // The daily level learns only windows no incident claims.
            let quiet = s.incident.is_none();
            if let Some(a) = s.trend.window(
                start,
                start + self.schema.window_ms,
                obs.num,
                obs.den,
                quiet,
            ) {
                drifts.push((si, a));
            }
            if let Some(ti) = s.trend.incident {
                if s.trend.recovered() {
                    drift_ends.push((si, false));
                } else if start + self.schema.window_ms - self.incidents[ti].onset_ms
                    > (m.det.incident_max_secs as i64 * 1000).max(7 * 86_400_000)
                {
                    drift_ends.push((si, true));
                }
            }
            s.volume = 0.9 * s.volume + 0.1 * volume as f32;
            keep_coarse(s, m.family, w);
            let hi = w.rem_euclid(HISTORY as i64) as usize;
            s.hist[hi] = HistEntry {
                num: obs.num as f32,
                den: obs.den as f32,
                exp: e.map(|e| e.rate as f32).unwrap_or(f32::NAN),
                sd: pack_sd(
                    e.map(|e| e.rate_variance(m.family, obs.den.max(1e-9)).sqrt() as f32)
                        .unwrap_or(f32::NAN),
                ),
            };
            if let Some(sq) = s.hist_sumsq.as_mut() {
                sq[hi] = obs.sumsq as f32;
            }
            let observed = if obs.den > 0.0 {
                obs.num / obs.den
            } else {
                f64::NAN
            };
            let mut score = 0.0;
            let mut learn = false;
            // A tracking outage: what the metric reads stopped arriving while it was expected in
            // numbers that make zero impossible by chance. It is a data-quality incident, not a
            // business drop, and the window is neither tested nor learnt.
            let outage = match e {
                Some(e) if s.baseline.learnt() >= m.det.warmup_windows => {
                    if !m.per_window && obs.den == 0.0 && volume_before >= DQ_MIN_EXPECTED {
                        Some(("denominator", volume_before))
                    } else if m.family != Family::Gaussian
                        && obs.num == 0.0
                        && e.rate * obs.den.max(m.per_window as u8 as f64) >= DQ_MIN_EXPECTED
                        && (m.per_window || obs.den >= m.det.min_volume_per_window)
                    {
                        Some(("numerator", e.rate * obs.den.max(1.0)))
                    } else {
                        None
                    }
                }
                _ => None,
            };
            let in_dq = s
                .incident
                .map(|i| self.incidents[i].kind == "data_quality")
                .unwrap_or(false);
            if in_dq {
                let inc = &self.incidents[s.incident.expect("in an incident")];
                let cleared = if inc.explained_by_outage {
                    // A consequence of an outage elsewhere in the metric: ends with it.
                    !self.incidents.iter().any(|i| {
                        i.status == IncidentStatus::Firing
                            && i.kind == "data_quality"
                            && !i.explained_by_outage
                            && i.metric_idx == Some(s.metric)
                    })
                } else {
                    outage.is_none() && (obs.den > 0.0 || m.per_window)
                };
                if cleared {
                    resolutions.push((si, "restored"));
                }
                score = 1.0;
            } else if let Some((what, expected)) = outage {
                if s.incident.is_none() {
                    outages.push((si, what, expected));
                }
                score = 1.0;
            } else if let Some(inc) = s.incident {
                // Frozen baseline: test for recovery against it, never learn.
                let inc_ref = &mut self.incidents[inc];
                if let Some(e) = e {
                    if volume >= m.det.min_volume_per_window
                        && inc_ref.recovery.step(m.family, &obs, &e)
                    {
                        resolutions.push((si, "recovered"));
                    } else if start + self.schema.window_ms - inc_ref.onset_ms
                        > m.det.incident_max_secs as i64 * 1000
                    {
                        resolutions.push((si, "expired"));
                    }
                }
                score = 1.0;
            } else {
                let warm = s.baseline.learnt() >= m.det.warmup_windows;
                learn = true;
                if let (Some(e), true) = (e, warm) {
                    // Every window with volume is tested: a thin window's likelihood ratio is
                    // small by itself, so sparse series accumulate evidence across windows.
                    if volume >= m.det.min_volume_per_window && obs.den > 0.0 {
                        let st = s.detector.step(w, &obs, &e);
                        score = st.score;
                        if let Some(a) = st.alarm {
                            alarms.push((si, a, e));
                            learn = false;
                        } else if let Some(a) =
                            extreme_alarm(m, s, w, &agg, &obs, &e, self.schema.window_ms)
                        {
                            score = score.max(a.statistic.min(2.0));
                            alarms.push((si, a, e));
                            learn = false;
                        } else if st.suspicious {
                            learn = false;
                        }
                    }
                }
            }
            // The baseline learns a window only once it is LEARN_LAG windows old and no
            // incident has claimed it, so a fresh anomaly is detected against a baseline that
            // has not seen it (in particular a season bucket seen for the first time). A gauge
            // learns every window GAUGE_LEARN_LAG old, through incidents too: its updates are
            // clipped at 3 sd, so a spike moves it little, while a recurring pattern (a daily
            // burst) or a new regime is learnt instead of staying an incident, and its spread
            // includes the volatile windows a quiet-only estimate would leave out.
            tracing::trace!(
                target: "guardrail::window",
                metric = %m.cfg.name, dims = ?s.dims, w, num = obs.num, den = obs.den,
                expected = e.map(|e| e.rate).unwrap_or(f64::NAN), learnt = s.baseline.learnt(),
                score, learn, incident = s.incident.is_some(), first = s.first_window,
                learn_from = s.learn_from, stage = ?self.stage,
                "window closed for a series"
            );
            let gauge = m.cfg.kind == MetricKind::Gauge;
            // A gauge's row extremes are learnt from every window it tests or could test
            // (after the one-window test above, so a window is tested against its past only).
            if let (Some(x), Some(e), false) = (s.extremes.as_mut(), e, in_dq || outage.is_some()) {
                x.learn(
                    agg.max as f64,
                    agg.min as f64,
                    e.rate,
                    s.baseline.alpha_min(),
                );
            }
            let lw = w - if gauge { GAUGE_LEARN_LAG } else { LEARN_LAG };
            if (learn || gauge) && lw >= s.first_window && (gauge || lw >= s.learn_from) {
                if let Some(h) = s.hist_at(lw, w) {
                    let o = Obs {
                        num: h.num as f64,
                        den: h.den as f64,
                        sumsq: h.sumsq as f64,
                    };
                    s.baseline.learn(lw * self.schema.window_ms, o);
                }
            }
            s.last = match e {
                Some(e) => {
                    let sd = e.rate_variance(m.family, obs.den.max(1e-9)).sqrt();
                    LastWindow {
                        window_start_ms: start,
                        observed,
                        expected: e.rate,
                        expected_low: e.rate - self.schema.z99 * sd,
                        expected_high: e.rate + self.schema.z99 * sd,
                        volume,
                        score,
                    }
                }
                None => LastWindow {
                    window_start_ms: start,
                    observed,
                    expected: f64::NAN,
                    expected_low: f64::NAN,
                    expected_high: f64::NAN,
                    volume,
                    score,
                },
            };
        }
        for (si, how) in resolutions {
            self.resolve(si, w, how);
        }
        for (si, what, expected) in outages {
            self.open_outage(si, w, what, expected);
        }
        for (si, expired) in drift_ends {
            self.end_drift(si, w, expired);
        }
        for (si, a) in drifts {
            self.open_drift(si, w, a);
        }
        for (si, a, e) in alarms {
            self.open_incident(si, w, a, e);
        }
        let end = (w + 1) * self.schema.window_ms;
        self.close_shares(w, only);
        let watched = self.close_guards(w, only);
        if only.is_some() {
            // What follows reads the whole engine, which has passed this window already.
            return;
        }
        self.note_gains(w, &watched);
        self.check_sprawl(end);
        self.check_pressure(end);
        self.run_deadlines(end);
    }

    /// (num - expected) summed over windows [from, to] of a series' history.
    fn excess(&self, si: usize, from: i64, to: i64) -> Option<f64> {
        let s = &self.series[si];
        let mut d = 0.0;
        let mut any = false;
        for w in from.max(to - HISTORY as i64 + 1)..=to {
            if let Some(h) = s.hist_at(w, to) {
                if !h.exp.is_nan() {
                    d += h.num as f64 - h.exp as f64 * h.den as f64;
                    any = true;
                }
            }
        }
        any.then_some(d)
    }

    fn top_segments(&self, si: usize, from: i64, to: i64) -> Vec<TopSegment> {
        let s = &self.series[si];
        let m = &self.schema.metrics[s.metric];
        let dims_json = |d: &[(String, String)]| {
            d.iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect::<serde_json::Map<_, _>>()
        };
        let total_delta = m.total.and_then(|t| self.excess(t, from, to));
        if !s.dims.is_empty() {
            let own = self.excess(si, from, to).unwrap_or(0.0);
            let contribution = match total_delta {
                Some(t) if t.abs() > 1e-9 => own / t,
                _ => 1.0,
            };
            return vec![TopSegment {
                dims: dims_json(&s.dims),
                contribution: round3(contribution),
            }];
        }
        let Some(total) = total_delta.filter(|t| t.abs() > 1e-9) else {
            return Vec::new();
        };
        let mut segs: Vec<(f64, usize)> = self
            .series
            .iter()
            .enumerate()
            .filter(|(_, x)| x.metric == s.metric && !x.dims.is_empty())
            .filter_map(|(i, _)| self.excess(i, from, to).map(|d| (d / total, i)))
            .filter(|(c, _)| *c > 0.0)
            .collect();
        segs.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
        segs.truncate(5);
        segs.into_iter()
            .map(|(c, i)| TopSegment {
                dims: dims_json(&self.series[i].dims),
                contribution: round3(c),
            })
            .collect()
    }

    /// The onset of an alarm on series `si` at window `w`: profile likelihood over the coarse
    /// and per-window history since the series last left an incident.
    fn estimate_onset(&self, si: usize, w: i64, a: &Alarm, e: &Expect) -> Option<Onset> {
        let s = &self.series[si];
        let m = &self.schema.metrics[s.metric];
        let from = s.first_window.max(s.learn_from);
        let fine_from = (w - HISTORY as i64 + 1).max(from);
        let mut spans = match &s.coarse {
            Some(c) if c.next_window() == fine_from => c.spans(from),
            _ => Vec::new(),
        };
        for k in fine_from..=w {
            if let Some(h) = s.hist_at(k, w) {
                spans.push(Span {
                    first_window: k,
                    windows: 1,
                    stat: suff_of(m.family, &h).unwrap_or_default(),
                });
            }
        }
        let model = match m.family {
            Family::Gaussian => Model::Mean { scale: 1.0 },
            Family::Binomial => Model::Rate {
                scale: e.phi * (1.0 - e.rate).max(1e-6),
            },
            Family::Poisson => Model::Rate { scale: e.phi },
        };
        let ramps = crate::onset::ramp_windows(self.schema.window_ms);
        crate::onset::estimate(&spans, model, a.side, crate::onset::COVERAGE, &ramps)
    }

    /// What attribution needs of an incident on a series with `dims`, with the configured
    /// lookback and clock skew.
    fn attribution_query<'a>(
        &self,
        dims: &'a [(String, String)],
        surface: Option<&'a str>,
        timing: Timing<'a>,
        onset_ms: i64,
    ) -> Query<'a> {
        Query {
            dims,
            surface,
            timing,
            onset_ms,
            window_ms: self.schema.window_ms,
            lookback_ms: self.cfg.policy.candidate_lookback_secs as i64 * 1000,
            skew_ms: self.cfg.attribution.clock_skew_secs as i64 * 1000,
        }
    }

    /// Candidates for an incident known by a point onset (drifts, guard findings).
    pub(super) fn point_candidates(
        &self,
        dims: &[(String, String)],
        surface: Option<&str>,
        onset_ms: i64,
    ) -> Vec<Candidate> {
        let timing = Timing::Point { onset_ms };
        self.registry
            .candidates(&self.attribution_query(dims, surface, timing, onset_ms))
    }

    /// A blank incident on series `si`, owned by its metric's owner.
    fn series_incident(
        &self,
        si: usize,
        id: String,
        kind: &'static str,
        severity: &'static str,
        onset_ms: i64,
        detected_ms: i64,
    ) -> Incident {
        let s = &self.series[si];
        let m = &self.schema.metrics[s.metric];
        let mut inc = Incident::blank(IncidentHead {
            id,
            metric: m.name().to_string(),
            metric_idx: Some(s.metric),
            series_idx: Some(si),
            label: s.label.clone(),
            series: self.series_json(si),
            kind,
            severity,
            onset_ms,
            detected_ms,
        });
        inc.owner = m.cfg.owner.clone();
        inc
    }

    fn series_json(&self, si: usize) -> serde_json::Map<String, serde_json::Value> {
        self.series[si]
            .dims
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect()
    }

    fn incident_url(&self, id: &str) -> String {
        format!(
            "{}/incidents/{}",
            self.cfg.service.public_url.trim_end_matches('/'),
            id
        )
    }

    fn open_incident(&mut self, si: usize, w: i64, a: Alarm, e: Expect) {
        let wm = self.schema.window_ms;
        let onset = (!a.single_window)
            .then(|| self.estimate_onset(si, w, &a, &e))
            .flatten();
        let s = &self.series[si];
        let m = &self.schema.metrics[s.metric];
        let onset_window = onset.as_ref().map_or(a.onset_window, |o| o.window);
        let onset_ms = onset_window * wm;
        let detected_ms = (w + 1) * wm;
        let id = stable_id("inc-", &[m.name(), &s.label, &onset_ms.to_string()]);
        if self.incident_ids.contains_key(&id) {
            // Same onset re-detected after a resolution inside the same excursion.
            self.series[si].detector.reset();
            return;
        }
        let den = a.sum_den.max(1e-9);
        let observed = a.sum_observed / den;
        let expected = a.sum_expected / den;
        let sd = e.rate_variance(m.family, den).sqrt();
        let effect = match m.family {
            Family::Gaussian => (observed - expected) / e.sigma2.sqrt().max(1e-12),
            _ => observed / expected.max(1e-12) - 1.0,
        };
        let kind = match (m.family, a.side) {
            (Family::Gaussian, _) if m.cfg.direction == Direction::Both => "shift",
            (_, Side::Down) => "drop",
            (_, Side::Up) => "spike",
        };
        let outage = self.incidents.iter().find(|i| {
            i.status == IncidentStatus::Firing
                && i.kind == "data_quality"
                && !i.explained_by_outage
                && i.metric_idx == Some(s.metric)
        });
        let explained = outage.map(|o| {
            format!(
                "explained by the tracking outage on {} ({}): not a business {}",
                o.label, o.id, kind
            )
        });
        let kind = if explained.is_some() {
            "data_quality"
        } else {
            kind
        };
        let surface = m.cfg.numerator.surface.clone();
        let timing = match &onset {
            Some(o) => Timing::Estimate(o),
            None => Timing::Point { onset_ms },
        };
        let mut candidates = self.registry.candidates(&self.attribution_query(
            &s.dims,
            surface.as_deref(),
            timing,
            onset_ms,
        ));
        let comparison = self.weigh_candidates(
            &mut candidates,
            Shifted {
                series: si,
                window: w,
                shift: observed - expected,
            },
        );
        let top_segments = self.top_segments(si, onset_window, w);
        let delay_events: f64 = (onset_window..=w)
            .filter_map(|x| s.hist_at(x, w))
            .map(|h| {
                if m.per_window {
                    h.num as f64
                } else {
                    h.den as f64
                }
            })
            .sum();
        // Relative effect with a 95% interval, for "local gain, global loss".
        let rel_half = 1.96 * sd / expected.abs().max(1e-12);
        let mut inc = self.series_incident(
            si,
            id.clone(),
            kind,
            m.cfg.severity.as_str(),
            onset_ms,
            detected_ms,
        );
        inc.comparison = comparison;
        inc.evidence = explained.clone();
        inc.observed = observed;
        inc.expected = expected;
        inc.expected_low = expected - self.schema.z99 * sd;
        inc.expected_high = expected + self.schema.z99 * sd;
        inc.effect = round3(effect);
        inc.score = round3(a.statistic);
        inc.delay_windows = w - onset_window + 1;
        let (onset_low, onset_high) = match &onset {
            Some(o) => (o.low_window, o.high_window),
            None => (onset_window, onset_window),
        };
        inc.onset_low_ms = Some(onset_low * wm);
        inc.onset_high_ms = Some(onset_high * wm);
        inc.delay_events = delay_events;
        inc.candidates = candidates;
        inc.top_segments = top_segments;
        inc.explained_by_outage = explained.is_some();
        inc.recovery = Recovery::new(observed);
        let evidence = serde_json::json!({
            "metric": inc.metric, "series": inc.series, "kind": inc.kind,
            "observed": inc.observed, "expected": inc.expected,
            "expected_low": inc.expected_low, "expected_high": inc.expected_high,
            "effect": inc.effect, "effect_ci95": [round3(effect - rel_half), round3(effect + rel_half)],
            "onset": fmt_time(onset_ms), "detected_at": fmt_time(detected_ms),
            "onset_set": {"low": fmt_time(onset_low * wm), "high": fmt_time(onset_high * wm),
                "coverage": crate::onset::COVERAGE,
                "searched_from": onset.as_ref().and_then(|o| o.searched_from()).map(|x| fmt_time(x * wm)),
                "method": if onset.is_some() { "profile likelihood over the history" } else { "the window that fired" }},
            "delay_windows": inc.delay_windows, "delay_events": inc.delay_events,
            "family": format!("{:?}", m.family).to_lowercase(),
            "statistic_over_threshold": inc.score, "threshold": s.detector.h,
            "dispersion": e.phi, "tuned_effect": a.tuned_effect,
        });
        let det_policy = serde_json::json!({
            "detector": "cusum-bank",
            "false_alarms_per_series_week": m.det.false_alarms_per_series_week,
            "min_relative_effect": m.det.min_relative_effect,
        });
        let idx = self.raise(inc, evidence, det_policy, Some((effect, rel_half)));
        self.series[si].incident = Some(idx);
        self.series[si].detector.reset();
    }

    /// Produces the rollback request for an incident's decision (once per (incident, change)).
    /// `decided_by` is the policy rule or the person who approved.
    /// The surfaces a change applies to (`*` when its scope names none): what the circuit
    /// breaker counts its automatic rollbacks by.
    fn change_surfaces(&self, change_id: &str) -> Vec<String> {
        self.registry
            .get(change_id)
            .map(|c| c.scope.surfaces.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| vec!["*".to_string()])
    }

    /// Requests the rollback of the change blamed for incident `idx`; with two stages, asks
    /// the decider first (see `repartition::DECIDER`).
    fn request_rollback(&mut self, idx: usize, at_ms: i64, decided_by: Actor) {
        if matches!(self.stage, Stage::Merge { .. }) {
            self.ask_decider(idx, at_ms, decided_by);
        } else {
            self.emit_rollback(idx, at_ms, decided_by);
        }
    }

    /// The rollback request itself, once decided.
    fn emit_rollback(&mut self, idx: usize, at_ms: i64, decided_by: Actor) {
        let inc = &self.incidents[idx];
        let Some(change_id) = inc.decision.change_id.clone() else {
            return;
        };
        let rid = rollback_id(&inc.id, &change_id);
        if !self.emitted_rollbacks.insert(rid.clone()) {
            return;
        }
        let change = self.registry.get(&change_id);
        let tier = inc.decision.tier.unwrap_or(Tier::Autonomous);
        let automatic = decided_by.kind == "policy";
        let surfaces = self.change_surfaces(&change_id);
        let mut metrics = vec![RollbackMetric {
            metric: inc.metric.clone(),
            observed: inc.observed,
            expected: inc.expected,
        }];
        // Other incidents blamed on the same change and firing when it was decided (in event
        // time, and raised before it: the request says the same whether it goes out at once or
        // after the decider's answer) go in the same request.
        for (k, o) in self.incidents.iter().enumerate() {
            let firing_then = (o.detected_ms < at_ms || (o.detected_ms == at_ms && k < idx))
                && o.resolved_ms.map_or(true, |r| r > at_ms);
            if o.id != inc.id
                && firing_then
                && o.decision.change_id.as_deref() == Some(change_id.as_str())
                && !metrics.iter().any(|m| m.metric == o.metric)
            {
                metrics.push(RollbackMetric {
                    metric: o.metric.clone(),
                    observed: o.observed,
                    expected: o.expected,
                });
            }
        }
        let req = RollbackRequest {
            specversion: "1.0",
            ty: "io.guardrail.rollback.requested",
            source: format!("guardrail/{}", self.cfg.service.instance),
            id: rid.clone(),
            time: fmt_time(crate::event::now_ms()),
            datacontenttype: "application/json",
            data: RollbackData {
                change_id: change_id.clone(),
                incident_id: inc.id.clone(),
                tier: tier.as_str(),
                reason: format!(
                    "{} {} on {} ({}): observed {:.4} vs expected {:.4} ({:+.1}%) since {}; {}",
                    inc.metric,
                    inc.kind,
                    inc.label,
                    inc.severity,
                    inc.observed,
                    inc.expected,
                    inc.effect * 100.0,
                    fmt_time(inc.onset_ms),
                    inc.decision.reason
                ),
                metrics,
                decided_by: decided_by.clone(),
                rollback: change
                    .and_then(|c| c.rollback.clone())
                    .unwrap_or_else(|| serde_json::json!({})),
            },
        };
        let inc_id = inc.id.clone();
        let policy_name = inc.decision.policy.clone();
        self.audit(
            Some(&inc_id),
            Some(&change_id),
            "rollback_requested",
            decided_by,
            serde_json::json!({"rollback_request_id": rid, "event_time": fmt_time(at_ms), "reason": req.data.reason,
                "automatic": automatic}),
            serde_json::json!({"rule": policy_name, "tier": tier.as_str()}),
        );
        self.outputs.push(Output::Rollback(req));
        let d = &mut self.incidents[idx].decision;
        d.action = DecisionAction::RollbackRequested;
        d.set_deadline(None);
        self.incidents[idx].rollback_id = Some(rid.clone());
        self.pending_rollbacks.insert(change_id, rid);
        self.stats.rollbacks_requested += 1;
        // With two stages the decider counts them for the whole group.
        if automatic && !matches!(self.stage, Stage::Merge { .. }) {
            self.auto_rollbacks.push_back((at_ms, surfaces));
        }
        self.dirty = true;
    }

    fn alert_for(&self, idx: usize) -> Alert {
        let inc = &self.incidents[idx];
        let resolved = inc.status == IncidentStatus::Resolved;
        let last = inc.series_idx.map(|si| &self.series[si].last);
        let (observed, expected, lo, hi) = match (resolved, last) {
            (true, Some(last)) => (
                last.observed,
                last.expected,
                last.expected_low,
                last.expected_high,
            ),
            _ => (
                inc.observed,
                inc.expected,
                inc.expected_low,
                inc.expected_high,
            ),
        };
        Alert {
            incident_id: inc.id.clone(),
            status: if resolved { "resolved" } else { "firing" },
            severity: inc.severity,
            metric: inc.metric.clone(),
            series: inc.series.clone(),
            kind: inc.kind,
            observed: finite(observed),
            expected: finite(expected),
            expected_low: finite(lo),
            expected_high: finite(hi),
            onset: fmt_time(inc.onset_ms),
            onset_low: inc.onset_low_ms.map(fmt_time),
            onset_high: inc.onset_high_ms.map(fmt_time),
            group_id: inc.group_id.clone(),
            detected_at: fmt_time(inc.detected_ms),
            emitted_at: fmt_time(crate::event::now_ms()),
            candidate_changes: inc.candidates.clone(),
            top_segments: inc.top_segments.clone(),
            url: self.incident_url(&inc.id),
            decision: Some(inc.decision.clone()),
            effect: inc.effect,
            score: inc.score,
            owner: inc.owner.clone(),
            change_owner: inc.change_owner.clone(),
            escalated: inc.decision.escalated,
            comparison: inc.comparison,
            evidence: inc.evidence.clone(),
            local_gain_global_loss: inc.local_gain_global_loss.clone(),
            resolved_at: inc.resolved_ms.map(fmt_time),
            resolution: inc.resolution.clone(),
        }
    }

    fn resolve(&mut self, si: usize, w: i64, how: &'static str) {
        let Some(idx) = self.series[si].incident.take() else {
            return;
        };
        let end = (w + 1) * self.schema.window_ms;
        let onset = self.incidents[idx].onset_ms;
        let text = match how {
            "restored" => "restored: the metric's events arrive again".to_string(),
            "recovered" => format!(
                "recovered: the series is back to its baseline (likelihood ratio {}:1 against the shifted level)",
                crate::detect::RECOVERY_ODDS as u64
            ),
            _ => format!(
                "expired: still shifted after {}; the new level is accepted as normal and the baseline re-learns",
                human_duration(end - onset)
            ),
        };
        if how == "expired" {
            self.series[si].baseline.relearn();
        }
        self.series[si].detector.reset();
        self.series[si].learn_from = w + 1;
        self.resolve_incident(
            idx,
            end,
            text,
            serde_json::json!({"rule": "recovery-sequential-test", "odds": crate::detect::RECOVERY_ODDS}),
        );
    }

    /// Marks an incident resolved at event time `end` and emits its resolved alert.
    pub(super) fn resolve_incident(
        &mut self,
        idx: usize,
        end: i64,
        resolution: String,
        policy: serde_json::Value,
    ) {
        let inc = &mut self.incidents[idx];
        if inc.status == IncidentStatus::Resolved {
            return;
        }
        if let Some(h) = inc.held.as_mut() {
            // Its firing alert is not out yet (stage 2): the resolution follows it.
            if h.resolution.is_none() {
                h.resolution = Some((end, resolution, policy.to_string()));
                self.dirty = true;
            }
            return;
        }
        inc.status = IncidentStatus::Resolved;
        inc.resolved_ms = Some(end);
        inc.resolution = Some(resolution);
        if inc.decision.deadline_ms.is_some() {
            // A decision still open when the incident ends is moot: nothing is done at its
            // deadline.
            inc.decision.set_deadline(None);
            inc.decision
                .reason
                .push_str("; the incident resolved before the deadline");
        }
        self.dirty = true;
        self.stats.alerts_resolved += 1;
        let alert = self.alert_for(idx);
        let inc = &self.incidents[idx];
        let (id, res) = (inc.id.clone(), inc.resolution.clone());
        self.audit(
            Some(&id),
            inc.decision.change_id.clone().as_deref(),
            "incident_resolved",
            Actor::system("detector"),
            serde_json::json!({"resolution": res, "resolved_at": fmt_time(end),
                "last_window": {"observed": finite(alert.observed), "expected": finite(alert.expected)}}),
            policy,
        );
        self.outputs.push(Output::Alert(Box::new(alert)));
    }

    #[allow(clippy::too_many_arguments)]
    fn audit(
        &mut self,
        incident_id: Option<&str>,
        change_id: Option<&str>,
        action: &'static str,
        actor: Actor,
        evidence: serde_json::Value,
        policy: serde_json::Value,
    ) -> String {
        self.audit_seq += 1;
        let audit_id = stable_id(
            "aud-",
            &[
                incident_id.unwrap_or(""),
                change_id.unwrap_or(""),
                action,
                &self.audit_seq.to_string(),
            ],
        );
        let at = fmt_time(crate::event::now_ms());
        if let Some(id) = incident_id {
            if let Some(&i) = self.incident_ids.get(id) {
                self.incidents[i].trail.push(TrailEntry {
                    audit_id: audit_id.clone(),
                    at: at.clone(),
                    action,
                    actor: actor.clone(),
                    change_id: change_id.map(String::from),
                });
            }
        }
        let rec = AuditRecord {
            audit_id: audit_id.clone(),
            at,
            seq: self.audit_seq,
            event_time: self.max_ts.map(fmt_time),
            incident_id: incident_id.map(String::from),
            change_id: change_id.map(String::from),
            action,
            actor,
            evidence,
            policy,
        };
        if self.audit_log.len() >= AUDIT_LOG_MAX {
            self.audit_log.pop_front();
        }
        self.audit_log.push_back(rec.clone());
        self.outputs.push(Output::Audit(rec));
        audit_id
    }

    /// Queues changes (from a file) to be applied in event-time order, each just before the
    /// first event at or after its timestamp.
    pub fn schedule_changes(&mut self, mut changes: Vec<Change>) {
        changes.sort_by_key(|c| c.ts);
        self.scheduled.extend(changes);
    }

    /// Decodes and applies a change record.
    pub fn process_change(&mut self, bytes: &[u8]) -> Result<(), Reject> {
        let c = decode_change(bytes, self.schema.max_bytes)?;
        self.apply_change(&c);
        Ok(())
    }

    pub fn apply_change(&mut self, c: &Change) {
        self.stats.changes += 1;
        self.stats.changes_by_action[match c.action {
            ChangeAction::Applied => 0,
            ChangeAction::RolledBack => 1,
            ChangeAction::Superseded => 2,
        }] += 1;
        self.dirty = true;
        if self.registry.apply_bounded(c, self.cfg.policy.max_changes) {
            self.stats.untracked_changes += 1;
        }
        self.change_guards_on(c);
        if c.action == ChangeAction::RolledBack {
            self.granted.remove(&c.change_id);
            if let Some(rid) = self.pending_rollbacks.remove(&c.change_id) {
                self.stats.rollbacks_confirmed += 1;
                let incidents: Vec<String> = self
                    .incidents
                    .iter()
                    .filter(|i| i.rollback_id.as_deref() == Some(rid.as_str()))
                    .map(|i| i.id.clone())
                    .collect();
                self.audit(
                    incidents.first().map(String::as_str),
                    Some(&c.change_id),
                    "rollback_confirmed",
                    c.actor.clone(),
                    serde_json::json!({"rollback_request_id": rid, "confirmed_at": fmt_time(c.ts),
                        "incidents": incidents}),
                    serde_json::json!({"rule": "confirmation-on-changes-topic"}),
                );
            }
        }
    }

    /// Incident by id.
    pub fn incident(&self, id: &str) -> Option<&Incident> {
        self.incident_ids.get(id).map(|&i| &self.incidents[i])
    }

    /// The series to export as gauges: those in an incident, then totals, then by volume.
    pub fn gauge_series(&self, max: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.series.len())
            .filter(|&i| self.series[i].last.window_start_ms != 0)
            .collect();
        idx.sort_by(|&a, &b| {
            let (sa, sb) = (&self.series[a], &self.series[b]);
            (sb.incident.is_some(), sb.dims.is_empty())
                .cmp(&(sa.incident.is_some(), sa.dims.is_empty()))
                .then(
                    sb.volume
                        .partial_cmp(&sa.volume)
                        .unwrap_or(std::cmp::Ordering::Equal),
                )
        });
        idx.truncate(max);
        idx
    }

    pub fn firing_by_metric(&self) -> Vec<(String, &'static str, usize)> {
        self.schema
            .metrics
            .iter()
            .enumerate()
            .map(|(mi, m)| {
                let n = self
                    .incidents
                    .iter()
                    .filter(|i| i.metric_idx == Some(mi) && i.status == IncidentStatus::Firing)
                    .count();
                (m.name().to_string(), m.cfg.severity.as_str(), n)
            })
            .collect()
    }

    pub fn series_count(&self) -> usize {
        self.series.len()
    }
}

/// The row-extreme test of a gauge window (`extreme.rs`), when its CUSUM did not fire: an
/// alarm at the window itself when its largest (smallest) row is beyond the Gumbel tail of past
/// windows' extremes at the metric's per-window false-alarm probability.
fn extreme_alarm(
    m: &MetricDef,
    s: &Series,
    w: i64,
    agg: &crate::window::Agg,
    obs: &Obs,
    e: &Expect,
    window_ms: i64,
) -> Option<Alarm> {
    let x = s.extremes.as_deref()?;
    if (x.learnt() as u32) < m.det.warmup_windows {
        return None;
    }
    let sides = match m.cfg.direction {
        Direction::Drop => [true, false],
        Direction::Spike => [false, true],
        Direction::Both => [true, true],
    };
    let n = sides.iter().filter(|&&b| b).count();
    let alpha = crate::extreme::alpha_per_window(
        m.det.false_alarms_per_series_week,
        (window_ms / 1000) as u64,
        n,
    );
    let day = 86_400_000 / window_ms.max(1);
    if 86_400_000 % window_ms.max(1) == 0 && x.recurs_daily(day as u32) {
        return None;
    }
    let a = x.test(agg.max as f64, agg.min as f64, e.rate, sides, alpha)?;
    Some(Alarm {
        side: if a.side == crate::extreme::UP {
            Side::Up
        } else {
            Side::Down
        },
        onset_window: w,
        sum_observed: obs.num,
        sum_expected: e.rate * obs.den,
        sum_den: obs.den,
        tuned_effect: a.z,
        // 1 at the threshold, as the CUSUM's score.
        statistic: a.p.max(1e-300).ln() / alpha.ln(),
        single_window: true,
    })
}

/// The onset's sufficient statistics of one closed window (None without a forecast).
fn suff_of(family: Family, h: &HistPoint) -> Option<Suff> {
    if h.exp.is_nan() || h.den <= 0.0 {
        return None;
    }
    match family {
        Family::Gaussian => {
            let v = (h.sd as f64).powi(2);
            if !(v > 0.0 && v.is_finite()) {
                return None;
            }
            let d = (h.num / h.den) as f64 - h.exp as f64;
            Some(Suff {
                x: (d / v) as f32,
                e: (1.0 / v) as f32,
            })
        }
        _ => Some(Suff {
            x: h.num,
            e: h.exp * h.den,
        }),
    }
}

/// Before window `w` overwrites the oldest window of a series' history: folds that window into
/// the coarse history while the detector's evidence reaches back to it, and drops the coarse
/// history once no evidence does.
fn keep_coarse(s: &mut Series, family: Family, w: i64) {
    let evicted = w - HISTORY as i64;
    if evicted < s.first_window || evicted < s.learn_from {
        return;
    }
    match s.detector.evidence_since() {
        Some(since) if since <= evicted => {
            let suff = s.hist_at(evicted, w - 1).and_then(|h| suff_of(family, &h));
            s.coarse
                .get_or_insert_with(|| Box::new(Coarse::new(evicted)))
                .push(evicted, suff);
        }
        _ => s.coarse = None,
    }
}

/// Whether a metric's series keep the sums of squares of their windows: the baseline of a mean
/// learns the within-window variance from them (a gauge's windows are one value each).
fn keeps_sumsq(m: &MetricDef) -> bool {
    m.family == Family::Gaussian && m.cfg.kind != MetricKind::Gauge
}

/// Appends a series and returns its index. The vector grows by an eighth, not by doubling: a
/// series is ~450 bytes inline, and doubling would leave up to as much again of slack per series
/// (a quarter on average); copying the vector an eighth at a time stays amortised O(1) per
/// series, and a new series is rare next to the events of existing ones.
fn push_series(series: &mut Vec<Series>, s: Series) -> usize {
    if series.len() == series.capacity() {
        series.reserve_exact((series.len() / 8).max(16));
    }
    series.push(s);
    series.len() - 1
}

fn make_series(
    sc: &Schema,
    metric: usize,
    dims: Vec<(String, String)>,
    first_window: i64,
) -> Series {
    let m = &sc.metrics[metric];
    let label = series_label(&dims);
    Series {
        metric,
        dims,
        label,
        ring: Ring::new(sc.ring_slots, m.cfg.kind == MetricKind::Distinct),
        first_window,
        baseline: if m.cfg.kind == MetricKind::Gauge {
            Baseline::new_gauge(
                m.det.seasonality,
                m.det.baseline_half_life_windows,
                m.det.warmup_windows,
            )
        } else {
            Baseline::new(
                m.family,
                m.det.seasonality,
                m.det.baseline_half_life_windows,
            )
        },
        detector: Detector::new(
            m.family,
            m.cfg.direction,
            &m.det,
            (sc.window_ms / 1000) as u64,
        ),
        incident: None,
        learn_from: i64::MIN,
        hist: Box::new([HistEntry::EMPTY; HISTORY]),
        hist_sumsq: keeps_sumsq(m).then(|| Box::new([0.0; HISTORY])),
        last: LastWindow::default(),
        volume: 0.0,
        trend: crate::trend::Trend::new(
            match m.cfg.direction {
                Direction::Drop => crate::trend::Harm::Down,
                Direction::Spike => crate::trend::Harm::Up,
                Direction::Both => crate::trend::Harm::Both,
            },
            m.det.false_alarms_per_series_week,
        ),
        extremes: (m.cfg.kind == MetricKind::Gauge).then(Box::default),
        coarse: None,
    }
}

/// `country=FR,device=mobile`, or `total` for the series over all segments.
pub fn series_label(dims: &[(String, String)]) -> String {
    if dims.is_empty() {
        return "total".to_string();
    }
    dims.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_341_600_000; // 2026-11-22T10:00:00Z

    /// One count metric over events of type `x`.
    const COUNT_X: &str =
        "[[metrics]]\nname = \"n\"\nkind = \"count\"\nnumerator = { type = \"x\" }\n";

    fn engine(metrics: &str) -> Engine {
        let cfg = Config::from_str_named(
            &format!("[detection]\nwarmup_windows = 4\n[engine]\nallowed_lateness_secs = 60\nmax_series_per_metric = 3\n{metrics}"),
            "t.toml",
        )
        .unwrap();
        Engine::new(&cfg).unwrap()
    }

    fn ev(ty: &str, ts: i64, extra: &str) -> Vec<u8> {
        format!(r#"{{"type":"{ty}","ts":{ts}{extra}}}"#).into_bytes()
    }

    #[test]
    fn history_sd_keeps_nine_bits() {
        assert_eq!(std::mem::size_of::<HistEntry>(), 14);
        assert!(unpack_sd(pack_sd(f32::NAN)).is_nan());
        assert_eq!(unpack_sd(pack_sd(0.0)), 0.0);
        assert_eq!(unpack_sd(pack_sd(f32::INFINITY)), f32::INFINITY);
        for x in [
            1e-30f32, 1e-9, 3.3e-4, 0.0123, 0.5, 1.0, 7.77, 1234.5, 9.9e20,
        ] {
            let y = unpack_sd(pack_sd(x));
            assert!(((y - x) / x).abs() <= 1.0 / 512.0, "{x} -> {y}");
        }
    }

    fn series<'a>(e: &'a Engine, metric: &str, label: &str) -> &'a Series {
        let mi = e.metrics().iter().position(|m| m.name() == metric).unwrap();
        e.series
            .iter()
            .find(|s| s.metric == mi && s.label == label)
            .unwrap()
    }

    /// A gauge is one observation per window (the mean of its rows), tested against the spread
    /// between windows: a one-window spike fires once, and the baseline learns through it.
    #[test]
    fn a_gauge_fires_on_a_one_window_spike_and_keeps_its_level() {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        let mut e = engine(
            r#"
[[metrics]]
name = "cpu"
kind = "gauge"
numerator = { type = "measurement" }
detection = { min_volume_per_window = 1, min_expected_events = 1, min_effect_sd = 2.0, seasonality = "none" }
"#,
        );
        let mut rng = SmallRng::seed_from_u64(11);
        let normal = statrs::distribution::Normal::new(50.0, 1.0).unwrap();
        let spike_w = 400i64;
        for w in 0..600i64 {
            let x: f64 = if w == spike_w {
                90.0
            } else {
                rng.sample(normal)
            };
            // Two rows per window around the window's value: the gauge sees their mean.
            for (k, v) in [(0, x - 3.0), (1, x + 3.0)] {
                let ts = T0 + w * 300_000 + k * 120_000;
                e.process_event(&ev("measurement", ts, &format!(r#","value":{v}"#)), ts)
                    .unwrap();
            }
        }
        e.finish();
        let s = series(&e, "cpu", "total");
        let x = s.baseline.expect(T0).unwrap();
        // The spread is between windows (sd 1), not within them (sd 4.2).
        assert!((x.rate - 50.0).abs() < 0.5, "{x:?}");
        assert!((x.sigma2.sqrt() - 1.0).abs() < 0.3, "{x:?}");
        let onsets: Vec<i64> = e
            .incidents
            .iter()
            .filter(|i| i.kind == "shift")
            .map(|i| i.onset_ms)
            .collect();
        assert_eq!(onsets, vec![T0 + spike_w * 300_000], "{onsets:?}");
    }

    /// Onsets of the `shift` incidents on 600 windows of 24 Gaussian rows with one spike of 8
    /// sd in window 400, with one engine or through the two-stage aggregation (each window's
    /// sums drained to stage 2 as it ends).
    fn one_row_spike_onsets(two_stages: bool) -> Vec<i64> {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        let metrics = r#"
[[metrics]]
name = "cpu"
kind = "gauge"
numerator = { type = "measurement" }
detection = { min_volume_per_window = 1, min_expected_events = 1, min_effect_sd = 2.0, seasonality = "none" }
"#;
        let mut e = engine(metrics);
        let mut s2 = engine(metrics);
        if two_stages {
            e.set_stage(Stage::Aggregate { partitions: 2 });
            e.assign_sources(&[0], T0);
            s2.set_stage(Stage::Merge { partitions: 2 });
            s2.assign_repartitions(&[0, 1], 1, T0);
        }
        let mut rng = SmallRng::seed_from_u64(5);
        let normal = statrs::distribution::Normal::new(50.0, 1.0).unwrap();
        for w in 0..600i64 {
            for k in 0..24i64 {
                let v: f64 = rng.sample(normal) + if w == 400 && k == 7 { 8.0 } else { 0.0 };
                let ts = T0 + w * 300_000 + k * 12_500;
                e.process_event_from(0, &ev("measurement", ts, &format!(r#","value":{v}"#)), ts)
                    .unwrap();
            }
            if two_stages {
                let now = T0 + (w + 1) * 300_000;
                e.drain_partials(now);
                let out: Vec<Output> = e.take_outputs().collect();
                for o in out {
                    if let Output::Partial(r) = o {
                        s2.process_partial(r.partition, &r.partial.encode(), now)
                            .unwrap();
                    }
                }
            }
        }
        let detector = if two_stages {
            &s2
        } else {
            e.finish();
            &e
        };
        detector
            .incidents
            .iter()
            .filter(|i| i.kind == "shift")
            .map(|i| i.onset_ms)
            .collect()
    }

    /// A one-row spike of 8 sd among 24 rows moves the window's mean by 1/3 sd of a row (1.6
    /// sd between windows): the CUSUM does not see it, the row-extreme test does.
    #[test]
    fn a_gauge_fires_on_a_one_row_spike() {
        assert_eq!(one_row_spike_onsets(false), vec![T0 + 400 * 300_000]);
    }

    /// The same through the two-stage aggregation: the window's row extremes travel with its
    /// partial sums, so stage 2 sees the spike too.
    #[test]
    fn a_gauge_fires_on_a_one_row_spike_with_two_stages() {
        assert_eq!(one_row_spike_onsets(true), vec![T0 + 400 * 300_000]);
    }

    #[test]
    fn every_kind_aggregates_its_window() {
        let mut e = engine(
            r#"
[[metrics]]
name = "cr"
kind = "ratio"
numerator = { type = "conversion" }
denominator = { type = "session" }
dims = ["country"]
[[metrics]]
name = "tickets"
kind = "count"
numerator = { type = "support_ticket" }
[[metrics]]
name = "sentiment"
kind = "mean"
numerator = { type = "brand_signal" }
[[metrics]]
name = "users"
kind = "distinct"
numerator = { type = "session" }
"#,
        );
        let now = T0 + 86_400_000;
        for i in 0..10 {
            let c = if i < 6 { "FR" } else { "DE" };
            e.process_event(
                &ev(
                    "session",
                    T0 + i,
                    &format!(r#","user":"u{}","dims":{{"country":"{c}"}}"#, i % 4),
                ),
                now,
            )
            .unwrap();
        }
        e.process_event(
            &ev("conversion", T0 + 20, r#","dims":{"country":"FR"}"#),
            now,
        )
        .unwrap();
        e.process_event(&ev("conversion", T0 + 21, ""), now)
            .unwrap();
        e.process_event(&ev("support_ticket", T0 + 22, ""), now)
            .unwrap();
        e.process_event(&ev("brand_signal", T0 + 23, r#","value":0.5"#), now)
            .unwrap();
        e.process_event(&ev("brand_signal", T0 + 24, r#","value":-0.1"#), now)
            .unwrap();
        // A brand signal without a value is counted, not aggregated.
        e.process_event(&ev("brand_signal", T0 + 25, ""), now)
            .unwrap();
        e.process_event(&ev("page_view", T0 + 26, ""), now).unwrap();
        // Close the first window: two events past the lateness (one alone is held, as a fast
        // clock would be).
        for _ in 0..2 {
            e.process_event(&ev("session", T0 + 300_000 + 61_000, ""), now)
                .unwrap();
        }
        assert_eq!(e.stats.missing_value, 1, "{:?}", e.stats);
        assert_eq!(e.stats.unselected, 1);
        let w = |s: &Series| s.hist_at(T0 / 300_000, T0 / 300_000).expect("closed");
        let fr = w(series(&e, "cr", "country=FR"));
        assert_eq!((fr.num, fr.den), (1.0, 6.0));
        let unknown = w(series(&e, "cr", "country=unknown"));
        assert_eq!((unknown.num, unknown.den), (1.0, 0.0));
        let total = w(series(&e, "cr", "total"));
        assert_eq!((total.num, total.den), (2.0, 10.0));
        let t = w(series(&e, "tickets", "total"));
        assert_eq!(
            (t.num, t.den),
            (1.0, 1.0),
            "a count without exposure is per window"
        );
        let s = w(series(&e, "sentiment", "total"));
        assert_eq!(s.den, 2.0);
        assert!((s.num - 0.4).abs() < 1e-6 && (s.sumsq - 0.26).abs() < 1e-6);
        let u = w(series(&e, "users", "total"));
        assert!((u.num - 4.0).abs() < 0.5, "4 distinct users, got {}", u.num);
        assert_eq!(u.den, 1.0);
    }

    #[test]
    fn series_overflow_is_counted_and_total_still_sees_it() {
        let mut e = engine(
            r#"
[[metrics]]
name = "n"
kind = "count"
numerator = { type = "x" }
dims = ["k"]
"#,
        );
        for i in 0..5 {
            e.process_event(&ev("x", T0 + i, &format!(r#","dims":{{"k":"v{i}"}}"#)), T0)
                .unwrap();
        }
        assert_eq!(e.stats.series_overflow, 2);
        assert_eq!(e.series_count(), 1 + 3);
    }

    #[test]
    fn watermark_follows_the_slowest_partition() {
        let mut e = engine(COUNT_X);
        let now = T0 + 86_400_000;
        // As the service reads them: each record's timestamp (the broker received it then)
        // vouches for its event time.
        let from = |e: &mut Engine, p: i32, ts: i64, wall: i64| {
            e.process_event_ingested(p, &ev("x", ts, ""), wall, Some(ts))
        };
        e.assign_sources(&[0, 1], now);
        // Partition 0 runs an hour ahead while partition 1 has not delivered: nothing closes.
        from(&mut e, 0, T0 + 3_600_000, now).unwrap();
        assert_eq!(e.watermark_ms(), None);
        from(&mut e, 1, T0, now).unwrap();
        // Partition 1's old event is on time, and the watermark follows partition 1.
        assert!(e.watermark_ms().unwrap() <= T0);
        from(&mut e, 1, T0 + 600_000, now).unwrap();
        assert_eq!(e.watermark_ms(), Some(T0 + 300_000));
        // Once partition 1 is idle (wall time), partition 0 alone moves event time.
        let later = now + SOURCE_IDLE_MS + 1;
        from(&mut e, 0, T0 + 3_600_001, later).unwrap();
        assert!(e.watermark_ms().unwrap() > T0 + 3_000_000);
        let late = from(&mut e, 1, T0 + 600_001, later);
        assert_eq!(late.unwrap_err().code, ErrorCode::TooLate);
    }

    /// A gradual rollout's step records keep the change's watch (its holdout comparison goes
    /// on) and its first application time; applying it again after a rollback opens a new one.
    #[test]
    fn a_rollout_step_keeps_the_watch() {
        let mut e = engine(COUNT_X);
        let rec = |ts: i64, action: &str, extra: &str| {
            format!(
                r#"{{"change_id":"c1","ts":{ts},"action":"{action}","actor":{{"kind":"agent","name":"a"}}{extra}}}"#
            )
        };
        let opened = |e: &mut Engine| {
            e.take_outputs()
                .filter(|o| matches!(o, Output::Audit(r) if r.action == "guard_opened"))
                .count()
        };
        e.process_change(rec(T0, "applied", r#","holdout":0.1,"rollout":0.1"#).as_bytes())
            .unwrap();
        assert_eq!(opened(&mut e), 1);
        for (k, share) in [(1, 0.5), (2, 1.0)] {
            let r = rec(
                T0 + k * 1_800_000,
                "applied",
                &format!(r#","rollout":{share}"#),
            );
            e.process_change(r.as_bytes()).unwrap();
        }
        assert_eq!(opened(&mut e), 0);
        let st = e.registry.get("c1").unwrap();
        assert_eq!((st.applied_ms, st.steps.len()), (Some(T0), 3));
        assert_eq!(e.latest_guard("c1").map(|g| g.opened_ms), Some(T0));
        e.process_change(rec(T0 + 7_200_000, "rolled_back", "").as_bytes())
            .unwrap();
        e.process_change(rec(T0 + 9_000_000, "applied", r#","rollout":0.2"#).as_bytes())
            .unwrap();
        assert_eq!(opened(&mut e), 1);
        assert_eq!(e.registry.get("c1").unwrap().steps.len(), 1);
    }

    #[test]
    fn surfaces_are_bounded_counted_and_forgotten() {
        let cfg = Config::from_str_named(
            &format!("[guards.sprawl]\nmax_surfaces = 100\nwindow_secs = 3600\n[guards.pressure]\nmax_surfaces = 50\n{COUNT_X}"),
            "t.toml",
        )
        .unwrap();
        let mut e = Engine::new(&cfg).unwrap();
        let now = T0 + 86_400_000;
        // 1,000 surfaces, each with a variant and a message: one entry each, up to the bound.
        for i in 0..1000 {
            let x = format!(r#","surface":"s{i}","variant":"v","user":"u{i}""#);
            e.process_event(&ev("x", T0 + i, &x), now).unwrap();
            e.process_event(&ev("message_sent", T0 + i, &x), now)
                .unwrap();
        }
        let held = |e: &Engine| e.tracked_entries().into_iter().collect::<HashMap<_, _>>();
        assert_eq!(held(&e)["sprawl_surfaces"], 100);
        assert_eq!(held(&e)["pressure_surfaces"], 50);
        // Each event on an unfollowed surface is counted (both carry a variant).
        assert_eq!(e.stats.untracked_surfaces, [1800, 950]);
        // Two sprawl windows later, surfaces seen no more are forgotten; new ones are taken.
        for _ in 0..2 {
            e.process_event(&ev("x", T0 + 3 * 3_600_000 + 301_000, ""), now)
                .unwrap();
        }
        assert_eq!(held(&e)["sprawl_surfaces"], 0);
        let x = r#","surface":"new","variant":"v""#;
        e.process_event(&ev("x", T0 + 3 * 3_600_000 + 302_000, x), now)
            .unwrap();
        assert_eq!(held(&e)["sprawl_surfaces"], 1);
    }

    #[test]
    fn a_lone_jump_is_held_and_a_resumed_stream_moves_on() {
        let mut e = engine(COUNT_X);
        let now = T0 + 86_400_000;
        for i in 0..10 {
            e.process_event(&ev("x", T0 + i * 10_000, ""), now).unwrap();
        }
        let before = e.watermark_ms();
        // One event 290 s ahead: counted, held.
        e.process_event(&ev("x", T0 + 380_000, ""), now).unwrap();
        assert_eq!(e.watermark_ms(), before);
        assert_eq!(e.stats.clock_jumps_held, 1);
        // The stream goes on where it was: nothing of it is late.
        e.process_event(&ev("x", T0 + 95_000, ""), now).unwrap();
        // After a real gap, the second event confirms the first.
        e.process_event(&ev("x", T0 + 3_600_000, ""), now).unwrap();
        assert_eq!(e.watermark_ms(), before);
        e.process_event(&ev("x", T0 + 3_601_000, ""), now).unwrap();
        assert!(e.watermark_ms().unwrap() > T0 + 3_000_000);
        assert_eq!(e.stats.clock_jumps_held, 2);
        // Year 0001 is no event time.
        let r = e.process_event(br#"{"type":"x","ts":"0001-01-01T00:00:00Z"}"#, now);
        assert_eq!(r.unwrap_err().code, ErrorCode::BadTimestamp);
    }

    #[test]
    fn stage_two_releases_an_input_partition_only_on_stage_ones_word() {
        use crate::repartition::Partial;
        let mut e = engine(COUNT_X);
        e.set_stage(Stage::Merge { partitions: 1 });
        let now = T0 + 86_400_000;
        e.assign_repartitions(&[0], 2, now);
        let marker = |e: &mut Engine, source, max_ts: Option<i64>, heard, sent, wall| {
            let m = Partial::Marker {
                source,
                max_ts,
                heard_ms: heard,
                sent_ms: sent,
            };
            e.process_partial(0, &m.encode(), wall).unwrap();
        };
        marker(&mut e, 0, Some(T0), now, now, now);
        marker(&mut e, 1, Some(T0), now, now, now);
        // Input partition 1's markers stop (its reader left the group); partition 0 runs on.
        // However long stage 2 waits by its own clock, partition 1 holds the watermark.
        let later = now + 10 * SOURCE_IDLE_MS;
        marker(&mut e, 0, Some(T0 + 3_600_000), later, later, later);
        assert!(e.watermark_ms().unwrap_or(i64::MIN) <= T0);
        // Its new reader has read nothing from it in 10 s: released.
        let idle_at = later + SOURCE_IDLE_MS + 1;
        marker(&mut e, 1, None, later, idle_at, idle_at);
        assert!(e.watermark_ms().unwrap() > T0 + 3_000_000);
        // Records from a build of another repartition format are refused, not misread.
        let mut old = Partial::Change(b"{}".to_vec()).encode();
        old[0] = 1;
        assert!(e.process_partial(0, &old, idle_at).is_err());
    }

    #[test]
    fn changes_scheduled_from_a_file_apply_in_event_time() {
        let mut e = engine(COUNT_X);
        let c = decode_change(
            format!(r#"{{"change_id":"c","ts":{},"action":"applied","actor":{{"kind":"agent","name":"a"}}}}"#, T0 + 1000).as_bytes(),
            4096,
        )
        .unwrap();
        e.schedule_changes(vec![c]);
        e.process_event(&ev("x", T0, ""), T0).unwrap();
        assert!(e.registry.get("c").is_none());
        e.process_event(&ev("x", T0 + 1000, ""), T0).unwrap();
        assert!(e.registry.get("c").is_some());
    }

    #[test]
    fn a_veto_window_ends_on_the_wall_clock_when_input_stops() {
        let mut e = engine(COUNT_X);
        let wm = 300_000;
        // Applied as the spike's window begins: the onset's likelihood names it.
        let c = format!(
            r#"{{"change_id":"c","ts":{},"action":"applied","actor":{{"kind":"agent","name":"a"}},"tier":"supervised"}}"#,
            T0 + 30 * wm
        );
        e.schedule_changes(vec![decode_change(c.as_bytes(), 4096).unwrap()]);
        // 30 calm windows of 100 events, then a window of 400: a spike, blamed on `c`.
        let mut wall = 0;
        for w in 0..32i64 {
            let n = if w == 30 { 400 } else { 100 };
            for k in 0..n {
                let ts = T0 + w * wm + k * (wm / n);
                wall = ts;
                e.process_event(&ev("x", ts, ""), ts).unwrap();
            }
        }
        let inc = e
            .incidents
            .iter()
            .find(|i| i.kind == "spike")
            .expect("the spike is an incident");
        assert_eq!(inc.decision.action, DecisionAction::AwaitingVetoWindow);
        let deadline = inc.decision.deadline_ms.unwrap();
        let rollbacks = |e: &mut Engine| {
            e.take_outputs()
                .filter(|o| matches!(o, Output::Rollback(_)))
                .count()
        };
        assert_eq!(rollbacks(&mut e), 0);
        // Input stops. A short silence changes nothing; one past the deadline acts.
        e.advance_idle(wall + 30_000);
        assert_eq!(rollbacks(&mut e), 0);
        let latest = e.max_event_time_ms().unwrap();
        e.advance_idle(wall + (deadline - latest) + 1000);
        assert_eq!(
            rollbacks(&mut e),
            1,
            "the veto window ended while input was silent"
        );
    }
}
