//! The layers ARCHITECTURE.md describes, kept by a test: `virtio/` knows virtqueues, guest
//! memory and the request format, and hands typed requests to the block device layer
//! (`route`); it must not reach past it into replication, peers, the cluster or storage.

use std::path::Path;

/// Modules `src/virtio/` must not name.
const BELOW_ROUTE: &[&str] = &[
    "peer",
    "peers",
    "holder",
    "replica",
    "cluster",
    "store",
    "disk",
    "engine",
    "ownership",
    "meta",
    "copies",
    "service",
    "daemon",
    "placement",
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::NAME` and `cormorant::NAME` a file names, with its line.
fn named_modules(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        for prefix in ["crate::", "cormorant::"] {
            let mut rest = line;
            while let Some(at) = rest.find(prefix) {
                rest = &rest[at + prefix.len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                found.push((n + 1, name));
            }
        }
    }
    found
}

#[test]
fn virtio_names_nothing_below_the_block_device_layer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/virtio");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() >= 5, "found only {files:?}");
    let mut violations = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (line, module) in named_modules(&text) {
            if BELOW_ROUTE.contains(&module.as_str()) {
                violations.push(format!("{}:{line}: crate::{module}", file.display()));
            }
        }
        // `super::super::...` out of the folder would get around the check above.
        assert!(
            !text.contains("super::super::super"),
            "{} reaches out of virtio/ through super::",
            file.display()
        );
    }
    assert!(
        violations.is_empty(),
        "virtio/ must hand requests to `route` and know nothing below it:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_check_sees_a_violation() {
    let found = named_modules("use crate::peer::Request; let x = crate::route::IoVecs;");
    let names: Vec<_> = found.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(names, ["peer", "route"]);
}
