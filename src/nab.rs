//! The Numenta Anomaly Benchmark (NAB v1.1): its scorer, and a harness that runs the engine over
//! NAB files in event time.
//!
//! **Scorer.** [`score_file`] follows NAB's `sweeper.py` (the v1.1 scorer behind the published
//! scoreboard) for a detector that emits binary detections:
//!
//! - rows before the probation period (`min(floor(15% of rows), 750)`) are not scored at all:
//!   detections there are ignored, and a window is scored only if it has a row after it;
//! - a window's score is that of its best (= earliest) detection,
//!   `A_TP * scaled_sigmoid(-(right - i + 1) / width) / scaled_sigmoid(-1)`, with
//!   `scaled_sigmoid(y) = 2 / (1 + e^(5y)) - 1`: worth exactly `A_TP` at the left edge and about
//!   `A_TP * 2.5 / width` at the right edge; a window without detection costs `-A_FN`;
//! - a detection outside every window costs `A_FP * scaled_sigmoid(y)`, `y = (i - right) /
//!   (width - 1)` of the closest preceding window (≈ 0 just past its right edge, -A_FP from
//!   3 widths on), and the full `-A_FP` when no window precedes it;
//! - the null detector (no detection) scores `-A_FN` per scored window and the perfect one
//!   `A_TP` per window; a corpus sums raw, null and perfect over files, then normalises:
//!   `100 * (raw - null) / (perfect - null)`.
//!
//! **Harness.** Each CSV row becomes a contract `measurement` event
//! `{"type":"measurement","ts":<ms>,"name":"<file stem>","value":<v>}` fed to an
//! [`Engine`] whose config is a template (`config/nab.toml`) with `{metric}` replaced by the file
//! stem: one config for every file, no per-file tuning. The `detected_at` of every firing alert
//! (first alert per incident) is a detection, mapped to the first row at or after it.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};
use crate::engine::{Engine, EngineError};
use crate::sink::{Alert, Output};

/// The placeholder in a harness config template replaced by each file's stem.
pub const METRIC_PLACEHOLDER: &str = "{metric}";

/// Published NAB v1.1 scores (whole corpus of 58 files, standard profile), for comparison.
pub const PUBLISHED: [(&str, f64); 7] = [
    ("ARTime", 74.9),
    ("Numenta HTM", 70.5),
    ("CAD OSE", 69.9),
    ("Skyline", 58.2),
    ("Random Cut Forest", 51.7),
    ("Twitter ADVec", 47.1),
    ("Windowed Gaussian", 39.6),
];

/// A NAB application profile: the weights of the cost matrix and the probation fraction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    pub a_tp: f64,
    pub a_fp: f64,
    pub a_fn: f64,
    /// Fraction of each file (capped at `probation_percent * 5000` rows) that is not scored.
    pub probation_percent: f64,
}

impl Profile {
    /// NAB's `standard` profile (the one of the published scoreboard).
    pub const STANDARD: Profile = Profile {
        a_tp: 1.0,
        a_fp: 0.11,
        a_fn: 1.0,
        probation_percent: 0.15,
    };
    /// NAB's `reward_low_FP_rate` profile.
    pub const LOW_FP: Profile = Profile {
        a_tp: 1.0,
        a_fp: 0.22,
        a_fn: 1.0,
        probation_percent: 0.15,
    };
    /// NAB's `reward_low_FN_rate` profile. Its false positives cost what the standard
    /// profile's do (`fpWeight` 0.11 in NAB's `config/profiles.json`; NAB's own results files
    /// charge 0.11 in their `S(t)_reward_low_FN_rate` column), not half of it.
    pub const LOW_FN: Profile = Profile {
        a_tp: 1.0,
        a_fp: 0.11,
        a_fn: 2.0,
        probation_percent: 0.15,
    };

    /// Rows at the start of a file of `rows` rows that are not scored: NAB's
    /// `min(floor(p * rows), p * 5000)` (750 rows for the standard 15%).
    pub fn probation_rows(&self, rows: usize) -> usize {
        let p = self.probation_percent;
        // Rows with index >= this (a float in NAB) are scored: hence the ceiling.
        ((p * rows as f64).floor()).min(p * 5000.0).max(0.0).ceil() as usize
    }
}

