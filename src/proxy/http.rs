//! HTTP plumbing shared by inbound and outbound: bodies, hop-by-hop headers, request ids,
//! proxy-generated error responses.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

/// Why an upstream request failed, whichever client carried it; the source chain is kept, so a
/// TLS failure can still be found in it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body every proxy response has: the upstream's streamed body or one we wrote.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Header carrying the request id across the mesh.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Header naming why the proxy itself refused or failed a request.
pub static PALISADE_ERROR: HeaderName = HeaderName::from_static("x-palisade-error");
/// The verified caller identity, set by the inbound sidecar only.
pub static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Wraps an upstream body.
pub fn stream(body: hyper::body::Incoming) -> ProxyBody {
    body.boxed()
}

/// What one pass over a message's header names found: which hop-by-hop headers are present,
/// and whether any `x-palisade-*` header is. Every message crossing a sidecar is scanned once;
/// most carry neither, and then nothing else is looked up (each lookup is a hashed probe).
#[derive(Clone, Copy, Debug, Default)]
pub struct HeaderScan {
    hop: u16,
    palisade: bool,
}

impl HeaderScan {
    /// Scans `headers`.
    pub fn of(headers: &HeaderMap) -> Self {
        let mut scan = HeaderScan::default();
        for name in headers.keys() {
            match hop_index(name) {
                Some(i) => scan.hop |= 1 << i,
                None => scan.palisade |= name.as_str().starts_with("x-palisade-"),
            }
        }
        scan
    }

    /// Whether an `x-palisade-*` header is present.
    pub fn palisade(&self) -> bool {
        self.palisade
    }

    /// Whether an `Upgrade` header is present.
    pub fn upgrade(&self) -> bool {
        self.hop & (1 << UPGRADE_INDEX) != 0
    }
}

/// Readies a request from an app or a caller: its `x-palisade-*` headers removed (only sidecars
/// set them, and only between sidecars), an `Upgrade` outside `allowed` removed. Returns the
/// scan and whether the request switches protocols (an allowed upgrade, or `CONNECT`).
pub fn sanitize_request<B>(req: &mut http::Request<B>, allowed: &[String]) -> (HeaderScan, bool) {
    let scan = HeaderScan::of(req.headers());
    (scan, sanitize_scanned(req, scan, allowed))
}

/// [`sanitize_request`] with the scan already made; returns whether the request switches
/// protocols.
pub fn sanitize_scanned<B>(req: &mut http::Request<B>, scan: HeaderScan, allowed: &[String]) -> bool {
    if scan.palisade {
        strip_palisade_headers(req.headers_mut());
    }
    let mut upgrade = req.method() == http::Method::CONNECT;
    if scan.upgrade() {
        keep_allowed_upgrade(req.headers_mut(), allowed);
        upgrade |= req.headers().contains_key(header::UPGRADE);
    }
    upgrade
}

/// Removes every `x-palisade-*` header: only sidecars set them, and only between sidecars, so
/// any that an app or an unauthenticated caller sends is removed before it can be believed.
pub fn strip_palisade_headers(headers: &mut HeaderMap) {
    let found: Vec<HeaderName> = headers.keys().filter(|n| n.as_str().starts_with("x-palisade-")).cloned().collect();
    for name in found {
        headers.remove(name);
    }
}

/// Removes an `Upgrade` header that names a protocol outside `allowed` (or `h2c`, always): the
/// request then goes on as an ordinary request, decided and forwarded like any other.
fn keep_allowed_upgrade(headers: &mut HeaderMap, allowed: &[String]) {
    let Some(value) = headers.get(header::UPGRADE) else { return };
    let ok = value.to_str().is_ok_and(|v| {
        v.split(',').map(str::trim).all(|proto| {
            let name = proto.split('/').next().unwrap_or(proto);
            !name.eq_ignore_ascii_case("h2c") && allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
        })
    });
    if !ok {
        headers.remove(header::UPGRADE);
    }
}

/// A response the proxy writes itself: JSON body with the reason and request id.
pub fn error_response(status: StatusCode, reason: &str, request_id: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": reason, "request_id": request_id }).to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(reason) {
        h.insert(PALISADE_ERROR.clone(), v);
    }
    resp
}

/// Removes connection-specific headers (RFC 9110 §7.6.1), including any the `Connection`
/// header names. They describe one hop and must not cross the proxy.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let scan = HeaderScan::of(headers);
    strip_scanned(headers, scan);
}

/// Removes the hop-by-hop headers and the `x-palisade-*` headers of a message crossing the
/// sidecar (a response from an app): one scan finds both.
pub fn strip_hop_by_hop_and_palisade(headers: &mut HeaderMap) {
    let scan = HeaderScan::of(headers);
    if scan.palisade {
        strip_palisade_headers(headers);
    }
    strip_scanned(headers, scan);
}

/// [`strip_hop_by_hop`] with the scan already made: only the headers found are removed (a
/// hashed removal each). Most messages carry none, and the usual one is a backend's
/// `Connection: keep-alive`, which names nothing else to remove.
pub fn strip_scanned(headers: &mut HeaderMap, scan: HeaderScan) {
    let present = scan.hop;
    if present == 0 {
        return;
    }
    // Names listed in `Connection` outside the fixed set (which covers the `keep-alive` option)
    // and other than the `close` option; collected first, as they are removed from the map they
    // are read from.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.eq_ignore_ascii_case("close"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .filter(|n| hop_index(n).is_none())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(n);
        }
    }
}

