//! What every listener shares, so that none holds an idle or half-sent connection forever and
//! none spins when the process runs out of file descriptors.
//!
//! - [`Listener`]: a cap on the connections a listener holds open. Over the cap a new
//!   connection is accepted and closed at once: its client learns at once and retries, the
//!   process never holds more descriptors than its caps, and the kernel backlog keeps draining
//!   (waiting in the backlog instead would leave clients hanging on a full backlog, honest ones
//!   behind the flood). Caps fit under the process's descriptor limit ([`fit_to_fd_limit`]).
//! - [`accept`]: on `EMFILE`/`ENFILE`/`ENOBUFS`/`ENOMEM` it backs off (10 ms doubling to
//!   100 ms) instead of retrying a listener that stays readable — the spin that burnt a core
//!   while the flood lasted — and logs at most once a second, with a counter.
//! - [`Deadline`]: the connection fails when its client sends nothing in time: its first bytes
//!   (TLS ClientHello, request head, HTTP/2 preface) within the header timeout, then some
//!   progress, read or written, within the idle timeout. Protocol timers (hyper's header-read
//!   timeout, HTTP/2 keepalive) sit on top of it.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default time a client has to send its first bytes (and a request head, where HTTP/1).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection may make no progress at all.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Timeouts and cap of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    pub max_connections: usize,
    /// Most connections from one source IP (0: no such cap), so that one flooding client
    /// cannot take every place (a kubelet probe or a scrape from elsewhere still gets in).
    pub max_per_source: usize,
    /// First bytes, TLS handshake, HTTP/1 request head.
    pub header_timeout: Duration,
    /// No progress either way.
    pub idle_timeout: Duration,
}

