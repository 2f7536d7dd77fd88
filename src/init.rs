//! `palisade init`: the iptables rules of transparent mode, in the pod's network namespace.
//!
//! Same shape as istio-init and linkerd proxy-init, in the `nat` table:
//!
//! ```text
//! PREROUTING -p tcp -> PALISADE_INBOUND  -> RETURN for excluded ports
//!                                        -> PALISADE_IN_REDIRECT -> REDIRECT --to-ports 15006
//! OUTPUT     -p tcp -> PALISADE_OUTPUT   -> RETURN for the proxy's UID (its own connections escape)
//!                                        -> RETURN for 127.0.0.1 and `-o lo`
//!                                        -> RETURN for excluded ports
//!                                        -> PALISADE_REDIRECT -> REDIRECT --to-ports 15001
//! ```
//!
//! Running it twice leaves the same rules: own chains are created (an "already exists" failure is
//! expected) then flushed, and each jump from a built-in chain is deleted before it is appended.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

/// Chain that PREROUTING jumps to for inbound TCP.
pub const INBOUND_CHAIN: &str = "PALISADE_INBOUND";
/// Chain that redirects inbound TCP to the inbound port.
pub const IN_REDIRECT_CHAIN: &str = "PALISADE_IN_REDIRECT";
/// Chain that OUTPUT jumps to for outbound TCP.
pub const OUTPUT_CHAIN: &str = "PALISADE_OUTPUT";
/// Chain that redirects outbound TCP to the outbound port.
pub const REDIRECT_CHAIN: &str = "PALISADE_REDIRECT";

/// Flags of `palisade init`.
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// UID the sidecar runs as. Its traffic is never redirected, so its own connections escape.
    #[arg(long, env = "PALISADE_PROXY_UID")]
    pub proxy_uid: u32,
    /// Port of the sidecar's inbound listener; inbound TCP is redirected to it.
    #[arg(long, env = "PALISADE_INBOUND_PORT", default_value_t = crate::ports::SIDECAR_INBOUND)]
    pub inbound_port: u16,
    /// Port of the sidecar's outbound listener; outbound TCP is redirected to it.
    #[arg(long, env = "PALISADE_OUTBOUND_PORT", default_value_t = crate::ports::SIDECAR_OUTBOUND)]
    pub outbound_port: u16,
    /// Destination ports of inbound TCP left alone (comma list; the admin port 15020 by default,
    /// so probes reach `/ready` directly). `""` excludes none.
    #[arg(long, env = "PALISADE_EXCLUDE_INBOUND_PORTS", default_value_t = PortList(vec![crate::ports::SIDECAR_ADMIN]))]
    pub exclude_inbound_ports: PortList,
    /// Destination ports of outbound TCP left alone (comma list).
    #[arg(long, env = "PALISADE_EXCLUDE_OUTBOUND_PORTS", default_value = "")]
    pub exclude_outbound_ports: PortList,
    /// Inbound ports to intercept: `*` for all, a comma list, or `""` for no inbound interception.
    #[arg(long, env = "PALISADE_INCLUDE_INBOUND_PORTS", default_value = "*")]
    pub include_inbound_ports: InboundPorts,
    /// The iptables program to run (default: `iptables-legacy` if on PATH, else `iptables`).
    #[arg(long, env = "PALISADE_IPTABLES")]
    pub iptables: Option<PathBuf>,
    /// IPv6 interception with the same rules: `auto` (when the kernel has IPv6, so no IPv6
    /// path escapes the mesh), `on` (fail if it cannot be installed), or `off`.
    #[arg(long, env = "PALISADE_IPV6", default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub ipv6: String,
    /// The ip6tables program (default: `ip6tables-legacy` if on PATH, else `ip6tables`).
    #[arg(long, env = "PALISADE_IP6TABLES")]
    pub ip6tables: Option<PathBuf>,
    /// Print the commands as shell lines and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// A comma-separated list of TCP ports; empty is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

/// Why a port list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortListError {
    /// An element is not a number in 1..=65535.
    #[error("{0:?} is not a TCP port (1-65535)")]
    BadPort(String),
}

impl FromStr for PortList {
    type Err = PortListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut ports = Vec::new();
        for item in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match item.parse::<u16>() {
                Ok(p) if p != 0 => {
                    if !ports.contains(&p) {
                        ports.push(p);
                    }
                }
                _ => return Err(PortListError::BadPort(item.to_string())),
            }
        }
        Ok(PortList(ports))
    }
}

