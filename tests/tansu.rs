//! guardrail against Tansu, a Kafka-compatible broker running as a real process on loopback
//! (see tests/common/tansu.rs): a consumer-group run end to end, two instances sharing the
//! partitions and one taking them all over, and a broker outage with everything caught up
//! afterwards. Tansu 0.6 has no transactions: guardrail runs with its idempotent producer.
//!
//! Skipped with a printed reason when `tansu` is not installed, unless `CI` is set (then it
//! fails): `cargo install tansu --locked --features dynostore,libsql`.

mod common;

use std::time::{Duration, Instant};

use common::tansu::{self, Process, Producer, Service, Storage, Tansu};
use common::{story_afternoon, Out, HOUR, SECRET};
use guardrail::sim::{Effect, Scenario, Sim};
use guardrail::sink::Signer;
use rdkafka::consumer::{BaseConsumer, Consumer};

const MIN: i64 = 60_000;
/// Traffic of these stories: seeded, this many sessions a minute at the daily peak.
const PEAK_SESSIONS_PER_MIN: f64 = 1200.0;
/// Windows of history before detection (5-minute windows: 3 hours).
const WARMUP_WINDOWS: u32 = 36;
const WARMUP_HOURS: i64 = 4;

fn sim(start_ms: i64) -> Sim {
    Sim::new(
        Scenario {
            seed: 23,
            peak_sessions_per_min: PEAK_SESSIONS_PER_MIN,
            ..Scenario::default()
        },
        start_ms,
    )
}

/// The harmful change: conversions in FR and BE down 25%, nothing else moves.
fn conversion_drop(change_id: &str, at: i64) -> Effect {
    Effect {
        change_id: change_id.into(),
        countries: vec!["FR".into(), "BE".into()],
        start_ms: at,
        end_ms: None,
        ctr_mult: 1.0,
        conversion_mult: 0.75,
        ticket_mult: 1.0,
    }
}

/// Produces the simulator's traffic up to `to_ms` in ticks of `step_ms`, each followed by a
/// heartbeat at its end and a wait until the engine has seen it (so decisions happen at the
/// right simulated time).
async fn drive(p: &mut Producer, svc: &Service, sim: &mut Sim, to_ms: i64, step_ms: i64) {
    let topic = svc.cfg.kafka.topics.events.clone();
    let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    while sim.now_ms() < to_ms {
        let to = (sim.now_ms() + step_ms).min(to_ms);
        produce_until(p, &topic, sim, to, &mut batch).await;
        assert!(
            svc.wait_event_time(to - 1, Duration::from_secs(60)).await,
            "engine keeps up (event time {} not reached)",
            guardrail::event::fmt_time(to - 1)
        );
    }
}

/// Queues the traffic of [now, to) and a heartbeat at `to - 1`, without waiting.
async fn produce_until(
    p: &mut Producer,
    topic: &str,
    sim: &mut Sim,
    to: i64,
    batch: &mut Vec<(Vec<u8>, Vec<u8>)>,
) {
    batch.clear();
    sim.advance(to, &mut |k, v| batch.push((k.to_vec(), v.to_vec())));
    for (k, v) in batch.iter() {
        p.send(topic, k, v).await;
    }
    p.heartbeat(topic, to - 1).await;
}

async fn send_change(p: &mut Producer, topic: &str, value: &str) {
    p.send(topic, b"c", value.as_bytes()).await;
    p.delivered().await;
}

fn by_topic<'a>(outs: &'a [Out], topic: &str) -> Vec<&'a Out> {
    outs.iter().filter(|o| o.topic == topic).collect()
}

/// Firing alerts of `metric` blamed on `change` (first candidate).
fn firing_for(alerts: &[serde_json::Value], metric: &str, change: &str) -> Vec<serde_json::Value> {
    alerts
        .iter()
        .filter(|a| {
            a["status"] == "firing"
                && a["metric"] == metric
                && a["candidate_changes"][0]["change_id"] == change
        })
        .cloned()
        .collect()
}

