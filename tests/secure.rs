//! TLS and SASL/SCRAM as a user runs them: `guardrail run` as a child process against Tansu
//! with SCRAM-SHA-512 authentication (a user made by `tansu user create`), reached over TLS
//! (a certificate signed by a CA made here with the openssl CLI). The password comes from an
//! environment variable named in `[kafka.options]` (`"sasl.password" = "${VAR}"`).
//!
//! - right CA and right password: guardrail starts, is ready and processes what is produced;
//! - wrong password: it exits non-zero at startup with a message about authentication;
//! - a CA that did not sign the broker's certificate: it exits non-zero with a message about
//!   the untrusted certificate;
//! - the password's environment variable unset: it exits non-zero naming the variable.
//!
//! Tansu 0.6 accepts `--cert/--key` but serves plain TCP (its TLS acceptor is never used), so
//! TLS is terminated by a proxy in front of it (tests/common/tansu.rs, `TlsProxy`) and Tansu
//! advertises the proxy's address; SASL is Tansu's own. Skipped with a printed reason when
//! tansu or openssl is missing, unless `CI` is set (then it fails).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::tansu::{self, Pki, Process, Producer, Storage, Tansu, TlsProxy};
use common::SECRET;
use guardrail::config::Config;

const USER: &str = "guardrail-svc";
const PASSWORD_ENV: &str = "GUARDRAIL_TEST_KAFKA_PASSWORD";

fn secure_config(base: &Config, ca: &std::path::Path) -> Config {
    let mut cfg = base.clone();
    let o = &mut cfg.kafka.options;
    o.insert("security.protocol".into(), "SASL_SSL".into());
    o.insert("sasl.mechanism".into(), "SCRAM-SHA-512".into());
    o.insert("sasl.username".into(), USER.into());
    o.insert("sasl.password".into(), format!("${{{PASSWORD_ENV}}}"));
    o.insert("ssl.ca.location".into(), ca.display().to_string());
    cfg
}

/// Runs `guardrail run` with `password` in the environment (or none) and expects a startup
/// failure: exit code 2 within 30 s. Returns what it printed.
fn startup_failure(cfg: Config, password: Option<&str>) -> String {
    let mut env = vec![("GUARDRAIL_SIGNING_SECRET", SECRET)];
    if let Some(pw) = password {
        env.push((PASSWORD_ENV, pw));
    }
    let t = Instant::now();
    let mut p = Process::start(cfg, &env);
    let status = p.wait_exit(Duration::from_secs(30));
    let out = p.output();
    let status = status.unwrap_or_else(|| panic!("still running after 30 s:\n{out}"));
    assert_eq!(status.code(), Some(2), "{out}");
    eprintln!(
        "failed in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        out.lines().last().unwrap_or("")
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_scram_login_succeed_and_failures_are_explained() {
    let Some(openssl) = tansu::program("openssl", "apt-get install -y openssl") else {
        return;
    };
    let Some(mut broker) = Tansu::start(Storage::Sqlite) else {
        return;
    };
    let pki = Pki::generate(&openssl, broker.dir(), "good");
    let rogue = Pki::generate(&openssl, broker.dir(), "rogue");
    // Topics and the user first: tansu's CLI does not log in, so this is done before
    // authentication is switched on (sqlite storage keeps both across the restart).
    let topics = broker.guardrail_topics(2);
    let password = format!("pw-{:016x}", rand::random::<u64>());
    broker.create_user(USER, &password, "scram512");
    let upstream: SocketAddr = broker.bootstrap().parse().unwrap();
    let proxy = TlsProxy::start(&pki.cert, &pki.key, upstream);
    let tls_addr = format!("127.0.0.1:{}", proxy.port);
    broker.set_advertised(&tls_addr);
    broker.restart_authenticated(vec![
        ("bootstrap.servers".into(), tls_addr.clone()),
        ("security.protocol".into(), "SASL_SSL".into()),
        ("sasl.mechanism".into(), "SCRAM-SHA-512".into()),
        ("sasl.username".into(), USER.into()),
        ("sasl.password".into(), password.clone()),
        ("ssl.ca.location".into(), pki.ca.display().to_string()),
    ]);
    let base = tansu::config(&tls_addr, &topics);

    // Wrong password.
    let out = startup_failure(secure_config(&base, &pki.ca), Some("not-the-password"));
    assert!(
        out.contains("refused authentication (SASL SCRAM-SHA-512, user \"guardrail-svc\")")
            && out.contains("sasl.password"),
        "{out}"
    );

    // A CA that did not sign the broker's certificate.
    let out = startup_failure(secure_config(&base, &rogue.ca), Some(&password));
    assert!(
        out.contains("TLS handshake with Kafka at")
            && out.contains("the broker's certificate is not trusted")
            && out.contains("ssl.ca.location"),
        "{out}"
    );

    // The password's variable is not set.
    let out = startup_failure(secure_config(&base, &pki.ca), None);
    assert!(
        out.contains(&format!(
            "\"sasl.password\" names the environment variable {PASSWORD_ENV}, which is not set"
        )),
        "{out}"
    );

    // Right CA, right password: ready, and processing.
    let cfg = secure_config(&base, &pki.ca);
    let mut g = Process::start(
        cfg,
        &[
            ("GUARDRAIL_SIGNING_SECRET", SECRET),
            (PASSWORD_ENV, password.as_str()),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = g.exited() {
            panic!("guardrail exited ({s:?}):\n{}", g.output());
        }
        if g.metric("guardrail_ready").await == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready over TLS + SCRAM within 30 s:\n{}",
            g.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(g.get("/readyz").await.0, 200);
    let mut p = Producer::new(broker.client_config());
    let now = guardrail::event::now_ms();
    for i in 0..500 {
        let v = format!(
            r#"{{"type":"session","ts":{now},"id":"s-{i}","user":"u{i}","dims":{{"country":"FR","device":"mobile"}}}}"#
        );
        p.send(&topics.events, format!("u{i}").as_bytes(), v.as_bytes())
            .await;
    }
    p.delivered().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while g.metric("guardrail_events_accepted_total").await != Some(500.0) {
        assert!(
            Instant::now() < deadline,
            "500 events over TLS + SCRAM not processed: {:?}\n{}",
            g.metric("guardrail_events_accepted_total").await,
            g.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = g.terminate().expect("stops on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", g.output());
    drop(proxy);
}
