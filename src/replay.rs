//! `guardrail replay`: the same engine over files, in event time, as fast as the machine goes.
//!
//! Events are read line by line into one reused buffer; changes are loaded, sorted by time and
//! merged in before the first event at or after their timestamp, so decisions see the registry
//! as it was at that moment in event time. Outputs go to JSON-lines files in the output dir.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::config::Config;
use crate::engine::{Engine, EngineError};
use crate::event::{decode_change, fmt_time, now_ms, Change, ErrorCode};
use crate::sink::{dead_letter, FileSink, Signer, SinkError};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: Parquet input is not supported by this build yet; convert to JSON lines (one event per line)")]
    Parquet { path: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub events: PathBuf,
    pub changes: Option<PathBuf>,
    pub out: PathBuf,
    /// Print progress to stderr every this many events (0 = quiet).
    pub progress_every: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplaySummary {
    pub events_read: u64,
    pub events_accepted: u64,
    pub events_rejected: serde_json::Map<String, serde_json::Value>,
    pub events_unselected: u64,
    pub changes_read: u64,
    pub changes_rejected: u64,
    pub series: usize,
    pub windows_closed: u64,
    pub incidents: usize,
    pub alerts_firing: u64,
    pub alerts_resolved: u64,
    pub rollbacks_requested: u64,
    pub rollbacks_confirmed: u64,
    pub event_time_start: Option<String>,
    pub event_time_end: Option<String>,
    pub elapsed_secs: f64,
    pub events_per_sec: f64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReplayError + '_ {
    move |source| ReplayError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn check_format(path: &Path) -> Result<(), ReplayError> {
    if path
        .extension()
        .map(|e| e.eq_ignore_ascii_case("parquet"))
        .unwrap_or(false)
    {
        return Err(ReplayError::Parquet {
            path: path.display().to_string(),
        });
    }
    Ok(())
}

/// Reads a changes file (JSON lines); bad lines go to the sink as dead letters.
fn load_changes(
    path: &Path,
    max_bytes: usize,
    sink: &mut FileSink,
) -> Result<(Vec<Change>, u64), ReplayError> {
    check_format(path)?;
    let f = File::open(path).map_err(io_err(path))?;
    let mut r = BufReader::new(f);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut rejected = 0;
    let mut line = 0u64;
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf).map_err(io_err(path))? == 0 {
            break;
        }
        line += 1;
        let b = trim(&buf);
        if b.is_empty() {
            continue;
        }
        match decode_change(b, max_bytes) {
            Ok(c) => out.push(c),
            Err(e) => {
                rejected += 1;
                sink.write(&dead_letter(
                    b,
                    e.code,
                    &e.message,
                    &format!("{}:{line}", path.display()),
                ))?;
            }
        }
    }
    Ok((out, rejected))
}

fn trim(b: &[u8]) -> &[u8] {
    let mut e = b.len();
    while e > 0 && (b[e - 1] == b'\n' || b[e - 1] == b'\r') {
        e -= 1;
    }
    &b[..e]
}

pub fn replay(
    cfg: &Config,
    signer: &Signer,
    opts: &ReplayOptions,
) -> Result<ReplaySummary, ReplayError> {
    check_format(&opts.events)?;
    let mut engine = Engine::new(cfg)?;
    let mut sink = FileSink::create(&opts.out)?;
    let (changes, changes_rejected) = match &opts.changes {
        Some(p) => load_changes(p, cfg.engine.max_event_bytes, &mut sink)?,
        None => (Vec::new(), 0),
    };
    let changes_read = changes.len() as u64 + changes_rejected;
    engine.schedule_changes(changes);
    let f = File::open(&opts.events).map_err(io_err(&opts.events))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut buf = Vec::with_capacity(4096);
    let t0 = Instant::now();
    let mut line = 0u64;
    let mut now = now_ms();
    let mut first_ts: Option<i64> = None;
    loop {
        buf.clear();
        let n = r
            .read_until(b'\n', &mut buf)
            .map_err(io_err(&opts.events))?;
        if n == 0 {
            break;
        }
        line += 1;
        if line % 4096 == 0 {
            now = now_ms();
        }
        let b = trim(&buf);
        if b.is_empty() {
            continue;
        }
        if let Err(e) = engine.process_event(b, now) {
            let src = format!("{}:{line}", opts.events.display());
            sink.write(&dead_letter(b, e.code, &e.message, &src))?;
        }
        if first_ts.is_none() {
            first_ts = engine.max_event_time_ms();
        }
        if engine.has_outputs() {
            for o in engine.take_outputs() {
                sink.write(&o.encode(signer))?;
            }
        }
        if opts.progress_every > 0 && line % opts.progress_every == 0 {
            let secs = t0.elapsed().as_secs_f64();
            eprintln!(
                "replay: {line} events, {:.0} events/s, event time {}",
                line as f64 / secs.max(1e-9),
                engine.max_event_time_ms().map(fmt_time).unwrap_or_default()
            );
        }
    }
    engine.finish();
    for o in engine.take_outputs() {
        sink.write(&o.encode(signer))?;
    }
    sink.flush()?;
    let elapsed = t0.elapsed().as_secs_f64();
    let s = &engine.stats;
    let mut rejected = serde_json::Map::new();
    for c in ErrorCode::ALL {
        let n = s.rejected[c.index()];
        if n > 0 {
            rejected.insert(c.as_str().into(), n.into());
        }
    }
    let summary = ReplaySummary {
        events_read: s.events,
        events_accepted: s.accepted,
        events_rejected: rejected,
        events_unselected: s.unselected,
        changes_read,
        changes_rejected,
        series: engine.series_count(),
        windows_closed: s.windows_closed,
        incidents: engine.incidents.len(),
        alerts_firing: s.alerts_firing,
        alerts_resolved: s.alerts_resolved,
        rollbacks_requested: s.rollbacks_requested,
        rollbacks_confirmed: s.rollbacks_confirmed,
        event_time_start: first_ts.map(fmt_time),
        event_time_end: engine.max_event_time_ms().map(fmt_time),
        elapsed_secs: elapsed,
        events_per_sec: s.events as f64 / elapsed.max(1e-9),
    };
    let p = opts.out.join("summary.json");
    std::fs::write(
        &p,
        serde_json::to_vec_pretty(&summary).expect("summary serialises"),
    )
    .map_err(io_err(&p))?;
    Ok(summary)
}
