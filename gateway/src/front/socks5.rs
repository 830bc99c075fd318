//! SOCKS5 (RFC 1928) CONNECT with IPv4, IPv6 and domain targets, and RFC 1929 username/password
//! authentication when users are configured. Domain targets are resolved by the gateway.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::pipeline::{Refusal, RefusalKind};
use crate::reason::Reason;
use crate::request::{Credential, EgressRequest, Front, RawTarget};
use crate::runtime::Gateway;

/// RFC 1928 reply codes.
pub(crate) mod reply {
    /// Succeeded.
    pub(crate) const SUCCEEDED: u8 = 0x00;
    /// General SOCKS server failure.
    pub(crate) const GENERAL_FAILURE: u8 = 0x01;
    /// Connection not allowed by ruleset.
    pub(crate) const NOT_ALLOWED: u8 = 0x02;
    /// Host unreachable.
    pub(crate) const HOST_UNREACHABLE: u8 = 0x04;
    /// Connection refused.
    pub(crate) const CONNECTION_REFUSED: u8 = 0x05;
    /// Command not supported.
    pub(crate) const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    /// Address type not supported.
    pub(crate) const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;
}

/// Serves SOCKS5 on `listener` until the gateway drains.
pub(crate) async fn serve(gw: Gateway, listener: TcpListener) {
    super::accept_loop(gw, listener, "socks5", |gw, stream, peer| async move { serve_conn(&gw, stream, peer).await })
        .await
}

/// What went wrong in the handshake.
#[derive(Debug)]
enum Handshake {
    /// Close without a reply (not SOCKS5, or the client went away).
    Malformed(String),
    /// Authentication failed (already answered).
    AuthFailed(String),
    /// Answer with this reply code.
    Reply(u8, Reason, String),
}

async fn serve_conn(gw: &Gateway, mut stream: TcpStream, peer: SocketAddr) {
    let conn = gw.pipeline.new_conn(peer, Front::Socks5);
    let (users, limits) = (gw.pipeline.socks5_users(), gw.pipeline.limits());
    let (header_timeout, tunnel) = (limits.header_timeout, crate::relay::Tunnel::from(&limits));
    let permit = gw.pipeline.admit_connection(&conn, Front::Socks5);
    let shake = tokio::time::timeout(header_timeout, handshake(&mut stream, &users)).await;
    let _permit = match permit {
        Ok(p) => p,
        // Refused (and audited): the handshake is finished so that the client gets its reply.
        Err(_) => {
            if let Ok(Ok(_)) = shake {
                refuse(&mut stream, reply::GENERAL_FAILURE).await;
            }
            return;
        }
    };
    let (target, user) = match shake {
        Ok(Ok(t)) => t,
        Ok(Err(h)) => {
            let (reason, detail, code) = match h {
                Handshake::Malformed(d) => (Reason::MalformedRequest, d, None),
                Handshake::AuthFailed(d) => (Reason::AuthFailed, d, None),
                Handshake::Reply(code, reason, d) => (reason, d, Some(code)),
            };
            gw.pipeline.refuse_malformed(&EgressRequest::bare(&conn, Front::Socks5), reason, &detail);
            if let Some(code) = code {
                refuse(&mut stream, code).await;
            }
            return;
        }
        Err(_) => {
            gw.pipeline.refuse_malformed(
                &EgressRequest::bare(&conn, Front::Socks5),
                Reason::HeaderTimeout,
                "SOCKS5 handshake not completed in time",
            );
            return;
        }
    };
    let req = EgressRequest {
        id: conn.next_request_id(),
        conn,
        front: Front::Socks5,
        target,
        http: None,
        transparent: None,
        credential: user.map(|i| Credential::Socks5User(users[i].username.as_str().into())),
    };
    let _tunnel_permit = match gw.pipeline.admit_tunnel(&req) {
        Ok(p) => p,
        Err(_) => return refuse(&mut stream, reply::GENERAL_FAILURE).await,
    };
    let permit = match gw.pipeline.authorize(&req).await {
        Ok(p) => p,
        Err(r) => {
            refuse(&mut stream, code_for(&r)).await;
            return;
        }
    };
    let up = match permit.connect().await {
        Ok(u) => u,
        Err(r) => {
            refuse(&mut stream, code_for(&r)).await;
            return;
        }
    };
    let bound = up.source;
    if let Err(e) = stream.write_all(&reply_bytes(reply::SUCCEEDED, bound)).await {
        up.log.finish(0, 0, crate::audit::End::ClientClosed, None, Some(e.to_string()));
        return;
    }
    let r = crate::relay::relay_tcp(stream, up.stream, tunnel, &gw.runtime.stop).await;
    up.log.finish(r.up, r.down, r.end, None, r.error);
}

