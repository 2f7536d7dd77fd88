//! `deploy/`: every manifest is a well-formed Kubernetes object, the control plane's RBAC is least
//! privilege, the webhook reaches the control plane, the Helm chart renders the same objects, and
//! the chart carries the same CRDs; the image built by `deploy/image/build` runs its binaries with
//! nothing but what it holds.

mod tools;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// YAML files under `dir`, recursively, in a stable order; `skip` folders are left out.
fn yaml_files(dir: &Path, skip: &[&Path]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if skip.contains(&path.as_path()) {
            continue;
        }
        if path.is_dir() {
            out.extend(yaml_files(&path, skip));
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
    out
}

fn documents(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, d)| Value::deserialize(d).unwrap_or_else(|e| panic!("{origin}, document {}: {e}", i + 1)))
        .filter(|v| !v.is_null())
        .collect()
}

/// Every object of the plain manifests (not the Helm chart, not the Prometheus rule files of
/// monitoring/), with the file it came from.
fn deploy_objects() -> Vec<(String, Value)> {
    let deploy = repo().join("deploy");
    let (helm, monitoring) = (deploy.join("helm"), deploy.join("monitoring"));
    let mut out = Vec::new();
    for file in yaml_files(&deploy, &[&helm, &monitoring]) {
        let name = file.strip_prefix(repo()).unwrap().display().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        out.extend(documents(&text, &name).into_iter().map(|d| (name.clone(), d)));
    }
    out
}

fn text<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut v = v;
    for key in path {
        v = &v[*key];
    }
    v.as_str().unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().map(|s| s.iter().filter_map(|i| i.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// (kind, namespace, name) of an object.
fn key(object: &Value) -> (String, String, String) {
    let kind = text(object, &["kind"]).to_string();
    (kind, text(object, &["metadata", "namespace"]).to_string(), text(object, &["metadata", "name"]).to_string())
}

fn find<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| text(o, &["kind"]) == kind && text(o, &["metadata", "name"]) == name)
        .unwrap_or_else(|| panic!("no {kind} {name} under deploy/"))
}

/// One RBAC grant: (apiGroup, resource, verb, resourceName or "" for any).
type Grant = (String, String, String, String);

fn grants(role: &Value) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("a role without rules") {
        let names = strings(&rule["resourceNames"]);
        let names = if names.is_empty() { vec![String::new()] } else { names };
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    for name in &names {
                        out.insert((group.clone(), resource.clone(), verb.clone(), name.clone()));
                    }
                }
            }
        }
    }
    out
}

fn grant_set(list: &[(&str, &[&str], &[&str], &str)]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for (group, resources, verbs, name) in list {
        for resource in *resources {
            for verb in *verbs {
                out.insert((group.to_string(), resource.to_string(), verb.to_string(), name.to_string()));
            }
        }
    }
    out
}

const POLICY_KINDS: &[&str] = &[
    "authorizationpolicies",
    "peerauthentications",
    "requestauthentications",
    "ratelimitpolicies",
    "workloadsecurities",
];

#[test]
fn every_manifest_is_an_object_with_api_version_kind_and_name() {
    let objects = deploy_objects();
    let mut seen = BTreeSet::new();
    for (file, object) in &objects {
        for field in [&["apiVersion"][..], &["kind"], &["metadata", "name"]] {
            assert!(!text(object, field).is_empty(), "{file}: an object without {}:\n{object:?}", field.join("."));
        }
        assert!(seen.insert(key(object)), "{file}: {:?} is defined twice", key(object));
    }
    for (kind, name) in [
        ("Namespace", "palisade-system"),
        ("ServiceAccount", "palisade-control"),
        ("ClusterRole", "palisade-control"),
        ("ClusterRoleBinding", "palisade-control"),
        ("Role", "palisade-control"),
        ("RoleBinding", "palisade-control"),
        ("Deployment", "palisade-control"),
        ("Service", "palisade-control"),
        ("PodDisruptionBudget", "palisade-control"),
        ("MutatingWebhookConfiguration", "palisade-sidecar-injector"),
    ] {
        find(&objects, kind, name);
    }
}

