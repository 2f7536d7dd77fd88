//! The endpoint table as the control plane pushes it: one sorted table per revision, and a
//! bounded history of what changed from each revision to the next, so one workload joining or
//! leaving reaches every sidecar as that one entry (a delta), not as the whole table.
//!
//! Only the debounced refresh writes a table; every view built in a generation shares it. The
//! history is bounded in steps and in entries: a sidecar whose base revision it no longer
//! reaches gets a full snapshot instead, never a wrong delta.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::proto::discovery::Endpoint;

/// Most table changes kept for deltas: about a minute and a half of changes at the default
/// debounce, which covers a sidecar that has not ACKed the last few.
const MAX_STEPS: usize = 1024;
/// Most entries kept over every step: a few MiB, whatever the churn.
const MAX_ENTRIES: usize = 65_536;

/// The endpoint table at one revision.
pub struct Table {
    /// Counts the table's changes in this process; never on the wire (a version is a content
    /// hash, which means the same to every replica).
    pub rev: u64,
    /// SHA-256 over the entries in order, labels sorted: part of every version built on it.
    pub digest: [u8; 32],
    /// Sorted by address then identity, one entry per pair.
    pub endpoints: Vec<Endpoint>,
}

/// What changed from one revision to a later one: entries to remove, then entries to add.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub removed: Vec<Endpoint>,
    pub added: Vec<Endpoint>,
}

/// Per entry over several steps: the entry at the first revision, and at the last.
type Net<'a> = BTreeMap<(&'a str, &'a str), (Option<&'a Endpoint>, Option<&'a Endpoint>)>;

/// One step of the history: from `rev - 1` to `rev`.
struct Step {
    rev: u64,
    changes: Changes,
}

/// The current table and its recent history.
pub struct EndpointTable {
    current: ArcSwap<Table>,
    history: Mutex<History>,
}

#[derive(Default)]
struct History {
    steps: VecDeque<Step>,
    entries: usize,
}

impl Default for EndpointTable {
    fn default() -> Self {
        let empty = Table { rev: 0, digest: digest(&[]), endpoints: Vec::new() };
        EndpointTable { current: ArcSwap::from_pointee(empty), history: Mutex::default() }
    }
}

impl EndpointTable {
    /// The table in force.
    pub fn current(&self) -> Arc<Table> {
        self.current.load_full()
    }

    /// Makes `entries` (any order; the first of duplicate address and identity wins) the table,
    /// and records what changed. Nothing changes when they are the table already.
    pub fn replace(&self, mut entries: Vec<Endpoint>) {
        entries.sort_by(|a, b| key(a).cmp(&key(b)));
        entries.dedup_by(|a, b| key(a) == key(b));
        let mut history = self.history.lock();
        let old = self.current.load_full();
        let changes = diff(&old.endpoints, &entries);
        if changes.removed.is_empty() && changes.added.is_empty() {
            return;
        }
        let rev = old.rev + 1;
        history.entries += changes.removed.len() + changes.added.len();
        history.steps.push_back(Step { rev, changes });
        while history.steps.len() > MAX_STEPS || (history.entries > MAX_ENTRIES && history.steps.len() > 1) {
            let Some(dropped) = history.steps.pop_front() else { break };
            history.entries -= dropped.changes.removed.len() + dropped.changes.added.len();
        }
        self.current.store(Arc::new(Table { rev, digest: digest(&entries), endpoints: entries }));
    }

    /// What changed from revision `from` to revision `to`, netted (an entry added then removed
    /// is not there), or `None` when the history no longer reaches back to `from`.
    pub fn since(&self, from: u64, to: u64) -> Option<Changes> {
        if from == to {
            return Some(Changes::default());
        }
        let history = self.history.lock();
        let first = history.steps.front()?.rev;
        if from >= to || from + 1 < first {
            return None;
        }
        let mut net = Net::new();
        for step in history.steps.iter().filter(|s| s.rev > from && s.rev <= to) {
            for e in &step.changes.removed {
                net.entry(key(e)).or_insert((Some(e), None)).1 = None;
            }
            for e in &step.changes.added {
                net.entry(key(e)).or_insert((None, None)).1 = Some(e);
            }
        }
        let mut changes = Changes::default();
        for (before, after) in net.into_values().filter(|(before, after)| before != after) {
            changes.removed.extend(before.cloned());
            changes.added.extend(after.cloned());
        }
        Some(changes)
    }
}

