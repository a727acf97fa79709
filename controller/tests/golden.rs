//! Golden tests: manifests in, the translation and a dump of the maps as
//! programmed into the kernel out, compared with `expected.txt` in each case
//! directory under `tests/golden/`. The agent's node is `node1` (a Node
//! object in the case's manifests, if any).
//!
//! `UPDATE_GOLDEN=1 cargo test --test golden` rewrites the expected files;
//! review the diff by hand before committing it.

use std::{fs, path::Path};

use dp::{
    source::manifests,
    translate::sync::MapWriter,
    translate::{translate, NodeInfo, TranslateOptions},
    Datapath,
};

fn render(dir: &Path) -> String {
    let objects = manifests::load_dir(dir).unwrap();
    let node = objects
        .nodes
        .iter()
        .map(NodeInfo::from_node)
        .find(|n| n.name == "node1")
        .unwrap_or_else(|| NodeInfo {
            name: "node1".into(),
            ips: vec!["172.18.0.2".parse().unwrap()],
            zone: None,
        });
    let desired = translate(
        &objects.services,
        &objects.slices,
        &node,
        &TranslateOptions::default(),
    );
    let mut dp = Datapath::load().unwrap();
    let mut writer = MapWriter::new();
    writer.apply(&mut dp, &desired).unwrap();
    let maps = dp
        .dump(&writer.service_names(), &writer.backend_nodes())
        .unwrap();
    let mut skipped: Vec<String> = objects
        .skipped
        .iter()
        .chain(&desired.skipped)
        .map(|s| {
            let file = s.object.rsplit('/').next().unwrap_or(&s.object);
            let kind = if s.invalid { "invalid" } else { "not served" };
            format!("  {file}: {} ({kind})", s.reason)
        })
        .collect();
    skipped.sort();
    format!(
        "node: {} {:?} zone={:?}\n\ntranslation:\n{}\nmaps:\n{}\nskipped:\n{}\n",
        node.name,
        node.ips,
        node.zone,
        desired.summary(),
        maps,
        skipped.join("\n")
    )
}

#[test]
fn golden_cases() {
    e2e::require_root();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 9, "golden cases are missing: {cases:?}");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for case in &cases {
        let got = render(case);
        let expected_file = case.join("expected.txt");
        if update {
            fs::write(&expected_file, &got).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&expected_file).unwrap_or_default();
        if got != expected {
            failures.push(format!(
                "== {} differs ==\n--- expected\n{expected}\n--- got\n{got}",
                case.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
