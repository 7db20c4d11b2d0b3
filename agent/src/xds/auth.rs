//! Authenticating to the control plane as istiod expects on its secured port
//! (15012): TLS verified against the mesh root CA, and the node's projected
//! ServiceAccount token (audience `istio-ca`) as `authorization: Bearer <JWT>` on
//! every stream, read from its file at each connection so a token the kubelet
//! rotated is used on the next one.
//!
//! The token is also read here, never verified (istiod does that): its claims say
//! early what istiod will refuse (an expired token, another audience, an identity
//! other than the node's), so a refusal is reported with its cause. A failure is
//! one [`AuthFailure`]: a reason label for the metric and a sentence for the log
//! and `/config_dump`.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use tonic::metadata::{MetadataMap, MetadataValue};

/// What the agent presents to the control plane besides TLS.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// File holding the bearer token (a projected ServiceAccount token).
    pub token_file: Option<PathBuf>,
    /// The audience the token must carry (istiod's `istio-ca`).
    pub audience: String,
    /// `clusterid` metadata: which cluster's registry authenticates the token
    /// (istiod's multicluster JWT authentication reads it).
    pub cluster_id: Option<String>,
    /// The identity the node claims (its `NAMESPACE` and `SERVICE_ACCOUNT`), which
    /// istiod compares with the token's.
    pub namespace: Option<String>,
    pub service_account: Option<String>,
}

/// Why authenticating to the control plane failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct AuthFailure {
    pub reason: AuthReason,
    pub detail: String,
}

/// The kind of an [`AuthFailure`], the label of `sockmesh_xds_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AuthReason {
    /// The token file could not be read, or holds no JWT.
    TokenUnreadable,
    /// The token's `exp` is in the past.
    TokenExpired,
    /// The token's `aud` lacks the audience the control plane expects.
    TokenAudience,
    /// The token's namespace or service account differs from the node's.
    TokenIdentity,
    /// The control plane refused the credentials (gRPC UNAUTHENTICATED).
    Unauthenticated,
    /// The control plane refused the identity (gRPC PERMISSION_DENIED).
    PermissionDenied,
    /// The server's certificate is not signed by the configured CA.
    UnknownCa,
    /// The server's certificate does not name the server.
    NameMismatch,
    /// The server's certificate expired or is not valid yet.
    CertificateTime,
    /// The CA bundle could not be read or parsed.
    CaUnreadable,
    /// Any other TLS failure (a refused client certificate, a protocol error).
    Tls,
}

impl AuthReason {
    pub fn label(self) -> &'static str {
        match self {
            AuthReason::TokenUnreadable => "token_unreadable",
            AuthReason::TokenExpired => "token_expired",
            AuthReason::TokenAudience => "token_audience",
            AuthReason::TokenIdentity => "token_identity",
            AuthReason::Unauthenticated => "unauthenticated",
            AuthReason::PermissionDenied => "permission_denied",
            AuthReason::UnknownCa => "unknown_ca",
            AuthReason::NameMismatch => "name_mismatch",
            AuthReason::CertificateTime => "certificate_time",
            AuthReason::CaUnreadable => "ca_unreadable",
            AuthReason::Tls => "tls",
        }
    }
}

fn failure(reason: AuthReason, detail: String) -> AuthFailure {
    AuthFailure { reason, detail }
}

/// A token as read from its file, with what its claims say about it.
#[derive(Clone, Debug)]
pub struct Token {
    pub bearer: String,
    /// Why istiod will likely refuse it (checked before it is sent, reported when
    /// the control plane refuses it).
    pub problem: Option<AuthFailure>,
}

