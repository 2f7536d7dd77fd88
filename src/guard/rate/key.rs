//! What a limit counts by, read from a request into a small buffer on the stack: looking up a
//! caller's bucket allocates nothing.
//!
//! The caller's IP is the connection's peer. `X-Forwarded-For` is believed only as far as the
//! limit trusts proxies in front of the workload (`xffTrustedHops`): each trusted proxy appended
//! the address it saw, so with `n` of them the client is the `n`-th entry from the right, and
//! everything left of it was written by the client and is ignored. With no trusted hops (the
//! default) the header is not read at all, so a caller cannot pick its own bucket.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName};

use super::RateRequest;

/// Key values longer than this are stored as their SHA-256, so a flood of long header values
/// costs no more memory than one of short ones.
const MAX_RAW: usize = 96;

/// A key's bytes: a tag, then the value, its digest, or an address.
pub struct KeyBuf {
    buf: [u8; MAX_RAW + 1],
    len: usize,
}

const RAW: u8 = 0;
const DIGEST: u8 = 1;
const ADDRESS: u8 = 2;
const ABSENT: u8 = 3;

impl KeyBuf {
    /// A text value (an identity, a header, a claim).
    fn text(value: &[u8]) -> KeyBuf {
        let mut k = KeyBuf { buf: [0; MAX_RAW + 1], len: 0 };
        if value.len() <= MAX_RAW {
            k.buf[0] = RAW;
            k.buf[1..=value.len()].copy_from_slice(value);
            k.len = 1 + value.len();
        } else {
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, value);
            let d = digest.as_ref();
            k.buf[0] = DIGEST;
            k.buf[1..=d.len()].copy_from_slice(d);
            k.len = 1 + d.len();
        }
        k
    }

    /// An IP address; IPv4 and IPv4-mapped IPv6 are one key.
    fn ip(ip: IpAddr) -> KeyBuf {
        let mut k = KeyBuf { buf: [0; MAX_RAW + 1], len: 17 };
        k.buf[0] = ADDRESS;
        let v6 = match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        k.buf[1..17].copy_from_slice(&v6.octets());
        k
    }

    /// The request has no value for the key: all such requests share one bucket.
    fn absent() -> KeyBuf {
        let mut k = KeyBuf { buf: [0; MAX_RAW + 1], len: 1 };
        k.buf[0] = ABSENT;
        k
    }

    fn of_text(value: Option<&[u8]>) -> KeyBuf {
        value.map_or_else(KeyBuf::absent, KeyBuf::text)
    }

    /// The bytes a bucket is found by.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// What a limit counts by, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// One bucket for the whole workload.
    Workload,
    /// The caller's SPIFFE ID (callers without one share a bucket).
    Source,
    /// The caller's IP address.
    RemoteAddress { xff_trusted_hops: u32 },
    /// A request header's first value.
    Header(HeaderName),
    /// A claim of the verified end-user token.
    Claim(Box<str>),
    /// The verified end user, `<iss>/<sub>`.
    RequestPrincipal,
}

impl KeyKind {
    /// The `key` label of `palisade_rate_limited_total`.
    pub fn label(&self) -> &'static str {
        match self {
            KeyKind::Workload => "workload",
            KeyKind::Source => "source",
            KeyKind::RemoteAddress { .. } => "remote_address",
            KeyKind::Header(_) => "header",
            KeyKind::Claim(_) => "claim",
            KeyKind::RequestPrincipal => "request_principal",
        }
    }

    /// The request's key, or `None` for the one bucket of the workload.
    pub fn of(&self, req: &RateRequest) -> Option<KeyBuf> {
        Some(match self {
            KeyKind::Workload => return None,
            KeyKind::Source => KeyBuf::of_text(req.source.map(str::as_bytes)),
            KeyKind::RemoteAddress { xff_trusted_hops } => {
                KeyBuf::ip(client_ip(req.peer_ip, req.headers, *xff_trusted_hops))
            }
            KeyKind::Header(name) => KeyBuf::of_text(req.headers.get(name).map(|v| v.as_bytes())),
            KeyKind::Claim(name) => match req.claims.and_then(|c| c.claim(name)) {
                Some(v) => KeyBuf::text(v.as_bytes()),
                None => KeyBuf::absent(),
            },
            KeyKind::RequestPrincipal => KeyBuf::of_text(req.principal.map(str::as_bytes)),
        })
    }
}

