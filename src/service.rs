//! `guardrail run`: the Kafka source, the engine, the sinks and the HTTP API, until shutdown.
//!
//! Batches: messages are applied to the engine as they arrive; a batch ends when the engine has
//! outputs, after `BATCH_MAX` messages, or when the input goes idle for `FLUSH_EVERY`. At the
//! end of a batch its outputs and dead letters are produced and acknowledged, then the offsets of
//! the batch are stored (committed in the background): at-least-once, nothing acted on is lost.
//!
//! Delivery (`[kafka] delivery`):
//! - `exactly_once` (default): each batch is one Kafka transaction holding its outputs, dead
//!   letters and consumed offsets (`send_offsets_to_transaction`). The producer's stable
//!   `transactional.id` fences a zombie instance when a new one starts; readers with
//!   `read_committed` see each decision once.
//! - `at_least_once`: idempotent producer, offsets stored after delivery; outputs carry stable
//!   ids (incident id, rollback request id) for downstream deduplication.
//!
//! Checkpoints (`[state] dir`): the engine's state with the input offsets it corresponds to.
//! One is written with every batch that carries a decision (and every
//! `checkpoint_interval_secs`, and on shutdown), so every committed output has its state in
//! a checkpoint: a restart restores it, seeks back to its offsets and replays at most one
//! interval of input that produced no output. Under exactly_once the checkpoint is written as
//! *pending* before the commit and promoted after it; at startup a pending checkpoint is kept
//! only if the group's committed offsets prove its transaction committed.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::net::TcpListener;

use crate::checkpoint::{self, CheckpointError};
use crate::config::Delivery;

use crate::api::{self, ApiState, Snapshot};
use crate::config::Config;
use crate::control::Command;
use crate::engine::{Engine, EngineError};
use crate::event::now_ms;
use crate::sink::{dead_letter, Encoded, KafkaSink, Output, Signer};
use crate::source::{self, SourceError};
use crate::telemetry::Telemetry;

const BATCH_MAX: usize = 2000;
const FLUSH_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    #[error("alertmanager: {0}")]
    Alertmanager(#[from] crate::alertmanager::Error),
    #[error("API actors: {0}")]
    Auth(#[from] crate::auth::AuthError),
    #[error("exactly-once delivery: {0}. [kafka] delivery = \"exactly_once\" needs Kafka >= 2.5 with transactions; on a broker without them (e.g. Tansu 0.6) set delivery = \"at_least_once\"")]
    Transactions(String),
    #[error("[state] dir: {0}")]
    State(String),
    #[error("[scale] peers: {0}")]
    Peers(String),
    #[error("fenced: another instance took over transactional.id {id:?} ({reason}); this one stops so that no decision is made twice")]
    Fenced { id: String, reason: String },
    #[error("fenced: [state] dir {dir} was {reason} (a newer incarnation of this instance started); this one stops so that its older state never replaces the newer")]
    Superseded { dir: String, reason: String },
}

/// What a run did, for callers that stop it (tests, the demo).
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub events: u64,
    pub rejected: u64,
    pub incidents: usize,
    pub rollbacks_requested: u64,
}

/// Builds the signer from config; rollback requests must be signed.
pub fn signer(cfg: &Config) -> Result<Signer, EngineError> {
    let secret = cfg.signing.resolve_secret().ok_or_else(|| {
        EngineError::NoSecret(
            cfg.signing
                .secret_env
                .clone()
                .unwrap_or_else(|| "GUARDRAIL_SIGNING_SECRET".into()),
        )
    })?;
    Ok(Signer::new(&cfg.signing.key_id, secret.as_bytes()))
}

/// Runs the service until `shutdown` completes. The HTTP API is served on `listener`.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunReport, ServiceError> {
    let signer = signer(&cfg)?;
    // Fail on a bad configuration before anything starts.
    Engine::new(&cfg)?;
    let auth = Arc::new(crate::auth::Auth::from_config(&cfg.roles, &cfg.actors)?);
    if auth.is_empty() {
        tracing::warn!("no [[actors]] configured: the HTTP API is read-only and unauthenticated; approve, veto, acknowledge and silence are refused");
    }
    // Control calls from the API, applied by this task between messages.
    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::channel::<Command>(64);
    state.install(auth, ctl_tx);
    let telemetry = state.telemetry.clone();
    if !cfg.scale.peers.is_empty() {
        let peers = crate::peer::Peers::new(
            &cfg.scale.peers,
            cfg.scale.peer_timeout_ms,
            &cfg.service.instance,
            telemetry.peer_requests.clone(),
        )
        .map_err(ServiceError::Peers)?;
        tracing::info!(
            peers = ?cfg.scale.peers,
            "api: incidents and control calls this instance does not hold are asked of {} peer instance(s)",
            peers.len()
        );
        state.set_peers(peers);
    }
    let alertmanager = crate::alertmanager::spawn(&cfg, telemetry.clone())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_http = stop_rx.clone();
    let mut http = Owned(tokio::spawn(api::serve(
        listener,
        state.clone(),
        async move {
            let _ = stop_http.wait_for(|s| *s).await;
        },
    )));
    let stop_tx = Arc::new(stop_tx);
    let stop_on_signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_on_signal.send(true);
    });
    let report = if cfg.scale.two_stage {
        // Stage 1 in its own task, with its own consumer group and transactional producer;
        // stage 2 (the detecting engine, the API's) here.
        let cfg1 = cfg.clone();
        let (state1, stop1, signer1) = (state.clone(), stop_rx.clone(), signer.clone());
        let stop_all = stop_tx.clone();
        let mut stage1 = Owned(tokio::spawn(async move {
            let (_never, mut no_ctl) = tokio::sync::mpsc::channel::<Command>(1);
            let r = pipeline(
                &cfg1,
                Part::Aggregate,
                &state1,
                &mut no_ctl,
                stop1,
                &signer1,
                None,
            )
            .await;
            if r.is_err() {
                let _ = stop_all.send(true);
            }
            r
        }));
        let r = pipeline(
            &cfg,
            Part::Merge,
            &state,
            &mut ctl_rx,
            stop_rx.clone(),
            &signer,
            alertmanager.as_ref(),
        )
        .await;
        // Either stage failing stops the instance (its partitions go to the others).
        let _ = stop_tx.send(true);
        let r1 = (&mut stage1.0).await.expect("stage 1 task");
        let mut r = r?;
        let r1 = r1?;
        r.events = r1.events;
        r.rejected += r1.rejected;
        r
    } else {
        pipeline(
            &cfg,
            Part::Single,
            &state,
            &mut ctl_rx,
            stop_rx.clone(),
            &signer,
            alertmanager.as_ref(),
        )
        .await?
    };
    state.set_ready(false, "shutting down");
    if let Some(am) = alertmanager {
        am.shutdown().await;
    }
    let _ = (&mut http.0).await;
    Ok(report)
}