/// NAB's scaled sigmoid: `2 / (1 + e^(5y)) - 1`, and -1 from `y >= 3` (far past a window).
/// `y = -1` (a window's left edge) gives 0.98661, `y = 0` (its right edge) 0.
pub fn scaled_sigmoid(y: f64) -> f64 {
    if y >= 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * y).exp()) - 1.0
    }
}

/// The score of one file.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FileScore {
    /// The detector's score: window scores plus false-positive costs.
    pub raw: f64,
    /// What no detection at all would score: `-A_FN` per scored window.
    pub null: f64,
    /// What a detection at every window's left edge would score: `A_TP` per window.
    pub perfect: f64,
    /// Windows detected.
    pub tp: usize,
    /// Detections (rows) outside every window, after probation.
    pub fp: usize,
    /// Scored windows without a detection.
    pub r#fn: usize,
}

/// Scores detections on one file. `timestamps_ms` are the file's rows (sorted), `windows` the
/// labelled anomaly windows as inclusive `[start, end]` times, `detections_ms` the detection times:
/// each is mapped to the first row at or after it (detections after the last row are dropped,
/// several detections on one row count once).
pub fn score_file(
    timestamps_ms: &[i64],
    windows: &[(i64, i64)],
    detections_ms: &[i64],
    profile: Profile,
) -> FileScore {
    let n = timestamps_ms.len();
    let probation = profile.probation_rows(n);
    // Windows as inclusive row ranges [left, right]. NAB enters a window on the row stamped with
    // its start and leaves it on the (first) row stamped with its end.
    let mut wins: Vec<(usize, usize)> = windows
        .iter()
        .filter_map(|&(s, e)| {
            let l = timestamps_ms.partition_point(|&t| t < s);
            let r = timestamps_ms.partition_point(|&t| t < e);
            let r = if r < n && timestamps_ms[r] == e {
                r
            } else {
                r.checked_sub(1)?
            };
            (l < n && l <= r).then_some((l, r))
        })
        .collect();
    wins.sort_unstable();
    let mut rows: Vec<usize> = detections_ms
        .iter()
        .map(|&d| timestamps_ms.partition_point(|&t| t < d))
        .filter(|&i| i < n)
        .collect();
    rows.sort_unstable();
    rows.dedup();

    let max_tp = scaled_sigmoid(-1.0);
    // Per window: None when it lies entirely in probation (not scored), else its score so far.
    let mut parts: Vec<Option<f64>> = wins
        .iter()
        .map(|&(_, r)| (r >= probation).then_some(-profile.a_fn))
        .collect();
    let mut detected = vec![false; wins.len()];
    let mut fp_score = 0.0;
    let mut fp = 0;
    for &i in rows.iter().filter(|&&i| i >= probation) {
        // Windows are sorted and disjoint: the last one starting at or before i.
        let k = wins.partition_point(|&(l, _)| l <= i);
        match k.checked_sub(1).map(|k| (k, wins[k])) {
            Some((k, (l, r))) if i <= r => {
                let width = (r - l + 1) as f64;
                let y = -((r - i + 1) as f64) / width;
                let s = profile.a_tp * scaled_sigmoid(y) / max_tp;
                if let Some(p) = parts[k].as_mut() {
                    *p = p.max(s);
                }
                detected[k] = true;
            }
            prev => {
                let y = match prev {
                    // Right after a window the cost is small, growing to -A_FP.
                    Some((_, (l, r))) if r > l => (i - r) as f64 / (r - l) as f64,
                    // Before any window (or after a one-row window): full cost.
                    _ => 3.0,
                };
                fp_score += profile.a_fp * scaled_sigmoid(y);
                fp += 1;
            }
        }
    }
    let scored = parts.iter().filter(|p| p.is_some()).count();
    let tp = parts
        .iter()
        .zip(&detected)
        .filter(|(p, d)| p.is_some() && **d)
        .count();
    FileScore {
        raw: parts.iter().flatten().sum::<f64>() + fp_score,
        null: -profile.a_fn * scored as f64,
        perfect: profile.a_tp * wins.len() as f64,
        tp,
        fp,
        r#fn: scored - tp,
    }
}

/// Sums of file scores over a family or the whole corpus.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CorpusScore {
    pub files: usize,
    pub raw: f64,
    pub null: f64,
    pub perfect: f64,
    pub tp: usize,
    pub fp: usize,
    pub r#fn: usize,
}

