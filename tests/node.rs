//! A real Kubernetes node on this machine, and the mesh deployed on it the way users deploy it.
//!
//! etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy and the kubelet
//! (built from the Go module proxy by `.ci/install-k8s`) run as processes; containerd, runc and
//! the CNI bridge plugin are Debian's (`.ci/install-node-tools`). Nothing is pulled: the Palisade
//! image is assembled by `deploy/image/build` from the binaries under test, the application and
//! pause images from `examples/node_app.rs`, and all three are imported into containerd. The
//! chart is installed with `helm install`; the control plane runs as the pod it deploys; the
//! application pods get their sidecars from its webhook and their identities from their
//! projected service-account tokens.
//!
//! The node lives on its own link (`palnode0`, 172.30.255.1) and a bridge (`palbr0`,
//! pods in 10.245.0.0/24, Services in 10.97.0.0/16). Pods have no cluster DNS, so they reach
//! Services by address (the chart's `service.clusterIP` and `injector.controlAddress`).
//! Needs root (as CI runs); the test fails, saying so, without it. Everything it changes on the
//! host (links, kube-proxy's and the bridge's iptables rules, the sysctls the kubelet and the
//! bridge set, mounts) is put back when it ends, however it ends.

mod common;
mod tools;

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::repo;
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "palisade-node-test-admin";
const NODE_NAME: &str = "palisade-node";
const NODE_LINK: &str = "palnode0";
const NODE_IP: &str = "172.30.255.1";
const BRIDGE: &str = "palbr0";
const POD_CIDR: &str = "10.245.0.0/24";
const SERVICE_CIDR: &str = "10.97.0.0/16";
const API_SERVICE_IP: &str = "10.97.0.1";
const CONTROL_SERVICE_IP: &str = "10.97.0.20";
const TAG: &str = "node-test";
const APP_IMAGE: &str = "palisade.test/node-app:1";
const PAUSE_IMAGE: &str = "palisade.test/pause:1";
/// Host settings the kubelet, kube-proxy or the bridge plugin may change; restored at the end.
const SYSCTLS: &[&str] = &[
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
];

fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    let program = program.as_ref();
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
fn must(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
    let program = program.as_ref().to_owned();
    let out = run(&program, args);
    assert!(
        out.status.success(),
        "{program:?} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_root() -> bool {
    run("id", &["-u"]).stdout.starts_with(b"0\n")
}

/// The node and its control plane: every process, and what to put back on the host.
struct Node {
    dir: PathBuf,
    bin: PathBuf,
    kubeconfig: PathBuf,
    containerd_sock: PathBuf,
    children: Vec<(&'static str, Child)>,
    tied: Vec<ChildStdin>,
    sysctls: Vec<(PathBuf, String)>,
}

impl Node {
    fn start() -> Node {
        assert!(is_root(), "tests/node.rs runs a kubelet, containerd and kube-proxy: run it as root (CI does)");
        let bin = tools::k8s_bin_dir().to_path_buf();
        tools::node_tools();
        tools::netns_tools();
        let dir = common::tempdir("node");
        let sysctls = SYSCTLS
            .iter()
            .map(|name| Path::new("/proc/sys").join(name))
            .filter_map(|p| std::fs::read_to_string(&p).ok().map(|v| (p, v.trim().to_string())))
            .collect();
        let mut node = Node {
            kubeconfig: dir.join("admin.kubeconfig"),
            containerd_sock: dir.join("containerd.sock"),
            dir,
            bin,
            children: Vec::new(),
            tied: Vec::new(),
            sysctls,
        };
        // A leftover of a run that was killed before it could clean up.
        let _ = run("ip", &["link", "del", NODE_LINK]);
        let _ = run("ip", &["link", "del", BRIDGE]);
        // A veth pair rather than a dummy link: this kernel has no dummy driver.
        must("ip", &["link", "add", NODE_LINK, "type", "veth", "peer", "name", &format!("{NODE_LINK}p")]);
        must("ip", &["link", "set", &format!("{NODE_LINK}p"), "up"]);
        must("ip", &["addr", "add", &format!("{NODE_IP}/32"), "dev", NODE_LINK]);
        must("ip", &["link", "set", NODE_LINK, "up"]);

        let api_port = node.start_api_server();
        node.start_containerd();
        node.import_images();
        node.start_node_components(api_port);
        node
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn spawn(&mut self, name: &'static str, program: &Path, args: &[String]) {
        let (child, stdin) = tools::spawn_tied(program, args, &self.path(&format!("{name}.log")));
        self.children.push((name, child));
        self.tied.push(stdin);
    }

    /// Panics with the named component's log when it has exited.
    fn check_alive(&mut self) {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.err"))).unwrap_or_default();
                let tail: String =
                    log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                panic!("{name} exited ({status}):\n{tail}");
            }
        }
    }

    /// CA, serving certificate and service-account key; etcd and the API server.
    fn start_api_server(&mut self) -> u16 {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "palisade node-test CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let serving_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut names: Vec<String> =
            ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]
                .map(String::from)
                .to_vec();
        names.extend([API_SERVICE_IP, NODE_IP, "127.0.0.1"].map(String::from));
        let serving = rcgen::CertificateParams::new(names).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let serving = serving.signed_by(&serving_key, &issuer).unwrap();
        std::fs::write(self.path("ca.crt"), ca.pem()).unwrap();
        std::fs::write(self.path("apiserver.crt"), serving.pem()).unwrap();
        std::fs::write(self.path("apiserver.key"), serving_key.serialize_pem()).unwrap();
        let sa = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(self.path("sa.key"), sa.serialize_pem()).unwrap();
        std::fs::write(self.path("sa.pub"), sa.public_key_pem()).unwrap();
        std::fs::write(self.path("tokens.csv"), format!("{ADMIN_TOKEN},admin,admin-uid,system:masters\n")).unwrap();

        let port = |_: u8| common::free_addr().port();
        let (etcd_client, etcd_peer, api_port) = (port(0), port(1), port(2));
        let dir = self.dir.clone();
        let p = |name: &str| dir.join(name).display().to_string();
        self.spawn(
            "etcd",
            &self.bin.join("etcd"),
            &[
                format!("--data-dir={}", p("etcd")),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        );
        self.spawn(
            "kube-apiserver",
            &self.bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
                "--bind-address=0.0.0.0".into(),
                format!("--advertise-address={NODE_IP}"),
                format!("--secure-port={api_port}"),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                format!("--token-auth-file={}", p("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--enable-priority-and-fairness=false".into(),
                "--v=1".into(),
            ],
        );
        let kubeconfig = json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "node",
            "clusters": [{"name": "node", "cluster": {
                "server": format!("https://{NODE_IP}:{api_port}"),
                "certificate-authority": p("ca.crt"),
            }}],
            "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
            "contexts": [{"name": "node", "context": {"cluster": "node", "user": "admin"}}],
        });
        std::fs::write(&self.kubeconfig, serde_json::to_string_pretty(&kubeconfig).unwrap()).unwrap();
        self.wait("the API server to be ready", Duration::from_secs(90), |n| {
            n.kubectl_output(&["get", "--raw", "/readyz"]).status.success()
        });
        api_port
    }

    fn start_containerd(&mut self) {
        let d = self.dir.display().to_string();
        let config = format!(
            r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # The VM's bounding set lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
"#
        );
        std::fs::write(self.path("containerd.toml"), config).unwrap();
        std::fs::create_dir_all(self.path("net.d")).unwrap();
        // The node's CNI binary directory: Debian's plugins, and room for the DaemonSet to put
        // `palisade-cni` next to them.
        std::fs::create_dir_all(self.path("cni-bin")).unwrap();
        for plugin in std::fs::read_dir("/usr/lib/cni").expect("/usr/lib/cni (containernetworking-plugins)") {
            let plugin = plugin.unwrap().path();
            std::os::unix::fs::symlink(&plugin, self.path("cni-bin").join(plugin.file_name().unwrap())).unwrap();
        }
        let cni = json!({
            "cniVersion": "0.4.0", "name": "palisade-node-test",
            "plugins": [{
                "type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": true, "hairpinMode": true,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}],
                         "dataDir": format!("{d}/cni-ipam")},
            }],
        });
        std::fs::write(self.path("net.d/10-bridge.conflist"), serde_json::to_string_pretty(&cni).unwrap()).unwrap();
        let containerd = which("containerd");
        self.spawn("containerd", &containerd, &["--config".into(), format!("{d}/containerd.toml")]);
        self.wait("containerd to answer", Duration::from_secs(30), |n| n.ctr(&["version"]).status.success());
    }

    fn ctr(&self, args: &[&str]) -> Output {
        let sock = self.containerd_sock.display().to_string();
        let mut all = vec!["--address", &sock, "--namespace", "k8s.io"];
        all.extend(args);
        run("ctr", &all)
    }

    /// The Palisade image from the binaries under test, and the app and pause images.
    fn import_images(&mut self) {
        let bin_dir = Path::new(common::BIN).parent().unwrap();
        let palisade = self.path("palisade.oci.tar");
        let built = must(
            repo("deploy/image/build"),
            &[
                "--bin-dir",
                &bin_dir.display().to_string(),
                "--out",
                &palisade.display().to_string(),
                "--ref",
                &format!("ghcr.io/palisade-mesh/palisade:{TAG}"),
            ],
        );
        eprintln!("palisade image (debug binaries): {}", built.trim());
        let app = node_app();
        for (image, entrypoint, user) in [
            (APP_IMAGE, vec!["/usr/local/bin/node_app"], "65534:65534"),
            (PAUSE_IMAGE, vec!["/usr/local/bin/node_app", "pause"], "65535:65535"),
        ] {
            let rootfs = self.path(&format!("rootfs-{}", image.replace(['/', ':'], "_")));
            std::fs::create_dir_all(&rootfs).unwrap();
            must(
                repo("deploy/image/add-binary"),
                &[&rootfs.display().to_string(), "/usr/local/bin/node_app", &app.display().to_string()],
            );
            let out = self.path(&format!("{}.oci.tar", image.replace(['/', ':'], "_")));
            let mut args =
                vec![rootfs.display().to_string(), out.display().to_string(), image.to_string(), user.to_string()];
            args.extend(entrypoint.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            must(repo("deploy/image/oci-archive"), &args);
            self.import(&out);
        }
        self.import(&palisade);
        let listed = String::from_utf8_lossy(&self.ctr(&["images", "list", "-q"]).stdout).into_owned();
        for image in [APP_IMAGE, PAUSE_IMAGE, &format!("ghcr.io/palisade-mesh/palisade:{TAG}")] {
            assert!(listed.lines().any(|l| l == image), "{image} not in containerd after import:\n{listed}");
        }
    }

    fn import(&self, archive: &Path) {
        let out = self.ctr(&["images", "import", &archive.display().to_string()]);
        assert!(
            out.status.success(),
            "ctr images import {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start_node_components(&mut self, _api_port: u16) {
        let d = self.dir.display().to_string();
        let kubeconfig = self.kubeconfig.display().to_string();
        let free = || common::free_addr().port();
        let (kubelet_port, kubelet_healthz, proxy_healthz, proxy_metrics, scheduler_port, cm_port) =
            (free(), free(), free(), free(), free(), free());
        self.spawn(
            "kube-controller-manager",
            &self.bin.join("kube-controller-manager"),
            &[
                format!("--kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                format!("--root-ca-file={d}/ca.crt"),
                format!("--service-account-private-key-file={d}/sa.key"),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={cm_port}"),
                "--controllers=*,-nodeipam,-cloud-node-lifecycle".into(),
                "--v=1".into(),
            ],
        );
        self.spawn(
            "kube-scheduler",
            &self.bin.join("kube-scheduler"),
            &[
                format!("--kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={scheduler_port}"),
                "--v=1".into(),
            ],
        );
        self.spawn(
            "kube-proxy",
            &self.bin.join("kube-proxy"),
            &[
                format!("--kubeconfig={kubeconfig}"),
                format!("--hostname-override={NODE_NAME}"),
                "--proxy-mode=iptables".into(),
                format!("--cluster-cidr={POD_CIDR}"),
                "--conntrack-max-per-core=0".into(),
                "--conntrack-tcp-timeout-established=0".into(),
                "--conntrack-tcp-timeout-close-wait=0".into(),
                "--iptables-localhost-nodeports=false".into(),
                format!("--healthz-bind-address=127.0.0.1:{proxy_healthz}"),
                format!("--metrics-bind-address=127.0.0.1:{proxy_metrics}"),
                "--v=1".into(),
            ],
        );
        let kubelet_config = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": kubelet_healthz,
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": false,
            "failSwapOn": false,
            "containerRuntimeEndpoint": format!("unix://{d}/containerd.sock"),
            "authentication": {"anonymous": {"enabled": true}, "webhook": {"enabled": false}},
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDomain": "cluster.local",
            "clusterDNS": ["10.97.0.10"],
            "resolvConf": format!("{d}/resolv.conf"),
            "podLogsDir": format!("{d}/pod-logs"),
            // The node shares its disk with CI's build directories, which can leave it nearly full
            // (a run was evicted at 600 MB free); this test is about the mesh, not the kubelet's
            // disk accounting, so disk eviction is off ("0%" disables a threshold) and memory's stays.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "0%", "imagefs.available": "0%", "nodefs.inodesFree": "0%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "protectKernelDefaults": false,
            "serializeImagePulls": false,
            "syncFrequency": "10s",
        });
        std::fs::write(self.path("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        std::fs::write(self.path("kubelet.yaml"), serde_json::to_string_pretty(&kubelet_config).unwrap()).unwrap();
        self.spawn(
            "kubelet",
            &self.bin.join("kubelet"),
            &[
                format!("--config={d}/kubelet.yaml"),
                format!("--kubeconfig={kubeconfig}"),
                format!("--root-dir={d}/kubelet"),
                format!("--cert-dir={d}/kubelet-pki"),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={NODE_IP}"),
                "--oom-score-adj=0".into(),
                "--v=1".into(),
            ],
        );
        // Ready, and the node lifecycle controller has lifted the taint the kubelet registers with.
        self.wait("the node to be Ready and untainted", Duration::from_secs(120), |n| {
            let out = n.kubectl_output(&["get", "node", NODE_NAME, "-o", "json"]);
            let node: Value = serde_json::from_slice(&out.stdout).unwrap_or_default(); // not registered yet
            let ready = node["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
            ready && node["spec"]["taints"].as_array().is_none_or(|t| t.is_empty())
        });
    }

    /// `helm VERB palisade <chart> ARGS…` against this node, in `palisade-system`.
    fn helm(&self, verb: &str, args: &[&str]) {
        let chart = repo("deploy/helm/palisade").display().to_string();
        let kubeconfig = self.kubeconfig.display().to_string();
        let mut all = vec![verb, "palisade", &chart, "--kubeconfig", &kubeconfig, "--namespace", "palisade-system"];
        all.extend(args);
        must(tools::helm(), &all);
    }

    fn kubectl_output(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("kubectl")).arg("--kubeconfig").arg(&self.kubeconfig).args(args).output().unwrap()
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.diagnose()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn apply(&self, yaml: &str) -> (bool, String) {
        let mut child = Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), yaml.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    fn get_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all)).unwrap()
    }

    /// Polls `ready` (every 100 ms) until it holds; panics with the node's state after `timeout`.
    fn wait(&mut self, what: &str, timeout: Duration, mut ready: impl FnMut(&mut Node) -> bool) {
        self.wait_for(what, timeout, |n| if ready(n) { Ok(()) } else { Err("not yet".to_string()) })
    }

    /// Polls `attempt` (every 100 ms) until it gives a value; panics with its last error and the
    /// node's state after `timeout`.
    fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut attempt: impl FnMut(&mut Node) -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match attempt(self) {
                Ok(value) => return value,
                Err(e) => e,
            };
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; the last attempt: {last}\n{}",
                self.diagnose()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What a person debugging a failure looks at first: pods, events, the tails of the logs.
    fn diagnose(&self) -> String {
        let mut out = String::new();
        for args in [&["get", "pods", "-A", "-o", "wide"][..], &["get", "events", "-A", "--sort-by=.lastTimestamp"][..]]
        {
            let o = self.kubectl_output(args);
            out += &format!(
                "--- kubectl {}\n{}{}\n",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let mut logs: Vec<PathBuf> = walk(&self.path("pod-logs"));
        logs.extend(
            ["kubelet.err", "containerd.err", "kube-proxy.err", "kube-controller-manager.err"].map(|f| self.path(f)),
        );
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            out += &format!("--- {}\n{}\n", log.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        out
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Pods first, through the kubelet, so their sandboxes, network namespaces and mounts go
        // the way they came.
        let _ = self.kubectl_output(&[
            "delete",
            "namespace",
            "shop",
            "vault",
            "palisade-system",
            "--wait=true",
            "--timeout=60s",
        ]);
        let tasks = String::from_utf8_lossy(&self.ctr(&["tasks", "list", "-q"]).stdout).into_owned();
        for task in tasks.lines().filter(|t| !t.is_empty()) {
            let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", task]);
        }
        let _ = run(self.bin.join("kube-proxy"), &["--cleanup"]);
        remove_kube_chains();
        self.tied.clear(); // closes the pipes: every component is killed
        for (_, child) in &mut self.children {
            let _ = child.wait();
        }
        let _ = run("ip", &["link", "del", NODE_LINK]);
        let _ = run("ip", &["link", "del", BRIDGE]);
        for (path, value) in &self.sysctls {
            let _ = std::fs::write(path, value);
        }
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let dir = self.dir.display().to_string();
        let mut ours: Vec<&str> =
            mounts.lines().filter_map(|l| l.split(' ').nth(1)).filter(|m| m.starts_with(&dir)).collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = run("umount", &["-l", m]);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("node state kept for a post-mortem in {}", self.dir.display());
        }
    }
}

/// What the kubelet and kube-proxy leave in the host's netfilter tables after `--cleanup`
/// (`KUBE-FIREWALL`, `KUBE-FORWARD`, canaries, in both the nft and the legacy backends): each
/// table is saved, every `KUBE-*` chain and every rule naming one is dropped, and the rest is
/// restored in one transaction.
fn remove_kube_chains() {
    for program in ["iptables", "ip6tables", "iptables-legacy", "ip6tables-legacy"] {
        let saved = run(format!("{program}-save"), &[]);
        let saved = String::from_utf8_lossy(&saved.stdout);
        if !saved.contains("KUBE-") {
            continue;
        }
        let kept: String = saved.lines().filter(|l| !l.contains("KUBE-")).map(|l| format!("{l}\n")).collect();
        let mut restore = Command::new(format!("{program}-restore")).stdin(Stdio::piped()).spawn().unwrap();
        std::io::Write::write_all(&mut restore.stdin.take().unwrap(), kept.as_bytes()).unwrap();
        let _ = restore.wait();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out.sort();
    out
}

fn which(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed (.ci/install-node-tools installs it)"))
}

/// `examples/node_app.rs`, as `cargo test` builds it next to the test binaries.
fn node_app() -> PathBuf {
    let examples = Path::new(common::BIN).parent().unwrap().join("examples");
    let app = examples.join("node_app");
    if !app.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--example", "node_app"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "cargo build --example node_app failed");
    }
    app
}

/// One plain HTTP GET from the app container of `namespace`'s client pod: (status line, body),
/// or why none.
fn call_in(node: &Node, namespace: &str, url: &str) -> Result<(String, String), String> {
    let out = node.kubectl_output(&[
        "exec",
        "-n",
        namespace,
        "client",
        "-c",
        "app",
        "--",
        "/usr/local/bin/node_app",
        "get",
        url,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("{}{}", stdout, String::from_utf8_lossy(&out.stderr)));
    }
    let (status, body) = stdout.split_once("\n\n").unwrap_or((&stdout, ""));
    Ok((status.to_string(), body.to_string()))
}

fn apps_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: shop}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: server, namespace: shop}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: server, namespace: shop}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: server}}}}
  template:
    metadata: {{labels: {{app: server}}}}
    spec:
      serviceAccountName: server
      terminationGracePeriodSeconds: 1
      containers:
        - name: app
          image: {APP_IMAGE}
          imagePullPolicy: Never
          args: [serve, "8080"]
          ports: [{{containerPort: 8080}}]
          readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: shop}}
