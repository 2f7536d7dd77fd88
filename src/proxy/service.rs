//! Mesh services: a name that stands for several endpoints, each verified as its own identity.
//!
//! A `MeshService` (standalone: a manifest in the resources directory) names the identities
//! allowed to serve it, and optionally the labels its endpoints must carry:
//!
//! ```yaml
//! apiVersion: palisade.io/v1alpha1
//! kind: MeshService
//! metadata: { name: orders, namespace: shop }
//! spec:
//!   identities: [spiffe://cluster.local/ns/shop/sa/orders]
//!   selector: { matchLabels: { app: orders } }
//! ```
//!
//! Its endpoints are the entries of the endpoint table whose identity is one of `identities`
//! and whose labels include the selector's. The sidecar resolves that itself from the table it
//! already keeps (which the control plane sends as deltas), so a workload joining a service
//! costs every sidecar that one entry, not the service again. Labels are what a sidecar says
//! about itself; the identity list is what makes the claim safe: a workload can only ever join
//! a service that names its own identity, and every connection to an endpoint must prove that
//! endpoint's identity.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;
use crate::policy::resource::WorkloadSelector;
use crate::proto::discovery::{Endpoint, Resource};

/// The manifest kind.
pub const KIND: &str = "MeshService";

/// The label an endpoint's zone is read from (Kubernetes' well-known topology label).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// `spec` of a `MeshService`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshServiceSpec {
    /// The identities allowed to serve the service (at least one). An endpoint of any other
    /// identity is never part of it, whatever labels it carries.
    pub identities: Vec<String>,
    /// Labels every endpoint must carry, besides one of the identities (e.g. a version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
}

impl MeshServiceSpec {
    /// Checks what decoding cannot: at least one identity, each a SPIFFE ID.
    pub fn check(&self) -> Result<(), String> {
        if self.identities.is_empty() {
            return Err("spec.identities: at least one identity must be allowed to serve the service".into());
        }
        for (i, id) in self.identities.iter().enumerate() {
            id.parse::<SpiffeId>().map_err(|e| format!("spec.identities[{i}]: {e}"))?;
        }
        Ok(())
    }

    fn admits(&self, e: &Endpoint) -> bool {
        self.identities.contains(&e.spiffe_id)
            && self.selector.as_ref().is_none_or(|s| s.match_labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
    }
}

/// One endpoint of a service: where, and who must answer there.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ServiceEndpoint {
    pub address: SocketAddr,
    pub identity: SpiffeId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// Every service this sidecar knows, by `namespace/name`, with its endpoints sorted. Looked up
/// per request by service routes: foldhash, not SipHash (the keys come from the operator's
/// resources, not from callers).
pub type Services = foldhash::HashMap<String, Arc<[ServiceEndpoint]>>;

/// Resolves the snapshot's `MeshService` resources against its endpoint table. A spec that does
/// not decode is returned as an error (for the NACK), the others resolved; an endpoint whose
/// address or identity does not parse is left out (the endpoint table reports it).
pub fn resolve(policies: &[Resource], endpoints: &[Endpoint]) -> (Services, Vec<(String, String)>) {
    let mut services = Services::default();
    let mut errors = Vec::new();
    for r in policies.iter().filter(|r| r.kind == KIND) {
        let name = format!("{}/{}", r.namespace, r.name);
        let spec = match serde_json::from_str::<MeshServiceSpec>(&r.spec_json) {
            Ok(spec) => spec,
            Err(e) => {
                errors.push((name, e.to_string()));
                continue;
            }
        };
        let mut members: Vec<ServiceEndpoint> = endpoints
            .iter()
            .filter(|e| spec.admits(e))
            .filter_map(|e| {
                Some(ServiceEndpoint {
                    address: e.address.parse().ok()?,
                    identity: e.spiffe_id.parse().ok()?,
                    zone: e.labels.get(ZONE_LABEL).cloned(),
                })
            })
            .collect();
        members.sort_by(|a, b| (a.address, a.identity.as_str()).cmp(&(b.address, b.identity.as_str())));
        members.dedup();
        services.insert(name, members.into());
    }
    (services, errors)
}

/// A service route's target: `NAMESPACE/NAME` of a `MeshService`.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceRoute {
    pub listen: SocketAddr,
    pub service: String,
}

