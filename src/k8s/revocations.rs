//! Revocations shared by every control-plane replica: one ConfigMap in the control plane's
//! namespace, written by whichever replica serves the revoke call and watched by all of them.
//!
//! A ConfigMap rather than a CRD: a revocation list is data, not a desired state with a status
//! to report; one named object gets least-privilege RBAC by name (get, update, list and watch
//! with a name field selector), needs no CRD installed before the control plane starts, and its
//! 1 MiB limit holds some ten thousand revoked serials. Every write goes through
//! `resourceVersion`, so two replicas revoking at once both land (the loser reads again and
//! retries); nothing is ever removed by the control plane.

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

/// The ConfigMap's name.
pub const CONFIGMAP: &str = "palisade-revocations";
/// Its key listing revoked SPIFFE IDs, one a line.
const IDENTITIES: &str = "identities";
/// Its key listing revoked certificate serials (lowercase hex), one a line.
const SERIALS: &str = "serials";

/// Revoked identities and serials, each sorted.
pub type Lists = (Vec<String>, Vec<String>);

/// Why a revocation was not stored.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("ConfigMap {namespace}/{CONFIGMAP}: {source}")]
    Api { namespace: String, source: kube::Error },
    #[error("ConfigMap {0}/{CONFIGMAP}: still conflicting after {1} attempts")]
    Contended(String, usize),
}

/// The lists a ConfigMap holds.
pub fn lists(cm: &ConfigMap) -> Lists {
    let read = |key: &str| -> Vec<String> {
        cm.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| v.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
            .unwrap_or_default()
    };
    crate::identity::revocation::lists(read(IDENTITIES), read(SERIALS))
}

fn with_lists(mut cm: ConfigMap, (ids, serials): &Lists) -> ConfigMap {
    let data = cm.data.get_or_insert_with(Default::default);
    data.insert(IDENTITIES.into(), ids.iter().map(|i| format!("{i}\n")).collect());
    data.insert(SERIALS.into(), serials.iter().map(|s| format!("{s}\n")).collect());
    cm
}

/// Adds `identity` and/or `serial` to the shared lists (creating the ConfigMap on first use)
/// and returns the lists as stored. Conflicting writes by other replicas are read and retried.
pub async fn revoke(
    client: &kube::Client,
    namespace: &str,
    identity: Option<&str>,
    serial: Option<&str>,
) -> Result<Lists, RevocationError> {
    const ATTEMPTS: usize = 16;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let fail = |source| RevocationError::Api { namespace: namespace.to_string(), source };
    let add = |(mut ids, mut serials): Lists| {
        ids.extend(identity.map(str::to_string));
        serials.extend(serial.map(str::to_string));
        crate::identity::revocation::lists(ids, serials)
    };
    for _ in 0..ATTEMPTS {
        let written = match api.get_opt(CONFIGMAP).await.map_err(fail)? {
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(CONFIGMAP.into()),
                        labels: Some([("app.kubernetes.io/part-of".to_string(), "palisade".to_string())].into()),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let next = add(Default::default());
                api.create(&PostParams::default(), &with_lists(cm, &next)).await.map(|_| next)
            }
            Some(cm) => {
                let current = lists(&cm);
                let next = add(current.clone());
                if next == current {
                    return Ok(next);
                }
                // `replace` carries the resourceVersion read: a concurrent writer makes it fail.
                api.replace(CONFIGMAP, &PostParams::default(), &with_lists(cm, &next)).await.map(|_| next)
            }
        };
        match written {
            Ok(next) => return Ok(next),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(fail(e)),
        }
    }
    Err(RevocationError::Contended(namespace.to_string(), ATTEMPTS))
}

/// Reads the shared lists once (empty when the ConfigMap does not exist yet).
pub async fn read(client: &kube::Client, namespace: &str) -> Result<Lists, RevocationError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = api
        .get_opt(CONFIGMAP)
        .await
        .map_err(|source| RevocationError::Api { namespace: namespace.to_string(), source })?;
    Ok(cm.as_ref().map(lists).unwrap_or_default())
}

/// Watches the ConfigMap and calls `changed` with its lists whenever it is created or changed
/// (and once at the start of every watch, so a reconnect misses nothing). Runs until dropped.
pub async fn watch(client: kube::Client, namespace: String, changed: impl Fn(Lists) + Send) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let one = watcher::Config::default().fields(&format!("metadata.name={CONFIGMAP}"));
    let mut changes = std::pin::pin!(watcher(api, one).default_backoff().applied_objects());
    while let Some(change) = changes.next().await {
        match change {
            Ok(cm) => changed(lists(&cm)),
            // The stream's backoff paces the retries.
            Err(e) => tracing::warn!(error = %e, namespace, configmap = CONFIGMAP, "watching the shared revocations"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_round_trip_sorted_deduplicated_and_lowercase() {
        let lists_in = (
            vec!["spiffe://cluster.local/ns/a/sa/b".to_string(), "spiffe://cluster.local/ns/a/sa/a".to_string()],
            vec!["ABCD".to_string()],
        );
        let cm = with_lists(ConfigMap::default(), &lists_in);
        let (ids, serials) = lists(&cm);
        assert_eq!(ids, ["spiffe://cluster.local/ns/a/sa/a", "spiffe://cluster.local/ns/a/sa/b"]);
        assert_eq!(serials, ["abcd"]);
        assert_eq!(lists(&ConfigMap::default()), (Vec::new(), Vec::new()));
    }
}
