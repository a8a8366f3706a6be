//! The changes registry and the first attribution: which changes in force could explain an
//! incident, ranked by how well their scope covers the series and how close their timing is to
//! the estimated onset.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{PolicyConfig, Tier};
use crate::event::{fmt_time, Actor, Change, ChangeAction, Scope};
use crate::onset::Onset;

/// What the registry knows of one change.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ChangeState {
    pub change_id: String,
    pub applied_ms: Option<i64>,
    pub rolled_back_ms: Option<i64>,
    pub superseded_ms: Option<i64>,
    pub actor: Actor,
    pub kind: Option<String>,
    pub scope: Scope,
    pub tier: Option<Tier>,
    pub holdout: Option<f64>,
    pub owner: Option<String>,
    pub description: Option<String>,
    pub rollback: Option<serde_json::Value>,
    /// Who confirmed the rollback.
    pub rolled_back_by: Option<Actor>,
    /// The metric the change is meant to improve.
    pub target_metric: Option<String>,
    /// A gradual rollout's steps since the application (the first one at it), when its
    /// records say how much of the audience it reached; empty when it reached all at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<RolloutStep>,
}

/// From `at_ms` on, the change reached `share` of its audience.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct RolloutStep {
    pub at_ms: i64,
    pub share: f64,
}

/// Rollout steps kept per change: later steps replace the last one kept.
const MAX_STEPS: usize = 16;

impl ChangeState {
    /// In force at event time `t`.
    pub fn in_force_at(&self, t: i64) -> bool {
        let applied = self.applied_ms.map(|a| a <= t).unwrap_or(false);
        let ended = [self.rolled_back_ms, self.superseded_ms]
            .iter()
            .flatten()
            .any(|e| *e <= t);
        applied && !ended
    }

    /// The tier that governs this change: its own, else the policy for its kind, else the
    /// default.
    pub fn effective_tier(&self, policy: &PolicyConfig) -> Tier {
        self.tier
            .or_else(|| {
                self.kind
                    .as_ref()
                    .and_then(|k| policy.tiers.get(k).copied())
            })
            .unwrap_or(policy.default_tier)
    }
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Registry {
    changes: BTreeMap<String, ChangeState>,
}

/// How a change's scope relates to a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Every scope constraint is matched by the series' own dimensions.
    Exact,
    /// The change applies everywhere.
    Everything,
    /// The series aggregates over some scoped dimension: it contains the scope.
    Partial,
    None,
}

impl Coverage {
    fn weight(self) -> f64 {
        match self {
            Coverage::Exact => 1.0,
            Coverage::Everything => 0.7,
            Coverage::Partial => 0.5,
            Coverage::None => 0.0,
        }
    }
}

/// One candidate change for an incident.
#[derive(Debug, Clone, Serialize, PartialEq, serde::Deserialize)]
pub struct Candidate {
    pub change_id: String,
    pub score: f64,
    pub evidence: String,
    /// The shift began when the change was rolled back (or superseded), not applied: the level
    /// went back to what it was before it. Nothing is left to roll back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reversal: bool,
    /// The series lies inside the change's audience ([`dims_within`]); false when it also
    /// aggregates segments the change does not touch. guardrail acts alone only on the former.
    #[serde(default, skip_serializing)]
    pub within_scope: bool,
    /// Windows between the change and the most likely onset: breaks ties of the score.
    #[serde(default, skip_serializing)]
    pub distance: i64,
}

/// Onset estimates are window-granular; a change applied within this many windows after a
/// point estimate of the onset (drifts, guards' incidents) still counts as before it.
pub const ONSET_SLACK_WINDOWS: i64 = 1;
/// Timing weight halves for every this many milliseconds between the change and a point onset.
const TIMING_HALF_LIFE_MS: f64 = 6.0 * 3600.0 * 1000.0;
/// A candidate's timing weight never falls below this (a change that fits the scope is still
/// worth listing).
const MIN_TIMING: f64 = 0.05;
/// How long before the onset's set a change may have been applied and still be a (weak)
/// candidate: a gradual rollout's steps.
const ROLLOUT_ALLOWANCE_MS: i64 = 3 * 3600 * 1000;

