//! Sidecar injection: the one code path behind the mutating webhook ([`admission_review`]) and
//! `palisade inject` ([`inject_yaml`]).
//!
//! Injection adds, and edits only the app's probes that could not pass the sidecar:
//! - `palisade-init` first in `initContainers`: `palisade init` installs the iptables redirect
//!   (NET_ADMIN and NET_RAW, as root) and exits;
//! - `palisade-proxy` right after it, as a native sidecar (an init container with
//!   `restartPolicy: Always`): it starts before the app's own init containers, the app waits for
//!   its startup probe on `/ready`, and it stops after the app, so Jobs still complete;
//! - the projected token volume `palisade-token` (audience `palisade`) the sidecar certifies with,
//!   and an `emptyDir` on `/run` for the iptables lock (the init container's root is read-only);
//! - the annotation `palisade.io/status: injected`;
//! - the app containers' TCP, gRPC and HTTPS probes become plain GETs of
//!   `/app-health/<container>/<livez|readyz|startupz>` on the sidecar's admin port, and the
//!   sidecar runs the originals against the app (`proxy::app_probe`); thresholds, periods and
//!   timeouts are kept.
//!
//! In CNI mode ([`InjectConfig::cni`]) the node's `palisade cni` plugin installs the rules when
//! the pod's network is set up ([`cni_redirect_args`] derives them from the injected pod), so
//! `palisade-init` and its lock volume are left out and an unprivileged `palisade-validate` init
//! container checks that the redirect is in place; every container injection adds then meets
//! the `restricted` Pod Security level.
//!
//! Labels are left alone, so selectors and `pod-template-hash` are unaffected. A pod that has
//! the `palisade-proxy` container or the status annotation is never injected again.

mod admission;
mod manifest;
mod overrides;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSpec, Probe, ProjectedVolumeSource, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub use admission::admission_review;
pub use manifest::inject_yaml;
use overrides::{ProxySettings, RedirectSettings};

/// Annotations (and the namespace label) that steer injection.
pub mod annotation {
    /// Namespace label, pod label or pod annotation: `enabled` or `disabled`. The pod's own
    /// setting wins over its namespace's, and its label over its annotation. The label is what
    /// the webhook configuration can select on, so only a label opt-in fails closed when the
    /// control plane is down (see `deploy/webhook.yaml`).
    pub const INJECT: &str = "palisade.io/inject";
    /// Set to `injected` on every injected pod.
    pub const STATUS: &str = "palisade.io/status";
    /// Sidecar CPU request (a Kubernetes quantity).
    pub const PROXY_CPU: &str = "palisade.io/proxy-cpu";
    /// Sidecar memory request.
    pub const PROXY_MEMORY: &str = "palisade.io/proxy-memory";
    /// Sidecar CPU limit.
    pub const PROXY_CPU_LIMIT: &str = "palisade.io/proxy-cpu-limit";
    /// Sidecar memory limit.
    pub const PROXY_MEMORY_LIMIT: &str = "palisade.io/proxy-memory-limit";
    /// Inbound ports `palisade init` leaves alone (comma list), besides the admin port 15020.
    pub const EXCLUDE_INBOUND_PORTS: &str = "palisade.io/exclude-inbound-ports";
    /// Outbound ports `palisade init` leaves alone (comma list).
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "palisade.io/exclude-outbound-ports";
    /// Inbound ports to intercept: `*` (the default) or a comma list.
    pub const INCLUDE_INBOUND_PORTS: &str = "palisade.io/include-inbound-ports";
    /// Ports the sidecar treats as opaque TCP without protocol detection (`--opaque-ports`).
    pub const OPAQUE_PORTS: &str = "palisade.io/opaque-ports";
    /// Sidecar image, instead of the injector's.
    pub const PROXY_IMAGE: &str = "palisade.io/proxy-image";
    /// The sidecar's log filter (`PALISADE_LOG`), e.g. `debug` or `info,palisade::proxy=trace`.
    pub const LOG_LEVEL: &str = "palisade.io/log-level";
}

/// Name of the init container that installs the iptables rules.
pub const INIT_CONTAINER: &str = "palisade-init";
/// Name of the init container that checks, in CNI mode, that the plugin installed them.
pub const VALIDATE_CONTAINER: &str = "palisade-validate";
/// Where the validator connects: TEST-NET-1 (RFC 5737), which no route leads to unless the
/// redirect takes the connection to the sidecar's outbound port first.
pub const VALIDATE_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 1);
/// Name of the sidecar (a native sidecar: an init container with `restartPolicy: Always`).
pub const PROXY_CONTAINER: &str = "palisade-proxy";
/// The sidecar's program in the image (`palisade-proxy`, next to `palisade`).
pub const PROXY_COMMAND: &str = "palisade-proxy";
/// The projected service-account token volume.
pub const TOKEN_VOLUME: &str = "palisade-token";
/// Where the token volume is mounted in the sidecar.
pub const TOKEN_DIR: &str = "/var/run/secrets/palisade";
/// Audience of the projected token; the control plane checks it with a TokenReview.
pub const TOKEN_AUDIENCE: &str = "palisade";
/// Writable `/run` for the init container, where iptables keeps its lock file.
pub const XTABLES_LOCK_VOLUME: &str = "palisade-xtables-lock";
/// The sidecar's own `emptyDir`, where it keeps the newest trust roots it was sent: it lives
/// as long as the pod, so a restarted sidecar starts from them and not from the roots frozen
/// into its environment at admission (outdated once the CA has rotated).
pub const TRUST_VOLUME: &str = "palisade-trust";
/// Where the trust volume is mounted in the sidecar.
pub const TRUST_DIR: &str = "/var/run/palisade/trust";

const INBOUND_PORT: u16 = crate::ports::SIDECAR_INBOUND;
const OUTBOUND_PORT: u16 = crate::ports::SIDECAR_OUTBOUND;
const ADMIN_PORT: u16 = crate::ports::SIDECAR_ADMIN;

/// What the injector puts into pods. The webhook and `palisade inject` build one from flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// Image of both injected containers (`palisade init` and `palisade proxy`).
    pub image: String,
    /// The control plane's gRPC address as the sidecar dials it.
    pub control_addr: String,
    /// Trust domain of the mesh's SPIFFE IDs.
    pub trust_domain: String,
    /// Mesh trust roots (PEM), handed to the sidecar in `PALISADE_CA_BUNDLE_PEM`.
    pub ca_bundle_pem: String,
    /// UID the sidecar runs as; `palisade init` lets this UID's traffic escape the redirect.
    pub proxy_uid: u32,
    /// Sidecar CPU request (Kubernetes quantity).
    pub cpu_request: String,
    /// Sidecar memory request.
    pub memory_request: String,
    /// Sidecar CPU limit.
    pub cpu_limit: String,
    /// Sidecar memory limit.
    pub memory_limit: String,
    /// CNI mode: the node's `palisade cni` plugin writes the redirect rules when the pod's
    /// network is set up, so pods get no NET_ADMIN init container (and pass the `restricted`
    /// Pod Security level); an unprivileged `palisade-validate` init container checks the rules
    /// are in place and keeps the pod from starting unmeshed when they are not.
    pub cni: bool,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            image: format!("ghcr.io/palisade-mesh/palisade:{}", env!("CARGO_PKG_VERSION")),
            control_addr: format!("palisade-control.palisade-system.svc:{}", crate::ports::CONTROL_GRPC),
            trust_domain: "cluster.local".to_string(),
            ca_bundle_pem: String::new(),
            proxy_uid: 1337,
            cpu_request: "50m".to_string(),
            memory_request: "32Mi".to_string(),
            cpu_limit: "1".to_string(),
            memory_limit: "128Mi".to_string(),
            cni: false,
        }
    }
}

