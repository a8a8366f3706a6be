//! The incident page as a browser sees it: the real service on the embedded broker plays the
//! story, then headless Chromium renders `/incidents/{id}` (DOM dump and a screenshot kept in
//! `target/test-artifacts/incident-page.png`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{play_story, start};

const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);

/// `chromium` (or `chromium-browser`) on PATH.
fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Runs headless Chromium with `extra` arguments and a fresh profile; kills it after
/// [`CHROMIUM_TIMEOUT`]. Returns its stdout.
fn run_chromium(bin: &Path, extra: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out_path = profile.path().join("stdout.txt");
    let err_path = profile.path().join("stderr.txt");
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,1800",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ))
        .args(extra)
        .stdin(Stdio::null())
        // Files, not pipes: a large DOM cannot fill a pipe nobody reads while we wait.
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("start chromium");
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > CHROMIUM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium {extra:?} did not finish within {CHROMIUM_TIMEOUT:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.success(),
        "chromium {extra:?}: {status}; stderr:\n{stderr}"
    );
    eprintln!(
        "chromium {:?} took {:.1}s",
        extra.first(),
        started.elapsed().as_secs_f64()
    );
    std::fs::read_to_string(&out_path).unwrap()
}

/// The opening tags in `html` of element `tag` that carry class `class`.
fn tags_with_class<'a>(html: &'a str, tag: &str, class: &str) -> Vec<&'a str> {
    let open = format!("<{tag}");
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i..];
        let end = after.find('>').map(|e| e + 1).unwrap_or(after.len());
        let t = &after[..end];
        let next = t.as_bytes().get(open.len()).copied();
        if matches!(next, Some(b' ') | Some(b'>') | Some(b'/'))
            && t.split("class=\"").skip(1).any(|c| {
                c.split('"')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .any(|w| w == class)
            })
        {
            out.push(t);
        }
        rest = &after[end.min(after.len())..];
    }
    out
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let i = tag.find(&key)? + key.len();
    tag[i..].split('"').next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_page_renders_chart_and_decision_in_chromium() {
    let Some(chromium) = find_chromium() else {
        if std::env::var_os("CI").is_some() {
            panic!("chromium is not on PATH: CI must install it (Debian package `chromium`)");
        }
        eprintln!("SKIP incident_page: chromium is not on PATH");
        return;
    };
    let t0 = Instant::now();
    let h = start(|c| c.detection.warmup_windows = 48).await;
    let story = play_story(&h, 5, 2, Some(25)).await;
    eprintln!("story played in {:.1}s", t0.elapsed().as_secs_f64());

    let (code, body) = h.get("/api/incidents").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let incidents = v["incidents"].as_array().expect("incidents array");
    assert!(!incidents.is_empty(), "the story produced incidents");
    // A conversion_rate incident, preferably the one that asked for the rollback.
    let conv: Vec<_> = incidents
        .iter()
        .filter(|i| i["metric"] == "conversion_rate")
        .collect();
    let inc = conv
        .iter()
        .find(|i| i["decision"]["action"] == "rollback_requested")
        .or(conv.first())
        .copied()
        .unwrap_or(&incidents[0]);
    let id = inc["id"].as_str().unwrap().to_string();
    let action = inc["decision"]["action"].as_str().unwrap().to_string();
    let reason = inc["decision"]["reason"].as_str().unwrap().to_string();
    eprintln!(
        "incident {id}: {} {} {action}",
        inc["metric"], inc["series"]
    );

    // The page as served: self-contained.
    let (code, page) = h.get(&format!("/incidents/{id}")).await;
    assert_eq!(code, 200, "{page}");
    for bad in [
        "src=\"http",
        "src='http",
        "href=\"http",
        "href='http",
        "@import",
        "url(",
    ] {
        assert!(
            !page.contains(bad),
            "the page references an external resource ({bad})"
        );
    }
    assert!(!page.contains("<script"), "the page needs no script");
    let (code, list) = h.get("/incidents").await;
    assert_eq!(code, 200);
    assert!(list.contains(&format!("href=\"/incidents/{id}\"")));

    let url = format!("{}/incidents/{id}", h.http);
    let bin = chromium.clone();
    let dump_url = url.clone();
    let dom = tokio::task::spawn_blocking(move || {
        run_chromium(&bin, &["--dump-dom".to_string(), dump_url])
    })
    .await
    .unwrap();

    assert!(dom.contains("id=\"chart\""), "chart in the DOM:\n{dom}");
    let observed = tags_with_class(&dom, "polyline", "observed");
    assert_eq!(observed.len(), 1, "one observed polyline");
    let points = attr(observed[0], "points")
        .unwrap_or("")
        .split_whitespace()
        .count();
    assert!(points >= 20, "observed polyline has {points} points");
    let band = tags_with_class(&dom, "polygon", "band");
    assert!(!band.is_empty(), "expected band polygon");
    assert!(
        attr(band[0], "points")
            .unwrap_or("")
            .split_whitespace()
            .count()
            >= 4,
        "band polygon has an area"
    );
    assert!(
        !tags_with_class(&dom, "polyline", "expected").is_empty(),
        "expected line"
    );
    let markers = tags_with_class(&dom, "g", "change-marker");
    assert!(!markers.is_empty(), "change markers");
    assert!(dom.contains("chg-0042 applied"), "chg-0042 applied marker");
    if story.rolled_back_ms.is_some() {
        assert!(dom.contains("chg-0042 rolled back"), "rollback marker");
    }
    assert!(
        !tags_with_class(&dom, "line", "onset").is_empty(),
        "onset line"
    );
    assert!(
        !tags_with_class(&dom, "line", "detected").is_empty(),
        "detection line"
    );
    assert!(
        dom.contains(&action),
        "decision action {action} on the page"
    );
    assert!(
        dom.contains(
            &reason
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        ),
        "decision reason on the page"
    );
    assert!(dom.contains("href=\"/incidents\""), "link back to the list");
    for bad in ["src=\"http", "href=\"http"] {
        assert!(!dom.contains(bad), "the rendered page references {bad}");
    }

    // A screenshot, kept for people to look at.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("incident-page.png");
    let _ = std::fs::remove_file(&png);
    let shot = format!("--screenshot={}", png.display());
    let bin = chromium.clone();
    tokio::task::spawn_blocking(move || run_chromium(&bin, &[shot, url]))
        .await
        .unwrap();
    let size = std::fs::metadata(&png)
        .unwrap_or_else(|e| panic!("screenshot {}: {e}", png.display()))
        .len();
    assert!(size > 10_000, "screenshot is {size} bytes");
    let head = std::fs::read(&png).unwrap();
    assert!(head.starts_with(b"\x89PNG"), "screenshot is a PNG");
    eprintln!("screenshot {} ({size} bytes)", png.display());

    h.stop().await;
    eprintln!("total {:.1}s", t0.elapsed().as_secs_f64());
}
