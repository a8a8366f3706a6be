//! Checkpoints through the real service on the embedded broker: a damaged checkpoint is
//! reported, moved aside and never trusted; a pending checkpoint whose transaction did not
//! commit is discarded; a clean stop leaves a checkpoint that restores. Across restarts on one
//! broker: a damaged current checkpoint falls back to the previous generation and its input is
//! read again; an edit of one metric keeps the state of the others.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{metric_value, start, story_afternoon, HOUR};
use guardrail::api::ApiState;
use guardrail::checkpoint;
use guardrail::config::{Config, MetricConfig, Seasonality};
use guardrail::engine::Engine;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer};

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_checkpoints_are_reported_and_moved_aside_then_a_clean_stop_writes_one() {
    capture_logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("state");
    let d = dir.clone();
    let h = start(move |c| {
        c.detection.warmup_windows = 48;
        c.state.dir = Some(d.display().to_string());
        c.state.checkpoint_interval_secs = 1;
        std::fs::create_dir_all(&d).unwrap();
        // Not a checkpoint at all.
        std::fs::write(
            d.join(checkpoint::FILE_NAME),
            b"PAR1 this is a parquet file",
        )
        .unwrap();
        // A pending checkpoint for offsets the group never committed: its transaction did
        // not commit, so it must be dropped (not promoted, not reported as damage).
        let mut e = Engine::new(c).unwrap();
        let pending = e.checkpoint(vec![(c.kafka.topics.events.clone(), 0, 999_999)], 0);
        std::fs::write(d.join(checkpoint::PENDING_NAME), pending).unwrap();
    })
    .await;
    let change_ms = story_afternoon();
    let mut sim = common::story_sim(change_ms - 2 * HOUR);
    h.drive(&mut sim, change_ms - HOUR, 5 * 60_000, |_| {})
        .await;

    let (_, m) = h.get("/metrics").await;
    assert_eq!(
        metric_value(
            &m,
            "guardrail_checkpoint_errors_total{reason=\"bad_magic\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(metric_value(&m, "guardrail_checkpoint_restored"), Some(0.0));
    assert_eq!(
        metric_value(&m, "guardrail_delivery_mode{mode=\"exactly_once\"}"),
        Some(1.0)
    );
    assert!(metric_value(&m, "guardrail_transactions_total{result=\"committed\"}").unwrap() > 0.0);
    let names = files(&dir);
    assert!(
        names.iter().any(|n| n.starts_with("engine.ckpt.rejected-")),
        "the damaged file is kept aside: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n == checkpoint::PENDING_NAME),
        "the uncommitted pending checkpoint is gone: {names:?}"
    );
    // Periodic checkpoints while running (interval 1 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric_value(
        &h.get("/metrics").await.1,
        "guardrail_checkpoint_writes_total",
    )
    .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cfg = h.cfg.clone();
    let report = h.stop().await;

    // The checkpoint left by the clean stop restores into a fresh engine, with the input
    // offsets it corresponds to.
    let mut e = Engine::new(&cfg).unwrap();
    let loaded = checkpoint::read(&dir, checkpoint::FILE_NAME, e.state_fingerprint())
        .unwrap()
        .expect("a checkpoint after a clean stop");
    let r = e
        .restore(&dir.join(checkpoint::FILE_NAME), &loaded)
        .unwrap();
    assert!(r.series > 10, "{r:?}");
    let events_read: i64 = r
        .offsets
        .iter()
        .filter(|(t, _, _)| *t == cfg.kafka.topics.events)
        .map(|(_, _, o)| *o)
        .sum();
    assert_eq!(
        events_read as u64, report.events,
        "the checkpoint's offsets cover exactly what the engine read"
    );
}

/// What the service logs, kept for the tests that check what it says.
static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let logs = LOGS.get_or_init(Default::default);
        logs.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installed first thing in every test of this file, so that it is the process's subscriber
/// (the harness's own then stays out).
fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("guardrail=info"))
        .with_ansi(false)
        .with_writer(|| Capture)
        .try_init();
}

/// The lines logged about state directory `dir` (tests run side by side, each with its own).
fn logged(dir: &Path) -> Vec<String> {
    let logs = LOGS.get_or_init(Default::default).lock().unwrap();
    let dir = dir.display().to_string();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains(&dir))
        .map(String::from)
        .collect()
}

const MIN: i64 = 60_000;

/// An embedded broker that outlives the service's incarnations, as a real one does, and the
/// state directory they share.
struct Broker {
    _cluster: MockCluster<'static, DefaultProducerContext>,
    _tmp: tempfile::TempDir,
    cfg: Config,
    dir: PathBuf,
    producer: FutureProducer,
    /// Messages produced to the events topic (heartbeats included).
    produced: u64,
}

