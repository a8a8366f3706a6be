//! The incident pages as served and as a browser sees them: the real service on the embedded
//! broker plays the story; the incident list (grouped by cause) and `/incidents/{id}` (the
//! onset's 95% set, in words and as a band on the chart, and the incident's group) are checked
//! over HTTP against the incidents' JSON, then headless Chromium renders the page (DOM dump and
//! screenshots kept in `target/test-artifacts/`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{play_story, start, Harness};
use guardrail::event::fmt_time;
use serde_json::Value;

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

/// `s` escaped as the pages escape text.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `s` percent-encoded as the pages encode ids in links.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The number in attribute `name` of `tag`.
fn num(tag: &str, name: &str) -> f64 {
    attr(tag, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} of {tag}"))
}

/// An incident's group: its `group_id`, or none (then it is a group of its own).
fn group_key(v: &Value) -> String {
    match v["group_id"].as_str().filter(|g| !g.is_empty()) {
        Some(g) => format!("g:{g}"),
        None => format!("i:{}", v["id"].as_str().unwrap()),
    }
}

/// The incidents by group, each group's leader first: the most specific series (most dims),
/// then the highest score, then the earliest detection, then the smaller id.
fn groups_of(incidents: &[Value]) -> Vec<Vec<&Value>> {
    let mut groups: Vec<(String, Vec<&Value>)> = Vec::new();
    for v in incidents {
        let k = group_key(v);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, m)) => m.push(v),
            None => groups.push((k, vec![v])),
        }
    }
    let rank = |v: &Value| {
        (
            v["series"].as_object().map_or(0, |m| m.len()),
            v["score"].as_f64().unwrap_or(f64::NEG_INFINITY),
            -v["detected_ms"].as_i64().unwrap(),
        )
    };
    groups
        .into_iter()
        .map(|(_, mut m)| {
            let lead = (0..m.len())
                .max_by(|i, j| {
                    let (a, b) = (rank(m[*i]), rank(m[*j]));
                    a.0.cmp(&b.0)
                        .then(a.1.total_cmp(&b.1))
                        .then(a.2.cmp(&b.2))
                        .then(m[*j]["id"].as_str().cmp(&m[*i]["id"].as_str()))
                })
                .unwrap();
            let l = m.remove(lead);
            m.insert(0, l);
            m
        })
        .collect()
}

/// One consistent view of the service's incidents: the list as JSON, the list page, one
/// group's page, and the page of the incident `pick` chooses, fetched between two reads of
/// the JSON that agree (so that no batch changed the incidents in between). The story is over
/// when this is called, so the first or second attempt agrees; waits on that, not on time.
struct Views {
    incidents: Vec<Value>,
    list: String,
    /// The largest group's id, its list page and its JSON (`/api/incidents?group=`).
    group: String,
    group_page: String,
    group_json: Vec<Value>,
    id: String,
    page: String,
}

