//! `palisade policy eval|explain|check`: the same loader and evaluation order the sidecar uses,
//! run on files, for debugging policies before they ship.
//!
//! Exit codes: `eval` 0 allowed, 1 denied; `explain` 0 allowed, 1 denied; `check` 0 valid,
//! 1 invalid; 2 when the policies or the request cannot be loaded by `eval`/`explain`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use super::decision::DefaultPolicy;
use super::input::{Input, RequestAttributes};
use super::load::load_path;
use super::set::{PolicySet, Workload};

/// Arguments shared by `eval` and `explain`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Directory (or file) of YAML policies.
    #[arg(long)]
    pub policies: PathBuf,
    /// The request as JSON (see docs/policy.md).
    #[arg(long)]
    pub request: PathBuf,
    /// Labels of the destination workload: `k=v,k2=v2` (repeatable).
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// The mesh default when no ALLOW or DENY policy selects the workload.
    #[arg(long, value_enum, default_value_t = DefaultPolicy::Deny)]
    pub default_policy: DefaultPolicy,
}

/// `palisade policy ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum PolicyCommand {
    /// Decide one request and print the decision as JSON (exit 0 allowed, 1 denied).
    Eval(EvalArgs),
    /// Show every policy considered and which rule matched or why none did.
    Explain {
        #[command(flatten)]
        /// What to evaluate.
        args: EvalArgs,
        /// Print the explanation as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Validate every policy file; exit non-zero with the first error.
    Check {
        /// Directory (or file) of YAML policies.
        #[arg(long)]
        policies: PathBuf,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("label {s:?} is not KEY=VALUE")),
    }
}

fn read_request(path: &Path) -> anyhow::Result<RequestAttributes> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read request {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid request {}", path.display()))
}

/// Loads the policies and the request and builds the set for the request's destination.
fn prepare(args: &EvalArgs) -> anyhow::Result<(PolicySet, Input<'static>)> {
    let policies = load_path(&args.policies)?;
    let attrs = read_request(&args.request)?;
    let workload =
        Workload { id: attrs.destination.clone(), labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>() };
    Ok((PolicySet::new(policies, workload, args.default_policy), Input::new(attrs)))
}

fn code(allowed: bool) -> ExitCode {
    if allowed { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// Runs a `palisade policy` subcommand, printing to stdout (errors to stderr).
pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Eval(args) => {
            let (set, input) = match prepare(&args) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return Ok(ExitCode::from(2));
                }
            };
            let d = set.decide(&input);
            println!("{}", serde_json::to_string_pretty(&d)?);
            Ok(code(d.allowed))
        }
        PolicyCommand::Explain { args, json } => {
            let (set, input) = match prepare(&args) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return Ok(ExitCode::from(2));
                }
            };
            let e = set.explain(&input);
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                print!("{e}");
            }
            Ok(code(e.decision.allowed))
        }
        PolicyCommand::Check { policies } => match load_path(&policies) {
            Ok(p) => {
                println!("{}: {} policies OK", policies.display(), p.len());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(1))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: PolicyCommand,
    }

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies")
    }

    #[test]
    fn parses_arguments() {
        let cli = Cli::try_parse_from([
            "policy",
            "eval",
            "--policies",
            "p",
            "--request",
            "r.json",
            "--labels",
            "app=orders,tier=db",
            "--default-policy",
            "allow-authenticated",
        ])
        .unwrap();
        let PolicyCommand::Eval(a) = cli.cmd else { panic!("not eval") };
        assert_eq!(a.labels.len(), 2);
        assert_eq!(a.default_policy, DefaultPolicy::AllowAuthenticated);
        let cli = Cli::try_parse_from([
            "policy",
            "explain",
            "--policies",
            "p",
            "--request",
            "r.json",
            "--labels",
            "app=orders",
            "--labels",
            "tier=db",
            "--json",
        ])
        .unwrap();
        let PolicyCommand::Explain { args, json } = cli.cmd else { panic!("not explain") };
        assert!(json);
        assert_eq!(args.labels.len(), 2);
        assert_eq!(args.default_policy, DefaultPolicy::Deny);
        assert!(Cli::try_parse_from(["policy", "check", "--policies", "p"]).is_ok());
        assert!(
            Cli::try_parse_from(["policy", "eval", "--policies", "p", "--request", "r", "--labels", "oops"]).is_err()
        );
    }

    #[test]
    fn examples_check_and_evaluate() {
        let dir = examples();
        let code = run(PolicyCommand::Check { policies: dir.clone() }).unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        let args = |req: &str| EvalArgs {
            policies: dir.clone(),
            request: dir.join(req),
            labels: vec![("app".into(), "orders".into())],
            default_policy: DefaultPolicy::Deny,
        };
        assert_eq!(run(PolicyCommand::Eval(args("request-get-orders.json"))).unwrap(), ExitCode::SUCCESS);
        assert_eq!(run(PolicyCommand::Eval(args("request-delete-admin.json"))).unwrap(), ExitCode::from(1));
        assert_eq!(
            run(PolicyCommand::Explain { args: args("request-delete-admin.json"), json: false }).unwrap(),
            ExitCode::from(1)
        );
        let mut missing = args("request-get-orders.json");
        missing.request = dir.join("nope.json");
        assert_eq!(run(PolicyCommand::Eval(missing)).unwrap(), ExitCode::from(2));
    }

    #[test]
    fn check_fails_on_a_broken_file() {
        let dir = std::env::temp_dir().join(format!("palisade-policy-cli-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("bad.yaml"),
            "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: y}\nspec: {acton: DENY}\n",
        )
        .unwrap();
        let code = run(PolicyCommand::Check { policies: dir.clone() }).unwrap();
        assert_eq!(code, ExitCode::from(1));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
