//! The engine's two halves in the two-stage aggregation (`crate::repartition`): stage 1 sums
//! events into partial windows and hands them on; stage 2 merges partials into its series and
//! runs everything else.

use super::*;
use crate::repartition::{
    clock_id, clock_partition, GainEffect, Partial, Routed, Verdict, DECIDER,
};

/// Which part of the pipeline an engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Everything, on the input partitions this instance reads (one instance, or input keyed
    /// so that each series lives on one partition).
    Single,
    /// Stage 1: decode, route and sum; every batch's sums go to `partitions` repartition
    /// partitions by series.
    Aggregate { partitions: i32 },
    /// Stage 2: merge partial sums (and broadcast changes and markers) from the repartition
    /// topic (of `partitions` partitions); detection, attribution and policy for the series of
    /// the repartition partitions it owns.
    Merge { partitions: i32 },
}

/// Stage 2: what a new incident's alert and records wait for (`Engine::raise`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Held {
    /// The decider's answer, when its policy said "roll back" (with who decided and when).
    pub decider: bool,
    pub verdict: Option<(Verdict, Actor, i64)>,
    /// The change's effect on its target metric, owned elsewhere: the incident's own effect
    /// and half-width, the target, and the detection record's evidence and policy (JSON) to
    /// write once it is in.
    pub gain: Option<((f64, f64), usize, String, String)>,
    /// Wall-clock time the hold began (see `[scale] hold_max_secs`).
    pub since_ms: i64,
    /// The incident ended while its firing alert was held: its end (event time), resolution
    /// and the rule's record (JSON), carried out once the firing alert is out, so that no
    /// reader sees `resolved` before `firing`.
    pub resolution: Option<(i64, String, String)>,
}

/// A watch's effect on a metric merged here, from window `w` on.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct GainPoint {
    change_id: String,
    pub(super) metric: usize,
    w: i64,
    effect: Option<GainEffect>,
}

/// Another owner's question about a window not closed here yet.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct GainAsk {
    change_id: String,
    pub(super) metric: usize,
    upto: i64,
    incident_id: String,
    reply: i32,
}

/// Windows of effect history kept per watch and metric (older points are dropped, but for the
/// latest before the horizon): an owner this far behind another is read as of the horizon.
const GAIN_HISTORY_WINDOWS: i64 = 64;

/// How long a change record's content is remembered, so that its broadcast copies on several
/// repartition partitions apply once.
const CHANGE_DEDUP_MS: i64 = 7 * 86_400_000;

