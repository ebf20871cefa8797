//! Container images without a registry or a build engine: a program and the shared libraries it
//! loads, packed into an OCI image archive that `ctr images import` reads.
//!
//! This is the distroless idea done by hand: one uncompressed layer holding the binary, what
//! `ldd` says it needs (the C library, the dynamic loader...), and empty `/tmp` and `/etc`
//! directories; an image configuration with the entrypoint and a numeric non-root user (so
//! Kubernetes' `runAsNonRoot` can verify it); a manifest and an index naming the image
//! (`io.containerd.image.name`, which `ctr images import` uses as the image's name).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};

/// What goes into an image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The full reference containerd and the kubelet know it by, e.g.
    /// `docker.io/library/signal-worker:test`.
    pub name: String,
    /// The program, packed at `/usr/local/bin/<file name>` with the libraries it loads.
    pub program: PathBuf,
    /// The arguments after the program (the image's `Cmd`).
    pub args: Vec<String>,
    /// `uid:gid` the program runs as unless the pod says otherwise.
    pub user: String,
}

/// Writes the OCI image archive of `spec` to `archive`.
pub fn write_image_archive(spec: &ImageSpec, archive: &Path) -> Result<()> {
    let program_name = spec
        .program
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| Error::Image(format!("{} has no file name", spec.program.display())))?;
    let entrypoint = format!("/usr/local/bin/{program_name}");
    let mut files = vec![(spec.program.clone(), entrypoint.clone())];
    for library in shared_libraries(&spec.program)? {
        let inside = library.display().to_string();
        files.push((library, inside));
    }
    let layer = layer_tar(&files)?;
    let layer_digest = sha256(&layer);

    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [entrypoint],
            "Cmd": spec.args,
            "User": spec.user,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))
    .map_err(json_error)?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .map_err(json_error)?;
    let manifest_digest = sha256(&manifest);
    let tag = spec.name.rsplit_once(':').map_or("latest", |(_, tag)| tag);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": spec.name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .map_err(json_error)?;

    let file = std::fs::File::create(archive)
        .context(|| format!("creating image archive {}", archive.display()))?;
    let mut out = tar::Builder::new(std::io::BufWriter::new(file));
    let mut add = |path: &str, data: &[u8]| -> Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        out.append_data(&mut header, path, data)
            .context(|| format!("writing {path} into {}", archive.display()))
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    add(&blob_path(&manifest_digest), &manifest)?;
    add(&blob_path(&config_digest), &config)?;
    add(&blob_path(&layer_digest), &layer)?;
    out.into_inner()
        .and_then(|mut writer| writer.flush())
        .context(|| format!("finishing {}", archive.display()))
}

/// The shared libraries `ldd` lists for `program`, resolved to their files (none for a static
/// program).
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(program)
        .output()
        .context(|| format!("running ldd {}", program.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut libraries = BTreeSet::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; "linux-vdso.so.1 (0x...)" has no file.
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libraries.insert(PathBuf::from(path));
        }
    }
    Ok(libraries.into_iter().collect())
}

/// One layer: the files (following symbolic links, as the loader does) and their directories.
fn layer_tar(files: &[(PathBuf, String)]) -> Result<Vec<u8>> {
    let mut directories = BTreeSet::from(["tmp".to_string(), "etc".to_string()]);
    for (_, inside) in files {
        let mut parent = Path::new(inside.trim_start_matches('/')).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            directories.insert(dir.display().to_string());
            parent = dir.parent();
        }
    }
    let mut layer = tar::Builder::new(Vec::new());
    for dir in &directories {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        header.set_mode(if dir == "tmp" { 0o1777 } else { 0o755 });
        header.set_cksum();
        layer
            .append_data(&mut header, format!("{dir}/"), std::io::empty())
            .context(|| format!("adding directory {dir}"))?;
    }
    for (source, inside) in files {
        let data = std::fs::read(source).context(|| format!("reading {}", source.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o755);
        header.set_cksum();
        layer
            .append_data(&mut header, inside.trim_start_matches('/'), data.as_slice())
            .context(|| format!("adding {}", source.display()))?;
    }
    layer
        .into_inner()
        .context(|| "finishing the layer".to_string())
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256:{hex}")
}

fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

fn json_error(error: serde_json::Error) -> Error {
    Error::Image(format!("encoding image metadata: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_holds_the_program_its_libraries_and_consistent_digests() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("image.tar");
        let spec = ImageSpec {
            name: "docker.io/library/true:test".to_string(),
            program: PathBuf::from("/bin/true"),
            args: vec![],
            user: "65532:65532".to_string(),
        };
        write_image_archive(&spec, &archive).unwrap();

        let mut blobs = std::collections::BTreeMap::new();
        let mut index = None;
        let mut reader = tar::Archive::new(std::fs::File::open(&archive).unwrap());
        for entry in reader.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            if path == "index.json" {
                index = Some(data);
            } else if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(sha256(&data), format!("sha256:{hex}"), "{path}");
                blobs.insert(format!("sha256:{hex}"), data);
            }
        }
        let index: serde_json::Value = serde_json::from_slice(&index.unwrap()).unwrap();
        let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            "docker.io/library/true:test"
        );
        let manifest: serde_json::Value = serde_json::from_slice(&blobs[manifest_digest]).unwrap();
        let layer = &blobs[manifest["layers"][0]["digest"].as_str().unwrap()];
        let mut names = Vec::new();
        for entry in tar::Archive::new(layer.as_slice()).entries().unwrap() {
            names.push(entry.unwrap().path().unwrap().display().to_string());
        }
        assert!(
            names.contains(&"usr/local/bin/true".to_string()),
            "{names:?}"
        );
        assert!(
            names.iter().any(|name| name.contains("libc.so")),
            "no C library in {names:?}"
        );
        let config: serde_json::Value =
            serde_json::from_slice(&blobs[manifest["config"]["digest"].as_str().unwrap()]).unwrap();
        assert_eq!(config["config"]["User"], "65532:65532");
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/true");
    }
}