#[test]
fn rbac_is_least_privilege() {
    let objects = deploy_objects();
    for (file, role) in objects.iter().filter(|(_, o)| matches!(text(o, &["kind"]), "ClusterRole" | "Role")) {
        let kind = text(role, &["kind"]);
        for (group, resource, verb, name) in grants(role) {
            for field in [&group, &resource, &verb, &name] {
                assert!(!field.contains('*'), "{file}: {kind} grants a wildcard: {group}/{resource} {verb}");
            }
            assert!(
                !matches!(verb.as_str(), "escalate" | "bind" | "impersonate" | "delete" | "deletecollection"),
                "{file}: {kind} grants {verb} on {resource}"
            );
            if resource == "secrets" {
                assert_eq!(kind, "Role", "{file}: secrets in a {kind}: Secrets are readable only in palisade-system");
                assert!(verb == "create" || name == "palisade-ca", "{file}: {verb} on secrets other than palisade-ca");
                assert!(
                    (verb != "list" && verb != "watch") || name == "palisade-ca",
                    "{file}: {verb} on secrets reads every Secret"
                );
            }
        }
    }

    let cluster_role = find(&objects, "ClusterRole", "palisade-control");
    let status: Vec<String> = POLICY_KINDS.iter().map(|k| format!("{k}/status")).collect();
    let status: Vec<&str> = status.iter().map(String::as_str).collect();
    let expected = grant_set(&[
        ("", &["pods", "services", "namespaces"], &["get", "list", "watch"], ""),
        ("discovery.k8s.io", &["endpointslices"], &["get", "list", "watch"], ""),
        ("gateway.networking.k8s.io", &["httproutes", "grpcroutes"], &["get", "list", "watch"], ""),
        ("palisade.io", POLICY_KINDS, &["get", "list", "watch"], ""),
        ("palisade.io", &status, &["get", "update", "patch"], ""),
        ("authentication.k8s.io", &["tokenreviews"], &["create"], ""),
        ("authorization.k8s.io", &["subjectaccessreviews"], &["create"], ""),
        (
            "admissionregistration.k8s.io",
            &["mutatingwebhookconfigurations"],
            &["get", "list", "watch", "update", "patch"],
            "palisade-sidecar-injector",
        ),
    ]);
    assert_eq!(grants(cluster_role), expected, "the ClusterRole grants exactly this");

    let role = find(&objects, "Role", "palisade-control");
    assert_eq!(text(role, &["metadata", "namespace"]), "palisade-system");
    let expected = grant_set(&[
        ("", &["secrets"], &["get", "list", "watch", "update"], "palisade-ca"),
        ("", &["secrets"], &["create"], ""),
        ("", &["configmaps"], &["get", "list", "watch", "update"], "palisade-revocations"),
        ("", &["configmaps"], &["create"], ""),
        ("coordination.k8s.io", &["leases"], &["get", "update"], "palisade-control-leader"),
        ("coordination.k8s.io", &["leases"], &["create"], ""),
    ]);
    assert_eq!(grants(role), expected, "the Role grants exactly this");

    for (kind, role_kind) in [("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")] {
        let binding = find(&objects, kind, "palisade-control");
        assert_eq!(text(binding, &["roleRef", "kind"]), role_kind);
        assert_eq!(text(binding, &["roleRef", "name"]), "palisade-control");
        let subjects = binding["subjects"].as_sequence().unwrap();
        assert_eq!(subjects.len(), 1, "{kind} binds one subject");
        assert_eq!(
            (text(&subjects[0], &["kind"]), text(&subjects[0], &["name"]), text(&subjects[0], &["namespace"])),
            ("ServiceAccount", "palisade-control", "palisade-system")
        );
    }
}

#[test]
fn the_control_plane_deployment_is_hardened_and_spread() {
    let objects = deploy_objects();
    let deployment = find(&objects, "Deployment", "palisade-control");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"];
    assert_eq!(text(pod, &["metadata", "annotations", "palisade.io/inject"]), "disabled");
    assert_eq!(text(pod, &["spec", "serviceAccountName"]), "palisade-control");
    let spread = &pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(text(spread, &["podAffinityTerm", "topologyKey"]), "kubernetes.io/hostname");

    let containers = pod["spec"]["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let args = strings(&c["args"]);
    assert_eq!(args[0], "control");
    for pair in [
        ["--trust-domain", "cluster.local"],
        ["--listen", "0.0.0.0:15010"],
        ["--admin", "0.0.0.0:15014"],
        ["--webhook", "0.0.0.0:15017"],
        // A subdirectory of the volume: the volume's root is root's, and the state dir must be 0700.
        ["--state-dir", "/var/lib/palisade/state"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "args lack {pair:?}: {args:?}");
    }
    assert!(args.contains(&"--kubernetes".to_string()));
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(text(c, &["readinessProbe", "httpGet", "path"]), "/ready");
    assert_eq!(text(c, &["livenessProbe", "httpGet", "path"]), "/live");
    let env: Vec<_> = c["env"].as_sequence().unwrap().iter().map(|e| text(e, &["name"]).to_string()).collect();
    assert_eq!(env, ["POD_NAME", "POD_NAMESPACE"]);

    let pdb = find(&objects, "PodDisruptionBudget", "palisade-control");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);
}