static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The client's address: the connection's `peer`, or with `hops` trusted proxies in front, the
/// `hops`-th `X-Forwarded-For` entry from the right (every header line, in order, as one list).
/// Fewer entries than hops: the leftmost, which a trusted proxy still wrote. An entry that is
/// not an address (a trusted proxy would not write one): the peer.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, hops: u32) -> IpAddr {
    if hops == 0 {
        return peer;
    }
    let mut entries = headers
        .get_all(&XFF)
        .iter()
        .rev()
        .flat_map(|line| std::str::from_utf8(line.as_bytes()).unwrap_or("").rsplit(','))
        .map(str::trim);
    let mut chosen = None;
    for _ in 0..hops {
        match entries.next() {
            Some(e) => chosen = Some(e),
            None => break,
        }
    }
    chosen.and_then(parse_address).unwrap_or(peer)
}

/// `192.0.2.1`, `2001:db8::1`, `192.0.2.1:443` or `[2001:db8::1]:443`.
fn parse_address(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(&XFF, l.parse().unwrap());
        }
        h
    }

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 9));

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn without_trusted_hops_forwarded_for_is_never_read() {
        assert_eq!(client_ip(PEER, &xff(&["203.0.113.7"]), 0), PEER);
        assert_eq!(client_ip(PEER, &HeaderMap::new(), 3), PEER, "no header: the peer");
    }

    #[test]
    fn trusted_hops_count_from_the_right_across_header_lines() {
        let h = xff(&["198.51.100.1, 203.0.113.7", "192.0.2.5"]);
        assert_eq!(client_ip(PEER, &h, 1), ip("192.0.2.5"));
        assert_eq!(client_ip(PEER, &h, 2), ip("203.0.113.7"));
        assert_eq!(client_ip(PEER, &h, 3), ip("198.51.100.1"));
        // Fewer entries than hops: the leftmost, written by a trusted proxy.
        assert_eq!(client_ip(PEER, &h, 9), ip("198.51.100.1"));
        // What the client wrote left of the trusted entries changes nothing.
        let spoofed = xff(&["1.2.3.4, 5.6.7.8, 203.0.113.7", "192.0.2.5"]);
        assert_eq!(client_ip(PEER, &spoofed, 2), ip("203.0.113.7"));
    }

    #[test]
    fn address_forms_and_garbage() {
        assert_eq!(client_ip(PEER, &xff(&["[2001:db8::1]:443"]), 1), ip("2001:db8::1"));
        assert_eq!(client_ip(PEER, &xff(&["192.0.2.1:8080"]), 1), ip("192.0.2.1"));
        assert_eq!(client_ip(PEER, &xff(&[" 2001:db8::2 "]), 1), ip("2001:db8::2"));
        assert_eq!(client_ip(PEER, &xff(&["unknown"]), 1), PEER);
        assert_eq!(client_ip(PEER, &xff(&["192.0.2.1,"]), 1), PEER, "an empty entry is no address");
    }

    #[test]
    fn keys_are_compact_and_distinct() {
        let v4 = KeyBuf::ip(ip("192.0.2.1"));
        assert_eq!(v4.as_bytes(), KeyBuf::ip(ip("::ffff:192.0.2.1")).as_bytes(), "one key per address");
        assert_ne!(v4.as_bytes(), KeyBuf::ip(ip("192.0.2.2")).as_bytes());
        let long = vec![b'x'; 10_000];
        assert_eq!(KeyBuf::text(&long).as_bytes().len(), 33, "a long value is stored as its digest");
        assert_ne!(KeyBuf::text(&long).as_bytes(), KeyBuf::text(&long[1..]).as_bytes());
        assert_ne!(KeyBuf::absent().as_bytes(), KeyBuf::text(b"").as_bytes(), "absent is not empty");
    }
}