/// A task that belongs to `run`: aborted if `run` is dropped before it ends (a caller that
/// drops the service, as a crash would, takes its HTTP server and stage 1 with it).
struct Owned<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Which pipeline a consumer/engine/producer trio runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Single,
    Aggregate,
    Merge,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Single => "single",
            Part::Aggregate => "stage 1",
            Part::Merge => "stage 2",
        }
    }
}

/// One pipeline: consumer, engine, transactional producer and checkpoints, until `stop`.
async fn pipeline(
    cfg: &Config,
    part: Part,
    state: &Arc<ApiState>,
    ctl_rx: &mut tokio::sync::mpsc::Receiver<Command>,
    stop_rx: tokio::sync::watch::Receiver<bool>,
    signer: &Signer,
    alertmanager: Option<&crate::alertmanager::Forwarder>,
) -> Result<RunReport, ServiceError> {
    let telemetry = state.telemetry.clone();
    let mut engine = Engine::new(cfg)?;
    // What this pipeline reads, and under which group and transactional.id.
    let mut k = cfg.kafka.clone();
    let base_txn = cfg.kafka.transactional_id_for(&cfg.service.instance);
    let txn_base = match part {
        Part::Single => base_txn,
        Part::Aggregate => format!("{base_txn}-stage1"),
        Part::Merge => {
            k.group_id = cfg.scale.merge_group(&cfg.kafka);
            k.topics.events = cfg.kafka.topics.repartition.clone();
            k.topics.changes = String::new();
            format!("{base_txn}-stage2")
        }
    };
    let (mv_tx, mut mv_rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = source::consumer(&k, state.clone(), mv_tx)?;
    let delivery = cfg.kafka.delivery;
    let txn_id = (delivery == Delivery::ExactlyOnce).then_some(txn_base);
    let producer = source::producer(&cfg.kafka, txn_id.as_deref())?;
    let (kc, two_stage) = (cfg.kafka.clone(), part != Part::Single);
    let (consumer, partitions) = tokio::task::spawn_blocking(move || {
        source::check_topics(&consumer, &kc, two_stage, Duration::from_secs(15))
            .map(|p| (consumer, p))
    })
    .await
    .expect("metadata task")?;
    let input_partitions = partitions
        .get(&cfg.kafka.topics.events)
        .copied()
        .unwrap_or(1);
    let repartitions = partitions
        .get(&cfg.kafka.topics.repartition)
        .copied()
        .unwrap_or(1);
    match part {
        Part::Single => {}
        Part::Aggregate => engine.set_stage(crate::engine::Stage::Aggregate {
            partitions: repartitions,
        }),
        Part::Merge => engine.set_stage(crate::engine::Stage::Merge {
            partitions: repartitions,
        }),
    }
    telemetry
        .state
        .delivery
        .with_label_values(&[delivery.as_str()])
        .set(1);
    if let Some(id) = &txn_id {
        // Fences any older instance with this id and aborts its open transaction, so that the
        // committed offsets read next are final.
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.init_transactions(Duration::from_secs(30)))
            .await
            .expect("init_transactions task")
            .map_err(|e| ServiceError::Transactions(e.to_string()))?;
        tracing::info!(transactional_id = %id, "delivery exactly_once: outputs and offsets commit in one transaction");
    } else {
        tracing::warn!("delivery at_least_once: a crash may re-send outputs; alerts (incident_id) and rollback requests (id) carry stable ids for consumers to deduplicate");
    }
    let mut keeper = StateKeeper::new(cfg);
    match part {
        Part::Single => {}
        // Stage 1 holds nothing past a batch: its committed offsets are its whole state.
        Part::Aggregate => keeper.dir = None,
        // Stage 2: `[state] dir` is shared by the instances (a shared volume); each writes
        // its checkpoints in its own subdirectory and reads the others' on a rebalance.
        Part::Merge => {
            if let Some(root) = keeper.dir.take() {
                let own = root.join(checkpoint::instance_dir_name(&cfg.service.instance));
                std::fs::create_dir_all(&own).map_err(|e| {
                    ServiceError::State(format!("cannot create {}: {e}", own.display()))
                })?;
                keeper.shared = Some(root);
                keeper.dir = Some(own);
            }
        }
    }
    if let Some(dir) = &keeper.dir {
        // A state directory that cannot be written would stall every transaction that must
        // carry a checkpoint: refuse to start instead.
        checkpoint::probe_writable(dir).map_err(|e| ServiceError::State(e.to_string()))?;
        checkpoint::claim(dir, &keeper.token).map_err(|e| ServiceError::State(e.to_string()))?;
        tracing::info!(dir = %dir.display(), incarnation = %keeper.token, "state directory claimed");
    }
    if let Some(dir) = keeper.dir.clone() {
        keeper.restore(&mut engine, &dir, &consumer, &telemetry);
    } else if part != Part::Aggregate {
        tracing::warn!(
            "no [state] dir: no checkpoints; a restart relearns every baseline from scratch"
        );
    }
    source::subscribe(&consumer, &k)?;
    tracing::info!(
        brokers = %k.bootstrap_servers,
        events = %k.topics.events,
        changes = %k.topics.changes,
        group = %k.group_id,
        metrics = engine.metrics().len(),
        pipeline = part.name(),
        "guardrail running"
    );
    let sink = KafkaSink {
        producer,
        topics: cfg.kafka.topics.clone(),
        timeout: Duration::from_secs(cfg.kafka.produce_timeout_secs),
        dead_letters_unwritable: state.telemetry.dead_letters_unwritable.clone(),
    };
    let events_topic = k.topics.events.clone();
    let dead_limit = cfg.engine.max_event_bytes;
    let max_gauges = cfg.http.max_series_gauges;

    let flusher = Flusher {
        delivery,
        txn_id: txn_id.as_deref().unwrap_or(""),
        sink: &sink,
        signer,
        consumer: &consumer,
        state,
        events_topic: &events_topic,
        changes_topic: &k.topics.changes,
        max_gauges,
        alertmanager,
    };
    let mut batch = Batch::default();
    let mut idle_tick = tokio::time::interval(Duration::from_secs(5));
    idle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = stop_rx.clone();
    let mut last_flush = Instant::now();
    let held = HoldRevocations::new(&consumer);
    // Movements read ahead of their turn (a revocation waits for the message read with it).
    let mut moved: Vec<source::Movement> = Vec::new();
    loop {
        let step = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            Some(cmd) = ctl_rx.recv() => Step::Control(cmd),
            // A rebalance served inside `recv` is handled at once, not with the next message:
            // a held revocation keeps the group waiting until it is released.
            Some(mv) = mv_rx.recv() => {
                moved.push(mv);
                Step::Message(None)
            }
            m = consumer.recv() => Step::Message(Some(m)),
            _ = tokio::time::sleep(FLUSH_EVERY), if !batch.is_empty() => Step::Message(None),
            _ = idle_tick.tick() => Step::Idle,
        };
        let msg = match step {
            Step::Message(m) => m,
            Step::Idle => {
                // Input silent: deadlines still come due (see Engine::advance_idle).
                engine.advance_idle(now_ms());
                engine.release_overdue_holds(now_ms());
                // Stage 1 tells stage 2 which of its partitions are silent (markers), or
                // stage 2 would hold their windows open for good.
                let markers = part == Part::Aggregate && batch.is_empty();
                if engine.has_outputs() || markers || (batch.is_empty() && keeper.due(false)) {
                    flusher
                        .flush(&mut engine, &mut batch, &mut stop, &mut keeper, false)
                        .await?;
                    last_flush = Instant::now();
                }
                continue;
            }
            Step::Control(Command::Decide { call, reply }) => {
                let r = engine.control(&call);
                // Deliver the audit record (and any rollback) before answering, so a caller
                // that sees 200 finds them on the topics.
                if engine.has_outputs() {
                    flusher
                        .flush(&mut engine, &mut batch, &mut stop, &mut keeper, false)
                        .await?;
                    last_flush = Instant::now();
                }
                let _ = reply.send(r);
                continue;
            }
            Step::Control(Command::ChangeAudit { change_id, reply }) => {
                let _ = reply.send(engine.change_audit(&change_id));
                continue;
            }
        };
        let mut sought = Vec::new();
        let mut revoked: Vec<(String, i32)> = Vec::new();
        while let Ok(mv) = mv_rx.try_recv() {
            moved.push(mv);
        }
        for mv in moved.drain(..) {
            match mv {
                source::Movement::Assigned(parts) => {
                    let events: Vec<i32> = parts
                        .iter()
                        .filter(|(t, _)| *t == events_topic)
                        .map(|(_, p)| *p)
                        .collect();
                    if part == Part::Merge {
                        engine.assign_repartitions(&events, input_partitions, now_ms());
                        keeper.take_over(
                            &mut engine,
                            &consumer,
                            &events_topic,
                            &events,
                            &telemetry,
                        );
                    } else {
                        engine.assign_sources(&events, now_ms());
                    }
                    keeper.resume_returned(&consumer, &parts);
                    sought.extend(keeper.seek_restored(&consumer, &parts));
                }
                // Still assigned until released, after the message read with it.
                source::Movement::Revoked(parts) => revoked.extend(parts),
            }
        }
        match msg {
            // Fetched before the seek back to the checkpoint: it will be read again in order.
            Some(Ok(m))
                if sought
                    .iter()
                    .any(|(t, p)| t == m.topic() && *p == m.partition()) => {}
            // From a partition whose seek could not be made yet: its fetcher runs now, so the
            // seek can; the message is read again after it.
            Some(Ok(m)) if keeper.seek_pending(m.topic(), m.partition()) => {
                let tp = [(m.topic().to_string(), m.partition())];
                keeper.seek_restored(&consumer, &tp);
            }
            Some(Ok(m)) => {
                let received = Instant::now();
                // The brokers went away or came back: every events partition holds the
                // watermark again until it delivers (or stays silent for SOURCE_IDLE_MS), so
                // the first partition to hand over its backlog cannot declare the others late.
                // (Here, not on the error: the "all brokers down" error is itself a message.)
                if let Some(parts) = consumer.context().take_rearm() {
                    for p in &parts {
                        if part == Part::Merge {
                            engine.forget_repartition(*p);
                        } else {
                            engine.forget_source(*p);
                        }
                    }
                    if part == Part::Merge {
                        engine.assign_repartitions(&parts, input_partitions, now_ms());
                    } else {
                        engine.assign_sources(&parts, now_ms());
                    }
                }
                if batch.is_empty() {
                    batch.started = Some(received);
                }
                let payload = m.payload().unwrap_or(&[]);
                let is_events = m.topic() == events_topic;
                let res = if is_events && part == Part::Merge {
                    engine.process_partial(m.partition(), payload, now_ms())
                } else if is_events {
                    engine.process_event_ingested(
                        m.partition(),
                        payload,
                        now_ms(),
                        m.timestamp().to_millis(),
                    )
                } else if part == Part::Aggregate {
                    let r = engine.forward_change(payload);
                    if let Err(e) = &r {
                        engine.stats.changes_rejected[e.code.index()] += 1;
                    }
                    r
                } else {
                    let r = engine.process_change(payload);
                    if let Err(e) = &r {
                        engine.stats.changes_rejected[e.code.index()] += 1;
                    }
                    r
                };
                if let Err(rej) = res {
                    let src = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
                    telemetry.log_rate_limited(rej.code.as_str(), Duration::from_secs(10), || {
                        tracing::warn!(code = rej.code.as_str(), source = %src, error = %rej.message, "input dead-lettered")
                    });
                    batch.dead.push(dead_letter(
                        payload,
                        dead_limit,
                        rej.code,
                        &rej.message,
                        &src,
                    ));
                }
                batch.track(is_events, m.partition(), m.offset());
                if engine.has_outputs() && batch.decided_at.is_none() {
                    batch.decided_at = Some(received);
                }
                if !state.ready.load(std::sync::atomic::Ordering::Relaxed) {
                    state.set_ready(true, "");
                }
            }
            Some(Err(e)) => {
                telemetry.log_rate_limited(
                    "kafka_consume",
                    Duration::from_secs(10),
                    || tracing::error!(error = %e, "consume error"),
                );
                continue;
            }
            None => {}
        }
        if !revoked.is_empty() {
            // Everything read from the revoked partitions is delivered and committed (with a
            // checkpoint, for stage 2's next owner) before they go.
            flusher
                .flush(&mut engine, &mut batch, &mut stop, &mut keeper, true)
                .await?;
            last_flush = Instant::now();
            if delivery == Delivery::AtLeastOnce {
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    tracing::debug!(error = %e, "commit before a revocation");
                }
            }
            for (t, p) in &revoked {
                if *t == events_topic && part == Part::Merge {
                    engine.forget_repartition(*p);
                    keeper.hand_over(*p);
                } else if *t == events_topic {
                    engine.forget_source(*p);
                }
                if let Some(o) = keeper.positions.remove(&(t.clone(), *p)) {
                    keeper.revoked_at.insert((t.clone(), *p), o);
                }
                keeper.seek_to.remove(&(t.clone(), *p));
                batch.forget(*t == events_topic, *p);
            }
            consumer.context().release_revoked(&consumer);
            continue;
        }
        let due =
            engine.has_outputs() || batch.count >= BATCH_MAX || last_flush.elapsed() >= FLUSH_EVERY;
        if due && !batch.is_empty() {
            flusher
                .flush(&mut engine, &mut batch, &mut stop, &mut keeper, false)
                .await?;
            last_flush = Instant::now();
        }
    }
    // Last batch, and a checkpoint so that the next start resumes exactly here.
    flusher
        .flush(
            &mut engine,
            &mut batch,
            &mut stop_rx.clone(),
            &mut keeper,
            true,
        )
        .await?;
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit");
    }
    // Closing: a revocation held when the loop stopped goes after the final batch.
    drop(held);
    tracing::info!(
        events = engine.stats.events,
        pipeline = part.name(),
        "guardrail stopped"
    );
    Ok(RunReport {
        events: engine.stats.events,
        rejected: engine.stats.rejected.iter().sum(),
        incidents: engine.incidents.len(),
        rollbacks_requested: engine.stats.rollbacks_requested,
    })
}

