//! The data plane's view of the mesh: one immutable snapshot, swapped whole.
//!
//! Everything the data path needs from the control plane — trust roots, revocations, the
//! endpoint table, peer-authentication modes, mesh settings and the compiled policies — is one
//! [`MeshView`]. The data path and every TLS handshake read it through [`SharedView`] with no
//! lock; [`ViewWriter`], the only writer, builds the next view off the data path and swaps it in
//! with one store, so a request sees either the old view or the new one, never half of each.
//!
//! A snapshot is applied piece by piece into that one new view: a piece this sidecar cannot
//! compile keeps its previous version and is reported (NACK), and never holds back the others.
//! Above all, revocations and trust roots are applied whatever else in the snapshot fails.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::guard::Guards;
use crate::guard::jwt::JwtGuard;
use crate::guard::path::PathGuard;
use crate::guard::rate::RateGuard;
use crate::guard::security::SecurityGuard;
use crate::identity::SpiffeId;
use crate::policy::resource::{AuthorizationPolicy, AuthorizationPolicySpec, KIND as AUTHORIZATION_POLICY};
use crate::policy::{DefaultPolicy, Policy, PolicySet, Workload};
use crate::proto::discovery::{Revocation, Snapshot, peer_authentication::Mode, revocation::Target};
use crate::tls::{BundleError, BundleState, TrustSource};

use super::http_route::RouteTable;
use super::service::{ServiceAddresses, Services};

/// Whether plaintext is accepted on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PeerAuthMode {
    /// mTLS only.
    Strict,
    /// mTLS or plaintext; plaintext callers are unauthenticated for policy.
    Permissive,
}

/// One version of everything the data path needs from the control plane.
#[derive(serde::Serialize)]
pub struct MeshView {
    /// The snapshot version whose policies are in force.
    pub version: String,
    pub peer_auth: PeerAuthMode,
    pub port_peer_auth: HashMap<u16, PeerAuthMode>,
    /// Meshed destinations: address → the identity that must answer there.
    pub endpoints: HashMap<SocketAddr, SpiffeId>,
    /// Mesh services (`namespace/name`) with their endpoints, resolved from the table.
    pub services: Arc<Services>,
    /// Where services are reached by address (transparent mode), and their ports.
    pub service_addresses: Arc<ServiceAddresses>,
    /// `HTTPRoute` rules by the service they are attached to.
    pub routes: Arc<RouteTable>,
    pub default_policy: DefaultPolicy,
    pub egress_allowed: bool,
    /// The compiled policies for this workload.
    #[serde(skip)]
    pub policies: Arc<PolicySet>,
    /// `namespace/name` of every policy in force, for `/config_dump`.
    pub policy_names: Vec<String>,
    /// The roots this sidecar trusts and the peers it refuses.
    #[serde(skip)]
    pub trust: Arc<BundleState>,
    /// API protection before policy: path normalization, end-user tokens, rate limits.
    #[serde(skip)]
    pub guards: Arc<Guards>,
    /// Whether this view came from the control plane. Before the first snapshot every request
    /// is refused: a workload that never received policy fails closed.
    pub received: bool,
}

