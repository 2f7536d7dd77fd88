//! The data plane's view of the mesh: one immutable snapshot, swapped whole.
//!
//! The data path reads it through `ArcSwap` with no lock; a new discovery snapshot is compiled
//! into a new `MeshView` off the data path and swapped in atomically, so a request sees either
//! the old set or the new set, never half of each.

use std::collections::HashMap;
use std::net::SocketAddr;

use std::sync::Arc;

use crate::identity::SpiffeId;
use crate::policy::{AuthorizationPolicy, DefaultPolicy, Policy, PolicySet, Workload};
use crate::proto::discovery::{Snapshot, peer_authentication::Mode};

/// Whether plaintext is accepted on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PeerAuthMode {
    /// mTLS only.
    Strict,
    /// mTLS or plaintext; plaintext callers are unauthenticated for policy.
    Permissive,
}

/// One version of everything the data path needs from the control plane.
#[derive(Debug, serde::Serialize)]
pub struct MeshView {
    pub version: String,
    pub peer_auth: PeerAuthMode,
    pub port_peer_auth: HashMap<u16, PeerAuthMode>,
    /// Meshed destinations: address → the identity that must answer there.
    pub endpoints: HashMap<SocketAddr, SpiffeId>,
    pub default_policy: DefaultPolicy,
    pub egress_allowed: bool,
    /// The compiled policies for this workload.
    #[serde(skip)]
    pub policies: Arc<PolicySet>,
    /// `namespace/name` of every policy in force, for `/config_dump`.
    pub policy_names: Vec<String>,
    /// Whether this view came from the control plane. Before the first snapshot every request
    /// is refused: a workload that never received policy fails closed.
    pub received: bool,
}

impl MeshView {
    /// The view before the first snapshot: refuse everything.
    pub fn fail_closed() -> Self {
        MeshView {
            version: String::new(),
            peer_auth: PeerAuthMode::Strict,
            port_peer_auth: HashMap::new(),
            endpoints: HashMap::new(),
            default_policy: DefaultPolicy::Deny,
            egress_allowed: false,
            policies: Arc::new(PolicySet::fail_closed()),
            policy_names: Vec::new(),
            received: false,
        }
    }

    /// Compiles a discovery snapshot for `workload`. Any error refuses the whole snapshot
    /// (NACK): the previous view stays in force.
    pub fn from_snapshot(version: &str, snap: &Snapshot, workload: &Workload) -> Result<Self, String> {
        let mode = |m: i32| if m == Mode::Permissive as i32 { PeerAuthMode::Permissive } else { PeerAuthMode::Strict };
        let pa = snap.peer_authentication.clone().unwrap_or_default();
        let mut port_peer_auth = HashMap::new();
        for (port, m) in &pa.port_modes {
            let port = u16::try_from(*port).map_err(|_| format!("PeerAuthentication port {port} is out of range"))?;
            port_peer_auth.insert(port, mode(*m));
        }
        let mut endpoints = HashMap::new();
        for e in &snap.endpoints {
            let addr: SocketAddr =
                e.address.parse().map_err(|err| format!("endpoint address {:?}: {err}", e.address))?;
            let id: SpiffeId = e.spiffe_id.parse().map_err(|err| format!("endpoint {}: {err}", e.address))?;
            endpoints.insert(addr, id);
        }
        let mesh = snap.mesh.clone().unwrap_or_default();
        let default_policy: DefaultPolicy =
            if mesh.default_policy.is_empty() { DefaultPolicy::Deny } else { mesh.default_policy.parse()? };
        let mut compiled = Vec::new();
        let mut policy_names = Vec::new();
        for r in snap.policies.iter().filter(|r| r.kind == "AuthorizationPolicy") {
            let named = |e: &dyn std::fmt::Display| format!("{} ({}/{}): {e}", r.origin, r.namespace, r.name);
            let resource: AuthorizationPolicy = serde_json::from_str(&r.manifest_json).map_err(|e| named(&e))?;
            compiled.push(Arc::new(Policy::compile(&resource).map_err(|e| named(&e))?));
            policy_names.push(format!("{}/{}", r.namespace, r.name));
        }
        let policies = Arc::new(PolicySet::new(compiled, workload.clone(), default_policy));
        Ok(MeshView {
            version: version.to_string(),
            peer_auth: mode(pa.mode),
            port_peer_auth,
            endpoints,
            default_policy,
            egress_allowed: mesh.egress != "deny",
            policies,
            policy_names,
            received: true,
        })
    }

    /// The identity that must answer at `dst`: an exact `IP:PORT` entry, or the workload that
    /// registered the whole IP (`IP:0`, transparent mode).
    pub fn identity_for(&self, dst: SocketAddr) -> Option<&SpiffeId> {
        self.endpoints.get(&dst).or_else(|| self.endpoints.get(&SocketAddr::new(dst.ip(), 0)))
    }

    /// The PeerAuthentication mode for a local port.
    pub fn mode_for_port(&self, port: u16) -> PeerAuthMode {
        self.port_peer_auth.get(&port).copied().unwrap_or(self.peer_auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::discovery::{MeshConfig, PeerAuthentication};

    #[test]
    fn port_level_mode_overrides_the_workload_mode_and_ip_entries_cover_every_port() {
        let snap = Snapshot {
            peer_authentication: Some(PeerAuthentication {
                mode: Mode::Strict as i32,
                port_modes: [(9090u32, Mode::Permissive as i32)].into(),
            }),
            endpoints: vec![crate::proto::discovery::Endpoint {
                address: "10.0.0.7:0".into(),
                spiffe_id: "spiffe://cluster.local/ns/a/sa/b".into(),
                labels: Default::default(),
            }],
            mesh: Some(MeshConfig { default_policy: "deny".into(), egress: "deny".into(), ..Default::default() }),
            ..Default::default()
        };
        let workload =
            Workload { id: "spiffe://cluster.local/ns/a/sa/me".parse().unwrap(), labels: Default::default() };
        let v = MeshView::from_snapshot("v1", &snap, &workload).unwrap();
        assert_eq!(v.mode_for_port(9090), PeerAuthMode::Permissive);
        assert_eq!(v.mode_for_port(8080), PeerAuthMode::Strict);
        assert_eq!(
            v.identity_for("10.0.0.7:5432".parse().unwrap()).unwrap().as_str(),
            "spiffe://cluster.local/ns/a/sa/b"
        );
        assert!(v.identity_for("10.0.0.8:5432".parse().unwrap()).is_none());
        assert!(!v.egress_allowed);
    }

    #[test]
    fn a_snapshot_with_a_bad_endpoint_or_port_is_refused_whole() {
        let workload =
            Workload { id: "spiffe://cluster.local/ns/a/sa/me".parse().unwrap(), labels: Default::default() };
        let bad = Snapshot {
            endpoints: vec![crate::proto::discovery::Endpoint { address: "nope".into(), ..Default::default() }],
            ..Default::default()
        };
        assert!(MeshView::from_snapshot("v", &bad, &workload).unwrap_err().contains("endpoint address"));
        let bad_port = Snapshot {
            peer_authentication: Some(PeerAuthentication { mode: 0, port_modes: [(70000u32, 1)].into() }),
            ..Default::default()
        };
        assert!(MeshView::from_snapshot("v", &bad_port, &workload).unwrap_err().contains("out of range"));
    }
}
