//! The engine's governance half: raising incidents and deciding on them, decision deadlines
//! (veto windows, escalation), the circuit breaker, human calls from the API, change guards
//! (treatment vs holdout, SRM, observational), variation sprawl and customer pressure.
//!
//! Every step writes an audit record; decisions run on the engine's event-time clock, which in
//! live operation trails wall time by the allowed lateness, so replays decide the same way.

use serde_json::json;

use super::*;
use crate::control::{ControlError, DecisionCall, Outcome, Verb};
use crate::guard::{
    ChangeGuard, Observational, PressureFinding, RelEffect, SprawlFinding, HOLDOUT, TREATMENT,
};
use crate::repartition::GainEffect;
use crate::seqtest::{self, ArmStats, MsprtConfig};

/// Events per arm before treatment and holdout are compared (the test is valid earlier, but
/// the variance estimates of tiny samples are not worth a page).
pub const MIN_ARM_VOLUME: f64 = 200.0;
const HOUR_MS: i64 = 3_600_000;
/// Bound on the holdout's likelihood ratio in a candidate's score: the comparison's normal
/// approximation is not trusted further out.
const HOLDOUT_LR_MAX: f64 = 100.0;
/// Floor of the scope-fit factor: a change can hurt one segment of its audience only (a broken
/// translation), so an audience that shows nothing lowers its score, never removes it.
const SCOPE_FIT_MIN: f64 = 0.25;
/// Wall time without any input after which decision deadlines follow the wall clock.
pub const IDLE_GRACE_MS: i64 = 60_000;

fn human(name: &str, role: &str) -> Actor {
    Actor {
        kind: "human".into(),
        name: format!("{name} ({role})"),
    }
}

fn pct(x: f64) -> String {
    format!("{:+.1}%", x * 100.0)
}

impl Engine {
    /// Event time "now" for decisions: the latest event seen.
    fn clock_ms(&self) -> i64 {
        self.max_ts.unwrap_or(0)
    }