/// `helm template` of the chart in `palisade-system` with `sets` (`--set key=value` each).
fn helm_template(sets: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new(tools::helm())
        .args(["template", "palisade"])
        .arg(repo().join("deploy/helm/palisade"))
        .args(["--namespace", "palisade-system"])
        .args(sets.iter().flat_map(|s| ["--set", s]))
        .output()
        .expect("cannot run helm");
    assert!(out.status.success(), "helm template {sets:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    documents(&String::from_utf8(out.stdout).unwrap(), "helm template")
}

/// Every `image` field anywhere under `v`.
fn images(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                match (k.as_str(), v.as_str()) {
                    (Some("image"), Some(image)) => out.push(image.to_string()),
                    _ => images(v, out),
                }
            }
        }
        Value::Sequence(s) => s.iter().for_each(|v| images(v, out)),
        _ => {}
    }
}

/// The value after `flag` in the control plane's arguments.
fn control_flag(objects: &[Value], flag: &str) -> Option<String> {
    let deployment = objects.iter().find(|o| text(o, &["kind"]) == "Deployment").expect("a Deployment");
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone())
}

#[test]
fn the_charts_image_values_reach_every_image_it_names_the_injectors_included() {
    let default = helm_template(&[]);
    let version = env!("CARGO_PKG_VERSION");
    let mut named = Vec::new();
    default.iter().for_each(|o| images(o, &mut named));
    assert_eq!(named, [format!("ghcr.io/palisade-mesh/palisade:{version}")]);
    assert_eq!(control_flag(&default, "--proxy-image"), Some(format!("ghcr.io/palisade-mesh/palisade:{version}")));

    let custom = helm_template(&["image.repository=registry.example/mesh/palisade", "image.tag=1.2.3"]);
    let mut named = Vec::new();
    custom.iter().for_each(|o| images(o, &mut named));
    assert_eq!(named, ["registry.example/mesh/palisade:1.2.3"], "the control plane's image");
    assert_eq!(
        control_flag(&custom, "--proxy-image").as_deref(),
        Some("registry.example/mesh/palisade:1.2.3"),
        "the injector puts the same image into pods"
    );

    let split = helm_template(&["image.tag=1.2.3", "proxyImage.repository=mirror.example/proxy"]);
    assert_eq!(control_flag(&split, "--proxy-image").as_deref(), Some("mirror.example/proxy:1.2.3"));

    // Pods without cluster DNS: a fixed Service address for the sidecars to dial.
    let fixed = helm_template(&["service.clusterIP=10.97.0.20", "injector.controlAddress=10.97.0.20:15010"]);
    assert_eq!(control_flag(&fixed, "--inject-control").as_deref(), Some("10.97.0.20:15010"));
    let service = fixed.iter().find(|o| text(o, &["kind"]) == "Service").unwrap();
    assert_eq!(text(service, &["spec", "clusterIP"]), "10.97.0.20");
    assert_eq!(control_flag(&default, "--inject-control"), None, "the default is the Service's DNS name");
}