/// Holds revocations for the processing loop (see `SourceContext::hold_revocations`) while it
/// lives. However the loop ends (stopped, an error, its task dropped as in a crash test), they
/// go at once again and a held one is let go: the consumer's close waits for them.
struct HoldRevocations<'a>(&'a StreamConsumer<source::SourceContext>);

impl<'a> HoldRevocations<'a> {
    fn new(consumer: &'a StreamConsumer<source::SourceContext>) -> Self {
        consumer.context().hold_revocations(true);
        HoldRevocations(consumer)
    }
}

impl Drop for HoldRevocations<'_> {
    fn drop(&mut self) {
        self.0.context().hold_revocations(false);
        self.0.context().release_revoked(self.0);
    }
}

/// What woke the loop.
enum Step<M> {
    Message(Option<M>),
    Control(Command),
    Idle,
}

#[derive(Default)]
struct Batch {
    /// (is events topic, partition, last offset) processed in this batch.
    offsets: Vec<(bool, i32, i64)>,
    dead: Vec<Encoded>,
    count: usize,
    started: Option<Instant>,
    /// When the message that made the engine decide something was read (alert latency).
    decided_at: Option<Instant>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Drops a revoked partition's offsets: its new owner reads them again.
    fn forget(&mut self, events: bool, partition: i32) {
        self.offsets
            .retain(|(e, p, _)| !(*e == events && *p == partition));
    }