/// The hop-by-hop headers of RFC 9110 §7.6.1, with the obsolete `Keep-Alive` and
/// `Proxy-Connection`; [`hop_index`] gives a name's place.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// `Upgrade`'s index in [`HOP_BY_HOP`].
const UPGRADE_INDEX: usize = 4;

/// `name`'s index in [`HOP_BY_HOP`]. A `match` on the text compiles to a switch on the length;
/// comparing with each entry in turn showed in the per-request profile (every header name of
/// every message is looked up).
fn hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "te" => 1,
        "trailer" => 2,
        "transfer-encoding" => 3,
        "upgrade" => UPGRADE_INDEX,
        "proxy-authorization" => 5,
        "proxy-authenticate" => 6,
        "keep-alive" => 7,
        "proxy-connection" => 8,
        _ => return None,
    })
}

/// The request id of a request, minting one if the caller sent none.
pub fn ensure_request_id(headers: &mut HeaderMap) -> RequestId {
    if let Some(id) = headers.get(&REQUEST_ID).filter(|v| !v.is_empty() && v.len() <= 128 && v.to_str().is_ok()) {
        return RequestId(id.clone());
    }
    let id = RequestId::mint();
    headers.insert(REQUEST_ID.clone(), id.0.clone());
    id
}

/// A request id: the header's value itself (visible ASCII, checked once), shared rather than
/// copied into a string for every request.
#[derive(Clone, Debug)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// 128 random bits as 32 lowercase hex digits.
    fn mint() -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = rand::random::<u128>();
        let mut text = [0u8; 32];
        for (i, c) in text.iter_mut().enumerate() {
            *c = HEX[((n >> (124 - 4 * i)) & 0xf) as usize];
        }
        RequestId(HeaderValue::from_bytes(&text).expect("hex digits are a valid header value"))
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;
    fn deref(&self) -> &str {
        // Only visible-ASCII values are ever wrapped (see `ensure_request_id`).
        self.0.to_str().unwrap_or_default()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl serde::Serialize for RequestId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self)
    }
}

/// The full error chain as one line, so a 502 says what actually failed.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        src = s.source();
    }
    out
}

/// Sends an upgrade (or CONNECT) request over `io` with HTTP/1.1 and, if the upstream agrees
/// (101, or 2xx to CONNECT), splices the two upgraded streams. The upstream's response goes back
/// to the caller as is.
pub async fn forward_upgrade<IO>(
    mut req: http::Request<hyper::body::Incoming>,
    io: IO,
    idle: std::time::Duration,
) -> Result<http::Response<ProxyBody>, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let upgrade = req.headers().get(header::UPGRADE).cloned();
    strip_hop_by_hop(req.headers_mut());
    if let Some(u) = upgrade {
        req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        req.headers_mut().insert(header::UPGRADE, u);
    }
    let downstream = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    let connect = parts.method == http::Method::CONNECT;
    if !connect {
        let pq = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        parts.uri = pq.parse().map_err(|e| format!("request target: {e}"))?;
    }
    parts.version = http::Version::HTTP_11;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("upgrade handshake: {e}"))?;
    tokio::spawn(conn.with_upgrades());
    let mut resp = sender
        .send_request(http::Request::from_parts(parts, body))
        .await
        .map_err(|e| format!("upgrade request: {}", error_chain(&e)))?;
    let switched = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS || (connect && resp.status().is_success());
    if switched {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(a), Ok(b)) = (downstream.await, upstream.await) else { return };
            let (mut a, mut b) = (hyper_util::rt::TokioIo::new(a), hyper_util::rt::TokioIo::new(b));
            super::tcp::splice(&mut a, &mut b, idle).await;
        });
    }
    let (parts, body) = resp.into_parts();
    Ok(http::Response::from_parts(parts, stream(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-app"));
        // Repeated `Connection` headers, odd spacing and case, a name that is also a fixed one,
        // and the `close` option (which names no header).
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.append(header::CONNECTION, HeaderValue::from_static(" X-Hop-A ,upgrade,, Keep-Alive"));
        h.insert("x-hop-a", HeaderValue::from_static("1"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-app"]);
        // A message with no hop-by-hop header is left as it is.
        let mut h = HeaderMap::new();
        h.insert("x-app", HeaderValue::from_static("kept"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        for hop in [
            "connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-authenticate",
            "keep-alive",
            "proxy-connection",
        ] {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(hop), HeaderValue::from_static("x"));
            h.insert("x-app", HeaderValue::from_static("kept"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-app"], "{hop}");
        }
    }

    #[test]
    fn hop_index_names_each_entry_by_its_place() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_index(name), Some(i), "{name}");
        }
        assert_eq!(hop_index(&header::CONTENT_LENGTH), None);
        assert_eq!(hop_index(&HeaderName::from_static("x-te")), None);
    }

    #[test]
    fn request_id_is_kept_or_minted() {
        let mut h = HeaderMap::new();
        let minted = ensure_request_id(&mut h);
        assert_eq!(minted.len(), 32);
        assert!(minted.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{minted}");
        assert_eq!(&*ensure_request_id(&mut h), &*minted);
        assert_ne!(&*ensure_request_id(&mut HeaderMap::new()), &*minted);
        // A caller's id is kept if it is short visible text, replaced otherwise.
        h.insert(&REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(&*ensure_request_id(&mut h), "abc-123");
        h.insert(&REQUEST_ID, HeaderValue::from_bytes(&[b'a'; 129]).unwrap());
        assert_eq!(ensure_request_id(&mut h).len(), 32);
        h.insert(&REQUEST_ID, HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        assert_eq!(ensure_request_id(&mut h).len(), 32);
    }
}
