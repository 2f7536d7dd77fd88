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
//! and whose labels include the selector's; when the spec lists `endpoints` (Kubernetes: the
//! ready addresses of the Service's EndpointSlices), only those of them at one of its IPs.
//!
//! A service with `addresses` (Kubernetes: its ClusterIPs) and `ports` is also reached in
//! transparent mode: a connection the app makes to `ADDRESS:PORT` is balanced per request
//! across the endpoints, each dialled at its pod IP and the port's `targetPort`, where the
//! endpoint's own sidecar takes it. The sidecar resolves that itself from the table it
//! already keeps (which the control plane sends as deltas), so a workload joining a service
//! costs every sidecar that one entry, not the service again. Labels are what a sidecar says
//! about itself; the identity list is what makes the claim safe: a workload can only ever join
//! a service that names its own identity, and every connection to an endpoint must prove that
//! endpoint's identity.

use std::net::{IpAddr, SocketAddr};
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
    /// Virtual addresses of the service (ClusterIPs): in transparent mode a connection to one
    /// of them, at one of `ports`, is balanced across the endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// The ports at `addresses`, each with the port its endpoints serve it on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    /// When present, the service's endpoints are at these IPs only (Kubernetes: the addresses
    /// of its EndpointSlices), and those not ready are left out. Each must still be in the
    /// endpoint table under one of `identities`: the list narrows the service, never widens it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<EndpointAt>>,
}

/// A port of a service: the one callers dial at its addresses, and the one its endpoints serve.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// The endpoints' port; `port` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// An address a service's endpoint may be at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointAt {
    pub ip: IpAddr,
    /// Not ready: left out of the service until it is.
    #[serde(default = "ready_by_default")]
    pub ready: bool,
    /// Overrides the zone the endpoint's labels give.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

fn ready_by_default() -> bool {
    true
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
        if !self.addresses.is_empty() && self.ports.is_empty() {
            return Err("spec.ports: a service with addresses needs at least one port".into());
        }
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 || p.target_port == Some(0) {
                return Err(format!("spec.ports[{i}]: port 0"));
            }
            if self.ports[..i].iter().any(|q| q.port == p.port) {
                return Err(format!("spec.ports[{i}]: port {} listed twice", p.port));
            }
        }
        Ok(())
    }

    /// Whether table entry `e` is an endpoint of the service, and where it says it is.
    fn admits(&self, e: &Endpoint, address: SocketAddr) -> Option<Option<&EndpointAt>> {
        let named = self.identities.contains(&e.spiffe_id)
            && self.selector.as_ref().is_none_or(|s| s.match_labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)));
        if !named {
            return None;
        }
        match &self.endpoints {
            None => Some(None),
            Some(list) => list.iter().find(|at| at.ip == address.ip()).filter(|at| at.ready).map(Some),
        }
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

impl ServiceEndpoint {
    /// Where a request for service port `port` (of `ports`) is sent: the registered address, or,
    /// for an endpoint registered as a whole IP (`IP:0`, transparent mode), that IP at the
    /// port's target. `None` when there is no port to dial.
    pub fn dial(&self, port: Option<u16>, ports: &[(u16, u16)]) -> Option<SocketAddr> {
        if self.address.port() != 0 {
            return Some(self.address);
        }
        let port = port?;
        let target = ports.iter().find(|(p, _)| *p == port).map_or(port, |(_, t)| *t);
        Some(SocketAddr::new(self.address.ip(), target))
    }
}

/// One service as resolved: its endpoints, sorted, and the ports of its addresses. Shared by
/// pointer while it does not change, which tells a balancer nothing changed.
#[derive(Debug, Default, PartialEq, Serialize)]
pub struct Service {
    pub endpoints: Vec<ServiceEndpoint>,
    /// (service port, endpoint port) for each port at the service's addresses.
    pub ports: Vec<(u16, u16)>,
}

/// Every service this sidecar knows, by `namespace/name`. Looked up per request by service
/// routes: foldhash, not SipHash (the keys come from the operator's resources, not from
/// callers).
pub type Services = foldhash::HashMap<String, Arc<Service>>;

/// Where services are reached without a route: their virtual addresses.
#[derive(Debug, Default, PartialEq, Serialize)]
pub struct ServiceAddresses {
    /// `ADDRESS:PORT` → the service there (transparent outbound looks each connection up here).
    #[serde(serialize_with = "by_string")]
    pub at: foldhash::HashMap<SocketAddr, Arc<str>>,
}

