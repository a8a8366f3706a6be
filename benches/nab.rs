//! guardrail on the Numenta Anomaly Benchmark: every labelled file under the NAB folder through
//! the engine with one global config, scored with NAB's standard profile.
//!
//! ```text
//! cargo bench --bench nab                         # config/nab.toml, table per family
//! cargo bench --bench nab -- --files              # ... and per file
//! cargo bench --bench nab -- --sweep              # the global configs compared in docs/nab.md
//! cargo bench --bench nab -- --set detection.min_effect_sd=1.0 --set engine.window_secs=3600
//! cargo bench --bench nab -- --config other.toml --data ../shared/data/nab
//! ```

use std::path::PathBuf;
use std::time::Instant;

use guardrail::nab::{self, NabFile, Profile, Report, PUBLISHED};

/// Global configs tried (overrides of config/nab.toml, a `gauge` metric); see docs/nab.md.
const SWEEP: &[(&str, &[(&str, &str)])] = &[
    (
        "G1: 5-min windows (warm-up 1 day, half-life 3 days)",
        &[
            ("engine.window_secs", "300"),
            ("guards.sprawl.window_secs", "300"),
            ("detection.warmup_windows", "288"),
            ("detection.baseline_half_life_windows", "864"),
        ],
    ),
    (
        "G2: 1 h windows (warm-up 1 day, half-life 3 days)",
        &[
            ("engine.window_secs", "3600"),
            ("guards.sprawl.window_secs", "3600"),
            ("detection.warmup_windows", "24"),
            ("detection.baseline_half_life_windows", "72"),
        ],
    ),
    ("G3: shipped config/nab.toml (2 h windows)", &[]),
    (
        "G4: 3 h windows (warm-up 1 day, half-life 3 days)",
        &[
            ("engine.window_secs", "10800"),
            ("guards.sprawl.window_secs", "10800"),
            ("detection.warmup_windows", "8"),
            ("detection.baseline_half_life_windows", "24"),
        ],
    ),
    (
        "G5: G3 without seasonality",
        &[("detection.seasonality", "\"none\"")],
    ),
    (
        "G6: G3 with min_effect_sd 0.5",
        &[("detection.min_effect_sd", "0.5")],
    ),
    (
        "G7: G3 at 1 false alarm per series-week",
        &[("detection.false_alarms_per_series_week", "1.0")],
    ),
    (
        "G8: G3 with incidents up to a week (before)",
        &[("detection.incident_max_secs", "604800")],
    ),
];

struct Args {
    config: PathBuf,
    data: PathBuf,
    sweep: bool,
    files: bool,
    sets: Vec<(String, String)>,
    trace: Option<String>,
}

fn args() -> Args {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut a = Args {
        config: root.join("config/nab.toml"),
        data: nab::default_dir(),
        sweep: false,
        files: false,
        sets: Vec::new(),
        trace: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--config" => a.config = it.next().expect("--config PATH").into(),
            "--data" => a.data = it.next().expect("--data DIR").into(),
            "--sweep" => a.sweep = true,
            "--files" => a.files = true,
            "--trace" => a.trace = Some(it.next().expect("--trace FILE-SUBSTRING")),
            "--set" => {
                let kv = it.next().expect("--set key=value");
                let (k, v) = kv.split_once('=').expect("--set key=value");
                a.sets.push((k.to_string(), v.to_string()));
            }
            // `cargo bench` passes --bench to harness = false targets.
            _ => {}
        }
    }
    a
}

fn run(files: &[NabFile], label: &str, template: &str, show_files: bool) -> Report {
    let start = Instant::now();
    let report = nab::run_corpus(files, template, Profile::STANDARD).unwrap_or_else(|e| {
        eprintln!("{label}: {e}");
        std::process::exit(2)
    });
    let secs = start.elapsed().as_secs_f64();
    let rows: usize = files.iter().map(|f| f.timestamps.len()).sum();
    let rejected: u64 = report.runs.iter().map(|r| r.detections.rejected).sum();
    println!("### {label}\n");
    print!("{}", report.markdown());
    let t = report.total();
    let low_fp = report.rescore(files, Profile::LOW_FP).normalised();
    let low_fn = report.rescore(files, Profile::LOW_FN).normalised();
    println!(
        "\nstandard {:.1}, reward_low_FP {:.1}, reward_low_FN {:.1}; {} detections; {} rows in \
         {:.2} s ({:.0} rows/s), {} rejected\n",
        t.normalised().unwrap_or(f64::NAN),
        low_fp.unwrap_or(f64::NAN),
        low_fn.unwrap_or(f64::NAN),
        report
            .runs
            .iter()
            .map(|r| r.detections.at_ms.len())
            .sum::<usize>(),
        rows,
        secs,
        rows as f64 / secs,
        rejected,
    );
    if show_files {
        print!("{}", report.markdown_files());
        println!();
    }
    report
}

