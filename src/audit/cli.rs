//! `palisade audit`'s flags, output and exit code.
//!
//! The input comes from one place per flag: `--resources DIR` today; a live form adds its flag
//! here and one arm in [`input`], the rest (checks, output, exit code) is shared.

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
    #[arg(long)]
    pub resources: Option<PathBuf>,
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
        None => anyhow::bail!("nothing to audit: give --resources DIR"),
    }
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
