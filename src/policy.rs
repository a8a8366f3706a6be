//! Policy: from an incident and its top candidate change to a decision, by tier.
//!
//! - `autonomous`: request the rollback at once, and report.
//! - `supervised`: request it when the veto window ends, unless someone vetoes first (or
//!   approves earlier).
//! - `human`: never act alone; ask for a decision and escalate when nobody answers in time.
//!
//! What applies is found in order: the tier the change names, the first `[[policy.rules]]`
//! matching (change kind, metric severity), `tiers` by kind, `default_tier`. Shadow mode
//! (global or per rule) decides and audits but never acts. The circuit breaker (in the engine,
//! which counts rollbacks) turns an automatic rollback into a human decision.
//!
//! A rollback is requested at most once per change while a request is pending: a second
//! incident blamed on the same change is recorded against the pending request.

use serde::Serialize;

use crate::attribute::{Candidate, ChangeState};
use crate::config::{PolicyConfig, Severity, Tier};
use crate::event::{fmt_time, Actor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionAction {
    /// A rollback request is produced.
    RollbackRequested,
    /// A rollback for this change is already pending; nothing new is produced.
    RollbackAlreadyRequested,
    /// `supervised`: the rollback will be requested at `deadline` unless vetoed.
    AwaitingVetoWindow,
    /// `human` (or breaker open): waits for approve or veto.
    NeedsHumanDecision,
    /// Shadow mode: the rollback would have been requested.
    ShadowRollback,
    /// No change in force explains the incident; people investigate.
    NoCandidate,
    /// The top candidate is no longer in force (already rolled back or superseded).
    ChangeNotInForce,
    /// A person refused the rollback: the change stays.
    Vetoed,
    /// The circuit breaker is open: guardrail stopped acting and asks a human.
    BreakerOpen,
    /// Not a case for rollback (a broken split, sprawl, pressure): people investigate.
    Investigate,
}

impl DecisionAction {
    pub const ALL: [DecisionAction; 10] = [
        DecisionAction::RollbackRequested,
        DecisionAction::RollbackAlreadyRequested,
        DecisionAction::AwaitingVetoWindow,
        DecisionAction::NeedsHumanDecision,
        DecisionAction::ShadowRollback,
        DecisionAction::NoCandidate,
        DecisionAction::ChangeNotInForce,
        DecisionAction::Vetoed,
        DecisionAction::BreakerOpen,
        DecisionAction::Investigate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DecisionAction::RollbackRequested => "rollback_requested",
            DecisionAction::RollbackAlreadyRequested => "rollback_already_requested",
            DecisionAction::AwaitingVetoWindow => "awaiting_veto_window",
            DecisionAction::NeedsHumanDecision => "needs_human_decision",
            DecisionAction::ShadowRollback => "shadow_rollback",
            DecisionAction::NoCandidate => "no_candidate",
            DecisionAction::ChangeNotInForce => "change_not_in_force",
            DecisionAction::Vetoed => "vetoed",
            DecisionAction::BreakerOpen => "breaker_open",
            DecisionAction::Investigate => "investigate",
        }
    }

    /// Waiting on a person (or on a veto window): approve and veto make sense.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            DecisionAction::AwaitingVetoWindow
                | DecisionAction::NeedsHumanDecision
                | DecisionAction::BreakerOpen
        )
    }
}

/// A decision and the rule that produced it.
#[derive(Debug, Clone, Serialize, PartialEq, serde::Deserialize)]
pub struct Decision {
    pub action: DecisionAction,
    pub change_id: Option<String>,
    pub tier: Option<Tier>,
    /// The policy rule that applied (named so audits can cite it).
    pub policy: String,
    pub reason: String,
    /// Shadow mode applied: guardrail decides and audits, never acts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    /// Event time the veto window ends (`awaiting_veto_window`) or escalation is due
    /// (`needs_human_decision`, `breaker_open`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    #[serde(skip)]
    pub deadline_ms: Option<i64>,
    /// The person who approved or vetoed, when a person decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<Actor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<Actor>,
    /// Nobody decided in time and the alert was re-sent with a higher severity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub escalated: bool,
}

impl Decision {
    pub fn new(action: DecisionAction, policy: &str, reason: String) -> Decision {
        Decision {
            action,
            change_id: None,
            tier: None,
            policy: policy.to_string(),
            reason,
            shadow: false,
            deadline: None,
            deadline_ms: None,
            decided_by: None,
            acknowledged_by: None,
            escalated: false,
        }
    }

