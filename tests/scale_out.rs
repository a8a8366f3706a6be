//! Scale-out: two instances in one consumer group with the two-stage aggregation give the
//! same decisions as one instance on the same input (the real service, librdkafka consumer
//! groups and transactions, on the embedded broker).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tansu::{Storage, Tansu};
use common::{metric_value, read_topics, HOUR, SECRET};
use guardrail::api::ApiState;
use guardrail::config::Config;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};

const EVENT_PARTITIONS: i32 = 4;
const REPARTITIONS: i32 = 4;

struct Instance {
    state: Arc<ApiState>,
    http: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<
        Result<guardrail::service::RunReport, guardrail::service::ServiceError>,
    >,
}

async fn start_instance(mut cfg: Config, name: &str) -> Instance {
    cfg.service.instance = name.into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = format!("http://{}", listener.local_addr().unwrap());
    cfg.service.public_url = "http://guardrail.test".into();
    let state = guardrail::service::new_state();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(guardrail::service::run(
        cfg,
        listener,
        state.clone(),
        async move {
            let _ = rx.await;
        },
    ));
    Instance {
        state,
        http,
        stop,
        task,
    }
}

async fn metric(i: &Instance, series: &str) -> f64 {
    let (_, body) = common::http_get(&format!("{}/metrics", i.http)).await;
    metric_value(&body, series).unwrap_or(0.0)
}

/// What a run decided, made comparable across runs: alerts and rollback requests without
/// wall-clock stamps and instance names, in a stable order.
#[derive(Debug, PartialEq)]
struct Decisions {
    alerts: Vec<String>,
    rollbacks: Vec<String>,
    series: f64,
}

/// Plays the same seeded input (7 h: warm-up, then a harmful autonomous change on FR+BE)
/// through `instances` instances of one consumer group and returns what they decided.
/// How an instance leaves the group mid-way.
#[derive(Clone, Copy)]
enum Leave {
    /// Stopped: last batch committed, last checkpoint written.
    Clean,
    /// Dropped where it stands (no final batch, flush or checkpoint), as a crash leaves it.
    Crash,
}

