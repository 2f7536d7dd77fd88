//! HTTP/1.1 connection reuse on the data path without a pool operation per request.
//!
//! An HTTP/1.1 connection carries one request at a time, and so does the downstream HTTP/1.1
//! connection a request arrives on. So each downstream connection keeps ("sticks to") the
//! upstream connection it last used, and sends its next request over it: the shared [`Pool`] is
//! touched when the downstream connection starts, when it closes, and when its connection was
//! lent away, not per request. hyper-util's pooled client, which this replaces for HTTP/1.1,
//! checked a connection out of a hashed map and back in through a spawned readiness task on
//! every request.
//!
//! A held connection is still the pool's to lend: a downstream connection that finds no idle
//! connection in the pool takes one that another downstream connection holds between its
//! requests, rather than paying a handshake while connections sit idle (nginx's shared
//! keep-alive pool has the same property). So the pool holds about as many connections as
//! requests were in flight at once, not one per downstream connection.
//!
//! A request that was never written (the connection turned out closed) is retried on another
//! connection; one that was written is not, as it may have had effects.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;

use super::body::RequestBody;
use hyper::client::conn::http1::SendRequest;

/// Opens a new upstream byte stream (TCP, or mTLS to a peer sidecar).
pub trait Dial: Send + Sync + 'static {
    type Io: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static;
    fn dial(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

/// Why a request could not be carried.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("HTTP/1.1 handshake: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("{0}")]
    Request(#[source] hyper::Error),
}

/// Idle HTTP/1.1 connections to one upstream, shared by every downstream connection.
pub struct Pool<D> {
    dial: D,
    idle: parking_lot::Mutex<Vec<Idle>>,
    /// An idle connection older than this is closed rather than reused: the upstream may be
    /// closing it at the same moment, and a request written into it would fail.
    max_idle_time: Duration,
    /// Replaced by a new pool: connections given back are closed, not kept.
    retired: AtomicBool,
    /// The slots of downstream connections holding a connection of this pool, for
    /// [`Pool::take`] to borrow from when `idle` is empty. Dead entries are swept as it goes.
    lent: parking_lot::Mutex<Vec<Weak<Slot<D>>>>,
}

/// Where a downstream connection keeps its upstream connection (and that connection's pool)
/// between requests.
type Slot<D> = parking_lot::Mutex<Option<(Arc<Pool<D>>, Idle)>>;

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// More idle connections than this to one upstream are closed instead of kept.
const MAX_IDLE: usize = 1024;
/// Connections tried for one request before a fresh dial: idle ones may turn out closed.
const MAX_TRIES: usize = 3;

impl<D: Dial> Pool<D> {
    pub fn new(dial: D, max_idle_time: Duration) -> Arc<Self> {
        Arc::new(Pool {
            dial,
            idle: parking_lot::Mutex::new(Vec::new()),
            max_idle_time,
            retired: AtomicBool::new(false),
            lent: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// Closes the idle connections and every one given back later: the pool has been replaced,
    /// e.g. because revocations changed and each peer must be judged by a fresh handshake.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.idle.lock().clear();
        self.lent.lock().clear();
    }

    /// A ready idle connection, if one is left (the most recently used first), else one that a
    /// downstream connection holds between its requests.
    fn take(self: &Arc<Self>) -> Option<SendRequest<RequestBody>> {
        {
            let mut idle = self.idle.lock();
            while let Some(mut c) = idle.pop() {
                if c.since.elapsed() < self.max_idle_time && is_ready_now(&mut c.sender) {
                    return Some(c.sender);
                }
            }
        }
        self.borrow()
    }

    /// Takes a ready connection from a downstream connection that holds one of this pool between
    /// its requests; that connection takes or dials another on its next request. A slot in use
    /// (its owner is sending) is skipped, never waited for.
    fn borrow(self: &Arc<Self>) -> Option<SendRequest<RequestBody>> {
        let mut found = None;
        self.lent.lock().retain(|slot| {
            let Some(slot) = slot.upgrade() else { return false };
            if found.is_none()
                && let Some(mut held) = slot.try_lock()
                && let Some((pool, c)) = held.as_mut()
                && Arc::ptr_eq(pool, self)
                && c.since.elapsed() < self.max_idle_time
                && is_ready_now(&mut c.sender)
            {
                found = held.take().map(|(_, c)| c.sender);
            }
            true
        });
        found
    }

    /// Makes `slot` a place [`Pool::borrow`] looks; called once per downstream connection and
    /// pool.
    fn lend_from(&self, slot: &Arc<Slot<D>>) {
        let mut lent = self.lent.lock();
        // Closed downstream connections leave dead entries; sweep them as the list doubles.
        if lent.len() >= 64 && lent.len().is_power_of_two() {
            lent.retain(|w| w.strong_count() > 0);
        }
        lent.push(Arc::downgrade(slot));
    }

    /// Keeps `sender` for reuse once it is ready; a closed or expired one, or any once the pool
    /// is retired, is dropped (closing it).
    fn put(self: &Arc<Self>, mut c: Idle) {
        if self.retired.load(Ordering::Acquire) || c.sender.is_closed() || c.since.elapsed() >= self.max_idle_time {
            return;
        }
        if is_ready_now(&mut c.sender) {
            let mut idle = self.idle.lock();
            if idle.len() < MAX_IDLE {
                idle.push(c);
            }
            return;
        }
        // Still finishing a response: keep it once that is done (rare: a downstream connection
        // that went away in the middle of a response, or a sender shared by HTTP/2 streams).
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if c.sender.ready().await.is_ok()
                && let Some(pool) = pool.upgrade()
            {
                c.since = Instant::now();
                pool.put(c);
            }
        });
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, SendError> {
        let io = self.dial.dial().await.map_err(SendError::Connect)?;
        let (sender, conn) =
            hyper::client::conn::http1::Builder::new().handshake(io).await.map_err(SendError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended with error");
            }
        });
        Ok(sender)
    }
}