impl CorpusScore {
    pub fn add(&mut self, s: &FileScore) {
        self.files += 1;
        self.raw += s.raw;
        self.null += s.null;
        self.perfect += s.perfect;
        self.tp += s.tp;
        self.fp += s.fp;
        self.r#fn += s.r#fn;
    }

    /// `100 * (raw - null) / (perfect - null)`: 0 for no detection, 100 for perfect. None when
    /// there is no window to score (perfect == null).
    pub fn normalised(&self) -> Option<f64> {
        let span = self.perfect - self.null;
        (span.abs() > 1e-12).then(|| 100.0 * (self.raw - self.null) / span)
    }
}

impl<'a> FromIterator<&'a FileScore> for CorpusScore {
    fn from_iter<I: IntoIterator<Item = &'a FileScore>>(iter: I) -> Self {
        let mut c = CorpusScore::default();
        for s in iter {
            c.add(s);
        }
        c
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NabError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
    #[error("config for {metric}: {source}")]
    Config { metric: String, source: ConfigError },
    #[error("engine for {metric}: {source}")]
    Engine { metric: String, source: EngineError },
}

/// One NAB data file with its windows.
#[derive(Debug, Clone)]
pub struct NabFile {
    /// `family/file.csv`, as in NAB's label files.
    pub key: String,
    pub family: String,
    /// The file name without `.csv`: the metric name and the events' `name`.
    pub stem: String,
    pub timestamps: Vec<i64>,
    pub values: Vec<f64>,
    pub windows: Vec<(i64, i64)>,
}

/// Parses NAB's `YYYY-MM-DD HH:MM:SS[.ffffff]` (no zone: UTC) to epoch milliseconds.
pub fn parse_nab_time(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b' ' || b[10] == b'T') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut ms = 0;
    if b.len() > 19 {
        let frac = s.get(20..)?;
        if b[19] != b'.' || frac.is_empty() || !frac.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let digits: String = frac.chars().chain("000".chars()).take(3).collect();
        ms = digits.parse::<i64>().ok()?;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + ms)
}

