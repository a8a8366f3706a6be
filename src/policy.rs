//! Policy: from an incident and its top candidate change to a decision, by tier.
//!
//! - `autonomous`: request the rollback at once (unless shadow mode), and report.
//! - `supervised` and `human`: this version records that a human decision is needed, in the
//!   alert and the audit trail; veto windows, approvals and escalation build on this.
//!
//! A rollback is requested at most once per change while a request is pending: a second
//! incident blamed on the same change is recorded against the pending request.

use serde::Serialize;

use crate::attribute::{Candidate, ChangeState};
use crate::config::{PolicyConfig, Tier};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionAction {
    /// A rollback request is produced.
    RollbackRequested,
    /// A rollback for this change is already pending; nothing new is produced.
    RollbackAlreadyRequested,
    /// The change's tier does not let guardrail act alone.
    NeedsHumanDecision,
    /// Shadow mode: the rollback would have been requested.
    ShadowRollback,
    /// No change in force explains the incident; people investigate.
    NoCandidate,
    /// The top candidate is no longer in force (already rolled back or superseded).
    ChangeNotInForce,
}

impl DecisionAction {
    pub const ALL: [DecisionAction; 6] = [
        DecisionAction::RollbackRequested,
        DecisionAction::RollbackAlreadyRequested,
        DecisionAction::NeedsHumanDecision,
        DecisionAction::ShadowRollback,
        DecisionAction::NoCandidate,
        DecisionAction::ChangeNotInForce,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DecisionAction::RollbackRequested => "rollback_requested",
            DecisionAction::RollbackAlreadyRequested => "rollback_already_requested",
            DecisionAction::NeedsHumanDecision => "needs_human_decision",
            DecisionAction::ShadowRollback => "shadow_rollback",
            DecisionAction::NoCandidate => "no_candidate",
            DecisionAction::ChangeNotInForce => "change_not_in_force",
        }
    }
}

/// A decision and the rule that produced it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Decision {
    pub action: DecisionAction,
    pub change_id: Option<String>,
    pub tier: Option<Tier>,
    /// The policy rule that applied (named so audits can cite it).
    pub policy: &'static str,
    pub reason: String,
}

/// Decides for an incident detected at event time `at_ms`.
pub fn decide(
    policy: &PolicyConfig,
    top: Option<&Candidate>,
    change: Option<&ChangeState>,
    pending_rollback: bool,
    at_ms: i64,
) -> Decision {
    let (Some(top), Some(change)) = (top, change) else {
        return Decision {
            action: DecisionAction::NoCandidate,
            change_id: None,
            tier: None,
            policy: "no-candidate",
            reason: "no change in force covers this series before the onset; investigate".into(),
        };
    };
    let tier = change.effective_tier(policy);
    let tier_source = if change.tier.is_some() {
        "named by the change"
    } else if change
        .kind
        .as_ref()
        .map(|k| policy.tiers.contains_key(k))
        .unwrap_or(false)
    {
        "policy for its kind"
    } else {
        "default tier"
    };
    let mk = |action, policy_name: &'static str, reason: String| Decision {
        action,
        change_id: Some(top.change_id.clone()),
        tier: Some(tier),
        policy: policy_name,
        reason,
    };
    if !change.in_force_at(at_ms) {
        return mk(
            DecisionAction::ChangeNotInForce,
            "not-in-force",
            format!(
                "{} is no longer in force; nothing to roll back",
                top.change_id
            ),
        );
    }
    match tier {
        Tier::Autonomous => {
            if pending_rollback {
                mk(
                    DecisionAction::RollbackAlreadyRequested,
                    "autonomous-immediate",
                    format!(
                        "rollback of {} already requested and pending",
                        top.change_id
                    ),
                )
            } else if policy.shadow_mode {
                mk(
                    DecisionAction::ShadowRollback,
                    "shadow-mode",
                    format!(
                        "tier autonomous ({tier_source}): would request rollback of {}, shadow mode is on",
                        top.change_id
                    ),
                )
            } else {
                mk(
                    DecisionAction::RollbackRequested,
                    "autonomous-immediate",
                    format!(
                        "tier autonomous ({tier_source}): bounded impact, rollback of {} requested at once (candidate score {:.2})",
                        top.change_id, top.score
                    ),
                )
            }
        }
        Tier::Supervised | Tier::Human => mk(
            DecisionAction::NeedsHumanDecision,
            if tier == Tier::Human {
                "human-decides"
            } else {
                "supervised-needs-human"
            },
            format!(
                "tier {} ({tier_source}): guardrail does not act alone on {}; needs human decision",
                tier.as_str(),
                top.change_id
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        }
    }

    fn cand() -> Candidate {
        Candidate {
            change_id: "c1".into(),
            score: 0.9,
            evidence: String::new(),
        }
    }

    #[test]
    fn tiers() {
        let mut p = PolicyConfig::default();
        let c = cand();
        let d = decide(
            &p,
            Some(&c),
            Some(&change(Some(Tier::Autonomous), None)),
            false,
            10,
        );
        assert_eq!(d.action, DecisionAction::RollbackRequested);
        let d = decide(
            &p,
            Some(&c),
            Some(&change(Some(Tier::Autonomous), None)),
            true,
            10,
        );
        assert_eq!(d.action, DecisionAction::RollbackAlreadyRequested);
        let d = decide(
            &p,
            Some(&c),
            Some(&change(None, Some("wording"))),
            false,
            10,
        );
        assert_eq!(d.action, DecisionAction::NeedsHumanDecision);
        assert_eq!(d.tier, Some(Tier::Human));
        p.tiers.insert("wording".into(), Tier::Autonomous);
        let d = decide(
            &p,
            Some(&c),
            Some(&change(None, Some("wording"))),
            false,
            10,
        );
        assert_eq!(d.action, DecisionAction::RollbackRequested);
        assert!(d.reason.contains("policy for its kind"));
        p.shadow_mode = true;
        let d = decide(
            &p,
            Some(&c),
            Some(&change(None, Some("wording"))),
            false,
            10,
        );
        assert_eq!(d.action, DecisionAction::ShadowRollback);
        let d = decide(&p, None, None, false, 10);
        assert_eq!(d.action, DecisionAction::NoCandidate);
    }
}
