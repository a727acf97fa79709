//! Control plane at scale: N services x 10 endpoints (N = 10 000, or
//! `DP_BENCH_SERVICES`). Library level: translation and map programming,
//! initial and for 100 one-endpoint changes (p50/p99), the full way (the
//! whole state translated and diffed) and the incremental way the agent
//! takes (the changed slice only). Agent level: the real
//! `dp agent --manifests` process in a throwaway namespace: time to the
//! first sync, an edited file to the next sync, its RSS, and the kernel
//! memory of its maps. Prints a markdown table (see BENCHMARKS.md).
//!
//! Run as root: `cargo xtask bench` (or `cargo bench -p dp --bench control_plane`).

use std::{
    fs,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use dp::{
    source::manifests::{self, Objects},
    translate::sync::MapWriter,
    translate::{incremental::IncrementalTranslation, translate, NodeInfo, TranslateOptions},
    Datapath, MapSizes,
};

const ENDPOINTS: usize = 10;
const CHANGES: usize = 100;

fn services() -> usize {
    std::env::var("DP_BENCH_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// The YAML of service `i` and its slice; `shift` moves one endpoint.
fn service_yaml(i: usize, shift: usize) -> String {
    let vip = Ipv4Addr::from(0x0a60_0000 + i as u32 + 1); // 10.96.x.y
    let mut endpoints = String::new();
    for e in 0..ENDPOINTS {
        // A moved endpoint takes an address of its own (10.250.x.y; the
        // others use 10.244.0.0 up to 10.245.134.159 at 10 000 services).
        let ip = if e == 0 && shift > 0 {
            Ipv4Addr::from(0x0afa_0000 + (i * 128 + shift) as u32)
        } else {
            Ipv4Addr::from(0x0af4_0000 + (i * ENDPOINTS + e) as u32)
        };
        endpoints.push_str(&format!(
            "- {{addresses: [{ip}], nodeName: node{}}}\n",
            e % 3 + 1
        ));
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\n\
         spec:\n  clusterIP: {vip}\n  ports: [{{name: http, port: 80}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: s{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}---\n"
    )
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn sizes(n: usize) -> MapSizes {
    let n = n as u32;
    MapSizes {
        services: (n * (ENDPOINTS as u32 + 2)).next_power_of_two(),
        backends: (n * ENDPOINTS as u32).next_power_of_two(),
        revnat: n.next_power_of_two().max(1024),
        conntrack: common::map_sizes::CT,
        affinity: common::map_sizes::AFFINITY,
    }
}

fn main() {
    e2e::require_root();
    let n = services();
    let node = NodeInfo {
        name: "node1".into(),
        ips: vec![Ipv4Addr::new(172, 18, 0, 2).into()],
        zone: None,
    };
    let options = TranslateOptions::default();
    let mut rows: Vec<(String, String)> = Vec::new();

    // Library level.
    let yaml: String = (0..n).map(|i| service_yaml(i, 0)).collect();
    let t = Instant::now();
    let mut objects = Objects::default();
    manifests::load_str(&yaml, "bench", &mut objects);
    rows.push(("parse manifests (YAML)".into(), ms(t.elapsed())));
    assert_eq!(objects.services.len(), n);
    let t = Instant::now();
    let desired = translate(&objects.services, &objects.slices, &node, &options);
    rows.push(("translate, initial".into(), ms(t.elapsed())));
    assert_eq!(desired.frontends.len(), n);
    let mut dp = Datapath::load_with(sizes(n)).expect("load (root)");
    let mut writer = MapWriter::new();
    let t = Instant::now();
    let stats = writer.apply(&mut dp, &desired).unwrap();
    rows.push((
        "program the maps, initial (from empty)".into(),
        ms(t.elapsed()),
    ));
    assert!(
        stats.not_programmed.is_empty(),
        "{:?}",
        &stats.not_programmed[..1]
    );
    let (mut translate_times, mut apply_times) = (Vec::new(), Vec::new());
    for c in 0..CHANGES {
        let i = (c * 7919) % n;
        let mut changed = Objects::default();
        manifests::load_str(&service_yaml(i, c + 1), "change", &mut changed);
        objects.slices[i] = changed.slices.remove(0);
        let t = Instant::now();
        let desired = translate(&objects.services, &objects.slices, &node, &options);
        translate_times.push(t.elapsed());
        let t = Instant::now();
        let s = writer.apply(&mut dp, &desired).unwrap();
        apply_times.push(t.elapsed());
        assert_eq!(
            (s.frontends_written, s.backends_written, s.backends_removed),
            (1, 1, 1),
            "change {c} of service {i}: {s:?}"
        );
    }
    rows.push((
        format!("one-endpoint change: map writer (diff of the whole state + writes), p50 / p99 ({CHANGES} changes)"),
        format!(
            "{} / {}",
            ms(percentile(&mut apply_times, 0.5)),
            ms(percentile(&mut apply_times, 0.99))
        ),
    ));
    rows.push((
        "one-endpoint change: full re-translation, p50 / p99".to_string(),
        format!(
            "{} / {}",
            ms(percentile(&mut translate_times, 0.5)),
            ms(percentile(&mut translate_times, 0.99))
        ),
    ));
    // The agent's path: the changed slice alone translated, and only its
    // frontend's entries compared and written.
    let mut translation = IncrementalTranslation::new(node.clone(), options.clone());
    translation.replace_services(objects.services.clone());
    translation.replace_slices(objects.slices.clone());
    let everything = translation.take_changes();
    let s = writer
        .apply_changes(&mut dp, translation.desired(), &everything.frontends)
        .unwrap();
    assert!(s.is_empty(), "the same state: nothing to write: {s:?}");
    writer.write_names(&mut dp).unwrap();
    let (mut translate_times, mut apply_times) = (Vec::new(), Vec::new());
    for c in 0..CHANGES {
        let i = (c * 7919) % n;
        let mut changed = Objects::default();
        // Shift 127: another address than the full loop's (c + 1), and of
        // this service's own (10.250.0.0 + i * 128 + shift).
        manifests::load_str(&service_yaml(i, 127), "change", &mut changed);
        let slice = changed.slices.remove(0);
        let t = Instant::now();
        translation.upsert_slice(slice);
        let changes = translation.take_changes();
        translate_times.push(t.elapsed());
        let t = Instant::now();
        let s = writer
            .apply_changes(&mut dp, translation.desired(), &changes.frontends)
            .unwrap();
        writer.write_names(&mut dp).unwrap();
        apply_times.push(t.elapsed());
        assert_eq!(
            (s.frontends_written, s.backends_written, s.backends_removed),
            (1, 1, 1),
            "incremental change {c} of service {i}: {s:?}"
        );
    }
    rows.push((
        format!("one-endpoint change, incremental: map writer (the changed frontend's entries + writes + names), p50 / p99 ({CHANGES} changes)"),
        format!(
            "{} / {}",
            ms(percentile(&mut apply_times, 0.5)),
            ms(percentile(&mut apply_times, 0.99))
        ),
    ));
    rows.push((
        "one-endpoint change, incremental: translation of the changed slice, p50 / p99".to_string(),
        format!(
            "{} / {}",
            ms(percentile(&mut translate_times, 0.5)),
            ms(percentile(&mut translate_times, 0.99))
        ),
    ));
    let memory = dp.map_memory().unwrap();
    let total: u64 = memory.iter().map(|(_, b)| b).sum();
    for (name, bytes) in &memory {
        if ["DP_SERVICES", "DP_BACKENDS", "DP_REVNAT", "DP_CT"].contains(&name.as_str()) {
            rows.push((
                format!("map memory {name}"),
                format!("{:.1} MiB", *bytes as f64 / 1048576.0),
            ));
        }
    }
    rows.push((
        "map memory, all maps".into(),
        format!("{:.1} MiB", total as f64 / 1048576.0),
    ));
    drop(dp);

    agent_level(n, &mut rows);

    println!("\ncontrol plane, {n} services x {ENDPOINTS} endpoints\n");
    println!("| measure | value |\n| --- | ---: |");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
}

/// The real agent process in a throwaway namespace, attached to its one veth.
fn agent_level(n: usize, rows: &mut Vec<(String, String)>) {
    let topo = e2e::Topology::pair("node", "unused", "10.199.0").unwrap();
    let root = std::env::temp_dir().join(format!("dp-bench-{}", std::process::id()));
    let dir = root.join("manifests");
    let bpffs = root.join("bpffs");
    fs::create_dir_all(&dir).unwrap();
    let per_file = 100;
    for f in 0..n.div_ceil(per_file) {
        let text: String = (f * per_file..((f + 1) * per_file).min(n))
            .map(|i| service_yaml(i, 0))
            .collect();
        fs::write(dir.join(format!("s{f:04}.yaml")), text).unwrap();
    }
    // What the agent's cache costs per sync: the first load parses every
    // file; a reload with nothing changed stats them and expands the
    // endpoints it keeps compact.
    let mut cache = manifests::ManifestCache::default();
    let t = Instant::now();
    assert_eq!(cache.load_dir(&dir).unwrap().services.len(), n);
    rows.push((
        format!(
            "manifest cache: first load ({} files)",
            n.div_ceil(per_file)
        ),
        ms(t.elapsed()),
    ));
    let t = Instant::now();
    assert_eq!(cache.load_dir(&dir).unwrap().slices.len(), n);
    rows.push((
        "manifest cache: reload, nothing changed".into(),
        ms(t.elapsed()),
    ));
    drop(cache);
    let s = sizes(n);
    let started = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", topo.ns("node").path().display()))
        .arg(env!("CARGO_BIN_EXE_dp"))
        .args(["agent", "--node-name", "node1", "--node-ip", "172.18.0.2"])
        // The pair's device: the namespace has no default route to take
        // it from.
        .args(["--devices", "eth0", "--xdp", "off"])
        .arg("--manifests")
        .arg(&dir)
        .arg("--bpffs")
        .arg(&bpffs)
        .args(["--map-size-services", &s.services.to_string()])
        .args(["--map-size-backends", &s.backends.to_string()])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start dp agent");
    let (tx, log) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let synced = |log: &mpsc::Receiver<String>| loop {
        let line = log
            .recv_timeout(Duration::from_secs(300))
            .expect("agent sync");
        if line.contains("synced") {
            break line;
        }
    };
    let first = synced(&log);
    rows.push((
        "agent: start to first sync (read, parse, translate, program)".into(),
        ms(started.elapsed()),
    ));
    assert!(first.contains(&format!("frontends={n}")), "{first}");
    let rss = fs::read_to_string(format!("/proc/{}/status", child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    rows.push(("agent RSS after the first sync".into(), rss));
    let mut edits = Vec::new();
    for c in 0..5 {
        let text: String = (0..per_file.min(n))
            .map(|i| service_yaml(i, (i == c) as usize * (c + 1)))
            .collect();
        let t = Instant::now();
        fs::write(dir.join("s0000.yaml"), text).unwrap();
        synced(&log);
        edits.push(t.elapsed());
    }
    rows.push((
        "agent: one file edited to synced (median of 5)".into(),
        ms(percentile(&mut edits, 0.5)),
    ));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = dp::kernel::pin::cleanup(&bpffs);
    let c = std::ffi::CString::new(bpffs.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    let _ = fs::remove_dir_all(&root);
}
