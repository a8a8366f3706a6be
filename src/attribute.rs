//! The changes registry and the first attribution: which changes in force could explain an
//! incident, ranked by how well their scope covers the series and how close their timing is to
//! the estimated onset.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{PolicyConfig, Tier};
use crate::event::{fmt_time, Actor, Change, ChangeAction, Scope};

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
}

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
}

/// Onset estimates are window-granular; a change applied within this many windows after the
/// estimated onset still counts as before it.
pub const ONSET_SLACK_WINDOWS: i64 = 1;
/// Timing weight halves for every this many milliseconds between the change and the onset.
const TIMING_HALF_LIFE_MS: f64 = 6.0 * 3600.0 * 1000.0;

impl Registry {
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
            });
        match c.action {
            ChangeAction::Applied => {
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

    /// Ranks the changes that could explain an incident on a series with dimensions `dims`
    /// (the metric's fixed selector surface, if any, is passed in `surface`), whose onset is
    /// `onset_ms`. Best first.
    pub fn candidates(
        &self,
        dims: &[(String, String)],
        surface: Option<&str>,
        onset_ms: i64,
        window_ms: i64,
        lookback_ms: i64,
    ) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = Vec::new();
        for st in self.changes.values() {
            let Some(applied) = st.applied_ms else {
                continue;
            };
            if applied > onset_ms + ONSET_SLACK_WINDOWS * window_ms {
                continue;
            }
            if onset_ms - applied > lookback_ms {
                continue;
            }
            // Rolled back or superseded before the onset: not in force when things went wrong.
            if [st.rolled_back_ms, st.superseded_ms]
                .iter()
                .flatten()
                .any(|e| *e <= onset_ms)
            {
                continue;
            }
            let cov = coverage(&st.scope, dims, surface);
            if cov == Coverage::None {
                continue;
            }
            let gap = (onset_ms - applied).max(0) as f64;
            let timing = 0.5f64.powf(gap / TIMING_HALF_LIFE_MS).max(0.05);
            let score = (cov.weight() * timing * 1000.0).round() / 1000.0;
            let rel = if applied <= onset_ms {
                format!("{} before the onset", human_duration(onset_ms - applied))
            } else {
                format!(
                    "{} after the estimated onset (within one window)",
                    human_duration(applied - onset_ms)
                )
            };
            let cov_text = match cov {
                Coverage::Exact => "scope covers this segment exactly".to_string(),
                Coverage::Everything => "scope is everything".to_string(),
                Coverage::Partial => "this series covers the scope and more".to_string(),
                Coverage::None => unreachable!(),
            };
            out.push(Candidate {
                change_id: st.change_id.clone(),
                score,
                evidence: format!(
                    "{} change by {} {} applied {} ({}), {}{}",
                    st.kind.as_deref().unwrap_or("unspecified"),
                    st.actor.kind,
                    st.actor.name,
                    fmt_time(applied),
                    rel,
                    cov_text,
                    scope_text(&st.scope)
                ),
            });
        }
        out.sort_by(|a, b| {
            b.score
                .partial_cmp(&a.score)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| a.change_id.cmp(&b.change_id))
        });
        out
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

    #[test]
    fn ranks_by_scope_and_timing() {
        let r = reg();
        let dims = vec![("country".to_string(), "FR".to_string())];
        let c = r.candidates(&dims, Some("checkout"), 1_300_000, 300_000, 86_400_000);
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
        let c = r.candidates(&[], None, 1_300_000, 300_000, 86_400_000);
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
