//! The sidecar's settings for one pod: the injector's defaults, overridden by the pod's
//! `palisade.io/*` annotations. Every value is checked here, so a typo is refused at admission
//! with the annotation's name instead of surfacing later as a crash-looping sidecar.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{InjectConfig, InjectError, annotation};
use crate::init::{InboundPorts, PortList};

/// Resolved, validated sidecar settings.
pub(super) struct ProxySettings {
    pub image: String,
    pub resources: ResourceRequirements,
    pub redirect: RedirectSettings,
    pub opaque_ports: Option<Vec<u16>>,
    pub log_level: Option<String>,
}

/// The part of the settings the redirect needs: what `palisade init` runs with, and all the
/// node's CNI plugin reads from a pod. It depends on the pod's annotations alone, not on the
/// injector's configuration, so the plugin derives exactly what admission did.
pub(super) struct RedirectSettings {
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Option<Vec<u16>>,
    /// `*` or a comma list, as `palisade init --include-inbound-ports` takes it.
    pub include_inbound_ports: Option<String>,
}

impl RedirectSettings {
    pub fn resolve(meta: &ObjectMeta) -> Result<RedirectSettings, InjectError> {
        let empty = BTreeMap::new();
        let annotations = meta.annotations.as_ref().unwrap_or(&empty);
        let include_inbound_ports = match lookup(annotations, annotation::INCLUDE_INBOUND_PORTS) {
            None => None,
            Some((value, source)) => Some(match value.parse::<InboundPorts>().map_err(|e| source.error(value, e))? {
                InboundPorts::All => "*".to_string(),
                InboundPorts::Only(ports) => super::port_list(&ports.0),
            }),
        };
        Ok(RedirectSettings {
            exclude_inbound_ports: ports(annotations, annotation::EXCLUDE_INBOUND_PORTS)?.unwrap_or_default(),
            exclude_outbound_ports: ports(annotations, annotation::EXCLUDE_OUTBOUND_PORTS)?,
            include_inbound_ports,
        })
    }
}

/// A port-list annotation, if the pod has it.
fn ports(annotations: &BTreeMap<String, String>, key: &'static str) -> Result<Option<Vec<u16>>, InjectError> {
    match lookup(annotations, key) {
        None => Ok(None),
        Some((value, source)) => value.parse::<PortList>().map(|p| Some(p.0)).map_err(|e| source.error(value, e)),
    }
}

/// Where a value came from, so an error names what the user has to fix.
#[derive(Clone, Copy)]
enum Source {
    Annotation(&'static str),
    Config(&'static str),
}

impl Source {
    fn error(self, value: &str, reason: impl ToString) -> InjectError {
        match self {
            Source::Annotation(annotation) => {
                InjectError::Annotation { annotation, value: value.to_string(), reason: reason.to_string() }
            }
            Source::Config(setting) => {
                InjectError::Config { setting, value: value.to_string(), reason: reason.to_string() }
            }
        }
    }
}

impl ProxySettings {
    pub fn resolve(meta: &ObjectMeta, cfg: &InjectConfig) -> Result<ProxySettings, InjectError> {
        let empty = BTreeMap::new();
        let annotations = meta.annotations.as_ref().unwrap_or(&empty);
        let get = |key: &'static str| lookup(annotations, key);

        let (image, source) = or_default(annotations, annotation::PROXY_IMAGE, "image", &cfg.image);
        if image.is_empty() || image.contains(char::is_whitespace) {
            return Err(source.error(image, "not an image reference"));
        }

        let cpu = (
            quantity(or_default(annotations, annotation::PROXY_CPU, "cpu_request", &cfg.cpu_request))?,
            quantity(or_default(annotations, annotation::PROXY_CPU_LIMIT, "cpu_limit", &cfg.cpu_limit))?,
        );
        let memory = (
            quantity(or_default(annotations, annotation::PROXY_MEMORY, "memory_request", &cfg.memory_request))?,
            quantity(or_default(annotations, annotation::PROXY_MEMORY_LIMIT, "memory_limit", &cfg.memory_limit))?,
        );
        for (resource, (request, limit)) in [("CPU", &cpu), ("memory", &memory)] {
            if request.value > limit.value {
                let reason =
                    format!("the {resource} request {:?} exceeds the {resource} limit {:?}", request.text, limit.text);
                // Blame what the pod's author set; the API server would refuse the pod anyway.
                let blamed = if matches!(request.source, Source::Annotation(_)) { request } else { limit };
                return Err(blamed.source.error(blamed.text, reason));
            }
        }
        let resources = ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity(cpu.0.text.to_string())),
                ("memory".to_string(), Quantity(memory.0.text.to_string())),
            ])),
            limits: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity(cpu.1.text.to_string())),
                ("memory".to_string(), Quantity(memory.1.text.to_string())),
            ])),
            ..Default::default()
        };

        let redirect = RedirectSettings::resolve(meta)?;
        let opaque_ports = ports(annotations, annotation::OPAQUE_PORTS)?;
        if let (Some([]), Some((value, source))) = (opaque_ports.as_deref(), get(annotation::OPAQUE_PORTS)) {
            return Err(source.error(value, "lists no port (leave the annotation out for the default opaque ports)"));
        }

        let log_level = match get(annotation::LOG_LEVEL) {
            None => None,
            Some((value, source)) => {
                if value.trim().is_empty() {
                    return Err(source.error(value, "empty log filter"));
                }
                tracing_subscriber::EnvFilter::try_new(value).map_err(|e| source.error(value, e))?;
                Some(value.to_string())
            }
        };

        Ok(ProxySettings { image: image.to_string(), resources, redirect, opaque_ports, log_level })
    }
}