/// Every output of the story: the rollback request for `change` is signed and keyed by it.
fn check_rollback(rb: &Out, change: &str) -> serde_json::Value {
    assert_eq!(rb.key.as_deref(), Some(change));
    assert!(
        Signer::new("k1", SECRET.as_bytes()).verify(&rb.value, &rb.headers["guardrail-signature"]),
        "rollback signature verifies"
    );
    let v = rb.json();
    assert_eq!(v["type"], "io.guardrail.rollback.requested");
    assert_eq!(v["data"]["change_id"], change);
    assert_eq!(v["data"]["tier"], "autonomous");
    v
}

/// A story on `broker` up to its change: guardrail started and ready, warm-up traffic, then
/// change `change_id` (conversions down in FR and BE from then on).
struct Story {
    topics: guardrail::config::TopicsConfig,
    svc: Service,
    p: Producer,
    sim: Sim,
    change_ms: i64,
    t0: Instant,
}

async fn story_to_change(broker: &Tansu, change_id: &str) -> Story {
    let topics = broker.guardrail_topics(2);
    let mut cfg = tansu::config(&broker.bootstrap(), &topics);
    cfg.detection.warmup_windows = WARMUP_WINDOWS;
    let svc = Service::start(cfg).await;
    let (ready, why) = svc.wait_ready(200, Duration::from_secs(30)).await;
    assert!(ready, "not ready after joining the group: {why}");
    let t0 = Instant::now();
    let change_ms = story_afternoon();
    let mut sim = sim(change_ms - WARMUP_HOURS * HOUR);
    let mut p = Producer::new(broker.client_config());
    drive(&mut p, &svc, &mut sim, change_ms, 5 * MIN).await;
    send_change(
        &mut p,
        &topics.changes,
        &guardrail::sim::story_change(change_id, change_ms),
    )
    .await;
    sim.scenario_mut()
        .effects
        .push(conversion_drop(change_id, change_ms));
    Story {
        topics,
        svc,
        p,
        sim,
        change_ms,
        t0,
    }
}

/// Committed offsets of `group` per partition of `topic`.
fn committed(broker: &Tansu, group: &str, topic: &str, partitions: i32) -> Vec<(i32, i64)> {
    let c: BaseConsumer = broker
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    committed
        .elements()
        .iter()
        .map(|e| {
            let off = match e.offset() {
                rdkafka::Offset::Offset(o) => o,
                _ => -1,
            };
            (e.partition(), off)
        })
        .collect()
}

