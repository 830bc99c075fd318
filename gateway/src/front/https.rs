//! The explicit proxy over TLS (`listen.https`): what `curl --proxy https://gw:3129` and
//! browsers' HTTPS proxies speak. The TLS handshake comes first (rustls, the `https` settings in
//! force when the connection is accepted, so a renewed certificate is served without a
//! restart); then the connection is the HTTP front's, with the client certificate the handshake
//! verified (`https.clientCa`) as the credential of every request that carries no token.
//!
//! A handshake that fails (no certificate where one is required, one from another CA, expired,
//! not TLS at all, too slow: `limits.headerTimeout`) is audited as `auth_failed` or
//! `malformed_request` with rustls' reason, and the connection is closed: there is no channel
//! to answer on.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::certs::ClientCert;
use crate::reason::Reason;
use crate::request::{Credential, EgressRequest, Front};
use crate::runtime::Gateway;

/// Serves the HTTPS proxy on `listener` until the gateway drains.
pub(crate) async fn serve(gw: Gateway, listener: TcpListener) {
    super::accept_loop(gw, listener, "https", serve_conn).await
}

async fn serve_conn(gw: Gateway, stream: TcpStream, peer: SocketAddr) {
    let conn = gw.pipeline.new_conn(peer, Front::Http);
    // Admission first: a refused connection costs no handshake (and is closed unanswered).
    let Ok(_permit) = gw.pipeline.admit_connection(&conn, Front::Http) else { return };
    let Some(config) = gw.pipeline.https_config() else { return };
    let refuse = |reason: Reason, detail: String| {
        gw.pipeline.refuse_malformed(&EgressRequest::bare(&conn, Front::Http), reason, &format!("TLS: {detail}"));
    };
    let limit = gw.pipeline.limits().header_timeout;
    let tls = match tokio::time::timeout(limit, TlsAcceptor::from(config).accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            // A refused or missing client certificate is an authentication failure; anything
            // else (not TLS, no common version or cipher) a malformed request.
            let cert = e.get_ref().and_then(|x| x.downcast_ref::<rustls::Error>()).is_some_and(|x| {
                matches!(x, rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
            });
            return refuse(if cert { Reason::AuthFailed } else { Reason::MalformedRequest }, e.to_string());
        }
        Err(_) => return refuse(Reason::HeaderTimeout, format!("no handshake within {limit:?}")),
    };
    let certificate = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => None,
        Some(der) => match ClientCert::from_der(der) {
            Ok(c) => Some(Credential::Certificate(Arc::new(c))),
            Err(e) => return refuse(Reason::AuthFailed, format!("the client certificate cannot be read: {e}")),
        },
    };
    super::http::serve_http(gw.clone(), conn, tls, certificate).await
}
