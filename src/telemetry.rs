//! Prometheus metrics and internal events.
//!
//! The engine counts in plain integers; [`Telemetry::absorb`] folds the deltas into Prometheus
//! once per batch, so the hot path touches no atomics. Labels are bounded: error codes are a
//! closed set, metric names come from config, and per-series gauges are capped
//! (`http.max_series_gauges`), with series that leave the top set removed.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::engine::{Engine, EngineStats};
use crate::event::ErrorCode;

pub struct Telemetry {
    pub registry: Registry,
    events: IntCounter,
    accepted: IntCounter,
    rejected: IntCounterVec,
    changes_rejected: IntCounterVec,
    unselected: IntCounter,
    missing_value: IntCounterVec,
    series_overflow: IntCounter,
    clock_jumps_held: IntCounter,
    untracked: IntCounterVec,
    tracked: IntGaugeVec,
    holds_expired: IntCounter,
    windows_closed: IntCounter,
    changes: IntCounterVec,
    alerts: IntCounterVec,
    rollbacks_requested: IntCounter,
    rollbacks_confirmed: IntCounter,
    decisions: IntCounterVec,
    pub dlq_produced: IntCounterVec,
    pub dead_letters_unwritable: IntCounter,
    pub output_errors: IntCounterVec,
    pub outputs_produced: IntCounterVec,
    /// Requests to peer instances' APIs, by result (`guardrail::peer`).
    pub peer_requests: IntCounterVec,
    /// HTTP connections and requests cut off by the server's limits, by reason
    /// (`guardrail::api::HTTP_LIMITS`).
    pub http_limited: IntCounterVec,
    incidents_firing: IntGaugeVec,
    series_tracked: IntGauge,
    watermark: Gauge,
    event_time_lag: Gauge,
    event_time_latest: Gauge,
    pub consumer_lag: IntGauge,
    pub partitions_assigned: IntGaugeVec,
    pub ready: IntGauge,
    pub batch_seconds: Histogram,
    series_observed: GaugeVec,
    series_expected: GaugeVec,
    series_low: GaugeVec,
    series_high: GaugeVec,
    series_score: GaugeVec,
    gov: Governance,
    /// Checkpoints and transactions.
    pub state: StateMetrics,
    exported: Mutex<HashSet<(String, String)>>,
    /// Counters last folded in, per engine (stage 1 and the detecting engine).
    prev: Mutex<[EngineStats; 2]>,
    errors_logged: Mutex<HashMap<&'static str, Instant>>,
}

/// Checkpoints (state saved and restored) and output transactions.
pub struct StateMetrics {
    pub checkpoint_writes: IntCounter,
    pub checkpoint_errors: IntCounterVec,
    pub checkpoint_fallbacks: IntCounterVec,
    pub checkpoint_bytes: IntGauge,
    pub checkpoint_seconds: Histogram,
    pub checkpoint_age: Gauge,
    pub restored: IntGauge,
    pub transactions: IntCounterVec,
    pub delivery: IntGaugeVec,
    pub alert_latency: Histogram,
    pub handovers: IntCounterVec,
}