/// (a) One guardrail in a consumer group on Tansu: simulated traffic in, a change that cuts
/// conversions in FR and BE, the drop detected and blamed on it, the alert and the signed
/// rollback request read back from Tansu's output topics, and the group's committed offsets at
/// the end of the input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group_run_detects_a_conversion_drop_on_tansu() {
    let Some(broker) = Tansu::start(Storage::Memory) else {
        return;
    };
    let Story {
        topics,
        svc,
        mut p,
        mut sim,
        change_ms,
        t0,
    } = story_to_change(&broker, "chg-tansu").await;
    let group = svc.cfg.kafka.group_id.clone();
    // Until the rollback request is out (at most 2 hours of traffic), then 15 minutes more.
    let mut detected_at = None;
    while sim.now_ms() < change_ms + 2 * HOUR {
        let to = sim.now_ms() + 5 * MIN;
        drive(&mut p, &svc, &mut sim, to, 5 * MIN).await;
        if svc
            .metric("guardrail_outputs_produced_total{stream=\"rollbacks\"}")
            .await
            >= 1.0
        {
            detected_at = Some(sim.now_ms());
            break;
        }
    }
    let detected_at = detected_at.expect("rollback requested within 2 hours of the change");
    let to = sim.now_ms() + 15 * MIN;
    drive(&mut p, &svc, &mut sim, to, 5 * MIN).await;
    p.delivered().await;
    eprintln!(
        "tansu consumer group: {} messages produced, rollback {} min after the change, {:.1} s",
        p.produced,
        (detected_at - change_ms) / MIN,
        t0.elapsed().as_secs_f64()
    );

    let outs = tansu::read_all(
        broker.client_config(),
        &[&topics.alerts, &topics.rollbacks, &topics.audit],
        Duration::from_secs(2),
    );
    let alerts: Vec<_> = by_topic(&outs, &topics.alerts)
        .iter()
        .map(|o| o.json())
        .collect();
    let conv = firing_for(&alerts, "conversion_rate", "chg-tansu");
    assert!(!conv.is_empty(), "no conversion alert among {alerts:#?}");
    for a in &conv {
        assert_eq!(a["kind"], "drop", "{a:#}");
        let detected =
            guardrail::event::parse_time_str(a["detected_at"].as_str().unwrap()).unwrap();
        assert!(detected > change_ms && detected <= detected_at, "{a:#}");
        assert!(a["url"].as_str().unwrap().starts_with(&svc.http), "{a:#}");
    }
    assert!(
        alerts.iter().all(|a| a["metric"] == "conversion_rate"),
        "alerts on metrics the change did not move: {alerts:#?}"
    );
    let rollbacks = by_topic(&outs, &topics.rollbacks);
    assert_eq!(rollbacks.len(), 1, "one rollback request for the change");
    let v = check_rollback(rollbacks[0], "chg-tansu");
    let inc = v["data"]["incident_id"].as_str().unwrap().to_string();
    let audit: Vec<String> = by_topic(&outs, &topics.audit)
        .iter()
        .map(|o| o.json())
        .filter(|a| a["incident_id"] == inc.as_str())
        .map(|a| a["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        audit[..3],
        ["detection", "policy_evaluation", "rollback_requested"]
    );
    assert_eq!(svc.get("/readyz").await.0, 200);

    let report = svc.stop().await;
    assert_eq!(report.events, p.produced - 1, "every event read once");
    assert_eq!(report.rejected, 0);
    // The group committed the end of the input on Tansu (offsets stored after processing):
    // the offset after the last message acknowledged to the producer, per partition. (Not the
    // broker's high watermark: Tansu 0.6's ListOffsets(latest) lags behind on memory storage.)
    for (topic, parts) in [(&topics.events, 2), (&topics.changes, 1)] {
        for (part, off) in committed(&broker, &group, topic, parts) {
            let last = p.last_offsets[&(topic.to_string(), part)];
            assert_eq!(off, last + 1, "{topic}/{part}: committed offset at the end");
        }
    }
}

