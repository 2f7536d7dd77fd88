//! Protection of the proxy itself: timeouts, a connection cap, bounded buffers, and draining.
//!
//! Every limit has a default a production mesh can live with and a flag to change it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::future::Either;
use futures_util::task::AtomicWaker;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// Timeouts and limits (flags of `palisade proxy`).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct Limits {
    /// How long to wait for a client's first bytes before treating the connection as opaque
    /// TCP. Server-speaks-first protocols (SMTP, MySQL, ...) wait at most this long.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub detect_timeout: Duration,
    /// Destination ports that are always opaque TCP: no detection, no wait (server-speaks-first
    /// protocols: SMTP, MySQL, PostgreSQL, Redis, memcached, MongoDB, ...). Transparent mode
    /// matches the original destination port; explicit routes their listen port.
    #[arg(long, value_delimiter = ',', default_value = "25,3306,5432,6379,11211,27017")]
    pub opaque_ports: Vec<u16>,
    /// Time allowed to receive a complete HTTP/1 request head (slowloris protection).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,
    /// Time allowed to connect to an upstream (peer sidecar or app).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// An opaque TCP connection with no traffic either way for this long is closed.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Most connections served at once, all listeners together; beyond it new ones are closed.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Largest HTTP/1 request head, in bytes; larger gets 431.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Most HTTP/1 request headers; more gets 431.
    #[arg(long, default_value_t = 100)]
    pub max_headers: usize,
    /// A request body must keep arriving: after `--request-body-grace`, at least this many
    /// bytes per second on average, else the request is aborted with 408 (a body trickled a
    /// byte at a time would hold a connection to the peer and to the app). 0 turns it off.
    #[arg(long, default_value_t = 1024)]
    pub request_body_min_rate: u64,
    /// How long a request body may take before `--request-body-min-rate` applies.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub request_body_grace: Duration,
    /// Upgrade protocols let through (`Upgrade:` values, case-insensitive); any other
    /// `Upgrade` header is removed and the request goes on as a plain request, so an app that
    /// answers 101 to anything cannot turn a connection into bytes policy no longer sees.
    /// `h2c` is always removed.
    #[arg(long, value_delimiter = ',', default_value = "websocket")]
    pub allowed_upgrades: Vec<String>,
    /// On SIGTERM or `POST /shutdown`, how long in-flight requests get to finish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub drain_timeout: Duration,
}

impl Limits {
    /// The pace request bodies must keep.
    pub fn body_pace(&self) -> super::body::Pace {
        super::body::Pace { min_rate: self.request_body_min_rate, grace: self.request_body_grace }
    }
}

mod humantime_serde_compat {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// Admission and draining shared by every listener of a sidecar.
pub struct Drain {
    permits: Arc<Semaphore>,
    max: usize,
    draining: watch::Sender<bool>,
    refused: AtomicU64,
}

/// Held by a connection for its lifetime.
pub struct ConnPermit {
    _permit: OwnedSemaphorePermit,
}

impl Drain {
    /// A drain admitting at most `max` connections.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Drain {
            permits: Arc::new(Semaphore::new(max)),
            max,
            draining: watch::channel(false).0,
            refused: AtomicU64::new(0),
        })
    }

    /// A permit for one more connection, or `None` when at the limit or draining.
    pub fn admit(&self) -> Option<ConnPermit> {
        if *self.draining.borrow() {
            return None;
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(ConnPermit { _permit: p }),
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Connections refused at the limit.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Resolves when draining starts. Listeners stop accepting; connections finish gracefully.
    pub fn signaled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.draining.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// Starts draining and waits until every connection has closed or `grace` has passed.
    /// Returns the number of connections still open at the end.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.draining.send_replace(true);
        // Every open connection holds a permit: holding all of them means none is open.
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        match tokio::time::timeout(grace, self.permits.acquire_many(all)).await {
            Ok(Ok(_every_permit)) => 0,
            _ => self.open(),
        }
    }
}

/// Accepts connections on `listener` until draining starts: each admitted connection (under the
/// cap) is counted as open for `direction` and handed to `handle` on its own task.
pub async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    drain: Arc<Drain>,
    metrics: Arc<crate::telemetry::metrics::ProxyMetrics>,
    direction: &'static str,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let stop = drain.signaled();
    tokio::pin!(stop);
    // Out of descriptors, an accept backs off instead of spinning on a listener that stays
    // readable; failures are counted in `palisade_accept_errors_total`.
    let stats = crate::listener::ListenerStats::counting_into(metrics.accept_errors.clone());
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = crate::listener::accept(&listener, direction, &stats) => accepted,
            _ = &mut stop => return,
        };
        let Some(permit) = drain.admit() else {
            tracing::warn!(%remote, direction, "connection refused: connection limit reached or draining");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let open = metrics.open_connection(direction);
        let work = handle(tcp, remote);
        tokio::spawn(async move {
            work.await;
            drop((permit, open));
        });
    }
}

