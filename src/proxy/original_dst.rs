//! The destination a redirected connection was really addressed to (`SO_ORIGINAL_DST`).
//!
//! `palisade init` REDIRECTs outbound TCP to the outbound listener; conntrack remembers where
//! each connection was headed, and the kernel hands that back through a socket option.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::SockRef;
use tokio::net::TcpStream;

/// `ENOPROTOOPT` on Linux: the socket option is not registered because nf_conntrack is not loaded.
const ENOPROTOOPT: i32 = 92;

/// The original destination of a connection accepted after an iptables REDIRECT.
///
/// Fails with [`io::ErrorKind::NotFound`] when the kernel has no NAT record of the connection
/// (it was not redirected), and with [`io::ErrorKind::Unsupported`] when conntrack is absent.
/// If conntrack tracked the connection without rewriting it, the true destination (the local
/// address) comes back, which is also correct.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let addr = match local.ip() {
        IpAddr::V6(ip) if ip.to_ipv4_mapped().is_none() => sock.original_dst_v6(),
        // IPv4, or IPv4 on a dual-stack socket: the conntrack entry is an IPv4 one.
        _ => sock.original_dst_v4(),
    }
    .map_err(explain)?;
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "SO_ORIGINAL_DST returned an address that is not IP"))
}

fn explain(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::NotFound {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no original destination: the connection was not redirected by iptables ({e})"),
        )
    } else if e.raw_os_error() == Some(ENOPROTOOPT) {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("SO_ORIGINAL_DST unavailable: nf_conntrack is not loaded ({e})"),
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn an_unredirected_connection_never_yields_a_wrong_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        match original_dst(&server) {
            // The usual case: no NAT record (ENOENT), or no conntrack at all.
            Err(e) => assert!(matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::Unsupported), "{e}"),
            // A host with conntrack active in this namespace tracks loopback too: then the kernel
            // reports the real, unrewritten destination, the listener's own address.
            Ok(dst) => assert_eq!(dst, addr),
        }
    }
}
