//! Who may talk to meshscope: bearer tokens with scopes.
//!
//! The `--auth-file` (or the `[[token]]` tables of the `--config` file) names each token,
//! its secret (or the secret's SHA-256) and what it may do:
//!
//! ```toml
//! [[token]]
//! name = "proxies"          # in logs and /metrics; the secret never is
//! secret-sha256 = "9f86d0…" # or secret = "…" (refused when the file is group/world readable)
//! scopes = ["ingest"]       # ingest | read | admin
//! ```
//!
//! Every listener asks the same [`Auth`]: OTLP over gRPC and HTTP and the HTTP API read the
//! `authorization: Bearer <secret>` header ([`Auth::check_header`]), the Postgres wire the
//! token's name and secret as user and password ([`Auth::check_login`]). A presented secret
//! is hashed and compared with every token's digest in constant time, so neither the time
//! an answer takes nor a log line or metric tells anything about a secret. Without tokens
//! ([`Auth::open`]) everything is allowed; the binary only allows that on loopback.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub mod http;
pub mod tls;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Send OTLP spans, metrics and logs.
    Ingest,
    /// SQL, the API, the UI's data, `/metrics`, the Postgres wire.
    Read,
    /// Change alert rules (and everything `read` allows).
    Admin,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    /// Whether a token holding `self` may do what `needed` guards (`admin` includes `read`).
    fn covers(self, needed: Scope) -> bool {
        self == needed || (self == Scope::Admin && needed == Scope::Read)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The listener a credential was presented on (a label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    OtlpGrpc,
    OtlpHttp,
    Api,
    Postgres,
}

impl Surface {
    pub const ALL: [Surface; 4] = [
        Surface::OtlpGrpc,
        Surface::OtlpHttp,
        Surface::Api,
        Surface::Postgres,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Surface::OtlpGrpc => "otlp_grpc",
            Surface::OtlpHttp => "otlp_http",
            Surface::Api => "api",
            Surface::Postgres => "postgres",
        }
    }
}

/// One `[[token]]` of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TokenSpec {
    pub name: String,
    /// The secret itself (the file must then be readable by its owner only).
    #[serde(default)]
    pub secret: Option<String>,
    /// The secret's SHA-256, 64 hex digits (`printf %s "$SECRET" | sha256sum`).
    #[serde(default)]
    pub secret_sha256: Option<String>,
    /// Beside `secret-sha256`: the secret's SCRAM-SHA-256 key, so the Postgres wire can ask
    /// for SCRAM without the file holding the secret (`meshscope auth hash` prints it):
    /// `4096:<salt, hex>:<SaltedPassword, hex>` ([`ScramKey::encode`]).
    #[serde(default)]
    pub scram_salted_password: Option<String>,
    pub scopes: Vec<Scope>,
}

/// The `--auth-file`: its `[[token]]` tables.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    #[serde(default)]
    pub token: Vec<TokenSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read auth file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid auth file {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error(
        "{path} holds plaintext secrets but is readable by group or others (mode {mode:o}): \
         chmod 600 it, or give secret-sha256 instead"
    )]
    Readable { path: String, mode: u32 },
    #[error("token {name:?}: {why}")]
    Token { name: String, why: String },
    #[error("no [[token]] given")]
    Empty,
}

fn token_error(name: &str, why: impl Into<String>) -> AuthError {
    AuthError::Token {
        name: name.into(),
        why: why.into(),
    }
}

/// Why a credential was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No credential at all (HTTP 401, gRPC UNAUTHENTICATED).
    Missing,
    /// A credential that matches no token (HTTP 401, gRPC UNAUTHENTICATED).
    Invalid,
    /// A valid token without the scope (HTTP 403, gRPC PERMISSION_DENIED).
    Forbidden { token: String, scope: Scope },
}

impl Denied {
    /// Whether the caller is unknown (rather than known but not allowed).
    pub fn is_unauthenticated(&self) -> bool {
        !matches!(self, Denied::Forbidden { .. })
    }

