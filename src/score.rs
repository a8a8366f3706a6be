//! `guardrail bench detect`: detection quality you can prove.
//!
//! Generates a scenario ([`crate::scenario`]) or takes events, changes and truth files, runs the
//! replay in process, and scores the alerts against the ground truth:
//!
//! - **Matching.** An alert matches a truth incident when its `metric` and `series` are equal,
//!   its kind is compatible ([`compatible`]) and its `onset` or its `detected_at` falls in
//!   `[start - 1 window, end + slack]`. An alert matches at most one incident (required ones
//!   first, then the nearest start); an incident is detected by its earliest matching alert.
//!   A `drop`, `spike` or `shift` alert on a `data_quality` incident's series and time is a
//!   **misread** (a tracking outage reported as a business change): neither a detection nor a
//!   false alarm, but it counts against precision. Every other alert is a **false alarm**.
//! - **Figures.** Recall over required incidents (and over *steps*: required drops of at least
//!   10% and spikes), precision = matched alerts / alerts, false alarms per series-week,
//!   misreads, and the detection delay of steps (median and p90) in windows and in events (the
//!   series' denominator since the true start).
//! - **Yardsticks.** Beside each step, the delay of a CUSUM oracle that knows the true pre and
//!   post rates (one-sided, on the same per-window data, started at 0 at the true start, with
//!   `h = ln ARL0`, `ARL0 = windows per week / false_alarms_per_series_week`) and the
//!   theoretical minimum `ln(ARL0) / KL` with KL the per-window divergence of the post from
//!   the pre observation at the expected volume. And a static rule as users write it in PromQL,
//!   per series: the 5-minute rate below 80% of its trailing 7-day average (above 150% for
//!   spike metrics), scored with the same matching.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use crate::baseline::Family;
use crate::config::{Config, Direction, MetricKind, Selector, SECS_PER_WEEK, TOP_LEVEL_DIMS};
use crate::event::{decode_event, fmt_time, parse_time_str};
use crate::scenario::{Truth, TruthIncident};

pub type Dims = BTreeMap<String, String>;

/// False alarms and misreads listed in `score.json` per detector (all are counted).
pub const MAX_LISTED: usize = 100;

/// Smallest relative effect of a drop for it to count as a step (spikes always do).
pub const STEP_MIN_EFFECT: f64 = 0.10;

/// An alert as the scorer needs it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Alert {
    pub id: String,
    pub metric: String,
    pub series: Dims,
    pub kind: String,
    pub onset_ms: i64,
    pub detected_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_low: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_high: Option<f64>,
    /// The confidence set of the onset, window-start times (drop, spike and shift alerts of
    /// engines that report it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onset_low_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onset_high_ms: Option<i64>,
    /// Alerts with one cause share it; None: the alert is its own group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The candidate changes' ids, best first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<String>,
}

impl Alert {
    pub fn new(
        id: &str,
        metric: &str,
        series: &[(&str, &str)],
        kind: &str,
        onset_ms: i64,
        detected_ms: i64,
    ) -> Alert {
        Alert {
            id: id.into(),
            metric: metric.into(),
            series: series
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            kind: kind.into(),
            onset_ms,
            detected_ms,
            expected: None,
            expected_low: None,
            expected_high: None,
            onset_low_ms: None,
            onset_high_ms: None,
            group_id: None,
            candidates: Vec::new(),
        }
    }

    /// The page this alert belongs to: its `group_id`, else its own incident.
    pub fn group(&self) -> &str {
        self.group_id.as_deref().unwrap_or(&self.id)
    }
}

/// The firing alerts of an `alerts.jsonl` (contract section 3), the first message of each
/// incident (escalations re-send it). `onset_low`, `onset_high`, `group_id` and
/// `candidate_changes` are optional: without them an alert's onset interval is unknown (not
/// covered), it is its own group and it names no change.
pub fn read_alerts(path: &Path) -> anyhow::Result<Vec<Alert>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading alerts {}", path.display()))?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        if v["status"] != "firing" {
            continue;
        }
        let id = v["incident_id"].as_str().unwrap_or_default().to_string();
        if !seen.insert(id.clone()) {
            continue;
        }
        let time = |k: &str| {
            v[k].as_str()
                .and_then(parse_time_str)
                .or_else(|| v[k].as_i64())
                .with_context(|| format!("{}:{}: `{k}` is not a time", path.display(), i + 1))
        };
        let series = v["series"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| v.to_string()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let opt_time = |k: &str| {
            v[k].as_str()
                .and_then(parse_time_str)
                .or_else(|| v[k].as_i64())
        };
        let candidates = v["candidate_changes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["change_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Alert {
            id,
            metric: v["metric"].as_str().unwrap_or_default().into(),
            series,
            kind: v["kind"].as_str().unwrap_or_default().into(),
            onset_ms: time("onset")?,
            detected_ms: time("detected_at")?,
            expected: v["expected"].as_f64(),
            expected_low: v["expected_low"].as_f64(),
            expected_high: v["expected_high"].as_f64(),
            onset_low_ms: opt_time("onset_low"),
            onset_high_ms: opt_time("onset_high"),
            group_id: v["group_id"]
                .as_str()
                .filter(|g| !g.is_empty())
                .map(str::to_string),
            candidates,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Matching

/// Whether an alert of kind `alert` reports a truth incident of kind `truth` whose relative
/// change is `magnitude`:
/// drop <- drop or shift; spike <- spike or shift; shift (a mix) <- shift or drift (the mix
/// detector's kind); drift <- drift, shift, or a step in the drift's direction (a slow drift
/// caught by the step detector); data_quality <- data_quality; guardrail_breach <-
/// guardrail_breach; anything else only by its own kind.
pub fn compatible(truth: &str, magnitude: f64, alert: &str) -> bool {
    match truth {
        "drop" => matches!(alert, "drop" | "shift"),
        "spike" => matches!(alert, "spike" | "shift"),
        "shift" => matches!(alert, "shift" | "drift"),
        "drift" => {
            matches!(alert, "drift" | "shift")
                || (alert == "drop" && magnitude < 0.0)
                || (alert == "spike" && magnitude > 0.0)
        }
        t => t == alert,
    }
}

/// A business-change alert on a data-quality incident: the outage was misread.
pub fn is_misread(truth: &str, alert: &str) -> bool {
    truth == "data_quality" && matches!(alert, "drop" | "spike" | "shift")
}

/// Whether an alert's series is the truth's: equal dims, ignoring `share_of` (which `share`
/// metrics add to name the dimension whose mix they watch).
pub fn same_series(truth: &Dims, alert: &Dims) -> bool {
    alert
        .iter()
        .filter(|(k, _)| k.as_str() != "share_of" || truth.contains_key("share_of"))
        .eq(truth.iter())
}

/// Whether a truth record is a step the floors apply to: required, a drop of at least
/// [`STEP_MIN_EFFECT`] or a spike.
pub fn is_step(t: &TruthIncident) -> bool {
    t.required
        && ((t.kind == "drop" && t.magnitude <= -STEP_MIN_EFFECT + 1e-12) || t.kind == "spike")
}

#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub window_ms: i64,
    /// How long after a truth incident's end an alert still matches it.
    pub slack_ms: i64,
}

/// A truth incident with parsed times.
#[derive(Debug, Clone)]
struct TruthT<'a> {
    t: &'a TruthIncident,
    start: i64,
    end: i64,
}

fn parse_truth(truth: &Truth) -> anyhow::Result<Vec<TruthT<'_>>> {
    truth
        .incidents
        .iter()
        .map(|t| {
            let p = |s: &str| {
                parse_time_str(s)
                    .with_context(|| format!("truth incident {}: bad time {s:?}", t.id))
            };
            Ok(TruthT {
                t,
                start: p(&t.start)?,
                end: p(&t.end)?,
            })
        })
        .collect()
}

/// What happened to one truth incident.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Outcome {
    pub id: String,
    pub kind: String,
    pub metric: String,
    pub series: Dims,
    pub magnitude: f64,
    pub required: bool,
    pub step: bool,
    pub detected: bool,
    pub misread: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detected_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_windows: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_events: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlertBrief {
    pub id: String,
    pub metric: String,
    pub series: Dims,
    pub kind: String,
    pub onset: String,
    pub detected_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truth: Option<String>,
}