async fn views(h: &Harness, pick: impl Fn(&[Value]) -> String) -> Views {
    let summary = |v: &[Value]| {
        v.iter()
            .map(|i| format!("{} {} {}", i["id"], i["status"], i["group_id"]))
            .collect::<Vec<_>>()
    };
    let fetch_list = || async {
        let (code, body) = h.get("/incidents?format=json").await;
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["incidents"].as_array().expect("incidents array").clone()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let incidents = fetch_list().await;
        assert!(!incidents.is_empty(), "the story produced incidents");
        let groups = groups_of(&incidents);
        let group = groups
            .iter()
            .max_by_key(|g| g.len())
            .and_then(|g| g[0]["group_id"].as_str())
            .unwrap_or("")
            .to_string();
        let id = pick(&incidents);
        let (code, list) = h.get("/incidents").await;
        assert_eq!(code, 200, "{list}");
        let (code, group_page) = h.get(&format!("/incidents?group={}", pct(&group))).await;
        assert_eq!(code, 200, "{group_page}");
        let (code, body) = h
            .get(&format!("/api/incidents?group={}", pct(&group)))
            .await;
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let group_json = v["incidents"].as_array().expect("incidents array").clone();
        let (code, page) = h.get(&format!("/incidents/{}", pct(&id))).await;
        assert_eq!(code, 200, "{page}");
        let again = fetch_list().await;
        if summary(&again) == summary(&incidents) {
            return Views {
                incidents,
                list,
                group,
                group_page,
                group_json,
                id,
                page,
            };
        }
        assert!(
            Instant::now() < deadline,
            "the incidents kept changing after the story ended"
        );
        // Another batch landed in between: read again once it is published.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The onset row and the chart's band on an incident's page, against its JSON.
fn check_onset_set(page: &str, inc: &Value, window_ms: i64) {
    let onset = inc["onset_ms"].as_i64().unwrap();
    let lo = inc["onset_low_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("a drop has an onset set: {inc}"));
    let hi = inc["onset_high_ms"].as_i64().expect("onset_high_ms");
    assert!(
        lo <= onset && onset <= hi,
        "the onset estimate {} lies in its 95% set {} .. {}",
        fmt_time(onset),
        fmt_time(lo),
        fmt_time(hi)
    );
    let end = hi + window_ms;
    let n = (end - lo) / window_ms;
    let (a, b) = (fmt_time(lo), fmt_time(end));
    assert_eq!(
        a[..10],
        fmt_time(onset)[..10],
        "the story's set is on one day"
    );
    assert_eq!(
        b[..10],
        fmt_time(onset)[..10],
        "the story's set is on one day"
    );
    let text = format!(
        "{}, 95% set {} to {} UTC ({n} window{})",
        inc["onset"].as_str().unwrap(),
        &a[11..16],
        &b[11..16],
        if n == 1 { "" } else { "s" }
    );
    eprintln!("onset row: {text}");
    assert!(
        page.contains(&format!("<td class=\"onset\">{text}</td>")),
        "onset row with its 95% set ({text}):\n{page}"
    );
    // The band: over the set's windows, around the onset estimate's line.
    let band = tags_with_class(page, "rect", "onset-set");
    assert_eq!(band.len(), 1, "one onset band");
    let (bx, bw) = (num(band[0], "x"), num(band[0], "width"));
    let line = tags_with_class(page, "line", "onset");
    assert_eq!(line.len(), 1, "one onset estimate line");
    let ox = num(line[0], "x1");
    assert!(
        bx - 0.2 <= ox && ox <= bx + bw + 0.2,
        "onset line at x={ox} inside its band {bx}..{}",
        bx + bw
    );
    // One window's width on the chart: the spacing of the observed points (window middles).
    let observed = tags_with_class(page, "polyline", "observed");
    let xs: Vec<f64> = attr(observed[0], "points")
        .unwrap()
        .split_whitespace()
        .map(|p| p.split(',').next().unwrap().parse().unwrap())
        .collect();
    let dx = xs
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min);
    assert!(
        (bw - n as f64 * dx).abs() < 0.5,
        "band {bw:.1} px wide for {n} windows of {dx:.1} px"
    );
    assert!(page.contains("onset 95% set"), "legend names the band");
}

/// The list page: one row per group, led by its most specific incident, with a line under it
/// giving the group, its member count and every other member linked.
fn check_list(list: &str, incidents: &[Value]) {
    let groups = groups_of(incidents);
    let rows: Vec<&str> = list.split("<tr class=\"group-row\">").skip(1).collect();
    assert_eq!(rows.len(), groups.len(), "one row per group:\n{list}");
    for g in &groups {
        let lead = g[0]["id"].as_str().unwrap();
        let row = rows
            .iter()
            .find(|r| r.starts_with(&format!("<td><a href=\"/incidents/{}\">", pct(lead))))
            .unwrap_or_else(|| panic!("a row led by {lead}:\n{list}"));
        // The leader's row and the group's line under it.
        let row = &row[..row.find("</table>").unwrap_or(row.len())];
        let cell = tags_with_class(row, "td", "group");
        assert_eq!(cell.len(), 1, "{row}");
        assert_eq!(attr(cell[0], "data-members"), Some(&*g.len().to_string()));
        let gid = g[0]["group_id"].as_str().unwrap_or("");
        assert_eq!(attr(cell[0], "data-group"), Some(&*esc(gid)));
        if !gid.is_empty() {
            assert!(
                row.contains(&format!("href=\"/incidents?group={}\"", pct(gid))),
                "link to the group's list: {row}"
            );
        }
        assert!(row.contains(&format!(
            "{} incident{}",
            g.len(),
            if g.len() == 1 { "" } else { "s" }
        )));
        for m in &g[1..] {
            assert!(
                row.contains(&format!(
                    "href=\"/incidents/{}\">{} ",
                    pct(m["id"].as_str().unwrap()),
                    esc(m["metric"].as_str().unwrap())
                )),
                "member {} listed in its leader's row: {row}",
                m["id"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_page_renders_chart_and_decision_in_chromium() {
    let chromium = find_chromium();
    if chromium.is_none() && std::env::var_os("CI").is_some() {
        panic!("chromium is not on PATH: CI must install it (Debian package `chromium`)");
    }
    let t0 = Instant::now();
    let h = start(|c| c.detection.warmup_windows = 48).await;
    let window_ms = h.cfg.engine.window_secs as i64 * 1000;
    let story = play_story(&h, 5, 2, Some(25)).await;
    eprintln!("story played in {:.1}s", t0.elapsed().as_secs_f64());

    // A conversion_rate incident, preferably the one that asked for the rollback.
    let pick = |incidents: &[Value]| {
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
        inc["id"].as_str().unwrap().to_string()
    };
    let v = views(&h, pick).await;
    for i in &v.incidents {
        eprintln!(
            "  {} {} {{{}}} {} score {} onset {} set {:?}..{:?} group {} top {}",
            i["id"].as_str().unwrap_or("-"),
            i["metric"].as_str().unwrap_or("-"),
            i["label"].as_str().unwrap_or(""),
            i["kind"].as_str().unwrap_or("-"),
            i["score"],
            i["onset"].as_str().unwrap_or("-"),
            i["onset_low_ms"].as_i64().map(fmt_time),
            i["onset_high_ms"].as_i64().map(fmt_time),
            i["group_id"].as_str().unwrap_or("-"),
            i["candidates"][0]["change_id"].as_str().unwrap_or("-"),
        );
    }
    // How the engine found each onset set (the detection records' evidence), for the log.
    let (_, audit) = h.get("/api/changes/chg-0042/audit").await;
    let audit: Value = serde_json::from_str(&audit).unwrap_or_default();
    for r in audit["records"].as_array().into_iter().flatten() {
        if r["kind"] == "detection" || r["action"] == "detection" {
            eprintln!(
                "  detection {}: onset_set {} detected {}",
                r["incident_id"].as_str().unwrap_or("-"),
                r["evidence"]["onset_set"],
                r["evidence"]["detected_at"]
            );
        }
    }
    let (id, page) = (v.id.clone(), v.page.clone());
    let inc = v.incidents.iter().find(|i| i["id"] == *id).unwrap();
    let action = inc["decision"]["action"].as_str().unwrap().to_string();
    let reason = inc["decision"]["reason"].as_str().unwrap().to_string();
    eprintln!(
        "incident {id}: {} {} {action}",
        inc["metric"], inc["series"]
    );

    // Every incident has a group; those blamed on one change share one.
    for i in &v.incidents {
        assert!(
            i["group_id"]
                .as_str()
                .is_some_and(|g| g.starts_with("grp-")),
            "incident {} has a group: {}",
            i["id"],
            i["group_id"]
        );
    }
    let blamed: Vec<&Value> = v
        .incidents
        .iter()
        .filter(|i| i["candidates"][0]["change_id"] == "chg-0042")
        .collect();
    assert!(
        blamed.len() >= 2,
        "the story blames chg-0042 more than once"
    );
    for i in &blamed {
        assert_eq!(
            i["group_id"], blamed[0]["group_id"],
            "incidents blamed on chg-0042 share a group"
        );
    }

    // The list: one row per group with its count; one group's own list.
    check_list(&v.list, &v.incidents);
    let groups = groups_of(&v.incidents);
    let big = groups.iter().max_by_key(|g| g.len()).unwrap();
    assert!(
        big.len() >= 2,
        "the story's change makes a group of several"
    );
    assert_eq!(big[0]["group_id"], *v.group);
    assert_eq!(
        v.group_page.matches("<tr class=\"incident\">").count(),
        big.len(),
        "the group's list has every member:\n{}",
        v.group_page
    );
    for m in big {
        assert!(v.group_page.contains(&format!(
            "href=\"/incidents/{}\"",
            pct(m["id"].as_str().unwrap())
        )));
    }
    let mut want: Vec<&str> = big.iter().map(|m| m["id"].as_str().unwrap()).collect();
    let mut got: Vec<&str> = v
        .group_json
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    want.sort();
    got.sort();
    assert_eq!(
        got, want,
        "/api/incidents?group= lists the group's incidents"
    );
    assert!(v
        .list
        .contains(&format!("href=\"/incidents/{}\"", pct(&id))));

    // The page: the onset's 95% set in words and on the chart, and its group.
    check_onset_set(&page, inc, window_ms);
    let mine = groups
        .iter()
        .find(|g| g.iter().any(|m| m["id"] == *id))
        .unwrap();
    let gid = inc["group_id"].as_str().unwrap();
    let summary = tags_with_class(&page, "p", "group-summary");
    assert_eq!(summary.len(), 1, "the group under the title");
    assert_eq!(
        attr(summary[0], "data-members"),
        Some(&*mine.len().to_string())
    );
    assert!(page.contains(&format!(
        "Group <a href=\"/incidents?group={}\"><code>{}</code></a> with {} incident",
        pct(gid),
        esc(gid),
        mine.len()
    )));
    assert_eq!(
        page.matches("<tr class=\"member\">").count(),
        mine.len() - 1,
        "the other members of the group"
    );
    for m in mine.iter().filter(|m| m["id"] != *id) {
        assert!(page.contains(&format!(
            "<tr class=\"member\"><td><a href=\"/incidents/{}\">",
            pct(m["id"].as_str().unwrap())
        )));
    }

    // The page as served: self-contained.
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
    // Issue 19: and a browser would run none, nor sniff a JSON answer into HTML.
    for path in [
        format!("/incidents/{}", pct(&id)),
        "/incidents?format=json".into(),
    ] {
        let (code, headers, _) =
            common::http_with(&format!("{}{path}", h.http), "GET", &[], None).await;
        assert_eq!(code, 200);
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        let csp = &headers["content-security-policy"];
        assert!(
            csp.contains("default-src 'none'") && !csp.contains("script-src"),
            "{path}: {csp}"
        );
    }

    let Some(chromium) = chromium else {
        eprintln!("SKIP incident_page's browser half: chromium is not on PATH");
        h.stop().await;
        return;
    };
    let url = format!("{}/incidents/{}", h.http, pct(&id));
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
    // The onset's 95% set as the browser has it: the band and its legend.
    let set = tags_with_class(&dom, "rect", "onset-set");
    assert_eq!(set.len(), 1, "onset band in the DOM");
    assert!(num(set[0], "width") >= 2.0, "the onset band is visible");
    assert!(
        !tags_with_class(&dom, "span", "legend-onset-set").is_empty()
            && dom.contains("onset 95% set"),
        "legend names the onset band"
    );
    assert!(dom.contains("95% set "), "onset row with its set");
    assert_eq!(
        tags_with_class(&dom, "p", "group-summary").len(),
        1,
        "group line"
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
        dom.contains(&esc(&reason).replace("&quot;", "\"")),
        "decision reason on the page"
    );
    assert!(dom.contains("href=\"/incidents\""), "link back to the list");
    for bad in ["src=\"http", "href=\"http"] {
        assert!(!dom.contains(bad), "the rendered page references {bad}");
    }

    // Screenshots of the page and the list, kept for people to look at.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, url) in [
        ("incident-page.png", url),
        ("incident-list.png", format!("{}/incidents", h.http)),
    ] {
        let png = dir.join(name);
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
    }

    h.stop().await;
    eprintln!("total {:.1}s", t0.elapsed().as_secs_f64());
}
