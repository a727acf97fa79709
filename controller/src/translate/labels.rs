//! The text the agent writes to `DP_NAMES` and the tools read back: one
//! place for both directions, so the format cannot drift.
//!
//! - service port ids: `namespace/name:port (Kind)`;
//! - backend ids: `ns/pod on node`, `ns/pod` or `on node`.

/// `default/web:http (ClusterIP)`.
pub fn service_label(port_name: &str, kind: &str) -> String {
    format!("{port_name} ({kind})")
}

/// (`namespace/name:port`, `Kind`) of a service label.
pub fn split_service_label(label: &str) -> (&str, Option<&str>) {
    match label.split_once(" (") {
        Some((name, kind)) => (name, Some(kind.trim_end_matches(')'))),
        None => (label, None),
    }
}

/// What is known of a backend beyond its address; `None` when nothing is.
pub fn backend_label(pod: Option<&str>, node: Option<&str>) -> Option<String> {
    match (pod, node) {
        (Some(pod), Some(node)) => Some(format!("{pod} on {node}")),
        (Some(pod), None) => Some(pod.to_string()),
        (None, Some(node)) => Some(format!("on {node}")),
        (None, None) => None,
    }
}

/// (pod, node) of a backend label.
pub fn split_backend_label(label: &str) -> (Option<String>, Option<String>) {
    if let Some(node) = label.strip_prefix("on ") {
        return (None, Some(node.to_string()));
    }
    match label.split_once(" on ") {
        Some((pod, node)) => (Some(pod.to_string()), Some(node.to_string())),
        None => (Some(label.to_string()), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_back_as_written() {
        let s = service_label("default/web:http", "NodePort");
        assert_eq!(
            split_service_label(&s),
            ("default/web:http", Some("NodePort"))
        );
        for (pod, node) in [
            (Some("default/db-0"), Some("node2")),
            (Some("default/db-0"), None),
            (None, Some("node2")),
        ] {
            let l = backend_label(pod, node).unwrap();
            let (p, n) = split_backend_label(&l);
            assert_eq!((p.as_deref(), n.as_deref()), (pod, node), "{l}");
        }
        assert_eq!(backend_label(None, None), None);
    }
}
