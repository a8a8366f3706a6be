//! Configuration: TOML, typed, unknown keys rejected, validated after parsing.
//!
//! Every option except the contract's metric fields has a default, so a config that only lists
//! `[[metrics]]` is complete. Keys carry their unit (`window_secs`). Errors carry a location
//! (line and column) so that `guardrail check-config` can point at the offending text.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml::Spanned;

pub const SECS_PER_WEEK: f64 = 7.0 * 24.0 * 3600.0;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<LocatedError>),
}

/// A semantic error found by `validate()`, with the place it refers to.
#[derive(Debug, Clone)]
pub struct LocatedError {
    pub path: String,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `metrics[2].numerator.type`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for LocatedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.path, self.line, self.column, self.key, self.message
        )
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub service: ServiceConfig,
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub scale: ScaleConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub detection: DetectionDefaults,
    #[serde(default)]
    pub signing: SigningConfig,
    #[serde(default)]
    pub privacy: PrivacyConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub attribution: AttributionConfig,
    #[serde(default)]
    pub alertmanager: AlertmanagerConfig,
    /// Change guards: watches opened when a change is applied, treatment/holdout tests,
    /// variation sprawl and customer pressure.
    #[serde(default)]
    pub guards: GuardsConfig,
    /// Role name -> what it may do (`read`, `approve`, `veto`, `acknowledge`, `silence`).
    #[serde(default)]
    pub roles: crate::auth::RolesConfig,
    /// Named actors with a role and a bearer token for the HTTP API.
    #[serde(default)]
    pub actors: Vec<crate::auth::ActorConfig>,
    #[serde(default)]
    pub metrics: Vec<Spanned<MetricConfig>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Names this instance in rollback requests (`source: guardrail/<instance>`).
    pub instance: String,
    /// Base URL of the HTTP API as users reach it; alerts link to `{public_url}/incidents/{id}`.
    pub public_url: String,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            instance: "guardrail-1".into(),
            public_url: "http://127.0.0.1:9464".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    pub group_id: String,
    pub topics: TopicsConfig,
    /// librdkafka properties passed through verbatim (security.protocol, sasl.*, ssl.*, ...).
    pub options: BTreeMap<String, String>,
    /// How long a produce may take before it is reported as failed.
    pub produce_timeout_secs: u64,
    /// `exactly_once` (default; Kafka >= 2.5): outputs and consumed offsets are committed in
    /// one transaction, zombies are fenced, read_committed readers see each decision once.
    /// `at_least_once`: for brokers without transactions; idempotent producer, offsets stored
    /// after delivery, outputs carry stable ids for downstream deduplication.
    pub delivery: Delivery,
    /// The producer's `transactional.id` (exactly_once). Must be stable across restarts of
    /// one instance and unique per instance; default `guardrail-{group_id}-{service.instance}`.
    pub transactional_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    #[default]
    ExactlyOnce,
    AtLeastOnce,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::ExactlyOnce => "exactly_once",
            Delivery::AtLeastOnce => "at_least_once",
        }
    }
}

impl KafkaConfig {
    /// The producer's transactional.id: stable across restarts of one instance, unique per
    /// instance.
    pub fn transactional_id_for(&self, instance: &str) -> String {
        self.transactional_id
            .clone()
            .unwrap_or_else(|| format!("guardrail-{}-{}", self.group_id, instance))
    }
}

/// `[scale]`: several instances in one consumer group.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScaleConfig {
    /// Two-stage aggregation (`guardrail::repartition`): stage 1 sums each instance's input
    /// partitions per series and window and sends the partial sums to the repartition topic
    /// keyed by series; stage 2, on the instance that owns the series' repartition partition,
    /// merges them and detects. Needed as soon as two instances share input keyed by user
    /// (any series' events are then on every partition); off, each instance detects on the
    /// partitions it reads, which is right only for one instance.
    pub two_stage: bool,
    /// Consumer group of stage 2 (the repartition topic); default `{kafka.group_id}-merge`.
    pub merge_group_id: Option<String>,
    /// Longest wall-clock time a new incident's alert waits for answers from other owners
    /// (the decider's verdict on a rollback, the change's effect on a target metric merged
    /// elsewhere). Past it the alert goes out with what is known: without the "local gain,
    /// global loss" evidence, and with the rollback still left to the decider's verdict.
    pub hold_max_secs: u64,
    /// The other instances' HTTP APIs (`http://host:port`). Each instance holds only the
    /// incidents of the series it owns; an incident, its page or a control call that misses
    /// here is asked of these, and lists are gathered from them (`guardrail::peer`). Empty:
    /// each instance answers from its own state.
    pub peers: Vec<String>,
    /// How long one request to a peer may take before that peer counts as unreachable.
    pub peer_timeout_ms: u64,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            two_stage: false,
            merge_group_id: None,
            hold_max_secs: 120,
            peers: Vec::new(),
            peer_timeout_ms: 2000,
        }
    }
}

impl ScaleConfig {
    pub fn merge_group(&self, k: &KafkaConfig) -> String {
        self.merge_group_id
            .clone()
            .unwrap_or_else(|| format!("{}-merge", k.group_id))
    }
}

/// Local state: where checkpoints are written and how often.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Directory for checkpoints. Unset: no checkpoints (a restart relearns from scratch).
    pub dir: Option<String>,
    /// A checkpoint is also written after every batch that produced a decision, and on
    /// shutdown and partition revocation.
    pub checkpoint_interval_secs: u64,
    /// Checkpoint files kept, the current one included: a damaged current file falls back to
    /// the newest good previous one (1 to `checkpoint::MAX_GENERATIONS`).
    pub generations: usize,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: None,
            checkpoint_interval_secs: 30,
            generations: 3,
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            group_id: "guardrail".into(),
            topics: TopicsConfig::default(),
            options: BTreeMap::new(),
            produce_timeout_secs: 30,
            delivery: Delivery::default(),
            transactional_id: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    pub events: String,
    pub changes: String,
    pub alerts: String,
    pub rollbacks: String,
    pub audit: String,
    pub dlq: String,
    /// Internal: partial sums between the two stages (`[scale] two_stage`), keyed by series.
    /// Its partition count bounds how many instances share detection.
    pub repartition: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            events: "guardrail.events".into(),
            changes: "guardrail.changes".into(),
            alerts: "guardrail.alerts".into(),
            rollbacks: "guardrail.rollbacks".into(),
            audit: "guardrail.audit".into(),
            dlq: "guardrail.dlq".into(),
            repartition: "guardrail.repartition".into(),
        }
    }
}