/// Answers with a failure reply and closes so that the client reads it: the write side is shut
/// (FIN after the reply), and what the client sent that was not read (the rest of a refused
/// request, data sent ahead) is drained, at most 64 KiB for at most a second, since closing a
/// socket with unread input resets it and the reset can destroy the reply in flight.
async fn refuse(stream: &mut TcpStream, code: u8) {
    super::answer_and_close(stream, &reply_bytes(code, None)).await;
}

fn code_for(r: &Refusal) -> u8 {
    match r.kind {
        RefusalKind::Denied | RefusalKind::RateLimited | RefusalKind::AuthRequired => reply::NOT_ALLOWED,
        RefusalKind::DnsFailure | RefusalKind::Unreachable | RefusalKind::ConnectTimeout => reply::HOST_UNREACHABLE,
        RefusalKind::ConnectRefused => reply::CONNECTION_REFUSED,
        RefusalKind::BadRequest
        | RefusalKind::AuditUnavailable
        | RefusalKind::LocalResources
        | RefusalKind::ConnectionLimit => reply::GENERAL_FAILURE,
    }
}

/// `VER REP RSV ATYP BND.ADDR BND.PORT`.
pub(crate) fn reply_bytes(code: u8, bound: Option<SocketAddr>) -> Vec<u8> {
    let mut v = vec![5, code, 0];
    match bound.unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)) {
        SocketAddr::V4(a) => {
            v.push(1);
            v.extend_from_slice(&a.ip().octets());
            v.extend_from_slice(&a.port().to_be_bytes());
        }
        SocketAddr::V6(a) => {
            v.push(4);
            v.extend_from_slice(&a.ip().octets());
            v.extend_from_slice(&a.port().to_be_bytes());
        }
    }
    v
}

fn malformed(e: std::io::Error) -> Handshake {
    Handshake::Malformed(format!("SOCKS5 handshake: {e}"))
}

