//! Two-stage aggregation for running several instances in one consumer group.
//!
//! Input is keyed by user, so one series' events are spread over every input partition, and an
//! instance that reads some partitions sees only part of each window. With `[scale] two_stage`
//! every instance runs two pipelines:
//!
//! - **stage 1** (the input partitions it owns): decode, route and sum events per series and
//!   window, as the single-stage engine does, and every batch send the partial sums to the
//!   internal repartition topic, keyed (and partitioned) by series, in the same transaction as
//!   the consumed input offsets. It keeps no state past a batch, so a rebalance of input
//!   partitions hands nothing over: the new owner starts at the committed offsets.
//! - **stage 2** (the repartition partitions it owns): merge the partial sums into the series'
//!   windows and run baselines, detectors, attribution and policy, the whole single-stage engine.
//!   Its state is checkpointed with the repartition offsets it corresponds to; on a rebalance
//!   the new owner of a repartition partition takes over that partition's series from the last
//!   owner's checkpoint (see `Engine::import_partitions`).
//!
//! Stage 2 cannot see input partitions, so stage 1 also sends, on every repartition partition,
//! a **marker** per input partition it reads: its latest event time and when it was last heard
//! from, after every batch and every few seconds when idle. Stage 2 keeps one clock per
//! (repartition partition, input partition) and its watermark is the slowest of them, so a
//! window closes only when every partial for it has arrived on every repartition partition it
//! owns (partials of a batch precede its markers on each partition). An input partition stops
//! holding the watermark only on stage 1's word (a marker saying it has been silent for
//! `SOURCE_IDLE_MS` while stage 1 read it), never because markers stopped coming: while no
//! stage 1 reads it (a rebalance, a crash) its windows wait rather than close without it.
//! Change records are broadcast the same way and applied once (deduplicated by content).
//!
//! Whether a rollback may be requested is decided in one place for the whole group: stage 2
//! asks the owner of repartition partition [`DECIDER`] ([`Partial::Ask`]), which keeps the
//! rollbacks granted per change and the circuit breaker's count, and answers on the incident's
//! partition ([`Partial::Verdict`]). So two incidents blamed on one change but owned by two
//! instances give one rollback request, as with one instance.
//!
//! The format is postcard behind a one-byte version: compact, and binary sketches (distinct
//! counts) travel as they are.

use serde::{Deserialize, Serialize};

/// Format version, the first byte of every record.
pub const VERSION: u8 = 4;

/// Record key of markers (which are sent after the partials of their batch).
pub const MARKER_KEY: &str = "~marker";

/// Clock id of (repartition partition, input partition) in stage 2.
pub fn clock_id(repartition: i32, input: i32) -> i32 {
    repartition.saturating_mul(1 << 16).saturating_add(input)
}

/// The repartition partition of a clock id.
pub fn clock_partition(id: i32) -> i32 {
    id >> 16
}

/// One record on the repartition topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Partial {
    /// Sums of one series' window read by one stage-1 batch.
    Window {
        metric: String,
        /// Dimension values in the metric's `dims` order; empty for the metric's total.
        dims: Vec<String>,
        w: i64,
        num: f64,
        den: f64,
        sumsq: f64,
        /// HyperLogLog registers (distinct metrics).
        hll: Option<Vec<u8>>,
        /// The window's largest and smallest row (`gauge` metrics, `extreme.rs`).
        extremes: Option<(f32, f32)>,
    },
    /// Category counts of one `share` series' window.
    Share {
        metric: String,
        dims: Vec<String>,
        w: i64,
        counts: Vec<(String, f64)>,
    },
    /// Treatment/holdout sums of events exposed to a change (for its watch, if open).
    Arms {
        change_id: String,
        exposure: [f64; 2],
        /// (metric, arm, num, den, sumsq).
        metrics: Vec<(String, u8, f64, f64, f64)>,
    },
    /// A change record, as read from the changes topic.
    Change(Vec<u8>),
    /// Input partition `source` has delivered events up to `max_ts` (None: nothing since it
    /// was assigned to this stage 1); last heard from at `heard_ms`, as of `sent_ms` (both
    /// stage 1's wall clock).
    Marker {
        source: i32,
        max_ts: Option<i64>,
        heard_ms: i64,
        sent_ms: i64,
    },
    /// Stage 2 to the decider ([`DECIDER`]'s owner): may the rollback of `change_id` be
    /// requested for incident `incident_id`? The answer goes to repartition partition `reply`
    /// (the incident's series').
    Ask {
        change_id: String,
        incident_id: String,
        reply: i32,
        /// Event time of the decision.
        at_ms: i64,
        /// Policy (automatic: the circuit breaker applies) or a person.
        decided_by: crate::event::Actor,
    },
    /// Stage 2 to the decider: a person vetoed the rollback of `change_id`; no incident blamed
    /// on it gets one now, whichever instance owns it.
    Veto { change_id: String, reason: String },
    /// Stage 2 to the owner of a change's partition: the watch on it (opened at `opened_ms`)
    /// closed at `at_ms` for reason `why`, with the verdicts (JSON each) of the metrics merged
    /// on repartition partition `part`. The change's owner writes the watch's closing record
    /// once every partition with a metric has reported.
    WatchClosed {
        change_id: String,
        opened_ms: i64,
        part: i32,
        at_ms: i64,
        why: String,
        metrics: Vec<(String, String)>,
    },
    /// Stage 2, to the owner of metric `target`: the effect on it of the watch on `change_id`,
    /// as it stood once window `upto` was closed, for the "local gain, global loss" of incident
    /// `incident_id`, whose owner reads the answer on partition `reply`.
    GainAsk {
        change_id: String,
        target: String,
        upto: i64,
        incident_id: String,
        reply: i32,
    },
    /// The answer to a [`Partial::GainAsk`].
    GainAnswer {
        incident_id: String,
        effect: Option<GainEffect>,
    },
    /// The decider's answer to an [`Partial::Ask`] (which it repeats).
    Verdict {
        change_id: String,
        incident_id: String,
        at_ms: i64,
        decided_by: crate::event::Actor,
        verdict: Verdict,
    },
}