/// What injection did with one pod (or pod template).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The init container, the sidecar and the token volume were added.
    Injected,
    /// The pod already carries the sidecar or `palisade.io/status: injected`; left untouched.
    AlreadyInjected,
    /// The pod's annotation or label `palisade.io/inject: disabled` opts it out.
    Disabled,
    /// Neither the namespace label nor the pod's label or annotation asks for injection.
    NotEnabled,
    /// hostNetwork pods share the node's network namespace: redirecting it would capture the node.
    HostNetwork,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Injected => "injected",
            Outcome::AlreadyInjected => "already injected, left unchanged",
            Outcome::Disabled => "not injected: the pod sets palisade.io/inject=disabled",
            Outcome::NotEnabled => {
                "not injected: neither the namespace label nor the pod's label or annotation enables it"
            }
            Outcome::HostNetwork => "not injected: hostNetwork pod",
        })
    }
}

/// Why a pod (or a manifest) could not be injected. The admission webhook refuses the pod with
/// this message; `palisade inject` prints it and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A `palisade.io/*` annotation has a value injection cannot use.
    #[error("annotation {annotation}={value:?} is invalid: {reason}")]
    Annotation {
        /// The annotation's key.
        annotation: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The pod's `palisade.io/inject` label has a value injection cannot use.
    #[error("label {label}={value:?} is invalid: {reason}")]
    Label {
        /// The label's key.
        label: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting of the injector itself ([`InjectConfig`]) is unusable.
    #[error("injector setting {setting}={value:?} is invalid: {reason}")]
    Config {
        /// The [`InjectConfig`] field.
        setting: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The pod already uses a name injection needs, without being injected.
    #[error("the pod already has {what} named {name:?}; rename it so the sidecar can be injected")]
    NameTaken {
        /// `a container` or `a volume`.
        what: &'static str,
        /// The name.
        name: &'static str,
    },
    /// An app container would run as the sidecar's UID, whose traffic escapes the redirect.
    #[error(
        "container {container:?} runs as UID {uid}, the sidecar's UID: its traffic would bypass the proxy; give it another runAsUser"
    )]
    ProxyUid {
        /// The container.
        container: String,
        /// The UID it runs as.
        uid: i64,
    },
    /// A document is not YAML.
    #[error("document {document}: not valid YAML: {source}")]
    Yaml {
        /// 1-based index of the document in the file.
        document: usize,
        /// The parser's error.
        source: serde_yaml::Error,
    },
    /// An object does not have the shape of its kind (e.g. a pod spec without containers).
    #[error("{field}: {reason}")]
    Malformed {
        /// Where in the object, e.g. `spec.template.spec`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// An error inside one document or list item, with where it happened.
    #[error("{at}: {source}")]
    In {
        /// E.g. `document 2 (Deployment shop/web)`.
        at: String,
        /// The error.
        source: Box<InjectError>,
    },
}

/// Decides and mutates a PodSpec and its metadata in place (a pod, or a workload's pod
/// template). `force` injects as if the namespace were enabled (what `palisade inject` does);
/// the annotation `palisade.io/inject: disabled` still wins.
pub fn inject_pod_template(
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
    namespace_labels: &BTreeMap<String, String>,
    cfg: &InjectConfig,
    force: bool,
) -> Result<Outcome, InjectError> {
    match plan(meta, spec, namespace_labels, cfg, force)? {
        Plan::Skip(outcome) => Ok(outcome),
        Plan::Inject(additions) => {
            additions.apply(meta, spec);
            Ok(Outcome::Injected)
        }
    }
}

/// What to do with one pod: leave it, or add these.
enum Plan {
    Skip(Outcome),
    Inject(Additions),
}

/// Everything injection adds to a pod. Applied to typed objects, to the API server's raw JSON
/// (so the patch never rewrites fields this crate does not model) and to YAML documents (so
/// `palisade inject` keeps the user's key order).
struct Additions {
    annotations: Vec<(String, String)>,
    /// App probes replaced by a GET on the sidecar's admin port.
    probes: Vec<ProbeRewrite>,
    /// Go in front of the pod's own init containers, in this order.
    init_containers: Vec<Container>,
    /// Go after the pod's own volumes.
    volumes: Vec<Volume>,
}

fn plan(
    meta: &ObjectMeta,
    spec: &PodSpec,
    namespace_labels: &BTreeMap<String, String>,
    cfg: &InjectConfig,
    force: bool,
) -> Result<Plan, InjectError> {
    let annotations = meta.annotations.as_ref();
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);

    let all_containers = || spec.init_containers.iter().flatten().chain(&spec.containers);
    if get(annotation::STATUS) == Some("injected") || all_containers().any(|c| c.name == PROXY_CONTAINER) {
        return Ok(Plan::Skip(Outcome::AlreadyInjected));
    }
    let label = meta.labels.as_ref().and_then(|l| l.get(annotation::INJECT)).map(String::as_str);
    let expected = || "expected `enabled` or `disabled`".to_string();
    // The label first: it is what the webhook configuration selects on, so only this order
    // gives the same answer as the selectors in `deploy/webhook.yaml`.
    let enabled = match (label, get(annotation::INJECT)) {
        (Some("disabled"), _) | (None, Some("disabled")) => return Ok(Plan::Skip(Outcome::Disabled)),
        (Some("enabled"), _) | (None, Some("enabled")) => true,
        (Some(other), _) => {
            return Err(InjectError::Label { label: annotation::INJECT, value: other.to_string(), reason: expected() });
        }
        (None, Some(other)) => {
            return Err(InjectError::Annotation {
                annotation: annotation::INJECT,
                value: other.to_string(),
                reason: expected(),
            });
        }
        (None, None) => force || namespace_labels.get(annotation::INJECT).map(String::as_str) == Some("enabled"),
    };
    if !enabled {
        return Ok(Plan::Skip(Outcome::NotEnabled));
    }
    if spec.host_network == Some(true) {
        return Ok(Plan::Skip(Outcome::HostNetwork));
    }

    for name in [INIT_CONTAINER, VALIDATE_CONTAINER] {
        if all_containers().any(|c| c.name == name) {
            return Err(InjectError::NameTaken { what: "a container", name });
        }
    }
    for name in [TOKEN_VOLUME, TRUST_VOLUME, XTABLES_LOCK_VOLUME] {
        if spec.volumes.iter().flatten().any(|v| v.name == name) {
            return Err(InjectError::NameTaken { what: "a volume", name });
        }
    }
    let pod_uid = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    for c in all_containers() {
        let uid = c.security_context.as_ref().and_then(|s| s.run_as_user).or(pod_uid);
        if uid == Some(i64::from(cfg.proxy_uid)) {
            return Err(InjectError::ProxyUid { container: c.name.clone(), uid: i64::from(cfg.proxy_uid) });
        }
    }

    let settings = ProxySettings::resolve(meta, cfg)?;
    let probes = probe_rewrites(spec);
    let proxy = proxy_container(&settings, meta, spec, &probes, cfg);
    let (init_containers, volumes) = if cfg.cni {
        (vec![validate_container(&settings, cfg), proxy], vec![token_volume(), empty_dir(TRUST_VOLUME)])
    } else {
        let volumes = vec![token_volume(), empty_dir(TRUST_VOLUME), empty_dir(XTABLES_LOCK_VOLUME)];
        (vec![init_container(&settings, cfg), proxy], volumes)
    };
    Ok(Plan::Inject(Additions {
        annotations: vec![(annotation::STATUS.to_string(), "injected".to_string())],
        init_containers,
        probes,
        volumes,
    }))
}

