//! Kubernetes Services and their EndpointSlices, as the mesh's `MeshService`s.
//!
//! A Service with at least one EndpointSlice (label `kubernetes.io/service-name`, written by
//! the EndpointSlice controller for a Service with a selector, or by hand for one without)
//! becomes a `MeshService` of the same namespace and name: its ClusterIPs and TCP ports, every
//! address of its slices (with readiness and zone), and as its identities those of the meshed
//! pods at those addresses. An address that is no meshed pod adds no identity, and so never
//! becomes an endpoint a sidecar dials with mTLS; a Service none of whose addresses is a meshed
//! pod is no mesh service at all.
//!
//! Whoever may write a namespace's EndpointSlices may already send its Service's traffic to any
//! IP; the mesh adds only that each endpoint must then prove the identity of the pod there.
//!
//! A Service is converted again only when it, one of its slices, or the IP → identity index of
//! the meshed pods changed; otherwise its last result is reused.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::cluster_table::ClusterTable;
use super::{Resource, ResourceError, Spec};
use crate::proxy::service::{EndpointAt, MeshServiceSpec, ServicePort};

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What one conversion depended on: the Service's resourceVersion, its slices' uids and
/// resourceVersions, and the IP index's epoch.
type Inputs = (String, Vec<(String, String)>, u64);

/// A Service as last converted.
struct Entry {
    inputs: Inputs,
    result: Result<Option<Resource>, String>,
}

/// The `MeshService`s made from Services and EndpointSlices, updated by difference.
#[derive(Default)]
pub struct KubeServices {
    entries: HashMap<String, Entry>,
    /// How many Services were converted again in the last update (for tests).
    pub recomputed: usize,
}

impl KubeServices {
    /// The mesh services of `services` with `slices`, whose identities come from `table`'s
    /// meshed pods; and a Service whose conversion fails the spec's checks, reported.
    pub fn update<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        table: &ClusterTable,
    ) -> (Vec<Resource>, Vec<ResourceError>) {
        self.recomputed = 0;
        let mut by_service: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
        for slice in slices {
            if let Some(service) = slice.labels().get(SERVICE_NAME_LABEL) {
                by_service.entry((slice.namespace().unwrap_or_default(), service.clone())).or_default().push(slice);
            }
        }
        let (mut resources, mut errors) = (Vec::new(), Vec::new());
        let mut live = HashSet::new();
        for svc in services {
            let (namespace, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
            let mut slices = by_service.remove(&(namespace.clone(), name.clone())).unwrap_or_default();
            slices.sort_by_key(|s| s.uid());
            let inputs: Inputs = (
                svc.resource_version().unwrap_or_default(),
                slices
                    .iter()
                    .map(|s| (s.uid().unwrap_or_default(), s.resource_version().unwrap_or_default()))
                    .collect(),
                table.ip_epoch(),
            );
            let uid = svc.uid().unwrap_or_default();
            live.insert(uid.clone());
            if self.entries.get(&uid).is_none_or(|e| e.inputs != inputs) {
                self.recomputed += 1;
                let result =
                    mesh_service(svc, &slices, |ip| table.identities_at(ip).map(|id| id.to_string()).collect());
                self.entries.insert(uid.clone(), Entry { inputs, result });
            }
            match &self.entries[&uid].result {
                Ok(Some(r)) => resources.push(r.clone()),
                Ok(None) => {}
                Err(message) => errors.push(ResourceError {
                    origin: format!("kubernetes:Service/{namespace}/{name}"),
                    document: None,
                    line: None,
                    column: None,
                    object: Some(format!("Service {namespace}/{name}")),
                    message: format!("as a MeshService: {message}"),
                }),
            }
        }
        self.entries.retain(|uid, _| live.contains(uid));
        (resources, errors)
    }
}

