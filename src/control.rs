//! Human control of decisions: the commands the HTTP API hands to the engine, and its answers.
//!
//! The engine owns all decision state and runs on one task; the API never touches it. A control
//! call becomes a [`Command`] on a channel, the service loop applies it between messages (so it
//! is ordered with the event stream and its audit record goes out with the same flush as any
//! rollback it causes), and the answer comes back on a oneshot channel.

use serde::Serialize;
use tokio::sync::oneshot;

use crate::sink::AuditRecord;

/// What a person may do to an incident's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verb {
    /// Approve the pending rollback now (supervised: before the veto window ends; human: the
    /// only way a rollback happens).
    Approve,
    /// Refuse the rollback: the change stays.
    Veto,
    /// "I am on it": stops escalation, decides nothing.
    Acknowledge,
    /// Acknowledge and mute re-notification of this incident for a while.
    Silence,
}

impl Verb {
    pub const ALL: [Verb; 4] = [Verb::Approve, Verb::Veto, Verb::Acknowledge, Verb::Silence];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Approve => "approve",
            Verb::Veto => "veto",
            Verb::Acknowledge => "acknowledge",
            Verb::Silence => "silence",
        }
    }

    pub fn parse(s: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// The authenticated person behind a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Principal {
    pub name: String,
    pub role: String,
}

/// A decision call, after authentication and authorisation.
#[derive(Debug, Clone)]
pub struct DecisionCall {
    pub incident_id: String,
    pub verb: Verb,
    pub principal: Principal,
    pub reason: Option<String>,
    /// Only for `silence`.
    pub silence_secs: Option<u64>,
}

/// What the engine did with a call.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub incident_id: String,
    pub verb: Verb,
    pub audit_id: String,
    /// The incident's decision after the call (`crate::policy::Decision`).
    pub decision: crate::policy::Decision,
    /// One sentence for the caller.
    pub message: String,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ControlError {
    /// 404
    #[error("no incident {0}")]
    NotFound(String),
    /// 409: the call does not fit the decision's state (nothing pending to veto, already decided).
    #[error("{0}")]
    Conflict(String),
    /// 503: the engine is not running.
    #[error("the engine is not running")]
    Unavailable,
}

pub enum Command {
    Decide {
        call: DecisionCall,
        reply: oneshot::Sender<Result<Outcome, ControlError>>,
    },
    /// Every audit record about one change and the incidents blamed on it, in order.
    ChangeAudit {
        change_id: String,
        reply: oneshot::Sender<Vec<AuditRecord>>,
    },
}

/// The sending half the API holds.
pub type ControlSender = tokio::sync::mpsc::Sender<Command>;
