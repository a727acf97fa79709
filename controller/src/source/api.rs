//! Services, EndpointSlices and the agent's own Node from the Kubernetes API
//! (kube-rs reflectors: list, then watch from the list's resourceVersion,
//! with bookmarks; on 410 Gone a relist; on a dropped connection or an API
//! that is down, retries with backoff).
//!
//! Each reflector's events go to the agent loop as they are (`KubeChange`:
//! an object applied or deleted, or a kind relisted, whose store then holds
//! the complete set), so the agent translates what changed, not a snapshot
//! of everything. Nothing is synced before every store has completed
//! its first list: an API that is unreachable at start must not look like a
//! cluster without services (the pinned state stays: fail static).

use std::{
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice, networking::v1::ServiceCIDR,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::source::manifests::Objects;

/// The client configuration: `--kubeconfig`, else `KUBECONFIG` or
/// `~/.kube/config`, else in-cluster (service account token and CA).
pub async fn config(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Config> {
    Ok(match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    })
}

/// What one watch event tells the agent.
#[derive(Debug)]
pub enum KubeChange {
    Service(ObjectChange<Service>),
    Slice(ObjectChange<EndpointSlice>),
    Node(ObjectChange<Node>),
    /// A store completed its first list: maybe every store is ready now.
    Ready,
    /// The CIDRs of every ServiceCIDR object (networking.k8s.io/v1), after
    /// each change; sent only when the API serves that kind.
    ServiceCidrs(Vec<String>),
}

#[derive(Debug)]
pub enum ObjectChange<K> {
    /// Added or modified. (Boxed: the kinds differ much in size.)
    Applied(Box<K>),
    Deleted(Box<K>),
    /// The kind was listed again (at start, after 410 Gone): its store holds
    /// the complete set, which replaces what was known.
    Relisted,
}

/// The three stores, filled by background tasks.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    ready: Arc<AtomicUsize>,
}

const STORES: usize = 3;

impl KubeSource {
    /// Starts the reflectors; every event is sent on `changed`.
    pub fn start(
        client: Client,
        node_name: &str,
        changed: mpsc::UnboundedSender<KubeChange>,
    ) -> Self {
        let ready = Arc::new(AtomicUsize::new(0));
        let node_fields = format!("metadata.name={node_name}");
        let services = reflect(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            KubeChange::Service,
            &changed,
            &ready,
        );
        let slices = reflect(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            KubeChange::Slice,
            &changed,
            &ready,
        );
        tokio::spawn(watch_service_cidrs(
            Api::<ServiceCIDR>::all(client.clone()),
            changed.clone(),
        ));
        let nodes = reflect(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&node_fields),
            KubeChange::Node,
            &changed,
            &ready,
        );
        KubeSource {
            services,
            slices,
            nodes,
            ready,
        }
    }

    /// Whether every store has completed its first list.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) == STORES
    }

    pub fn services(&self) -> Vec<Service> {
        self.services
            .state()
            .iter()
            .map(|o| (**o).clone())
            .collect()
    }

    pub fn slices(&self) -> Vec<EndpointSlice> {
        self.slices.state().iter().map(|o| (**o).clone()).collect()
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.nodes.state().iter().map(|o| (**o).clone()).collect()
    }

    /// The current objects (valid once `ready`).
    pub fn snapshot(&self) -> Objects {
        Objects {
            services: self
                .services
                .state()
                .iter()
                .map(|o| (**o).clone())
                .collect(),
            slices: self.slices.state().iter().map(|o| (**o).clone()).collect(),
            nodes: self.nodes.state().iter().map(|o| (**o).clone()).collect(),
            skipped: Vec::new(),
        }
    }
}

/// Follows the ServiceCIDR objects, if the API serves them (Kubernetes
/// 1.33 and later; not readable without RBAC for them): each change sends
/// the CIDRs of all of them. Not one of the stores the first sync waits
/// for: until it reports, traffic to unallocated ClusterIPs is handled as
/// with no Service CIDR known.
async fn watch_service_cidrs(api: Api<ServiceCIDR>, changed: mpsc::UnboundedSender<KubeChange>) {
    let mut wait = std::time::Duration::from_secs(1);
    loop {
        match api.list(&kube::api::ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 403 => {
                return info!(
                    status = s.code,
                    "ServiceCIDR objects (networking.k8s.io/v1) are not served or not readable: \
                     Service CIDRs come from --service-cidr"
                );
            }
            Err(e) => {
                warn!(error = %e, "listing ServiceCIDRs; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Err(e) => {
                warn!(kind = "ServiceCIDR", error = %e, "watch");
                continue;
            }
            Ok(_) => {}
        }
        let cidrs = store
            .state()
            .iter()
            .filter_map(|o| o.spec.as_ref()?.cidrs.clone())
            .flatten()
            .collect();
        if changed.send(KubeChange::ServiceCidrs(cidrs)).is_err() {
            return;
        }
    }
}

fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(ObjectChange<K>) -> KubeChange,
    changed: &mpsc::UnboundedSender<KubeChange>,
    ready: &Arc<AtomicUsize>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    let tx = changed.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            // The store has taken the event in before it is passed on here.
            let change = match event {
                Ok(watcher::Event::Apply(o)) => ObjectChange::Applied(Box::new(o)),
                Ok(watcher::Event::Delete(o)) => ObjectChange::Deleted(Box::new(o)),
                Ok(watcher::Event::InitDone) => ObjectChange::Relisted,
                // Buffered by the store until InitDone.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Err(e) => {
                    warn!(kind = %K::kind(&K::DynamicType::default()), error = %e, "watch");
                    continue;
                }
            };
            let _ = tx.send(wrap(change));
        }
    });
    let waiting = store.clone();
    let ready = ready.clone();
    let tx = changed.clone();
    tokio::spawn(async move {
        if waiting.wait_until_ready().await.is_ok() {
            ready.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(KubeChange::Ready);
        }
    });
    store
}