/// The order of the table (and of a sidecar's, which must come out the same).
pub fn key(e: &Endpoint) -> (&str, &str) {
    (&e.address, &e.spiffe_id)
}

/// What turns `old` into `new`, both sorted by [`key`]: an entry whose labels changed is
/// removed and added again.
fn diff(old: &[Endpoint], new: &[Endpoint]) -> Changes {
    let mut changes = Changes::default();
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        let order = match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) => key(a).cmp(&key(b)),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                changes.removed.push(old[i].clone());
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                changes.added.push(new[j].clone());
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                if old[i] != new[j] {
                    changes.removed.push(old[i].clone());
                    changes.added.push(new[j].clone());
                }
                i += 1;
                j += 1;
            }
        }
    }
    changes
}

/// A canonical hash of a sorted table: every field length-prefixed, labels in key order (the
/// wire's map order is not fixed, so encoding the table would not be).
fn digest(endpoints: &[Endpoint]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut field = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_le_bytes());
        ctx.update(bytes);
    };
    for e in endpoints {
        field(e.address.as_bytes());
        field(e.spiffe_id.as_bytes());
        let labels: BTreeMap<&String, &String> = e.labels.iter().collect();
        field(&(labels.len() as u64).to_le_bytes());
        for (k, v) in labels {
            field(k.as_bytes());
            field(v.as_bytes());
        }
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(address: &str, sa: &str, app: &str) -> Endpoint {
        Endpoint {
            address: address.into(),
            spiffe_id: format!("spiffe://cluster.local/ns/t/sa/{sa}"),
            labels: [("app".to_string(), app.to_string())].into(),
        }
    }

    #[test]
    fn a_join_and_a_leave_are_one_step_each_and_deltas_compose_over_steps() {
        let table = EndpointTable::default();
        let (a, b, c) = (ep("10.0.0.1:80", "a", "a"), ep("10.0.0.2:80", "b", "b"), ep("10.0.0.3:80", "c", "c"));
        table.replace(vec![b.clone(), a.clone()]);
        let one = table.current();
        assert_eq!((one.rev, one.endpoints.clone()), (1, vec![a.clone(), b.clone()]), "sorted");
        table.replace(vec![a.clone(), b.clone()]);
        assert_eq!(table.current().rev, 1, "the same entries are no change");

        table.replace(vec![a.clone(), b.clone(), c.clone()]);
        assert_eq!(table.since(1, 2), Some(Changes { removed: vec![], added: vec![c.clone()] }), "a join is its entry");
        let relabelled = ep("10.0.0.1:80", "a", "a2");
        table.replace(vec![relabelled.clone(), c.clone()]);
        assert_eq!(
            table.since(2, 3),
            Some(Changes { removed: vec![a.clone(), b.clone()], added: vec![relabelled.clone()] }),
            "a leave is its entry; new labels are a removal and an addition"
        );
        assert_eq!(
            table.since(1, 3),
            Some(Changes { removed: vec![a.clone(), b.clone()], added: vec![relabelled, c] }),
            "netted over two steps"
        );
        table.replace(vec![a.clone(), b.clone()]);
        assert_eq!(table.since(1, 4), Some(Changes::default()), "back where revision 1 was");
        assert_eq!(table.current().digest, one.digest, "equal tables hash equal");
        assert_eq!(table.since(4, 3), None);
        assert_eq!(table.since(0, 4).map(|c| c.added.len()), Some(2), "from the empty table");
    }

    #[test]
    fn a_base_older_than_the_history_gets_no_delta() {
        let table = EndpointTable::default();
        for i in 0..=MAX_STEPS {
            table.replace(vec![ep(&format!("10.0.{}.{}:80", i / 256, i % 256), "a", "a")]);
        }
        let rev = table.current().rev;
        assert_eq!(rev, MAX_STEPS as u64 + 1);
        assert!(table.since(rev - MAX_STEPS as u64, rev).is_some(), "the oldest step kept still reaches back");
        assert_eq!(table.since(0, rev), None, "the first step was dropped");
    }
}