/// Waits until `cond` holds on `procs` (polled every 200 ms), with a message on timeout.
async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Produces `weights[p]` heartbeats to each partition `p` of the events topic (now-stamped, no
/// metric reads them): the events counter of an instance then tells which partitions it reads.
async fn produce_per_partition(p: &mut Producer, topic: &str, weights: &[u64], tag: &str) {
    let now = guardrail::event::now_ms();
    for (part, w) in weights.iter().enumerate() {
        for i in 0..*w {
            let v = format!(r#"{{"type":"probe","ts":{now},"id":"{tag}-{part}-{i}"}}"#);
            p.send_to(topic, Some(part as i32), b"probe", v.as_bytes())
                .await;
        }
    }
    p.delivered().await;
}

/// Sum of `weights` over `parts`.
fn weight_of(parts: &[i32], weights: &[u64]) -> u64 {
    parts.iter().map(|p| weights[*p as usize]).sum()
}

async fn received(p: &Process) -> u64 {
    p.metric("guardrail_events_received_total")
        .await
        .unwrap_or(0.0) as u64
}

/// (b) Two `guardrail run` processes in one consumer group over a 4-partition events topic:
/// both get partitions (their logs, `/readyz`, and which events each one counts), and when one
/// stops the other takes all four over and reads what is produced to every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_partitions_and_one_takes_over_on_tansu() {
    let Some(broker) = Tansu::start(Storage::Memory) else {
        return;
    };
    let topics = broker.guardrail_topics(4);
    let cfg_a = tansu::config(&broker.bootstrap(), &topics);
    let mut cfg_b = tansu::config(&broker.bootstrap(), &topics);
    cfg_b.kafka.group_id = cfg_a.kafka.group_id.clone();
    cfg_b.service.instance = "guardrail-2".into();
    let env = [("GUARDRAIL_SIGNING_SECRET", SECRET)];
    let mut a = Process::start(cfg_a, &env);
    wait_for(
        "instance A to own all 4 partitions",
        Duration::from_secs(30),
        || a.assigned_events_partitions().as_deref() == Some(&[0, 1, 2, 3]),
    )
    .await;
    assert_eq!(a.get("/readyz").await.0, 200, "{}", a.output());

    let mut b = Process::start(cfg_b, &env);
    let split = |a: &Process, b: &Process| -> Option<(Vec<i32>, Vec<i32>)> {
        let (pa, pb) = (
            a.assigned_events_partitions()?,
            b.assigned_events_partitions()?,
        );
        let mut all: Vec<i32> = pa.iter().chain(pb.iter()).copied().collect();
        all.sort_unstable();
        (!pa.is_empty() && !pb.is_empty() && all == [0, 1, 2, 3]).then_some((pa, pb))
    };
    wait_for(
        "the two instances to split the partitions",
        Duration::from_secs(60),
        || split(&a, &b).is_some(),
    )
    .await;
    let (pa, pb) = split(&a, &b).unwrap();
    eprintln!("partitions: A {pa:?}, B {pb:?}");
    for (name, p) in [("A", &a), ("B", &b)] {
        let (code, body) = p.get("/readyz").await;
        assert_eq!(code, 200, "instance {name} not ready: {body}");
    }

    // Each instance reads exactly the partitions it was assigned.
    let weights = [1u64, 10, 100, 1000];
    let mut prod = Producer::new(broker.client_config());
    produce_per_partition(&mut prod, &topics.events, &weights, "split").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (ra, rb) = loop {
        let (ra, rb) = (received(&a).await, received(&b).await);
        if ra + rb >= 1111 || Instant::now() > deadline {
            break (ra, rb);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (ra, rb),
        (weight_of(&pa, &weights), weight_of(&pb, &weights)),
        "events counted by A and B against their partitions {pa:?} / {pb:?}"
    );

    // A stops (SIGTERM: it leaves the group); B is given all four partitions.
    let status = a.terminate().expect("instance A stops on SIGTERM");
    assert!(status.success(), "A exits 0: {status:?}\n{}", a.output());
    wait_for(
        "instance B to own all 4 partitions",
        Duration::from_secs(60),
        || b.assigned_events_partitions().as_deref() == Some(&[0, 1, 2, 3]),
    )
    .await;
    assert_eq!(b.get("/readyz").await.0, 200);
    let before = received(&b).await;
    produce_per_partition(&mut prod, &topics.events, &weights, "takeover").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut now_b = before;
    while now_b < before + 1111 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        now_b = received(&b).await;
    }
    // A committed what it had read when it left, so B re-reads nothing of A's partitions.
    assert_eq!(
        now_b - before,
        1111,
        "B reads every partition after the takeover"
    );
    let status = b.terminate().expect("instance B stops on SIGTERM");
    assert!(status.success(), "B exits 0: {status:?}\n{}", b.output());
}

/// (c) The broker goes away for 30 s in the middle of an incident (sqlite storage, so its data
/// survives) while traffic keeps being produced (queued by the producer): guardrail keeps
/// running, `/readyz` says not ready while the broker is down, then ready again after the
/// restart; every event produced is processed, and the incident is detected exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_is_survived_and_caught_up_on_tansu() {
    let Some(mut broker) = Tansu::start(Storage::Sqlite) else {
        return;
    };
    let Story {
        topics,
        svc,
        mut p,
        mut sim,
        change_ms,
        t0,
    } = story_to_change(&broker, "chg-outage").await;
    drive(&mut p, &svc, &mut sim, change_ms + 5 * MIN, 5 * MIN).await;
    p.delivered().await;
    let accepted_before = (p.produced - 1) as f64; // the change record is not an event
    let deadline = Instant::now() + Duration::from_secs(30);
    while svc.metric("guardrail_events_accepted_total").await < accepted_before {
        assert!(Instant::now() < deadline, "caught up before the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "outage: +{:.1} s broker stopped at {}",
        t0.elapsed().as_secs_f64(),
        guardrail::event::fmt_time(sim.now_ms())
    );

    // The broker stops; traffic goes on for 30 s (30 simulated minutes, queued by the producer).
    broker.stop();
    let stopped = Instant::now();
    let mut batch = Vec::new();
    let mut not_ready_seen = None;
    let mut tick = 0;
    while stopped.elapsed() < Duration::from_secs(30) {
        if stopped.elapsed() >= Duration::from_secs(tick * 5) && tick < 6 {
            let to = sim.now_ms() + 5 * MIN;
            produce_until(&mut p, &topics.events, &mut sim, to, &mut batch).await;
            tick += 1;
        }
        svc.assert_running();
        if not_ready_seen.is_none() {
            let (code, body) = svc.get("/readyz").await;
            if code == 503 {
                eprintln!(
                    "outage: +{:.1} s /readyz 503: {}",
                    stopped.elapsed().as_secs_f64(),
                    body.trim()
                );
                not_ready_seen = Some(stopped.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        not_ready_seen.is_some(),
        "/readyz stayed 200 for 30 s with the broker down"
    );
    assert_eq!(
        svc.metric("guardrail_events_accepted_total").await,
        accepted_before,
        "nothing processed while the broker is down"
    );
    assert_eq!(svc.metric("guardrail_ready").await, 0.0);

    broker.restart();
    let restarted = Instant::now();
    eprintln!(
        "outage: broker restarted after {:.1} s",
        stopped.elapsed().as_secs_f64()
    );
    let (ready, why) = svc.wait_ready(200, Duration::from_secs(60)).await;
    assert!(ready, "not ready again after the broker came back: {why}");
    eprintln!(
        "outage: ready again {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    p.delivered().await;
    eprintln!(
        "outage: queued traffic delivered {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    let produced = p.produced - 1; // the change record is not an event
    let deadline = Instant::now() + Duration::from_secs(60);
    while svc.metric("guardrail_events_accepted_total").await < produced as f64 {
        assert!(
            Instant::now() < deadline,
            "caught up: {} of {produced} events processed; broker log:\n{}",
            svc.metric("guardrail_events_accepted_total").await,
            broker.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "outage: all {produced} events processed {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );

    // Then on until the rollback is out, and 30 minutes more.
    let mut detected_at = None;
    while sim.now_ms() < change_ms + 2 * HOUR {
        if svc
            .metric("guardrail_outputs_produced_total{stream=\"rollbacks\"}")
            .await
            >= 1.0
        {
            detected_at = Some(sim.now_ms());
            break;
        }
        let to = sim.now_ms() + 5 * MIN;
        drive(&mut p, &svc, &mut sim, to, 5 * MIN).await;
    }
    let detected_at = detected_at.expect("rollback requested within 2 hours of the change");
    let to = sim.now_ms() + 30 * MIN;
    drive(&mut p, &svc, &mut sim, to, 5 * MIN).await;
    p.delivered().await;
    let produced = p.produced - 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    while svc.metric("guardrail_events_accepted_total").await < produced as f64 {
        assert!(Instant::now() < deadline, "the last events processed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, m) = svc.get("/metrics").await;
    let metric = |s: &str| common::metric_value(&m, s).unwrap_or(0.0);
    assert_eq!(
        metric("guardrail_events_accepted_total"),
        produced as f64,
        "every event produced processed, once"
    );
    let rejected: Vec<_> = m
        .lines()
        .filter(|l| l.starts_with("guardrail_events_rejected_total{") && !l.ends_with(" 0"))
        .collect();
    eprintln!(
        "outage: {produced} events, received {}, rejections {rejected:?}; rollback at +{} min; {:.1} s in all",
        metric("guardrail_events_received_total"),
        (detected_at - change_ms) / MIN,
        t0.elapsed().as_secs_f64()
    );
    // A re-read after the group re-formed is dropped as a duplicate (or too late), never
    // counted twice; nothing else is rejected.
    for l in &rejected {
        assert!(
            l.contains("\"duplicate\"") || l.contains("\"too_late\""),
            "unexpected rejection: {l}"
        );
    }

    let outs = tansu::read_all(
        broker.client_config(),
        &[&topics.alerts, &topics.rollbacks],
        Duration::from_secs(2),
    );
    let alerts: Vec<_> = by_topic(&outs, &topics.alerts)
        .iter()
        .map(|o| o.json())
        .collect();
    let conv = firing_for(&alerts, "conversion_rate", "chg-outage");
    assert!(!conv.is_empty(), "no conversion alert among {alerts:#?}");
    let mut ids: Vec<_> = alerts
        .iter()
        .filter(|a| a["status"] == "firing")
        .map(|a| a["incident_id"].as_str().unwrap().to_string())
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "an incident fired twice: {alerts:#?}");
    let rollbacks = by_topic(&outs, &topics.rollbacks);
    assert_eq!(
        rollbacks.len(),
        1,
        "exactly one rollback request for the change"
    );
    check_rollback(rollbacks[0], "chg-outage");
    assert_eq!(metric("guardrail_rollbacks_requested_total"), 1.0);
    let report = svc.stop().await;
    assert_eq!(report.rollbacks_requested, 1);
}

/// Tansu 0.6 answers a fetch at an offset inside a record batch with the batch after it (a
/// fetch inside the last batch returns nothing), so a consumer resuming there (a committed
/// offset, a seek to a checkpoint's offset) skips the rest of the batch; Kafka returns the batch
/// holding the offset and the client drops the records before it. This shows it (printed), and
/// that a reader resumes exactly where every record is its own batch (asserted). It is one of
/// the two Tansu faults behind the ignored handover test in `tests/scale_out.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_skips_the_rest_of_a_batch_on_a_fetch_inside_it() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let Some(broker) = Tansu::start(Storage::Memory) else {
        return;
    };
    let read_from = |topic: &str, from: i64| -> Vec<i64> {
        let c: BaseConsumer = broker
            .client_config()
            .set("group.id", tansu::rand_name("batch-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(from))
            .unwrap();
        c.assign(&tpl).unwrap();
        let mut got = Vec::new();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_secs(3) {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                got.push(m.offset());
                quiet_since = Instant::now();
            }
        }
        got
    };
    for one_per_batch in [false, true] {
        let topic = tansu::rand_name("batch");
        broker.create_topic(&topic, 1);
        let mut c = broker.client_config();
        // Ten records sent together: one batch unless one record per batch is asked for.
        c.set("linger.ms", "200");
        if one_per_batch {
            c.set("batch.num.messages", "1");
        }
        let p: FutureProducer = c.create().unwrap();
        let sends: Vec<_> = (0..10)
            .map(|i| {
                let v = format!("r{i}");
                let p = p.clone();
                let topic = topic.clone();
                async move {
                    p.send(
                        FutureRecord::<(), _>::to(&topic).partition(0).payload(&v),
                        Duration::from_secs(10),
                    )
                    .await
                    .map(|d| d.offset)
                    .expect("delivered")
                }
            })
            .collect();
        let mut offsets = futures::future::join_all(sends).await;
        offsets.sort();
        assert_eq!(offsets, (0..10).collect::<Vec<i64>>());
        let got = read_from(&topic, 5);
        if one_per_batch {
            assert_eq!(got, (5..10).collect::<Vec<i64>>(), "read on from offset 5");
        } else {
            // Tansu 0.6: [] (the batch after the one holding offset 5; there is none). Printed,
            // not asserted: a fixed Tansu reads 5..9 here.
            eprintln!("ten records in one batch, read from offset 5 on Tansu: {got:?}");
        }
    }
}
