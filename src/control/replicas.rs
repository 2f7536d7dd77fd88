//! What the management API of one replica knows about the others, when replicas share a store
//! (PostgreSQL): each publishes its sidecars and its traffic edges every few seconds, and
//! `ListSidecars`, `TrafficGraph` and `Status` at any replica answer for all of them.
//!
//! A replica that stopped publishing (killed, partitioned) drops out after [`FRESH`]; its
//! sidecars then show at the replica they moved to. Traffic is summed: each replica counts the
//! reports of the sidecars connected to it, and a report is counted once, where it arrived.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::discovery::{MeshState, SidecarEntry};
use super::store::Store;
use super::telemetry::{Edge, TrafficGraph};
use crate::clock::now_unix;

/// How often a replica publishes.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(2);
/// How long what a replica published counts.
pub const FRESH: Duration = Duration::from_secs(10);

/// This replica among the others.
pub struct Replicas {
    /// This replica's name: its pod name, or host and gRPC port.
    pub name: String,
    pub store: Arc<Store>,
    pub mesh: Arc<MeshState>,
    pub graph: Arc<TrafficGraph>,
}

/// What every replica knows, this one's first.
pub struct Fleet {
    pub sidecars: Vec<SidecarEntry>,
    pub edges: Vec<Edge>,
}

impl Replicas {
    /// Publishes this replica's sidecars and edges every [`PUBLISH_EVERY`], for as long as it
    /// runs. Does nothing on a store no other replica shares.
    pub async fn publish(self: Arc<Self>) {
        if self.store.endpoint_changes().is_none() {
            return;
        }
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        loop {
            tick.tick().await;
            let sidecars = serde_json::to_string(&self.mesh.sidecars()).unwrap_or_default();
            let edges = serde_json::to_string(&self.graph.edges()).unwrap_or_default();
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.store.publish_replica_status(&this.name, &sidecars, &edges))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot publish this replica's status to the others"),
                Err(e) => tracing::warn!(error = %e, "publishing this replica's status panicked"),
            }
        }
    }

    /// This replica's sidecars and edges with those every other replica published lately.
    /// Blocking (reads the store). A store that cannot be read leaves the others out, logged.
    pub fn fleet(&self) -> Fleet {
        let mut sidecars = self.mesh.sidecars();
        for s in &mut sidecars {
            s.replica.clone_from(&self.name);
        }
        let mut edges: BTreeMap<(String, String), Edge> =
            self.graph.edges().into_iter().map(|e| ((e.source.clone(), e.destination.clone()), e)).collect();
        let since = now_unix() - FRESH.as_secs() as i64;
        let others = self.store.replica_statuses(&self.name, since).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the other replicas' status; showing this replica's only");
            Vec::new()
        });
        for row in others {
            let theirs: Vec<SidecarEntry> = serde_json::from_str(&row.sidecars).unwrap_or_default();
            sidecars.extend(theirs.into_iter().map(|mut s| {
                s.replica.clone_from(&row.replica);
                s
            }));
            for e in serde_json::from_str::<Vec<Edge>>(&row.edges).unwrap_or_default() {
                let sum = edges.entry((e.source.clone(), e.destination.clone())).or_insert_with(|| Edge {
                    source: e.source.clone(),
                    destination: e.destination.clone(),
                    ..Default::default()
                });
                sum.requests = sum.requests.saturating_add(e.requests);
                sum.errors = sum.errors.saturating_add(e.errors);
                sum.denials = sum.denials.saturating_add(e.denials);
                sum.handshake_failures = sum.handshake_failures.saturating_add(e.handshake_failures);
            }
        }
        Fleet { sidecars, edges: edges.into_values().collect() }
    }
}
