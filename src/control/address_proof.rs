//! Which addresses a workload may put into the endpoint table.
//!
//! Every sidecar pins an address of the table to the identity that registered it, so a
//! registration claims that traffic for that address may go to that workload. A claim is
//! accepted only with a proof the claimant cannot make up:
//!
//! - standalone: an operator bound the address to the workload's join token
//!   (`palisade control token create --address`; the binding outlives the token, for every
//!   renewal of that identity), or it is the source address of the claimant's own connection to
//!   the control plane. A loopback address is shared by every workload on the machine, so a
//!   loopback claim names one port (`127.0.0.1:PORT`, never `:0`, every port) and is proven by
//!   asking that port who serves it: an mTLS handshake that must present the claimant's
//!   certificate.
//! - Kubernetes: only the pod IPs the API server lists for pods running as that identity. What a
//!   sidecar says about itself proves nothing there.
//!
//! An unproven claim is dropped, logged, and kept with its reason in the sidecar's entry
//! (`palisade status`), never pinned.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::identity::SpiffeId;
use crate::tls::{CertStore, TrustSource};

use super::store::Store;

/// Most addresses one registration may claim; the rest are refused.
pub const MAX_CLAIMS: usize = 16;

/// How long a loopback claim may take to be proven: the sidecar registers while its inbound
/// listener is still being bound.
const LOOPBACK_PROOF_DEADLINE: Duration = Duration::from_secs(5);

/// An address an operator bound to a join token: a whole IP (`10.0.0.7`, any port, the pod-IP
/// form of transparent mode) or one socket (`127.0.0.1:15006`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressBinding {
    Ip(IpAddr),
    Socket(SocketAddr),
}

impl FromStr for AddressBinding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let binding = if let Ok(ip) = s.parse::<IpAddr>() {
            AddressBinding::Ip(ip.to_canonical())
        } else if let Ok(sa) = s.parse::<SocketAddr>() {
            AddressBinding::Socket(SocketAddr::new(sa.ip().to_canonical(), sa.port()))
        } else {
            return Err(format!("{s:?} is neither an IP nor IP:PORT"));
        };
        let ip = match binding {
            AddressBinding::Ip(ip) => ip,
            AddressBinding::Socket(sa) => sa.ip(),
        };
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(format!("{s:?} is not the address of one workload"));
        }
        Ok(binding)
    }
}

impl std::fmt::Display for AddressBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddressBinding::Ip(ip) => ip.fmt(f),
            AddressBinding::Socket(sa) => sa.fmt(f),
        }
    }
}

impl AddressBinding {
    /// Whether this binding proves `claim`. A claim of every port (`IP:0`) needs the whole IP.
    pub fn covers(&self, claim: SocketAddr) -> bool {
        match self {
            AddressBinding::Ip(ip) => *ip == claim.ip(),
            AddressBinding::Socket(sa) => *sa == claim && claim.port() != 0,
        }
    }
}

/// A claimed address left out of the endpoint table, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefusedAddress {
    pub address: String,
    pub reason: String,
}

/// What a registration may put into the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Proven claims, canonical `IP:PORT`.
    pub accepted: Vec<String>,
    pub refused: Vec<RefusedAddress>,
}

/// Proves the addresses workloads claim (see the module doc).
pub struct AddressProver {
    pub store: Arc<Store>,
    /// Kubernetes mode: the API server's pod IPs are the only proof.
    pub kubernetes: bool,
    /// The control plane's own certificate and the mesh roots, for the loopback handshake.
    pub serving: Arc<CertStore>,
    pub trust: Arc<dyn TrustSource>,
}