impl Broker {
    fn new() -> Broker {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let mut cfg =
            Config::from_str_named(guardrail::demo::DEFAULT_CONFIG, "config/guardrail.toml")
                .unwrap();
        let t = &cfg.kafka.topics;
        cluster.create_topic(&t.events, 4, 1).unwrap();
        for topic in &t.all()[1..] {
            cluster.create_topic(topic, 1, 1).unwrap();
        }
        cfg.kafka.bootstrap_servers = cluster.bootstrap_servers();
        cfg.kafka.group_id = format!("guardrail-ckpt-{}", guardrail::event::now_ms());
        for (k, v) in [
            ("fetch.wait.max.ms", "10"),
            // The group waits this long for the last incarnation before the next one reads.
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "500"),
        ] {
            cfg.kafka.options.insert(k.into(), v.into());
        }
        cfg.signing.secret = Some(common::SECRET.into());
        cfg.signing.secret_env = None;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        cfg.state.dir = Some(dir.display().to_string());
        cfg.state.checkpoint_interval_secs = 1;
        let producer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("linger.ms", "5")
            .create()
            .unwrap();
        Broker {
            _cluster: cluster,
            _tmp: tmp,
            cfg,
            dir,
            producer,
            produced: 0,
        }
    }

    async fn send(&mut self, key: &[u8], value: &[u8]) {
        let topic = self.cfg.kafka.topics.events.clone();
        guardrail::demo::produce_nowait(&self.producer, &topic, key, value).await;
        self.produced += 1;
    }

    /// The simulator's next `step_ms` of traffic and a heartbeat at its end, which `svc` is
    /// waited for.
    async fn step(&mut self, svc: &Incarnation, sim: &mut guardrail::sim::Sim, step_ms: i64) {
        let to = sim.now_ms() + step_ms;
        let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        sim.advance(to, &mut |k, v| batch.push((k.to_vec(), v.to_vec())));
        for (k, v) in &batch {
            self.send(k, v).await;
        }
        self.heartbeat(svc, to - 1).await;
    }

    /// An event no metric reads, at `ts`; waits until `svc` has read it.
    async fn heartbeat(&mut self, svc: &Incarnation, ts: i64) {
        self.send(
            b"k",
            format!(r#"{{"type":"heartbeat","ts":{ts}}}"#).as_bytes(),
        )
        .await;
        svc.wait_until(|| svc.state.latest_event_ms().is_some_and(|t| t >= ts))
            .await;
    }

    /// Waits until `svc` has read everything produced since it started from `from`.
    async fn read_all(&self, svc: &Incarnation, from: u64) {
        svc.wait_metric("guardrail_events_received_total", |v| {
            v >= (self.produced - from) as f64
        })
        .await;
    }
}

/// One incarnation of the service on a [`Broker`].
struct Incarnation {
    state: Arc<ApiState>,
    http: String,
    stop: tokio::sync::oneshot::Sender<()>,
    svc: tokio::task::JoinHandle<
        Result<guardrail::service::RunReport, guardrail::service::ServiceError>,
    >,
}

