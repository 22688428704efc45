//! Records the commit the binary is built from, for `regiongate_build_info` and `SHOW VERSION`: the work tree's
//! `HEAD` when there is one, else `unknown` (a source tarball, `cargo install` from a copy).
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|commit| !commit.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=REGIONGATE_COMMIT={commit}");
    // Built again when HEAD moves: a checkout changes HEAD, a commit the branch it names.
    let head = std::path::Path::new("../.git/HEAD");
    if head.exists() {
        println!("cargo:rerun-if-changed=../.git/HEAD");
        if let Some(branch) = std::fs::read_to_string(head)
            .ok()
            .and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_string()))
        {
            println!("cargo:rerun-if-changed=../.git/{branch}");
        }
    } else {
        println!("cargo:rerun-if-changed=build.rs");
    }
}
