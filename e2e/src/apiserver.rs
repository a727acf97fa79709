//! A fake Kubernetes API server for tests: real HTTP/1.1 (plain, or TLS
//! with a CA of its own, as a pod sees the API server) with the list/watch
//! wire format (JSON lists with `metadata.resourceVersion`; watches as a
//! chunked stream of `{"type": ..., "object": ...}` lines; bookmarks; a
//! 410 Gone `ERROR` event), for Services, EndpointSlices, Nodes and
//! ServiceCIDRs. Tests
//! change objects and misbehave on purpose: expire watches, drop
//! connections, be down.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::{
        mpsc::{self, Receiver, Sender},
        Arc, Mutex,
    },
    thread,
};

use serde_json::{json, Value};

use crate::{io_err, Netns, Result};

/// The collections served: (path, list kind, API version).
const COLLECTIONS: [(&str, &str, &str); 4] = [
    ("/api/v1/services", "ServiceList", "v1"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
        "discovery.k8s.io/v1",
    ),
    ("/api/v1/nodes", "NodeList", "v1"),
    (
        "/apis/networking.k8s.io/v1/servicecidrs",
        "ServiceCIDRList",
        "networking.k8s.io/v1",
    ),
];

#[derive(Default)]
struct State {
    resource_version: u64,
    /// path -> (namespace, name) -> object
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    watchers: Vec<(&'static str, Sender<Option<String>>)>,
    /// Every event (resourceVersion, collection, line): a watch from an
    /// older resourceVersion replays what it missed, as the API server does.
    history: Vec<(u64, &'static str, String)>,
    down: bool,
    /// As an API server before Kubernetes 1.33: ServiceCIDRs get 404.
    without_service_cidrs: bool,
    /// Request lines seen, e.g. `GET /api/v1/services?limit=500`.
    requests: Vec<String>,
    /// With a token, requests without `Authorization: Bearer <token>` get
    /// 401, as from the API server.
    token: Option<String>,
    /// `Authorization` headers seen.
    authorizations: Vec<String>,
}

pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

/// A CA and a server certificate it signed, in PEM, for a TLS server.
pub struct TlsFiles {
    /// The CA certificate: a pod's `ca.crt`.
    pub ca_pem: String,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl TlsFiles {
    /// A new CA, and a certificate for `ip` (an IP SAN) signed by it.
    pub fn for_ip(ip: std::net::IpAddr) -> Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let err = |e: rcgen::Error| crate::Error::Setup(format!("certificate: {e}"));
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fake-kubernetes-ca");
        let ca = ca_params.self_signed(&ca_key).map_err(err)?;
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.subject_alt_names = vec![SanType::IpAddress(ip)];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver");
        let cert = params.signed_by(&key, &ca, &ca_key).map_err(err)?;
        Ok(TlsFiles {
            ca_pem: ca.pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let err = |e: rustls::Error| crate::Error::Setup(format!("TLS: {e}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(err)?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(self.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .map_err(err)?;
        Ok(Arc::new(config))
    }
}

impl FakeApiServer {
    /// Listens on 127.0.0.1 in the caller's network namespace.
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("bind fake API server"))?;
        Ok(Self::serve(listener))
    }

    /// Listens on 127.0.0.1 inside `ns` (for an agent running there).
    pub fn start_in(ns: &Netns) -> Result<Self> {
        let listener = ns.run(|| TcpListener::bind("127.0.0.1:0"))?;
        Ok(Self::serve(
            listener.map_err(io_err("bind fake API server"))?,
        ))
    }

    /// Listens on 127.0.0.1 inside `ns` with TLS (`tls`'s certificate) and
    /// answers only requests bearing `token`: the API server as a pod's
    /// in-cluster config reaches it.
    pub fn start_tls_in(ns: &Netns, tls: &TlsFiles, token: &str) -> Result<Self> {
        let listener = ns.run(|| TcpListener::bind("127.0.0.1:0"))?;
        let server = Self::serve_with(
            listener.map_err(io_err("bind fake API server"))?,
            Some(tls.server_config()?),
        );
        server.state.lock().unwrap().token = Some(token.to_string());
        Ok(server)
    }

    fn serve(listener: TcpListener) -> Self {
        Self::serve_with(listener, None)
    }

    fn serve_with(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let addr = listener.local_addr().expect("bound");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let state = shared.clone();
                let tls = tls.clone();
                thread::spawn(move || match tls {
                    None => handle(conn, &state),
                    Some(config) => {
                        let Ok(session) = rustls::ServerConnection::new(config) else {
                            return;
                        };
                        handle(rustls::StreamOwned::new(session, conn), &state)
                    }
                });
            }
        });
        FakeApiServer { addr, state }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\n",
            self.addr
        );
        std::fs::write(path, text).map_err(io_err(format!("write {}", path.display())))
    }

