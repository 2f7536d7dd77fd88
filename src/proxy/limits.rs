//! Protection of the proxy itself: timeouts, a connection cap, bounded buffers, and draining.
//!
//! Every limit has a default a production mesh can live with and a flag to change it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    /// On SIGTERM or `POST /shutdown`, how long in-flight requests get to finish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub drain_timeout: Duration,
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
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
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

#[cfg(test)]
mod tests {
    use super::*;

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