impl MeshView {
    /// The view before the first snapshot: the roots the sidecar was started with, and refuse
    /// every request.
    pub fn fail_closed(trust: BundleState) -> Self {
        MeshView {
            version: String::new(),
            peer_auth: PeerAuthMode::Strict,
            port_peer_auth: HashMap::new(),
            endpoints: HashMap::new(),
            services: Arc::default(),
            service_addresses: Arc::default(),
            routes: Arc::default(),
            default_policy: DefaultPolicy::Deny,
            egress_allowed: false,
            policies: Arc::new(PolicySet::fail_closed()),
            policy_names: Vec::new(),
            trust: Arc::new(trust),
            guards: Arc::new(Guards::default()),
            received: false,
        }
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

/// The one holder of the sidecar's [`MeshView`], read by the data path and by TLS.
pub struct SharedView {
    view: ArcSwap<MeshView>,
    /// Bumped whenever open connections must be judged again: the revocation lists changed
    /// (is their peer revoked?), or this sidecar's own certificate lapsed (may they go on?).
    revocation_epoch: tokio::sync::watch::Sender<u64>,
}

impl SharedView {
    /// The view in force now.
    pub fn load(&self) -> arc_swap::Guard<Arc<MeshView>> {
        self.view.load()
    }

    /// The view in force now, held for longer than a request (a connection's lifetime).
    pub fn load_full(&self) -> Arc<MeshView> {
        self.view.load_full()
    }

    /// Notifies on every change of the revocation lists, and when this sidecar's certificate
    /// lapses ([`Self::recheck_connections`]).
    pub fn revocations_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocation_epoch.subscribe()
    }

    /// Has every open connection judge itself again (and outbound pools start afresh).
    pub fn recheck_connections(&self) {
        self.revocation_epoch.send_modify(|e| *e += 1);
    }
}

impl TrustSource for SharedView {
    fn trust(&self) -> Arc<BundleState> {
        self.view.load().trust.clone()
    }
}

/// Why part of a snapshot was not applied. The rest of the snapshot was.
#[derive(Debug, thiserror::Error)]
pub enum NackReason {
    #[error("policy {origin} ({namespace}/{name}): {message}")]
    Policy { origin: String, namespace: String, name: String, message: String },
    #[error("trust bundle: {0}")]
    TrustBundle(#[from] BundleError),
    #[error("endpoint {address:?}: {message}")]
    Endpoint { address: String, message: String },
    #[error("PeerAuthentication port {0} is out of range")]
    Port(u32),
    #[error("mesh default policy: {0}")]
    DefaultPolicy(String),
    #[error("{kind} {origin} ({namespace}/{name}): {message}")]
    Guard { kind: String, origin: String, namespace: String, name: String, message: String },
    #[error("mesh path normalization: {0}")]
    PathNormalization(String),
}

/// What a snapshot could not change, as the agent reports it (one message for the NACK).
#[derive(Debug)]
pub struct Nack(pub Vec<NackReason>);

impl std::fmt::Display for Nack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// The only writer of a [`SharedView`]. Its inputs are discovery snapshots and the roots that
/// come with a new certificate; each is applied under one lock, so no update is lost.
pub struct ViewWriter {
    shared: Arc<SharedView>,
    /// The compiled policies in force (the set a failed compilation keeps); held as the lock
    /// that makes every write one at a time.
    policies: Mutex<Vec<Arc<Policy>>>,
}

impl ViewWriter {
    /// A view that refuses every request and trusts `roots` until the first snapshot, and its
    /// writer.
    pub fn new(roots: BundleState) -> (Arc<SharedView>, ViewWriter) {
        let shared = Arc::new(SharedView {
            view: ArcSwap::from_pointee(MeshView::fail_closed(roots)),
            revocation_epoch: tokio::sync::watch::channel(0).0,
        });
        (shared.clone(), ViewWriter { shared, policies: Mutex::new(Vec::new()) })
    }