impl AlertBrief {
    fn of(a: &Alert, truth: Option<&str>) -> AlertBrief {
        AlertBrief {
            id: a.id.clone(),
            metric: a.metric.clone(),
            series: a.series.clone(),
            kind: a.kind.clone(),
            onset: fmt_time(a.onset_ms),
            detected_at: fmt_time(a.detected_ms),
            truth: truth.map(str::to_string),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct KindCount {
    pub incidents: usize,
    pub detected: usize,
}

/// One detector's score.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DetectorScore {
    pub detector: String,
    pub alerts: usize,
    pub matched_alerts: usize,
    pub misread_alerts: usize,
    pub false_alarms: usize,
    pub series_weeks: f64,
    pub false_alarms_per_series_week: f64,
    pub required: usize,
    pub detected: usize,
    pub recall: f64,
    pub steps: usize,
    pub steps_detected: usize,
    pub recall_steps: f64,
    pub precision: f64,
    /// Required data-quality incidents reported as a business change (and not detected).
    pub misread_incidents: usize,
    /// Over detected steps.
    pub delay_windows_median: Option<f64>,
    pub delay_windows_p90: Option<f64>,
    pub delay_events_median: Option<f64>,
    pub delay_events_p90: Option<f64>,
    pub by_kind: BTreeMap<String, KindCount>,
    pub outcomes: Vec<Outcome>,
    pub false_alarm_list: Vec<AlertBrief>,
    pub misread_list: Vec<AlertBrief>,
    /// Blame, rollbacks, onset intervals and pages ([`attribution`]); guardrail only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Attribution>,
}

/// Percentile by linear interpolation between order statistics (R's type 7): the median of
/// [1, 2, 3, 10] is 2.5 and its p90 is 7.9.
pub fn percentile(xs: &[f64], q: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

/// What one alert matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    /// The index of the truth record it reports.
    Truth(usize),
    /// A business change reported on this data-quality record.
    Misread(usize),
    /// A false alarm.
    None,
}

/// Matches every alert to at most one truth record (module documentation).
fn match_alerts(ts: &[TruthT], alerts: &[Alert], rules: &Rules) -> Vec<Match> {
    let w = rules.window_ms;
    let in_time = |a: &Alert, t: &TruthT| {
        let (lo, hi) = (t.start - w, t.end + rules.slack_ms);
        (a.onset_ms >= lo && a.onset_ms <= hi) || (a.detected_ms >= lo && a.detected_ms <= hi)
    };
    alerts
        .iter()
        .map(|a| {
            let cands: Vec<usize> = (0..ts.len())
                .filter(|&i| {
                    let t = &ts[i];
                    t.t.metric == a.metric && same_series(&t.t.series, &a.series) && in_time(a, t)
                })
                .collect();
            let best = cands
                .iter()
                .copied()
                .filter(|&i| compatible(&ts[i].t.kind, ts[i].t.magnitude, &a.kind))
                .min_by_key(|&i| (!ts[i].t.required, (ts[i].start - a.onset_ms).abs()));
            if let Some(i) = best {
                Match::Truth(i)
            } else if let Some(&i) = cands.iter().find(|&&i| is_misread(&ts[i].t.kind, &a.kind)) {
                Match::Misread(i)
            } else {
                Match::None
            }
        })
        .collect()
}

/// Scores `alerts` against `truth`. `data` (per-window series) gives delays in events.
pub fn score(
    detector: &str,
    truth: &Truth,
    alerts: &[Alert],
    rules: &Rules,
    series_weeks: f64,
    data: Option<&SeriesData>,
) -> anyhow::Result<DetectorScore> {
    let ts = parse_truth(truth)?;
    let w = rules.window_ms;
    // Earliest alert per truth incident.
    let mut first: Vec<Option<&Alert>> = vec![None; ts.len()];
    let mut misread_of: Vec<bool> = vec![false; ts.len()];
    let (mut matched, mut misread) = (0, 0);
    let mut fa_list = Vec::new();
    let mut misread_list = Vec::new();
    for (a, m) in alerts.iter().zip(match_alerts(&ts, alerts, rules)) {
        match m {
            Match::Truth(i) => {
                matched += 1;
                if first[i]
                    .map(|f| a.detected_ms < f.detected_ms)
                    .unwrap_or(true)
                {
                    first[i] = Some(a);
                }
            }
            Match::Misread(i) => {
                misread += 1;
                misread_of[i] = true;
                misread_list.push(AlertBrief::of(a, Some(&ts[i].t.id)));
            }
            Match::None => fa_list.push(AlertBrief::of(a, None)),
        }
    }
    let mut outcomes = Vec::new();
    let mut by_kind: BTreeMap<String, KindCount> = BTreeMap::new();
    let (mut required, mut detected, mut steps, mut steps_detected) = (0, 0, 0, 0);
    let mut misread_incidents = 0;
    let (mut dw, mut de) = (Vec::new(), Vec::new());
    for (i, t) in ts.iter().enumerate() {
        let step = is_step(t.t);
        let a = first[i];
        let delay_windows = a.map(|a| ((a.detected_ms - t.start).max(0)) as f64 / w as f64);
        let delay_events = a.and_then(|a| {
            data.and_then(|d| d.sum_den(&t.t.metric, &t.t.series, t.start, a.detected_ms))
        });
        if t.t.required {
            required += 1;
            detected += a.is_some() as usize;
            let k = by_kind.entry(t.t.kind.clone()).or_default();
            k.incidents += 1;
            k.detected += a.is_some() as usize;
            if a.is_none() && misread_of[i] {
                misread_incidents += 1;
            }
        }
        if step {
            steps += 1;
            if a.is_some() {
                steps_detected += 1;
                dw.extend(delay_windows);
                de.extend(delay_events);
            }
        }
        outcomes.push(Outcome {
            id: t.t.id.clone(),
            kind: t.t.kind.clone(),
            metric: t.t.metric.clone(),
            series: t.t.series.clone(),
            magnitude: t.t.magnitude,
            required: t.t.required,
            step,
            detected: a.is_some(),
            misread: misread_of[i] && a.is_none(),
            alert_id: a.map(|a| a.id.clone()),
            alert_kind: a.map(|a| a.kind.clone()),
            detected_at: a.map(|a| fmt_time(a.detected_ms)),
            delay_windows,
            delay_events,
        });
    }
    let ratio = |n: usize, d: usize| if d == 0 { 1.0 } else { n as f64 / d as f64 };
    let fa = fa_list.len();
    Ok(DetectorScore {
        detector: detector.into(),
        alerts: alerts.len(),
        matched_alerts: matched,
        misread_alerts: misread,
        false_alarms: fa,
        series_weeks,
        false_alarms_per_series_week: if series_weeks > 0.0 {
            fa as f64 / series_weeks
        } else {
            0.0
        },
        required,
        detected,
        recall: ratio(detected, required),
        steps,
        steps_detected,
        recall_steps: ratio(steps_detected, steps),
        precision: ratio(matched, alerts.len()),
        misread_incidents,
        delay_windows_median: percentile(&dw, 0.5),
        delay_windows_p90: percentile(&dw, 0.9),
        delay_events_median: percentile(&de, 0.5),
        delay_events_p90: percentile(&de, 0.9),
        by_kind,
        outcomes,
        false_alarm_list: fa_list,
        misread_list,
        attribution: None,
    })
}

// ---------------------------------------------------------------------------------------------
// Attribution: which change is blamed, what is rolled back, where the onset is, how many pages

/// A rollback request of `rollbacks.jsonl` (contract section 4) as the scorer needs it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RollbackReq {
    /// The CloudEvent `id`.
    pub id: String,
    pub change_id: String,
    pub incident_id: String,
}

impl RollbackReq {
    pub fn new(id: &str, change_id: &str, incident_id: &str) -> RollbackReq {
        RollbackReq {
            id: id.into(),
            change_id: change_id.into(),
            incident_id: incident_id.into(),
        }
    }
}

/// The rollback requests of a `rollbacks.jsonl`, once each by CloudEvent `id` (a missing file
/// has none).
pub fn read_rollbacks(path: &Path) -> anyhow::Result<Vec<RollbackReq>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let id = v["id"].as_str().unwrap_or_default().to_string();
        if !seen.insert(id.clone()) {
            continue;
        }
        out.push(RollbackReq {
            id,
            change_id: v["data"]["change_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            incident_id: v["data"]["incident_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        });
    }
    Ok(out)
}

/// A detected truth record whose detecting alert did not name its change first.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AttributionMiss {
    /// The truth record.
    pub id: String,
    pub change_id: String,
    pub alert_id: String,
    /// The alert's first candidate (None: it named no change).
    pub named: Option<String>,
}

/// Pages of one cause (a scenario incident).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CausePages {
    pub source: String,
    /// Alerts matched to the cause's truth records.
    pub alerts: usize,
    /// Distinct `group_id` among them.
    pub pages: usize,
}

/// Blame, rollbacks, onset intervals and pages of one detector's alerts.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Attribution {
    /// Detected required truth records that have a `change_id`.
    pub top1_n: usize,
    /// ... whose detecting alert names that change first.
    pub top1_correct: usize,
    pub top1_accuracy: Option<f64>,
    pub top1_misses: Vec<AttributionMiss>,
    /// Rollback requests (distinct CloudEvent ids).
    pub rollbacks: usize,
    /// Requests naming a harmless change of the truth (must be 0).
    pub harmless_rolled_back: usize,
    /// The harmless changes they name.
    pub harmless_rolled_back_changes: Vec<String>,
    /// Requests per harmful change (0: never rolled back; ideally 1).
    pub rollbacks_per_harmful_change: BTreeMap<String, usize>,
    /// Requests naming a change the truth does not know.
    pub unknown_change_rollbacks: usize,
    /// Detected required drop and spike records.
    pub onset_n: usize,
    /// ... whose detecting alert's onset interval holds the true start:
    /// `onset_low <= start < onset_high + window`.
    pub onset_covered: usize,
    pub onset_coverage: Option<f64>,
    /// ... whose detecting alert has an onset interval at all.
    pub onset_intervals: usize,
    /// The records whose interval misses the true start (truth id).
    pub onset_misses: Vec<String>,
    /// Windows in the interval, `(onset_high - onset_low) / window + 1`, median.
    pub onset_width_windows_median: Option<f64>,
    /// `|onset - true start|` in windows, median.
    pub onset_error_windows_median: Option<f64>,
    /// Causes (scenario incidents) with a detected required record.
    pub causes: usize,
    pub pages_per_cause_mean: Option<f64>,
    pub pages_per_cause_max: Option<usize>,
    pub pages: Vec<CausePages>,
    /// All firing alerts (first message per incident) and their distinct groups.
    pub firing_alerts: usize,
    pub groups: usize,
}