/// The flags of `palisade init` for a pod with these settings: what the init container runs,
/// and what the CNI plugin derives from the pod itself (never flags read from the pod).
fn redirect_args(s: &RedirectSettings, proxy_uid: u32) -> Vec<String> {
    let mut args = strings(&["--proxy-uid"]);
    args.push(proxy_uid.to_string());
    args.extend(strings(&["--inbound-port", &INBOUND_PORT.to_string(), "--outbound-port", &OUTBOUND_PORT.to_string()]));
    // The admin port stays reachable directly, so the kubelet's probes see the sidecar itself.
    let mut exclude_inbound = vec![ADMIN_PORT];
    exclude_inbound.extend(s.exclude_inbound_ports.iter().filter(|p| **p != ADMIN_PORT));
    args.extend(["--exclude-inbound-ports".to_string(), port_list(&exclude_inbound)]);
    if let Some(ports) = &s.exclude_outbound_ports {
        args.extend(["--exclude-outbound-ports".to_string(), port_list(ports)]);
    }
    if let Some(ports) = &s.include_inbound_ports {
        args.extend(["--include-inbound-ports".to_string(), ports.clone()]);
    }
    args
}

/// What the CNI plugin installs in a pod's network namespace: the flags of `palisade init`
/// (without the program name), or `None` when the pod is not one the injector gave a sidecar
/// in CNI mode (no sidecar, or it has its own init container, or it uses the host's network).
///
/// Everything comes from what the injector checked at admission: the sidecar's UID from its
/// `runAsUser`, the ports from the validated `palisade.io/*` annotations. The plugin runs as
/// root on the host, so nothing a pod says is ever passed on as a free-form flag (a program
/// path taken from a pod would be code execution on the node).
pub fn cni_redirect_args(meta: &ObjectMeta, spec: &PodSpec) -> Result<Option<Vec<String>>, InjectError> {
    let injected =
        meta.annotations.as_ref().and_then(|a| a.get(annotation::STATUS)).map(String::as_str) == Some("injected");
    let init = spec.init_containers.iter().flatten();
    let Some(proxy) = init.clone().find(|c| c.name == PROXY_CONTAINER) else { return Ok(None) };
    if !injected || spec.host_network == Some(true) || init.clone().any(|c| c.name == INIT_CONTAINER) {
        return Ok(None);
    }
    let uid = proxy.security_context.as_ref().and_then(|s| s.run_as_user);
    let proxy_uid = match uid.and_then(|u| u32::try_from(u).ok()) {
        Some(uid) if uid > 0 => uid,
        _ => {
            return Err(malformed(
                "spec.initContainers[palisade-proxy].securityContext.runAsUser",
                format!("{uid:?}: the sidecar's UID must be set and not root, or its own traffic loops"),
            ));
        }
    };
    // The redirect's settings only: the rest (resources, image) were resolved against the
    // injector's configuration, which the node does not have.
    Ok(Some(redirect_args(&RedirectSettings::resolve(meta)?, proxy_uid)))
}

fn init_container(s: &ProxySettings, cfg: &InjectConfig) -> Container {
    let mut args = strings(&["init"]);
    args.extend(redirect_args(&s.redirect, cfg.proxy_uid));
    Container {
        name: INIT_CONTAINER.to_string(),
        image: Some(s.image.clone()),
        command: Some(strings(&["palisade"])),
        args: Some(args),
        resources: Some(s.resources.clone()),
        security_context: Some(SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(strings(&["NET_ADMIN", "NET_RAW"])),
                drop: Some(strings(&["ALL"])),
            }),
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_LOCK_VOLUME.to_string(),
            mount_path: "/run".to_string(),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The CNI mode's check that the node's plugin installed the redirect: unprivileged, it listens
/// on the sidecar's outbound port and connects to [`VALIDATE_ADDRESS`]; only the redirect can
/// bring that connection to its listener. It fails, and the pod does not start, otherwise.
fn validate_container(s: &ProxySettings, cfg: &InjectConfig) -> Container {
    let excluded = s.redirect.exclude_outbound_ports.as_deref().unwrap_or_default();
    let port = (9..).find(|p| !excluded.contains(p)).expect("some port is not excluded");
    // Any UID but the sidecar's: its traffic is the one the rules let escape.
    let uid = if cfg.proxy_uid == 65532 { 65533 } else { 65532 };
    Container {
        name: VALIDATE_CONTAINER.to_string(),
        image: Some(s.image.clone()),
        command: Some(strings(&["palisade"])),
        args: Some(strings(&[
            "cni",
            "validate",
            "--outbound-port",
            &OUTBOUND_PORT.to_string(),
            "--probe",
            &format!("{VALIDATE_ADDRESS}:{port}"),
        ])),
        resources: Some(s.resources.clone()),
        security_context: Some(restricted_security_context(uid)),
        ..Default::default()
    }
}

/// What the `restricted` Pod Security level asks of a container, running as `uid`.
fn restricted_security_context(uid: i64) -> SecurityContext {
    SecurityContext {
        capabilities: Some(Capabilities { add: None, drop: Some(strings(&["ALL"])) }),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        run_as_non_root: Some(true),
        privileged: Some(false),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_string(), localhost_profile: None }),
        ..Default::default()
    }
}

