//! `guardrail demo`: the seed story on the embedded broker.
//!
//! librdkafka's mock cluster plays Kafka; the simulator plays the site's traffic on a compressed
//! clock (about 16 simulated hours, ending in the recent past so event time is real time); the
//! real service consumes it exactly as `guardrail run` would. An AI agent applies a wording
//! change on checkout in FR and BE (tier autonomous): clicks rise, conversions drop ~15% and
//! support tickets triple there. A simulated automation listens on the rollbacks topic, verifies
//! the signature, rolls the change back a few (simulated) minutes later and confirms on the
//! changes topic. The story is read back from the alerts, rollbacks and audit topics.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, FutureProducer, FutureRecord, Producer, ThreadedProducer,
};
use serde_json::Value;

use crate::config::Config;
use crate::event::{fmt_time, now_ms, parse_time_str};
use crate::service;
use crate::sim::{self, Scenario, Sim};
use crate::sink::{Signer, KEY_ID_HEADER, SIGNATURE_HEADER};

pub const DEFAULT_CONFIG: &str = include_str!("../config/guardrail.toml");
const DEMO_SECRET: &str = "demo-signing-secret";
const CHANGE_ID: &str = "chg-0042";
const AUTOMATION: &str = "deploy-automation";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub follow: bool,
    pub http_listen: String,
    pub seed: u64,
    /// Simulated history before the change (the baselines' warm-up).
    pub warmup_hours: f64,
    /// Simulated time after the change at most.
    pub story_hours: f64,
    pub peak_sessions_per_min: f64,
    /// Simulated minutes the automation takes to roll back once asked.
    pub automation_delay_mins: i64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            follow: false,
            http_listen: "127.0.0.1:0".into(),
            seed: 7,
            warmup_hours: 13.0,
            story_hours: 4.0,
            peak_sessions_per_min: 2500.0,
            automation_delay_mins: 15,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("embedded broker: {0}")]
    Kafka(#[from] KafkaError),
    #[error("demo config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("HTTP listener on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("service failed: {0}")]
    Service(#[from] service::ServiceError),
    #[error("output: {0}")]
    Io(#[from] std::io::Error),
}

/// What happened, for the exit code and for tests.
#[derive(Debug, Clone, Default)]
pub struct DemoOutcome {
    pub events_produced: u64,
    pub change_applied_ms: i64,
    /// Incidents that fired naming the change as top candidate: (metric, series, detected ms,
    /// delay windows, delay events).
    pub detections: Vec<(String, String, i64, i64, f64)>,
    pub rollback_requests: usize,
    pub signature_verified: bool,
    pub rollback_confirmed: bool,
    pub incidents_fired: usize,
    pub incidents_resolved: usize,
    /// Distinct `group_id`s among the firing alerts: pages, with `group_by: [group_id]`.
    pub groups: usize,
    pub wall_secs: f64,
    pub http_addr: String,
}

impl DemoOutcome {
    /// The story held: detected and named the change, asked for the rollback with a valid
    /// signature, the rollback was confirmed, and every incident resolved.
    pub fn story_holds(&self) -> bool {
        !self.detections.is_empty()
            && self.rollback_requests == 1
            && self.signature_verified
            && self.rollback_confirmed
            && self.incidents_fired > 0
            && self.incidents_resolved == self.incidents_fired
            && self.groups == 1
    }
}

struct Record {
    topic: String,
    value: Value,
    verified: Option<bool>,
}

fn hhmm(ms: i64) -> String {
    fmt_time(ms)[11..16].to_string()
}

/// The most recent 14:00 UTC that leaves `after_hours` of simulated time before now.
fn story_change_time(now: i64, after_hours: f64) -> i64 {
    let latest = now - (after_hours * 3_600_000.0) as i64 - 600_000;
    let day = latest.div_euclid(86_400_000) * 86_400_000;
    let t = day + 14 * 3_600_000;
    if t <= latest {
        t
    } else {
        t - 86_400_000
    }
}

pub async fn run(
    opts: DemoOptions,
    out: &mut (dyn Write + Send),
) -> Result<DemoOutcome, DemoError> {
    let wall0 = Instant::now();
    let cluster = MockCluster::new(1)?;
    let topics = crate::config::TopicsConfig::default();
    cluster.create_topic(&topics.events, 6, 1)?;
    // Every topic but the events one (created above, with partitions to spread over).
    for t in &topics.all()[1..] {
        cluster.create_topic(t, 1, 1)?;
    }
    let bootstrap = cluster.bootstrap_servers();

    let mut cfg = Config::from_str_named(DEFAULT_CONFIG, "config/guardrail.toml")?;
    cfg.kafka.bootstrap_servers = bootstrap.clone();
    cfg.kafka.group_id = "guardrail-demo".into();
    // The embedded broker is in process: ask for data as soon as any is there.
    cfg.kafka
        .options
        .insert("fetch.wait.max.ms".into(), "10".into());
    cfg.signing.secret = Some(DEMO_SECRET.into());
    cfg.signing.secret_env = None;
    cfg.service.instance = "demo".into();
    let listener = tokio::net::TcpListener::bind(&opts.http_listen)
        .await
        .map_err(|source| DemoError::Listen {
            addr: opts.http_listen.clone(),
            source,
        })?;
    let addr = listener.local_addr()?;
    cfg.service.public_url = format!("http://{addr}");
    cfg.http.listen = addr.to_string();
    let window_ms = cfg.engine.window_secs as i64 * 1000;
    let lateness_ms = cfg.engine.allowed_lateness_secs as i64 * 1000;

    let state = service::new_state();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let svc = tokio::spawn(service::run(
        cfg.clone(),
        listener,
        state.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    // The story reader: alerts, rollback requests and audit records as they are produced.
    let records: Arc<Mutex<Vec<Record>>> = Arc::default();
    let (rb_tx, mut rb_rx) = tokio::sync::mpsc::unbounded_channel::<(String, i64)>();
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "guardrail-demo-story")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .set("isolation.level", "read_committed")
        .create()?;
    reader.subscribe(&[&topics.alerts, &topics.rollbacks, &topics.audit])?;
    let signer = Signer::new(&cfg.signing.key_id, DEMO_SECRET.as_bytes());
    let recs = records.clone();
    let rollbacks_topic = topics.rollbacks.clone();
    let reader_task = tokio::spawn(async move {
        loop {
            let Ok(m) = reader.recv().await else { continue };
            let payload = m.payload().unwrap_or(&[]);
            let Ok(value) = serde_json::from_slice::<Value>(payload) else {
                continue;
            };
            let mut verified = None;
            if m.topic() == rollbacks_topic {
                let header = |name: &str| {
                    m.headers().and_then(|h| {
                        h.iter()
                            .find(|x| x.key == name)
                            .and_then(|x| x.value)
                            .map(|v| String::from_utf8_lossy(v).to_string())
                    })
                };
                let ok = header(SIGNATURE_HEADER)
                    .map(|s| signer.verify(payload, &s))
                    .unwrap_or(false)
                    && header(KEY_ID_HEADER).as_deref() == Some(signer.key_id());
                verified = Some(ok);
                if ok {
                    let change = value["data"]["change_id"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    let _ = rb_tx.send((change, 0));
                }
            }
            recs.lock().unwrap().push(Record {
                topic: m.topic().to_string(),
                value,
                verified,
            });
        }
    });

    // Traffic and the change.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .set("batch.num.messages", "10000")
        .create()?;
    let now = now_ms();
    let change_ms = story_change_time(now, opts.story_hours);
    let start_ms = change_ms - (opts.warmup_hours * 3_600_000.0) as i64;
    let end_limit = change_ms + (opts.story_hours * 3_600_000.0) as i64;
    let mut sim = Sim::new(
        Scenario {
            seed: opts.seed,
            peak_sessions_per_min: opts.peak_sessions_per_min,
            ..Scenario::default()
        },
        start_ms,
    );
    let mut produced = 0u64;
    let mut facts: Vec<(i64, String)> = Vec::new();
    let mut change_sent = false;
    let mut rollback_at: Option<i64> = None;
    let mut rolled_back_ms: Option<i64> = None;
    let mut before = sim::Tally::default();
    writeln!(
        out,
        "guardrail demo: embedded Kafka at {bootstrap}, API at http://{addr}\n\
         simulating {:.0} h of traffic ({} to {}), {} sessions/min at peak in 5 countries x 2 devices\n",
        (end_limit - start_ms) as f64 / 3.6e6,
        fmt_time(start_ms),
        fmt_time(end_limit),
        opts.peak_sessions_per_min
    )?;
    const TICK: i64 = 60_000;
    let lead_ms = 0;
    loop {
        let t = sim.now_ms();
        if !change_sent && t >= change_ms {
            before = sim.take_tally("FR");
            sim.scenario_mut()
                .effects
                .push(sim::story_effect(CHANGE_ID, t));
            send(
                &producer,
                &topics.changes,
                CHANGE_ID,
                sim::story_change(CHANGE_ID, t).as_bytes(),
            )
            .await?;
            change_sent = true;
            facts.push((
                t,
                format!(
                    "CHANGE  agent copy-optimizer-v3 applies {CHANGE_ID}: new CTA wording on checkout, FR+BE, tier autonomous"
                ),
            ));
        }
        if change_sent && t == change_ms + 3_600_000 && rolled_back_ms.is_none() {
            let after = sim.take_tally("FR");
            facts.push((t, tally_fact(&before, &after)));
        }
        while let Ok((change, _)) = rb_rx.try_recv() {
            if change == CHANGE_ID && rollback_at.is_none() {
                rollback_at = Some(t + opts.automation_delay_mins * 60_000);
                facts.push((
                    t,
                    format!(
                        "AUTOMATION receives the signed rollback request for {CHANGE_ID}; deploying the previous wording (takes ~{} min)",
                        opts.automation_delay_mins
                    ),
                ));
            }
        }
        if let Some(at) = rollback_at {
            if t >= at && rolled_back_ms.is_none() {
                let after = sim.take_tally("FR");
                facts.push((t - 1, tally_fact(&before, &after)));
                sim.end_effect(CHANGE_ID, t);
                send(
                    &producer,
                    &topics.changes,
                    CHANGE_ID,
                    sim::rolled_back_change(CHANGE_ID, t, AUTOMATION).as_bytes(),
                )
                .await?;
                rolled_back_ms = Some(t);
                facts.push((
                    t,
                    format!("AUTOMATION rolled back {CHANGE_ID} and confirms on the changes topic (action rolled_back)"),
                ));
            }
        }
        // Stop once every incident has resolved after the rollback, or at the time limit.
        if let Some(rb) = rolled_back_ms {
            if t >= rb + 3_600_000 {
                let (fired, resolved) = incident_counts(&records.lock().unwrap());
                if fired > 0 && fired == resolved {
                    break;
                }
            }
        }
        if t >= end_limit {
            break;
        }
        let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(4096);
        sim.advance(t + TICK, &mut |k, v| batch.push((k.to_vec(), v.to_vec())));
        for (k, v) in &batch {
            produce_nowait(&producer, &topics.events, k, v).await;
        }
        produced += batch.len() as u64;
        // Back-pressure: keep simulated time at most a few windows ahead of the engine, so the
        // automation reacts at the right moment in simulated time.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let wm = state.telemetry_watermark_ms();
            if wm
                .map(|w| w + lateness_ms + window_ms >= sim.now_ms() - lead_ms)
                .unwrap_or(false)
                || Instant::now() > deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    producer.flush(Duration::from_secs(10))?;
    // Let the engine and the story reader catch up with what was produced.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let latest = state.latest_event_ms().unwrap_or(0);
        if latest >= sim.now_ms() - 2_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut outcome = DemoOutcome {
        events_produced: produced,
        change_applied_ms: change_ms,
        http_addr: addr.to_string(),
        ..DemoOutcome::default()
    };
    let mut lines: Vec<(i64, String)> = facts;
    {
        let recs = records.lock().unwrap();
        let audit_detection: BTreeMap<String, &Value> = recs
            .iter()
            .filter(|r| r.topic == topics.audit && r.value["action"] == "detection")
            .filter_map(|r| {
                Some((
                    r.value["incident_id"].as_str()?.to_string(),
                    &r.value["evidence"],
                ))
            })
            .collect();
        let mut groups = std::collections::BTreeSet::new();
        for r in recs.iter() {
            let v = &r.value;
            if r.topic == topics.alerts {
                let status = v["status"].as_str().unwrap_or("");
                let series = series_text(&v["series"]);
                let metric = v["metric"].as_str().unwrap_or("");
                if status == "firing" {
                    outcome.incidents_fired += 1;
                    groups.insert(v["group_id"].as_str().unwrap_or("").to_string());
                    let t = parse_time_str(v["detected_at"].as_str().unwrap_or("")).unwrap_or(0);
                    let onset = parse_time_str(v["onset"].as_str().unwrap_or("")).unwrap_or(0);
                    let top = v["candidate_changes"].get(0);
                    let top_id = top.and_then(|c| c["change_id"].as_str()).unwrap_or("none");
                    let ev = audit_detection.get(v["incident_id"].as_str().unwrap_or(""));
                    let dw = ev.and_then(|e| e["delay_windows"].as_i64()).unwrap_or(0);
                    let de = ev.and_then(|e| e["delay_events"].as_f64()).unwrap_or(0.0);
                    if top_id == CHANGE_ID {
                        outcome
                            .detections
                            .push((metric.into(), series.clone(), t, dw, de));
                    }
                    lines.push((
                        t,
                        format!(
                            "FIRING  [{}] {metric}{{{series}}} {}: observed {:.4} vs expected {:.4} ({:+.1}%), 99% band [{:.4}, {:.4}]\n        onset {} (estimated; 95% set {}), group {}, detected {} after the change, {} windows / {:.0} events after onset\n        top candidate: {} (score {})  {}\n        top segments: {}\n        decision: {} - {}\n        {}",
                            v["severity"].as_str().unwrap_or(""),
                            v["kind"].as_str().unwrap_or(""),
                            v["observed"].as_f64().unwrap_or(0.0),
                            v["expected"].as_f64().unwrap_or(0.0),
                            v["effect"].as_f64().unwrap_or(0.0) * 100.0,
                            v["expected_low"].as_f64().unwrap_or(0.0),
                            v["expected_high"].as_f64().unwrap_or(0.0),
                            hhmm(onset),
                            onset_set(v),
                            v["group_id"].as_str().unwrap_or("-"),
                            crate::attribute::human_duration(t - change_ms),
                            dw,
                            de,
                            top_id,
                            top.map(|c| c["score"].to_string()).unwrap_or_default(),
                            top.and_then(|c| c["evidence"].as_str()).unwrap_or(""),
                            segments_text(&v["top_segments"]),
                            v["decision"]["action"].as_str().unwrap_or(""),
                            v["decision"]["reason"].as_str().unwrap_or(""),
                            v["url"].as_str().unwrap_or(""),
                        ),
                    ));
                } else if status == "resolved" {
                    outcome.incidents_resolved += 1;
                    let t = parse_time_str(v["resolved_at"].as_str().unwrap_or("")).unwrap_or(0);
                    lines.push((
                        t,
                        format!(
                            "RESOLVED {metric}{{{series}}}: last window observed {:.4} vs expected {:.4}; {}",
                            v["observed"].as_f64().unwrap_or(0.0),
                            v["expected"].as_f64().unwrap_or(0.0),
                            v["resolution"].as_str().unwrap_or("")
                        ),
                    ));
                }
            } else if r.topic == topics.rollbacks {
                outcome.rollback_requests += 1;
                outcome.signature_verified = r.verified == Some(true);
                let d = &v["data"];
                let inc = d["incident_id"].as_str().unwrap_or("");
                let t = recs
                    .iter()
                    .find(|x| x.topic == topics.alerts && x.value["incident_id"] == inc)
                    .and_then(|x| parse_time_str(x.value["detected_at"].as_str()?))
                    .unwrap_or(0);
                lines.push((
                    t + 1,
                    format!(
                        "ROLLBACK requested for {} (CloudEvent id {}, HMAC signature {}, key {})\n        decided by {}: {}",
                        d["change_id"].as_str().unwrap_or(""),
                        v["id"].as_str().unwrap_or(""),
                        if r.verified == Some(true) { "verified" } else { "INVALID" },
                        signer_key(&cfg),
                        d["decided_by"]["name"].as_str().unwrap_or(""),
                        d["reason"].as_str().unwrap_or("")
                    ),
                ));
            } else if r.topic == topics.audit && v["action"] == "rollback_confirmed" {
                outcome.rollback_confirmed = true;
                let t = parse_time_str(v["evidence"]["confirmed_at"].as_str().unwrap_or(""))
                    .unwrap_or(0);
                lines.push((
                    t + 1,
                    format!(
                        "AUDIT   rollback of {} confirmed by {} {} (audit {})",
                        v["change_id"].as_str().unwrap_or(""),
                        v["actor"]["kind"].as_str().unwrap_or(""),
                        v["actor"]["name"].as_str().unwrap_or(""),
                        v["audit_id"].as_str().unwrap_or("")
                    ),
                ));
            }
        }
        outcome.groups = groups.len();
        let audits = recs.iter().filter(|r| r.topic == topics.audit).count();
        lines.sort_by_key(|(t, _)| *t);
        writeln!(out, "timeline (simulated event time, UTC):")?;
        for (t, l) in &lines {
            writeln!(out, "  {}  {l}", hhmm(*t))?;
        }
        writeln!(out, "\n{audits} audit records written to {}", topics.audit)?;
    }
    outcome.wall_secs = wall0.elapsed().as_secs_f64();
    writeln!(
        out,
        "{} events through the embedded broker in {:.1} s of wall time",
        produced, outcome.wall_secs
    )?;
    if outcome.story_holds() {
        writeln!(
            out,
            "\nstory holds: detected, named {CHANGE_ID}, rollback requested (signed), confirmed, all {} incident(s) resolved; one cause, one group: one page",
            outcome.incidents_fired
        )?;
    } else {
        writeln!(out, "\nstory did NOT hold: {outcome:?}")?;
    }

    if opts.follow {
        writeln!(
            out,
            "\n--follow: traffic continues (no more changes); metrics at http://{addr}/metrics, incidents at http://{addr}/incidents. Ctrl-C to stop."
        )?;
        out.flush()?;
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            let t = sim.now_ms();
            // Compressed while behind the wall clock, then real time.
            let pause = if t + TICK < now_ms() {
                200
            } else {
                TICK as u64
            };
            tokio::select! {
                _ = &mut ctrl_c => break,
                _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
            }
            let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            sim.advance(t + TICK, &mut |k, v| batch.push((k.to_vec(), v.to_vec())));
            for (k, v) in &batch {
                produce_nowait(&producer, &topics.events, k, v).await;
            }
        }
    }
    // Stop every client before the embedded broker goes away.
    let _ = stop_tx.send(());
    let _ = svc.await;
    reader_task.abort();
    let _ = reader_task.await;
    drop(producer);
    drop(cluster);
    Ok(outcome)
}

fn signer_key(cfg: &Config) -> &str {
    &cfg.signing.key_id
}

fn tally_fact(before: &sim::Tally, after: &sim::Tally) -> String {
    let r = |n: u64, d: u64| n as f64 / d.max(1) as f64;
    format!(
        "TRAFFIC FR since the change vs before: clicks/session {:.3} -> {:.3} (the change's target metric rises), conversions/session {:.4} -> {:.4}, tickets/session {:.4} -> {:.4}",
        r(before.clicks, before.sessions),
        r(after.clicks, after.sessions),
        r(before.conversions, before.sessions),
        r(after.conversions, after.sessions),
        r(before.tickets, before.sessions),
        r(after.tickets, after.sessions),
    )
}

/// `13:55 to 14:05`, the onset's confidence set of an alert.
fn onset_set(v: &Value) -> String {
    let at = |k: &str| parse_time_str(v[k].as_str().unwrap_or("")).map(hhmm);
    match (at("onset_low"), at("onset_high")) {
        (Some(a), Some(b)) => format!("{a} to {b}"),
        _ => "-".into(),
    }
}

fn incident_counts(recs: &[Record]) -> (usize, usize) {
    let f = |s: &str| {
        recs.iter()
            .filter(|r| {
                r.value.get("status").and_then(Value::as_str) == Some(s)
                    && r.value.get("incident_id").is_some()
            })
            .count()
    };
    (f("firing"), f("resolved"))
}

fn series_text(v: &Value) -> String {
    match v.as_object() {
        Some(o) if !o.is_empty() => o
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(","),
        _ => "total".into(),
    }
}

fn segments_text(v: &Value) -> String {
    let Some(a) = v.as_array() else {
        return "-".into();
    };
    if a.is_empty() {
        return "-".into();
    }
    a.iter()
        .map(|s| {
            format!(
                "{} {:.0}%",
                series_text(&s["dims"]),
                s["contribution"].as_f64().unwrap_or(0.0) * 100.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn send(p: &FutureProducer, topic: &str, key: &str, value: &[u8]) -> Result<(), KafkaError> {
    p.send(
        FutureRecord::to(topic).key(key).payload(value),
        Duration::from_secs(10),
    )
    .await
    .map(|_| ())
    .map_err(|(e, _)| e)
}

/// The blocking twin of [`produce_nowait`], for load generators on their own threads (the
/// crash test, the latency bench): enqueues on a threaded producer, waiting while its local
/// queue is full; any other error is returned.
pub fn produce_blocking(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &[u8],
    value: &[u8],
    partition: Option<i32>,
) -> Result<(), KafkaError> {
    loop {
        let mut r = BaseRecord::to(topic).key(key).payload(value);
        if let Some(x) = partition {
            r = r.partition(x);
        }
        match p.send(r) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Enqueues without waiting for the acknowledgement, backing off while the queue is full.
pub async fn produce_nowait(p: &FutureProducer, topic: &str, key: &[u8], value: &[u8]) {
    loop {
        match p.send_result(FutureRecord::to(topic).key(key).payload(value)) {
            Ok(_) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => {
                tracing::warn!(error = %e, "demo producer");
                return;
            }
        }
    }
}