/// With `leave`, the last instance leaves at that event time and the others take its
/// partitions over (stage 2 from its checkpoints in the shared state directory).
async fn play(
    broker: Option<&Tansu>,
    two_stage: bool,
    instances: usize,
    leave: Option<(i64, Leave)>,
) -> Decisions {
    let leave_at = leave.map(|(at, _)| at);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut cfg = Config::from_str_named(guardrail::demo::DEFAULT_CONFIG, "config/guardrail.toml")
        .expect("default config is valid");
    // The embedded broker, or Tansu (random topic names, no transactions).
    let mut _cluster = None;
    let bootstrap = match broker {
        Some(b) => {
            let t = b.guardrail_topics(EVENT_PARTITIONS);
            b.create_topic(&t.repartition, REPARTITIONS);
            cfg.kafka.topics = t;
            cfg.kafka.delivery = guardrail::config::Delivery::AtLeastOnce;
            b.bootstrap()
        }
        None => {
            let c = MockCluster::new(1).expect("mock cluster");
            let t = &cfg.kafka.topics;
            c.create_topic(&t.events, EVENT_PARTITIONS, 1).unwrap();
            c.create_topic(&t.repartition, REPARTITIONS, 1).unwrap();
            for topic in &t.all()[1..] {
                c.create_topic(topic, 1, 1).unwrap();
            }
            let b = c.bootstrap_servers();
            _cluster = Some(c);
            b
        }
    };
    let t = cfg.kafka.topics.clone();
    cfg.kafka.bootstrap_servers = bootstrap.clone();
    cfg.kafka.group_id = format!("scale-{}", rand_suffix());
    cfg.kafka
        .options
        .insert("fetch.wait.max.ms".into(), "10".into());
    cfg.signing.secret = Some(SECRET.into());
    cfg.signing.secret_env = None;
    cfg.detection.warmup_windows = 48;
    cfg.guards.sprawl.enabled = false;
    cfg.guards.pressure.enabled = false;
    cfg.scale.two_stage = two_stage;
    if leave_at.is_some() {
        // The embedded broker acknowledges transactional offset commits without storing them
        // (librdkafka's rdkafka_mock_handlers.c, TxnOffsetCommit), so a partition that
        // changes hands would be read again from the start there. A clean leave under
        // at_least_once commits exactly what was delivered.
        cfg.kafka.delivery = guardrail::config::Delivery::AtLeastOnce;
    }
    let state = tempfile::tempdir().unwrap();
    cfg.state.dir = Some(state.path().display().to_string());
    cfg.state.checkpoint_interval_secs = 1;

    let mut fleet = Vec::new();
    for i in 0..instances {
        fleet.push(start_instance(cfg.clone(), &format!("guardrail-{i}")).await);
    }
    // Let the group settle before any input.
    settle(&fleet, &t, two_stage).await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .create()
        .unwrap();
    let change_ms = common::story_afternoon();
    let start_ms = change_ms - 4 * HOUR;
    let end_ms = change_ms + 3 * HOUR;
    let mut sim = guardrail::sim::Sim::new(
        guardrail::sim::Scenario {
            seed: 29,
            peak_sessions_per_min: 300.0,
            ..Default::default()
        },
        start_ms,
    );
    let mut change_sent = false;
    let mut gone: Vec<Instance> = Vec::new();
    let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    while sim.now_ms() < end_ms {
        if !change_sent && sim.now_ms() >= change_ms {
            producer
                .send(
                    FutureRecord::to(&t.changes)
                        .key("c")
                        .payload(&guardrail::sim::story_change("chg-scale", change_ms)),
                    Duration::from_secs(10),
                )
                .await
                .expect("change delivered");
            sim.scenario_mut()
                .effects
                .push(guardrail::sim::story_effect("chg-scale", change_ms));
            change_sent = true;
        }
        if leave_at.is_some_and(|at| sim.now_ms() >= at) && gone.is_empty() {
            let i = fleet.pop().unwrap();
            let r = match leave.map(|(_, how)| how) {
                Some(Leave::Crash) => {
                    i.task.abort();
                    assert!(i.task.await.unwrap_err().is_cancelled());
                    // What it read is counted by the others as they read it again.
                    guardrail::service::RunReport::default()
                }
                _ => {
                    let _ = i.stop.send(());
                    i.task.await.unwrap().expect("instance ran")
                }
            };
            gone.push(Instance {
                state: i.state,
                http: i.http,
                stop: tokio::sync::oneshot::channel().0,
                task: tokio::spawn(async move { Ok(r) }),
            });
            settle(&fleet, &t, two_stage).await;
        }
        let to = (sim.now_ms() + 5 * 60_000).min(end_ms);
        batch.clear();
        sim.advance(to, &mut |k, v| batch.push((k.to_vec(), v.to_vec())));
        for (k, v) in &batch {
            guardrail::demo::produce_nowait(&producer, &t.events, k, v).await;
        }
        // A heartbeat on every partition ends the tick; wait until every instance has seen
        // it, so decisions happen at the same simulated times in every run.
        let hb = format!(r#"{{"type":"heartbeat","ts":{}}}"#, to - 1);
        for p in 0..EVENT_PARTITIONS {
            producer
                .send(
                    FutureRecord::to(&t.events)
                        .partition(p)
                        .key("hb")
                        .payload(&hb),
                    Duration::from_secs(10),
                )
                .await
                .expect("heartbeat delivered");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in &fleet {
            while i
                .state
                .latest_event_ms()
                .map(|x| x < to - 1)
                .unwrap_or(true)
            {
                assert!(!i.task.is_finished(), "an instance stopped early");
                assert!(Instant::now() < deadline, "instances keep up");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    if std::env::var_os("SCALE_OUT_DUMP").is_some() {
        for i in &fleet {
            let (_, body) = common::http_get(&format!("{}/metrics", i.http)).await;
            for l in body.lines().filter(|l| {
                !l.starts_with('#')
                    && [
                        "windows_closed",
                        "watermark",
                        "rejected",
                        "incidents",
                        "outputs_produced",
                        "handovers",
                        "series_tracked",
                        "dead",
                        "guardrail_series_",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
            }) {
                eprintln!("DUMP {} {l}", i.http);
            }
            let (_, inc) = common::http_get(&format!("{}/api/incidents", i.http)).await;
            eprintln!("DUMP {} incidents {inc}", i.http);
        }
    }
    let mut series = 0.0;
    for i in &fleet {
        series += metric(i, "guardrail_series_tracked").await;
    }
    // Alerts produced by the instances still running: the reader must find at least these.
    let mut produced = 0.0;
    for i in &fleet {
        produced += metric(i, "guardrail_outputs_produced_total{stream=\"alerts\"}").await;
    }
    let mut partials = 0.0;
    for i in &fleet {
        partials += metric(
            i,
            "guardrail_outputs_produced_total{stream=\"repartition\"}",
        )
        .await;
    }
    let mut handovers = 0.0;
    for i in &fleet {
        handovers += metric(i, "guardrail_handovers_total{result=\"imported\"}").await;
    }
    if leave_at.is_some() && two_stage {
        assert!(handovers > 0.0, "stage 2 took nothing over");
    }
    // Two stages: every rollback request went through the decider.
    let mut granted = 0.0;
    for i in &fleet {
        granted += metric(i, "guardrail_decider_verdicts_total{verdict=\"granted\"}").await;
    }
    let mut events = 0;
    for i in fleet.into_iter().chain(gone) {
        let _ = i.stop.send(());
        let r = i.task.await.unwrap().expect("instance ran");
        events += r.events;
    }
    assert!(events > 100_000, "{events} events read");
    if two_stage {
        // (The instance that left took its count with it: a lower bound then.)
        eprintln!(
            "{events} events, {partials} repartition records from the instances still running \
             ({:.3} per event)",
            partials / events as f64
        );
    }

    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &bootstrap)
        .set("isolation.level", "read_committed");
    // A broker slow to answer a fresh reader's first fetch must not read as "no alerts".
    let deadline = Instant::now() + Duration::from_secs(60);
    let outs = loop {
        let outs = read_topics(
            c.clone(),
            &[&t.alerts, &t.rollbacks],
            Duration::from_secs(2),
        );
        let read = outs.iter().filter(|o| o.topic == t.alerts).count() as f64;
        if read >= produced || Instant::now() > deadline {
            break outs;
        }
    };
    // Every alert whole, evidence included (segments, candidates and their evidence, the
    // decision, "local gain, global loss"), but for the wall-clock time it was sent at.
    let mut alerts: Vec<String> = outs
        .iter()
        .filter(|o| o.topic == t.alerts)
        .map(|o| {
            let mut v = o.json();
            let m = v.as_object_mut().expect("an alert is an object");
            m.remove("emitted_at");
            v.to_string()
        })
        .collect();
    alerts.sort();
    let mut rollbacks: Vec<String> = outs
        .iter()
        .filter(|o| o.topic == t.rollbacks)
        .map(|o| {
            let v = o.json();
            // Who sent it and when differ by instance and wall clock; what is asked must not.
            eprintln!("rollback request: {v}");
            v["data"].to_string()
        })
        .collect();
    rollbacks.sort();
    // (Unless the instance that left had granted them.)
    if two_stage && leave_at.map_or(true, |at| at < change_ms) {
        assert_eq!(
            granted,
            rollbacks.len() as f64,
            "rollbacks granted by the decider"
        );
    }
    Decisions {
        alerts,
        rollbacks,
        series,
    }
}

/// Waits until the group has given every partition to the running instances, each some.
async fn settle(fleet: &[Instance], t: &guardrail::config::TopicsConfig, two_stage: bool) {
    let topic = if two_stage { &t.repartition } else { &t.events };
    let series = format!("guardrail_partitions_assigned{{topic=\"{topic}\"}}");
    let want = if two_stage {
        REPARTITIONS
    } else {
        EVENT_PARTITIONS
    } as f64;
    // A join takes a few rebalance rounds; on a loaded 2-core machine (seen: a build beside
    // the tests) 60 s were not always enough.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut owned = Vec::new();
        for i in fleet {
            owned.push(metric(i, &series).await);
        }
        if owned.iter().sum::<f64>() == want && owned.iter().all(|n| *n > 0.0) {
            return;
        }
        assert!(Instant::now() < deadline, "group never settled: {owned:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_two_stage_decide_exactly_as_one_instance() {
    let one = play(None, false, 1, None).await;
    let two = play(None, true, 2, None).await;
    same(&one, &two);
    // One instance leaves during the warm-up: the other takes its partitions over through
    // its checkpoint, and still decides exactly as one instance did.
    let left = play(
        None,
        true,
        2,
        Some((common::story_afternoon() - 2 * HOUR, Leave::Clean)),
    )
    .await;
    same(&one, &left);
}

/// The same on a real broker (Tansu: consumer groups and committed offsets as Kafka keeps them,
/// eager rebalances; no transactions, so at_least_once).
///
/// Ignored: about 1 run in 10 differs from one instance, from two faults of Tansu 0.6 that
/// lose or double a record (both shown outside guardrail, with librdkafka alone):
/// - A fetch at an offset inside a record batch returns the batch after it
///   (`tests/tansu.rs`, `tansu_skips_the_rest_of_a_batch_on_a_fetch_inside_it`): the
///   survivor's seek to a taken-over checkpoint's offset skipped the rest of that batch, and a
///   window was caught up after the crash with part of its sums (726 of 1,456 sessions, nothing
///   refused as late). 1 of 12 runs this round (stop 14's 2 of 12 fit one fault or the other).
/// - A reader tailing a partition that is being written can get one record twice and never its
///   neighbour: 2 of 6,000 single-record batches from two idempotent producers, read while
///   written (0 of 6,000 when the same records are read afterwards, or written in batches of
///   many). Writing one record per batch (which avoids the first fault) made this one frequent:
///   4 of 25 runs failed, and `RUST_LOG=guardrail::partial=trace` showed the repartition
///   reader merge a partial twice and skip the next one in passing runs too.
/// The test therefore runs with ordinary batching; on a broker without these faults it is
/// expected to pass every time, as the embedded broker's test above does.
///
/// Found and fixed before (guardrail's own): a stage-1 batch in flight at a revocation read
/// again by the partition's next owner (revocations are held until the batch is delivered and
/// committed); a taken-over checkpoint that had closed fewer windows than the survivor
/// (`catch_up`); stage 2 skipping the windows before its first watermark
/// (`engine::stage::tests::stage_two_closes_the_windows_before_its_first_watermark`).
/// `SCALE_OUT_DUMP=1 RUST_LOG=guardrail=info,guardrail::window=trace,guardrail::engine=debug`
/// prints every series' windows as closed (observed, expected, learnt), the clocks at a
/// catch-up and each instance's counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "flaky on Tansu: about 1 run in 10 differs by a record (see above)"]
async fn two_stage_on_tansu_decides_as_one_instance_through_a_handover() {
    let Some(broker) = Tansu::start(Storage::Memory) else {
        return;
    };
    let one = play(Some(&broker), false, 1, None).await;
    let left = play(
        Some(&broker),
        true,
        2,
        Some((common::story_afternoon() - 2 * HOUR, Leave::Clean)),
    )
    .await;
    same(&one, &left);
    // One instance drops dead an hour after the change is applied: its partitions are taken
    // over from its last periodic checkpoint and the input after it is read again.
    let crashed = play(
        Some(&broker),
        true,
        2,
        Some((common::story_afternoon() + HOUR / 2, Leave::Crash)),
    )
    .await;
    same(&one, &crashed);
}

fn same(one: &Decisions, two: &Decisions) {
    assert!(
        !one.alerts.is_empty() && !one.rollbacks.is_empty(),
        "the input must make decisions: {one:#?}"
    );
    let by_metric = |d: &Decisions| {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for a in &d.alerts {
            let v: serde_json::Value = serde_json::from_str(a).unwrap();
            *m.entry(format!("{} {}", v["metric"], v["status"]))
                .or_default() += 1;
        }
        m
    };
    eprintln!("one instance: {:?}", by_metric(one));
    eprintln!("two instances: {:?}", by_metric(two));
    assert_eq!(one.series, two.series, "series tracked");
    for (a, b) in one.alerts.iter().zip(&two.alerts) {
        assert_eq!(a, b, "first differing alert");
    }
    assert_eq!(one.alerts.len(), two.alerts.len(), "alerts");
    assert_eq!(one.rollbacks, two.rollbacks, "rollback requests");
}
