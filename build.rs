//! Rebuilds the crate when a migration is added or changed (`sqlx::migrate!` embeds
//! `migrations/` at compile time, and cargo does not watch that directory by itself), and
//! records the git revision the binary is built from (`unknown` outside a checkout).

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    let revision = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .is_some_and(|output| !output.stdout.is_empty());
    let revision = if dirty && revision != "unknown" {
        format!("{revision}-modified")
    } else {
        revision
    };
    println!("cargo:rustc-env=OUTBOX_RELAY_GIT_REVISION={revision}");
    // A new commit moves HEAD or the branch it names; a plain checkout has both as files.
    for watched in [".git/HEAD", ".git/index", ".git/refs", ".git/packed-refs"] {
        if Path::new(watched).exists() {
            println!("cargo:rerun-if-changed={watched}");
        }
    }
}