fn read(path: &Path) -> Result<String, NabError> {
    std::fs::read_to_string(path).map_err(|source| NabError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Reads `labels/combined_windows.json`: file key -> windows as inclusive `[start, end]` ms.
pub fn load_windows(dir: &Path) -> Result<BTreeMap<String, Vec<(i64, i64)>>, NabError> {
    let path = dir.join("labels").join("combined_windows.json");
    let text = read(&path)?;
    let bad = |message: String| NabError::Parse {
        path: path.display().to_string(),
        line: 1,
        message,
    };
    let raw: BTreeMap<String, Vec<(String, String)>> =
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    raw.into_iter()
        .map(|(k, ws)| {
            let ws = ws
                .iter()
                .map(|(a, b)| match (parse_nab_time(a), parse_nab_time(b)) {
                    (Some(a), Some(b)) => Ok((a, b)),
                    _ => Err(bad(format!("{k}: bad window [{a}, {b}]"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((k, ws))
        })
        .collect()
}

/// Reads one `timestamp,value` CSV.
pub fn load_csv(path: &Path) -> Result<(Vec<i64>, Vec<f64>), NabError> {
    let text = read(path)?;
    let mut ts = Vec::new();
    let mut vs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.starts_with("timestamp")) {
            continue;
        }
        let bad = |message: &str| NabError::Parse {
            path: path.display().to_string(),
            line: i + 1,
            message: format!("{message}: {line:?}"),
        };
        let (t, v) = line
            .split_once(',')
            .ok_or_else(|| bad("expected timestamp,value"))?;
        let t = parse_nab_time(t).ok_or_else(|| bad("bad timestamp"))?;
        let v: f64 = v
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| bad("bad value"))?;
        ts.push(t);
        vs.push(v);
    }
    Ok((ts, vs))
}

/// Loads the files of `keys` (`family/file.csv`) from a NAB folder (`data/`, `labels/`).
pub fn load_files(dir: &Path, keys: &[&str]) -> Result<Vec<NabFile>, NabError> {
    let windows = load_windows(dir)?;
    keys.iter()
        .map(|k| {
            let path = dir.join("data").join(k);
            let (timestamps, values) = load_csv(&path)?;
            let (family, file) = k.split_once('/').unwrap_or(("", k));
            Ok(NabFile {
                key: k.to_string(),
                family: family.to_string(),
                stem: file.trim_end_matches(".csv").to_string(),
                timestamps,
                values,
                windows: windows.get(*k).cloned().unwrap_or_default(),
            })
        })
        .collect()
}

/// Loads every labelled file present under `dir/data`, sorted by key.
pub fn load_corpus(dir: &Path) -> Result<Vec<NabFile>, NabError> {
    let windows = load_windows(dir)?;
    let keys: Vec<&str> = windows
        .keys()
        .filter(|k| dir.join("data").join(k).is_file())
        .map(String::as_str)
        .collect();
    load_files(dir, &keys)
}

/// The default NAB folder: `$NAB_DIR`, else `../shared/data/nab` from the crate root.
pub fn default_dir() -> PathBuf {
    std::env::var_os("NAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/nab"))
}

/// The harness config for one file: the template with `{metric}` replaced by its stem.
pub fn config_for(template: &str, stem: &str) -> Result<Config, NabError> {
    Config::from_str_named(
        &template.replace(METRIC_PLACEHOLDER, stem),
        "config/nab.toml",
    )
    .map_err(|source| NabError::Config {
        metric: stem.to_string(),
        source,
    })
}

/// The template with `key = value` overrides applied (`key` dotted, e.g.
/// `detection.min_effect_sd`; `value` in TOML syntax, e.g. `1.0` or `"none"`), for sweeps over
/// global settings. Comments are not kept.
pub fn with_overrides(template: &str, overrides: &[(&str, &str)]) -> Result<String, String> {
    let mut doc: toml::Table = toml::from_str(template).map_err(|e| e.to_string())?;
    for (key, value) in overrides {
        let v: toml::Table =
            toml::from_str(&format!("v = {value}")).map_err(|e| format!("{key}: {e}"))?;
        let v = v
            .get("v")
            .cloned()
            .ok_or_else(|| format!("{key}: no value"))?;
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().ok_or_else(|| "empty key".to_string())?;
        let mut t = &mut doc;
        for p in parts {
            t = t
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .ok_or_else(|| format!("{key}: {p} is not a table"))?;
        }
        t.insert(last.to_string(), v);
    }
    toml::to_string(&doc).map_err(|e| e.to_string())
}

/// The event time added to each event's own timestamp as the wall clock, so the future-skew
/// check never fires on historical data.
pub const CLOCK_AHEAD_MS: i64 = 1000;

/// What the engine did on one file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Detections {
    /// `detected_at` of each incident's first firing alert, in order.
    pub at_ms: Vec<i64>,
    /// Incident kinds in the same order (`shift`, `data_quality`, ...).
    pub kinds: Vec<String>,
    /// Events the engine dead-lettered (should be 0).
    pub rejected: u64,
}

/// Runs the engine over one file's rows as `measurement` events and collects its detections.
pub fn detect(file: &NabFile, cfg: &Config) -> Result<Detections, NabError> {
    detect_with_alerts(file, cfg).map(|(d, _)| d)
}

/// As [`detect`], also returning every alert the engine emitted (firing, re-sent and resolved),
/// for diagnosis.
pub fn detect_with_alerts(
    file: &NabFile,
    cfg: &Config,
) -> Result<(Detections, Vec<Alert>), NabError> {
    let mut eng = Engine::new(cfg).map_err(|source| NabError::Engine {
        metric: file.stem.clone(),
        source,
    })?;
    let name = serde_json::to_string(&file.stem).expect("a string serialises");
    let mut out = Detections::default();
    let mut alerts = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut collect = |eng: &mut Engine, out: &mut Detections, alerts: &mut Vec<Alert>| {
        for o in eng.take_outputs() {
            let Output::Alert(a) = o else { continue };
            if a.status == "firing" && seen.insert(a.incident_id.clone()) {
                if let Some(t) = crate::event::parse_time_str(&a.detected_at) {
                    out.at_ms.push(t);
                    out.kinds.push(a.kind.to_string());
                }
            }
            alerts.push(*a);
        }
    };
    let mut buf = String::with_capacity(160);
    for (&ts, &v) in file.timestamps.iter().zip(&file.values) {
        buf.clear();
        let _ = write!(
            buf,
            r#"{{"type":"measurement","ts":{ts},"name":{name},"value":{v}}}"#
        );
        if eng
            .process_event(buf.as_bytes(), ts + CLOCK_AHEAD_MS)
            .is_err()
        {
            out.rejected += 1;
        }
        if eng.has_outputs() {
            collect(&mut eng, &mut out, &mut alerts);
        }
    }
    eng.finish();
    collect(&mut eng, &mut out, &mut alerts);
    Ok((out, alerts))
}

/// One file's run: its detections and score.
#[derive(Debug, Clone)]
pub struct FileRun {
    pub key: String,
    pub family: String,
    pub rows: usize,
    pub windows: usize,
    pub detections: Detections,
    pub score: FileScore,
}

/// Runs and scores one file with the config template.
pub fn run_file(file: &NabFile, template: &str, profile: Profile) -> Result<FileRun, NabError> {
    let cfg = config_for(template, &file.stem)?;
    let detections = detect(file, &cfg)?;
    let score = score_file(&file.timestamps, &file.windows, &detections.at_ms, profile);
    Ok(FileRun {
        key: file.key.clone(),
        family: file.family.clone(),
        rows: file.timestamps.len(),
        windows: file.windows.len(),
        detections,
        score,
    })
}

/// A whole run: one [`FileRun`] per file.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub runs: Vec<FileRun>,
}

/// Runs and scores every file with one config template.
pub fn run_corpus(files: &[NabFile], template: &str, profile: Profile) -> Result<Report, NabError> {
    Ok(Report {
        runs: files
            .iter()
            .map(|f| run_file(f, template, profile))
            .collect::<Result<_, _>>()?,
    })
}

impl Report {
    /// Sums per family, by family name.
    pub fn families(&self) -> BTreeMap<String, CorpusScore> {
        let mut m: BTreeMap<String, CorpusScore> = BTreeMap::new();
        for r in &self.runs {
            m.entry(r.family.clone()).or_default().add(&r.score);
        }
        m
    }

    pub fn total(&self) -> CorpusScore {
        self.runs.iter().map(|r| &r.score).collect()
    }

    /// Re-scores the same detections under another profile (`files` as given to the run).
    pub fn rescore(&self, files: &[NabFile], profile: Profile) -> CorpusScore {
        let mut c = CorpusScore::default();
        for (r, f) in self.runs.iter().zip(files) {
            debug_assert_eq!(r.key, f.key);
            c.add(&score_file(
                &f.timestamps,
                &f.windows,
                &r.detections.at_ms,
                profile,
            ));
        }
        c
    }

    /// A markdown table: one row per family and the total.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| family | files | raw | null | perfect | score | TP | FP | FN |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let row = |s: &mut String, name: &str, c: &CorpusScore| {
            let norm = c
                .normalised()
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "n/a".into());
            let _ = writeln!(
                s,
                "| {name} | {} | {:.2} | {:.2} | {:.2} | {norm} | {} | {} | {} |",
                c.files, c.raw, c.null, c.perfect, c.tp, c.fp, c.r#fn
            );
        };
        for (f, c) in self.families() {
            row(&mut s, &f, &c);
        }
        row(&mut s, "**all**", &self.total());
        s
    }

    /// A markdown table per file (detections, windows, score).
    pub fn markdown_files(&self) -> String {
        let mut s = String::from(
            "| file | rows | windows | detections | raw | TP | FP | FN |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.runs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.3} | {} | {} | {} |",
                r.key,
                r.rows,
                r.windows,
                r.detections.at_ms.len(),
                r.score.raw,
                r.score.tp,
                r.score.fp,
                r.score.r#fn
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    //! Hand-computed NAB scores. A file of 1000 rows, 5 minutes apart: probation is
    //! min(floor(0.15 * 1000), 750) = 150 rows. One window on rows 500..=599 (width 100).
    //! Reference values: scaled_sigmoid(y) = tanh(-5y/2), so max_tp = scaled_sigmoid(-1) =
    //! tanh(2.5) = 0.986614298.
    use super::*;

    const STEP: i64 = 300_000;
    const T0: i64 = 1_396_310_400_000; // 2014-04-01 00:00:00 UTC

    fn ts() -> Vec<i64> {
        (0..1000).map(|i| T0 + i * STEP).collect()
    }
    fn row(i: i64) -> i64 {
        T0 + i * STEP
    }
    fn win() -> Vec<(i64, i64)> {
        vec![(row(500), row(599))]
    }
    fn score(dets: &[i64]) -> FileScore {
        score_file(&ts(), &win(), dets, Profile::STANDARD)
    }
    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn sigmoid_reference_points() {
        assert!(close(scaled_sigmoid(-1.0), 0.986614298));
        assert!(close(scaled_sigmoid(-0.5), 0.848283640));
        assert!(close(scaled_sigmoid(0.0), 0.0));
        assert!(close(scaled_sigmoid(1.0), -0.986614298));
        assert_eq!(scaled_sigmoid(3.0), -1.0);
        assert_eq!(Profile::STANDARD.probation_rows(1000), 150);
        assert_eq!(Profile::STANDARD.probation_rows(4032), 604);
        assert_eq!(Profile::STANDARD.probation_rows(10_000), 750);
    }

    #[test]
    fn detection_at_left_edge_scores_a_tp() {
        // y = -(599 - 500 + 1) / 100 = -1: 1.0 * 0.986614 / 0.986614 = 1.
        let s = score(&[row(500)]);
        assert!(close(s.raw, 1.0), "{s:?}");
        assert_eq!(
            (s.null, s.perfect, s.tp, s.fp, s.r#fn),
            (-1.0, 1.0, 1, 0, 0)
        );
    }

    #[test]
    fn detection_between_rows_maps_to_the_next_row() {
        // 1 ms after row 499 maps to row 500: the left edge.
        let s = score(&[row(499) + 1]);
        assert!(close(s.raw, 1.0), "{s:?}");
    }

    #[test]
    fn detection_at_right_edge_scores_little() {
        // y = -(599 - 599 + 1) / 100 = -0.01: tanh(0.025) / 0.986614 = 0.0249948 / 0.986614
        // = 0.0253339.
        let s = score(&[row(599)]);
        assert!(close(s.raw, 0.024994793 / 0.986614298), "{s:?}");
        assert_eq!(s.tp, 1);
    }

    #[test]
    fn only_the_first_detection_in_a_window_counts() {
        // Rows 550 and 580: y = -(599 - 550 + 1) / 100 = -0.5: 0.848283640 / 0.986614298
        // = 0.8597928; the later one adds nothing and is not a false positive.
        let s = score(&[row(580), row(550)]);
        assert!(close(s.raw, 0.848283640 / 0.986614298), "{s:?}");
        assert_eq!((s.tp, s.fp), (1, 0));
    }

    #[test]
    fn false_positive_far_after_a_window_costs_a_fp() {
        // Row 900: y = (900 - 599) / (100 - 1) = 3.04 >= 3: -1 * 0.11. With a TP at the left
        // edge: 1 - 0.11 = 0.89.
        let s = score(&[row(500), row(900)]);
        assert!(close(s.raw, 0.89), "{s:?}");
        assert_eq!((s.tp, s.fp), (1, 1));
        // Row 698: y = 99 / 99 = 1: scaled_sigmoid(1) = -0.986614, * 0.11 = -0.1085276.
        let s = score(&[row(500), row(698)]);
        assert!(close(s.raw, 1.0 - 0.11 * 0.986614298), "{s:?}");
    }

    #[test]
    fn false_positive_right_after_a_window_costs_less() {
        // Row 600: y = 1 / 99 = 0.010101: tanh(-0.0252525) = -0.0252472, * 0.11 = -0.0027772.
        let s = score(&[row(500), row(600)]);
        assert!(close(s.raw, 1.0 - 0.11 * 0.025247151), "{s:?}");
        assert_eq!(s.fp, 1);
    }

    #[test]
    fn false_positive_before_any_window_costs_a_fp() {
        // Row 300 (after probation, before the window): -0.11; the window is missed: -1.
        let s = score(&[row(300)]);
        assert!(close(s.raw, -1.11), "{s:?}");
        assert_eq!((s.tp, s.fp, s.r#fn), (0, 1, 1));
    }

    #[test]
    fn detections_in_probation_are_not_scored() {
        // Rows 0 and 149 are in probation (rows < 150); row 150 is not.
        let s = score(&[row(0), row(149)]);
        assert!(close(s.raw, -1.0), "{s:?}");
        assert_eq!(s.fp, 0);
        let s = score(&[row(150)]);
        assert!(close(s.raw, -1.11), "{s:?}");
    }

    #[test]
    fn missed_window_costs_a_fn() {
        let s = score(&[]);
        assert_eq!((s.raw, s.null, s.perfect), (-1.0, -1.0, 1.0));
        assert_eq!(s.r#fn, 1);
        // Detections after the last row are dropped.
        let s = score(&[row(1000)]);
        assert_eq!(s.raw, -1.0);
    }

    #[test]
    fn window_in_probation_is_not_scored_but_counts_in_perfect() {
        let s = score_file(&ts(), &[(row(10), row(50))], &[], Profile::STANDARD);
        assert_eq!((s.raw, s.null, s.perfect, s.r#fn), (0.0, 0.0, 1.0, 0));
    }

    #[test]
    fn corpus_normalisation() {
        // File A detected at the left edge (raw 1), file B missed (raw -1): raw 0, null -2,
        // perfect 2: 100 * (0 + 2) / (2 + 2) = 50.
        let a = score(&[row(500)]);
        let b = score(&[]);
        let c: CorpusScore = [a, b].iter().collect();
        assert_eq!((c.raw, c.null, c.perfect), (0.0, -2.0, 2.0));
        assert!(close(c.normalised().unwrap(), 50.0));
        // Perfect scores 100, null 0; a file without windows has no normalised score.
        let p: CorpusScore = [a].iter().collect();
        assert!(close(p.normalised().unwrap(), 100.0));
        let z: CorpusScore = [b].iter().collect();
        assert!(close(z.normalised().unwrap(), 0.0));
        let none = score_file(&ts(), &[], &[row(300)], Profile::STANDARD);
        assert!(close(none.raw, -0.11));
        let n: CorpusScore = [none].iter().collect();
        assert!(n.normalised().is_none());
    }

    /// NAB's own scoring of Numenta HTM's detections, from the per-row `S(t)` columns of
    /// `results/numenta/<family>/numenta_<file>.csv` in numenta/NAB (commit `3103b7d`): the
    /// sums of each profile's column over the file, with the rows (file length, window rows,
    /// the one row whose anomaly score passes HTM's thresholds) as in those files.
    #[test]
    fn reproduces_nab_own_scores_of_htm_detections() {
        struct Case {
            rows: i64,
            windows: &'static [(i64, i64)],
            detection: i64,
            /// standard, reward_low_FP_rate, reward_low_FN_rate
            nab: [f64; 3],
        }
        let cases = [
            // realAdExchange/exchange-3_cpc_results.csv: two windows missed, the third found
            // 28 rows in (score 0.608).
            Case {
                rows: 1538,
                windows: &[(271, 321), (413, 463), (952, 1002)],
                detection: 980,
                nab: [-1.17886345046, -1.17886345046, -3.17886345046],
            },
            // realAWSCloudwatch/iio_us-east-1_i-a2eb1cd9_NetworkIn.csv: one false positive
            // before both windows (score 0.653), both windows missed.
            Case {
                rows: 1243,
                windows: &[(218, 280), (308, 370)],
                detection: 204,
                nab: [-2.11, -2.22, -4.11],
            },
        ];
        for c in cases {
            let ts: Vec<i64> = (0..c.rows).map(row).collect();
            let wins: Vec<(i64, i64)> = c.windows.iter().map(|&(l, r)| (row(l), row(r))).collect();
            for (p, want) in [Profile::STANDARD, Profile::LOW_FP, Profile::LOW_FN]
                .into_iter()
                .zip(c.nab)
            {
                let got = score_file(&ts, &wins, &[row(c.detection)], p).raw;
                assert!(
                    (got - want).abs() < 1e-9,
                    "{} rows, profile {p:?}: {got} != NAB's {want}",
                    c.rows
                );
            }
        }
    }

    #[test]
    fn nab_times_parse_as_utc() {
        assert_eq!(parse_nab_time("2014-04-01 00:00:00"), Some(T0));
        assert_eq!(
            parse_nab_time("2014-04-10 07:15:00.000000"),
            Some(T0 + (9 * 24 * 60 + 7 * 60 + 15) * 60_000)
        );
        assert_eq!(
            parse_nab_time("2011-07-01 00:00:01"),
            crate::event::parse_time_str("2011-07-01T00:00:01Z")
        );
        assert_eq!(
            parse_nab_time("2000-02-29 12:00:00.5"),
            crate::event::parse_time_str("2000-02-29T12:00:00.500Z")
        );
        assert_eq!(parse_nab_time("2014-13-01 00:00:00"), None);
        assert_eq!(parse_nab_time("2014-04-01"), None);
    }
}
