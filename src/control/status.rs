//! `palisade status`: what the control plane knows, read through its management API.

use std::time::{Duration, UNIX_EPOCH};

use super::admin_client::AdminClient;
use super::discovery::SidecarEntry;
use super::telemetry::Edge;
use crate::proto::admin::{ListSidecarsRequest, StatusRequest, TrafficGraphRequest};

/// Everything `palisade status` shows.
#[derive(Debug, serde::Serialize)]
pub struct StatusReport {
    pub sidecars: Vec<SidecarEntry>,
    pub traffic: Vec<Edge>,
    pub resource_errors: Vec<String>,
    /// Each resource in force, with how it rolled out among the sidecars it selects.
    pub resources: Vec<ResourceRollout>,
    /// Mesh services with their endpoints.
    pub services: Vec<ServiceStatus>,
}

/// A mesh service as `palisade status` shows it.
#[derive(Debug, serde::Serialize)]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    pub addresses: Vec<String>,
    pub endpoints: Vec<ServiceEndpointStatus>,
}

#[derive(Debug, serde::Serialize)]
pub struct ServiceEndpointStatus {
    pub address: String,
    pub spiffe_id: String,
    pub zone: String,
    pub state: String,
}

impl From<crate::proto::admin::ServiceStatus> for ServiceStatus {
    fn from(s: crate::proto::admin::ServiceStatus) -> Self {
        let crate::proto::admin::ServiceStatus { namespace, name, addresses, endpoints } = s;
        let endpoints = endpoints
            .into_iter()
            .map(|e| {
                let crate::proto::admin::ServiceEndpointStatus { address, spiffe_id, zone, state } = e;
                ServiceEndpointStatus { address, spiffe_id, zone, state }
            })
            .collect();
        ServiceStatus { namespace, name, addresses, endpoints }
    }
}

/// A resource and its rollout (see [`super::discovery::Rollout`]).
#[derive(Debug, serde::Serialize)]
pub struct ResourceRollout {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub origin: String,
    pub selected: u32,
    pub current: u32,
    pub nacked: u32,
}

impl From<crate::proto::admin::ResourceRollout> for ResourceRollout {
    fn from(r: crate::proto::admin::ResourceRollout) -> Self {
        let crate::proto::admin::ResourceRollout { kind, namespace, name, origin, selected, current, nacked } = r;
        ResourceRollout { kind, namespace, name, origin, selected, current, nacked }
    }
}

/// Fetches the report.
pub async fn fetch(client: &mut AdminClient) -> anyhow::Result<StatusReport> {
    let sidecars = client.list_sidecars(ListSidecarsRequest {}).await?.into_inner().sidecars;
    let edges = client.traffic_graph(TrafficGraphRequest {}).await?.into_inner().edges;
    let status = client.status(StatusRequest {}).await?.into_inner();
    Ok(StatusReport {
        sidecars: sidecars.into_iter().map(SidecarEntry::from).collect(),
        traffic: edges.into_iter().map(Edge::from).collect(),
        resource_errors: status.resource_errors,
        resources: status.rollouts.into_iter().map(ResourceRollout::from).collect(),
        services: status.services.into_iter().map(ServiceStatus::from).collect(),
    })
}

fn ago(unix: i64) -> String {
    let secs = (crate::clock::now_unix() - unix).max(0);
    if secs < 120 { format!("{secs}s ago") } else { format!("{}m ago", secs / 60) }
}

fn until(unix: i64) -> String {
    let secs = unix - crate::clock::now_unix();
    if secs <= 0 {
        return "EXPIRED".into();
    }
    let at = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix as u64));
    if secs < 120 { format!("in {secs}s ({at})") } else { format!("in {}m ({at})", secs / 60) }
}