impl TopicsConfig {
    /// All six topics: events, changes, alerts, rollbacks, audit, dead letters.
    pub fn all(&self) -> [&str; 6] {
        [
            &self.events,
            &self.changes,
            &self.alerts,
            &self.rollbacks,
            &self.audit,
            &self.dlq,
        ]
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz` and the incident API. Port 0 picks a free port.
    pub listen: String,
    /// Per-series observed/expected/score gauges are exported for at most this many series
    /// (series in an incident first), to keep Prometheus cardinality bounded.
    pub max_series_gauges: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            max_series_gauges: 200,
        }
    }
}

/// How incidents are blamed on changes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttributionConfig {
    /// How far the clocks of change sources may run early or late: a change applied this much
    /// before or after the onset's confidence set is still a candidate.
    pub clock_skew_secs: u64,
    /// guardrail acts on its own (autonomous, supervised) only when the top candidate's score
    /// is at least this many times the runner-up's; closer calls go to a human.
    pub min_score_ratio: f64,
    /// ... and only when the top candidate's score reaches this: scope weight (1 exact, 0.7
    /// everything) times the likelihood of the shift starting at the change, times the
    /// holdout's likelihood ratio where there is one.
    pub min_score_to_act: f64,
}

impl Default for AttributionConfig {
    fn default() -> Self {
        Self {
            clock_skew_secs: 300,
            min_score_ratio: 8.0,
            min_score_to_act: 0.3,
        }
    }
}

/// Upper bound of `engine.max_event_bytes`, leaving room for a dead letter's headers under
/// librdkafka's default `message.max.bytes` of 1,000,000.
pub const MAX_EVENT_BYTES_LIMIT: usize = 900_000;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Width of the tumbling event-time windows every series is aggregated into.
    pub window_secs: u64,
    /// Watermark = max event time seen minus this. Events older than the watermark's window are
    /// dead-lettered as `too_late`.
    pub allowed_lateness_secs: u64,
    /// Events stamped further than this ahead of the wall clock are dead-lettered.
    pub max_future_skew_secs: u64,
    /// Events larger than this are dead-lettered as `too_large`.
    pub max_event_bytes: usize,
    /// Series (segment combinations) tracked per metric; events beyond it still count in the
    /// metric's total series and in `guardrail_series_overflow_total`.
    pub max_series_per_metric: usize,
    /// Drop exact duplicates by event `id` within the lateness horizon.
    pub dedup_by_id: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            window_secs: 300,
            allowed_lateness_secs: 120,
            max_future_skew_secs: 300,
            max_event_bytes: 64 * 1024,
            max_series_per_metric: 10_000,
            dedup_by_id: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Seasonality {
    None,
    HourOfDay,
    HourOfWeek,
}

impl Seasonality {
    pub fn buckets(self) -> usize {
        match self {
            Seasonality::None => 1,
            Seasonality::HourOfDay => 24,
            Seasonality::HourOfWeek => 168,
        }
    }
}

/// Detection settings; `[detection]` sets the defaults, each metric may override any of them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectionDefaults {
    /// The false-alarm rate the detectors are calibrated to, per series and per week. The
    /// threshold is ln(K * ARL0) with ARL0 = windows per week / this rate (K = parallel CUSUMs).
    pub false_alarms_per_series_week: f64,
    /// Smallest relative change worth an alert (practical significance) and the smallest
    /// effect the CUSUM bank is tuned for (it covers this times 1, 2, 4, 8, 16).
    pub min_relative_effect: f64,
    /// Smallest shift worth an alert for `mean` metrics, in units of the per-event spread.
    pub min_effect_sd: f64,
    /// Windows whose denominator (sessions, exposure, observations) is below this are not
    /// tested, so thin segments never alarm.
    pub min_volume_per_window: f64,
    /// Expected events since the onset needed before a drop or spike may fire.
    pub min_expected_events: f64,
    /// Windows of history a series needs before it is tested.
    pub warmup_windows: u32,
    pub seasonality: Seasonality,
    /// Half-life of the baseline's memory, in windows of the same season bucket.
    pub baseline_half_life_windows: f64,
    /// An incident still open after this long is accepted as the new normal: it resolves and the
    /// baseline re-learns.
    pub incident_max_secs: u64,
}

impl Default for DetectionDefaults {
    fn default() -> Self {
        Self {
            false_alarms_per_series_week: 0.01,
            min_relative_effect: 0.05,
            min_effect_sd: 0.05,
            min_volume_per_window: 0.0,
            min_expected_events: 10.0,
            warmup_windows: 144,
            seasonality: Seasonality::HourOfDay,
            baseline_half_life_windows: 24.0,
            incident_max_secs: 24 * 3600,
        }
    }
}

/// Per-metric overrides of [`DetectionDefaults`].
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionOverrides {
    pub false_alarms_per_series_week: Option<f64>,
    pub min_relative_effect: Option<f64>,
    pub min_effect_sd: Option<f64>,
    pub min_volume_per_window: Option<f64>,
    pub min_expected_events: Option<f64>,
    pub warmup_windows: Option<u32>,
    pub seasonality: Option<Seasonality>,
    pub baseline_half_life_windows: Option<f64>,
    pub incident_max_secs: Option<u64>,
}

impl DetectionOverrides {
    pub fn resolve(&self, d: &DetectionDefaults) -> DetectionDefaults {
        DetectionDefaults {
            false_alarms_per_series_week: self
                .false_alarms_per_series_week
                .unwrap_or(d.false_alarms_per_series_week),
            min_relative_effect: self.min_relative_effect.unwrap_or(d.min_relative_effect),
            min_effect_sd: self.min_effect_sd.unwrap_or(d.min_effect_sd),
            min_volume_per_window: self
                .min_volume_per_window
                .unwrap_or(d.min_volume_per_window),
            min_expected_events: self.min_expected_events.unwrap_or(d.min_expected_events),
            warmup_windows: self.warmup_windows.unwrap_or(d.warmup_windows),
            seasonality: self.seasonality.unwrap_or(d.seasonality),
            baseline_half_life_windows: self
                .baseline_half_life_windows
                .unwrap_or(d.baseline_half_life_windows),
            incident_max_secs: self.incident_max_secs.unwrap_or(d.incident_max_secs),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    pub key_id: String,
    /// HMAC-SHA256 secret for rollback requests. Prefer `secret_env` in production.
    pub secret: Option<String>,
    /// Environment variable holding the secret; wins over `secret` when set.
    pub secret_env: Option<String>,
}

impl Default for SigningConfig {
    fn default() -> Self {
        Self {
            key_id: "k1".into(),
            secret: None,
            secret_env: Some("GUARDRAIL_SIGNING_SECRET".into()),
        }
    }
}

impl SigningConfig {
    pub fn resolve_secret(&self) -> Option<String> {
        if let Some(var) = &self.secret_env {
            if let Ok(v) = std::env::var(var) {
                if !v.is_empty() {
                    return Some(v);
                }
            }
        }
        self.secret.clone()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Key of the keyed hash applied to `user` (distinct counts). Raw ids are never stored.
    pub user_hash_key: Option<String>,
    pub user_hash_key_env: Option<String>,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            user_hash_key: None,
            user_hash_key_env: Some("GUARDRAIL_USER_HASH_KEY".into()),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Human,
    Supervised,
    Autonomous,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Human => "human",
            Tier::Supervised => "supervised",
            Tier::Autonomous => "autonomous",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Tier of a change that names none and that no rule or `tiers` entry covers.
    pub default_tier: Tier,
    /// Tier per change kind (`wording`, `offer`, `audience`, ...), after `rules`.
    pub tiers: BTreeMap<String, Tier>,
    /// Rules by change kind and metric severity; the first that matches applies (a change that
    /// names its own tier keeps it, but the rule's shadow mode and timings still apply).
    pub rules: Vec<PolicyRule>,
    /// Global switch: decide and audit, never act: no rollback request is produced.
    pub shadow_mode: bool,
    /// How far before the estimated onset a change may have been applied and still be a
    /// candidate.
    pub candidate_lookback_secs: u64,
    /// `supervised`: the rollback is requested when this much event time has passed after the
    /// decision, unless someone vetoes (or approves earlier).
    pub veto_window_secs: u64,
    /// `human` (and a tripped circuit breaker): with no approval, veto or acknowledgement after
    /// this long, the alert is re-sent with a higher severity.
    pub escalate_after_secs: u64,
    /// Circuit breaker: automatic rollbacks allowed in any hour of event time, over all
    /// surfaces. Past it guardrail stops acting and asks a human.
    pub max_auto_rollbacks_per_hour: u32,
    /// The same, per surface of the change's scope (a change without surfaces counts as `*`).
    pub max_auto_rollbacks_per_hour_per_surface: u32,
    /// The metric a change of each kind is meant to improve, for "local gain, global loss".
    pub target_metrics: BTreeMap<String, String>,
    /// Changes the registry keeps; past it the change that ended first (else the oldest) is
    /// forgotten, counted in `guardrail_tracked_overflow_total{map="changes"}`.
    pub max_changes: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            default_tier: Tier::Human,
            tiers: BTreeMap::new(),
            rules: Vec::new(),
            shadow_mode: false,
            candidate_lookback_secs: 7 * 24 * 3600,
            veto_window_secs: 15 * 60,
            escalate_after_secs: 30 * 60,
            max_auto_rollbacks_per_hour: 5,
            max_auto_rollbacks_per_hour_per_surface: 2,
            target_metrics: BTreeMap::new(),
            max_changes: 100_000,
        }
    }
}

/// `[[policy.rules]]`: what applies to changes of a kind hurting metrics of a severity.
#[derive(Debug, Clone, Deserialize, Serialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// Cited in decisions and audit records; defaults to `rule-<position>`.
    pub name: Option<String>,
    /// Matches changes of this kind; unset matches any.
    pub change_kind: Option<String>,
    /// Matches incidents on metrics of this severity; unset matches any.
    pub metric_severity: Option<Severity>,
    pub tier: Option<Tier>,
    /// Shadow mode for this rule only: decide and audit, never act.
    pub shadow_mode: Option<bool>,
    pub veto_window_secs: Option<u64>,
    pub escalate_after_secs: Option<u64>,
}

/// `[guards]`: watches opened when changes are applied, and the two stream-wide guards.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardsConfig {
    /// How long a change is watched after it is applied (2 h to 7 days).
    pub watch_secs: u64,
    /// False-alarm probability of one treatment-vs-holdout test (per change and metric), valid
    /// under continuous looking.
    pub alpha: f64,
    /// Mixing scale of the mSPRT, as a relative effect: the test is most sensitive to effects
    /// about this size.
    pub mixture_relative_effect: f64,
    /// The event type counted per arm for the sample-ratio-mismatch check.
    pub exposure_event: String,
    /// False-alarm probability of the (sequential) sample-ratio-mismatch check.
    pub srm_alpha: f64,
    pub sprawl: SprawlConfig,
    pub pressure: PressureConfig,
}

impl Default for GuardsConfig {
    fn default() -> Self {
        Self {
            watch_secs: 24 * 3600,
            alpha: 0.01,
            mixture_relative_effect: 0.10,
            exposure_event: "session".into(),
            srm_alpha: 0.001,
            sprawl: SprawlConfig::default(),
            pressure: PressureConfig::default(),
        }
    }
}

/// Variation sprawl: too many variants live on one surface ("knowing when to stop").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SprawlConfig {
    pub enabled: bool,
    /// Distinct `variant` values seen on one surface within `window_secs` above which the
    /// surface is fragmented.
    pub max_variants_per_surface: u32,
    pub window_secs: u64,
    pub severity: Severity,
    /// Surfaces followed at once; beyond, new surfaces are counted in
    /// `guardrail_tracked_overflow_total{map="sprawl_surfaces"}` and not followed.
    pub max_surfaces: usize,
}

impl Default for SprawlConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_variants_per_surface: 12,
            window_secs: 3600,
            severity: Severity::Warning,
            max_surfaces: 10_000,
        }
    }
}

/// Customer pressure: messages per recipient per day above a cap.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PressureConfig {
    pub enabled: bool,
    pub message_event: String,
    pub unsubscribe_event: String,
    /// Messages per distinct recipient within one UTC day (per surface) above which customers
    /// are under pressure.
    pub max_messages_per_user_day: f64,
    /// Recipients needed in the day before the ratio is judged.
    pub min_users: u64,
    pub severity: Severity,
    /// Surfaces followed at once; beyond, new surfaces are counted in
    /// `guardrail_tracked_overflow_total{map="pressure_surfaces"}` and not followed.
    pub max_surfaces: usize,
}

impl Default for PressureConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            message_event: "message_sent".into(),
            unsubscribe_event: "unsubscribe".into(),
            max_messages_per_user_day: 3.0,
            min_users: 50,
            severity: Severity::Warning,
            max_surfaces: 10_000,
        }
    }
}

/// Optional push of alerts to a Prometheus Alertmanager (API v2), next to the alerts topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertmanagerConfig {
    /// Base URL, e.g. `http://alertmanager:9093`; unset disables the push. Only `http://` is
    /// supported by the built-in client.
    pub url: Option<String>,
    /// Firing alerts are re-sent this often (Alertmanager expects re-sends); each carries
    /// `endsAt = now + 4 x this`, so alerts of a stopped guardrail expire on their own.
    pub resend_interval_secs: u64,
    /// Timeout of one POST (connect, send and response).
    pub timeout_secs: u64,
    /// Value of the `team` label; unset uses the metric's `owner`.
    pub team_label: Option<String>,
}

impl Default for AlertmanagerConfig {
    fn default() -> Self {
        Self {
            url: None,
            resend_interval_secs: 60,
            timeout_secs: 10,
            team_label: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    Ratio,
    Count,
    Mean,
    /// One value per window (a sampled gauge: CPU, latency, a price): each window is reduced to
    /// the mean of its values and tested against the spread between windows.
    Gauge,
    Distinct,
    Share,
}

impl MetricKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Ratio => "ratio",
            MetricKind::Count => "count",
            MetricKind::Mean => "mean",
            MetricKind::Gauge => "gauge",
            MetricKind::Distinct => "distinct",
            MetricKind::Share => "share",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Drop,
    Spike,
    Both,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Which events a metric reads: a type plus optional filters.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(rename = "type")]
    pub event_type: String,
    pub surface: Option<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub dims: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricConfig {
    pub name: String,
    pub kind: MetricKind,
    pub numerator: Selector,
    pub denominator: Option<Selector>,
    pub exposure: Option<Selector>,
    #[serde(default = "default_direction")]
    pub direction: Direction,
    #[serde(default)]
    pub dims: Vec<String>,
    #[serde(default = "default_severity")]
    pub severity: Severity,
    /// Also track the metric over all segments (the series with no dims).
    #[serde(default = "default_true")]
    pub include_total: bool,
    /// Who owns this metric (routing, accountability).
    pub owner: Option<String>,
    /// `share` metrics: the dimension whose mix is watched (`device`, `channel`, `variant`).
    pub share_of: Option<String>,
    /// `share` metrics: smallest population stability index worth an alert (0.1 is the usual
    /// "moderate shift"); the G-test decides whether the shift is real.
    pub min_psi: Option<f64>,
    #[serde(default)]
    pub detection: DetectionOverrides,
}

fn default_direction() -> Direction {
    Direction::Both
}
fn default_severity() -> Severity {
    Severity::Warning
}
fn default_true() -> bool {
    true
}

/// Fields that live at the top level of an event rather than in its `dims` object.
pub const TOP_LEVEL_DIMS: [&str; 4] = ["surface", "variant", "change_id", "arm"];

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_str_named(&text, &path.display().to_string())
    }

