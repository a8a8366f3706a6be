//! Drift: `share` metrics (a dimension's mix) tested against their baseline mix after every
//! window, slow drifts of a series' daily level, and their incidents.

use serde_json::json;

use super::*;
use crate::share::MixTest;

impl Engine {
    /// Closes window `w` of every share series: learn, test, open or resolve incidents.
    pub(super) fn close_shares(&mut self, w: i64, only: Option<&[bool]>) {
        if self.shares.is_empty() {
            return;
        }
        let wm = self.schema.window_ms;
        let hour = ((w * wm).rem_euclid(86_400_000) / 3_600_000) as usize;
        let windows_per_week = (7 * 86_400_000 / wm) as f64;
        let mut opened: Vec<(usize, MixTest)> = Vec::new();
        let mut resolved: Vec<(usize, &'static str)> = Vec::new();
        for i in 0..self.shares.len() {
            if self.foreign(i, true) {
                continue;
            }
            let mi = self.shares[i].metric;
            if only.is_some_and(|o| !o[mi]) {
                continue;
            }
            let m = &self.schema.metrics[mi];
            let alpha = m.det.false_alarms_per_series_week / windows_per_week;
            let min_psi = m.cfg.min_psi.unwrap_or(0.1);
            let in_incident = self.shares[i].incident.is_some();
            // Judge before learning: a suspicious window must not be learnt.
            let warm = self.shares[i].learnt >= m.det.warmup_windows;
            let s = &mut self.shares[i];
            let t = s.close(w, hour, !in_incident);
            let Some(t) = t.filter(|_| warm) else {
                continue;
            };
            let shifted = t.p_value < alpha && t.psi >= min_psi;
            match s.incident {
                Some(idx) => {
                    let normal = t.p_value > 0.01 || t.psi < min_psi / 2.0;
                    if s.calm_step(normal) {
                        resolved.push((i, "recovered"));
                    } else if (w + 1) * wm - self.incidents[idx].onset_ms
                        > m.det.incident_max_secs as i64 * 1000
                    {
                        resolved.push((i, "expired"));
                    }
                }
                None if shifted => opened.push((i, t)),
                None => {}
            }
        }
        for (i, how) in resolved {
            let Some(idx) = self.shares[i].incident.take() else {
                continue;
            };
            self.shares[i].reset_calm();
            let text = if how == "expired" {
                self.shares[i].relearn();
                "expired: the new mix is accepted as normal and learnt again".to_string()
            } else {
                "recovered: the mix matches its baseline again for a whole test span".to_string()
            };
            self.resolve_incident(
                idx,
                (w + 1) * wm,
                text,
                json!({"rule": "share-g-test", "calm_windows": crate::share::TEST_WINDOWS}),
            );
        }
        for (i, t) in opened {
            self.open_mix_drift(i, w, t);
        }
    }

    fn open_mix_drift(&mut self, i: usize, w: i64, t: MixTest) {
        let wm = self.schema.window_ms;
        let s = &self.shares[i];
        let m = &self.schema.metrics[s.metric];
        let cats = &self.share_cats[s.metric].names;
        let onset_ms = (w + 1 - crate::share::TEST_WINDOWS as i64).max(0) * wm;
        let id = stable_id(
            "inc-",
            &[m.name(), &s.label, "drift", &((w + 1) * wm).to_string()],
        );
        let dim = m.cfg.share_of.clone().unwrap_or_default();
        let mix: Vec<String> = (0..cats.len())
            .filter(|&k| t.observed[k] > 0.0 || t.expected[k] > 0.0)
            .map(|k| {
                format!(
                    "{} {:.1}% (expected {:.1}%)",
                    cats[k],
                    t.observed[k] * 100.0,
                    t.expected[k] * 100.0
                )
            })
            .collect();
        let evidence = format!(
            "{dim} mix of `{}` on {}: {}; PSI {:.3}, Jensen-Shannon {:.4} bits; G = {:.1} (df {}, p = {:.1e}) over {:.0} events in the last {}",
            m.cfg.numerator.event_type,
            s.label,
            mix.join(", "),
            t.psi,
            t.js,
            t.g,
            t.df,
            t.p_value,
            t.total,
            human_duration(crate::share::TEST_WINDOWS as i64 * wm)
        );
        let (o, e) = (t.observed[t.top], t.expected[t.top]);
        let sd = (e * (1.0 - e) / t.total.max(1.0)).sqrt();
        let mut series: serde_json::Map<String, serde_json::Value> =
            s.dims.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        series.insert("share_of".into(), json!(dim));
        let candidates =
            self.point_candidates(&s.dims, m.cfg.numerator.surface.as_deref(), onset_ms);
        let top_name = cats.get(t.top).cloned().unwrap_or_default();
        let mut inc = Incident::blank(IncidentHead {
            id,
            metric: m.name().to_string(),
            metric_idx: Some(s.metric),
            series_idx: None,
            label: format!("{} ({dim}={top_name})", s.label),
            series,
            kind: "drift",
            severity: m.cfg.severity.as_str(),
            onset_ms,
            detected_ms: (w + 1) * wm,
        });
        inc.owner = m.cfg.owner.clone();
        inc.evidence = Some(evidence.clone());
        inc.observed = o;
        inc.expected = e;
        inc.expected_low = e - self.schema.z99 * sd;
        inc.expected_high = e + self.schema.z99 * sd;
        inc.effect = round3(t.psi);
        inc.score = round3(
            t.p_value.max(1e-300).log10()
                / (self.schema.metrics[s.metric]
                    .det
                    .false_alarms_per_series_week
                    / (7.0 * 86_400_000.0 / wm as f64))
                    .log10(),
        );
        inc.delay_windows = crate::share::TEST_WINDOWS as i64;
        inc.delay_events = t.total;
        inc.candidates = candidates;
        let ev = json!({"metric": inc.metric, "series": inc.series, "categories": cats,
            "observed": t.observed, "expected": t.expected, "psi": t.psi, "js_bits": t.js,
            "g": t.g, "df": t.df, "p_value": t.p_value, "events": t.total, "evidence": evidence});
        let idx = self.raise(
            inc,
            ev,
            json!({"test": "g-test-against-baseline-mix", "min_psi": m.cfg.min_psi.unwrap_or(0.1),
                "false_alarms_per_series_week": m.det.false_alarms_per_series_week}),
            None,
        );
        self.shares[i].incident = Some(idx);
    }

    /// A slow drift of series `si`'s daily level, found at the end of window `w`.
    pub(super) fn open_drift(&mut self, si: usize, w: i64, a: crate::trend::DriftAlarm) {
        let wm = self.schema.window_ms;
        let s = &self.series[si];
        if s.incident.is_some() || s.trend.incident.is_some() {
            return;
        }
        // A step incident on this series during the drift's days moved its daily level: the
        // same cause, already paged.
        let end = (w + 1) * wm;
        if self.incidents.iter().any(|i| {
            i.series_idx == Some(si)
                && matches!(i.kind, "drop" | "spike" | "shift")
                && i.onset_ms < end
                && i.resolved_ms.map_or(true, |r| r >= a.onset_day_ms)
        }) {
            return;
        }
        let m = &self.schema.metrics[s.metric];
        let id = stable_id(
            "inc-",
            &[m.name(), &s.label, "drift", &a.onset_day_ms.to_string()],
        );
        if self.incident_ids.contains_key(&id) {
            return;
        }
        let effect = match m.family {
            Family::Gaussian => a.z,
            _ => a.level / a.reference.abs().max(1e-12) - 1.0,
        };
        let evidence = format!(
            "{} on {} drifted {} over {} day(s): daily level {:.4} vs its reference {:.4} ({:+.1} sd of a day); CUSUM {:.1} over threshold {:.1} (false alarms {} per series-week)",
            m.name(),
            s.label,
            if a.down { "down" } else { "up" },
            a.days,
            a.level,
            a.reference,
            a.z,
            a.statistic,
            a.threshold,
            m.det.false_alarms_per_series_week
        );
        let candidates =
            self.point_candidates(&s.dims, m.cfg.numerator.surface.as_deref(), a.onset_day_ms);
        let mut inc = self.series_incident(
            si,
            id,
            "drift",
            m.cfg.severity.as_str(),
            a.onset_day_ms,
            (w + 1) * wm,
        );
        inc.evidence = Some(evidence.clone());
        inc.observed = a.level;
        inc.expected = a.reference;
        inc.expected_low = a.reference - self.schema.z99 * a.sd;
        inc.expected_high = a.reference + self.schema.z99 * a.sd;
        inc.effect = round3(effect);
        inc.score = round3(a.statistic / a.threshold);
        inc.delay_windows = ((w + 1) * wm - a.onset_day_ms) / wm;
        inc.candidates = candidates;
        let ev =
            json!({"metric": inc.metric, "series": inc.series, "drift": a, "evidence": evidence});
        let idx = self.raise(
            inc,
            ev,
            json!({"detector": "daily-level-cusum", "reference_half_life_days": 14,
                "false_alarms_per_series_week": m.det.false_alarms_per_series_week}),
            None,
        );
        self.series[si].trend.incident = Some(idx);
    }

    /// A drift incident ends: back to its reference (two calm days), or expired (the new level
    /// is accepted).
    pub(super) fn end_drift(&mut self, si: usize, w: i64, expired: bool) {
        let Some(idx) = self.series[si].trend.incident else {
            return;
        };
        self.series[si].trend.reset(expired);
        let text = if expired {
            "expired: the new daily level is accepted and becomes the reference".to_string()
        } else {
            "recovered: two days in a row within one sd of the reference".to_string()
        };
        self.resolve_incident(
            idx,
            (w + 1) * self.schema.window_ms,
            text,
            json!({"rule": "daily-level-cusum"}),
        );
    }
}