fn lookup<'a>(annotations: &'a BTreeMap<String, String>, key: &'static str) -> Option<(&'a str, Source)> {
    annotations.get(key).map(|v| (v.as_str(), Source::Annotation(key)))
}

/// The annotation's value if the pod has it, else the injector's setting.
fn or_default<'a>(
    annotations: &'a BTreeMap<String, String>,
    key: &'static str,
    setting: &'static str,
    default: &'a str,
) -> (&'a str, Source) {
    lookup(annotations, key).unwrap_or((default, Source::Config(setting)))
}

/// A resource quantity as written, its value, and where it came from.
struct Checked<'a> {
    text: &'a str,
    value: f64,
    source: Source,
}

fn quantity((text, source): (&str, Source)) -> Result<Checked<'_>, InjectError> {
    match quantity_value(text) {
        Some(v) if v < 0.0 => Err(source.error(text, "a resource quantity cannot be negative")),
        Some(value) => Ok(Checked { text, value, source }),
        None => Err(source.error(text, "not a Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1G)")),
    }
}

/// The value of a Kubernetes resource quantity (`500m`, `1.5`, `128Mi`, `1e3`), precise enough
/// to compare a request with a limit; `None` if `s` is not a quantity.
fn quantity_value(s: &str) -> Option<f64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '+' | '-'))).unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let digits = number.strip_prefix(['+', '-']).unwrap_or(number);
    if !digits.bytes().any(|b| b.is_ascii_digit()) || digits.contains(['+', '-']) || digits.matches('.').count() > 1 {
        return None;
    }
    let number: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let e = &exp[1..];
            let unsigned = e.strip_prefix(['+', '-']).unwrap_or(e);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            10f64.powi(e.parse().ok()?)
        }
        _ => return None,
    };
    Some(number * scale)
}

#[cfg(test)]
mod tests {
    use super::quantity_value;

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        for (text, value) in [
            ("50m", 0.05),
            ("1", 1.0),
            ("0.5", 0.5),
            (".5", 0.5),
            ("128Mi", 128.0 * 1024.0 * 1024.0),
            ("1G", 1e9),
            ("2k", 2000.0),
            ("1e3", 1000.0),
            ("1E-3", 0.001),
            ("+1", 1.0),
        ] {
            let got = quantity_value(text).unwrap_or_else(|| panic!("{text} refused"));
            assert!((got - value).abs() < 1e-9 * value.max(1.0), "{text}: {got} != {value}");
        }
        for bad in ["", "m", "lots", "1.2.3", "10 Mi", "1mi", "1KB", "1e", "1e+", "--1", "1-2", "Mi128", "."] {
            assert_eq!(quantity_value(bad), None, "{bad:?} accepted");
        }
    }
}