    /// Parses and validates; `name` is used in error locations.
    pub fn from_str_named(text: &str, name: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse {
                path: name.to_string(),
                line,
                column,
                message: with_suggestion(e.message()),
            }
        })?;
        let errors = cfg.validate(text, name);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    pub fn metrics(&self) -> impl Iterator<Item = &MetricConfig> {
        self.metrics.iter().map(|m| m.get_ref())
    }

    /// Semantic checks that serde cannot express. Returns every problem, not only the first.
    pub fn validate(&self, text: &str, name: &str) -> Vec<LocatedError> {
        let mut errs = Vec::new();
        let at = |offset: usize, key: String, message: String| {
            let (line, column) = line_col(text, offset);
            LocatedError {
                path: name.to_string(),
                line,
                column,
                key,
                message,
            }
        };
        let top = 0usize;
        let e = &self.engine;
        if e.window_secs == 0 || e.window_secs > 24 * 3600 {
            errs.push(at(
                find_key(text, "window_secs").unwrap_or(top),
                "engine.window_secs".into(),
                format!("must be between 1 and 86400, got {}", e.window_secs),
            ));
        } else if (24 * 3600) % e.window_secs != 0 {
            errs.push(at(
                find_key(text, "window_secs").unwrap_or(top),
                "engine.window_secs".into(),
                format!(
                    "must divide a day evenly so windows align with seasonal buckets, got {}",
                    e.window_secs
                ),
            ));
        }
        let a = &self.attribution;
        if a.clock_skew_secs > 3600 {
            errs.push(at(
                find_key(text, "clock_skew_secs").unwrap_or(top),
                "attribution.clock_skew_secs".into(),
                format!("must be at most 3600, got {}", a.clock_skew_secs),
            ));
        }
        if !(a.min_score_ratio >= 1.0 && a.min_score_ratio <= 1000.0) {
            errs.push(at(
                find_key(text, "min_score_ratio").unwrap_or(top),
                "attribution.min_score_ratio".into(),
                format!("must be between 1 and 1000, got {}", a.min_score_ratio),
            ));
        }
        if !(a.min_score_to_act >= 0.0 && a.min_score_to_act <= 100.0) {
            errs.push(at(
                find_key(text, "min_score_to_act").unwrap_or(top),
                "attribution.min_score_to_act".into(),
                format!("must be between 0 and 100, got {}", a.min_score_to_act),
            ));
        }
        let st = &self.state;
        if st.checkpoint_interval_secs == 0 || st.checkpoint_interval_secs > 3600 {
            errs.push(at(
                find_key(text, "checkpoint_interval_secs").unwrap_or(top),
                "state.checkpoint_interval_secs".into(),
                format!(
                    "must be between 1 and 3600, got {}",
                    st.checkpoint_interval_secs
                ),
            ));
        }
        let max_generations = crate::checkpoint::MAX_GENERATIONS;
        if !(1..=max_generations).contains(&st.generations) {
            errs.push(at(
                find_key(text, "generations").unwrap_or(top),
                "state.generations".into(),
                format!(
                    "must be between 1 and {max_generations}, got {}",
                    st.generations
                ),
            ));
        }
        if self.scale.hold_max_secs == 0 || self.scale.hold_max_secs > 86_400 {
            errs.push(at(
                find_key(text, "hold_max_secs").unwrap_or(top),
                "scale.hold_max_secs".into(),
                format!(
                    "must be between 1 and 86400, got {}",
                    self.scale.hold_max_secs
                ),
            ));
        }
        if self.scale.peer_timeout_ms < 10 || self.scale.peer_timeout_ms > 60_000 {
            errs.push(at(
                find_key(text, "peer_timeout_ms").unwrap_or(top),
                "scale.peer_timeout_ms".into(),
                format!(
                    "must be between 10 and 60000, got {}",
                    self.scale.peer_timeout_ms
                ),
            ));
        }
        for (i, u) in self.scale.peers.iter().enumerate() {
            if let Err(why) = crate::peer::PeerUrl::parse(u) {
                errs.push(at(
                    find_key(text, "peers").unwrap_or(top),
                    format!("scale.peers[{i}]"),
                    why,
                ));
            }
        }
        if self.scale.two_stage {
            for (on, key) in [
                (self.guards.sprawl.enabled, "guards.sprawl.enabled"),
                (self.guards.pressure.enabled, "guards.pressure.enabled"),
            ] {
                if on {
                    errs.push(at(
                        find_key(text, "two_stage").unwrap_or(top),
                        key.into(),
                        "must be false with [scale] two_stage: variation sprawl and customer \
                         pressure follow single events across series and are not split into \
                         partial sums yet"
                            .into(),
                    ));
                }
            }
            if self.kafka.topics.repartition.trim().is_empty() {
                errs.push(at(
                    find_key(text, "repartition").unwrap_or(top),
                    "kafka.topics.repartition".into(),
                    "must name the internal repartition topic with [scale] two_stage".into(),
                ));
            }
        }
        if st.dir.as_deref().is_some_and(|d| d.trim().is_empty()) {
            errs.push(at(
                find_key(text, "dir").unwrap_or(top),
                "state.dir".into(),
                "must not be empty (leave it out to run without checkpoints)".into(),
            ));
        }
        if self
            .kafka
            .transactional_id
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            errs.push(at(
                find_key(text, "transactional_id").unwrap_or(top),
                "kafka.transactional_id".into(),
                "must not be empty (leave it out for guardrail-{group_id}-{instance})".into(),
            ));
        }
        if !(64..=MAX_EVENT_BYTES_LIMIT).contains(&e.max_event_bytes) {
            errs.push(at(
                find_key(text, "max_event_bytes").unwrap_or(top),
                "engine.max_event_bytes".into(),
                format!("must be between 64 and {MAX_EVENT_BYTES_LIMIT}: a dead letter carries up to this many of the event's bytes and must fit the producer's message.max.bytes (1,000,000 by default)"),
            ));
        }
        if e.max_series_per_metric == 0 {
            errs.push(at(
                find_key(text, "max_series_per_metric").unwrap_or(top),
                "engine.max_series_per_metric".into(),
                "must be at least 1".into(),
            ));
        }
        check_detection(&self.detection, "detection", text, &mut errs, &at, top);
        let am = &self.alertmanager;
        if let Some(url) = &am.url {
            let msg = if url.starts_with("https://") {
                Some(format!("{url:?}: https is not supported by the built-in Alertmanager client; use http:// (e.g. via a local TLS-terminating proxy)"))
            } else if !url.starts_with("http://") || url.len() <= "http://".len() {
                Some(format!(
                    "{url:?}: must be an http:// URL, e.g. \"http://127.0.0.1:9093\""
                ))
            } else {
                None
            };
            if let Some(m) = msg {
                errs.push(at(
                    find_key(text, "url").unwrap_or(top),
                    "alertmanager.url".into(),
                    m,
                ));
            }
        }
        if am.resend_interval_secs == 0 {
            errs.push(at(
                find_key(text, "resend_interval_secs").unwrap_or(top),
                "alertmanager.resend_interval_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if am.timeout_secs == 0 {
            errs.push(at(
                find_key(text, "timeout_secs").unwrap_or(top),
                "alertmanager.timeout_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if self.metrics.is_empty() {
            errs.push(at(
                top,
                "metrics".into(),
                "no [[metrics]] defined: guardrail needs at least one metric to watch".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.metrics.iter().enumerate() {
            let off = m.span().start;
            let mc = m.get_ref();
            let key = |k: &str| format!("metrics[{i}] ({}).{k}", mc.name);
            if mc.name.is_empty()
                || !mc
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            {
                errs.push(at(
                    off,
                    key("name"),
                    "must be non-empty and use only letters, digits, '_', '-', '.'".into(),
                ));
            }
            if !seen.insert(mc.name.clone()) {
                errs.push(at(off, key("name"), "duplicate metric name".into()));
            }
            if mc.numerator.event_type.is_empty() {
                errs.push(at(
                    off,
                    key("numerator.type"),
                    "event type must not be empty".into(),
                ));
            }
            match mc.kind {
                MetricKind::Ratio => {
                    if mc.denominator.is_none() {
                        errs.push(at(
                            off,
                            key("denominator"),
                            "a ratio metric needs a denominator selector, e.g. denominator = { type = \"session\" }".into(),
                        ));
                    }
                    if mc.exposure.is_some() {
                        errs.push(at(
                            off,
                            key("exposure"),
                            "only count metrics take an exposure; a ratio uses denominator".into(),
                        ));
                    }
                }
                MetricKind::Count => {
                    if mc.denominator.is_some() {
                        errs.push(at(off, key("denominator"), "a count metric takes `exposure` (e.g. tickets per session), not `denominator`".into()));
                    }
                }
                MetricKind::Mean | MetricKind::Gauge | MetricKind::Distinct => {
                    if mc.denominator.is_some() || mc.exposure.is_some() {
                        errs.push(at(
                            off,
                            key("denominator"),
                            format!(
                                "a {} metric reads only its numerator selector",
                                mc.kind.as_str()
                            ),
                        ));
                    }
                }
                MetricKind::Share => {
                    if mc.denominator.is_some() || mc.exposure.is_some() {
                        errs.push(at(off, key("denominator"), "a share metric reads only its numerator selector: the mix of `share_of` within those events".into()));
                    }
                    match &mc.share_of {
                        None => errs.push(at(off, key("share_of"), "a share metric names the dimension whose mix it watches, e.g. share_of = \"device\"".into())),
                        Some(d) if mc.dims.contains(d) => errs.push(at(off, key("share_of"), format!("{d:?} is also a segment dimension in `dims`: its mix within a segment of itself is constant"))),
                        Some(d) if d.is_empty() => errs.push(at(off, key("share_of"), "must not be empty".into())),
                        _ => {}
                    }
                    if let Some(p) = mc.min_psi {
                        if !(p > 0.0 && p < 10.0) {
                            errs.push(at(
                                off,
                                key("min_psi"),
                                format!("must be in (0, 10), got {p}"),
                            ));
                        }
                    }
                }
            }
            if mc.dims.len() > 4 {
                errs.push(at(
                    off,
                    key("dims"),
                    "at most 4 segment dimensions per metric".into(),
                ));
            }
            let mut dd = std::collections::HashSet::new();
            for d in &mc.dims {
                if d.is_empty() || !dd.insert(d) {
                    errs.push(at(
                        off,
                        key("dims"),
                        format!("dimension {d:?} is empty or repeated"),
                    ));
                }
            }
            if mc.dims.is_empty() && !mc.include_total {
                errs.push(at(
                    off,
                    key("include_total"),
                    "a metric without dims is only its total series; include_total cannot be false"
                        .into(),
                ));
            }
            let d = mc.detection.resolve(&self.detection);
            check_detection(&d, &key("detection"), text, &mut errs, &at, off);
        }
        self.check_governance(text, &mut errs, &at);
        errs
    }

    /// Policy, guards, roles and actors.
    fn check_governance(
        &self,
        text: &str,
        errs: &mut Vec<LocatedError>,
        at: &dyn Fn(usize, String, String) -> LocatedError,
    ) {
        let loc = |k: &str| find_key(text, k).unwrap_or(0);
        let p = &self.policy;
        let metric_names: Vec<&str> = self
            .metrics
            .iter()
            .map(|m| m.get_ref().name.as_str())
            .collect();
        for (kind, m) in &p.target_metrics {
            if !metric_names.contains(&m.as_str()) {
                errs.push(at(
                    loc("target_metrics"),
                    format!("policy.target_metrics.{kind}"),
                    format!(
                        "{m:?} is not a configured metric{}",
                        suggest(m, metric_names.iter().copied())
                            .map(|s| format!("; did you mean {s:?}?"))
                            .unwrap_or_default()
                    ),
                ));
            }
        }
        if p.veto_window_secs == 0 || p.veto_window_secs > 7 * 86400 {
            errs.push(at(
                loc("veto_window_secs"),
                "policy.veto_window_secs".into(),
                format!(
                    "must be between 1 and 604800 (7 days), got {}",
                    p.veto_window_secs
                ),
            ));
        }
        if p.escalate_after_secs == 0 {
            errs.push(at(
                loc("escalate_after_secs"),
                "policy.escalate_after_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if p.max_changes == 0 {
            errs.push(at(
                loc("max_changes"),
                "policy.max_changes".into(),
                "must be at least 1".into(),
            ));
        }
        let mut rule_names = std::collections::HashSet::new();
        for (i, r) in p.rules.iter().enumerate() {
            let name = r.name.clone().unwrap_or_else(|| format!("rule-{}", i + 1));
            if !rule_names.insert(name.clone()) {
                errs.push(at(
                    loc("rules"),
                    format!("policy.rules[{i}].name"),
                    format!("duplicate rule name {name:?}"),
                ));
            }
            if r.veto_window_secs == Some(0) || r.escalate_after_secs == Some(0) {
                errs.push(at(
                    loc("rules"),
                    format!("policy.rules[{i}]"),
                    "veto_window_secs and escalate_after_secs must be at least 1".into(),
                ));
            }
        }
        let g = &self.guards;
        if !(2 * 3600..=7 * 86400).contains(&g.watch_secs) {
            errs.push(at(
                loc("watch_secs"),
                "guards.watch_secs".into(),
                format!(
                    "must be between 7200 (2 h) and 604800 (7 days), got {}",
                    g.watch_secs
                ),
            ));
        }
        for (k, v, hi) in [
            ("alpha", g.alpha, 0.5),
            ("srm_alpha", g.srm_alpha, 0.5),
            ("mixture_relative_effect", g.mixture_relative_effect, 10.0),
        ] {
            if !(v > 0.0 && v < hi) {
                errs.push(at(
                    loc(k),
                    format!("guards.{k}"),
                    format!("must be in (0, {hi}), got {v}"),
                ));
            }
        }
        for (key, n) in [
            ("sprawl", g.sprawl.max_surfaces),
            ("pressure", g.pressure.max_surfaces),
        ] {
            if n == 0 {
                errs.push(at(
                    loc("max_surfaces"),
                    format!("guards.{key}.max_surfaces"),
                    "must be at least 1".into(),
                ));
            }
        }
        if g.sprawl.max_variants_per_surface < 2 {
            errs.push(at(
                loc("max_variants_per_surface"),
                "guards.sprawl.max_variants_per_surface".into(),
                "must be at least 2".into(),
            ));
        }
        if g.sprawl.window_secs < self.engine.window_secs || g.sprawl.window_secs > 7 * 86400 {
            errs.push(at(
                loc("window_secs"),
                "guards.sprawl.window_secs".into(),
                format!(
                    "must be between engine.window_secs ({}) and 604800, got {}",
                    self.engine.window_secs, g.sprawl.window_secs
                ),
            ));
        }
        if g.pressure.max_messages_per_user_day.is_nan()
            || g.pressure.max_messages_per_user_day < 1.0
        {
            errs.push(at(
                loc("max_messages_per_user_day"),
                "guards.pressure.max_messages_per_user_day".into(),
                "must be at least 1".into(),
            ));
        }
        for (key, message) in crate::auth::validate(&self.roles, &self.actors) {
            let k = key.rsplit('.').next().unwrap_or(&key).to_string();
            errs.push(at(loc(&k), key, message));
        }
    }
}

fn check_detection(
    d: &DetectionDefaults,
    key: &str,
    _text: &str,
    errs: &mut Vec<LocatedError>,
    at: &dyn Fn(usize, String, String) -> LocatedError,
    off: usize,
) {
    if !(d.false_alarms_per_series_week > 0.0 && d.false_alarms_per_series_week <= 100.0) {
        errs.push(at(
            off,
            format!("{key}.false_alarms_per_series_week"),
            format!(
                "must be in (0, 100], got {} (the shipped default is 0.01: one false alarm per series per ~2 years)",
                d.false_alarms_per_series_week
            ),
        ));
    }
    if !(d.min_relative_effect > 0.0 && d.min_relative_effect < 1.0) {
        errs.push(at(
            off,
            format!("{key}.min_relative_effect"),
            format!("must be in (0, 1), got {}", d.min_relative_effect),
        ));
    }
    if !(d.min_effect_sd > 0.0 && d.min_effect_sd.is_finite()) {
        errs.push(at(
            off,
            format!("{key}.min_effect_sd"),
            "must be > 0".into(),
        ));
    }
    if !(d.min_volume_per_window >= 0.0 && d.min_volume_per_window.is_finite()) {
        errs.push(at(
            off,
            format!("{key}.min_volume_per_window"),
            "must be >= 0".into(),
        ));
    }
    if !(d.min_expected_events >= 0.0 && d.min_expected_events.is_finite()) {
        errs.push(at(
            off,
            format!("{key}.min_expected_events"),
            "must be >= 0".into(),
        ));
    }
    if !(d.baseline_half_life_windows >= 1.0 && d.baseline_half_life_windows.is_finite()) {
        errs.push(at(
            off,
            format!("{key}.baseline_half_life_windows"),
            "must be >= 1".into(),
        ));
    }
    if d.incident_max_secs == 0 {
        errs.push(at(
            off,
            format!("{key}.incident_max_secs"),
            "must be > 0".into(),
        ));
    }
}

/// For "unknown field `x`, expected one of `a`, `b`": appends the closest expected key.
fn with_suggestion(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((field, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    match suggest(field, expected.split('`').skip(1).step_by(2)) {
        Some(k) => format!("{message}; did you mean `{k}`?"),
        None => message.to_string(),
    }
}

/// The candidate closest to `word`, if close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|k| (edit_distance(word, k), k))
        .min()
        .filter(|(d, _)| *d <= (word.len().max(3) / 2).max(2))
        .map(|(_, k)| k)
}

/// Levenshtein distance (keys are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (ca != *cb) as usize)
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map(|p| offset - p).unwrap_or(offset + 1);
    (line, column)
}

fn find_key(text: &str, key: &str) -> Option<usize> {
    let mut off = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if t.starts_with(key) && t[key.len()..].trim_start().starts_with('=') {
            return Some(off + (line.len() - t.len()));
        }
        off += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[[metrics]]
name = "conversion_rate"
kind = "ratio"
numerator = { type = "conversion" }
denominator = { type = "session" }
direction = "drop"
dims = ["surface", "country"]
severity = "critical"
"#;

    #[test]
    fn contract_minimal_metric_is_valid_with_defaults() {
        let c = Config::from_str_named(MIN, "t.toml").unwrap();
        assert_eq!(c.metrics.len(), 1);
        assert_eq!(c.engine.window_secs, 300);
        assert_eq!(c.detection.false_alarms_per_series_week, 0.01);
    }

    #[test]
    fn unknown_key_is_located() {
        let text = format!("{MIN}windw_secs = 3\n");
        let err = Config::from_str_named(&text, "t.toml").unwrap_err();
        match err {
            ConfigError::Parse { line, message, .. } => {
                assert!(message.contains("unknown field"), "{message}");
                assert!(line >= 2, "line {line}");
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn ratio_without_denominator_is_rejected_with_line() {
        let text = "\n\n[[metrics]]\nname = \"x\"\nkind = \"ratio\"\nnumerator = { type = \"conversion\" }\n";
        let err = Config::from_str_named(text, "t.toml").unwrap_err();
        let s = err.to_string();
        assert!(s.contains("t.toml:3:"), "{s}");
        assert!(s.contains("denominator"), "{s}");
    }

    #[test]
    fn checkpoint_generations_are_bounded() {
        let c = Config::from_str_named(MIN, "t.toml").unwrap();
        assert_eq!(c.state.generations, 3);
        for (n, ok) in [(0, false), (1, true), (16, true), (17, false)] {
            let text = format!("[state]\ngenerations = {n}\n{MIN}");
            match Config::from_str_named(&text, "t.toml") {
                Ok(c) => assert!(ok && c.state.generations == n, "{n}"),
                Err(e) => {
                    let s = e.to_string();
                    assert!(
                        !ok && s.contains("state.generations") && s.contains("t.toml:2:"),
                        "{s}"
                    );
                }
            }
        }
    }

    #[test]
    fn two_stage_needs_sprawl_and_pressure_off() {
        let on = format!("[scale]\ntwo_stage = true\n{MIN}");
        let s = Config::from_str_named(&on, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(s.contains("guards.sprawl.enabled"), "{s}");
        assert!(s.contains("guards.pressure.enabled"), "{s}");
        let off = format!(
            "[scale]\ntwo_stage = true\n[guards.sprawl]\nenabled = false\n\
             [guards.pressure]\nenabled = false\n{MIN}"
        );
        let c = Config::from_str_named(&off, "t.toml").unwrap();
        assert_eq!(c.scale.merge_group(&c.kafka), "guardrail-merge");
        assert_eq!(c.kafka.topics.repartition, "guardrail.repartition");
        assert_eq!(c.scale.hold_max_secs, 120);
        let never = format!("[scale]\nhold_max_secs = 0\n{MIN}");
        let s = Config::from_str_named(&never, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            s.contains("scale.hold_max_secs") && s.contains("got 0"),
            "{s}"
        );
        let peers = format!("[scale]\npeers = [\"http://10.0.0.2:9464\", \"https://b:1\"]\n{MIN}");
        let s = Config::from_str_named(&peers, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            s.contains("t.toml:2:1: scale.peers[1]") && s.contains("plain HTTP"),
            "{s}"
        );
        assert!(!s.contains("peers[0]"), "{s}");
        let slow = format!("[scale]\npeer_timeout_ms = 0\n{MIN}");
        let s = Config::from_str_named(&slow, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(s.contains("scale.peer_timeout_ms"), "{s}");
    }

    #[test]
    fn gauge_reads_only_its_numerator() {
        let ok = "[[metrics]]\nname = \"cpu\"\nkind = \"gauge\"\nnumerator = { type = \"measurement\" }\n";
        let c = Config::from_str_named(ok, "t.toml").unwrap();
        assert_eq!(c.metrics[0].get_ref().kind, MetricKind::Gauge);
        assert_eq!(c.metrics[0].get_ref().kind.as_str(), "gauge");
        let bad = format!("{ok}denominator = {{ type = \"session\" }}\n");
        let s = Config::from_str_named(&bad, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            s.contains("a gauge metric reads only its numerator selector"),
            "{s}"
        );
    }

    #[test]
    fn bad_detection_values_are_rejected() {
        let text = format!(
            "[detection]\nfalse_alarms_per_series_week = 0\n[engine]\nwindow_secs = 7\n{MIN}"
        );
        let s = Config::from_str_named(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(s.contains("false_alarms_per_series_week"), "{s}");
        assert!(s.contains("t.toml:4:1: engine.window_secs"), "{s}");
    }

    #[test]
    fn alertmanager_section_defaults_and_url_checks() {
        let c = Config::from_str_named(MIN, "t.toml").unwrap();
        assert!(c.alertmanager.url.is_none());
        assert_eq!(c.alertmanager.resend_interval_secs, 60);
        assert_eq!(c.alertmanager.timeout_secs, 10);
        let ok = format!("[alertmanager]\nurl = \"http://127.0.0.1:9093\"\n{MIN}");
        let c = Config::from_str_named(&ok, "t.toml").unwrap();
        assert_eq!(c.alertmanager.url.as_deref(), Some("http://127.0.0.1:9093"));
        for (url, want) in [
            ("https://am:9093", "https is not supported"),
            ("am:9093", "must be an http:// URL"),
        ] {
            let text = format!("[alertmanager]\nurl = \"{url}\"\n{MIN}");
            let s = Config::from_str_named(&text, "t.toml")
                .unwrap_err()
                .to_string();
            assert!(
                s.contains("t.toml:2:1: alertmanager.url") && s.contains(want),
                "{s}"
            );
        }
        let text = format!("[alertmanager]\nurll = \"http://x\"\n{MIN}");
        let s = Config::from_str_named(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(s.contains("unknown field"), "{s}");
    }

    #[test]
    fn unknown_keys_get_a_suggestion() {
        let text = format!("[engine]\nallowed_latenes_secs = 3\n{MIN}");
        let s = Config::from_str_named(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(s.contains("did you mean `allowed_lateness_secs`?"), "{s}");
        let text = format!("[engine]\nzzz = 3\n{MIN}");
        let s = Config::from_str_named(&text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(!s.contains("did you mean"), "{s}");
    }

    #[test]
    fn line_col_is_one_based() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 3), (2, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