/// Scores attribution: `scored` is [`score`]'s result for the same `truth` and `alerts`.
///
/// - **Top-1 attribution accuracy**: over the detected required truth records with a
///   `change_id`, the share whose detecting alert (the earliest matching one, as for recall)
///   has that change as its first candidate.
/// - **Harmless changes rolled back**: requests naming a change that `truth.changes` lists as
///   harmless; and requests per harmful change (a change of `truth.changes` marked harmful,
///   or named by a required truth record).
/// - **Onset-interval coverage**: over the detected required drops and spikes, the share whose
///   detecting alert has `onset_low <= start < onset_high + window` (no interval: not
///   covered); the median width of the interval in windows and the median `|onset - start|`.
/// - **Pages per cause**: alerts are matched to truth records as for precision; per scenario
///   incident (`source`) with a detected required record, the distinct `group_id` of the
///   alerts matched to any of its records (an alert without a group is its own).
pub fn attribution(
    truth: &Truth,
    alerts: &[Alert],
    scored: &DetectorScore,
    rollbacks: &[RollbackReq],
    rules: &Rules,
) -> anyhow::Result<Attribution> {
    let ts = parse_truth(truth)?;
    anyhow::ensure!(
        scored.outcomes.len() == ts.len(),
        "attribution: the score is of another truth ({} outcomes, {} records)",
        scored.outcomes.len(),
        ts.len()
    );
    let w = rules.window_ms as f64;
    let by_id: HashMap<&str, &Alert> = alerts.iter().map(|a| (a.id.as_str(), a)).collect();
    let detecting = |i: usize| {
        scored.outcomes[i]
            .alert_id
            .as_deref()
            .and_then(|id| by_id.get(id).copied())
    };
    let mut r = Attribution::default();
    let (mut widths, mut errors) = (Vec::new(), Vec::new());
    for (i, t) in ts.iter().enumerate() {
        let Some(a) = detecting(i).filter(|_| t.t.required) else {
            continue;
        };
        if let Some(c) = &t.t.change_id {
            r.top1_n += 1;
            let named = a.candidates.first();
            if named == Some(c) {
                r.top1_correct += 1;
            } else {
                r.top1_misses.push(AttributionMiss {
                    id: t.t.id.clone(),
                    change_id: c.clone(),
                    alert_id: a.id.clone(),
                    named: named.cloned(),
                });
            }
        }
        if matches!(t.t.kind.as_str(), "drop" | "spike") {
            r.onset_n += 1;
            errors.push((a.onset_ms - t.start).abs() as f64 / w);
            if let (Some(lo), Some(hi)) = (a.onset_low_ms, a.onset_high_ms) {
                r.onset_intervals += 1;
                widths.push(((hi - lo) as f64 / w + 1.0).max(0.0));
                if lo <= t.start && t.start < hi + rules.window_ms {
                    r.onset_covered += 1;
                    continue;
                }
            }
            r.onset_misses.push(t.t.id.clone());
        }
    }
    let share = |n: usize, d: usize| (d > 0).then(|| n as f64 / d as f64);
    r.top1_accuracy = share(r.top1_correct, r.top1_n);
    r.onset_coverage = share(r.onset_covered, r.onset_n);
    r.onset_width_windows_median = percentile(&widths, 0.5);
    r.onset_error_windows_median = percentile(&errors, 0.5);

    // Rollbacks.
    let mut harmful: BTreeMap<String, usize> = truth
        .changes
        .iter()
        .filter(|c| c.harmful)
        .map(|c| (c.change_id.clone(), 0))
        .collect();
    for t in truth.incidents.iter().filter(|t| t.required) {
        if let Some(c) = &t.change_id {
            harmful.entry(c.clone()).or_insert(0);
        }
    }
    let harmless: Vec<&str> = truth
        .changes
        .iter()
        .filter(|c| !c.harmful && !harmful.contains_key(&c.change_id))
        .map(|c| c.change_id.as_str())
        .collect();
    let known = |c: &str| truth.changes.iter().any(|x| x.change_id == c);
    r.rollbacks = rollbacks.len();
    for rb in rollbacks {
        if let Some(n) = harmful.get_mut(&rb.change_id) {
            *n += 1;
        } else if harmless.contains(&rb.change_id.as_str()) {
            r.harmless_rolled_back += 1;
            if !r.harmless_rolled_back_changes.contains(&rb.change_id) {
                r.harmless_rolled_back_changes.push(rb.change_id.clone());
            }
        } else if !known(&rb.change_id) {
            r.unknown_change_rollbacks += 1;
        }
    }
    r.rollbacks_per_harmful_change = harmful;

    // Pages per cause.
    let matches = match_alerts(&ts, alerts, rules);
    let mut groups: BTreeMap<&str, (usize, std::collections::BTreeSet<&str>)> = BTreeMap::new();
    for (a, m) in alerts.iter().zip(&matches) {
        if let Match::Truth(i) = m {
            let e = groups.entry(ts[*i].t.source.as_str()).or_default();
            e.0 += 1;
            e.1.insert(a.group());
        }
    }
    for (i, t) in ts.iter().enumerate() {
        if !(t.t.required && scored.outcomes[i].detected) {
            continue;
        }
        if r.pages.iter().any(|p| p.source == t.t.source) {
            continue;
        }
        let (n, g) = groups
            .get(t.t.source.as_str())
            .map(|(n, g)| (*n, g.len()))
            .unwrap_or((0, 0));
        r.pages.push(CausePages {
            source: t.t.source.clone(),
            alerts: n,
            pages: g,
        });
    }
    r.causes = r.pages.len();
    r.pages_per_cause_mean = (r.causes > 0)
        .then(|| r.pages.iter().map(|p| p.pages as f64).sum::<f64>() / r.causes as f64);
    r.pages_per_cause_max = r.pages.iter().map(|p| p.pages).max();
    r.firing_alerts = alerts.len();
    r.groups = alerts
        .iter()
        .map(Alert::group)
        .collect::<std::collections::HashSet<_>>()
        .len();
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Per-window series, recomputed from the events

/// One series' windows: numerator, denominator and sum of squares per window.
#[derive(Debug, Clone)]
pub struct SeriesWin {
    pub family: Family,
    pub direction: Direction,
    pub num: Vec<f64>,
    pub den: Vec<f64>,
    pub sumsq: Vec<f64>,
}

/// Every configured series of the `ratio`, `count` and `mean` metrics, window by window, as
/// the engine aggregates them (events past the allowed lateness are left out as it drops them).
#[derive(Debug, Clone)]
pub struct SeriesData {
    pub window_ms: i64,
    /// Window index of slot 0.
    pub first_w: i64,
    pub windows: usize,
    pub series: BTreeMap<(String, Dims), SeriesWin>,
}

fn family_of(kind: MetricKind) -> Option<Family> {
    match kind {
        MetricKind::Ratio => Some(Family::Binomial),
        MetricKind::Count => Some(Family::Poisson),
        MetricKind::Mean => Some(Family::Gaussian),
        MetricKind::Gauge | MetricKind::Distinct | MetricKind::Share => None,
    }
}

struct MetricSpec {
    name: String,
    family: Family,
    direction: Direction,
    num: Selector,
    den: Option<Selector>,
    dims: Vec<String>,
    total: bool,
}

impl SeriesData {
    pub fn from_events(cfg: &Config, path: &Path) -> anyhow::Result<SeriesData> {
        let specs: Vec<MetricSpec> = cfg
            .metrics()
            .filter_map(|m| {
                Some(MetricSpec {
                    name: m.name.clone(),
                    family: family_of(m.kind)?,
                    direction: m.direction,
                    num: m.numerator.clone(),
                    den: m.denominator.clone().or_else(|| m.exposure.clone()),
                    dims: m.dims.clone(),
                    total: m.include_total || m.dims.is_empty(),
                })
            })
            .collect();
        // Names looked up in the `dims` object: the metrics' dims and their selectors' filters.
        let mut names: Vec<String> = Vec::new();
        for s in &specs {
            for d in s.dims.iter().chain(
                std::iter::once(&s.num)
                    .chain(s.den.as_ref())
                    .flat_map(|sel| sel.dims.keys()),
            ) {
                if !TOP_LEVEL_DIMS.contains(&d.as_str()) && !names.contains(d) {
                    names.push(d.clone());
                }
            }
        }
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let window_ms = cfg.engine.window_secs as i64 * 1000;
        let lateness = cfg.engine.allowed_lateness_secs as i64 * 1000;
        let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let mut r = BufReader::with_capacity(1 << 20, f);
        let mut buf = Vec::new();
        let mut max_ts = i64::MIN;
        let mut first_w: Option<i64> = None;
        // (metric, dim values or None for the total) -> windows
        let mut acc: HashMap<(usize, Option<Vec<String>>), SeriesWin> = HashMap::new();
        let mut windows = 0usize;
        loop {
            buf.clear();
            if r.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
            let Ok(ev) = decode_event(line, cfg.engine.max_event_bytes) else {
                continue;
            };
            let w = ev.ts_ms.div_euclid(window_ms);
            if max_ts != i64::MIN && w < (max_ts - lateness).div_euclid(window_ms) {
                continue; // dead-lettered `too_late` by the engine
            }
            max_ts = max_ts.max(ev.ts_ms);
            let fw = *first_w.get_or_insert(w - 1);
            if w < fw {
                continue;
            }
            let slot = (w - fw) as usize;
            let mut vals: Vec<Option<std::borrow::Cow<str>>> = vec![None; name_refs.len()];
            ev.scan_dims(&name_refs, &mut vals);
            let dim = |n: &str| -> Option<&str> {
                ev.top_level_dim(n).or_else(|| {
                    name_refs
                        .iter()
                        .position(|x| *x == n)
                        .and_then(|i| vals[i].as_deref())
                })
            };
            let matches = |sel: &Selector| {
                sel.event_type == ev.ty
                    && sel
                        .surface
                        .as_deref()
                        .map(|s| ev.surface.as_deref() == Some(s))
                        .unwrap_or(true)
                    && sel
                        .name
                        .as_deref()
                        .map(|s| ev.name.as_deref() == Some(s))
                        .unwrap_or(true)
                    && sel.dims.iter().all(|(k, v)| dim(k) == Some(v.as_str()))
            };
            for (mi, s) in specs.iter().enumerate() {
                let is_num = matches(&s.num);
                let is_den = s.den.as_ref().map(&matches).unwrap_or(false);
                if !is_num && !is_den {
                    continue;
                }
                let (dn, dd, dq) = match s.family {
                    Family::Gaussian => {
                        let Some(v) = ev.value.filter(|_| is_num) else {
                            continue;
                        };
                        (v, 1.0, v * v)
                    }
                    _ => (is_num as u8 as f64, is_den as u8 as f64, 0.0),
                };
                let seg: Option<Vec<String>> =
                    s.dims.iter().map(|d| dim(d).map(str::to_string)).collect();
                let keys = [
                    s.total.then_some(None),
                    seg.filter(|_| !s.dims.is_empty()).map(Some),
                ];
                for key in keys.into_iter().flatten() {
                    let e = acc.entry((mi, key)).or_insert_with(|| SeriesWin {
                        family: s.family,
                        direction: s.direction,
                        num: Vec::new(),
                        den: Vec::new(),
                        sumsq: Vec::new(),
                    });
                    if e.num.len() <= slot {
                        e.num.resize(slot + 1, 0.0);
                        e.den.resize(slot + 1, 0.0);
                        e.sumsq.resize(slot + 1, 0.0);
                    }
                    e.num[slot] += dn;
                    e.den[slot] += dd;
                    e.sumsq[slot] += dq;
                }
            }
            windows = windows.max(slot + 1);
        }
        let mut series = BTreeMap::new();
        for ((mi, key), mut s) in acc {
            s.num.resize(windows, 0.0);
            s.den.resize(windows, 0.0);
            s.sumsq.resize(windows, 0.0);
            let spec = &specs[mi];
            if spec.family == Family::Poisson && spec.den.is_none() {
                s.den.iter_mut().for_each(|d| *d = 1.0);
            }
            let dims: Dims = match key {
                None => Dims::new(),
                Some(v) => spec.dims.iter().cloned().zip(v).collect(),
            };
            series.insert((spec.name.clone(), dims), s);
        }
        Ok(SeriesData {
            window_ms,
            first_w: first_w.unwrap_or(0),
            windows,
            series,
        })
    }

    pub fn get(&self, metric: &str, series: &Dims) -> Option<&SeriesWin> {
        self.series.get(&(metric.to_string(), series.clone()))
    }

    /// Slot of the window containing `ms` (may be out of range).
    pub fn slot(&self, ms: i64) -> i64 {
        ms.div_euclid(self.window_ms) - self.first_w
    }

    /// Denominator events of a series in the windows from the one holding `from_ms` up to the
    /// one ending at `to_ms` (a detection time).
    pub fn sum_den(&self, metric: &str, series: &Dims, from_ms: i64, to_ms: i64) -> Option<f64> {
        let s = self.get(metric, series)?;
        let a = self.slot(from_ms).max(0);
        let b = (self.slot(to_ms - 1) + 1).min(self.windows as i64);
        Some((a..b).map(|i| s.den[i as usize]).fold(0.0, |x, y| x + y))
    }
}

// ---------------------------------------------------------------------------------------------
// The static rule

#[derive(Debug, Clone, Copy, Serialize)]
pub struct NaiveRule {
    /// Fires below this fraction of the trailing average (drop metrics).
    pub below: f64,
    /// Fires above this multiple (spike metrics).
    pub above: f64,
    pub trailing_windows: usize,
    /// Windows of history before the rule is evaluated (the engine's warmup, for fairness).
    pub warmup_windows: usize,
    /// Consecutive windows the condition must hold before the alert fires (Prometheus `for:`;
    /// 1 fires at once).
    pub for_windows: usize,
}

impl NaiveRule {
    /// "static rule" or "static rule, for 15m".
    pub fn name(&self, window_ms: i64) -> String {
        if self.for_windows <= 1 {
            "static rule".into()
        } else {
            format!(
                "static rule, for {}m",
                self.for_windows as i64 * window_ms / 60_000
            )
        }
    }
}

impl Default for NaiveRule {
    fn default() -> Self {
        NaiveRule {
            below: 0.8,
            above: 1.5,
            trailing_windows: 7 * 288,
            warmup_windows: 144,
            for_windows: 1,
        }
    }
}

/// The static rule's alerts, per series, one each time the condition has held for
/// `for_windows` consecutive windows after being false:
/// `rate(num[5m]) / rate(den[5m]) < 0.8 * (sum_over_time(num[7d]) / sum_over_time(den[7d]))`.
/// Windows without a denominator evaluate to false (NaN compares false in PromQL).
pub fn naive_alerts(data: &SeriesData, rule: &NaiveRule) -> Vec<Alert> {
    let need = rule.for_windows.max(1);
    let mut out = Vec::new();
    let wm = data.window_ms;
    for ((metric, dims), s) in &data.series {
        let mut cn = vec![0.0; s.num.len() + 1];
        let mut cd = vec![0.0; s.den.len() + 1];
        for i in 0..s.num.len() {
            cn[i + 1] = cn[i] + s.num[i];
            cd[i + 1] = cd[i] + s.den[i];
        }
        let mut state: Option<&str> = None;
        let mut run = 0usize;
        let mut fired = false;
        for i in rule.warmup_windows..s.num.len() {
            let a = i.saturating_sub(rule.trailing_windows);
            let (tn, td) = (cn[i] - cn[a], cd[i] - cd[a]);
            let now = if s.den[i] > 0.0 && td > 0.0 {
                let rate = s.num[i] / s.den[i];
                let avg = tn / td;
                let down = matches!(s.direction, Direction::Drop | Direction::Both);
                let up = matches!(s.direction, Direction::Spike | Direction::Both);
                if down && rate < rule.below * avg {
                    Some("drop")
                } else if up && rate > rule.above * avg {
                    Some("spike")
                } else {
                    None
                }
            } else {
                None
            };
            if now.is_some() && now == state {
                run += 1;
            } else {
                run = now.is_some() as usize;
                fired = false;
            }
            if now.is_some() && run >= need && !fired {
                fired = true;
                let w = data.first_w + i as i64;
                out.push(Alert {
                    id: format!("static{}-{}-{}", need, out.len() + 1, metric),
                    metric: metric.clone(),
                    series: dims.clone(),
                    kind: now.unwrap_or_default().into(),
                    onset_ms: (w + 1 - need as i64) * wm,
                    detected_ms: (w + 1) * wm,
                    expected: Some(tn / td),
                    expected_low: Some(rule.below * tn / td),
                    expected_high: Some(rule.above * tn / td),
                    onset_low_ms: None,
                    onset_high_ms: None,
                    group_id: None,
                    candidates: Vec::new(),
                });
            }
            state = now;
        }
    }
    out.sort_by_key(|a| (a.detected_ms, a.metric.clone()));
    out
}

// ---------------------------------------------------------------------------------------------
// The oracle and the limit

/// ARL0 in windows: windows per week / false alarms per series-week.
pub fn arl0(window_secs: u64, false_alarms_per_series_week: f64) -> f64 {
    SECS_PER_WEEK / window_secs as f64 / false_alarms_per_series_week
}

/// Log-likelihood ratio of one window (num, den) under `post` against `pre`.
pub fn llr(family: Family, num: f64, den: f64, pre: f64, post: f64, sd: f64) -> f64 {
    match family {
        Family::Binomial => {
            let (p0, p1) = (
                pre.clamp(1e-12, 1.0 - 1e-12),
                post.clamp(1e-12, 1.0 - 1e-12),
            );
            let x = num.min(den);
            x * (p1 / p0).ln() + (den - x) * ((1.0 - p1) / (1.0 - p0)).ln()
        }
        Family::Poisson => {
            let (r0, r1) = (pre.max(1e-12), post.max(1e-12));
            num * (r1 / r0).ln() - den * (r1 - r0)
        }
        Family::Gaussian => (post - pre) / (sd * sd) * (num - den * (pre + post) / 2.0),
    }
}

/// KL divergence of the post from the pre observation of one window with `den` trials,
/// exposure or observations.
pub fn kl_per_window(family: Family, den: f64, pre: f64, post: f64, sd: f64) -> f64 {
    match family {
        Family::Binomial => {
            let (p0, p1) = (
                pre.clamp(1e-12, 1.0 - 1e-12),
                post.clamp(1e-12, 1.0 - 1e-12),
            );
            den * (p1 * (p1 / p0).ln() + (1.0 - p1) * ((1.0 - p1) / (1.0 - p0)).ln())
        }
        Family::Poisson => {
            let (r0, r1) = (pre.max(1e-12), post.max(1e-12));
            den * (r1 * (r1 / r0).ln() - r1 + r0)
        }
        Family::Gaussian => den * (post - pre).powi(2) / (2.0 * sd * sd),
    }
}

/// A one-sided CUSUM knowing pre and post, started at 0 in `first` (the window holding the true
/// start): the index of the first window where it reaches `h`, and the denominator summed to it.
pub fn cusum_oracle(
    family: Family,
    windows: &[(f64, f64)],
    pre: f64,
    post: f64,
    sd: f64,
    h: f64,
) -> Option<(usize, f64)> {
    let (mut s, mut events) = (0.0f64, 0.0);
    for (k, &(num, den)) in windows.iter().enumerate() {
        events += den;
        s = (s + llr(family, num, den, pre, post, sd)).max(0.0);
        if s >= h {
            return Some((k, events));
        }
    }
    None
}

/// Delays of one step incident: the engine's, the static rule's, the oracle's and the limit.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepRow {
    pub id: String,
    pub metric: String,
    pub series: Dims,
    pub magnitude: f64,
    pub volume_per_window: f64,
    pub step: bool,
    pub engine_windows: Option<f64>,
    pub engine_events: Option<f64>,
    pub duration_windows: f64,
    pub static_windows: Option<f64>,
    pub static_events: Option<f64>,
    pub static_for_windows: Option<f64>,
    pub static_for_events: Option<f64>,
    pub oracle_windows: Option<f64>,
    pub oracle_events: Option<f64>,
    pub kl_per_window: Option<f64>,
    pub limit_windows: Option<f64>,
    pub limit_events: Option<f64>,
}

