//! Tansu (<https://tansu.io>), a Kafka-compatible broker, as a real process on loopback for the
//! tests that need a broker outside the process: consumer groups over the network, a broker that
//! stops and comes back, TLS and SASL/SCRAM.
//!
//! [`Tansu::start`] finds the `tansu` binary (on `PATH` or in `~/.cargo/bin`; install it with
//! `cargo install tansu --locked --features dynostore,libsql`). When it is missing the test is
//! skipped with a printed reason, except under CI (env `CI` set), where a missing broker fails
//! the test: CI never skips.
//!
//! Tansu 0.6 has no transactions (EndTxn), so guardrail runs against it with
//! `[kafka] delivery = "at_least_once"` (idempotent, non-transactional producer). Its broker accepts `--cert/--key` but serves plain TCP, so TLS
//! is put in front of it by [`TlsProxy`] (a TLS-terminating proxy, as a load balancer or a
//! stunnel sidecar would be); SASL/SCRAM is Tansu's own (`--authentication`, users made by
//! `tansu user create`, stored by the sqlite engine only).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guardrail::api::ApiState;
use guardrail::config::{Config, TopicsConfig};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use super::Out;

/// The signing secret of the services started here.
pub const SECRET: &str = super::SECRET;

/// The `tansu` binary: `TANSU_BIN`, then `PATH`, then `~/.cargo/bin/tansu`. `None` (with the
/// reason printed) when it is missing outside CI; a panic when it is missing under CI.
pub fn tansu_bin() -> Option<PathBuf> {
    let candidates = std::env::var_os("TANSU_BIN")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join("tansu"))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        )
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu")));
    for c in candidates {
        if c.is_file() {
            return Some(c);
        }
    }
    missing(
        "tansu",
        "cargo install tansu --locked --features dynostore,libsql",
    )
}

/// Another program a test needs (`openssl`, `kcat`): on `PATH`, or skip/panic like [`tansu_bin`].
pub fn program(name: &str, install: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    });
    found.or_else(|| missing(name, install))
}