    fn track(&mut self, events: bool, partition: i32, offset: i64) {
        self.count += 1;
        match self
            .offsets
            .iter_mut()
            .find(|(e, p, _)| *e == events && *p == partition)
        {
            Some(x) => x.2 = x.2.max(offset),
            None => self.offsets.push((events, partition, offset)),
        }
    }
}

/// Ends a batch: delivers its outputs, then stores its offsets and publishes metrics.
struct Flusher<'a> {
    delivery: Delivery,
    txn_id: &'a str,
    sink: &'a KafkaSink,
    signer: &'a Signer,
    consumer: &'a rdkafka::consumer::StreamConsumer<source::SourceContext>,
    state: &'a ApiState,
    events_topic: &'a str,
    changes_topic: &'a str,
    max_gauges: usize,
    alertmanager: Option<&'a crate::alertmanager::Forwarder>,
}

impl Flusher<'_> {
    async fn flush(
        &self,
        engine: &mut Engine,
        batch: &mut Batch,
        stop: &mut tokio::sync::watch::Receiver<bool>,
        keeper: &mut StateKeeper,
        final_flush: bool,
    ) -> Result<(), ServiceError> {
        let Flusher {
            signer,
            state,
            events_topic,
            changes_topic,
            max_gauges,
            alertmanager,
            ..
        } = *self;
        // Under continuous input the idle tick never comes: holds time out here too.
        engine.release_overdue_holds(now_ms());
        // Stage 1: the batch's partial sums, then the markers that let stage 2 close windows.
        engine.drain_partials(now_ms());
        let mut out: Vec<Encoded> = engine
            .take_outputs()
            .inspect(|o| {
                if let (Some(am), Output::Alert(a)) = (alertmanager, o) {
                    am.forward(a);
                }
            })
            .map(|o| o.encode(signer))
            .collect();
        let decided = !out.is_empty();
        let dead_codes: Vec<String> = batch.dead.iter().map(|d| d.headers[0].1.clone()).collect();
        out.append(&mut batch.dead);
        let mut tpl = TopicPartitionList::with_capacity(batch.offsets.len());
        for (events, p, o) in &batch.offsets {
            let topic = if *events { events_topic } else { changes_topic };
            let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(o + 1));
            keeper.positions.insert((topic.to_string(), *p), o + 1);
            keeper.moved = true;
        }
        // The state after this batch, if it must be saved with it: every batch that decided
        // something, and periodically.
        let ckpt = (keeper.due(decided) || (final_flush && keeper.moved))
            .then(|| engine.checkpoint(keeper.offsets(), now_ms()));
        if out.is_empty() && tpl.count() == 0 {
            // Nothing to commit: the checkpoint is consistent with what is committed already.
            if let Some(bytes) = &ckpt {
                keeper.write(bytes, false, &state.telemetry);
            }
            keeper.check_owner()?;
        } else {
            match self.delivery {
                Delivery::ExactlyOnce => {
                    self.commit_transaction(&out, &tpl, ckpt.as_deref(), keeper, stop)
                        .await?
                }
                Delivery::AtLeastOnce => {
                    if !self.deliver(&out, stop).await {
                        return Ok(());
                    }
                    if let Some(bytes) = &ckpt {
                        keeper.write(bytes, false, &state.telemetry);
                    }
                    keeper.check_owner()?;
                    if let Err(e) = self.consumer.store_offsets(&tpl) {
                        // A revoked partition cannot be stored to; its new owner re-reads
                        // (at-least-once).
                        tracing::debug!(error = %e, "storing offsets");
                    }
                }
            }
        }
        for e in &out {
            state
                .telemetry
                .outputs_produced
                .with_label_values(&[e.stream.label()])
                .inc();
        }
        for code in dead_codes {
            state
                .telemetry
                .dlq_produced
                .with_label_values(&[&code])
                .inc();
        }
        state.telemetry.absorb(engine, max_gauges);
        // The API shows the detecting engine; stage 1 has nothing to show.
        let stage1 = matches!(engine.stage(), crate::engine::Stage::Aggregate { .. });
        if engine.take_dirty() && !stage1 {
            state.publish(Snapshot::of(engine));
        }
        if let Some(t) = batch.decided_at.take() {
            if out.iter().any(|e| e.stream == crate::sink::Stream::Alerts) {
                state
                    .telemetry
                    .state
                    .alert_latency
                    .observe(t.elapsed().as_secs_f64());
            }
        }
        if let Some(t) = batch.started.take() {
            state
                .telemetry
                .batch_seconds
                .observe(t.elapsed().as_secs_f64());
        }
        batch.offsets.clear();
        batch.count = 0;
        Ok(())
    }

    /// at_least_once: delivers everything before offsets are stored, retrying while the broker
    /// is unavailable. False when stopping with outputs undelivered.
    async fn deliver(
        &self,
        out: &[Encoded],
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.sink.send_all(out).await {
                Ok(()) => return true,
                Err(e) => {
                    self.not_delivered(&e.to_string());
                    if *stop.borrow() {
                        tracing::error!("shutting down with undelivered outputs; their input will be re-read on restart");
                        return false;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn not_delivered(&self, e: &str) {
        let t = &self.state.telemetry;
        t.output_errors.with_label_values(&["all"]).inc();
        self.state
            .set_ready(false, &format!("cannot produce outputs: {e}"));
        t.log_rate_limited("output_delivery", Duration::from_secs(10), || {
            tracing::error!(error = %e, "producing outputs failed; retrying (offsets are not committed until delivered)")
        });
    }

    /// exactly_once: outputs, offsets and (pending) checkpoint in one transaction, retried
    /// until it commits. A fenced producer is fatal: another instance owns this id now.
    async fn commit_transaction(
        &self,
        out: &[Encoded],
        tpl: &TopicPartitionList,
        ckpt: Option<&[u8]>,
        keeper: &mut StateKeeper,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), ServiceError> {
        let producer: &FutureProducer = &self.sink.producer;
        let timeout = self.sink.timeout;
        let mut backoff = Duration::from_millis(200);
        loop {
            match self
                .try_transaction(producer, out, tpl, ckpt, keeper, timeout)
                .await
            {
                Ok(()) => {
                    self.state
                        .telemetry
                        .state
                        .transactions
                        .with_label_values(&["committed"])
                        .inc();
                    if ckpt.is_some() {
                        keeper.committed(&self.state.telemetry);
                    }
                    return Ok(());
                }
                Err(TxnFailure::Fatal(reason)) => {
                    return Err(ServiceError::Fenced {
                        id: self.txn_id.to_string(),
                        reason,
                    })
                }
                Err(TxnFailure::Retry(reason)) => {
                    keeper.check_owner()?;
                    self.state
                        .telemetry
                        .state
                        .transactions
                        .with_label_values(&["aborted"])
                        .inc();
                    self.not_delivered(&reason);
                    if *stop.borrow() {
                        tracing::error!("shutting down with an uncommitted transaction; its input will be re-read on restart");
                        return Ok(());
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn try_transaction(
        &self,
        producer: &FutureProducer,
        out: &[Encoded],
        tpl: &TopicPartitionList,
        ckpt: Option<&[u8]>,
        keeper: &mut StateKeeper,
        timeout: Duration,
    ) -> Result<(), TxnFailure> {
        producer.begin_transaction().map_err(TxnFailure::of)?;
        let body = async {
            self.sink
                .send_all(out)
                .await
                .map_err(|e| TxnFailure::Retry(e.to_string()))?;
            if tpl.count() > 0 {
                let gm = self
                    .consumer
                    .group_metadata()
                    .ok_or_else(|| TxnFailure::Retry("no consumer group metadata yet".into()))?;
                producer
                    .send_offsets_to_transaction(tpl, &gm, timeout)
                    .map_err(TxnFailure::of)?;
            }
            if let Some(bytes) = ckpt {
                // Written before the commit: a crash between the two leaves a pending
                // checkpoint that startup checks against the committed offsets.
                if !keeper.write(bytes, true, &self.state.telemetry) {
                    return Err(TxnFailure::Retry(
                        "cannot write the checkpoint that goes with this transaction".into(),
                    ));
                }
            }
            // A commit that times out may be retried; anything else aborts.
            let mut attempts = 0;
            loop {
                match producer.commit_transaction(timeout) {
                    Ok(()) => return Ok(()),
                    Err(KafkaError::Transaction(e)) if e.is_retriable() && attempts < 3 => {
                        attempts += 1;
                    }
                    Err(e) => return Err(TxnFailure::of(e)),
                }
            }
        }
        .await;
        if let Err(TxnFailure::Retry(_)) = &body {
            if let Err(e) = producer.abort_transaction(timeout) {
                if let TxnFailure::Fatal(r) = TxnFailure::of(e) {
                    return Err(TxnFailure::Fatal(r));
                }
            }
        }
        body
    }
}

enum TxnFailure {
    Fatal(String),
    Retry(String),
}

impl TxnFailure {
    fn of(e: KafkaError) -> TxnFailure {
        match &e {
            KafkaError::Transaction(r) if r.is_fatal() => TxnFailure::Fatal(e.to_string()),
            _ => TxnFailure::Retry(e.to_string()),
        }
    }
}

/// Checkpoints, and the input positions the engine's state corresponds to.
struct StateKeeper {
    dir: Option<PathBuf>,
    interval: Duration,
    last: Instant,
    /// Next offset to read per (topic, partition), for every partition whose input the
    /// engine's state holds.
    positions: BTreeMap<(String, i32), i64>,
    /// Where this instance had delivered up to in partitions revoked from it. A partition that
    /// comes back is read on from there when the group's committed offset is behind it (a
    /// commit refused while the group rebalanced), not from the committed offset: what was
    /// delivered is not delivered twice.
    revoked_at: HashMap<(String, i32), i64>,
    /// Positions moved since the last checkpoint.
    moved: bool,
    /// Restored positions to seek to when their partition is assigned.
    seek_to: HashMap<(String, i32), i64>,
    /// Stage 2: the directory shared by the instances, `dir`'s parent.
    shared: Option<PathBuf>,
    exactly_once: bool,
    /// Checkpoint files kept, the current one included (`[state] generations`).
    generations: usize,
    /// This incarnation, as written in the state directory's owner file.
    token: String,
    /// Set when a write found the directory claimed by a newer incarnation.
    superseded: Option<String>,
}

impl StateKeeper {
    fn new(cfg: &Config) -> StateKeeper {
        StateKeeper {
            dir: cfg.state.dir.as_ref().map(PathBuf::from),
            interval: Duration::from_secs(cfg.state.checkpoint_interval_secs),
            last: Instant::now(),
            positions: BTreeMap::new(),
            revoked_at: HashMap::new(),
            moved: false,
            seek_to: HashMap::new(),
            shared: None,
            exactly_once: cfg.kafka.delivery == Delivery::ExactlyOnce,
            generations: cfg.state.generations,
            token: format!(
                "{}/pid-{}/{:016x}",
                cfg.service.instance,
                std::process::id(),
                rand::random::<u64>()
            ),
            superseded: None,
        }
    }

    /// Whether this incarnation still owns the state directory: checked before every write,
    /// so that a zombie stops at its first one.
    fn owner(&mut self) -> bool {
        let Some(dir) = &self.dir else { return true };
        if self.superseded.is_some() {
            return false;
        }
        match checkpoint::owns(dir, &self.token) {
            Ok(()) => true,
            Err(reason) => {
                tracing::error!(dir = %dir.display(), %reason, "the state directory belongs to another incarnation now: not writing");
                self.superseded = Some(reason);
                false
            }
        }
    }

    /// The error that stops a superseded incarnation.
    fn check_owner(&self) -> Result<(), ServiceError> {
        match (&self.superseded, &self.dir) {
            (Some(reason), Some(dir)) => Err(ServiceError::Superseded {
                dir: dir.display().to_string(),
                reason: reason.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Stage 2, repartition partition `x` revoked: keeps the last committed checkpoint (which
    /// still holds `x`'s series and offset) for the next owner, since this instance's next
    /// checkpoint will no longer carry `x`.
    fn hand_over(&mut self, x: i32) {
        if !self.owner() {
            return;
        }
        let (Some(dir), Some(_)) = (&self.dir, &self.shared) else {
            return;
        };
        let name = checkpoint::handover_name(x);
        match std::fs::read(dir.join(checkpoint::FILE_NAME)) {
            Ok(bytes) => match checkpoint::write_atomic(dir, &name, &bytes) {
                Ok(()) => tracing::info!(partition = x, "state kept for the next owner"),
                Err(e) => tracing::warn!(error = %e, "cannot keep state for the next owner"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the checkpoint to hand over"),
        }
    }

    /// Stage 2, repartition partitions assigned: for each one this engine's state does not
    /// hold, takes its series over from the newest checkpoint in the shared directory that
    /// holds it at an offset the group has committed (any instance's current checkpoint, or
    /// one kept at a revocation), and seeks there: the input after it is read again.
    fn take_over(
        &mut self,
        engine: &mut Engine,
        consumer: &StreamConsumer<source::SourceContext>,
        topic: &str,
        parts: &[i32],
        t: &Telemetry,
    ) {
        let Some(root) = self.shared.clone() else {
            return;
        };
        let wanted: Vec<i32> = parts
            .iter()
            .copied()
            .filter(|x| !self.seek_to.contains_key(&(topic.to_string(), *x)))
            .filter(|x| !self.positions.contains_key(&(topic.to_string(), *x)))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let committed = match committed_of(consumer, wanted.iter().map(|x| (topic, *x))) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read committed offsets; taking over without state");
                return;
            }
        };
        let fp = engine.state_fingerprint();
        let dirs: Vec<PathBuf> = match std::fs::read_dir(&root) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, dir = %root.display(), "cannot list the shared state directory");
                return;
            }
        };
        // Each file is read and decoded once, however many partitions it serves.
        let mut files: HashMap<PathBuf, Option<(checkpoint::Loaded, crate::engine::Offsets)>> =
            HashMap::new();
        let mut load = |path: &Path| {
            files
                .entry(path.to_path_buf())
                .or_insert_with(|| {
                    let dir = path.parent()?;
                    let name = path.file_name()?.to_str()?;
                    let l = checkpoint::read(dir, name, fp).ok()??;
                    let offs = crate::engine::offsets_of(path, &l.payload).ok()?;
                    Some((l, offs))
                })
                .as_ref()
                .map(|(_, offs)| offs.clone())
        };
        // Per partition, the newest usable checkpoint: (partition, offset, file).
        let mut chosen: Vec<(i32, i64, PathBuf)> = Vec::new();
        for x in wanted {
            // exactly_once: only state whose transaction committed (a checkpoint at or before
            // the committed offset; the input after it is read again). at_least_once: the
            // newest (its input was delivered; re-reading is what at-least-once allows).
            let limit = match committed.find_partition(topic, x).map(|e| e.offset()) {
                _ if !self.exactly_once => i64::MAX,
                Some(Offset::Offset(o)) => o,
                _ => {
                    tracing::info!(
                        partition = x,
                        "nothing committed yet: no state to take over"
                    );
                    continue;
                }
            };
            let mut best: Option<(i64, PathBuf)> = None;
            for d in &dirs {
                for name in [
                    checkpoint::FILE_NAME.to_string(),
                    checkpoint::handover_name(x),
                ] {
                    let path = d.join(&name);
                    let Some(offs) = load(&path) else {
                        continue;
                    };
                    let Some(o) = offs
                        .iter()
                        .find(|(tp, p, _)| tp == topic && *p == x)
                        .map(|(_, _, o)| *o)
                    else {
                        continue;
                    };
                    // Newer than what is committed: its transaction may not have committed.
                    if o <= limit && best.as_ref().map(|b| o > b.0).unwrap_or(true) {
                        best = Some((o, path));
                    }
                }
            }
            match best {
                Some((o, path)) => chosen.push((x, o, path)),
                None => tracing::info!(
                    partition = x,
                    "no state to take over: its series start fresh here"
                ),
            }
        }
        let mut sources: Vec<&PathBuf> = chosen.iter().map(|(_, _, p)| p).collect();
        sources.sort();
        sources.dedup();
        for path in sources {
            let Some(Some((loaded, _))) = files.get(path) else {
                continue;
            };
            let parts: Vec<i32> = chosen
                .iter()
                .filter(|(_, _, p)| p == path)
                .map(|(x, _, _)| *x)
                .collect();
            match engine.import_partitions(path, loaded, &parts) {
                Ok(r) => {
                    tracing::info!(partitions = ?parts, from = %path.display(),
                        series = r.series, incidents = r.incidents, "state taken over");
                    for (x, o, _) in chosen.iter().filter(|(_, _, p)| p == path) {
                        t.state.handovers.with_label_values(&["imported"]).inc();
                        tracing::info!(
                            partition = x,
                            offset = o,
                            "resuming the taken-over partition"
                        );
                        self.positions.insert((topic.to_string(), *x), *o);
                        self.seek_to.insert((topic.to_string(), *x), *o);
                    }
                }
                Err(e) => {
                    for _ in &parts {
                        t.state.handovers.with_label_values(&["failed"]).inc();
                    }
                    tracing::warn!(error = %e, partitions = ?parts, "cannot take the state over");
                }
            }
        }
    }

    fn due(&self, decided: bool) -> bool {
        self.dir.is_some() && (decided || (self.moved && self.last.elapsed() >= self.interval))
    }

    fn offsets(&self) -> crate::engine::Offsets {
        self.positions
            .iter()
            .map(|((t, p), o)| (t.clone(), *p, *o))
            .collect()
    }

    /// Writes a checkpoint (pending: one whose transaction has yet to commit). False if it
    /// could not be written.
    fn write(&mut self, bytes: &[u8], pending: bool, t: &Telemetry) -> bool {
        if !self.owner() {
            return false;
        }
        let Some(dir) = &self.dir else { return true };
        let started = Instant::now();
        let written = if pending {
            checkpoint::write_atomic(dir, checkpoint::PENDING_NAME, bytes)
        } else {
            checkpoint::write_current(dir, bytes, self.generations)
        };
        match written {
            Ok(()) => {
                t.state
                    .checkpoint_seconds
                    .observe(started.elapsed().as_secs_f64());
                t.state.checkpoint_bytes.set(bytes.len() as i64);
                if !pending {
                    self.written(t);
                }
                true
            }
            Err(e) => {
                t.state
                    .checkpoint_errors
                    .with_label_values(&[e.reason()])
                    .inc();
                t.log_rate_limited(
                    "checkpoint_write",
                    Duration::from_secs(10),
                    || tracing::error!(error = %e, "cannot write a checkpoint"),
                );
                false
            }
        }
    }

    fn written(&mut self, t: &Telemetry) {
        self.last = Instant::now();
        self.moved = false;
        t.state.checkpoint_writes.inc();
        t.state.checkpoint_age.set(now_ms() as f64 / 1000.0);
    }

    /// The pending checkpoint's transaction committed: it becomes the current one.
    fn committed(&mut self, t: &Telemetry) {
        if !self.owner() {
            return;
        }
        let Some(dir) = &self.dir else { return };
        match checkpoint::promote(dir, self.generations) {
            Ok(()) => self.written(t),
            // Startup promotes it (the committed offsets prove the commit).
            Err(e) => tracing::warn!(error = %e, "cannot promote the pending checkpoint"),
        }
    }

    /// Startup: resolves a pending checkpoint, restores the newest good checkpoint generation
    /// into `engine` and remembers where to seek. Anything wrong is reported, moved aside and
    /// not trusted.
    fn restore(
        &mut self,
        engine: &mut Engine,
        dir: &Path,
        consumer: &StreamConsumer<source::SourceContext>,
        t: &Telemetry,
    ) {
        let fp = engine.state_fingerprint();
        let reject = |e: &CheckpointError, name: &str| {
            t.state
                .checkpoint_errors
                .with_label_values(&[e.reason()])
                .inc();
            let moved = checkpoint::quarantine(dir, name, now_ms());
            tracing::error!(error = %e, moved_to = ?moved, "checkpoint not trusted; not restoring it");
        };
        self.resolve_pending(dir, fp, consumer, &reject);
        let newest = checkpoint::load_newest(
            dir,
            fp,
            self.generations,
            |path, loaded| engine.restore(path, &loaded),
            |name, e| reject(e, name),
        );
        let Some((generation, r)) = newest.taken else {
            if newest.passed.iter().all(|(_, why)| *why == "missing") {
                tracing::info!(dir = %dir.display(), "no checkpoint yet: starting cold");
            } else {
                tracing::error!(dir = %dir.display(), passed = ?newest.passed, "no checkpoint generation is usable: starting cold");
            }
            return;
        };
        say_restored(dir, generation, &r);
        t.state.restored.set(1);
        if generation > 0 {
            t.state
                .checkpoint_fallbacks
                .with_label_values(&[&generation.to_string()])
                .inc();
            tracing::warn!(
                generation,
                file = %checkpoint::generation_name(generation),
                newer = ?newest.passed,
                read_again = %read_again(consumer, &r.offsets),
                dir = %dir.display(),
                "restored an older checkpoint generation: the newer ones are damaged or missing; \
                 the input since it is read again, and decisions already committed from that \
                 input are produced again (same incident and rollback ids)"
            );
        }
        for (topic, p, o) in r.offsets {
            self.positions.insert((topic.clone(), p), o);
            self.seek_to.insert((topic, p), o);
        }
    }

    /// A pending checkpoint whose transaction committed becomes the current one; one whose
    /// transaction did not is dropped.
    fn resolve_pending(
        &self,
        dir: &Path,
        fp: u64,
        consumer: &StreamConsumer<source::SourceContext>,
        reject: &impl Fn(&CheckpointError, &str),
    ) {
        let l = match checkpoint::read(dir, checkpoint::PENDING_NAME, fp) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => return reject(&e, checkpoint::PENDING_NAME),
        };
        let path = dir.join(checkpoint::PENDING_NAME);
        match crate::engine::offsets_of(&path, &l.payload) {
            Ok(offs) if committed_at(consumer, &offs) => {
                tracing::info!("the pending checkpoint's transaction committed; promoting it");
                if let Err(e) = checkpoint::promote(dir, self.generations) {
                    reject(&e, checkpoint::PENDING_NAME);
                }
            }
            Ok(_) => {
                tracing::info!("discarding a pending checkpoint whose transaction did not commit");
                checkpoint::discard_pending(dir);
            }
            Err(e) => reject(&e, checkpoint::PENDING_NAME),
        }
    }

    /// Partitions assigned back to this instance after a revocation, which no checkpoint
    /// placed: read on from where this instance had delivered, if the group's committed offset
    /// is behind it (see `revoked_at`).
    fn resume_returned(
        &mut self,
        consumer: &StreamConsumer<source::SourceContext>,
        parts: &[(String, i32)],
    ) {
        let back: Vec<((String, i32), i64)> = parts
            .iter()
            .filter_map(|tp| self.revoked_at.remove(tp).map(|o| (tp.clone(), o)))
            .filter(|(tp, _)| !self.seek_to.contains_key(tp))
            .collect();
        if back.is_empty() {
            return;
        }
        let committed = match committed_of(
            consumer,
            back.iter().map(|((t, p), _)| (t.as_str(), *p)),
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read committed offsets; reading on from them");
                return;
            }
        };
        for ((t, p), o) in back {
            let behind = match committed.find_partition(&t, p).map(|e| e.offset()) {
                Some(Offset::Offset(c)) => c < o,
                _ => true,
            };
            if behind {
                tracing::info!(topic = %t, partition = p, offset = o, "partition back: reading on from what this instance delivered, past the committed offset");
                self.positions.insert((t.clone(), p), o);
                self.seek_to.insert((t, p), o);
            }
        }
    }

    /// Whether `topic`/`partition` still has to be sought back to a restored offset.
    fn seek_pending(&self, topic: &str, partition: i32) -> bool {
        !self.seek_to.is_empty() && self.seek_to.contains_key(&(topic.to_string(), partition))
    }

    /// Seeks newly assigned partitions back to the restored checkpoint's offsets, so that the
    /// input after the checkpoint is read again into the restored state. Returns the
    /// partitions sought.
    fn seek_restored(
        &mut self,
        consumer: &StreamConsumer<source::SourceContext>,
        parts: &[(String, i32)],
    ) -> Vec<(String, i32)> {
        let mut sought = Vec::new();
        for (topic, p) in parts {
            let Some(o) = self.seek_to.remove(&(topic.clone(), *p)) else {
                continue;
            };
            // A partition assigned a moment ago cannot be sought until its fetcher has started
            // ("Erroneous state"). State restored at `o` must be read on from exactly `o`, so
            // the seek is kept pending: the partition's messages are dropped, each retrying the
            // seek (its arrival proves the fetcher runs), until the seek is made.
            match consumer.seek(topic, *p, Offset::Offset(o), Duration::from_secs(10)) {
                Ok(()) => {
                    tracing::info!(topic = %topic, partition = p, offset = o, "resuming from the checkpoint's offset");
                    sought.push((topic.clone(), *p));
                }
                Err(e) => {
                    tracing::debug!(topic = %topic, partition = p, offset = o, error = %e, "seek not possible yet; retried when the partition delivers");
                    self.seek_to.insert((topic.clone(), *p), o);
                }
            }
        }
        sought
    }
}

/// The group's committed offsets for `parts` (topic, partition).
fn committed_of<'a>(
    consumer: &StreamConsumer<source::SourceContext>,
    parts: impl Iterator<Item = (&'a str, i32)>,
) -> rdkafka::error::KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in parts {
        tpl.add_partition(t, p);
    }
    consumer.committed_offsets(tpl, Duration::from_secs(15))
}

/// What was restored from `dir`, and per metric what became of its state.
fn say_restored(dir: &Path, generation: usize, r: &crate::engine::Restored) {
    let dir = dir.display();
    tracing::info!(
        series = r.series,
        incidents = r.incidents,
        bytes = r.bytes,
        age_secs = (now_ms() - r.written_ms) / 1000,
        generation,
        %dir,
        "state restored from checkpoint"
    );
    for (metric, fate) in &r.metrics {
        if fate.is_kept() {
            tracing::info!(%metric, state = %fate, %dir, "metric state from the checkpoint");
        } else {
            tracing::warn!(%metric, state = %fate, %dir, "metric state from the checkpoint");
        }
    }
}

/// The input a restore from `offs` reads again past the group's committed offsets, as
/// `topic/partition:from..to` (what was committed from it is produced again).
fn read_again(
    consumer: &StreamConsumer<source::SourceContext>,
    offs: &crate::engine::Offsets,
) -> String {
    let got = match committed_of(consumer, offs.iter().map(|(t, p, _)| (t.as_str(), *p))) {
        Ok(got) => got,
        Err(e) => return format!("unknown (committed offsets unreadable: {e})"),
    };
    let ranges: Vec<String> = offs
        .iter()
        .filter_map(|(t, p, o)| match got.find_partition(t, *p)?.offset() {
            Offset::Offset(c) if c > *o => Some(format!("{t}/{p}:{o}..{c}")),
            _ => None,
        })
        .collect();
    if ranges.is_empty() {
        "nothing past the committed offsets".into()
    } else {
        ranges.join(", ")
    }
}

/// True if the group's committed offsets are exactly `offs` (so the transaction that went with
/// a pending checkpoint committed).
fn committed_at(
    consumer: &StreamConsumer<source::SourceContext>,
    offs: &crate::engine::Offsets,
) -> bool {
    if offs.is_empty() {
        return false;
    }
    let Ok(got) = committed_of(consumer, offs.iter().map(|(t, p, _)| (t.as_str(), *p))) else {
        return false;
    };
    offs.iter().all(|(t, p, o)| {
        got.find_partition(t, *p)
            .is_some_and(|e| e.offset() == Offset::Offset(*o))
    })
}

/// A fresh API state with its own metrics registry.
pub fn new_state() -> Arc<ApiState> {
    ApiState::new(Arc::new(Telemetry::new()))
}
