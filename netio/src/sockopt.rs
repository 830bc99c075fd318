//! Socket options no safe crate offers (socket2 0.6 has no `IP_BIND_ADDRESS_NO_PORT`). This
//! crate is the only one in the workspace that may use `unsafe`: every other crate forbids it.

use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;

/// `IP_BIND_ADDRESS_NO_PORT`: a later `bind` to a source address leaves the port to
/// `connect`, which picks it per destination (Linux 4.2 and later; older kernels say
/// `ENOPROTOOPT`).
pub fn set_bind_address_no_port(sock: &impl AsFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a descriptor the borrow keeps open, with a c_int value and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_the_option() {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        set_bind_address_no_port(&s).unwrap();
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a c_int with its size.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!((rc, v), (0, 1));
    }
}