fn by_string<S: serde::Serializer>(at: &foldhash::HashMap<SocketAddr, Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    let sorted: std::collections::BTreeMap<String, &str> = at.iter().map(|(a, n)| (a.to_string(), &**n)).collect();
    sorted.serialize(s)
}

/// What the snapshot's `MeshService` resources resolve to.
#[derive(Default)]
pub struct Resolved {
    pub services: Services,
    pub addresses: ServiceAddresses,
    /// `namespace/name` and why, for each spec that does not decode or check.
    pub errors: Vec<(String, String)>,
}

/// Resolves a snapshot's `MeshService` resources against its endpoint table; a spec that does
/// not decode or check is reported with why (for the NACK), and the others resolved.
pub fn resolve_snapshot(policies: &[Resource], endpoints: &[Endpoint]) -> Resolved {
    let (mut specs, mut errors) = (Vec::new(), Vec::new());
    for r in policies.iter().filter(|r| r.kind == KIND) {
        let name = format!("{}/{}", r.namespace, r.name);
        let spec = serde_json::from_str::<MeshServiceSpec>(&r.spec_json).map_err(|e| e.to_string());
        match spec.and_then(|spec| spec.check().map(|()| spec)) {
            Ok(spec) => specs.push((name, spec)),
            Err(e) => errors.push((name, e)),
        }
    }
    let mut resolved = resolve(specs.iter().map(|(name, spec)| (name.as_str(), spec)), endpoints);
    errors.append(&mut resolved.errors);
    resolved.errors = errors;
    resolved
}

