//! Finding the server binaries.
//!
//! Debian installs `nats-server` and `clickhouse-server` in `/usr/sbin`, which is not on every
//! user's `PATH`, so the lookup searches `PATH` and then the usual system directories. Each
//! server has an environment variable that overrides the lookup with an explicit path. A missing
//! binary is an error that names the `apt-get install` command.

use std::env;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Directories searched after `PATH`.
const EXTRA_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"];

/// A server binary this crate knows how to find.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Program {
    /// File name looked up on `PATH`.
    pub name: &'static str,
    /// Environment variable that overrides the lookup.
    pub env_var: &'static str,
    /// The Debian install command.
    pub install: &'static str,
}

pub(crate) const NATS: Program = Program {
    name: "nats-server",
    env_var: "SIGNAL_TEST_NATS_SERVER",
    install: "apt-get install -y nats-server",
};

pub(crate) const CLICKHOUSE: Program = Program {
    name: "clickhouse-server",
    env_var: "SIGNAL_TEST_CLICKHOUSE_SERVER",
    install: "apt-get install -y clickhouse-server clickhouse-client",
};

pub(crate) const REDIS: Program = Program {
    name: "redis-server",
    env_var: "SIGNAL_TEST_REDIS_SERVER",
    install: "apt-get install -y redis-server",
};

pub(crate) const KUBECTL: Program = Program {
    name: "kubectl",
    env_var: "SIGNAL_TEST_KUBECTL",
    install: "scripts/install-test-deps.sh",
};

pub(crate) const HELM: Program = Program {
    name: "helm",
    env_var: "SIGNAL_TEST_HELM",
    install: "scripts/install-test-deps.sh",
};

impl Program {
    /// Finds the binary: the override variable if set, else `PATH`, else the system directories.
    pub(crate) fn locate(&self) -> Result<PathBuf> {
        if let Some(value) = env::var_os(self.env_var).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(&value);
            return if is_executable(&path) {
                Ok(path)
            } else {
                Err(self.not_found(format!(
                    "{}={} is not an executable file",
                    self.env_var,
                    path.display()
                )))
            };
        }
        let path_var = env::var_os("PATH").unwrap_or_default();
        let dirs: Vec<PathBuf> = env::split_paths(&path_var)
            .chain(EXTRA_DIRS.iter().map(PathBuf::from))
            .collect();
        dirs.iter()
            .map(|dir| dir.join(self.name))
            .find(|candidate| is_executable(candidate))
            .ok_or_else(|| self.not_found(format!("searched PATH and {}", EXTRA_DIRS.join(", "))))
    }

    fn not_found(&self, searched: String) -> Error {
        Error::BinaryNotFound {
            program: self.name,
            env_var: self.env_var,
            searched,
            install: self.install,
        }
    }
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh() {
        let sh = Program {
            name: "sh",
            env_var: "SIGNAL_TEST_NO_SUCH_VARIABLE",
            install: "apt-get install -y dash",
        };
        assert!(sh.locate().unwrap().ends_with("sh"));
    }

    #[test]
    fn missing_binary_names_install_command() {
        let missing = Program {
            name: "signal-testkit-no-such-binary",
            env_var: "SIGNAL_TEST_NO_SUCH_VARIABLE",
            install: "apt-get install -y nothing",
        };
        let msg = missing.locate().unwrap_err().to_string();
        assert!(msg.contains("apt-get install -y nothing"), "{msg}");
    }
}
