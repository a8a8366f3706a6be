//! Shared harness for end-to-end tests: an embedded Kafka (librdkafka's mock cluster), the real
//! service running in process on a loopback port, a producer, and a reader of the output topics.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guardrail::api::ApiState;
use guardrail::config::Config;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};

pub const SECRET: &str = "test-secret";
/// Bearer tokens of the two actors of [`alice_and_victor`].
pub const ALICE: &str = "alice-token-0123456789abcdef";
pub const VICTOR: &str = "victor-token-0123456789abcdef";

/// Two actors: alice, a marketing owner (may veto and approve), and victor, a viewer.
pub fn alice_and_victor() -> Vec<guardrail::auth::ActorConfig> {
    vec![
        guardrail::auth::ActorConfig {
            name: "alice".into(),
            role: "marketing_owner".into(),
            token: Some(ALICE.into()),
            token_env: None,
        },
        guardrail::auth::ActorConfig {
            name: "victor".into(),
            role: "viewer".into(),
            token: Some(VICTOR.into()),
            token_env: None,
        },
    ]
}

pub struct Harness {
    pub cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    pub cfg: Config,
    pub state: Arc<ApiState>,
    pub http: String,
    pub producer: FutureProducer,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    svc: Option<
        tokio::task::JoinHandle<
            Result<guardrail::service::RunReport, guardrail::service::ServiceError>,
        >,
    >,
}

/// One consumed output record.
#[derive(Debug, Clone)]
pub struct Out {
    pub topic: String,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: HashMap<String, String>,
}

impl Out {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).expect("output is JSON")
    }
}

/// The default config with `edit` applied, pointed at a fresh mock cluster.
pub async fn start(edit: impl FnOnce(&mut Config)) -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_on(listener, edit).await
}

