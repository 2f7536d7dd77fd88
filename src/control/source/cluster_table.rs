//! The endpoints the Kubernetes API knows, kept up to date object by object.
//!
//! A meshed pod contributes its IPs under its service account's identity; a Service whose
//! meshed backends all run under one identity contributes its ClusterIPs under it. Rebuilding
//! that from every pod and every service at each event cost pods × services label matches per
//! event. Here a pod is looked at again only when its `resourceVersion` changed, and a service
//! only when it changed or when the meshed pods of its namespace did (matched against that
//! namespace's pods alone). It also keeps which meshed pods are at each IP, for the
//! EndpointSlice addresses of [`super::kube_services`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;

use super::kubernetes::INJECTED_ANNOTATION;
use crate::identity::SpiffeId;
use crate::proto::discovery::Endpoint;

/// What a meshed pod contributes.
#[derive(Clone, Debug, PartialEq)]
struct Meshed {
    namespace: String,
    labels: BTreeMap<String, String>,
    id: SpiffeId,
    ips: Vec<std::net::IpAddr>,
}

/// A meshed pod's labels and identity: what service selectors match and what they yield.
type PodKey = (BTreeMap<String, String>, SpiffeId);

/// A pod as last seen: its resourceVersion and what it contributes (`None`: not meshed).
struct PodEntry {
    version: String,
    meshed: Option<Meshed>,
}

/// A service as last seen: its resourceVersion, its namespace's pod epoch then, and its table
/// entries.
struct ServiceEntry {
    version: String,
    namespace: String,
    epoch: u64,
    endpoints: Vec<Endpoint>,
}

/// Endpoints from Pods and Services, updated by difference.
#[derive(Default)]
pub struct ClusterTable {
    trust_domain: String,
    pods: HashMap<String, PodEntry>,
    services: HashMap<String, ServiceEntry>,
    /// Meshed pods by namespace (uid → labels and identity), for matching service selectors.
    by_namespace: HashMap<String, BTreeMap<String, PodKey>>,
    /// Moves on in a namespace whenever its meshed pods' labels or identities change.
    epochs: HashMap<String, u64>,
    /// Meshed pods by IP (uid → identity).
    by_ip: HashMap<std::net::IpAddr, BTreeMap<String, SpiffeId>>,
    /// Moves on whenever a meshed pod's IPs or identity change (what [`Self::identities_at`]
    /// answers).
    ip_epoch: u64,
    /// How many pods and services were looked at again in the last update (for tests).
    pub recomputed: usize,
}

impl ClusterTable {
    pub fn new(trust_domain: &str) -> ClusterTable {
        ClusterTable { trust_domain: trust_domain.to_string(), ..Default::default() }
    }

