//! `--explain`: for a drop or reject, what it means and what to run next.

use std::net::SocketAddr;

use common::Reason;

use super::*;

/// `--explain` for one reason, with the commands to run next.
pub fn hint(reason: Reason, r: &TraceRecord) -> Hint {
    let svc = r.service.as_ref().map(|s| service_of(&s.name).to_string());
    let (ns, name) = svc.as_deref().and_then(|s| s.split_once('/')).map_or(
        ("NAMESPACE".to_string(), "SERVICE".to_string()),
        |(a, b)| (a.to_string(), b.to_string()),
    );
    let from = match (r.source.ip, r.source.port) {
        (Some(ip), Some(p)) => SocketAddr::new(ip, p).to_string(),
        (Some(ip), None) => ip.to_string(),
        _ => "IP".to_string(),
    };
    let to = match (r.destination.ip, r.destination.port) {
        (Some(ip), Some(p)) => format!("{}/{}", SocketAddr::new(ip, p), r.protocol.to_lowercase()),
        _ => "IP:PORT".to_string(),
    };
    let explain = format!("dp explain --from {from} --to {to}");
    let endpoints =
        format!("kubectl get endpointslices -n {ns} -l kubernetes.io/service-name={name} -o wide");
    let (cause, next): (&str, Vec<String>) = match reason {
        Reason::NoEndpoints => (
            "the Service has no ready endpoint: its pods are not Ready (readiness probe), \
             none match its selector, or they are all terminating without serving",
            vec![
                endpoints,
                format!("kubectl get pods -n {ns} -o wide   # Ready? labels match the selector?"),
                format!("dp service list   # what dp programmed for {ns}/{name}"),
            ],
        ),
        Reason::NoLocalEndpoints => (
            "externalTrafficPolicy (or internalTrafficPolicy) is Local and no endpoint of the \
             Service runs on this node; kube-proxy drops such traffic too (the load balancer \
             should stop sending it here once the health check fails)",
            vec![
                format!("kubectl get svc -n {ns} {name} -o jsonpath='{{.spec.externalTrafficPolicy}} {{.spec.internalTrafficPolicy}}'"),
                endpoints,
                "dp service list   # the backends this node uses".to_string(),
            ],
        ),
        Reason::SourceRangeDenied => (
            "the client's address is outside the Service's loadBalancerSourceRanges",
            vec![
                format!("kubectl get svc -n {ns} {name} -o jsonpath='{{.spec.loadBalancerSourceRanges}}'"),
                explain,
            ],
        ),
        Reason::PortNotServed => (
            "the destination is a ClusterIP but the Service does not expose this port or \
             protocol (wrong port, or TCP vs UDP)",
            vec![
                "kubectl get svc -A -o wide   # the ports of the Service with this IP".to_string(),
                explain,
            ],
        ),
        Reason::UnallocatedClusterIp => (
            "the destination is in the Service CIDR but no Service has this address (the \
             Service was deleted, a stale DNS answer or a typo); kube-proxy's nftables mode \
             drops it too, rather than send it towards the default route",
            vec![
                "kubectl get svc -A -o wide   # is there a Service with this ClusterIP?"
                    .to_string(),
                "kubectl get servicecidrs   # the Service CIDRs".to_string(),
            ],
        ),
        Reason::NodeToOwnAddress => (
            "a process on this node connecting to one of the node's own addresses (its \
             NodePort on its node IP): the kernel sends it over loopback, where no dp \
             program runs, so the node's stack answers (a reset) instead of the Service; \
             kube-proxy serves it from its OUTPUT chain. Use the ClusterIP from the node",
            vec!["kubectl get svc -A -o wide   # the Service's ClusterIP".to_string()],
        ),
        Reason::RejectRateLimited | Reason::ResetRateLimited => (
            "more packets to be answered (REJECT's ICMP port unreachable, resets to removed \
             backends) than the agent's reply budget allows on this CPU: this one was dropped \
             unanswered, as the kernel's ICMP rate limit would do; the client retries or \
             times out",
            vec![
                "dp stats   # reject_rate_limited, reset_rate_limited".to_string(),
                "dp agent --reply-rate-limit N --reply-burst B   # per CPU; 0: no limit"
                    .to_string(),
            ],
        ),
        Reason::BackendGoneClosed => (
            "the connection's backend was removed from the Service and the client closed \
             the connection with a reset: it was passed on to the backend, kept retired for \
             this, so the backend's end closes too",
            vec![endpoints.clone(), format!("dp ct list --service {ns}/{name}")],
        ),
        Reason::BackendGoneReset => (
            "the connection's backend was removed from the Service (pod deleted or no longer \
             serving); the client got a TCP reset and must reconnect",
            vec![endpoints, format!("dp ct list --service {ns}/{name}")],
        ),
        Reason::ConntrackFull => (
            "the conntrack table could not take the new flow",
            vec![
                "dp status   # map fill levels".to_string(),
                "dp agent --map-size-conntrack N   # a bigger table".to_string(),
            ],
        ),
        Reason::NatPortsExhausted => (
            "no free source port on the node address for masquerading this flow",
            vec!["dp ct list --ip NODE_IP   # flows using the node address".to_string()],
        ),
        Reason::ServiceInconsistent => (
            "a service slot or backend entry is missing: the maps were being rewritten or a \
             writer broke the write order",
            vec!["dp service list".to_string(), "dp status".to_string()],
        ),
        Reason::NoRouteToBackend => (
            "the node has no route to the backend's address",
            vec!["ip route get BACKEND_IP".to_string(), explain],
        ),
        Reason::Malformed | Reason::PacketLoadFailed => (
            "the packet's headers are cut short or inconsistent; the kernel would drop it too",
            vec!["dp trace -w FILE.pcapng   # look at the headers".to_string()],
        ),
        Reason::RejectFailed
        | Reason::RewriteFailed
        | Reason::PacketStoreFailed
        | Reason::ChecksumUpdateFailed
        | Reason::RedirectFailed => (
            "the datapath could not rewrite or send the packet (resizing, storing bytes, a \
             checksum update or a redirect failed); the agent's log has a line from the \
             datapath about it",
            vec!["dp stats".to_string()],
        ),
        _ => ("dp dropped this packet", vec![explain, "dp stats".to_string()]),
    };
    Hint {
        cause: cause.to_string(),
        next,
    }
}