    fn reason(&self) -> usize {
        match self {
            Denied::Missing => 0,
            Denied::Invalid => 1,
            Denied::Forbidden { .. } => 2,
        }
    }
}

/// The `reason` label of `meshscope_auth_failures_total`, by [`Denied::reason`].
pub const REASONS: [&str; 3] = ["missing", "invalid", "scope"];

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::Missing => f.write_str(
                "authentication required: send `authorization: Bearer <token>` \
                 (OTEL_EXPORTER_OTLP_HEADERS=authorization=Bearer%20<token>)",
            ),
            Denied::Invalid => f.write_str("invalid token"),
            Denied::Forbidden { token, scope } => {
                write!(f, "token {token:?} does not have the {scope} scope")
            }
        }
    }
}

struct Token {
    name: String,
    digest: [u8; 32],
    /// For SCRAM-SHA-256 logins: made at load from a plaintext `secret`, or the file's
    /// `scram-salted-password`.
    scram: Option<ScramKey>,
    scopes: Vec<Scope>,
    /// Requests it was accepted for, per [`Surface::ALL`].
    accepted: [AtomicU64; 4],
}

struct Inner {
    tokens: Vec<Token>,
    /// Refusals per surface and reason.
    failures: [[AtomicU64; 3]; 4],
    /// The second the last refusal was logged in (one line a second at most).
    last_logged: AtomicU64,
    suppressed: AtomicU64,
}

/// The tokens, shared by every listener. Cheap to clone.
#[derive(Clone, Default)]
pub struct Auth {
    /// `None`: no tokens configured, everything is allowed.
    inner: Option<Arc<Inner>>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("Auth(open)"),
            Some(i) => f
                .debug_list()
                .entries(i.tokens.iter().map(|t| &t.name))
                .finish(),
        }
    }
}

/// One token's accepted requests on one surface, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub token: String,
    pub surface: Surface,
    pub requests: u64,
}

/// What a SCRAM-SHA-256 server keeps of a secret (RFC 5802, RFC 7677): a salt of its own
/// and `SaltedPassword = Hi(secret, salt, SCRAM_ITERATIONS)`; never the secret.
#[derive(Clone)]
pub struct ScramKey {
    pub salt: [u8; 16],
    pub salted_password: [u8; 32],
}

impl fmt::Debug for ScramKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramKey(…)")
    }
}

/// The PBKDF2 iterations of [`ScramKey`] (PostgreSQL's default).
pub const SCRAM_ITERATIONS: u32 = 4096;

impl ScramKey {
    /// The auth file's `scram-salted-password`: `<iterations>:<salt hex>:<SaltedPassword hex>`.
    pub fn encode(&self) -> String {
        format!(
            "{SCRAM_ITERATIONS}:{}:{}",
            hex::encode(self.salt),
            hex::encode(self.salted_password)
        )
    }

