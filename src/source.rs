//! The Kafka source: a consumer group over the events and changes topics.
//!
//! Offsets are stored only after the messages' effects (outputs, dead letters) have been
//! acknowledged by the broker (`enable.auto.offset.store=false`; the stored offsets are committed
//! in the background), so a crash re-reads rather than loses. Rebalances are logged and move the
//! readiness flag; librdkafka statistics feed the lag gauge.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;

use crate::api::ApiState;
use crate::config::KafkaConfig;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot create the Kafka {what}: {source}")]
    Client {
        what: &'static str,
        source: KafkaError,
    },
    #[error("cannot reach Kafka at {servers}: {source}. Check [kafka].bootstrap_servers and that the broker is up (and any security settings in [kafka.options]).")]
    Unreachable { servers: String, source: KafkaError },
    #[error("topic {topic:?} does not exist on {servers}. Create it (e.g. `kafka-topics.sh --create --topic {topic}`) or set [kafka.topics] to an existing topic.")]
    MissingTopic { topic: String, servers: String },
    #[error("cannot subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        source: KafkaError,
    },
}

/// Partition movements of the events topic, passed from librdkafka's callback thread to the
/// processing loop (which owns the engine).
#[derive(Debug, Clone)]
pub enum Movement {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Consumer callbacks: rebalances, errors and statistics.
pub struct SourceContext {
    pub state: Arc<ApiState>,
    pub events_topic: String,
    pub movements: std::sync::mpsc::Sender<Movement>,
}

impl SourceContext {
    fn events_partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == self.events_topic)
            .map(|e| e.partition())
            .collect()
    }
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        let lag: i64 = stats
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.state.telemetry.consumer_lag.set(lag);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.state
                .set_ready(false, &format!("all brokers down: {reason}"));
        }
        self.state.telemetry.log_rate_limited(
            "kafka_client_error",
            Duration::from_secs(10),
            || tracing::error!(error = %error, reason, "kafka client error"),
        );
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                let _ = self
                    .movements
                    .send(Movement::Revoked(self.events_partitions(tpl)));
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<String> = tpl
                .elements()
                .iter()
                .map(|e| format!("{}/{}", e.topic(), e.partition()))
                .collect();
            tracing::info!(partitions = ?parts, "partitions assigned");
            let _ = self
                .movements
                .send(Movement::Assigned(self.events_partitions(tpl)));
            if tpl.count() > 0 {
                self.state.set_ready(true, "");
            } else {
                self.state.set_ready(
                    false,
                    "no partition assigned (more instances than partitions?)",
                );
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            if !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
                tracing::warn!(error = %e, "offset commit failed; will retry on the next commit");
            }
        }
    }
}

fn base_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers);
    c
}

pub fn consumer(
    k: &KafkaConfig,
    state: Arc<ApiState>,
    movements: std::sync::mpsc::Sender<Movement>,
) -> Result<StreamConsumer<SourceContext>, SourceError> {
    let mut c = base_config(k);
    c.set("group.id", &k.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000");
    // User options last: they override guardrail's defaults.
    for (key, v) in &k.options {
        c.set(key, v);
    }
    c.create_with_context(SourceContext {
        state,
        events_topic: k.topics.events.clone(),
        movements,
    })
    .map_err(|source| SourceError::Client {
        what: "consumer",
        source,
    })
}

pub fn producer(k: &KafkaConfig) -> Result<FutureProducer, SourceError> {
    let mut c = base_config(k);
    c.set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set(
            "message.timeout.ms",
            (k.produce_timeout_secs * 1000).to_string(),
        );
    for (key, v) in &k.options {
        c.set(key, v);
    }
    c.create().map_err(|source| SourceError::Client {
        what: "producer",
        source,
    })
}

/// Checks at startup that the broker answers and that every topic exists, so that a typo fails
/// fast with a clear message instead of an idle service.
pub fn check_topics(
    consumer: &StreamConsumer<SourceContext>,
    k: &KafkaConfig,
    timeout: Duration,
) -> Result<(), SourceError> {
    let md = consumer
        .fetch_metadata(None, timeout)
        .map_err(|source| SourceError::Unreachable {
            servers: k.bootstrap_servers.clone(),
            source,
        })?;
    for topic in k.topics.all() {
        let ok = md
            .topics()
            .iter()
            .any(|mt| mt.name() == topic && mt.error().is_none() && !mt.partitions().is_empty());
        if !ok {
            return Err(SourceError::MissingTopic {
                topic: topic.to_string(),
                servers: k.bootstrap_servers.clone(),
            });
        }
    }
    Ok(())
}

pub fn subscribe(
    consumer: &StreamConsumer<SourceContext>,
    k: &KafkaConfig,
) -> Result<(), SourceError> {
    let topics = [k.topics.events.as_str(), k.topics.changes.as_str()];
    consumer
        .subscribe(&topics)
        .map_err(|source| SourceError::Subscribe {
            topics: topics.iter().map(|s| s.to_string()).collect(),
            source,
        })
}