impl ListenerLimits {
    /// The limits of the listener `name` (`admin`, `grpc`, `webhook`): `default_max`
    /// connections fitted under the descriptor limit, unless `PALISADE_<NAME>_MAX_CONNECTIONS`
    /// sets it (taken as given); timeouts from `PALISADE_HEADER_TIMEOUT` and
    /// `PALISADE_IDLE_TIMEOUT` (humantime: `10s`, `500ms`), else the defaults.
    pub fn from_env(name: &str, default_max: usize) -> ListenerLimits {
        let var = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        let duration = |key: &str, default: Duration| match var(key).map(|v| humantime::parse_duration(&v)) {
            Some(Ok(d)) if !d.is_zero() => d,
            Some(_) => {
                tracing::warn!(variable = key, ?default, "not a positive duration; using the default");
                default
            }
            None => default,
        };
        let max_key = format!("PALISADE_{}_MAX_CONNECTIONS", name.to_ascii_uppercase());
        let max_connections = match var(&max_key).map(|v| v.parse::<usize>()) {
            Some(Ok(n)) if n > 0 => n,
            _ => fit_to_fd_limit(name, default_max, 1),
        };
        ListenerLimits {
            max_connections,
            max_per_source: 0,
            header_timeout: duration("PALISADE_HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT),
            idle_timeout: duration("PALISADE_IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT),
        }
    }
}

impl ListenerLimits {
    /// These limits with at most `n` connections per source IP.
    pub fn per_source(self, n: usize) -> ListenerLimits {
        ListenerLimits { max_per_source: n, ..self }
    }
}

/// The soft limit on open file descriptors, from `/proc/self/limits` (no `unsafe` needed).
pub fn fd_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// `wanted` connections, or fewer if `fds_per_connection` descriptors each would not fit under
/// the descriptor limit less an eighth and 64 (kept for the small admin listeners, pools, the
/// store, logs). Past that, [`accept`] backs off.
pub fn fit_to_fd_limit(name: &str, wanted: usize, fds_per_connection: usize) -> usize {
    let Some(limit) = fd_limit() else { return wanted };
    let room = usize::try_from(limit - limit / 8).unwrap_or(usize::MAX).saturating_sub(64) / fds_per_connection.max(1);
    let fitted = wanted.min(room.max(4));
    if fitted < wanted {
        tracing::info!(
            listener = name,
            wanted,
            fitted,
            fd_limit = limit,
            "connection cap lowered to fit the descriptor limit"
        );
    }
    fitted
}

/// Counters a listener keeps; a metrics registry may register them.
#[derive(Default)]
pub struct ListenerStats {
    /// Accepts that failed (out of descriptors or buffers, or aborted by the client).
    pub accept_errors: Counter,
    /// Connections closed at once because the listener was at its cap.
    pub over_cap: Counter,
    last_log: Mutex<Option<Instant>>,
}

impl ListenerStats {
    /// Stats whose accept errors count into `accept_errors` (a registered metric).
    pub fn counting_into(accept_errors: Counter) -> ListenerStats {
        ListenerStats { accept_errors, ..Default::default() }
    }

    /// Whether a warning may be logged now (at most one a second per listener).
    fn may_log(&self) -> bool {
        let mut last = self.last_log.lock();
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// Whether an accept error means the process (or the system) ran out of a resource: retrying
/// at once would fail the same way while the pending connection keeps the listener readable.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12)) || e.kind() == io::ErrorKind::OutOfMemory
}

/// Accepts the next connection. Errors never end the loop and never spin it: resource
/// exhaustion backs off 10 ms doubling to 100 ms until an accept succeeds; any other error
/// (`ECONNABORTED` concerns one connection) waits 1 ms, doubling likewise if it persists.
pub async fn accept(listener: &TcpListener, name: &'static str, stats: &ListenerStats) -> (TcpStream, SocketAddr) {
    let mut backoff = None;
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                stats.accept_errors.inc();
                let exhausted = is_resource_exhaustion(&e);
                if stats.may_log() {
                    tracing::warn!(listener = name, error = %e, errors = stats.accept_errors.get(), exhausted,
                        "accept failed; backing off");
                }
                let first = Duration::from_millis(if exhausted { 10 } else { 1 });
                let wait = backoff.map_or(first, |b: Duration| (b * 2).max(first).min(Duration::from_millis(100)));
                backoff = Some(wait);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Open connections per source IP, shared by a listener and its admitted connections.
type SourceCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A listener with a connection cap.
pub struct Listener {
    inner: TcpListener,
    name: &'static str,
    permits: Arc<Semaphore>,
    per_source: SourceCounts,
    pub limits: ListenerLimits,
    pub stats: Arc<ListenerStats>,
}

/// Held by a connection for its lifetime; dropping it frees a place under the cap.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    source: Option<(SourceCounts, IpAddr)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some((per_source, ip)) = self.source.take() {
            let mut per_source = per_source.lock();
            if let Some(n) = per_source.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_source.remove(&ip);
                }
            }
        }
    }
}

impl Listener {
    /// `listener` under `limits`.
    pub fn new(inner: TcpListener, name: &'static str, limits: ListenerLimits) -> Listener {
        Listener {
            inner,
            name,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            per_source: Default::default(),
            limits,
            stats: Default::default(),
        }
    }