    /// Reads [`ScramKey::encode`]'s form; the iterations must be [`SCRAM_ITERATIONS`] (the
    /// one count the server tells every client).
    pub fn decode(text: &str) -> Result<ScramKey, &'static str> {
        const FORM: &str =
            "scram-salted-password is 4096:<32 hex digits of salt>:<64 hex digits of key>";
        let mut parts = text.trim().split(':');
        let (Some(iterations), Some(salt_hex), Some(key_hex), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(FORM);
        };
        if iterations != SCRAM_ITERATIONS.to_string() {
            return Err("scram-salted-password must use 4096 iterations");
        }
        let mut key = ScramKey {
            salt: [0; 16],
            salted_password: [0; 32],
        };
        hex::decode_to_slice(salt_hex, &mut key.salt).map_err(|_| FORM)?;
        hex::decode_to_slice(key_hex, &mut key.salted_password).map_err(|_| FORM)?;
        Ok(key)
    }

    /// The key of `secret` under a fresh random salt. `None` for a secret that is not
    /// printable ASCII: SASLprep would change it, and client and server could disagree.
    pub fn derive(secret: &str) -> Option<ScramKey> {
        use ring::rand::SecureRandom as _;
        if !secret.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return None;
        }
        let mut salt = [0u8; 16];
        ring::rand::SystemRandom::new().fill(&mut salt).ok()?;
        let mut salted_password = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(SCRAM_ITERATIONS)?,
            &salt,
            secret.as_bytes(),
            &mut salted_password,
        );
        Some(ScramKey {
            salt,
            salted_password,
        })
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `secret-sha256` of a secret, as the auth file takes it.
pub fn secret_digest_hex(secret: &str) -> String {
    hex::encode(sha256(secret.as_bytes()))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl Auth {
    /// No tokens: every request is allowed.
    pub fn open() -> Auth {
        Auth { inner: None }
    }

    pub fn is_open(&self) -> bool {
        self.inner.is_none()
    }

    /// Reads `path` (TOML with `[[token]]` tables).
    pub fn load(path: &Path) -> Result<Auth, AuthError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: shown.clone(),
            source,
        })?;
        let file: AuthFile = toml::from_str(&text).map_err(|source| AuthError::Parse {
            path: shown,
            source,
        })?;
        Auth::from_file_tokens(path, file.token)
    }

    /// Tokens read from `path` (the auth file, or the `--config` file holding them): refused
    /// when a plaintext secret sits in a file others can read.
    pub fn from_file_tokens(path: &Path, specs: Vec<TokenSpec>) -> Result<Auth, AuthError> {
        if specs.iter().any(|t| t.secret.is_some()) {
            check_private(path)?;
        }
        Auth::from_specs(specs)
    }

    /// Tokens as given (no file to check).
    pub fn from_specs(specs: Vec<TokenSpec>) -> Result<Auth, AuthError> {
        if specs.is_empty() {
            return Err(AuthError::Empty);
        }
        let mut tokens: Vec<Token> = Vec::with_capacity(specs.len());
        for spec in specs {
            let name = spec.name.as_str();
            if !valid_name(name) {
                return Err(token_error(
                    name,
                    "a name is 1-64 letters, digits, `_`, `-` or `.`",
                ));
            }
            if tokens.iter().any(|t| t.name == name) {
                return Err(token_error(name, "given twice"));
            }
            let scram = match (&spec.secret, &spec.scram_salted_password) {
                (Some(secret), None) => ScramKey::derive(secret),
                (None, Some(text)) => {
                    if spec.secret_sha256.is_none() {
                        return Err(token_error(
                            name,
                            "scram-salted-password goes with secret-sha256 (for the bearer header)",
                        ));
                    }
                    Some(ScramKey::decode(text).map_err(|e| token_error(name, e))?)
                }
                (None, None) => None,
                (Some(_), Some(_)) => {
                    return Err(token_error(
                        name,
                        "scram-salted-password is for secret-sha256 tokens; a `secret` has its key made at start",
                    ));
                }
            };
            let digest = match (&spec.secret, &spec.secret_sha256) {
                (Some(secret), None) => {
                    if secret.is_empty() {
                        return Err(token_error(name, "empty secret"));
                    }
                    if secret.len() < 16 {
                        tracing::warn!(
                            token = name,
                            "a secret under 16 characters is easy to guess"
                        );
                    }
                    sha256(secret.as_bytes())
                }
                (None, Some(hex_digest)) => {
                    let mut digest = [0u8; 32];
                    hex::decode_to_slice(hex_digest.trim(), &mut digest)
                        .map_err(|_| token_error(name, "secret-sha256 must be 64 hex digits"))?;
                    digest
                }
                _ => {
                    return Err(token_error(
                        name,
                        "give exactly one of `secret` and `secret-sha256`",
                    ));
                }
            };
            if tokens.iter().any(|t| t.digest == digest) {
                return Err(token_error(name, "has the same secret as another token"));
            }
            if spec.scopes.is_empty() {
                return Err(token_error(
                    name,
                    "no scopes (ingest, read, admin): it could do nothing",
                ));
            }
            tokens.push(Token {
                name: spec.name,
                digest,
                scram,
                scopes: spec.scopes,
                accepted: Default::default(),
            });
        }
        Ok(Auth {
            inner: Some(Arc::new(Inner {
                tokens,
                failures: Default::default(),
                last_logged: AtomicU64::new(0),
                suppressed: AtomicU64::new(0),
            })),
        })
    }

    /// Checks an `authorization` header value (`Bearer <secret>`; `None`: no header) for
    /// `scope`. Answers the token's name (`None` when auth is open).
    pub fn check_header(
        &self,
        surface: Surface,
        header: Option<&[u8]>,
        scope: Scope,
    ) -> Result<Option<&str>, Denied> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        let secret = header.and_then(bearer);
        let outcome = match secret {
            None if header.is_none() => Err(Denied::Missing),
            None => Err(Denied::Invalid),
            Some(secret) => inner.verify(secret, None, scope),
        };
        inner.count(surface, outcome)
    }

    /// Checks a login (the Postgres wire: user = the token's name, password = its secret)
    /// for `scope`.
    pub fn check_login(
        &self,
        surface: Surface,
        user: &str,
        password: &[u8],
        scope: Scope,
    ) -> Result<Option<&str>, Denied> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        let outcome = inner.verify(password, Some(user), scope);
        inner.count(surface, outcome)
    }

    /// The SCRAM-SHA-256 key of the token named `user`: made from its plaintext `secret`, or
    /// its `scram-salted-password` (a `secret-sha256` token without one logs in with a
    /// cleartext password).
    pub fn scram_key(&self, user: &str) -> Option<&ScramKey> {
        let inner = self.inner.as_ref()?;
        inner
            .tokens
            .iter()
            .find(|t| t.name == user)
            .and_then(|t| t.scram.as_ref())
    }

    /// Records a SCRAM login of `user` whose proof was (`proved`) or was not checked against
    /// [`Auth::scram_key`], and checks the token's scope, as [`Auth::check_login`] does.
    pub fn check_scram_login(
        &self,
        surface: Surface,
        user: &str,
        proved: bool,
        scope: Scope,
    ) -> Result<Option<&str>, Denied> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        let outcome = match inner.tokens.iter().position(|t| t.name == user) {
            Some(i) if proved => inner.in_scope(i, scope),
            _ => Err(Denied::Invalid),
        };
        inner.count(surface, outcome)
    }

    /// Refusals so far: `(surface, reason, count)` ([`REASONS`]).
    pub fn failures(&self) -> Vec<(Surface, &'static str, u64)> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (s, surface) in Surface::ALL.into_iter().enumerate() {
            for (r, reason) in REASONS.into_iter().enumerate() {
                out.push((
                    surface,
                    reason,
                    inner.failures[s][r].load(Ordering::Relaxed),
                ));
            }
        }
        out
    }

    /// Accepted requests per token and surface (surfaces the token was never used on left
    /// out).
    pub fn accepted(&self) -> Vec<Accepted> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for t in &inner.tokens {
            for (s, surface) in Surface::ALL.into_iter().enumerate() {
                let requests = t.accepted[s].load(Ordering::Relaxed);
                if requests > 0 {
                    out.push(Accepted {
                        token: t.name.clone(),
                        surface,
                        requests,
                    });
                }
            }
        }
        out
    }
}

