//! Protocol fronts. Each only parses its protocol into an `EgressRequest`, hands it to the
//! pipeline and writes its protocol's answer back; nothing about policy, resolution or audit
//! lives here.

pub mod http;
pub mod socks5;
pub mod transparent;
