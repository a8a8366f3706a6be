//! guardrail: keeps automated optimisation honest.
//!
//! Module map (the pipeline of ARCHITECTURE.md, in the order data flows):
//!
//! - [`config`]    typed TOML configuration, `validate()` and located error reports.
//! - [`event`]     the wire contract's inputs: zero-copy event decoding, changes, timestamps,
//!   and the bounded set of dead-letter reason codes.
//! - [`source`]    the Kafka consumer (consumer group, offsets stored after processing).
//! - [`window`]    tumbling event-time windows per series, closed by the watermark.
//! - [`baseline`]  seasonal, outlier-robust online baselines, frozen during incidents.
//! - [`detect`]    calibrated sequential detectors (binomial, Poisson with exposure, Gaussian).
//! - [`onset`]     where a detected shift began: profile likelihood over the history, with
//!   its confidence set.
//! - [`guard`]     watches on applied changes (treatment vs holdout, SRM), variation sprawl,
//!   customer pressure; [`seqtest`] their always-valid sequential tests.
//! - [`trend`]     slow drifts: daily levels against a long reference, CUSUM in days.
//! - [`share`]     `share` metrics: a dimension's mix within an event type, G-test drift.
//! - [`attribute`] the registry of changes in force and candidate ranking.
//! - [`policy`]    decisions by tier: veto windows, escalation, circuit breaker, shadow mode.
//! - [`control`]   approve / veto / acknowledge / silence: API commands applied by the engine.
//! - [`audit`]     `guardrail audit --change ID`: one change's story from the audit topic.
//! - [`auth`]      actors, roles and bearer tokens for the HTTP API.
//! - [`engine`]    wires decode -> window -> baseline -> detect -> attribute -> policy; the
//!   same engine runs live (Kafka) and over files (replay), and as either stage of the
//!   two-stage aggregation ([`repartition`]).
//! - [`sink`]      contract outputs: alerts, signed rollback requests, audit, dead letters,
//!   to Kafka or to files.
//! - [`alertmanager`] optional push of alerts to Prometheus Alertmanager (API v2).
//! - [`telemetry`] Prometheus metrics, internal events (one `emit` = log line + metric).
//! - [`api`]       HTTP: `/metrics`, `/healthz`, `/readyz`, incidents.
//! - [`peer`]      the other instances' APIs: incidents and control calls this instance does
//!   not hold are asked of them, lists gathered from them.
//! - [`service`]   `guardrail run`: source + engine + sinks + api, with graceful shutdown.
//! - [`repartition`] two-stage aggregation for scale-out: partial window sums keyed by series.
//! - [`replay`]    `guardrail replay`: the engine over JSON-lines files, as fast as possible.
//! - [`nab`]       the Numenta Anomaly Benchmark: its scorer, and the engine run over it.
//! - [`sim`]       the traffic simulator (diurnal, segmented, with injected effects).
//! - [`scenario`]  benchmark scenarios (TOML): seeded traffic with injected incidents, their
//!   change records and ground truth (`guardrail simulate --scenario`).
//! - [`score`]     `guardrail bench detect`: alerts scored against the truth, beside a CUSUM
//!   oracle, the theoretical limit and a static-threshold baseline.
//! - [`demo`]      `guardrail demo`: embedded broker, simulator, automation, the seed story.

pub mod alertmanager;
pub mod api;
pub mod attribute;
pub mod audit;
pub mod auth;
pub mod baseline;
pub mod checkpoint;
pub mod config;
pub mod control;
pub mod demo;
pub mod detect;
pub mod engine;
pub mod event;
pub mod extreme;
pub mod guard;
pub mod nab;
pub mod onset;
pub mod peer;
pub mod policy;
pub mod repartition;
pub mod replay;
pub mod scenario;
pub mod score;
pub mod seqtest;
pub mod service;
pub mod share;
pub mod sim;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod trend;
pub mod window;