fn missing(name: &str, install: &str) -> Option<PathBuf> {
    if std::env::var_os("CI").is_some() {
        panic!("`{name}` not found (PATH, ~/.cargo/bin) and CI is set: CI must not skip. Install it: {install}");
    }
    eprintln!("SKIPPED: `{name}` not found on PATH or in ~/.cargo/bin. Install it to run this test: {install}");
    None
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A random suffix for topic, group and user names.
pub fn rand_name(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Where a broker keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// `memory://tansu/`: lost when the broker stops.
    Memory,
    /// `sqlite://tansu.db` in the broker's directory: kept across restarts.
    Sqlite,
}

/// A Tansu broker process on a loopback port, in its own temporary directory. Killed on drop.
pub struct Tansu {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    storage: Storage,
    /// Host:port given to clients in metadata (the TLS proxy's, when there is one).
    advertised: String,
    authentication: bool,
    child: Option<Child>,
    starts: u32,
    /// librdkafka options the harness's own clients need (SASL once authentication is on).
    pub client_options: Vec<(String, String)>,
}

impl Tansu {
    /// Starts a broker, or returns `None` (skip) when tansu is not installed outside CI.
    pub fn start(storage: Storage) -> Option<Tansu> {
        let bin = tansu_bin()?;
        let port = free_port();
        let mut t = Tansu {
            bin,
            dir: tempfile::Builder::new().prefix("tansu-").tempdir().unwrap(),
            port,
            storage,
            advertised: format!("127.0.0.1:{port}"),
            authentication: false,
            child: None,
            starts: 0,
            client_options: Vec::new(),
        };
        t.spawn();
        t.wait_ready(Duration::from_secs(30));
        Some(t)
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        self.starts += 1;
        let log = std::fs::File::create(self.dir.path().join(format!("tansu.{}.log", self.starts)))
            .unwrap();
        let storage = match self.storage {
            Storage::Memory => "memory://tansu/".to_string(),
            Storage::Sqlite => "sqlite://tansu.db".to_string(),
        };
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(self.dir.path())
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{}", self.advertised))
            .arg("--storage-engine")
            .arg(storage)
            .env(
                "RUST_LOG",
                std::env::var("TANSU_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if self.authentication {
            cmd.arg("--authentication");
        }
        self.child = Some(cmd.spawn().expect("start tansu broker"));
    }

    /// The broker's output of its latest start (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("tansu.{}.log", self.starts)))
            .unwrap_or_default()
    }

    /// The last `n` lines of [`Self::log`].
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// A librdkafka client config for this broker, with [`Self::client_options`].
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap());
        for (k, v) in &self.client_options {
            c.set(k, v);
        }
        c
    }

    /// Waits until the broker answers a metadata request (panics with its log after `timeout`).
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        // Nothing to ask before the port is open.
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if !self.is_running() {
                panic!("tansu exited at startup:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {} within {timeout:?}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let c: BaseConsumer = self.client_config().create().unwrap();
        loop {
            match c.fetch_metadata(None, Duration::from_secs(2)) {
                Ok(md) if !md.brokers().is_empty() => return,
                r => assert!(
                    Instant::now() < deadline,
                    "tansu did not answer metadata within {timeout:?} ({:?}):\n{}",
                    r.err(),
                    self.log()
                ),
            }
            assert!(self.is_running(), "tansu exited:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn cli(&self, args: &[&str]) {
        let out = Command::new(&self.bin)
            .current_dir(self.dir.path())
            .args(args)
            .output()
            .expect("run tansu");
        assert!(
            out.status.success(),
            "tansu {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates `name` with `partitions` (`tansu topic create`) and waits until metadata has it.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        let broker = format!("tcp://{}", self.bootstrap());
        self.cli(&[
            "topic",
            "create",
            "--broker",
            &broker,
            "--partitions",
            &partitions.to_string(),
            name,
        ]);
        let c: BaseConsumer = self.client_config().create().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = c
                .fetch_metadata(Some(name), Duration::from_secs(2))
                .ok()
                .and_then(|md| {
                    md.topics()
                        .iter()
                        .find(|t| t.name() == name && t.error().is_none())
                        .map(|t| t.partitions().len())
                })
                .unwrap_or(0);
            if n == partitions as usize {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "topic {name} has {n} partitions, not {partitions}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Six random-named topics for guardrail, the events topic with `events_partitions`.
    pub fn guardrail_topics(&self, events_partitions: i32) -> TopicsConfig {
        let base = rand_name("gr");
        let t = TopicsConfig {
            events: format!("{base}.events"),
            changes: format!("{base}.changes"),
            alerts: format!("{base}.alerts"),
            rollbacks: format!("{base}.rollbacks"),
            audit: format!("{base}.audit"),
            dlq: format!("{base}.dlq"),
            repartition: format!("{base}.repartition"),
        };
        self.create_topic(&t.events, events_partitions);
        for name in &t.all()[1..] {
            self.create_topic(name, 1);
        }
        t
    }

    /// A SCRAM user (`tansu user create`, 8192 iterations). The broker must be running without
    /// authentication (its CLI does not log in); the sqlite engine keeps it across a restart.
    pub fn create_user(&self, name: &str, password: &str, mechanism: &str) {
        assert_eq!(
            self.storage,
            Storage::Sqlite,
            "only sqlite storage keeps users"
        );
        let broker = format!("tcp://{}", self.bootstrap());
        self.cli(&[
            "user",
            "create",
            "--broker",
            &broker,
            "--iterations",
            "8192",
            "--mechanism",
            mechanism,
            name,
            password,
        ]);
    }

    /// Stops the broker: SIGTERM, then SIGKILL if it has not exited within 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the broker at once (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port and storage and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready(Duration::from_secs(30));
    }

    /// Restarts with SASL authentication required; `client_options` are what the harness's
    /// own clients (readiness checks, readers) log in with from now on.
    pub fn restart_authenticated(&mut self, client_options: Vec<(String, String)>) {
        self.authentication = true;
        self.client_options = client_options;
        self.restart();
    }

    /// Advertises `host:port` (a proxy in front of the broker) from the next start on.
    pub fn set_advertised(&mut self, host_port: &str) {
        self.advertised = host_port.to_string();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The default config pointed at `bootstrap` and `topics`, with a random consumer group, a
/// signing secret, a short fetch wait and an HTTP port of its own. Delivery is
/// `at_least_once`: Tansu 0.6 has no transactions (EndTxn), so the idempotent producer.
pub fn config(bootstrap: &str, topics: &TopicsConfig) -> Config {
    let mut cfg = Config::from_str_named(guardrail::demo::DEFAULT_CONFIG, "config/guardrail.toml")
        .expect("default config is valid");
    cfg.kafka.delivery = guardrail::config::Delivery::AtLeastOnce;
    cfg.kafka.bootstrap_servers = bootstrap.to_string();
    cfg.kafka.topics = topics.clone();
    cfg.kafka.group_id = rand_name("guardrail-test");
    cfg.kafka
        .options
        .insert("fetch.wait.max.ms".into(), "50".into());
    cfg.signing.secret = Some(SECRET.into());
    cfg.signing.secret_env = None;
    let port = free_port();
    cfg.http.listen = format!("127.0.0.1:{port}");
    cfg.service.public_url = format!("http://127.0.0.1:{port}");
    cfg
}

/// guardrail's `service::run` in process, against a broker of this file.
pub struct Service {
    pub cfg: Config,
    pub state: Arc<ApiState>,
    pub http: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    svc: Option<
        tokio::task::JoinHandle<
            Result<guardrail::service::RunReport, guardrail::service::ServiceError>,
        >,
    >,
}

impl Service {
    pub async fn start(cfg: Config) -> Service {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let listener = tokio::net::TcpListener::bind(&cfg.http.listen)
            .await
            .unwrap();
        let http = format!("http://{}", listener.local_addr().unwrap());
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
        Service {
            cfg,
            state,
            http,
            stop: Some(tx),
            svc: Some(svc),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        super::http_get(&format!("{}{}", self.http, path)).await
    }

    /// The value of one sample on `/metrics` (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, m) = self.get("/metrics").await;
        super::metric_value(&m, series).unwrap_or(0.0)
    }

    /// Panics if the service has stopped (it must not, whatever the broker does).
    pub fn assert_running(&self) {
        let svc = self.svc.as_ref().expect("service handle");
        assert!(!svc.is_finished(), "the service stopped");
    }

    /// Waits until the engine has seen event time `ts`.
    pub async fn wait_event_time(&self, ts: i64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.state.latest_event_ms().is_some_and(|t| t >= ts) {
                return true;
            }
            self.assert_running();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Waits until `/readyz` answers `code` (200 ready, 503 not); the last body either way.
    pub async fn wait_ready(&self, code: u16, timeout: Duration) -> (bool, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let (c, body) = self.get("/readyz").await;
            if c == code {
                return (true, body);
            }
            if Instant::now() >= deadline {
                return (false, body);
            }
            self.assert_running();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(mut self) -> guardrail::service::RunReport {
        let _ = self.stop.take().unwrap().send(());
        self.svc
            .take()
            .unwrap()
            .await
            .unwrap()
            .expect("service ran")
    }
}

/// A producer that keeps every delivery report, so a test can require that everything it
/// produced was acknowledged (none dropped while the broker was away).
pub struct Producer {
    pub producer: FutureProducer,
    /// (index in `topics`, delivery report) of what is not yet awaited.
    pending: Vec<(usize, DeliveryFuture)>,
    topics: Vec<String>,
    /// The highest offset acknowledged per (topic, partition).
    pub last_offsets: HashMap<(String, i32), i64>,
    pub produced: u64,
    heartbeats: u64,
}

impl Producer {
    pub fn new(mut c: ClientConfig) -> Producer {
        let producer = c
            .set("linger.ms", "5")
            .set("enable.idempotence", "true")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("message.timeout.ms", "300000")
            .create()
            .unwrap();
        Producer {
            producer,
            pending: Vec::new(),
            topics: Vec::new(),
            last_offsets: HashMap::new(),
            produced: 0,
            heartbeats: 0,
        }
    }

    /// Queues one message (waits while librdkafka's queue is full).
    pub async fn send(&mut self, topic: &str, key: &[u8], value: &[u8]) {
        self.send_to(topic, None, key, value).await
    }

    pub async fn send_to(&mut self, topic: &str, partition: Option<i32>, key: &[u8], value: &[u8]) {
        let ti = match self.topics.iter().position(|t| t == topic) {
            Some(i) => i,
            None => {
                self.topics.push(topic.to_string());
                self.topics.len() - 1
            }
        };
        loop {
            let mut r = FutureRecord::to(topic).key(key).payload(value);
            if let Some(p) = partition {
                r = r.partition(p);
            }
            match self.producer.send_result(r) {
                Ok(f) => {
                    self.pending.push((ti, f));
                    self.produced += 1;
                    return;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => tokio::time::sleep(Duration::from_millis(2)).await,
                Err((e, _)) => panic!("produce to {topic}: {e}"),
            }
        }
    }

    /// An event no metric reads, stamped `ts`, with an id of its own (so that a re-delivered
    /// copy is dropped as a duplicate like any event): moves event time forward.
    pub async fn heartbeat(&mut self, topic: &str, ts: i64) {
        self.heartbeats += 1;
        let v = format!(
            r#"{{"type":"heartbeat","ts":{ts},"id":"hb-{}"}}"#,
            self.heartbeats
        );
        self.send(topic, b"hb", v.as_bytes()).await;
    }

    /// Messages queued whose delivery report has not been awaited yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Awaits every delivery report so far; panics on the first failure.
    pub async fn delivered(&mut self) {
        for (ti, f) in self.pending.drain(..) {
            match f.await {
                Ok(Ok(d)) => {
                    let last = self
                        .last_offsets
                        .entry((self.topics[ti].clone(), d.partition))
                        .or_insert(-1);
                    *last = (*last).max(d.offset);
                }
                Ok(Err((e, _))) => panic!("a message was not delivered: {e}"),
                Err(_) => panic!("a delivery report was dropped"),
            }
        }
    }
}

/// Reads everything on `topics` from the beginning, until nothing new arrives for `settle`.
pub fn read_all(c: ClientConfig, topics: &[&str], settle: Duration) -> Vec<Out> {
    super::read_topics(c, topics, settle)
}

/// `guardrail run` as a child process (what a user runs), with JSON logs captured to a file.
/// Killed on drop.
pub struct Process {
    pub cfg: Config,
    pub http: String,
    child: Option<Child>,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Writes `cfg` to a file and starts `guardrail run --config FILE --log-format json`, with
    /// `env` added to its environment.
    pub fn start(cfg: Config, env: &[(&str, &str)]) -> Process {
        let dir = tempfile::Builder::new()
            .prefix("guardrail-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("guardrail.toml");
        std::fs::write(&path, toml::to_string(&cfg).expect("config serializes")).unwrap();
        let log_path = dir.path().join("guardrail.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_guardrail"));
        cmd.args(["--log-format", "json", "run", "--config"])
            .arg(&path)
            .env_remove("GUARDRAIL_SIGNING_SECRET")
            .env(
                "RUST_LOG",
                std::env::var("GUARDRAIL_TEST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start guardrail");
        Process {
            http: format!("http://{}", cfg.http.listen),
            cfg,
            child: Some(child),
            log_path,
            _dir: dir,
        }
    }

    /// Everything the process wrote so far (JSON log lines, and the final error if any).
    pub fn output(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The JSON log lines so far.
    pub fn logs(&self) -> Vec<serde_json::Value> {
        let Ok(f) = std::fs::File::open(&self.log_path) else {
            return Vec::new();
        };
        std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    /// The events partitions of the latest "partitions assigned" log line, if any.
    pub fn assigned_events_partitions(&self) -> Option<Vec<i32>> {
        let prefix = format!("{}/", self.cfg.kafka.topics.events);
        self.logs()
            .iter()
            .rev()
            .find(|l| l["fields"]["message"] == "partitions assigned")
            .map(|l| {
                let text = l["fields"]["partitions"].as_str().unwrap_or("").to_string();
                let mut ps: Vec<i32> = text
                    .split('"')
                    .filter_map(|s| s.strip_prefix(&prefix))
                    .filter_map(|p| p.parse().ok())
                    .collect();
                ps.sort_unstable();
                ps
            })
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Waits for the process to end by itself within `timeout`; kills it otherwise.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        None
    }

    /// Graceful stop: SIGTERM, and the exit status (SIGKILL after 20 s).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        self.wait_exit(Duration::from_secs(20))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        super::http_get(&format!("{}{}", self.http, path)).await
    }

    /// The value of one sample on `/metrics` (`None` while the API does not answer).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        if TcpStream::connect(&self.cfg.http.listen).is_err() {
            return None;
        }
        let (_, m) = self.get("/metrics").await;
        Some(super::metric_value(&m, series).unwrap_or(0.0))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TLS-terminating proxy on a loopback port: TLS from clients (with `cert`/`key`), plain TCP
/// to `upstream`. Runs on its own thread and runtime; stops on drop.
pub struct TlsProxy {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsProxy {
    pub fn start(cert: &Path, key: &Path, upstream: SocketAddr) -> TlsProxy {
        use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
        b.set_certificate_chain_file(cert).unwrap();
        b.set_private_key_file(key, SslFiletype::PEM).unwrap();
        b.check_private_key().unwrap();
        let acceptor = Arc::new(b.build());
        let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        a = listener.accept() => {
                            let Ok((client, _)) = a else { continue };
                            let acceptor = acceptor.clone();
                            tokio::spawn(async move {
                                let _ = proxy_one(acceptor, client, upstream).await;
                            });
                        }
                    }
                }
            });
            rt.shutdown_background();
        });
        TlsProxy {
            port,
            stop: Some(tx),
            thread: Some(thread),
        }
    }
}

async fn proxy_one(
    acceptor: Arc<openssl::ssl::SslAcceptor>,
    client: tokio::net::TcpStream,
    upstream: SocketAddr,
) -> std::io::Result<()> {
    let _ = client.set_nodelay(true);
    let ssl = openssl::ssl::Ssl::new(acceptor.context()).map_err(std::io::Error::other)?;
    let mut tls = tokio_openssl::SslStream::new(ssl, client).map_err(std::io::Error::other)?;
    std::pin::Pin::new(&mut tls)
        .accept()
        .await
        .map_err(std::io::Error::other)?;
    let mut up = tokio::net::TcpStream::connect(upstream).await?;
    let _ = up.set_nodelay(true);
    tokio::io::copy_bidirectional(&mut tls, &mut up).await?;
    Ok(())
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A CA, and a server certificate it signs for `127.0.0.1` / `localhost`, made with the
/// `openssl` CLI in `dir`: `ca.pem`, `server.pem`, `server.key`.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn generate(openssl: &Path, dir: &Path, name: &str) -> Pki {
        let run = |args: &[&str]| {
            let out = Command::new(openssl)
                .current_dir(dir)
                .args(args)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ca_key = format!("{name}-ca.key");
        let ca = format!("{name}-ca.pem");
        let key = format!("{name}-server.key");
        let csr = format!("{name}-server.csr");
        let cert = format!("{name}-server.pem");
        let ext = format!("{name}-server.ext");
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-keyout",
            &ca_key,
            "-out",
            &ca,
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        let mut f = std::fs::File::create(dir.join(&ext)).unwrap();
        writeln!(
            f,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE"
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ]);
        Pki {
            ca: dir.join(ca),
            cert: dir.join(cert),
            key: dir.join(key),
        }
    }
}