/// The secret of `Bearer <secret>` (the scheme in any case, as RFC 9110 says).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || !rest.first()?.is_ascii_whitespace() {
        return None;
    }
    let secret = rest.trim_ascii();
    (!secret.is_empty()).then_some(secret)
}

fn surface_index(surface: Surface) -> usize {
    Surface::ALL
        .iter()
        .position(|s| *s == surface)
        .unwrap_or_default()
}

impl Inner {
    /// The token whose digest is the secret's, compared with every token in constant
    /// time; with `user`, the token must also have that name.
    fn verify(&self, secret: &[u8], user: Option<&str>, scope: Scope) -> Result<usize, Denied> {
        let digest = sha256(secret);
        let mut found = None;
        for (i, t) in self.tokens.iter().enumerate() {
            if bool::from(t.digest.ct_eq(&digest)) {
                found = Some(i);
            }
        }
        let i = found.ok_or(Denied::Invalid)?;
        if user.is_some_and(|u| u != self.tokens[i].name) {
            return Err(Denied::Invalid);
        }
        self.in_scope(i, scope)
    }

    /// Token `i`, when it has `scope`.
    fn in_scope(&self, i: usize, scope: Scope) -> Result<usize, Denied> {
        let t = &self.tokens[i];
        if !t.scopes.iter().any(|s| s.covers(scope)) {
            return Err(Denied::Forbidden {
                token: t.name.clone(),
                scope,
            });
        }
        Ok(i)
    }

