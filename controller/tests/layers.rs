//! The module groups of `controller/src` are layered (lib.rs, ARCHITECTURE.md):
//! a group uses only the groups below it. This test reads the sources and
//! fails on an import that goes up or sideways, so the layout stays what the
//! folders say. No root needed.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// Bottom to top; each group may use the ones before it.
const LAYERS: [&str; 8] = [
    "error",
    "translate",
    "source",
    "kernel",
    "inspect",
    "agent",
    "kube_proxy",
    "lab",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a source text names through `crate::`.
fn crate_uses(text: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::x, b::{y, z}}`: the first name of each item.
            let (mut depth, mut item_start) = (0usize, 0usize);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        used.insert(ident(&group[item_start..j]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        used.insert(ident(&group[item_start..j]));
                        item_start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            used.insert(ident(rest));
        }
    }
    used.remove("");
    used
}

#[test]
fn groups_use_only_the_groups_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let group = first.trim_end_matches(".rs");
        let Some(level) = LAYERS.iter().position(|l| *l == group) else {
            // lib.rs, main.rs and the bench binary sit above every group.
            continue;
        };
        checked += 1;
        for used in crate_uses(&fs::read_to_string(file).unwrap()) {
            match LAYERS.iter().position(|l| *l == used) {
                Some(u) if u < level || used == group => {}
                _ => wrong.push(format!("{} uses crate::{used}", rel.display())),
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} files checked: is src/ laid out in groups?"
    );
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_reader_sees_grouped_and_nested_imports() {
    let uses = crate_uses(
        "use crate::{error::Result, kernel::{pin, Datapath}};\nlet x = crate::lab::up();",
    );
    assert_eq!(
        uses.into_iter().collect::<Vec<_>>(),
        ["error", "kernel", "lab"]
    );
}