/// Which inbound ports are intercepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    /// Every port (`*`), minus the excluded ones.
    All,
    /// Only these ports, minus the excluded ones; empty means no inbound interception.
    Only(PortList),
}

impl FromStr for InboundPorts {
    type Err = PortListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "*" { Ok(InboundPorts::All) } else { s.parse().map(InboundPorts::Only) }
    }
}

/// Why `palisade init` could not install the rules.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The iptables program could not be started.
    #[error("cannot run `{command}`: {source} (install the iptables package)")]
    Spawn {
        /// The command line that was attempted.
        command: String,
        /// Why it did not start.
        source: std::io::Error,
    },
    /// iptables ran and refused the command.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line that failed.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What iptables said.
        stderr: String,
    },
}

/// The iptables commands (argv without the program name, all in the `nat` table), in order.
pub fn rules(args: &InitArgs) -> Vec<Vec<String>> {
    rules_for(args, "127.0.0.1/32")
}

/// The same rules for ip6tables.
pub fn rules_v6(args: &InitArgs) -> Vec<Vec<String>> {
    rules_for(args, "::1/128")
}

fn rules_for(args: &InitArgs, loopback: &str) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut cmd = |parts: &[&str]| {
        let mut argv = vec!["-t".to_string(), "nat".to_string()];
        argv.extend(parts.iter().map(|p| p.to_string()));
        out.push(argv);
    };

    // Own chains: create (tolerating "already exists"), then flush what an earlier run left.
    for chain in [INBOUND_CHAIN, IN_REDIRECT_CHAIN, OUTPUT_CHAIN, REDIRECT_CHAIN] {
        cmd(&["-N", chain]);
        cmd(&["-F", chain]);
    }

    let inbound = args.inbound_port.to_string();
    let outbound = args.outbound_port.to_string();
    let uid = args.proxy_uid.to_string();
    cmd(&["-A", IN_REDIRECT_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound]);
    cmd(&["-A", REDIRECT_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", &outbound]);

    // Inbound.
    let excluded_in = &args.exclude_inbound_ports.0;
    let intercept_inbound = match &args.include_inbound_ports {
        InboundPorts::All => {
            for port in excluded_in {
                cmd(&["-A", INBOUND_CHAIN, "-p", "tcp", "--dport", &port.to_string(), "-j", "RETURN"]);
            }
            cmd(&["-A", INBOUND_CHAIN, "-p", "tcp", "-j", IN_REDIRECT_CHAIN]);
            true
        }
        InboundPorts::Only(PortList(ports)) => {
            for port in ports.iter().filter(|p| !excluded_in.contains(p)) {
                cmd(&["-A", INBOUND_CHAIN, "-p", "tcp", "--dport", &port.to_string(), "-j", IN_REDIRECT_CHAIN]);
            }
            !ports.is_empty()
        }
    };

    // Outbound. The UID exclusion comes first: without it the sidecar's own upstream
    // connections would be redirected back to itself.
    cmd(&["-A", OUTPUT_CHAIN, "-m", "owner", "--uid-owner", &uid, "-j", "RETURN"]);
    cmd(&["-A", OUTPUT_CHAIN, "-d", loopback, "-j", "RETURN"]);
    cmd(&["-A", OUTPUT_CHAIN, "-o", "lo", "-j", "RETURN"]);
    for port in &args.exclude_outbound_ports.0 {
        cmd(&["-A", OUTPUT_CHAIN, "-p", "tcp", "--dport", &port.to_string(), "-j", "RETURN"]);
    }
    cmd(&["-A", OUTPUT_CHAIN, "-p", "tcp", "-j", REDIRECT_CHAIN]);

    // Jumps from the built-in chains last, once our chains are complete: delete first (a miss is
    // expected on the first run), then append, so repeated runs keep exactly one.
    if intercept_inbound {
        cmd(&["-D", "PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]);
        cmd(&["-A", "PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]);
    } else {
        cmd(&["-D", "PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]);
    }
    cmd(&["-D", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]);
    cmd(&["-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]);
    out
}

/// Whether a failure of `argv` is the expected outcome of a repeated run rather than an error:
/// creating a chain that exists, or deleting a jump that is not there.
fn tolerated(argv: &[String], stderr: &str) -> bool {
    match argv.get(2).map(String::as_str) {
        Some("-N") => stderr.contains("already exists"),
        Some("-D") => {
            stderr.contains("does a matching rule exist") || stderr.contains("No chain/target/match by that name")
        }
        _ => false,
    }
}

/// `argv` as one shell line, quoting what a shell would split or expand.
pub fn shell_line(program: &str, argv: &[String]) -> String {
    std::iter::once(program).chain(argv.iter().map(String::as_str)).map(shell_quote).collect::<Vec<_>>().join(" ")
}

fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:,=@%+".contains(&b));
    if plain { word.to_string() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

/// The iptables program to run: `iptables-legacy` if it is on PATH, else `iptables`.
pub fn iptables_program() -> Option<PathBuf> {
    ["iptables-legacy", "iptables"].into_iter().find_map(which)
}

/// The ip6tables program to run: `ip6tables-legacy` if it is on PATH, else `ip6tables`.
pub fn ip6tables_program() -> Option<PathBuf> {
    ["ip6tables-legacy", "ip6tables"].into_iter().find_map(which)
}

/// Whether IPv6 rules are installed: `on`, `off`, or (`auto`) when this namespace has IPv6.
fn wants_ipv6(args: &InitArgs) -> bool {
    match args.ipv6.as_str() {
        "on" => true,
        "off" => false,
        _ => Path::new("/proc/net/if_inet6").exists(),
    }
}

fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Installs the rules (or, with `--dry-run`, prints them to stdout and changes nothing).
pub fn run(args: InitArgs) -> anyhow::Result<()> {
    if args.inbound_port == args.outbound_port {
        anyhow::bail!(
            "--inbound-port and --outbound-port are both {}: inbound and outbound traffic need \
             separate listeners",
            args.inbound_port
        );
    }
    let rules = rules(&args);
    let program = args.iptables.clone().or_else(iptables_program);
    let ipv6 = wants_ipv6(&args);
    let program6 = args.ip6tables.clone().or_else(ip6tables_program);
    if args.dry_run {
        let name = program.as_deref().and_then(Path::file_name).and_then(|n| n.to_str()).unwrap_or("iptables");
        print!("{}", dry_run_script(name, &rules));
        if ipv6 {
            let name6 = program6.as_deref().and_then(Path::file_name).and_then(|n| n.to_str()).unwrap_or("ip6tables");
            print!("{}", dry_run_script(name6, &rules_v6(&args)));
        }
        return Ok(());
    }
    let program = program.ok_or_else(|| {
        anyhow::anyhow!("neither iptables-legacy nor iptables is on PATH (install the iptables package)")
    })?;
    tracing::info!(
        iptables = %program.display(),
        proxy_uid = args.proxy_uid,
        inbound_port = args.inbound_port,
        outbound_port = args.outbound_port,
        "installing transparent-interception rules"
    );
    for argv in &rules {
        execute(&program, argv)?;
    }
    tracing::info!(commands = rules.len(), "iptables rules installed");
    if ipv6 {
        // An IPv6 path left open would carry the app's traffic around the proxy: failing here
        // keeps the pod from starting unmeshed.
        let program6 = program6.ok_or_else(|| {
            anyhow::anyhow!(
                "this namespace has IPv6 but neither ip6tables-legacy nor ip6tables is on PATH \
                 (install the iptables package, or pass --ipv6 off if IPv6 is unused)"
            )
        })?;
        let rules6 = rules_v6(&args);
        for argv in &rules6 {
            execute(&program6, argv)?;
        }
        tracing::info!(commands = rules6.len(), ip6tables = %program6.display(), "ip6tables rules installed");
    }
    Ok(())
}

/// The dry-run output: one shell line per command.
pub fn dry_run_script(program: &str, rules: &[Vec<String>]) -> String {
    rules.iter().map(|argv| shell_line(program, argv) + "\n").collect()
}

fn execute(program: &Path, argv: &[String]) -> Result<(), InitError> {
    let command = shell_line(&program.display().to_string(), argv);
    let out = Command::new(program)
        .args(argv)
        .output()
        .map_err(|source| InitError::Spawn { command: command.clone(), source })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.success() {
        tracing::debug!(%command, "ok");
        return Ok(());
    }
    if tolerated(argv, &stderr) {
        tracing::debug!(%command, %stderr, "expected on a repeated run");
        return Ok(());
    }
    Err(InitError::Failed { command, status: out.status, stderr })
}

impl fmt::Display for PortList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports: Vec<String> = self.0.iter().map(u16::to_string).collect();
        f.write_str(&ports.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn args(extra: &[&str]) -> InitArgs {
        let argv = ["init", "--proxy-uid", "1337"].iter().chain(extra);
        Cli::try_parse_from(argv).expect("valid flags").init
    }

    fn lines(args: &InitArgs) -> Vec<String> {
        rules(args).iter().map(|a| a.join(" ")).collect()
    }

    fn position(lines: &[String], needle: &str) -> usize {
        lines.iter().position(|l| l == needle).unwrap_or_else(|| panic!("no rule {needle:?} in {lines:#?}"))
    }

    #[test]
    fn defaults_match_the_design_ports() {
        let a = args(&[]);
        assert_eq!(a.inbound_port, 15006);
        assert_eq!(a.outbound_port, 15001);
        assert_eq!(a.exclude_inbound_ports, PortList(vec![15020]));
        assert_eq!(a.exclude_outbound_ports, PortList(vec![]));
        assert_eq!(a.include_inbound_ports, InboundPorts::All);
        assert!(!a.dry_run);
        let same = args(&["--inbound-port", "15001", "--dry-run"]);
        assert!(run(same).unwrap_err().to_string().contains("separate listeners"));
        assert!(Cli::try_parse_from(["init"]).is_err(), "--proxy-uid is required");
    }

    #[test]
    fn proxy_uid_and_loopback_escape_before_any_outbound_redirect() {
        let l = lines(&args(&[]));
        let uid = position(&l, "-t nat -A PALISADE_OUTPUT -m owner --uid-owner 1337 -j RETURN");
        let lo_addr = position(&l, "-t nat -A PALISADE_OUTPUT -d 127.0.0.1/32 -j RETURN");
        let lo_dev = position(&l, "-t nat -A PALISADE_OUTPUT -o lo -j RETURN");
        let redirect = position(&l, "-t nat -A PALISADE_OUTPUT -p tcp -j PALISADE_REDIRECT");
        assert!(uid < lo_addr && lo_addr < lo_dev && lo_dev < redirect, "{l:#?}");
        // No rule of the OUTPUT side redirects before the UID exclusion.
        let first_output_redirect = l
            .iter()
            .position(|r| r.contains("-A PALISADE_OUTPUT") && !r.ends_with("RETURN"))
            .expect("an outbound redirect");
        assert!(uid < first_output_redirect);
        position(&l, "-t nat -A PALISADE_REDIRECT -p tcp -j REDIRECT --to-ports 15001");
        position(&l, "-t nat -A PALISADE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006");
        assert!(
            position(&l, "-t nat -A OUTPUT -p tcp -j PALISADE_OUTPUT") > redirect,
            "the jump from OUTPUT goes in only once the chain is complete"
        );
    }

    #[test]
    fn excluded_ports_return_before_the_redirect() {
        let l = lines(&args(&[
            "--exclude-inbound-ports",
            "15020,22",
            "--exclude-outbound-ports",
            "3306, 6379",
            "--inbound-port",
            "16006",
            "--outbound-port",
            "16001",
        ]));
        let to_inbound = position(&l, "-t nat -A PALISADE_INBOUND -p tcp -j PALISADE_IN_REDIRECT");
        for port in ["15020", "22"] {
            let r = format!("-t nat -A PALISADE_INBOUND -p tcp --dport {port} -j RETURN");
            assert!(position(&l, &r) < to_inbound);
        }
        let to_outbound = position(&l, "-t nat -A PALISADE_OUTPUT -p tcp -j PALISADE_REDIRECT");
        for port in ["3306", "6379"] {
            let r = format!("-t nat -A PALISADE_OUTPUT -p tcp --dport {port} -j RETURN");
            assert!(position(&l, &r) < to_outbound);
        }
        position(&l, "-t nat -A PALISADE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006");
        position(&l, "-t nat -A PALISADE_REDIRECT -p tcp -j REDIRECT --to-ports 16001");
    }

    #[test]
    fn an_include_list_redirects_only_those_ports() {
        let l = lines(&args(&["--include-inbound-ports", "8080,9090,15020"]));
        position(&l, "-t nat -A PALISADE_INBOUND -p tcp --dport 8080 -j PALISADE_IN_REDIRECT");
        position(&l, "-t nat -A PALISADE_INBOUND -p tcp --dport 9090 -j PALISADE_IN_REDIRECT");
        assert!(!l.iter().any(|r| r.contains("--dport 15020")), "excluded wins");
        assert!(!l.iter().any(|r| r == "-t nat -A PALISADE_INBOUND -p tcp -j PALISADE_IN_REDIRECT"));

        let none = lines(&args(&["--include-inbound-ports", ""]));
        assert!(!none.iter().any(|r| r.contains("-A PREROUTING")), "{none:#?}");
        assert!(none.iter().any(|r| r.contains("-D PREROUTING")), "an earlier jump is removed");
    }

    #[test]
    fn own_chains_are_reset_and_jumps_replaced_so_reruns_do_not_duplicate() {
        let l = lines(&args(&[]));
        for chain in [INBOUND_CHAIN, IN_REDIRECT_CHAIN, OUTPUT_CHAIN, REDIRECT_CHAIN] {
            let new = position(&l, &format!("-t nat -N {chain}"));
            let flush = position(&l, &format!("-t nat -F {chain}"));
            let first_append =
                l.iter().position(|r| r.starts_with(&format!("-t nat -A {chain} "))).expect("rules in every own chain");
            assert!(new < flush && flush < first_append, "{chain}");
        }
        for (builtin, chain) in [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN)] {
            let del = position(&l, &format!("-t nat -D {builtin} -p tcp -j {chain}"));
            let add = position(&l, &format!("-t nat -A {builtin} -p tcp -j {chain}"));
            assert!(del + 1 == add, "{builtin}");
        }
    }

    #[test]
    fn only_rerun_failures_are_tolerated() {
        let new = vec!["-t".into(), "nat".into(), "-N".into(), "X".into()];
        let del = vec!["-t".into(), "nat".into(), "-D".into(), "OUTPUT".into()];
        let add = vec!["-t".into(), "nat".into(), "-A".into(), "OUTPUT".into()];
        assert!(tolerated(&new, "iptables: Chain already exists."));
        assert!(tolerated(&del, "iptables: Bad rule (does a matching rule exist in that chain?)."));
        assert!(!tolerated(&new, "iptables v1.8.9 (legacy): can't initialize iptables table `nat': Permission denied"));
        assert!(!tolerated(&add, "iptables: Chain already exists."));
    }

    #[test]
    fn a_refused_command_is_named_with_what_iptables_said() {
        let argv: Vec<String> =
            ["-c", "echo 'iptables: No chain/target/match by that name.' >&2; exit 1"].map(String::from).to_vec();
        match execute(Path::new("sh"), &argv) {
            Err(e @ InitError::Failed { .. }) => {
                let msg = e.to_string();
                assert!(msg.starts_with("`sh -c 'echo"), "{msg}");
                assert!(msg.ends_with("iptables: No chain/target/match by that name."), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        let missing = execute(Path::new("/nonexistent/iptables"), &argv).unwrap_err();
        assert!(matches!(missing, InitError::Spawn { .. }));
        assert!(missing.to_string().contains("install the iptables package"));
        execute(Path::new("true"), &argv).unwrap();
    }

    #[test]
    fn dry_run_prints_one_runnable_shell_line_per_command() {
        let a = args(&["--dry-run"]);
        let rules = rules(&a);
        let script = dry_run_script("iptables", &rules);
        let printed: Vec<&str> = script.lines().collect();
        assert_eq!(printed.len(), rules.len());
        assert!(printed.iter().all(|l| l.starts_with("iptables -t nat ")));
        assert!(printed.contains(&"iptables -t nat -N PALISADE_INBOUND"));
        assert!(printed.contains(&"iptables -t nat -A OUTPUT -p tcp -j PALISADE_OUTPUT"));
        assert!(printed.contains(&"iptables -t nat -A PALISADE_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
        assert!(script.ends_with('\n'));
        assert_eq!(shell_line("iptables", &["-m".into(), "it's".into(), String::new()]), r"iptables -m 'it'\''s' ''");
    }

    #[test]
    fn bad_port_lists_are_refused_with_the_culprit() {
        assert_eq!("80,http".parse::<PortList>(), Err(PortListError::BadPort("http".into())));
        assert!("0".parse::<PortList>().is_err());
        assert!("70000".parse::<PortList>().is_err());
        assert_eq!("".parse::<PortList>(), Ok(PortList(vec![])));
        assert_eq!("80, 80,443".parse::<PortList>(), Ok(PortList(vec![80, 443])));
        assert_eq!(PortList(vec![80, 443]).to_string(), "80,443");
        assert_eq!("*".parse::<InboundPorts>(), Ok(InboundPorts::All));
    }
}