/// What is known of when an incident began.
#[derive(Debug, Clone, Copy)]
pub enum Timing<'a> {
    /// A point estimate (drifts, guard findings): changes applied up to `lookback_ms` before
    /// it, or one window (or the clock skew, if larger) after it, are candidates.
    Point { onset_ms: i64 },
    /// The likelihood of the onset over the series' history: a change is a candidate when its
    /// time, widened by the clock skew, meets the onset set, and is ranked by how well "the
    /// shift began at this change" explains the series.
    Estimate(&'a Onset),
}

/// Where and when an incident happened, as attribution needs it.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub dims: &'a [(String, String)],
    /// The metric's fixed selector surface, if any.
    pub surface: Option<&'a str>,
    pub timing: Timing<'a>,
    /// Best onset (ms): changes ended before it are not in force.
    pub onset_ms: i64,
    pub window_ms: i64,
    pub lookback_ms: i64,
    /// How far change sources' clocks may run early or late.
    pub skew_ms: i64,
}

/// How a change's time fits the incident's onset.
struct Fit {
    weight: f64,
    text: String,
    distance: i64,
}

impl Registry {
    /// Applies a change record, keeping at most `max` changes: a new change past the bound
    /// makes room by forgetting the change that ended first, else the one applied first.
    /// Returns whether one was forgotten.
    pub fn apply_bounded(&mut self, c: &Change, max: usize) -> bool {
        let evict = !self.changes.contains_key(&c.change_id) && self.changes.len() >= max.max(1);
        if evict {
            let victim = self
                .changes
                .values()
                .min_by_key(|s| {
                    let ended = [s.rolled_back_ms, s.superseded_ms]
                        .into_iter()
                        .flatten()
                        .min();
                    (ended.is_none(), ended.or(s.applied_ms).unwrap_or(i64::MIN))
                })
                .map(|s| s.change_id.clone());
            if let Some(v) = victim {
                self.changes.remove(&v);
            }
        }
        self.apply(c);
        evict
    }

    /// Applies a change record; returns the state after it.
    pub fn apply(&mut self, c: &Change) -> &ChangeState {
        let st = self
            .changes
            .entry(c.change_id.clone())
            .or_insert_with(|| ChangeState {
                change_id: c.change_id.clone(),
                applied_ms: None,
                rolled_back_ms: None,
                superseded_ms: None,
                actor: c.actor.clone(),
                kind: None,
                scope: Scope::default(),
                tier: None,
                holdout: None,
                owner: None,
                description: None,
                rollback: None,
                rolled_back_by: None,
                target_metric: None,
                steps: Vec::new(),
            });
        let in_force = st.applied_ms.is_some_and(|a| a <= c.ts)
            && st.rolled_back_ms.is_none()
            && st.superseded_ms.is_none();
        match c.action {
            ChangeAction::Applied if in_force && c.rollout.is_some() => {
                let step = RolloutStep {
                    at_ms: c.ts,
                    share: c.rollout.unwrap_or(1.0),
                };
                if st.steps.is_empty() {
                    // Applied without a share: it reached everyone then.
                    st.steps.push(RolloutStep {
                        at_ms: st.applied_ms.unwrap_or(c.ts),
                        share: 1.0,
                    });
                }
                if st.steps.len() >= MAX_STEPS {
                    st.steps.pop();
                }
                st.steps.push(step);
                // Records may arrive out of order.
                st.steps.sort_by_key(|s| s.at_ms);
            }
            ChangeAction::Applied => {
                st.steps = c
                    .rollout
                    .map(|share| RolloutStep { at_ms: c.ts, share })
                    .into_iter()
                    .collect();
                st.applied_ms = Some(c.ts);
                st.rolled_back_ms = None;
                st.superseded_ms = None;
                st.actor = c.actor.clone();
                st.kind = c.kind.clone().or(st.kind.take());
                st.scope = c.scope.clone().unwrap_or_default();
                st.tier = c.tier.or(st.tier);
                st.holdout = c.holdout.or(st.holdout);
                st.owner = c.owner.clone().or(st.owner.take());
                st.description = c.description.clone().or(st.description.take());
                st.rollback = c.rollback.clone().or(st.rollback.take());
                st.target_metric = c.target_metric.clone().or(st.target_metric.take());
            }
            ChangeAction::RolledBack => {
                st.rolled_back_ms = Some(c.ts);
                st.rolled_back_by = Some(c.actor.clone());
            }
            ChangeAction::Superseded => st.superseded_ms = Some(c.ts),
        }
        st
    }