impl Incarnation {
    async fn start(cfg: &Config) -> Incarnation {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = format!("http://{}", listener.local_addr().unwrap());
        let mut cfg = cfg.clone();
        cfg.service.public_url = http.clone();
        let state = guardrail::service::new_state();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let svc = tokio::spawn(guardrail::service::run(
            cfg,
            listener,
            state.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        Incarnation {
            state,
            http,
            stop,
            svc,
        }
    }

    async fn metric(&self, series: &str) -> Option<f64> {
        let (_, m) = common::http_get(&format!("{}/metrics", self.http)).await;
        metric_value(&m, series)
    }

    async fn wait_until(&self, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(!self.svc.is_finished(), "the service stopped early");
            assert!(Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the exported `series` satisfies `want`, and returns it.
    async fn wait_metric(&self, series: &str, want: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = self.metric(series).await.filter(|v| want(*v)) {
                return v;
            }
            assert!(!self.svc.is_finished(), "the service stopped early");
            assert!(Instant::now() < deadline, "timed out waiting for {series}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) -> guardrail::service::RunReport {
        let _ = self.stop.send(());
        self.svc.await.unwrap().expect("service ran")
    }
}

fn light_sim(start_ms: i64) -> guardrail::sim::Sim {
    guardrail::sim::Sim::new(
        guardrail::sim::Scenario {
            seed: 11,
            peak_sessions_per_min: 300.0,
            ..Default::default()
        },
        start_ms,
    )
}

/// The checkpoint files of `dir`: current, generations and those moved aside.
fn checkpoint_files(dir: &Path) -> Vec<String> {
    files(dir)
        .into_iter()
        .filter(|n| n.starts_with(checkpoint::FILE_NAME))
        .collect()
}

/// Restores `dir/name` into a fresh engine of `cfg`.
fn restored(cfg: &Config, dir: &Path, name: &str) -> (Engine, guardrail::engine::Restored) {
    let mut e = Engine::new(cfg).unwrap();
    let l = checkpoint::read(dir, name, e.state_fingerprint())
        .unwrap()
        .unwrap_or_else(|| panic!("{name} in {}", dir.display()));
    let r = e.restore(&dir.join(name), &l).unwrap();
    (e, r)
}

/// Events-topic messages the checkpoint `dir/name` covers (offsets start at 0).
fn covered(cfg: &Config, dir: &Path, name: &str) -> u64 {
    let (_, r) = restored(cfg, dir, name);
    r.offsets
        .iter()
        .filter(|(t, _, _)| *t == cfg.kafka.topics.events)
        .map(|(_, _, o)| *o as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_current_checkpoint_falls_back_to_the_previous_generation() {
    capture_logs();
    let mut b = Broker::new();
    let (cfg, dir) = (b.cfg.clone(), b.dir.clone());
    assert_eq!(cfg.state.generations, 3, "the default");
    let first = Incarnation::start(&cfg).await;
    let mut sim = light_sim(story_afternoon() - 2 * HOUR);
    // Checkpoints every second while input moves: enough of them to drop a generation.
    while first
        .metric("guardrail_checkpoint_writes_total")
        .await
        .unwrap_or(0.0)
        < 4.0
    {
        assert!(
            sim.now_ms() < story_afternoon() + 12 * HOUR,
            "no checkpoints"
        );
        b.step(&first, &mut sim, 5 * MIN).await;
    }
    b.step(&first, &mut sim, 5 * MIN).await;
    b.read_all(&first, 0).await;
    first.stop().await;
    let names = [
        checkpoint::FILE_NAME.to_string(),
        checkpoint::generation_name(1),
        checkpoint::generation_name(2),
    ];
    assert_eq!(checkpoint_files(&dir), names, "three generations, no more");
    let end = covered(&cfg, &dir, checkpoint::FILE_NAME);
    let (gen1, gen2) = (
        covered(&cfg, &dir, &names[1]),
        covered(&cfg, &dir, &names[2]),
    );
    assert_eq!(
        end, b.produced,
        "the clean stop's checkpoint covers everything read"
    );
    assert!(gen2 < gen1 && gen1 < end, "{gen2} < {gen1} < {end}");
    let (_, r1) = restored(&cfg, &dir, &names[1]);

    // One bit of the current file's payload flips on disk.
    let current = dir.join(checkpoint::FILE_NAME);
    let mut bytes = std::fs::read(&current).unwrap();
    *bytes.last_mut().unwrap() ^= 0x10;
    std::fs::write(&current, bytes).unwrap();
    let second = Incarnation::start(&cfg).await;
    second
        .wait_metric(
            "guardrail_checkpoint_fallbacks_total{generation=\"1\"}",
            |v| v == 1.0,
        )
        .await;
    assert_eq!(
        second
            .metric("guardrail_checkpoint_errors_total{reason=\"checksum\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        second.metric("guardrail_checkpoint_restored").await,
        Some(1.0)
    );
    let log = logged(&dir);
    assert!(
        log.iter()
            .any(|l| l.contains("restored an older checkpoint generation")
                && l.contains("file=engine.ckpt.1")
                && l.contains("\"checksum\"")),
        "{log:#?}"
    );
    let restored_line = format!("series={} ", r1.series);
    assert!(
        log.iter()
            .any(|l| l.contains("state restored from checkpoint")
                && l.contains(&restored_line)
                && l.contains("generation=1")),
        "{log:#?}"
    );
    // The input since generation 1 is read again: all of it, none twice, and on from there.
    b.step(&second, &mut sim, 5 * MIN).await;
    b.read_all(&second, gen1).await;
    let report = second.stop().await;
    assert_eq!(report.events, b.produced - gen1);
    assert_eq!(covered(&cfg, &dir, checkpoint::FILE_NAME), b.produced);
    // Rotated on from there, still three; the damaged file kept aside.
    let left = checkpoint_files(&dir);
    assert_eq!(left[..3], names, "{left:?}");
    assert_eq!(left.len(), 4, "{left:?}");
    assert!(left[3].starts_with("engine.ckpt.rejected-"), "{left:?}");
}

fn metric_mut<'a>(cfg: &'a mut Config, name: &str) -> &'a mut MetricConfig {
    cfg.metrics
        .iter_mut()
        .map(|m| m.get_mut())
        .find(|m| m.name == name)
        .unwrap()
}

/// Per metric name: its series (label, season buckets learnt), sorted.
fn state_by_metric(cfg: &Config, dir: &Path) -> HashMap<String, Vec<(String, usize)>> {
    restored(cfg, dir, checkpoint::FILE_NAME)
        .0
        .learnt_by_metric()
}

/// Starts `cfg` on the state left by the last incarnation, lets it read one heartbeat at
/// event time `ts` (no window closes: the state it checkpoints at its stop is the state it
/// restored) and stops it.
async fn restart(b: &mut Broker, cfg: &Config, ts: i64) {
    let svc = Incarnation::start(cfg).await;
    b.send(
        b"k",
        format!(r#"{{"type":"heartbeat","ts":{ts}}}"#).as_bytes(),
    )
    .await;
    svc.wait_metric("guardrail_events_received_total", |v| v >= 1.0)
        .await;
    svc.stop().await;
}

/// The `state=` said at startup for `metric`, each time.
fn fates(log: &[String], metric: &str) -> Vec<String> {
    let key = format!("metric={metric} state=");
    log.iter()
        .filter(|l| l.contains("metric state from the checkpoint"))
        .filter_map(|l| {
            let rest = &l[l.find(&key)? + key.len()..];
            Some(rest[..rest.find(" dir=")?].to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_of_one_metric_keeps_the_state_of_the_others() {
    capture_logs();
    let mut b = Broker::new();
    let (cfg, dir) = (b.cfg.clone(), b.dir.clone());
    let first = Incarnation::start(&cfg).await;
    let mut sim = light_sim(story_afternoon() - 3 * HOUR);
    while sim.now_ms() < story_afternoon() {
        b.step(&first, &mut sim, 10 * MIN).await;
    }
    b.read_all(&first, 0).await;
    first.stop().await;
    let before = state_by_metric(&cfg, &dir);
    let ts = sim.now_ms() - 1;
    let names: Vec<String> = cfg.metrics().map(|m| m.name.clone()).collect();
    for m in &names {
        assert!(
            before[m].iter().any(|(_, learnt)| *learnt > 0),
            "{m} has learnt: {before:?}"
        );
    }

    // An owner (and a severity) edited: everything is kept, nothing learnt again.
    let mut owner = cfg.clone();
    let m = metric_mut(&mut owner, "conversion_rate");
    m.owner = Some("team-checkout".into());
    m.severity = guardrail::config::Severity::Info;
    restart(&mut b, &owner, ts).await;
    assert_eq!(state_by_metric(&owner, &dir), before);
    let log = logged(&dir);
    for m in &names {
        assert_eq!(fates(&log, m), ["kept"], "{m}: {log:#?}");
    }
    let total: usize = before.values().map(Vec::len).sum();
    assert!(
        log.iter()
            .any(|l| l.contains("state restored from checkpoint")
                && l.contains(&format!("series={total} "))),
        "{log:#?}"
    );

    // One metric's seasonality edited and a metric added before the others: that one starts
    // again, the new one starts fresh, the others keep everything (under new indices).
    let mut edited = owner.clone();
    metric_mut(&mut edited, "click_through_rate")
        .detection
        .seasonality = Some(Seasonality::None);
    let added: MetricConfig = toml::from_str(
        "name = \"tickets\"\nkind = \"count\"\nnumerator = { type = \"support_ticket\" }\n",
    )
    .unwrap();
    edited.metrics.insert(0, toml::Spanned::new(0..0, added));
    restart(&mut b, &edited, ts).await;
    let after = state_by_metric(&edited, &dir);
    for m in names.iter().filter(|m| *m != "click_through_rate") {
        assert_eq!(after[m], before[m], "{m}");
    }
    for m in ["click_through_rate", "tickets"] {
        assert_eq!(after[m], [("total".to_string(), 0)], "{m}");
    }
    let log = logged(&dir);
    assert_eq!(
        fates(&log, "click_through_rate"),
        ["kept", "reset (detection changed)"]
    );
    assert_eq!(
        fates(&log, "tickets"),
        ["new (not in the checkpoint): starts fresh"]
    );
    assert_eq!(fates(&log, "conversion_rate"), ["kept", "kept"]);
}
