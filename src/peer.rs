//! The other instances' HTTP APIs (`[scale] peers`), asked for what this instance does not hold.
//!
//! With several instances each one holds only the incidents of the series it owns, but alert
//! links (`{public_url}/incidents/{id}`) and people's approvals reach whichever instance the
//! load balancer picks. So a lookup that misses here is asked of the peers: an incident by id
//! (its JSON and its page) and a control call go to the peer that has it, and lists
//! (incidents, a change's audit trail) are gathered from all. A forwarded request carries
//! [`FORWARDED`] and is answered from the peer's own state only, so requests never loop.
//!
//! Peers are reached over plain HTTP/1.1 (inside the cluster; put TLS in front of
//! `public_url`), with the caller's `Authorization` header passed on: every instance runs the
//! same actors, so the peer checks the same token again.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use prometheus::IntCounterVec;

/// Marks a request one instance sends another; its value is the sender's instance name.
pub const FORWARDED: &str = "x-guardrail-forwarded";
/// On an answer relayed from a peer: which peer gave it.
pub const SERVED_BY: &str = "x-guardrail-served-by";
/// Largest answer read from a peer (an incident page with its history is ~100 KB; a list of
/// every incident can be a few MB).
pub const MAX_ANSWER_BYTES: usize = 32 << 20;

/// Every value of `guardrail_peer_requests_total`'s `result` label.
pub const RESULTS: [&str; 7] = [
    "ok",
    "not_found",
    "refused",
    "error",
    "unreachable",
    "timeout",
    "http_error",
];

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("HTTP: {0}")]
    Http(String),
}

impl PeerError {
    /// The bounded label of `guardrail_peer_requests_total`.
    pub fn code(&self) -> &'static str {
        match self {
            PeerError::Connect(_) => "unreachable",
            PeerError::Timeout(_) => "timeout",
            PeerError::Http(_) => "http_error",
        }
    }
}

/// A peer's base URL, split for the client: `http://host:port[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUrl {
    /// As configured, without a trailing slash (for messages and [`SERVED_BY`]).
    pub url: String,
    /// `host:port`, what the TCP connection and the `Host` header use.
    authority: String,
    /// Path prefix before `/api/...` (empty, or `/something` behind a path-routing proxy).
    prefix: String,
}

impl PeerUrl {
    /// Parses `http://host[:port][/prefix]`; the message says what is wrong.
    pub fn parse(s: &str) -> Result<PeerUrl, String> {
        let trimmed = s.trim();
        let Some(rest) = trimmed.strip_prefix("http://") else {
            return Err(if trimmed.starts_with("https://") {
                format!("{s:?}: peers are reached over plain HTTP inside the cluster (https is not supported); use http://host:port")
            } else {
                format!("{s:?} is not an http://host:port URL")
            });
        };
        let rest = rest.trim_end_matches('/');
        let (auth, prefix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if prefix.contains(['?', '#']) {
            return Err(format!("{s:?}: a peer URL takes no query or fragment"));
        }
        if auth.is_empty() || auth.contains('@') || auth.contains(char::is_whitespace) {
            return Err(format!("{s:?}: expected http://host:port"));
        }
        let authority = match auth.rsplit_once(':') {
            // An IPv6 literal without a port ("[::1]") has its colons inside the brackets.
            Some((host, port)) if !port.contains(']') => {
                if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(format!("{s:?}: invalid host or port"));
                }
                auth.to_string()
            }
            _ => format!("{auth}:80"),
        };
        Ok(PeerUrl {
            url: format!("http://{rest}"),
            authority,
            prefix: prefix.to_string(),
        })
    }
}

/// One answer from a peer, relayed as it came.
#[derive(Debug, Clone)]
pub struct Answer {
    pub peer: String,
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

/// What asking the peers for one thing found.
#[derive(Debug)]
pub enum Found {
    /// A peer answered with something other than 404: it holds the thing (or refused the
    /// caller, which is the answer too).
    Answer(Answer),
    /// Every peer answered 404.
    Nowhere,
    /// Nobody had it, and these peers could not be asked: (url, error).
    Unknown(Vec<(String, String)>),
}

/// The configured peers and how to reach them.
#[derive(Debug, Clone)]
pub struct Peers {
    peers: Vec<PeerUrl>,
    timeout: Duration,
    /// This instance's name, sent in [`FORWARDED`].
    instance: HeaderValue,
    /// `guardrail_peer_requests_total`, by [`RESULTS`].
    requests: IntCounterVec,
}

impl Peers {
    /// `urls` were checked by the config's validation; a bad one is an error here too.
    pub fn new(
        urls: &[String],
        timeout_ms: u64,
        instance: &str,
        requests: IntCounterVec,
    ) -> Result<Peers, String> {
        Ok(Peers {
            requests,
            peers: urls
                .iter()
                .map(|u| PeerUrl::parse(u))
                .collect::<Result<_, _>>()?,
            timeout: Duration::from_millis(timeout_ms),
            instance: HeaderValue::from_str(instance)
                .unwrap_or_else(|_| HeaderValue::from_static("guardrail")),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether `headers` come from a peer (the request must then not be forwarded again).
    pub fn is_forwarded(headers: &HeaderMap) -> bool {
        headers.contains_key(FORWARDED)
    }

    /// One request to one peer, with the caller's `Authorization` passed on.
    pub async fn call(
        &self,
        peer: &PeerUrl,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
        body: Bytes,
    ) -> Result<Answer, PeerError> {
        let ms = self.timeout.as_millis() as u64;
        let r = tokio::time::timeout(self.timeout, self.exchange(peer, method, path, auth, body))
            .await
            .unwrap_or(Err(PeerError::Timeout(ms)));
        let result = match &r {
            Ok(a) if a.status.is_success() => "ok",
            Ok(a) if a.status == StatusCode::NOT_FOUND => "not_found",
            Ok(a) if a.status.is_client_error() => "refused",
            Ok(_) => "error",
            Err(e) => e.code(),
        };
        self.requests.with_label_values(&[result]).inc();
        if let Err(e) = &r {
            tracing::warn!(peer = %peer.url, path, error = %e, "api: peer could not be asked");
        }
        r
    }

    async fn exchange(
        &self,
        peer: &PeerUrl,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
        body: Bytes,
    ) -> Result<Answer, PeerError> {
        let http = |e: &dyn std::fmt::Display| PeerError::Http(e.to_string());
        let stream = tokio::net::TcpStream::connect(&peer.authority)
            .await
            .map_err(PeerError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(&e))?;
        // The connection is driven beside the request and dropped with it (one request each).
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", peer.prefix))
            .header(header::HOST, &peer.authority)
            .header(FORWARDED, self.instance.clone());
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        if !body.is_empty() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body)).map_err(|e| http(&e))?;
        let result = async {
            let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| http(&e))?
                .to_bytes();
            Ok(Answer {
                peer: peer.url.clone(),
                status: parts.status,
                content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
                body,
            })
        }
        .await;
        conn.abort();
        result
    }

