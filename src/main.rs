//! The `guardrail` command line (contract section 7).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use guardrail::config::Config;

#[derive(Parser)]
#[command(
    name = "guardrail",
    version,
    about = "Keeps automated optimisation honest: watches the event stream, detects harmful changes, names the change that caused them and acts within the rules people set.",
    long_about = None
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "GUARDRAIL_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole story on an embedded broker: simulated traffic, a harmful automated change,
    /// detection, rollback, recovery. Exits 0 when the story holds.
    Demo {
        /// Keep running after the story with traffic flowing and /metrics served.
        #[arg(long, env = "GUARDRAIL_DEMO_FOLLOW")]
        follow: bool,
        /// HTTP address for /metrics and the incident pages (default: a free port; 127.0.0.1:9464 with --follow).
        #[arg(long, env = "GUARDRAIL_DEMO_LISTEN")]
        listen: Option<String>,
        /// Random seed of the simulated traffic.
        #[arg(long, default_value_t = 7, env = "GUARDRAIL_DEMO_SEED")]
        seed: u64,
    },
    /// Run the service against a Kafka cluster.
    Run {
        /// TOML configuration file.
        #[arg(long, short, env = "GUARDRAIL_CONFIG")]
        config: PathBuf,
    },
    /// Run the engine over files in event time and write alerts.jsonl, rollbacks.jsonl,
    /// audit.jsonl, dead_letters.jsonl and summary.json into the output directory.
    Replay {
        #[arg(long, short, env = "GUARDRAIL_CONFIG")]
        config: PathBuf,
        /// Events: JSON lines, or Parquet with the contract's field names (by the PAR1 magic or
        /// a .parquet extension; `dims` a map or struct column, `ts` a string, integer epoch
        /// milliseconds or a timestamp column).
        #[arg(long, env = "GUARDRAIL_REPLAY_EVENTS")]
        events: PathBuf,
        /// Changes: JSON lines or Parquet, as for --events.
        #[arg(long, env = "GUARDRAIL_REPLAY_CHANGES")]
        changes: Option<PathBuf>,
        /// Output directory (created if missing).
        #[arg(long, env = "GUARDRAIL_REPLAY_OUT")]
        out: PathBuf,
        /// No progress on stderr (otherwise one updating line on a terminal, a line every
        /// million events when stderr is not a terminal).
        #[arg(long, short, env = "GUARDRAIL_QUIET")]
        quiet: bool,
    },
    /// Validate a configuration file and explain any errors with their location.
    CheckConfig {
        /// TOML configuration file.
        #[arg(env = "GUARDRAIL_CONFIG")]
        file: PathBuf,
    },
    /// Write simulated traffic as JSON lines (events and changes) for replay: the built-in
    /// traffic (--hours, --story-at-hours, ...) or a scenario file with injected incidents and
    /// their ground truth (--scenario FILE --truth-out TRUTH).
    Simulate {
        /// Events output file.
        #[arg(long, env = "GUARDRAIL_SIM_OUT")]
        out: PathBuf,
        /// Changes output file (the seed story's change and its rollback, if --story; the
        /// scenario's changes, with --scenario).
        #[arg(long, env = "GUARDRAIL_SIM_CHANGES_OUT")]
        changes_out: Option<PathBuf>,
        /// Scenario file (TOML, see scenarios/): traffic, incidents and seed come from it.
        #[arg(
            long,
            env = "GUARDRAIL_SIM_SCENARIO",
            conflicts_with_all = ["hours", "peak_sessions_per_min", "seed", "story_at_hours", "start"]
        )]
        scenario: Option<PathBuf>,
        /// Ground-truth output file (JSON) of the scenario's incidents; needs --scenario.
        #[arg(long, env = "GUARDRAIL_SIM_TRUTH_OUT", requires = "scenario")]
        truth_out: Option<PathBuf>,
        /// Simulated hours.
        #[arg(long, default_value_t = 24.0, env = "GUARDRAIL_SIM_HOURS")]
        hours: f64,
        /// Sessions per minute at the daily peak.
        #[arg(
            long,
            default_value_t = 1500.0,
            env = "GUARDRAIL_SIM_PEAK_SESSIONS_PER_MIN"
        )]
        peak_sessions_per_min: f64,
        #[arg(long, default_value_t = 42, env = "GUARDRAIL_SIM_SEED")]
        seed: u64,
        /// Inject the seed story: a change at this many hours in that hurts FR and BE for 1 hour.
        #[arg(long, env = "GUARDRAIL_SIM_STORY_AT_HOURS")]
        story_at_hours: Option<f64>,
        /// Start of simulated time (RFC 3339); default: so that it ends an hour ago.
        #[arg(long, env = "GUARDRAIL_SIM_START")]
        start: Option<String>,
    },
    /// Produce simulated live traffic to a Kafka cluster: a backfill of recent history, then
    /// real time, until interrupted (the traffic source of the docker-compose stack).
    Traffic {
        /// Kafka bootstrap servers.
        #[arg(long, env = "GUARDRAIL_TRAFFIC_BROKERS")]
        brokers: String,
        /// Events topic.
        #[arg(
            long,
            default_value = "guardrail.events",
            env = "GUARDRAIL_TRAFFIC_TOPIC"
        )]
        topic: String,
        /// Hours of history produced first, as fast as possible.
        #[arg(long, default_value_t = 14.0, env = "GUARDRAIL_TRAFFIC_BACKFILL_HOURS")]
        backfill_hours: f64,
        /// Sessions per minute at the daily peak.
        #[arg(
            long,
            default_value_t = 600.0,
            env = "GUARDRAIL_TRAFFIC_PEAK_SESSIONS_PER_MIN"
        )]
        peak_sessions_per_min: f64,
        #[arg(long, default_value_t = 42, env = "GUARDRAIL_TRAFFIC_SEED")]
        seed: u64,
    },
    /// Benchmarks: `bench detect` scores detection quality against a scenario's ground truth.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// The whole story of one change: every audit record about it and the incidents blamed on
    /// it (detection, decision, veto or approval, escalation, rollback, confirmation), in order.
    /// Reads the audit topic of the configured cluster, or an audit.jsonl written by `replay`.
    Audit {
        /// The change id.
        #[arg(long, env = "GUARDRAIL_AUDIT_CHANGE")]
        change: String,
        /// Config naming the cluster and the audit topic.
        #[arg(long, short, env = "GUARDRAIL_CONFIG", conflicts_with = "file")]
        config: Option<PathBuf>,
        /// Kafka bootstrap servers (overrides the config's).
        #[arg(long, env = "GUARDRAIL_AUDIT_BROKERS")]
        brokers: Option<String>,
        /// Audit topic (overrides the config's).
        #[arg(long, env = "GUARDRAIL_AUDIT_TOPIC")]
        topic: Option<String>,
        /// Read this audit.jsonl (from `replay --out`) instead of Kafka.
        #[arg(long, env = "GUARDRAIL_AUDIT_FILE")]
        file: Option<PathBuf>,
        /// Print the records as JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Generate a scenario (or take --events, --changes, --truth), replay it in process, and
    /// score the alerts against the truth: recall, precision, false alarms per series-week,
    /// misreads, delays beside a CUSUM oracle and the theoretical limit, and a static-threshold
    /// rule on the same data. Prints markdown tables; writes score.json and incident.svg.
    Detect {
        /// Scenario file (TOML).
        #[arg(long, env = "GUARDRAIL_BENCH_SCENARIO", required_unless_present_all = ["events", "truth"])]
        scenario: Option<PathBuf>,
        /// TOML configuration file of the engine under test.
        #[arg(
            long,
            short,
            default_value = "config/guardrail.toml",
            env = "GUARDRAIL_CONFIG"
        )]
        config: PathBuf,
        /// Output directory (score.json, incident.svg, truth.json, changes.jsonl, replay/).
        #[arg(long, default_value = "target/bench", env = "GUARDRAIL_BENCH_OUT")]
        out: PathBuf,
        /// Events (JSON lines) instead of generating them; needs --truth.
        #[arg(long, requires = "truth", conflicts_with = "scenario")]
        events: Option<PathBuf>,
        /// Changes (JSON lines) for --events.
        #[arg(long, requires = "events")]
        changes: Option<PathBuf>,
        /// Ground truth (JSON, as `simulate --truth-out` writes it) for --events.
        #[arg(long, requires = "events")]
        truth: Option<PathBuf>,
        /// Windows after an incident's end during which an alert still matches it.
        #[arg(long, default_value_t = 6.0)]
        slack_windows: f64,
        /// Truth incident id to plot (default: the first detected conversion step in a segment,
        /// one caused by a change if there is one).
        #[arg(long)]
        plot: Option<String>,
        /// Keep the generated events.jsonl in the output directory.
        #[arg(long)]
        keep_events: bool,
        /// Print score.json instead of the markdown tables.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Audit {
            change,
            config,
            brokers,
            topic,
            file,
            json,
        } => {
            init_logging(cli.log_format, "warn");
            let records = match file {
                Some(f) => guardrail::audit::from_file(&f, &change)?,
                None => {
                    let mut kafka = match &config {
                        Some(c) => Config::from_file(c)?.kafka,
                        None => guardrail::config::KafkaConfig::default(),
                    };
                    if let Some(b) = brokers {
                        kafka.bootstrap_servers = b;
                    } else if config.is_none() {
                        anyhow::bail!(
                            "give --config FILE or --brokers HOST:PORT (or --file audit.jsonl)"
                        );
                    }
                    if let Some(t) = topic {
                        kafka.topics.audit = t;
                    }
                    guardrail::audit::from_kafka(
                        &kafka,
                        &change,
                        std::time::Duration::from_secs(30),
                    )?
                }
            };
            if records.is_empty() {
                eprintln!("no audit record mentions change {change}");
                return Ok(ExitCode::from(1));
            }
            if json {
                for r in &records {
                    println!("{r}");
                }
            } else {
                print!("{}", guardrail::audit::render(&change, &records));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckConfig { file } => match Config::from_file(&file) {
            Ok(c) => {
                println!(
                    "{}: OK ({} metrics: {})",
                    file.display(),
                    c.metrics.len(),
                    c.metrics()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(1))
            }
        },
        Cmd::Run { config } => {
            init_logging(cli.log_format, "info");
            let cfg = Config::from_file(&config)?;
            let rt = runtime()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&cfg.http.listen)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen on {} ([http].listen): is another process using the port?",
                            cfg.http.listen
                        )
                    })?;
                let state = guardrail::service::new_state();
                let report = guardrail::service::run(cfg, listener, state, async {
                    shutdown_signal().await;
                })
                .await?;
                tracing::info!(?report, "stopped");
                Ok(ExitCode::SUCCESS)
            })
        }
        Cmd::Replay {
            config,
            events,
            changes,
            out,
            quiet,
        } => {
            init_logging(cli.log_format, "warn");
            let cfg = Config::from_file(&config)?;
            let signer = guardrail::service::signer(&cfg).or_else(|e| {
                // Replays are offline: without a configured secret, sign with a clearly named
                // local key so the files stay verifiable, and say so.
                eprintln!("note: {e}; signing replay output with key id \"replay-local\" and secret \"replay-local\"");
                Ok::<_, anyhow::Error>(guardrail::sink::Signer::new("replay-local", b"replay-local"))
            })?;
            let progress = guardrail::replay::Progress::for_stderr(quiet);
            let opts = guardrail::replay::ReplayOptions {
                events,
                changes,
                out: out.clone(),
                progress_every: 0,
            };
            let s = guardrail::replay::replay_with_progress(&cfg, &signer, &opts, progress)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            if !quiet {
                eprintln!("wrote {}", out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo {
            follow,
            listen,
            seed,
        } => {
            init_logging(cli.log_format, "warn");
            let opts = guardrail::demo::DemoOptions {
                follow,
                http_listen: listen.unwrap_or_else(|| {
                    if follow {
                        "127.0.0.1:9464"
                    } else {
                        "127.0.0.1:0"
                    }
                    .to_string()
                }),
                seed,
                ..Default::default()
            };
            let rt = runtime()?;
            let outcome = rt.block_on(async move {
                let mut stdout = std::io::stdout();
                guardrail::demo::run(opts, &mut stdout).await
            })?;
            Ok(if outcome.story_holds() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Bench {
            what:
                BenchCmd::Detect {
                    scenario,
                    config,
                    out,
                    events,
                    changes,
                    truth,
                    slack_windows,
                    plot,
                    keep_events,
                    json,
                },
        } => {
            init_logging(cli.log_format, "warn");
            let opts = guardrail::score::BenchOptions {
                scenario,
                config,
                out: out.clone(),
                events,
                changes,
                truth,
                slack_windows,
                plot,
                keep_events,
            };
            let report = guardrail::score::run(&opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.markdown());
            }
            eprintln!(
                "wrote {}/score.json{} (generate {:.1} s, replay {:.1} s, score {:.1} s)",
                out.display(),
                if report.plot.is_some() {
                    format!(" and {}/incident.svg", out.display())
                } else {
                    String::new()
                },
                report.generate_secs,
                report.replay_secs,
                report.score_secs
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Traffic {
            brokers,
            topic,
            backfill_hours,
            peak_sessions_per_min,
            seed,
        } => {
            init_logging(cli.log_format, "warn");
            traffic(brokers, topic, backfill_hours, peak_sessions_per_min, seed)
        }
        Cmd::Simulate {
            out,
            changes_out,
            scenario,
            truth_out,
            hours,
            peak_sessions_per_min,
            seed,
            story_at_hours,
            start,
        } => {
            use std::io::Write;
            if let Some(path) = scenario {
                let sc = guardrail::scenario::Scenario::from_file(&path)?;
                let w = guardrail::scenario::write_all(
                    &sc,
                    &out,
                    changes_out.as_deref(),
                    truth_out.as_deref(),
                )?;
                eprintln!(
                    "scenario {}: wrote {} events ({} sessions, {} late, {} beyond the lateness) to {}, {} changes, {} truth incidents ({} required)",
                    sc.name,
                    w.stats.events,
                    w.stats.sessions,
                    w.stats.delayed,
                    w.stats.too_late,
                    out.display(),
                    w.changes,
                    w.truth.incidents.len(),
                    w.truth.incidents.iter().filter(|i| i.required).count()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let start_ms = match start {
                Some(s) => guardrail::event::parse_time_str(&s)
                    .with_context(|| format!("--start {s:?} is not an RFC 3339 time"))?,
                None => {
                    let end = guardrail::event::now_ms() - 3_600_000;
                    (end - (hours * 3.6e6) as i64).div_euclid(300_000) * 300_000
                }
            };
            let mut sc = guardrail::sim::Scenario {
                seed,
                peak_sessions_per_min,
                ..Default::default()
            };
            let mut changes = Vec::new();
            if let Some(h) = story_at_hours {
                let t = start_ms + (h * 3.6e6) as i64;
                let mut eff = guardrail::sim::story_effect("chg-0042", t);
                eff.end_ms = Some(t + 3_600_000);
                sc.effects.push(eff);
                changes.push(guardrail::sim::story_change("chg-0042", t));
                changes.push(guardrail::sim::rolled_back_change(
                    "chg-0042",
                    t + 3_600_000,
                    "deploy-automation",
                ));
            }
            let mut sim = guardrail::sim::Sim::new(sc, start_ms);
            let f = std::fs::File::create(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let mut w = std::io::BufWriter::new(f);
            let mut n = 0u64;
            let mut err = None;
            sim.advance(start_ms + (hours * 3.6e6) as i64, &mut |_, v| {
                n += 1;
                if let Err(e) = w.write_all(v).and_then(|_| w.write_all(b"\n")) {
                    err.get_or_insert(e);
                }
            });
            if let Some(e) = err {
                return Err(e).with_context(|| format!("writing {}", out.display()));
            }
            w.flush()?;
            if let Some(p) = changes_out {
                std::fs::write(
                    &p,
                    changes.iter().map(|c| format!("{c}\n")).collect::<String>(),
                )
                .with_context(|| format!("writing {}", p.display()))?;
            }
            eprintln!("wrote {n} events to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn traffic(
    brokers: String,
    topic: String,
    backfill_hours: f64,
    peak: f64,
    seed: u64,
) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let n = rt.block_on(guardrail::sim::run_live(
        &brokers,
        &topic,
        guardrail::sim::Scenario {
            seed,
            peak_sessions_per_min: peak,
            ..Default::default()
        },
        backfill_hours,
        shutdown_signal(),
    ))?;
    eprintln!("produced {n} events to {topic}");
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested");
}