/// Whether `sender` can take a request right now (without waiting).
fn is_ready_now(sender: &mut SendRequest<RequestBody>) -> bool {
    matches!(sender.ready().now_or_never(), Some(Ok(())))
}

/// The upstream connection one downstream connection holds between its requests. Dropping it
/// (the downstream connection closed) gives the connection back to its pool.
pub struct Sticky<D: Dial> {
    held: Arc<Slot<D>>,
    /// The pool whose [`Pool::borrow`] knows `held`.
    lent_to: parking_lot::Mutex<Weak<Pool<D>>>,
}

impl<D: Dial> Default for Sticky<D> {
    fn default() -> Self {
        Sticky { held: Arc::default(), lent_to: parking_lot::Mutex::new(Weak::new()) }
    }
}

impl<D: Dial> Drop for Sticky<D> {
    fn drop(&mut self) {
        if let Some((pool, c)) = self.held.lock().take() {
            pool.put(c);
        }
    }
}

impl<D: Dial> Sticky<D> {
    /// Sends `req` through `pool`: over the held connection if it is ready, else an idle one of
    /// the pool, else a new one. `req` must carry `Host` and an origin-form target. A held
    /// connection of another pool (the pool was replaced, e.g. after a revocation) is given back
    /// to that pool, which closes it once retired.
    pub async fn send(
        &self,
        pool: &Arc<Pool<D>>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut tries = 0;
        loop {
            // After MAX_TRIES reused connections turned out to be closing, dial: a fresh
            // connection either answers or fails, so the loop ends.
            let reusable = if tries < MAX_TRIES { self.ready_sender(pool) } else { None };
            tries += 1;
            let (mut sender, reused) = match reusable {
                Some(s) => (s, true),
                None => (pool.connect().await?, false),
            };
            let sent = sender.try_send_request(req);
            match sent.await {
                Ok(resp) => {
                    // Held again only once the response has started, so a second request sent
                    // over the same downstream connection meanwhile (HTTP/2) takes another.
                    let previous = self.held.lock().replace((pool.clone(), Idle { sender, since: Instant::now() }));
                    if let Some((p, c)) = previous {
                        p.put(c);
                    }
                    let mut lent_to = self.lent_to.lock();
                    if lent_to.as_ptr() != Arc::as_ptr(pool) {
                        pool.lend_from(&self.held);
                        *lent_to = Arc::downgrade(pool);
                    }
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the reused connection was closing. Try another.
                    Some(back) if reused => req = back,
                    _ => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }

    /// The held connection if it belongs to `pool` and is ready, else an idle one of `pool`.
    fn ready_sender(&self, pool: &Arc<Pool<D>>) -> Option<SendRequest<RequestBody>> {
        if let Some((p, mut c)) = self.held.lock().take() {
            if Arc::ptr_eq(&p, pool) && c.since.elapsed() < pool.max_idle_time && is_ready_now(&mut c.sender) {
                return Some(c.sender);
            }
            p.put(c);
        }
        pool.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::{TcpListener, TcpStream};

    struct CountingDial {
        addr: std::net::SocketAddr,
        dials: Arc<AtomicUsize>,
    }

    impl Dial for CountingDial {
        type Io = hyper_util::rt::TokioIo<TcpStream>;
        async fn dial(&self) -> std::io::Result<Self::Io> {
            self.dials.fetch_add(1, Ordering::SeqCst);
            Ok(hyper_util::rt::TokioIo::new(TcpStream::connect(self.addr).await?))
        }
    }

    /// An HTTP/1.1 server answering every request with the number of its connection; the
    /// connection closes after `per_conn` requests (`Connection: close` on the last).
    async fn server(per_conn: usize) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for n in 0.. {
                let (tcp, _) = listener.accept().await.unwrap();
                let served = Arc::new(AtomicUsize::new(0));
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let k = served.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        let mut resp = Response::new(http_body_util::Full::new(bytes::Bytes::from(format!("{n}"))));
                        if k == per_conn {
                            resp.headers_mut().insert(http::header::CONNECTION, "close".parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
                );
            }
        });
        addr
    }

    /// Requests with a body of type `Incoming` come from a real connection: a tiny relay turns
    /// an empty request into one.
    async fn relay_request(addr: std::net::SocketAddr) -> Request<RequestBody> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = parking_lot::Mutex::new(Some(tx));
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                if let Some(tx) = tx.lock().take() {
                    let _ = tx.send(req);
                }
                async { Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new())) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
        tokio::spawn(async move {
            let tcp = TcpStream::connect(local).await.unwrap();
            let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
            tokio::spawn(conn);
            let req =
                Request::get("/").header("host", addr.to_string()).body(http_body_util::Empty::<bytes::Bytes>::new());
            let _ = s.send_request(req.unwrap()).await;
        });
        rx.await.unwrap().map(RequestBody::unpaced)
    }