    /// Asks the peers one after another for `path` until one answers other than 404. One at a
    /// time on purpose: a control call must be carried out by one instance only, even if a
    /// handover left an incident known to two.
    pub async fn find(
        &self,
        method: Method,
        path: &str,
        auth: Option<&HeaderValue>,
        body: Bytes,
    ) -> Found {
        let mut failed = Vec::new();
        for p in &self.peers {
            match self.call(p, method.clone(), path, auth, body.clone()).await {
                Ok(a) if a.status == StatusCode::NOT_FOUND => {}
                Ok(a) => return Found::Answer(a),
                Err(e) => failed.push((p.url.clone(), e)),
            }
        }
        if failed.is_empty() {
            Found::Nowhere
        } else {
            Found::Unknown(
                failed
                    .into_iter()
                    .map(|(u, e)| (u, e.to_string()))
                    .collect(),
            )
        }
    }

    /// Asks every peer for `path` at once (reads only).
    pub async fn gather(
        &self,
        path: &str,
        auth: Option<&HeaderValue>,
    ) -> Vec<(String, Result<Answer, PeerError>)> {
        futures::future::join_all(self.peers.iter().map(|p| async move {
            let r = self.call(p, Method::GET, path, auth, Bytes::new()).await;
            (p.url.clone(), r)
        }))
        .await
    }
}

/// `s` as one URL path segment or query value: RFC 3986 unreserved characters kept, everything
/// else percent-encoded.
pub fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_parse_and_bad_ones_say_why() {
        let p = PeerUrl::parse("http://10.0.0.2:9464/").unwrap();
        assert_eq!(
            (p.authority.as_str(), p.prefix.as_str()),
            ("10.0.0.2:9464", "")
        );
        assert_eq!(p.url, "http://10.0.0.2:9464");
        let p = PeerUrl::parse("http://guardrail-2.internal/gr").unwrap();
        assert_eq!(
            (p.authority.as_str(), p.prefix.as_str()),
            ("guardrail-2.internal:80", "/gr")
        );
        let p = PeerUrl::parse("http://[::1]:9464").unwrap();
        assert_eq!(p.authority, "[::1]:9464");
        assert_eq!(
            PeerUrl::parse("http://[::1]").unwrap().authority,
            "[::1]:80"
        );
        for (bad, why) in [
            ("https://a:1", "plain HTTP"),
            ("a:1", "not an http://"),
            ("http://", "expected http://host:port"),
            ("http://a:0", "invalid host or port"),
            ("http://a:x", "invalid host or port"),
            ("http://u@a:1", "expected http://host:port"),
            ("http://a:1/p?q", "no query"),
        ] {
            let e = PeerUrl::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn ids_are_encoded_as_one_path_segment() {
        assert_eq!(pct_encode("inc-01_a.b~"), "inc-01_a.b~");
        assert_eq!(pct_encode("a/b c?é"), "a%2Fb%20c%3F%C3%A9");
    }

    #[tokio::test]
    async fn a_peer_that_is_down_is_reported_not_mistaken_for_404() {
        // A port that was free a moment ago: nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let requests = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["result"]).unwrap();
        let peers = Peers::new(
            &[format!("http://127.0.0.1:{port}")],
            500,
            "me",
            requests.clone(),
        )
        .unwrap();
        match peers
            .find(Method::GET, "/api/incidents/x", None, Bytes::new())
            .await
        {
            Found::Unknown(f) => {
                assert_eq!(f.len(), 1);
                assert!(f[0].1.contains("cannot connect"), "{f:?}");
            }
            other => panic!("expected Unknown, got {other:?}"),
        }
        assert_eq!(requests.with_label_values(&["unreachable"]).get(), 1);
    }

    #[tokio::test]
    async fn a_peer_that_never_answers_times_out() {
        // Accepts the connection and then says nothing.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let requests = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["result"]).unwrap();
        let peers = Peers::new(&[format!("http://{addr}")], 200, "me", requests.clone()).unwrap();
        let got = peers.gather("/api/incidents", None).await;
        assert!(
            matches!(got[0].1, Err(PeerError::Timeout(200))),
            "{:?}",
            got[0].1
        );
        assert_eq!(requests.with_label_values(&["timeout"]).get(), 1);
        hold.abort();
    }
}