impl StateMetrics {
    fn new(r: &Registry) -> StateMetrics {
        let checkpoint_errors = counter_vec(
            r,
            "guardrail_checkpoint_errors_total",
            "Checkpoints that could not be written, or were read back and not trusted, by reason.",
            &["reason"],
        );
        for reason in crate::checkpoint::CheckpointError::REASONS {
            checkpoint_errors.with_label_values(&[reason]);
        }
        let checkpoint_fallbacks = counter_vec(
            r,
            "guardrail_checkpoint_fallbacks_total",
            "Starts that restored an older checkpoint generation (the newer ones damaged or missing), by generation (1: the one before the current).",
            &["generation"],
        );
        let handovers = counter_vec(
            r,
            "guardrail_handovers_total",
            "Stage 2: repartition partitions whose state was taken over from another instance's checkpoint on a rebalance, by result.",
            &["result"],
        );
        for result in ["imported", "failed"] {
            handovers.with_label_values(&[result]);
        }
        let checkpoint_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "guardrail_checkpoint_seconds",
                "Time to encode and durably write one checkpoint.",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
        )
        .unwrap();
        r.register(Box::new(checkpoint_seconds.clone())).unwrap();
        let checkpoint_bytes = IntGauge::new(
            "guardrail_checkpoint_bytes",
            "Size of the last checkpoint written.",
        )
        .unwrap();
        r.register(Box::new(checkpoint_bytes.clone())).unwrap();
        let checkpoint_age = Gauge::new(
            "guardrail_checkpoint_last_write_seconds",
            "Unix time of the last checkpoint written (0: none yet).",
        )
        .unwrap();
        r.register(Box::new(checkpoint_age.clone())).unwrap();
        let restored = IntGauge::new(
            "guardrail_checkpoint_restored",
            "1 when this process started from a checkpoint, 0 when it started cold.",
        )
        .unwrap();
        r.register(Box::new(restored.clone())).unwrap();
        let transactions = counter_vec(
            r,
            "guardrail_transactions_total",
            "Output transactions (exactly_once delivery), by result.",
            &["result"],
        );
        for x in ["committed", "aborted"] {
            transactions.with_label_values(&[x]);
        }
        let delivery = IntGaugeVec::new(
            Opts::new(
                "guardrail_delivery_mode",
                "1 for the delivery guarantee in force: exactly_once or at_least_once.",
            ),
            &["mode"],
        )
        .unwrap();
        r.register(Box::new(delivery.clone())).unwrap();
        let alert_latency = Histogram::with_opts(
            HistogramOpts::new(
                "guardrail_alert_latency_seconds",
                "From reading the message that completed a detection to its alert delivered (committed, under exactly_once).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
        )
        .unwrap();
        r.register(Box::new(alert_latency.clone())).unwrap();
        StateMetrics {
            alert_latency,
            handovers,
            checkpoint_writes: counter(
                r,
                "guardrail_checkpoint_writes_total",
                "Checkpoints written.",
            ),
            checkpoint_errors,
            checkpoint_fallbacks,
            checkpoint_bytes,
            checkpoint_seconds,
            checkpoint_age,
            restored,
            transactions,
            delivery,
        }
    }
}

/// Governance: incidents by kind, people's calls, escalations, the circuit breaker, guards.
struct Governance {
    incidents: IntCounterVec,
    human_calls: IntCounterVec,
    time_to_decision: Histogram,
    escalations: IntCounter,
    breaker_trips: IntCounter,
    breaker_open: IntGauge,
    pending: IntGaugeVec,
    guards_open: IntGauge,
    guard_verdicts: IntCounterVec,
    decider_verdicts: IntCounterVec,
}

impl Governance {
    fn new(r: &Registry) -> Governance {
        let incidents = counter_vec(
            r,
            "guardrail_incidents_total",
            "Incidents opened, by kind (drop, spike, shift, srm, guardrail_breach, fragmentation, pressure, ...).",
            &["kind"],
        );
        for k in [
            "drop",
            "spike",
            "shift",
            "drift",
            "data_quality",
            "srm",
            "fragmentation",
            "pressure",
            "guardrail_breach",
        ] {
            incidents.with_label_values(&[k]);
        }
        let human_calls = counter_vec(
            r,
            "guardrail_human_decisions_total",
            "Calls by people on incidents' decisions, by verb (approve, veto, acknowledge, silence).",
            &["verb"],
        );
        for v in crate::control::Verb::ALL {
            human_calls.with_label_values(&[v.as_str()]);
        }
        let time_to_decision = Histogram::with_opts(
            HistogramOpts::new(
                "guardrail_time_to_human_decision_seconds",
                "Event time from detection to a person's approve or veto.",
            )
            .buckets(vec![
                60.0,
                300.0,
                900.0,
                1800.0,
                3600.0,
                4.0 * 3600.0,
                12.0 * 3600.0,
                86400.0,
            ]),
        )
        .expect("valid metric");
        r.register(Box::new(time_to_decision.clone()))
            .expect("unique metric");
        let pending = IntGaugeVec::new(
            Opts::new(
                "guardrail_decisions_pending",
                "Firing incidents whose decision waits on a person or a veto window, by tier.",
            ),
            &["tier"],
        )
        .expect("valid metric");
        r.register(Box::new(pending.clone()))
            .expect("unique metric");
        for t in ["human", "supervised", "autonomous"] {
            pending.with_label_values(&[t]);
        }
        let breaker_open = IntGauge::new(
            "guardrail_circuit_breaker_open",
            "1 while the circuit breaker stops automatic rollbacks (a limit per hour is reached).",
        )
        .expect("valid metric");
        r.register(Box::new(breaker_open.clone()))
            .expect("unique metric");
        let guards_open = IntGauge::new(
            "guardrail_guards_open",
            "Changes under watch (guard window open).",
        )
        .expect("valid metric");
        r.register(Box::new(guards_open.clone()))
            .expect("unique metric");
        let guard_verdicts = counter_vec(
            r,
            "guardrail_guard_verdicts_total",
            "Closed change watches, by verdict.",
            &["verdict"],
        );
        for v in ["passed", "breached", "untrustworthy_split"] {
            guard_verdicts.with_label_values(&[v]);
        }
        let decider_verdicts = counter_vec(
            r,
            "guardrail_decider_verdicts_total",
            "Two-stage: answers of the decider (this instance, while it owns repartition partition 0) to requests to roll a change back.",
            &["verdict"],
        );
        for v in crate::repartition::Verdict::LABELS {
            decider_verdicts.with_label_values(&[v]);
        }
        Governance {
            incidents,
            human_calls,
            time_to_decision,
            escalations: counter(
                r,
                "guardrail_escalations_total",
                "Decisions nobody took in time, re-sent with a higher severity.",
            ),
            breaker_trips: counter(
                r,
                "guardrail_circuit_breaker_trips_total",
                "Automatic rollbacks the circuit breaker turned into human decisions.",
            ),
            breaker_open,
            pending,
            guards_open,
            guard_verdicts,
            decider_verdicts,
        }
    }

