//! Benchmark scenarios: a TOML file describes traffic (segments of very different volume,
//! diurnal and weekly seasonality, noise and bursts, holidays, gaps, late events) and injected
//! incidents; [`generate`] turns it into events (JSON lines, contract section 1), [`changes`]
//! into change records (section 2) and [`truth`] into the ground truth the scorer
//! ([`crate::score`]) measures detections against.
//!
//! Seeded and deterministic: the same file yields the same bytes. Randomness comes from three
//! streams seeded from `seed` (events, the schedule of noise and bursts, late arrivals), so an
//! incident added to a scenario does not move the noise or the bursts.
//!
//! Format (every key but `start`, `duration`, `seed`, `peak_sessions_per_min` and `segments` has
//! a default; unknown keys are errors; times are RFC 3339 or `+1d14h` from the scenario start;
//! durations are `90m`, `2h`, `3d`, `1d12h`):
//!
//! ```toml
//! name = "small"
//! start = "2026-11-02T00:00:00Z"
//! duration = "3d"
//! seed = 7
//! peak_sessions_per_min = 900
//! [seasonality]   # diurnal_amplitude, peak_hour_utc, weekly (7 factors, Monday first)
//! [noise]         # volume_sd, rate_sd, bursts_per_day, burst_multiplier, burst_duration
//! [rates]         # per session: ctr, conversion, ticket, brand_signal, message; unsubscribe
//!                 # per message; brand_mean, brand_sd of brand_signal values
//! [[segments]]    # country, share, conversion_mult, ctr_mult, ticket_mult
//! [devices]       # value = share (sessions carry dims.device); [channels] likewise
//! [[holidays]]    # date = "2026-11-11", volume_mult = 0.6
//! [[gaps]]        # start, duration, country?: no events at all
//! [late]          # share, max_delay_secs (<= lateness), too_late_share, too_late_min_secs, ..max..
//! [[incidents]]   # id, type, start, duration, then per type (see IncidentSpec); `change`:
//!                 # change_id, holdout, *_mult, tier, change_kind, country, record_skew, rollout
//! ```

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{self, Write};
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, Poisson};
use serde::{Deserialize, Serialize};

use crate::event::{fmt_time, parse_time_str};

/// Window width the truth's `volume_per_window` refers to (the engine's default).
pub const TRUTH_WINDOW_SECS: u64 = 300;
const MIN_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
const WEEK_MS: f64 = 7.0 * 86_400_000.0;

/// Metrics of the shipped configuration the generator knows (name, has per-country series).
/// The truth's series list and the metrics incidents are recorded against come from here.
pub const CATALOG: [(&str, bool); 6] = [
    ("conversion_rate", true),
    ("click_through_rate", true),
    ("support_tickets_per_session", true),
    ("brand_sentiment", false),
    ("unsubscribe_rate", false),
    ("device_mix", true),
];

// ---------------------------------------------------------------------------------------------
// The file

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// RFC 3339; must lie in the past (the replay rejects events from the future).
    pub start: String,
    pub duration: String,
    pub seed: u64,
    /// Sessions per minute over all segments at the daily peak of a weekday.
    pub peak_sessions_per_min: f64,
    /// Share of events whose `ts` is an RFC 3339 string rather than epoch milliseconds.
    #[serde(default = "default_rfc3339_share")]
    pub rfc3339_share: f64,
    #[serde(default)]
    pub seasonality: SeasonalitySpec,
    #[serde(default)]
    pub noise: NoiseSpec,
    #[serde(default)]
    pub rates: RatesSpec,
    pub segments: Vec<SegmentSpec>,
    #[serde(default = "default_devices")]
    pub devices: BTreeMap<String, f64>,
    #[serde(default = "default_channels")]
    pub channels: BTreeMap<String, f64>,
    #[serde(default)]
    pub holidays: Vec<HolidaySpec>,
    #[serde(default)]
    pub gaps: Vec<GapSpec>,
    #[serde(default)]
    pub late: LateSpec,
    #[serde(default)]
    pub incidents: Vec<IncidentSpec>,
}

fn default_rfc3339_share() -> f64 {
    0.1
}
fn default_devices() -> BTreeMap<String, f64> {
    [("mobile", 0.6), ("desktop", 0.35), ("tablet", 0.05)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}
fn default_channels() -> BTreeMap<String, f64> {
    [("organic", 0.5), ("paid", 0.3), ("email", 0.2)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// Volume over the day and the week: `1 - a + a * sin(...)` peaking at `peak_hour_utc` (so the
/// trough is `1 - 2a` of the peak), times `weekly[weekday]` (Monday first).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeasonalitySpec {
    pub diurnal_amplitude: f64,
    pub peak_hour_utc: f64,
    pub weekly: Vec<f64>,
}

impl Default for SeasonalitySpec {
    fn default() -> Self {
        SeasonalitySpec {
            diurnal_amplitude: 0.45,
            peak_hour_utc: 15.0,
            weekly: vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.85, 0.8],
        }
    }
}

/// Noise: log-normal volume noise per segment and minute (`volume_sd`), log-normal noise of the
/// conversion, click and ticket probabilities per segment and window (`rate_sd`: real traffic is
/// over-dispersed), and traffic bursts (a campaign, a bot) of `burst_multiplier` times the volume
/// for `burst_duration`, `bursts_per_day` on average, in one segment or all.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoiseSpec {
    pub volume_sd: f64,
    pub rate_sd: f64,
    pub bursts_per_day: f64,
    pub burst_multiplier: f64,
    pub burst_duration: String,
}

impl Default for NoiseSpec {
    fn default() -> Self {
        NoiseSpec {
            volume_sd: 0.05,
            rate_sd: 0.0,
            bursts_per_day: 0.0,
            burst_multiplier: 2.0,
            burst_duration: "10m".into(),
        }
    }
}

/// Baseline behaviour per session (defaults: [`crate::sim::Rates`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RatesSpec {
    pub ctr: f64,
    pub conversion: f64,
    pub ticket: f64,
    pub brand_signal: f64,
    pub brand_mean: f64,
    pub brand_sd: f64,
    pub message: f64,
    pub unsubscribe: f64,
}

