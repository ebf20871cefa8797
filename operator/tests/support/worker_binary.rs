//! The `signal-worker` binary for operator tests that run workers (local mode, worker pods).
//!
//! It comes from another package, and cargo builds a package's binaries only for that package's
//! own integration tests, so `cargo test -p signal-operator` alone would not have it.
//! [`worker_binary`] therefore runs `cargo build -p signal-worker` (same profile and target
//! directory as this test) once per test process: a no-op when it is up to date, and it never
//! runs a stale worker after a worker edit, which merely looking next to the operator binary
//! could. `SIGNAL_WORKER_BINARY` skips the build and names the binary instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const OPERATOR: &str = env!("CARGO_BIN_EXE_signal-operator");

/// The `signal-worker` binary, built if needed (see the module comment for why).
pub fn worker_binary() -> PathBuf {
    static WORKER: OnceLock<PathBuf> = OnceLock::new();
    WORKER
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("SIGNAL_WORKER_BINARY").filter(|v| !v.is_empty()) {
                return PathBuf::from(path);
            }
            let profile_dir = Path::new(OPERATOR).parent().expect("binary directory");
            let target_dir = profile_dir.parent().expect("target directory");
            let profile = profile_dir
                .file_name()
                .and_then(|name| name.to_str())
                .expect("profile directory name");
            // The `debug` directory belongs to the `dev` profile.
            let profile = if profile == "debug" { "dev" } else { profile };
            let status = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "--quiet",
                    "-p",
                    "signal-worker",
                    "--bin",
                    "signal-worker",
                ])
                .arg("--profile")
                .arg(profile)
                .arg("--target-dir")
                .arg(target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("running cargo build -p signal-worker");
            assert!(status.success(), "cargo build -p signal-worker failed");
            let worker = profile_dir.join("signal-worker");
            assert!(
                worker.is_file(),
                "{} missing after the build",
                worker.display()
            );
            worker
        })
        .clone()
}