impl Credentials {
    /// Reads the token file (if any) now.
    pub fn token(&self, now: SystemTime) -> Result<Option<Token>, AuthFailure> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            failure(
                AuthReason::TokenUnreadable,
                format!("xDS token {}: {e}", path.display()),
            )
        })?;
        let bearer = text.trim().to_owned();
        let claims = claims(&bearer).map_err(|why| {
            failure(
                AuthReason::TokenUnreadable,
                format!("xDS token {}: {why}", path.display()),
            )
        })?;
        let problem = self.check(path, &claims, now);
        Ok(Some(Token { bearer, problem }))
    }

    /// What in `claims` istiod will refuse, as Kubernetes' TokenReview and
    /// istiod's identity check judge it.
    fn check(&self, path: &Path, claims: &Claims, now: SystemTime) -> Option<AuthFailure> {
        let file = path.display();
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if let Some(exp) = claims.exp
            && exp <= now
        {
            return Some(failure(
                AuthReason::TokenExpired,
                format!(
                    "xDS token {file} expired {} s ago (exp {exp}); the kubelet refreshes a projected token: is the volume mounted?",
                    now - exp
                ),
            ));
        }
        if !self.audience.is_empty() && !claims.aud.contains(&self.audience) {
            return Some(failure(
                AuthReason::TokenAudience,
                format!(
                    "xDS token {file} is for audience {:?}, the control plane expects {:?} (the projected volume's audience)",
                    claims.aud, self.audience
                ),
            ));
        }
        let mismatch = |what: &str, token: &Option<String>, node: &Option<String>| match (
            token, node,
        ) {
            (Some(t), Some(n)) if t != n => Some(failure(
                AuthReason::TokenIdentity,
                format!(
                    "xDS token {file} is for {what} {t:?} but the node claims {n:?}; istiod refuses a node whose identity differs from its token's"
                ),
            )),
            _ => None,
        };
        mismatch("namespace", &claims.namespace, &self.namespace).or_else(|| {
            mismatch(
                "service account",
                &claims.service_account,
                &self.service_account,
            )
        })
    }

    /// Adds the credentials to a request's metadata.
    pub fn apply(&self, token: Option<&Token>, md: &mut MetadataMap) -> Result<(), AuthFailure> {
        if let Some(t) = token {
            let value = MetadataValue::try_from(format!("Bearer {}", t.bearer)).map_err(|_| {
                failure(
                    AuthReason::TokenUnreadable,
                    "xDS token: not a valid header value".into(),
                )
            })?;
            md.insert("authorization", value);
        }
        if let Some(id) = &self.cluster_id
            && let Ok(v) = MetadataValue::try_from(id.as_str())
        {
            md.insert("clusterid", v);
        }
        Ok(())
    }
}

/// What sockmesh reads of a Kubernetes ServiceAccount token's claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Claims {
    exp: Option<u64>,
    aud: Vec<String>,
    namespace: Option<String>,
    service_account: Option<String>,
}

/// The claims of a JWT (`header.payload.signature`, base64url), unverified.
fn claims(jwt: &str) -> Result<Claims, String> {
    let mut parts = jwt.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT (expected three dot-separated parts)".into());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("JWT payload is not base64url: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("JWT payload is not JSON: {e}"))?;
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    // `aud` is a string or an array of strings (RFC 7519 4.1.3).
    let aud = match &v["aud"] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a.iter().filter_map(text).collect(),
        _ => Vec::new(),
    };
    // Kubernetes puts the identity under `kubernetes.io`; `sub` is
    // `system:serviceaccount:<namespace>:<name>` in every version.
    let k8s = &v["kubernetes.io"];
    let sub = v["sub"]
        .as_str()
        .and_then(|s| s.strip_prefix("system:serviceaccount:"))
        .and_then(|s| s.split_once(':'));
    Ok(Claims {
        exp: v["exp"].as_u64(),
        aud,
        namespace: text(&k8s["namespace"]).or_else(|| sub.map(|(ns, _)| ns.to_owned())),
        service_account: text(&k8s["serviceaccount"]["name"])
            .or_else(|| sub.map(|(_, sa)| sa.to_owned())),
    })
}

/// The authentication failure behind a failed connection or call, if it is one:
/// the TLS handshake's verdict on the server's certificate, or the control plane's
/// UNAUTHENTICATED / PERMISSION_DENIED (explained by `token`'s problem when the
/// claims predicted it).
pub fn classify(
    error: &(dyn std::error::Error + 'static),
    token: Option<&Token>,
) -> Option<AuthFailure> {
    let mut next = Some(error);
    while let Some(e) = next {
        let refused = e
            .downcast_ref::<tonic::Status>()
            .and_then(|status| match status.code() {
                tonic::Code::Unauthenticated => Some((AuthReason::Unauthenticated, status)),
                tonic::Code::PermissionDenied => Some((AuthReason::PermissionDenied, status)),
                _ => None,
            });
        if let Some((reason, status)) = refused {
            if let Some(p) = token.and_then(|t| t.problem.clone()) {
                return Some(failure(
                    p.reason,
                    format!("{}; the control plane said: {}", p.detail, status.message()),
                ));
            }
            return Some(failure(
                reason,
                format!("the control plane refused the node: {}", status.message()),
            ));
        }
        if let Some(tls) = rustls_error(e) {
            return Some(tls_failure(tls));
        }
        next = e.source();
    }
    None
}

fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    })
}