    /// Applies a discovery snapshot for `workload`. Revocations, trust roots, endpoints and
    /// settings are applied independently of the policies; whatever this sidecar could not
    /// compile keeps its previous version and is returned for the NACK.
    pub fn apply_snapshot(&self, version: &str, snap: &Snapshot, workload: &Workload) -> Result<(), Nack> {
        let mut in_force = self.policies.lock();
        let cur = self.shared.view.load_full();
        let mut nack = Vec::new();

        let roots = match snap.trust_bundle_pem.as_str() {
            "" => Ok(None),
            pem if pem == cur.trust.pem => Ok(None),
            pem => BundleState::from_pem(pem).map(Some),
        };
        let roots = roots.unwrap_or_else(|e| {
            nack.push(NackReason::TrustBundle(e));
            None
        });
        let (ids, serials) = revocation_sets(&snap.revocations);
        let trust = Arc::new(roots.as_ref().unwrap_or(&cur.trust).with_revocations(ids, serials));

        let (peer_auth, port_peer_auth) = peer_authentication(snap, &cur, &mut nack);
        let endpoints = endpoints(snap, &mut nack);
        let (services, service_addresses) = services(snap, &cur, &mut nack);
        let caller_ns = workload.id.namespace().unwrap_or_default();
        let routes = http_routes(snap, caller_ns, &mut nack).unwrap_or_else(|| cur.routes.clone());
        let mesh = snap.mesh.clone().unwrap_or_default();
        let default_policy = match mesh.default_policy.as_str() {
            "" => DefaultPolicy::Deny,
            s => s.parse().unwrap_or_else(|e: String| {
                nack.push(NackReason::DefaultPolicy(e));
                cur.default_policy
            }),
        };
        let guards = compile_guards(snap, &mesh.path_normalization, &cur.guards, &mut nack);
        let (policies, policy_names, version) = match compile_policies(snap) {
            Ok((compiled, names)) => {
                *in_force = compiled;
                let set = PolicySet::new(in_force.iter().cloned(), workload.clone(), default_policy);
                (Arc::new(set), names, version.to_string())
            }
            Err(reason) => {
                nack.push(reason);
                let set = PolicySet::new(in_force.iter().cloned(), workload.clone(), default_policy);
                (Arc::new(set), cur.policy_names.clone(), cur.version.clone())
            }
        };
        let next = MeshView {
            version,
            peer_auth,
            port_peer_auth,
            endpoints,
            services,
            service_addresses,
            routes,
            default_policy,
            egress_allowed: mesh.egress != "deny",
            policies,
            policy_names,
            trust,
            guards,
            received: true,
        };
        self.store(&cur, next);
        if nack.is_empty() { Ok(()) } else { Err(Nack(nack)) }
    }

    /// Takes the roots that came with a new certificate (before the first snapshot, or when a
    /// CA rotation reaches the Certify response first). Revocations are kept.
    pub fn apply_roots(&self, pem: &str) -> Result<(), BundleError> {
        let _one_writer = self.policies.lock();
        let cur = self.shared.view.load_full();
        if cur.trust.pem == pem {
            return Ok(());
        }
        let roots = BundleState::from_pem(pem)?;
        let trust = Arc::new(roots.with_revocations(cur.trust.revoked_ids.clone(), cur.trust.revoked_serials.clone()));
        let next = MeshView {
            version: cur.version.clone(),
            peer_auth: cur.peer_auth,
            port_peer_auth: cur.port_peer_auth.clone(),
            endpoints: cur.endpoints.clone(),
            services: cur.services.clone(),
            service_addresses: cur.service_addresses.clone(),
            routes: cur.routes.clone(),
            default_policy: cur.default_policy,
            egress_allowed: cur.egress_allowed,
            policies: cur.policies.clone(),
            policy_names: cur.policy_names.clone(),
            trust,
            guards: cur.guards.clone(),
            received: cur.received,
        };
        self.store(&cur, next);
        Ok(())
    }

