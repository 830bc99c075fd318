//! Certificates of the HTTPS proxy front (`listen.https`): the TLS server configuration built
//! from PEM files (the gateway's certificate and key, and the CA that client certificates must
//! chain to), and what a verified client certificate says about its holder.
//!
//! Verification is rustls' (webpki): chain to `https.clientCa`, validity period, key usage for
//! client authentication. Only a certificate that passed it reaches [`ClientCert::from_der`],
//! which reads names, never trust.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Whether and how the HTTPS front asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientAuth {
    /// None asked for.
    None,
    /// Asked for; a client without one is served and identified by its address; a certificate
    /// that does not verify ends the handshake.
    Optional,
    /// Required: a client without a certificate that verifies ends the handshake.
    Required,
}

/// The TLS server configuration of the HTTPS front, from PEM files: `cert` (the chain, leaf
/// first), `key` (PKCS#8, PKCS#1 or SEC1) and, unless `auth` is `None`, `ca` (the roots client
/// certificates must chain to). HTTP/1.1 only (ALPN `http/1.1`); TLS 1.2 and 1.3.
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
    ca: Option<&Path>,
    auth: ClientAuth,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match (auth, ca) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (_, None) => return Err("client certificates need https.clientCa".into()),
        (_, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
                let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no CA certificate in it", ca.display()));
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if auth == ClientAuth::Optional { v.allow_unauthenticated() } else { v };
            builder.with_client_cert_verifier(v.build().map_err(|e| format!("{}: {e}", ca.display()))?)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| format!("{}: {e}", cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A SPIFFE ID of the Kubernetes form `spiffe://<trust domain>/ns/<namespace>/sa/<account>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spiffe {
    /// The whole ID, as in the certificate.
    pub id: String,
    /// Namespace.
    pub namespace: String,
    /// ServiceAccount.
    pub service_account: String,
}

impl Spiffe {
    /// Reads a URI as a Kubernetes workload's SPIFFE ID; `None` for any other URI (a SPIFFE ID
    /// of another path form, an invalid name).
    pub(crate) fn parse(uri: &str) -> Option<Spiffe> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (domain, path) = rest.split_once('/')?;
        let domain_ok = !domain.is_empty()
            && domain.len() <= 255
            && domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        let subdomain = |s: &str| s.len() <= 253 && s.split('.').all(dns_label);
        (domain_ok && dns_label(ns) && subdomain(sa)).then(|| Spiffe {
            id: uri.to_string(),
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
    }
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ClientCert {
    /// Its SPIFFE ID, when it carries exactly one URI SAN and that is a Kubernetes workload's
    /// SPIFFE ID (an X.509-SVID carries exactly one).
    pub spiffe: Option<Spiffe>,
    /// Subject common name.
    pub common_name: Option<String>,
    /// Subject alternative names: DNS names, URIs and e-mail addresses, as written.
    pub sans: Vec<String>,
}

impl ClientCert {
    /// Reads the end-entity certificate `der` (already verified by the handshake).
    pub(crate) fn from_der(der: &[u8]) -> Result<ClientCert, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
        let mut sans = Vec::new();
        let mut uris = Vec::new();
        if let Some(ext) = cert.subject_alternative_name().map_err(|e| e.to_string())? {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(n) | GeneralName::RFC822Name(n) => sans.push(n.to_string()),
                    GeneralName::URI(u) => {
                        uris.push(u.to_string());
                        sans.push(u.to_string());
                    }
                    _ => {}
                }
            }
        }
        let spiffe = match uris.as_slice() {
            [one] => Spiffe::parse(one),
            _ => None,
        };
        Ok(ClientCert { spiffe, common_name, sans })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kubernetes_spiffe_ids_only() {
        let s = Spiffe::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap();
        assert_eq!((s.namespace.as_str(), s.service_account.as_str()), ("shop", "api"));
        for bad in [
            "spiffe://cluster.local/ns/shop/sa/api/extra",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/sa/api/ns/shop",
            "spiffe:///ns/shop/sa/api",
            "spiffe://Cluster.Local/ns/shop/sa/api",
            "spiffe://cluster.local/ns/Shop/sa/api",
            "spiffe://cluster.local/ns/shop/sa/",
            "spiffe://cluster.local/ns/-shop/sa/api",
            "https://cluster.local/ns/shop/sa/api",
        ] {
            assert_eq!(Spiffe::parse(bad), None, "{bad}");
        }
    }
}