fn tls_failure(e: &rustls::Error) -> AuthFailure {
    use rustls::CertificateError as C;
    let reason = match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            AuthReason::UnknownCa
        }
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => AuthReason::NameMismatch,
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => AuthReason::CertificateTime,
        _ => AuthReason::Tls,
    };
    let hint = match reason {
        AuthReason::UnknownCa => {
            " (is --xds-ca the mesh root, istio-ca-root-cert's root-cert.pem?)"
        }
        AuthReason::NameMismatch => " (--xds-server-name sets the name to verify)",
        _ => "",
    };
    failure(
        reason,
        format!("TLS with the control plane failed: {e}{hint}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &serde_json::Value) -> String {
        let b = |s: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.{}",
            b(br#"{"alg":"RS256"}"#),
            b(payload.to_string().as_bytes()),
            b(b"sig")
        )
    }

    /// A projected token as the kubelet writes it (claims of Kubernetes 1.30).
    fn projected(exp: u64, aud: &str, ns: &str, sa: &str) -> String {
        jwt(&serde_json::json!({
            "aud": [aud], "exp": exp, "iat": exp.saturating_sub(3600), "iss": "https://kubernetes.default.svc",
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"},
                              "pod": {"name": "sockmesh-x", "uid": "p"}},
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
        }))
    }

    fn creds(dir: &Path, token: &str) -> Credentials {
        let path = dir.join("token");
        std::fs::write(&path, format!("{token}\n")).expect("write");
        Credentials {
            token_file: Some(path),
            audience: "istio-ca".into(),
            cluster_id: Some("Kubernetes".into()),
            namespace: Some("sockmesh".into()),
            service_account: Some("sockmesh".into()),
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_secs(secs)
    }

    /// A scratch directory, removed when dropped (also when the test fails).
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp() -> Scratch {
        let d = std::env::temp_dir().join(format!(
            "sockmesh-auth-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).expect("dir");
        Scratch(d)
    }

    #[test]
    fn a_good_token_is_sent_as_bearer_with_the_cluster_id() {
        let d = tmp();
        let c = creds(&d, &projected(2_000, "istio-ca", "sockmesh", "sockmesh"));
        let t = c.token(at(1_000)).expect("read").expect("token");
        assert_eq!(t.problem, None);
        let mut md = MetadataMap::new();
        c.apply(Some(&t), &mut md).expect("apply");
        let auth = md
            .get("authorization")
            .expect("header")
            .to_str()
            .expect("ascii");
        assert!(auth.starts_with("Bearer ey"), "{auth}");
        assert!(!auth.ends_with('\n'));
        assert_eq!(md.get("clusterid").expect("clusterid"), "Kubernetes");
    }

    #[test]
    fn what_istiod_refuses_is_named_before_it_refuses() {
        let d = tmp();
        let problem = |tok: String| {
            creds(&d, &tok)
                .token(at(1_000))
                .expect("read")
                .expect("token")
                .problem
                .map(|p| p.reason)
        };
        assert_eq!(
            problem(projected(999, "istio-ca", "sockmesh", "sockmesh")),
            Some(AuthReason::TokenExpired)
        );
        assert_eq!(
            problem(projected(
                2_000,
                "https://kubernetes.default.svc",
                "sockmesh",
                "sockmesh"
            )),
            Some(AuthReason::TokenAudience)
        );
        assert_eq!(
            problem(projected(2_000, "istio-ca", "default", "sockmesh")),
            Some(AuthReason::TokenIdentity)
        );
        assert_eq!(
            problem(projected(2_000, "istio-ca", "sockmesh", "default")),
            Some(AuthReason::TokenIdentity)
        );
        // `aud` as a single string (RFC 7519 allows it).
        assert_eq!(
            problem(jwt(&serde_json::json!({"aud": "istio-ca", "exp": 2_000,
                "sub": "system:serviceaccount:sockmesh:sockmesh"}))),
            None
        );
    }

    #[test]
    fn an_unreadable_token_is_an_error_naming_the_file() {
        let d = tmp();
        let e = creds(&d, "not-a-jwt").token(at(0)).expect_err("refused");
        assert_eq!(e.reason, AuthReason::TokenUnreadable);
        assert!(e.detail.contains("token"), "{e}");
        let mut c = creds(&d, "x");
        c.token_file = Some(d.join("absent"));
        let e = c.token(at(0)).expect_err("refused");
        assert_eq!(e.reason, AuthReason::TokenUnreadable);
        assert!(e.detail.contains("absent"), "{e}");
    }

    #[test]
    fn refusals_and_tls_verdicts_are_classified() {
        let st = tonic::Status::unauthenticated("authentication failure: token expired");
        let f = classify(&st, None).expect("auth");
        assert_eq!(f.reason, AuthReason::Unauthenticated);
        assert!(f.detail.contains("token expired"));
        let d = tmp();
        let expired = creds(&d, &projected(999, "istio-ca", "sockmesh", "sockmesh"))
            .token(at(1_000))
            .expect("read");
        let f = classify(&st, expired.as_ref()).expect("auth");
        assert_eq!(f.reason, AuthReason::TokenExpired);
        assert!(classify(&tonic::Status::unavailable("gone"), None).is_none());
        let io = std::io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert_eq!(
            classify(&io, None).map(|f| f.reason),
            Some(AuthReason::UnknownCa)
        );
        let io = std::io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        ));
        assert_eq!(
            classify(&io, None).map(|f| f.reason),
            Some(AuthReason::NameMismatch)
        );
    }
}
