//! `guardrail run`: the Kafka source, the engine, the sinks and the HTTP API, until shutdown.
//!
//! Batches: messages are applied to the engine as they arrive; a batch ends when the engine has
//! outputs, after `BATCH_MAX` messages, or when the input goes idle for `FLUSH_EVERY`. At the
//! end of a batch its outputs and dead letters are produced and acknowledged, then the offsets of
//! the batch are stored (committed in the background): at-least-once, nothing acted on is lost.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::net::TcpListener;

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
    let mut engine = Engine::new(&cfg)?;
    let auth = Arc::new(crate::auth::Auth::from_config(&cfg.roles, &cfg.actors)?);
    if auth.is_empty() {
        tracing::warn!("no [[actors]] configured: the HTTP API is read-only and unauthenticated; approve, veto, acknowledge and silence are refused");
    }
    // Control calls from the API, applied by this task between messages.
    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::channel::<Command>(64);
    state.install(auth, ctl_tx);
    let telemetry = state.telemetry.clone();
    let alertmanager = crate::alertmanager::spawn(&cfg, telemetry.clone())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_http = stop_rx.clone();
    let http = tokio::spawn(api::serve(listener, state.clone(), async move {
        let _ = stop_http.wait_for(|s| *s).await;
    }));
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let (mv_tx, mv_rx) = std::sync::mpsc::channel();
    let consumer = source::consumer(&cfg.kafka, state.clone(), mv_tx)?;
    let producer = source::producer(&cfg.kafka)?;
    let k = cfg.kafka.clone();
    let consumer = tokio::task::spawn_blocking(move || {
        source::check_topics(&consumer, &k, Duration::from_secs(15)).map(|_| consumer)
    })
    .await
    .expect("metadata task")?;
    source::subscribe(&consumer, &cfg.kafka)?;
    tracing::info!(
        brokers = %cfg.kafka.bootstrap_servers,
        events = %cfg.kafka.topics.events,
        changes = %cfg.kafka.topics.changes,
        group = %cfg.kafka.group_id,
        metrics = engine.metrics().len(),
        "guardrail running"
    );
    let sink = KafkaSink {
        producer,
        topics: cfg.kafka.topics.clone(),
        timeout: Duration::from_secs(cfg.kafka.produce_timeout_secs),
    };
    let events_topic = cfg.kafka.topics.events.clone();
    let max_gauges = cfg.http.max_series_gauges;

    let flusher = Flusher {
        sink: &sink,
        signer: &signer,
        consumer: &consumer,
        state: &state,
        events_topic: &events_topic,
        changes_topic: &cfg.kafka.topics.changes,
        max_gauges,
        alertmanager: alertmanager.as_ref(),
    };
    let mut batch = Batch::default();
    let mut idle_tick = tokio::time::interval(Duration::from_secs(5));
    idle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = stop_rx.clone();
    let mut last_flush = Instant::now();
    loop {
        let step = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            Some(cmd) = ctl_rx.recv() => Step::Control(cmd),
            m = consumer.recv() => Step::Message(Some(m)),
            _ = tokio::time::sleep(FLUSH_EVERY), if !batch.is_empty() => Step::Message(None),
            _ = idle_tick.tick() => Step::Idle,
        };
        let msg = match step {
            Step::Message(m) => m,
            Step::Idle => {
                // Input silent: deadlines still come due (see Engine::advance_idle).
                engine.advance_idle(now_ms());
                if engine.has_outputs() {
                    flusher.flush(&mut engine, &mut batch, &mut stop).await;
                    last_flush = Instant::now();
                }
                continue;
            }
            Step::Control(Command::Decide { call, reply }) => {
                let r = engine.control(&call);
                // Deliver the audit record (and any rollback) before answering, so a caller
                // that sees 200 finds them on the topics.
                if engine.has_outputs() {
                    flusher.flush(&mut engine, &mut batch, &mut stop).await;
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
        while let Ok(mv) = mv_rx.try_recv() {
            match mv {
                source::Movement::Assigned(p) => engine.assign_sources(&p, now_ms()),
                source::Movement::Revoked(p) => p.iter().for_each(|x| engine.forget_source(*x)),
            }
        }
        match msg {
            Some(Ok(m)) => {
                if batch.is_empty() {
                    batch.started = Some(Instant::now());
                }
                let payload = m.payload().unwrap_or(&[]);
                let is_events = m.topic() == events_topic;
                let res = if is_events {
                    engine.process_event_from(m.partition(), payload, now_ms())
                } else {
                    let r = engine.process_change(payload);
                    if let Err(e) = &r {
                        engine.stats.rejected[e.code.index()] += 1;
                    }
                    r
                };
                if let Err(rej) = res {
                    let src = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
                    telemetry.log_rate_limited(rej.code.as_str(), Duration::from_secs(10), || {
                        tracing::warn!(code = rej.code.as_str(), source = %src, error = %rej.message, "input dead-lettered")
                    });
                    batch
                        .dead
                        .push(dead_letter(payload, rej.code, &rej.message, &src));
                }
                batch.track(is_events, m.partition(), m.offset());
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
        let due =
            engine.has_outputs() || batch.count >= BATCH_MAX || last_flush.elapsed() >= FLUSH_EVERY;
        if due && !batch.is_empty() {
            flusher.flush(&mut engine, &mut batch, &mut stop).await;
            last_flush = Instant::now();
        }
    }
    if !batch.is_empty() {
        flusher
            .flush(&mut engine, &mut batch, &mut stop_rx.clone())
            .await;
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit");
    }
    state.set_ready(false, "shutting down");
    if let Some(am) = alertmanager {
        am.shutdown().await;
    }
    let _ = http.await;
    tracing::info!(events = engine.stats.events, "guardrail stopped");
    Ok(RunReport {
        events: engine.stats.events,
        rejected: engine.stats.rejected.iter().sum(),
        incidents: engine.incidents.len(),
        rollbacks_requested: engine.stats.rollbacks_requested,
    })
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
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.count == 0
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
    ) {
        let Flusher {
            sink,
            signer,
            consumer,
            state,
            events_topic,
            changes_topic,
            max_gauges,
            alertmanager,
        } = *self;
        let mut out: Vec<Encoded> = engine
            .take_outputs()
            .inspect(|o| {
                if let (Some(am), Output::Alert(a)) = (alertmanager, o) {
                    am.forward(a);
                }
            })
            .map(|o| o.encode(signer))
            .collect();
        let dead_codes: Vec<String> = batch.dead.iter().map(|d| d.headers[0].1.clone()).collect();
        out.append(&mut batch.dead);
        // Deliver everything before storing offsets; retry while the broker is unavailable.
        let mut backoff = Duration::from_millis(200);
        loop {
            match sink.send_all(&out).await {
                Ok(()) => break,
                Err(e) => {
                    state
                        .telemetry
                        .output_errors
                        .with_label_values(&["all"])
                        .inc();
                    state.set_ready(false, &format!("cannot produce outputs: {e}"));
                    tracing::error!(error = %e, "producing outputs failed; retrying (offsets are not stored until delivered)");
                    if *stop.borrow() {
                        tracing::error!("shutting down with undelivered outputs; their input will be re-read on restart");
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
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
        let mut tpl = TopicPartitionList::with_capacity(batch.offsets.len());
        for (events, p, o) in &batch.offsets {
            let topic = if *events { events_topic } else { changes_topic };
            let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(o + 1));
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            // A revoked partition cannot be stored to; its new owner re-reads (at-least-once).
            tracing::debug!(error = %e, "storing offsets");
        }
        state.telemetry.absorb(engine, max_gauges);
        if engine.take_dirty() {
            state.publish(Snapshot::of(engine));
        }
        if let Some(t) = batch.started.take() {
            state
                .telemetry
                .batch_seconds
                .observe(t.elapsed().as_secs_f64());
        }
        batch.offsets.clear();
        batch.count = 0;
    }
}

/// A fresh API state with its own metrics registry.
pub fn new_state() -> Arc<ApiState> {
    ApiState::new(Arc::new(Telemetry::new()))
}
