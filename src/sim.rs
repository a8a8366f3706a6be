//! Traffic simulator: diurnal and weekly seasonality, segments of different volume, a funnel of
//! sessions, clicks, conversions, support tickets, brand signals and messages, and injected
//! effects of changes. Seeded and deterministic: the same scenario yields the same bytes.

use std::io::Write;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use statrs::distribution::{Normal, Poisson};

use crate::event::fmt_time;

/// Country shares of traffic.
pub const COUNTRIES: [(&str, f64); 5] = [
    ("FR", 0.30),
    ("DE", 0.25),
    ("UK", 0.20),
    ("US", 0.17),
    ("BE", 0.08),
];
pub const DEVICES: [(&str, f64); 2] = [("mobile", 0.6), ("desktop", 0.4)];

/// Baseline behaviour per session.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// Clicks on the checkout call to action per session.
    pub ctr: f64,
    /// Conversions (at checkout) per session.
    pub conversion: f64,
    pub ticket: f64,
    pub brand_signal: f64,
    pub brand_mean: f64,
    pub message: f64,
    /// Unsubscribes per message sent.
    pub unsubscribe: f64,
}

impl Default for Rates {
    fn default() -> Self {
        Rates {
            ctr: 0.30,
            conversion: 0.10,
            ticket: 0.004,
            brand_signal: 0.03,
            brand_mean: 0.35,
            message: 0.2,
            unsubscribe: 0.004,
        }
    }
}

/// A change's effect on the traffic in its scope.
#[derive(Debug, Clone)]
pub struct Effect {
    pub change_id: String,
    pub countries: Vec<String>,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
    pub ctr_mult: f64,
    pub conversion_mult: f64,
    pub ticket_mult: f64,
}

impl Effect {
    fn active(&self, t: i64, country: &str) -> bool {
        t >= self.start_ms
            && self.end_ms.map(|e| t < e).unwrap_or(true)
            && self.countries.iter().any(|c| c == country)
    }
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    /// Sessions per minute over all segments at the daily peak.
    pub peak_sessions_per_min: f64,
    pub rates: Rates,
    pub effects: Vec<Effect>,
    /// Fraction of events stamped as RFC 3339 strings rather than epoch milliseconds.
    pub rfc3339_share: f64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            seed: 42,
            peak_sessions_per_min: 1200.0,
            rates: Rates::default(),
            effects: Vec::new(),
            rfc3339_share: 0.1,
        }
    }
}

/// Diurnal and weekly volume factor in (0, 1]: peak mid-afternoon UTC, trough at night,
/// weekends at 85%.
pub fn volume_factor(t_ms: i64) -> f64 {
    let h = (t_ms.rem_euclid(86_400_000)) as f64 / 3_600_000.0;
    let day = (t_ms.div_euclid(86_400_000) + 3).rem_euclid(7); // 0 = Monday
    let diurnal = 0.55 + 0.45 * (std::f64::consts::TAU * (h - 9.0) / 24.0).sin();
    let weekly = if day >= 5 { 0.85 } else { 1.0 };
    diurnal * weekly
}

/// Counts of what was generated in one segment, for the story.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    pub sessions: u64,
    pub clicks: u64,
    pub conversions: u64,
    pub tickets: u64,
}

#[derive(Clone)]
pub struct Sim {
    sc: Scenario,
    rng: SmallRng,
    brand: Normal,
    t_ms: i64,
    next_id: u64,
    buf: Vec<u8>,
    /// Tally per country since the last `take_tally`.
    tally: [Tally; COUNTRIES.len()],
}