/// `PORT/PATH` of every plain-HTTP probe of the app's containers. The kubelet probes in
/// plaintext from the node; the sidecar lets exactly these requests through on a STRICT port
/// (as Linkerd does) so that STRICT pods can become ready. HTTPS probes and paths with a comma
/// are left out.
fn probe_endpoints(spec: &PodSpec) -> Vec<String> {
    let mut out = Vec::new();
    for c in &spec.containers {
        for probe in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe].into_iter().flatten() {
            let Some(get) = &probe.http_get else { continue };
            if get.scheme.as_deref().is_some_and(|s| !s.eq_ignore_ascii_case("HTTP")) {
                continue;
            }
            let port = port_number(c, &get.port).and_then(|n| u16::try_from(n).ok());
            let path = get.path.as_deref().unwrap_or("/");
            let path = path.split('?').next().unwrap_or("/");
            if let Some(port) = port
                && !path.contains(',')
            {
                out.push(format!(
                    "{port}{}",
                    if path.starts_with('/') { path.to_string() } else { format!("/{path}") }
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A probe's port as a number: a named port is looked up among the container's ports.
fn port_number(c: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => {
            c.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name.as_str())).map(|p| p.container_port)
        }
    }
}

/// The three probes of a container.
#[derive(Debug, Clone, Copy)]
enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    const ALL: [ProbeKind; 3] = [ProbeKind::Liveness, ProbeKind::Readiness, ProbeKind::Startup];

    /// The container's field, as in the API.
    fn field(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livenessProbe",
            ProbeKind::Readiness => "readinessProbe",
            ProbeKind::Startup => "startupProbe",
        }
    }

    /// The last segment of its `/app-health/` path.
    fn path_name(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livez",
            ProbeKind::Readiness => "readyz",
            ProbeKind::Startup => "startupz",
        }
    }

    fn of(self, c: &Container) -> Option<&Probe> {
        match self {
            ProbeKind::Liveness => c.liveness_probe.as_ref(),
            ProbeKind::Readiness => c.readiness_probe.as_ref(),
            ProbeKind::Startup => c.startup_probe.as_ref(),
        }
    }

    fn of_mut(self, c: &mut Container) -> Option<&mut Probe> {
        match self {
            ProbeKind::Liveness => c.liveness_probe.as_mut(),
            ProbeKind::Readiness => c.readiness_probe.as_mut(),
            ProbeKind::Startup => c.startup_probe.as_mut(),
        }
    }
}

/// One app probe the kubelet cannot run through the sidecar (see `proxy::app_probe`).
struct ProbeRewrite {
    /// Index in `spec.containers`.
    container: usize,
    kind: ProbeKind,
    /// Its path on the admin port.
    path: String,
    /// The original, named ports resolved to numbers: what the sidecar runs.
    original: Probe,
}

impl ProbeRewrite {
    /// The handler that replaces the original's: everything else of the probe is kept.
    fn handler(&self) -> HTTPGetAction {
        HTTPGetAction {
            path: Some(self.path.clone()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            scheme: Some("HTTP".to_string()),
            ..Default::default()
        }
    }

    /// Where it is, for errors: `spec.containers[0].livenessProbe`.
    fn at(&self) -> String {
        format!("spec.containers[{}].{}", self.container, self.kind.field())
    }
}

/// The probe handlers a rewrite removes before it sets `httpGet`.
const PROBE_HANDLERS: [&str; 4] = ["tcpSocket", "grpc", "httpGet", "exec"];

/// The app containers' TCP, gRPC and HTTPS probes. Left alone: plain-HTTP probes (a STRICT port
/// lets them through), exec probes (they run inside the container), probes with a `host` (they
/// do not probe this pod) and probes on a named port the container does not declare.
fn probe_rewrites(spec: &PodSpec) -> Vec<ProbeRewrite> {
    let mut out = Vec::new();
    for (index, c) in spec.containers.iter().enumerate() {
        for kind in ProbeKind::ALL {
            let Some(mut original) = kind.of(c).cloned() else { continue };
            let resolved = |port: &mut IntOrString| port_number(c, port).map(|n| *port = IntOrString::Int(n)).is_some();
            let rewrite = if let Some(tcp) = &mut original.tcp_socket {
                tcp.host.is_none() && resolved(&mut tcp.port)
            } else if let Some(get) = &mut original.http_get {
                let https = get.scheme.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
                https && get.host.is_none() && resolved(&mut get.port)
            } else {
                original.grpc.is_some()
            };
            if rewrite {
                let path = format!("/app-health/{}/{}", c.name, kind.path_name());
                out.push(ProbeRewrite { container: index, kind, path, original });
            }
        }
    }
    out
}

fn proxy_container(
    s: &ProxySettings,
    meta: &ObjectMeta,
    spec: &PodSpec,
    rewrites: &[ProbeRewrite],
    cfg: &InjectConfig,
) -> Container {
    let mut args = strings(&[
        "--transparent",
        "--control",
        &cfg.control_addr,
        "--kube-token-file",
        &format!("{TOKEN_DIR}/token"),
        "--inbound",
        &format!("0.0.0.0:{INBOUND_PORT}"),
        "--outbound",
        &format!("127.0.0.1:{OUTBOUND_PORT}"),
        "--admin",
        &format!("0.0.0.0:{ADMIN_PORT}"),
        "--trust-domain",
        &cfg.trust_domain,
    ]);
    if let Some(ports) = &s.opaque_ports {
        args.extend(["--opaque-ports".to_string(), port_list(ports)]);
    }

    let labels = meta.labels.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
        field_env("PALISADE_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        value_env("PALISADE_CA_BUNDLE_PEM", &cfg.ca_bundle_pem),
        value_env("PALISADE_TRUST_STATE", &format!("{TRUST_DIR}/roots.pem")),
        value_env("PALISADE_LABELS", &labels),
    ];
    if let Some(level) = &s.log_level {
        env.push(value_env("PALISADE_LOG", level));
    }
    let probes = probe_endpoints(spec);
    if !probes.is_empty() {
        env.push(value_env("PALISADE_PROBES", &probes.join(",")));
    }
    if !rewrites.is_empty() {
        let originals: BTreeMap<&str, &Probe> = rewrites.iter().map(|r| (r.path.as_str(), &r.original)).collect();
        let json = serde_json::to_string(&originals).expect("probes serialize");
        env.push(value_env("PALISADE_APP_PROBES", &json));
    }

    let uid = i64::from(cfg.proxy_uid);
    Container {
        name: PROXY_CONTAINER.to_string(),
        image: Some(s.image.clone()),
        // The sidecar-only binary: the same code as `palisade proxy`, fewer pages mapped.
        command: Some(strings(&[PROXY_COMMAND])),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![port("palisade-in", INBOUND_PORT), port("palisade-admin", ADMIN_PORT)]),
        resources: Some(s.resources.clone()),
        restart_policy: Some("Always".to_string()),
        // Up to two minutes to fetch a certificate and the first snapshot before the app starts.
        startup_probe: Some(Probe { period_seconds: Some(1), failure_threshold: Some(120), ..http_probe("/ready") }),
        readiness_probe: Some(http_probe("/ready")),
        liveness_probe: Some(http_probe("/live")),
        security_context: Some(restricted_security_context(uid)),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.to_string(),
                mount_path: TOKEN_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount { name: TRUST_VOLUME.to_string(), mount_path: TRUST_DIR.to_string(), ..Default::default() },
        ]),
        ..Default::default()
    }
}

fn token_volume() -> Volume {
    Volume {
        name: TOKEN_VOLUME.to_string(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.to_string()),
                    expiration_seconds: Some(3600),
                    path: "token".to_string(),
                }),
                ..Default::default()
            }]),
            default_mode: None,
        }),
        ..Default::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume { name: name.to_string(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() }
}

