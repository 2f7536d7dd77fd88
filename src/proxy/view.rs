//! The data plane's view of the mesh: one immutable snapshot, swapped whole.
//!
//! The data path reads it through `ArcSwap` with no lock; a new discovery snapshot is compiled
//! into a new `MeshView` off the data path and swapped in atomically, so a request sees either
//! the old set or the new set, never half of each.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::identity::SpiffeId;
use crate::proto::discovery::{Snapshot, peer_authentication::Mode};

/// Whether plaintext is accepted on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PeerAuthMode {
    /// mTLS only.
    Strict,
    /// mTLS or plaintext; plaintext callers are unauthenticated for policy.
    Permissive,
}

/// What a workload with no ALLOW policy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DefaultPolicy {
    Deny,
    AllowAuthenticated,
    Allow,
}

impl std::str::FromStr for DefaultPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deny" | "" => Ok(DefaultPolicy::Deny),
            "allow-authenticated" => Ok(DefaultPolicy::AllowAuthenticated),
            "allow" => Ok(DefaultPolicy::Allow),
            other => Err(format!("default policy {other:?} is not deny, allow-authenticated or allow")),
        }
    }
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
            received: false,
        }
    }

    /// Compiles a discovery snapshot. Any error refuses the whole snapshot (NACK).
    pub fn from_snapshot(version: &str, snap: &Snapshot) -> Result<Self, String> {
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
        Ok(MeshView {
            version: version.to_string(),
            peer_auth: mode(pa.mode),
            port_peer_auth,
            endpoints,
            default_policy: mesh.default_policy.parse()?,
            egress_allowed: mesh.egress != "deny",
            received: true,
        })
    }

    /// The PeerAuthentication mode for a local port.
    pub fn mode_for_port(&self, port: u16) -> PeerAuthMode {
        self.port_peer_auth.get(&port).copied().unwrap_or(self.peer_auth)
    }
}