    pub fn get(&self, id: &str) -> Option<&ChangeState> {
        self.changes.get(id)
    }

    pub fn all(&self) -> impl Iterator<Item = &ChangeState> {
        self.changes.values()
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Ranks the changes that could explain an incident, best first: scope coverage times the
    /// timing fit (see [`Timing`]) of the change's application or, once it ended, of its
    /// rollback (a reversal).
    pub fn candidates(&self, q: &Query<'_>) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = Vec::new();
        for st in self.changes.values() {
            let Some(applied) = st.applied_ms else {
                continue;
            };
            let cov = coverage(&st.scope, q.dims, q.surface);
            if cov == Coverage::None {
                continue;
            }
            let ended = [st.rolled_back_ms, st.superseded_ms]
                .into_iter()
                .flatten()
                .min();
            // Ended before the onset: not in force when things went wrong, but its end may be
            // what moved the level.
            let over = ended.is_some_and(|e| e + q.skew_ms <= q.onset_ms);
            let gradual = st.steps.len() > 1 || st.steps.first().is_some_and(|s| s.share < 1.0);
            let mut fit = match (over, gradual) {
                (true, _) => None,
                (false, true) => stepped_fit(q, &st.steps),
                (false, false) => timing_fit(q, applied),
            };
            let mut reversal = false;
            if let (None, Some(e)) = (&fit, ended) {
                if let Some(f) =
                    timing_fit(q, e).filter(|_| !matches!(q.timing, Timing::Point { .. }))
                {
                    fit = Some(f);
                    reversal = true;
                }
            }
            if fit.is_none() && !over {
                fit = rollout_fit(q, applied);
            }
            let Some(fit) = fit else {
                continue;
            };
            let score = (cov.weight() * fit.weight * 1000.0).round() / 1000.0;
            let cov_text = match cov {
                Coverage::Exact => "scope covers this segment exactly",
                Coverage::Everything => "scope is everything",
                Coverage::Partial => "this series covers the scope and more",
                Coverage::None => unreachable!(),
            };
            let what = if reversal {
                format!(
                    "rolled back {} (the level moved when it was undone; nothing left to roll back)",
                    fmt_time(ended.unwrap_or(applied))
                )
            } else {
                format!("applied {}", fmt_time(applied))
            };
            out.push(Candidate {
                change_id: st.change_id.clone(),
                score,
                evidence: format!(
                    "{} change by {} {} {} ({}), {} (weight {:.1}){}",
                    st.kind.as_deref().unwrap_or("unspecified"),
                    st.actor.kind,
                    st.actor.name,
                    what,
                    fit.text,
                    cov_text,
                    cov.weight(),
                    scope_text(&st.scope)
                ),
                reversal,
                within_scope: dims_within(&st.scope, q.dims),
                distance: fit.distance,
            });
        }
        rank(&mut out);
        out
    }
}

/// Best first: by score, then the change nearest the most likely onset, then by id.
pub fn rank(c: &mut [Candidate]) {
    c.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.distance.cmp(&b.distance))
            .then_with(|| a.change_id.cmp(&b.change_id))
    });
}