impl std::str::FromStr for ServiceRoute {
    type Err = String;

    /// `LISTEN=NAMESPACE/NAME`, e.g. `127.0.0.1:7001=shop/orders`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (listen, service) =
            s.split_once('=').ok_or_else(|| format!("service route {s:?}: expected LISTEN=NAMESPACE/NAME"))?;
        let listen = listen.parse().map_err(|e| format!("service route {s:?}: listen address: {e}"))?;
        match service.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ServiceRoute { listen, service: service.to_string() })
            }
            _ => Err(format!("service route {s:?}: expected LISTEN=NAMESPACE/NAME")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(address: &str, sa: &str, l: &[(&str, &str)]) -> Endpoint {
        Endpoint {
            address: address.into(),
            spiffe_id: format!("spiffe://cluster.local/ns/shop/sa/{sa}"),
            labels: l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn service(name: &str, spec: serde_json::Value) -> Resource {
        Resource {
            kind: KIND.into(),
            namespace: "shop".into(),
            name: name.into(),
            origin: "test".into(),
            spec_json: spec.to_string(),
            labels: Default::default(),
        }
    }

    #[test]
    fn an_endpoint_joins_only_a_service_that_names_its_identity() {
        let table = vec![
            ep("10.0.0.1:15006", "orders", &[("app", "orders"), (ZONE_LABEL, "a")]),
            ep("10.0.0.2:15006", "orders-v2", &[("app", "orders")]),
            // Claims the label, but its identity is not allowed to serve `orders`.
            ep("10.0.0.3:15006", "thief", &[("app", "orders")]),
            ep("10.0.0.4:15006", "orders", &[("app", "billing")]),
        ];
        let ids = ["spiffe://cluster.local/ns/shop/sa/orders", "spiffe://cluster.local/ns/shop/sa/orders-v2"];
        let (services, errors) = resolve(
            &[
                service(
                    "orders",
                    serde_json::json!({"identities": ids, "selector": {"matchLabels": {"app": "orders"}}}),
                ),
                service("broken", serde_json::json!({"identities": "not a list"})),
            ],
            &table,
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, "shop/broken");
        let orders = &services["shop/orders"];
        let got: Vec<_> = orders.iter().map(|e| (e.address.to_string(), e.identity.to_string())).collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.1:15006".to_string(), ids[0].to_string()),
                ("10.0.0.2:15006".to_string(), ids[1].to_string()),
            ],
            "two identities serve it, each endpoint as itself; the thief and the wrong label are out"
        );
        assert_eq!(orders[0].zone.as_deref(), Some("a"));
    }

    #[test]
    fn a_spec_needs_identities_that_parse() {
        assert!(MeshServiceSpec::default().check().is_err());
        let bad = MeshServiceSpec { identities: vec!["orders".into()], selector: None };
        assert!(bad.check().unwrap_err().contains("identities[0]"));
        let good = MeshServiceSpec { identities: vec!["spiffe://cluster.local/ns/a/sa/b".into()], selector: None };
        assert!(good.check().is_ok());
    }

    #[test]
    fn parses_service_routes() {
        let r: ServiceRoute = "127.0.0.1:7001=shop/orders".parse().unwrap();
        assert_eq!((r.listen.port(), r.service.as_str()), (7001, "shop/orders"));
        for bad in ["127.0.0.1:7001=orders", "127.0.0.1:7001=/orders", "127.0.0.1:7001=a/b/c", "x=shop/orders"] {
            assert!(bad.parse::<ServiceRoute>().is_err(), "{bad}");
        }
    }
}
