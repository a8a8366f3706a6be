//! The contract's outputs (sections 3-6) and where they go: Kafka topics or JSON-lines files.
//!
//! The engine produces [`Output`]s; a sink serialises and delivers them. Rollback requests are
//! CloudEvents signed with HMAC-SHA256 over the exact value bytes, keyed by change id, with an id
//! derived from (incident, change) so that redelivery can be deduplicated downstream.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::attribute::Candidate;
use crate::config::TopicsConfig;
use crate::event::{Actor, ErrorCode};
use crate::policy::Decision;

/// A segment and its share of the incident's delta.
#[derive(Debug, Clone, Serialize, PartialEq, serde::Deserialize)]
pub struct TopSegment {
    pub dims: serde_json::Map<String, serde_json::Value>,
    pub contribution: f64,
}

/// Alert (contract section 3). Fields after `url` are extensions.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub incident_id: String,
    pub status: &'static str,
    pub severity: &'static str,
    pub metric: String,
    pub series: serde_json::Map<String, serde_json::Value>,
    pub kind: &'static str,
    pub observed: f64,
    pub expected: f64,
    pub expected_low: f64,
    pub expected_high: f64,
    pub onset: String,
    /// The onset's confidence set (drops, spikes, shifts): contract v1.1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onset_low: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onset_high: Option<String>,
    /// Incidents with one cause share it (contract v1.1).
    pub group_id: String,
    pub detected_at: String,
    pub emitted_at: String,
    pub candidate_changes: Vec<Candidate>,
    pub top_segments: Vec<TopSegment>,
    pub url: String,
    /// What guardrail decided (or that a human must).
    pub decision: Option<Decision>,
    /// Relative effect since the onset (or shift in per-event sd for means).
    pub effect: f64,
    /// Detection statistic over its threshold at detection (>= 1).
    pub score: f64,
    /// Owner of the metric (routing).
    pub owner: Option<String>,
    /// Owner of the top candidate change (routing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_owner: Option<String>,
    /// Nobody decided in time: re-sent with a higher severity.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub escalated: bool,
    /// `treatment_vs_holdout` or `observational`, when a change is blamed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<&'static str>,
    /// The main evidence in one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    /// The change's target metric improved while this guardrail metric worsened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_gain_global_loss: Option<serde_json::Value>,
    /// Event time the incident resolved (resolved alerts only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RollbackMetric {
    pub metric: String,
    pub observed: f64,
    pub expected: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RollbackData {
    pub change_id: String,
    pub incident_id: String,
    pub tier: &'static str,
    pub reason: String,
    pub metrics: Vec<RollbackMetric>,
    pub decided_by: Actor,
    pub rollback: serde_json::Value,
}

/// Rollback request (contract section 4), a CloudEvents 1.0 structured message.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackRequest {
    pub specversion: &'static str,
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub source: String,
    pub id: String,
    pub time: String,
    pub datacontenttype: &'static str,
    pub data: RollbackData,
}

/// Audit record (contract section 5).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AuditRecord {
    pub audit_id: String,
    pub at: String,
    /// Extension: order of records from one instance (`at` has millisecond resolution).
    pub seq: u64,
    /// Extension: the engine's latest event time when the record was written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
    #[serde(deserialize_with = "crate::checkpoint::de_static")]
    pub action: crate::checkpoint::Label,
    pub actor: Actor,
    pub evidence: serde_json::Value,
    pub policy: serde_json::Value,
}

/// Something the engine decided to emit.
#[derive(Debug, Clone)]
pub enum Output {
    Alert(Box<Alert>),
    Rollback(RollbackRequest),
    Audit(AuditRecord),
    /// The two-stage aggregation's repartition topic: partial sums and markers (stage 1),
    /// questions to the decider and its answers (stage 2).
    Partial(Box<crate::repartition::Routed>),
}