impl Default for RatesSpec {
    fn default() -> Self {
        let r = crate::sim::Rates::default();
        RatesSpec {
            ctr: r.ctr,
            conversion: r.conversion,
            ticket: r.ticket,
            brand_signal: r.brand_signal,
            brand_mean: r.brand_mean,
            brand_sd: 0.45,
            message: r.message,
            unsubscribe: r.unsubscribe,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentSpec {
    pub country: String,
    /// Share of sessions (normalised over segments).
    pub share: f64,
    #[serde(default = "one")]
    pub conversion_mult: f64,
    #[serde(default = "one")]
    pub ctr_mult: f64,
    #[serde(default = "one")]
    pub ticket_mult: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HolidaySpec {
    /// `YYYY-MM-DD` (a UTC day).
    pub date: String,
    pub volume_mult: f64,
}

/// Missing data: no events at all (of one country, or of every one).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GapSpec {
    #[serde(default)]
    pub id: Option<String>,
    pub start: String,
    pub duration: String,
    #[serde(default)]
    pub country: Option<String>,
}

/// Late arrivals: `share` of events arrive up to `max_delay_secs` after their `ts` (keep it
/// within the engine's allowed lateness, 120 s by default); `too_late_share` arrive between
/// `too_late_min_secs` and `too_late_max_secs` late and are dead-lettered `too_late`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LateSpec {
    pub share: f64,
    pub max_delay_secs: f64,
    pub too_late_share: f64,
    pub too_late_min_secs: f64,
    pub too_late_max_secs: f64,
}

impl Default for LateSpec {
    fn default() -> Self {
        LateSpec {
            share: 0.0,
            max_delay_secs: 100.0,
            too_late_share: 0.0,
            too_late_min_secs: 600.0,
            too_late_max_secs: 1800.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IncidentType {
    /// Conversion probability times `1 - magnitude` (global or in `country`).
    ConversionDrop,
    /// Click probability times `1 - magnitude`.
    CtrDrop,
    /// Support tickets per session times `1 + magnitude`.
    TicketSpike,
    /// Unsubscribes per message times `1 + magnitude`.
    UnsubscribeSpike,
    /// brand_signal mean moves linearly by `delta` over `duration`, then holds for `hold`
    /// (default: to the end of the scenario). Truth kind `drift`.
    BrandErosion,
    /// The share of `value` among sessions' `dim` (`device` or `channel`) becomes `to_share`
    /// (the other values scale in proportion). Truth kind `shift`.
    MixShift,
    /// No `events` (`conversion`, `all`, or any event type) from `country` (or anywhere): a
    /// data-quality incident, not a business drop.
    TrackingOutage,
    /// An automated change in `country` (or everywhere) with `conversion_mult`, `ctr_mult`,
    /// `ticket_mult` on exposed users; with `holdout`, that share of users is held out, and
    /// events carry `change_id` and `arm`. Applied at `start`, rolled back at the end.
    ///
    /// A change whose multipliers are all absent or do no harm (conversion and click
    /// multipliers >= 1, ticket multiplier <= 1) is *harmless*: it has no truth records, only
    /// its entry in [`Truth::changes`], and a rollback of it is a wrong decision.
    ///
    /// `record_skew` (`"-5m"`, `"+90s"`, within +-10 minutes) moves the `applied` record's `ts`
    /// off the true start (a change log whose clock runs early or late); the effect still
    /// begins at `start`, and the `rolled_back` record keeps the true end.
    ///
    /// `rollout` (`[{share = 0.1, at = "+0m"}, {share = 0.5, at = "+30m"}, {share = 1.0, at =
    /// "+1h"}]`, offsets from `start`, the first at `+0m`, shares non-decreasing in (0, 1]) is a
    /// gradual rollout: the share of users reached over time, picked by a stable hash of the
    /// user (independent of the holdout's) so that a user once reached stays reached. Of the
    /// users reached, the `holdout` share is held out and the rest exposed, so the share of
    /// non-holdout users exposed is the rollout's share and the arms keep their declared ratio
    /// (no sample-ratio mismatch); users not reached yet carry neither `change_id` nor `arm`.
    /// Without it every user is reached from the start. The truth's records start at `start`
    /// with the full-rollout magnitude.
    ///
    /// Changes may overlap in time and scope (a user exposed to several gets every effect);
    /// at most one of the overlapping ones may have a `holdout` (events carry one
    /// `change_id`). The truth's magnitudes assume one harmful change per series at a time.
    Change,
}

impl IncidentType {
    fn as_str(self) -> &'static str {
        match self {
            IncidentType::ConversionDrop => "conversion_drop",
            IncidentType::CtrDrop => "ctr_drop",
            IncidentType::TicketSpike => "ticket_spike",
            IncidentType::UnsubscribeSpike => "unsubscribe_spike",
            IncidentType::BrandErosion => "brand_erosion",
            IncidentType::MixShift => "mix_shift",
            IncidentType::TrackingOutage => "tracking_outage",
            IncidentType::Change => "change",
        }
    }

    /// The optional fields this type accepts.
    fn fields(self) -> &'static [&'static str] {
        match self {
            IncidentType::ConversionDrop
            | IncidentType::CtrDrop
            | IncidentType::TicketSpike
            | IncidentType::UnsubscribeSpike => &["magnitude", "country"],
            IncidentType::BrandErosion => &["delta", "hold", "country"],
            IncidentType::MixShift => &["dim", "value", "to_share", "country"],
            IncidentType::TrackingOutage => &["events", "country"],
            IncidentType::Change => &[
                "change_id",
                "holdout",
                "conversion_mult",
                "ctr_mult",
                "ticket_mult",
                "tier",
                "change_kind",
                "country",
                "record_skew",
                "rollout",
            ],
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentSpec {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: IncidentType,
    pub start: String,
    pub duration: String,
    #[serde(default)]
    pub magnitude: Option<f64>,
    #[serde(default)]
    pub country: Option<String>,
    #[serde(default)]
    pub delta: Option<f64>,
    #[serde(default)]
    pub hold: Option<String>,
    #[serde(default)]
    pub dim: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub to_share: Option<f64>,
    #[serde(default)]
    pub events: Option<String>,
    #[serde(default)]
    pub change_id: Option<String>,
    #[serde(default)]
    pub holdout: Option<f64>,
    #[serde(default)]
    pub conversion_mult: Option<f64>,
    #[serde(default)]
    pub ctr_mult: Option<f64>,
    #[serde(default)]
    pub ticket_mult: Option<f64>,
    #[serde(default)]
    pub tier: Option<String>,
    #[serde(default)]
    pub change_kind: Option<String>,
    /// `change`: the applied record's clock error, a signed duration (`"-5m"`, `"+90s"`).
    #[serde(default)]
    pub record_skew: Option<String>,
    /// `change`: a gradual rollout, steps of the exposed share of non-holdout users.
    #[serde(default)]
    pub rollout: Option<Vec<RolloutStep>>,
    /// The metric the truth names (default by type, from [`CATALOG`]).
    #[serde(default)]
    pub metric: Option<String>,
    /// Counts in recall (default true).
    #[serde(default)]
    pub required: Option<bool>,
}

impl IncidentSpec {
    fn given(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut add = |name: &'static str, set: bool| {
            if set {
                v.push(name)
            }
        };
        add("magnitude", self.magnitude.is_some());
        add("country", self.country.is_some());
        add("delta", self.delta.is_some());
        add("hold", self.hold.is_some());
        add("dim", self.dim.is_some());
        add("value", self.value.is_some());
        add("to_share", self.to_share.is_some());
        add("events", self.events.is_some());
        add("change_id", self.change_id.is_some());
        add("holdout", self.holdout.is_some());
        add("conversion_mult", self.conversion_mult.is_some());
        add("ctr_mult", self.ctr_mult.is_some());
        add("ticket_mult", self.ticket_mult.is_some());
        add("tier", self.tier.is_some());
        add("change_kind", self.change_kind.is_some());
        add("record_skew", self.record_skew.is_some());
        add("rollout", self.rollout.is_some());
        v
    }
}

/// One step of a gradual rollout: from `at` (an offset from the change's start, `"+30m"`) the
/// share `share` of the non-holdout users is exposed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutStep {
    pub share: f64,
    pub at: String,
}

// ---------------------------------------------------------------------------------------------
// Validated scenario

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: invalid scenario:\n{}", .errors.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: String, errors: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct Segment {
    pub country: String,
    pub share: f64,
    pub conversion_mult: f64,
    pub ctr_mult: f64,
    pub ticket_mult: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKind {
    Conversion,
    Ctr,
    Ticket,
    Unsubscribe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixDim {
    Device,
    Channel,
}

#[derive(Debug, Clone)]
pub struct ChangeEffect {
    pub change_id: String,
    pub holdout: Option<f64>,
    pub conversion_mult: f64,
    pub ctr_mult: f64,
    pub ticket_mult: f64,
    pub tier: String,
    pub change_kind: String,
    pub country: Option<usize>,
    /// The applied record's `ts` minus the true start.
    pub record_skew_ms: i64,
    /// (offset from the start in ms, exposed share of non-holdout users), the first at 0;
    /// empty: everyone from the start.
    pub rollout: Vec<(i64, f64)>,
}

impl ChangeEffect {
    /// Whether the change hurts any metric: conversions or clicks down, tickets up.
    pub fn harmful(&self) -> bool {
        self.conversion_mult < 1.0 || self.ctr_mult < 1.0 || self.ticket_mult > 1.0
    }

    /// The exposed share of non-holdout users `since_ms` after the start.
    pub fn rollout_share(&self, since_ms: i64) -> f64 {
        self.rollout
            .iter()
            .take_while(|(at, _)| *at <= since_ms)
            .last()
            .map(|(_, s)| *s)
            .unwrap_or(1.0)
    }
}

#[derive(Debug, Clone)]
pub enum Effect {
    Rate {
        rate: RateKind,
        mult: f64,
        country: Option<usize>,
    },
    Erosion {
        delta: f64,
        ramp_end_ms: i64,
        country: Option<usize>,
    },
    Mix {
        dim: MixDim,
        value: usize,
        to_share: f64,
        country: Option<usize>,
    },
    /// `events`: None = every event type.
    Outage {
        events: Option<String>,
        country: Option<usize>,
    },
    Change(ChangeEffect),
}

impl Effect {
    fn country(&self) -> Option<usize> {
        match self {
            Effect::Rate { country, .. }
            | Effect::Erosion { country, .. }
            | Effect::Mix { country, .. }
            | Effect::Outage { country, .. } => *country,
            Effect::Change(c) => c.country,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Incident {
    pub id: String,
    pub kind: IncidentType,
    pub from_ms: i64,
    pub to_ms: i64,
    pub effect: Effect,
    pub metric: Option<String>,
    pub required: bool,
}

impl Incident {
    fn applies(&self, t: i64, seg: usize) -> bool {
        t >= self.from_ms
            && t < self.to_ms
            && self.effect.country().map(|c| c == seg).unwrap_or(true)
    }
}

#[derive(Debug, Clone)]
pub struct Gap {
    pub id: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub country: Option<usize>,
}

/// A validated scenario, times in epoch milliseconds.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub seed: u64,
    pub start_ms: i64,
    pub end_ms: i64,
    pub peak_sessions_per_min: f64,
    pub rfc3339_share: f64,
    pub diurnal_amplitude: f64,
    pub peak_hour_utc: f64,
    pub weekly: [f64; 7],
    pub volume_sd: f64,
    pub rate_sd: f64,
    pub bursts_per_day: f64,
    pub burst_multiplier: f64,
    pub burst_ms: i64,
    pub rates: RatesSpec,
    pub segments: Vec<Segment>,
    pub devices: Vec<(String, f64)>,
    pub channels: Vec<(String, f64)>,
    /// (UTC day start, volume multiplier).
    pub holidays: Vec<(i64, f64)>,
    pub gaps: Vec<Gap>,
    pub late: LateSpec,
    pub incidents: Vec<Incident>,
}

/// Parses a duration: one or more `<number><unit>` with unit `s`, `m`, `h`, `d` or `w`
/// (`90m`, `2h`, `1d12h`, `0.5h`).
pub fn parse_duration_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = 0.0;
    let mut num = String::new();
    for ch in s.chars() {
        if ch.is_ascii_digit() || ch == '.' {
            num.push(ch);
            continue;
        }
        let unit = match ch {
            's' => 1e3,
            'm' => 6e4,
            'h' => 3.6e6,
            'd' => 8.64e7,
            'w' => 6.048e8,
            _ => return None,
        };
        let n: f64 = num.parse().ok()?;
        total += n * unit;
        num.clear();
    }
    if !num.is_empty() || !total.is_finite() {
        return None;
    }
    Some(total.round() as i64)
}

/// A signed duration: `-5m`, `+90s`, `3m` (positive), `0s`.
pub fn parse_signed_duration_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Some(d) = s.strip_prefix('-') {
        return parse_duration_ms(d).map(|d| -d);
    }
    parse_duration_ms(s.strip_prefix('+').unwrap_or(s))
}

/// Largest clock error of a change record (`record_skew`).
pub const MAX_RECORD_SKEW_MS: i64 = 10 * MIN_MS;

/// A time: RFC 3339, or `+<duration>` after `base_ms`.
fn parse_when(s: &str, base_ms: i64) -> Option<i64> {
    match s.trim().strip_prefix('+') {
        Some(d) => parse_duration_ms(d).map(|d| base_ms + d),
        None => parse_time_str(s.trim()),
    }
}

/// `x > 0` (false for NaN).
fn positive(x: f64) -> bool {
    x > 0.0
}

/// `x >= min` (false for NaN).
fn at_least(x: f64, min: f64) -> bool {
    x >= min
}

fn normalise(map: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    let sum: f64 = map.values().sum();
    map.iter().map(|(k, v)| (k.clone(), v / sum)).collect()
}

impl Scenario {
    pub fn from_file(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_str_named(&text, &path.display().to_string())
    }

    pub fn from_str_named(text: &str, name: &str) -> Result<Scenario, ScenarioError> {
        let file: ScenarioFile = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: name.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Self::from_spec(&file, name)
    }

    /// Validates a parsed file; reports every problem, not only the first.
    pub fn from_spec(f: &ScenarioFile, name: &str) -> Result<Scenario, ScenarioError> {
        let mut errs: Vec<String> = Vec::new();
        let start_ms = parse_time_str(&f.start).unwrap_or_else(|| {
            errs.push(format!(
                "start: {:?} is not an RFC 3339 time (e.g. \"2026-11-02T00:00:00Z\")",
                f.start
            ));
            0
        });
        let dur = |what: &str, s: &str, errs: &mut Vec<String>| -> i64 {
            match parse_duration_ms(s) {
                Some(d) if d > 0 => d,
                _ => {
                    errs.push(format!(
                        "{what}: {s:?} is not a positive duration like \"90m\", \"2h\", \"3d\" or \"1d12h\""
                    ));
                    0
                }
            }
        };
        let duration_ms = dur("duration", &f.duration, &mut errs);
        let end_ms = start_ms + duration_ms;
        if errs.is_empty() && end_ms > crate::event::now_ms() {
            errs.push(format!(
                "start + duration = {} is in the future: replays dead-letter future events; move `start` back",
                fmt_time(end_ms)
            ));
        }
        if !(f.peak_sessions_per_min > 0.0 && f.peak_sessions_per_min.is_finite()) {
            errs.push(format!(
                "peak_sessions_per_min must be positive, got {}",
                f.peak_sessions_per_min
            ));
        }
        if !(0.0..=1.0).contains(&f.rfc3339_share) {
            errs.push(format!(
                "rfc3339_share must be in [0, 1], got {}",
                f.rfc3339_share
            ));
        }
        let se = &f.seasonality;
        if !(0.0..0.5).contains(&se.diurnal_amplitude) {
            errs.push(format!(
                "seasonality.diurnal_amplitude must be in [0, 0.5) (the trough is 1 - 2a of the peak), got {}",
                se.diurnal_amplitude
            ));
        }
        if !(0.0..24.0).contains(&se.peak_hour_utc) {
            errs.push(format!(
                "seasonality.peak_hour_utc must be in [0, 24), got {}",
                se.peak_hour_utc
            ));
        }
        let mut weekly = [1.0; 7];
        if se.weekly.len() != 7 || se.weekly.iter().any(|w| !positive(*w)) {
            errs.push(format!(
                "seasonality.weekly must list 7 positive factors, Monday first, got {:?}",
                se.weekly
            ));
        } else {
            weekly.copy_from_slice(&se.weekly);
        }
        let n = &f.noise;
        for (k, v) in [
            ("noise.volume_sd", n.volume_sd),
            ("noise.rate_sd", n.rate_sd),
        ] {
            if !(0.0..=1.0).contains(&v) {
                errs.push(format!("{k} must be in [0, 1], got {v}"));
            }
        }
        if !at_least(n.bursts_per_day, 0.0) {
            errs.push(format!(
                "noise.bursts_per_day must be >= 0, got {}",
                n.bursts_per_day
            ));
        }
        if !positive(n.burst_multiplier) {
            errs.push(format!(
                "noise.burst_multiplier must be positive, got {}",
                n.burst_multiplier
            ));
        }
        let burst_ms = dur("noise.burst_duration", &n.burst_duration, &mut errs);
        let r = &f.rates;
        for (k, v) in [
            ("ctr", r.ctr),
            ("conversion", r.conversion),
            ("ticket", r.ticket),
            ("brand_signal", r.brand_signal),
            ("message", r.message),
            ("unsubscribe", r.unsubscribe),
        ] {
            if !(0.0..=1.0).contains(&v) {
                errs.push(format!(
                    "rates.{k} is a probability per session (per message for unsubscribe): must be in [0, 1], got {v}"
                ));
            }
        }
        if !(-1.0..=1.0).contains(&r.brand_mean) || !positive(r.brand_sd) {
            errs.push(format!(
                "rates.brand_mean must be in [-1, 1] and rates.brand_sd positive, got {} and {}",
                r.brand_mean, r.brand_sd
            ));
        }
        if f.segments.is_empty() {
            errs.push("segments: at least one [[segments]] (country, share) is needed".into());
        }
        let share_sum: f64 = f.segments.iter().map(|s| s.share.max(0.0)).sum();
        let mut segments = Vec::new();
        for (i, s) in f.segments.iter().enumerate() {
            if s.country.is_empty() {
                errs.push(format!("segments[{i}].country is empty"));
            }
            if f.segments[..i].iter().any(|o| o.country == s.country) {
                errs.push(format!(
                    "segments[{i}]: country {:?} is listed twice",
                    s.country
                ));
            }
            if !positive(s.share) {
                errs.push(format!(
                    "segments[{i}] ({}): share must be positive, got {}",
                    s.country, s.share
                ));
            }
            for (k, v) in [
                ("conversion_mult", s.conversion_mult),
                ("ctr_mult", s.ctr_mult),
                ("ticket_mult", s.ticket_mult),
            ] {
                if !positive(v) {
                    errs.push(format!(
                        "segments[{i}] ({}): {k} must be positive, got {v}",
                        s.country
                    ));
                }
            }
            segments.push(Segment {
                country: s.country.clone(),
                share: s.share / share_sum.max(1e-12),
                conversion_mult: s.conversion_mult,
                ctr_mult: s.ctr_mult,
                ticket_mult: s.ticket_mult,
            });
        }
        for (what, m) in [("devices", &f.devices), ("channels", &f.channels)] {
            if m.is_empty() || m.values().any(|v| !positive(*v)) {
                errs.push(format!(
                    "{what}: give at least one value with a positive share, got {m:?}"
                ));
            }
        }
        let country_idx = |c: &Option<String>, what: &str, errs: &mut Vec<String>| {
            c.as_ref().and_then(|c| {
                let i = f.segments.iter().position(|s| &s.country == c);
                if i.is_none() {
                    errs.push(format!(
                        "{what}: country {c:?} is not one of the segments ({})",
                        f.segments
                            .iter()
                            .map(|s| s.country.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                i
            })
        };
        let mut holidays = Vec::new();
        for (i, h) in f.holidays.iter().enumerate() {
            match parse_time_str(&format!("{}T00:00:00Z", h.date)) {
                Some(d) => holidays.push((d, h.volume_mult)),
                None => errs.push(format!(
                    "holidays[{i}].date: {:?} is not a date like \"2026-11-11\"",
                    h.date
                )),
            }
            if !positive(h.volume_mult) {
                errs.push(format!(
                    "holidays[{i}].volume_mult must be positive, got {}",
                    h.volume_mult
                ));
            }
        }
        let mut gaps = Vec::new();
        for (i, g) in f.gaps.iter().enumerate() {
            let what = format!("gaps[{i}]");
            let from = parse_when(&g.start, start_ms);
            if from.is_none() {
                errs.push(format!(
                    "{what}.start: {:?} is neither RFC 3339 nor \"+<duration>\" from the scenario start",
                    g.start
                ));
            }
            let d = dur(&format!("{what}.duration"), &g.duration, &mut errs);
            let country = country_idx(&g.country, &what, &mut errs);
            if let Some(from) = from {
                gaps.push(Gap {
                    id: g.id.clone().unwrap_or_else(|| format!("gap-{}", i + 1)),
                    from_ms: from,
                    to_ms: from + d,
                    country,
                });
            }
        }
        let l = &f.late;
        if !(0.0..=1.0).contains(&l.share) || !(0.0..=1.0).contains(&l.too_late_share) {
            errs.push(format!(
                "late.share and late.too_late_share must be in [0, 1], got {} and {}",
                l.share, l.too_late_share
            ));
        }
        if !at_least(l.max_delay_secs, 1.0) {
            errs.push(format!(
                "late.max_delay_secs must be at least 1, got {}",
                l.max_delay_secs
            ));
        }
        if !(l.too_late_min_secs > 0.0 && l.too_late_max_secs > l.too_late_min_secs) {
            errs.push(format!(
                "late: need 0 < too_late_min_secs < too_late_max_secs, got {} and {}",
                l.too_late_min_secs, l.too_late_max_secs
            ));
        }
        let devices = normalise(&f.devices);
        let channels = normalise(&f.channels);
        let mut incidents = Vec::new();
        for (i, s) in f.incidents.iter().enumerate() {
            let what = format!("incidents[{i}] ({})", s.id);
            if s.id.is_empty() {
                errs.push(format!("incidents[{i}]: id is empty"));
            }
            if f.incidents[..i].iter().any(|o| o.id == s.id) {
                errs.push(format!("{what}: id is used twice"));
            }
            for g in s.given() {
                if !s.kind.fields().contains(&g) {
                    errs.push(format!(
                        "{what}: `{g}` does not apply to type {}; it takes {}",
                        s.kind.as_str(),
                        s.kind.fields().join(", ")
                    ));
                }
            }
            let from = parse_when(&s.start, start_ms);
            if from.is_none() {
                errs.push(format!(
                    "{what}.start: {:?} is neither RFC 3339 nor \"+<duration>\" from the scenario start",
                    s.start
                ));
            }
            let from = from.unwrap_or(start_ms);
            let d = dur(&format!("{what}.duration"), &s.duration, &mut errs);
            if from < start_ms || from >= end_ms {
                errs.push(format!(
                    "{what}: starts at {} outside the scenario ({} .. {})",
                    fmt_time(from),
                    fmt_time(start_ms),
                    fmt_time(end_ms)
                ));
            }
            let country = country_idx(&s.country, &what, &mut errs);
            let mut to = from + d;
            let mag = |lo: f64, hi: f64, errs: &mut Vec<String>| -> f64 {
                match s.magnitude {
                    Some(m) if m > lo && m < hi => m,
                    Some(m) => {
                        errs.push(format!(
                            "{what}: magnitude must be in ({lo}, {hi}) for {}, got {m}",
                            s.kind.as_str()
                        ));
                        0.0
                    }
                    None => {
                        errs.push(format!(
                            "{what}: {} needs `magnitude` (relative: 0.2 = 20%)",
                            s.kind.as_str()
                        ));
                        0.0
                    }
                }
            };
            let effect = match s.kind {
                IncidentType::ConversionDrop | IncidentType::CtrDrop => {
                    let m = mag(0.0, 1.0, &mut errs);
                    Effect::Rate {
                        rate: if s.kind == IncidentType::CtrDrop {
                            RateKind::Ctr
                        } else {
                            RateKind::Conversion
                        },
                        mult: 1.0 - m,
                        country,
                    }
                }
                IncidentType::TicketSpike | IncidentType::UnsubscribeSpike => {
                    let m = mag(0.0, 100.0, &mut errs);
                    Effect::Rate {
                        rate: if s.kind == IncidentType::TicketSpike {
                            RateKind::Ticket
                        } else {
                            RateKind::Unsubscribe
                        },
                        mult: 1.0 + m,
                        country,
                    }
                }
                IncidentType::BrandErosion => {
                    let delta = s.delta.unwrap_or_else(|| {
                        errs.push(format!(
                            "{what}: brand_erosion needs `delta` (the change of the brand_signal mean at the end of the ramp, e.g. -0.1)"
                        ));
                        0.0
                    });
                    if !(-2.0..=2.0).contains(&delta) || delta == 0.0 {
                        errs.push(format!(
                            "{what}: delta must be non-zero and in [-2, 2], got {delta}"
                        ));
                    }
                    let ramp_end = to;
                    to = match &s.hold {
                        Some(h) => ramp_end + dur(&format!("{what}.hold"), h, &mut errs),
                        None => end_ms.max(ramp_end),
                    };
                    Effect::Erosion {
                        delta,
                        ramp_end_ms: ramp_end,
                        country,
                    }
                }
                IncidentType::MixShift => {
                    let (dim, values) = match s.dim.as_deref() {
                        Some("device") => (MixDim::Device, &devices),
                        Some("channel") => (MixDim::Channel, &channels),
                        other => {
                            errs.push(format!(
                                "{what}: dim must be \"device\" or \"channel\", got {other:?}"
                            ));
                            (MixDim::Device, &devices)
                        }
                    };
                    let value = match s.value.as_deref() {
                        Some(v) => values.iter().position(|(k, _)| k == v).unwrap_or_else(|| {
                            errs.push(format!(
                                "{what}: value {v:?} is not one of {}",
                                values
                                    .iter()
                                    .map(|(k, _)| k.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ));
                            0
                        }),
                        None => {
                            errs.push(format!("{what}: mix_shift needs `value` (e.g. \"mobile\")"));
                            0
                        }
                    };
                    let to_share = s.to_share.unwrap_or(-1.0);
                    if !(to_share > 0.0 && to_share < 1.0) {
                        errs.push(format!(
                            "{what}: mix_shift needs `to_share` in (0, 1), the value's new share"
                        ));
                    }
                    Effect::Mix {
                        dim,
                        value,
                        to_share,
                        country,
                    }
                }
                IncidentType::TrackingOutage => {
                    let ev = s.events.clone().unwrap_or_else(|| "conversion".into());
                    if ev.is_empty() {
                        errs.push(format!("{what}: events is empty"));
                    }
                    Effect::Outage {
                        events: (ev != "all").then_some(ev),
                        country,
                    }
                }
                IncidentType::Change => {
                    let change_id = s.change_id.clone().unwrap_or_else(|| s.id.clone());
                    if let Some(h) = s.holdout {
                        if !(h > 0.0 && h < 1.0) {
                            errs.push(format!("{what}: holdout must be in (0, 1), got {h}"));
                        }
                    }
                    let record_skew_ms = match &s.record_skew {
                        None => 0,
                        Some(k) => match parse_signed_duration_ms(k) {
                            Some(v) if v.abs() <= MAX_RECORD_SKEW_MS => v,
                            Some(_) => {
                                errs.push(format!(
                                    "{what}: record_skew must be within +-10m, got {k:?}"
                                ));
                                0
                            }
                            None => {
                                errs.push(format!(
                                    "{what}: record_skew {k:?} is not a signed duration like \"-5m\" or \"+90s\""
                                ));
                                0
                            }
                        },
                    };
                    let mut rollout = Vec::new();
                    if let Some(steps) = &s.rollout {
                        if steps.is_empty() {
                            errs.push(format!(
                                "{what}: rollout needs at least one step {{share, at}}"
                            ));
                        }
                        for (j, st) in steps.iter().enumerate() {
                            let at = st.at.trim();
                            let at_ms = parse_duration_ms(at.strip_prefix('+').unwrap_or(at))
                                .or_else(|| (at.trim_start_matches('+') == "0").then_some(0));
                            let Some(at_ms) = at_ms else {
                                errs.push(format!(
                                    "{what}: rollout[{j}].at {:?} is not an offset from the start like \"+30m\"",
                                    st.at
                                ));
                                continue;
                            };
                            if !(st.share > 0.0 && st.share <= 1.0) {
                                errs.push(format!(
                                    "{what}: rollout[{j}].share must be in (0, 1], got {}",
                                    st.share
                                ));
                            }
                            if j == 0 && at_ms != 0 {
                                errs.push(format!(
                                    "{what}: rollout[0].at must be \"+0m\" (the effect starts at `start`), got {:?}",
                                    st.at
                                ));
                            }
                            if at_ms >= d && d > 0 {
                                errs.push(format!(
                                    "{what}: rollout[{j}].at {:?} is not before the change's end",
                                    st.at
                                ));
                            }
                            if let Some(&(prev_at, prev_share)) = rollout.last() {
                                if at_ms <= prev_at || st.share < prev_share {
                                    errs.push(format!(
                                        "{what}: rollout steps must come in time order with non-decreasing shares (rollout[{j}])"
                                    ));
                                }
                            }
                            rollout.push((at_ms, st.share));
                        }
                    }
                    let c = ChangeEffect {
                        change_id,
                        holdout: s.holdout,
                        conversion_mult: s.conversion_mult.unwrap_or(1.0),
                        ctr_mult: s.ctr_mult.unwrap_or(1.0),
                        ticket_mult: s.ticket_mult.unwrap_or(1.0),
                        tier: s.tier.clone().unwrap_or_else(|| "human".into()),
                        change_kind: s.change_kind.clone().unwrap_or_else(|| "offer".into()),
                        country,
                        record_skew_ms,
                        rollout,
                    };
                    for (k, v) in [
                        ("conversion_mult", c.conversion_mult),
                        ("ctr_mult", c.ctr_mult),
                        ("ticket_mult", c.ticket_mult),
                    ] {
                        if !positive(v) {
                            errs.push(format!("{what}: {k} must be positive, got {v}"));
                        }
                    }
                    if !matches!(c.tier.as_str(), "human" | "supervised" | "autonomous") {
                        errs.push(format!(
                            "{what}: tier must be human, supervised or autonomous, got {:?}",
                            c.tier
                        ));
                    }
                    Effect::Change(c)
                }
            };
            incidents.push(Incident {
                id: s.id.clone(),
                kind: s.kind,
                from_ms: from,
                to_ms: to,
                effect,
                metric: s.metric.clone(),
                required: s.required.unwrap_or(true),
            });
        }
        // Changes may overlap, but two with a holdout must not tag the same users at once:
        // events carry one change_id and arm.
        for (i, a) in incidents.iter().enumerate() {
            for b in &incidents[..i] {
                if let (Effect::Change(ca), Effect::Change(cb)) = (&a.effect, &b.effect) {
                    let overlap_scope =
                        ca.country.is_none() || cb.country.is_none() || ca.country == cb.country;
                    let both_tagged = ca.holdout.is_some() && cb.holdout.is_some();
                    if both_tagged && overlap_scope && a.from_ms < b.to_ms && b.from_ms < a.to_ms {
                        errs.push(format!(
                            "incidents {} and {}: two changes with a holdout overlap in time and scope (events carry one change_id)",
                            b.id, a.id
                        ));
                    }
                    if ca.change_id == cb.change_id {
                        errs.push(format!(
                            "incidents {} and {}: change_id {:?} is used twice",
                            b.id, a.id, ca.change_id
                        ));
                    }
                }
            }
        }
        if !errs.is_empty() {
            return Err(ScenarioError::Invalid {
                path: name.to_string(),
                errors: errs,
            });
        }
        Ok(Scenario {
            name: f.name.clone().unwrap_or_else(|| {
                Path::new(name)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "scenario".into())
            }),
            seed: f.seed,
            start_ms,
            end_ms,
            peak_sessions_per_min: f.peak_sessions_per_min,
            rfc3339_share: f.rfc3339_share,
            diurnal_amplitude: se.diurnal_amplitude,
            peak_hour_utc: se.peak_hour_utc,
            weekly,
            volume_sd: n.volume_sd,
            rate_sd: n.rate_sd,
            bursts_per_day: n.bursts_per_day,
            burst_multiplier: n.burst_multiplier,
            burst_ms,
            rates: f.rates.clone(),
            segments,
            devices,
            channels,
            holidays,
            gaps,
            late: f.late.clone(),
            incidents,
        })
    }

    /// Expected volume factor at `t` relative to a weekday peak (diurnal x weekly x holiday).
    pub fn volume_factor(&self, t: i64) -> f64 {
        let h = t.rem_euclid(DAY_MS) as f64 / HOUR_MS as f64;
        let a = self.diurnal_amplitude;
        let diurnal =
            1.0 - a + a * (std::f64::consts::TAU * (h - self.peak_hour_utc + 6.0) / 24.0).sin();
        let day = t.div_euclid(DAY_MS);
        let weekday = (day + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
        let holiday = self
            .holidays
            .iter()
            .filter(|(d, _)| d.div_euclid(DAY_MS) == day)
            .map(|(_, m)| *m)
            .product::<f64>();
        diurnal * self.weekly[weekday] * holiday
    }

    fn in_gap(&self, t: i64, seg: usize) -> bool {
        self.gaps
            .iter()
            .any(|g| t >= g.from_ms && t < g.to_ms && g.country.map(|c| c == seg).unwrap_or(true))
    }

    /// Expected sessions of segment `seg` (None: all) in [a, b), without noise and bursts.
    pub fn expected_sessions(&self, seg: Option<usize>, a: i64, b: i64) -> f64 {
        let mut total = 0.0;
        let mut t = a;
        while t < b {
            let step = (b - t).min(MIN_MS);
            let mid = t + step / 2;
            let f =
                self.volume_factor(mid) * self.peak_sessions_per_min * step as f64 / MIN_MS as f64;
            for (i, s) in self.segments.iter().enumerate() {
                if seg.map(|x| x == i).unwrap_or(true) && !self.in_gap(mid, i) {
                    total += f * s.share;
                }
            }
            t += step;
        }
        total
    }

    /// The base rate of `rate` in segment `seg` (None: session-weighted over all segments).
    pub fn base_rate(&self, rate: RateKind, seg: Option<usize>) -> f64 {
        let one = |s: &Segment| match rate {
            RateKind::Conversion => self.rates.conversion * s.conversion_mult,
            RateKind::Ctr => self.rates.ctr * s.ctr_mult,
            RateKind::Ticket => self.rates.ticket * s.ticket_mult,
            RateKind::Unsubscribe => self.rates.unsubscribe,
        };
        match seg {
            Some(i) => one(&self.segments[i]),
            None => self.segments.iter().map(|s| s.share * one(s)).sum(),
        }
    }

    fn mix(&self, dim: MixDim) -> &[(String, f64)] {
        match dim {
            MixDim::Device => &self.devices,
            MixDim::Channel => &self.channels,
        }
    }
}

/// Mean and standard deviation of a normal(mu, sd) clamped to [-1, 1] (brand_signal values).
pub fn clamped_normal_moments(mu: f64, sd: f64) -> (f64, f64) {
    // Midpoint rule on +-8 sd, plus the clamped tails' mass at the bounds.
    let n = 4000;
    let lo = mu - 8.0 * sd;
    let hi = mu + 8.0 * sd;
    let dx = (hi - lo) / n as f64;
    let (mut m1, mut m2, mut mass) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let x = lo + (i as f64 + 0.5) * dx;
        let p = (-(x - mu) * (x - mu) / (2.0 * sd * sd)).exp()
            / (sd * (std::f64::consts::TAU).sqrt())
            * dx;
        let y = x.clamp(-1.0, 1.0);
        m1 += p * y;
        m2 += p * y * y;
        mass += p;
    }
    let m1 = m1 / mass;
    let m2 = m2 / mass;
    (m1, (m2 - m1 * m1).max(0.0).sqrt())
}

// ---------------------------------------------------------------------------------------------
// Generation

/// What [`generate`] wrote.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenStats {
    pub events: u64,
    pub sessions: u64,
    /// Events delayed within the allowed lateness.
    pub delayed: u64,
    /// Events delayed beyond it (expected to be dead-lettered `too_late`).
    pub too_late: u64,
}

/// Per-second state of one segment.
#[derive(Debug, Clone, Default)]
struct SegState {
    conv: f64,
    ctr: f64,
    ticket: f64,
    unsub: f64,
    brand_mean: f64,
    device_cdf: Vec<f64>,
    channel_cdf: Vec<f64>,
    suppress_all: bool,
    suppress: Vec<String>,
    /// The changes in force (incident indexes, in file order).
    changes: Vec<usize>,
}

fn cdf(shares: &[f64]) -> Vec<f64> {
    let mut acc = 0.0;
    shares
        .iter()
        .map(|s| {
            acc += s;
            acc
        })
        .collect()
}

fn pick(cdf: &[f64], u: f64) -> usize {
    let total = *cdf.last().unwrap_or(&1.0);
    cdf.iter()
        .position(|c| u * total < *c)
        .unwrap_or(cdf.len().saturating_sub(1))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn str_hash(s: &str) -> u64 {
    // FNV-1a: stable across runs and platforms (unlike the std hasher).
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Whether `user` is in the holdout of `change_id` (share `holdout`): a stable hash, so a
/// user stays in one arm.
pub fn in_holdout(user: u64, change_id: &str, holdout: f64) -> bool {
    let h = splitmix(user ^ str_hash(change_id));
    (h >> 11) as f64 / (1u64 << 53) as f64 <= holdout
}

/// Whether `user` is among the exposed `share` of a gradual rollout of `change_id`: a stable
/// hash independent of [`in_holdout`]'s, so a user once exposed stays exposed as the share
/// grows.
pub fn in_rollout(user: u64, change_id: &str, share: f64) -> bool {
    let h = splitmix(splitmix(user ^ str_hash(change_id)) ^ 0x0052_4f4c_4c4f_5554_u64);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < share
}

struct Burst {
    from: i64,
    to: i64,
    seg: Option<usize>,
}

struct Gen<'a, W: Write> {
    sc: &'a Scenario,
    out: W,
    rng: SmallRng,
    late_rng: SmallRng,
    next_id: u64,
    seq: u64,
    buf: Vec<u8>,
    heap: BinaryHeap<Reverse<(i64, u64, Vec<u8>)>>,
    stats: GenStats,
}

struct Ctx<'s> {
    seg: usize,
    device: &'s str,
    channel: &'s str,
    user: u64,
    exposure: Option<(&'s str, &'static str)>,
}

impl<W: Write> Gen<'_, W> {
    #[allow(clippy::too_many_arguments)]
    fn event(
        &mut self,
        st: &SegState,
        ctx: &Ctx,
        ts: i64,
        ty: &str,
        surface: Option<&str>,
        variant: Option<&str>,
        value: Option<f64>,
    ) -> io::Result<()> {
        if st.suppress_all || st.suppress.iter().any(|s| s == ty) {
            return Ok(());
        }
        self.next_id += 1;
        let b = &mut self.buf;
        b.clear();
        let _ = write!(b, "{{\"type\":\"{ty}\",\"ts\":");
        if self.rng.gen::<f64>() < self.sc.rfc3339_share {
            let _ = write!(b, "\"{}\"", fmt_time(ts));
        } else {
            let _ = write!(b, "{ts}");
        }
        let _ = write!(
            b,
            ",\"id\":\"s{}-{}\",\"user\":\"u{}\"",
            self.sc.seed, self.next_id, ctx.user
        );
        if let Some(s) = surface {
            let _ = write!(b, ",\"surface\":\"{s}\"");
        }
        if let Some(v) = variant {
            let _ = write!(b, ",\"variant\":\"{v}\"");
        }
        if let Some(v) = value {
            let _ = write!(b, ",\"value\":{v}");
        }
        if let Some((c, arm)) = ctx.exposure {
            let _ = write!(b, ",\"change_id\":\"{c}\",\"arm\":\"{arm}\"");
        }
        let _ = writeln!(
            b,
            ",\"dims\":{{\"country\":\"{}\",\"device\":\"{}\",\"channel\":\"{}\"}}}}",
            self.sc.segments[ctx.seg].country, ctx.device, ctx.channel
        );
        self.stats.events += 1;
        // Late arrivals: their own random stream, so lateness settings move nothing else.
        let l = &self.sc.late;
        let u: f64 = self.late_rng.gen();
        let delay = if u < l.too_late_share {
            self.stats.too_late += 1;
            Some(
                self.late_rng
                    .gen_range(l.too_late_min_secs * 1e3..l.too_late_max_secs * 1e3)
                    as i64,
            )
        } else if u < l.too_late_share + l.share {
            self.stats.delayed += 1;
            Some(self.late_rng.gen_range(1e3..=l.max_delay_secs * 1e3) as i64)
        } else {
            None
        };
        match delay {
            Some(d) => {
                self.seq += 1;
                self.heap
                    .push(Reverse((ts + d, self.seq, std::mem::take(&mut self.buf))));
                Ok(())
            }
            None => self.out.write_all(&self.buf),
        }
    }

    fn session(&mut self, t: i64, seg: usize, st: &SegState) -> io::Result<()> {
        let sc = self.sc;
        let r = &sc.rates;
        let di = pick(&st.device_cdf, self.rng.gen());
        let ci = pick(&st.channel_cdf, self.rng.gen());
        let user = self.rng.gen_range(0..5_000_000u64);
        let (mut conv, mut ctr, mut ticket) = (st.conv, st.ctr, st.ticket);
        let mut exposure = None;
        let mut variant = "control";
        for &k in &st.changes {
            let inc = &sc.incidents[k];
            if let Effect::Change(c) = &inc.effect {
                // Reached by the rollout so far (everyone without one); of those, the
                // holdout share is held out, so the arms keep their declared ratio.
                let reached = c.rollout.is_empty()
                    || in_rollout(user, &c.change_id, c.rollout_share(t - inc.from_ms));
                let holdout = reached
                    && c.holdout
                        .map(|h| in_holdout(user, &c.change_id, h))
                        .unwrap_or(false);
                let exposed = reached && !holdout;
                if exposed {
                    conv *= c.conversion_mult;
                    ctr *= c.ctr_mult;
                    ticket *= c.ticket_mult;
                    variant = "treatment";
                }
                if c.holdout.is_some() && reached {
                    exposure = Some((
                        c.change_id.as_str(),
                        if holdout { "holdout" } else { "treatment" },
                    ));
                }
            }
        }
        let ctx = Ctx {
            seg,
            device: &sc.devices[di].0,
            channel: &sc.channels[ci].0,
            user,
            exposure,
        };
        self.stats.sessions += 1;
        let mut ts = t + self.rng.gen_range(0..1000);
        self.event(st, &ctx, ts, "session", Some("home"), None, None)?;
        if self.rng.gen::<f64>() < ctr.min(1.0) {
            ts += self.rng.gen_range(0..500);
            self.event(st, &ctx, ts, "click", Some("checkout"), Some(variant), None)?;
        }
        if self.rng.gen::<f64>() < conv.min(1.0) {
            ts += self.rng.gen_range(0..500);
            let revenue = (self.rng.gen_range(20.0..120.0f64) * 100.0).round() / 100.0;
            self.event(
                st,
                &ctx,
                ts,
                "conversion",
                Some("checkout"),
                Some(variant),
                Some(revenue),
            )?;
        }
        if self.rng.gen::<f64>() < ticket.min(1.0) {
            self.event(st, &ctx, ts, "support_ticket", Some("checkout"), None, None)?;
        }
        if self.rng.gen::<f64>() < r.brand_signal {
            let z: f64 = self.rng.sample(rand_distr::StandardNormal);
            let v = (st.brand_mean + r.brand_sd * z).clamp(-1.0, 1.0);
            let v = (v * 1000.0).round() / 1000.0;
            self.event(st, &ctx, ts, "brand_signal", None, None, Some(v))?;
        }
        if self.rng.gen::<f64>() < r.message {
            self.event(st, &ctx, ts, "message_sent", Some("email"), None, None)?;
            if self.rng.gen::<f64>() < st.unsub.min(1.0) {
                self.event(st, &ctx, ts, "unsubscribe", Some("email"), None, None)?;
            }
        }
        Ok(())
    }

    fn flush_until(&mut self, t: i64) -> io::Result<()> {
        while self
            .heap
            .peek()
            .map(|Reverse((a, _, _))| *a <= t)
            .unwrap_or(false)
        {
            let Reverse((_, _, b)) = self.heap.pop().expect("peeked");
            self.out.write_all(&b)?;
        }
        Ok(())
    }
}

impl Scenario {
    /// The state of segment `seg` at second `t` (incidents applied; noise not).
    fn seg_state(&self, t: i64, seg: usize, st: &mut SegState) {
        let r = &self.rates;
        st.conv = self.base_rate(RateKind::Conversion, Some(seg));
        st.ctr = self.base_rate(RateKind::Ctr, Some(seg));
        st.ticket = self.base_rate(RateKind::Ticket, Some(seg));
        st.unsub = r.unsubscribe;
        st.brand_mean = r.brand_mean;
        let mut dev: Vec<f64> = self.devices.iter().map(|d| d.1).collect();
        let mut chan: Vec<f64> = self.channels.iter().map(|d| d.1).collect();
        st.suppress_all = self.in_gap(t, seg);
        st.suppress.clear();
        st.changes.clear();
        for (k, inc) in self.incidents.iter().enumerate() {
            if !inc.applies(t, seg) {
                continue;
            }
            match &inc.effect {
                Effect::Rate { rate, mult, .. } => match rate {
                    RateKind::Conversion => st.conv *= mult,
                    RateKind::Ctr => st.ctr *= mult,
                    RateKind::Ticket => st.ticket *= mult,
                    RateKind::Unsubscribe => st.unsub *= mult,
                },
                Effect::Erosion {
                    delta, ramp_end_ms, ..
                } => {
                    let f = ((t - inc.from_ms) as f64 / (ramp_end_ms - inc.from_ms).max(1) as f64)
                        .min(1.0);
                    st.brand_mean += delta * f;
                }
                Effect::Mix {
                    dim,
                    value,
                    to_share,
                    ..
                } => {
                    let v = match dim {
                        MixDim::Device => &mut dev,
                        MixDim::Channel => &mut chan,
                    };
                    let from = v[*value];
                    for (i, x) in v.iter_mut().enumerate() {
                        *x = if i == *value {
                            *to_share
                        } else {
                            *x * (1.0 - to_share) / (1.0 - from).max(1e-12)
                        };
                    }
                }
                Effect::Outage { events, .. } => match events {
                    None => st.suppress_all = true,
                    Some(e) => st.suppress.push(e.clone()),
                },
                Effect::Change(_) => st.changes.push(k),
            }
        }
        st.device_cdf = cdf(&dev);
        st.channel_cdf = cdf(&chan);
    }
}

/// Writes the scenario's events as JSON lines (in arrival order: late events appear after
/// their `ts`). Deterministic: the same scenario writes the same bytes.
pub fn generate(sc: &Scenario, out: &mut dyn Write) -> io::Result<GenStats> {
    let mut g = Gen {
        sc,
        out: io::BufWriter::with_capacity(1 << 20, out),
        rng: SmallRng::seed_from_u64(sc.seed),
        late_rng: SmallRng::seed_from_u64(splitmix(sc.seed ^ 0x1a7e)),
        next_id: 0,
        seq: 0,
        buf: Vec::with_capacity(512),
        heap: BinaryHeap::new(),
        stats: GenStats::default(),
    };
    // The schedule of bursts and noise comes from its own stream.
    let mut sched = SmallRng::seed_from_u64(splitmix(sc.seed ^ 0x5c4ed));
    let days = (sc.end_ms - sc.start_ms) as f64 / DAY_MS as f64;
    let mut bursts = Vec::new();
    if sc.bursts_per_day > 0.0 {
        let n = Poisson::new(sc.bursts_per_day * days)
            .map(|p| p.sample(&mut sched) as u64)
            .unwrap_or(0);
        for _ in 0..n {
            let from = sched.gen_range(sc.start_ms..sc.end_ms);
            let seg = if sched.gen::<f64>() < 0.3 {
                None
            } else {
                Some(sched.gen_range(0..sc.segments.len()))
            };
            bursts.push(Burst {
                from,
                to: from + sc.burst_ms,
                seg,
            });
        }
    }
    let nseg = sc.segments.len();
    let lognormal = |rng: &mut SmallRng, sd: f64| -> f64 {
        if sd <= 0.0 {
            return 1.0;
        }
        let z: f64 = Normal::new(0.0, sd).expect("sd > 0").sample(rng);
        (z - sd * sd / 2.0).exp()
    };
    let mut vol_noise = vec![1.0; nseg];
    let mut rate_noise = vec![[1.0; 3]; nseg];
    let mut states = vec![SegState::default(); nseg];
    let mut t = sc.start_ms;
    let mut minute = i64::MIN;
    let mut window = i64::MIN;
    while t < sc.end_ms {
        if t.div_euclid(MIN_MS) != minute {
            minute = t.div_euclid(MIN_MS);
            for v in vol_noise.iter_mut() {
                *v = lognormal(&mut sched, sc.volume_sd);
            }
        }
        let w = t.div_euclid(TRUTH_WINDOW_SECS as i64 * 1000);
        if w != window {
            window = w;
            for r in rate_noise.iter_mut() {
                for x in r.iter_mut() {
                    *x = lognormal(&mut sched, sc.rate_sd);
                }
            }
        }
        g.flush_until(t)?;
        let base = sc.peak_sessions_per_min / 60.0 * sc.volume_factor(t);
        for seg in 0..nseg {
            let st = &mut states[seg];
            sc.seg_state(t, seg, st);
            st.conv *= rate_noise[seg][0];
            st.ctr *= rate_noise[seg][1];
            st.ticket *= rate_noise[seg][2];
            let burst: f64 = bursts
                .iter()
                .filter(|b| t >= b.from && t < b.to && b.seg.map(|s| s == seg).unwrap_or(true))
                .map(|_| sc.burst_multiplier)
                .product();
            let mean = base * sc.segments[seg].share * vol_noise[seg] * burst;
            let n = if mean > 0.0 {
                Poisson::new(mean)
                    .map(|p| p.sample(&mut g.rng) as u64)
                    .unwrap_or(0)
            } else {
                0
            };
            for _ in 0..n {
                g.session(t, seg, &states[seg])?;
            }
        }
        t += 1000;
    }
    g.flush_until(i64::MAX)?;
    g.out.flush()?;
    Ok(g.stats)
}

/// The change records (contract section 2): each `change` incident applied at its start (plus
/// its `record_skew`) and rolled back at its (true) end; a gradual rollout's records carry
/// `rollout`, the share reached, and each later step is an `applied` record of its own.
pub fn changes(sc: &Scenario) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for inc in &sc.incidents {
        let Effect::Change(c) = &inc.effect else {
            continue;
        };
        let mut scope = serde_json::json!({"surfaces": ["checkout"]});
        if let Some(i) = c.country {
            scope["dims"] = serde_json::json!({"country": [sc.segments[i].country]});
        }
        let mut rec = serde_json::json!({
            "change_id": c.change_id,
            "ts": fmt_time(inc.from_ms + c.record_skew_ms),
            "action": "applied",
            "actor": {"kind": "agent", "name": format!("scenario-{}", sc.name)},
            "kind": c.change_kind,
            "scope": scope,
            "tier": c.tier,
            "owner": "team-growth",
            "description": format!("scenario {} incident {}", sc.name, inc.id),
            "rollback": {"restore": format!("{}-off", c.change_id)},
        });
        if let Some(h) = c.holdout {
            rec["holdout"] = serde_json::json!(h);
        }
        if let Some(&(_, share)) = c.rollout.first() {
            rec["rollout"] = serde_json::json!(share);
        }
        out.push(rec);
        // A flag service announces each later step of a gradual rollout (same clock).
        for &(at, share) in c.rollout.iter().skip(1) {
            out.push(serde_json::json!({
                "change_id": c.change_id,
                "ts": fmt_time(inc.from_ms + at + c.record_skew_ms),
                "action": "applied",
                "actor": {"kind": "agent", "name": format!("scenario-{}", sc.name)},
                "rollout": share,
            }));
        }
        out.push(serde_json::json!({
            "change_id": c.change_id,
            "ts": fmt_time(inc.to_ms),
            "action": "rolled_back",
            "actor": {"kind": "system", "name": "deploy-automation"},
        }));
    }
    out.sort_by_key(|c| parse_time_str(c["ts"].as_str().unwrap_or_default()).unwrap_or(0));
    out
}

// ---------------------------------------------------------------------------------------------
// Ground truth

/// One injected incident as the scorer sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TruthIncident {
    pub id: String,
    /// drop | spike | drift | shift | data_quality | guardrail_breach
    pub kind: String,
    pub metric: String,
    /// The series' dims; {} for the total; {"change_id": ..} for holdout breaches.
    pub series: BTreeMap<String, String>,
    pub start: String,
    pub end: String,
    /// Relative change (post / pre - 1); for `shift`, the absolute change of the value's share.
    pub magnitude: f64,
    /// Rate (or mean, or share) before.
    pub pre: f64,
    pub post: f64,
    /// Denominator per window expected (sessions, exposure, observations) over the incident's
    /// first hour, for windows of `window_secs`.
    pub volume_per_window: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
    /// Counts in recall; false for consequences (a segment's drop seen in the total) and gaps,
    /// which only keep the alerts they cause from counting as false alarms.
    #[serde(default = "default_true")]
    pub required: bool,
    /// The scenario incident (or gap) this record comes from and its type.
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub cause: String,
    /// Per-event standard deviation (mean metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sd: Option<f64>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TruthSeries {
    pub metric: String,
    pub series: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Truth {
    pub scenario: String,
    pub seed: u64,
    pub start: String,
    pub end: String,
    pub window_secs: u64,
    pub incidents: Vec<TruthIncident>,
    pub series: Vec<TruthSeries>,
    /// Series x weeks of the scenario.
    pub series_weeks: f64,
    #[serde(default)]
    pub generated: GenStats,
    /// Every change of the scenario, harmful or not (absent from older truth files).
    #[serde(default)]
    pub changes: Vec<TruthChange>,
}

/// A change of the scenario as the scorer sees it: what a rollback of it would be worth.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TruthChange {
    pub change_id: String,
    /// Hurts some metric (conversions or clicks down, tickets up); a rollback of a harmless
    /// change is a wrong decision.
    pub harmful: bool,
    /// True application time: where the effect begins.
    pub start: String,
    /// The `ts` of its `applied` record (`start` + `record_skew`).
    pub record_ts: String,
    /// Rolled back (the `rolled_back` record's `ts`).
    pub end: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<f64>,
    /// Rolled out gradually.
    #[serde(default)]
    pub rollout: bool,
    /// The scenario incident.
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub tier: String,
}

impl Truth {
    pub fn from_file(path: &Path) -> anyhow::Result<Truth> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read truth {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a truth file: {e}", path.display()))
    }
}

fn dims(country: Option<&str>) -> BTreeMap<String, String> {
    country
        .map(|c| {
            [("country".to_string(), c.to_string())]
                .into_iter()
                .collect()
        })
        .unwrap_or_default()
}

fn metric_has_countries(metric: &str) -> bool {
    CATALOG
        .iter()
        .find(|(m, _)| *m == metric)
        .map(|(_, c)| *c)
        .unwrap_or(true)
}

/// Builds the truth for a scenario (`stats`: what [`generate`] reported).
/// How long after a gain ends the fall back to the old level may still be reported (the
/// baseline relearns the old level within hours).
const GAIN_END_MS: i64 = 6 * HOUR_MS;

pub fn truth(sc: &Scenario, stats: GenStats) -> Truth {
    let mut out: Vec<TruthIncident> = Vec::new();
    let wm = TRUTH_WINDOW_SECS as i64 * 1000;
    // Expected denominator per window over the first hour of [a, b).
    let per_window = |seg: Option<usize>, a: i64, b: i64, per_session: f64| -> f64 {
        let b = b.min(a + HOUR_MS).max(a + wm);
        sc.expected_sessions(seg, a, b) * per_session * wm as f64 / (b - a) as f64
    };
    let country = |i: Option<usize>| i.map(|i| sc.segments[i].country.as_str());
    let (brand_pre, brand_sd) = clamped_normal_moments(sc.rates.brand_mean, sc.rates.brand_sd);

    #[allow(clippy::too_many_arguments)]
    fn rec(
        id: String,
        kind: &str,
        metric: &str,
        series: BTreeMap<String, String>,
        a: i64,
        b: i64,
        pre: f64,
        post: f64,
        vol: f64,
        inc: &Incident,
        required: bool,
    ) -> TruthIncident {
        TruthIncident {
            id,
            kind: kind.into(),
            metric: metric.into(),
            series,
            start: fmt_time(a),
            end: fmt_time(b),
            magnitude: round6(if kind == "shift" {
                post - pre
            } else {
                post / pre - 1.0
            }),
            pre: round6(pre),
            post: round6(post),
            volume_per_window: round6(vol),
            change_id: match &inc.effect {
                Effect::Change(c) => Some(c.change_id.clone()),
                _ => None,
            },
            required,
            source: inc.id.clone(),
            cause: inc.kind.as_str().into(),
            sd: None,
        }
    }

    for inc in &sc.incidents {
        let (a, b) = (inc.from_ms, inc.to_ms);
        match &inc.effect {
            Effect::Rate {
                rate,
                mult,
                country: seg,
            } => {
                let (metric, kind, per_session) = match rate {
                    RateKind::Conversion => ("conversion_rate", "drop", 1.0),
                    RateKind::Ctr => ("click_through_rate", "drop", 1.0),
                    RateKind::Ticket => ("support_tickets_per_session", "spike", 1.0),
                    RateKind::Unsubscribe => ("unsubscribe_rate", "spike", sc.rates.message),
                };
                let metric = inc.metric.as_deref().unwrap_or(metric);
                let kind = if *mult < 1.0 { "drop" } else { kind };
                let kind = if *mult > 1.0 { "spike" } else { kind };
                let seg_series = seg.filter(|_| metric_has_countries(metric));
                let pre_seg = sc.base_rate(*rate, *seg);
                let pre_total = sc.base_rate(*rate, None);
                let share = seg.map(|i| sc.segments[i].share).unwrap_or(1.0);
                if seg_series.is_some() || seg.is_none() {
                    out.push(rec(
                        inc.id.clone(),
                        kind,
                        metric,
                        dims(country(seg_series)),
                        a,
                        b,
                        pre_seg,
                        pre_seg * mult,
                        per_window(*seg, a, b, per_session),
                        inc,
                        inc.required,
                    ));
                }
                if seg.is_none() && metric_has_countries(metric) {
                    for (i, s) in sc.segments.iter().enumerate() {
                        let pre = sc.base_rate(*rate, Some(i));
                        out.push(rec(
                            format!("{}~{}", inc.id, s.country),
                            kind,
                            metric,
                            dims(Some(&s.country)),
                            a,
                            b,
                            pre,
                            pre * mult,
                            per_window(Some(i), a, b, per_session),
                            inc,
                            false,
                        ));
                    }
                }
                if seg.is_some() {
                    // The segment's effect, diluted, in the metric's total.
                    let post_total = pre_total + share * pre_seg * (mult - 1.0);
                    let primary = seg_series.is_none();
                    out.push(rec(
                        if primary {
                            inc.id.clone()
                        } else {
                            format!("{}~total", inc.id)
                        },
                        kind,
                        metric,
                        BTreeMap::new(),
                        a,
                        b,
                        pre_total,
                        post_total,
                        per_window(None, a, b, per_session),
                        inc,
                        primary && inc.required,
                    ));
                }
            }
            Effect::Erosion {
                delta,
                country: seg,
                ..
            } => {
                let metric = inc.metric.as_deref().unwrap_or("brand_sentiment");
                let seg_series = seg.filter(|_| metric_has_countries(metric));
                let share = seg.map(|i| sc.segments[i].share).unwrap_or(1.0);
                let (post_seg, _) =
                    clamped_normal_moments(sc.rates.brand_mean + delta, sc.rates.brand_sd);
                let post = if seg_series.is_some() {
                    post_seg
                } else {
                    brand_pre + share * (post_seg - brand_pre)
                };
                let mut r = rec(
                    inc.id.clone(),
                    "drift",
                    metric,
                    dims(country(seg_series)),
                    a,
                    b,
                    brand_pre,
                    post,
                    per_window(seg_series.and(*seg), a, b, sc.rates.brand_signal),
                    inc,
                    inc.required,
                );
                r.sd = Some(round6(brand_sd));
                out.push(r);
            }
            Effect::Mix {
                dim,
                value,
                to_share,
                country: seg,
            } => {
                let default_metric = match dim {
                    MixDim::Device => "device_mix".to_string(),
                    MixDim::Channel => "channel_mix".to_string(),
                };
                let metric = inc.metric.clone().unwrap_or(default_metric);
                let pre = sc.mix(*dim)[*value].1;
                out.push(rec(
                    inc.id.clone(),
                    "shift",
                    &metric,
                    dims(country(*seg)),
                    a,
                    b,
                    pre,
                    *to_share,
                    per_window(*seg, a, b, 1.0),
                    inc,
                    inc.required,
                ));
                if seg.is_none() {
                    for (i, s) in sc.segments.iter().enumerate() {
                        out.push(rec(
                            format!("{}~{}", inc.id, s.country),
                            "shift",
                            &metric,
                            dims(Some(&s.country)),
                            a,
                            b,
                            pre,
                            *to_share,
                            per_window(Some(i), a, b, 1.0),
                            inc,
                            false,
                        ));
                    }
                }
                if let Some(i) = seg {
                    let share = sc.segments[*i].share;
                    out.push(rec(
                        format!("{}~total", inc.id),
                        "shift",
                        &metric,
                        BTreeMap::new(),
                        a,
                        b,
                        pre,
                        pre + share * (to_share - pre),
                        per_window(None, a, b, 1.0),
                        inc,
                        false,
                    ));
                }
            }
            Effect::Outage {
                events,
                country: seg,
            } => {
                // Which metrics lose their numerator (or everything).
                let hit: Vec<(&str, Option<RateKind>)> = match events.as_deref() {
                    None | Some("session") => vec![
                        ("conversion_rate", Some(RateKind::Conversion)),
                        ("click_through_rate", Some(RateKind::Ctr)),
                        ("support_tickets_per_session", Some(RateKind::Ticket)),
                        ("device_mix", None),
                    ],
                    Some("conversion") => vec![("conversion_rate", Some(RateKind::Conversion))],
                    Some("click") => vec![("click_through_rate", Some(RateKind::Ctr))],
                    Some("support_ticket") => {
                        vec![("support_tickets_per_session", Some(RateKind::Ticket))]
                    }
                    Some("unsubscribe") => {
                        vec![("unsubscribe_rate", Some(RateKind::Unsubscribe))]
                    }
                    Some(_) => vec![],
                };
                let whole = events.is_none() || events.as_deref() == Some("session");
                for (k, (metric, rate)) in hit.iter().enumerate() {
                    let metric = if k == 0 {
                        inc.metric.as_deref().unwrap_or(metric)
                    } else {
                        metric
                    };
                    let pre = rate.map(|r| sc.base_rate(r, *seg)).unwrap_or(1.0);
                    let id = if k == 0 {
                        inc.id.clone()
                    } else {
                        format!("{}~{metric}", inc.id)
                    };
                    let seg_series = seg.filter(|_| metric_has_countries(metric));
                    if seg.is_some() && seg_series.is_none() {
                        continue;
                    }
                    let mut r = rec(
                        id,
                        "data_quality",
                        metric,
                        dims(country(seg_series)),
                        a,
                        b,
                        pre,
                        0.0,
                        per_window(*seg, a, b, 1.0),
                        inc,
                        k == 0 && inc.required,
                    );
                    r.magnitude = -1.0;
                    out.push(r);
                    // A numerator outage in one country shows in the metric's total too.
                    if let (Some(i), false, Some(rk)) = (seg, whole, rate) {
                        let pre_t = sc.base_rate(*rk, None);
                        let share = sc.segments[*i].share;
                        let mut r = rec(
                            format!("{}~total", inc.id),
                            "data_quality",
                            metric,
                            BTreeMap::new(),
                            a,
                            b,
                            pre_t,
                            pre_t - share * pre,
                            per_window(None, a, b, 1.0),
                            inc,
                            false,
                        );
                        r.cause = "tracking_outage".into();
                        out.push(r);
                    }
                    // A global numerator outage hits every country's series.
                    if seg.is_none() && metric_has_countries(metric) {
                        for (i, s) in sc.segments.iter().enumerate() {
                            let mut r = rec(
                                format!("{}~{metric}:{}", inc.id, s.country),
                                "data_quality",
                                metric,
                                dims(Some(&s.country)),
                                a,
                                b,
                                rate.map(|r| sc.base_rate(r, Some(i))).unwrap_or(1.0),
                                0.0,
                                per_window(Some(i), a, b, 1.0),
                                inc,
                                false,
                            );
                            r.magnitude = -1.0;
                            out.push(r);
                        }
                    }
                }
            }
            Effect::Change(c) => {
                // A harmless change has no records (only its entry in `changes`). A gradual
                // rollout's records start at the true start with the full-rollout magnitude
                // (the effect grows into it); a skewed record moves none of them.
                let h = c.holdout.unwrap_or(0.0);
                let harms: Vec<(&str, &str, RateKind, f64)> = [
                    (
                        "conversion_rate",
                        "drop",
                        RateKind::Conversion,
                        c.conversion_mult,
                    ),
                    ("click_through_rate", "drop", RateKind::Ctr, c.ctr_mult),
                    (
                        "support_tickets_per_session",
                        "spike",
                        RateKind::Ticket,
                        c.ticket_mult,
                    ),
                ]
                .into_iter()
                .filter(|(_, kind, _, m)| {
                    (*kind == "drop" && *m < 1.0) || (*kind == "spike" && *m > 1.0)
                })
                .collect();
                let seg = c.country;
                let share = seg.map(|i| sc.segments[i].share).unwrap_or(1.0);
                for (k, (metric, kind, rate, mult)) in harms.iter().enumerate() {
                    let suffix = if k == 0 {
                        String::new()
                    } else {
                        format!(":{metric}")
                    };
                    let pre = sc.base_rate(*rate, seg);
                    if c.holdout.is_some() {
                        let series = [("change_id".to_string(), c.change_id.clone())]
                            .into_iter()
                            .collect();
                        out.push(rec(
                            format!("{}{suffix}", inc.id),
                            "guardrail_breach",
                            metric,
                            series,
                            a,
                            b,
                            pre,
                            pre * mult,
                            per_window(seg, a, b, 1.0),
                            inc,
                            inc.required,
                        ));
                    }
                    // What the segment's series sees: treatment and holdout mixed.
                    let seen = (1.0 - h) * mult + h;
                    let id = if c.holdout.is_some() {
                        format!("{}~{}{suffix}", inc.id, country(seg).unwrap_or("total"))
                    } else {
                        format!("{}{suffix}", inc.id)
                    };
                    out.push(rec(
                        id,
                        kind,
                        metric,
                        dims(country(seg)),
                        a,
                        b,
                        pre,
                        pre * seen,
                        per_window(seg, a, b, 1.0),
                        inc,
                        inc.required,
                    ));
                    if seg.is_none() {
                        for (i, s) in sc.segments.iter().enumerate() {
                            let pre = sc.base_rate(*rate, Some(i));
                            out.push(rec(
                                format!("{}~{}{suffix}", inc.id, s.country),
                                kind,
                                metric,
                                dims(Some(&s.country)),
                                a,
                                b,
                                pre,
                                pre * seen,
                                per_window(Some(i), a, b, 1.0),
                                inc,
                                false,
                            ));
                        }
                    }
                    if seg.is_some() {
                        let pre_t = sc.base_rate(*rate, None);
                        out.push(rec(
                            format!("{}~total{suffix}", inc.id),
                            kind,
                            metric,
                            BTreeMap::new(),
                            a,
                            b,
                            pre_t,
                            pre_t + share * pre * (seen - 1.0),
                            per_window(None, a, b, 1.0),
                            inc,
                            false,
                        ));
                    }
                }
                // A gain's end: the level its series learnt while it lasted falls back, a real
                // move the engine may report (blaming the change's rollback). Not required,
                // and not a false alarm, for a few hours after the end.
                let gains = [
                    (
                        "conversion_rate",
                        "drop",
                        RateKind::Conversion,
                        c.conversion_mult > 1.0,
                        c.conversion_mult,
                    ),
                    (
                        "click_through_rate",
                        "drop",
                        RateKind::Ctr,
                        c.ctr_mult > 1.0,
                        c.ctr_mult,
                    ),
                    (
                        "support_tickets_per_session",
                        "spike",
                        RateKind::Ticket,
                        c.ticket_mult < 1.0,
                        c.ticket_mult,
                    ),
                ];
                let (ea, eb) = (b, b + GAIN_END_MS);
                for (metric, kind, rate, gained, mult) in gains {
                    if !gained {
                        continue;
                    }
                    let seen = (1.0 - h) * mult + h;
                    let mut scopes: Vec<Option<usize>> = vec![seg];
                    if seg.is_none() {
                        scopes.extend((0..sc.segments.len()).map(Some));
                    } else {
                        scopes.push(None);
                    }
                    for sg in scopes {
                        let pre = sc.base_rate(rate, sg);
                        let name = country(sg).unwrap_or("total");
                        let mut r = rec(
                            format!("{}~end~{name}:{metric}", inc.id),
                            kind,
                            metric,
                            dims(country(sg)),
                            ea,
                            eb,
                            pre * seen,
                            pre,
                            per_window(sg, ea, eb, 1.0),
                            inc,
                            false,
                        );
                        r.cause = "the end of a gain (rolled back)".into();
                        out.push(r);
                    }
                }
            }
        }
    }
    // Gaps: every series in their scope loses its events; not required, but alerts on them
    // are data-quality detections, not false alarms.
    for g in &sc.gaps {
        for (metric, per_country) in CATALOG {
            let scopes: Vec<Option<&str>> = match g.country {
                Some(i) if per_country => vec![Some(sc.segments[i].country.as_str())],
                Some(_) => vec![],
                None if per_country => std::iter::once(None)
                    .chain(sc.segments.iter().map(|s| Some(s.country.as_str())))
                    .collect(),
                None => vec![None],
            };
            for c in scopes {
                out.push(TruthIncident {
                    id: format!(
                        "{}~{metric}{}",
                        g.id,
                        c.map(|c| format!(":{c}")).unwrap_or_default()
                    ),
                    kind: "data_quality".into(),
                    metric: metric.into(),
                    series: dims(c),
                    start: fmt_time(g.from_ms),
                    end: fmt_time(g.to_ms),
                    magnitude: -1.0,
                    pre: 0.0,
                    post: 0.0,
                    volume_per_window: 0.0,
                    change_id: None,
                    required: false,
                    source: g.id.clone(),
                    cause: "gap".into(),
                    sd: None,
                });
            }
        }
    }
    let mut series = Vec::new();
    for (metric, per_country) in CATALOG {
        series.push(TruthSeries {
            metric: metric.into(),
            series: BTreeMap::new(),
        });
        if per_country {
            for s in &sc.segments {
                series.push(TruthSeries {
                    metric: metric.into(),
                    series: dims(Some(&s.country)),
                });
            }
        }
    }
    let weeks = (sc.end_ms - sc.start_ms) as f64 / WEEK_MS;
    let changes = sc
        .incidents
        .iter()
        .filter_map(|inc| match &inc.effect {
            Effect::Change(c) => Some(TruthChange {
                change_id: c.change_id.clone(),
                harmful: c.harmful(),
                start: fmt_time(inc.from_ms),
                record_ts: fmt_time(inc.from_ms + c.record_skew_ms),
                end: fmt_time(inc.to_ms),
                country: c.country.map(|i| sc.segments[i].country.clone()),
                holdout: c.holdout,
                rollout: !c.rollout.is_empty(),
                source: inc.id.clone(),
                tier: c.tier.clone(),
            }),
            _ => None,
        })
        .collect();
    Truth {
        scenario: sc.name.clone(),
        seed: sc.seed,
        start: fmt_time(sc.start_ms),
        end: fmt_time(sc.end_ms),
        window_secs: TRUTH_WINDOW_SECS,
        incidents: out,
        series_weeks: round6(series.len() as f64 * weeks),
        series,
        generated: stats,
        changes,
    }
}

fn round6(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1e6).round() / 1e6
    } else {
        x
    }
}

/// Files written by [`write_all`].
#[derive(Debug, Clone)]
pub struct Written {
    pub stats: GenStats,
    pub truth: Truth,
    pub changes: usize,
}

/// Generates events, changes and truth into files (any of the last two may be skipped).
pub fn write_all(
    sc: &Scenario,
    events: &Path,
    changes_out: Option<&Path>,
    truth_out: Option<&Path>,
) -> anyhow::Result<Written> {
    use anyhow::Context;
    let f =
        std::fs::File::create(events).with_context(|| format!("creating {}", events.display()))?;
    let mut w = io::BufWriter::with_capacity(1 << 20, f);
    let stats = generate(sc, &mut w).with_context(|| format!("writing {}", events.display()))?;
    w.flush()
        .with_context(|| format!("writing {}", events.display()))?;
    let ch = changes(sc);
    if let Some(p) = changes_out {
        std::fs::write(p, ch.iter().map(|c| format!("{c}\n")).collect::<String>())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let t = truth(sc, stats);
    if let Some(p) = truth_out {
        std::fs::write(p, serde_json::to_vec_pretty(&t).expect("truth serialises"))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(Written {
        stats,
        truth: t,
        changes: ch.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r#"
        name = "mini"
        start = "2026-11-02T12:00:00Z"
        duration = "2h"
        seed = 3
        peak_sessions_per_min = 600
        [[segments]]
        country = "FR"
        share = 0.7
        [[segments]]
        country = "LU"
        share = 0.3
        [late]
        share = 0.05
        too_late_share = 0.01
        [[incidents]]
        id = "drop"
        type = "conversion_drop"
        start = "+1h"
        duration = "30m"
        magnitude = 0.5
        country = "FR"
        [[incidents]]
        id = "chg"
        type = "change"
        start = "+30m"
        duration = "1h"
        country = "LU"
        holdout = 0.2
        ticket_mult = 3.0
    "#;

    #[test]
    fn durations_and_times() {
        assert_eq!(parse_duration_ms("90m"), Some(90 * 60_000));
        assert_eq!(parse_duration_ms("1d12h"), Some(36 * 3_600_000));
        assert_eq!(parse_duration_ms("0.5h"), Some(1_800_000));
        assert_eq!(parse_duration_ms("2x"), None);
        assert_eq!(parse_duration_ms("12"), None);
        assert_eq!(parse_when("+2h", 1000), Some(1000 + 7_200_000));
        assert_eq!(
            parse_when("2026-11-02T00:00:00Z", 0),
            parse_time_str("2026-11-02T00:00:00Z")
        );
    }

    #[test]
    fn errors_are_listed_with_their_place() {
        let bad = MINI
            .replace("magnitude = 0.5", "magnitude = 1.5\ndelta = 0.1")
            .replace(
                "country = \"LU\"\n        holdout",
                "country = \"XX\"\n        holdout",
            );
        let e = Scenario::from_str_named(&bad, "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("incidents[0] (drop): magnitude must be in (0, 1)"),
            "{e}"
        );
        assert!(
            e.contains("`delta` does not apply to type conversion_drop"),
            "{e}"
        );
        assert!(
            e.contains("country \"XX\" is not one of the segments (FR, LU)"),
            "{e}"
        );
        let unknown = MINI.replace("seed = 3", "seed = 3\nsede = 4");
        let e = Scenario::from_str_named(&unknown, "u.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `sede`"), "{e}");
        let future = MINI.replace("2026-11-02T12:00:00Z", "2999-01-01T00:00:00Z");
        let e = Scenario::from_str_named(&future, "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("in the future"), "{e}");
    }

    #[test]
    fn effects_show_in_the_events_and_the_truth() {
        let sc = Scenario::from_str_named(MINI, "mini.toml").unwrap();
        let mut buf = Vec::new();
        let stats = generate(&sc, &mut buf).unwrap();
        assert!(stats.events > 20_000, "{stats:?}");
        assert!(stats.delayed > 0 && stats.too_late > 0);
        let (mut conv, mut sess) = ([0u64; 2], [0u64; 2]);
        let (mut arms, mut holdout) = (0u64, 0u64);
        let mut last_ts = 0i64;
        let mut disorder = 0u64;
        let drop_from = sc.start_ms + 3_600_000;
        for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let e = crate::event::decode_event(line, 4096).unwrap();
            let mut c = [None];
            e.scan_dims(&["country"], &mut c);
            if c[0].as_deref() != Some("FR") {
                if e.ty == "session" && e.change_id.is_some() {
                    arms += 1;
                    holdout += (e.arm.as_deref() == Some("holdout")) as u64;
                }
                continue;
            }
            if e.ts_ms < last_ts - 120_000 {
                disorder += 1;
            }
            last_ts = last_ts.max(e.ts_ms);
            let k = (e.ts_ms >= drop_from && e.ts_ms < drop_from + 1_800_000) as usize;
            match e.ty.as_ref() {
                "session" => sess[k] += 1,
                "conversion" => conv[k] += 1,
                _ => {}
            }
        }
        let before = conv[0] as f64 / sess[0] as f64;
        let during = conv[1] as f64 / sess[1] as f64;
        assert!((before - 0.1).abs() < 0.01, "{before}");
        assert!((during - 0.05).abs() < 0.01, "{during}");
        let h = holdout as f64 / arms as f64;
        assert!(arms > 1000 && (h - 0.2).abs() < 0.04, "{holdout}/{arms}");
        assert!(disorder > 0, "too-late events arrive well after their time");
        let t = truth(&sc, stats);
        let d = t.incidents.iter().find(|i| i.id == "drop").unwrap();
        assert_eq!(d.kind, "drop");
        assert_eq!(d.series.get("country").map(String::as_str), Some("FR"));
        assert!((d.magnitude + 0.5).abs() < 1e-9 && (d.pre - 0.1).abs() < 1e-9);
        // 600/min peak x 0.7 x diurnal factor at 01:00 UTC x 5 minutes.
        let expect = 600.0 * 0.7 * sc.volume_factor(sc.start_ms + 3_900_000) * 5.0;
        assert!(
            (d.volume_per_window / expect - 1.0).abs() < 0.05,
            "{} {expect}",
            d.volume_per_window
        );
        let tot = t.incidents.iter().find(|i| i.id == "drop~total").unwrap();
        assert!(
            !tot.required && (tot.magnitude + 0.35).abs() < 1e-6,
            "{tot:?}"
        );
        let b = t
            .incidents
            .iter()
            .find(|i| i.kind == "guardrail_breach")
            .unwrap();
        assert_eq!(b.series.get("change_id").map(String::as_str), Some("chg"));
        assert_eq!(b.metric, "support_tickets_per_session");
        let seen = t.incidents.iter().find(|i| i.id == "chg~LU").unwrap();
        assert!((seen.magnitude - 0.8 * 2.0).abs() < 1e-6, "{seen:?}");
        // Six metrics' totals, and two countries for the four with country series.
        assert_eq!(t.series.len(), 6 + 4 * 2);
        let ch = changes(&sc);
        assert_eq!(ch[0]["holdout"], 0.2);
        assert_eq!(ch[1]["action"], "rolled_back");
    }

    /// FR and LU; a harmful FR change with a holdout, a gradual rollout and a record 5
    /// minutes early, and a harmless FR change overlapping it.
    const OVERLAP: &str = r#"
        name = "overlap"
        start = "2026-11-02T12:00:00Z"
        duration = "3h"
        seed = 5
        peak_sessions_per_min = 900
        [[segments]]
        country = "FR"
        share = 0.9
        [[segments]]
        country = "LU"
        share = 0.1
        [[incidents]]
        id = "harm"
        type = "change"
        change_id = "chg-harm"
        start = "+30m"
        duration = "2h"
        country = "FR"
        holdout = 0.2
        conversion_mult = 0.6
        record_skew = "-5m"
        rollout = [{share = 0.1, at = "+0m"}, {share = 0.5, at = "+30m"}, {share = 1.0, at = "+1h"}]
        [[incidents]]
        id = "nice"
        type = "change"
        change_id = "chg-nice"
        start = "+20m"
        duration = "2h"
        country = "FR"
        tier = "autonomous"
        conversion_mult = 1.0
    "#;

    #[test]
    fn signed_durations() {
        assert_eq!(parse_signed_duration_ms("-5m"), Some(-300_000));
        assert_eq!(parse_signed_duration_ms("+90s"), Some(90_000));
        assert_eq!(parse_signed_duration_ms("3m"), Some(180_000));
        assert_eq!(parse_signed_duration_ms("0s"), Some(0));
        assert_eq!(parse_signed_duration_ms("-"), None);
        assert_eq!(parse_signed_duration_ms("5"), None);
    }

    #[test]
    fn skewed_records_rollouts_and_harmless_overlapping_changes() {
        let sc = Scenario::from_str_named(OVERLAP, "overlap.toml").unwrap();
        let t0 = sc.start_ms;
        // The applied record runs 5 minutes early; the rollback keeps the true end.
        let ch = changes(&sc);
        let rec = |id: &str, action: &str| {
            ch.iter()
                .find(|c| c["change_id"] == id && c["action"] == action)
                .unwrap()["ts"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(rec("chg-harm", "applied"), fmt_time(t0 + 25 * MIN_MS));
        assert_eq!(rec("chg-harm", "rolled_back"), fmt_time(t0 + 150 * MIN_MS));
        assert_eq!(rec("chg-nice", "applied"), fmt_time(t0 + 20 * MIN_MS));
        // The rollout's steps are announced on the same (early) clock.
        let steps: Vec<_> = ch
            .iter()
            .filter(|c| c["change_id"] == "chg-harm" && c["action"] == "applied")
            .map(|c| (c["ts"].as_str().unwrap().to_string(), c["rollout"].as_f64()))
            .collect();
        assert_eq!(
            steps,
            [(25, 0.1), (55, 0.5), (85, 1.0)].map(|(m, s)| (fmt_time(t0 + m * MIN_MS), Some(s)))
        );
        // The events: the users reached grow 10% -> 50% -> 100%, a fifth of them held out;
        // only exposed users convert less.
        let mut buf = Vec::new();
        let stats = generate(&sc, &mut buf).unwrap();
        // [phase][treatment, holdout, untagged] sessions; conversions of treatment, holdout.
        let mut sess = [[0u64; 3]; 3];
        let mut conv = [[0u64; 3]; 3];
        for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let e = crate::event::decode_event(line, 4096).unwrap();
            let mut c = [None];
            e.scan_dims(&["country"], &mut c);
            let since = e.ts_ms - (t0 + 30 * MIN_MS);
            if c[0].as_deref() != Some("FR") || !(0..90 * MIN_MS).contains(&since) {
                if e.change_id.is_some() {
                    assert_eq!(c[0].as_deref(), Some("FR"), "only FR is tagged");
                    // (A session's later events may trail its second by up to 2 s.)
                    assert!(
                        (0..120 * MIN_MS + 3000).contains(&since),
                        "tagged out of time"
                    );
                }
                continue;
            }
            let phase = (since / (30 * MIN_MS)) as usize;
            let arm = match (e.change_id.as_deref(), e.arm.as_deref()) {
                (Some("chg-harm"), Some("treatment")) => 0,
                (Some("chg-harm"), Some("holdout")) => 1,
                (None, None) => 2,
                other => panic!("unexpected tag {other:?}"),
            };
            match e.ty.as_ref() {
                "session" => sess[phase][arm] += 1,
                "conversion" => conv[phase][arm] += 1,
                _ => {}
            }
        }
        for (phase, share) in [(0, 0.1), (1, 0.5), (2, 1.0)] {
            let n: u64 = sess[phase].iter().sum();
            let treat = sess[phase][0] as f64 / n as f64;
            let hold = sess[phase][1] as f64 / n as f64;
            assert!((treat - 0.8 * share).abs() < 0.03, "{phase}: {treat}");
            assert!((hold - 0.2 * share).abs() < 0.03, "{phase}: {hold}");
        }
        let rate = |arm: usize| {
            let c: u64 = conv.iter().map(|p| p[arm]).sum();
            let n: u64 = sess.iter().map(|p| p[arm]).sum();
            c as f64 / n as f64
        };
        assert!((rate(0) - 0.06).abs() < 0.012, "treatment {}", rate(0));
        assert!((rate(1) - 0.10).abs() < 0.015, "holdout {}", rate(1));
        assert!(
            (rate(2) - 0.10).abs() < 0.015,
            "not yet exposed {}",
            rate(2)
        );
        // The truth: both changes listed, only the harmful one has records, from the true
        // start, with the full-rollout magnitude.
        let t = truth(&sc, stats);
        assert_eq!(t.changes.len(), 2);
        let harm = t
            .changes
            .iter()
            .find(|c| c.change_id == "chg-harm")
            .unwrap();
        assert!(harm.harmful && harm.rollout);
        assert_eq!(harm.start, fmt_time(t0 + 30 * MIN_MS));
        assert_eq!(harm.record_ts, fmt_time(t0 + 25 * MIN_MS));
        assert_eq!(harm.end, fmt_time(t0 + 150 * MIN_MS));
        assert_eq!(
            (harm.country.as_deref(), harm.holdout),
            (Some("FR"), Some(0.2))
        );
        let nice = t
            .changes
            .iter()
            .find(|c| c.change_id == "chg-nice")
            .unwrap();
        assert!(!nice.harmful && !nice.rollout && nice.holdout.is_none());
        assert_eq!(nice.tier, "autonomous");
        assert!(t.incidents.iter().all(|i| i.source != "nice"));
        let fr = t.incidents.iter().find(|i| i.id == "harm~FR").unwrap();
        assert_eq!(fr.start, harm.start);
        assert!((fr.magnitude - 0.8 * -0.4).abs() < 1e-9, "{fr:?}");
        assert_eq!(fr.change_id.as_deref(), Some("chg-harm"));
        // An old truth file (no `changes`) still reads.
        let mut v = serde_json::to_value(&t).unwrap();
        v.as_object_mut().unwrap().remove("changes");
        let old: Truth = serde_json::from_value(v).unwrap();
        assert!(old.changes.is_empty());
    }

    #[test]
    fn rollout_exposure_only_grows_and_is_independent_of_the_holdout() {
        let n = 200_000u64;
        let (mut a, mut b, mut both) = (0, 0, 0);
        for u in 0..n {
            let x = in_rollout(u, "chg-x", 0.1);
            let y = in_rollout(u, "chg-x", 0.5);
            assert!(!x || y, "user {u} exposed at 10% but not at 50%");
            a += x as u64;
            b += y as u64;
            both += (y && in_holdout(u, "chg-x", 0.2)) as u64;
        }
        assert!((a as f64 / n as f64 - 0.1).abs() < 0.005);
        assert!((b as f64 / n as f64 - 0.5).abs() < 0.005);
        assert!((both as f64 / b as f64 - 0.2).abs() < 0.01);
        assert!(in_rollout(7, "chg-x", 1.0) && !in_rollout(7, "chg-x", 0.0));
    }

    #[test]
    fn change_keys_are_validated() {
        let bad = OVERLAP
            .replace("record_skew = \"-5m\"", "record_skew = \"-11m\"")
            .replace(
                "{share = 0.1, at = \"+0m\"}",
                "{share = 0.6, at = \"+10m\"}",
            );
        let e = Scenario::from_str_named(&bad, "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("record_skew must be within +-10m"), "{e}");
        assert!(e.contains("rollout[0].at must be \"+0m\""), "{e}");
        assert!(e.contains("non-decreasing shares (rollout[1])"), "{e}");
        let bad = OVERLAP.replace("record_skew = \"-5m\"", "record_skew = \"soon\"");
        let e = Scenario::from_str_named(&bad, "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("record_skew \"soon\" is not a signed duration"),
            "{e}"
        );
        // Two changes with a holdout must not overlap in time and scope.
        let two = OVERLAP.replace(
            "conversion_mult = 1.0",
            "conversion_mult = 1.0\nholdout = 0.1",
        );
        let e = Scenario::from_str_named(&two, "two.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("incidents harm and nice: two changes with a holdout overlap"),
            "{e}"
        );
        // Elsewhere (LU) they may.
        let lu = two.replace(
            "change_id = \"chg-nice\"\n        start = \"+20m\"\n        duration = \"2h\"\n        country = \"FR\"",
            "change_id = \"chg-nice\"\n        start = \"+20m\"\n        duration = \"2h\"\n        country = \"LU\"",
        );
        assert_ne!(lu, two);
        Scenario::from_str_named(&lu, "lu.toml").unwrap();
    }

    #[test]
    fn a_change_in_a_tiny_country_has_its_truth() {
        let tiny = r#"
            start = "2026-11-02T12:00:00Z"
            duration = "2h"
            seed = 1
            peak_sessions_per_min = 2000
            [rates]
            ticket = 0.004
            [[segments]]
            country = "US"
            share = 0.999
            [[segments]]
            country = "LU"
            share = 0.001
            ticket_mult = 2.5
            conversion_mult = 0.8
            [[incidents]]
            id = "lu"
            type = "change"
            start = "+1h"
            duration = "1h"
            country = "LU"
            conversion_mult = 0.7
            ticket_mult = 3.0
        "#;
        let sc = Scenario::from_str_named(tiny, "tiny.toml").unwrap();
        let t = truth(&sc, GenStats::default());
        let get = |id: &str| t.incidents.iter().find(|i| i.id == id).unwrap();
        let sessions = sc.expected_sessions(Some(1), sc.start_ms + HOUR_MS, sc.end_ms) / 12.0;
        // 2 sessions a minute at the peak: about 10 a window.
        assert!(sessions > 5.0 && sessions < 12.0, "{sessions}");
        let conv = get("lu");
        assert_eq!(conv.metric, "conversion_rate");
        assert_eq!(conv.series.get("country").map(String::as_str), Some("LU"));
        assert!(conv.required && conv.kind == "drop");
        assert!((conv.pre - 0.08).abs() < 1e-9 && (conv.post - 0.056).abs() < 1e-9);
        assert!(
            (conv.volume_per_window / sessions - 1.0).abs() < 1e-3,
            "{conv:?}"
        );
        let tick = get("lu:support_tickets_per_session");
        assert!(tick.required && tick.kind == "spike");
        assert!((tick.pre - 0.01).abs() < 1e-9 && (tick.post - 0.03).abs() < 1e-9);
        assert!((tick.magnitude - 2.0).abs() < 1e-9);
        // 0.01 tickets per session x ~10 sessions: well under one ticket per window.
        assert!(tick.pre * tick.volume_per_window < 0.15);
        for id in ["lu~total", "lu~total:support_tickets_per_session"] {
            let r = get(id);
            assert!(!r.required && r.series.is_empty(), "{r:?}");
            assert!(r.magnitude.abs() < 0.01 && r.magnitude != 0.0, "{r:?}");
        }
        assert!(t.incidents.iter().all(|i| i.metric != "click_through_rate"));
        assert_eq!(t.changes.len(), 1);
        assert!(t.changes[0].harmful);
    }

    #[test]
    fn clamped_moments() {
        let (m, s) = clamped_normal_moments(0.0, 0.1);
        assert!(m.abs() < 1e-9 && (s - 0.1).abs() < 1e-3);
        let (m, _) = clamped_normal_moments(0.35, 0.45);
        assert!(m < 0.35 && m > 0.3, "{m}");
    }
}
