//! The fake Kubernetes API server (`e2e::apiserver`) as a process, for
//! dp-bench's watch variant: dp-bench runs it in the node's network
//! namespace and drives it over stdin, so `dp` itself (dp-bench is one of
//! its binaries) links no test server.
//!
//! `fake-apiserver KUBECONFIG`: listens on 127.0.0.1, writes a kubeconfig
//! for it, prints `ready`. Then one JSON line per request on stdin:
//! `{"apply": OBJECT}` or `{"delete": OBJECT}`; each is answered with one
//! line, the resourceVersion of the event sent to the watchers (`0` for a
//! delete of an absent object). Ends at the end of stdin.

use std::io::{BufRead, Write};

use e2e::apiserver::FakeApiServer;

fn main() {
    let Some(kubeconfig) = std::env::args().nth(1) else {
        eprintln!("usage: fake-apiserver KUBECONFIG");
        std::process::exit(2);
    };
    let server = FakeApiServer::start().expect("start the fake API server");
    server
        .write_kubeconfig(std::path::Path::new(&kubeconfig))
        .expect("write the kubeconfig");
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")
        .and_then(|()| out.flush())
        .expect("stdout");
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let request: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("fake-apiserver: {e}: {line}");
                std::process::exit(2);
            }
        };
        let version = if let Some(object) = request.get("apply") {
            server.apply(object.clone())
        } else if let Some(object) = request.get("delete") {
            server.delete(object);
            0
        } else {
            eprintln!("fake-apiserver: neither apply nor delete: {line}");
            std::process::exit(2);
        };
        writeln!(out, "{version}")
            .and_then(|()| out.flush())
            .expect("stdout");
    }
}
