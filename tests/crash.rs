//! Crash test: `guardrail run` as a child process against librdkafka's mock cluster hosted by
//! this test process (so the broker outlives every crash), under continuous load, killed with
//! SIGKILL at random moments and restarted. Afterwards, read with `read_committed`: each injected
//! harmful change has exactly one rollback request, every firing alert is there exactly once,
//! and no alert blames anything but an injected change (no cold-start false alarm). One of the
//! interruptions leaves a zombie instead: the old incarnation is paused while a new one takes
//! over, then resumed; it must stop by itself, fenced, having decided nothing twice.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guardrail::config::Config;
use guardrail::sim::{Scenario, Sim};
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};

const HOUR: i64 = 3_600_000;
const MIN: i64 = 60_000;
/// The mock broker keeps about 5 MB per partition: enough partitions that nothing produced
/// during the test is dropped before it is read back after a restart.
const PARTITIONS: i32 = 12;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Service {
    cfg: Config,
    /// The HTTP port of the current incarnation.
    port: u16,
    log_dir: std::path::PathBuf,
    starts: usize,
    child: Option<Child>,
}

impl Service {
    fn start(&mut self) {
        self.starts += 1;
        self.cfg.http.listen = format!("127.0.0.1:{}", self.port);
        self.cfg.service.public_url = format!("http://127.0.0.1:{}", self.port);
        let cfg_path = self.log_dir.join(format!("guardrail-{}.toml", self.starts));
        std::fs::write(&cfg_path, toml::to_string(&self.cfg).unwrap()).unwrap();
        let log =
            std::fs::File::create(self.log_dir.join(format!("run-{}.log", self.starts))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_guardrail"))
            .args(["run", "--config"])
            .arg(&cfg_path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("guardrail starts");
        self.child = Some(child);
    }

    /// A zombie: the running incarnation is paused (SIGSTOP, as a long GC pause or a network
    /// partition leaves a process) and a new one starts with the same identity, on a fresh
    /// port since the paused one still holds its own. Returns the paused one and its log.
    fn pause_and_replace(&mut self) -> (Child, std::path::PathBuf) {
        let old = self.child.take().unwrap();
        signal(&old, "-STOP");
        let log = self.log_dir.join(format!("run-{}.log", self.starts));
        self.port = free_port();
        self.start();
        (old, log)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                c.kill().unwrap();
                panic!("guardrail did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.log_dir.join(format!("run-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn signal(c: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &c.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig}");
}

fn metric(port: u16, name: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).ok()?;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn read_committed(bootstrap: &str, topic: &str) -> Vec<serde_json::Value> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "crash-reader")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(3) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            last = Instant::now();
            out.push(serde_json::from_slice(m.payload().unwrap()).unwrap());
        }
    }
    out
}