/// A terminal rendering.
pub fn render(report: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    // With several replicas, which one each sidecar is connected to.
    let replicas: std::collections::BTreeSet<&str> = report.sidecars.iter().map(|s| s.replica.as_str()).collect();
    let several = replicas.len() > 1;
    let _ = writeln!(out, "SIDECARS ({})", report.sidecars.len());
    let _ = writeln!(
        out,
        "{:<46} {:<22} {:<18} {:<10} {:<22} {:<28} LAST SEEN",
        "IDENTITY", "ADDRESS", "LABELS", "STATE", "CONFIG (pushed/acked)", "CERT EXPIRES"
    );
    for e in &report.sidecars {
        let labels = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        let state = if !e.connected {
            "gone"
        } else if !e.nack_message.is_empty() {
            "NACK"
        } else if e.acked_version == e.pushed_version {
            "ACK"
        } else {
            "pending"
        };
        let _ = writeln!(
            out,
            "{:<46} {:<22} {:<18} {:<10} {:<22} {:<28} {}",
            e.spiffe_id,
            e.addresses.join(","),
            if labels.is_empty() { "-".into() } else { labels },
            state,
            format!("{}/{}", short(&e.pushed_version), short(&e.acked_version)),
            until(e.certificate_not_after),
            ago(e.last_seen),
        );
        if several {
            let _ = writeln!(out, "    replica: {}", e.replica);
        }
        if !e.nack_message.is_empty() {
            let _ = writeln!(out, "    NACK: {}", e.nack_message);
        }
        for r in &e.refused_addresses {
            let _ = writeln!(out, "    address refused: {}: {}", r.address, r.reason);
        }
    }
    let _ = writeln!(out, "\nTRAFFIC (as seen by each destination)");
    let _ = writeln!(
        out,
        "{:<46}    {:<46} {:>9} {:>8} {:>8} {:>10}",
        "SOURCE", "DESTINATION", "REQUESTS", "ERRORS", "DENIED", "TLS FAILS"
    );
    for e in &report.traffic {
        let pct = |n: u64| {
            if e.requests == 0 { "-".to_string() } else { format!("{:.0}%", 100.0 * n as f64 / e.requests as f64) }
        };
        let _ = writeln!(
            out,
            "{:<46} -> {:<46} {:>9} {:>8} {:>8} {:>10}",
            e.source,
            e.destination,
            e.requests,
            pct(e.errors),
            pct(e.denials),
            e.handshake_failures
        );
    }
    let _ = writeln!(out, "\nRESOURCES (rollout among the connected sidecars each selects)");
    let _ = writeln!(
        out,
        "{:<24} {:<40} {:>8} {:>8} {:>7}  ORIGIN",
        "KIND", "NAMESPACE/NAME", "SELECTED", "CURRENT", "NACKED"
    );
    for r in &report.resources {
        let _ = writeln!(
            out,
            "{:<24} {:<40} {:>8} {:>8} {:>7}  {}",
            r.kind,
            format!("{}/{}", r.namespace, r.name),
            r.selected,
            r.current,
            r.nacked,
            r.origin
        );
    }
    render_services(&mut out, &report.services);
    if !report.resource_errors.is_empty() {
        let _ = writeln!(out, "\nREFUSED RESOURCE FILES");
        for e in &report.resource_errors {
            let _ = writeln!(out, "  {e}");
        }
    }
    out
}

/// The services section: each service, where it is reached, and its endpoints.
fn render_services(out: &mut String, services: &[ServiceStatus]) {
    use std::fmt::Write;
    if services.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nSERVICES (endpoints as every sidecar resolves them)");
    for s in services {
        let at = if s.addresses.is_empty() { String::new() } else { format!("  at {}", s.addresses.join(", ")) };
        let _ = writeln!(out, "{}/{} ({} endpoints){at}", s.namespace, s.name, s.endpoints.len());
        for e in &s.endpoints {
            let zone = if e.zone.is_empty() { String::new() } else { format!(" zone={}", e.zone) };
            let _ = writeln!(out, "    {:<22} {:<46} {:<10}{zone}", e.address, e.spiffe_id, e.state);
        }
    }
}

fn short(v: &str) -> &str {
    if v.is_empty() { "-" } else { &v[..v.len().min(8)] }
}
