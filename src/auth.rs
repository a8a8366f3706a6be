//! Who may do what: named actors with roles, bearer tokens, and permission checks.
//!
//! Tokens come from the config (`token`, for tests and demos) or from an environment variable
//! (`token_env`). Only their SHA-256 digests are kept in memory after startup, and a presented
//! token is compared against every stored digest in constant time, so neither the time taken
//! nor the order of actors reveals whether or which token matched.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::control::{Principal, Verb};

/// Shortest token accepted, in characters.
pub const MIN_TOKEN_CHARS: usize = 16;

/// What a role allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// List incidents, changes and audit trails.
    Read,
    Approve,
    Veto,
    Acknowledge,
    Silence,
}

impl Permission {
    pub const ALL: [Permission; 5] = [
        Permission::Read,
        Permission::Approve,
        Permission::Veto,
        Permission::Acknowledge,
        Permission::Silence,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Approve => "approve",
            Permission::Veto => "veto",
            Permission::Acknowledge => "acknowledge",
            Permission::Silence => "silence",
        }
    }

    /// The permission a decision verb needs.
    pub fn for_verb(verb: Verb) -> Permission {
        match verb {
            Verb::Approve => Permission::Approve,
            Verb::Veto => Permission::Veto,
            Verb::Acknowledge => Permission::Acknowledge,
            Verb::Silence => Permission::Silence,
        }
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[actors]]`: a named person (or tool) with one role and a bearer token.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActorConfig {
    pub name: String,
    pub role: String,
    /// The token inline (tests, demos); prefer `token_env`.
    pub token: Option<String>,
    /// Environment variable holding the token.
    pub token_env: Option<String>,
}

/// `[roles]`: role name -> permissions.
pub type RolesConfig = BTreeMap<String, Vec<Permission>>;

/// Why the actors in the config cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("actor {actor}: environment variable {var} (token_env) is not set")]
    TokenEnvUnset { actor: String, var: String },
    #[error("actor {actor}: environment variable {var} (token_env) is empty")]
    TokenEnvEmpty { actor: String, var: String },
    #[error("actor {actor}: set exactly one of token or token_env")]
    TokenSource { actor: String },
    #[error("actor {actor}: token{from} is {len} characters; use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)", from = .var.as_deref().map(|v| format!(" from {v}")).unwrap_or_default())]
    TokenTooShort {
        actor: String,
        var: Option<String>,
        len: usize,
    },
    #[error("actor {actor}: role {role:?} is not defined in [roles]")]
    UnknownRole { actor: String, role: String },
    #[error("actor {0} is defined more than once")]
    DuplicateActor(String),
    #[error("actors {0} and {1} have the same token; give each actor its own")]
    SharedToken(String, String),
}

/// An authenticated actor: who, in which role, allowed what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub name: String,
    pub role: String,
    /// Sorted, without duplicates.
    pub permissions: Vec<Permission>,
}

impl Identity {
    pub fn may(&self, p: Permission) -> bool {
        self.permissions.contains(&p)
    }

    pub fn principal(&self) -> Principal {
        Principal {
            name: self.name.clone(),
            role: self.role.clone(),
        }
    }

    /// "read, veto, acknowledge" (or "nothing").
    pub fn permissions_str(&self) -> String {
        if self.permissions.is_empty() {
            return "nothing".into();
        }
        self.permissions
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

struct Entry {
    digest: [u8; 32],
    identity: Identity,
}

/// The actors the API accepts, by token digest.
pub struct Auth {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print digests.
        f.debug_struct("Auth")
            .field(
                "actors",
                &self.entries.iter().map(|e| &e.identity).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Auth {
    /// Resolves every actor's token (inline or from its environment variable) and keeps only
    /// digests. Fails on the first actor that cannot be loaded.
    pub fn from_config(roles: &RolesConfig, actors: &[ActorConfig]) -> Result<Auth, AuthError> {
        Self::from_config_with(roles, actors, |v| std::env::var(v).ok())
    }

    /// As [`Auth::from_config`], reading environment variables through `env` (for tests).
    pub fn from_config_with(
        roles: &RolesConfig,
        actors: &[ActorConfig],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Auth, AuthError> {
        let mut entries: Vec<Entry> = Vec::with_capacity(actors.len());
        let mut by_digest: HashMap<[u8; 32], String> = HashMap::new();
        for a in actors {
            if entries.iter().any(|e| e.identity.name == a.name) {
                return Err(AuthError::DuplicateActor(a.name.clone()));
            }
            let Some(perms) = roles.get(&a.role) else {
                return Err(AuthError::UnknownRole {
                    actor: a.name.clone(),
                    role: a.role.clone(),
                });
            };
            let (token, var) = match (&a.token, &a.token_env) {
                (Some(t), None) => (t.trim().to_string(), None),
                (None, Some(var)) => match env(var) {
                    None => {
                        return Err(AuthError::TokenEnvUnset {
                            actor: a.name.clone(),
                            var: var.clone(),
                        })
                    }
                    Some(v) if v.trim().is_empty() => {
                        return Err(AuthError::TokenEnvEmpty {
                            actor: a.name.clone(),
                            var: var.clone(),
                        })
                    }
                    Some(v) => (v.trim().to_string(), Some(var.clone())),
                },
                _ => {
                    return Err(AuthError::TokenSource {
                        actor: a.name.clone(),
                    })
                }
            };
            let len = token.chars().count();
            if len < MIN_TOKEN_CHARS {
                return Err(AuthError::TokenTooShort {
                    actor: a.name.clone(),
                    var,
                    len,
                });
            }
            let d = digest(&token);
            if let Some(other) = by_digest.get(&d) {
                return Err(AuthError::SharedToken(other.clone(), a.name.clone()));
            }
            by_digest.insert(d, a.name.clone());
            let mut permissions = perms.clone();
            permissions.sort();
            permissions.dedup();
            entries.push(Entry {
                digest: d,
                identity: Identity {
                    name: a.name.clone(),
                    role: a.role.clone(),
                    permissions,
                },
            });
        }
        Ok(Auth { entries })
    }

    /// No actor is configured: the control API is closed and reads are open.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The actor whose token this is. Compares the presented token's digest with every stored
    /// digest, without stopping at a match, in constant time per comparison.
    pub fn authenticate(&self, presented: &str) -> Option<&Identity> {
        let d = digest(presented.trim());
        // 1-based index of the matching entry; 0 = none.
        let mut found: u64 = 0;
        for (i, e) in self.entries.iter().enumerate() {
            let eq = e.digest.ct_eq(&d);
            found = u64::conditional_select(&found, &(i as u64 + 1), eq);
        }
        match found {
            0 => None,
            n => self.entries.get(n as usize - 1).map(|e| &e.identity),
        }
    }

    /// Every actor, in config order.
    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.entries.iter().map(|e| &e.identity)
    }
}

/// Config checks for `[roles]` and `[[actors]]`: `(key path, message)` per problem. Does not
/// read environment variables; [`Auth::from_config`] resolves them at startup.
pub fn validate(roles: &RolesConfig, actors: &[ActorConfig]) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut inline: HashMap<[u8; 32], &str> = HashMap::new();
    for (i, a) in actors.iter().enumerate() {
        let key = |field: &str| format!("actors[{i}].{field}");
        if a.name.trim().is_empty() {
            errs.push((key("name"), "must not be empty".into()));
        } else if let Some(first) = seen.get(a.name.as_str()) {
            errs.push((
                key("name"),
                format!(
                    "actor {:?} is already defined at actors[{first}]; names must be unique",
                    a.name
                ),
            ));
        } else {
            seen.insert(&a.name, i);
        }
        if !roles.contains_key(&a.role) {
            let defined = if roles.is_empty() {
                "no roles are defined; add a [roles] table, e.g. operator = [\"read\", \"approve\", \"veto\"]".to_string()
            } else {
                format!(
                    "defined roles: {}",
                    roles.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            let hint = suggest(&a.role, roles.keys().map(|k| k.as_str()))
                .map(|k| format!("; did you mean {k:?}?"))
                .unwrap_or_default();
            errs.push((
                key("role"),
                format!(
                    "role {:?} is not defined in [roles]{hint} ({defined})",
                    a.role
                ),
            ));
        }
        match (&a.token, &a.token_env) {
            (None, None) => errs.push((
                key("token_env"),
                "set token_env to the environment variable holding this actor's token (or token, for tests)".into(),
            )),
            (Some(_), Some(_)) => errs.push((
                key("token"),
                "set only one of token and token_env".into(),
            )),
            (Some(t), None) => {
                let t = t.trim();
                let len = t.chars().count();
                if len < MIN_TOKEN_CHARS {
                    errs.push((
                        key("token"),
                        format!("is {len} characters; use at least {MIN_TOKEN_CHARS}"),
                    ));
                } else if let Some(other) = inline.insert(digest(t), &a.name) {
                    errs.push((
                        key("token"),
                        format!("is the same as actor {other:?}'s token; give each actor its own"),
                    ));
                }
            }
            (None, Some(v)) => {
                if v.trim().is_empty() {
                    errs.push((key("token_env"), "must name an environment variable".into()));
                }
            }
        }
    }
    errs
}

/// The candidate closest to `word` (not `word` itself), if close enough to be a likely typo.
fn suggest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    crate::config::suggest(word, candidates.filter(|c| *c != word))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "alice-token-0123456789";
    const BOB: &str = "bob-token-0123456789ab";

    fn roles() -> RolesConfig {
        let mut r = RolesConfig::new();
        r.insert(
            "model_moderator".into(),
            vec![Permission::Read, Permission::Veto, Permission::Acknowledge],
        );
        r.insert(
            "operator".into(),
            vec![
                Permission::Read,
                Permission::Approve,
                Permission::Veto,
                Permission::Acknowledge,
                Permission::Silence,
            ],
        );
        r
    }

    fn actor(name: &str, role: &str, token: Option<&str>, env: Option<&str>) -> ActorConfig {
        ActorConfig {
            name: name.into(),
            role: role.into(),
            token: token.map(Into::into),
            token_env: env.map(Into::into),
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn authenticates_each_actor_by_its_token() {
        let auth = Auth::from_config_with(
            &roles(),
            &[
                actor("alice", "model_moderator", Some(ALICE), None),
                actor("bob", "operator", None, Some("BOB_TOKEN")),
            ],
            |v| (v == "BOB_TOKEN").then(|| format!("{BOB}\n")),
        )
        .unwrap();
        assert!(!auth.is_empty());
        assert_eq!(auth.len(), 2);
        let a = auth.authenticate(ALICE).unwrap();
        assert_eq!(a.name, "alice");
        assert_eq!(a.role, "model_moderator");
        assert!(a.may(Permission::Veto));
        assert!(!a.may(Permission::Approve));
        assert_eq!(a.permissions_str(), "read, veto, acknowledge");
        assert_eq!(
            a.principal(),
            Principal {
                name: "alice".into(),
                role: "model_moderator".into()
            }
        );
        let b = auth.authenticate(BOB).unwrap();
        assert_eq!(b.name, "bob");
        assert!(b.may(Permission::Approve));
        assert!(auth.authenticate("wrong-token-0123456789").is_none());
        assert!(auth.authenticate("").is_none());
        assert!(auth.authenticate(&ALICE[..ALICE.len() - 1]).is_none());
    }

    #[test]
    fn keeps_only_digests() {
        let auth = Auth::from_config_with(
            &roles(),
            &[actor("alice", "operator", Some(ALICE), None)],
            no_env,
        )
        .unwrap();
        let dbg = format!("{auth:?}");
        assert!(!dbg.contains(ALICE), "{dbg}");
        assert_eq!(auth.entries[0].digest, digest(ALICE));
    }

    #[test]
    fn empty_when_no_actors() {
        let auth = Auth::from_config(&roles(), &[]).unwrap();
        assert!(auth.is_empty());
        assert!(auth.authenticate(ALICE).is_none());
    }

    #[test]
    fn env_token_errors_name_the_actor_and_variable() {
        let actors = [actor("carol", "operator", None, Some("CAROL_TOKEN"))];
        let e = Auth::from_config_with(&roles(), &actors, no_env).unwrap_err();
        assert_eq!(
            e,
            AuthError::TokenEnvUnset {
                actor: "carol".into(),
                var: "CAROL_TOKEN".into()
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("carol") && msg.contains("CAROL_TOKEN"),
            "{msg}"
        );
        let e = Auth::from_config_with(&roles(), &actors, |_| Some("  ".into())).unwrap_err();
        assert!(matches!(e, AuthError::TokenEnvEmpty { .. }), "{e}");
        assert!(e.to_string().contains("CAROL_TOKEN"));
        let e = Auth::from_config_with(&roles(), &actors, |_| Some("short".into())).unwrap_err();
        assert_eq!(
            e,
            AuthError::TokenTooShort {
                actor: "carol".into(),
                var: Some("CAROL_TOKEN".into()),
                len: 5
            }
        );
        assert!(e.to_string().contains("from CAROL_TOKEN"), "{e}");
    }

    #[test]
    fn rejects_bad_actors() {
        let r = roles();
        let cases: Vec<(Vec<ActorConfig>, AuthError)> = vec![
            (
                vec![actor("a", "operator", Some("0123456789abcde"), None)],
                AuthError::TokenTooShort {
                    actor: "a".into(),
                    var: None,
                    len: 15,
                },
            ),
            (
                vec![actor("a", "operator", None, None)],
                AuthError::TokenSource { actor: "a".into() },
            ),
            (
                vec![actor("a", "operator", Some(ALICE), Some("X"))],
                AuthError::TokenSource { actor: "a".into() },
            ),
            (
                vec![actor("a", "oprator", Some(ALICE), None)],
                AuthError::UnknownRole {
                    actor: "a".into(),
                    role: "oprator".into(),
                },
            ),
            (
                vec![
                    actor("a", "operator", Some(ALICE), None),
                    actor("a", "operator", Some(BOB), None),
                ],
                AuthError::DuplicateActor("a".into()),
            ),
            (
                vec![
                    actor("a", "operator", Some(ALICE), None),
                    actor("b", "operator", Some(ALICE), None),
                ],
                AuthError::SharedToken("a".into(), "b".into()),
            ),
        ];
        for (actors, want) in cases {
            let got = Auth::from_config_with(&r, &actors, no_env).unwrap_err();
            assert_eq!(got, want);
        }
        // Exactly the minimum length is fine.
        Auth::from_config_with(
            &r,
            &[actor("a", "operator", Some("0123456789abcdef"), None)],
            no_env,
        )
        .unwrap();
    }

    #[test]
    fn validate_reports_every_problem_with_its_key() {
        let actors = [
            actor("alice", "model_moderator", Some(ALICE), None),
            actor("alice", "operator", None, Some("ALICE2")),
            actor("bob", "oprator", None, Some("BOB_TOKEN")),
            actor("carol", "operator", None, None),
            actor("dave", "operator", Some(BOB), Some("DAVE")),
            actor("erin", "operator", Some("short"), None),
            actor("frank", "operator", Some(ALICE), None),
            actor("gina", "auditor", None, Some("GINA")),
        ];
        let errs = validate(&roles(), &actors);
        let keys: Vec<&str> = errs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "actors[1].name",
                "actors[2].role",
                "actors[3].token_env",
                "actors[4].token",
                "actors[5].token",
                "actors[6].token",
                "actors[7].role",
            ],
            "{errs:?}"
        );
        let msg = |k: &str| &errs.iter().find(|(key, _)| key == k).unwrap().1;
        assert!(msg("actors[1].name").contains("actors[0]"));
        assert!(
            msg("actors[2].role").contains("did you mean \"operator\"?"),
            "{}",
            msg("actors[2].role")
        );
        assert!(msg("actors[2].role").contains("model_moderator, operator"));
        assert!(!msg("actors[7].role").contains("did you mean"));
        assert!(msg("actors[5].token").contains("5 characters"));
        assert!(msg("actors[6].token").contains("alice"));
        // Env variables are not read here.
        assert!(validate(
            &roles(),
            &[actor("bob", "operator", None, Some("SURELY_UNSET_VAR_X"))]
        )
        .is_empty());
    }

    #[test]
    fn validate_without_roles_explains() {
        let errs = validate(
            &RolesConfig::new(),
            &[actor("a", "operator", Some(ALICE), None)],
        );
        assert_eq!(errs.len(), 1);
        assert!(errs[0].1.contains("no roles are defined"), "{errs:?}");
    }

    #[test]
    fn permission_names_match_serde() {
        for p in Permission::ALL {
            let s = serde_json::to_value(p).unwrap();
            assert_eq!(s, serde_json::Value::String(p.as_str().into()));
        }
        for v in Verb::ALL {
            assert_eq!(Permission::for_verb(v).as_str(), v.as_str());
        }
    }

    #[test]
    fn suggestions() {
        let c = ["operator", "model_moderator", "viewer"];
        assert_eq!(suggest("oprator", c.into_iter()), Some("operator"));
        assert_eq!(suggest("viewr", c.into_iter()), Some("viewer"));
        assert_eq!(suggest("auditor", c.into_iter()), None);
    }
}