    pub fn set_deadline(&mut self, at_ms: Option<i64>) {
        self.deadline_ms = at_ms;
        self.deadline = at_ms.map(fmt_time);
    }
}

/// What governs a change hurting a metric of some severity.
#[derive(Debug, Clone, PartialEq)]
pub struct Applicable {
    pub tier: Tier,
    pub tier_source: &'static str,
    /// Rule cited in decisions.
    pub rule: String,
    pub shadow: bool,
    pub veto_window_ms: i64,
    pub escalate_after_ms: i64,
}

pub fn applicable(policy: &PolicyConfig, change: &ChangeState, severity: Severity) -> Applicable {
    let rule = policy.rules.iter().enumerate().find(|(_, r)| {
        r.change_kind
            .as_ref()
            .map(|k| change.kind.as_ref() == Some(k))
            .unwrap_or(true)
            && r.metric_severity.map(|s| s == severity).unwrap_or(true)
    });
    let (tier, tier_source) = if let Some(t) = change.tier {
        (t, "named by the change")
    } else if let Some(t) = rule.and_then(|(_, r)| r.tier) {
        (t, "policy rule")
    } else if let Some(t) = change.kind.as_ref().and_then(|k| policy.tiers.get(k)) {
        (*t, "policy for its kind")
    } else {
        (policy.default_tier, "default tier")
    };
    let rule_name = match rule {
        Some((i, r)) => r.name.clone().unwrap_or_else(|| format!("rule-{}", i + 1)),
        None => match tier {
            Tier::Autonomous => "autonomous-immediate".into(),
            Tier::Supervised => "supervised-veto-window".into(),
            Tier::Human => "human-decides".into(),
        },
    };
    let secs = |o: Option<u64>, d: u64| o.unwrap_or(d) as i64 * 1000;
    Applicable {
        tier,
        tier_source,
        rule: rule_name,
        shadow: policy.shadow_mode || rule.and_then(|(_, r)| r.shadow_mode).unwrap_or(false),
        veto_window_ms: secs(
            rule.and_then(|(_, r)| r.veto_window_secs),
            policy.veto_window_secs,
        ),
        escalate_after_ms: secs(
            rule.and_then(|(_, r)| r.escalate_after_secs),
            policy.escalate_after_secs,
        ),
    }
}

/// Decides for an incident on a metric of `severity` detected at event time `at_ms`.
pub fn decide(
    policy: &PolicyConfig,
    top: Option<&Candidate>,
    change: Option<&ChangeState>,
    pending_rollback: bool,
    at_ms: i64,
    severity: Severity,
) -> Decision {
    let (Some(top), Some(change)) = (top, change) else {
        return Decision::new(
            DecisionAction::NoCandidate,
            "no-candidate",
            "no change in force covers this series before the onset; investigate".into(),
        );
    };
    let ap = applicable(policy, change, severity);
    let mk = |action, reason: String| {
        let mut d = Decision::new(action, &ap.rule, reason);
        d.change_id = Some(top.change_id.clone());
        d.tier = Some(ap.tier);
        d.shadow = ap.shadow;
        d
    };
    let id = &top.change_id;
    let src = ap.tier_source;
    if !change.in_force_at(at_ms) {
        return mk(
            DecisionAction::ChangeNotInForce,
            format!("{id} is no longer in force; nothing to roll back"),
        );
    }
    if pending_rollback {
        return mk(
            DecisionAction::RollbackAlreadyRequested,
            format!("rollback of {id} already requested and pending"),
        );
    }
    let shadow_note = if ap.shadow {
        " (shadow mode: decide and audit, never act)"
    } else {
        ""
    };
    match ap.tier {
        Tier::Autonomous if ap.shadow => mk(
            DecisionAction::ShadowRollback,
            format!("tier autonomous ({src}): would request rollback of {id}{shadow_note}"),
        ),
        Tier::Autonomous => mk(
            DecisionAction::RollbackRequested,
            format!(
                "tier autonomous ({src}): bounded impact, rollback of {id} requested at once (candidate score {:.2})",
                top.score
            ),
        ),
        Tier::Supervised => {
            let mut d = mk(
                DecisionAction::AwaitingVetoWindow,
                format!(
                    "tier supervised ({src}): rollback of {id} at {} unless vetoed{shadow_note}",
                    fmt_time(at_ms + ap.veto_window_ms)
                ),
            );
            d.set_deadline(Some(at_ms + ap.veto_window_ms));
            d
        }
        Tier::Human => {
            let mut d = mk(
                DecisionAction::NeedsHumanDecision,
                format!(
                    "tier human ({src}): guardrail does not act alone on {id}; approve or veto (escalates at {}){shadow_note}",
                    fmt_time(at_ms + ap.escalate_after_ms)
                ),
            );
            d.set_deadline(Some(at_ms + ap.escalate_after_ms));
            d
        }
    }
}

