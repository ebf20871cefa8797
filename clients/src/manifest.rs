//! Reading a pipeline manifest file; parsing and validating it is `signal_model::manifest`.

use std::path::Path;

use signal_model::manifest::{ManifestError, PipelineManifest};

/// Why a manifest file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ManifestError),
}

/// A manifest file as read: its text (what local mode hands its workers) and what it says.
#[derive(Clone, Debug)]
pub struct ManifestFile {
    pub text: String,
    pub manifest: PipelineManifest,
}

/// Reads, parses and validates a manifest file.
pub fn load(path: &Path) -> Result<ManifestFile, ManifestFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let manifest = PipelineManifest::from_yaml(&text)?;
    Ok(ManifestFile { text, manifest })
}