impl AddressProver {
    /// Judges every claim of `id`, which connected from `remote`. `cluster` answers, on
    /// Kubernetes, whether the API server lists a pod of `id` at an IP; `held_by_other`
    /// whether another identity's registration already holds an IP.
    pub async fn judge(
        &self,
        id: &SpiffeId,
        claims: &[String],
        remote: Option<SocketAddr>,
        cluster: impl Fn(IpAddr) -> bool,
        held_by_other: impl Fn(IpAddr) -> bool,
    ) -> Verdict {
        let mut verdict = Verdict::default();
        let bound = if self.kubernetes || claims.is_empty() {
            Vec::new()
        } else {
            let (store, who) = (self.store.clone(), id.to_string());
            match tokio::task::spawn_blocking(move || store.bound_addresses(&who)).await {
                Ok(Ok(rows)) => rows.iter().filter_map(|r| r.parse::<AddressBinding>().ok()).collect(),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the addresses bound to join tokens");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            }
        };
        let remote_ip = remote.map(|r| r.ip().to_canonical());
        for (i, raw) in claims.iter().enumerate() {
            let judged = if i >= MAX_CLAIMS {
                Err(format!("more than {MAX_CLAIMS} addresses in one registration"))
            } else {
                self.judge_one(id, raw, remote_ip, &bound, &cluster, &held_by_other).await
            };
            match judged {
                Ok(address) => {
                    if !verdict.accepted.contains(&address) {
                        verdict.accepted.push(address);
                    }
                }
                Err(reason) => {
                    tracing::warn!(spiffe_id = %id, address = %raw, ?remote, %reason, "claimed address refused");
                    verdict.refused.push(RefusedAddress { address: raw.clone(), reason });
                }
            }
        }
        verdict
    }

    async fn judge_one(
        &self,
        id: &SpiffeId,
        raw: &str,
        remote_ip: Option<IpAddr>,
        bound: &[AddressBinding],
        cluster: &impl Fn(IpAddr) -> bool,
        held_by_other: &impl Fn(IpAddr) -> bool,
    ) -> Result<String, String> {
        let claim = raw.parse::<SocketAddr>().map_err(|_| "not IP:PORT".to_string())?;
        let claim = SocketAddr::new(claim.ip().to_canonical(), claim.port());
        let ip = claim.ip();
        if ip.is_unspecified() || ip.is_multicast() {
            return Err("not the address of one workload".into());
        }
        if self.kubernetes {
            return if cluster(ip) {
                Ok(claim.to_string())
            } else {
                Err("on Kubernetes only the pod IPs the API server lists for this identity are accepted".into())
            };
        }
        if bound.iter().any(|b| b.covers(claim)) {
            return Ok(claim.to_string());
        }
        if ip.is_loopback() {
            if claim.port() == 0 {
                return Err("a loopback address is shared by every workload on the machine: claim one port".into());
            }
            if remote_ip.is_none_or(|r| !r.is_loopback()) {
                return Err("a loopback address claimed over a connection from another machine".into());
            }
            return self.answers_as(claim, id).await.map(|()| claim.to_string());
        }
        if remote_ip == Some(ip) {
            // Several workloads behind one address (a NAT, a node's SNAT) all connect from it:
            // then the source proves nothing, and the first to register must not take it.
            if held_by_other(ip) {
                return Err(format!(
                    "{ip} is the source of another identity's connection too (a shared or translated \
                     address proves nothing): bind it with `token create --address`"
                ));
            }
            return Ok(claim.to_string());
        }
        Err(format!(
            "neither bound to this identity's join token nor the source of its connection ({})",
            remote_ip.map_or("unknown".into(), |r| r.to_string())
        ))
    }

    /// Proves that `addr` is served by `id`: an mTLS handshake there must present `id`'s
    /// certificate. A refused connection is retried until the deadline (the listener may not be
    /// bound yet); a handshake that proves another identity refuses at once.
    async fn answers_as(&self, addr: SocketAddr, id: &SpiffeId) -> Result<(), String> {
        let config = crate::tls::config::client_config(
            self.serving.clone(),
            self.trust.clone(),
            Some(id.clone()),
            &[crate::tls::config::ALPN_HTTP1],
        );
        let connector = tokio_rustls::TlsConnector::from(config);
        let deadline = tokio::time::Instant::now() + LOOPBACK_PROOF_DEADLINE;
        loop {
            let attempt = async {
                let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| (true, e.to_string()))?;
                connector.connect(crate::tls::config::sni(), tcp).await.map_err(|e| (false, e.to_string()))
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(_tls)) => return Ok(()),
                Ok(Err((false, e))) => {
                    return Err(format!("{addr} does not answer with this identity's certificate: {e}"));
                }
                Ok(Err((true, e))) if tokio::time::Instant::now() + Duration::from_millis(50) < deadline => {
                    tracing::debug!(%addr, error = %e, "loopback claim not provable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Err((true, e))) => return Err(format!("{addr} does not answer: {e}")),
                Err(_) => return Err(format!("{addr} did not answer within {LOOPBACK_PROOF_DEADLINE:?}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_covers_its_ip_or_its_one_socket() {
        let ip: AddressBinding = "10.0.0.7".parse().unwrap();
        assert!(ip.covers("10.0.0.7:0".parse().unwrap()));
        assert!(ip.covers("10.0.0.7:8080".parse().unwrap()));
        assert!(!ip.covers("10.0.0.8:0".parse().unwrap()));
        let sock: AddressBinding = "127.0.0.1:15006".parse().unwrap();
        assert!(sock.covers("127.0.0.1:15006".parse().unwrap()));
        assert!(!sock.covers("127.0.0.1:0".parse().unwrap()), "one port never proves every port");
        assert!(!sock.covers("127.0.0.1:15007".parse().unwrap()));
        let mapped: AddressBinding = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(mapped.to_string(), "10.0.0.7", "IPv4-mapped addresses are canonicalised");
        assert!("0.0.0.0".parse::<AddressBinding>().is_err());
        assert!("224.0.0.1".parse::<AddressBinding>().is_err());
        assert!("pod-a".parse::<AddressBinding>().is_err());
    }
}