    fn absorb(&self, eng: &mut Engine, prev: &EngineStats) {
        let s = &eng.stats;
        let delta = |v: &IntCounterVec,
                     cur: &HashMap<&'static str, u64>,
                     old: &HashMap<&'static str, u64>| {
            for (k, n) in cur {
                let d = n - old.get(k).copied().unwrap_or(0);
                if d > 0 {
                    v.with_label_values(&[k]).inc_by(d);
                }
            }
        };
        delta(
            &self.incidents,
            &s.incidents_by_kind,
            &prev.incidents_by_kind,
        );
        delta(&self.human_calls, &s.human_calls, &prev.human_calls);
        delta(
            &self.guard_verdicts,
            &s.guard_verdicts,
            &prev.guard_verdicts,
        );
        delta(
            &self.decider_verdicts,
            &s.decider_verdicts,
            &prev.decider_verdicts,
        );
        self.escalations.inc_by(s.escalations - prev.escalations);
        self.breaker_trips
            .inc_by(s.breaker_trips - prev.breaker_trips);
        for x in eng.stats.human_decision_secs.drain(..) {
            self.time_to_decision.observe(x);
        }
        self.breaker_open.set(eng.breaker_open() as i64);
        for (t, n) in eng.pending_decisions() {
            self.pending.with_label_values(&[t.as_str()]).set(n as i64);
        }
        self.guards_open.set(eng.guards.open_count() as i64);
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let c = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let r = Registry::new();
        let rejected = counter_vec(
            &r,
            "guardrail_events_rejected_total",
            "Inputs dead-lettered, by reason code.",
            &["error_code"],
        );
        let changes_rejected = counter_vec(
            &r,
            "guardrail_changes_rejected_total",
            "Change records dead-lettered, by reason code.",
            &["error_code"],
        );
        for c in ErrorCode::ALL {
            rejected.with_label_values(&[c.as_str()]);
            changes_rejected.with_label_values(&[c.as_str()]);
        }
        let missing_value = counter_vec(
            &r,
            "guardrail_events_incomplete_total",
            "Events selected by a metric but lacking what it reads (value for means, user for distinct counts); they still count for other metrics.",
            &["missing"],
        );
        missing_value.with_label_values(&["value"]);
        missing_value.with_label_values(&["user"]);
        let alerts = counter_vec(
            &r,
            "guardrail_alerts_total",
            "Alerts emitted, by status.",
            &["status"],
        );
        alerts.with_label_values(&["firing"]);
        alerts.with_label_values(&["resolved"]);
        let dlq_produced = counter_vec(
            &r,
            "guardrail_dead_letters_produced_total",
            "Dead letters written to the dead-letter topic or file, by reason code.",
            &["error_code"],
        );
        let dead_letters_unwritable = IntCounter::new(
            "guardrail_dead_letters_unwritable_total",
            "Dead letters the producer or broker refused for good (too large, malformed): skipped, not retried.",
        )
        .expect("metric");
        r.register(Box::new(dead_letters_unwritable.clone()))
            .expect("register");
        let output_errors = counter_vec(
            &r,
            "guardrail_output_errors_total",
            "Outputs that could not be delivered (retried), by stream.",
            &["stream"],
        );
        let outputs_produced = counter_vec(
            &r,
            "guardrail_outputs_produced_total",
            "Outputs delivered, by stream.",
            &["stream"],
        );
        for s in ["alerts", "rollbacks", "audit", "dlq"] {
            output_errors.with_label_values(&[s]);
            outputs_produced.with_label_values(&[s]);
        }
        let peer_requests = counter_vec(
            &r,
            "guardrail_peer_requests_total",
            "Requests to peer instances' APIs ([scale] peers), by result: ok, not_found, refused (other 4xx), error (5xx), unreachable, timeout, http_error.",
            &["result"],
        );
        for l in crate::peer::RESULTS {
            peer_requests.with_label_values(&[l]);
        }
        let http_limited = counter_vec(
            &r,
            "guardrail_http_limited_total",
            "HTTP connections and requests cut off by the server's limits, by reason: connections (refused over max connections), request_timeout (a request, its body included, not done in time).",
            &["reason"],
        );
        for l in crate::api::HTTP_LIMITS {
            http_limited.with_label_values(&[l]);
        }
        let incidents_firing = IntGaugeVec::new(
            Opts::new(
                "guardrail_incidents_firing",
                "Incidents currently firing, by metric.",
            ),
            &["metric", "severity"],
        )
        .unwrap();
        r.register(Box::new(incidents_firing.clone())).unwrap();
        let series_tracked = IntGauge::new("guardrail_series_tracked", "Series tracked.").unwrap();
        r.register(Box::new(series_tracked.clone())).unwrap();
        let watermark = Gauge::new(
            "guardrail_watermark_seconds",
            "Event-time watermark (max event time minus allowed lateness), Unix seconds.",
        )
        .unwrap();
        r.register(Box::new(watermark.clone())).unwrap();
        let event_time_lag = Gauge::new(
            "guardrail_event_time_lag_seconds",
            "Wall clock minus the latest event time seen.",
        )
        .unwrap();
        r.register(Box::new(event_time_lag.clone())).unwrap();
        let event_time_latest = Gauge::new(
            "guardrail_event_time_latest_seconds",
            "Latest event time seen, Unix seconds.",
        )
        .unwrap();
        r.register(Box::new(event_time_latest.clone())).unwrap();
        let partitions_assigned = IntGaugeVec::new(
            Opts::new(
                "guardrail_partitions_assigned",
                "Partitions this instance's consumers own, by topic (the repartition topic is stage 2's).",
            ),
            &["topic"],
        )
        .unwrap();
        r.register(Box::new(partitions_assigned.clone())).unwrap();
        let consumer_lag = IntGauge::new(
            "guardrail_consumer_lag_messages",
            "Messages behind the high watermark, summed over assigned partitions.",
        )
        .unwrap();
        r.register(Box::new(consumer_lag.clone())).unwrap();
        let ready = IntGauge::new("guardrail_ready", "1 when connected and consuming.").unwrap();
        r.register(Box::new(ready.clone())).unwrap();
        let batch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "guardrail_batch_processing_seconds",
                "Time to process a batch of input messages, outputs included.",
            )
            .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
        )
        .unwrap();
        r.register(Box::new(batch_seconds.clone())).unwrap();
        let sl = ["metric", "series"];
        Telemetry {
            events: counter(&r, "guardrail_events_received_total", "Event messages read."),
            accepted: counter(&r, "guardrail_events_accepted_total", "Events decoded and applied."),
            rejected,
            changes_rejected,
            unselected: counter(
                &r,
                "guardrail_events_unselected_total",
                "Valid events that no metric reads (unknown or unused types, filtered out).",
            ),
            missing_value,
            series_overflow: counter(
                &r,
                "guardrail_series_overflow_total",
                "Events not tracked in a segment series because the metric reached max_series_per_metric (still counted in its total).",
            ),
            untracked: counter_vec(
                &r,
                "guardrail_tracked_overflow_total",
                "Entries a bounded map could not take or had to forget because it was full (sprawl_surfaces, pressure_surfaces: events not followed; changes: the change that ended first forgotten).",
                &["map"],
            ),
            tracked: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "guardrail_tracked_entries",
                        "Entries held in each bounded map (series, incidents, changes, sprawl_surfaces, pressure_surfaces).",
                    ),
                    &["map"],
                )
                .expect("metric");
                r.register(Box::new(g.clone())).expect("register");
                g
            },
            clock_jumps_held: counter(
                &r,
                "guardrail_event_time_jumps_held_total",
                "Events stamped further ahead of their partition's event time than the allowed lateness, with nothing to confirm them: counted in their window, but not allowed to move event time (one fast clock).",
            ),
            holds_expired: counter(
                &r,
                "guardrail_holds_expired_total",
                "Stage 2: alerts published after [scale] hold_max_secs without another owner's answer (the decider's verdict, a target metric's effect).",
            ),
            windows_closed: counter(&r, "guardrail_windows_closed_total", "Event-time windows closed."),
            changes: {
                let c = counter_vec(
                    &r,
                    "guardrail_changes_received_total",
                    "Change records applied to the registry, by action (dashboards mark changes with it).",
                    &["action"],
                );
                for a in ["applied", "rolled_back", "superseded"] {
                    c.with_label_values(&[a]);
                }
                c
            },
            alerts,
            rollbacks_requested: counter(&r, "guardrail_rollbacks_requested_total", "Rollback requests emitted."),
            rollbacks_confirmed: counter(
                &r,
                "guardrail_rollbacks_confirmed_total",
                "Rollbacks confirmed by automation on the changes topic.",
            ),
            decisions: {
                let c = counter_vec(
                    &r,
                    "guardrail_decisions_total",
                    "Policy decisions, by action and tier.",
                    &["action", "tier"],
                );
                // Every (action, tier) starts at 0, so "none yet" reads as 0, not as no data.
                for a in crate::policy::DecisionAction::ALL {
                    for t in ["human", "supervised", "autonomous", "none"] {
                        c.with_label_values(&[a.as_str(), t]);
                    }
                }
                c
            },
            dlq_produced,
            dead_letters_unwritable,
            output_errors,
            outputs_produced,
            peer_requests,
            http_limited,
            incidents_firing,
            series_tracked,
            watermark,
            event_time_lag,
            event_time_latest,
            consumer_lag,
            partitions_assigned,
            ready,
            batch_seconds,
            series_observed: gauge_vec(&r, "guardrail_series_observed", "Observed rate of the last closed window.", &sl),
            series_expected: gauge_vec(&r, "guardrail_series_expected", "Baseline forecast for the last closed window.", &sl),
            series_low: gauge_vec(&r, "guardrail_series_expected_low", "Lower edge of the 99% expected band.", &sl),
            series_high: gauge_vec(&r, "guardrail_series_expected_high", "Upper edge of the 99% expected band.", &sl),
            series_score: gauge_vec(
                &r,
                "guardrail_series_score",
                "Detection statistic over its threshold (1 = alarm; 1 while in an incident).",
                &sl,
            ),
            gov: Governance::new(&r),
            state: StateMetrics::new(&r),
            exported: Mutex::new(HashSet::new()),
            prev: Mutex::new(Default::default()),
            errors_logged: Mutex::new(HashMap::new()),
            registry: r,
        }
    }

    /// Folds the engine's counters into Prometheus and refreshes gauges. Called once per batch.
    pub fn absorb(&self, eng: &mut Engine, max_series_gauges: usize) {
        let stage1 = matches!(eng.stage(), crate::engine::Stage::Aggregate { .. });
        let mut all = self.prev.lock().unwrap();
        let prev = &mut all[stage1 as usize];
        let s = &eng.stats;
        self.events.inc_by(s.events - prev.events);
        self.accepted.inc_by(s.accepted - prev.accepted);
        for c in ErrorCode::ALL {
            let d = s.rejected[c.index()] - prev.rejected[c.index()];
            if d > 0 {
                self.rejected.with_label_values(&[c.as_str()]).inc_by(d);
            }
            let d = s.changes_rejected[c.index()] - prev.changes_rejected[c.index()];
            if d > 0 {
                self.changes_rejected
                    .with_label_values(&[c.as_str()])
                    .inc_by(d);
            }
        }
        self.unselected.inc_by(s.unselected - prev.unselected);
        self.missing_value
            .with_label_values(&["value"])
            .inc_by(s.missing_value - prev.missing_value);
        self.missing_value
            .with_label_values(&["user"])
            .inc_by(s.missing_user - prev.missing_user);
        self.series_overflow
            .inc_by(s.series_overflow - prev.series_overflow);
        self.clock_jumps_held
            .inc_by(s.clock_jumps_held - prev.clock_jumps_held);
        for (i, map) in ["sprawl_surfaces", "pressure_surfaces"]
            .into_iter()
            .enumerate()
        {
            self.untracked
                .with_label_values(&[map])
                .inc_by(s.untracked_surfaces[i] - prev.untracked_surfaces[i]);
        }
        self.untracked
            .with_label_values(&["changes"])
            .inc_by(s.untracked_changes - prev.untracked_changes);
        if !stage1 {
            for (map, n) in eng.tracked_entries() {
                self.tracked.with_label_values(&[map]).set(n as i64);
            }
        }
        self.holds_expired
            .inc_by(s.holds_expired - prev.holds_expired);
        self.windows_closed
            .inc_by(s.windows_closed - prev.windows_closed);
        for (i, a) in ["applied", "rolled_back", "superseded"].iter().enumerate() {
            let d = s.changes_by_action[i] - prev.changes_by_action[i];
            if d > 0 {
                self.changes.with_label_values(&[a]).inc_by(d);
            }
        }
        self.alerts
            .with_label_values(&["firing"])
            .inc_by(s.alerts_firing - prev.alerts_firing);
        self.alerts
            .with_label_values(&["resolved"])
            .inc_by(s.alerts_resolved - prev.alerts_resolved);
        self.rollbacks_requested
            .inc_by(s.rollbacks_requested - prev.rollbacks_requested);
        self.rollbacks_confirmed
            .inc_by(s.rollbacks_confirmed - prev.rollbacks_confirmed);
        for (k, v) in &s.decisions {
            let d = v - prev.decisions.get(k).copied().unwrap_or(0);
            if d > 0 {
                self.decisions.with_label_values(&[k.0, k.1]).inc_by(d);
            }
        }
        if !stage1 {
            self.gov.absorb(eng, prev);
        }
        *prev = eng.stats.clone();
        drop(all);
        if stage1 {
            // Stage 1 has no series past a batch: the gauges are the detecting engine's.
            return;
        }
        if let Some(t) = eng.max_event_time_ms() {
            self.watermark
                .set(eng.watermark_ms().unwrap_or(t) as f64 / 1000.0);
            self.event_time_lag
                .set((crate::event::now_ms() - t) as f64 / 1000.0);
            self.event_time_latest.set(t as f64 / 1000.0);
        }
        self.series_tracked.set(eng.owned_series() as i64);
        if eng.take_windows_closed() == 0 {
            return;
        }
        for (m, sev, n) in eng.firing_by_metric() {
            self.incidents_firing
                .with_label_values(&[&m, sev])
                .set(n as i64);
        }
        let chosen = eng.gauge_series(max_series_gauges);
        let mut now = HashSet::with_capacity(chosen.len());
        for si in chosen {
            let s = &eng.series[si];
            let m = eng.metrics()[s.metric].name().to_string();
            let l = [m.as_str(), s.label.as_str()];
            let set = |g: &GaugeVec, v: f64| {
                if v.is_finite() {
                    g.with_label_values(&l).set(v);
                }
            };
            set(&self.series_observed, s.last.observed);
            set(&self.series_expected, s.last.expected);
            set(&self.series_low, s.last.expected_low);
            set(&self.series_high, s.last.expected_high);
            set(&self.series_score, s.last.score);
            now.insert((m, s.label.clone()));
        }
        let mut exported = self.exported.lock().unwrap();
        for (m, l) in exported.difference(&now) {
            for g in [
                &self.series_observed,
                &self.series_expected,
                &self.series_low,
                &self.series_high,
                &self.series_score,
            ] {
                let _ = g.remove_label_values(&[m, l]);
            }
        }
        *exported = now;
    }

    pub fn watermark_secs(&self) -> f64 {
        self.watermark.get()
    }

    pub fn latest_event_secs(&self) -> f64 {
        self.event_time_latest.get()
    }

    /// Text exposition of all metrics.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf8 exposition")
    }

    /// Logs an error at most once per `every` per code (Vector-style rate limiting); the
    /// metric is counted regardless by the caller.
    pub fn log_rate_limited(&self, code: &'static str, every: Duration, f: impl FnOnce()) {
        let mut m = self.errors_logged.lock().unwrap();
        let now = Instant::now();
        match m.get(code) {
            Some(t) if now.duration_since(*t) < every => {}
            _ => {
                m.insert(code, now);
                f();
            }
        }
    }
}