impl Sim {
    pub fn new(sc: Scenario, start_ms: i64) -> Sim {
        Sim {
            rng: SmallRng::seed_from_u64(sc.seed),
            brand: Normal::new(sc.rates.brand_mean, 0.45).expect("valid normal"),
            sc,
            t_ms: start_ms,
            next_id: 0,
            buf: Vec::with_capacity(512),
            tally: [Tally::default(); COUNTRIES.len()],
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.t_ms
    }

    pub fn scenario_mut(&mut self) -> &mut Scenario {
        &mut self.sc
    }

    /// Ends every effect of `change_id` at `at_ms` (the change was rolled back).
    pub fn end_effect(&mut self, change_id: &str, at_ms: i64) {
        for e in self.sc.effects.iter_mut() {
            if e.change_id == change_id && e.end_ms.is_none() {
                e.end_ms = Some(at_ms);
            }
        }
    }

    pub fn take_tally(&mut self, country: &str) -> Tally {
        let i = COUNTRIES
            .iter()
            .position(|(c, _)| *c == country)
            .unwrap_or(0);
        std::mem::take(&mut self.tally[i])
    }

    /// Generates the events of [now, to_ms) in one-second steps; `emit(key, json)` per event.
    pub fn advance(&mut self, to_ms: i64, emit: &mut dyn FnMut(&[u8], &[u8])) {
        const STEP: i64 = 1000;
        while self.t_ms + STEP <= to_ms {
            let t = self.t_ms;
            let lam = self.sc.peak_sessions_per_min / 60.0 * volume_factor(t);
            for (ci, (country, cshare)) in COUNTRIES.iter().enumerate() {
                for (device, dshare) in DEVICES.iter() {
                    let mean = lam * cshare * dshare;
                    let n = if mean > 0.0 {
                        self.rng
                            .sample::<f64, _>(Poisson::new(mean).expect("positive mean"))
                            as u64
                    } else {
                        0
                    };
                    for _ in 0..n {
                        self.session(t, ci, country, device, emit);
                    }
                }
            }
            self.t_ms += STEP;
        }
    }

    fn session(
        &mut self,
        t: i64,
        ci: usize,
        country: &str,
        device: &str,
        emit: &mut dyn FnMut(&[u8], &[u8]),
    ) {
        let r = self.sc.rates;
        let (mut ctr, mut conv, mut ticket) = (r.ctr, r.conversion, r.ticket);
        let mut variant = "control";
        for e in &self.sc.effects {
            if e.active(t, country) {
                ctr *= e.ctr_mult;
                conv *= e.conversion_mult;
                ticket *= e.ticket_mult;
                variant = "treatment";
            }
        }
        let user = self.rng.gen_range(0..5_000_000u64);
        let mut ts = t + self.rng.gen_range(0..1000);
        let key = format!("u{user}");
        self.tally[ci].sessions += 1;
        self.event(
            ts,
            "session",
            user,
            Some("home"),
            None,
            country,
            device,
            None,
            &key,
            emit,
        );
        if self.rng.gen::<f64>() < ctr {
            ts += self.rng.gen_range(0..500);
            self.tally[ci].clicks += 1;
            self.event(
                ts,
                "click",
                user,
                Some("checkout"),
                Some(variant),
                country,
                device,
                None,
                &key,
                emit,
            );
        }
        if self.rng.gen::<f64>() < conv {
            ts += self.rng.gen_range(0..500);
            self.tally[ci].conversions += 1;
            let revenue = (self.rng.gen_range(20.0..120.0f64) * 100.0).round() / 100.0;
            self.event(
                ts,
                "conversion",
                user,
                Some("checkout"),
                Some(variant),
                country,
                device,
                Some(revenue),
                &key,
                emit,
            );
        }
        if self.rng.gen::<f64>() < ticket {
            self.tally[ci].tickets += 1;
            self.event(
                ts,
                "support_ticket",
                user,
                Some("checkout"),
                None,
                country,
                device,
                None,
                &key,
                emit,
            );
        }
        if self.rng.gen::<f64>() < r.brand_signal {
            let v: f64 = self.rng.sample(self.brand);
            let v = (v.clamp(-1.0, 1.0) * 1000.0).round() / 1000.0;
            self.event(
                ts,
                "brand_signal",
                user,
                None,
                None,
                country,
                device,
                Some(v),
                &key,
                emit,
            );
        }
        if self.rng.gen::<f64>() < r.message {
            self.event(
                ts,
                "message_sent",
                user,
                Some("email"),
                None,
                country,
                device,
                None,
                &key,
                emit,
            );
            if self.rng.gen::<f64>() < r.unsubscribe {
                self.event(
                    ts,
                    "unsubscribe",
                    user,
                    Some("email"),
                    None,
                    country,
                    device,
                    None,
                    &key,
                    emit,
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &mut self,
        ts: i64,
        ty: &str,
        user: u64,
        surface: Option<&str>,
        variant: Option<&str>,
        country: &str,
        device: &str,
        value: Option<f64>,
        key: &str,
        emit: &mut dyn FnMut(&[u8], &[u8]),
    ) {
        self.next_id += 1;
        let b = &mut self.buf;
        b.clear();
        let _ = write!(b, "{{\"type\":\"{ty}\",\"ts\":");
        if self.rng.gen::<f64>() < self.sc.rfc3339_share {
            let _ = write!(b, "\"{}\"", fmt_time(ts));
        } else {
            let _ = write!(b, "{ts}");
        }
        let _ = write!(
            b,
            ",\"id\":\"e{}-{}\",\"user\":\"u{user}\"",
            self.sc.seed, self.next_id
        );
        if let Some(s) = surface {
            let _ = write!(b, ",\"surface\":\"{s}\"");
        }
        if let Some(v) = variant {
            let _ = write!(b, ",\"variant\":\"{v}\"");
        }
        if let Some(v) = value {
            let _ = write!(b, ",\"value\":{v}");
        }
        let _ = write!(
            b,
            ",\"dims\":{{\"country\":\"{country}\",\"device\":\"{device}\"}}}}"
        );
        emit(key.as_bytes(), b);
    }
}

/// Everything a fresh simulator of `sc` emits from `start_ms` to `to_ms`, held in memory
/// (benches that time the engine over the same bytes again and again).
pub fn events_between(sc: Scenario, start_ms: i64, to_ms: i64) -> Vec<Vec<u8>> {
    let mut sim = Sim::new(sc, start_ms);
    let mut out = Vec::new();
    sim.advance(to_ms, &mut |_, v| out.push(v.to_vec()));
    out
}

/// The seed story's change record (contract section 2).
pub fn story_change(change_id: &str, ts_ms: i64) -> String {
    serde_json::json!({
        "change_id": change_id,
        "ts": fmt_time(ts_ms),
        "action": "applied",
        "actor": {"kind": "agent", "name": "copy-optimizer-v3"},
        "kind": "wording",
        "scope": {"surfaces": ["checkout"], "dims": {"country": ["FR", "BE"]}},
        "tier": "autonomous",
        "owner": "team-growth",
        "description": "new CTA wording on checkout (\"Buy now, decide later\")",
        "rollback": {"restore": "cta-copy-v12"}
    })
    .to_string()
}

/// A harmful autonomous change for load runs (the crash test, the latency bench): its change
/// record on the checkout surface, made by agent `actor`, and its effect on the simulated
/// traffic of `countries` for an hour (clicks x1.2, conversions and tickets by the factors).
pub fn harmful_change(
    change_id: &str,
    ts_ms: i64,
    actor: &str,
    countries: &[&str],
    conversion_mult: f64,
    ticket_mult: f64,
) -> (String, Effect) {
    let record = serde_json::json!({
        "change_id": change_id, "ts": fmt_time(ts_ms), "action": "applied",
        "actor": {"kind": "agent", "name": actor}, "kind": "wording",
        "scope": {"surfaces": ["checkout"]}, "tier": "autonomous", "owner": "team-growth",
        "rollback": {"restore": format!("{change_id}-previous")}
    })
    .to_string();
    let effect = Effect {
        change_id: change_id.into(),
        countries: countries.iter().map(|c| c.to_string()).collect(),
        start_ms: ts_ms,
        end_ms: Some(ts_ms + 3_600_000),
        ctr_mult: 1.2,
        conversion_mult,
        ticket_mult,
    };
    (record, effect)
}

/// The automation's confirmation that it rolled a change back.
pub fn rolled_back_change(change_id: &str, ts_ms: i64, by: &str) -> String {
    serde_json::json!({
        "change_id": change_id,
        "ts": fmt_time(ts_ms),
        "action": "rolled_back",
        "actor": {"kind": "system", "name": by},
    })
    .to_string()
}

/// The seed story's effect: clicks up 30%, conversions down 15%, tickets x3 in FR and BE.
pub fn story_effect(change_id: &str, start_ms: i64) -> Effect {
    Effect {
        change_id: change_id.into(),
        countries: vec!["FR".into(), "BE".into()],
        start_ms,
        end_ms: None,
        ctr_mult: 1.3,
        conversion_mult: 0.85,
        ticket_mult: 3.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_by_seed() {
        let run = |seed| {
            let mut s = Sim::new(
                Scenario {
                    seed,
                    ..Scenario::default()
                },
                1_795_341_600_000,
            );
            let mut out = Vec::new();
            s.advance(1_795_341_600_000 + 60_000, &mut |_, v| {
                out.extend_from_slice(v)
            });
            out
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn every_event_decodes() {
        let mut s = Sim::new(Scenario::default(), 1_795_341_600_000);
        let mut n = 0;
        s.advance(1_795_341_600_000 + 120_000, &mut |_, v| {
            crate::event::decode_event(v, 4096).unwrap();
            n += 1;
        });
        assert!(n > 1000, "{n}");
    }

    #[test]
    fn effect_moves_rates_in_scope_only() {
        let start = 1_795_341_600_000;
        let mut s = Sim::new(
            Scenario {
                peak_sessions_per_min: 20_000.0,
                effects: vec![story_effect("c", start)],
                ..Scenario::default()
            },
            start,
        );
        s.advance(start + 600_000, &mut |_, _| {});
        let fr = s.take_tally("FR");
        let de = s.take_tally("DE");
        let r = |t: Tally| t.tickets as f64 / t.sessions as f64;
        assert!(r(fr) > 2.0 * r(de), "{fr:?} {de:?}");
        let c = |t: Tally| t.conversions as f64 / t.sessions as f64;
        assert!(c(fr) < 0.92 * c(de));
    }
}

/// Errors of live simulated traffic.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("Kafka producer for {brokers}: {source}")]
    Kafka {
        brokers: String,
        source: rdkafka::error::KafkaError,
    },
}

/// Produces simulated traffic to a Kafka topic: first `backfill_hours` of history as fast as
/// the broker takes it (so baselines have something to learn), then in real time, one second
/// at a time, until `shutdown` completes. Returns the number of events produced.
pub async fn run_live(
    brokers: &str,
    topic: &str,
    scenario: Scenario,
    backfill_hours: f64,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<u64, LiveError> {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, Producer};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "500000")
        .create()
        .map_err(|source| LiveError::Kafka {
            brokers: brokers.into(),
            source,
        })?;
    let now = crate::event::now_ms();
    let mut sim = Sim::new(scenario, now - (backfill_hours * 3.6e6) as i64);
    let mut produced = 0u64;
    let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    tokio::pin!(shutdown);
    loop {
        let wall = crate::event::now_ms();
        // Catch up in one-minute steps while behind the clock, then follow it second by second.
        let to = (sim.now_ms() + 60_000).min(wall);
        if to > sim.now_ms() {
            batch.clear();
            sim.advance(to, &mut |k, v| batch.push((k.to_vec(), v.to_vec())));
            for (k, v) in &batch {
                crate::demo::produce_nowait(&producer, topic, k, v).await;
            }
            produced += batch.len() as u64;
        }
        let behind = crate::event::now_ms() - sim.now_ms() > 2_000;
        let pause = if behind { 0 } else { 1_000 };
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(std::time::Duration::from_millis(pause)) => {}
        }
    }
    let _ = producer.flush(std::time::Duration::from_secs(10));
    Ok(produced)
}