/// The RFC 1928 greeting, RFC 1929 authentication and request, on any byte stream (tests feed
/// it bytes): the target, or what went wrong. It reads exactly what each step announces and
/// allocates at most 255 + 2 bytes for any field.
async fn handshake<S>(s: &mut S, users: &[crate::config::Socks5User]) -> Result<(RawTarget, Option<usize>), Handshake>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await.map_err(malformed)?;
    if head[0] != 5 {
        return Err(Handshake::Malformed(format!("not SOCKS5 (version byte {:#04x})", head[0])));
    }
    let mut methods = vec![0u8; head[1] as usize];
    s.read_exact(&mut methods).await.map_err(malformed)?;
    let wanted = if users.is_empty() { 0x00 } else { 0x02 };
    if !methods.contains(&wanted) {
        let _ = s.write_all(&[5, 0xff]).await;
        return Err(Handshake::AuthFailed(if users.is_empty() {
            "client offered no 'no authentication' method".into()
        } else {
            "client did not offer username/password authentication, which is required".into()
        }));
    }
    s.write_all(&[5, wanted]).await.map_err(malformed)?;
    let mut authenticated = None;
    if wanted == 0x02 {
        let mut ver = [0u8; 2];
        s.read_exact(&mut ver).await.map_err(malformed)?;
        if ver[0] != 1 {
            return Err(Handshake::Malformed(format!("bad RFC 1929 version {:#04x}", ver[0])));
        }
        let mut user = vec![0u8; ver[1] as usize];
        s.read_exact(&mut user).await.map_err(malformed)?;
        let mut plen = [0u8; 1];
        s.read_exact(&mut plen).await.map_err(malformed)?;
        let mut pass = vec![0u8; plen[0] as usize];
        s.read_exact(&mut pass).await.map_err(malformed)?;
        // Every entry is compared (in constant time), whichever matches.
        let mut matched = None;
        for (i, u) in users.iter().enumerate() {
            let hit = ct_eq(u.username.as_bytes(), &user) & ct_eq(u.password.as_bytes(), &pass);
            if hit && matched.is_none() {
                matched = Some(i);
            }
        }
        if matched.is_none() {
            let _ = s.write_all(&[1, 1]).await;
            return Err(Handshake::AuthFailed(format!(
                "bad username or password (user {:?})",
                String::from_utf8_lossy(&user)
            )));
        }
        s.write_all(&[1, 0]).await.map_err(malformed)?;
        authenticated = matched;
    }
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await.map_err(malformed)?;
    if req[0] != 5 {
        return Err(Handshake::Malformed(format!("bad request version {:#04x}", req[0])));
    }
    if req[1] != 1 {
        return Err(Handshake::Reply(
            reply::COMMAND_NOT_SUPPORTED,
            Reason::UnsupportedCommand,
            format!("command {:#04x} is not supported: only CONNECT", req[1]),
        ));
    }
    let target = match req[3] {
        1 => {
            let mut b = [0u8; 6];
            s.read_exact(&mut b).await.map_err(malformed)?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            RawTarget::Addr(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([b[4], b[5]])))
        }
        4 => {
            let mut b = [0u8; 18];
            s.read_exact(&mut b).await.map_err(malformed)?;
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[..16]);
            RawTarget::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), u16::from_be_bytes([b[16], b[17]])))
        }
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await.map_err(malformed)?;
            let mut name = vec![0u8; len[0] as usize + 2];
            s.read_exact(&mut name).await.map_err(malformed)?;
            let port = u16::from_be_bytes([name[len[0] as usize], name[len[0] as usize + 1]]);
            name.truncate(len[0] as usize);
            match String::from_utf8(name) {
                Ok(n) => RawTarget::HostPort(n, port),
                Err(_) => {
                    return Err(Handshake::Reply(
                        reply::GENERAL_FAILURE,
                        Reason::InvalidTarget,
                        "domain name is not UTF-8".into(),
                    ));
                }
            }
        }
        other => {
            return Err(Handshake::Reply(
                reply::ADDRESS_TYPE_NOT_SUPPORTED,
                Reason::UnsupportedAddressType,
                format!("address type {other:#04x} is not supported"),
            ));
        }
    };
    Ok((target, authenticated))
}