    /// Adds treatment/holdout (or observational) evidence to candidates of an incident on
    /// `metric` whose series moved by `shift` (observed minus expected rate, or mean), re-ranks
    /// them, and says which comparison backs the top one.
    ///
    /// A candidate with a holdout has its score multiplied by the likelihood ratio of its
    /// treatment-vs-holdout difference under "this change caused the shift" (a treatment effect
    /// of `shift / (1 - holdout)`) against "no effect", in the comparison's normal
    /// approximation, bounded to [1/HOLDOUT_LR_MAX, HOLDOUT_LR_MAX]: a change whose holdout
    /// shows the shift rises above one that merely happened nearby, one whose holdout shows
    /// nothing falls.
    pub(super) fn weigh_candidates(
        &self,
        cands: &mut [Candidate],
        shifted: Shifted,
    ) -> Option<&'static str> {
        let Shifted {
            series: si,
            window: w,
            shift,
        } = shifted;
        let metric = self.series[si].metric;
        let rests: Vec<Option<Vec<usize>>> = cands
            .iter()
            .map(|c| self.rest_of(&c.change_id, metric, si))
            .collect();
        let narrowest = rests.iter().flatten().map(Vec::len).min();
        for (c, rest) in cands.iter_mut().zip(&rests) {
            let Some(g) = self.latest_guard(&c.change_id) else {
                continue;
            };
            let mw = &g.metrics[metric];
            if let Some(cmp) = mw.comparison.as_ref().filter(|_| !g.srm_flagged) {
                let h = g.holdout.unwrap_or(0.0).clamp(0.0, 0.9);
                let expect = shift / (1.0 - h);
                let se = cmp.se.max(1e-12);
                let ln_lr = ((cmp.diff * expect - 0.5 * expect * expect) / (se * se))
                    .clamp(-HOLDOUT_LR_MAX.ln(), HOLDOUT_LR_MAX.ln());
                if !c.reversal && ln_lr.is_finite() {
                    c.score = round3(c.score * ln_lr.exp());
                }
                c.evidence.push_str(&format!(
                    "; treatment vs holdout: {} (likelihood ratio {:.2} for this change having caused the shift)",
                    cmp.evidence(),
                    ln_lr.exp()
                ));
            } else if g.srm_flagged {
                c.evidence.push_str(
                    "; treatment/holdout split is broken (sample-ratio mismatch): no causal evidence",
                );
            } else if let Some((rel, lo, hi)) = mw.observational.effect() {
                c.evidence.push_str(&format!(
                    "; observational (no holdout): post-change {} vs the seasonal forecast (95% CI {}..{})",
                    pct(rel),
                    pct(lo),
                    pct(hi)
                ));
                let rest = rest
                    .as_deref()
                    .filter(|r| narrowest.is_some_and(|n| n < r.len()));
                if let (Some(rest), false) = (rest, c.reversal) {
                    self.fit_scope(c, rest, (si, w), g.opened_ms);
                }
            }
        }
        crate::attribute::rank(cands);
        let top = cands.first()?;
        let g = self.latest_guard(&top.change_id)?;
        Some(
            if g.metrics[metric].comparison.is_some() && !g.srm_flagged {
                "treatment_vs_holdout"
            } else {
                "observational"
            },
        )
    }

    /// Scope fit of an observational candidate whose audience is wider than the series: if it
    /// caused the shift evenly, the rest of its audience (the series of the same dimensions,
    /// other values) moved like this series since the change; if it hurt this segment only,
    /// they did not move. The score is multiplied by the likelihood ratio of the rest's effect
    /// under the first against the second, bounded to [SCOPE_FIT_MIN, 1]: when a change scoped
    /// to the segment and a wide one are both in force, the one that fits wins.
    /// Applied only when another candidate's audience is narrower: alone, a wide change that
    /// hurt one segment first (the rest still thin in data) is not talked down.
    fn fit_scope(&self, c: &mut Candidate, rest: &[usize], (si, w): (usize, i64), from_ms: i64) {
        let from = (from_ms.div_euclid(self.schema.window_ms)).max(w - HISTORY as i64 + 1);
        let (Some(this), Some(others)) = (
            self.effect_since(&[si], from, w),
            self.effect_since(rest, from, w),
        ) else {
            return;
        };
        let normal = |x: f64, mean: f64, var: f64| -0.5 * (x - mean).powi(2) / var - 0.5 * var.ln();
        let var_o = others.se.powi(2).max(1e-12);
        let ln_lr =
            normal(others.rel, this.rel, var_o + this.se.powi(2)) - normal(others.rel, 0.0, var_o);
        let fit = ln_lr.exp().clamp(SCOPE_FIT_MIN, 1.0);
        if fit < 1.0 {
            c.score = round3(c.score * fit);
        }
        c.evidence.push_str(&format!(
            "; scope fit {fit:.2}: since the change this segment moved {} and the rest of the change's audience ({} series like it) {} (95% CI {}..{})",
            pct(this.rel),
            rest.len(),
            pct(others.rel),
            pct(others.rel - 1.96 * others.se),
            pct(others.rel + 1.96 * others.se),
        ));
    }

    /// The rest of a change's audience beside series `si` of `metric`: its series of the same
    /// dimensions, other values, inside the change's scope.
    fn rest_of(&self, change_id: &str, metric: usize, si: usize) -> Option<Vec<usize>> {
        let change = self.registry.get(change_id)?;
        let g = self.latest_guard(change_id)?;
        let keys = |i: usize| self.series[i].dims.iter().map(|(k, _)| k);
        Some(
            g.metrics[metric]
                .in_scope
                .iter()
                .copied()
                .filter(|&i| i != si && keys(i).eq(keys(si)))
                .filter(|&i| crate::attribute::dims_within(&change.scope, &self.series[i].dims))
                .collect(),
        )
    }

    /// Relative effect against the forecast, and its standard error, of `series` summed over
    /// windows `from..=w` (as a guard's observational comparison sums them).
    fn effect_since(&self, series: &[usize], from: i64, w: i64) -> Option<RelEffect> {
        let mut o = Observational::default();
        for &i in series {
            for h in (from..=w).filter_map(|x| self.series[i].hist_at(x, w)) {
                o.windows += o.add(h.num as f64, h.den as f64, h.exp as f64, h.sd as f64) as u32;
            }
        }
        o.relative()
    }

    /// The most recent watch on a change (open or closed).
    pub(super) fn latest_guard(&self, change_id: &str) -> Option<&ChangeGuard> {
        if let Some(i) = self.guards.lookup(change_id) {
            return Some(&self.guards.all[i]);
        }
        self.guards
            .all
            .iter()
            .rev()
            .find(|g| g.change_id == change_id)
    }

    /// The metric a change is meant to move (its own `target_metric`, or its kind's in the
    /// policy), by index.
    pub(super) fn gain_target(&self, change_id: &str) -> Option<usize> {
        let ch = self.registry.get(change_id)?;
        let target = ch.target_metric.clone().or_else(|| {
            ch.kind
                .as_ref()
                .and_then(|k| self.cfg.policy.target_metrics.get(k).cloned())
        })?;
        self.schema.metrics.iter().position(|m| m.name() == target)
    }

    /// The latest watch's effect of `change_id` on metric `ti`: relative effect, its 95%
    /// interval, and by which comparison.
    pub(super) fn target_effect(&self, change_id: &str, ti: usize) -> Option<GainEffect> {
        let g = self.latest_guard(change_id)?;
        let w = &g.metrics[ti];
        match w.comparison.as_ref().filter(|_| !g.srm_flagged) {
            Some(c) => Some((c.relative, c.rel_ci_low, c.rel_ci_high, true)),
            None => {
                let (r, l, h) = w.observational.effect()?;
                Some((r, l, h, false))
            }
        }
    }

    /// "Local gain, global loss": the change's target metric improved (interval clear of zero)
    /// while `metric` worsened by `effect` (relative, with its 95% half-width).
    fn local_gain(
        &self,
        change_id: &str,
        metric: usize,
        effect: (f64, f64),
    ) -> Option<serde_json::Value> {
        let ti = self.gain_target(change_id)?;
        if ti == metric {
            return None;
        }
        self.gain_json(ti, self.target_effect(change_id, ti)?, metric, effect)
    }

    /// The "local gain, global loss" evidence, given the target's effect.
    pub(super) fn gain_json(
        &self,
        ti: usize,
        (rel, lo, hi, holdout): GainEffect,
        metric: usize,
        effect: (f64, f64),
    ) -> Option<serde_json::Value> {
        let how = if holdout {
            "treatment_vs_holdout"
        } else {
            "observational"
        };
        let improved = match self.schema.metrics[ti].cfg.direction {
            Direction::Drop => lo > 0.0,
            Direction::Spike => hi < 0.0,
            Direction::Both => false,
        };
        if !improved {
            return None;
        }
        let target = self.schema.metrics[ti].name();
        let gm = self.schema.metrics[metric].name();
        Some(json!({
            "target": {"metric": target, "effect": round3(rel), "ci95": [round3(lo), round3(hi)], "comparison": how},
            "guardrail": {"metric": gm, "effect": round3(effect.0),
                "ci95": [round3(effect.0 - effect.1), round3(effect.0 + effect.1)]},
            "summary": format!(
                "local gain, global loss: {target} {} ({}..{}, {how}) while {gm} {} ({}..{})",
                pct(rel), pct(lo), pct(hi), pct(effect.0), pct(effect.0 - effect.1), pct(effect.0 + effect.1)
            ),
        }))
    }

    /// Registers a new incident: audit of the detection, the firing alert, the policy decision
    /// and what it leads to. `effect` is the relative effect and its 95% half-width, for
    /// "local gain, global loss". Returns the incident's index.
    pub(super) fn raise(
        &mut self,
        mut inc: Incident,
        evidence: serde_json::Value,
        det_policy: serde_json::Value,
        effect: Option<(f64, f64)>,
    ) -> usize {
        let at = inc.detected_ms;
        if inc.group_id.is_empty() {
            inc.group_id = self.group_of(&inc);
        }
        let top = inc.candidates.first().cloned();
        let change = top.as_ref().and_then(|c| self.registry.get(&c.change_id));
        inc.change_owner = change.and_then(|c| c.owner.clone());
        if matches!(
            inc.kind,
            "srm" | "fragmentation" | "pressure" | "data_quality" | "drift"
        ) {
            let mut d = Decision::new(
                DecisionAction::Investigate,
                "investigate",
                match inc.kind {
                    "srm" => "the exposure split is broken: treatment/holdout comparisons of this change are not trustworthy and are suspended; check assignment, logging and bot filtering".into(),
                    "fragmentation" => "too many variants live on this surface: decide which to stop; guardrail does not roll back on sprawl".into(),
                    "data_quality" => "a tracking outage, not a business change: check the event pipeline; guardrail does not roll back on data quality".into(),
                    "drift" => "a drift, not a step: review whether the new level or mix is intended; guardrail does not roll back on drift".into(),
                    _ => "customers receive more messages than the cap: review send frequency; guardrail does not roll back on pressure".into(),
                },
            );
            d.change_id = top.as_ref().map(|c| c.change_id.clone());
            inc.decision = d;
        } else {
            let pending = top
                .as_ref()
                .map(|c| self.pending_rollbacks.contains_key(&c.change_id))
                .unwrap_or(false);
            let sev = self
                .schema
                .metrics
                .get(inc.metric_idx.unwrap_or(usize::MAX))
                .map(|m| m.cfg.severity)
                .unwrap_or(crate::config::Severity::Warning);
            inc.decision = policy::decide(&self.cfg.policy, top.as_ref(), change, pending, at, sev);
            if let Some(t) = &top {
                policy::close_call(
                    &mut inc.decision,
                    t,
                    inc.candidates.get(1),
                    &self.cfg.attribution,
                    at + self.cfg.policy.escalate_after_secs as i64 * 1000,
                );
            }
            let vetoed = inc
                .decision
                .change_id
                .as_ref()
                .and_then(|c| self.vetoed.get(c));
            if let (Some(why), true) = (
                vetoed,
                inc.decision.action.is_open()
                    || inc.decision.action == DecisionAction::RollbackRequested,
            ) {
                inc.decision.action = DecisionAction::Vetoed;
                inc.decision.set_deadline(None);
                inc.decision.reason =
                    format!("{why}; this incident is recorded against the veto, not acted on");
            }
        }
        // With two stages the change's target metric may be merged by another instance: its
        // effect is asked of that one, as of the window one instance would have read it in.
        let mut gain_wait = None;
        if let (Some(t), Some(mi), Some(e)) = (&top, inc.metric_idx, effect) {
            match self.gain_target(&t.change_id) {
                Some(ti) if ti != mi && !self.owns_metric(ti) => {
                    gain_wait = Some((t.change_id.clone(), ti, e))
                }
                _ => inc.local_gain_global_loss = self.local_gain(&t.change_id, mi, e),
            }
        }
        let id = inc.id.clone();
        let idx = self.incidents.len();
        self.incidents.push(inc);
        self.incident_ids.insert(id.clone(), idx);
        self.dirty = true;
        self.stats.alerts_firing += 1;
        *self
            .stats
            .incidents_by_kind
            .entry(self.incidents[idx].kind)
            .or_default() += 1;
        let mut evidence = evidence;
        if let (Some(lg), Some(o)) = (
            &self.incidents[idx].local_gain_global_loss,
            evidence.as_object_mut(),
        ) {
            o.insert("local_gain_global_loss".into(), lg.clone());
        }
        match gain_wait {
            Some((change_id, ti, e)) => {
                // One instance reads a watch after closing the window before a series' alarm,
                // and after closing the alarm's own window for a watch's breach.
                let dw = at.div_euclid(self.schema.window_ms) - 1;
                let upto = if self.incidents[idx].kind == "guardrail_breach" {
                    dw
                } else {
                    dw - 1
                };
                self.incidents[idx].held = Some(Box::new(Held {
                    gain: Some((e, ti, evidence.to_string(), det_policy.to_string())),
                    since_ms: self.last_event_wall_ms,
                    ..Held::default()
                }));
                self.ask_gain(idx, &change_id, ti, upto);
            }
            None => self.audit_detection(idx, evidence, det_policy),
        }
        if matches!(self.stage, super::Stage::Merge { .. })
            && self.incidents[idx].decision.action == DecisionAction::RollbackRequested
        {
            // With two stages, whether this is the change's first rollback is the decider's to
            // say: the alert and the decision's record wait for its answer, so that they say
            // what one instance's would (see `Engine::publish_held`).
            let since_ms = self.last_event_wall_ms;
            self.incidents[idx]
                .held
                .get_or_insert_with(|| {
                    Box::new(Held {
                        since_ms,
                        ..Held::default()
                    })
                })
                .decider = true;
            self.act_automatically(idx, at);
            return idx;
        }
        if self.incidents[idx].held.is_some() {
            return idx;
        }
        self.publish_decision(idx);
        if self.incidents[idx].decision.action == DecisionAction::RollbackRequested {
            self.act_automatically(idx, at);
        }
        idx
    }

    /// The group of a new incident: its top candidate change's when that candidate is a
    /// credible one (score at least `attribution.min_score_to_act`); otherwise that of a firing
    /// incident whose onset set meets this one's (widened by the window and the clock skew), on
    /// a nested series of the same metric (the total and a segment) or the same segment of
    /// another metric: the echo of a segment's shift in the total joins the segment's group
    /// (a vague onset of one metric's total does not swallow other metrics' shifts). Else a
    /// group of its own.
    fn group_of(&self, inc: &Incident) -> String {
        if let Some(top) = inc
            .candidates
            .first()
            .filter(|c| c.score >= self.cfg.attribution.min_score_to_act)
        {
            return self.change_group(&top.change_id);
        }
        let slack = self.schema.window_ms + self.cfg.attribution.clock_skew_secs as i64 * 1000;
        let span = |i: &Incident| {
            (
                i.onset_low_ms.unwrap_or(i.onset_ms),
                i.onset_high_ms.unwrap_or(i.onset_ms),
            )
        };
        let (lo, hi) = span(inc);
        let dims = |i: &Incident| i.series_idx.map(|si| &self.series[si].dims);
        let nested = |a: &[(String, String)], b: &[(String, String)]| {
            a.iter().all(|d| b.contains(d)) || b.iter().all(|d| a.contains(d))
        };
        let mine = dims(inc);
        for o in self.incidents.iter().rev() {
            if o.status != IncidentStatus::Firing || o.group_id.is_empty() {
                continue;
            }
            let (olo, ohi) = span(o);
            if olo > hi + slack || lo > ohi + slack {
                continue;
            }
            let related = match (mine, dims(o)) {
                (Some(a), Some(b)) if o.metric_idx == inc.metric_idx => nested(a, b),
                (Some(a), Some(b)) => a == b,
                _ => false,
            };
            if related {
                return o.group_id.clone();
            }
        }
        stable_id("grp-", &[&inc.id])
    }

    /// The group of the incidents blamed on a change (as applied now).
    fn change_group(&self, change_id: &str) -> String {
        let applied = self
            .registry
            .get(change_id)
            .and_then(|c| c.applied_ms)
            .unwrap_or(0);
        stable_id("grp-", &[change_id, &applied.to_string()])
    }

    /// The record of incident `idx`'s detection.
    pub(super) fn audit_detection(
        &mut self,
        idx: usize,
        evidence: serde_json::Value,
        det_policy: serde_json::Value,
    ) {
        let inc = &self.incidents[idx];
        let (id, suspect) = (inc.id.clone(), inc.decision.change_id.clone());
        self.audit(
            Some(&id),
            suspect.as_deref(),
            "detection",
            Actor::system("detector"),
            evidence,
            det_policy,
        );
    }

    /// A new incident's firing alert, and the record of its decision.
    pub(super) fn publish_decision(&mut self, idx: usize) {
        let alert = self.alert_for(idx);
        self.outputs.push(Output::Alert(Box::new(alert)));
        let d = self.incidents[idx].decision.clone();
        *self
            .stats
            .decisions
            .entry((
                d.action.as_str(),
                d.tier.map(Tier::as_str).unwrap_or("none"),
            ))
            .or_default() += 1;
        let inc = &self.incidents[idx];
        let action = match d.action {
            DecisionAction::NeedsHumanDecision | DecisionAction::AwaitingVetoWindow => {
                "human_decision_requested"
            }
            _ => "policy_evaluation",
        };
        let (id, cands, segs) = (
            inc.id.clone(),
            inc.candidates.clone(),
            inc.top_segments.clone(),
        );
        self.audit(
            Some(&id),
            d.change_id.as_deref(),
            action,
            Actor::system("policy"),
            json!({
                "decision": d.action.as_str(), "reason": d.reason, "deadline": d.deadline,
                "candidate_changes": cands, "top_segments": segs,
            }),
            json!({
                "rule": d.policy, "tier": d.tier.map(Tier::as_str), "shadow_mode": d.shadow,
            }),
        );
    }

    /// An automatic rollback, unless the circuit breaker is open: then guardrail stops, asks a
    /// human and says why.
    pub(super) fn act_automatically(&mut self, idx: usize, at: i64) {
        let Some(change_id) = self.incidents[idx].decision.change_id.clone() else {
            return;
        };
        // With two stages the decider applies the breaker to the whole group's rollbacks.
        if !matches!(self.stage, super::Stage::Merge { .. }) {
            if let Some((why, counts)) = self.breaker_reason(&change_id, at) {
                self.trip_breaker(idx, at, &change_id, &why, counts);
                return;
            }
        }
        let rule = self.incidents[idx].decision.policy.clone();
        self.request_rollback(
            idx,
            at,
            Actor {
                kind: "policy".into(),
                name: rule,
            },
        );
    }

    /// The circuit breaker stops an automatic rollback: guardrail asks a human, says why, and
    /// pages again.
    pub(super) fn trip_breaker(
        &mut self,
        idx: usize,
        at: i64,
        change_id: &str,
        why: &str,
        counts: serde_json::Value,
    ) {
        self.stats.breaker_trips += 1;
        let esc = self.cfg.policy.escalate_after_secs as i64 * 1000;
        let inc = &mut self.incidents[idx];
        inc.decision.action = DecisionAction::BreakerOpen;
        inc.decision.reason = format!(
            "circuit breaker open: {why}; guardrail stopped acting on its own and asks a human to approve or veto the rollback of {change_id}"
        );
        inc.decision.set_deadline(Some(at + esc));
        inc.severity = "critical";
        let id = inc.id.clone();
        let reason = inc.decision.reason.clone();
        self.audit(
            Some(&id),
            Some(change_id),
            "circuit_breaker",
            Actor::system("circuit-breaker"),
            json!({"reason": reason, "recent_automatic_rollbacks": counts}),
            json!({
                "max_auto_rollbacks_per_hour": self.cfg.policy.max_auto_rollbacks_per_hour,
                "max_auto_rollbacks_per_hour_per_surface": self.cfg.policy.max_auto_rollbacks_per_hour_per_surface,
            }),
        );
        // Page: the incident's alert again, critical, with the breaker's reason.
        let alert = self.alert_for(idx);
        self.outputs.push(Output::Alert(Box::new(alert)));
    }

    /// Why the breaker forbids another automatic rollback of `change_id` at `at`, if it does.
    pub(super) fn breaker_reason(
        &mut self,
        change_id: &str,
        at: i64,
    ) -> Option<(String, serde_json::Value)> {
        while self
            .auto_rollbacks
            .front()
            .map(|(t, _)| *t <= at - HOUR_MS)
            .unwrap_or(false)
        {
            self.auto_rollbacks.pop_front();
        }
        let p = &self.cfg.policy;
        let n = self.auto_rollbacks.len() as u32;
        let surfaces = self.change_surfaces(change_id);
        let counts = json!({"last_hour": n, "by_surface": surfaces.iter().map(|s| {
            (s.clone(), json!(self.auto_rollbacks.iter().filter(|(_, ss)| ss.contains(s)).count()))
        }).collect::<serde_json::Map<_, _>>()});
        if n >= p.max_auto_rollbacks_per_hour {
            return Some((
                format!(
                    "{n} automatic rollbacks in the last hour (limit {})",
                    p.max_auto_rollbacks_per_hour
                ),
                counts,
            ));
        }
        for s in &surfaces {
            let k = self
                .auto_rollbacks
                .iter()
                .filter(|(_, ss)| ss.contains(s))
                .count() as u32;
            if k >= p.max_auto_rollbacks_per_hour_per_surface {
                return Some((
                    format!(
                        "{k} automatic rollbacks on surface {s} in the last hour (limit {} per surface)",
                        p.max_auto_rollbacks_per_hour_per_surface
                    ),
                    counts,
                ));
            }
        }
        None
    }

    /// Whether the breaker would stop an automatic rollback now (any surface at its limit).
    pub fn breaker_open(&self) -> bool {
        let at = self.clock_ms();
        let recent: Vec<&(i64, Vec<String>)> = self
            .auto_rollbacks
            .iter()
            .filter(|(t, _)| *t > at - HOUR_MS)
            .collect();
        let p = &self.cfg.policy;
        if recent.len() as u32 >= p.max_auto_rollbacks_per_hour {
            return true;
        }
        let mut per: HashMap<&str, u32> = HashMap::new();
        for (_, ss) in &recent {
            for s in ss {
                *per.entry(s.as_str()).or_default() += 1;
            }
        }
        per.values()
            .any(|&k| k >= p.max_auto_rollbacks_per_hour_per_surface)
    }

    /// Decisions waiting on a person or a veto window, by tier.
    pub fn pending_decisions(&self) -> [(Tier, usize); 3] {
        let mut out = [
            (Tier::Human, 0),
            (Tier::Supervised, 0),
            (Tier::Autonomous, 0),
        ];
        for i in self
            .incidents
            .iter()
            .filter(|i| i.status == IncidentStatus::Firing && i.decision.action.is_open())
        {
            let t = i.decision.tier.unwrap_or(Tier::Human);
            if let Some(x) = out.iter_mut().find(|(k, _)| *k == t) {
                x.1 += 1;
            }
        }
        out
    }

    /// While input is silent (no event for [`IDLE_GRACE_MS`] of wall time), event time is taken
    /// to move on with the wall clock for decisions only, so that a veto window or an
    /// escalation does not wait for traffic to resume. Windows are not closed by this: their
    /// data may still arrive. Called by the service on a timer.
    pub fn advance_idle(&mut self, now_wall_ms: i64) {
        let (Some(t), true) = (self.max_ts, self.last_event_wall_ms > i64::MIN) else {
            return;
        };
        let idle = now_wall_ms - self.last_event_wall_ms;
        if idle > IDLE_GRACE_MS {
            self.run_deadlines(t + idle);
        }
    }

    /// Veto windows that ended and escalations that are due, at event time `now`.
    pub(super) fn run_deadlines(&mut self, now: i64) {
        let due: Vec<usize> = self
            .incidents
            .iter()
            .enumerate()
            .filter(|(_, i)| {
                i.status == IncidentStatus::Firing
                    && i.decision.deadline_ms.map(|d| d <= now).unwrap_or(false)
            })
            .map(|(k, _)| k)
            .collect();
        for idx in due {
            let d = self.incidents[idx].decision.clone();
            let id = self.incidents[idx].id.clone();
            self.incidents[idx].decision.set_deadline(None);
            self.dirty = true;
            match d.action {
                DecisionAction::AwaitingVetoWindow => {
                    let change = d.change_id.clone().unwrap_or_default();
                    let in_force = self
                        .registry
                        .get(&change)
                        .map(|c| c.in_force_at(now))
                        .unwrap_or(false);
                    let pending = self.pending_rollbacks.contains_key(&change);
                    let inc = &mut self.incidents[idx];
                    let (action, reason) = if !in_force {
                        (
                            DecisionAction::ChangeNotInForce,
                            format!("veto window ended; {change} is no longer in force"),
                        )
                    } else if pending {
                        (
                            DecisionAction::RollbackAlreadyRequested,
                            format!("veto window ended; rollback of {change} already requested"),
                        )
                    } else if d.shadow {
                        (DecisionAction::ShadowRollback, format!("veto window ended without a veto: would request rollback of {change} (shadow mode)"))
                    } else {
                        (
                            DecisionAction::RollbackRequested,
                            format!(
                                "veto window ended without a veto: rollback of {change} requested"
                            ),
                        )
                    };
                    inc.decision.action = action;
                    inc.decision.reason = reason.clone();
                    self.audit(
                        Some(&id),
                        Some(&change),
                        "veto_window_elapsed",
                        Actor::system("policy"),
                        json!({"decision": action.as_str(), "reason": reason, "deadline": d.deadline}),
                        json!({"rule": d.policy, "tier": "supervised", "shadow_mode": d.shadow}),
                    );
                    *self
                        .stats
                        .decisions
                        .entry((action.as_str(), "supervised"))
                        .or_default() += 1;
                    if action == DecisionAction::RollbackRequested {
                        self.act_automatically(idx, now);
                    }
                }
                DecisionAction::NeedsHumanDecision | DecisionAction::BreakerOpen => {
                    if d.acknowledged_by.is_some() || d.escalated {
                        continue;
                    }
                    let inc = &mut self.incidents[idx];
                    let from = inc.severity;
                    inc.severity = match from {
                        "info" => "warning",
                        _ => "critical",
                    };
                    inc.decision.escalated = true;
                    let to = inc.severity;
                    self.stats.escalations += 1;
                    self.audit(
                        Some(&id),
                        d.change_id.as_deref(),
                        "escalation",
                        Actor::system("policy"),
                        json!({"reason": format!("no approval, veto or acknowledgement by {}", d.deadline.clone().unwrap_or_default()),
                            "severity_from": from, "severity_to": to}),
                        json!({"rule": d.policy, "escalate_after_secs": self.cfg.policy.escalate_after_secs}),
                    );
                    // A silenced incident escalates in its record, but does not page again.
                    if self.incidents[idx]
                        .silenced_until_ms
                        .is_some_and(|u| u > now)
                    {
                        continue;
                    }
                    let alert = self.alert_for(idx);
                    self.outputs.push(Output::Alert(Box::new(alert)));
                }
                _ => {}
            }
        }
    }

    /// A person's call on an incident's decision (from the API).
    pub fn control(&mut self, call: &DecisionCall) -> Result<Outcome, ControlError> {
        let idx = *self
            .incident_ids
            .get(&call.incident_id)
            .ok_or_else(|| ControlError::NotFound(call.incident_id.clone()))?;
        let now = self.clock_ms();
        let who = human(&call.principal.name, &call.principal.role);
        let d = self.incidents[idx].decision.clone();
        let firing = self.incidents[idx].status == IncidentStatus::Firing;
        let change = d.change_id.clone();
        let reason = call.reason.clone();
        let base_evidence = |extra: serde_json::Value| {
            let mut e = json!({"role": call.principal.role, "reason": reason,
                "decision_before": d.action.as_str()});
            if let (Some(o), Some(x)) = (e.as_object_mut(), extra.as_object()) {
                o.extend(x.clone());
            }
            e
        };
        let (audit_action, message) = match call.verb {
            Verb::Approve | Verb::Veto if !d.action.is_open() => {
                return Err(ControlError::Conflict(match d.action {
                    DecisionAction::RollbackRequested
                    | DecisionAction::RollbackAlreadyRequested => format!(
                        "the rollback of {} was already requested; nothing left to {}",
                        change.unwrap_or_default(),
                        call.verb.as_str()
                    ),
                    DecisionAction::Vetoed => "already vetoed".to_string(),
                    a => format!(
                        "nothing to {}: the decision is {}",
                        call.verb.as_str(),
                        a.as_str()
                    ),
                }));
            }
            Verb::Approve => {
                let ch = change.clone().unwrap_or_default();
                if !self
                    .registry
                    .get(&ch)
                    .map(|c| c.in_force_at(now))
                    .unwrap_or(false)
                {
                    return Err(ControlError::Conflict(format!(
                        "{ch} is no longer in force; nothing to roll back"
                    )));
                }
                self.record_human_decision(idx, now);
                let inc = &mut self.incidents[idx];
                inc.decision.set_deadline(None);
                inc.decision.decided_by = Some(who.clone());
                let shadow = d.shadow;
                inc.decision.reason = format!(
                    "approved by {}{}",
                    who.name,
                    call.reason
                        .as_ref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
                let id = self.audit(
                    Some(&call.incident_id),
                    Some(&ch),
                    "approval",
                    who.clone(),
                    base_evidence(json!({"shadow_mode": shadow})),
                    json!({"rule": d.policy, "tier": d.tier.map(Tier::as_str)}),
                );
                if shadow {
                    self.incidents[idx].decision.action = DecisionAction::ShadowRollback;
                } else if self.pending_rollbacks.contains_key(&ch) {
                    self.incidents[idx].decision.action = DecisionAction::RollbackAlreadyRequested;
                } else {
                    self.incidents[idx].decision.action = DecisionAction::RollbackRequested;
                    self.request_rollback(idx, now, who.clone());
                    let why = format!(
                        "rollback of {ch} approved by {} on {}",
                        who.name, call.incident_id
                    );
                    self.settle_siblings(idx, &ch, DecisionAction::RollbackAlreadyRequested, &why);
                }
                self.dirty = true;
                return Ok(self.outcome(
                    idx,
                    call.verb,
                    id,
                    format!("approved: {}", self.incidents[idx].decision.action.as_str()),
                ));
            }
            Verb::Veto => {
                self.record_human_decision(idx, now);
                let inc = &mut self.incidents[idx];
                inc.decision.action = DecisionAction::Vetoed;
                inc.decision.set_deadline(None);
                inc.decision.decided_by = Some(who.clone());
                inc.decision.reason = format!(
                    "vetoed by {}{}: {} stays",
                    who.name,
                    call.reason
                        .as_ref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default(),
                    change.clone().unwrap_or_default()
                );
                let why = inc.decision.reason.clone();
                if let Some(ch) = &change {
                    self.vetoed.insert(ch.clone(), why.clone());
                    self.settle_siblings(idx, ch, DecisionAction::Vetoed, &why);
                    self.tell_decider_veto(ch, &why);
                }
                ("veto", "vetoed: no rollback will be requested".to_string())
            }
            Verb::Acknowledge | Verb::Silence => {
                if !firing {
                    return Err(ControlError::Conflict("the incident is resolved".into()));
                }
                let inc = &mut self.incidents[idx];
                inc.decision.acknowledged_by = Some(who.clone());
                // Acknowledging stops escalation; it does not stop a veto window.
                if matches!(
                    d.action,
                    DecisionAction::NeedsHumanDecision | DecisionAction::BreakerOpen
                ) {
                    inc.decision.set_deadline(None);
                }
                if call.verb == Verb::Silence {
                    // Bounded by the API; saturating anyway, since it comes from the network.
                    let secs = call
                        .silence_secs
                        .unwrap_or(3600)
                        .min(i64::MAX as u64 / 1000) as i64;
                    inc.silenced_until_ms = Some(now.saturating_add(secs * 1000));
                    (
                        "silence",
                        format!("silenced for {}", human_duration(secs * 1000)),
                    )
                } else {
                    (
                        "acknowledgement",
                        "acknowledged: escalation stopped".to_string(),
                    )
                }
            }
        };
        self.dirty = true;
        let extra = match call.verb {
            Verb::Silence => json!({"silence_secs": call.silence_secs.unwrap_or(3600)}),
            _ => json!({}),
        };
        let id = self.audit(
            Some(&call.incident_id),
            change.as_deref(),
            audit_action,
            who,
            base_evidence(extra),
            json!({"rule": d.policy, "tier": d.tier.map(Tier::as_str)}),
        );
        Ok(self.outcome(idx, call.verb, id, message))
    }

    /// A person decided for a change: other open decisions on it follow.
    fn settle_siblings(&mut self, idx: usize, change: &str, action: DecisionAction, why: &str) {
        for (k, o) in self.incidents.iter_mut().enumerate() {
            if k != idx
                && o.status == IncidentStatus::Firing
                && o.decision.action.is_open()
                && o.decision.change_id.as_deref() == Some(change)
            {
                o.decision.action = action;
                o.decision.set_deadline(None);
                o.decision.reason = why.to_string();
            }
        }
    }

    fn record_human_decision(&mut self, idx: usize, now: i64) {
        let secs = (now - self.incidents[idx].detected_ms).max(0) as f64 / 1000.0;
        self.stats.human_decision_secs.push(secs);
    }

    fn outcome(&mut self, idx: usize, verb: Verb, audit_id: String, message: String) -> Outcome {
        *self.stats.human_calls.entry(verb.as_str()).or_default() += 1;
        let inc = &self.incidents[idx];
        Outcome {
            incident_id: inc.id.clone(),
            verb,
            audit_id,
            decision: inc.decision.clone(),
            message,
        }
    }

    /// Every audit record about one change and the incidents blamed on it, in order.
    pub fn change_audit(&self, change_id: &str) -> Vec<AuditRecord> {
        crate::audit::select(self.audit_log.iter(), change_id, |r| {
            (r.incident_id.as_deref(), r.change_id.as_deref())
        })
        .into_iter()
        .cloned()
        .collect()
    }

    /// Opens a watch when a change is applied; closes it when the change ends.
    pub(super) fn change_guards_on(&mut self, c: &Change) {
        match c.action {
            ChangeAction::Applied => {
                let Some(st) = self.registry.get(&c.change_id) else {
                    return;
                };
                // A rollout step of a change in force: its watch (and holdout comparison) and
                // any veto carry on.
                if st.applied_ms != Some(c.ts) {
                    return;
                }
                // Applied again: a new decision, not bound by an old veto.
                self.vetoed.remove(&c.change_id);
                let g = ChangeGuard::new(
                    st,
                    c.ts,
                    self.cfg.guards.watch_secs as i64 * 1000,
                    self.schema.metrics.len(),
                );
                let ev = json!({
                    "watch_until": fmt_time(g.closes_ms),
                    "metrics": self.schema.metrics.iter().map(|m| m.name()).collect::<Vec<_>>(),
                    "holdout": g.holdout, "scope": st.scope, "kind": st.kind,
                    "tier": st.effective_tier(&self.cfg.policy).as_str(),
                    "comparison": if g.holdout.is_some() { "treatment_vs_holdout" } else { "observational" },
                });
                self.guards.open(g);
                if !self.owns_change(&c.change_id) {
                    return;
                }
                self.audit(
                    None,
                    Some(&c.change_id),
                    "guard_opened",
                    c.actor.clone(),
                    ev,
                    json!({"alpha": self.cfg.guards.alpha, "srm_alpha": self.cfg.guards.srm_alpha,
                        "watch_secs": self.cfg.guards.watch_secs}),
                );
            }
            ChangeAction::RolledBack | ChangeAction::Superseded => {
                let how = if c.action == ChangeAction::RolledBack {
                    "rolled back"
                } else {
                    "superseded"
                };
                if let Some(gi) = self.guards.lookup(&c.change_id) {
                    self.close_guard(gi, c.ts, &format!("change {how}"));
                }
            }
        }
    }

    /// Ends a watch: the verdict per metric, and its open guard incidents resolve.
    fn close_guard(&mut self, gi: usize, at: i64, why: &str) {
        self.guards.close(gi);
        let g = &self.guards.all[gi];
        let mut verdicts: Vec<(usize, serde_json::Value)> = Vec::new();
        for (mi, w) in g.metrics.iter().enumerate() {
            let v = if w.breached {
                "breached"
            } else if let Some(c) = &w.comparison {
                if g.srm_flagged {
                    "untrustworthy_split"
                } else if c.harmful {
                    "breached"
                } else {
                    "passed"
                }
            } else if w.observational.windows > 0 {
                "passed_observational"
            } else {
                "no_data"
            };
            let mut e = json!({"verdict": v});
            if let Some(c) = &w.comparison {
                e["treatment_vs_holdout"] = json!(c.evidence());
            }
            if let Some((r, lo, hi)) = w.observational.effect() {
                e["observational"] = json!({"effect": round3(r), "ci95": [round3(lo), round3(hi)],
                    "windows": w.observational.windows, "coverage": w.coverage});
            }
            verdicts.push((mi, e));
        }
        let (change_id, opened_ms) = (g.change_id.clone(), g.opened_ms);
        match self.stage {
            super::Stage::Merge { partitions } => {
                // Each metric's verdict is its owner's: they gather on the change's partition.
                let own = self.change_partition(&change_id, partitions);
                for x in self
                    .metric_partitions()
                    .into_iter()
                    .filter(|x| self.owned.contains(x))
                {
                    let metrics = verdicts
                        .iter()
                        .filter(|(mi, _)| self.metric_part[*mi] == x)
                        .map(|(mi, e)| (self.schema.metrics[*mi].name().to_string(), e.to_string()))
                        .collect();
                    self.outputs
                        .push(Output::Partial(Box::new(crate::repartition::Routed {
                            partition: own,
                            key: change_id.clone(),
                            partial: crate::repartition::Partial::WatchClosed {
                                change_id: change_id.clone(),
                                opened_ms,
                                part: x,
                                at_ms: at,
                                why: why.to_string(),
                                metrics,
                            },
                        })));
                }
            }
            _ => {
                let metrics = verdicts
                    .into_iter()
                    .map(|(mi, e)| (self.schema.metrics[mi].name().to_string(), e))
                    .collect();
                self.write_watch_closed(&change_id, at, why, metrics);
            }
        }
        let open: Vec<usize> = self
            .incidents
            .iter()
            .enumerate()
            .filter(|(_, i)| {
                i.status == IncidentStatus::Firing
                    && i.series_idx.is_none()
                    && matches!(i.kind, "guardrail_breach" | "srm")
                    && i.series.get("change_id").and_then(|v| v.as_str())
                        == Some(change_id.as_str())
            })
            .map(|(k, _)| k)
            .collect();
        for idx in open {
            self.resolve_incident(
                idx,
                at,
                format!("the watch on {change_id} ended: {why}"),
                json!({"rule": "guard-closed"}),
            );
        }
    }

    /// After window `w`: every open watch takes the window's in-scope observations, checks its
    /// split and compares treatment with holdout.
    /// With `only`, the window is closed late for those metrics (taken over behind this
    /// engine): their sums and tests only; splits and watch ends were judged when it closed.
    pub(super) fn close_guards(&mut self, w: i64, only: Option<&[bool]>) -> Vec<String> {
        if self.guards.open.is_empty() {
            return Vec::new();
        }
        let wm = self.schema.window_ms;
        let (start, end) = (w * wm, (w + 1) * wm);
        let mut open: Vec<usize> = self.guards.open.values().copied().collect();
        open.sort_unstable();
        let list: Vec<crate::guard::SeriesScope<'_>> = self
            .series
            .iter()
            .map(|s| {
                (
                    s.metric,
                    s.dims.as_slice(),
                    self.schema.metrics[s.metric]
                        .cfg
                        .numerator
                        .surface
                        .as_deref(),
                )
            })
            .collect();
        let msprt = MsprtConfig {
            alpha: self.cfg.guards.alpha,
            tau_rel: self.cfg.guards.mixture_relative_effect,
        };
        let mut breaches: Vec<(usize, usize)> = Vec::new();
        let mut srms: Vec<usize> = Vec::new();
        let mut closing: Vec<usize> = Vec::new();
        // Two stages: this engine decides the metrics it merges, from the exposure read with them.
        let owned: Vec<bool> = (0..self.schema.metrics.len())
            .map(|mi| self.owns_metric(mi) && only.map_or(true, |o| o[mi]))
            .collect();
        for &gi in &open {
            let exposure: Vec<[f64; 2]> = (0..self.schema.metrics.len())
                .map(|mi| self.guard_exposure(gi, Some(mi)))
                .collect();
            let split = self.guard_exposure(gi, None);
            let g = &mut self.guards.all[gi];
            if let Some(ch) = self.registry.get(&g.change_id) {
                g.rescope(ch, &list);
            }
            let watching = start >= g.opened_ms;
            for (mi, mw) in g.metrics.iter_mut().enumerate() {
                let m = &self.schema.metrics[mi];
                if !owned[mi] {
                    continue;
                }
                if watching {
                    let mut any = false;
                    for &si in &mw.in_scope {
                        if let Some(h) = self.series[si].hist_at(w, w) {
                            let o = &mut mw.observational;
                            any |= o.add(h.num as f64, h.den as f64, h.exp as f64, h.sd as f64);
                        }
                    }
                    mw.observational.windows += any as u32;
                }
                if m.cfg.kind == MetricKind::Distinct {
                    continue;
                }
                let arm = |a: usize| -> ArmStats {
                    let mut x = mw.arms[a];
                    if m.per_window {
                        // A count without exposure: per exposure event of the arm.
                        x.den = exposure[mi][a];
                    }
                    x
                };
                let (t, h) = (arm(TREATMENT), arm(HOLDOUT));
                if t.den < MIN_ARM_VOLUME || h.den < MIN_ARM_VOLUME {
                    continue;
                }
                let sides: &[Side] = match m.cfg.direction {
                    Direction::Drop => &[Side::Down],
                    Direction::Spike => &[Side::Up],
                    Direction::Both => &[Side::Down, Side::Up],
                };
                let mut best: Option<seqtest::Comparison> = None;
                for &side in sides {
                    if let Some(c) = seqtest::compare(m.family, side, &t, &h, &msprt) {
                        if best.map(|b| c.log_lambda > b.log_lambda).unwrap_or(true) {
                            best = Some(c);
                        }
                    }
                }
                mw.comparison = best;
                if let Some(c) = best {
                    if c.harmful && !mw.breached && !g.srm_flagged {
                        breaches.push((gi, mi));
                    }
                }
            }
            if only.is_some() {
                continue;
            }
            if let Some(q) = g.holdout {
                g.srm = seqtest::srm(
                    split[TREATMENT],
                    split[HOLDOUT],
                    q,
                    self.cfg.guards.srm_alpha,
                );
                if g.srm.map(|s| s.mismatch).unwrap_or(false) && !g.srm_flagged {
                    srms.push(gi);
                }
            }
            if end >= g.closes_ms {
                closing.push(gi);
            }
        }
        // A broken split first: it makes this window's breaches untrustworthy.
        for gi in srms {
            self.raise_srm(gi, end);
        }
        for (gi, mi) in breaches {
            if !self.guards.all[gi].srm_flagged {
                self.raise_breach(gi, mi, w);
            }
        }
        for gi in closing {
            self.close_guard(gi, end, "the watch period ended");
        }
        open.iter()
            .map(|&gi| self.guards.all[gi].change_id.clone())
            .collect()
    }

    /// The watch's closing record: every metric's verdict, and the worst of them.
    fn write_watch_closed(
        &mut self,
        change_id: &str,
        at: i64,
        why: &str,
        verdicts: serde_json::Map<String, serde_json::Value>,
    ) {
        let mut worst = "passed";
        for e in verdicts.values() {
            match e["verdict"].as_str() {
                Some("breached") => worst = "breached",
                Some("untrustworthy_split") if worst == "passed" => worst = "untrustworthy_split",
                _ => {}
            }
        }
        let srm = self
            .latest_guard(change_id)
            .and_then(|g| g.srm)
            .map(|s| s.evidence());
        *self.stats.guard_verdicts.entry(worst).or_default() += 1;
        self.audit(
            None,
            Some(change_id),
            "guard_closed",
            Actor::system("guard"),
            json!({"verdict": worst, "why": why, "closed_at": fmt_time(at), "metrics": verdicts, "split": srm}),
            json!({"alpha": self.cfg.guards.alpha}),
        );
    }

    /// Stage 2, on the change's owner: one metric partition's verdicts on a closed watch. The
    /// closing record is written when every partition with a metric has reported (a report
    /// read again is ignored).
    pub(super) fn gather_watch_closed(
        &mut self,
        report: crate::guard::WatchReport,
    ) -> Result<(), Reject> {
        for (name, _) in &report.metrics {
            self.metric_named(name)?;
        }
        let part = report.parts[0];
        let k = match self
            .watch_reports
            .iter()
            .position(|r| r.change_id == report.change_id && r.opened_ms == report.opened_ms)
        {
            Some(k) if self.watch_reports[k].parts.contains(&part) => return Ok(()),
            Some(k) => {
                let r = &mut self.watch_reports[k];
                r.parts.push(part);
                r.metrics.extend(report.metrics);
                k
            }
            None => {
                self.watch_reports.push(report);
                self.watch_reports.len() - 1
            }
        };
        self.dirty = true;
        let r = &self.watch_reports[k];
        if !self.metric_part.iter().all(|x| r.parts.contains(x)) {
            return Ok(());
        }
        let r = self.watch_reports.swap_remove(k);
        let verdicts = r
            .metrics
            .into_iter()
            .map(|(m, e)| {
                (
                    m,
                    serde_json::from_str(&e).unwrap_or(serde_json::Value::Null),
                )
            })
            .collect();
        self.write_watch_closed(&r.change_id, r.at_ms, &r.why, verdicts);
        Ok(())
    }

    fn guard_incident(
        &self,
        gi: usize,
        metric: &str,
        kind: &'static str,
        severity: &'static str,
        detected_ms: i64,
    ) -> Incident {
        let g = &self.guards.all[gi];
        let id = stable_id(
            "inc-",
            &[metric, kind, &g.change_id, &g.opened_ms.to_string()],
        );
        let mut series = serde_json::Map::new();
        series.insert("change_id".into(), json!(g.change_id));
        let mut inc = Incident::blank(IncidentHead {
            id,
            metric: metric.to_string(),
            metric_idx: None,
            series_idx: None,
            label: format!("change_id={}", g.change_id),
            series,
            kind,
            severity,
            onset_ms: g.opened_ms,
            detected_ms,
        });
        inc.comparison = Some("treatment_vs_holdout");
        inc.delay_windows = (detected_ms - g.opened_ms).div_euclid(self.schema.window_ms);
        inc.candidates = vec![Candidate {
            change_id: g.change_id.clone(),
            score: 1.0,
            evidence: String::new(),
            reversal: false,
            within_scope: true,
            distance: 0,
        }];
        inc
    }

    fn raise_srm(&mut self, gi: usize, end: i64) {
        let g = &self.guards.all[gi];
        let Some(s) = g.srm else { return };
        if !self.owns_change(&g.change_id) {
            // Every owner distrusts the split alike; the change's owner raises the incident.
            self.guards.all[gi].srm_flagged = true;
            return;
        }
        let mut inc = self.guard_incident(gi, "exposure_split", "srm", "warning", end);
        let sd = (s.expected_holdout * (1.0 - s.expected_holdout)
            / (s.treatment + s.holdout).max(1.0))
        .sqrt();
        inc.observed = s.observed_holdout;
        inc.expected = s.expected_holdout;
        inc.expected_low = s.expected_holdout - self.schema.z99 * sd;
        inc.expected_high = s.expected_holdout + self.schema.z99 * sd;
        inc.effect = round3(s.observed_holdout / s.expected_holdout - 1.0);
        inc.score = round3(s.log_bayes_factor / s.threshold);
        inc.delay_events = s.treatment + s.holdout;
        inc.evidence = Some(s.evidence());
        inc.candidates[0].evidence = format!("the change's own split: {}", s.evidence());
        inc.comparison = None;
        self.guards.all[gi].srm_flagged = true;
        let ev = json!({"split": s, "evidence": s.evidence()});
        self.raise(
            inc,
            ev,
            json!({"test": "sequential-beta-binomial-srm", "alpha": self.cfg.guards.srm_alpha}),
            None,
        );
    }

    fn raise_breach(&mut self, gi: usize, mi: usize, w: i64) {
        let wm = self.schema.window_ms;
        let g = &self.guards.all[gi];
        let Some(c) = g.metrics[mi].comparison else {
            return;
        };
        let m = &self.schema.metrics[mi];
        let mut inc = self.guard_incident(
            gi,
            m.name(),
            "guardrail_breach",
            m.cfg.severity.as_str(),
            (w + 1) * wm,
        );
        let half = (c.ci_high - c.ci_low) / 2.0;
        let (tr, hr) = (c.treatment.rate(), c.holdout.rate());
        inc.metric_idx = Some(mi);
        inc.owner = m.cfg.owner.clone();
        inc.observed = tr;
        inc.expected = hr;
        inc.expected_low = hr - half;
        inc.expected_high = hr + half;
        inc.effect = round3(c.relative);
        inc.score = round3(c.log_lambda / c.threshold);
        inc.delay_events = c.treatment.den + c.holdout.den;
        inc.evidence = Some(format!("treatment vs holdout: {}", c.evidence()));
        inc.candidates[0].evidence = format!(
            "the change's own treatment vs holdout on {}: {}",
            m.name(),
            c.evidence()
        );
        if let Some(t) = m.total {
            let from = g.opened_ms.div_euclid(wm);
            inc.top_segments = self.top_segments(t, from, w);
        }
        let rel_half = ((c.rel_ci_high - c.rel_ci_low) / 2.0).abs();
        let ev = json!({
            "metric": m.name(), "comparison": "treatment_vs_holdout",
            "treatment": {"rate": tr, "num": c.treatment.num, "den": c.treatment.den},
            "holdout": {"rate": hr, "num": c.holdout.num, "den": c.holdout.den},
            "difference": c.diff, "relative": round3(c.relative),
            "ci": [c.ci_low, c.ci_high], "relative_ci": [round3(c.rel_ci_low), round3(c.rel_ci_high)],
            "log_lambda": c.log_lambda, "threshold": c.threshold, "evidence": c.evidence(),
        });
        self.guards.all[gi].metrics[mi].breached = true;
        self.raise(
            inc,
            ev,
            json!({"test": "msprt-half-normal-mixture", "alpha": self.cfg.guards.alpha,
                "mixture_relative_effect": self.cfg.guards.mixture_relative_effect}),
            Some((c.relative, rel_half)),
        );
    }

    /// A tracking outage on series `si` in window `w`: `what` (numerator or denominator events)
    /// stopped while `expected` were expected.
    pub(super) fn open_outage(&mut self, si: usize, w: i64, what: &'static str, expected: f64) {
        let wm = self.schema.window_ms;
        let s = &self.series[si];
        let m = &self.schema.metrics[s.metric];
        let onset_ms = w * wm;
        let id = stable_id(
            "inc-",
            &[m.name(), &s.label, "data_quality", &onset_ms.to_string()],
        );
        if self.incident_ids.contains_key(&id) {
            return;
        }
        let sel = match what {
            "numerator" => &m.cfg.numerator,
            _ => m
                .cfg
                .denominator
                .as_ref()
                .or(m.cfg.exposure.as_ref())
                .unwrap_or(&m.cfg.numerator),
        };
        let evidence = format!(
            "no `{}` events on {} since {} while ~{:.0} per window were expected{}: a tracking outage, not a business drop",
            sel.event_type,
            s.label,
            fmt_time(onset_ms),
            expected,
            if what == "numerator" {
                format!(" (the `{}` events that count them kept arriving)", m.cfg.denominator.as_ref().or(m.cfg.exposure.as_ref()).map(|d| d.event_type.as_str()).unwrap_or("exposure"))
            } else {
                String::new()
            }
        );
        let last = s.last;
        let mut inc =
            self.series_incident(si, id, "data_quality", "warning", onset_ms, (w + 1) * wm);
        inc.evidence = Some(evidence.clone());
        inc.expected = if last.expected.is_finite() {
            last.expected
        } else {
            0.0
        };
        inc.expected_low = if last.expected_low.is_finite() {
            last.expected_low
        } else {
            0.0
        };
        inc.expected_high = if last.expected_high.is_finite() {
            last.expected_high
        } else {
            0.0
        };
        inc.effect = -1.0;
        inc.score = 1.0;
        inc.delay_windows = 1;
        let ev = json!({"metric": inc.metric, "series": inc.series, "missing": what,
            "event_type": sel.event_type, "expected_per_window": expected, "evidence": evidence});
        let idx = self.raise(
            inc,
            ev,
            json!({"guard": "tracking-outage", "min_expected": DQ_MIN_EXPECTED}),
            None,
        );
        self.series[si].incident = Some(idx);
        self.series[si].detector.reset();
    }

    /// A sprawl or pressure incident on a surface, with the changes in force there as
    /// candidates.
    fn surface_incident(
        &self,
        metric: &str,
        kind: &'static str,
        surface: &str,
        onset_ms: i64,
        end: i64,
        severity: &'static str,
    ) -> Incident {
        let mut series = serde_json::Map::new();
        series.insert("surface".into(), json!(surface));
        let mut inc = Incident::blank(IncidentHead {
            id: stable_id("inc-", &[metric, kind, surface, &onset_ms.to_string()]),
            metric: metric.to_string(),
            metric_idx: None,
            series_idx: None,
            label: format!("surface={surface}"),
            series,
            kind,
            severity,
            onset_ms,
            detected_ms: end,
        });
        inc.delay_windows = (end - onset_ms).div_euclid(self.schema.window_ms);
        let dims = [("surface".to_string(), surface.to_string())];
        inc.candidates = self.point_candidates(&dims, None, end);
        inc
    }

    pub(super) fn check_sprawl(&mut self, end: i64) {
        let Some(sp) = self.sprawl.as_mut() else {
            return;
        };
        sp.prune(end);
        let (over, back) = sp.evaluate(end);
        let wms = sp.window_ms();
        for (key, idx) in back {
            self.sprawl
                .as_mut()
                .expect("sprawl")
                .set_incident(key, None);
            let n = self
                .sprawl
                .as_ref()
                .and_then(|s| s.previous(key))
                .map(|p| p.1)
                .unwrap_or(0);
            self.resolve_incident(
                idx,
                end,
                format!(
                    "back to {n} variants in the last {} (limit {})",
                    human_duration(wms),
                    self.cfg.guards.sprawl.max_variants_per_surface
                ),
                json!({"rule": "sprawl-window-under-limit"}),
            );
        }
        for f in over {
            let SprawlFinding {
                surface,
                variants,
                limit,
                window_start_ms,
                key,
            } = f;
            let sev = self.cfg.guards.sprawl.severity.as_str();
            let mut inc = self.surface_incident(
                "variation_sprawl",
                "fragmentation",
                &surface,
                window_start_ms,
                end,
                sev,
            );
            if self.incident_ids.contains_key(&inc.id) {
                continue;
            }
            let prev = self.sprawl.as_ref().and_then(|s| s.previous(key));
            inc.observed = variants as f64;
            inc.expected = limit as f64;
            inc.expected_low = 1.0;
            inc.expected_high = limit as f64;
            inc.effect = round3(variants as f64 / limit as f64 - 1.0);
            inc.score = round3(variants as f64 / limit as f64);
            inc.evidence = Some(format!(
                "{variants}{} distinct variants live on {surface} since {} (limit {limit} per {}){}",
                if variants > 4 * limit { "+" } else { "" },
                fmt_time(window_start_ms),
                human_duration(wms),
                prev.map(|(s, n)| format!("; {n} in the window from {}", fmt_time(s))).unwrap_or_default()
            ));
            let ev = json!({"surface": surface, "variants": variants, "limit": limit,
                "window_start": fmt_time(window_start_ms), "window_secs": wms / 1000,
                "evidence": inc.evidence});
            let idx = self.raise(inc, ev, json!({"guard": "variation-sprawl"}), None);
            self.sprawl
                .as_mut()
                .expect("sprawl")
                .set_incident(key, Some(idx));
        }
    }

    pub(super) fn check_pressure(&mut self, end: i64) {
        let Some(p) = self.pressure.as_mut() else {
            return;
        };
        p.prune(end);
        let (over, ended) = p.evaluate(end);
        for (key, idx) in ended {
            self.pressure
                .as_mut()
                .expect("pressure")
                .set_incident(key, None);
            self.resolve_incident(
                idx,
                end,
                "the day ended: the cap applies per day and starts again".into(),
                json!({"rule": "pressure-daily-cap"}),
            );
        }
        for f in over {
            let PressureFinding {
                surface,
                key,
                day_start_ms,
                today,
                yesterday,
                cap,
            } = f;
            let sev = self.cfg.guards.pressure.severity.as_str();
            let mut inc = self.surface_incident(
                "customer_pressure",
                "pressure",
                &surface,
                day_start_ms,
                end,
                sev,
            );
            if self.incident_ids.contains_key(&inc.id) {
                continue;
            }
            inc.observed = today.per_user();
            inc.expected = cap;
            inc.expected_low = 0.0;
            inc.expected_high = cap;
            inc.effect = round3(today.per_user() / cap - 1.0);
            inc.score = round3(today.per_user() / cap);
            inc.delay_events = today.messages;
            inc.evidence = Some(format!(
                "{:.2} messages per recipient on {surface} today ({:.0} messages to ~{:.0} recipients; cap {cap}); unsubscribes {:.0} ({:.2}% of recipients){}",
                today.per_user(),
                today.messages,
                today.recipients,
                today.unsubscribes,
                today.unsubscribe_rate() * 100.0,
                yesterday
                    .map(|y| format!(
                        " vs {:.2}% yesterday at {:.2} messages per recipient",
                        y.unsubscribe_rate() * 100.0,
                        y.per_user()
                    ))
                    .unwrap_or_default()
            ));
            let ev = json!({"surface": surface, "today": today, "yesterday": yesterday, "cap": cap,
                "evidence": inc.evidence});
            let idx = self.raise(inc, ev, json!({"guard": "customer-pressure"}), None);
            self.pressure
                .as_mut()
                .expect("pressure")
                .set_incident(key, Some(idx));
        }
    }
}