    /// The next connection under the cap; connections over it are closed at once.
    pub async fn accept(&self) -> (TcpStream, SocketAddr, Admitted) {
        loop {
            let (tcp, remote) = accept(&self.inner, self.name, &self.stats).await;
            // The listener's place first: a connection refused there has taken no place of
            // its source's (a source's count is given back only by a dropped `Admitted`).
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.refused(remote, self.limits.max_connections, "listener at its cap");
                continue;
            };
            match self.admit_source(remote.ip()) {
                Ok(source) => return (tcp, remote, Admitted { _permit: permit, source }),
                Err(()) => self.refused(remote, self.limits.max_per_source, "its source is at its cap"),
            }
        }
    }

    /// Counts (and, rate-limited, logs) a connection closed over `cap`.
    fn refused(&self, remote: SocketAddr, cap: usize, why: &str) {
        self.stats.over_cap.inc();
        if self.stats.may_log() {
            tracing::warn!(listener = self.name, %remote, cap, refused = self.stats.over_cap.get(),
                "connection closed: {why}");
        }
    }

    /// A place for one more connection from `ip` under the per-source cap.
    fn admit_source(&self, ip: IpAddr) -> Result<Option<(SourceCounts, IpAddr)>, ()> {
        if self.limits.max_per_source == 0 {
            return Ok(None);
        }
        let ip = ip.to_canonical();
        let mut per_source = self.per_source.lock();
        let n = per_source.entry(ip).or_default();
        if *n >= self.limits.max_per_source {
            return Err(());
        }
        *n += 1;
        Ok(Some((self.per_source.clone(), ip)))
    }

    /// `io` under this listener's timeouts (see [`Deadline`]), holding its place under the cap.
    pub fn deadline<IO>(&self, io: IO, admitted: Admitted) -> Deadline<IO> {
        let mut io = Deadline::new(io, self.limits.header_timeout, self.limits.idle_timeout);
        io._admitted = Some(admitted);
        io
    }
}

/// An IO that fails with `TimedOut` when its client is silent: no byte within `first` of
/// the start, then no progress (a byte read or written) for `idle` (detected within twice that:
/// progress only sets a flag the timer looks at when it fires, so the data path pays a store
/// per read, not a timer reset).
pub struct Deadline<IO> {
    io: IO,
    timer: Pin<Box<tokio::time::Sleep>>,
    idle: Duration,
    progressed: bool,
    /// Whether a read that waits counts as silence.
    reads: ReadTimer,
    /// The connection's place under its listener's cap, freed with the IO.
    _admitted: Option<Admitted>,
}

/// Whether a [`Deadline`]'s reads are timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadTimer {
    Timed,
    /// Until the first byte arrives, then [`ReadTimer::Untimed`].
    UntilFirstByte,
    Untimed,
}

impl<IO> Deadline<IO> {
    /// `io`, whose first bytes must arrive within `first`.
    pub fn new(io: IO, first: Duration, idle: Duration) -> Deadline<IO> {
        Deadline {
            io,
            timer: Box::pin(tokio::time::sleep(first)),
            idle,
            progressed: false,
            reads: ReadTimer::Timed,
            _admitted: None,
        }
    }

    /// `io` served by an HTTP server that times its reads out itself (hyper's header-read
    /// timeout, which also closes a kept-alive HTTP/1 connection waiting for its next request;
    /// HTTP/2 keepalive pings; the request-body pace of [`crate::proxy`]): after the first
    /// bytes only a write that stays blocked for `idle` (a client that stopped reading) fails.
    /// A read waiting for the next request then never touches the timer, which keeps the
    /// deadline off the per-request path of a kept-alive connection.
    pub fn http_server(io: IO, first: Duration, idle: Duration) -> Deadline<IO> {
        Deadline { reads: ReadTimer::UntilFirstByte, ..Deadline::new(io, first, idle) }
    }

    fn progress(&mut self) {
        self.progressed = true;
    }

