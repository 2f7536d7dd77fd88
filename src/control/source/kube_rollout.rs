//! Rollout in CRD `status`, aggregated over replicas: how many selected sidecars run each
//! object's current version and how many refused it.
//!
//! Every replica knows only the sidecars connected to it, so each writes its own counts under
//! `status.rollout.replicas.<replica>` and the totals (`status.rollout.selected`, `current`,
//! `nacked`) summed over every entry that is fresh. The write carries the object's
//! `resourceVersion`: two replicas writing at once cannot both win with totals that miss the
//! other's counts; the loser sees the winner's write in its watch and writes again. An entry not
//! refreshed for [`STALE`] (its replica died) no longer counts and is removed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Resource as _, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::clock::now_unix;
use crate::control::discovery::{MeshState, Rollout};

/// How long a replica's entry counts without being rewritten.
pub const STALE: Duration = Duration::from_secs(180);
/// How often a replica rewrites an unchanged entry, well within [`STALE`].
const HEARTBEAT: Duration = Duration::from_secs(60);
/// Changes closer together than this are written once.
const DEBOUNCE: Duration = Duration::from_secs(1);

/// One replica's entry in `status.rollout.replicas`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    #[serde(flatten)]
    counts: Rollout,
    /// The object's `metadata.generation` the counts are for.
    observed_generation: i64,
    /// When the replica wrote the entry (Unix seconds).
    updated: i64,
}

/// Writes this replica's rollout counts into every watched CRD object, for as long as it runs.
pub async fn run(
    client: kube::Client,
    replica: String,
    crds: Vec<(ApiResource, Store<DynamicObject>)>,
    crds_changed: Arc<Notify>,
    mesh: Arc<MeshState>,
) {
    let mut acks = mesh.ack_changes();
    let mut generation = mesh.changes();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = crds_changed.notified() => {}
            r = acks.changed() => if r.is_err() { return },
            r = generation.changed() => if r.is_err() { return },
            _ = heartbeat.tick() => {}
        }
        tokio::time::sleep(DEBOUNCE).await; // debounce: one write for a burst of ACKs
        let counts = mesh.rollout();
        for (ar, store) in &crds {
            for obj in store.state() {
                let origin =
                    format!("kubernetes:{}/{}/{}", ar.kind, obj.namespace().unwrap_or_default(), obj.name_any());
                let mine = counts.get(&origin).copied().unwrap_or_default();
                let Some(patch) = patch_for(&obj, &replica, mine, now_unix()) else { continue };
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), &obj.namespace().unwrap_or_default(), ar);
                match api.patch_status(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) => {}
                    // Another replica wrote first; its write wakes this loop again.
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    // Deleted meanwhile: nothing to count.
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => {
                        tracing::warn!(error = %e, kind = %ar.kind, name = %obj.name_any(), "cannot write rollout status")
                    }
                }
            }
        }
    }
}

/// The merge patch that brings `obj`'s rollout status to `mine` for `replica` at `now`, with
/// totals over every fresh entry; `None` when the status already says so and this replica's
/// entry is younger than the heartbeat.
fn patch_for(obj: &DynamicObject, replica: &str, mine: Rollout, now: i64) -> Option<Value> {
    let generation = obj.meta().generation.unwrap_or(0);
    let rollout = obj.data.get("status").and_then(|s| s.get("rollout"));
    let entries: BTreeMap<String, Option<Entry>> = rollout
        .and_then(|r| r.get("replicas"))
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), serde_json::from_value(v.clone()).ok())).collect())
        .unwrap_or_default();
    let fresh = |e: &Entry| now - e.updated < STALE.as_secs() as i64;
    let previous = entries.get(replica).cloned().flatten();
    let unchanged = previous.as_ref().is_some_and(|p| {
        p.counts == mine && p.observed_generation == generation && now - p.updated < HEARTBEAT.as_secs() as i64
    });
    let mut totals = mine;
    let mut replicas = serde_json::Map::new();
    for (name, entry) in &entries {
        if name == replica {
            continue;
        }
        match entry {
            Some(e) if fresh(e) => totals += e.counts,
            // Gone (or unreadable): removed by the merge patch.
            _ => {
                replicas.insert(name.clone(), Value::Null);
            }
        }
    }
    let shown = |field: &str| rollout.and_then(|r| r.get(field)).and_then(Value::as_u64);
    let totals_shown = shown("selected") == Some(totals.selected.into())
        && shown("current") == Some(totals.current.into())
        && shown("nacked") == Some(totals.nacked.into());
    if unchanged && totals_shown && replicas.is_empty() {
        return None;
    }
    let entry = if unchanged {
        previous.expect("unchanged implies present")
    } else {
        Entry { counts: mine, observed_generation: generation, updated: now }
    };
    replicas.insert(replica.to_string(), serde_json::to_value(entry).expect("an entry serializes"));
    Some(json!({
        "metadata": {"resourceVersion": obj.resource_version()},
        "status": {"rollout": {
            "selected": totals.selected,
            "current": totals.current,
            "nacked": totals.nacked,
            "replicas": replicas,
        }},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(status: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "palisade.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop", "generation": 3, "resourceVersion": "42"},
            "spec": {}, "status": status,
        }))
        .unwrap()
    }

    fn counts(selected: u32, current: u32, nacked: u32) -> Rollout {
        Rollout { selected, current, nacked }
    }

    #[test]
    fn totals_sum_fresh_replicas_and_drop_stale_ones() {
        let now = 10_000;
        let obj = object(json!({"rollout": {"selected": 9, "current": 9, "nacked": 0, "replicas": {
            "b": {"selected": 4, "current": 3, "nacked": 1, "observedGeneration": 3, "updated": now - 5},
            "dead": {"selected": 5, "current": 5, "nacked": 0, "observedGeneration": 3, "updated": now - 1000},
        }}}));
        let patch = patch_for(&obj, "a", counts(2, 2, 0), now).unwrap();
        assert_eq!(patch["metadata"]["resourceVersion"], "42", "written only over what was read");
        let rollout = &patch["status"]["rollout"];
        assert_eq!((&rollout["selected"], &rollout["current"], &rollout["nacked"]), (&json!(6), &json!(5), &json!(1)));
        assert_eq!(rollout["replicas"]["dead"], Value::Null, "a replica silent past STALE is removed");
        assert_eq!(rollout["replicas"]["a"]["selected"], 2);
        assert_eq!(rollout["replicas"]["a"]["observedGeneration"], 3);
        assert!(rollout["replicas"].get("b").is_none(), "another replica's entry is left to it");
    }

    #[test]
    fn an_unchanged_status_is_not_rewritten_until_the_heartbeat() {
        let now = 10_000;
        let status = |updated: i64| {
            json!({"rollout": {"selected": 2, "current": 2, "nacked": 0, "replicas": {
                "a": {"selected": 2, "current": 2, "nacked": 0, "observedGeneration": 3, "updated": updated},
            }}})
        };
        assert!(patch_for(&object(status(now - 5)), "a", counts(2, 2, 0), now).is_none());
        assert!(patch_for(&object(status(now - 5)), "a", counts(2, 1, 0), now).is_some(), "a count changed");
        let old = HEARTBEAT.as_secs() as i64 + 1;
        let patch = patch_for(&object(status(now - old)), "a", counts(2, 2, 0), now).unwrap();
        assert_eq!(patch["status"]["rollout"]["replicas"]["a"]["updated"], now, "the heartbeat refreshes the entry");
        assert!(patch_for(&object(json!({})), "a", counts(0, 0, 0), now).is_some(), "the first write");
    }
}
