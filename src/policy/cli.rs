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
use super::input::{Input, RequestAttributes, RequestAuth};
use super::load::load_path;
use super::set::{PolicySet, Workload};

/// Arguments shared by `eval` and `explain`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Directory (or file) of YAML policies.
    #[arg(long)]
    pub policies: PathBuf,
    /// The request as JSON (see docs/policy.md). Its optional `jwt` field names the end user:
    /// `{"token": "<JWT>"}` is verified as a sidecar would, with the RequestAuthentication
    /// documents under --policies (inline `jwks` only, nothing is fetched) and the clock of
    /// now; `{"claims": {...}}` is TAKEN AS VERIFIED, unchecked, for offline evaluation only.
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

/// Verifies a token of a request file with the `RequestAuthentication` documents under a
/// policies path (given by the binary: verification is the guard's, a layer above policy).
pub type TokenVerifier = fn(&Path, &str) -> Result<RequestAuth, String>;

/// The end user of a request file: a token to verify, or claims taken as verified.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum EndUser {
    Token(String),
    Claims(serde_json::Map<String, serde_json::Value>),
}

fn read_request(path: &Path) -> anyhow::Result<(RequestAttributes, Option<EndUser>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read request {}", path.display()))?;
    let mut value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("invalid request {}", path.display()))?;
    let end_user = match value.as_object_mut().and_then(|o| o.remove("jwt")) {
        None => None,
        Some(jwt) => Some(serde_json::from_value(jwt).with_context(|| {
            format!("invalid request {}: `jwt` is {{\"token\": \"...\"}} or {{\"claims\": {{...}}}}", path.display())
        })?),
    };
    let attrs = serde_json::from_value(value).with_context(|| format!("invalid request {}", path.display()))?;
    Ok((attrs, end_user))
}

/// Loads the policies and the request and builds the set for the request's destination.
fn prepare(args: &EvalArgs, verify: TokenVerifier) -> anyhow::Result<(PolicySet, Input<'static>)> {
    let policies = load_path(&args.policies)?;
    let (attrs, end_user) = read_request(&args.request)?;
    let workload =
        Workload { id: attrs.destination.clone(), labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>() };
    let input = Input::new(attrs);
    let input = match end_user {
        None => input,
        Some(EndUser::Claims(claims)) => input.with_auth(RequestAuth::from_claims(claims)),
        Some(EndUser::Token(token)) => {
            let auth = verify(&args.policies, &token).map_err(|e| anyhow::anyhow!("jwt.token: {e}"))?;
            input.with_auth(auth)
        }
    };
    Ok((PolicySet::new(policies, workload, args.default_policy), input))
}

fn code(allowed: bool) -> ExitCode {
    if allowed { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// Runs a `palisade policy` subcommand, printing to stdout (errors to stderr); `verify` checks
/// a token given in a request file.
pub fn run(cmd: PolicyCommand, verify: TokenVerifier) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Eval(args) => {
            let (set, input) = match prepare(&args, verify) {
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
            let (set, input) = match prepare(&args, verify) {
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

    fn run_cmd(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
        run(cmd, crate::guard::jwt::verify_offline)
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
        let code = run_cmd(PolicyCommand::Check { policies: dir.clone() }).unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        let args = |req: &str| EvalArgs {
            policies: dir.clone(),
            request: dir.join(req),
            labels: vec![("app".into(), "orders".into())],
            default_policy: DefaultPolicy::Deny,
        };
        assert_eq!(run_cmd(PolicyCommand::Eval(args("request-get-orders.json"))).unwrap(), ExitCode::SUCCESS);
        assert_eq!(run_cmd(PolicyCommand::Eval(args("request-delete-admin.json"))).unwrap(), ExitCode::from(1));
        assert_eq!(
            run_cmd(PolicyCommand::Explain { args: args("request-delete-admin.json"), json: false }).unwrap(),
            ExitCode::from(1)
        );
        let mut missing = args("request-get-orders.json");
        missing.request = dir.join("nope.json");
        assert_eq!(run_cmd(PolicyCommand::Eval(missing)).unwrap(), ExitCode::from(2));
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
        let code = run_cmd(PolicyCommand::Check { policies: dir.clone() }).unwrap();
        assert_eq!(code, ExitCode::from(1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_request_file_names_its_end_user_by_claims_taken_as_verified() {
        let dir = std::env::temp_dir().join(format!("palisade-policy-cli-jwt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("p.yaml"),
            "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: users, namespace: shop}\n\
             spec:\n  rules:\n  - from: [{source: {requestPrincipals: [\"https://id.test/*\"]}}]\n\
             \x20   when: [{key: \"request.auth.claims[scope]\", values: [\"orders:read\"]}]\n",
        )
        .unwrap();
        let request = |jwt: &str| {
            let path = dir.join(format!("r{}.json", rand::random::<u32>()));
            std::fs::write(
                &path,
                format!(
                    r#"{{"destination": "spiffe://cluster.local/ns/shop/sa/orders", "destination_port": 8080,
                        "method": "GET", "path": "/"{jwt}}}"#
                ),
            )
            .unwrap();
            EvalArgs { policies: dir.clone(), request: path, labels: vec![], default_policy: DefaultPolicy::Deny }
        };
        let claims = r#", "jwt": {"claims": {"iss": "https://id.test", "sub": "alice", "scope": "a orders:read"}}"#;
        assert_eq!(run_cmd(PolicyCommand::Eval(request(claims))).unwrap(), ExitCode::SUCCESS);
        let (_, input) = prepare(&request(claims), crate::guard::jwt::verify_offline).unwrap();
        assert_eq!(input.document()["palisade"]["jwt"]["principal"], "https://id.test/alice");
        let narrow = r#", "jwt": {"claims": {"iss": "https://id.test", "sub": "alice", "scope": "a"}}"#;
        assert_eq!(run_cmd(PolicyCommand::Eval(request(narrow))).unwrap(), ExitCode::from(1));
        assert_eq!(run_cmd(PolicyCommand::Eval(request(""))).unwrap(), ExitCode::from(1), "no end user");
        let bad = r#", "jwt": {"claim": {}}"#;
        assert_eq!(run_cmd(PolicyCommand::Eval(request(bad))).unwrap(), ExitCode::from(2));
        // A token needs a RequestAuthentication to be verified with; there is none here.
        let token = r#", "jwt": {"token": "a.b.c"}"#;
        assert_eq!(run_cmd(PolicyCommand::Eval(request(token))).unwrap(), ExitCode::from(2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