fn http_probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".to_string()),
                field_path: field_path.to_string(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn value_env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.to_string(), value: Some(value.to_string()), ..Default::default() }
}

fn port(name: &str, number: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: i32::from(number),
        protocol: Some("TCP".to_string()),
        ..Default::default()
    }
}

fn port_list(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

impl Additions {
    fn apply(self, meta: &mut ObjectMeta, spec: &mut PodSpec) {
        for rewrite in &self.probes {
            if let Some(probe) = rewrite.kind.of_mut(&mut spec.containers[rewrite.container]) {
                (probe.tcp_socket, probe.grpc, probe.exec) = (None, None, None);
                probe.http_get = Some(rewrite.handler());
            }
        }
        meta.annotations.get_or_insert_default().extend(self.annotations);
        spec.init_containers.get_or_insert_default().splice(0..0, self.init_containers);
        spec.volumes.get_or_insert_default().extend(self.volumes);
    }

    /// Applies to a raw pod (or pod template) as JSON: `{metadata, spec}`.
    fn apply_json(&self, object: &mut serde_json::Value) -> Result<(), InjectError> {
        use serde_json::{Map, Value};
        fn child<'a>(parent: &'a mut Value, key: &str, empty: Value) -> Result<&'a mut Value, InjectError> {
            let map = parent.as_object_mut().ok_or_else(|| malformed(key, "expected an object"))?;
            let slot = map.entry(key).or_insert(Value::Null);
            if slot.is_null() {
                *slot = empty;
            }
            Ok(slot)
        }
        let annotations =
            child(child(object, "metadata", Value::Object(Map::new()))?, "annotations", Value::Object(Map::new()))?
                .as_object_mut()
                .ok_or_else(|| malformed("metadata.annotations", "expected a map"))?;
        for (k, v) in &self.annotations {
            annotations.insert(k.clone(), Value::String(v.clone()));
        }
        let spec = child(object, "spec", Value::Object(Map::new()))?;
        for rewrite in &self.probes {
            let at = rewrite.at();
            let probe = spec
                .get_mut("containers")
                .and_then(|c| c.get_mut(rewrite.container))
                .and_then(|c| c.get_mut(rewrite.kind.field()))
                .and_then(Value::as_object_mut)
                .ok_or_else(|| malformed(&at, "expected a probe"))?;
            for handler in PROBE_HANDLERS {
                probe.remove(handler);
            }
            probe
                .insert("httpGet".to_string(), serde_json::to_value(rewrite.handler()).map_err(|e| malformed(&at, e))?);
        }
        let new = to_json(&self.init_containers)?;
        child(spec, "initContainers", Value::Array(Vec::new()))?
            .as_array_mut()
            .ok_or_else(|| malformed("spec.initContainers", "expected a list"))?
            .splice(0..0, new);
        let new = to_json(&self.volumes)?;
        child(spec, "volumes", Value::Array(Vec::new()))?
            .as_array_mut()
            .ok_or_else(|| malformed("spec.volumes", "expected a list"))?
            .extend(new);
        Ok(())
    }

    /// Applies to a pod (or pod template) in a YAML document, keeping its key order.
    fn apply_yaml(&self, object: &mut serde_yaml::Value) -> Result<(), InjectError> {
        use serde_yaml::{Mapping, Value};
        fn child<'a>(parent: &'a mut Value, key: &str, empty: Value) -> Result<&'a mut Value, InjectError> {
            let map = parent.as_mapping_mut().ok_or_else(|| malformed(key, "expected a map"))?;
            let slot = map.entry(Value::String(key.to_string())).or_insert(Value::Null);
            if slot.is_null() {
                *slot = empty;
            }
            Ok(slot)
        }
        let annotations = child(
            child(object, "metadata", Value::Mapping(Mapping::new()))?,
            "annotations",
            Value::Mapping(Mapping::new()),
        )?
        .as_mapping_mut()
        .ok_or_else(|| malformed("metadata.annotations", "expected a map"))?;
        for (k, v) in &self.annotations {
            annotations.insert(Value::String(k.clone()), Value::String(v.clone()));
        }
        let spec = child(object, "spec", Value::Mapping(Mapping::new()))?;
        for rewrite in &self.probes {
            let at = rewrite.at();
            let probe = spec
                .get_mut("containers")
                .and_then(|c| c.get_mut(rewrite.container))
                .and_then(|c| c.get_mut(rewrite.kind.field()))
                .and_then(Value::as_mapping_mut)
                .ok_or_else(|| malformed(&at, "expected a probe"))?;
            for handler in PROBE_HANDLERS {
                probe.remove(handler);
            }
            probe.insert(
                Value::String("httpGet".to_string()),
                serde_yaml::to_value(rewrite.handler()).map_err(|e| malformed(&at, e))?,
            );
        }
        let new = to_yaml(&self.init_containers)?;
        child(spec, "initContainers", Value::Sequence(Vec::new()))?
            .as_sequence_mut()
            .ok_or_else(|| malformed("spec.initContainers", "expected a list"))?
            .splice(0..0, new);
        let new = to_yaml(&self.volumes)?;
        child(spec, "volumes", Value::Sequence(Vec::new()))?
            .as_sequence_mut()
            .ok_or_else(|| malformed("spec.volumes", "expected a list"))?
            .extend(new);
        Ok(())
    }
}

fn to_json<T: serde::Serialize>(items: &[T]) -> Result<Vec<serde_json::Value>, InjectError> {
    items.iter().map(|i| serde_json::to_value(i).map_err(|e| malformed("(injected object)", e))).collect()
}

fn to_yaml<T: serde::Serialize>(items: &[T]) -> Result<Vec<serde_yaml::Value>, InjectError> {
    items.iter().map(|i| serde_yaml::to_value(i).map_err(|e| malformed("(injected object)", e))).collect()
}