/// Runs `work` until it finishes or `interrupt` does, whichever is first.
///
/// Unlike `tokio::select!`, `interrupt` is polled only after its own waker fired. A connection's
/// task wakes several times per request, and the drain and revocation watches it must heed
/// change almost never: polling them on every wake-up took each watch's waiter lock and, with
/// `select!`'s random branch order, cost 200-400 instructions per request and sidecar
/// (`bench/instructions`).
pub fn heed<W, I>(work: W, interrupt: I) -> Heed<W, I>
where
    W: Future + Unpin,
    I: Future + Unpin,
{
    let flag = Arc::new(Flag { woken: AtomicBool::new(true), task: AtomicWaker::new() });
    Heed { work, interrupt, waker: Waker::from(flag.clone()), flag }
}

/// The future [`heed`] returns: `Left` with the work's output, or `Right` with the interrupt's.
pub struct Heed<W, I> {
    work: W,
    interrupt: I,
    flag: Arc<Flag>,
    /// Wakes the task through `flag`, so the next poll knows `interrupt` asked for it.
    waker: Waker,
}

struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<W, I> Future for Heed<W, I>
where
    W: Future + Unpin,
    I: Future + Unpin,
{
    type Output = Either<W::Output, I::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        // Registered before the flag is read: a wake-up between the two is seen by the read, one
        // after it wakes this task again.
        this.flag.task.register(cx.waker());
        if this.flag.woken.swap(false, Ordering::AcqRel)
            && let Poll::Ready(out) = Pin::new(&mut this.interrupt).poll(&mut Context::from_waker(&this.waker))
        {
            return Poll::Ready(Either::Right(out));
        }
        Pin::new(&mut this.work).poll(cx).map(Either::Left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields `n` times, waking itself each time, then finishes.
    struct Yields(usize);

    impl Future for Yields {
        type Output = &'static str;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<&'static str> {
            if self.0 == 0 {
                return Poll::Ready("done");
            }
            self.0 -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// Never finishes; counts its polls.
    struct CountsPolls(Arc<AtomicU64>);

    impl Future for CountsPolls {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn heed_polls_the_interrupt_once_while_the_work_wakes_itself() {
        let polls = Arc::new(AtomicU64::new(0));
        let out = heed(Yields(1000), CountsPolls(polls.clone())).await;
        assert!(matches!(out, Either::Left("done")));
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled at the start only: its waker never fired");
    }

    #[tokio::test]
    async fn heed_returns_the_interrupt_when_its_waker_fires() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let work = std::future::pending::<()>();
        tokio::pin!(work);
        let fire = tokio::spawn(async move { tx.send(7) });
        let out = tokio::time::timeout(Duration::from_secs(10), heed(work.as_mut(), rx)).await;
        assert!(matches!(out.expect("the interrupt woke the task"), Either::Right(Ok(7))));
        fire.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn heed_sees_a_drain_that_started_before_the_first_poll() {
        let d = Drain::new(1);
        let (stop, work) = (d.signaled(), std::future::pending::<()>());
        tokio::pin!(stop, work);
        d.draining.send_replace(true);
        // Nothing wakes the task after this: it finishes only if the first poll looks.
        let out = tokio::time::timeout(Duration::from_secs(10), heed(work.as_mut(), stop.as_mut())).await;
        assert!(matches!(out.expect("the first poll saw the drain"), Either::Right(())));
    }

    #[tokio::test]
    async fn admits_up_to_the_limit_and_nothing_while_draining() {
        let d = Drain::new(2);
        let a = d.admit().unwrap();
        let _b = d.admit().unwrap();
        assert!(d.admit().is_none());
        assert_eq!(d.refused(), 1);
        drop(a);
        assert_eq!(d.open(), 1);
        let left = d.drain(Duration::from_millis(50)).await;
        assert_eq!(left, 1, "a connection still open at the deadline is reported");
        assert!(d.admit().is_none(), "draining admits nothing");
    }

    #[tokio::test]
    async fn drain_returns_when_the_last_connection_closes_not_at_the_deadline() {
        let d = Drain::new(3);
        let conn = d.admit().unwrap();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let closer = tokio::spawn(async move {
            let _ = closed_rx.await;
            drop(conn);
        });
        let drained = {
            let d = d.clone();
            tokio::spawn(async move { d.drain(Duration::from_secs(60)).await })
        };
        assert!(!drained.is_finished());
        closed_tx.send(()).unwrap();
        let left = tokio::time::timeout(Duration::from_secs(10), drained).await;
        assert_eq!(left.expect("drain woke on the close, not at its 60 s deadline").unwrap(), 0);
        closer.await.unwrap();
    }
}