/// A serialised output, ready for a topic or a file.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub stream: Stream,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
    /// An explicit partition (repartition records); otherwise the partitioner picks by key.
    pub partition: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Alerts,
    Rollbacks,
    Audit,
    DeadLetters,
    Repartition,
}

impl Stream {
    pub fn topic(self, t: &TopicsConfig) -> &str {
        match self {
            Stream::Alerts => &t.alerts,
            Stream::Rollbacks => &t.rollbacks,
            Stream::Audit => &t.audit,
            Stream::DeadLetters => &t.dlq,
            Stream::Repartition => &t.repartition,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Stream::Alerts => "alerts",
            Stream::Rollbacks => "rollbacks",
            Stream::Audit => "audit",
            Stream::DeadLetters => "dlq",
            Stream::Repartition => "repartition",
        }
    }
}

/// HMAC-SHA256 signer for rollback requests.
#[derive(Clone)]
pub struct Signer {
    key_id: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.key_id)
    }
}

pub const SIGNATURE_HEADER: &str = "guardrail-signature";
pub const KEY_ID_HEADER: &str = "guardrail-key-id";

impl Signer {
    pub fn new(key_id: &str, secret: &[u8]) -> Signer {
        Signer {
            key_id: key_id.to_string(),
            secret: secret.to_vec(),
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// `v1=<hex HMAC-SHA256 of value>`.
    pub fn sign(&self, value: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(value);
        format!("v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    /// Verifies a `v1=` signature in constant time.
    pub fn verify(&self, value: &[u8], signature: &str) -> bool {
        let Some(hexsig) = signature.strip_prefix("v1=") else {
            return false;
        };
        let Ok(sig) = hex::decode(hexsig) else {
            return false;
        };
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(value);
        mac.verify_slice(&sig).is_ok()
    }
}

/// A short stable id: prefix + the first 16 hex digits of SHA-256 over the parts.
pub fn stable_id(prefix: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    format!("{prefix}{}", &hex::encode(h.finalize())[..16])
}

impl Output {
    pub fn encode(&self, signer: &Signer) -> Encoded {
        match self {
            Output::Alert(a) => Encoded {
                stream: Stream::Alerts,
                key: a.incident_id.clone(),
                value: serde_json::to_vec(a).expect("alert serialises"),
                headers: vec![],
                partition: None,
            },
            Output::Rollback(r) => {
                let value = serde_json::to_vec(r).expect("rollback serialises");
                let sig = signer.sign(&value);
                Encoded {
                    stream: Stream::Rollbacks,
                    key: r.data.change_id.clone(),
                    value,
                    headers: vec![
                        (SIGNATURE_HEADER, sig),
                        (KEY_ID_HEADER, signer.key_id().to_string()),
                        ("content-type", "application/cloudevents+json".into()),
                    ],
                    partition: None,
                }
            }
            Output::Audit(a) => Encoded {
                stream: Stream::Audit,
                key: a
                    .incident_id
                    .clone()
                    .or_else(|| a.change_id.clone())
                    .unwrap_or_default(),
                value: serde_json::to_vec(a).expect("audit serialises"),
                headers: vec![],
                partition: None,
            },
            Output::Partial(r) => Encoded {
                stream: Stream::Repartition,
                key: r.key.clone(),
                value: r.partial.encode(),
                headers: vec![],
                partition: Some(r.partition),
            },
        }
    }
}

impl Encoded {
    pub fn is_marker(&self) -> bool {
        self.stream == Stream::Repartition && self.key == crate::repartition::MARKER_KEY
    }
}

/// A dead letter: the original bytes with the reason (contract section 6). Bytes beyond
/// `limit` (the engine's `max_event_bytes`) are cut, so that the record always fits the
/// producer's `message.max.bytes`; the original's length and SHA-256 always travel in headers,
/// so a cut letter can still be matched to its source.
pub fn dead_letter(
    bytes: &[u8],
    limit: usize,
    code: ErrorCode,
    message: &str,
    source: &str,
) -> Encoded {
    let kept = &bytes[..bytes.len().min(limit)];
    let mut headers = vec![
        ("guardrail-error-code", code.as_str().to_string()),
        ("guardrail-error", message.chars().take(512).collect()),
        ("guardrail-source", source.to_string()),
        ("guardrail-original-bytes", bytes.len().to_string()),
        (
            "guardrail-original-sha256",
            hex::encode(Sha256::digest(bytes)),
        ),
    ];
    if kept.len() < bytes.len() {
        headers.push(("guardrail-truncated", "true".to_string()));
    }
    Encoded {
        stream: Stream::DeadLetters,
        key: String::new(),
        value: kept.to_vec(),
        headers,
        partition: None,
    }
}

/// A record the broker or the producer will never take (too large, malformed): retrying it
/// cannot succeed.
fn is_permanent(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::MessageBatchTooLarge
                | C::InvalidRecord
        )
    )
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("producing to {topic} failed: {source}")]
    Kafka {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
}

/// JSON-lines files in a directory: alerts.jsonl, rollbacks.jsonl, audit.jsonl (each line the
/// message value as it would be on the topic), rollbacks.signatures.jsonl (the signature headers
/// of each rollback line, in the same order) and dead_letters.jsonl (reason, source and the
/// original text).
pub struct FileSink {
    alerts: BufWriter<File>,
    rollbacks: BufWriter<File>,
    audit: BufWriter<File>,
    dlq: BufWriter<File>,
    signatures: BufWriter<File>,
    pub counts: [u64; 4],
}

impl FileSink {
    pub fn create(dir: &Path) -> Result<FileSink, SinkError> {
        std::fs::create_dir_all(dir).map_err(|source| SinkError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let open = |name: &str| {
            let p = dir.join(name);
            File::create(&p)
                .map(BufWriter::new)
                .map_err(|source| SinkError::Io {
                    path: p.display().to_string(),
                    source,
                })
        };
        Ok(FileSink {
            alerts: open("alerts.jsonl")?,
            rollbacks: open("rollbacks.jsonl")?,
            audit: open("audit.jsonl")?,
            dlq: open("dead_letters.jsonl")?,
            signatures: open("rollbacks.signatures.jsonl")?,
            counts: [0; 4],
        })
    }

    pub fn write(&mut self, e: &Encoded) -> Result<(), SinkError> {
        let (w, i) = match e.stream {
            Stream::Alerts => (&mut self.alerts, 0),
            Stream::Rollbacks => (&mut self.rollbacks, 1),
            Stream::Audit => (&mut self.audit, 2),
            Stream::DeadLetters => (&mut self.dlq, 3),
            Stream::Repartition => {
                // Files are written by single-stage runs (replay), which make no partials.
                return Err(SinkError::Io {
                    path: "repartition".into(),
                    source: std::io::Error::other("repartition records have no file output"),
                });
            }
        };
        self.counts[i] += 1;
        let res = if e.stream == Stream::DeadLetters {
            // Files have no headers: wrap the reason and the original (lossy) text.
            let get = |k: &str| {
                e.headers
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.as_str())
                    .unwrap_or("")
            };
            let line = serde_json::json!({
                "error_code": get("guardrail-error-code"),
                "error": get("guardrail-error"),
                "source": get("guardrail-source"),
                "original_bytes": get("guardrail-original-bytes").parse::<u64>().ok(),
                "original_sha256": get("guardrail-original-sha256"),
                "truncated": !get("guardrail-truncated").is_empty(),
                "value": String::from_utf8_lossy(&e.value),
            });
            serde_json::to_writer(&mut *w, &line)
                .map_err(std::io::Error::from)
                .and_then(|_| w.write_all(b"\n"))
        } else if e.stream == Stream::Rollbacks {
            // The line is the CloudEvent exactly as produced, so the signature (kept beside it
            // in rollbacks.signatures.jsonl, as Kafka keeps it in headers) verifies over it.
            let sig = serde_json::json!({
                "key": e.key,
                "headers": e.headers.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
            });
            let sigw = &mut self.signatures;
            w.write_all(&e.value)
                .and_then(|_| w.write_all(b"\n"))
                .and_then(|_| serde_json::to_writer(&mut *sigw, &sig).map_err(std::io::Error::from))
                .and_then(|_| sigw.write_all(b"\n"))
        } else {
            w.write_all(&e.value).and_then(|_| w.write_all(b"\n"))
        };
        res.map_err(|source| SinkError::Io {
            path: e.stream.label().into(),
            source,
        })
    }

    pub fn flush(&mut self) -> Result<(), SinkError> {
        for w in [
            &mut self.alerts,
            &mut self.rollbacks,
            &mut self.audit,
            &mut self.dlq,
            &mut self.signatures,
        ] {
            w.flush().map_err(|source| SinkError::Io {
                path: "output".into(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Produces encoded outputs to their topics and waits for the broker's acknowledgement.
#[derive(Clone)]
pub struct KafkaSink {
    pub producer: FutureProducer,
    pub topics: TopicsConfig,
    pub timeout: Duration,
    /// Dead letters the producer or broker refused for good: counted and logged, never
    /// retried, so that one bad record cannot hold the pipeline.
    pub dead_letters_unwritable: prometheus::IntCounter,
}

impl KafkaSink {
    pub async fn send(&self, e: &Encoded) -> Result<(), SinkError> {
        let topic = e.stream.topic(&self.topics);
        let mut headers = OwnedHeaders::new_with_capacity(e.headers.len());
        for (k, v) in &e.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut rec = FutureRecord::to(topic).payload(&e.value).headers(headers);
        if !e.key.is_empty() {
            rec = rec.key(&e.key);
        }
        if let Some(p) = e.partition {
            rec = rec.partition(p);
        }
        match self.producer.send(rec, self.timeout).await {
            Ok(_) => Ok(()),
            Err((source, _)) if e.stream == Stream::DeadLetters && is_permanent(&source) => {
                self.dead_letters_unwritable.inc();
                tracing::error!(error = %source, bytes = e.value.len(), topic, "dead letter refused for good; counted and skipped");
                Ok(())
            }
            Err((source, _)) => Err(SinkError::Kafka {
                topic: topic.to_string(),
                source,
            }),
        }
    }

    /// Sends all, concurrently, and waits for every acknowledgement.
    /// Repartition markers go last, after everything else is acknowledged: a marker tells stage
    /// 2 that every partial before it on its partition has arrived.
    pub async fn send_all(&self, items: &[Encoded]) -> Result<(), SinkError> {
        for markers in [false, true] {
            let futs = items
                .iter()
                .filter(|e| e.is_marker() == markers)
                .map(|e| self.send(e));
            for r in futures::future::join_all(futs).await {
                r?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_roundtrip_and_tamper() {
        let s = Signer::new("k1", b"secret");
        let sig = s.sign(b"{\"a\":1}");
        assert!(sig.starts_with("v1="));
        assert_eq!(sig.len(), 3 + 64);
        assert!(s.verify(b"{\"a\":1}", &sig));
        assert!(!s.verify(b"{\"a\":2}", &sig));
        assert!(!Signer::new("k1", b"other").verify(b"{\"a\":1}", &sig));
        // RFC 4231 test case 2.
        let s = Signer::new("k", b"Jefe");
        assert_eq!(
            s.sign(b"what do ya want for nothing?"),
            "v1=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn stable_ids_are_stable_and_distinct() {
        assert_eq!(stable_id("x-", &["a", "b"]), stable_id("x-", &["a", "b"]));
        assert_ne!(stable_id("x-", &["ab", ""]), stable_id("x-", &["a", "b"]));
    }
}