    /// Adds or replaces an object (Service, EndpointSlice or Node), and
    /// tells the watchers; its new resourceVersion.
    pub fn apply(&self, mut object: Value) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.resource_version += 1;
        let rv = st.resource_version.to_string();
        object["metadata"]["resourceVersion"] = json!(rv);
        let path = collection_of(&object);
        let key = key_of(&object);
        let existed = st
            .objects
            .entry(path)
            .or_default()
            .insert(key, object.clone())
            .is_some();
        let kind = if existed { "MODIFIED" } else { "ADDED" };
        notify(&mut st, path, &json!({"type": kind, "object": object}));
        st.resource_version
    }

    /// Deletes an object, and tells the watchers.
    pub fn delete(&self, object: &Value) {
        let mut st = self.state.lock().unwrap();
        st.resource_version += 1;
        let path = collection_of(object);
        if let Some(mut old) = st.objects.entry(path).or_default().remove(&key_of(object)) {
            old["metadata"]["resourceVersion"] = json!(st.resource_version.to_string());
            notify(&mut st, path, &json!({"type": "DELETED", "object": old}));
        }
    }

    /// A BOOKMARK event on every watch.
    pub fn bookmark(&self) {
        let mut st = self.state.lock().unwrap();
        let rv = st.resource_version.to_string();
        for (path, kind, api) in COLLECTIONS {
            let kind = kind.trim_end_matches("List");
            let event = json!({"type": "BOOKMARK", "object": {
                "kind": kind, "apiVersion": api, "metadata": {"resourceVersion": rv}}});
            notify(&mut st, path, &event);
        }
    }

    /// Ends every watch with a 410 Gone ERROR event ("too old resource
    /// version"): clients must list again.
    pub fn expire_watches(&self) {
        let mut st = self.state.lock().unwrap();
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}});
        for (_, tx) in st.watchers.drain(..) {
            let _ = tx.send(Some(format!("{gone}\n")));
            let _ = tx.send(None);
        }
    }

    /// Cuts every watch connection without a word.
    pub fn drop_connections(&self) {
        let mut st = self.state.lock().unwrap();
        st.watchers.clear();
    }

    /// While down, every request gets 503 and watches are cut.
    pub fn set_down(&self, down: bool) {
        let mut st = self.state.lock().unwrap();
        st.down = down;
        if down {
            st.watchers.clear();
        }
    }

    /// Serves ServiceCIDR objects (the default, as Kubernetes 1.33 and
    /// later) or answers 404 for them (older API servers).
    pub fn serve_service_cidrs(&self, served: bool) {
        self.state.lock().unwrap().without_service_cidrs = !served;
    }

    /// Request lines so far (`GET /path?query`).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// `Authorization` header values so far (one per request that had one).
    pub fn authorizations(&self) -> Vec<String> {
        self.state.lock().unwrap().authorizations.clone()
    }
}

fn collection_of(object: &Value) -> &'static str {
    match object["kind"].as_str() {
        Some("Service") => COLLECTIONS[0].0,
        Some("EndpointSlice") => COLLECTIONS[1].0,
        Some("Node") => COLLECTIONS[2].0,
        Some("ServiceCIDR") => COLLECTIONS[3].0,
        other => panic!("the fake API server does not serve {other:?}"),
    }
}

