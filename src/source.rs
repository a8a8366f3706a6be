//! The Kafka source: a consumer group over the events and changes topics.
//!
//! Offsets are stored only after the messages' effects (outputs, dead letters) have been
//! acknowledged by the broker (`enable.auto.offset.store=false`; the stored offsets are committed
//! in the background), so a crash re-reads rather than loses. Rebalances are logged and move the
//! readiness flag; librdkafka statistics feed the lag gauge.
//!
//! Security (TLS, SASL) is librdkafka's, configured through `[kafka.options]`; an option value
//! may name an environment variable as `${NAME}` (e.g. `"sasl.password" = "${KAFKA_PASSWORD}"`)
//! so that secrets stay out of the file. At startup, a failed TLS handshake or a refused login is
//! reported as such (what failed and which option to check), not as an unreachable broker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
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
    #[error("cannot reach Kafka at {servers}: {source}{}. Check [kafka].bootstrap_servers and that the broker is up (and any security settings in [kafka.options]).", last_error_suffix(.last_error))]
    Unreachable {
        servers: String,
        source: KafkaError,
        /// The last connection error librdkafka reported, if any (e.g. connection refused).
        last_error: Option<Box<str>>,
    },
    #[error("Kafka at {servers} refused authentication ({mechanism}, user {username:?}): {reason}. Check \"sasl.username\" and \"sasl.password\" in [kafka.options] (or the environment variable the password names), and that \"sasl.mechanism\" is one the broker accepts for this user.")]
    Authentication {
        servers: String,
        mechanism: String,
        username: String,
        reason: String,
    },
    #[error(
        "TLS handshake with Kafka at {servers} failed: {problem}. {hint} (librdkafka: {reason})"
    )]
    Tls {
        servers: String,
        problem: &'static str,
        hint: &'static str,
        reason: String,
    },
    #[error("[kafka.options] {key:?} names the environment variable {var}, which is not set")]
    MissingEnv { key: String, var: String },
    #[error(
        "[kafka.options] {key:?}: unterminated \"${{\" (write \"$${{\" for a literal \"${{\")"
    )]
    BadOption { key: String },
    #[error("topic {topic:?} does not exist on {servers}. Create it (e.g. `kafka-topics.sh --create --topic {topic}`) or set [kafka.topics] to an existing topic.")]
    MissingTopic { topic: String, servers: String },
    #[error("cannot subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        source: KafkaError,
    },
}

/// Partition movements as (topic, partition), passed from the rebalance callback (served inside
/// the consumer's poll) to the processing loop (which owns the engine).
#[derive(Debug, Clone)]
pub enum Movement {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

fn last_error_suffix(last: &Option<Box<str>>) -> String {
    last.as_ref()
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default()
}

/// An error librdkafka reported through the error callback.
#[derive(Debug, Clone)]
pub struct ClientProblem {
    pub code: Option<RDKafkaErrorCode>,
    pub reason: String,
}

/// Consumer callbacks: rebalances, errors and statistics.
pub struct SourceContext {
    pub state: Arc<ApiState>,
    pub events_topic: String,
    pub movements: tokio::sync::mpsc::UnboundedSender<Movement>,
    /// While the processing loop runs, revoked partitions stay assigned until it has ended its
    /// batch ([`SourceContext::release_revoked`]): what it read from them is delivered and its
    /// offsets committed while they are still this member's, so their next owner does not read
    /// it again. An at-least-once re-read of a stage-1 batch would be summed twice downstream.
    hold_revocations: AtomicBool,
    /// The revocation waiting for the loop.
    pending_revoke: Mutex<Option<TopicPartitionList>>,
    /// The last TLS or authentication failure (they make the startup check fail fast).
    security_problem: Mutex<Option<ClientProblem>>,
    /// The last other client error (connection refused, ...), for the startup message.
    last_problem: Mutex<Option<ClientProblem>>,
    /// Events partitions currently assigned (for [`SourceContext::take_rearm`]).
    assigned_events: Mutex<Vec<i32>>,
    /// Every assigned (topic, partition), for the assignment gauge.
    assigned_all: Mutex<std::collections::BTreeSet<(String, i32)>>,
    /// Between "all brokers down" and the first statistics showing a broker up again.
    brokers_down: AtomicBool,
    /// Set when the brokers went away or came back; taken by [`SourceContext::take_rearm`].
    rearm: AtomicBool,
}

impl SourceContext {
    pub fn new(
        state: Arc<ApiState>,
        events_topic: String,
        movements: tokio::sync::mpsc::UnboundedSender<Movement>,
    ) -> SourceContext {
        SourceContext {
            state,
            events_topic,
            movements,
            hold_revocations: AtomicBool::new(false),
            pending_revoke: Mutex::new(None),
            security_problem: Mutex::new(None),
            last_problem: Mutex::new(None),
            assigned_events: Mutex::new(Vec::new()),
            assigned_all: Mutex::new(Default::default()),
            brokers_down: AtomicBool::new(false),
            rearm: AtomicBool::new(false),
        }
    }