#[test]
fn the_cni_mode_adds_a_node_daemonset_that_may_only_read_pods_and_switches_the_injector() {
    let named = |objects: Vec<Value>| objects.into_iter().map(|o| ("helm template".to_string(), o)).collect::<Vec<_>>();
    let off = named(helm_template(&[]));
    assert!(!off.iter().any(|(_, o)| text(o, &["kind"]) == "DaemonSet"), "off by default");
    assert!(
        !strings(&find(&off, "Deployment", "palisade-control")["spec"]["template"]["spec"]["containers"][0]["args"])
            .contains(&"--inject-cni".to_string())
    );

    let on = named(helm_template(&["cni.enabled=true", "cni.binDir=/var/lib/cni/bin", "image.tag=1.2.3"]));
    let control = &find(&on, "Deployment", "palisade-control")["spec"]["template"]["spec"]["containers"][0];
    assert!(strings(&control["args"]).contains(&"--inject-cni".to_string()), "the injector knows");
    let ds = find(&on, "DaemonSet", "palisade-cni");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(text(c, &["image"]), "ghcr.io/palisade-mesh/palisade:1.2.3", "the chart's image");
    let args = strings(&c["args"]);
    assert_eq!(&args[..2], ["cni", "install"]);
    assert!(args.windows(2).any(|w| w == ["--host-bin-dir", "/var/lib/cni/bin"]), "{args:?}");
    let host_paths: Vec<&str> =
        pod["volumes"].as_sequence().unwrap().iter().map(|v| v["hostPath"]["path"].as_str().unwrap()).collect();
    assert_eq!(host_paths, ["/var/lib/cni/bin", "/etc/cni/net.d"], "the node's CNI directories and nothing else");
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&c["securityContext"]["capabilities"]["drop"]), ["ALL"]);
    assert!(c["securityContext"]["capabilities"]["add"].is_null(), "root, but no capability on top");
    assert_eq!(pod["hostNetwork"], true, "its own sandbox must not wait for the plugin it installs");
    assert_eq!(text(pod, &["serviceAccountName"]), "palisade-cni");
    let role = find(&on, "ClusterRole", "palisade-cni");
    assert_eq!(
        serde_yaml::to_string(&role["rules"]).unwrap(),
        "- apiGroups:\n  - ''\n  resources:\n  - pods\n  verbs:\n  - get\n",
        "the plugin's token on every node may read pods, and nothing else"
    );
}

#[test]
fn the_network_policy_admits_sidecars_and_the_api_server_and_nothing_else() {
    let objects = deploy_objects();
    let policy = find(&objects, "NetworkPolicy", "palisade-control");
    let deployment = find(&objects, "Deployment", "palisade-control");
    assert_eq!(policy["spec"]["podSelector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);
    assert_eq!(strings(&policy["spec"]["policyTypes"]), ["Ingress", "Egress"], "both directions are closed");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let named: BTreeMap<String, i64> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (text(p, &["name"]).to_string(), p["containerPort"].as_i64().unwrap()))
        .collect();
    let ingress = policy["spec"]["ingress"].as_sequence().unwrap();
    let admitted: Vec<&str> = ingress
        .iter()
        .flat_map(|rule| rule["ports"].as_sequence().unwrap())
        .map(|p| p["port"].as_str().expect("ports by name, so they follow the container"))
        .collect();
    assert_eq!(admitted, ["grpc", "webhook"], "the admin port is not open to pods by default");
    for port in &admitted {
        assert!(named.contains_key(*port), "{port} is not a port of the control-plane container: {named:?}");
    }
    let egress: BTreeSet<i64> = policy["spec"]["egress"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_sequence().unwrap())
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    assert_eq!(egress, BTreeSet::from([53, 443, 6443]));

    // Scrapers are let in only where the chart is told to.
    let opened = helm_template(&["networkPolicy.adminFrom[0].namespaceSelector.matchLabels.team=monitoring"]);
    let policy = opened.iter().find(|o| text(o, &["kind"]) == "NetworkPolicy").unwrap();
    let admin = &policy["spec"]["ingress"][1];
    assert_eq!(text(&admin["ports"][0], &["port"]), "admin");
    assert_eq!(text(&admin["from"][0], &["namespaceSelector", "matchLabels", "team"]), "monitoring");
    let off = helm_template(&["networkPolicy.enabled=false"]);
    assert!(off.iter().all(|o| text(o, &["kind"]) != "NetworkPolicy"));
}

/// Whether a Kubernetes label selector (`matchLabels` and `matchExpressions`) selects `labels`;
/// an absent selector selects everything, as in the API server.
fn selects(selector: &Value, labels: &BTreeMap<&str, &str>) -> bool {
    let labels_match = selector["matchLabels"]
        .as_mapping()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k.as_str().unwrap()).copied() == v.as_str());
    let expressions_match = selector["matchExpressions"].as_sequence().into_iter().flatten().all(|e| {
        let value = labels.get(text(e, &["key"])).copied();
        let values = strings(&e["values"]);
        match text(e, &["operator"]) {
            "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
            "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("unknown selector operator {other}"),
        }
    });
    labels_match && expressions_match
}

