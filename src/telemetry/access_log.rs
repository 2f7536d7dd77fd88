//! The access log and the decision log: JSON lines, one per request (or TCP connection) and one
//! per denial or audit.
//!
//! Lines are handed to a writer task over a bounded channel, so the data path never blocks on
//! a slow disk or pipe; when the channel is full a line is dropped and counted instead.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

/// Where log lines go.
#[derive(Clone, Debug)]
pub enum LogTarget {
    Stdout,
    File(PathBuf),
    Off,
}

impl std::str::FromStr for LogTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "-" | "stdout" => LogTarget::Stdout,
            "off" | "" => LogTarget::Off,
            path => LogTarget::File(PathBuf::from(path)),
        })
    }
}

/// A handle the data path writes through. Cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<serde_json::Value>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Starts the writer task for `target`.
    pub fn start(target: LogTarget) -> std::io::Result<Self> {
        let dropped = Arc::new(AtomicU64::new(0));
        let mut out: Box<dyn Write + Send> = match target {
            LogTarget::Off => return Ok(AccessLog { tx: None, dropped }),
            LogTarget::Stdout => Box::new(std::io::stdout()),
            LogTarget::File(path) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (tx, mut rx) = mpsc::channel::<serde_json::Value>(8192);
        std::thread::Builder::new().name("access-log".into()).spawn(move || {
            while let Some(line) = rx.blocking_recv() {
                let mut buf = serde_json::to_vec(&line).unwrap_or_default();
                buf.push(b'\n');
                // Batch whatever else is already queued into the same write.
                while let Ok(more) = rx.try_recv() {
                    let _ = serde_json::to_writer(&mut buf, &more);
                    buf.push(b'\n');
                }
                if out.write_all(&buf).and_then(|_| out.flush()).is_err() {
                    return;
                }
            }
        })?;
        Ok(AccessLog { tx: Some(tx), dropped })
    }

    /// A log that writes nothing.
    pub fn off() -> Self {
        AccessLog { tx: None, dropped: Arc::new(AtomicU64::new(0)) }
    }

    /// Queues one line; never waits.
    pub fn write(&self, line: serde_json::Value) {
        if let Some(tx) = &self.tx
            && tx.try_send(line).is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether lines are written at all (skip building them when not).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