/// A change applied before the onset's set, within [`ROLLOUT_ALLOWANCE_MS`] of it: a gradual
/// rollout moves the level by steps well after its change was applied, so it stays a (weak)
/// candidate, weighted by the likelihood of the shift starting at its time, at least
/// [`MIN_TIMING`]; a holdout comparison can still make it the best (see the engine's
/// `weigh_candidates`).
fn rollout_fit(q: &Query<'_>, applied: i64) -> Option<Fit> {
    let Timing::Estimate(o) = q.timing else {
        return None;
    };
    let wm = q.window_ms.max(1);
    let wa = applied.div_euclid(wm);
    let gap = (o.low_window - wa) * wm;
    if gap <= 0 || gap > ROLLOUT_ALLOWANCE_MS {
        return None;
    }
    let lr = o.fit_in(wa, wa + 1).unwrap_or(0.0);
    Some(Fit {
        weight: lr.max(MIN_TIMING),
        distance: o.window - wa,
        text: format!(
            "{} before the onset's {:.0}% set {}..{}: only a gradual rollout's later step fits",
            human_duration(gap),
            crate::onset::COVERAGE * 100.0,
            fmt_time(o.low_window * wm),
            fmt_time(o.high_window * wm)
        ),
    })
}

/// How well a gradual rollout fits the incident: with an onset estimate, the likelihood of
/// the shift following its steps (each showing from its window or the next, give or take the
/// clock skew) against the best start and shape; with a point onset, its best step's timing.
/// None when no step meets the onset set.
fn stepped_fit(q: &Query<'_>, steps: &[RolloutStep]) -> Option<Fit> {
    let Timing::Estimate(o) = q.timing else {
        return steps
            .iter()
            .filter_map(|s| timing_fit(q, s.at_ms))
            .max_by(|a, b| a.weight.total_cmp(&b.weight));
    };
    let wm = q.window_ms.max(1);
    let skew_w = (q.skew_ms + wm - 1) / wm;
    let schedule: Vec<(i64, f64)> = steps
        .iter()
        .map(|s| (s.at_ms.div_euclid(wm), s.share))
        .collect();
    let (first, last) = (schedule.first()?.0, schedule.last()?.0);
    if last + 1 + skew_w < o.low_window || first - skew_w > o.high_window {
        return None;
    }
    let lr = o
        .rollout_fit(&schedule, -skew_w..=skew_w + 1)
        .unwrap_or(0.0);
    let text = steps
        .iter()
        .map(|s| format!("{:.0}% {}", s.share * 100.0, fmt_time(s.at_ms)))
        .collect::<Vec<_>>()
        .join(", ");
    Some(Fit {
        weight: lr.max(MIN_TIMING),
        distance: schedule
            .iter()
            .map(|(w, _)| (o.window - w).abs())
            .min()
            .unwrap_or(0),
        text: format!(
            "rolled out in steps ({text}); likelihood of the shift following its rollout \
             (averaged over the clock skew) {lr:.2} of the best start and shape"
        ),
    })
}

/// How well a change applied at `applied` fits the incident's timing; None when it cannot
/// have caused it.
fn timing_fit(q: &Query<'_>, applied: i64) -> Option<Fit> {
    match q.timing {
        Timing::Point { onset_ms } => {
            let slack = (ONSET_SLACK_WINDOWS * q.window_ms).max(q.skew_ms);
            if applied > onset_ms + slack || onset_ms - applied > q.lookback_ms {
                return None;
            }
            let gap = (onset_ms - applied).max(0) as f64;
            let weight = 0.5f64.powf(gap / TIMING_HALF_LIFE_MS).max(MIN_TIMING);
            let text = if applied <= onset_ms {
                format!("{} before the onset", human_duration(onset_ms - applied))
            } else {
                format!(
                    "{} after the estimated onset (within the slack)",
                    human_duration(applied - onset_ms)
                )
            };
            let distance = (onset_ms - applied).abs() / q.window_ms.max(1);
            Some(Fit {
                weight,
                text,
                distance,
            })
        }
        Timing::Estimate(o) => {
            let wm = q.window_ms.max(1);
            let skew_w = (q.skew_ms + wm - 1) / wm;
            let wa = applied.div_euclid(wm);
            // A change inside window `wa` shows fully from the next window on.
            let (from, to) = (wa - skew_w, wa + 1 + skew_w);
            if to < o.low_window || from > o.high_window {
                return None;
            }
            let lr = o.fit_in(from, to).unwrap_or(1.0);
            let weight = lr.max(MIN_TIMING);
            let rel = if o.window >= wa {
                format!("{} before", human_duration((o.window - wa) * wm))
            } else {
                format!("{} after", human_duration((wa - o.window) * wm))
            };
            Some(Fit {
                weight,
                distance: (o.window - wa).abs(),
                text: format!(
                    "{rel} the most likely onset {}, inside its {:.0}% set {}..{} widened by the clock skew; \
                     likelihood of the shift starting at this change (averaged over the clock \
                     skew) {:.2} of the best",
                    fmt_time(o.window * wm),
                    crate::onset::COVERAGE * 100.0,
                    fmt_time(o.low_window * wm),
                    fmt_time(o.high_window * wm),
                    lr
                ),
            })
        }
    }
}

