//! The module layering, read from the source: each module imports only modules of lower
//! layers, so the import graph has no cycle and no upward edge. A new module must be given
//! a layer here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// From the bottom up. A module may import any module of a lower layer, none of its own
/// layer or above.
const LAYERS: &[&[&str]] = &[
    &["model", "build"],
    &["config", "encode"],
    &["telemetry"],
    &["store", "kafka"],
    &["lease", "wake", "retention"],
    &["proof"],
    &["relay"],
    &["http", "systemd"],
    &["app"],
    &["cli"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level module a source file belongs to: `src/relay/batch.rs` → `relay`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// Every `crate::name` a source text refers to outside comments.
fn crate_references(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '{')
                .collect();
            names.insert(name);
        }
    }
    names
}

/// `(importer, imported)` pairs that break the layering, and references that name no
/// known module (a `crate::{...}` group, or a module without a layer).
fn violations(modules: &[(String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (module, text) in modules {
        let Some(own) = layer(module) else {
            found.push(format!(
                "src/{module} has no layer in tests/architecture.rs"
            ));
            continue;
        };
        for imported in crate_references(text) {
            if imported == *module {
                continue;
            }
            match layer(&imported) {
                Some(theirs) if theirs < own => {}
                Some(_) => found.push(format!(
                    "{module} (layer {own}) imports {imported}, which is not below it"
                )),
                None => found.push(format!(
                    "{module} refers to crate::{imported}, which is not a layered module (name the module, not a re-export or a group)"
                )),
            }
        }
    }
    found
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_imports_its_own_layer_or_above() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let modules: Vec<(String, String)> = files
        .iter()
        .filter_map(|file| {
            let module = module_of(&src, file)?;
            Some((module, std::fs::read_to_string(file).expect("read source")))
        })
        .collect();
    assert!(
        modules.iter().any(|(m, _)| m == "relay") && modules.len() > 10,
        "the source tree was not found"
    );
    let found = violations(&modules);
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}

#[test]
fn an_upward_or_sideways_import_is_reported() {
    let source = |module: &str, text: &str| (module.to_string(), text.to_string());
    assert!(violations(&[source("store", "use crate::model::OutboxRow;")]).is_empty());
    assert_eq!(
        violations(&[source("store", "use crate::relay::Relay;")]).len(),
        1,
        "store importing relay is upward"
    );
    assert_eq!(
        violations(&[source("store", "use crate::kafka::producer;")]).len(),
        1,
        "store importing kafka is sideways"
    );
    assert_eq!(
        violations(&[source("cli", "use crate::{App, telemetry};")]).len(),
        1,
        "a group hides what it imports"
    );
    assert!(
        violations(&[source("store", "// crate::relay in a comment")]).is_empty(),
        "comments are not imports"
    );
    assert_eq!(
        violations(&[source("newroom", "")]).len(),
        1,
        "a module needs a layer"
    );
}
