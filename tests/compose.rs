//! docker-compose.yml cannot run here (no Docker engine); this validates what can be validated:
//! the YAML parses, every file it mounts exists, images are pinned, and the ports, hostnames
//! and topics agree with guardrail's config, Prometheus' scrape config and Grafana's
//! provisioning.

use std::path::{Path, PathBuf};

use guardrail::config::Config;
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{} does not parse: {e}", p.display()))
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(s) => s
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        Value::String(s) => vec![s.clone()],
        _ => vec![],
    }
}

#[test]
fn compose_stack_is_consistent() {
    let compose = yaml(&root().join("docker-compose.yml"));
    let services = compose["services"].as_mapping().expect("services");
    let names: Vec<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for s in [
        "kafka",
        "kafka-init",
        "guardrail",
        "simulator",
        "prometheus",
        "alertmanager",
        "grafana",
    ] {
        assert!(names.contains(&s), "service {s} missing: {names:?}");
    }
    // Images are pinned; volumes mount files that exist.
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        if let Some(img) = svc["image"].as_str() {
            let tag = img.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                !tag.is_empty() && tag != "latest",
                "{name}: image {img} is not pinned"
            );
        } else {
            assert!(!svc["build"].is_null(), "{name}: neither image nor build");
        }
        for v in strings(&svc["volumes"]) {
            let host = v.split(':').next().unwrap();
            if host.starts_with("./") {
                assert!(root().join(host).exists(), "{name}: mounts missing {host}");
            }
        }
    }
    assert!(root().join("Dockerfile").exists());
    assert!(
        !services[&Value::from("kafka")]["healthcheck"].is_null(),
        "kafka has a healthcheck"
    );

    // guardrail's config inside the stack.
    let g = &services[&Value::from("guardrail")];
    let mount = strings(&g["volumes"])
        .into_iter()
        .find(|v| v.ends_with("/etc/guardrail/guardrail.toml:ro"))
        .expect("guardrail config mounted");
    let cfg_path = root().join(mount.split(':').next().unwrap());
    let cfg = Config::from_file(&cfg_path).unwrap_or_else(|e| panic!("{e}"));
    let cmd = strings(&g["command"]);
    assert_eq!(cmd, ["run", "--config", "/etc/guardrail/guardrail.toml"]);
    let port = cfg.http.listen.rsplit(':').next().unwrap().to_string();
    assert!(
        cfg.http.listen.starts_with("0.0.0.0:"),
        "listens on all interfaces in a container"
    );
    assert!(
        strings(&g["ports"])
            .iter()
            .any(|p| p.ends_with(&format!(":{port}"))),
        "port {port} published"
    );
    assert!(
        !g["environment"]["GUARDRAIL_SIGNING_SECRET"].is_null(),
        "signing secret passed"
    );

    // Kafka: the advertised listener is what guardrail connects to; every topic is created.
    let k = &services[&Value::from("kafka")];
    let advertised = k["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        .as_str()
        .unwrap();
    assert!(
        advertised.contains(&format!("//{}", cfg.kafka.bootstrap_servers)),
        "{advertised}"
    );
    let init = strings(&services[&Value::from("kafka-init")]["command"]).join("\n");
    let t = &cfg.kafka.topics;
    for topic in t.all() {
        assert!(
            init.contains(&format!("create {topic} ")),
            "topic {topic} not created"
        );
    }
    let sim = strings(&services[&Value::from("simulator")]["command"]).join(" ");
    assert!(
        sim.contains(&format!("--brokers {}", cfg.kafka.bootstrap_servers)),
        "{sim}"
    );
    assert!(sim.contains(&format!("--topic {}", t.events)), "{sim}");

    // Prometheus scrapes guardrail where it listens and loads the rules it mounts.
    let prom = yaml(&root().join("config/prometheus.yml"));
    let targets: Vec<String> = prom["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|j| {
            j["static_configs"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|s| strings(&s["targets"]))
        .collect();
    assert!(
        targets.contains(&format!("guardrail:{port}")),
        "{targets:?}"
    );
    let rules = strings(&prom["rule_files"]);
    assert!(
        rules
            .iter()
            .all(|r| r.starts_with("/etc/prometheus/rules/")),
        "{rules:?}"
    );
    assert!(strings(&services[&Value::from("prometheus")]["volumes"])
        .iter()
        .any(|v| v.starts_with("./config/rules:/etc/prometheus/rules")));
    assert!(
        std::fs::read_dir(root().join("config/rules"))
            .unwrap()
            .count()
            > 0,
        "rule files exist"
    );

    // Grafana: the provisioned datasource is the uid every dashboard panel uses.
    let ds = yaml(&root().join("dashboards/provisioning/datasources/prometheus.yml"));
    let d0 = &ds["datasources"][0];
    assert_eq!(d0["url"].as_str(), Some("http://prometheus:9090"));
    let uid = d0["uid"].as_str().unwrap().to_string();
    for e in std::fs::read_dir(root().join("dashboards")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().map(|x| x == "json").unwrap_or(false) {
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            assert!(
                json["uid"].as_str().is_some(),
                "{} has a stable uid",
                p.display()
            );
            let mut uids = Vec::new();
            datasource_uids(&json, &mut uids);
            assert!(
                !uids.is_empty(),
                "{}: panels name their datasource",
                p.display()
            );
            // "-- Grafana --" is Grafana's built-in annotations source.
            assert!(
                uids.iter().all(|u| *u == uid || u == "-- Grafana --"),
                "{}: datasource uids {uids:?}, provisioned {uid}",
                p.display()
            );
        }
    }
}

fn datasource_uids(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(u) = m
                .get("datasource")
                .and_then(|d| d.get("uid"))
                .and_then(|u| u.as_str())
            {
                out.push(u.to_string());
            }
            m.values().for_each(|x| datasource_uids(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| datasource_uids(x, out)),
        _ => {}
    }
}