    /// The one store of the view (called with the lock held).
    fn store(&self, cur: &MeshView, next: MeshView) {
        let revocations_changed = !cur.trust.same_revocations(&next.trust);
        self.shared.view.store(Arc::new(next));
        if revocations_changed {
            self.shared.revocation_epoch.send_modify(|e| *e += 1);
        }
    }
}

fn peer_authentication(
    snap: &Snapshot,
    cur: &MeshView,
    nack: &mut Vec<NackReason>,
) -> (PeerAuthMode, HashMap<u16, PeerAuthMode>) {
    let mode = |m: i32| if m == Mode::Permissive as i32 { PeerAuthMode::Permissive } else { PeerAuthMode::Strict };
    let pa = snap.peer_authentication.clone().unwrap_or_default();
    let mut port_peer_auth = HashMap::new();
    for (port, m) in &pa.port_modes {
        match u16::try_from(*port) {
            Ok(p) => {
                port_peer_auth.insert(p, mode(*m));
            }
            Err(_) => {
                nack.push(NackReason::Port(*port));
                return (cur.peer_auth, cur.port_peer_auth.clone());
            }
        }
    }
    (mode(pa.mode), port_peer_auth)
}

/// The endpoint table; an entry that does not parse is left out and reported.
fn endpoints(snap: &Snapshot, nack: &mut Vec<NackReason>) -> HashMap<SocketAddr, SpiffeId> {
    let mut endpoints = HashMap::with_capacity(snap.endpoints.len());
    for e in &snap.endpoints {
        let entry = e
            .address
            .parse::<SocketAddr>()
            .map_err(|err| err.to_string())
            .and_then(|addr| Ok((addr, e.spiffe_id.parse::<SpiffeId>().map_err(|err| err.to_string())?)));
        match entry {
            Ok((addr, id)) => {
                endpoints.insert(addr, id);
            }
            Err(message) => nack.push(NackReason::Endpoint { address: e.address.clone(), message }),
        }
    }
    endpoints
}

/// The snapshot's mesh services resolved against its endpoint table. A service that did not
/// change keeps its entry (the same allocation, which tells a service route nothing changed);
/// one whose spec does not decode is reported and keeps its previous entry and addresses.
fn services(snap: &Snapshot, cur: &MeshView, nack: &mut Vec<NackReason>) -> (Arc<Services>, Arc<ServiceAddresses>) {
    let super::service::Resolved { mut services, mut addresses, errors } =
        super::service::resolve_snapshot(&snap.policies, &snap.endpoints);
    for (name, message) in errors {
        if !services.contains_key(&name) {
            if let Some(kept) = cur.services.get(&name) {
                services.insert(name.clone(), kept.clone());
            }
            for (at, service) in cur.service_addresses.at.iter().filter(|(_, s)| ***s == *name) {
                addresses.at.entry(*at).or_insert_with(|| service.clone());
            }
        }
        nack.push(refused(super::service::KIND, &name, message));
    }
    for (name, service) in services.iter_mut() {
        if let Some(kept) = cur.services.get(name).filter(|kept| ***kept == **service) {
            *service = kept.clone();
        }
    }
    let addresses =
        if addresses == *cur.service_addresses { cur.service_addresses.clone() } else { Arc::new(addresses) };
    (Arc::new(services), addresses)
}

/// A resource of `kind` named `namespace/name` this sidecar could not use.
fn refused(kind: &str, name: &str, message: String) -> NackReason {
    let (namespace, name) = name.split_once('/').unwrap_or(("", name));
    NackReason::Guard {
        kind: kind.into(),
        origin: String::new(),
        namespace: namespace.into(),
        name: name.into(),
        message,
    }
}

/// The snapshot's `HTTPRoute`s, compiled; `None` (keep the routes in force) when one of them
/// does not compile here, so a route table is always one the control plane sent whole.
fn http_routes(snap: &Snapshot, caller_ns: &str, nack: &mut Vec<NackReason>) -> Option<Arc<RouteTable>> {
    let (table, errors) = super::http_route::compile(&snap.policies, caller_ns);
    if errors.is_empty() {
        return Some(Arc::new(table));
    }
    for (name, message) in errors {
        nack.push(refused("HTTPRoute/GRPCRoute", &name, message));
    }
    None
}

/// Decodes (once) and compiles every `AuthorizationPolicy` of the snapshot: all or none, so the
/// set in force is always one the control plane sent whole.
fn compile_policies(snap: &Snapshot) -> Result<(Vec<Arc<Policy>>, Vec<String>), NackReason> {
    let mut compiled = Vec::new();
    let mut names = Vec::new();
    for r in snap.policies.iter().filter(|r| r.kind == AUTHORIZATION_POLICY) {
        let failed = |message: String| NackReason::Policy {
            origin: r.origin.clone(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            message,
        };
        let spec: AuthorizationPolicySpec = serde_json::from_str(&r.spec_json).map_err(|e| failed(e.to_string()))?;
        let labels = r.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let doc = AuthorizationPolicy::from_spec(&r.namespace, &r.name, &labels, spec);
        compiled.push(Arc::new(Policy::compile(&doc).map_err(|e| failed(e.to_string()))?));
        names.push(format!("{}/{}", r.namespace, r.name));
    }
    Ok((compiled, names))
}

/// The guards of the snapshot's `RequestAuthentication` and `RateLimitPolicy` resources (the
/// control plane sent only those selecting this workload) and the mesh's path normalization.
/// Each part this sidecar cannot compile keeps its previous version and is reported.
fn compile_guards(snap: &Snapshot, path_normalization: &str, cur: &Guards, nack: &mut Vec<NackReason>) -> Arc<Guards> {
    let path = match path_normalization.parse() {
        Ok(level) => PathGuard { level },
        Err(e) => {
            nack.push(NackReason::PathNormalization(e));
            cur.path
        }
    };
    // An unchanged set of specs keeps its compiled guard, and with it the rate limits' buckets
    // and the token cache: a snapshot that changed something else resets nothing.
    let jwt = recompile(&cur.jwt, snap, "RequestAuthentication", decode_specs, JwtGuard::specs, JwtGuard::compile);
    let rate = recompile(&cur.rate, snap, "RateLimitPolicy", decode_named_specs, RateGuard::specs, RateGuard::compile);
    let security =
        recompile(&cur.security, snap, "WorkloadSecurity", decode_specs, SecurityGuard::specs, SecurityGuard::compile);
    let (jwt, rate, security) =
        (kept(jwt, &cur.jwt, nack), kept(rate, &cur.rate, nack), kept(security, &cur.security, nack));
    Arc::new(Guards { path, jwt, rate, security })
}

/// The guard for `specs`: the one in force when they are unchanged, else a new compilation (an
/// error names the kind).
fn recompile<G, S: PartialEq>(
    cur: &Arc<G>,
    snap: &Snapshot,
    kind: &str,
    decode: fn(&Snapshot, &str) -> Result<Vec<S>, NackReason>,
    specs_of: fn(&G) -> &[S],
    compile: fn(Vec<S>) -> Result<G, String>,
) -> Result<Arc<G>, NackReason> {
    let specs = decode(snap, kind)?;
    if specs == specs_of(cur) {
        return Ok(cur.clone());
    }
    compile(specs).map(Arc::new).map_err(|m| guard_error(kind, m))
}

/// A guard that did not compile keeps the one in force, and goes into the NACK.
fn kept<G>(compiled: Result<Arc<G>, NackReason>, cur: &Arc<G>, nack: &mut Vec<NackReason>) -> Arc<G> {
    compiled.unwrap_or_else(|e| {
        nack.push(e);
        cur.clone()
    })
}

fn guard_error(kind: &str, message: String) -> NackReason {
    NackReason::Guard {
        kind: kind.into(),
        origin: String::new(),
        namespace: String::new(),
        name: String::new(),
        message,
    }
}

/// Decodes (once) every resource of `kind` into its typed spec.
fn decode_specs<T: serde::de::DeserializeOwned>(snap: &Snapshot, kind: &str) -> Result<Vec<T>, NackReason> {
    Ok(decode_named_specs(snap, kind)?.into_iter().map(|(_, spec)| spec).collect())
}

/// Decodes (once) every resource of `kind` into its typed spec, with its `namespace/name`.
fn decode_named_specs<T: serde::de::DeserializeOwned>(
    snap: &Snapshot,
    kind: &str,
) -> Result<Vec<(String, T)>, NackReason> {
    snap.policies
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| {
            let spec = serde_json::from_str(&r.spec_json).map_err(|e| NackReason::Guard {
                kind: kind.into(),
                origin: r.origin.clone(),
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                message: e.to_string(),
            })?;
            Ok((format!("{}/{}", r.namespace, r.name), spec))
        })
        .collect()
}

/// Revocations as sets: SPIFFE IDs, and serials in lower-case hex.
fn revocation_sets(revocations: &[Revocation]) -> (HashSet<String>, HashSet<String>) {
    let mut ids = HashSet::new();
    let mut serials = HashSet::new();
    for r in revocations {
        match &r.target {
            Some(Target::SpiffeId(i)) => {
                ids.insert(i.clone());
            }
            Some(Target::Serial(s)) => {
                serials.insert(s.to_lowercase());
            }
            None => {}
        }
    }
    (ids, serials)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::discovery::{Endpoint, MeshConfig, PeerAuthentication, Resource};

    fn roots() -> (String, BundleState) {
        let pem = crate::identity::CaMaterial::generate("cluster.local", 1).unwrap().root_cert_pem;
        let state = BundleState::from_pem(&pem).unwrap();
        (pem, state)
    }

    fn writer() -> (Arc<SharedView>, ViewWriter) {
        ViewWriter::new(roots().1)
    }

    fn me() -> Workload {
        Workload { id: "spiffe://cluster.local/ns/a/sa/me".parse().unwrap(), labels: Default::default() }
    }

    fn rules_policy(name: &str, spec_json: &str) -> Resource {
        Resource {
            kind: AUTHORIZATION_POLICY.into(),
            namespace: "a".into(),
            name: name.into(),
            origin: format!("{name}.yaml#0"),
            spec_json: spec_json.into(),
            labels: Default::default(),
        }
    }

    fn revoke(id: &str) -> Revocation {
        Revocation { target: Some(Target::SpiffeId(id.into())) }
    }

    #[test]
    fn port_level_mode_overrides_the_workload_mode_and_ip_entries_cover_every_port() {
        let snap = Snapshot {
            peer_authentication: Some(PeerAuthentication {
                mode: Mode::Strict as i32,
                port_modes: [(9090u32, Mode::Permissive as i32)].into(),
            }),
            endpoints: vec![Endpoint {
                address: "10.0.0.7:0".into(),
                spiffe_id: "spiffe://cluster.local/ns/a/sa/b".into(),
                labels: Default::default(),
            }],
            mesh: Some(MeshConfig { default_policy: "deny".into(), egress: "deny".into(), ..Default::default() }),
            ..Default::default()
        };
        let (shared, writer) = writer();
        writer.apply_snapshot("v1", &snap, &me()).unwrap();
        let v = shared.load();
        assert_eq!(v.mode_for_port(9090), PeerAuthMode::Permissive);
        assert_eq!(v.mode_for_port(8080), PeerAuthMode::Strict);
        assert_eq!(
            v.identity_for("10.0.0.7:5432".parse().unwrap()).unwrap().as_str(),
            "spiffe://cluster.local/ns/a/sa/b"
        );
        assert!(v.identity_for("10.0.0.8:5432".parse().unwrap()).is_none());
        assert!(!v.egress_allowed);
        assert!(v.received);
    }

    #[test]
    fn a_policy_this_sidecar_cannot_compile_never_holds_back_revocations_roots_or_endpoints() {
        let (shared, writer) = writer();
        let good = Snapshot {
            policies: vec![rules_policy("good", r#"{"action":"ALLOW","rules":[{}]}"#)],
            ..Default::default()
        };
        writer.apply_snapshot("v1", &good, &me()).unwrap();
        let revocations = shared.revocations_changed();
        let (new_pem, _) = roots();
        let bad = Snapshot {
            policies: vec![
                rules_policy("good", r#"{"action":"ALLOW","rules":[{}]}"#),
                rules_policy(
                    "bad",
                    r#"{"action":"ALLOW","rego":{"module":"package x\nallow := {","entrypoint":"x/allow"}}"#,
                ),
            ],
            trust_bundle_pem: new_pem.clone(),
            revocations: vec![revoke("spiffe://cluster.local/ns/a/sa/evil")],
            endpoints: vec![
                Endpoint { address: "nope".into(), ..Default::default() },
                Endpoint {
                    address: "10.0.0.9:0".into(),
                    spiffe_id: "spiffe://cluster.local/ns/a/sa/b".into(),
                    labels: Default::default(),
                },
            ],
            ..Default::default()
        };
        let nack = writer.apply_snapshot("v2", &bad, &me()).unwrap_err().to_string();
        assert!(nack.contains("bad.yaml#0") && nack.contains("a/bad"), "{nack}");
        assert!(nack.contains("endpoint \"nope\""), "{nack}");
        let v = shared.load();
        assert_eq!(v.version, "v1", "the policies in force are still v1's");
        assert_eq!(v.policy_names, ["a/good"]);
        assert_eq!(v.trust.pem, new_pem, "new roots applied");
        assert!(shared.trust().is_revoked("spiffe://cluster.local/ns/a/sa/evil", "00"), "revocation applied");
        assert!(revocations.has_changed().unwrap(), "open connections are told to re-judge their peers");
        assert!(v.identity_for("10.0.0.9:80".parse().unwrap()).is_some(), "the good endpoint applied");
    }

    #[test]
    fn a_bad_trust_bundle_keeps_the_old_roots_and_still_applies_revocations() {
        let (shared, writer) = writer();
        let before = shared.trust().pem.clone();
        let snap = Snapshot {
            trust_bundle_pem: "not pem".into(),
            revocations: vec![Revocation { target: Some(Target::Serial("AB01".into())) }],
            ..Default::default()
        };
        let nack = writer.apply_snapshot("v1", &snap, &me()).unwrap_err().to_string();
        assert!(nack.contains("trust bundle"), "{nack}");
        assert_eq!(shared.trust().pem, before);
        assert!(shared.trust().is_revoked("spiffe://x", "ab01"), "serials compare in lower case");
    }

    fn rate_limit(name: &str, spec_json: &str) -> Resource {
        Resource { kind: "RateLimitPolicy".into(), ..rules_policy(name, spec_json) }
    }

    #[test]
    fn rate_limits_keep_their_buckets_until_their_specs_change() {
        let (shared, writer) = writer();
        let one = r#"{"limits":[{"requestsPerUnit":5,"unit":"SECOND","perSource":true}]}"#;
        let snap = |policies: Vec<Resource>, endpoint: &str| Snapshot {
            policies,
            endpoints: vec![Endpoint {
                address: endpoint.into(),
                spiffe_id: "spiffe://cluster.local/ns/a/sa/b".into(),
                labels: Default::default(),
            }],
            ..Default::default()
        };
        writer.apply_snapshot("v1", &snap(vec![rate_limit("api", one)], "10.0.0.1:80"), &me()).unwrap();
        let first = shared.load().guards.rate.clone();
        assert_eq!(first.specs()[0].0, "a/api", "compiled with the policy's name");
        // Something else changed: the same guard, and with it the same buckets.
        writer.apply_snapshot("v2", &snap(vec![rate_limit("api", one)], "10.0.0.2:80"), &me()).unwrap();
        assert!(Arc::ptr_eq(&first, &shared.load().guards.rate));
        // A new limit: a new guard.
        let two = r#"{"limits":[{"requestsPerUnit":5,"unit":"SECOND"},{"requestsPerUnit":1,"unit":"HOUR"}]}"#;
        writer.apply_snapshot("v3", &snap(vec![rate_limit("api", two)], "10.0.0.2:80"), &me()).unwrap();
        let second = shared.load().guards.rate.clone();
        assert!(!Arc::ptr_eq(&first, &second));
        // One this sidecar cannot compile keeps the one in force and says which.
        let bad = r#"{"limits":[{"requestsPerUnit":0,"unit":"SECOND"}]}"#;
        let nack = writer.apply_snapshot("v4", &snap(vec![rate_limit("bad", bad)], "10.0.0.2:80"), &me());
        let nack = nack.unwrap_err().to_string();
        assert!(nack.contains("a/bad: spec.limits[0].requestsPerUnit"), "{nack}");
        assert!(Arc::ptr_eq(&second, &shared.load().guards.rate));
    }

    #[test]
    fn roots_from_a_certificate_keep_the_revocations_in_force() {
        let (shared, writer) = writer();
        let snap = Snapshot { revocations: vec![revoke("spiffe://cluster.local/ns/a/sa/evil")], ..Default::default() };
        writer.apply_snapshot("v1", &snap, &me()).unwrap();
        let (pem, _) = roots();
        writer.apply_roots(&pem).unwrap();
        assert_eq!(shared.trust().pem, pem);
        assert!(shared.trust().is_revoked("spiffe://cluster.local/ns/a/sa/evil", ""));
        assert!(writer.apply_roots("garbage").is_err());
        assert_eq!(shared.trust().pem, pem);
    }
}