/// Every alert on one file, beside its windows and probation end.
fn trace(f: &NabFile, template: &str) {
    let cfg = nab::config_for(template, &f.stem).expect("config");
    let (d, alerts) = nab::detect_with_alerts(f, &cfg).expect("engine");
    let fmt = guardrail::event::fmt_time;
    let p = Profile::STANDARD.probation_rows(f.timestamps.len());
    println!(
        "## {} ({} rows, probation ends {})",
        f.key,
        f.timestamps.len(),
        fmt(f.timestamps[p.min(f.timestamps.len() - 1)])
    );
    for (a, b) in &f.windows {
        println!("window {} .. {}", fmt(*a), fmt(*b));
    }
    for a in alerts {
        println!(
            "{:8} {:12} onset {} detected {} resolved {:?} obs {:.4} exp {:.4} [{:.4}, {:.4}] \
             effect {} score {} {}",
            a.status,
            a.kind,
            a.onset,
            a.detected_at,
            a.resolved_at,
            a.observed,
            a.expected,
            a.expected_low,
            a.expected_high,
            a.effect,
            a.score,
            a.resolution.unwrap_or_default()
        );
    }
    let s = nab::score_file(&f.timestamps, &f.windows, &d.at_ms, Profile::STANDARD);
    println!("{s:?}\n");
}

fn main() {
    let a = args();
    let template = std::fs::read_to_string(&a.config).unwrap_or_else(|e| {
        eprintln!("cannot read {}: {e}", a.config.display());
        std::process::exit(2)
    });
    let start = Instant::now();
    let files = nab::load_corpus(&a.data).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let windows: usize = files.iter().map(|f| f.windows.len()).sum();
    println!(
        "NAB: {} files, {} windows, from {} (loaded in {:.2} s); standard profile \
         (A_TP 1, A_FP 0.11, A_FN 1, probation 15% <= 750 rows)\n",
        files.len(),
        windows,
        a.data.display(),
        start.elapsed().as_secs_f64()
    );
    let configs: Vec<(String, Vec<(String, String)>)> = if a.sweep {
        SWEEP
            .iter()
            .map(|(l, s)| {
                let mut s: Vec<(String, String)> = s
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                s.extend(a.sets.iter().cloned());
                (l.to_string(), s)
            })
            .collect()
    } else {
        let label = if a.sets.is_empty() {
            a.config.display().to_string()
        } else {
            let s: Vec<String> = a.sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{} with {}", a.config.display(), s.join(", "))
        };
        vec![(label, a.sets.clone())]
    };
    if let Some(pat) = &a.trace {
        let sets: Vec<(&str, &str)> = a
            .sets
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let t = nab::with_overrides(&template, &sets).expect("overrides apply");
        for f in files.iter().filter(|f| f.key.contains(pat.as_str())) {
            trace(f, &t);
        }
        return;
    }
    let mut summary = Vec::new();
    for (label, sets) in &configs {
        let refs: Vec<(&str, &str)> = sets.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let t = if refs.is_empty() {
            template.clone()
        } else {
            nab::with_overrides(&template, &refs).unwrap_or_else(|e| {
                eprintln!("{label}: {e}");
                std::process::exit(2)
            })
        };
        let r = run(&files, label, &t, a.files);
        summary.push((label.clone(), r.total()));
    }
    if summary.len() > 1 {
        println!("### summary\n\n| config | score | TP | FP | FN |\n|---|---:|---:|---:|---:|");
        for (l, t) in &summary {
            println!(
                "| {l} | {:.1} | {} | {} | {} |",
                t.normalised().unwrap_or(f64::NAN),
                t.tp,
                t.fp,
                t.r#fn
            );
        }
        println!();
    }
    println!(
        "Published NAB v1.1 scores, standard profile, whole corpus (58 files; this subset has"
    );
    println!(
        "{} files, so the figures are indicative, not a ranking):\n",
        files.len()
    );
    println!("| detector | score |\n|---|---:|");
    for (d, s) in PUBLISHED {
        println!("| {d} | {s:.1} |");
    }
    // The config as given (in a sweep, the entry without overrides of its own).
    let given = if a.sweep {
        SWEEP.iter().position(|(_, s)| s.is_empty()).unwrap_or(0)
    } else {
        0
    };
    if let Some((label, t)) = summary.get(given) {
        println!(
            "| guardrail ({label}) | {:.1} |",
            t.normalised().unwrap_or(f64::NAN)
        );
    }
    println!("\nelapsed {:.1} s", start.elapsed().as_secs_f64());
}