impl Engine {
    /// Makes this engine one stage of the two-stage aggregation. Call once, before any input.
    pub fn set_stage(&mut self, stage: Stage) {
        self.stage = stage;
        if let Stage::Aggregate { partitions } | Stage::Merge { partitions } = stage {
            self.metric_part = (0..self.schema.metrics.len())
                .map(|m| self.metric_partition(m, partitions))
                .collect();
        }
        match stage {
            Stage::Single => {}
            // Series are created per batch and handed on: only stage 2 limits them.
            Stage::Aggregate { .. } => self.schema.max_series = usize::MAX,
            Stage::Merge { .. } => self.dedup = Dedup::empty(CHANGE_DEDUP_MS),
        }
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Stage 2: registers the repartition partitions it was assigned. Each holds the watermark
    /// for every input partition until a marker for it arrives there, and again whenever
    /// stage 1 says it is not idle.
    pub fn assign_repartitions(&mut self, parts: &[i32], input_partitions: i32, now_ms: i64) {
        let clocks: Vec<i32> = parts
            .iter()
            .flat_map(|&x| (0..input_partitions).map(move |p| clock_id(x, p)))
            .collect();
        self.assign_sources(&clocks, now_ms);
        for &x in parts {
            if !self.owned.contains(&x) {
                self.owned.push(x);
            }
        }
    }

    /// Stage 2: forgets the clocks of revoked repartition partitions.
    pub fn forget_repartition(&mut self, part: i32) {
        self.sources.retain(|c| clock_partition(c.source) != part);
        self.owned.retain(|x| *x != part);
    }

    /// Stage 2: whether series `si` (or share series `si`, with `share`) belongs to a
    /// repartition partition another instance owns now. Its windows are not closed here: no
    /// partials arrive for it, and empty windows would read as a tracking outage.
    pub(super) fn foreign(&self, si: usize, share: bool) -> bool {
        let metric = if share {
            self.shares[si].metric
        } else {
            self.series[si].metric
        };
        !self.owns_metric(metric)
    }

    /// Stage 2: whether the series of `metric` are merged here (always, with one stage).
    pub(super) fn owns_metric(&self, metric: usize) -> bool {
        let Stage::Merge { partitions } = self.stage else {
            return true;
        };
        self.owned.contains(&self.partition_of(metric, partitions))
    }

    /// Stage 2: whether this engine speaks for change `change_id` as a whole (its watch's
    /// opening and closing records, the split check's incident): the owner of the change's
    /// repartition partition. Always, with one stage.
    pub(super) fn owns_change(&self, change_id: &str) -> bool {
        let Stage::Merge { partitions } = self.stage else {
            return true;
        };
        self.owned
            .contains(&self.change_partition(change_id, partitions))
    }

    /// The exposure watch `gi` reads for `metric`, or for its split check (`None`). With two
    /// stages each repartition partition reads the whole exposure (see
    /// `ChangeGuard::exposure_at`): a metric's is read on its own partition, the split check's
    /// on the change's, or else on the first partition held here that reads it.
    pub(super) fn guard_exposure(&self, gi: usize, metric: Option<usize>) -> [f64; 2] {
        let g = &self.guards.all[gi];
        let Stage::Merge { partitions } = self.stage else {
            return g.exposure;
        };
        let part = match metric {
            Some(mi) => self.partition_of(mi, partitions),
            None => {
                let own = self.change_partition(&g.change_id, partitions);
                match self.owned.contains(&own) {
                    true => own,
                    false => match self.metric_part.iter().find(|x| self.owned.contains(x)) {
                        Some(&x) => x,
                        None => own,
                    },
                }
            }
        };
        g.exposure_on(part)
    }

    /// Series counted as tracked here (stage 2: those of owned partitions).
    pub fn owned_series(&mut self) -> usize {
        if !matches!(self.stage, Stage::Merge { .. }) {
            return self.series.len();
        }
        (0..self.series.len())
            .filter(|&si| !self.foreign(si, false))
            .count()
    }

    /// Stage 1: checks a change record and queues it for every repartition partition.
    pub fn forward_change(&mut self, bytes: &[u8]) -> Result<(), Reject> {
        decode_change(bytes, self.schema.max_bytes)?;
        self.stats.changes += 1;
        if let Stage::Aggregate { partitions } = self.stage {
            for x in 0..partitions {
                self.outputs.push(Output::Partial(Box::new(Routed {
                    partition: x,
                    key: String::new(),
                    partial: Partial::Change(bytes.to_vec()),
                })));
            }
        }
        Ok(())
    }

    /// A series' record key on the repartition topic: a hash of its metric's name and dimension
    /// values (names, not indices, so instances agree whatever the order of their
    /// configurations).
    pub(super) fn route_key(&self, metric: usize, values: &[&str], share: bool) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.schema.series_key.0, self.schema.series_key.1);
        h.write(self.schema.metrics[metric].cfg.name.as_bytes());
        h.write_u8(if share { 0xfe } else { 0xfd });
        for v in values {
            h.write(v.as_bytes());
            h.write_u8(0xff);
        }
        h.finish()
    }

    /// The repartition partition of what is kept per change (its guard's treatment/holdout
    /// sums, and so its guard incidents).
    pub(super) fn change_partition(&self, change_id: &str, partitions: i32) -> i32 {
        let mut h = SipHasher13::new_with_keys(self.schema.series_key.0, self.schema.series_key.1);
        h.write(change_id.as_bytes());
        (h.finish() % partitions.max(1) as u64) as i32
    }

    /// Stage 2: the repartition partition incident `idx` lives on (its series', or its
    /// change's), where the decider's answer about it must go.
    fn incident_partition(&self, idx: usize, partitions: i32) -> i32 {
        let inc = &self.incidents[idx];
        match (inc.series_idx, inc.decision.change_id.clone()) {
            (Some(si), _) => self.partition_of(self.series[si].metric, partitions),
            (None, Some(c)) => self.change_partition(&c, partitions),
            (None, None) => DECIDER,
        }
    }

    /// Stage 2: asks the decider whether incident `idx` may have its change rolled back. Until
    /// it answers, the change counts as rolled back here, as with one instance: other incidents
    /// blamed on it are not asked about again.
    pub(super) fn ask_decider(&mut self, idx: usize, at_ms: i64, decided_by: Actor) {
        let Stage::Merge { partitions } = self.stage else {
            return;
        };
        let inc = &self.incidents[idx];
        let Some(change_id) = inc.decision.change_id.clone() else {
            return;
        };
        let incident_id = inc.id.clone();
        let rid = rollback_id(&incident_id, &change_id);
        if self.emitted_rollbacks.contains(&rid) {
            return;
        }
        self.pending_rollbacks.insert(change_id.clone(), rid);
        let reply = self.incident_partition(idx, partitions);
        self.outputs.push(Output::Partial(Box::new(Routed {
            partition: DECIDER,
            key: change_id.clone(),
            partial: Partial::Ask {
                change_id,
                incident_id,
                reply,
                at_ms,
                decided_by,
            },
        })));
        self.dirty = true;
    }

    /// The decider: one rollback request per change for the whole group, and the circuit
    /// breaker over the whole group's automatic rollbacks. Asked again (input read again after
    /// a restart), it answers the same.
    fn decide(
        &mut self,
        change_id: String,
        incident_id: String,
        reply: i32,
        at_ms: i64,
        decided_by: Actor,
    ) {
        let verdict = match self.granted.get(&change_id) {
            Some(by) if *by == incident_id => Verdict::Grant,
            _ if self.vetoed.contains_key(&change_id) => Verdict::Vetoed {
                why: self.vetoed[&change_id].clone(),
            },
            Some(by) => Verdict::Already { by: by.clone() },
            None => {
                let automatic = decided_by.kind == "policy";
                match self.breaker_reason(&change_id, at_ms).filter(|_| automatic) {
                    Some((why, counts)) => Verdict::Breaker {
                        why,
                        counts: counts.to_string(),
                    },
                    None => {
                        if automatic {
                            let surfaces = self.change_surfaces(&change_id);
                            self.auto_rollbacks.push_back((at_ms, surfaces));
                        }
                        self.granted.insert(change_id.clone(), incident_id.clone());
                        Verdict::Grant
                    }
                }
            }
        };
        self.dirty = true;
        *self
            .stats
            .decider_verdicts
            .entry(verdict.label())
            .or_default() += 1;
        self.outputs.push(Output::Partial(Box::new(Routed {
            partition: reply,
            key: change_id.clone(),
            partial: Partial::Verdict {
                change_id,
                incident_id,
                at_ms,
                decided_by,
                verdict,
            },
        })));
    }

    /// Stage 2, on the incident's owner: carries out the decider's answer.
    fn apply_verdict(
        &mut self,
        change_id: String,
        incident_id: String,
        at_ms: i64,
        decided_by: Actor,
        verdict: Verdict,
    ) {
        // Gone (resolved long ago and dropped) or never here: nothing to carry out.
        let Some(&idx) = self.incident_ids.get(&incident_id) else {
            return;
        };
        let rid = rollback_id(&incident_id, &change_id);
        if self.emitted_rollbacks.contains(&rid) {
            return;
        }
        if !matches!(verdict, Verdict::Grant)
            && self.pending_rollbacks.get(&change_id) == Some(&rid)
        {
            self.pending_rollbacks.remove(&change_id);
        }
        if let Some(h) = self.incidents[idx].held.as_mut() {
            if h.decider && h.verdict.is_none() {
                h.verdict = Some((verdict, decided_by, at_ms));
                self.dirty = true;
                self.release_held(idx);
                return;
            }
        }
        match verdict {
            // Unless a person vetoed it here meanwhile (the veto is on its way to the decider).
            Verdict::Grant
                if self.incidents[idx].decision.action == DecisionAction::RollbackRequested =>
            {
                self.emit_rollback(idx, at_ms, decided_by)
            }
            Verdict::Grant => {}
            Verdict::Already { by } => {
                let inc = &mut self.incidents[idx];
                if inc.decision.action != DecisionAction::RollbackRequested {
                    return;
                }
                let reason = format!("rollback of {change_id} already requested for {by}");
                inc.decision.action = DecisionAction::RollbackAlreadyRequested;
                inc.decision.reason = reason.clone();
                let rule = inc.decision.policy.clone();
                self.audit(
                    Some(&incident_id),
                    Some(&change_id),
                    "policy_evaluation",
                    Actor::system("decider"),
                    serde_json::json!({"decision": DecisionAction::RollbackAlreadyRequested.as_str(),
                        "reason": reason, "requested_for": by}),
                    serde_json::json!({"rule": rule, "one_rollback_per_change": true}),
                );
                self.dirty = true;
            }
            Verdict::Breaker { why, counts } => {
                let counts = serde_json::from_str(&counts).unwrap_or(serde_json::Value::Null);
                self.trip_breaker(idx, at_ms, &change_id, &why, counts);
            }
            Verdict::Vetoed { why } => {
                let reason =
                    format!("{why}; this incident is recorded against the veto, not acted on");
                let inc = &mut self.incidents[idx];
                inc.decision.action = DecisionAction::Vetoed;
                inc.decision.set_deadline(None);
                inc.decision.reason = reason.clone();
                let rule = inc.decision.policy.clone();
                self.vetoed.insert(change_id.clone(), why);
                self.audit(
                    Some(&incident_id),
                    Some(&change_id),
                    "policy_evaluation",
                    Actor::system("decider"),
                    serde_json::json!({"decision": DecisionAction::Vetoed.as_str(), "reason": reason}),
                    serde_json::json!({"rule": rule}),
                );
                self.dirty = true;
            }
        }
    }

    /// Stage 2: a new incident whose policy said "roll back" waited for the decider's answer
    /// (`Engine::raise`). Its decision becomes what one instance's would have been, and only
    /// then are its alert and decision record published: one instance knows at once whether
    /// the change's rollback is already pending, or vetoed, and trips the breaker after
    /// recording the decision.
    fn publish_held(&mut self, idx: usize, at_ms: i64, decided_by: Actor, verdict: Verdict) {
        let inc = &mut self.incidents[idx];
        let change_id = inc.decision.change_id.clone().unwrap_or_default();
        match &verdict {
            Verdict::Already { .. } => {
                inc.decision.action = DecisionAction::RollbackAlreadyRequested;
                inc.decision.reason =
                    format!("rollback of {change_id} already requested and pending");
            }
            Verdict::Vetoed { why } => {
                inc.decision.action = DecisionAction::Vetoed;
                inc.decision.set_deadline(None);
                inc.decision.reason =
                    format!("{why}; this incident is recorded against the veto, not acted on");
                self.vetoed.insert(change_id.clone(), why.clone());
            }
            Verdict::Grant | Verdict::Breaker { .. } => {}
        }
        self.publish_decision(idx);
        match verdict {
            Verdict::Grant => self.emit_rollback(idx, at_ms, decided_by),
            Verdict::Breaker { why, counts } => {
                let counts = serde_json::from_str(&counts).unwrap_or(serde_json::Value::Null);
                self.trip_breaker(idx, at_ms, &change_id, &why, counts);
            }
            Verdict::Already { .. } | Verdict::Vetoed { .. } => {}
        }
    }

    /// Stage 2: publishes the incidents held longer than `[scale] hold_max_secs` of wall
    /// time with what is known, so that an owner that does not answer (unassigned for long,
    /// or far behind) delays no alert for good. The detection record is written without the
    /// target's effect, saying why; a rollback stays the decider's to grant, carried out when
    /// its verdict comes (`apply_verdict`). Called by the service with every batch and, when
    /// the input is silent, on its idle tick.
    pub fn release_overdue_holds(&mut self, now_wall_ms: i64) {
        let max_ms = self.cfg.scale.hold_max_secs as i64 * 1000;
        let overdue: Vec<usize> = (0..self.incidents.len())
            .filter(|&k| {
                self.incidents[k]
                    .held
                    .as_ref()
                    .is_some_and(|h| now_wall_ms.saturating_sub(h.since_ms) >= max_ms)
            })
            .collect();
        for idx in overdue {
            let Some(h) = self.incidents[idx].held.as_mut() else {
                continue;
            };
            let waits_decider = h.decider && h.verdict.is_none();
            if waits_decider {
                h.decider = false;
            }
            let gain = h.gain.take();
            let missing = match (waits_decider, gain.is_some()) {
                (true, true) => "the decider's verdict and the target's effect",
                (true, false) => "the decider's verdict",
                (false, _) => "the target's effect",
            };
            if let Some((_, ti, evidence, det_policy)) = gain {
                let mut evidence: serde_json::Value =
                    serde_json::from_str(&evidence).unwrap_or(serde_json::Value::Null);
                if let Some(o) = evidence.as_object_mut() {
                    o.insert(
                        "local_gain_global_loss_missing".into(),
                        format!(
                            "no answer from the owner of {} within {} s",
                            self.schema.metrics[ti].cfg.name, self.cfg.scale.hold_max_secs
                        )
                        .into(),
                    );
                }
                let det_policy =
                    serde_json::from_str(&det_policy).unwrap_or(serde_json::Value::Null);
                self.audit_detection(idx, evidence, det_policy);
            }
            self.stats.holds_expired += 1;
            tracing::warn!(
                incident = %self.incidents[idx].id,
                missing,
                hold_max_secs = self.cfg.scale.hold_max_secs,
                "alert published without waiting longer for other owners"
            );
            self.dirty = true;
            self.release_held(idx);
        }
    }

    /// Stage 2: publishes a held incident once nothing it waits for is missing.
    pub(super) fn release_held(&mut self, idx: usize) {
        let ready = match &self.incidents[idx].held {
            Some(h) => h.gain.is_none() && (!h.decider || h.verdict.is_some()),
            None => false,
        };
        if !ready {
            return;
        }
        let h = self.incidents[idx].held.take().expect("checked");
        self.dirty = true;
        match h.verdict {
            Some((verdict, by, at)) => self.publish_held(idx, at, by, verdict),
            None => self.publish_decision(idx),
        }
        if let Some((end, resolution, policy)) = h.resolution {
            let policy = serde_json::from_str(&policy).unwrap_or(serde_json::Value::Null);
            self.resolve_incident(idx, end, resolution, policy);
        }
    }

    /// Stage 2: asks the owner of metric `ti` for the effect of `change_id` on it as of window
    /// `upto`, for incident `idx`.
    pub(super) fn ask_gain(&mut self, idx: usize, change_id: &str, ti: usize, upto: i64) {
        let Stage::Merge { partitions } = self.stage else {
            return;
        };
        let reply = self.incident_partition(idx, partitions);
        self.outputs.push(Output::Partial(Box::new(Routed {
            partition: self.partition_of(ti, partitions),
            key: change_id.to_string(),
            partial: Partial::GainAsk {
                change_id: change_id.to_string(),
                target: self.schema.metrics[ti].cfg.name.clone(),
                upto,
                incident_id: self.incidents[idx].id.clone(),
                reply,
            },
        })));
    }

    /// Stage 2, after closing window `w`: notes each watch's effect on the metrics merged here
    /// where it changed, and answers the questions waiting for this window.
    pub(super) fn note_gains(&mut self, w: i64, changes: &[String]) {
        if !matches!(self.stage, Stage::Merge { .. }) {
            return;
        }
        // Each series' latest point, indexed once per window: the history holds a few points
        // per watch and metric, and a scan per pair would be quadratic in the watches.
        let mut fresh = Vec::new();
        {
            let mut last: HashMap<(&str, usize), Option<GainEffect>> =
                HashMap::with_capacity(self.gain_hist.len());
            for p in &self.gain_hist {
                last.insert((p.change_id.as_str(), p.metric), p.effect);
            }
            let owned: Vec<usize> = (0..self.schema.metrics.len())
                .filter(|&mi| self.owns_metric(mi))
                .collect();
            for c in changes {
                for &mi in &owned {
                    let effect = self.target_effect(c, mi);
                    if last.get(&(c.as_str(), mi)) != Some(&effect) {
                        fresh.push(GainPoint {
                            change_id: c.clone(),
                            metric: mi,
                            w,
                            effect,
                        });
                    }
                }
            }
        }
        self.gain_hist.extend(fresh);
        // Drop points before the horizon that a later point of the same series, also before
        // it, supersedes (walking back from the newest).
        let horizon = w - GAIN_HISTORY_WINDOWS;
        let mut seen: HashSet<(&str, usize)> = HashSet::new();
        let keep: Vec<bool> = self
            .gain_hist
            .iter()
            .rev()
            .map(|p| p.w >= horizon || seen.insert((p.change_id.as_str(), p.metric)))
            .collect();
        let mut keep = keep.into_iter().rev();
        self.gain_hist.retain(|_| keep.next().unwrap_or(true));
        let (due, wait): (Vec<GainAsk>, Vec<GainAsk>) = std::mem::take(&mut self.gain_asks)
            .into_iter()
            .partition(|a| a.upto <= w);
        self.gain_asks = wait;
        for a in due {
            self.answer_gain(a);
        }
    }

    /// The effect of a watch on a metric merged here as it stood once window `upto` was
    /// closed.
    fn answer_gain(&mut self, a: GainAsk) {
        let effect = self
            .gain_hist
            .iter()
            .rev()
            .find(|p| p.metric == a.metric && p.change_id == a.change_id && p.w <= a.upto)
            .and_then(|p| p.effect);
        self.outputs.push(Output::Partial(Box::new(Routed {
            partition: a.reply,
            key: a.change_id,
            partial: Partial::GainAnswer {
                incident_id: a.incident_id,
                effect,
            },
        })));
    }

    /// Stage 2, on the incident's owner: the target's effect is in; the detection record is
    /// written with its "local gain, global loss", and the incident is published unless it
    /// still waits for the decider.
    fn take_gain(&mut self, incident_id: &str, effect: Option<GainEffect>) {
        let Some(&idx) = self.incident_ids.get(incident_id) else {
            return;
        };
        let Some(gain) = self.incidents[idx]
            .held
            .as_mut()
            .and_then(|h| h.gain.take())
        else {
            return;
        };
        let (own, ti, evidence, det_policy) = gain;
        let metric = self.incidents[idx].metric_idx.unwrap_or(ti);
        let lg = effect.and_then(|e| self.gain_json(ti, e, metric, own));
        let mut evidence: serde_json::Value =
            serde_json::from_str(&evidence).unwrap_or(serde_json::Value::Null);
        if let (Some(lg), Some(o)) = (&lg, evidence.as_object_mut()) {
            o.insert("local_gain_global_loss".into(), lg.clone());
        }
        let det_policy = serde_json::from_str(&det_policy).unwrap_or(serde_json::Value::Null);
        self.incidents[idx].local_gain_global_loss = lg;
        self.audit_detection(idx, evidence, det_policy);
        self.release_held(idx);
    }

    /// Stage 2: tells the decider that a person vetoed the rollback of `change_id`.
    pub(super) fn tell_decider_veto(&mut self, change_id: &str, reason: &str) {
        if !matches!(self.stage, Stage::Merge { .. }) {
            return;
        }
        self.outputs.push(Output::Partial(Box::new(Routed {
            partition: DECIDER,
            key: change_id.to_string(),
            partial: Partial::Veto {
                change_id: change_id.to_string(),
                reason: reason.to_string(),
            },
        })));
    }

    /// The repartition partition of every series (and share series) of `metric`: one owner
    /// merges a whole metric. Its evidence reads across the metric's series (a segment's share
    /// of the total's excess, whether a drop is explained by a tracking outage on another of
    /// its series, the scope's in-scope series), so with one owner per metric it is computed
    /// from exactly what one instance would see. Stage 2's work is per series and window, not
    /// per event (that is stage 1's, spread by input partition), so a metric per owner is
    /// the unit that keeps results equal at little cost in balance.
    pub(super) fn partition_of(&self, metric: usize, partitions: i32) -> i32 {
        match self.metric_part.get(metric) {
            Some(&p) => p,
            None => self.metric_partition(metric, partitions),
        }
    }

    /// The repartition partitions that merge some metric, each once.
    pub(super) fn metric_partitions(&self) -> Vec<i32> {
        let mut parts = self.metric_part.clone();
        parts.sort_unstable();
        parts.dedup();
        parts
    }

    /// Checks the partition a stage-2 question wants its answer on; `false`: not stage 2, so
    /// the question is not for this engine.
    fn reply_to(&self, reply: i32) -> Result<bool, Reject> {
        let Stage::Merge { partitions } = self.stage else {
            return Ok(false);
        };
        if !(0..partitions).contains(&reply) {
            return Err(Reject::new(
                ErrorCode::InvalidField,
                format!("reply partition {reply} of {partitions}"),
            ));
        }
        Ok(true)
    }

    fn metric_partition(&self, metric: usize, partitions: i32) -> i32 {
        let mut h = SipHasher13::new_with_keys(self.schema.series_key.0, self.schema.series_key.1);
        h.write(self.schema.metrics[metric].cfg.name.as_bytes());
        (h.finish() % partitions.max(1) as u64) as i32
    }

    /// The repartition partition and record key of a series (or share series).
    fn route(&self, metric: usize, values: &[String], share: bool) -> (i32, String) {
        let vals: Vec<&str> = values.iter().map(String::as_str).collect();
        let k = self.route_key(metric, &vals, share);
        let Stage::Aggregate { partitions } = self.stage else {
            return (0, String::new());
        };
        (self.partition_of(metric, partitions), format!("{k:016x}"))
    }

    /// Stage 1: moves every partial sum read since the last call into the outputs (then the
    /// markers of the input partitions, which must follow the partials on each partition), and
    /// forgets the series, so that the next batch starts empty. Stage 2 decides from here on.
    pub fn drain_partials(&mut self, now_ms: i64) {
        let Stage::Aggregate { partitions } = self.stage else {
            return;
        };
        let mut out: Vec<Routed> = Vec::new();
        for si in 0..self.series.len() {
            let metric = self.series[si].metric;
            let values: Vec<String> = self.series[si]
                .dims
                .iter()
                .map(|(_, v)| v.clone())
                .collect();
            let mut windows = Vec::new();
            self.series[si].ring.take_open(|a, hll| {
                windows.push((a, hll.and_then(|h| h.registers().map(<[u8]>::to_vec))))
            });
            if windows.is_empty() {
                continue;
            }
            let (partition, key) = self.route(metric, &values, false);
            let name = self.schema.metrics[metric].cfg.name.clone();
            for (a, hll) in windows {
                // Per partial, not per event: lets a run be checked sum for sum across stages.
                tracing::trace!(target: "guardrail::partial", metric = %name, dims = ?values,
                    w = a.w, num = a.num, den = a.den, partition, "partial sent");
                out.push(Routed {
                    partition,
                    key: key.clone(),
                    partial: Partial::Window {
                        metric: name.clone(),
                        dims: values.clone(),
                        w: a.w,
                        num: a.num,
                        den: a.den,
                        sumsq: a.sumsq,
                        hll,
                        extremes: (a.max >= a.min).then_some((a.max, a.min)),
                    },
                });
            }
        }
        for sh in std::mem::take(&mut self.shares) {
            let mut sh = sh;
            let values: Vec<String> = sh.dims.iter().map(|(_, v)| v.clone()).collect();
            let (partition, key) = self.route(sh.metric, &values, true);
            let names = &self.share_cats[sh.metric].names;
            for (w, counts) in sh.take_open() {
                out.push(Routed {
                    partition,
                    key: key.clone(),
                    partial: Partial::Share {
                        metric: self.schema.metrics[sh.metric].cfg.name.clone(),
                        dims: values.clone(),
                        w,
                        counts: counts
                            .iter()
                            .enumerate()
                            .filter(|(_, n)| **n > 0.0)
                            .map(|(c, n)| (names[c].clone(), *n))
                            .collect(),
                    },
                });
            }
        }
        self.share_index.clear();
        // A watch's sums go where they are read: each metric's arms to its metric's owner (its
        // breaches, and the holdout evidence on its incidents, are decided there), the exposure
        // to each of those and to the change's own partition (the split check).
        let parts = self.metric_partitions();
        for g in std::mem::take(&mut self.guards).all {
            if g.exposure == [0.0; 2]
                && g.metrics
                    .iter()
                    .all(|m| m.arms.iter().all(|a| a.num == 0.0 && a.den == 0.0))
            {
                continue;
            }
            let own = self.change_partition(&g.change_id, partitions);
            for &x in parts.iter().chain((!parts.contains(&own)).then_some(&own)) {
                let metrics: Vec<(String, u8, f64, f64, f64)> = g
                    .metrics
                    .iter()
                    .enumerate()
                    .filter(|(mi, _)| self.metric_part[*mi] == x)
                    .flat_map(|(mi, m)| {
                        m.arms
                            .iter()
                            .enumerate()
                            .filter(|(_, a)| a.num != 0.0 || a.den != 0.0)
                            .map(move |(arm, a)| (mi, arm as u8, a.num, a.den, a.sumsq))
                    })
                    .map(|(mi, arm, n, d, q)| {
                        (self.schema.metrics[mi].cfg.name.clone(), arm, n, d, q)
                    })
                    .collect();
                if metrics.is_empty() && g.exposure == [0.0; 2] {
                    continue;
                }
                out.push(Routed {
                    partition: x,
                    key: g.change_id.clone(),
                    partial: Partial::Arms {
                        change_id: g.change_id.clone(),
                        exposure: g.exposure,
                        metrics,
                    },
                });
            }
        }
        // Segment series start again with the next batch; totals stay (their slots are empty).
        let fixed = self
            .schema
            .metrics
            .iter()
            .filter_map(|m| m.total)
            .max()
            .map(|t| t + 1)
            .unwrap_or(0);
        self.series.truncate(fixed);
        self.index.clear();
        for m in self.schema.metrics.iter_mut() {
            m.series_count = 0;
        }
        // Every assigned partition, heard from or not: stage 2 lets one stop holding its
        // watermark only when a marker says it has been silent.
        for c in &self.sources {
            for x in 0..partitions {
                out.push(Routed {
                    partition: x,
                    key: crate::repartition::MARKER_KEY.to_string(),
                    partial: Partial::Marker {
                        source: c.source,
                        max_ts: (c.max_ts != i64::MIN).then_some(c.max_ts),
                        heard_ms: c.seen_ms.min(now_ms),
                        sent_ms: now_ms,
                    },
                });
            }
        }
        self.outputs
            .extend(out.into_iter().map(|r| Output::Partial(Box::new(r))));
    }

    /// Stage 2: applies one record of repartition partition `part`.
    pub fn process_partial(&mut self, part: i32, bytes: &[u8], now_ms: i64) -> Result<(), Reject> {
        // Events are counted by stage 1; what stage 2 refuses is counted here.
        self.last_event_wall_ms = now_ms;
        let r = self.process_partial_inner(part, bytes, now_ms);
        if let Err(e) = &r {
            self.stats.rejected[e.code.index()] += 1;
        }
        r
    }

    pub(super) fn metric_named(&self, name: &str) -> Result<usize, Reject> {
        self.schema
            .metrics
            .iter()
            .position(|m| m.cfg.name == name)
            .ok_or_else(|| {
                Reject::new(
                    ErrorCode::InvalidField,
                    format!(
                        "repartition record for metric {name:?}, which this instance does not \
                         define (do all instances run the same configuration?)"
                    ),
                )
            })
    }

    /// Whether partial sums for window `w` of metric `mi` can still be merged.
    fn check_open(&self, w: i64, mi: usize) -> Result<(), Reject> {
        match self.closed_upto {
            Some(c) if w < c && !self.behind.get(&mi).is_some_and(|&f| w >= f) => Err(Reject::new(
                ErrorCode::TooLate,
                format!(
                    "partial sums for window {} arrived after it closed (watermark {}); \
                     allowed lateness is {} s",
                    fmt_time(w * self.schema.window_ms),
                    fmt_time(c * self.schema.window_ms),
                    self.schema.lateness_ms / 1000
                ),
            )),
            _ => Ok(()),
        }
    }

    fn process_partial_inner(
        &mut self,
        part: i32,
        bytes: &[u8],
        now_ms: i64,
    ) -> Result<(), Reject> {
        let p = Partial::decode(bytes).map_err(|e| Reject::new(ErrorCode::InvalidField, e))?;
        match p {
            Partial::Window {
                metric,
                dims,
                w,
                num,
                den,
                sumsq,
                hll,
                extremes,
            } => {
                let mi = self.metric_named(&metric)?;
                self.check_open(w, mi)?;
                if hll
                    .as_ref()
                    .map(|r| r.len() != crate::window::HLL_REGISTERS)
                    .unwrap_or(false)
                {
                    return Err(Reject::new(
                        ErrorCode::InvalidField,
                        "distinct-count sketch of the wrong size",
                    ));
                }
                let Some(si) = self.series_for(mi, &dims, w)? else {
                    return Ok(());
                };
                tracing::trace!(target: "guardrail::partial", metric = %metric, dims = ?dims,
                    w, num, den, partition = part, "partial merged");
                self.series[si]
                    .ring
                    .merge(w, num, den, sumsq, extremes, hll.as_deref());
                // (A total, made before any window, starts unset: its first sums set it.)
                let f = &mut self.series[si].first_window;
                if *f == i64::MIN || w < *f {
                    *f = w;
                }
            }
            Partial::Share {
                metric,
                dims,
                w,
                counts,
            } => {
                let mi = self.metric_named(&metric)?;
                self.check_open(w, mi)?;
                let m = &self.schema.metrics[mi];
                // Empty dims: the metric's total mix.
                if m.share_of.is_none() || (!dims.is_empty() && dims.len() != m.dims.len()) {
                    return Err(shape_error(&metric));
                }
                let mut h =
                    SipHasher13::new_with_keys(self.schema.series_key.0, self.schema.series_key.1);
                h.write_usize(mi);
                h.write_u8(0xfe);
                for v in &dims {
                    h.write(v.as_bytes());
                    h.write_u8(0xff);
                }
                let key = h.finish();
                let i = match self.share_index.get(&key) {
                    Some(&i) => i,
                    None => {
                        if self.shares.iter().filter(|x| x.metric == mi).count()
                            >= self.schema.max_series
                        {
                            self.stats.series_overflow += 1;
                            return Ok(());
                        }
                        let named = m.cfg.dims.iter().cloned().zip(dims).collect();
                        self.shares.push(crate::share::ShareSeries::new(
                            mi,
                            named,
                            m.det.baseline_half_life_windows * 12.0,
                        ));
                        self.share_index.insert(key, self.shares.len() - 1);
                        self.shares.len() - 1
                    }
                };
                for (cat, n) in counts {
                    let c = self.share_cats[mi].index(&cat);
                    self.shares[i].add_n(w, c, n);
                }
            }
            Partial::Arms {
                change_id,
                exposure,
                metrics,
            } => {
                let Some(gi) = self.guards.lookup(&change_id) else {
                    // Not watched (as single-stage ignores arms of unwatched changes).
                    return Ok(());
                };
                for (name, arm, num, den, sumsq) in metrics {
                    let mi = self.metric_named(&name)?;
                    let a = self.guards.all[gi]
                        .metrics
                        .get_mut(mi)
                        .and_then(|m| m.arms.get_mut(arm as usize))
                        .ok_or_else(|| shape_error(&name))?;
                    a.num += num;
                    a.den += den;
                    a.sumsq += sumsq;
                }
                self.guards.all[gi].add_exposure_at(part, exposure);
            }
            Partial::Change(b) => {
                let c = decode_change(&b, self.schema.max_bytes)?;
                let mut h =
                    SipHasher13::new_with_keys(self.schema.series_key.0, self.schema.series_key.1);
                h.write(&b);
                // Broadcast on every repartition partition: applied once.
                if !self.dedup.seen(h.finish(), c.ts) {
                    self.apply_change(&c);
                }
            }
            Partial::Marker {
                source,
                max_ts,
                heard_ms,
                sent_ms,
            } => {
                if let Some(t) = max_ts.filter(|t| {
                    !(crate::event::MIN_TIME_MS..=crate::event::MAX_TIME_MS).contains(t)
                }) {
                    return Err(Reject::new(
                        ErrorCode::BadTimestamp,
                        format!("marker time {t} out of range"),
                    ));
                }
                let idle = sent_ms.saturating_sub(heard_ms) > SOURCE_IDLE_MS;
                self.advance_at(clock_id(part, source), max_ts, heard_ms, Some(idle), now_ms);
            }
            Partial::Ask {
                change_id,
                incident_id,
                reply,
                at_ms,
                decided_by,
            } => {
                if !self.reply_to(reply)? {
                    return Ok(());
                }
                self.decide(change_id, incident_id, reply, at_ms, decided_by);
            }
            Partial::GainAsk {
                change_id,
                target,
                upto,
                incident_id,
                reply,
            } => {
                if !self.reply_to(reply)? {
                    return Ok(());
                }
                let metric = self.metric_named(&target)?;
                let a = GainAsk {
                    change_id,
                    metric,
                    upto,
                    incident_id,
                    reply,
                };
                match self.closed_upto {
                    // Windows before `closed_upto` are closed: `upto` is.
                    Some(c) if upto < c => self.answer_gain(a),
                    _ => {
                        self.gain_asks.push(a);
                        self.dirty = true;
                    }
                }
            }
            Partial::GainAnswer {
                incident_id,
                effect,
            } => self.take_gain(&incident_id, effect),
            Partial::WatchClosed {
                change_id,
                opened_ms,
                part,
                at_ms,
                why,
                metrics,
            } => self.gather_watch_closed(crate::guard::WatchReport {
                change_id,
                opened_ms,
                at_ms,
                why,
                parts: vec![part],
                metrics,
            })?,
            Partial::Verdict {
                change_id,
                incident_id,
                at_ms,
                decided_by,
                verdict,
            } => self.apply_verdict(change_id, incident_id, at_ms, decided_by, verdict),
            Partial::Veto { change_id, reason } => {
                // A grant not yet carried out yields to the veto (see apply_verdict).
                self.granted.remove(&change_id);
                self.vetoed.insert(change_id, reason);
                self.dirty = true;
            }
        }
        Ok(())
    }

    /// Stage 2: the series of metric `mi` with dimension values `dims` (the total when empty),
    /// created on first sight; None past the metric's series limit (counted).
    fn series_for(&mut self, mi: usize, dims: &[String], w: i64) -> Result<Option<usize>, Reject> {
        let m = &self.schema.metrics[mi];
        if m.share_of.is_some() {
            return Err(shape_error(&m.cfg.name));
        }
        if dims.is_empty() {
            return m.total.map(Some).ok_or_else(|| shape_error(&m.cfg.name));
        }
        if dims.len() != m.dims.len() {
            return Err(shape_error(&m.cfg.name));
        }
        let mut h = SipHasher13::new_with_keys(self.schema.series_key.0, self.schema.series_key.1);
        h.write_usize(mi);
        for v in dims {
            h.write(v.as_bytes());
            h.write_u8(0xff);
        }
        let key = h.finish();
        if let Some(&si) = self.index.get(&key) {
            return Ok(Some(si));
        }
        if m.series_count >= self.schema.max_series {
            self.stats.series_overflow += 1;
            return Ok(None);
        }
        let named: Vec<(String, String)> = m.cfg.dims.iter().cloned().zip(dims.to_vec()).collect();
        let s = make_series(&self.schema, mi, named, w);
        let si = push_series(&mut self.series, s);
        self.index.insert(key, si);
        self.schema.metrics[mi].series_count += 1;
        Ok(Some(si))
    }
}

