//! Metrics, the admin HTTP server, the access log and tracing setup.

pub mod access_log;
pub mod admin;
pub mod metrics;
pub mod peers;
pub mod unknown_kid;

/// Sets up logging to stderr. `PALISADE_LOG` (or `RUST_LOG`) filters; `PALISADE_LOG_FORMAT=json`
/// switches to JSON lines.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PALISADE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour only for a person at a terminal; log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var("PALISADE_LOG_FORMAT").as_deref() == Ok("json") {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}