    /// The assigned events partitions whose watermark clocks must be re-armed, once after the
    /// connection to the brokers was lost and once after it came back (`None` otherwise).
    ///
    /// While the brokers are away no partition delivers, so every partition looks idle (silent
    /// for `engine::SOURCE_IDLE_MS`) when they come back; the first partition to deliver its
    /// backlog would then carry the watermark alone, and the others' backlog (as old as the
    /// outage is long) would be dead-lettered as `too_late`. The processing loop calls this
    /// before applying each message it reads (not on a consume error: the "all brokers down"
    /// error itself arrives as one) and, on `Some(parts)`, treats them as just assigned
    /// (`forget_source` then `assign_sources`): each holds the watermark until it delivers
    /// again or is silent for `SOURCE_IDLE_MS` of connected time.
    pub fn take_rearm(&self) -> Option<Vec<i32>> {
        if self.rearm.swap(false, Ordering::AcqRel) {
            Some(self.assigned_events.lock().unwrap().clone())
        } else {
            None
        }
    }

    /// The last TLS or SASL failure librdkafka reported, if any.
    pub fn security_problem(&self) -> Option<ClientProblem> {
        self.security_problem.lock().unwrap().clone()
    }

    /// The last other client error librdkafka reported, if any.
    pub fn last_problem(&self) -> Option<ClientProblem> {
        self.last_problem.lock().unwrap().clone()
    }

    /// Makes revocations wait for [`SourceContext::release_revoked`] (`true`, while the loop
    /// runs) or go at once (`false`: closing, where nothing would release them).
    pub fn hold_revocations(&self, hold: bool) {
        self.hold_revocations.store(hold, Ordering::Release);
    }

    /// Lets a held revocation go: the partitions are unassigned and the group can rebalance.
    pub fn release_revoked<C: Consumer<SourceContext>>(&self, consumer: &C) {
        let Some(tpl) = self.pending_revoke.lock().unwrap().take() else {
            return;
        };
        let r = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(&tpl),
            _ => consumer.unassign(),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "unassigning revoked partitions");
        }
    }

    fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
        tpl.elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect()
    }
}