/// The `MeshService` `svc` stands for with its EndpointSlices `slices`: `None` when it has no
/// slice or no meshed pod at any of their addresses. `identities_at` gives the identities of the
/// meshed pods at an IP. An error when the result fails the checks a `MeshService` must pass.
pub fn mesh_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    identities_at: impl Fn(IpAddr) -> Vec<String>,
) -> Result<Option<Resource>, String> {
    let Some(spec) = svc.spec.as_ref() else { return Ok(None) };
    if slices.is_empty() {
        return Ok(None);
    }
    let endpoints = endpoints_of(slices);
    let identities: BTreeSet<String> = endpoints.iter().flat_map(|at| identities_at(at.ip)).collect();
    if identities.is_empty() {
        return Ok(None);
    }
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .flatten()
        // The mesh carries TCP only.
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok().filter(|p| *p != 0)?;
            let target_port = match &p.target_port {
                Some(IntOrString::Int(t)) => u16::try_from(*t).ok().filter(|t| *t != 0),
                Some(IntOrString::String(_)) => named_target(slices, p.name.as_deref()),
                None => None,
            };
            Some(ServicePort { name: p.name.clone(), port, target_port })
        })
        .collect();
    // A headless Service ("None") has no address; a Service with no TCP port has none to offer.
    let addresses: Vec<IpAddr> = match ports.is_empty() {
        true => Vec::new(),
        false => match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
            _ => spec.cluster_ip.iter().filter_map(|ip| ip.parse().ok()).collect(),
        },
    };
    let spec = MeshServiceSpec {
        identities: identities.into_iter().collect(),
        selector: None,
        addresses,
        ports,
        endpoints: Some(endpoints),
    };
    spec.check()?;
    let (namespace, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
    Ok(Some(Resource {
        origin: format!("kubernetes:Service/{namespace}/{name}"),
        namespace,
        name,
        labels: BTreeMap::new(),
        spec: Spec::MeshService(spec),
    }))
}

/// Every IP address of `slices`, sorted, each once: ready when any slice says so (an endpoint
/// moving between slices shows in both for a moment), ready when a slice does not say (the
/// API's meaning of an absent condition), and in the first zone given.
fn endpoints_of(slices: &[&EndpointSlice]) -> Vec<EndpointAt> {
    let mut by_ip: BTreeMap<IpAddr, EndpointAt> = BTreeMap::new();
    for e in slices.iter().flat_map(|s| &s.endpoints) {
        let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        // FQDN slices carry names, not IPs: nothing a sidecar can verify by address.
        for ip in e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
            let at = by_ip.entry(ip).or_insert(EndpointAt { ip, ready, zone: None });
            at.ready |= ready;
            if at.zone.is_none() {
                at.zone.clone_from(&e.zone);
            }
        }
    }
    by_ip.into_values().collect()
}