/// guardrail does not act on its own, it asks a human whatever the tier, on a weak top
/// candidate (score under `min_score_to_act`), on a close call
/// between the top candidate and the runner-up (its score within a factor `min_ratio`), or
/// when the series that moved is wider than the top candidate's scope (the total, for a change
/// to one country: the change's own segments decide). The decision keeps the top candidate,
/// so a person can approve its rollback.
pub fn close_call(
    d: &mut Decision,
    top: &Candidate,
    runner_up: Option<&Candidate>,
    cfg: &crate::config::AttributionConfig,
    escalate_at_ms: i64,
) {
    let automatic = matches!(
        d.action,
        DecisionAction::RollbackRequested | DecisionAction::AwaitingVetoWindow
    );
    if !automatic {
        return;
    }
    let id = &top.change_id;
    let why = if !top.within_scope {
        format!(
            "this series also aggregates segments outside {id}'s scope, so its shift alone does not show the change's harm; guardrail acts alone only on a series inside the scope"
        )
    } else if top.score < cfg.min_score_to_act {
        format!(
            "{id} is the best candidate but a weak one (score {:.2}, under the {:.2} needed to act alone)",
            top.score, cfg.min_score_to_act
        )
    } else if let Some(second) = runner_up.filter(|s| top.score < cfg.min_score_ratio * s.score) {
        format!(
            "{id} and {} explain the shift about equally well (scores {:.2} and {:.2}, under the {:.1}x needed to act alone)",
            second.change_id, top.score, second.score, cfg.min_score_ratio
        )
    } else {
        return;
    };
    d.action = DecisionAction::NeedsHumanDecision;
    d.reason = format!(
        "{why}: a person decides (escalates at {})",
        fmt_time(escalate_at_ms)
    );
    d.set_deadline(Some(escalate_at_ms));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyRule;
    use crate::event::{Actor, Scope};

    fn change(tier: Option<Tier>, kind: Option<&str>) -> ChangeState {
        ChangeState {
            change_id: "c1".into(),
            applied_ms: Some(0),
            rolled_back_ms: None,
            superseded_ms: None,
            actor: Actor::system("x"),
            kind: kind.map(String::from),
            scope: Scope::default(),
            tier,
            holdout: None,
            owner: None,
            description: None,
            rollback: None,
            rolled_back_by: None,
            target_metric: None,
            steps: Vec::new(),
        }
    }

    fn cand() -> Candidate {
        Candidate {
            change_id: "c1".into(),
            score: 0.9,
            evidence: String::new(),
            reversal: false,
            within_scope: true,
            distance: 0,
        }
    }

    #[test]
    fn close_calls_weak_candidates_and_wider_series_go_to_a_person() {
        let cfg = crate::config::AttributionConfig::default();
        let auto = || {
            let mut d = Decision::new(DecisionAction::RollbackRequested, "r", String::new());
            d.change_id = Some("c1".into());
            d
        };
        let second = |score| Candidate {
            change_id: "c2".into(),
            score,
            ..cand()
        };
        let mut d = auto();
        let top = cand().score;
        close_call(&mut d, &cand(), Some(&second(top / 8.5)), &cfg, 1000);
        assert_eq!(d.action, DecisionAction::RollbackRequested, "clear: acts");
        close_call(&mut d, &cand(), Some(&second(top / 7.5)), &cfg, 1000);
        assert_eq!(d.action, DecisionAction::NeedsHumanDecision);
        assert!(d.reason.contains("about equally well"), "{}", d.reason);
        assert_eq!(d.deadline_ms, Some(1000));
        let mut d = auto();
        let weak = Candidate {
            score: 0.2,
            ..cand()
        };
        close_call(&mut d, &weak, None, &cfg, 1000);
        assert!(d.reason.contains("weak one"), "{}", d.reason);
        let mut d = auto();
        let wide = Candidate {
            within_scope: false,
            ..cand()
        };
        close_call(&mut d, &wide, None, &cfg, 1000);
        assert!(d.reason.contains("outside c1's scope"), "{}", d.reason);
        let mut d = Decision::new(DecisionAction::NeedsHumanDecision, "r", "asks".into());
        close_call(&mut d, &weak, None, &cfg, 1000);
        assert_eq!(d.reason, "asks", "a human tier stays as it is");
    }

    fn d(p: &PolicyConfig, ch: &ChangeState, pending: bool, sev: Severity) -> Decision {
        decide(p, Some(&cand()), Some(ch), pending, 10, sev)
    }

    #[test]
    fn tiers() {
        let mut p = PolicyConfig::default();
        let crit = Severity::Critical;
        let auto = change(Some(Tier::Autonomous), None);
        assert_eq!(
            d(&p, &auto, false, crit).action,
            DecisionAction::RollbackRequested
        );
        assert_eq!(
            d(&p, &auto, true, crit).action,
            DecisionAction::RollbackAlreadyRequested
        );
        let wording = change(None, Some("wording"));
        let x = d(&p, &wording, false, crit);
        assert_eq!(x.action, DecisionAction::NeedsHumanDecision);
        assert_eq!(x.tier, Some(Tier::Human));
        assert_eq!(x.deadline_ms, Some(10 + 30 * 60 * 1000));
        p.tiers.insert("wording".into(), Tier::Supervised);
        let x = d(&p, &wording, false, crit);
        assert_eq!(x.action, DecisionAction::AwaitingVetoWindow);
        assert_eq!(x.deadline_ms, Some(10 + 15 * 60 * 1000));
        assert!(x.reason.contains("policy for its kind"), "{}", x.reason);
        p.tiers.insert("wording".into(), Tier::Autonomous);
        assert_eq!(
            d(&p, &wording, false, crit).action,
            DecisionAction::RollbackRequested
        );
        p.shadow_mode = true;
        let x = d(&p, &wording, false, crit);
        assert_eq!(x.action, DecisionAction::ShadowRollback);
        assert!(x.shadow);
        assert_eq!(
            decide(&p, None, None, false, 10, crit).action,
            DecisionAction::NoCandidate
        );
    }

    #[test]
    fn rules_match_kind_and_severity_in_order() {
        let mut p = PolicyConfig::default();
        p.tiers.insert("wording".into(), Tier::Autonomous);
        p.rules = vec![
            PolicyRule {
                name: Some("wording-critical".into()),
                change_kind: Some("wording".into()),
                metric_severity: Some(Severity::Critical),
                tier: Some(Tier::Supervised),
                veto_window_secs: Some(60),
                ..Default::default()
            },
            PolicyRule {
                name: Some("trial-offers".into()),
                change_kind: Some("offer".into()),
                shadow_mode: Some(true),
                ..Default::default()
            },
        ];
        let wording = change(None, Some("wording"));
        let x = d(&p, &wording, false, Severity::Critical);
        assert_eq!(x.action, DecisionAction::AwaitingVetoWindow);
        assert_eq!(x.policy, "wording-critical");
        assert_eq!(x.deadline_ms, Some(10 + 60_000));
        // Warning severity: the rule does not match; `tiers` decides.
        let x = d(&p, &wording, false, Severity::Warning);
        assert_eq!(x.action, DecisionAction::RollbackRequested);
        assert_eq!(x.policy, "autonomous-immediate");
        // Per-rule shadow mode, with the change's own tier.
        let offer = change(Some(Tier::Autonomous), Some("offer"));
        let x = d(&p, &offer, false, Severity::Critical);
        assert_eq!(x.action, DecisionAction::ShadowRollback);
        assert_eq!(x.policy, "trial-offers");
        // The change names its tier: it wins over the rule's tier.
        let named = change(Some(Tier::Human), Some("wording"));
        let x = d(&p, &named, false, Severity::Critical);
        assert_eq!(x.action, DecisionAction::NeedsHumanDecision);
        assert!(x.reason.contains("named by the change"));
    }
}