impl ClientContext for SourceContext {
    /// librdkafka's log lines, to tracing as rdkafka's default does. Connection failures
    /// (`FAIL`) are also kept for the startup check: librdkafka logs them from its own threads at
    /// once, while the error callback only runs when the consumer is polled, which it is not
    /// before the subscription.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {msg}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", "librdkafka: {fac} {msg}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {msg}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", "librdkafka: {fac} {msg}")
            }
        }
        if fac == "FAIL" {
            let code = classify_failure(msg);
            let problem = ClientProblem {
                code,
                reason: msg.to_string(),
            };
            if is_security_error(code) {
                *self.security_problem.lock().unwrap() = Some(problem);
            } else {
                *self.last_problem.lock().unwrap() = Some(problem);
            }
        }
    }

    fn stats(&self, stats: Statistics) {
        let lag: i64 = stats
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.state.telemetry.consumer_lag.set(lag);
        if self.brokers_down.load(Ordering::Acquire)
            && stats
                .brokers
                .values()
                .any(|b| b.nodeid >= 0 && b.state == "UP")
        {
            self.brokers_down.store(false, Ordering::Release);
            self.rearm.store(true, Ordering::Release);
            tracing::info!("brokers reachable again");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if matches!(code, Some(RDKafkaErrorCode::AllBrokersDown)) {
            self.state
                .set_ready(false, &format!("all brokers down: {reason}"));
            if !self.brokers_down.swap(true, Ordering::AcqRel) {
                self.rearm.store(true, Ordering::Release);
            }
        }
        let problem = ClientProblem {
            code,
            reason: reason.to_string(),
        };
        if is_security_error(code) {
            self.state
                .set_ready(false, &format!("cannot connect securely: {reason}"));
            *self.security_problem.lock().unwrap() = Some(problem);
        } else if !matches!(code, Some(RDKafkaErrorCode::AllBrokersDown)) {
            *self.last_problem.lock().unwrap() = Some(problem);
        }
        self.state.telemetry.log_rate_limited(
            "kafka_client_error",
            Duration::from_secs(10),
            || tracing::error!(error = %error, reason, "kafka client error"),
        );
    }
}

impl SourceContext {
    /// Keeps `guardrail_partitions_assigned{topic}` up to date.
    fn count_assigned(&self, parts: &[(String, i32)], assigned: bool) {
        let mut all = self.assigned_all.lock().unwrap();
        for p in parts {
            if assigned {
                all.insert(p.clone());
            } else {
                all.remove(p);
            }
        }
        let g = &self.state.telemetry.partitions_assigned;
        for (t, _) in parts {
            let n = all.iter().filter(|(x, _)| x == t).count();
            g.with_label_values(&[t]).set(n as i64);
        }
    }
}

impl ConsumerContext for SourceContext {
    /// rdkafka's rebalance, except that a revocation is held while the loop runs (see
    /// `hold_revocations`). librdkafka waits for the unassignment before it rejoins the group,
    /// and the application may make it later, outside this callback.
    fn rebalance(&self, c: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(c.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let r = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.pre_rebalance(c, &Rebalance::Assign(tpl));
                let r = if cooperative {
                    c.incremental_assign(tpl)
                } else {
                    c.assign(tpl)
                };
                self.post_rebalance(c, &Rebalance::Assign(tpl));
                r
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(c, &Rebalance::Revoke(tpl));
                if self.hold_revocations.load(Ordering::Acquire) {
                    *self.pending_revoke.lock().unwrap() = Some(tpl.clone());
                    return;
                }
                let r = if cooperative {
                    c.incremental_unassign(tpl)
                } else {
                    c.unassign()
                };
                self.post_rebalance(c, &Rebalance::Revoke(tpl));
                r
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                self.pre_rebalance(c, &Rebalance::Error(KafkaError::Rebalance(code)));
                if cooperative {
                    c.incremental_unassign(tpl)
                } else {
                    c.unassign()
                }
            }
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "applying a rebalance");
        }
    }

    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                let revoked = Self::partitions(tpl);
                self.count_assigned(&revoked, false);
                self.assigned_events.lock().unwrap().retain(|p| {
                    !revoked
                        .iter()
                        .any(|(t, r)| *t == self.events_topic && r == p)
                });
                let _ = self
                    .movements
                    .send(Movement::Revoked(Self::partitions(tpl)));
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
            self.count_assigned(&Self::partitions(tpl), true);
            {
                let mut assigned = self.assigned_events.lock().unwrap();
                for e in tpl.elements() {
                    if e.topic() == self.events_topic && !assigned.contains(&e.partition()) {
                        assigned.push(e.partition());
                    }
                }
            }
            let _ = self
                .movements
                .send(Movement::Assigned(Self::partitions(tpl)));
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