fn malformed(field: &str, reason: impl fmt::Display) -> InjectError {
    InjectError::Malformed { field: field.to_string(), reason: reason.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn pod(annotations: &[(&str, &str)]) -> Pod {
        let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-1",
                "namespace": "shop",
                "labels": {"version": "v2", "app": "web"},
                "annotations": annotations,
            },
            "spec": {
                "serviceAccountName": "web",
                "initContainers": [{"name": "migrate", "image": "shop/migrate:1"}],
                "containers": [{"name": "app", "image": "shop/web:1", "ports": [{"containerPort": 8080}]}],
                "volumes": [{"name": "cache", "emptyDir": {}}],
            }
        }))
        .unwrap()
    }

    #[test]
    fn plain_http_probes_are_passed_to_the_sidecar_by_port_and_path() {
        let mut p = pod(&[]);
        let app = &mut p.spec.as_mut().unwrap().containers[0];
        app.ports = Some(vec![port("http", 8080)]);
        let probe = |v: serde_json::Value| Some(serde_json::from_value::<Probe>(v).unwrap());
        app.liveness_probe = probe(serde_json::json!({"httpGet": {"port": "http", "path": "/healthz?full=1"}}));
        app.readiness_probe = probe(serde_json::json!({"httpGet": {"port": 9090, "path": "ready"}}));
        app.startup_probe = probe(serde_json::json!({"httpGet": {"port": 8443, "path": "/s", "scheme": "HTTPS"}}));
        inject(&mut p, &enabled_ns(), false).unwrap();
        let probes = env(sidecar(&p), "PALISADE_PROBES").and_then(|e| e.value.clone());
        assert_eq!(
            probes.as_deref(),
            Some("8080/healthz,9090/ready"),
            "named port resolved, query dropped, HTTPS left out"
        );
        let mut bare = pod(&[]);
        inject(&mut bare, &enabled_ns(), false).unwrap();
        assert!(env(sidecar(&bare), "PALISADE_PROBES").is_none());
    }

    fn enabled_ns() -> BTreeMap<String, String> {
        BTreeMap::from([(annotation::INJECT.to_string(), "enabled".to_string())])
    }

    fn inject(pod: &mut Pod, ns: &BTreeMap<String, String>, force: bool) -> Result<Outcome, InjectError> {
        let spec = pod.spec.as_mut().unwrap();
        inject_pod_template(&mut pod.metadata, spec, ns, &InjectConfig::default(), force)
    }

    fn init_names(pod: &Pod) -> Vec<&str> {
        pod.spec.as_ref().unwrap().init_containers.iter().flatten().map(|c| c.name.as_str()).collect()
    }

    fn sidecar(pod: &Pod) -> &Container {
        pod.spec.as_ref().unwrap().init_containers.iter().flatten().find(|c| c.name == PROXY_CONTAINER).unwrap()
    }

    fn init(pod: &Pod) -> &Container {
        pod.spec.as_ref().unwrap().init_containers.iter().flatten().find(|c| c.name == INIT_CONTAINER).unwrap()
    }

    fn env<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
        c.env.iter().flatten().find(|e| e.name == name)
    }

    /// The command line the container runs: command, then args.
    fn args(c: &Container) -> String {
        c.command.iter().flatten().chain(c.args.iter().flatten()).cloned().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn namespace_label_enables_injection_of_init_container_native_sidecar_and_token_volume() {
        let mut p = pod(&[]);
        let before = p.clone();
        assert_eq!(inject(&mut p, &enabled_ns(), false).unwrap(), Outcome::Injected);

        // Ours first, in order, then the pod's own init containers; app containers untouched.
        assert_eq!(init_names(&p), [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
        assert_eq!(p.spec.as_ref().unwrap().containers, before.spec.as_ref().unwrap().containers);
        assert_eq!(p.metadata.labels, before.metadata.labels, "labels (and so selectors) unchanged");
        assert_eq!(p.metadata.annotations.as_ref().unwrap()[annotation::STATUS], "injected");

        let init = init(&p);
        assert_eq!(
            args(init),
            "palisade init --proxy-uid 1337 --inbound-port 15006 --outbound-port 15001 --exclude-inbound-ports 15020"
        );
        let sc = init.security_context.as_ref().unwrap();
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_string(), "NET_RAW".to_string()][..]));
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!((sc.run_as_user, sc.run_as_non_root), (Some(0), Some(false)));
        assert_eq!((sc.allow_privilege_escalation, sc.read_only_root_filesystem), (Some(false), Some(true)));
        assert_eq!(init.restart_policy, None, "the init container runs once");

        let proxy = sidecar(&p);
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"), "a native sidecar");
        assert_eq!(
            args(proxy),
            "palisade-proxy --transparent --control palisade-control.palisade-system.svc:15010 \
             --kube-token-file /var/run/secrets/palisade/token --inbound 0.0.0.0:15006 --outbound 127.0.0.1:15001 \
             --admin 0.0.0.0:15020 --trust-domain cluster.local"
        );
        let startup = proxy.startup_probe.as_ref().unwrap();
        let get = startup.http_get.as_ref().unwrap();
        assert_eq!((get.path.as_deref(), &get.port), (Some("/ready"), &IntOrString::Int(15020)));
        assert_eq!((startup.period_seconds, startup.failure_threshold), (Some(1), Some(120)));
        let path = |p: &Option<Probe>| p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone().unwrap();
        assert_eq!(path(&proxy.readiness_probe), "/ready");
        assert_eq!(path(&proxy.liveness_probe), "/live");
        let sc = proxy.security_context.as_ref().unwrap();
        assert_eq!(
            (sc.run_as_user, sc.run_as_non_root, sc.read_only_root_filesystem),
            (Some(1337), Some(true), Some(true))
        );
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
        let resources = proxy.resources.as_ref().unwrap();
        assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "50m");
        assert_eq!(resources.requests.as_ref().unwrap()["memory"].0, "32Mi");
        assert_eq!(resources.limits.as_ref().unwrap()["cpu"].0, "1");
        assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "128Mi");
        let ports: Vec<_> =
            proxy.ports.iter().flatten().map(|p| (p.container_port, p.name.clone().unwrap_or_default())).collect();
        assert_eq!(ports, [(15006, "palisade-in".to_string()), (15020, "palisade-admin".to_string())]);

        for (name, path) in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
            ("POD_IP", "status.podIP"),
            ("PALISADE_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ] {
            let from = env(proxy, name).unwrap().value_from.as_ref().unwrap();
            assert_eq!(from.field_ref.as_ref().unwrap().field_path, path, "{name}");
        }
        assert_eq!(env(proxy, "PALISADE_LABELS").unwrap().value.as_deref(), Some("app=web,version=v2"), "sorted");
        assert!(env(proxy, "PALISADE_CA_BUNDLE_PEM").is_some());
        assert!(env(proxy, "PALISADE_LOG").is_none());

        let mount = &proxy.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.name.as_str(), mount.mount_path.as_str(), mount.read_only),
            (TOKEN_VOLUME, TOKEN_DIR, Some(true))
        );
        let volumes = p.spec.as_ref().unwrap().volumes.as_ref().unwrap();
        assert_eq!(volumes[0].name, "cache", "the pod's volumes stay first");
        let token = volumes.iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
        let projection = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0].service_account_token.clone();
        let projection = projection.unwrap();
        assert_eq!(
            (projection.audience.as_deref(), projection.expiration_seconds, projection.path.as_str()),
            (Some("palisade"), Some(3600), "token")
        );
    }

    #[test]
    fn cni_mode_injects_an_unprivileged_validator_and_every_container_it_adds_is_restricted() {
        let cfg = InjectConfig { cni: true, ..InjectConfig::default() };
        let mut p = pod(&[(annotation::EXCLUDE_OUTBOUND_PORTS, "9,10")]);
        let (meta, spec) = (&mut p.metadata, p.spec.as_mut().unwrap());
        assert_eq!(inject_pod_template(meta, spec, &enabled_ns(), &cfg, false).unwrap(), Outcome::Injected);
        assert_eq!(init_names(&p), [VALIDATE_CONTAINER, PROXY_CONTAINER, "migrate"]);
        let spec = p.spec.as_ref().unwrap();
        let volumes: Vec<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        assert_eq!(
            volumes,
            ["cache", TOKEN_VOLUME, TRUST_VOLUME],
            "no iptables lock volume: nothing runs iptables in the pod"
        );
        let validate = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(
            args(validate),
            "palisade cni validate --outbound-port 15001 --probe 192.0.2.1:11",
            "the probe port is one the redirect does not exclude"
        );
        for c in &spec.init_containers.as_ref().unwrap()[..2] {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
            assert_ne!(sc.run_as_user, Some(0), "{}", c.name);
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            let caps = sc.capabilities.as_ref().unwrap();
            assert_eq!((caps.add.as_ref(), caps.drop.as_deref()), (None, Some(&["ALL".to_string()][..])), "{}", c.name);
            assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault", "{}", c.name);
        }
        assert_ne!(
            validate.security_context.as_ref().unwrap().run_as_user,
            Some(1337),
            "the validator's traffic must not escape the redirect as the sidecar's does"
        );

        // What the node's plugin installs for this pod is what the init container would have run.
        let redirect = cni_redirect_args(&p.metadata, spec).unwrap().unwrap().join(" ");
        let mut init_mode = pod(&[(annotation::EXCLUDE_OUTBOUND_PORTS, "9,10")]);
        inject(&mut init_mode, &enabled_ns(), false).unwrap();
        assert_eq!(format!("palisade init {redirect}"), args(init(&init_mode)));
        assert_eq!(cni_redirect_args(&init_mode.metadata, init_mode.spec.as_ref().unwrap()).unwrap(), None);
    }

    #[test]
    fn nothing_enables_injection_by_default() {
        let mut p = pod(&[]);
        let before = p.clone();
        assert_eq!(inject(&mut p, &BTreeMap::new(), false).unwrap(), Outcome::NotEnabled);
        let disabled_ns = BTreeMap::from([(annotation::INJECT.to_string(), "disabled".to_string())]);
        assert_eq!(inject(&mut p, &disabled_ns, false).unwrap(), Outcome::NotEnabled);
        assert_eq!(p, before);
    }

    #[test]
    fn pod_annotation_enables_without_the_namespace_label() {
        let mut p = pod(&[(annotation::INJECT, "enabled")]);
        assert_eq!(inject(&mut p, &BTreeMap::new(), false).unwrap(), Outcome::Injected);
        assert_eq!(init_names(&p)[..2], [INIT_CONTAINER, PROXY_CONTAINER]);
    }

    #[test]
    fn disabled_annotation_wins_over_namespace_label_and_force() {
        for force in [false, true] {
            let mut p = pod(&[(annotation::INJECT, "disabled")]);
            let before = p.clone();
            assert_eq!(inject(&mut p, &enabled_ns(), force).unwrap(), Outcome::Disabled);
            assert_eq!(p, before);
        }
    }

    #[test]
    fn the_pod_label_opts_in_and_out_and_wins_over_the_annotation() {
        let labelled = |value: &str, annotations: &[(&str, &str)]| {
            let mut p = pod(annotations);
            p.metadata.labels.as_mut().unwrap().insert(annotation::INJECT.to_string(), value.to_string());
            p
        };
        let mut p = labelled("enabled", &[]);
        assert_eq!(inject(&mut p, &BTreeMap::new(), false).unwrap(), Outcome::Injected);
        let mut p = labelled("disabled", &[]);
        assert_eq!(inject(&mut p, &enabled_ns(), true).unwrap(), Outcome::Disabled);
        let mut p = labelled("enabled", &[(annotation::INJECT, "disabled")]);
        assert_eq!(inject(&mut p, &BTreeMap::new(), false).unwrap(), Outcome::Injected);
        let mut p = labelled("disabled", &[(annotation::INJECT, "enabled")]);
        assert_eq!(inject(&mut p, &enabled_ns(), false).unwrap(), Outcome::Disabled);
        let mut p = labelled("yes", &[]);
        let before = p.clone();
        let err = inject(&mut p, &enabled_ns(), false).unwrap_err().to_string();
        assert_eq!(err, r#"label palisade.io/inject="yes" is invalid: expected `enabled` or `disabled`"#);
        assert_eq!(p, before);
    }

    #[test]
    fn tcp_grpc_and_https_probes_move_to_the_sidecar_and_the_rest_stay() {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop"},
            "spec": {"containers": [
                {"name": "app", "image": "web:1", "ports": [{"name": "tls", "containerPort": 8443}],
                 "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 7, "failureThreshold": 5, "timeoutSeconds": 3},
                 "readinessProbe": {"grpc": {"port": 9090, "service": "shop"}},
                 "startupProbe": {"httpGet": {"port": "tls", "path": "/healthz", "scheme": "HTTPS"}}},
                {"name": "side", "image": "side:1",
                 "livenessProbe": {"httpGet": {"port": 8081, "path": "/live"}},
                 "readinessProbe": {"exec": {"command": ["true"]}},
                 "startupProbe": {"tcpSocket": {"port": 8082, "host": "10.0.0.9"}}},
                {"name": "unnamed", "image": "u:1", "livenessProbe": {"tcpSocket": {"port": "nope"}}},
            ]}
        }))
        .unwrap();
        let before = p.clone();
        assert_eq!(inject(&mut p, &enabled_ns(), false).unwrap(), Outcome::Injected);
        let containers = &p.spec.as_ref().unwrap().containers;
        let get = |probe: &Option<Probe>| probe.as_ref().unwrap().http_get.clone().unwrap();
        let app = &containers[0];
        for (probe, path) in [
            (&app.liveness_probe, "/app-health/app/livez"),
            (&app.readiness_probe, "/app-health/app/readyz"),
            (&app.startup_probe, "/app-health/app/startupz"),
        ] {
            assert_eq!(get(probe).path.as_deref(), Some(path));
            assert_eq!(get(probe).port, IntOrString::Int(15020));
            let p = probe.as_ref().unwrap();
            assert!(p.tcp_socket.is_none() && p.grpc.is_none(), "{path}: one handler");
        }
        let live = app.liveness_probe.as_ref().unwrap();
        assert_eq!((live.period_seconds, live.failure_threshold, live.timeout_seconds), (Some(7), Some(5), Some(3)));
        let untouched = &before.spec.as_ref().unwrap().containers;
        assert_eq!(containers[1], untouched[1], "HTTP, exec and other-host probes stay");
        assert_eq!(containers[2], untouched[2], "a probe on an undeclared named port stays");

        let env = env(sidecar(&p), "PALISADE_APP_PROBES").unwrap().value.clone().unwrap();
        let probes = crate::proxy::app_probe::parse(&env).unwrap();
        let paths: Vec<_> = probes.paths().collect();
        assert_eq!(paths, ["/app-health/app/livez", "/app-health/app/readyz", "/app-health/app/startupz"]);
        let originals: BTreeMap<String, serde_json::Value> = serde_json::from_str(&env).unwrap();
        assert_eq!(originals["/app-health/app/startupz"]["httpGet"]["port"], 8443, "named port resolved");
        assert_eq!(originals["/app-health/app/livez"]["timeoutSeconds"], 3, "the sidecar keeps the timeout");
    }

    #[test]
    fn force_injects_as_if_the_namespace_were_enabled() {
        let mut p = pod(&[]);
        assert_eq!(inject(&mut p, &BTreeMap::new(), true).unwrap(), Outcome::Injected);
    }

    #[test]
    fn host_network_pods_are_skipped() {
        let mut p = pod(&[(annotation::INJECT, "enabled")]);
        p.spec.as_mut().unwrap().host_network = Some(true);
        let before = p.clone();
        assert_eq!(inject(&mut p, &enabled_ns(), true).unwrap(), Outcome::HostNetwork);
        assert_eq!(p, before);
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        let mut p = pod(&[]);
        assert_eq!(inject(&mut p, &enabled_ns(), false).unwrap(), Outcome::Injected);
        let once = p.clone();
        assert_eq!(inject(&mut p, &enabled_ns(), true).unwrap(), Outcome::AlreadyInjected);
        assert_eq!(p, once);

        // Either mark alone is enough: the status annotation, or the sidecar container.
        let mut marked = pod(&[(annotation::STATUS, "injected")]);
        let before = marked.clone();
        assert_eq!(inject(&mut marked, &enabled_ns(), true).unwrap(), Outcome::AlreadyInjected);
        assert_eq!(marked, before);
        let mut by_hand = pod(&[]);
        by_hand
            .spec
            .as_mut()
            .unwrap()
            .containers
            .push(Container { name: PROXY_CONTAINER.into(), ..Default::default() });
        assert_eq!(inject(&mut by_hand, &enabled_ns(), true).unwrap(), Outcome::AlreadyInjected);
    }

    #[test]
    fn annotations_override_the_proxy_settings() {
        let mut p = pod(&[
            (annotation::PROXY_CPU, "100m"),
            (annotation::PROXY_MEMORY, "64Mi"),
            (annotation::PROXY_CPU_LIMIT, "2"),
            (annotation::PROXY_MEMORY_LIMIT, "256Mi"),
            (annotation::EXCLUDE_INBOUND_PORTS, "9090, 15020"),
            (annotation::EXCLUDE_OUTBOUND_PORTS, "5432"),
            (annotation::INCLUDE_INBOUND_PORTS, "8080,8443"),
            (annotation::OPAQUE_PORTS, "3306,6379"),
            (annotation::PROXY_IMAGE, "registry.local/palisade:dev"),
            (annotation::LOG_LEVEL, "debug,palisade::proxy=trace"),
        ]);
        assert_eq!(inject(&mut p, &BTreeMap::new(), true).unwrap(), Outcome::Injected);
        let (init, proxy) = (init(&p), sidecar(&p));
        assert_eq!(
            args(init),
            "palisade init --proxy-uid 1337 --inbound-port 15006 --outbound-port 15001 --exclude-inbound-ports 15020,9090 \
             --exclude-outbound-ports 5432 --include-inbound-ports 8080,8443"
        );
        assert!(args(proxy).ends_with("--trust-domain cluster.local --opaque-ports 3306,6379"), "{}", args(proxy));
        for c in [init, proxy] {
            assert_eq!(c.image.as_deref(), Some("registry.local/palisade:dev"));
            let r = c.resources.as_ref().unwrap();
            let (req, lim) = (r.requests.as_ref().unwrap(), r.limits.as_ref().unwrap());
            assert_eq!(
                [&req["cpu"].0, &req["memory"].0, &lim["cpu"].0, &lim["memory"].0],
                ["100m", "64Mi", "2", "256Mi"]
            );
        }
        assert_eq!(env(proxy, "PALISADE_LOG").unwrap().value.as_deref(), Some("debug,palisade::proxy=trace"));
    }

    #[test]
    fn unusable_annotations_are_refused_naming_the_annotation() {
        for (key, value) in [
            (annotation::INJECT, "yes"),
            (annotation::PROXY_CPU, "lots"),
            (annotation::PROXY_MEMORY, "64MB"),
            (annotation::PROXY_CPU_LIMIT, "-1"),
            (annotation::PROXY_MEMORY_LIMIT, "1 Gi"),
            (annotation::EXCLUDE_INBOUND_PORTS, "80,http"),
            (annotation::EXCLUDE_OUTBOUND_PORTS, "70000"),
            (annotation::INCLUDE_INBOUND_PORTS, "all"),
            (annotation::OPAQUE_PORTS, ""),
            (annotation::PROXY_IMAGE, "bad image"),
            (annotation::LOG_LEVEL, "palisade=loudest"),
            // A request above the limit: the pod's own annotation is blamed.
            (annotation::PROXY_CPU, "1500m"),
            (annotation::PROXY_MEMORY_LIMIT, "16Mi"),
        ] {
            let mut p = pod(&[(key, value)]);
            let before = p.clone();
            let err = inject(&mut p, &BTreeMap::new(), true).expect_err(&format!("{key}={value:?} accepted"));
            let msg = err.to_string();
            assert!(msg.contains(key) && msg.contains(&format!("{value:?}")), "{key}={value:?}: {msg}");
            assert_eq!(p, before, "a refused pod is left untouched");
        }
    }

    #[test]
    fn an_unusable_injector_setting_names_the_setting() {
        let cfg = InjectConfig { memory_limit: "128MB".into(), ..Default::default() };
        let mut p = pod(&[]);
        let err = inject_pod_template(&mut p.metadata, p.spec.as_mut().unwrap(), &enabled_ns(), &cfg, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("injector setting memory_limit=\"128MB\""), "{err}");
    }

    #[test]
    fn an_app_container_running_as_the_proxy_uid_is_refused() {
        let mut p = pod(&[]);
        p.spec.as_mut().unwrap().security_context =
            Some(k8s_openapi::api::core::v1::PodSecurityContext { run_as_user: Some(1337), ..Default::default() });
        let err = inject(&mut p, &enabled_ns(), false).unwrap_err().to_string();
        assert!(err.contains("\"migrate\" runs as UID 1337"), "{err}");

        // A container that overrides the pod's UID is fine.
        let mut p = pod(&[]);
        let spec = p.spec.as_mut().unwrap();
        spec.security_context =
            Some(k8s_openapi::api::core::v1::PodSecurityContext { run_as_user: Some(1337), ..Default::default() });
        for c in spec.init_containers.iter_mut().flatten().chain(spec.containers.iter_mut()) {
            c.security_context = Some(SecurityContext { run_as_user: Some(1000), ..Default::default() });
        }
        assert_eq!(inject(&mut p, &enabled_ns(), false).unwrap(), Outcome::Injected);
    }

    #[test]
    fn a_name_injection_needs_that_is_taken_is_refused() {
        let mut p = pod(&[]);
        p.spec
            .as_mut()
            .unwrap()
            .volumes
            .get_or_insert_default()
            .push(Volume { name: TOKEN_VOLUME.into(), ..Default::default() });
        let err = inject(&mut p, &enabled_ns(), false).unwrap_err().to_string();
        assert!(err.contains("a volume named \"palisade-token\""), "{err}");
    }
}