fn step_rows(
    truth: &Truth,
    engine: &DetectorScore,
    naive: &DetectorScore,
    naive_for: &DetectorScore,
    data: &SeriesData,
    h: f64,
    rules: &Rules,
) -> anyhow::Result<Vec<StepRow>> {
    let ts = parse_truth(truth)?;
    let scale = rules.window_ms as f64 / (truth.window_secs as f64 * 1000.0);
    let mut rows = Vec::new();
    for (i, t) in ts.iter().enumerate() {
        if !t.t.required || !matches!(t.t.kind.as_str(), "drop" | "spike") {
            continue;
        }
        let win = data.get(&t.t.metric, &t.t.series);
        let sd = t.t.sd.unwrap_or_else(|| {
            // Per-event sd from the windows before the start (mean metrics only).
            win.map(|s| {
                let b = data.slot(t.start).clamp(0, s.num.len() as i64) as usize;
                let (n, x, q) = (0..b).fold((0.0, 0.0, 0.0), |(n, x, q), j| {
                    (n + s.den[j], x + s.num[j], q + s.sumsq[j])
                });
                if n > 1.0 {
                    ((q - x * x / n) / (n - 1.0)).max(1e-12).sqrt()
                } else {
                    1.0
                }
            })
            .unwrap_or(1.0)
        });
        let (mut ow, mut oe, mut kl, mut lw, mut le) = (None, None, None, None, None);
        if let Some(s) = win {
            let a = data.slot(t.start).max(0) as usize;
            let b = ((data.slot(t.end + rules.slack_ms - 1) + 1).max(0) as usize).min(s.num.len());
            if a < b {
                let obs: Vec<(f64, f64)> = (a..b).map(|j| (s.num[j], s.den[j])).collect();
                if let Some((k, ev)) = cusum_oracle(s.family, &obs, t.t.pre, t.t.post, sd, h) {
                    let end = (data.first_w + (a + k) as i64 + 1) * rules.window_ms;
                    ow = Some((end - t.start) as f64 / rules.window_ms as f64);
                    oe = Some(ev);
                }
            }
            let vol = t.t.volume_per_window * scale;
            let k = kl_per_window(s.family, vol, t.t.pre, t.t.post, sd);
            if k > 0.0 {
                kl = Some(k);
                lw = Some(h / k);
                le = Some(h / k * vol);
            }
        }
        rows.push(StepRow {
            id: t.t.id.clone(),
            metric: t.t.metric.clone(),
            series: t.t.series.clone(),
            magnitude: t.t.magnitude,
            volume_per_window: t.t.volume_per_window * scale,
            step: is_step(t.t),
            engine_windows: engine.outcomes[i].delay_windows,
            engine_events: engine.outcomes[i].delay_events,
            static_windows: naive.outcomes[i].delay_windows,
            static_events: naive.outcomes[i].delay_events,
            static_for_windows: naive_for.outcomes[i].delay_windows,
            static_for_events: naive_for.outcomes[i].delay_events,
            duration_windows: (t.end - t.start) as f64 / rules.window_ms as f64,
            oracle_windows: ow,
            oracle_events: oe,
            kl_per_window: kl,
            limit_windows: lw,
            limit_events: le,
        });
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// The SVG

fn series_label(metric: &str, dims: &Dims) -> String {
    if dims.is_empty() {
        format!("{metric} (total)")
    } else {
        format!(
            "{metric} {{{}}}",
            dims.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A hand-written SVG of one incident: the observed value per window, a 99% band around the
/// expected value recomputed from the history (same hour of day over the 7 days before the
/// incident, frozen at its start, as the engine freezes its baseline; windows inside
/// `exclude`, the series' other incidents, are not learnt either), the engine's own
/// expected band from its alert, the true start (the change, if any), the engine's and the
/// static rule's detection times.
pub fn plot_svg(
    t: &TruthIncident,
    data: &SeriesData,
    engine: Option<&Alert>,
    naive: Option<(&Alert, &str)>,
    exclude: &[(i64, i64)],
) -> Option<String> {
    let s = data.get(&t.metric, &t.series)?;
    let wm = data.window_ms;
    let start = parse_time_str(&t.start)?;
    let end = parse_time_str(&t.end)?;
    let det = engine.map(|a| a.detected_ms).unwrap_or(end);
    let from = data.slot(start - 6 * 3_600_000).max(0) as usize;
    let to = (data.slot(end.max(det) + 2 * 3_600_000) as usize).min(s.num.len());
    if from + 2 >= to {
        return None;
    }
    let ws = data.slot(start).max(0) as usize;
    let per_day = (86_400_000 / wm) as usize;
    let per_hour = (3_600_000 / wm).max(1) as usize;
    let z = 2.576;
    let mut pts = Vec::new(); // (slot, observed, expected, lo, hi)
    for i in from..to {
        // Same hour of day, the 7 days before the start.
        let hour_of =
            |j: usize| ((data.first_w + j as i64).rem_euclid(per_day as i64) as usize) / per_hour;
        let (mut n, mut d, mut q) = (0.0, 0.0, 0.0);
        let lo_j = ws.saturating_sub(7 * per_day);
        for j in lo_j..ws {
            let t = (data.first_w + j as i64) * wm;
            if hour_of(j) == hour_of(i) && !exclude.iter().any(|(a, b)| t + wm > *a && t < *b) {
                n += s.num[j];
                d += s.den[j];
                q += s.sumsq[j];
            }
        }
        let obs = (s.den[i] > 0.0).then(|| s.num[i] / s.den[i]);
        let (e, sd) = if d > 0.0 {
            let e = n / d;
            let den = s.den[i].max(1.0);
            let sd = match s.family {
                Family::Binomial => (e * (1.0 - e) / den).sqrt(),
                Family::Poisson => (e / den).sqrt(),
                Family::Gaussian => ((q / d - e * e).max(0.0) / den).sqrt(),
            };
            (Some(e), sd)
        } else {
            (None, 0.0)
        };
        pts.push((i, obs, e, e.map(|e| e - z * sd), e.map(|e| e + z * sd)));
    }
    let mut ymin = f64::INFINITY;
    let mut ymax = f64::NEG_INFINITY;
    for (_, o, _, lo, hi) in &pts {
        for v in [o, lo, hi].into_iter().flatten() {
            ymin = ymin.min(*v);
            ymax = ymax.max(*v);
        }
    }
    if !ymin.is_finite() {
        return None;
    }
    let ymin = ymin.max(if s.family == Family::Gaussian {
        -1.0
    } else {
        0.0
    });
    let pad = (ymax - ymin).max(1e-9) * 0.08;
    let (y0, y1) = (ymin - pad, ymax + pad);
    let (w, h, l, r, top, bot) = (960.0, 420.0, 70.0, 20.0, 50.0, 70.0);
    let pw = w - l - r;
    let ph = h - top - bot;
    let t0 = (data.first_w + from as i64) * wm;
    let t1 = (data.first_w + to as i64) * wm;
    let x = |ms: i64| l + pw * (ms - t0) as f64 / (t1 - t0) as f64;
    let xs = |slot: usize| x((data.first_w + slot as i64) * wm + wm / 2);
    let y = |v: f64| top + ph * (1.0 - (v - y0) / (y1 - y0));
    let mut o = String::new();
    let _ = writeln!(
        o,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(o, r##"<rect width="{w}" height="{h}" fill="#ffffff"/>"##);
    let title = format!(
        "{}: {} {:+.0}% at {} ({})",
        series_label(&t.metric, &t.series),
        t.kind,
        t.magnitude * 100.0,
        t.start,
        t.id
    );
    let _ = writeln!(
        o,
        r##"<text x="{l}" y="22" font-size="15" font-weight="bold">{}</text>"##,
        esc(&title)
    );
    // Incident span.
    let (xa, xb) = (x(start).max(l), x(end).min(l + pw));
    let _ = writeln!(
        o,
        r##"<rect x="{xa:.1}" y="{top}" width="{:.1}" height="{ph}" fill="#fdecea"/>"##,
        (xb - xa).max(0.0)
    );
    // Axes and grid.
    for k in 0..=5 {
        let v = y0 + (y1 - y0) * k as f64 / 5.0;
        let yy = y(v);
        let _ = writeln!(
            o,
            r##"<line x1="{l}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            l + pw,
            l - 6.0,
            yy + 4.0,
            fmt_value(v, y1 - y0)
        );
    }
    let step_ms = if t1 - t0 > 36 * 3_600_000 {
        6 * 3_600_000
    } else {
        2 * 3_600_000
    };
    let mut tick = t0.div_euclid(step_ms) * step_ms + step_ms;
    while tick < t1 {
        let xx = x(tick);
        let label = &fmt_time(tick)[5..16].replace('T', " ");
        let _ = writeln!(
            o,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{top}" y2="{:.1}" stroke="#eeeeee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{label}</text>"##,
            top + ph,
            top + ph + 16.0
        );
        tick += step_ms;
    }
    let _ = writeln!(
        o,
        r##"<rect x="{l}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
    );
    // Band (recomputed), as a polygon over the windows that have one.
    let band: Vec<(usize, f64, f64)> = pts
        .iter()
        .filter_map(|(i, _, _, lo, hi)| Some((*i, (*lo)?, (*hi)?)))
        .collect();
    if !band.is_empty() {
        let mut poly = String::new();
        for (i, _, hi) in &band {
            let _ = write!(poly, "{:.1},{:.1} ", xs(*i), y(hi.min(y1)));
        }
        for (i, lo, _) in band.iter().rev() {
            let _ = write!(poly, "{:.1},{:.1} ", xs(*i), y(lo.max(y0)));
        }
        let _ = writeln!(
            o,
            r##"<polygon points="{}" fill="#cfe3f7" stroke="none"/>"##,
            poly.trim_end()
        );
        let line: Vec<String> = pts
            .iter()
            .filter_map(|(i, _, e, _, _)| e.map(|e| format!("{:.1},{:.1}", xs(*i), y(e))))
            .collect();
        let _ = writeln!(
            o,
            r##"<polyline points="{}" fill="none" stroke="#4a90d9" stroke-width="1.5" stroke-dasharray="5,3"/>"##,
            line.join(" ")
        );
    }
    // The engine's expected band at detection, from its alert, from onset to detection.
    if let Some(a) = engine {
        if let (Some(e), Some(lo), Some(hi)) = (a.expected, a.expected_low, a.expected_high) {
            let (xa, xb) = (x(a.onset_ms).max(l), x(a.detected_ms).min(l + pw));
            let _ = writeln!(
                o,
                r##"<rect x="{xa:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#2e7d32" fill-opacity="0.18" stroke="#2e7d32" stroke-width="1"/><line x1="{xa:.1}" x2="{xb:.1}" y1="{:.1}" y2="{:.1}" stroke="#2e7d32" stroke-width="2"/>"##,
                y(hi.min(y1)),
                (xb - xa).max(1.0),
                (y(lo.max(y0)) - y(hi.min(y1))).max(1.0),
                y(e),
                y(e)
            );
        }
    }
    // Observed.
    let mut seg: Vec<String> = Vec::new();
    let mut obs_lines = String::new();
    for (i, obs, ..) in &pts {
        match obs {
            Some(v) => seg.push(format!("{:.1},{:.1}", xs(*i), y(*v))),
            None => {
                if seg.len() > 1 {
                    let _ = writeln!(
                        obs_lines,
                        r##"<polyline points="{}" fill="none" stroke="#222" stroke-width="1.3"/>"##,
                        seg.join(" ")
                    );
                }
                seg.clear();
            }
        }
    }
    if seg.len() > 1 {
        let _ = writeln!(
            obs_lines,
            r##"<polyline points="{}" fill="none" stroke="#222" stroke-width="1.3"/>"##,
            seg.join(" ")
        );
    }
    o.push_str(&obs_lines);
    // Markers.
    let mut vline = |ms: i64, color: &str, dash: &str, label: &str, row: usize| {
        let xx = x(ms);
        if xx < l || xx > l + pw {
            return;
        }
        let _ = writeln!(
            o,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{top}" y2="{:.1}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{:.1}" y="{:.1}" fill="{color}">{}</text>"##,
            top + ph,
            xx + 4.0,
            top + 14.0 + 14.0 * row as f64,
            esc(label)
        );
    };
    let start_label = match &t.change_id {
        Some(c) => format!("change {c} applied"),
        None => "true start".to_string(),
    };
    vline(start, "#e67e22", "", &start_label, 0);
    if let Some(a) = engine {
        vline(
            a.detected_ms,
            "#c0392b",
            "",
            &format!(
                "guardrail {} (+{} min)",
                a.kind,
                (a.detected_ms - start) / 60_000
            ),
            1,
        );
    }
    if let Some((a, name)) = naive {
        vline(
            a.detected_ms,
            "#7f8c8d",
            "6,4",
            &format!("{name} (+{} min)", (a.detected_ms - start) / 60_000),
            2,
        );
    }
    // Legend: a swatch and its text per item, laid out left to right.
    let ly = h - 22.0;
    let items = [
        (
            r##"<line x1="X" x2="X22" y1="Y" y2="Y" stroke="#222" stroke-width="1.5"/>"##,
            format!("observed per {}-min window", wm / 60_000),
        ),
        (
            r##"<rect x="X" y="Y5" width="22" height="10" fill="#cfe3f7"/>"##,
            "99% band: same hour, 7 days before the start".to_string(),
        ),
        (
            r##"<rect x="X" y="Y5" width="22" height="10" fill="#2e7d32" fill-opacity="0.3"/>"##,
            "engine's band (alert)".to_string(),
        ),
        (
            r##"<rect x="X" y="Y5" width="22" height="10" fill="#fdecea"/>"##,
            "incident (truth)".to_string(),
        ),
    ];
    let mut lx = l;
    o.push_str(r##"<g fill="#333">"##);
    for (swatch, text) in items {
        let sw = swatch
            .replace("X22", &format!("{:.0}", lx + 22.0))
            .replace("\"X\"", &format!("\"{lx:.0}\""))
            .replace("Y5", &format!("{:.0}", ly - 5.0))
            .replace("\"Y\"", &format!("\"{ly:.0}\""));
        let _ = write!(
            o,
            r##"{sw}<text x="{:.0}" y="{:.0}">{}</text>"##,
            lx + 28.0,
            ly + 4.0,
            esc(&text)
        );
        lx += 28.0 + 6.4 * text.len() as f64 + 22.0;
    }
    o.push_str("</g>\n");
    o.push_str("</svg>\n");
    Some(o)
}

fn fmt_value(v: f64, range: f64) -> String {
    if range < 0.001 {
        format!("{v:.5}")
    } else if range < 0.05 {
        format!("{v:.4}")
    } else {
        format!("{v:.3}")
    }
}

// ---------------------------------------------------------------------------------------------
// The bench

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Scenario to generate (unless `events` and `truth` are given).
    pub scenario: Option<PathBuf>,
    pub config: PathBuf,
    pub out: PathBuf,
    pub events: Option<PathBuf>,
    pub changes: Option<PathBuf>,
    pub truth: Option<PathBuf>,
    /// Windows after an incident's end an alert still matches it.
    pub slack_windows: f64,
    /// Truth incident to plot (default: the first detected conversion step in a segment).
    pub plot: Option<String>,
    /// Keep the generated events file in `out`.
    pub keep_events: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub scenario: String,
    pub seed: u64,
    pub start: String,
    pub end: String,
    pub config: String,
    pub window_secs: u64,
    pub slack_windows: f64,
    pub false_alarms_per_series_week_configured: f64,
    pub arl0_windows: f64,
    /// Oracle threshold ln(ARL0).
    pub h: f64,
    pub series: usize,
    pub series_weeks: f64,
    pub events: u64,
    pub late_events: u64,
    pub too_late_expected: u64,
    pub too_late_dead_lettered: u64,
    pub replay: crate::replay::ReplaySummary,
    pub engine: DetectorScore,
    pub static_rule: DetectorScore,
    pub static_rule_for: DetectorScore,
    pub static_rule_definition: NaiveRule,
    pub static_rule_for_definition: NaiveRule,
    pub steps: Vec<StepRow>,
    /// Truth incidents on metrics the configuration does not define (not scored).
    pub unmeasured: Vec<String>,
    pub plot: Option<String>,
    pub generate_secs: f64,
    pub replay_secs: f64,
    pub score_secs: f64,
}

/// Generates (or reads), replays in process, scores; writes `score.json` and `incident.svg`
/// into `opts.out` (the replay's outputs into `opts.out/replay`).
pub fn run(opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    let cfg = Config::from_file(&opts.config)?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let t_gen = Instant::now();
    let (events, changes, truth, generated) = match (&opts.events, &opts.truth) {
        (Some(e), Some(t)) => {
            let mut head = [0u8; 4];
            let parquet = std::fs::File::open(e)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                .map(|_| &head == b"PAR1")
                .unwrap_or(false)
                || e.extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("parquet"));
            if parquet {
                anyhow::bail!(
                    "{}: bench detect reads events as JSON lines (it rebuilds every series from them); convert the Parquet file first",
                    e.display()
                );
            }
            (e.clone(), opts.changes.clone(), Truth::from_file(t)?, false)
        }
        (Some(_), None) | (None, Some(_)) => {
            anyhow::bail!(
                "give --events and --truth together (and optionally --changes), or --scenario"
            )
        }
        (None, None) => {
            let Some(path) = &opts.scenario else {
                anyhow::bail!("give --scenario FILE, or --events, --changes and --truth");
            };
            let sc = crate::scenario::Scenario::from_file(path)?;
            let ev = opts.out.join("events.jsonl");
            let ch = opts.out.join("changes.jsonl");
            let tr = opts.out.join("truth.json");
            let w = crate::scenario::write_all(&sc, &ev, Some(&ch), Some(&tr))?;
            (ev, Some(ch), w.truth, true)
        }
    };
    let generate_secs = t_gen.elapsed().as_secs_f64();
    let t_rep = Instant::now();
    let signer = crate::sink::Signer::new("bench-local", b"bench-local");
    let replay_out = opts.out.join("replay");
    let summary = crate::replay::replay(
        &cfg,
        &signer,
        &crate::replay::ReplayOptions {
            events: events.clone(),
            changes,
            out: replay_out.clone(),
            progress_every: 0,
        },
    )?;
    let replay_secs = t_rep.elapsed().as_secs_f64();
    let t_score = Instant::now();
    let alerts = read_alerts(&replay_out.join("alerts.jsonl"))?;
    let data = SeriesData::from_events(&cfg, &events)?;
    if generated && !opts.keep_events {
        let _ = std::fs::remove_file(&events);
    }
    let window_ms = cfg.engine.window_secs as i64 * 1000;
    let rules = Rules {
        window_ms,
        slack_ms: (opts.slack_windows * window_ms as f64) as i64,
    };
    let configured: Vec<&str> = cfg.metrics().map(|m| m.name.as_str()).collect();
    // What the configuration does not measure cannot be detected: left out, and listed.
    let mut truth = truth;
    let unmeasured: Vec<String> = truth
        .incidents
        .iter()
        .filter(|t| !configured.contains(&t.metric.as_str()))
        .map(|t| format!("{} ({})", t.id, t.metric))
        .collect();
    truth
        .incidents
        .retain(|t| configured.contains(&t.metric.as_str()));
    let series: Vec<_> = truth
        .series
        .iter()
        .filter(|s| configured.contains(&s.metric.as_str()))
        .collect();
    let weeks = truth.series_weeks / truth.series.len().max(1) as f64;
    let series_weeks = series.len() as f64 * weeks;
    let mut engine = score(
        "guardrail",
        &truth,
        &alerts,
        &rules,
        series_weeks,
        Some(&data),
    )?;
    let rollbacks = read_rollbacks(&replay_out.join("rollbacks.jsonl"))?;
    engine.attribution = Some(attribution(&truth, &alerts, &engine, &rollbacks, &rules)?);
    let rule = NaiveRule {
        trailing_windows: (7 * 86_400_000 / window_ms) as usize,
        warmup_windows: cfg.detection.warmup_windows as usize,
        ..NaiveRule::default()
    };
    let naive = naive_alerts(&data, &rule);
    let mut static_rule = score(
        &rule.name(window_ms),
        &truth,
        &naive,
        &rules,
        series_weeks,
        Some(&data),
    )?;
    let rule_for = NaiveRule {
        for_windows: ((15 * 60_000 / window_ms) as usize).max(2),
        ..rule
    };
    let naive_for = naive_alerts(&data, &rule_for);
    let mut static_rule_for = score(
        &rule_for.name(window_ms),
        &truth,
        &naive_for,
        &rules,
        series_weeks,
        Some(&data),
    )?;
    let fapw = cfg.detection.false_alarms_per_series_week;
    let arl = arl0(cfg.engine.window_secs, fapw);
    let h = arl.ln();
    let steps = step_rows(
        &truth,
        &engine,
        &static_rule,
        &static_rule_for,
        &data,
        h,
        &rules,
    )?;
    // The plot.
    let pick = opts.plot.clone().or_else(|| {
        let o = &engine.outcomes;
        let changed = |x: &&Outcome| {
            truth
                .incidents
                .iter()
                .any(|t| t.id == x.id && t.change_id.is_some())
        };
        o.iter()
            .filter(|x| x.step && x.detected && !x.series.is_empty())
            .find(|x| x.metric == "conversion_rate" && changed(x))
            .or_else(|| {
                o.iter().find(|x| {
                    x.step && x.detected && x.metric == "conversion_rate" && !x.series.is_empty()
                })
            })
            .or_else(|| o.iter().find(|x| x.step && x.detected))
            .or_else(|| o.iter().find(|x| x.step))
            .map(|x| x.id.clone())
    });
    let mut plot = None;
    if let Some(id) = &pick {
        let i = truth
            .incidents
            .iter()
            .position(|t| &t.id == id)
            .with_context(|| format!("--plot {id}: no such truth incident"))?;
        let find = |list: &[Alert], out: &Outcome| {
            out.alert_id
                .as_ref()
                .and_then(|a| list.iter().find(|x| &x.id == a))
                .cloned()
        };
        let ea = find(&alerts, &engine.outcomes[i]);
        let na = find(&naive_for, &static_rule_for.outcomes[i]);
        let na_name = rule_for.name(window_ms);
        let ti = &truth.incidents[i];
        let exclude: Vec<(i64, i64)> = truth
            .incidents
            .iter()
            .filter(|t| t.metric == ti.metric && t.series == ti.series)
            .filter_map(|t| Some((parse_time_str(&t.start)?, parse_time_str(&t.end)?)))
            .collect();
        if let Some(svg) = plot_svg(
            &truth.incidents[i],
            &data,
            ea.as_ref(),
            na.as_ref().map(|a| (a, na_name.as_str())),
            &exclude,
        ) {
            let p = opts.out.join("incident.svg");
            std::fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))?;
            plot = Some(id.clone());
        }
    }
    for d in [&mut engine, &mut static_rule, &mut static_rule_for] {
        d.false_alarm_list.truncate(MAX_LISTED);
        d.misread_list.truncate(MAX_LISTED);
    }
    let too_late = summary
        .events_rejected
        .get("too_late")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let report = BenchReport {
        scenario: truth.scenario.clone(),
        seed: truth.seed,
        start: truth.start.clone(),
        end: truth.end.clone(),
        config: opts.config.display().to_string(),
        window_secs: cfg.engine.window_secs,
        slack_windows: opts.slack_windows,
        false_alarms_per_series_week_configured: fapw,
        arl0_windows: arl,
        h,
        series: series.len(),
        series_weeks,
        events: summary.events_read,
        late_events: truth.generated.delayed,
        too_late_expected: truth.generated.too_late,
        too_late_dead_lettered: too_late,
        replay: summary,
        engine,
        static_rule,
        static_rule_for,
        static_rule_definition: rule,
        static_rule_for_definition: rule_for,
        steps,
        unmeasured,
        plot,
        generate_secs,
        replay_secs,
        score_secs: t_score.elapsed().as_secs_f64(),
    };
    let p = opts.out.join("score.json");
    std::fs::write(
        &p,
        serde_json::to_vec_pretty(&report).expect("report serialises"),
    )
    .with_context(|| format!("writing {}", p.display()))?;
    Ok(report)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

fn dims_md(d: &Dims) -> String {
    if d.is_empty() {
        "total".into()
    } else {
        d.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn pct(m: f64, kind: &str) -> String {
    if kind == "shift" {
        format!("{:+.0} pts", m * 100.0)
    } else {
        format!("{:+.0}%", m * 100.0)
    }
}

fn frac(n: usize, d: usize, x: Option<f64>) -> String {
    match x {
        Some(x) => format!("{n}/{d} = {x:.2}"),
        None => "– (none)".into(),
    }
}

/// The attribution section of the report.
pub fn attribution_md(a: &Attribution) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "\n**Attribution** (guardrail): top-1 = the detecting alert's first candidate is the truth's change (detected required records with a change); harmless rolled back = rollback requests naming a harmless change (must be 0); onset coverage = the detecting alert's onset interval holds the true start (detected required drops and spikes); pages = distinct `group_id` per cause.\n");
    let _ = writeln!(o, "| top-1 attribution | harmless changes rolled back | rollbacks per harmful change (mean / max; never) | onset-interval coverage | interval width, median (windows) | onset error, median (windows) | pages per cause (mean / max) | firing alerts / groups |");
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    let per: Vec<usize> = a.rollbacks_per_harmful_change.values().copied().collect();
    let never = per.iter().filter(|n| **n == 0).count();
    let mean = (!per.is_empty()).then(|| per.iter().sum::<usize>() as f64 / per.len() as f64);
    let _ = writeln!(
        o,
        "| {} | {} | {} / {}; {} of {} | {} ({} with an interval) | {} | {} | {} / {} over {} causes | {} / {} |",
        frac(a.top1_correct, a.top1_n, a.top1_accuracy),
        a.harmless_rolled_back,
        opt(mean, 2),
        per.iter().max().map(|m| m.to_string()).unwrap_or_else(|| "–".into()),
        never,
        per.len(),
        frac(a.onset_covered, a.onset_n, a.onset_coverage),
        a.onset_intervals,
        opt(a.onset_width_windows_median, 1),
        opt(a.onset_error_windows_median, 1),
        opt(a.pages_per_cause_mean, 2),
        a.pages_per_cause_max.map(|m| m.to_string()).unwrap_or_else(|| "–".into()),
        a.causes,
        a.firing_alerts,
        a.groups,
    );
    if !a.top1_misses.is_empty() {
        let _ = writeln!(
            o,
            "\nNot named first: {}.",
            a.top1_misses
                .iter()
                .map(|m| format!(
                    "{} ({} named {})",
                    m.id,
                    m.alert_id,
                    m.named.as_deref().unwrap_or("none")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    if !a.onset_misses.is_empty() {
        let _ = writeln!(
            o,
            "\nOnset interval misses the true start: {}.",
            a.onset_misses.join(", ")
        );
    }
    if !a.rollbacks_per_harmful_change.is_empty() {
        let _ = writeln!(
            o,
            "\nRollback requests per harmful change: {}.",
            a.rollbacks_per_harmful_change
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if a.harmless_rolled_back > 0 || a.unknown_change_rollbacks > 0 {
        let _ = writeln!(
            o,
            "\n**Harmless changes rolled back: {}** ({} requests); requests naming an unknown change: {}.",
            a.harmless_rolled_back_changes.join(", "),
            a.harmless_rolled_back,
            a.unknown_change_rollbacks
        );
    }
    let many: Vec<String> = a
        .pages
        .iter()
        .filter(|p| p.pages > 1)
        .map(|p| format!("{} {} ({} alerts)", p.source, p.pages, p.alerts))
        .collect();
    if !many.is_empty() {
        let _ = writeln!(o, "\nCauses paged more than once: {}.", many.join(", "));
    }
    o
}

impl BenchReport {
    fn detectors(&self) -> [&DetectorScore; 3] {
        [&self.engine, &self.static_rule, &self.static_rule_for]
    }

    /// The report as markdown tables.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "### Detection: scenario `{}` (seed {}, {} .. {})\n\n{} events ({} late within the allowed lateness, {} beyond it: {} dead-lettered `too_late`), {} series, {:.1} series-weeks; window {} s; an alert matches an incident when metric, series and kind agree and its onset or detection falls in [start - 1 window, end + {} windows]. Oracle and limit: ARL0 = {:.0} windows ({} false alarms per series-week), h = ln ARL0 = {:.2}. Static rule: the 5-minute rate below {:.0}% (above {:.0}% for spike metrics) of its trailing 7-day average, evaluated after the same {}-window warmup.\n",
            self.scenario,
            self.seed,
            self.start,
            self.end,
            self.events,
            self.late_events,
            self.too_late_expected,
            self.too_late_dead_lettered,
            self.series,
            self.series_weeks,
            self.window_secs,
            self.slack_windows,
            self.arl0_windows,
            self.false_alarms_per_series_week_configured,
            self.h,
            self.static_rule_definition.below * 100.0,
            self.static_rule_definition.above * 100.0,
            self.static_rule_definition.warmup_windows,
        );
        if !self.unmeasured.is_empty() {
            let _ = writeln!(
                o,
                "Not scored (their metric is not in the configuration): {}.\n",
                self.unmeasured.join(", ")
            );
        }
        let _ = writeln!(o, "| detector | recall (all) | recall (steps) | precision | false alarms | per series-week | misreads (outage as a change) | step delay median / p90 (windows) | step delay median / p90 (events) |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
        for d in self.detectors() {
            let name = if d.detector == "guardrail" {
                "guardrail (default config)".to_string()
            } else {
                d.detector.clone()
            };
            let _ = writeln!(
                o,
                "| {name} | {}/{} = {:.2} | {}/{} = {:.2} | {}/{} = {:.2} | {} | {:.3} | {} alerts, {} outages | {} / {} | {} / {} |",
                d.detected,
                d.required,
                d.recall,
                d.steps_detected,
                d.steps,
                d.recall_steps,
                d.matched_alerts,
                d.alerts,
                d.precision,
                d.false_alarms,
                d.false_alarms_per_series_week,
                d.misread_alerts,
                d.misread_incidents,
                opt(d.delay_windows_median, 1),
                opt(d.delay_windows_p90, 1),
                opt(d.delay_events_median, 0),
                opt(d.delay_events_p90, 0),
            );
        }
        if let Some(a) = &self.engine.attribution {
            o.push_str(&attribution_md(a));
        }
        let _ = writeln!(o, "\n**Recall by kind** (required incidents)\n");
        let _ = writeln!(
            o,
            "| truth kind | incidents | {} |",
            self.detectors().map(|d| d.detector.as_str()).join(" | ")
        );
        let _ = writeln!(o, "|---|---|---|---|---|");
        for (k, c) in &self.engine.by_kind {
            let n = |d: &DetectorScore| d.by_kind.get(k).copied().unwrap_or_default().detected;
            let _ = writeln!(
                o,
                "| {k} | {} | {} | {} | {} |",
                c.incidents,
                c.detected,
                n(&self.static_rule),
                n(&self.static_rule_for)
            );
        }
        let _ = writeln!(o, "\n**Steps and their delays** in windows (in parentheses: events of the series' denominator since the true start; – = not detected). Oracle: CUSUM knowing pre and post, h = ln ARL0, on the same windows; limit: ln(ARL0) / KL per window at the expected volume.\n");
        let _ = writeln!(o, "| incident | metric | series | effect | volume / window | lasts (windows) | guardrail | {} | {} | CUSUM oracle | limit |", self.static_rule.detector, self.static_rule_for.detector);
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &self.steps {
            let cell = |w: Option<f64>, e: Option<f64>| match w {
                Some(w) => format!("{w:.1} ({})", opt(e, 0)),
                None => "–".into(),
            };
            let _ = writeln!(
                o,
                "| {}{} | {} | {} | {:+.0}% | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
                r.id,
                if r.step { "" } else { " (below 10%)" },
                r.metric,
                dims_md(&r.series),
                r.magnitude * 100.0,
                r.volume_per_window,
                r.duration_windows,
                cell(r.engine_windows, r.engine_events),
                cell(r.static_windows, r.static_events),
                cell(r.static_for_windows, r.static_for_events),
                cell(r.oracle_windows, r.oracle_events),
                cell(r.limit_windows, r.limit_events),
            );
        }
        let _ = writeln!(
            o,
            "\n**Every required incident** (alert kind, delay in windows)\n"
        );
        let _ = writeln!(
            o,
            "| incident | truth kind | metric | series | effect | {} |",
            self.detectors().map(|d| d.detector.as_str()).join(" | ")
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
        let cell = |x: &Outcome| {
            if x.detected {
                format!(
                    "{}, {}",
                    x.alert_kind.as_deref().unwrap_or("?"),
                    opt(x.delay_windows, 1)
                )
            } else if x.misread {
                "misread as a business change".into()
            } else {
                "missed".into()
            }
        };
        for (i, e) in self.engine.outcomes.iter().enumerate() {
            if !e.required {
                continue;
            }
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                e.id,
                e.kind,
                e.metric,
                dims_md(&e.series),
                pct(e.magnitude, &e.kind),
                cell(e),
                cell(&self.static_rule.outcomes[i]),
                cell(&self.static_rule_for.outcomes[i]),
            );
        }
        for d in self.detectors() {
            if d.false_alarm_list.is_empty() && d.misread_list.is_empty() {
                continue;
            }
            let _ = writeln!(
                o,
                "\n**{}: false alarms ({}) and misreads ({})**{}\n",
                d.detector,
                d.false_alarms,
                d.misread_alerts,
                if d.false_alarms + d.misread_alerts > 12 {
                    " (the first 12)"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                o,
                "| alert | metric | series | kind | onset | detected at | what |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|");
            for a in d.false_alarm_list.iter().chain(&d.misread_list).take(12) {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    a.id,
                    a.metric,
                    dims_md(&a.series),
                    a.kind,
                    a.onset,
                    a.detected_at,
                    a.truth
                        .as_deref()
                        .map(|t| format!("misread of {t}"))
                        .unwrap_or_else(|| "false alarm".into())
                );
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 10.0], 0.5), Some(2.5));
        assert!((percentile(&[3.0, 1.0, 2.0, 10.0], 0.9).unwrap() - 7.9).abs() < 1e-12);
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn kinds() {
        assert!(compatible("drop", -0.2, "drop"));
        assert!(!compatible("drop", -0.2, "spike"));
        assert!(compatible("drift", -0.2, "drop"));
        assert!(!compatible("drift", -0.2, "spike"));
        assert!(compatible("shift", 0.2, "drift"));
        assert!(!compatible("data_quality", -1.0, "drop"));
        assert!(is_misread("data_quality", "drop"));
        assert!(!is_misread("drop", "drop"));
    }

    #[test]
    fn llr_and_kl_agree() {
        // The LLR's mean under the post rate is the KL divergence.
        for (f, pre, post) in [
            (Family::Binomial, 0.1, 0.08),
            (Family::Poisson, 0.004, 0.012),
            (Family::Gaussian, 0.35, 0.30),
        ] {
            let den = 500.0;
            let kl = kl_per_window(f, den, pre, post, 0.45);
            let l = llr(f, post * den, den, pre, post, 0.45);
            assert!((kl - l).abs() < 1e-9 * kl.max(1.0), "{f:?} {kl} {l}");
            assert!(kl > 0.0);
        }
        // Binomial 10% drop at p = 0.1 with 1000 trials: about n dp^2 / (2 p (1 - p)).
        let kl = kl_per_window(Family::Binomial, 1000.0, 0.1, 0.09, 0.0);
        assert!((kl / (1000.0 * 0.0001 / 0.18) - 1.0).abs() < 0.05, "{kl}");
    }

    #[test]
    fn oracle_crosses_when_evidence_adds_up() {
        // 20 windows of exactly the post rate: the CUSUM climbs by KL per window.
        let w: Vec<(f64, f64)> = (0..20).map(|_| (80.0, 1000.0)).collect();
        let kl = kl_per_window(Family::Binomial, 1000.0, 0.1, 0.08, 0.0);
        let h = 5.0;
        let (k, ev) = cusum_oracle(Family::Binomial, &w, 0.1, 0.08, 0.0, h).unwrap();
        assert_eq!(k, (h / kl).ceil() as usize - 1);
        assert_eq!(ev, 1000.0 * (k + 1) as f64);
        // At the pre rate it never crosses.
        let w: Vec<(f64, f64)> = (0..20).map(|_| (100.0, 1000.0)).collect();
        assert_eq!(cusum_oracle(Family::Binomial, &w, 0.1, 0.08, 0.0, h), None);
    }

    const W: i64 = 300_000;

    fn t0() -> i64 {
        parse_time_str("2026-11-02T00:00:00Z").unwrap()
    }

    fn rec(
        id: &str,
        kind: &str,
        series: &[(&str, &str)],
        start_w: i64,
        change: Option<&str>,
    ) -> TruthIncident {
        TruthIncident {
            id: id.into(),
            kind: kind.into(),
            metric: if kind == "spike" {
                "support_tickets_per_session".into()
            } else {
                "conversion_rate".into()
            },
            series: series
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            start: fmt_time(t0() + start_w * W + 60_000),
            end: fmt_time(t0() + (start_w + 24) * W),
            magnitude: if kind == "spike" { 1.0 } else { -0.3 },
            pre: 0.1,
            post: 0.07,
            volume_per_window: 100.0,
            change_id: change.map(str::to_string),
            required: !id.contains('~'),
            source: id.split(['~', ':']).next().unwrap().into(),
            cause: "change".into(),
            sd: None,
        }
    }

    fn change(id: &str, harmful: bool) -> crate::scenario::TruthChange {
        crate::scenario::TruthChange {
            change_id: id.into(),
            harmful,
            start: fmt_time(t0()),
            record_ts: fmt_time(t0()),
            end: fmt_time(t0() + 86_400_000),
            country: None,
            holdout: None,
            rollout: false,
            source: id.into(),
            tier: "human".into(),
        }
    }

    /// Two harmful changes (FR conversions and tickets; US conversions), a DE drop without a
    /// change, a harmless change; the FR drop's echo in the total.
    fn attr_truth() -> Truth {
        let fr = [("country", "FR")];
        Truth {
            scenario: "attr".into(),
            seed: 0,
            start: fmt_time(t0()),
            end: fmt_time(t0() + 86_400_000),
            window_secs: 300,
            incidents: vec![
                rec("fr", "drop", &fr, 100, Some("chg-fr")),
                rec("fr:tickets", "spike", &fr, 100, Some("chg-fr")),
                rec("fr~total", "drop", &[], 100, Some("chg-fr")),
                rec("us", "drop", &[("country", "US")], 150, Some("chg-us")),
                rec("de", "drop", &[("country", "DE")], 200, None),
            ],
            series: Vec::new(),
            series_weeks: 1.0,
            generated: Default::default(),
            changes: vec![
                change("chg-fr", true),
                change("chg-us", true),
                change("chg-nice", false),
            ],
        }
    }

    fn al(id: &str, truth: &TruthIncident, onset_w: i64, det_w: i64) -> Alert {
        let series: Vec<(&str, &str)> = truth
            .series
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Alert::new(
            id,
            &truth.metric,
            &series,
            &truth.kind,
            t0() + onset_w * W,
            t0() + det_w * W,
        )
    }

    #[test]
    fn attribution_scores_blame_rollbacks_onsets_and_pages() {
        let truth = attr_truth();
        let t = &truth.incidents;
        let rules = Rules {
            window_ms: W,
            slack_ms: 6 * W,
        };
        let mut a = vec![
            // fr: named right; its interval [99, 101] holds the start (inside window 100).
            al("a-fr", &t[0], 100, 104),
            // fr's tickets: the harmless change named first; no interval.
            al("a-frt", &t[1], 101, 110),
            // A later alert on fr (not the detecting one): it names nothing.
            al("a-fr2", &t[0], 100, 120),
            // The echo in the total, in fr's group.
            al("a-tot", &t[2], 102, 108),
            // us: right; the interval [152, 153] starts after the true start (window 150).
            al("a-us", &t[3], 152, 156),
            // de: no change to name (not in top-1); the interval [199, 200] holds the start
            // in its last window (the start is 1 minute into window 200).
            al("a-de", &t[4], 199, 203),
            // A false alarm.
            al("a-fa", &t[4], 400, 405),
        ];
        a[0].candidates = vec!["chg-fr".into(), "chg-nice".into()];
        a[0].onset_low_ms = Some(t0() + 99 * W);
        a[0].onset_high_ms = Some(t0() + 101 * W);
        a[0].group_id = Some("g-fr".into());
        a[1].candidates = vec!["chg-nice".into(), "chg-fr".into()];
        a[1].group_id = Some("g-fr-tickets".into());
        a[3].group_id = Some("g-fr".into());
        a[3].candidates = vec!["chg-fr".into()];
        a[4].candidates = vec!["chg-us".into()];
        a[4].onset_low_ms = Some(t0() + 152 * W);
        a[4].onset_high_ms = Some(t0() + 153 * W);
        a[5].onset_low_ms = Some(t0() + 199 * W);
        a[5].onset_high_ms = Some(t0() + 200 * W);
        let s = score("guardrail", &truth, &a, &rules, 1.0, None).unwrap();
        assert_eq!((s.required, s.detected, s.false_alarms), (4, 4, 1));
        let rb = [
            RollbackReq::new("rb-1", "chg-fr", "inc-1"),
            RollbackReq::new("rb-1", "chg-fr", "inc-1"), // the same request re-read
            RollbackReq::new("rb-2", "chg-fr", "inc-2"),
            RollbackReq::new("rb-3", "chg-nice", "inc-3"),
            RollbackReq::new("rb-4", "chg-nope", "inc-4"),
        ];
        // read_rollbacks dedups by id; given twice here, both count.
        let x = attribution(&truth, &a, &s, &rb, &rules).unwrap();
        // Top-1: fr right, fr:tickets wrong (named chg-nice), us right; de has no change and
        // the echo is not required.
        assert_eq!((x.top1_n, x.top1_correct), (3, 2));
        assert!((x.top1_accuracy.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(
            x.top1_misses,
            vec![AttributionMiss {
                id: "fr:tickets".into(),
                change_id: "chg-fr".into(),
                alert_id: "a-frt".into(),
                named: Some("chg-nice".into()),
            }]
        );
        // Onsets: fr covered, fr:tickets no interval, us not covered, de covered.
        assert_eq!((x.onset_n, x.onset_intervals, x.onset_covered), (4, 3, 2));
        assert_eq!(x.onset_coverage, Some(0.5));
        assert_eq!(x.onset_misses.len(), 2, "{:?}", x.onset_misses);
        // Widths 3, 2, 2 windows; |onset - start| 0.2, 0.8, 1.8, 1.2 windows (the starts are
        // 1 minute into their window).
        assert_eq!(x.onset_width_windows_median, Some(2.0));
        assert!((x.onset_error_windows_median.unwrap() - 1.0).abs() < 1e-9);
        // Rollbacks: chg-fr 3 (rb-1 twice as given), chg-us 0, chg-nice 1 (harmless), one
        // unknown.
        assert_eq!(x.rollbacks, 5);
        assert_eq!(x.harmless_rolled_back, 1);
        assert_eq!(x.harmless_rolled_back_changes, vec!["chg-nice".to_string()]);
        assert_eq!(x.unknown_change_rollbacks, 1);
        assert_eq!(
            x.rollbacks_per_harmful_change,
            [("chg-fr".to_string(), 3), ("chg-us".to_string(), 0)]
                .into_iter()
                .collect()
        );
        // Pages: fr's four alerts (a-fr, a-frt, a-fr2, a-tot) in three groups (g-fr,
        // g-fr-tickets, a-fr2 alone); us one, de one.
        assert_eq!(x.causes, 3);
        let p = |src: &str| x.pages.iter().find(|p| p.source == src).unwrap().clone();
        assert_eq!((p("fr").alerts, p("fr").pages), (4, 3));
        assert_eq!((p("us").alerts, p("us").pages), (1, 1));
        assert_eq!(x.pages_per_cause_max, Some(3));
        assert!((x.pages_per_cause_mean.unwrap() - 5.0 / 3.0).abs() < 1e-12);
        assert_eq!((x.firing_alerts, x.groups), (7, 6));
        // The markdown names the miss and the harmless rollback.
        let md = attribution_md(&x);
        assert!(md.contains("| 2/3 = 0.67 | 1 |"), "{md}");
        assert!(md.contains("fr:tickets (a-frt named chg-nice)"), "{md}");
        assert!(
            md.contains("Harmless changes rolled back: chg-nice"),
            "{md}"
        );
        // Without the engine's new fields: nothing named, nothing covered, one group each.
        let plain: Vec<Alert> = a
            .iter()
            .map(|x| Alert::new(&x.id, &x.metric, &[], &x.kind, x.onset_ms, x.detected_ms))
            .map(|mut y| {
                y.series = a.iter().find(|z| z.id == y.id).unwrap().series.clone();
                y
            })
            .collect();
        let s = score("guardrail", &truth, &plain, &rules, 1.0, None).unwrap();
        let x = attribution(&truth, &plain, &s, &[], &rules).unwrap();
        assert_eq!((x.top1_n, x.top1_correct, x.onset_covered), (3, 0, 0));
        assert_eq!(x.top1_misses[0].named, None);
        assert_eq!(x.onset_width_windows_median, None);
        assert_eq!((x.firing_alerts, x.groups), (7, 7));
        assert_eq!(x.harmless_rolled_back, 0);
        assert!(attribution_md(&x).contains("a-fr named none"));
    }

    #[test]
    fn alerts_and_rollbacks_are_read_with_and_without_the_new_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("alerts.jsonl");
        std::fs::write(
            &p,
            concat!(
                r#"{"incident_id":"i1","status":"firing","metric":"m","series":{"country":"FR"},"kind":"drop","onset":"2026-11-02T10:00:00Z","detected_at":"2026-11-02T10:30:00Z","onset_low":"2026-11-02T09:50:00Z","onset_high":"2026-11-02T10:05:00Z","group_id":"g1","candidate_changes":[{"change_id":"c1","score":0.9,"evidence":"x"},{"change_id":"c2","score":0.1,"evidence":"y"}]}"#,
                "\n",
                r#"{"incident_id":"i1","status":"firing","metric":"m","series":{},"kind":"drop","onset":"2026-11-02T10:00:00Z","detected_at":"2026-11-02T11:00:00Z","group_id":"other"}"#,
                "\n",
                r#"{"incident_id":"i2","status":"firing","metric":"m","series":{},"kind":"spike","onset":"2026-11-02T12:00:00Z","detected_at":"2026-11-02T12:30:00Z","candidate_changes":[]}"#,
                "\n",
                r#"{"incident_id":"i2","status":"resolved","metric":"m","series":{},"kind":"spike","onset":"2026-11-02T12:00:00Z","detected_at":"2026-11-02T12:30:00Z"}"#,
                "\n"
            ),
        )
        .unwrap();
        let a = read_alerts(&p).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].onset_low_ms, parse_time_str("2026-11-02T09:50:00Z"));
        assert_eq!(a[0].onset_high_ms, parse_time_str("2026-11-02T10:05:00Z"));
        assert_eq!(a[0].group(), "g1");
        assert_eq!(a[0].candidates, vec!["c1".to_string(), "c2".to_string()]);
        assert_eq!((a[1].onset_low_ms, a[1].onset_high_ms), (None, None));
        assert_eq!(a[1].group(), "i2");
        assert!(a[1].candidates.is_empty());
        let r = dir.path().join("rollbacks.jsonl");
        assert!(
            read_rollbacks(&r).unwrap().is_empty(),
            "no file, no requests"
        );
        std::fs::write(
            &r,
            concat!(
                r#"{"specversion":"1.0","id":"rb-1","data":{"change_id":"c1","incident_id":"i1"}}"#,
                "\n",
                r#"{"specversion":"1.0","id":"rb-1","data":{"change_id":"c1","incident_id":"i1"}}"#,
                "\n",
                r#"{"specversion":"1.0","id":"rb-2","data":{"change_id":"c2","incident_id":"i2"}}"#,
                "\n"
            ),
        )
        .unwrap();
        assert_eq!(
            read_rollbacks(&r).unwrap(),
            vec![
                RollbackReq::new("rb-1", "c1", "i1"),
                RollbackReq::new("rb-2", "c2", "i2")
            ]
        );
    }

    #[test]
    fn arl0_of_the_default() {
        assert!((arl0(300, 0.01) - 201_600.0).abs() < 1e-6);
        assert!((arl0(300, 0.01).ln() - 12.214).abs() < 1e-3);
    }
}