/// The error a librdkafka `FAIL` log line stands for, when it is a TLS or SASL failure.
fn classify_failure(msg: &str) -> Option<RDKafkaErrorCode> {
    let m = msg.to_ascii_lowercase();
    if m.contains("ssl handshake failed") || m.contains("certificate verify failed") {
        Some(RDKafkaErrorCode::SSL)
    } else if m.contains("sasl authentication error")
        || m.contains("authentication failed")
        || m.contains("sasl handshake failed")
    {
        Some(RDKafkaErrorCode::Authentication)
    } else {
        None
    }
}

fn is_security_error(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SSL
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::UnsupportedSASLMechanism
                | RDKafkaErrorCode::IllegalSASLState
        )
    )
}

fn base_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers);
    c
}

/// `[kafka.options]` with `${NAME}` replaced by the environment variable NAME (`$${` is a
/// literal `${`), in key order. A named variable that is not set is an error, so that a missing
/// secret is not sent as an empty password.
pub fn client_options(k: &KafkaConfig) -> Result<Vec<(String, String)>, SourceError> {
    k.options
        .iter()
        .map(|(key, v)| {
            expand_env(key, v, |name| std::env::var(name).ok()).map(|v| (key.clone(), v))
        })
        .collect()
}

fn expand_env(
    key: &str,
    value: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, SourceError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = t;
        } else if let Some(t) = tail.strip_prefix("${") {
            let end = t.find('}').ok_or_else(|| SourceError::BadOption {
                key: key.to_string(),
            })?;
            let name = &t[..end];
            let v = lookup(name).ok_or_else(|| SourceError::MissingEnv {
                key: key.to_string(),
                var: name.to_string(),
            })?;
            out.push_str(&v);
            rest = &t[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

pub fn consumer(
    k: &KafkaConfig,
    state: Arc<ApiState>,
    movements: tokio::sync::mpsc::UnboundedSender<Movement>,
) -> Result<StreamConsumer<SourceContext>, SourceError> {
    let mut c = base_config(k);
    c.set("group.id", &k.group_id)
        // exactly_once commits offsets inside the output transaction; at_least_once stores
        // them after delivery and lets librdkafka commit them in the background.
        .set(
            "enable.auto.commit",
            (k.delivery == crate::config::Delivery::AtLeastOnce).to_string(),
        )
        .set("isolation.level", "read_committed")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000");
    // User options last: they override guardrail's defaults.
    for (key, v) in client_options(k)? {
        c.set(key, v);
    }
    c.create_with_context(SourceContext::new(
        state,
        k.topics.events.clone(),
        movements,
    ))
    .map_err(|source| SourceError::Client {
        what: "consumer",
        source,
    })
}

/// The output producer; transactional (with `transactional_id`) for exactly_once delivery.
pub fn producer(
    k: &KafkaConfig,
    transactional_id: Option<&str>,
) -> Result<FutureProducer, SourceError> {
    let mut c = base_config(k);
    if let Some(id) = transactional_id {
        c.set("transactional.id", id);
    }
    c.set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set(
            "message.timeout.ms",
            (k.produce_timeout_secs * 1000).to_string(),
        );
    for (key, v) in client_options(k)? {
        c.set(key, v);
    }
    c.create().map_err(|source| SourceError::Client {
        what: "producer",
        source,
    })
}

/// Checks at startup that the broker answers and that every topic exists, so that a typo fails
/// fast with a clear message instead of an idle service. A TLS or authentication failure ends
/// the wait at once and is reported as what it is.
/// Checks that the topics exist (and the repartition topic, if `check_repartition`), and
/// returns their partition counts.
pub fn check_topics(
    consumer: &StreamConsumer<SourceContext>,
    k: &KafkaConfig,
    check_repartition: bool,
    timeout: Duration,
) -> Result<HashMap<String, i32>, SourceError> {
    let deadline = Instant::now() + timeout;
    let md = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match consumer.fetch_metadata(None, left.min(Duration::from_millis(500))) {
            Ok(md) => break md,
            Err(source) => {
                serve_events(consumer);
                if let Some(p) = consumer.context().security_problem() {
                    return Err(security_error(k, p));
                }
                if Instant::now() >= deadline {
                    return Err(SourceError::Unreachable {
                        servers: k.bootstrap_servers.clone(),
                        source,
                        last_error: consumer.context().last_problem().map(|p| p.reason.into()),
                    });
                }
            }
        }
    };
    let two_stage = [k.topics.repartition.as_str()];
    let extra: &[&str] = if check_repartition { &two_stage } else { &[] };
    let mut partitions = HashMap::new();
    for topic in k.topics.all().iter().chain(extra) {
        if topic.is_empty() {
            continue;
        }
        let found = md
            .topics()
            .iter()
            .find(|mt| mt.name() == *topic && mt.error().is_none() && !mt.partitions().is_empty());
        match found {
            Some(mt) => {
                partitions.insert(topic.to_string(), mt.partitions().len() as i32);
            }
            None => {
                return Err(SourceError::MissingTopic {
                    topic: topic.to_string(),
                    servers: k.bootstrap_servers.clone(),
                })
            }
        }
    }
    Ok(partitions)
}

pub fn subscribe(
    consumer: &StreamConsumer<SourceContext>,
    k: &KafkaConfig,
) -> Result<(), SourceError> {
    let topics: Vec<&str> = [k.topics.events.as_str(), k.topics.changes.as_str()]
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| SourceError::Subscribe {
            topics: topics.iter().map(|s| s.to_string()).collect(),
            source,
        })
}

