//! Protocol detection: is this connection HTTP/1, HTTP/2 (prior knowledge, so gRPC too), or
//! something opaque?
//!
//! The first bytes are *read*, not peeked, so detection works on a TLS stream as well as a socket;
//! the caller replays them with [`Prefixed`]. Detection never stalls a server-speaks-first
//! protocol (SMTP, MySQL, Redis replication): if the client says nothing within the timeout, the
//! connection is opaque at once. Linkerd waits 10 s there; we don't.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Most bytes read while deciding: an HTTP/1 request line must fit in this.
pub const MAX_PREFIX: usize = 8 * 1024;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request line came first.
    Http1,
    /// The HTTP/2 prior-knowledge preface came first.
    Http2,
    /// Anything else: TLS, a binary protocol, a silent client, or an early EOF.
    Opaque,
}

/// Reads from `io` until the protocol is known, or `timeout` passes, or [`MAX_PREFIX`] bytes.
///
/// Returns the protocol and every byte consumed, for the caller to replay with [`Prefixed`].
/// On timeout the connection is opaque with whatever arrived (nothing, for a silent client).
pub async fn detect<S>(io: &mut S, timeout: Duration) -> io::Result<(Protocol, BytesMut)>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let room = MAX_PREFIX - buf.len();
        let mut room = (&mut buf).limit(room);
        // `read_buf` is cancel-safe: a timeout never loses bytes already read.
        match tokio::time::timeout_at(deadline, io.read_buf(&mut room)).await {
            Err(_elapsed) => return Ok((Protocol::Opaque, buf)),
            Ok(Ok(0)) => return Ok((Protocol::Opaque, buf)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
        if let Some(protocol) = classify(&buf) {
            return Ok((protocol, buf));
        }
        if buf.len() >= MAX_PREFIX {
            return Ok((Protocol::Opaque, buf));
        }
    }
}

/// The protocol `buf` starts with, or `None` while more bytes could still change the answer.
pub(crate) fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    // "PRI * HTTP/2.0" also looks like an HTTP/1 request line until its version; wait it out.
    let maybe_h2 = H2_PREFACE.starts_with(buf);
    match http1_request_line(buf) {
        Some(true) => Some(Protocol::Http1),
        None => None,
        Some(false) if maybe_h2 => None,
        Some(false) => Some(Protocol::Opaque),
    }
}

/// Whether `buf` starts with `METHOD SP request-target SP HTTP/1.x` and a line end;
/// `None` if it still could.
fn http1_request_line(buf: &[u8]) -> Option<bool> {
    // Method: a token of A-Z (every registered method is upper-case).
    let method = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    // Running out of bytes (`?`) means "could still be": wait for more.
    let &after = buf.get(method)?;
    if method == 0 || after != b' ' {
        return Some(false);
    }
    // Request target: visible ASCII, at least one byte.
    let rest = &buf[method + 1..];
    let target = rest.iter().take_while(|b| b.is_ascii_graphic()).count();
    let &after = rest.get(target)?;
    if target == 0 || after != b' ' {
        return Some(false);
    }
    // Version, then the end of the line.
    const VERSION: &[u8] = b"HTTP/1.";
    let rest = &rest[target + 1..];
    let n = rest.len().min(VERSION.len());
    if rest[..n] != VERSION[..n] {
        return Some(false);
    }
    match (rest.get(VERSION.len()), rest.get(VERSION.len() + 1)) {
        (None, _) => None,
        (Some(d), _) if !d.is_ascii_digit() => Some(false),
        (Some(_), None) => None,
        (Some(_), Some(end)) => Some(matches!(end, b'\r' | b'\n')),
    }
}

