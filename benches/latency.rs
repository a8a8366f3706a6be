//! Event-to-alert latency under load: the service in process on librdkafka's mock cluster
//! (exactly_once), simulated traffic produced at a steady pace after a fast warm-up, three
//! harmful changes. Two figures per alert:
//!
//! - end to end: from producing the first event whose timestamp lets the detecting window close
//!   (window end + allowed lateness) to reading the alert with `read_committed`;
//! - in the service: `guardrail_alert_latency_seconds`, from reading the message that completed
//!   the detection to the transaction carrying the alert committed.
//!
//! `cargo bench --bench latency`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guardrail::config::Config;
use guardrail::sim::{Scenario, Sim};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};

const HOUR: i64 = 3_600_000;
const MIN: i64 = 60_000;

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn main() {
    let cluster: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let mut cfg =
        Config::from_str_named(guardrail::demo::DEFAULT_CONFIG, "config/guardrail.toml").unwrap();
    let t = cfg.kafka.topics.clone();
    cluster.create_topic(&t.events, 8, 1).unwrap();
    for topic in &t.all()[1..] {
        cluster.create_topic(topic, 1, 1).unwrap();
    }
    cfg.kafka.bootstrap_servers = bootstrap.clone();
    cfg.kafka.group_id = "latency".into();
    cfg.kafka
        .options
        .insert("fetch.wait.max.ms".into(), "10".into());
    cfg.signing.secret = Some("bench".into());
    cfg.signing.secret_env = None;
    cfg.detection.warmup_windows = 48;
    let lateness_ms = cfg.engine.allowed_lateness_secs as i64 * 1000;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let state = guardrail::service::new_state();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let svc = rt.spawn(guardrail::service::run(
        cfg.clone(),
        listener,
        state.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    // Alerts as read by a downstream consumer.
    let received: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = {
        let (received, reading, bootstrap, topic) = (
            received.clone(),
            reading.clone(),
            bootstrap.clone(),
            t.alerts.clone(),
        );
        std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", "latency-reader")
                .set("isolation.level", "read_committed")
                .set("fetch.wait.max.ms", "5")
                .create()
                .unwrap();
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)
                .unwrap();
            c.assign(&tpl).unwrap();
            while reading.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(20)) {
                    let at = Instant::now();
                    let v: serde_json::Value =
                        serde_json::from_slice(m.payload().unwrap()).unwrap();
                    if v["status"] == "firing" {
                        let d =
                            guardrail::event::parse_time_str(v["detected_at"].as_str().unwrap())
                                .unwrap();
                        received.lock().unwrap().push((d, at));
                    }
                }
            }
        })
    };

    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let send = |topic: &str, key: &[u8], v: &[u8], part: Option<i32>| {
        guardrail::demo::produce_blocking(&p, topic, key, v, part).expect("enqueued")
    };
    let first = guardrail::event::parse_time_str("2026-11-04T14:00:00Z").unwrap();
    let start = first - 5 * HOUR;
    let end = first + 4 * HOUR;
    let changes = [
        ("chg-l1", first, vec!["FR", "BE"]),
        ("chg-l2", first + HOUR + HOUR / 2, vec!["DE"]),
        ("chg-l3", first + 3 * HOUR, vec!["UK", "US"]),
    ];
    let mut sim = Sim::new(
        Scenario {
            seed: 5,
            peak_sessions_per_min: 1000.0,
            ..Default::default()
        },
        start,
    );
    // (event time, wall time) of produced messages, every 64th and every heartbeat.
    let mut marks: Vec<(i64, Instant)> = Vec::new();
    let mut next = 0;
    let mut produced = 0u64;
    let paced_from = first - 30 * MIN;
    let run_started = Instant::now();
    let mut paced_started = None;
    while sim.now_ms() < end {
        if next < changes.len() && sim.now_ms() >= changes[next].1 {
            let (id, at, countries) = &changes[next];
            let (record, effect) =
                guardrail::sim::harmful_change(id, *at, "bench", countries, 0.7, 3.0);
            send(&t.changes, b"c", record.as_bytes(), None);
            sim.scenario_mut().effects.push(effect);
            next += 1;
        }
        let tick = sim.now_ms() + MIN;
        let tick_started = Instant::now();
        sim.advance(tick, &mut |k, v| {
            send(&t.events, k, v, None);
            produced += 1;
            if produced % 64 == 0 {
                let ts = guardrail::event::decode_event(v, 65536).unwrap().ts_ms;
                marks.push((ts, Instant::now()));
            }
        });
        for part in 0..8 {
            let hb = format!(r#"{{"type":"heartbeat","ts":{}}}"#, tick - 1);
            send(&t.events, b"hb", hb.as_bytes(), Some(part));
        }
        marks.push((tick - 1, Instant::now()));
        if tick >= paced_from {
            // Under load: one simulated minute per 250 ms of wall time.
            paced_started.get_or_insert_with(Instant::now);
            if let Some(rest) = Duration::from_millis(250).checked_sub(tick_started.elapsed()) {
                std::thread::sleep(rest);
            }
        } else {
            // Warm-up as fast as the service keeps up.
            while !state
                .latest_event_ms()
                .is_some_and(|l| l >= tick - 10 * MIN)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    p.flush(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    reading.store(false, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    let paced_secs = paced_started.unwrap().elapsed().as_secs_f64();
    let metrics = state.telemetry.render();
    let _ = stop_tx.send(());
    rt.block_on(svc).unwrap().unwrap();

    let mut e2e: Vec<f64> = received
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(detected, at)| {
            let due = detected + lateness_ms;
            let i = marks.partition_point(|(ts, _)| *ts < due);
            marks
                .get(i)
                .map(|(_, produced_at)| at.saturating_duration_since(*produced_at).as_secs_f64())
        })
        .collect();
    e2e.sort_by(f64::total_cmp);
    let paced_events = marks.iter().filter(|(ts, _)| *ts >= paced_from).count() as f64 * 64.0;
    println!(
        "load: {produced} events in {:.0} s; paced phase {:.0} s at ~{:.0} events/s",
        run_started.elapsed().as_secs_f64(),
        paced_secs,
        paced_events / paced_secs
    );
    println!(
        "end to end (first event able to close the window -> alert read, read_committed): n={} p50={:.1} ms p90={:.1} ms p99={:.1} ms max={:.1} ms",
        e2e.len(),
        quantile(&e2e, 0.5) * 1e3,
        quantile(&e2e, 0.9) * 1e3,
        quantile(&e2e, 0.99) * 1e3,
        e2e.last().copied().unwrap_or(f64::NAN) * 1e3
    );
    for l in metrics.lines() {
        if l.starts_with("guardrail_alert_latency_seconds") {
            println!("{l}");
        }
    }
}
