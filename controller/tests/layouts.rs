//! The version guard of the pinned maps' layouts (issue 21): every pinned
//! map's description (`common::layout::describe`) covers its types
//! exactly, and matches the line recorded for its version in
//! `common/layouts.lock`, so a change to a key, value, type or flags
//! without a version bump fails here. New versions are appended with
//! `UPDATE_LAYOUTS=1 cargo test -p dp --test layouts`; recorded lines are
//! never rewritten (agents in the field have them).

use std::path::PathBuf;

use common::layout::describe;
use dp::{
    kernel::{
        layout::{check_fields, check_lock, fingerprint},
        loader::{wanted_shapes, PINNED_MAPS},
    },
    MapSizes,
};

fn lock_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../common/layouts.lock")
}

/// This dp's line for every pinned map, and any description that does not
/// cover its type.
fn current() -> (Vec<String>, Vec<String>) {
    let shapes = wanted_shapes(&MapSizes::default()).expect("the object's maps");
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    for name in PINNED_MAPS {
        let d = describe(name).unwrap_or_else(|| panic!("{name} has no description"));
        let shape = shapes[name];
        // A ring's records are trace events; other maps' values are theirs.
        let value_size = if common::map_names::TRACE_RINGS.contains(&name) {
            size_of::<common::TraceEvent>() as u32
        } else {
            assert_eq!(
                (d.layout.key_size, d.layout.value_size),
                (shape.key_size, shape.value_size),
                "{name}: the description's sizes are not the object's"
            );
            d.layout.value_size
        };
        errors.extend(check_fields(name, &d, value_size));
        lines.push(fingerprint(name, &shape, &d));
    }
    (lines, errors)
}

#[test]
fn every_pinned_map_layout_is_described_and_recorded_for_its_version() {
    let (lines, errors) = current();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let lock = std::fs::read_to_string(lock_path()).unwrap_or_default();
    let mut problems = check_lock(&lock, &lines);
    if std::env::var_os("UPDATE_LAYOUTS").is_some() {
        // Only new versions are added: a changed line stays an error.
        let new: Vec<&String> = lines
            .iter()
            .filter(|l| {
                check_lock(&lock, std::slice::from_ref(l))
                    .iter()
                    .all(|e| e.contains("not recorded"))
            })
            .filter(|l| !lock.lines().any(|r| r == l.as_str()))
            .collect();
        if !new.is_empty() {
            let mut text = if lock.is_empty() {
                "# Layouts of dp's pinned maps, one line per map and version; appended by\n\
                 # `UPDATE_LAYOUTS=1 cargo test -p dp --test layouts`, never rewritten.\n"
                    .to_string()
            } else {
                lock.clone()
            };
            for l in new {
                text.push_str(l);
                text.push('\n');
            }
            std::fs::write(lock_path(), text).unwrap();
        }
        let lock = std::fs::read_to_string(lock_path()).unwrap();
        problems = check_lock(&lock, &lines);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_guard_fails_when_a_map_type_changes_without_a_bump() {
    let shapes = wanted_shapes(&MapSizes::default()).expect("the object's maps");
    let name = common::map_names::CT;
    let d = describe(name).unwrap();
    let recorded = fingerprint(name, &shapes[name], &d);
    let lock = format!("{recorded}\n");
    assert!(check_lock(&lock, std::slice::from_ref(&recorded)).is_empty());

    // Two value fields swap places (field order), same version: caught.
    let mut swapped = describe(name).unwrap();
    let fields = swapped.layout.fields.as_mut_slice();
    let a = fields
        .iter()
        .position(|f| f.name() == b"backend_id")
        .unwrap();
    let b = fields
        .iter()
        .position(|f| f.name() == b"service_id")
        .unwrap();
    let (oa, ob) = (fields[a].offset, fields[b].offset);
    fields[a].offset = ob;
    fields[b].offset = oa;
    let line = fingerprint(name, &shapes[name], &swapped);
    let errors = check_lock(&lock, std::slice::from_ref(&line));
    assert!(
        errors.len() == 1 && errors[0].contains("changed without a version bump"),
        "{errors:?}"
    );

    // The value grows by a field (size), same version: caught, and the
    // description no longer covers the value it claims.
    let mut grown = describe(name).unwrap();
    grown.layout.value_size += 8;
    let line = fingerprint(name, &shapes[name], &grown);
    assert!(check_lock(&lock, std::slice::from_ref(&line))[0].contains("without a version bump"));
    assert!(!check_fields(name, &grown, grown.layout.value_size).is_empty());

    // The map type changes (hash for LRU), same version: caught.
    let mut other_type = shapes[name];
    other_type.map_type = 1;
    let line = fingerprint(name, &other_type, &d);
    assert!(check_lock(&lock, std::slice::from_ref(&line))[0].contains("without a version bump"));

    // With a bump, the guard asks for the new version to be recorded.
    let mut bumped = swapped;
    bumped.layout.version += 1;
    let line = fingerprint(name, &shapes[name], &bumped);
    assert!(check_lock(&lock, std::slice::from_ref(&line))[0].contains("not recorded"));
    assert!(check_lock(&format!("{lock}{line}\n"), &[line]).is_empty());
}
