//! `guardrail audit --change ID`: the whole story of one change, read back from the audit topic
//! (or an `audit.jsonl` written by a replay).
//!
//! A change's story is every record that names it plus every record of the incidents blamed on
//! it (a resolution names the incident only), in the order they were written.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use serde_json::Value;

use crate::config::KafkaConfig;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not an audit record: {message}")]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
    #[error("kafka ({brokers}): {message}")]
    Kafka { brokers: String, message: String },
}

/// The records of one change's story, in order. `ids` gives (incident_id, change_id) of a
/// record.
pub fn select<'a, T>(
    records: impl Iterator<Item = &'a T> + Clone,
    change_id: &str,
    ids: impl Fn(&T) -> (Option<&str>, Option<&str>),
) -> Vec<&'a T>
where
    T: 'a,
{
    let incidents: HashSet<&str> = records
        .clone()
        .filter_map(|r| match ids(r) {
            (Some(i), Some(c)) if c == change_id => Some(i),
            _ => None,
        })
        .collect();
    records
        .filter(|r| {
            let (i, c) = ids(r);
            c == Some(change_id) || i.map(|i| incidents.contains(i)).unwrap_or(false)
        })
        .collect()
}

fn ids_of(v: &Value) -> (Option<&str>, Option<&str>) {
    (v["incident_id"].as_str(), v["change_id"].as_str())
}

/// Orders records by wall time, then by the writer's sequence number.
fn ordered(mut v: Vec<Value>) -> Vec<Value> {
    v.sort_by(|a, b| {
        let key = |r: &Value| {
            (
                crate::event::parse_time_str(r["at"].as_str().unwrap_or("")).unwrap_or(0),
                r["seq"].as_u64().unwrap_or(0),
            )
        };
        key(a).cmp(&key(b))
    });
    v
}

/// The story of `change_id` from a JSON-lines audit file.
pub fn from_file(path: &Path, change_id: &str) -> Result<Vec<Value>, AuditError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| AuditError::Read {
        path: p.clone(),
        source,
    })?;
    let mut all = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| AuditError::Parse {
            path: p.clone(),
            line: n + 1,
            message: e.to_string(),
        })?;
        all.push(v);
    }
    let story = select(all.iter(), change_id, ids_of)
        .into_iter()
        .cloned()
        .collect();
    Ok(ordered(story))
}

/// The story of `change_id` from the audit topic: every partition from the beginning up to its
/// high watermark at the time of the call.
pub fn from_kafka(
    kafka: &KafkaConfig,
    change_id: &str,
    timeout: Duration,
) -> Result<Vec<Value>, AuditError> {
    let brokers = kafka.bootstrap_servers.clone();
    let err = |m: String| AuditError::Kafka {
        brokers: brokers.clone(),
        message: m,
    };
    let mut cc = ClientConfig::new();
    // The same pass-through as the service, `${ENV}` expansion included.
    for (k, v) in crate::source::client_options(kafka).map_err(|e| err(e.to_string()))? {
        cc.set(k, v);
    }
    let c: BaseConsumer = cc
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", "guardrail-audit-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(|e| err(e.to_string()))?;
    let topic = &kafka.topics.audit;
    let md = c.fetch_metadata(Some(topic), timeout).map_err(|e| {
        err(format!(
            "cannot read metadata of {topic}: {e}; is the broker reachable?"
        ))
    })?;
    let t = md
        .topics()
        .first()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .ok_or_else(|| err(format!("topic {topic} does not exist")))?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut remaining = 0usize;
    let mut ends = std::collections::HashMap::new();
    for p in t.partitions() {
        let (lo, hi) = c
            .fetch_watermarks(topic, p.id(), timeout)
            .map_err(|e| err(e.to_string()))?;
        if hi > lo {
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
                .map_err(|e| err(e.to_string()))?;
            ends.insert(p.id(), hi);
            remaining += 1;
        }
    }
    if remaining == 0 {
        return Ok(Vec::new());
    }
    c.assign(&tpl).map_err(|e| err(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    let mut all = Vec::new();
    while remaining > 0 {
        if Instant::now() > deadline {
            return Err(err(format!("timed out reading {topic}")));
        }
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if let Some(v) = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<Value>(p).ok())
                {
                    all.push(v);
                }
                if m.offset() + 1 >= ends[&m.partition()] {
                    remaining -= 1;
                }
            }
            Some(Err(e)) => return Err(err(e.to_string())),
            None => {}
        }
    }
    let story = select(all.iter(), change_id, ids_of)
        .into_iter()
        .cloned()
        .collect();
    Ok(ordered(story))
}

/// One line per record: when, what, who, and the gist.
pub fn render(change_id: &str, records: &[Value]) -> String {
    let mut out = format!("story of {change_id}: {} audit record(s)\n", records.len());
    for r in records {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let gist = ["reason", "verdict", "resolution", "decision"]
            .iter()
            .find_map(|k| r["evidence"][k].as_str().map(String::from))
            .unwrap_or_default();
        out.push_str(&format!(
            "{}  {:<26} {:<28} {:<18} {}\n",
            s("at"),
            s("action"),
            format!(
                "{}:{}",
                r["actor"]["kind"].as_str().unwrap_or(""),
                r["actor"]["name"].as_str().unwrap_or("")
            ),
            r["incident_id"].as_str().unwrap_or("-"),
            gist.chars().take(140).collect::<String>()
        ));
    }
    out
}
