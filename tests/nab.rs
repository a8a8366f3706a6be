//! NAB harness: the scorer on a hand-made NAB folder end to end (files, labels, detections,
//! score), the engine on a hand-made step, and a short deterministic run on real NAB files.

use std::path::{Path, PathBuf};

use guardrail::nab::{self, CorpusScore, NabFile, Profile};

const STEP_MS: i64 = 300_000;

fn template() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/nab.toml"))
        .expect("config/nab.toml")
}

/// `2014-04-01 00:00:00` plus `i` rows of 5 minutes, in NAB's format.
fn stamp(i: i64) -> String {
    let t = nab::parse_nab_time("2014-04-01 00:00:00").unwrap() + i * STEP_MS;
    guardrail::event::fmt_time(t)
        .replace('T', " ")
        .trim_end_matches('Z')
        .trim_end_matches(".000")
        .to_string()
}

/// A NAB folder with one file of 4032 rows (14 days of 5-minute rows): 50 plus uniform noise in
/// [-2, 2] (sd 1.15), stepping up by 10 at row 3000; one window on rows 2800..=3200.
fn hand_made(dir: &Path) -> (String, (i64, i64)) {
    let mut csv = String::from("timestamp,value\n");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in 0..4032 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let noise = (x >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0;
        let v = 50.0 + noise + if i >= 3000 { 10.0 } else { 0.0 };
        csv.push_str(&format!("{},{v:.4}\n", stamp(i)));
    }
    std::fs::create_dir_all(dir.join("data/handMade")).unwrap();
    std::fs::create_dir_all(dir.join("labels")).unwrap();
    std::fs::write(dir.join("data/handMade/step.csv"), csv).unwrap();
    let (l, r) = (stamp(2800), stamp(3200));
    std::fs::write(
        dir.join("labels/combined_windows.json"),
        format!(
            r#"{{"handMade/step.csv": [["{l}.000000", "{r}.000000"]],
                 "handMade/absent.csv": []}}"#
        ),
    )
    .unwrap();
    let t0 = nab::parse_nab_time("2014-04-01 00:00:00").unwrap();
    (
        "handMade/step.csv".into(),
        (t0 + 2800 * STEP_MS, t0 + 3200 * STEP_MS),
    )
}