#[test]
fn kill_nine_under_load_loses_and_doubles_nothing() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let cluster: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let keep = std::env::var("CRASH_KEEP").is_ok();
    // CRASH_KEEP=1 keeps the config, the logs of every incarnation and the checkpoints.
    let dir = tempfile::Builder::new()
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    eprintln!("crash test dir: {}", dir.path().display());
    let mut cfg =
        Config::from_str_named(guardrail::demo::DEFAULT_CONFIG, "config/guardrail.toml").unwrap();
    let t = cfg.kafka.topics.clone();
    cluster.create_topic(&t.events, PARTITIONS, 1).unwrap();
    for topic in &t.all()[1..] {
        cluster.create_topic(topic, 1, 1).unwrap();
    }
    cfg.kafka.bootstrap_servers = bootstrap.clone();
    cfg.kafka.group_id = "guardrail-crash".into();
    for (k, v) in [
        ("fetch.wait.max.ms", "10"),
        // A killed member's partitions move on after this long.
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
    ] {
        cfg.kafka.options.insert(k.into(), v.into());
    }
    cfg.service.instance = "crash-1".into();
    cfg.signing.secret = Some("crash-secret".into());
    cfg.signing.secret_env = None;
    cfg.detection.warmup_windows = 48;
    cfg.state.dir = Some(dir.path().join("state").display().to_string());
    cfg.state.checkpoint_interval_secs = 3;
    let state_dir = cfg.state.dir.clone().unwrap();

    let mut svc = Service {
        cfg: cfg.clone(),
        port: free_port(),
        log_dir: dir.path().to_path_buf(),
        starts: 0,
        child: None,
    };
    svc.start();

    // Continuous load: 4.5 hours of warm-up, then three harmful changes 90 minutes apart, each
    // hurting conversions and tickets in its own countries for an hour, all in event time at
    // 5 simulated minutes per 1.2 s, while guardrail is killed every 9 to 15 s (a restarted
    // consumer waits ~11 s for the mock broker to expire the killed member's session).
    let first = guardrail::event::parse_time_str("2026-11-04T14:00:00Z").unwrap();
    let start_ms = first - 9 * HOUR / 2;
    let changes = [
        ("chg-c1", first, vec!["FR", "BE"]),
        ("chg-c2", first + 3 * HOUR / 2, vec!["DE", "BE"]),
        ("chg-c3", first + 3 * HOUR, vec!["UK", "US"]),
    ];
    let end_ms = first + 9 * HOUR / 2;
    let done = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicI64::new(0));
    let load = {
        let bootstrap = bootstrap.clone();
        let (done, produced) = (done.clone(), produced.clone());
        let (events, changes_topic) = (t.events.clone(), t.changes.clone());
        let changes = changes.clone();
        std::thread::spawn(move || {
            let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("linger.ms", "5")
                .set("queue.buffering.max.messages", "1000000")
                .create()
                .unwrap();
            let send = |topic: &str, key: &[u8], v: &[u8], part: Option<i32>| {
                guardrail::demo::produce_blocking(&p, topic, key, v, part).expect("enqueued")
            };
            let mut sim = Sim::new(
                Scenario {
                    seed: 23,
                    peak_sessions_per_min: 300.0,
                    ..Default::default()
                },
                start_ms,
            );
            let mut next = 0;
            let mut n = 0i64;
            while sim.now_ms() < end_ms {
                if next < changes.len() && sim.now_ms() >= changes[next].1 {
                    let (id, at, countries) = &changes[next];
                    let (record, effect) = guardrail::sim::harmful_change(
                        id,
                        *at,
                        "journey-optimizer",
                        countries,
                        0.6,
                        4.0,
                    );
                    send(&changes_topic, b"c", record.as_bytes(), None);
                    sim.scenario_mut().effects.push(effect);
                    next += 1;
                }
                let to = sim.now_ms() + 5 * MIN;
                sim.advance(to, &mut |k, v| {
                    send(&events, k, v, None);
                    n += 1;
                });
                // Every partition hears the tick's end, so the watermark moves on.
                for part in 0..PARTITIONS {
                    let hb = format!(r#"{{"type":"heartbeat","ts":{}}}"#, to - 1);
                    send(&events, b"hb", hb.as_bytes(), Some(part));
                }
                produced.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1200));
            }
            // Close the last windows.
            for part in 0..PARTITIONS {
                // Just past the last window's end plus the allowed lateness: an empty window
                // after it would read as a tracking outage.
                let hb = format!(r#"{{"type":"heartbeat","ts":{}}}"#, end_ms + 150_000);
                send(&events, b"hb", hb.as_bytes(), Some(part));
            }
            p.flush(Duration::from_secs(30)).unwrap();
            done.store(true, Ordering::Relaxed);
        })
    };

    // Kill -9 at random moments while the load runs.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut kills = 0;
    let max_kills = std::env::var("CRASH_KILLS")
        .map(|k| k.parse().unwrap())
        .unwrap_or(usize::MAX);
    while !done.load(Ordering::Relaxed) {
        if kills >= max_kills {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(9000..15000)));
        if done.load(Ordering::Relaxed) && kills >= 10 {
            break;
        }
        kills += 1;
        if kills == 5 {
            zombie(&mut svc, &t.events);
            continue;
        }
        svc.kill9();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..400)));
        svc.start();
    }
    load.join().unwrap();
    assert!(kills >= 10.min(max_kills), "only {kills} kills");

    // Let the last incarnation catch up to the final heartbeat, then stop it cleanly.
    let end_s = (end_ms + 150_000) as f64 / 1000.0;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if metric(svc.port, "guardrail_event_time_latest_seconds").is_some_and(|t| t >= end_s) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "guardrail did not catch up after the last restart; logs:\n{}",
            tail(&svc.logs())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let committed = metric(
        svc.port,
        "guardrail_transactions_total{result=\"committed\"}",
    );
    let status = svc.terminate();
    assert!(status.success(), "clean stop: {status}");
    let logs = svc.logs();
    let restored = logs.matches("state restored from checkpoint").count();
    eprintln!(
        "crash test: {kills} kills, {} starts, {restored} restored from a checkpoint, {} events produced, last incarnation committed {committed:?} transactions",
        svc.starts,
        produced.load(Ordering::Relaxed)
    );
    assert!(!logs.contains("panicked"), "{}", tail(&logs));
    assert!(
        restored + 2 >= kills.min(10),
        "most restarts resume from a checkpoint: {restored} of {kills}; log lines about state:\n{}",
        logs.lines()
            .filter(|l| l.contains("checkpoint") || l.contains("ERROR") || l.contains("WARN"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );

    let rollbacks = read_committed(&bootstrap, &t.rollbacks);
    let alerts = read_committed(&bootstrap, &t.alerts);
    let mut per_change: BTreeMap<String, usize> = BTreeMap::new();
    for r in &rollbacks {
        *per_change
            .entry(r["data"]["change_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = changes
        .iter()
        .map(|(id, _, _)| (id.to_string(), 1))
        .collect();
    let summary: Vec<String> = alerts
        .iter()
        .map(|a| {
            format!(
                "{} {} {} {} {} onset={} blamed={}",
                a["incident_id"],
                a["status"],
                a["kind"],
                a["metric"],
                a["series"],
                a["onset"],
                a["candidate_changes"][0]["change_id"]
            )
        })
        .collect();
    assert_eq!(
        per_change,
        expected,
        "exactly one rollback request per injected change: {rollbacks:#?}\nalerts:\n{}",
        summary.join("\n")
    );
    let firing: Vec<_> = alerts.iter().filter(|a| a["status"] == "firing").collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for a in &firing {
        *seen.entry(a["incident_id"].as_str().unwrap()).or_default() += 1;
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "alerts sent twice: {doubled:?}");
    let by_id: HashMap<&str, i64> = changes.iter().map(|(id, at, _)| (*id, *at)).collect();
    for a in &firing {
        let blamed = a["candidate_changes"][0]["change_id"].as_str();
        // Blamed on an injected change and detected after it. (The onset itself is an
        // estimate with a 95% set, whose coverage `bench detect` measures: on a sparse total the
        // set can end a few windows before the change.)
        let detected =
            guardrail::event::parse_time_str(a["detected_at"].as_str().unwrap()).unwrap();
        let at = blamed.and_then(|b| by_id.get(b).copied());
        assert!(
            at.is_some_and(|at| detected > at),
            "an alert that no injected change explains (a false alarm): {a:#}"
        );
    }
    for (id, _, _) in &changes {
        assert!(
            firing
                .iter()
                .any(|a| a["candidate_changes"][0]["change_id"] == *id),
            "no alert for {id}"
        );
    }
    // The checkpoint the last incarnation left behind reads back.
    assert!(Path::new(&state_dir)
        .join(guardrail::checkpoint::FILE_NAME)
        .exists());
}

/// One interruption of the kill loop is a zombie instead of a crash: the running incarnation
/// is paused, a new one takes over (same transactional.id, same state directory), and the
/// paused one is resumed once the new one reads every partition. It must stop by itself, fenced
/// (by Kafka at its next transaction, or by the state directory's claim at its next
/// checkpoint), and the end-of-test checks find nothing it decided twice.
fn zombie(svc: &mut Service, events_topic: &str) {
    let (mut old, old_log) = svc.pause_and_replace();
    let assigned = format!("guardrail_partitions_assigned{{topic=\"{events_topic}\"}}");
    let deadline = Instant::now() + Duration::from_secs(90);
    while metric(svc.port, &assigned) != Some(PARTITIONS as f64) {
        assert!(
            Instant::now() < deadline,
            "the new incarnation never took the partitions over"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(&old, "-CONT");
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = old.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = old.kill();
            panic!(
                "the zombie kept running after it was resumed:\n{}",
                tail(&std::fs::read_to_string(&old_log).unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(&old_log).unwrap_or_default();
    let why = log.lines().rev().find(|l| l.contains("fenced"));
    eprintln!("zombie stopped ({status}): {}", why.unwrap_or("?"));
    assert!(!status.success(), "a fenced zombie exits with an error");
    assert!(why.is_some(), "it says it was fenced:\n{}", tail(&log));
}

fn tail(s: &str) -> String {
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}