/// A watch's effect on a metric: relative effect, its 95% interval, and whether treatment was
/// compared with a holdout (or else observed against the forecast).
pub type GainEffect = (f64, f64, f64, bool);

/// What the decider answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Verdict {
    /// Request it: no other incident has for this change.
    Grant,
    /// Incident `by` (on whichever instance) already did.
    Already { by: String },
    /// The circuit breaker forbids another automatic rollback; `counts` is its evidence (JSON).
    Breaker { why: String, counts: String },
    /// A person vetoed the rollback of this change (the veto's reason).
    Vetoed { why: String },
}

impl Verdict {
    pub const LABELS: [&'static str; 4] =
        ["granted", "already_requested", "breaker_open", "vetoed"];

    /// Its metric label.
    pub fn label(&self) -> &'static str {
        Self::LABELS[match self {
            Verdict::Grant => 0,
            Verdict::Already { .. } => 1,
            Verdict::Breaker { .. } => 2,
            Verdict::Vetoed { .. } => 3,
        }]
    }
}

/// The repartition partition whose stage-2 owner decides, for every instance, whether a
/// rollback may be requested: one place that sees every request, so a change is rolled back
/// once and the circuit breaker counts the whole group's automatic rollbacks.
pub const DECIDER: i32 = 0;

/// A partial with its destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    pub partition: i32,
    pub key: String,
    pub partial: Partial,
}

impl Partial {
    pub fn encode(&self) -> Vec<u8> {
        let out = vec![VERSION];
        postcard::to_extend(self, out).expect("partial serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<Partial, String> {
        match bytes.first() {
            None => Err("empty repartition record".into()),
            Some(&VERSION) => postcard::from_bytes(&bytes[1..])
                .map_err(|e| format!("undecodable repartition record: {e}")),
            Some(v) => Err(format!(
                "repartition record version {v}, this build reads {VERSION}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let all = [
            Partial::Window {
                metric: "conv".into(),
                dims: vec!["FR".into()],
                w: 7,
                num: 3.0,
                den: 40.0,
                sumsq: 0.0,
                hll: Some(vec![1, 2, 3]),
                extremes: Some((9.5, -1.0)),
            },
            Partial::Share {
                metric: "mix".into(),
                dims: vec![],
                w: -2,
                counts: vec![("mobile".into(), 2.0)],
            },
            Partial::Arms {
                change_id: "c1".into(),
                exposure: [1.0, 2.0],
                metrics: vec![("conv".into(), 1, 1.0, 2.0, 0.0)],
            },
            Partial::Change(b"{}".to_vec()),
            Partial::Marker {
                source: 3,
                max_ts: Some(1_700_000_000_000),
                heard_ms: 5,
                sent_ms: 9,
            },
            Partial::Marker {
                source: 4,
                max_ts: None,
                heard_ms: 5,
                sent_ms: 9,
            },
            Partial::Ask {
                change_id: "c".into(),
                incident_id: "i".into(),
                reply: 2,
                at_ms: 7,
                decided_by: crate::event::Actor::system("policy"),
            },
            Partial::Veto {
                change_id: "c".into(),
                reason: "r".into(),
            },
            Partial::Verdict {
                change_id: "c".into(),
                incident_id: "i".into(),
                at_ms: 7,
                decided_by: crate::event::Actor::system("policy"),
                verdict: Verdict::Breaker {
                    why: "w".into(),
                    counts: "{}".into(),
                },
            },
        ];
        for p in all {
            assert_eq!(Partial::decode(&p.encode()).unwrap(), p);
        }
        assert!(Partial::decode(b"").unwrap_err().contains("empty"));
        assert!(Partial::decode(&[9, 0]).unwrap_err().contains("version 9"));
        assert!(Partial::decode(&[VERSION, 200, 200, 200])
            .unwrap_err()
            .contains("undecodable"));
    }

    #[test]
    fn clock_ids_keep_both_partitions() {
        let id = clock_id(5, 11);
        assert_eq!(clock_partition(id), 5);
        assert_eq!(id & 0xffff, 11);
        assert_ne!(clock_id(0, 1), clock_id(1, 0));
    }
}