fn key_of(object: &Value) -> (String, String) {
    let m = &object["metadata"];
    (
        m["namespace"].as_str().unwrap_or("").to_string(),
        m["name"].as_str().unwrap_or("").to_string(),
    )
}

fn notify(st: &mut State, path: &'static str, event: &Value) {
    let line = format!("{event}\n");
    let rv = st.resource_version;
    st.history.push((rv, path, line.clone()));
    st.watchers
        .retain(|(p, tx)| *p != path || tx.send(Some(line.clone())).is_ok());
}

/// One connection: requests until the client closes, or one watch stream.
fn handle<S: Read + Write>(conn: S, state: &Arc<Mutex<State>>) {
    let mut reader = BufReader::new(conn);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut content_length = 0usize;
        let mut authorization = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((&header, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => content_length = value.trim().parse().unwrap_or(0),
                "authorization" => authorization = Some(value.trim().to_string()),
                _ => {}
            }
        }
        let mut body = vec![0; content_length];
        let _ = reader.read_exact(&mut body);
        let conn = reader.get_mut();
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: BTreeMap<&str, &str> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let collection = COLLECTIONS.iter().find(|(p, _, _)| *p == path);
        let watch_rx = {
            let mut st = state.lock().unwrap();
            st.requests.push(format!("GET {target}"));
            if let Some(a) = &authorization {
                st.authorizations.push(a.clone());
            }
            if st.down {
                drop(st);
                let _ = respond(conn, 503, r#"{"kind":"Status","code":503}"#);
                return;
            }
            if let Some(token) = &st.token {
                if authorization.as_deref() != Some(&format!("Bearer {token}")) {
                    drop(st);
                    let _ = respond(
                        conn,
                        401,
                        r#"{"kind":"Status","code":401,"reason":"Unauthorized"}"#,
                    );
                    continue;
                }
            }
            let collection = collection
                .filter(|(p, _, _)| !(st.without_service_cidrs && *p == COLLECTIONS[3].0));
            let Some((path, list_kind, api)) = collection else {
                drop(st);
                let _ = respond(conn, 404, r#"{"kind":"Status","code":404}"#);
                continue;
            };
            if matches!(params.get("watch"), Some(&"true") | Some(&"1")) {
                let (tx, rx) = mpsc::channel();
                let since: u64 = params
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(st.resource_version);
                for (rv, p, line) in &st.history {
                    if *rv > since && p == path {
                        let _ = tx.send(Some(line.clone()));
                    }
                }
                st.watchers.push((path, tx));
                Some(rx)
            } else {
                let name_filter = params
                    .get("fieldSelector")
                    .map(|f| f.replace("%3D", "="))
                    .and_then(|f| f.strip_prefix("metadata.name=").map(str::to_string));
                let items: Vec<Value> = st
                    .objects
                    .get(path)
                    .into_iter()
                    .flat_map(|m| m.values())
                    .filter(|o| {
                        name_filter
                            .as_deref()
                            .is_none_or(|n| o["metadata"]["name"].as_str() == Some(n))
                    })
                    .cloned()
                    .collect();
                let list = json!({"kind": list_kind, "apiVersion": api,
                    "metadata": {"resourceVersion": st.resource_version.to_string()},
                    "items": items});
                drop(st);
                if respond(conn, 200, &list.to_string()).is_err() {
                    return;
                }
                None
            }
        };
        if let Some(rx) = watch_rx {
            stream_watch(conn, rx);
            return;
        }
    }
}

fn respond<S: Write>(conn: &mut S, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

/// A watch: chunked events until the server ends it (`None`) or drops it.
fn stream_watch<S: Write>(conn: &mut S, rx: Receiver<Option<String>>) {
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if conn.write_all(head.as_bytes()).is_err() || conn.flush().is_err() {
        return;
    }
    while let Ok(Some(line)) = rx.recv() {
        let chunk = format!("{:x}\r\n{line}\r\n", line.len());
        if conn.write_all(chunk.as_bytes()).is_err() || conn.flush().is_err() {
            return;
        }
    }
    // Ended (410) or dropped: a dropped watch closes without the last chunk
    // (the caller drops the connection).
}