fn scope_text(s: &Scope) -> String {
    if s.is_everything() {
        return String::new();
    }
    let mut parts = Vec::new();
    if !s.surfaces.is_empty() {
        parts.push(format!("surfaces={}", s.surfaces.join(",")));
    }
    for (k, v) in &s.dims {
        if !v.is_empty() {
            parts.push(format!("{k}={}", v.join(",")));
        }
    }
    format!(" [{}]", parts.join(" "))
}

/// Every dimension the scope names is one of the series' own, with a value in the scope: the
/// series lies inside the change's audience (a metric not split by surface still does, for a
/// change on one surface; the total does not, for a change to one country).
pub fn dims_within(scope: &Scope, dims: &[(String, String)]) -> bool {
    scope
        .dims
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .all(|(k, vals)| {
            dims.iter()
                .any(|(n, v)| n == k && vals.iter().any(|s| s == v))
        })
}

/// How `scope` relates to a series with these dimension values.
pub fn coverage(scope: &Scope, dims: &[(String, String)], surface: Option<&str>) -> Coverage {
    if scope.is_everything() {
        return Coverage::Everything;
    }
    let lookup = |k: &str| dims.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let mut exact = true;
    if !scope.surfaces.is_empty() {
        match lookup("surface").or(surface) {
            Some(v) if scope.surfaces.iter().any(|s| s == v) => {}
            Some(_) => return Coverage::None,
            None => exact = false,
        }
    }
    for (k, vals) in &scope.dims {
        if vals.is_empty() {
            continue;
        }
        match lookup(k) {
            Some(v) if vals.iter().any(|s| s == v) => {}
            Some(_) => return Coverage::None,
            None => exact = false,
        }
    }
    if exact {
        Coverage::Exact
    } else {
        Coverage::Partial
    }
}