/// The port number the slices give for service port `name` (whose `targetPort` is a container
/// port's name): `None` when no slice says, or when slices disagree (pods mid-rollout with
/// different numbers for the name), as one number cannot serve both.
fn named_target(slices: &[&EndpointSlice], name: Option<&str>) -> Option<u16> {
    let numbers: BTreeSet<i32> = slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|p| p.name.as_deref().unwrap_or("") == name.unwrap_or(""))
        .filter_map(|p| p.port)
        .collect();
    match numbers.into_iter().collect::<Vec<_>>()[..] {
        [one] => u16::try_from(one).ok().filter(|p| *p != 0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"uid": "s", "resourceVersion": "1", "namespace": "shop", "name": "orders"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn slice(uid: &str, endpoints: serde_json::Value, ports: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"uid": uid, "resourceVersion": "1", "namespace": "shop", "name": uid,
                         "labels": {SERVICE_NAME_LABEL: "orders"}},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
        }))
        .unwrap()
    }

    /// Meshed pods: 10.0.0.1 and 10.0.0.2 run as `orders`, 10.0.0.3 as `orders-v2`.
    fn meshed(ip: IpAddr) -> Vec<String> {
        let sa = match ip.to_string().as_str() {
            "10.0.0.1" | "10.0.0.2" => "orders",
            "10.0.0.3" => "orders-v2",
            _ => return Vec::new(),
        };
        vec![format!("spiffe://cluster.local/ns/shop/sa/{sa}")]
    }

    fn spec_of(r: Option<Resource>) -> MeshServiceSpec {
        match r.expect("a mesh service").spec {
            Spec::MeshService(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_service_with_its_slices_becomes_a_mesh_service_with_each_endpoint_as_itself() {
        let svc = service(json!({
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ports": [
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "admin", "port": 9000, "targetPort": 9090},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
            ],
        }));
        let a = slice(
            "a",
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "zone": "z1"},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                // No meshed pod here: listed, but it names no identity.
                {"addresses": ["10.9.9.9"]},
            ]),
            json!([{"name": "http", "port": 8080}, {"name": "admin", "port": 9090}]),
        );
        // The condition absent: ready.
        let b = slice("b", json!([{"addresses": ["10.0.0.3"]}]), json!([{"name": "http", "port": 8080}]));
        let r = mesh_service(&svc, &[&a, &b], meshed).unwrap();
        assert_eq!(r.as_ref().unwrap().key(), ("MeshService", "shop", "orders"));
        assert_eq!(r.as_ref().unwrap().origin, "kubernetes:Service/shop/orders");
        let spec = spec_of(r);
        assert_eq!(
            spec.identities,
            ["spiffe://cluster.local/ns/shop/sa/orders", "spiffe://cluster.local/ns/shop/sa/orders-v2"],
            "two identities serve it"
        );
        assert_eq!(spec.addresses, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        let ports: Vec<_> = spec.ports.iter().map(|p| (p.name.as_deref().unwrap(), p.port, p.target_port)).collect();
        assert_eq!(
            ports,
            [("http", 80, Some(8080)), ("admin", 9000, Some(9090))],
            "the named targetPort resolved from the slices; UDP left out"
        );
        let endpoints: Vec<_> =
            spec.endpoints.unwrap().into_iter().map(|e| (e.ip.to_string(), e.ready, e.zone)).collect();
        assert_eq!(
            endpoints,
            [
                ("10.0.0.1".into(), true, Some("z1".into())),
                ("10.0.0.2".into(), false, None),
                ("10.0.0.3".into(), true, None),
                ("10.9.9.9".into(), true, None),
            ]
        );
    }

    #[test]
    fn a_named_target_port_the_slices_disagree_on_or_omit_is_left_out() {
        let svc = service(
            json!({"clusterIPs": ["10.96.0.10"], "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}),
        );
        let one = slice("a", json!([{"addresses": ["10.0.0.1"]}]), json!([{"name": "http", "port": 8080}]));
        let other = slice("b", json!([{"addresses": ["10.0.0.2"]}]), json!([{"name": "http", "port": 8081}]));
        assert_eq!(spec_of(mesh_service(&svc, &[&one, &other], meshed).unwrap()).ports[0].target_port, None);
        let unnamed = slice("c", json!([{"addresses": ["10.0.0.1"]}]), json!([{"name": "metrics", "port": 9100}]));
        assert_eq!(spec_of(mesh_service(&svc, &[&unnamed], meshed).unwrap()).ports[0].target_port, None);
    }

    #[test]
    fn a_headless_service_has_endpoints_but_no_address() {
        let svc = service(json!({"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 80}]}));
        let s = slice("a", json!([{"addresses": ["10.0.0.1"]}]), json!([{"port": 80}]));
        let spec = spec_of(mesh_service(&svc, &[&s], meshed).unwrap());
        assert!(spec.addresses.is_empty());
        assert_eq!(spec.identities, ["spiffe://cluster.local/ns/shop/sa/orders"]);
        assert_eq!(spec.endpoints.unwrap().len(), 1);
    }

    #[test]
    fn a_service_with_no_meshed_endpoint_or_no_slice_is_no_mesh_service() {
        let svc = service(json!({"clusterIPs": ["10.96.0.10"], "ports": [{"port": 80}]}));
        let unmeshed = slice("a", json!([{"addresses": ["10.9.9.9", "10.9.9.8"]}]), json!([{"port": 80}]));
        assert_eq!(mesh_service(&svc, &[&unmeshed], meshed), Ok(None));
        assert_eq!(mesh_service(&svc, &[], meshed), Ok(None));
        let fqdn = slice("b", json!([{"addresses": ["orders.example.com"]}]), json!([{"port": 80}]));
        assert_eq!(mesh_service(&svc, &[&fqdn], meshed), Ok(None));
    }

    #[test]
    fn an_endpoint_in_two_slices_is_listed_once_ready_if_either_says_so() {
        let svc = service(json!({"clusterIPs": ["10.96.0.10"], "ports": [{"port": 80}]}));
        let old = slice("a", json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": false}}]), json!([]));
        let new =
            slice("b", json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "zone": "z2"}]), json!([]));
        let endpoints = spec_of(mesh_service(&svc, &[&old, &new], meshed).unwrap()).endpoints.unwrap();
        assert_eq!(endpoints, [EndpointAt { ip: "10.0.0.1".parse().unwrap(), ready: true, zone: Some("z2".into()) }]);
    }

    fn pod(uid: &str, version: &str, sa: &str, ip: &str) -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(json!({
            "metadata": {"uid": uid, "resourceVersion": version, "namespace": "shop", "name": uid,
                         "annotations": {super::super::kubernetes::INJECTED_ANNOTATION: "injected"}},
            "spec": {"serviceAccountName": sa, "containers": []},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
        }))
        .unwrap()
    }

    #[test]
    fn a_service_is_converted_again_only_when_it_its_slices_or_the_pods_at_their_addresses_change() {
        let mut table = ClusterTable::new("cluster.local");
        let mut pods = vec![pod("p1", "1", "orders", "10.0.0.1")];
        let svc = service(json!({"clusterIPs": ["10.96.0.10"], "ports": [{"port": 80}]}));
        let mut slices = vec![slice("a", json!([{"addresses": ["10.0.0.1", "10.0.0.2"]}]), json!([]))];
        let mut services = KubeServices::default();
        table.update(&pods, [&svc]);
        let (first, errors) = services.update([&svc], &slices, &table);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((first.len(), services.recomputed), (1, 1));

        let (again, _) = services.update([&svc], &slices, &table);
        assert_eq!((again, services.recomputed), (first.clone(), 0), "nothing changed: nothing converted");

        // A second pod gets the slice's other address, under another identity.
        pods.push(pod("p2", "1", "orders-v2", "10.0.0.2"));
        table.update(&pods, [&svc]);
        let (two, _) = services.update([&svc], &slices, &table);
        assert_eq!(services.recomputed, 1);
        assert_eq!(spec_of(two.into_iter().next()).identities.len(), 2);

        // The slice no longer lists the first pod.
        slices[0] = serde_json::from_value(json!({
            "metadata": {"uid": "a", "resourceVersion": "2", "namespace": "shop", "name": "a",
                         "labels": {SERVICE_NAME_LABEL: "orders"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.2"]}],
        }))
        .unwrap();
        let (one, _) = services.update([&svc], &slices, &table);
        assert_eq!(services.recomputed, 1);
        assert_eq!(spec_of(one.into_iter().next()).identities, ["spiffe://cluster.local/ns/shop/sa/orders-v2"]);

        // Its pod leaves: no meshed endpoint, no mesh service.
        pods.remove(1);
        table.update(&pods, [&svc]);
        assert!(services.update([&svc], &slices, &table).0.is_empty());
        assert!(services.update(std::iter::empty(), &slices, &table).0.is_empty());
    }
}