#[test]
fn scorer_end_to_end_on_a_hand_made_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, window) = hand_made(tmp.path());
    // Files listed in the labels but absent from data/ are skipped.
    let files = nab::load_corpus(tmp.path()).unwrap();
    assert_eq!(files.len(), 1);
    let f = &files[0];
    assert_eq!(
        (f.key.as_str(), f.family.as_str()),
        (key.as_str(), "handMade")
    );
    assert_eq!(f.stem, "step");
    assert_eq!(f.timestamps.len(), 4032);
    assert_eq!(f.windows, vec![window]);
    let t = |i: i64| f.timestamps[i as usize];
    // Probation: min(floor(0.15 * 4032), 750) = 604 rows. Window rows 2800..=3200, width 401.
    //   row 100 (probation): ignored
    //   row 700 (before any window): -0.11
    //   row 2800 (left edge): +1
    //   row 3000 (second in the window): ignored
    //   row 3201 (right after): 0.11 * scaled_sigmoid(1/400) = 0.11 * tanh(-0.00625)
    //     = -0.000687491
    //   row 4000 (800 rows after): 0.11 * scaled_sigmoid(800/400 = 2) = 0.11 * tanh(-5)
    //     = -0.109990
    let dets = [t(100), t(700), t(2800), t(3000), t(3201), t(4000)];
    let s = nab::score_file(&f.timestamps, &f.windows, &dets, Profile::STANDARD);
    let want = -0.11 + 1.0 + 0.11 * (-0.00625f64).tanh() + 0.11 * (-5.0f64).tanh();
    assert!((s.raw - want).abs() < 1e-9, "{s:?} vs {want}");
    assert!((want - 0.779322).abs() < 1e-6, "{want}");
    assert_eq!((s.tp, s.fp, s.r#fn), (1, 3, 0));
    assert_eq!((s.null, s.perfect), (-1.0, 1.0));
    // Normalised: 100 * (0.779322 + 1) / 2 = 88.9661.
    let c: CorpusScore = [s].iter().collect();
    assert!((c.normalised().unwrap() - 88.9661).abs() < 1e-3);
    // Halfway: y = -(3200 - 3000 + 1) / 401 = -0.501247: tanh(1.253117) / tanh(2.5).
    let s = nab::score_file(&f.timestamps, &f.windows, &[t(3000)], Profile::STANDARD);
    let want = (2.5 * 201.0 / 401.0f64).tanh() / 2.5f64.tanh();
    assert!((s.raw - want).abs() < 1e-9, "{s:?} vs {want}");
}

#[test]
fn engine_detects_a_hand_made_step_inside_its_window() {
    let tmp = tempfile::tempdir().unwrap();
    hand_made(tmp.path());
    let files = nab::load_corpus(tmp.path()).unwrap();
    let run = nab::run_file(&files[0], &template(), Profile::STANDARD).unwrap();
    assert_eq!(run.detections.rejected, 0);
    let s = run.score;
    assert_eq!((s.tp, s.r#fn), (1, 0), "{run:?}");
    // The step is at row 3000 (2014-04-11 10:00); 3 h windows close at 12:00 at the earliest,
    // row 3024: y = -(3200 - 3024 + 1) / 401 = -0.44 -> 0.81. At most one false alarm on the
    // stationary part.
    let first = run
        .detections
        .at_ms
        .iter()
        .copied()
        .find(|&d| d >= files[0].windows[0].0)
        .expect("a detection in the window");
    assert!(
        first >= files[0].timestamps[3000],
        "detected before the step"
    );
    assert!(s.fp <= 1 && s.raw > 0.5, "{run:?}");
}

fn nab_dir() -> Option<PathBuf> {
    let d = nab::default_dir();
    if d.join("labels/combined_windows.json").is_file() {
        Some(d)
    } else {
        eprintln!(
            "NAB data not found at {} (set NAB_DIR): skipped",
            d.display()
        );
        None
    }
}

const FILES: [&str; 3] = [
    "artificialWithAnomaly/art_daily_jumpsup.csv",
    "realAWSCloudwatch/ec2_cpu_utilization_53ea38.csv",
    "realAdExchange/exchange-3_cpc_results.csv",
];

#[test]
fn harness_on_nab_files_is_finite_and_deterministic() {
    let Some(dir) = nab_dir() else { return };
    let files: Vec<NabFile> = nab::load_files(&dir, &FILES).unwrap();
    assert!(files.iter().all(|f| f.timestamps.len() > 1000));
    assert!(files.iter().all(|f| !f.windows.is_empty()));
    let t = template();
    let a = nab::run_corpus(&files, &t, Profile::STANDARD).unwrap();
    let b = nab::run_corpus(&files, &t, Profile::STANDARD).unwrap();
    for (x, y) in a.runs.iter().zip(&b.runs) {
        assert_eq!(x.detections, y.detections, "{}", x.key);
        assert_eq!(x.score, y.score, "{}", x.key);
        assert_eq!(x.detections.rejected, 0, "{}", x.key);
        assert!(x.score.raw.is_finite());
    }
    let total = a.total();
    let score = total.normalised().expect("windows to score");
    assert!(score.is_finite() && score <= 100.0, "{total:?}");
    assert_eq!(total.tp + total.r#fn, 1 + 2 + 3, "every window is scored");
    assert_eq!(a.families().len(), 3);
    assert!(a.markdown().contains("| **all** | 3 |"));
    // Re-scoring the same detections under the standard profile gives the same sums.
    assert_eq!(a.rescore(&files, Profile::STANDARD), total);
}

#[test]
fn shipped_config_is_valid_for_every_nab_file() {
    let t = template();
    assert!(t.contains(nab::METRIC_PLACEHOLDER));
    let Some(dir) = nab_dir() else { return };
    let windows = nab::load_windows(&dir).unwrap();
    assert!(windows.len() >= 34);
    for key in windows.keys() {
        let stem = key.rsplit('/').next().unwrap().trim_end_matches(".csv");
        let cfg = nab::config_for(&t, stem).unwrap_or_else(|e| panic!("{key}: {e}"));
        let m = cfg.metrics().next().unwrap();
        assert_eq!(m.name, stem);
        assert_eq!(m.numerator.name.as_deref(), Some(stem));
    }
}

#[test]
fn overrides_change_only_the_named_keys() {
    let t = nab::with_overrides(
        &template(),
        &[
            ("detection.min_effect_sd", "1.5"),
            ("detection.seasonality", "\"hour_of_day\""),
        ],
    )
    .unwrap();
    let cfg = nab::config_for(&t, "x").unwrap();
    let base = nab::config_for(&template(), "x").unwrap();
    assert_eq!(cfg.detection.min_effect_sd, 1.5);
    assert_eq!(
        cfg.detection.seasonality,
        guardrail::config::Seasonality::HourOfDay
    );
    assert_eq!(cfg.engine.window_secs, base.engine.window_secs);
    assert!(nab::with_overrides(&template(), &[("detection.x", "not toml")]).is_err());
}
