//! rustls client settings of the remote sinks (syslog over TLS, HTTPS).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::SinkTls;

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{}: no certificate", path.display());
    Ok(certs)
}

/// A client config trusting `tls.ca` (or, without `tls`, the system's CA certificates), with the
/// client certificate when one is given; and the name to verify (`tls.serverName`, else `host`).
pub(super) fn client(
    tls: Option<&SinkTls>,
    host: &str,
) -> anyhow::Result<(Arc<rustls::ClientConfig>, ServerName<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    match tls {
        Some(t) => {
            for c in load_certs(&t.ca)? {
                roots.add(c).map_err(|e| anyhow::anyhow!("{}: {e}", t.ca.display()))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
            anyhow::ensure!(!roots.is_empty(), "no system CA certificates found: set tls.ca");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match tls.map(|t| (&t.cert, &t.key)) {
        Some((Some(c), Some(k))) => {
            let key = PrivateKeyDer::from_pem_file(k).map_err(|e| anyhow::anyhow!("{}: {e}", k.display()))?;
            builder.with_client_auth_cert(load_certs(c)?, key)?
        }
        Some((None, None)) | None => builder.with_no_client_auth(),
        _ => anyhow::bail!("tls.cert and tls.key go together"),
    };
    let name = tls.and_then(|t| t.server_name.clone()).unwrap_or_else(|| host.to_string());
    let server = ServerName::try_from(name.clone()).map_err(|e| anyhow::anyhow!("tls server name {name:?}: {e}"))?;
    Ok((Arc::new(config), server))
}