/// A stream that first yields bytes already read from it (by [`detect`]), then the stream itself.
/// Writes go straight through. Hand it to hyper or `copy_bidirectional` after detection.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Replays `prefix` before reading from `inner`.
    pub fn new(prefix: impl Into<Bytes>, inner: S) -> Self {
        Prefixed { prefix: prefix.into(), inner }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream, mutably. Reading from it directly skips the unreplayed prefix.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The prefix not yet replayed, and the wrapped stream.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncWriteExt, DuplexStream, duplex};

    const LONG: Duration = Duration::from_secs(10);

    /// A client that sends `bytes` (through a pipe of `pipe` bytes, so reads see fragments)
    /// and then stays open.
    fn client_sends(bytes: &[u8], pipe: usize) -> (DuplexStream, tokio::task::JoinHandle<DuplexStream>) {
        let (mut client, server) = duplex(pipe);
        let bytes = bytes.to_vec();
        let writer = tokio::spawn(async move {
            client.write_all(&bytes).await.unwrap();
            client
        });
        (server, writer)
    }

    #[tokio::test]
    async fn an_http1_request_is_http1() {
        let req = b"GET /orders?id=7 HTTP/1.1\r\nHost: orders\r\n\r\n";
        let (mut server, _client) = client_sends(req, 64 * 1024);
        let (p, prefix) = detect(&mut server, LONG).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        assert!(req.starts_with(&prefix) && prefix.len() >= 27, "{prefix:?}");

        for line in [&b"DELETE * HTTP/1.0\n"[..], b"OPTIONS http://a/ HTTP/1.1\r\n"] {
            let (mut server, _client) = client_sends(line, 1024);
            assert_eq!(detect(&mut server, LONG).await.unwrap().0, Protocol::Http1);
        }
    }

    #[tokio::test]
    async fn the_h2_preface_is_http2() {
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS frame
        let (mut server, _client) = client_sends(&bytes, 1024);
        let (p, prefix) = detect(&mut server, LONG).await.unwrap();
        assert_eq!(p, Protocol::Http2);
        assert!(prefix.starts_with(H2_PREFACE));
    }

    #[tokio::test]
    async fn a_tls_client_hello_is_opaque_without_waiting() {
        // The start of a real ClientHello: handshake record, TLS 1.0 record version, length,
        // ClientHello, length, TLS 1.2.
        let hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
        let (mut server, _client) = client_sends(&hello, 1024);
        let start = Instant::now();
        let (p, prefix) = detect(&mut server, LONG).await.unwrap();
        assert_eq!(p, Protocol::Opaque);
        assert_eq!(&prefix[..], &hello[..prefix.len()]);
        assert!(start.elapsed() < Duration::from_secs(1), "waited for the timeout");
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_when_the_timeout_passes() {
        let (_client, mut server) = duplex(1024);
        let timeout = Duration::from_millis(100);
        let start = Instant::now();
        let (p, prefix) = detect(&mut server, timeout).await.unwrap();
        let took = start.elapsed();
        assert_eq!(p, Protocol::Opaque);
        assert!(prefix.is_empty());
        // The upper bound only proves it does not hang on; a loaded CI machine may be late.
        assert!(took >= timeout && took < timeout * 10, "{took:?}");
    }

    #[tokio::test]
    async fn bytes_split_across_many_reads_still_detect() {
        let req = b"POST /pay HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        let (mut server, _client) = client_sends(req, 3);
        assert_eq!(detect(&mut server, LONG).await.unwrap().0, Protocol::Http1);

        let (mut server, _client) = client_sends(H2_PREFACE, 2);
        let (p, prefix) = detect(&mut server, LONG).await.unwrap();
        assert_eq!((p, &prefix[..]), (Protocol::Http2, H2_PREFACE));
    }

    #[tokio::test]
    async fn near_misses_and_eof_are_opaque() {
        for bytes in [
            &b"get / HTTP/1.1\r\n"[..], // methods are upper-case
            b"GET  / HTTP/1.1\r\n",     // empty target
            b"GET / HTTP/2.0\r\n",
            b"GET / HTTP/1.1 \r\n",
            b"PRI * HTTP/2.0\r\n\r\nXX", // a broken preface
            b"+PONG\r\n",
        ] {
            let (mut server, _client) = client_sends(bytes, 1024);
            let (p, prefix) = detect(&mut server, LONG).await.unwrap();
            assert_eq!(p, Protocol::Opaque, "{bytes:?}");
            assert!(bytes.starts_with(&prefix));
        }
        // The client hangs up halfway through a request line.
        let (mut client, mut server) = duplex(1024);
        client.write_all(b"GET /a").await.unwrap();
        drop(client);
        let (p, prefix) = detect(&mut server, LONG).await.unwrap();
        assert_eq!((p, &prefix[..]), (Protocol::Opaque, &b"GET /a"[..]));
    }

    #[tokio::test]
    async fn a_request_line_longer_than_the_cap_is_opaque() {
        let mut line = b"GET /".to_vec();
        line.resize(MAX_PREFIX + 100, b'a');
        let (mut server, _client) = client_sends(&line, 64 * 1024);
        let (p, prefix) = detect(&mut server, LONG).await.unwrap();
        assert_eq!(p, Protocol::Opaque);
        assert_eq!(prefix.len(), MAX_PREFIX);
    }

    #[tokio::test]
    async fn prefixed_replays_the_consumed_bytes_exactly_then_the_rest() {
        let req = b"PUT /k HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_vec();
        // A 7-byte pipe: the writer is still blocked on the rest while detection decides.
        let (mut client, mut server) = duplex(7);
        let sent = req.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let (p, prefix) = detect(&mut server, LONG).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        assert!(prefix.len() < req.len(), "some bytes are still in the pipe");

        let mut stream = Prefixed::new(prefix, server);
        let mut seen = Vec::new();
        stream.read_to_end(&mut seen).await.unwrap();
        assert_eq!(seen, req);
        let mut client = writer.await.unwrap();

        // Writes pass straight through to the peer (read concurrently: the pipe holds 7 bytes).
        let reply = b"HTTP/1.1 204 No Content\r\n\r\n";
        let mut got = [0u8; 27];
        let (w, r) = tokio::join!(
            async {
                stream.write_all(reply).await?;
                stream.flush().await
            },
            client.read_exact(&mut got)
        );
        w.unwrap();
        r.unwrap();
        assert_eq!(&got, reply);
    }

    #[tokio::test]
    async fn prefixed_replays_into_small_buffers() {
        let (_client, server) = duplex(16);
        let mut stream = Prefixed::new(Bytes::from_static(b"abcdef"), server);
        let mut two = [0u8; 2];
        let mut got = Vec::new();
        for _ in 0..3 {
            stream.read_exact(&mut two).await.unwrap();
            got.extend_from_slice(&two);
        }
        assert_eq!(got, b"abcdef");
        let (rest, _) = stream.into_parts();
        assert!(rest.is_empty());
    }
}