    fn count(
        &self,
        surface: Surface,
        outcome: Result<usize, Denied>,
    ) -> Result<Option<&str>, Denied> {
        let s = surface_index(surface);
        match outcome {
            Ok(i) => {
                let t = &self.tokens[i];
                t.accepted[s].fetch_add(1, Ordering::Relaxed);
                Ok(Some(t.name.as_str()))
            }
            Err(denied) => {
                self.failures[s][denied.reason()].fetch_add(1, Ordering::Relaxed);
                self.log(surface, &denied);
                Err(denied)
            }
        }
    }

    /// Logs a refusal, at most one line a second (a flood of bad tokens must not become a
    /// flood of log lines); the line says how many it stands for.
    fn log(&self, surface: Surface, denied: &Denied) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_logged.load(Ordering::Relaxed);
        if last == now
            || self
                .last_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let also = self.suppressed.swap(0, Ordering::Relaxed);
        let token = match denied {
            Denied::Forbidden { token, .. } => token.as_str(),
            _ => "",
        };
        tracing::warn!(
            surface = surface.name(),
            reason = REASONS[denied.reason()],
            token,
            refusals_not_logged = also,
            "refused a request: {denied}"
        );
    }
}

/// Whether a file holding plaintext secrets is private to its owner.
fn check_private(path: &Path) -> Result<(), AuthError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(AuthError::Readable {
                path: path.display().to_string(),
                mode,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, secret: &str, scopes: &[Scope]) -> TokenSpec {
        TokenSpec {
            name: name.into(),
            secret: Some(secret.into()),
            secret_sha256: None,
            scram_salted_password: None,
            scopes: scopes.to_vec(),
        }
    }

    fn two_tokens() -> Auth {
        Auth::from_specs(vec![
            spec("proxies", "ingest-secret-0123456789", &[Scope::Ingest]),
            TokenSpec {
                name: "grafana".into(),
                secret: None,
                secret_sha256: Some(secret_digest_hex("read-secret-0123456789")),
                scram_salted_password: None,
                scopes: vec![Scope::Read],
            },
        ])
        .unwrap()
    }

    #[test]
    fn scram_logins_need_a_plaintext_secret_and_are_counted_as_logins() {
        let auth = two_tokens();
        let key = auth.scram_key("proxies").expect("a secret token has a key");
        assert_ne!(key.salted_password, [0u8; 32]);
        // Each load draws its own salt.
        assert_ne!(
            two_tokens().scram_key("proxies").expect("key").salt,
            key.salt
        );
        assert!(auth.scram_key("grafana").is_none(), "no secret, no key");
        assert!(auth.scram_key("nobody").is_none());
        let odd = Auth::from_specs(vec![spec(
            "odd",
            "sécret-with-accents-0001",
            &[Scope::Read],
        )])
        .unwrap();
        assert!(odd.scram_key("odd").is_none(), "SASLprep could change it");

        let pg = Surface::Postgres;
        assert_eq!(
            auth.check_scram_login(pg, "proxies", true, Scope::Ingest),
            Ok(Some("proxies"))
        );
        assert!(matches!(
            auth.check_scram_login(pg, "proxies", true, Scope::Read),
            Err(Denied::Forbidden { .. })
        ));
        assert_eq!(
            auth.check_scram_login(pg, "proxies", false, Scope::Ingest),
            Err(Denied::Invalid)
        );
        assert_eq!(
            auth.check_scram_login(pg, "nobody", true, Scope::Ingest),
            Err(Denied::Invalid)
        );
        let failures: u64 = auth
            .failures()
            .iter()
            .filter(|(s, _, _)| *s == pg)
            .map(|(_, _, n)| n)
            .sum();
        assert_eq!(failures, 3);
        assert_eq!(auth.accepted()[0].requests, 1);
    }

    #[test]
    fn a_hashed_token_can_carry_its_scram_key() {
        let secret = "read-secret-0123456789";
        let key = ScramKey::derive(secret).expect("printable");
        let text = key.encode();
        assert!(text.starts_with("4096:"), "{text}");
        let back = ScramKey::decode(&text).expect("decode");
        assert_eq!(
            (back.salt, back.salted_password),
            (key.salt, key.salted_password)
        );
        let hashed = |scram: Option<String>, sha: bool| TokenSpec {
            name: "grafana".into(),
            secret: None,
            secret_sha256: sha.then(|| secret_digest_hex(secret)),
            scram_salted_password: scram,
            scopes: vec![Scope::Read],
        };
        let auth = Auth::from_specs(vec![hashed(Some(text.clone()), true)]).expect("load");
        let got = auth.scram_key("grafana").expect("the file's key");
        assert_eq!(got.salted_password, key.salted_password);
        // The bearer secret still works through its digest.
        assert_eq!(
            auth.check_header(
                Surface::Api,
                Some(format!("Bearer {secret}").as_bytes()),
                Scope::Read
            ),
            Ok(Some("grafana"))
        );
        for (bad, why) in [
            (hashed(Some(text.clone()), false), "goes with secret-sha256"),
            (hashed(Some("4096:00:11".into()), true), "hex digits"),
            (
                hashed(Some(text.replacen("4096", "10000", 1)), true),
                "4096 iterations",
            ),
            (
                TokenSpec {
                    secret: Some(secret.into()),
                    ..hashed(Some(text.clone()), false)
                },
                "for secret-sha256 tokens",
            ),
        ] {
            let e = Auth::from_specs(vec![bad])
                .expect_err("refused")
                .to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn bearer_tokens_are_checked_for_their_scope() {
        let auth = two_tokens();
        let h = |v: &'static str| Some(v.as_bytes());
        assert_eq!(
            auth.check_header(
                Surface::OtlpHttp,
                h("Bearer ingest-secret-0123456789"),
                Scope::Ingest
            ),
            Ok(Some("proxies"))
        );
        // The scheme in any case; the secret by its digest.
        assert_eq!(
            auth.check_header(
                Surface::Api,
                h("bearer  read-secret-0123456789 "),
                Scope::Read
            ),
            Ok(Some("grafana"))
        );
        assert_eq!(
            auth.check_header(
                Surface::Api,
                h("Bearer ingest-secret-0123456789"),
                Scope::Read
            ),
            Err(Denied::Forbidden {
                token: "proxies".into(),
                scope: Scope::Read
            })
        );
        assert_eq!(
            auth.check_header(Surface::Api, None, Scope::Read),
            Err(Denied::Missing)
        );
        for bad in [
            "Bearer wrong",
            "Basic abc",
            "Bearer",
            "Bearerread-secret-0123456789",
            "",
        ] {
            assert_eq!(
                auth.check_header(Surface::Api, Some(bad.as_bytes()), Scope::Read),
                Err(Denied::Invalid),
                "{bad:?}"
            );
        }
        let api = |reason| {
            auth.failures()
                .into_iter()
                .find(|(s, r, _)| *s == Surface::Api && *r == reason)
                .map(|(_, _, n)| n)
        };
        assert_eq!(api("missing"), Some(1));
        assert_eq!(api("invalid"), Some(5));
        assert_eq!(api("scope"), Some(1));
        assert_eq!(
            auth.accepted(),
            vec![
                Accepted {
                    token: "proxies".into(),
                    surface: Surface::OtlpHttp,
                    requests: 1
                },
                Accepted {
                    token: "grafana".into(),
                    surface: Surface::Api,
                    requests: 1
                }
            ]
        );
    }

    #[test]
    fn admin_includes_read_but_not_ingest() {
        let auth = Auth::from_specs(vec![spec(
            "ops",
            "admin-secret-0123456789",
            &[Scope::Admin],
        )])
        .unwrap();
        let h = Some("Bearer admin-secret-0123456789".as_bytes());
        assert!(auth.check_header(Surface::Api, h, Scope::Read).is_ok());
        assert!(auth.check_header(Surface::Api, h, Scope::Admin).is_ok());
        assert!(
            auth.check_header(Surface::OtlpGrpc, h, Scope::Ingest)
                .is_err()
        );
    }

    #[test]
    fn a_login_needs_the_tokens_own_name() {
        let auth = two_tokens();
        let pw = b"read-secret-0123456789";
        assert_eq!(
            auth.check_login(Surface::Postgres, "grafana", pw, Scope::Read),
            Ok(Some("grafana"))
        );
        assert_eq!(
            auth.check_login(Surface::Postgres, "proxies", pw, Scope::Read),
            Err(Denied::Invalid)
        );
    }

    #[test]
    fn open_allows_everything() {
        let auth = Auth::open();
        assert!(auth.is_open());
        assert_eq!(
            auth.check_header(Surface::Api, None, Scope::Admin),
            Ok(None)
        );
        assert!(auth.failures().is_empty());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let err = |specs| Auth::from_specs(specs).unwrap_err().to_string();
        assert!(err(vec![]).contains("no [[token]]"));
        assert!(err(vec![spec("a b", "x", &[Scope::Read])]).contains("name"));
        assert!(err(vec![spec("a", "x", &[])]).contains("no scopes"));
        assert!(
            err(vec![
                spec("a", "x", &[Scope::Read]),
                spec("a", "y", &[Scope::Read])
            ])
            .contains("twice")
        );
        assert!(
            err(vec![
                spec("a", "x", &[Scope::Read]),
                spec("b", "x", &[Scope::Read])
            ])
            .contains("same secret")
        );
        let mut both = spec("a", "x", &[Scope::Read]);
        both.secret_sha256 = Some(secret_digest_hex("x"));
        assert!(err(vec![both]).contains("exactly one"));
        let mut short = spec("a", "x", &[Scope::Read]);
        short.secret = None;
        short.secret_sha256 = Some("abc".into());
        assert!(err(vec![short]).contains("64 hex"));
        let parse: Result<AuthFile, _> =
            toml::from_str("[[token]]\nname = \"a\"\nscopes = [\"write\"]\n");
        assert!(parse.is_err());
    }

    #[cfg(unix)]
    #[test]
    fn plaintext_secrets_need_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        std::fs::write(
            &path,
            "[[token]]\nname = \"ci\"\nsecret = \"plain-secret-0123456789\"\nscopes = [\"read\"]\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Auth::load(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Auth::load(&path).is_ok());
        // A digest may sit in a readable file.
        std::fs::write(
            &path,
            format!(
                "[[token]]\nname = \"ci\"\nsecret-sha256 = \"{}\"\nscopes = [\"read\"]\n",
                secret_digest_hex("plain-secret-0123456789")
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Auth::load(&path).is_ok());
    }
}