fn shape_error(metric: &str) -> Reject {
    Reject::new(
        ErrorCode::InvalidField,
        format!(
            "repartition record does not fit metric {metric:?} here (do all instances run \
             the same configuration?)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{harmful_change, Scenario, Sim};
    use std::collections::VecDeque;

    const HOUR: i64 = 3_600_000;
    const PARTS: i32 = 6;

    /// What one single-stage engine, and two stage-2 engines fed by one stage-1 engine, decided
    /// on the same traffic with one harmful change in three countries.
    struct Run {
        /// Rollback requests (change ids).
        rollbacks: [Vec<String>; 2],
        /// Incidents blamed on the change with a rollback decision: of the single engine, and
        /// of each stage-2 engine.
        blamed: (usize, [usize; 2]),
        /// Every alert as published (sorted), and every audit record as (action, incident,
        /// change) (sorted; their times are the wall clock's).
        alerts: [Vec<String>; 2],
        audits: [Vec<(String, String, String, String)>; 2],
    }

    impl Run {
        /// The stage-2 engines decided what the single engine did: one rollback of `change`,
        /// every alert with its evidence (segments, candidates, treatment or observational
        /// comparison, outage explanation), and every audit record once (a watch's opening and
        /// closing are the change owner's to write).
        fn decided_as_one(&self, change: &str) {
            assert_eq!(self.rollbacks[0], [change]);
            assert_eq!(self.rollbacks[1], self.rollbacks[0]);
            assert!(!self.alerts[0].is_empty());
            for (a, b) in self.alerts[0].iter().zip(&self.alerts[1]) {
                assert_eq!(a, b, "first differing alert");
            }
            assert_eq!(self.alerts[0].len(), self.alerts[1].len());
            assert_eq!(self.audits[0], self.audits[1]);
        }
    }

    /// The simulated traffic the stage tests play, from `start`.
    fn traffic(start: i64) -> Sim {
        Sim::new(
            Scenario {
                seed: 31,
                peak_sessions_per_min: 400.0,
                ..Default::default()
            },
            start,
        )
    }

    /// Engine 0 owns the repartition partition of the conversion metric, engine 1 every other
    /// one (that of the support tickets, among them): the change's incidents are on both.
    ///
    /// With `handover_ms`, engine 0 falls one batch behind at that time (its input waits on
    /// the topic), writes its checkpoint and leaves; engine 1, one window ahead of it, takes
    /// its partition over from the checkpoint and reads the partition on from there. With
    /// `eager`, the survivor also gives up its own partitions at the
    /// handover and takes them back from its own checkpoint, as an eager rebalance does (every
    /// partition is revoked, then all are assigned); with `restart`, it restarts from its
    /// checkpoint right after the takeover, before it has caught the metric up.
    fn run(change: &str, handover_ms: Option<i64>, eager: bool, restart: bool) -> Run {
        let mut cfg =
            Config::from_str_named(crate::demo::DEFAULT_CONFIG, "config/guardrail.toml").unwrap();
        cfg.detection.warmup_windows = 48;
        cfg.guards.sprawl.enabled = false;
        cfg.guards.pressure.enabled = false;
        // The change's watch closes inside the run: its closing record gathers every metric's
        // verdict from that metric's owner.
        cfg.guards.watch_secs = 3600;
        let change_ms = crate::event::parse_time_str("2026-11-04T14:00:00Z").unwrap();
        let (start, end) = (change_ms - 5 * HOUR, change_ms + 2 * HOUR);
        let mut single = Engine::new(&cfg).unwrap();
        let mut s1 = Engine::new(&cfg).unwrap();
        s1.set_stage(Stage::Aggregate { partitions: PARTS });
        s1.assign_sources(&[0], start);
        let mut owners = [Engine::new(&cfg).unwrap(), Engine::new(&cfg).unwrap()];
        let part_of = |name: &str| {
            let mi = s1.metric_named(name).unwrap();
            s1.partition_of(mi, PARTS)
        };
        let conversion = part_of("conversion_rate");
        assert_ne!(conversion, part_of("support_tickets_per_session"));
        let owner = |p: i32| usize::from(p != conversion);
        // The repartition topic: every record by partition, and what each engine has read.
        let mut log: Vec<Vec<Vec<u8>>> = vec![Vec::new(); PARTS as usize];
        let mut read = [[0usize; PARTS as usize]; 2];
        let mut owner_of: Vec<usize> = (0..PARTS).map(owner).collect();
        let mut lagging = false;
        for (i, e) in owners.iter_mut().enumerate() {
            e.set_stage(Stage::Merge { partitions: PARTS });
            let mine: Vec<i32> = (0..PARTS).filter(|p| owner(*p) == i).collect();
            e.assign_repartitions(&mine, 1, start);
        }
        let mut sim = traffic(start);
        let mut rollbacks: [Vec<String>; 2] = Default::default();
        let mut alerts: [Vec<String>; 2] = Default::default();
        let mut audits: [Vec<(String, String, String, String)>; 2] = Default::default();
        let mut keep = |k: usize, o: Output, queue: &mut VecDeque<Routed>| match o {
            Output::Partial(r) => queue.push_back(*r),
            Output::Rollback(q) => rollbacks[k].push(q.data.change_id),
            Output::Alert(a) => {
                // Everything but the wall-clock time it was sent at.
                let mut v = serde_json::to_value(&a).unwrap();
                v.as_object_mut().unwrap().remove("emitted_at");
                alerts[k].push(v.to_string())
            }
            Output::Audit(r) => audits[k].push((
                r.action.to_string(),
                r.incident_id.unwrap_or_default(),
                r.change_id.unwrap_or_default(),
                // A watch's records whole (the verdict of every metric, wherever merged).
                match r.action.starts_with("guard_") {
                    true => r.evidence.to_string(),
                    false => String::new(),
                },
            )),
        };
        let mut evs: Vec<Vec<u8>> = Vec::new();
        let mut changed = false;
        while sim.now_ms() < end {
            if !changed && sim.now_ms() >= change_ms {
                changed = true;
                let (record, effect) =
                    harmful_change(change, change_ms, "agent", &["FR", "BE", "DE"], 0.6, 4.0);
                single.process_change(record.as_bytes()).unwrap();
                s1.forward_change(record.as_bytes()).unwrap();
                sim.scenario_mut().effects.push(effect);
            }
            let to = sim.now_ms() + 5 * 60_000;
            let now = to + 1000;
            if lagging {
                // Engine 0 leaves with its checkpoint, one batch behind engine 1.
                lagging = false;
                let at = read[0][conversion as usize];
                let offsets = vec![("repartition".to_string(), conversion, at as i64)];
                let bytes = owners[0].checkpoint(offsets, now);
                let path = std::path::Path::new("handover.ckpt");
                let loaded =
                    crate::checkpoint::unframe(path, &bytes, owners[0].state_fingerprint())
                        .unwrap();
                let behind = owners[0].closed_upto.unwrap();
                assert!(
                    behind < owners[1].closed_upto.unwrap(),
                    "the survivor is ahead"
                );
                if eager {
                    let own: Vec<i32> = (0..PARTS).filter(|&x| owner_of[x as usize] == 1).collect();
                    let offsets = own
                        .iter()
                        .map(|&x| ("repartition".to_string(), x, read[1][x as usize] as i64))
                        .collect();
                    let bytes = owners[1].checkpoint(offsets, now);
                    for &x in &own {
                        owners[1].forget_repartition(x);
                    }
                    let all: Vec<i32> = (0..PARTS).collect();
                    owners[1].assign_repartitions(&all, 1, now);
                    let mine =
                        crate::checkpoint::unframe(path, &bytes, owners[1].state_fingerprint())
                            .unwrap();
                    owners[1].import_partitions(path, &mine, &own).unwrap();
                } else {
                    owners[1].assign_repartitions(&[conversion], 1, now);
                }
                owners[1]
                    .import_partitions(path, &loaded, &[conversion])
                    .unwrap();
                owner_of[conversion as usize] = 1;
                if restart {
                    let bytes = owners[1].checkpoint(Vec::new(), now);
                    let saved =
                        crate::checkpoint::unframe(path, &bytes, owners[1].state_fingerprint())
                            .unwrap();
                    let mut fresh = Engine::new(&cfg).unwrap();
                    fresh.set_stage(Stage::Merge { partitions: PARTS });
                    fresh.restore(path, &saved).unwrap();
                    let all: Vec<i32> = (0..PARTS).collect();
                    fresh.assign_repartitions(&all, 1, now);
                    owners[1] = fresh;
                }
                read[1][conversion as usize] = at;
            } else if handover_ms.is_some_and(|h| sim.now_ms() >= h) && owner_of.contains(&0) {
                lagging = true;
            }
            evs.clear();
            sim.advance(to, &mut |_, v| evs.push(v.to_vec()));
            evs.push(format!(r#"{{"type":"heartbeat","ts":{}}}"#, to - 1).into_bytes());
            for v in &evs {
                let _ = single.process_event_from(0, v, now);
                let _ = s1.process_event_from(0, v, now);
            }
            s1.drain_partials(now);
            let mut queue: VecDeque<Routed> = s1
                .take_outputs()
                .filter_map(|o| match o {
                    Output::Partial(r) => Some(*r),
                    _ => None,
                })
                .collect();
            // The repartition topic: stage 2's own records (questions, answers) go round too.
            // A partition taken over is read on from the checkpoint's offset.
            loop {
                if let Some(r) = queue.pop_front() {
                    log[r.partition as usize].push(r.partial.encode());
                }
                for x in 0..PARTS as usize {
                    let k = owner_of[x];
                    if lagging && k == 0 {
                        continue;
                    }
                    while read[k][x] < log[x].len() {
                        owners[k]
                            .process_partial(x as i32, &log[x][read[k][x]], now)
                            .unwrap();
                        read[k][x] += 1;
                        for o in owners[k].take_outputs() {
                            keep(1, o, &mut queue);
                        }
                    }
                }
                if queue.is_empty() {
                    break;
                }
            }
            for o in single.take_outputs() {
                keep(0, o, &mut queue);
            }
        }
        let blamed = |e: &Engine| {
            e.incidents
                .iter()
                .filter(|i| {
                    i.decision.change_id.as_deref() == Some(change)
                        && matches!(
                            i.decision.action,
                            DecisionAction::RollbackRequested
                                | DecisionAction::RollbackAlreadyRequested
                        )
                })
                .count()
        };
        for x in alerts.iter_mut() {
            x.sort();
        }
        for x in audits.iter_mut() {
            x.sort();
        }
        Run {
            rollbacks,
            blamed: (blamed(&single), [blamed(&owners[0]), blamed(&owners[1])]),
            alerts,
            audits,
        }
    }

    #[test]
    fn the_decider_grants_once_per_change_and_keeps_vetoes_and_the_breaker() {
        let mut cfg =
            Config::from_str_named(crate::demo::DEFAULT_CONFIG, "config/guardrail.toml").unwrap();
        cfg.policy.max_auto_rollbacks_per_hour = 2;
        cfg.policy.max_auto_rollbacks_per_hour_per_surface = 2;
        let mut d = Engine::new(&cfg).unwrap();
        d.set_stage(Stage::Merge { partitions: PARTS });
        d.assign_repartitions(&[0], 1, 0);
        let t = crate::event::parse_time_str("2026-11-04T14:00:00Z").unwrap();
        let policy = Actor {
            kind: "policy".into(),
            name: "autonomous-rollback".into(),
        };
        let person = Actor {
            kind: "human".into(),
            name: "ana".into(),
        };
        let send = |d: &mut Engine, p: Partial| -> Vec<Verdict> {
            d.process_partial(0, &p.encode(), t).unwrap();
            d.take_outputs()
                .filter_map(|o| match o {
                    Output::Partial(r) => match r.partial {
                        Partial::Verdict { verdict, .. } => Some(verdict),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        };
        let ask = |c: &str, i: &str, who: &Actor| Partial::Ask {
            change_id: c.into(),
            incident_id: i.into(),
            reply: 1,
            at_ms: t,
            decided_by: who.clone(),
        };
        assert_eq!(send(&mut d, ask("c1", "i1", &policy)), [Verdict::Grant]);
        let by_i1 = Verdict::Already { by: "i1".into() };
        for who in [&policy, &person] {
            assert_eq!(
                send(&mut d, ask("c1", "i2", who)),
                std::slice::from_ref(&by_i1)
            );
        }
        // Read again after a restart: the same answer.
        assert_eq!(send(&mut d, ask("c1", "i1", &policy)), [Verdict::Grant]);
        let veto = Partial::Veto {
            change_id: "c2".into(),
            reason: "vetoed by ana".into(),
        };
        assert!(send(&mut d, veto).is_empty());
        let vetoed = Verdict::Vetoed {
            why: "vetoed by ana".into(),
        };
        assert_eq!(send(&mut d, ask("c2", "i3", &person)), [vetoed]);
        // Two automatic rollbacks this hour: the third trips the breaker; a person's does not.
        assert_eq!(send(&mut d, ask("c3", "i4", &policy)), [Verdict::Grant]);
        let tripped = send(&mut d, ask("c4", "i5", &policy));
        assert!(
            matches!(tripped[..], [Verdict::Breaker { .. }]),
            "{tripped:?}"
        );
        assert_eq!(send(&mut d, ask("c4", "i5", &person)), [Verdict::Grant]);
        // Rolled back: a later incident may have it rolled back again.
        let rolled = crate::sim::rolled_back_change("c1", t, "automation");
        let c = decode_change(rolled.as_bytes(), 1 << 16).unwrap();
        d.apply_change(&c);
        assert_eq!(send(&mut d, ask("c1", "i6", &person)), [Verdict::Grant]);
        // The answers go to the incident's partition.
        d.process_partial(0, &ask("c9", "i9", &person).encode(), t)
            .unwrap();
        let to: Vec<i32> = d
            .take_outputs()
            .filter_map(|o| match o {
                Output::Partial(r) => Some(r.partition),
                _ => None,
            })
            .collect();
        assert_eq!(to, [1]);
    }

    #[test]
    fn a_change_is_rolled_back_once_however_its_incidents_are_spread() {
        let r = run("chg-spread", None, false, false);
        let (n_single, n_two) = r.blamed;
        // Several incidents blame the change, on both stage-2 engines: without the decider each
        // engine would request the rollback.
        assert!(n_single >= 2, "one engine: {n_single} incidents");
        assert!(n_two[0] >= 1 && n_two[1] >= 1, "two engines: {n_two:?}");
        assert!(r.audits[0].iter().any(|a| a.0 == "guard_closed"));
        r.decided_as_one("chg-spread");
    }

    /// `run` with a handover two hours before the change, whose decisions must be one
    /// engine's.
    fn hand_over_two_hours_before_the_change(change: &str, eager: bool, restart: bool) {
        let change_ms = crate::event::parse_time_str("2026-11-04T14:00:00Z").unwrap();
        run(change, Some(change_ms - 2 * HOUR), eager, restart).decided_as_one(change);
    }

    /// A stage-2 instance that leaves one window behind the other: the survivor takes its
    /// partition over and closes, for that partition's metric, the window it had closed
    /// already for its own (reading its partial sums again, not refusing them as late).
    /// Everything decided is still what one engine decides.
    #[test]
    fn a_metric_taken_over_behind_the_watermark_closes_the_windows_it_missed() {
        hand_over_two_hours_before_the_change("chg-behind", false, false);
    }

    /// Stage 2's first watermark comes when its last clock is heard from, after partial sums
    /// for earlier windows have arrived: those windows are closed, as one engine closes them,
    /// not skipped.
    #[test]
    fn stage_two_closes_the_windows_before_its_first_watermark() {
        let cfg =
            Config::from_str_named(crate::demo::DEFAULT_CONFIG, "config/guardrail.toml").unwrap();
        let start = crate::event::parse_time_str("2026-11-04T10:00:00Z").unwrap();
        let end = start + HOUR / 2;
        let mut single = Engine::new(&cfg).unwrap();
        let mut s1 = Engine::new(&cfg).unwrap();
        s1.set_stage(Stage::Aggregate { partitions: 2 });
        s1.assign_sources(&[0], start);
        let mut s2 = Engine::new(&cfg).unwrap();
        s2.set_stage(Stage::Merge { partitions: 2 });
        s2.assign_repartitions(&[0, 1], 1, start);
        let mut sim = Sim::new(Scenario::default(), start);
        let mut evs: Vec<Vec<u8>> = Vec::new();
        sim.advance(end, &mut |_, v| evs.push(v.to_vec()));
        evs.push(format!(r#"{{"type":"heartbeat","ts":{}}}"#, end - 1).into_bytes());
        let now = end + 1000;
        for v in &evs {
            let _ = single.process_event_from(0, v, now);
            let _ = s1.process_event_from(0, v, now);
        }
        // One drain for the half hour: every window's sums, then the markers.
        s1.drain_partials(now);
        for o in s1.take_outputs() {
            if let Output::Partial(r) = o {
                s2.process_partial(r.partition, &r.partial.encode(), now)
                    .unwrap();
            }
        }
        assert_eq!(s2.closed_upto, single.closed_upto);
        let mi = s2.metric_named("conversion_rate").unwrap();
        // Sessions in the closed windows of the conversion total and of one segment.
        let seen = |e: &Engine, dims: &[&str]| {
            let s = e
                .series
                .iter()
                .find(|s| {
                    s.metric == mi
                        && s.dims
                            .iter()
                            .map(|(_, v)| v.as_str())
                            .eq(dims.iter().copied())
                })
                .unwrap();
            s.hist.iter().map(|h| h.den as f64).sum::<f64>()
        };
        for dims in [&[][..], &["FR"][..]] {
            let sessions = seen(&single, dims);
            assert!(sessions > 0.0);
            assert_eq!(
                seen(&s2, dims),
                sessions,
                "every window with data closed: {dims:?}"
            );
        }
    }

    /// An owner that never answers delays no alert for good: past `hold_max_secs` the alert
    /// goes out with what is known, and the rollback waits for the decider's verdict, carried
    /// out when it comes.
    #[test]
    fn a_held_alert_goes_out_after_hold_max_secs_and_the_verdict_is_carried_out_later() {
        let mut cfg =
            Config::from_str_named(crate::demo::DEFAULT_CONFIG, "config/guardrail.toml").unwrap();
        cfg.detection.warmup_windows = 48;
        cfg.guards.sprawl.enabled = false;
        cfg.guards.pressure.enabled = false;
        let change_ms = crate::event::parse_time_str("2026-11-04T14:00:00Z").unwrap();
        let (start, end) = (change_ms - 5 * HOUR, change_ms + 2 * HOUR);
        // A partition count that puts the target metric apart from the conversion's.
        let probe = Engine::new(&cfg).unwrap();
        let (ctr, mi) = (
            probe.metric_named("click_through_rate").unwrap(),
            probe.metric_named("conversion_rate").unwrap(),
        );
        let parts = (PARTS..64)
            .find(|&n| probe.partition_of(ctr, n) != probe.partition_of(mi, n))
            .unwrap();
        let mut s1 = Engine::new(&cfg).unwrap();
        s1.set_stage(Stage::Aggregate { partitions: parts });
        s1.assign_sources(&[0], start);
        let mut s2 = Engine::new(&cfg).unwrap();
        s2.set_stage(Stage::Merge { partitions: parts });
        // The change's target metric is merged elsewhere, by an owner that never answers.
        let elsewhere = s1.partition_of(ctr, parts);
        let mine: Vec<i32> = (0..parts).filter(|&x| x != elsewhere).collect();
        s2.assign_repartitions(&mine, 1, start);
        let mut sim = traffic(start);
        // Stage 2's own questions (to the decider, to the target's owner) go unanswered.
        let mut unanswered: Vec<Routed> = Vec::new();
        let mut alerts: Vec<Alert> = Vec::new();
        let mut rollbacks = 0;
        let mut evs: Vec<Vec<u8>> = Vec::new();
        let mut now = start;
        let mut changed = false;
        while sim.now_ms() < end {
            if !changed && sim.now_ms() >= change_ms {
                changed = true;
                let (record, effect) = harmful_change(
                    "chg-held",
                    change_ms,
                    "agent",
                    &["FR", "BE", "DE"],
                    0.6,
                    4.0,
                );
                s1.forward_change(record.as_bytes()).unwrap();
                sim.scenario_mut().effects.push(effect);
            }
            let to = sim.now_ms() + 5 * 60_000;
            now = to + 1000;
            evs.clear();
            sim.advance(to, &mut |_, v| evs.push(v.to_vec()));
            evs.push(format!(r#"{{"type":"heartbeat","ts":{}}}"#, to - 1).into_bytes());
            for v in &evs {
                let _ = s1.process_event_from(0, v, now);
            }
            s1.drain_partials(now);
            let batch: Vec<Output> = s1.take_outputs().collect();
            for o in batch {
                if let Output::Partial(r) = o {
                    if r.partition != elsewhere {
                        s2.process_partial(r.partition, &r.partial.encode(), now)
                            .unwrap();
                    }
                }
            }
            for o in s2.take_outputs() {
                match o {
                    Output::Partial(r) => unanswered.push(*r),
                    Output::Alert(a) => alerts.push(*a),
                    Output::Rollback(_) => rollbacks += 1,
                    _ => {}
                }
            }
        }
        let held = |e: &Engine| e.incidents.iter().filter(|i| i.held.is_some()).count();
        assert!(held(&s2) > 0, "incidents wait for answers");
        assert_eq!(rollbacks, 0);
        let waiting: Vec<String> = s2
            .incidents
            .iter()
            .filter(|i| i.held.is_some())
            .map(|i| i.id.clone())
            .collect();
        assert!(!alerts.iter().any(|a| waiting.contains(&a.incident_id)));
        // One of them ends while held: its resolution waits for its firing alert.
        let ended = s2.incident_ids[&waiting[0]];
        s2.resolve_incident(
            ended,
            now,
            "recovered".into(),
            serde_json::json!({"rule": "test"}),
        );
        assert!(!s2
            .take_outputs()
            .any(|o| matches!(o, Output::Alert(_) | Output::Audit(_))));
        assert_eq!(s2.incidents[ended].status, IncidentStatus::Firing);
        let since: Vec<i64> = s2
            .incidents
            .iter()
            .filter_map(|i| i.held.as_ref().map(|h| h.since_ms))
            .collect();
        let (first, last) = (*since.iter().min().unwrap(), *since.iter().max().unwrap());
        assert!(
            first > start,
            "held since the wall-clock time it was raised"
        );
        s2.release_overdue_holds(first + 119_999);
        assert_eq!(s2.take_outputs().count(), 0, "not yet overdue");
        s2.release_overdue_holds(last + 120_000);
        assert_eq!(held(&s2), 0);
        assert!(s2.stats.holds_expired > 0);
        let mut audits = Vec::new();
        for o in s2.take_outputs() {
            match o {
                Output::Alert(a) => alerts.push(*a),
                Output::Rollback(_) => rollbacks += 1,
                Output::Audit(r) => audits.push(r),
                _ => {}
            }
        }
        for id in &waiting {
            assert!(alerts.iter().any(|a| &a.incident_id == id));
        }
        let order: Vec<&str> = alerts
            .iter()
            .filter(|a| a.incident_id == waiting[0])
            .map(|a| a.status)
            .collect();
        assert_eq!(order, ["firing", "resolved"]);
        assert_eq!(s2.incidents[ended].status, IncidentStatus::Resolved);
        assert!(alerts.iter().any(|a| waiting.contains(&a.incident_id)
            && a.decision.as_ref().map(|d| d.action) == Some(DecisionAction::RollbackRequested)));
        assert_eq!(rollbacks, 0, "the rollback is the decider's to grant");
        assert!(audits.iter().any(|r| r.action == "detection"
            && r.evidence.get("local_gain_global_loss_missing").is_some()));
        // The questions arrive at last: the decider grants, and its owner carries it out.
        let mut queue: VecDeque<Routed> = unanswered.into();
        while let Some(r) = queue.pop_front() {
            if r.partition == elsewhere {
                continue;
            }
            s2.process_partial(r.partition, &r.partial.encode(), now + 130_000)
                .unwrap();
            for o in s2.take_outputs() {
                match o {
                    Output::Partial(r) => queue.push_back(*r),
                    Output::Rollback(_) => rollbacks += 1,
                    _ => {}
                }
            }
        }
        assert_eq!(rollbacks, 1);
    }

    /// A restart in the middle of a catch-up: the checkpoint carries which windows the
    /// taken-over metric still has to close, and which its series closed already.
    #[test]
    fn a_restart_before_the_catch_up_still_closes_the_windows_it_missed() {
        hand_over_two_hours_before_the_change("chg-restart", false, true);
    }

    /// An eager rebalance: the survivor's own partitions are revoked and assigned again with
    /// the leaver's, and their state comes back from the survivor's own checkpoint.
    #[test]
    fn a_survivor_that_takes_its_own_partitions_back_decides_as_one() {
        hand_over_two_hours_before_the_change("chg-eager", true, false);
    }
}
