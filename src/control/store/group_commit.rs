//! Group commit for the certificate ledger.
//!
//! Every certificate is in the ledger, durably, before anyone sees it; with SQLite's
//! `synchronous=FULL` that is one sync of the disk per commit, and one commit per certificate
//! would make a renewal storm wait in line for the disk. Here one writer thread takes every row
//! that queued while the previous commit was syncing and writes them all in one transaction:
//! each caller still returns only after the commit holding its row, so nothing is handed out
//! before it is durable, and the disk is synced once per batch instead of once per certificate.
//! Under no contention a batch is one row and costs what a lone commit did. A batch that
//! fails is written again row by row, so a row that cannot be written (a duplicate serial) fails
//! alone and never takes its neighbours down with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use super::{Backend, CredentialKind, StoreError};
use crate::identity::ca::IssuedCertificate;

/// At most this many rows in one transaction, so one commit never grows without bound.
const MAX_BATCH: usize = 1024;

/// One row waiting for its commit, and where to say how it went.
struct Pending {
    issued: IssuedCertificate,
    kind: CredentialKind,
    done: mpsc::SyncSender<Result<(), Arc<StoreError>>>,
}

impl Pending {
    fn answer(&self, outcome: Result<(), Arc<StoreError>>) {
        // A caller that went away no longer needs the answer.
        let _ = self.done.send(outcome);
    }
}

/// Hands ledger rows to the writer thread. The thread ends when this is dropped.
pub(super) struct GroupCommit {
    queue: mpsc::Sender<Pending>,
    /// Transactions committed (or tried), for the tests that show rows share them.
    pub(super) commits: Arc<AtomicU64>,
}

impl GroupCommit {
    /// Starts the writer thread over `backend`.
    pub(super) fn start(backend: Arc<Backend>) -> Self {
        let (queue, rows) = mpsc::channel::<Pending>();
        let commits = Arc::new(AtomicU64::new(0));
        let counted = commits.clone();
        let write = move |batch: &[Pending]| {
            counted.fetch_add(1, Ordering::Relaxed);
            let rows: Vec<(&IssuedCertificate, CredentialKind)> = batch.iter().map(|p| (&p.issued, p.kind)).collect();
            match &*backend {
                Backend::Sqlite(b) => b.record_certificates(&rows),
                Backend::Postgres(b) => b.record_certificates(&rows),
            }
            .map_err(Arc::new)
        };
        let spawned = std::thread::Builder::new().name("palisade-ledger".into()).spawn(move || {
            while let Ok(first) = rows.recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH
                    && let Ok(next) = rows.try_recv()
                {
                    batch.push(next);
                }
                match write(&batch) {
                    Ok(()) => batch.iter().for_each(|p| p.answer(Ok(()))),
                    Err(e) if batch.len() == 1 => batch[0].answer(Err(e)),
                    Err(_) => batch.iter().for_each(|p| p.answer(write(std::slice::from_ref(p)))),
                }
            }
        });
        if let Err(e) = spawned {
            // Without a thread the queue's receiver is gone, and every record says so.
            tracing::error!(error = %e, "cannot start the ledger writer thread");
        }
        GroupCommit { queue, commits }
    }

    /// Queues one row and waits until the commit holding it is durable (or failed).
    pub(super) fn record(&self, issued: IssuedCertificate, kind: CredentialKind) -> Result<(), StoreError> {
        let stopped = || StoreError::Io {
            path: "ledger".into(),
            cause: std::io::Error::other("the ledger writer thread is not running"),
        };
        let (done, outcome) = mpsc::sync_channel(1);
        self.queue.send(Pending { issued, kind, done }).map_err(|_| stopped())?;
        outcome.recv().map_err(|_| stopped())?.map_err(StoreError::Shared)
    }
}