#[test]
fn the_webhooks_see_each_pod_at_most_once_and_fail_closed_only_for_label_opt_ins() {
    let objects = deploy_objects();
    let config = find(&objects, "MutatingWebhookConfiguration", "palisade-sidecar-injector");
    let webhooks = config["webhooks"].as_sequence().unwrap();
    let names: Vec<_> = webhooks.iter().map(|h| text(h, &["name"])).collect();
    assert_eq!(names, ["namespace.inject.palisade.io", "object.inject.palisade.io", "annotation.inject.palisade.io"]);

    let cfg = palisade::k8s::inject::InjectConfig::default();
    let settings = [None, Some("enabled"), Some("disabled")];
    for namespace in ["shop", "kube-system", "palisade-system"] {
        for ns_label in settings {
            for pod_label in settings {
                for pod_annotation in settings {
                    let case = format!(
                        "namespace {namespace} labelled {ns_label:?}, pod labelled {pod_label:?}, annotated {pod_annotation:?}"
                    );
                    let mut ns_labels = BTreeMap::from([("kubernetes.io/metadata.name", namespace)]);
                    ns_labels.extend(ns_label.map(|v| ("palisade.io/inject", v)));
                    let pod_labels: BTreeMap<_, _> = pod_label.map(|v| ("palisade.io/inject", v)).into_iter().collect();
                    let seen_by: Vec<_> = webhooks
                        .iter()
                        .filter(|h| {
                            selects(&h["namespaceSelector"], &ns_labels) && selects(&h["objectSelector"], &pod_labels)
                        })
                        .collect();
                    assert!(seen_by.len() <= 1, "{case}: seen by {} webhooks", seen_by.len());

                    let system = namespace != "shop";
                    // The documented rule: the pod's label, else its annotation, else its namespace.
                    let wanted = pod_label.or(pod_annotation).map_or(ns_label == Some("enabled"), |v| v == "enabled");
                    // What a selector can see: a label, the pod's or else its namespace's.
                    let asked_by_label = pod_label.or(ns_label) == Some("enabled");
                    match seen_by.first() {
                        None => assert!(
                            system || pod_label == Some("disabled"),
                            "{case}: only system namespaces and pods labelled out of the mesh go unseen"
                        ),
                        Some(hook) => {
                            assert!(!system, "{case}: system namespaces are never sent to the webhook");
                            let policy = text(hook, &["failurePolicy"]);
                            assert_eq!(policy == "Fail", asked_by_label, "{case}: failurePolicy {policy}");
                        }
                    }
                    if system {
                        continue;
                    }
                    // What the webhook would not see must be what the injector would not inject,
                    // so the selectors never change a decision, only who waits for it.
                    let mut meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                        labels: Some(pod_labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                        annotations: Some(
                            pod_annotation
                                .map(|v| ("palisade.io/inject".to_string(), v.to_string()))
                                .into_iter()
                                .collect(),
                        ),
                        ..Default::default()
                    };
                    let mut spec = k8s_openapi::api::core::v1::PodSpec {
                        containers: vec![k8s_openapi::api::core::v1::Container {
                            name: "app".into(),
                            image: Some("app:1".into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    };
                    let ns_for_injector = ns_labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                    let outcome =
                        palisade::k8s::inject::inject_pod_template(&mut meta, &mut spec, &ns_for_injector, &cfg, false)
                            .unwrap_or_else(|e| panic!("{case}: {e}"));
                    let injected = outcome == palisade::k8s::inject::Outcome::Injected;
                    assert_eq!(injected, wanted, "{case}: {outcome}");
                    if seen_by.is_empty() {
                        assert!(!wanted, "{case}: no webhook sends the injector a pod that wants the mesh");
                    }
                }
            }
        }
    }
}

#[test]
fn the_webhook_reaches_the_control_plane_and_spares_system_namespaces() {
    let objects = deploy_objects();
    let config = find(&objects, "MutatingWebhookConfiguration", "palisade-sidecar-injector");
    let webhooks = config["webhooks"].as_sequence().unwrap();
    assert_eq!(webhooks.len(), 3);
    for hook in webhooks {
        let name = text(hook, &["name"]);
        for (field, value) in [("sideEffects", "None"), ("reinvocationPolicy", "Never"), ("matchPolicy", "Equivalent")]
        {
            assert_eq!(text(hook, &[field]), value, "{name}: {field}");
        }
        assert_eq!(hook["timeoutSeconds"], 5, "{name}");
        assert_eq!(strings(&hook["admissionReviewVersions"]), ["v1"], "{name}");
        let ca_bundle = &hook["clientConfig"]["caBundle"];
        assert!(
            ca_bundle.is_null() || ca_bundle == "",
            "{name}: the control plane writes caBundle; a manifest value would wipe it"
        );
        let rule = &hook["rules"][0];
        assert_eq!(hook["rules"].as_sequence().unwrap().len(), 1, "{name}");
        assert_eq!(
            (
                strings(&rule["operations"]),
                strings(&rule["apiGroups"]),
                strings(&rule["apiVersions"]),
                strings(&rule["resources"])
            ),
            (vec!["CREATE".to_string()], vec![String::new()], vec!["v1".to_string()], vec!["pods".to_string()]),
            "{name}"
        );
        assert_eq!(hook["clientConfig"], webhooks[0]["clientConfig"], "{name}: one endpoint for all three");
    }
    let hook = &webhooks[0];
    // service palisade-control:443 -> the Deployment's webhook port -> `--webhook 0.0.0.0:15017`.
    let service_ref = &hook["clientConfig"]["service"];
    assert_eq!(
        (text(service_ref, &["name"]), text(service_ref, &["namespace"]), text(service_ref, &["path"])),
        ("palisade-control", "palisade-system", "/inject")
    );
    let service = find(&objects, "Service", "palisade-control");
    let port = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["port"] == service_ref["port"])
        .expect("the Service has the webhook's port");
    let target = text(port, &["targetPort"]);
    let deployment = find(&objects, "Deployment", "palisade-control");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let container_port = container["ports"].as_sequence().unwrap().iter().find(|p| text(p, &["name"]) == target);
    assert_eq!(container_port.map(|p| p["containerPort"].clone()), Some(Value::from(15017)));
    assert_eq!(service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]);
}

fn crd_files(dir: &Path) -> BTreeMap<String, String> {
    match std::fs::read_dir(dir) {
        Err(_) => BTreeMap::new(),
        Ok(entries) => entries
            .map(|e| e.unwrap().path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
            .collect(),
    }
}

#[test]
fn the_chart_carries_a_copy_of_the_generated_crds() {
    let generated = crd_files(&repo().join("deploy/crds"));
    let chart = crd_files(&repo().join("deploy/helm/palisade/crds"));
    let fix = "run `cp deploy/crds/*.yaml deploy/helm/palisade/crds/` (deploy/helm/palisade/README.md)";
    for (name, text) in &generated {
        assert_eq!(
            chart.get(name),
            Some(text),
            "deploy/helm/palisade/crds/{name} differs from deploy/crds/{name}: {fix}"
        );
    }
    for name in chart.keys() {
        assert!(generated.contains_key(name), "deploy/helm/palisade/crds/{name} has no deploy/crds/{name}: {fix}");
    }
}

#[test]
fn the_generated_crds_are_in_deploy_crds() {
    let generated = crd_files(&repo().join("deploy/crds"));
    assert!(
        !generated.is_empty(),
        "deploy/crds/ holds no CRD: run `palisade k8s crds --out deploy/crds`, then \
         `cp deploy/crds/*.yaml deploy/helm/palisade/crds/`"
    );
}

/// The chart runs two replicas by default, spread over nodes and kept available through a drain
/// by a PodDisruptionBudget; a single replica gets no PDB, which would block every drain.
#[test]
fn the_chart_runs_two_spread_replicas_with_a_disruption_budget_and_one_without() {
    let rendered: Vec<(String, Value)> = helm_template(&[]).into_iter().map(|o| ("helm".to_string(), o)).collect();
    let deployment = find(&rendered, "Deployment", "palisade-control");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let spread = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(text(spread, &["podAffinityTerm", "topologyKey"]), "kubernetes.io/hostname");
    assert_eq!(
        spread["podAffinityTerm"]["labelSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let pdb = find(&rendered, "PodDisruptionBudget", "palisade-control");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);

    let single = helm_template(&["replicas=1"]);
    assert!(single.iter().all(|o| text(o, &["kind"]) != "PodDisruptionBudget"), "a PDB on one replica blocks drains");
    let three: Vec<(String, Value)> =
        helm_template(&["replicas=3"]).into_iter().map(|o| ("helm".to_string(), o)).collect();
    assert_eq!(find(&three, "Deployment", "palisade-control")["spec"]["replicas"], 3);
    find(&three, "PodDisruptionBudget", "palisade-control");
}

#[test]
fn the_helm_chart_renders_the_same_objects_as_deploy() {
    let rendered = helm_template(&[]);

    let plain = deploy_objects();
    // The chart leaves its namespace to `helm install --create-namespace`, and installs CRDs from
    // its crds/ folder, which `helm template` does not print (see the CRD tests above).
    let expected: BTreeSet<_> = plain
        .iter()
        .filter(|(file, o)| !file.starts_with("deploy/crds/") && text(o, &["kind"]) != "Namespace")
        .map(|(_, o)| key(o))
        .collect();
    let got: BTreeSet<_> = rendered.iter().map(key).collect();
    assert_eq!(got, expected, "helm template and deploy/*.yaml define different objects");

    let rendered: Vec<(String, Value)> = rendered.into_iter().map(|o| ("helm template".to_string(), o)).collect();
    let args = |objects: &[(String, Value)]| {
        strings(&find(objects, "Deployment", "palisade-control")["spec"]["template"]["spec"]["containers"][0]["args"])
    };
    assert_eq!(args(&rendered), args(&plain), "the control plane's arguments differ");
    for (kind, name) in [
        ("ClusterRole", "palisade-control"),
        ("Role", "palisade-control"),
        ("ClusterRole", "palisade-mesh-admin"),
        ("ClusterRole", "palisade-mesh-viewer"),
    ] {
        assert_eq!(
            grants(find(&rendered, kind, name)),
            grants(find(&plain, kind, name)),
            "the chart's {kind} {name} differs from deploy/control-plane.yaml"
        );
    }
    let webhook = |objects: &[(String, Value)]| {
        find(objects, "MutatingWebhookConfiguration", "palisade-sidecar-injector")["webhooks"].clone()
    };
    assert_eq!(webhook(&rendered), webhook(&plain), "the webhook configurations differ");
    for kind in ["Service", "PodDisruptionBudget", "NetworkPolicy"] {
        assert_eq!(find(&rendered, kind, "palisade-control")["spec"], find(&plain, kind, "palisade-control")["spec"]);
    }
}

#[test]
fn the_image_holds_the_two_binaries_their_libraries_and_iptables_runs_them_and_has_no_shell() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_palisade")).parent().unwrap();
    let work = std::env::temp_dir().join(format!("palisade-image-test-{}", std::process::id()));
    let (rootfs, archive) = (work.join("rootfs"), work.join("palisade.oci.tar"));
    let out = std::process::Command::new(repo().join("deploy/image/build"))
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--rootfs")
        .arg(&rootfs)
        .arg("--out")
        .arg(&archive)
        .args(["--ref", "registry.example/palisade:test"])
        .output()
        .unwrap();
    assert!(out.status.success(), "deploy/image/build: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.starts_with("digest=sha256:"), "{printed}");

    for file in ["usr/local/bin/palisade", "usr/local/bin/palisade-proxy", "usr/sbin/xtables-legacy-multi"] {
        assert!(rootfs.join(file).is_file(), "{file} is in the image");
    }
    for absent in ["bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox", "usr/bin/apt"] {
        assert!(!rootfs.join(absent).exists(), "{absent} must not be in the image");
    }
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains(":1337:1337:") && passwd.contains(":65532:65532:"), "{passwd}");

    // Only what the image holds: the binaries and iptables run in it as their own root, so no
    // library they need is missing. (chroot needs root, as CI runs.)
    for argv in [
        &["/usr/local/bin/palisade", "--version"][..],
        &["/usr/local/bin/palisade-proxy", "--help"],
        &["/usr/sbin/iptables-legacy", "--version"],
    ] {
        let out = std::process::Command::new("chroot").arg(&rootfs).args(argv).output().unwrap();
        assert!(out.status.success(), "{argv:?} in the image: {}", String::from_utf8_lossy(&out.stderr));
    }

    // The archive names the image and runs it as the non-root user.
    let listing = std::process::Command::new("tar").arg("-xOf").arg(&archive).arg("index.json").output().unwrap();
    let index: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    assert_eq!(index["manifests"][0]["annotations"]["io.containerd.image.name"], "registry.example/palisade:test");
    let blob = |digest: &str| {
        let name = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        let out = std::process::Command::new("tar").arg("-xOf").arg(&archive).arg(&name).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let manifest = blob(index["manifests"][0]["digest"].as_str().unwrap());
    let config = blob(manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/palisade");
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn the_alert_rules_load_in_promtool_and_their_unit_tests_fire() {
    let monitoring = repo().join("deploy/monitoring");
    let promtool = |args: &[&str]| {
        let out = std::process::Command::new(tools::promtool())
            .args(args)
            .current_dir(&monitoring)
            .output()
            .unwrap_or_else(|e| panic!("cannot run promtool ({}): {e}", tools::promtool().display()));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
        text
    };
    let checked = promtool(&["check", "rules", "palisade-rules.yaml"]);
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    // The unit tests fire PalisadeNackSpike, PalisadeCertificatePastRenewal and
    // PalisadeControlPlaneDown from synthetic series, and keep them quiet below threshold.
    let tested = promtool(&["test", "rules", "palisade-rules.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn the_chart_ships_the_rules_and_the_dashboard_behind_flags() {
    for file in ["palisade-rules.yaml", "grafana-dashboard.json"] {
        let plain = std::fs::read_to_string(repo().join("deploy/monitoring").join(file)).unwrap();
        let copy = std::fs::read_to_string(repo().join("deploy/helm/palisade/monitoring").join(file)).unwrap();
        assert!(plain == copy, "deploy/helm/palisade/monitoring/{file} differs from deploy/monitoring/{file}: copy it");
    }
    let off = helm_template(&[]);
    assert!(
        !off.iter().any(|o| matches!(text(o, &["kind"]), "PrometheusRule")
            || text(o, &["metadata", "name"]) == "palisade-grafana-dashboard"),
        "a cluster without the Prometheus Operator installs the chart as before"
    );
    let on = helm_template(&[
        "monitoring.prometheusRule.enabled=true",
        "monitoring.prometheusRule.labels.release=kps",
        "monitoring.grafanaDashboard.enabled=true",
    ]);
    let rule = on.iter().find(|o| text(o, &["kind"]) == "PrometheusRule").expect("a PrometheusRule");
    assert_eq!(text(rule, &["metadata", "labels", "release"]), "kps");
    let rules: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join("deploy/monitoring/palisade-rules.yaml")).unwrap())
            .unwrap();
    assert_eq!(rule["spec"]["groups"], rules["groups"], "the PrometheusRule carries the rule file's groups");
    let dashboard = on
        .iter()
        .find(|o| text(o, &["kind"]) == "ConfigMap" && text(o, &["metadata", "name"]) == "palisade-grafana-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(text(dashboard, &["metadata", "labels", "grafana_dashboard"]), "1");
    let json: serde_json::Value = serde_json::from_str(text(dashboard, &["data", "palisade.json"])).unwrap();
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/monitoring/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json, file);
}

#[test]
fn a_kek_secret_in_the_chart_reaches_the_control_plane_with_exactly_the_grants_it_needs() {
    let plain = helm_template(&[]);
    let sealed = helm_template(&["caKek.secretName=palisade-ca-kek"]);
    let wrap = |objects: Vec<Value>| objects.into_iter().map(|o| ("helm template".to_string(), o)).collect::<Vec<_>>();
    let (plain, sealed) = (wrap(plain), wrap(sealed));
    let args = |objects: &[(String, Value)]| {
        strings(&find(objects, "Deployment", "palisade-control")["spec"]["template"]["spec"]["containers"][0]["args"])
    };
    assert!(!args(&plain).iter().any(|a| a.starts_with("--ca-kek")), "no KEK unless asked for");
    let with_kek = args(&sealed);
    let at = with_kek.iter().position(|a| a == "--ca-kek-secret").expect("--ca-kek-secret");
    assert_eq!(with_kek[at + 1], "palisade-ca-kek");
    let added: BTreeSet<_> = grants(find(&sealed, "Role", "palisade-control"))
        .difference(&grants(find(&plain, "Role", "palisade-control")))
        .cloned()
        .collect();
    let expected = grant_set(&[
        ("", &["secrets"], &["get"], "palisade-ca-kek"),
        ("", &["secrets"], &["get", "delete"], "palisade-ca"),
        ("", &["secrets"], &["get", "delete"], "palisade-ca-sealing"),
    ]);
    let expected: BTreeSet<_> =
        expected.difference(&grants(find(&plain, "Role", "palisade-control"))).cloned().collect();
    assert_eq!(added, expected, "the KEK adds exactly these grants, every one by name");
}
