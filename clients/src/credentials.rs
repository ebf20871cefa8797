//! Loading a pipeline's credentials from the process environment, reading the NATS creds file a
//! variable names. The variables and the pure assembly are `signal_model::credentials`.

use std::path::Path;

use signal_model::credentials::{
    CredentialsError, ENV_NATS_CREDS, ENV_NATS_CREDS_FILE, PipelineCredentials,
};

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadCredentialsError {
    #[error("{variable}: cannot read the creds file `{path}`: {source}")]
    CredsFile {
        variable: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] CredentialsError),
}

/// Credentials from a lookup of variable names; a creds file named by [`ENV_NATS_CREDS_FILE`] is
/// read unless [`ENV_NATS_CREDS`] already holds the contents. Empty values count as absent.
pub fn from_lookup(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<PipelineCredentials, LoadCredentialsError> {
    let get = |name: &str| lookup(name).filter(|value| !value.is_empty());
    let creds_from_file = match (get(ENV_NATS_CREDS), get(ENV_NATS_CREDS_FILE)) {
        (None, Some(path)) => Some(read_creds_file(Path::new(&path))?),
        _ => None,
    };
    Ok(PipelineCredentials::from_lookup(|name| {
        match (&creds_from_file, name == ENV_NATS_CREDS) {
            (Some(contents), true) => Some(contents.clone()),
            _ => lookup(name),
        }
    })?)
}

/// Credentials from this process's environment.
pub fn from_env() -> Result<PipelineCredentials, LoadCredentialsError> {
    from_lookup(|name| std::env::var(name).ok())
}

fn read_creds_file(path: &Path) -> Result<String, LoadCredentialsError> {
    std::fs::read_to_string(path).map_err(|source| LoadCredentialsError::CredsFile {
        variable: ENV_NATS_CREDS_FILE,
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use signal_model::credentials::{ENV_NATS_TOKEN, NatsAuth};

    fn lookup(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.clone())
        }
    }

    #[test]
    fn a_creds_file_is_read_and_wins_over_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user.creds");
        std::fs::write(&path, "-----BEGIN NATS USER JWT-----").unwrap();
        let credentials = from_lookup(lookup(vec![
            (ENV_NATS_CREDS_FILE, path.display().to_string()),
            (ENV_NATS_TOKEN, "t".to_string()),
        ]))
        .unwrap();
        assert_eq!(
            credentials.nats,
            NatsAuth::Creds("-----BEGIN NATS USER JWT-----".into())
        );
    }

    #[test]
    fn inline_creds_win_over_a_file_and_a_missing_file_is_named() {
        let inline = from_lookup(lookup(vec![
            (ENV_NATS_CREDS, "inline".to_string()),
            (ENV_NATS_CREDS_FILE, "/nonexistent/user.creds".to_string()),
        ]))
        .unwrap();
        assert_eq!(inline.nats, NatsAuth::Creds("inline".into()));

        let error = from_lookup(lookup(vec![(
            ENV_NATS_CREDS_FILE,
            "/nonexistent/user.creds".to_string(),
        )]))
        .unwrap_err()
        .to_string();
        assert!(
            error.contains(ENV_NATS_CREDS_FILE) && error.contains("/nonexistent/user.creds"),
            "{error}"
        );
    }
}
