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

/// The JVM ZooKeeper runs on (`zookeeper` depends on `default-jre`; headless is enough).
pub(crate) const JAVA: Program = Program {
    name: "java",
    env_var: "SIGNAL_TEST_JAVA",
    install: "apt-get install -y --no-install-recommends zookeeper default-jre-headless",
};

/// ZooKeeper's server classes: a jar, found like a binary but only required to be a file.
pub(crate) const ZOOKEEPER_JAR: Program = Program {
    name: "zookeeper.jar",
    env_var: "SIGNAL_TEST_ZOOKEEPER_JAR",
    install: "apt-get install -y --no-install-recommends zookeeper default-jre-headless",
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

/// A server binary the suite builds from Go modules into this workspace's `target/` (no Debian
/// package has it): the Kubernetes control plane, the current nats-server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GoBuilt {
    /// What it is, for the error: e.g. "the current nats-server".
    pub what: &'static str,
    /// Where the build script puts it, relative to the workspace's `target/`.
    pub in_target: &'static str,
    /// The script that builds it.
    pub script: &'static str,
    /// Environment variable that overrides the lookup.
    pub env_var: &'static str,
}

impl GoBuilt {
    /// The override variable's path if set, else the build script's output; either must exist.
    pub(crate) fn locate(&self) -> Result<PathBuf> {
        let path = match env::var_os(self.env_var).filter(|v| !v.is_empty()) {
            Some(path) => PathBuf::from(path),
            None => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target")
                .join(self.in_target),
        };
        if path.is_file() {
            Ok(path)
        } else {
            Err(self.not_built(path))
        }
    }

    /// The error for `path` (this binary, or a file built beside it) missing.
    pub(crate) fn not_built(&self, path: PathBuf) -> Error {
        Error::NotBuilt {
            what: self.what,
            path,
            script: self.script,
            env_var: self.env_var,
        }
    }
}

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

    /// Finds a file that is not run itself (a jar): the override variable if set, else the
    /// usual Java library directory of Debian.
    pub(crate) fn locate_file(&self) -> Result<PathBuf> {
        const JAVA_DIRS: &[&str] = &["/usr/share/java", "/usr/local/share/java"];
        if let Some(value) = env::var_os(self.env_var).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(&value);
            return if path.is_file() {
                Ok(path)
            } else {
                Err(self.not_found(format!("{}={} is not a file", self.env_var, path.display())))
            };
        }
        JAVA_DIRS
            .iter()
            .map(|dir| Path::new(dir).join(self.name))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| self.not_found(format!("searched {}", JAVA_DIRS.join(", "))))
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
