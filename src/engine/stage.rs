//! The engine's two halves in the two-stage aggregation (`crate::repartition`): stage 1 sums
//! events into partial windows and hands them on; stage 2 merges partials into its series and
//! runs everything else.

use super::*;
use crate::repartition::{clock_id, clock_partition, Partial, Routed};

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

/// How long a change record's content is remembered, so that its broadcast copies on several
/// repartition partitions apply once.
const CHANGE_DEDUP_MS: i64 = 7 * 86_400_000;

impl Engine {
    /// Makes this engine one stage of the two-stage aggregation. Call once, before any input.
    pub fn set_stage(&mut self, stage: Stage) {
        self.stage = stage;
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
    /// for every input partition until a marker for it arrives there (or it stays silent for
    /// [`SOURCE_IDLE_MS`]).
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
    pub(super) fn foreign(&mut self, si: usize, share: bool) -> bool {
        let Stage::Merge { partitions } = self.stage else {
            return false;
        };
        let cache = if share {
            &self.share_part
        } else {
            &self.series_part
        };
        let part = match cache.get(si) {
            Some(&p) => p,
            None => {
                let (metric, values) = if share {
                    let s = &self.shares[si];
                    (
                        s.metric,
                        s.dims.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>(),
                    )
                } else {
                    let s = &self.series[si];
                    (s.metric, s.dims.iter().map(|(_, v)| v.as_str()).collect())
                };
                let p = (self.route_key(metric, &values, share) % partitions.max(1) as u64) as i32;
                let cache = if share {
                    &mut self.share_part
                } else {
                    &mut self.series_part
                };
                // Filled in index order: every series before `si` is cached already.
                if cache.len() == si {
                    cache.push(p);
                }
                p
            }
        };
        !self.owned.contains(&part)
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

    /// Where a series goes: a hash of its metric's name and dimension values (names, not
    /// indices, so instances agree whatever the order of their configurations).
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

    /// The repartition partition and record key of a series (or share series).
    fn route(&self, metric: usize, values: &[String], share: bool) -> (i32, String) {
        let vals: Vec<&str> = values.iter().map(String::as_str).collect();
        let k = self.route_key(metric, &vals, share);
        let Stage::Aggregate { partitions } = self.stage else {
            return (0, String::new());
        };
        ((k % partitions.max(1) as u64) as i32, format!("{k:016x}"))
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
        for g in std::mem::take(&mut self.guards).all {
            let metrics: Vec<(String, u8, f64, f64, f64)> = g
                .metrics
                .iter()
                .enumerate()
                .flat_map(|(mi, m)| {
                    m.arms
                        .iter()
                        .enumerate()
                        .filter(|(_, a)| a.num != 0.0 || a.den != 0.0)
                        .map(move |(arm, a)| (mi, arm as u8, a.num, a.den, a.sumsq))
                })
                .map(|(mi, arm, n, d, q)| (self.schema.metrics[mi].cfg.name.clone(), arm, n, d, q))
                .collect();
            if metrics.is_empty() && g.exposure == [0.0; 2] {
                continue;
            }
            let mut h =
                SipHasher13::new_with_keys(self.schema.series_key.0, self.schema.series_key.1);
            h.write(g.change_id.as_bytes());
            let k = h.finish();
            out.push(Routed {
                partition: (k % partitions.max(1) as u64) as i32,
                key: g.change_id.clone(),
                partial: Partial::Arms {
                    change_id: g.change_id,
                    exposure: g.exposure,
                    metrics,
                },
            });
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
        for c in &self.sources {
            if c.max_ts == i64::MIN {
                continue;
            }
            for x in 0..partitions {
                out.push(Routed {
                    partition: x,
                    key: crate::repartition::MARKER_KEY.to_string(),
                    partial: Partial::Marker {
                        source: c.source,
                        max_ts: c.max_ts,
                        heard_ms: c.seen_ms.min(now_ms),
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

    fn metric_named(&self, name: &str) -> Result<usize, Reject> {
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

    fn check_open(&self, w: i64) -> Result<(), Reject> {
        match self.closed_upto {
            Some(c) if w < c => Err(Reject::new(
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
            } => {
                let mi = self.metric_named(&metric)?;
                self.check_open(w)?;
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
                self.series[si]
                    .ring
                    .merge(w, num, den, sumsq, hll.as_deref());
                if w < self.series[si].first_window {
                    self.series[si].first_window = w;
                }
            }
            Partial::Share {
                metric,
                dims,
                w,
                counts,
            } => {
                let mi = self.metric_named(&metric)?;
                self.check_open(w)?;
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
                let g = &mut self.guards.all[gi];
                g.exposure[0] += exposure[0];
                g.exposure[1] += exposure[1];
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
            } => {
                if !(crate::event::MIN_TIME_MS..=crate::event::MAX_TIME_MS).contains(&max_ts) {
                    return Err(Reject::new(
                        ErrorCode::BadTimestamp,
                        format!("marker time {max_ts} out of range"),
                    ));
                }
                self.advance_at(clock_id(part, source), max_ts, heard_ms, now_ms);
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
        self.series.push(s);
        let si = self.series.len() - 1;
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