/// As [`start`], serving the API on `listener` (bound beforehand, so that other instances
/// can be told its address).
pub async fn start_on(
    listener: tokio::net::TcpListener,
    edit: impl FnOnce(&mut Config),
) -> Harness {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = MockCluster::new(1).expect("mock cluster");
    let mut cfg = Config::from_str_named(guardrail::demo::DEFAULT_CONFIG, "config/guardrail.toml")
        .expect("default config is valid");
    let t = &cfg.kafka.topics;
    cluster.create_topic(&t.events, 4, 1).unwrap();
    for topic in &t.all()[1..] {
        cluster.create_topic(topic, 1, 1).unwrap();
    }
    cfg.kafka.bootstrap_servers = cluster.bootstrap_servers();
    cfg.kafka.group_id = format!("guardrail-test-{}", rand_suffix());
    cfg.kafka
        .options
        .insert("fetch.wait.max.ms".into(), "10".into());
    cfg.signing.secret = Some(SECRET.into());
    cfg.signing.secret_env = None;
    edit(&mut cfg);
    let http = format!("http://{}", listener.local_addr().unwrap());
    cfg.service.public_url = http.clone();
    let state = guardrail::service::new_state();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let svc = tokio::spawn(guardrail::service::run(
        cfg.clone(),
        listener,
        state.clone(),
        async move {
            let _ = rx.await;
        },
    ));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .create()
        .unwrap();
    Harness {
        cluster,
        cfg,
        state,
        http,
        producer,
        stop: Some(tx),
        svc: Some(svc),
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

impl Harness {
    pub async fn send(&self, topic: &str, key: &[u8], value: &[u8]) {
        guardrail::demo::produce_nowait(&self.producer, topic, key, value).await;
    }

    pub async fn send_event(&self, value: &[u8]) {
        let t = self.cfg.kafka.topics.events.clone();
        self.send(&t, b"k", value).await;
    }

    /// An event no metric reads, stamped `ts`: moves event time forward so the test can wait
    /// for the engine to reach a known point even when real traffic is thin.
    pub async fn heartbeat(&self, ts: i64) {
        let v = format!(r#"{{"type":"heartbeat","ts":{ts}}}"#);
        self.send_event(v.as_bytes()).await;
    }

    pub async fn send_change(&self, value: &str) {
        let t = self.cfg.kafka.topics.changes.clone();
        self.producer
            .send(
                FutureRecord::to(&t).key("c").payload(value),
                Duration::from_secs(10),
            )
            .await
            .expect("change delivered");
    }

    /// Produces the simulator's traffic up to `to_ms` in ticks of `step_ms`; after each tick a
    /// heartbeat at its end, then a wait until the engine has seen it, so decisions happen at
    /// the right simulated time. `tap` sees every event produced. Returns the messages produced
    /// (heartbeats included).
    pub async fn drive(
        &self,
        sim: &mut guardrail::sim::Sim,
        to_ms: i64,
        step_ms: i64,
        mut tap: impl FnMut(&[u8]),
    ) -> u64 {
        let topic = self.cfg.kafka.topics.events.clone();
        let mut produced = 0;
        let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        while sim.now_ms() < to_ms {
            let to = (sim.now_ms() + step_ms).min(to_ms);
            batch.clear();
            sim.advance(to, &mut |k, v| batch.push((k.to_vec(), v.to_vec())));
            for (k, v) in &batch {
                self.send(&topic, k, v).await;
                tap(v);
            }
            self.heartbeat(to - 1).await;
            produced += batch.len() as u64 + 1;
            assert!(
                self.wait_event_time(to - 1, Duration::from_secs(60)).await,
                "engine keeps up"
            );
        }
        produced
    }

    /// Waits until the engine has seen event time `ts` (or times out).
    pub async fn wait_event_time(&self, ts: i64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .state
                .latest_event_ms()
                .map(|t| t >= ts)
                .unwrap_or(false)
            {
                return true;
            }
            assert!(
                !self.svc.as_ref().unwrap().is_finished(),
                "the service stopped early"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Reads everything currently on `topics` (from the beginning), waiting `settle` for stragglers.
    pub fn read_all(&self, topics: &[&str], settle: Duration) -> Vec<Out> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.cluster.bootstrap_servers());
        read_topics(c, topics, settle)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(&format!("{}{}", self.http, path)).await
    }

    pub async fn stop(mut self) -> guardrail::service::RunReport {
        let _ = self.stop.take().unwrap().send(());
        let r = self
            .svc
            .take()
            .unwrap()
            .await
            .unwrap()
            .expect("service ran");
        drop(self.producer);
        r
    }
}

/// A minimal HTTP/1.1 GET over a real TCP connection.
pub async fn http_get(url: &str) -> (u16, String) {
    http(url, "GET", None, None).await
}

/// A minimal HTTP/1.1 request over a real TCP connection, with an optional bearer token and
/// JSON body.
pub async fn http(
    url: &str,
    method: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    let (status, _, body) = http_with(url, method, &headers, body).await;
    (status, body)
}

/// As [`http`], with any request headers; also returns the answer's headers (names in
/// lower case).
pub async fn http_with(
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, HashMap<String, String>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// The value of a Prometheus sample line `name{labels} value` in an exposition.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub const HOUR: i64 = 3_600_000;

/// 14:00 UTC on a fixed past Wednesday: the stories' traffic, and so their verdicts, are the
/// same on every run (a wall-clock-relative day would change the weekday and so the data).
pub fn story_afternoon() -> i64 {
    guardrail::event::parse_time_str("2026-11-04T14:00:00Z").expect("valid time")
}

/// The traffic of the end-to-end stories: seeded, 2,500 sessions a minute at the daily peak.
pub fn story_sim(start_ms: i64) -> guardrail::sim::Sim {
    guardrail::sim::Sim::new(
        guardrail::sim::Scenario {
            seed: 11,
            peak_sessions_per_min: 2500.0,
            ..Default::default()
        },
        start_ms,
    )
}

/// What [`play_story`] did.
#[derive(Debug, Clone, Copy)]
pub struct Story {
    pub change_ms: i64,
    pub rolled_back_ms: Option<i64>,
    pub end_ms: i64,
    /// Messages produced to the events topic (heartbeats included).
    pub produced: u64,
}

/// Plays the seed story through the running service: `warmup_hours` of normal traffic (set
/// `detection.warmup_windows` low enough, e.g. 48), then change `chg-0042` (tier autonomous,
/// FR+BE: clicks +30%, conversions -15%, tickets x3), rolled back `rollback_after_mins` later if
/// given (a `rolled_back` record on the changes topic, and the effect ends), until `after_hours`
/// after the change. Traffic is produced in 5-minute ticks, each followed by a heartbeat and a
/// wait until the engine has caught up, so decisions happen at the right simulated time.
pub async fn play_story(
    h: &Harness,
    warmup_hours: i64,
    after_hours: i64,
    rollback_after_mins: Option<i64>,
) -> Story {
    use guardrail::sim;
    let change_ms = story_afternoon();
    let start_ms = change_ms - warmup_hours * HOUR;
    let end_ms = change_ms + after_hours * HOUR;
    let mut sim = story_sim(start_ms);
    let mut produced = 0u64;
    let mut change_sent = false;
    let mut rolled_back_ms = None;
    while sim.now_ms() < end_ms {
        if !change_sent && sim.now_ms() >= change_ms {
            h.send_change(&sim::story_change("chg-0042", change_ms))
                .await;
            sim.scenario_mut()
                .effects
                .push(sim::story_effect("chg-0042", change_ms));
            change_sent = true;
        }
        if let Some(m) = rollback_after_mins {
            let at = change_ms + m * 60_000;
            if rolled_back_ms.is_none() && sim.now_ms() >= at {
                sim.end_effect("chg-0042", at);
                h.send_change(&sim::rolled_back_change("chg-0042", at, "test-automation"))
                    .await;
                rolled_back_ms = Some(at);
            }
        }
        let to = (sim.now_ms() + 5 * 60_000).min(end_ms);
        produced += h.drive(&mut sim, to, 5 * 60_000, |_| {}).await;
    }
    Story {
        change_ms,
        rolled_back_ms,
        end_ms,
        produced,
    }
}
/// An applied change of `tier` on checkout in FR and BE, by the copy-optimizer agent.
pub fn tiered_change(id: &str, ts: i64, tier: &str) -> String {
    serde_json::json!({
        "change_id": id, "ts": guardrail::event::fmt_time(ts), "action": "applied",
        "actor": {"kind": "agent", "name": "copy-optimizer-v3"}, "kind": "wording",
        "scope": {"surfaces": ["checkout"], "dims": {"country": ["FR", "BE"]}},
        "tier": tier, "owner": "team-web", "rollback": {"restore": format!("{id}-before")}
    })
    .to_string()
}

/// The simulated effect of a [`tiered_change`]: click-through and tickets multiplied in FR and BE.
pub fn tiered_effect(id: &str, at: i64, ctr: f64, tickets: f64) -> guardrail::sim::Effect {
    guardrail::sim::Effect {
        change_id: id.into(),
        countries: vec!["FR".into(), "BE".into()],
        start_ms: at,
        end_ms: None,
        ctr_mult: ctr,
        conversion_mult: 1.0,
        ticket_mult: tickets,
    }
}

/// Drives in 5-minute ticks until `to`, returning the first firing incident on a segment blamed on
/// `change` seen through the API with `token` (if any by then).
pub async fn drive_until_incident(
    h: &Harness,
    sim: &mut guardrail::sim::Sim,
    to: i64,
    change: &str,
    token: &str,
) -> Option<serde_json::Value> {
    let mut last = String::new();
    while sim.now_ms() < to {
        let next = sim.now_ms() + 5 * 60_000;
        h.drive(sim, next, 5 * 60_000, |_| {}).await;
        let (code, body) = http(
            &format!("{}/api/incidents", h.http),
            "GET",
            Some(token),
            None,
        )
        .await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let list = v
            .as_array()
            .cloned()
            .or_else(|| v["incidents"].as_array().cloned())
            .unwrap_or_default();
        if let Some(i) = list.into_iter().find(|i| {
            let i = if i["incident"].is_object() {
                &i["incident"]
            } else {
                i
            };
            // A segment's incident: the total also holds segments outside the change's scope,
            // so its decision goes to a person whatever the tier.
            i["status"] == "firing"
                && i["decision"]["change_id"] == change
                && i["series"].as_object().is_some_and(|s| !s.is_empty())
        }) {
            return Some(if i["incident"].is_object() {
                i["incident"].clone()
            } else {
                i
            });
        }
        last = body;
    }
    // One line per incident: what was there instead.
    let v: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
    let seen: Vec<String> = v["incidents"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            format!(
                "{} {} {} {} {} {}",
                i["metric"],
                i["label"],
                i["kind"],
                i["status"],
                i["decision"]["action"],
                i["decision"]["change_id"]
            )
        })
        .collect();
    eprintln!(
        "no incident for {change} by {}:\n{}",
        guardrail::event::fmt_time(to),
        seen.join("\n")
    );
    None
}

pub mod tansu;

/// Reads everything on `topics` from the beginning (every partition assigned, no group
/// coordination), until nothing new arrives for `settle`.
pub fn read_topics(c: ClientConfig, topics: &[&str], settle: Duration) -> Vec<Out> {
    let mut c = c;
    let c: BaseConsumer = c
        .set("group.id", format!("reader-{}", rand_suffix()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for t in topics {
        let md = c.fetch_metadata(Some(t), Duration::from_secs(10)).unwrap();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(t, p.id(), rdkafka::Offset::Beginning)
                .unwrap();
        }
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut last = Instant::now();
    let start = Instant::now();
    while last.elapsed() < settle && start.elapsed() < Duration::from_secs(60) {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last = Instant::now();
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_string(),
                                    String::from_utf8_lossy(x.value.unwrap_or(&[])).to_string(),
                                )
                            })
                            .collect::<HashMap<_, _>>()
                    })
                    .unwrap_or_default();
                out.push(Out {
                    topic: m.topic().to_string(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).to_string()),
                    value: m.payload().unwrap_or(&[]).to_vec(),
                    headers,
                });
            }
            Some(Err(e)) => panic!("read: {e}"),
            None => {}
        }
    }
    out
}
