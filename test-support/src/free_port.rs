//! A port nothing listens on, for a server a test starts and stops itself (a private
//! `redis-server`, chromedriver) or for an address that must refuse connections.

use std::net::TcpListener;

/// A loopback port free a moment ago: the kernel picks it for a listener that is dropped at
/// once. Another process could take it before the caller binds it; on a test machine that
/// is rare enough not to matter.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("no free port on 127.0.0.1")
        .port()
}