pub fn human_duration(ms: i64) -> String {
    let s = ms / 1000;
    if s < 120 {
        format!("{s} s")
    } else if s < 2 * 3600 {
        format!("{} min", s / 60)
    } else if s < 2 * 86400 {
        format!("{:.1} h", s as f64 / 3600.0)
    } else {
        format!("{:.1} days", s as f64 / 86400.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode_change;

    fn reg() -> Registry {
        let mut r = Registry::default();
        for c in [
            r#"{"change_id":"chg-1","ts":1000000,"action":"applied","actor":{"kind":"agent","name":"a"},"kind":"wording","scope":{"surfaces":["checkout"],"dims":{"country":["FR","BE"]}},"tier":"autonomous"}"#,
            r#"{"change_id":"chg-2","ts":900000,"action":"applied","actor":{"kind":"human","name":"h"},"kind":"offer"}"#,
            r#"{"change_id":"chg-3","ts":950000,"action":"applied","actor":{"kind":"agent","name":"b"},"scope":{"dims":{"country":["DE"]}}}"#,
            r#"{"change_id":"chg-4","ts":5000000,"action":"applied","actor":{"kind":"agent","name":"late"}}"#,
        ] {
            r.apply(&decode_change(c.as_bytes(), 10000).unwrap());
        }
        r
    }

    fn point<'a>(
        dims: &'a [(String, String)],
        surface: Option<&'a str>,
        onset_ms: i64,
    ) -> Query<'a> {
        Query {
            dims,
            surface,
            timing: Timing::Point { onset_ms },
            onset_ms,
            window_ms: 300_000,
            lookback_ms: 86_400_000,
            skew_ms: 0,
        }
    }

    /// The candidates of `r` for a drop on country `country`'s series with history `spans`
    /// (windows of `w` ms), with its onset estimated as the engine does.
    fn ranked(r: &Registry, spans: &[crate::onset::Span], country: &str, w: i64) -> Vec<Candidate> {
        use crate::onset::{estimate, Model};
        let o = estimate(
            spans,
            Model::Rate { scale: 1.0 },
            crate::detect::Side::Down,
            0.95,
            &crate::onset::ramp_windows(w),
        )
        .unwrap();
        let dims = vec![("country".to_string(), country.to_string())];
        r.candidates(&Query {
            dims: &dims,
            surface: None,
            timing: Timing::Estimate(&o),
            onset_ms: o.window * w,
            window_ms: w,
            lookback_ms: 7 * 86_400_000,
            skew_ms: 300_000,
        })
    }

    /// Two changes on the same segment, 40 minutes apart: the onset's likelihood picks the one
    /// applied when the shift began, and the other is listed below it, or not at all when its
    /// time does not meet the onset set.
    #[test]
    fn the_change_that_fits_the_onset_wins() {
        use crate::onset::{Span, Suff};
        let mut r = Registry::default();
        let w = 300_000i64;
        for (id, at) in [
            ("early", 100 * w),
            ("harmful", 108 * w + 60_000),
            ("late", 130 * w),
        ] {
            let c = format!(
                r#"{{"change_id":"{id}","ts":{at},"action":"applied","actor":{{"kind":"agent","name":"a"}},"scope":{{"dims":{{"country":["FR"]}}}}}}"#
            );
            r.apply(&decode_change(c.as_bytes(), 10000).unwrap());
        }
        // 2 expected events per window, halved from window 109.
        let spans: Vec<Span> = (80..125)
            .map(|k| Span {
                first_window: k,
                windows: 1,
                stat: Suff {
                    x: if k >= 109 { 1.0 } else { 2.0 },
                    e: 2.0,
                },
            })
            .collect();
        let c = ranked(&r, &spans, "FR", w);
        assert_eq!(c[0].change_id, "harmful", "{c:?}");
        assert!(c.iter().all(|c| c.change_id != "late"), "{c:?}");
        if let Some(e) = c.iter().find(|c| c.change_id == "early") {
            assert!(e.score < c[0].score / 2.0, "{c:?}");
        }
    }

    /// A rollout announced in steps (10% -> 50% -> 100%) and a one-off change on the same
    /// segment 15 minutes after its first step: the series moved with the rollout, so the
    /// rollout is named first, and a step record keeps the change's first application time.
    #[test]
    fn a_rollout_is_judged_by_its_own_steps() {
        use crate::onset::{Span, Suff};
        let mut r = Registry::default();
        let w = 300_000i64;
        let scope = r#""scope":{"dims":{"country":["IE"]}}"#;
        let actor = r#""actor":{"kind":"agent","name":"a"}"#;
        let mut apply = |json: String| {
            r.apply(&decode_change(json.as_bytes(), 10000).unwrap());
        };
        for (at, share) in [(100 * w, 0.1), (112 * w, 0.5), (124 * w, 1.0)] {
            apply(format!(
                r#"{{"change_id":"ramp","ts":{at},"action":"applied",{actor},{scope},"rollout":{share}}}"#
            ));
        }
        apply(format!(
            r#"{{"change_id":"copy","ts":{},"action":"applied",{actor},{scope}}}"#,
            103 * w
        ));
        let st = r.get("ramp").unwrap();
        assert_eq!(st.applied_ms, Some(100 * w));
        assert_eq!(st.steps.len(), 3);
        // 40 expected events per window, down 40% at full rollout.
        let spans: Vec<Span> = (60..140)
            .map(|k| {
                let share = match k {
                    k if k >= 124 => 1.0,
                    k if k >= 112 => 0.5,
                    k if k >= 100 => 0.1,
                    _ => 0.0,
                };
                Span {
                    first_window: k,
                    windows: 1,
                    stat: Suff {
                        x: (40.0 * (1.0 - 0.4 * share) as f32).round(),
                        e: 40.0,
                    },
                }
            })
            .collect();
        let c = ranked(&r, &spans, "IE", w);
        assert_eq!(c[0].change_id, "ramp", "{c:?}");
        assert!(c[0].evidence.contains("rolled out in steps"), "{c:?}");
        if let Some(copy) = c.iter().find(|c| c.change_id == "copy") {
            assert!(copy.score < c[0].score / 2.0, "{c:?}");
        }
    }

    /// Past the bound the change that ended first goes, then the one applied first; a record
    /// for a change already held never evicts.
    #[test]
    fn the_registry_is_bounded() {
        let mut r = Registry::default();
        let rec = |id: &str, ts: i64, action: &str| {
            decode_change(
                format!(r#"{{"change_id":"{id}","ts":{ts},"action":"{action}","actor":{{"kind":"agent","name":"a"}}}}"#).as_bytes(),
                10000,
            )
            .unwrap()
        };
        assert!(!r.apply_bounded(&rec("a", 1, "applied"), 2));
        assert!(!r.apply_bounded(&rec("b", 2, "applied"), 2));
        assert!(!r.apply_bounded(&rec("b", 3, "rolled_back"), 2));
        assert!(r.apply_bounded(&rec("c", 4, "applied"), 2));
        let ids: Vec<_> = r.all().map(|s| s.change_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert!(r.apply_bounded(&rec("d", 5, "applied"), 2));
        let ids: Vec<_> = r.all().map(|s| s.change_id.as_str()).collect();
        assert_eq!(ids, ["c", "d"]);
    }

    #[test]
    fn ranks_by_scope_and_timing() {
        let r = reg();
        let dims = vec![("country".to_string(), "FR".to_string())];
        let c = r.candidates(&point(&dims, Some("checkout"), 1_300_000));
        let ids: Vec<_> = c.iter().map(|c| c.change_id.as_str()).collect();
        // chg-3 is scoped to DE: excluded; chg-4 came after the onset: excluded.
        assert_eq!(ids, vec!["chg-1", "chg-2"]);
        assert!(
            c[0].evidence.contains("covers this segment exactly"),
            "{}",
            c[0].evidence
        );
    }

    #[test]
    fn rolled_back_before_onset_is_not_a_candidate() {
        let mut r = reg();
        r.apply(
            &decode_change(
                br#"{"change_id":"chg-1","ts":1100000,"action":"rolled_back","actor":{"kind":"system","name":"auto"}}"#,
                1000,
            )
            .unwrap(),
        );
        let c = r.candidates(&point(&[], None, 1_300_000));
        assert!(c.iter().all(|c| c.change_id != "chg-1"));
        assert!(!r.get("chg-1").unwrap().in_force_at(1_200_000));
        assert!(r.get("chg-1").unwrap().in_force_at(1_050_000));
    }

    #[test]
    fn coverage_rules() {
        let s = Scope {
            surfaces: vec!["checkout".into()],
            dims: [("country".to_string(), vec!["FR".to_string()])].into(),
        };
        let fr = vec![("country".to_string(), "FR".to_string())];
        let de = vec![("country".to_string(), "DE".to_string())];
        assert_eq!(coverage(&s, &fr, Some("checkout")), Coverage::Exact);
        assert_eq!(coverage(&s, &fr, None), Coverage::Partial);
        assert_eq!(coverage(&s, &de, None), Coverage::None);
        assert_eq!(coverage(&s, &[], None), Coverage::Partial);
        assert_eq!(coverage(&Scope::default(), &de, None), Coverage::Everything);
    }
}
