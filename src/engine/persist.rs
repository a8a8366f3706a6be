//! The engine's side of checkpoints: which state is saved, and how it is put back.
//!
//! Saved: series (open windows, baselines, detectors, history, trends), share series, the
//! watermark and per-partition clocks, incidents with their decisions and deadlines, the change
//! registry, guards, sprawl and pressure, the circuit breaker's recent rollbacks, vetoes,
//! pending rollbacks, the dedup horizon and the newest audit records. Not saved: counters
//! (Prometheus counters restart with the process) and anything derived from config (schema,
//! thresholds), which a restore takes from the running config; the config fingerprint makes
//! sure the two match.

use std::path::Path;

use super::*;
use crate::checkpoint::{self, CheckpointError, Json};
use crate::sink::AuditRecord;

/// Audit records carried in a checkpoint for the API's change stories; the audit topic keeps
/// every record.
const AUDIT_RECORDS_KEPT: usize = 2_000;

/// Input position a checkpoint corresponds to: (topic, partition, next offset to read).
pub type Offsets = Vec<(String, i32, i64)>;

/// An incident with the fields its API shape leaves out.
#[derive(serde::Serialize, serde::Deserialize)]
struct PersistedIncident {
    inc: Json<Incident>,
    metric_idx: Option<usize>,
    series_idx: Option<usize>,
    explained_by_outage: bool,
    recovery: Recovery,
    deadline_ms: Option<i64>,
    held: Option<Box<super::Held>>,
}

/// Everything a checkpoint holds. Large parts are moved out of the engine for encoding and
/// moved back afterwards, so a checkpoint copies no series.
#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    offsets: Offsets,
    series: Vec<Series>,
    index: super::KeyMap<usize>,
    max_ts: Option<i64>,
    sources: Vec<SourceClock>,
    closed_upto: Option<i64>,
    incidents: Vec<PersistedIncident>,
    registry: Json<Registry>,
    pending_rollbacks: HashMap<String, String>,
    emitted_rollbacks: HashSet<String>,
    granted: HashMap<String, String>,
    watch_reports: Vec<crate::guard::WatchReport>,
    gain_hist: Vec<super::stage::GainPoint>,
    gain_asks: Vec<super::stage::GainAsk>,
    dedup: Dedup,
    audit_seq: u64,
    guards: Guards,
    sprawl: Option<Sprawl>,
    pressure: Option<Pressure>,
    auto_rollbacks: VecDeque<(i64, Vec<String>)>,
    audit_log: Json<Vec<AuditRecord>>,
    last_event_wall_ms: i64,
    vetoed: HashMap<String, String>,
    shares: Vec<crate::share::ShareSeries>,
    share_index: super::KeyMap<usize>,
    share_cats: Vec<crate::share::Categories>,
    /// Stage 2: series taken over whose state had closed more windows than this engine (see
    /// `Engine::resume_at`), and metrics taken over behind it (see `Engine::behind`). Saved so
    /// that a restart during a catch-up neither closes a window twice nor skips one.
    resume_at: HashMap<usize, i64>,
    behind: HashMap<usize, i64>,
}

/// What a restore brought back.
#[derive(Debug, Clone)]
pub struct Restored {
    pub offsets: Offsets,
    pub written_ms: i64,
    pub series: usize,
    pub incidents: usize,
    pub bytes: usize,
}

