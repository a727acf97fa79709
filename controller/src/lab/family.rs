//! The IPv6 half of dual-stack manifests, for `--ip-family ipv6`: what the
//! API server of a single-stack IPv6 cluster makes of a `PreferDualStack`
//! Service (its IPv6 ClusterIP only), without the IPv4 EndpointSlices the
//! endpoint controller would not write there.

use serde::Deserialize as _;
use serde_norway::{Mapping, Value};

/// `text` (YAML documents) with every Service reduced to its IPv6 side and
/// every IPv4 EndpointSlice removed. A Service with ClusterIPs but no IPv6
/// one is removed too; other objects pass as they are.
pub fn ipv6_half(text: &str) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let mut value = Value::deserialize(doc)?;
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let keep = match kind {
            "Service" => ipv6_service(&mut value),
            "EndpointSlice" => value.get("addressType").and_then(Value::as_str) != Some("IPv4"),
            _ => !value.is_null(),
        };
        if keep {
            out.push(serde_norway::to_string(&value)?);
        }
    }
    Ok(out.join("---\n"))
}

fn is_v6(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.contains(':'))
}

/// Keeps the IPv6 entries of the sequence at `key` in `map`.
fn retain_v6(map: &mut Mapping, key: &str, of: impl Fn(&Value) -> &Value) {
    if let Some(Value::Sequence(items)) = map.get_mut(key) {
        items.retain(|item| is_v6(of(item)));
    }
}

/// Reduces a Service to its IPv6 side; false when it has none.
fn ipv6_service(service: &mut Value) -> bool {
    let Some(Value::Mapping(spec)) = service.get_mut("spec") else {
        return true;
    };
    let ips: Vec<Value> = match (spec.get("clusterIPs"), spec.get("clusterIP")) {
        (Some(Value::Sequence(ips)), _) => ips.clone(),
        (None, Some(ip)) => vec![ip.clone()],
        _ => Vec::new(),
    };
    let headless = ips.iter().any(|ip| ip.as_str() == Some("None"));
    if !headless {
        let Some(v6) = ips.iter().find(|ip| is_v6(ip)).cloned() else {
            return ips.is_empty();
        };
        spec.insert("clusterIP".into(), v6.clone());
        spec.insert("clusterIPs".into(), Value::Sequence(vec![v6]));
    }
    spec.insert("ipFamilies".into(), Value::Sequence(vec!["IPv6".into()]));
    spec.insert("ipFamilyPolicy".into(), "SingleStack".into());
    retain_v6(spec, "externalIPs", |v| v);
    retain_v6(spec, "loadBalancerSourceRanges", |v| v);
    if let Some(Value::Mapping(lb)) = service
        .get_mut("status")
        .and_then(|s| s.get_mut("loadBalancer"))
    {
        retain_v6(lb, "ingress", |i| i.get("ip").unwrap_or(&Value::Null));
    }
    true
}