/// Serves the consumer's queued events (log lines, errors, statistics) without waiting. Before
/// the subscription nothing else polls the consumer, and librdkafka hands these to the context
/// only when it is polled. Nothing is subscribed yet, so no message can be taken here.
fn serve_events(consumer: &StreamConsumer<SourceContext>) {
    use futures::FutureExt;
    // Each poll serves at most one event.
    for _ in 0..256 {
        let _ = consumer.recv().now_or_never();
    }
}

/// Names a TLS or SASL failure in an operator's terms: what failed and which option to check.
pub fn security_error(k: &KafkaConfig, p: ClientProblem) -> SourceError {
    let servers = k.bootstrap_servers.clone();
    let opt = |name: &str| k.options.get(name).cloned();
    let r = p.reason.to_ascii_lowercase();
    let tls = matches!(p.code, Some(RDKafkaErrorCode::SSL))
        || r.contains("ssl handshake")
        || r.contains("certificate");
    if !tls {
        return SourceError::Authentication {
            servers,
            mechanism: opt("sasl.mechanism")
                .or_else(|| opt("sasl.mechanisms"))
                .map(|m| format!("SASL {m}"))
                .unwrap_or_else(|| "SASL".into()),
            username: opt("sasl.username").unwrap_or_default(),
            reason: p.reason,
        };
    }
    let (problem, hint) = if r.contains("certificate verify failed")
        || r.contains("unable to get local issuer")
        || r.contains("self-signed certificate")
        || r.contains("self signed certificate")
        || r.contains("could not be verified")
    {
        if r.contains("hostname mismatch") || r.contains("ip address mismatch") {
            (
                "the broker's certificate does not name the address connected to",
                "Connect by a name the certificate lists (bootstrap_servers and the broker's advertised listener), or set \"ssl.endpoint.identification.algorithm\" = \"none\" in [kafka.options] if you accept that risk.",
            )
        } else if r.contains("expired") {
            (
                "the broker's certificate has expired",
                "Renew the broker's certificate.",
            )
        } else {
            (
                "the broker's certificate is not trusted",
                "Set \"ssl.ca.location\" in [kafka.options] to the CA certificate (PEM) that signed the broker's certificate.",
            )
        }
    } else if r.contains("wrong version number")
        || r.contains("packet length too long")
        || r.contains("unexpected eof")
        || r.contains("record layer failure")
    {
        (
            "the broker does not speak TLS on this port",
            "Check \"security.protocol\" in [kafka.options] (SSL or SASL_SSL only for a TLS listener) and the port in bootstrap_servers.",
        )
    } else {
        (
            "the TLS connection could not be set up",
            "Check the ssl.* settings in [kafka.options] (ssl.ca.location, client certificate and key if the broker asks for one).",
        )
    };
    SourceError::Tls {
        servers,
        problem,
        hint,
        reason: p.reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PW" => Some("s3cr$t".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn option_values_expand_environment_variables() {
        let x = |v: &str| expand_env("sasl.password", v, env);
        assert_eq!(x("plain").unwrap(), "plain");
        assert_eq!(x("${PW}").unwrap(), "s3cr$t");
        assert_eq!(x("a-${PW}-b-${EMPTY}.").unwrap(), "a-s3cr$t-b-.");
        assert_eq!(x("cost $5, $$").unwrap(), "cost $5, $$");
        assert_eq!(x("$${PW}").unwrap(), "${PW}");
        assert_eq!(x("$$${PW}").unwrap(), "$${PW}");
        match x("${NOPE}") {
            Err(SourceError::MissingEnv { key, var }) => {
                assert_eq!((key.as_str(), var.as_str()), ("sasl.password", "NOPE"))
            }
            other => panic!("{other:?}"),
        }
        let e = x("${PW").unwrap_err().to_string();
        assert!(
            e.contains("unterminated") && e.contains("sasl.password"),
            "{e}"
        );
    }

    fn kafka(opts: &[(&str, &str)]) -> KafkaConfig {
        let mut k = KafkaConfig {
            bootstrap_servers: "broker:9093".into(),
            ..KafkaConfig::default()
        };
        for (a, b) in opts {
            k.options.insert(a.to_string(), b.to_string());
        }
        k
    }

    #[test]
    fn failure_log_lines_are_classified() {
        assert_eq!(
            classify_failure("sasl_ssl://h:1/bootstrap: SASL authentication error: SASL SCRAM authentication failed: broker responded with invalid-proof (after 20ms in state AUTH_REQ)"),
            Some(RDKafkaErrorCode::Authentication)
        );
        assert_eq!(
            classify_failure("ssl://h:1/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified"),
            Some(RDKafkaErrorCode::SSL)
        );
        assert_eq!(
            classify_failure("h:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 0ms in state CONNECT)"),
            None
        );
    }

    #[test]
    fn security_failures_are_named_for_operators() {
        let k = kafka(&[
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "guardrail"),
        ]);
        let auth = security_error(
            &k,
            ClientProblem {
                code: Some(RDKafkaErrorCode::Authentication),
                reason: "sasl_ssl://broker:9093/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512".into(),
            },
        )
        .to_string();
        assert!(
            auth.contains("refused authentication (SASL SCRAM-SHA-512, user \"guardrail\")"),
            "{auth}"
        );
        assert!(
            auth.contains("sasl.password") && auth.contains("broker:9093"),
            "{auth}"
        );

        let untrusted = security_error(
            &k,
            ClientProblem {
                code: Some(RDKafkaErrorCode::SSL),
                reason: "ssl://broker:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA certificates are installed (install ca-certificates package) (after 4ms in state SSL_HANDSHAKE)".into(),
            },
        )
        .to_string();
        assert!(untrusted.contains("TLS handshake with Kafka at broker:9093 failed: the broker's certificate is not trusted"), "{untrusted}");
        assert!(untrusted.contains("ssl.ca.location"), "{untrusted}");

        let name = security_error(
            &k,
            ClientProblem {
                code: Some(RDKafkaErrorCode::SSL),
                reason: "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: Hostname mismatch".into(),
            },
        )
        .to_string();
        assert!(name.contains("does not name"), "{name}");

        let plain = security_error(
            &k,
            ClientProblem {
                code: Some(RDKafkaErrorCode::SSL),
                reason: "SSL handshake failed: error:0A00010B:SSL routines::wrong version number"
                    .into(),
            },
        )
        .to_string();
        assert!(
            plain.contains("does not speak TLS") && plain.contains("security.protocol"),
            "{plain}"
        );
    }
}