/// The input offsets a checkpoint payload corresponds to, read without decoding the rest.
pub fn offsets_of(path: &Path, payload: &[u8]) -> Result<Offsets, CheckpointError> {
    postcard::take_from_bytes::<Offsets>(payload)
        .map(|(o, _)| o)
        .map_err(|e| CheckpointError::Decode {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

impl Engine {
    /// Identifies the configuration a checkpoint's state fits: the metrics, windowing and
    /// detection settings. Any change there makes an old checkpoint untrusted.
    pub fn state_fingerprint(&self) -> u64 {
        use sha2::{Digest, Sha256};
        let c = &self.cfg;
        let text = format!(
            "{:?}|{}|{}|{:?}|{:?}",
            c.metrics().collect::<Vec<_>>(),
            c.engine.window_secs,
            c.engine.allowed_lateness_secs,
            c.detection,
            c.guards,
        );
        let d = Sha256::digest(text.as_bytes());
        u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"))
    }

    /// A framed checkpoint of the current state, tagged with the input `offsets` it
    /// corresponds to. Call between batches (no outputs pending).
    pub fn checkpoint(&mut self, offsets: Offsets, now_ms: i64) -> Vec<u8> {
        let incidents = self
            .incidents
            .iter()
            .map(|i| PersistedIncident {
                inc: Json(i.clone()),
                metric_idx: i.metric_idx,
                series_idx: i.series_idx,
                explained_by_outage: i.explained_by_outage,
                recovery: i.recovery,
                deadline_ms: i.decision.deadline_ms,
                held: i.held.clone(),
            })
            .collect();
        let skip = self.audit_log.len().saturating_sub(AUDIT_RECORDS_KEPT);
        let p = Persisted {
            offsets,
            series: std::mem::take(&mut self.series),
            index: std::mem::take(&mut self.index),
            max_ts: self.max_ts,
            sources: std::mem::take(&mut self.sources),
            closed_upto: self.closed_upto,
            incidents,
            registry: Json(std::mem::take(&mut self.registry)),
            pending_rollbacks: std::mem::take(&mut self.pending_rollbacks),
            emitted_rollbacks: std::mem::take(&mut self.emitted_rollbacks),
            granted: std::mem::take(&mut self.granted),
            watch_reports: std::mem::take(&mut self.watch_reports),
            gain_hist: std::mem::take(&mut self.gain_hist),
            gain_asks: std::mem::take(&mut self.gain_asks),
            dedup: std::mem::replace(&mut self.dedup, Dedup::empty(0)),
            audit_seq: self.audit_seq,
            guards: std::mem::take(&mut self.guards),
            sprawl: self.sprawl.take(),
            pressure: self.pressure.take(),
            auto_rollbacks: std::mem::take(&mut self.auto_rollbacks),
            audit_log: Json(self.audit_log.iter().skip(skip).cloned().collect()),
            last_event_wall_ms: self.last_event_wall_ms,
            vetoed: std::mem::take(&mut self.vetoed),
            shares: std::mem::take(&mut self.shares),
            share_index: std::mem::take(&mut self.share_index),
            share_cats: std::mem::take(&mut self.share_cats),
            resume_at: self.resume_at.clone(),
            behind: self.behind.clone(),
        };
        let payload = checkpoint::encode(&p);
        self.put_back(p, false);
        checkpoint::frame(&payload, self.state_fingerprint(), now_ms)
    }

    /// Moves persisted state into the engine. `restoring`: also take the scalar fields and
    /// rebuild what is derived (incident index, audit log).
    fn put_back(&mut self, p: Persisted, restoring: bool) {
        self.series = p.series;
        self.index = p.index;
        self.sources = p.sources;
        self.registry = p.registry.0;
        self.pending_rollbacks = p.pending_rollbacks;
        self.emitted_rollbacks = p.emitted_rollbacks;
        self.granted = p.granted;
        self.watch_reports = p.watch_reports;
        self.gain_hist = p.gain_hist;
        self.gain_asks = p.gain_asks;
        self.dedup = p.dedup;
        self.guards = p.guards;
        self.sprawl = p.sprawl;
        self.pressure = p.pressure;
        // Bounds come from today's config, not from the checkpoint.
        if let Some(sp) = self.sprawl.as_mut() {
            sp.surfaces.set_max(self.cfg.guards.sprawl.max_surfaces);
        }
        if let Some(pr) = self.pressure.as_mut() {
            pr.surfaces.set_max(self.cfg.guards.pressure.max_surfaces);
        }
        self.auto_rollbacks = p.auto_rollbacks;
        self.vetoed = p.vetoed;
        self.shares = p.shares;
        self.share_index = p.share_index;
        self.share_cats = p.share_cats;
        if !restoring {
            return;
        }
        self.max_ts = p.max_ts;
        self.closed_upto = p.closed_upto;
        self.audit_seq = p.audit_seq;
        self.last_event_wall_ms = p.last_event_wall_ms;
        self.resume_at = p.resume_at;
        self.behind = p.behind;
        self.incidents = p
            .incidents
            .into_iter()
            .map(|pi| {
                let mut i = pi.inc.0;
                i.metric_idx = pi.metric_idx;
                i.series_idx = pi.series_idx;
                i.explained_by_outage = pi.explained_by_outage;
                i.recovery = pi.recovery;
                i.decision.deadline_ms = pi.deadline_ms;
                i.held = pi.held;
                i
            })
            .collect();
        self.incident_ids = self
            .incidents
            .iter()
            .enumerate()
            .map(|(k, i)| (i.id.clone(), k))
            .collect();
        self.audit_log = p.audit_log.0.into();
        self.dirty = true;
    }

    /// Replaces this (fresh) engine's state with a checkpoint's. Checks that the state fits
    /// the configured metrics before taking any of it: on error the engine is unchanged.
    pub fn restore(
        &mut self,
        path: &Path,
        loaded: &checkpoint::Loaded,
    ) -> Result<Restored, CheckpointError> {
        let p: Persisted = checkpoint::decode(path, &loaded.payload)?;
        let inconsistent = |what: &str| CheckpointError::Decode {
            path: path.to_path_buf(),
            message: format!("inconsistent state: {what}"),
        };
        let metrics = self.schema.metrics.len();
        if p.series.iter().any(|s| s.metric >= metrics)
            || p.shares.iter().any(|s| s.metric >= metrics)
        {
            return Err(inconsistent("a series of a metric that is not configured"));
        }
        if p.index.values().any(|&i| i >= p.series.len())
            || p.share_index.values().any(|&i| i >= p.shares.len())
            || p.resume_at.keys().any(|&i| i >= p.series.len())
            || p.behind.keys().any(|&m| m >= metrics)
        {
            return Err(inconsistent("series index out of range"));
        }
        if p.series.iter().any(|s| {
            !s.baseline.consistent()
                || !s.detector.consistent()
                || s.hist_sumsq.is_some() != super::keeps_sumsq(&self.schema.metrics[s.metric])
        }) {
            return Err(inconsistent("a series state of the wrong shape"));
        }
        let n_inc = p.incidents.len();
        if p.series
            .iter()
            .any(|s| s.incident.is_some_and(|i| i >= n_inc))
            || p.incidents.iter().any(|i| {
                i.series_idx.is_some_and(|s| s >= p.series.len())
                    || i.metric_idx.is_some_and(|m| m >= metrics)
            })
        {
            return Err(inconsistent("incident reference out of range"));
        }
        let r = Restored {
            offsets: p.offsets.clone(),
            written_ms: loaded.written_ms,
            series: p.series.len() + p.shares.len(),
            incidents: n_inc,
            bytes: loaded.payload.len(),
        };
        self.put_back(p, true);
        Ok(r)
    }
}

/// What a handover import took over.
#[derive(Debug, Clone, Default)]
pub struct Imported {
    pub series: usize,
    pub incidents: usize,
}

impl Engine {
    /// Stage 2, on a rebalance: takes over the series (and share series, with their open
    /// incidents) of repartition partitions `parts` from another instance's checkpoint, which
    /// must be of this configuration. Series of those partitions this engine already holds
    /// (from an earlier ownership) are replaced. Windows the other instance closed are not
    /// closed again here.
    pub fn import_partitions(
        &mut self,
        path: &Path,
        loaded: &checkpoint::Loaded,
        parts: &[i32],
    ) -> Result<Imported, CheckpointError> {
        let Stage::Merge { partitions } = self.stage else {
            return Ok(Imported::default());
        };
        let p: Persisted = checkpoint::decode(path, &loaded.payload)?;
        let metrics = self.schema.metrics.len();
        let n_inc = p.incidents.len();
        if p.series.iter().any(|s| s.metric >= metrics)
            || p.shares.iter().any(|s| s.metric >= metrics)
            || p.series
                .iter()
                .any(|s| s.incident.is_some_and(|i| i >= n_inc))
            || p.shares
                .iter()
                .any(|s| s.incident.is_some_and(|i| i >= n_inc))
        {
            return Err(CheckpointError::Decode {
                path: path.to_path_buf(),
                message: "inconsistent state: a reference out of range".into(),
            });
        }
        let ours = |e: &Engine, metric: usize| parts.contains(&e.partition_of(metric, partitions));
        let mut incidents = p.incidents;
        let mut moved: HashMap<usize, usize> = HashMap::new();
        let mut take_incident = |e: &mut Engine, k: usize, series_idx: Option<usize>| -> usize {
            if let Some(&i) = moved.get(&k) {
                return i;
            }
            let pi = &mut incidents[k];
            let mut i = pi.inc.0.clone();
            i.metric_idx = pi.metric_idx;
            i.series_idx = series_idx;
            i.explained_by_outage = pi.explained_by_outage;
            i.recovery = pi.recovery;
            i.decision.deadline_ms = pi.deadline_ms;
            i.held = pi.held.clone();
            let idx = match e.incident_ids.get(&i.id) {
                Some(&old) => {
                    e.incidents[old] = i;
                    old
                }
                None => {
                    e.incident_ids.insert(i.id.clone(), e.incidents.len());
                    e.incidents.push(i);
                    e.incidents.len() - 1
                }
            };
            moved.insert(k, idx);
            idx
        };
        let mut done = Imported::default();
        let by_index: HashMap<usize, u64> = p.index.iter().map(|(k, &i)| (i, *k)).collect();
        // Up to which window each taken series' state has closed: the checkpoint's watermark,
        // less where that engine was itself still catching a metric up, more where it had
        // taken a series over from state ahead of it.
        let metric_closed = |mi: usize| -> Option<i64> {
            let c = p.closed_upto?;
            Some(p.behind.get(&mi).map_or(c, |&f| f.min(c)))
        };
        // Closed fewer windows than this engine: those are closed here once their partial sums
        // have been read again. (A series' own point is never lower than its metric's.)
        let taken: Vec<usize> = (0..metrics).filter(|&mi| ours(self, mi)).collect();
        for mi in taken {
            if let (Some(d), Some(mine)) = (metric_closed(mi), self.closed_upto) {
                if d < mine {
                    let f = self.behind.entry(mi).or_insert(d);
                    *f = (*f).min(d);
                }
            }
        }
        for (j, mut s) in p.series.into_iter().enumerate() {
            if !ours(self, s.metric) {
                continue;
            }
            let m = &self.schema.metrics[s.metric];
            let si = if s.dims.is_empty() {
                match m.total {
                    Some(t) => t,
                    None => continue,
                }
            } else {
                let Some(&key) = by_index.get(&j) else {
                    continue;
                };
                match self.index.get(&key) {
                    Some(&si) => si,
                    None => {
                        let fresh = make_series(&self.schema, s.metric, Vec::new(), 0);
                        let si = push_series(&mut self.series, fresh);
                        self.index.insert(key, si);
                        self.schema.metrics[s.metric].series_count += 1;
                        si
                    }
                }
            };
            s.incident = s.incident.map(|k| take_incident(self, k, Some(si)));
            s.trend.incident = s.trend.incident.map(|k| take_incident(self, k, Some(si)));
            let mi = s.metric;
            self.series[si] = s;
            if let Some(c) = metric_closed(mi) {
                let d = p.resume_at.get(&j).map_or(c, |&r| r.max(c));
                self.resume_at.insert(si, d);
            }
            done.series += 1;
        }
        let by_share: HashMap<usize, u64> = p.share_index.iter().map(|(k, &i)| (i, *k)).collect();
        for (j, mut s) in p.shares.into_iter().enumerate() {
            if !ours(self, s.metric) {
                continue;
            }
            let Some(&key) = by_share.get(&j) else {
                continue;
            };
            s.incident = s.incident.map(|k| take_incident(self, k, None));
            match self.share_index.get(&key) {
                Some(&i) => self.shares[i] = s,
                None => {
                    self.shares.push(s);
                    self.share_index.insert(key, self.shares.len() - 1);
                }
            }
            done.series += 1;
        }
        // Watches: what each learnt for the metrics and the change partitions taken over. Every
        // instance keeps a copy of every watch (changes are broadcast), so a copy is only
        // missing where this instance never saw the change: nothing to take it into then.
        let splits: Vec<bool> = p
            .guards
            .all
            .iter()
            .map(|g| parts.contains(&self.change_partition(&g.change_id, partitions)))
            .collect();
        for (pg, split) in p.guards.all.iter().zip(splits) {
            let Some(lg) = self
                .guards
                .all
                .iter_mut()
                .rev()
                .find(|g| g.change_id == pg.change_id && g.opened_ms == pg.opened_ms)
            else {
                continue;
            };
            let metric_part = &self.metric_part;
            lg.take_over(
                pg,
                |mi| metric_part.get(mi).is_some_and(|x| parts.contains(x)),
                |x| parts.contains(&x),
                split,
            );
        }
        // Metrics taken over: their effect history, and the questions about them.
        let taken = |e: &Engine, mi: usize| parts.contains(&e.partition_of(mi, partitions));
        let hist: Vec<_> = p
            .gain_hist
            .into_iter()
            .filter(|g| g.metric < metrics && taken(self, g.metric))
            .collect();
        let keep: Vec<bool> = self
            .gain_hist
            .iter()
            .map(|g| !taken(self, g.metric))
            .collect();
        let mut keep = keep.into_iter();
        self.gain_hist.retain(|_| keep.next().unwrap_or(true));
        self.gain_hist.extend(hist);
        let asks: Vec<_> = p
            .gain_asks
            .into_iter()
            .filter(|a| a.metric < metrics && taken(self, a.metric))
            .collect();
        self.gain_asks.extend(asks);
        // Watches closing on a change partition taken over: the verdicts gathered so far.
        for r in p.watch_reports {
            if parts.contains(&self.change_partition(&r.change_id, partitions))
                && !self
                    .watch_reports
                    .iter()
                    .any(|x| x.change_id == r.change_id && x.opened_ms == r.opened_ms)
            {
                self.watch_reports.push(r);
            }
        }
        // The decider's partition: what it granted and the breaker's count go with it.
        if parts.contains(&crate::repartition::DECIDER) {
            self.granted = p.granted;
            self.auto_rollbacks = p.auto_rollbacks;
            self.vetoed.extend(p.vetoed);
        }
        // Category names: a share series' counts are indexed by its metric's registry.
        for (mi, c) in p.share_cats.into_iter().enumerate() {
            if mi < self.share_cats.len() && c.names.len() > self.share_cats[mi].names.len() {
                self.share_cats[mi] = c;
            }
        }
        done.incidents = moved.len();
        self.dirty = true;
        Ok(done)
    }
}

impl Dedup {
    pub(super) fn empty(span_ms: i64) -> Dedup {
        Dedup {
            cur: super::KeySet::default(),
            prev: super::KeySet::default(),
            gen_start: i64::MIN / 2,
            span_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{story_change, story_effect, Scenario, Sim};
    use crate::sink::Signer;

    const T0: i64 = 1_795_341_600_000; // 2026-11-22T10:00:00Z
    const H: i64 = 3_600_000;

    fn engine() -> Engine {
        let cfg =
            Config::from_str_named(crate::demo::DEFAULT_CONFIG, "config/guardrail.toml").unwrap();
        Engine::new(&cfg).unwrap()
    }

    /// Feeds the simulator from its current time to `to`, with `now` one minute after each
    /// event, and returns the encoded outputs.
    fn feed(e: &mut Engine, sim: &mut Sim, to: i64) -> Vec<String> {
        let signer = Signer::new("k", b"secret");
        let mut evs = Vec::new();
        sim.advance(to, &mut |_, v| evs.push(v.to_vec()));
        let mut out = Vec::new();
        for v in &evs {
            let ts = crate::event::decode_event(v, 65536).unwrap().ts_ms;
            let _ = e.process_event(v, ts + 60_000);
            // Wall-clock stamps (`at`, `emitted_at`, `time`) aside, outputs must match.
            out.extend(e.take_outputs().map(|o| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&o.encode(&signer).value).unwrap();
                for k in ["at", "emitted_at", "time"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v.to_string()
            }));
        }
        out
    }

    #[test]
    fn a_restored_engine_continues_exactly_like_the_original() {
        let scenario = Scenario {
            peak_sessions_per_min: 300.0,
            ..Scenario::default()
        };
        let mut a = engine();
        let mut sim = Sim::new(scenario, T0);
        feed(&mut a, &mut sim, T0 + 26 * H);
        let applied = T0 + 26 * H;
        a.process_change(story_change("chg-1", applied).as_bytes())
            .unwrap();
        sim.scenario_mut()
            .effects
            .push(story_effect("chg-1", applied));
        feed(&mut a, &mut sim, applied + 10 * 60_000);
        let _ = a.take_outputs().count();

        let offsets = vec![("events".to_string(), 0, 12345)];
        let bytes = a.checkpoint(offsets.clone(), applied);
        let dir = Path::new("mem");
        let loaded = checkpoint::unframe(dir, &bytes, a.state_fingerprint()).unwrap();
        let mut b = engine();
        let r = b.restore(dir, &loaded).unwrap();
        assert_eq!(r.offsets, offsets);
        assert_eq!(offsets_of(dir, &loaded.payload).unwrap(), offsets);
        assert!(r.series > 10, "{r:?}");

        // Both see the same rest of the afternoon.
        let mut sim_b = sim.clone();
        let out_a = feed(&mut a, &mut sim, applied + 4 * H);
        let out_b = feed(&mut b, &mut sim_b, applied + 4 * H);
        assert!(
            out_a
                .iter()
                .any(|o| o.contains("\"rollback\"") || o.contains("rollback")),
            "the injected drop is detected and acted on after the checkpoint: {out_a:?}"
        );
        assert_eq!(out_a, out_b, "same outputs, byte for byte");
        let ids = |e: &Engine| {
            e.incidents
                .iter()
                .map(|i| (i.id.clone(), i.kind, i.detected_ms))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&b));
        assert!(!a.incidents.is_empty());
        // A checkpoint holding incidents, decisions and audit records reads back whole.
        let bytes = a.checkpoint(offsets.clone(), applied);
        let loaded = checkpoint::unframe(dir, &bytes, a.state_fingerprint()).unwrap();
        let mut c = engine();
        c.restore(dir, &loaded).unwrap();
        assert_eq!(ids(&a), ids(&c));
        let decisions = |e: &Engine| {
            e.incidents
                .iter()
                .map(|i| i.decision.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(decisions(&a), decisions(&c));
        assert_eq!(a.audit_log.len(), c.audit_log.len());
    }

    #[test]
    fn a_checkpoint_for_other_metrics_is_refused_and_the_engine_kept_fresh() {
        let mut a = engine();
        let mut sim = Sim::new(Scenario::default(), T0);
        feed(&mut a, &mut sim, T0 + H);
        let bytes = a.checkpoint(Vec::new(), T0);
        let other = Config::from_str_named(
            "[[metrics]]\nname = \"n\"\nkind = \"count\"\nnumerator = { type = \"x\" }\n",
            "t.toml",
        )
        .unwrap();
        let b = Engine::new(&other).unwrap();
        let e = checkpoint::unframe(Path::new("p"), &bytes, b.state_fingerprint()).unwrap_err();
        assert_eq!(e.reason(), "config_changed");
        // A payload that decodes as something else entirely is refused before anything is
        // taken.
        let mut c = engine();
        let fresh = c.series.len();
        let junk = checkpoint::frame(&[1, 2, 3, 4], c.state_fingerprint(), 0);
        let l = checkpoint::unframe(Path::new("p"), &junk, c.state_fingerprint()).unwrap();
        assert_eq!(
            c.restore(Path::new("p"), &l).unwrap_err().reason(),
            "decode"
        );
        assert_eq!(c.series.len(), fresh);
    }
}