/// Resolves mesh services (`namespace/name` and spec) against an endpoint table. An endpoint
/// whose address or identity does not parse is left out (the endpoint table reports it). An
/// address claimed by two services goes to the first by name, and the second is reported; so is
/// an address that is another workload's.
pub fn resolve<'a>(
    specs: impl IntoIterator<Item = (&'a str, &'a MeshServiceSpec)>,
    endpoints: &[Endpoint],
) -> Resolved {
    let mut out = Resolved::default();
    let mut specs: Vec<_> = specs.into_iter().collect();
    specs.sort_by(|a, b| a.0.cmp(b.0));
    // A service's address never shadows another workload's: an address in the endpoint table
    // under an identity the service does not name keeps going to that workload, verified as
    // it. (Under one it names, it is the service's own: a Kubernetes ClusterIP whose pods
    // share one identity is in the table too.)
    let mut table_ips: std::collections::HashMap<IpAddr, Vec<&str>> = std::collections::HashMap::new();
    for e in endpoints {
        if let Ok(a) = e.address.parse::<SocketAddr>() {
            table_ips.entry(a.ip()).or_default().push(&e.spiffe_id);
        }
    }
    for (name, spec) in specs {
        let mut members: Vec<ServiceEndpoint> = endpoints
            .iter()
            .filter_map(|e| {
                let address: SocketAddr = e.address.parse().ok()?;
                let at = spec.admits(e, address)?;
                Some(ServiceEndpoint {
                    address,
                    identity: e.spiffe_id.parse().ok()?,
                    zone: at.and_then(|at| at.zone.clone()).or_else(|| e.labels.get(ZONE_LABEL).cloned()),
                })
            })
            .collect();
        members.sort_by(|a, b| (a.address, a.identity.as_str()).cmp(&(b.address, b.identity.as_str())));
        members.dedup();
        let service: Arc<str> = Arc::from(name);
        let mut taken = None;
        for ip in &spec.addresses {
            if let Some(other) =
                table_ips.get(ip).and_then(|ids| ids.iter().find(|id| !spec.identities.iter().any(|i| i == *id)))
            {
                taken =
                    Some(format!("address {ip} is in the endpoint table as {other}, which the service does not name"));
                continue;
            }
            for p in &spec.ports {
                let at = SocketAddr::new(*ip, p.port);
                match out.addresses.at.get(&at) {
                    Some(other) => taken = Some(format!("address {at} is already {other}'s")),
                    None => {
                        out.addresses.at.insert(at, service.clone());
                    }
                }
            }
        }
        if let Some(e) = taken {
            out.errors.push((name.to_string(), e));
        }
        let ports = spec.ports.iter().map(|p| (p.port, p.target())).collect();
        out.services.insert(name.to_string(), Arc::new(Service { endpoints: members, ports }));
    }
    out
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
        let Resolved { services, errors, .. } = resolve_snapshot(
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
        let orders = &services["shop/orders"].endpoints;
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
    fn endpoint_slices_narrow_a_service_and_its_addresses_map_to_it() {
        let table = vec![
            ep("10.0.0.1:0", "orders", &[]),
            ep("10.0.0.2:0", "orders", &[]),
            ep("10.0.0.3:0", "orders", &[]),
            // Listed in the slice, but not under an identity the service names.
            ep("10.0.0.4:0", "thief", &[]),
        ];
        let spec = serde_json::json!({
            "identities": ["spiffe://cluster.local/ns/shop/sa/orders"],
            "addresses": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}, {"port": 9090}],
            "endpoints": [
                {"ip": "10.0.0.1", "zone": "z1"},
                {"ip": "10.0.0.2", "ready": false},
                {"ip": "10.0.0.4"},
            ],
        });
        let other = serde_json::json!({
            "identities": ["spiffe://cluster.local/ns/shop/sa/orders"],
            "addresses": ["10.96.0.10"],
            "ports": [{"port": 80}],
        });
        let r = resolve_snapshot(&[service("orders", spec), service("squatter", other)], &table);
        let orders = &r.services["shop/orders"].endpoints;
        assert_eq!(orders.len(), 1, "only the ready endpoint of the slice, under a named identity: {orders:?}");
        assert_eq!((orders[0].address.to_string(), orders[0].zone.as_deref()), ("10.0.0.1:0".into(), Some("z1")));
        let at = |a: &str| r.addresses.at.get(&a.parse::<SocketAddr>().unwrap()).map(|s| s.to_string());
        assert_eq!(at("10.96.0.10:80").as_deref(), Some("shop/orders"));
        assert_eq!(at("10.96.0.10:9090").as_deref(), Some("shop/orders"));
        assert_eq!(at("10.96.0.10:81"), None);
        assert_eq!(r.errors.len(), 1, "the second claim on an address is reported: {:?}", r.errors);
        // A service claiming a workload's own address does not get it.
        let shadow = serde_json::json!({
            "identities": ["spiffe://cluster.local/ns/shop/sa/orders"],
            "addresses": ["10.0.0.4"],
            "ports": [{"port": 80}],
        });
        let s = resolve_snapshot(&[service("shadow", shadow)], &table);
        assert!(s.addresses.at.is_empty(), "{:?}", s.addresses);
        assert!(
            s.errors[0].1.contains("as spiffe://cluster.local/ns/shop/sa/thief, which the service does not name"),
            "{:?}",
            s.errors
        );
        // Its own address under an identity it names (a ClusterIP whose pods share one) is fine.
        let own = serde_json::json!({
            "identities": ["spiffe://cluster.local/ns/shop/sa/orders"],
            "addresses": ["10.0.0.3"],
            "ports": [{"port": 80}],
        });
        let o = resolve_snapshot(&[service("own", own)], &table);
        assert!(o.errors.is_empty() && o.addresses.at.len() == 1, "{:?}", o.errors);
        assert!(r.errors[0].1.contains("already shop/orders's"), "{:?}", r.errors);
        let ports = &r.services["shop/orders"].ports;
        assert_eq!(orders[0].dial(Some(80), ports), Some("10.0.0.1:8080".parse().unwrap()));
        assert_eq!(orders[0].dial(Some(9090), ports), Some("10.0.0.1:9090".parse().unwrap()));
        assert_eq!(orders[0].dial(None, ports), None, "a whole-IP endpoint needs a port to be dialled");
        let explicit = ServiceEndpoint { address: "10.0.0.9:15006".parse().unwrap(), ..orders[0].clone() };
        assert_eq!(explicit.dial(Some(80), ports), Some(explicit.address));
    }

    #[test]
    fn a_spec_needs_identities_that_parse() {
        assert!(MeshServiceSpec::default().check().is_err());
        let bad = MeshServiceSpec { identities: vec!["orders".into()], ..Default::default() };
        assert!(bad.check().unwrap_err().contains("identities[0]"));
        let good =
            MeshServiceSpec { identities: vec!["spiffe://cluster.local/ns/a/sa/b".into()], ..Default::default() };
        assert!(good.check().is_ok());
        let no_port = MeshServiceSpec { addresses: vec!["10.96.0.1".parse().unwrap()], ..good.clone() };
        assert!(no_port.check().unwrap_err().contains("spec.ports"));
        let twice = MeshServiceSpec {
            ports: vec![ServicePort { port: 80, ..Default::default() }, ServicePort { port: 80, ..Default::default() }],
            ..no_port.clone()
        };
        assert!(twice.check().unwrap_err().contains("listed twice"));
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
