//! A certificate authority made in the test, and JWTs shaped like the kubelet's
//! projected ServiceAccount tokens: what the secured control-plane test presents
//! to, and expects from, the agent.

use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A self-signed root, like istiod's mesh root (`istio-ca-root-cert`).
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The root certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `dns_name` signed by this root: (cert, key), PEM.
    pub fn server(&self, dns_name: &str) -> (String, String) {
        let params = CertificateParams::new(vec![dns_name.to_owned()]).expect("server params");
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// A JWT with the claims of a projected ServiceAccount token (unsigned: the test's
/// control plane compares tokens, it does not review them).
pub fn service_account_jwt(audience: &str, exp: u64, namespace: &str, account: &str) -> String {
    let b = |s: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let claims = serde_json::json!({
        "aud": [audience],
        "exp": exp,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": account, "uid": "0"},
        },
        "sub": format!("system:serviceaccount:{namespace}:{account}"),
        // Tokens of one identity differ by their issue time.
        "iat": exp.saturating_sub(43_200),
        "jti": crate::unique("jti-"),
    });
    format!(
        "{}.{}.{}",
        b(br#"{"alg":"RS256","kid":"test"}"#),
        b(claims.to_string().as_bytes()),
        b(b"not-signed")
    )
}