spec:
  selector: {{app: server}}
  ports: [{{port: 80, targetPort: 8080}}]
---
# Zero trust: with no ALLOW policy the mesh refuses every call.
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: client-may-call, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [spiffe://cluster.local/ns/shop/sa/client]}}}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: shop, labels: {{app: client}}}}
spec:
  serviceAccountName: client
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: {APP_IMAGE}
      imagePullPolicy: Never
      args: [pause]
"#
    )
}

fn pods_ready(node: &Node, ns: &str, selector: &str) -> Vec<String> {
    let pods = node.get_json(&["get", "pods", "-n", ns, "-l", selector]);
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| {
            p["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        })
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_chart_runs_on_a_real_node_and_injected_pods_talk_over_mtls_under_policy() {
    let mut node = Node::start();

    // The chart, as a user installs it: the control plane runs as the pod it deploys.
    node.helm(
        "install",
        &[
            "--create-namespace",
            "--set",
            &format!("image.tag={TAG}"),
            "--set",
            "replicas=1",
            "--set",
            &format!("service.clusterIP={CONTROL_SERVICE_IP}"),
            "--set",
            &format!("injector.controlAddress={CONTROL_SERVICE_IP}:15010"),
        ],
    );
    node.wait("the control plane's pod to be Ready", Duration::from_secs(180), |n| {
        !pods_ready(n, "palisade-system", "app.kubernetes.io/name=palisade-control").is_empty()
    });
    let control =
        node.get_json(&["get", "pods", "-n", "palisade-system", "-l", "app.kubernetes.io/name=palisade-control"]);
    let control = &control["items"][0];
    assert_eq!(control["spec"]["containers"][0]["image"], format!("ghcr.io/palisade-mesh/palisade:{TAG}"));
    assert_eq!(control["spec"]["securityContext"]["runAsUser"], 65532, "the control plane runs as non-root");

    // The applications, in a namespace that asks for the mesh.
    mesh_flow(&mut node, "shop", "palisade.io/inject: enabled", &apps_yaml(), "palisade-init");

    cni_mode(&mut node);
}

/// What the issue asks of a meshed namespace, the same in both modes: the namespace (with
/// `labels`) and the apps are admitted, both pods become Ready with the chart's image injected
/// (`first_init` first, then the sidecar), the client's plain call to the server's ClusterIP
/// arrives over mTLS naming both service accounts, a replaced server pod costs only the calls
/// made while it was gone, and a DENY applied with kubectl refuses the next call within 2 s.
fn mesh_flow(node: &mut Node, ns: &str, labels: &str, apps: &str, first_init: &str) {
    let (ok, out) =
        node.apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{{labels}}}}}\n"));
    assert!(ok, "{out}");
    // The webhook's caBundle is written by the control plane once it runs; until then the API
    // server refuses label opt-ins (failurePolicy: Fail), which is the point.
    node.wait(&format!("the {ns} app objects to be admitted"), Duration::from_secs(60), |n| n.apply(apps).0);
    node.wait(&format!("the {ns} client and server pods to be Ready"), Duration::from_secs(180), |n| {
        !pods_ready(n, ns, "app=server").is_empty() && !pods_ready(n, ns, "app=client").is_empty()
    });
    let client = node.get_json(&["get", "pod", "client", "-n", ns]);
    let init = client["spec"]["initContainers"].as_array().unwrap();
    let names: Vec<&str> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, [first_init, "palisade-proxy"], "injected by the webhook");
    for c in init {
        assert_eq!(
            c["image"],
            format!("ghcr.io/palisade-mesh/palisade:{TAG}"),
            "the chart's image reached the injector"
        );
    }

    let cluster_ip = node.kubectl(&["get", "svc", "server", "-n", ns, "-o", "jsonpath={.spec.clusterIP}"]);
    let url = format!("http://{cluster_ip}/hello");
    let body =
        node.wait_for(&format!("a first call in {ns}"), Duration::from_secs(30), |n| match call_in(n, ns, &url) {
            Ok((status, body)) if status.contains(" 200 ") => Ok(body),
            other => Err(format!("{other:?}")),
        });
    let xfcc = body.lines().find_map(|l| l.strip_prefix("x-forwarded-client-cert: ")).unwrap_or_else(|| {
        panic!("the server saw no x-forwarded-client-cert, so the call did not come over mTLS:\n{body}")
    });
    assert_eq!(
        xfcc,
        format!("By=spiffe://cluster.local/ns/{ns}/sa/server;URI=spiffe://cluster.local/ns/{ns}/sa/client"),
        "the server's sidecar verified the client's certificate, issued for its service account"
    );

    // The server pod goes and its Deployment brings it back: calls fail only while it is gone.
    server_pod_replaced(node, ns, &url);

    // Policy from kubectl reaches the server's sidecar: the next call is refused.
    let deny = format!(
        "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: no-client, namespace: {ns}}}\n\
         spec: {{selector: {{matchLabels: {{app: server}}}}, action: DENY,\n\
         rules: [{{from: [{{source: {{principals: [spiffe://cluster.local/ns/{ns}/sa/client]}}}}]}}]}}\n"
    );
    let applied = Instant::now();
    let (ok, out) = node.apply(&deny);
    assert!(ok, "{out}");
    node.wait_for(&format!("the DENY policy to refuse the {ns} client"), Duration::from_secs(2), |n| {
        match call_in(n, ns, &url) {
            Ok((status, _)) if status.contains(" 403 ") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let took = applied.elapsed();
    assert!(took < Duration::from_secs(2), "{ns}: the DENY took {took:?}");
    eprintln!("{ns}: a DENY policy applied with kubectl refused the next call after {took:?}");
}

/// Deletes the server pod of `namespace`; its Deployment brings it back. Calls may fail only
/// while it is gone: once the new pod answers, five calls in a row succeed.
fn server_pod_replaced(node: &mut Node, namespace: &str, url: &str) {
    let old = pods_ready(node, namespace, "app=server");
    node.kubectl(&["delete", "pod", "-n", namespace, &old[0], "--wait=false"]);
    let mut failures = 0;
    node.wait("the server to come back and answer", Duration::from_secs(120), |n| {
        let back = pods_ready(n, namespace, "app=server").iter().any(|p| !old.contains(p));
        let ok = matches!(call_in(n, namespace, url), Ok((s, _)) if s.contains(" 200 "));
        failures += usize::from(!ok);
        back && ok
    });
    for i in 0..5 {
        let answer = call_in(node, namespace, url);
        assert!(
            matches!(&answer, Ok((s, _)) if s.contains(" 200 ")),
            "{namespace}: call {i} after the server came back: {answer:?}"
        );
    }
    eprintln!("{namespace}: {failures} calls failed while the server pod was replaced");
}

/// The CNI mode: the chart's DaemonSet chains `palisade cni` into the node's configuration,
/// pods of a `restricted` namespace get sidecars with no NET_ADMIN anywhere, and talk over mTLS;
/// without the plugin, an injected pod is kept from starting unmeshed.
fn cni_mode(node: &mut Node) {
    let (bin_dir, conf_dir) = (node.path("cni-bin").display().to_string(), node.path("net.d").display().to_string());
    node.helm(
        "upgrade",
        &[
            "--reuse-values",
            "--set",
            "cni.enabled=true",
            "--set",
            &format!("cni.binDir={bin_dir}"),
            "--set",
            &format!("cni.confDir={conf_dir}"),
        ],
    );
    node.wait("the palisade-cni DaemonSet to be Ready", Duration::from_secs(120), |n| {
        !pods_ready(n, "palisade-system", "app.kubernetes.io/name=palisade-cni").is_empty()
    });
    let conflist: Value =
        serde_json::from_slice(&std::fs::read(node.path("net.d/10-bridge.conflist")).unwrap()).unwrap();
    let types: Vec<&str> =
        conflist["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["bridge", "palisade-cni"], "chained after the pod network's plugin");
    // The control plane rolls out with --inject-cni; the new replica answers the webhook.
    node.wait("the control plane to roll out in CNI mode", Duration::from_secs(120), |n| {
        let d = n.get_json(&["get", "deployment", "palisade-control", "-n", "palisade-system"]);
        let args = d["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        args.contains("--inject-cni")
            && d["status"]["updatedReplicas"] == 1
            && d["status"]["readyReplicas"] == 1
            && d["status"]["replicas"] == 1
    });

    mesh_flow(
        node,
        "vault",
        "palisade.io/inject: enabled, pod-security.kubernetes.io/enforce: restricted",
        &restricted_apps_yaml(),
        "palisade-validate",
    );
    let validated = node.kubectl(&["logs", "-n", "vault", "client", "-c", "palisade-validate"]);
    assert!(validated.contains("the redirect is in place"), "{validated}");

    // The DaemonSet goes: the plugin takes itself out, and a pod injected now fails closed.
    node.kubectl(&["delete", "daemonset", "palisade-cni", "-n", "palisade-system", "--wait=true"]);
    node.wait("palisade-cni to leave the network configuration", Duration::from_secs(30), |n| {
        !std::fs::read_to_string(n.path("net.d/10-bridge.conflist")).unwrap().contains("palisade-cni")
    });
    let late = "apiVersion: v1\nkind: Pod\nmetadata: {name: late, namespace: vault}\nspec:\n  serviceAccountName: client\n  \
                securityContext: {runAsNonRoot: true, runAsUser: 1000, seccompProfile: {type: RuntimeDefault}}\n  \
                containers: [{name: app, image: \"palisade.test/node-app:1\", imagePullPolicy: Never, args: [pause], \
                securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}}]\n";
    let (ok, out) = node.apply(late);
    assert!(ok, "{out}");
    let mut log = String::new();
    node.wait("the validator to refuse the unredirected pod", Duration::from_secs(60), |n| {
        log = String::from_utf8_lossy(
            &n.kubectl_output(&["logs", "-n", "vault", "late", "-c", "palisade-validate"]).stdout,
        )
        .into_owned();
        log.contains("not redirected to the sidecar")
    });
    let late = node.get_json(&["get", "pod", "late", "-n", "vault"]);
    assert_ne!(late["status"]["phase"], "Running", "an unmeshed pod never runs its app: {}", late["status"]);
    assert!(
        late["status"]["containerStatuses"][0]["state"]["running"].is_null(),
        "the app container did not start: {}",
        late["status"]
    );
}

/// The same two apps as `apps_yaml`, written for the `restricted` Pod Security level.
fn restricted_apps_yaml() -> String {
    let restricted = "securityContext: {runAsNonRoot: true, runAsUser: 1000, seccompProfile: {type: RuntimeDefault}}";
    let container = "securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}";
    apps_yaml()
        .replace("namespace: shop", "namespace: vault")
        .replace("/ns/shop/", "/ns/vault/")
        .replace(
            "      terminationGracePeriodSeconds: 1\n",
            &format!("      terminationGracePeriodSeconds: 1\n      {restricted}\n"),
        )
        .replace(
            "  terminationGracePeriodSeconds: 1\n  containers:",
            &format!("  terminationGracePeriodSeconds: 1\n  {restricted}\n  containers:"),
        )
        .replace(
            "          imagePullPolicy: Never\n",
            &format!("          imagePullPolicy: Never\n          {container}\n"),
        )
        .replace(
            "      imagePullPolicy: Never\n      args: [pause]",
            &format!("      imagePullPolicy: Never\n      {container}\n      args: [pause]"),
        )
}
