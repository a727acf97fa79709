//! Where the agent's memory goes on its manifest path: the process's RSS
//! (after `malloc_trim`) at each stage of a first sync, the maps replaced
//! by a writer that keeps nothing. No root needed.
//!
//! ```text
//! target/release/dp-bench write-input --services 10000 /tmp/dp-input
//! cargo run --release -p dp --example agent_memory -- /tmp/dp-input
//! ```

use std::{net::SocketAddr, time::Instant};

use dp::{
    source::manifests::ManifestCache,
    translate::{
        incremental::IncrementalTranslation,
        sync::{BackendSlots, Frontend, MapWriter, ProgrammedServices, ServiceMaps},
        NodeInfo, TranslateOptions,
    },
};

/// Maps that keep nothing: what is measured is the agent's own state.
struct Discard;

impl ServiceMaps for Discard {
    fn set_backend(&mut self, _: u32, _: SocketAddr, _: u8, _: bool) -> dp::error::Result<()> {
        Ok(())
    }
    fn remove_backend(&mut self, _: u32) -> dp::error::Result<()> {
        Ok(())
    }
    fn set_service(&mut self, _: &Frontend, _: u32, _: &BackendSlots) -> dp::error::Result<()> {
        Ok(())
    }
    fn remove_service(&mut self, _: &Frontend) -> dp::error::Result<()> {
        Ok(())
    }
    fn set_name(&mut self, _: u32, _: u32, _: &str) -> dp::error::Result<()> {
        Ok(())
    }
    fn remove_name(&mut self, _: u32, _: u32) -> dp::error::Result<()> {
        Ok(())
    }
    fn read_services(&mut self) -> dp::error::Result<ProgrammedServices> {
        Ok(ProgrammedServices::default())
    }
}

fn stage(started: Instant, what: &str) {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap_or("?")
        .trim();
    println!(
        "{what:<44} {rss:>12}  {:>7.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
}

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: agent_memory DIR (from `dp-bench write-input`)");
        std::process::exit(2);
    };
    let dir = std::path::Path::new(&dir);
    let started = Instant::now();
    stage(started, "start");
    let mut cache = ManifestCache::default();
    let objects = cache.load_dir(dir).expect("reading the manifests").clone();
    stage(started, "manifests parsed (the cache)");
    // The node and options dp-bench gives the agent.
    let node = NodeInfo {
        name: "node1".into(),
        ips: vec!["172.18.0.2".parse().expect("an address")],
        zone: None,
    };
    let mut translation = IncrementalTranslation::new(node, TranslateOptions::default());
    translation.replace_shared_services(objects.services.iter().cloned());
    translation.replace_compact_slices(objects.slices.iter().cloned());
    drop(objects);
    stage(started, "translated (objects shared with the cache)");
    let changes = translation.take_changes();
    let mut writer = MapWriter::new();
    writer
        .apply_changes(&mut Discard, translation.desired(), &changes.frontends)
        .expect("writing to nothing");
    writer
        .write_names(&mut Discard)
        .expect("writing to nothing");
    drop(changes);
    stage(started, "written (the map writer's record)");
    drop(writer);
    stage(started, "map writer dropped");
    drop(translation);
    stage(started, "translation dropped");
    drop(cache);
    stage(started, "cache dropped");
}