    fn expired<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        loop {
            match self.timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if self.progressed => {
                    self.progressed = false;
                    self.timer.as_mut().reset(tokio::time::Instant::now() + self.idle);
                }
                Poll::Ready(()) => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "client silent for too long")));
                }
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Deadline<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.progress();
                    if this.reads == ReadTimer::UntilFirstByte {
                        this.reads = ReadTimer::Untimed;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.reads == ReadTimer::Untimed => Poll::Pending,
            Poll::Pending => this.expired(cx),
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Deadline<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.progress();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // A client that stops reading holds the connection as surely as a silent one.
            Poll::Pending => this.expired(cx),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.expired(cx),
            done => done,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.progress();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.expired(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Deadline<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_silent_client_fails_after_the_first_byte_deadline_and_a_talking_one_does_not() {
        let (client, server) = tokio::io::duplex(64);
        let mut io = Deadline::new(server, Duration::from_millis(100), Duration::from_secs(60));
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(100) && started.elapsed() < Duration::from_secs(5));
        drop(client);

        // Progress keeps it alive: three reads 60 ms apart outlive a 100 ms first deadline.
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = Deadline::new(server, Duration::from_millis(100), Duration::from_millis(100));
        let writer = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                client.write_all(b"x").await.unwrap();
            }
            client
        });
        for _ in 0..3 {
            assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        }
        let _client = writer.await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::TimedOut, "then idle");
    }

    #[tokio::test]
    async fn an_http_server_io_times_out_its_first_bytes_but_not_a_read_after_them() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = Deadline::http_server(server, Duration::from_millis(100), Duration::from_millis(100));
        client.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        // Waiting for the next request is the HTTP server's to time out, not this IO's.
        let waiting = tokio::time::timeout(Duration::from_millis(400), io.read(&mut buf)).await;
        assert!(waiting.is_err(), "a read after the first bytes timed out in the IO: {waiting:?}");
        // Still silent from the start: timed out.
        let (_client, server) = tokio::io::duplex(64);
        let mut io = Deadline::http_server(server, Duration::from_millis(100), Duration::from_secs(60));
        assert_eq!(io.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn over_the_cap_a_connection_is_closed_at_once_and_a_freed_place_is_reused() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let limits = ListenerLimits {
            max_connections: 1,
            max_per_source: 0,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        };
        let listener = Arc::new(Listener::new(inner, "test", limits));
        let _first = TcpStream::connect(addr).await.unwrap();
        let (_tcp, _, admitted) = listener.accept().await;
        let mut second = TcpStream::connect(addr).await.unwrap();
        let accepting = tokio::spawn({
            let listener = listener.clone();
            async move { listener.accept().await.1 }
        });
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf)).await.expect("closed at once");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(listener.stats.over_cap.get(), 1);
        drop(admitted);
        let third = TcpStream::connect(addr).await.unwrap();
        let admitted_from = tokio::time::timeout(Duration::from_secs(5), accepting).await.unwrap().unwrap();
        assert_eq!(admitted_from, third.local_addr().unwrap());
    }

    #[tokio::test]
    async fn a_connection_refused_at_the_listeners_cap_takes_no_place_of_its_source() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let limits = ListenerLimits {
            max_connections: 1,
            max_per_source: 1,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        };
        let listener = Arc::new(Listener::new(inner, "test", limits));
        let from = |ip: &'static str| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            socket.connect(addr).await.unwrap()
        };
        let _first = from("127.0.0.1").await;
        let (_tcp, _, admitted) = listener.accept().await;
        // 127.0.0.2 is refused at the listener's cap while the first connection lives...
        let _refused = from("127.0.0.2").await;
        let accepting = tokio::spawn({
            let listener = listener.clone();
            async move { listener.accept().await.1 }
        });
        wait_until(|| listener.stats.over_cap.get() == 1).await;
        // ...and once it is gone, 127.0.0.2 has its one place.
        drop(admitted);
        let again = from("127.0.0.2").await;
        let admitted_from = tokio::time::timeout(Duration::from_secs(5), accepting).await.expect("admitted").unwrap();
        assert_eq!(admitted_from, again.local_addr().unwrap());
        assert_eq!(listener.stats.over_cap.get(), 1, "refused as over its source's cap");
    }

    async fn wait_until(cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "condition not reached within 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn the_descriptor_limit_is_read_without_unsafe() {
        assert!(fd_limit().is_some_and(|n| n > 0));
        assert!(fit_to_fd_limit("test", usize::MAX, 2) < usize::MAX);
        assert_eq!(fit_to_fd_limit("test", 1, 2), 1);
    }
}