/// Constant-time byte comparison (length leaks, content does not).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Socks5User;
    use proptest::prelude::*;

    /// Runs the handshake on `input` (then end of stream): its result and what it answered.
    async fn shake(input: &[u8], users: &[Socks5User]) -> (Result<RawTarget, Handshake>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let r = handshake(&mut server, users).await.map(|(t, _)| t);
        drop(server);
        let mut answered = Vec::new();
        client.read_to_end(&mut answered).await.unwrap();
        (r, answered)
    }

    fn user() -> Vec<Socks5User> {
        vec![Socks5User {
            username: "u".into(),
            password: "p".into(),
            namespace: None,
            service_account: None,
            labels: Default::default(),
        }]
    }

    #[tokio::test]
    async fn accepts_connect_by_name_ipv4_and_ipv6() {
        let (r, out) = shake(&[5, 1, 0, 5, 1, 0, 3, 6, b'u', b'p', b'.', b't', b'e', b's', 0, 80], &[]).await;
        assert!(matches!(r, Ok(RawTarget::HostPort(ref h, 80)) if h == "up.tes"), "{r:?}");
        assert_eq!(out, [5, 0]);
        let (r, _) = shake(&[5, 1, 0, 5, 1, 0, 1, 10, 0, 0, 1, 1, 187], &[]).await;
        assert!(matches!(r, Ok(RawTarget::Addr(a)) if a == "10.0.0.1:443".parse().unwrap()), "{r:?}");
        let mut v6 = vec![5, 1, 0, 5, 1, 0, 4];
        v6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 80]);
        let (r, _) = shake(&v6, &[]).await;
        assert!(matches!(r, Ok(RawTarget::Addr(a)) if a == "[2001:db8::1]:80".parse().unwrap()), "{r:?}");
    }

    #[tokio::test]
    async fn rejects_another_version() {
        let (r, out) = shake(b"GET / HTTP/1.1\r\n\r\n", &[]).await;
        assert!(matches!(r, Err(Handshake::Malformed(ref d)) if d.contains("not SOCKS5")), "{r:?}");
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn rejects_bind_and_udp_associate_with_0x07() {
        for cmd in [2, 3] {
            let (r, _) = shake(&[5, 1, 0, 5, cmd, 0, 1, 1, 2, 3, 4, 0, 80], &[]).await;
            assert!(
                matches!(r, Err(Handshake::Reply(reply::COMMAND_NOT_SUPPORTED, Reason::UnsupportedCommand, _))),
                "{r:?}"
            );
        }
    }

    #[tokio::test]
    async fn rejects_an_unknown_address_type_with_0x08() {
        let (r, _) = shake(&[5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4, 0, 80], &[]).await;
        assert!(matches!(r, Err(Handshake::Reply(reply::ADDRESS_TYPE_NOT_SUPPORTED, _, _))), "{r:?}");
    }

    #[tokio::test]
    async fn rejects_a_name_that_is_not_utf8() {
        let (r, _) = shake(&[5, 1, 0, 5, 1, 0, 3, 2, 0xff, 0xfe, 0, 80], &[]).await;
        assert!(matches!(r, Err(Handshake::Reply(reply::GENERAL_FAILURE, Reason::InvalidTarget, _))), "{r:?}");
    }

    #[tokio::test]
    async fn rejects_a_request_cut_short() {
        for cut in 1..16 {
            let full = [5, 1, 0, 5, 1, 0, 3, 6, b'u', b'p', b'.', b't', b'e', b's', 0, 80];
            let (r, _) = shake(&full[..cut], &[]).await;
            assert!(matches!(r, Err(Handshake::Malformed(_))), "cut at {cut}: {r:?}");
        }
    }

    #[tokio::test]
    async fn rejects_no_auth_when_users_are_configured_and_wrong_credentials() {
        let (r, out) = shake(&[5, 1, 0], &user()).await;
        assert!(matches!(r, Err(Handshake::AuthFailed(_))), "{r:?}");
        assert_eq!(out, [5, 0xff]);
        let (r, out) = shake(&[5, 1, 2, 1, 1, b'u', 1, b'x'], &user()).await;
        assert!(matches!(r, Err(Handshake::AuthFailed(ref d)) if d.contains("bad username or password")), "{r:?}");
        assert_eq!(out, [5, 2, 1, 1]);
        let (r, out) = shake(&[5, 1, 2, 1, 1, b'u', 1, b'p', 5, 1, 0, 1, 10, 0, 0, 1, 0, 80], &user()).await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(out, [5, 2, 1, 0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(2000)))]

        /// Hostile bytes: never a panic, and a target only from a well-formed CONNECT request.
        #[test]
        fn never_panics_on_hostile_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600), auth in any::<bool>()) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let users = if auth { user() } else { Vec::new() };
            let (r, _) = rt.block_on(shake(&bytes, &users));
            if r.is_ok() {
                prop_assert!(bytes.len() >= 10 && bytes[0] == 5);
            }
        }

        /// Any name of 1..=255 bytes of UTF-8 comes back as sent, with its port.
        #[test]
        fn round_trips_names(name in "[a-z0-9.-]{1,255}", port in any::<u16>()) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut req = vec![5, 1, 0, 5, 1, 0, 3, name.len() as u8];
            req.extend_from_slice(name.as_bytes());
            req.extend_from_slice(&port.to_be_bytes());
            let (r, _) = rt.block_on(shake(&req, &[]));
            prop_assert!(matches!(r, Ok(RawTarget::HostPort(ref h, p)) if *h == name && p == port));
        }
    }
}
