//! `palisade-proxy`: the sidecar on its own, the binary the injector runs in every pod.
//!
//! Same flags and code as `palisade proxy`; it leaves out the control plane, the Kubernetes
//! client and the offline tools, so a sidecar maps fewer pages of code (see docs/benchmarks.md).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use palisade::proxy::ProxyArgs;

#[derive(Parser)]
#[command(
    name = "palisade-proxy",
    version,
    about = "The Palisade sidecar (the same as `palisade proxy`): mTLS, identity, per-request policy"
)]
struct Cli {
    #[command(flatten)]
    args: ProxyArgs,
}

fn main() -> ExitCode {
    palisade::telemetry::init_tracing();
    let Cli { args } = Cli::parse();
    let result = args.runtime().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(palisade::proxy::run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