    /// Brings the table to `pods` and `services` (the watches' current state) and returns it,
    /// sorted by address and identity.
    pub fn update<'a>(
        &mut self,
        pods: impl IntoIterator<Item = &'a Pod>,
        services: impl IntoIterator<Item = &'a Service>,
    ) -> Vec<Endpoint> {
        self.recomputed = 0;
        let mut live = HashSet::new();
        for pod in pods {
            let uid = pod.uid().unwrap_or_default();
            let version = pod.resource_version().unwrap_or_default();
            live.insert(uid.clone());
            if self.pods.get(&uid).is_some_and(|e| e.version == version) {
                continue;
            }
            self.recomputed += 1;
            let meshed = meshed(&self.trust_domain, pod);
            let before = self.pods.insert(uid.clone(), PodEntry { version, meshed: meshed.clone() });
            let before = before.and_then(|b| b.meshed);
            self.index_ips(&uid, before.as_ref(), meshed.as_ref());
            self.index(&uid, before, meshed);
        }
        let gone: Vec<String> = self.pods.keys().filter(|uid| !live.contains(*uid)).cloned().collect();
        for uid in gone {
            let before = self.pods.remove(&uid).and_then(|e| e.meshed);
            self.index_ips(&uid, before.as_ref(), None);
            self.index(&uid, before, None);
        }

        let mut live = HashSet::new();
        for svc in services {
            let uid = svc.uid().unwrap_or_default();
            let version = svc.resource_version().unwrap_or_default();
            let namespace = svc.namespace().unwrap_or_default();
            let epoch = self.epochs.get(&namespace).copied().unwrap_or(0);
            live.insert(uid.clone());
            if self.services.get(&uid).is_some_and(|e| e.version == version && e.epoch == epoch) {
                continue;
            }
            self.recomputed += 1;
            let endpoints = self.service_endpoints(svc, &namespace);
            self.services.insert(uid, ServiceEntry { version, namespace, epoch, endpoints });
        }
        self.services.retain(|uid, _| live.contains(uid));
        self.epochs
            .retain(|ns, _| self.by_namespace.contains_key(ns) || self.services.values().any(|s| &s.namespace == ns));

        let mut out: Vec<Endpoint> = self
            .pods
            .values()
            .filter_map(|e| e.meshed.as_ref())
            .flat_map(|m| {
                m.ips.iter().map(|ip| Endpoint {
                    address: std::net::SocketAddr::new(*ip, 0).to_string(),
                    spiffe_id: m.id.to_string(),
                    labels: m.labels.clone().into_iter().collect(),
                })
            })
            .chain(self.services.values().flat_map(|s| s.endpoints.iter().cloned()))
            .collect();
        out.sort_by(|a, b| (&a.address, &a.spiffe_id).cmp(&(&b.address, &b.spiffe_id)));
        out.dedup();
        out
    }

    /// Moves pod `uid` in the namespace index from `before` to `after`; a change of what
    /// services match on moves the namespace's epoch on.
    fn index(&mut self, uid: &str, before: Option<Meshed>, after: Option<Meshed>) {
        let key = |m: &Option<Meshed>| m.as_ref().map(|m| (m.namespace.clone(), m.labels.clone(), m.id.clone()));
        if key(&before) == key(&after) {
            return;
        }
        if let Some(b) = before {
            if let Some(pods) = self.by_namespace.get_mut(&b.namespace) {
                pods.remove(uid);
                if pods.is_empty() {
                    self.by_namespace.remove(&b.namespace);
                }
            }
            *self.epochs.entry(b.namespace).or_default() += 1;
        }
        if let Some(a) = after {
            self.by_namespace.entry(a.namespace.clone()).or_default().insert(uid.to_string(), (a.labels, a.id));
            *self.epochs.entry(a.namespace).or_default() += 1;
        }
    }

    /// Moves pod `uid` in the IP index from `before` to `after`.
    fn index_ips(&mut self, uid: &str, before: Option<&Meshed>, after: Option<&Meshed>) {
        if before.map(|m| (&m.ips, &m.id)) == after.map(|m| (&m.ips, &m.id)) {
            return;
        }
        for ip in before.iter().flat_map(|b| &b.ips) {
            if let Some(pods) = self.by_ip.get_mut(ip) {
                pods.remove(uid);
                if pods.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
        if let Some(a) = after {
            for ip in &a.ips {
                self.by_ip.entry(*ip).or_default().insert(uid.to_string(), a.id.clone());
            }
        }
        self.ip_epoch += 1;
    }

    /// The identities of the meshed pods at `ip` (one, unless stale pods claim it too).
    pub fn identities_at(&self, ip: std::net::IpAddr) -> impl Iterator<Item = &SpiffeId> {
        self.by_ip.get(&ip).into_iter().flat_map(|pods| pods.values())
    }

    /// A number that moves on whenever [`Self::identities_at`] may answer differently.
    pub fn ip_epoch(&self) -> u64 {
        self.ip_epoch
    }

    /// A service's ClusterIPs under the one identity its meshed backends share; none when they
    /// run under several (a sidecar then verifies whichever pod it reaches by pod address).
    fn service_endpoints(&self, svc: &Service, namespace: &str) -> Vec<Endpoint> {
        let Some(spec) = svc.spec.as_ref() else { return Vec::new() };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else { return Vec::new() };
        let Some(pods) = self.by_namespace.get(namespace) else { return Vec::new() };
        let ids: BTreeSet<&SpiffeId> = pods
            .values()
            .filter(|(labels, _)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|(_, id)| id)
            .collect();
        let [id] = ids.into_iter().collect::<Vec<_>>()[..] else { return Vec::new() };
        spec.cluster_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
            .map(|ip| Endpoint {
                address: std::net::SocketAddr::new(ip, 0).to_string(),
                spiffe_id: id.to_string(),
                labels: Default::default(),
            })
            .collect()
    }
}

/// What `pod` contributes when it is meshed (injected, not finished, with a valid identity).
fn meshed(trust_domain: &str, pod: &Pod) -> Option<Meshed> {
    let injected = pod.annotations().get(INJECTED_ANNOTATION).is_some_and(|v| v == "injected");
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
    if !injected || matches!(phase, "Succeeded" | "Failed") {
        return None;
    }
    let namespace = pod.namespace().unwrap_or_default();
    let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    let id = SpiffeId::workload(trust_domain, &namespace, &sa).ok()?;
    let ips = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.parse().ok())
        .collect();
    Some(Meshed { namespace, labels: pod.labels().clone(), id, ips })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, version: &str, ns: &str, sa: &str, app: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"uid": uid, "resourceVersion": version, "namespace": ns, "name": uid,
                         "labels": {"app": app}, "annotations": {INJECTED_ANNOTATION: "injected"}},
            "spec": {"serviceAccountName": sa, "containers": []},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
        }))
        .unwrap()
    }

    fn service(uid: &str, version: &str, ns: &str, app: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"uid": uid, "resourceVersion": version, "namespace": ns, "name": uid},
            "spec": {"selector": {"app": app}, "clusterIPs": [ip]},
        }))
        .unwrap()
    }

    fn addresses(table: &[Endpoint]) -> Vec<(String, String)> {
        table.iter().map(|e| (e.address.clone(), e.spiffe_id.rsplit('/').next().unwrap().to_string())).collect()
    }

    #[test]
    fn only_what_changed_is_looked_at_again_and_the_table_matches_a_fresh_build() {
        let mut pods: Vec<Pod> =
            (0..50).map(|i| pod(&format!("p{i}"), "1", "shop", "orders", "orders", &format!("10.0.0.{i}"))).collect();
        pods.push(pod("w", "1", "shop", "web", "web", "10.0.1.1"));
        let mut services = vec![
            service("s-orders", "1", "shop", "orders", "10.96.0.1"),
            service("s-web", "1", "shop", "web", "10.96.0.2"),
        ];
        let mut table = ClusterTable::new("cluster.local");
        let first = table.update(&pods, &services);
        assert_eq!(table.recomputed, 53);
        assert_eq!(first.len(), 53, "51 pods and 2 service addresses");
        assert!(addresses(&first).contains(&("10.96.0.1:0".into(), "orders".into())));

        // Nothing changed: nothing is looked at again.
        assert_eq!(table.update(&pods, &services), first);
        assert_eq!(table.recomputed, 0);

        // A pod's status changes (a new resourceVersion, same labels): that pod alone.
        pods[3] = pod("p3", "2", "shop", "orders", "orders", "10.0.0.3");
        table.update(&pods, &services);
        assert_eq!(table.recomputed, 1);

        // A web pod now runs under the orders label: the orders service fronts two identities,
        // so its ClusterIP leaves the table; both services of the namespace are looked at again.
        pods[50] = pod("w", "2", "shop", "web", "orders", "10.0.1.1");
        let mixed = table.update(&pods, &services);
        assert_eq!(table.recomputed, 3);
        assert!(!addresses(&mixed).iter().any(|(a, _)| a == "10.96.0.1:0"), "{mixed:?}");

        // A pod leaves and a service is edited; the result is what a fresh table builds.
        pods.remove(7);
        services[1] = service("s-web", "2", "shop", "orders", "10.96.0.3");
        let after = table.update(&pods, &services);
        let fresh = ClusterTable::new("cluster.local").update(&pods, &services);
        assert_eq!(after, fresh);
        assert!(!addresses(&after).iter().any(|(a, _)| a == "10.0.0.7:0"));
    }
}
