//! `palisade audit`'s flags, output and exit code.
//!
//! The input comes from one place per flag: `--resources DIR` (manifests) or `--server ADDR`
//! (the live mesh, through the management API); the rest (checks, output, exit code) is shared.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::{AuditInput, AuditSettings, Finding, Severity, audit, manifests};

/// The exit code when a finding at or above `--fail-on` exists (1 is an error, 2 bad flags).
pub const EXIT_FINDINGS: u8 = 3;

/// Flags of `palisade audit`.
#[derive(clap::Args, Debug, Clone)]
pub struct AuditArgs {
    /// Directory of manifests: the mesh's resources (read as the control plane's `--resources`
    /// reads them) and the pod templates (Deployments, StatefulSets, DaemonSets, Jobs, Pods) of
    /// the workloads they protect.
    #[arg(long, conflicts_with = "server")]
    pub resources: Option<PathBuf>,
    /// The live mesh instead: the management API at `--server` (with `--credentials`, or
    /// `--token-file` on Kubernetes). Settings, resources, sidecars and CA come from it.
    #[command(flatten)]
    pub server: crate::control::admin_client::ServerArgs,
    /// The control plane's `--default-policy`.
    #[arg(long, default_value = "deny", value_parser = ["deny", "allow-authenticated", "allow"])]
    pub default_policy: String,
    /// The control plane's `--egress`.
    #[arg(long, default_value = "allow", value_parser = ["allow", "deny"])]
    pub egress: String,
    /// The control plane's `--trust-domain`.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// The control plane's `--cert-ttl` (when sidecars must have renewed).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub cert_ttl: std::time::Duration,
    /// Output format: `table` or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
    /// Exit with 3 when a finding of this severity or above exists.
    #[arg(long, value_enum)]
    pub fail_on: Option<Severity>,
}

impl AuditArgs {
    /// The mesh-wide settings the flags describe.
    pub fn settings(&self) -> AuditSettings {
        AuditSettings {
            default_policy: self.default_policy.clone(),
            egress: self.egress.clone(),
            trust_domain: self.trust_domain.clone(),
            cert_ttl_secs: self.cert_ttl.as_secs() as i64,
        }
    }
}

/// Reads the input the flags name.
pub fn input(args: &AuditArgs) -> anyhow::Result<AuditInput> {
    let now = crate::clock::now_unix();
    match &args.resources {
        Some(dir) => {
            manifests::read_dir(dir, args.settings(), now).with_context(|| format!("--resources {}", dir.display()))
        }
        None if args.server.server.is_some() => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(live(args, now))
            .context("auditing the live mesh"),
        None => anyhow::bail!("nothing to audit: give --resources DIR or --server ADDR"),
    }
}

/// The live mesh's input: what the management API says, the resources validated again here
/// exactly as the control plane validated them.
async fn live(args: &AuditArgs, now: i64) -> anyhow::Result<AuditInput> {
    use crate::proto::admin::{ListResourcesRequest, ListSidecarsRequest, StatusRequest};
    let mut api = crate::control::admin_client::connect(&args.server).await?;
    let refused = |s: tonic::Status| anyhow::anyhow!("the control plane refused: {:?}: {}", s.code(), s.message());
    let status = api.status(StatusRequest {}).await.map_err(refused)?.into_inner();
    let listed = api.list_resources(ListResourcesRequest {}).await.map_err(refused)?.into_inner();
    let sidecars = api.list_sidecars(ListSidecarsRequest {}).await.map_err(refused)?.into_inner();
    let mut resources = Vec::new();
    for r in listed.resources {
        let spec: serde_json::Value = serde_json::from_str(&r.spec_json)
            .with_context(|| format!("{} {}/{}: spec", r.kind, r.namespace, r.name))?;
        let labels = r.labels.into_iter().collect();
        let resource = crate::control::source::validate(&r.kind, &r.namespace, &r.name, labels, spec, r.origin)
            .map_err(|e| anyhow::anyhow!("{} {}/{}: {}", r.kind, r.namespace, r.name, e.message))?;
        resources.push(resource);
    }
    let sidecars: Vec<crate::control::discovery::SidecarEntry> =
        sidecars.sidecars.into_iter().map(Into::into).collect();
    let cert_ttl_secs =
        if status.cert_ttl_seconds > 0 { status.cert_ttl_seconds } else { args.cert_ttl.as_secs() as i64 };
    let settings = AuditSettings {
        default_policy: status.default_policy,
        egress: status.egress,
        trust_domain: status.trust_domain,
        cert_ttl_secs,
    };
    let roots = status
        .ca_generations
        .iter()
        .filter(|g| g.state != "retired")
        .map(|g| super::RootInfo {
            generation: g.generation,
            not_before: g.root_not_before,
            not_after: g.root_not_after,
        })
        .collect();
    Ok(AuditInput {
        settings,
        resources,
        workloads: super::workloads_of(&sidecars),
        sidecars: Some(sidecars),
        roots,
        ca_key_sealed: Some(status.ca_keys_protected),
        now,
    })
}

/// Audits `input`, prints the report and returns the exit code `--fail-on` asks for.
pub fn report(args: &AuditArgs, input: &AuditInput) -> anyhow::Result<ExitCode> {
    let findings = audit(input);
    if args.output == "json" {
        let summary = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
        let doc = serde_json::json!({
            "findings": findings,
            "summary": {"low": summary(Severity::Low), "medium": summary(Severity::Medium),
                        "high": summary(Severity::High), "critical": summary(Severity::Critical)},
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", render(&findings));
    }
    let failed = args.fail_on.is_some_and(|level| findings.iter().any(|f| f.severity >= level));
    Ok(if failed { ExitCode::from(EXIT_FINDINGS) } else { ExitCode::SUCCESS })
}

/// `palisade audit`: read, check, print.
pub fn run(args: &AuditArgs) -> anyhow::Result<ExitCode> {
    report(args, &input(args)?)
}

/// The table: one line per finding, its fix indented below it.
pub fn render(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "no findings\n".into();
    }
    let width = findings.iter().map(|f| f.object.len()).max().unwrap_or(0).min(60);
    let check = findings.iter().map(|f| f.check.len()).max().unwrap_or(0);
    let mut out = format!("{:<8}  {:<check$}  {:<width$}  MESSAGE\n", "SEVERITY", "CHECK", "OBJECT");
    for f in findings {
        out.push_str(&format!(
            "{:<8}  {:<check$}  {:<width$}  {}\n{:10}fix: {}\n",
            f.severity.as_str(),
            f.check,
            f.object,
            f.message,
            "",
            f.fix
        ));
    }
    out
}
