//! Builds the plugins workspace for wasm32-wasip2 and the JavaScript and Python example plugins, and tells the
//! tests where the components are (`TERN_PLUGIN_<NAME>` environment variables at compile time).

// A build script reports failure by panicking.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// (package, file stem) of every plugin the tests use.
const PLUGINS: [(&str, &str); 5] = [
    ("file-path", "file_path"),
    ("redis-plugin", "redis_plugin"),
    ("http-api", "http_api"),
    ("chaos", "chaos"),
    ("acme-gate", "acme_gate"),
];

/// Builds plugins of the plugins workspace for wasm32-wasip2 (release) into `target_dir`.
fn cargo_wasm(plugins: &Path, target_dir: &Path, packages: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    // Cargo reads .cargo/config.toml from the current directory, not the manifest's: name the target explicitly.
    command.current_dir(plugins).args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"]);
    command.arg(plugins.join("Cargo.toml")).args(packages);
    // The outer build's settings (flags, wrappers, target dir, profile) must not leak into the wasm build.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_MAKEFLAGS")
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            command.env_remove(key.as_ref());
        }
    }
    command.env("CARGO_TARGET_DIR", target_dir);
    let status = command.status().expect("running cargo for the plugins");
    assert!(status.success(), "building the plugins failed (is the wasm32-wasip2 target installed?)");
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("tests/ sits in the repository root").to_path_buf();
    for watched in [
        "plugins/Cargo.toml",
        "plugins/Cargo.lock",
        "plugins/file-path",
        "plugins/redis",
        "plugins/http-api",
        "plugins/testing",
        "guest-sdk",
        "wit",
        "examples/plugins",
        "tests/fixtures/contract-0.1",
        "scripts/build-polyglot.sh",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let plugins = root.join("plugins");
    let target_dir = plugins.join("target");
    // Every shipped plugin and the acme-gate test plugin against the current contract (0.2), and the chaos plugin,
    // unchanged 0.1 source, against 0.1 (the SDK's `contract-0-1` feature): the tests that use it prove 0.1
    // components keep running.
    // Two cargo runs, because features unify within one.
    cargo_wasm(&plugins, &target_dir, &["--workspace", "--exclude", "chaos"]);
    cargo_wasm(&plugins, &target_dir, &["-p", "chaos", "--features", "tern-guest/contract-0-1"]);
    for (package, stem) in PLUGINS {
        let path = target_dir.join("wasm32-wasip2/release").join(format!("{stem}.wasm"));
        assert!(Path::new(&path).is_file(), "{package}: {} missing after the build", path.display());
        println!("cargo:rustc-env=TERN_PLUGIN_{}={}", stem.to_uppercase(), path.display());
    }
    // The JavaScript and Python example plugins, built by their own toolchains (npm, PyPI), and their frozen 0.1
    // sources (tests/fixtures/contract-0.1) against 0.1, in the order build-polyglot.sh prints them.
    let output = Command::new("bash")
        .arg(root.join("scripts/build-polyglot.sh"))
        .output()
        .expect("running scripts/build-polyglot.sh");
    assert!(
        output.status.success(),
        "building the JavaScript and Python plugins failed (scripts/setup.sh test installs node, npm and \
         python3-venv):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let paths = String::from_utf8_lossy(&output.stdout);
    let mut paths = paths.lines();
    for name in ["JS_REDIS", "PY_REDIS", "JS_REDIS_V0_1", "PY_REDIS_V0_1", "JS_REDIS_QJS"] {
        let path = paths.next().expect("build-polyglot.sh prints one path per plugin");
        assert!(Path::new(path).is_file(), "{path} missing after build-polyglot.sh");
        println!("cargo:rustc-env=TERN_PLUGIN_{name}={path}");
    }
}