    /// A pool dialling `addr`, and the count of its dials.
    fn counted_pool(addr: std::net::SocketAddr, max_idle: Duration) -> (Arc<Pool<CountingDial>>, Arc<AtomicUsize>) {
        let dials = Arc::new(AtomicUsize::new(0));
        (Pool::new(CountingDial { addr, dials: dials.clone() }, max_idle), dials)
    }

    async fn body(resp: Response<Incoming>) -> String {
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn one_downstream_connection_keeps_one_upstream_connection() {
        let addr = server(usize::MAX).await;
        let (pool, dials) = counted_pool(addr, Duration::from_secs(60));
        let sticky = Sticky::default();
        for _ in 0..5 {
            let resp = sticky.send(&pool, relay_request(addr).await).await.unwrap();
            assert_eq!(body(resp).await, "0");
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1);
        // The downstream connection closes: its upstream connection goes to the pool and the
        // next downstream connection reuses it.
        drop(sticky);
        let next = Sticky::default();
        let resp = next.send(&pool, relay_request(addr).await).await.unwrap();
        assert_eq!(body(resp).await, "0");
        assert_eq!(dials.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_new_downstream_connection_borrows_an_idle_held_connection_instead_of_dialling() {
        let addr = server(usize::MAX).await;
        let (pool, dials) = counted_pool(addr, Duration::from_secs(60));
        let (first, second) = (Sticky::default(), Sticky::default());
        let resp = first.send(&pool, relay_request(addr).await).await.unwrap();
        assert_eq!(body(resp).await, "0");
        // `first` holds the only connection, idle between its requests: `second` takes it.
        let resp = second.send(&pool, relay_request(addr).await).await.unwrap();
        assert_eq!(body(resp).await, "0");
        assert!(first.held.lock().is_none());
        // And back: `first` finds its slot empty and borrows from `second`.
        let resp = first.send(&pool, relay_request(addr).await).await.unwrap();
        assert_eq!(body(resp).await, "0");
        assert_eq!(dials.load(Ordering::SeqCst), 1);
        // Two requests at once: one connection is not enough, so the second one dials.
        let (r1, r2) = (relay_request(addr).await, relay_request(addr).await);
        let (a, b) = tokio::join!(first.send(&pool, r1), second.send(&pool, r2));
        let mut seen = [body(a.unwrap()).await, body(b.unwrap()).await];
        seen.sort();
        assert_eq!(seen, ["0", "1"]);
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_closed_connection_is_replaced_and_a_replaced_pool_is_not_used() {
        let addr = server(2).await;
        let (pool, dials) = counted_pool(addr, Duration::from_secs(60));
        let sticky = Sticky::default();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let resp = sticky.send(&pool, relay_request(addr).await).await.unwrap();
            seen.push(body(resp).await);
        }
        // Every second response closes its connection; the next request gets a new one.
        assert_eq!(seen, ["0", "0", "1", "1"]);
        // A new pool (revocations changed): the held connection is not reused.
        let fresh = Pool::new(CountingDial { addr, dials: dials.clone() }, Duration::from_secs(60));
        let resp = sticky.send(&fresh, relay_request(addr).await).await.unwrap();
        assert_eq!(body(resp).await, "2");
        assert_eq!(dials.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_retired_pool_closes_its_idle_connections_and_keeps_none_given_back() {
        let addr = server(usize::MAX).await;
        let (pool, dials) = counted_pool(addr, Duration::from_secs(60));
        let (idle, held) = (Sticky::default(), Sticky::default());
        // At once, so that each dials its own connection.
        let (r1, r2) = (relay_request(addr).await, relay_request(addr).await);
        let (a, b) = tokio::join!(idle.send(&pool, r1), held.send(&pool, r2));
        a.unwrap();
        b.unwrap();
        drop(idle);
        assert_eq!(pool.idle.lock().len(), 1);
        pool.retire();
        assert_eq!(pool.idle.lock().len(), 0);
        // A downstream connection that closes after the retirement does not refill it.
        drop(held);
        assert_eq!(pool.idle.lock().len(), 0);
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_expired_idle_connection_is_not_reused() {
        let addr = server(usize::MAX).await;
        let (pool, dials) = counted_pool(addr, Duration::ZERO);
        let sticky = Sticky::default();
        for _ in 0..2 {
            sticky.send(&pool, relay_request(addr).await).await.unwrap();
        }
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let pool = Pool::new(CountingDial { addr: closed, dials: Arc::default() }, Duration::from_secs(60));
        let err = Sticky::default().send(&pool, relay_request(closed).await).await.unwrap_err();
        assert!(matches!(err, SendError::Connect(_)), "{err}");
    }
}
