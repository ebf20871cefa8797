//! Loading a pipeline's credentials from the process environment, reading the NATS creds file a
//! variable names and the TLS files the `SIGNAL_<SERVER>_TLS_<PART>_FILE` variables name (the
//! worker's mounted Secret and ConfigMap keys, or local mode's own files). The variables and the
//! pure assembly are `signal_model::credentials` and `signal_model::tls`.

use std::path::Path;

use signal_model::SignalPipelineSpec;
use signal_model::credentials::{
    CredentialsError, ENV_NATS_CREDS, ENV_NATS_CREDS_FILE, PipelineCredentials,
};
use signal_model::tls::{PipelineTls, TlsMaterialError};

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
    #[error(transparent)]
    Tls(#[from] TlsMaterialError),
}

/// Credentials from a lookup of variable names; a creds file named by [`ENV_NATS_CREDS_FILE`] is
/// read unless [`ENV_NATS_CREDS`] already holds the contents, and each `tls` block of `spec` is
/// read from the files its variables name. Empty values count as absent.
pub fn from_lookup(
    spec: &SignalPipelineSpec,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<PipelineCredentials, LoadCredentialsError> {
    let get = |name: &str| lookup(name).filter(|value| !value.is_empty());
    let creds_from_file = match (get(ENV_NATS_CREDS), get(ENV_NATS_CREDS_FILE)) {
        (None, Some(path)) => Some(read_creds_file(Path::new(&path))?),
        _ => None,
    };
    let mut credentials = PipelineCredentials::from_lookup(|name| {
        match (&creds_from_file, name == ENV_NATS_CREDS) {
            (Some(contents), true) => Some(contents.clone()),
            _ => lookup(name),
        }
    })?;
    credentials.tls = PipelineTls::assemble(spec, |server, part| {
        let variable = server.file_variable(part);
        let Some(path) = get(variable) else {
            return Err(TlsMaterialError::Missing {
                field: server.field(),
                part: part.field(),
                where_: format!("the variable {variable} naming its file is not set"),
            });
        };
        std::fs::read_to_string(&path)
            .map(Some)
            .map_err(|error| TlsMaterialError::Unreadable {
                field: server.field(),
                part: part.field(),
                problem: format!("cannot read {path} ({variable}): {error}"),
            })
    })?;
    Ok(credentials)
}

/// Credentials of the pipeline `spec` from this process's environment.
pub fn from_env(spec: &SignalPipelineSpec) -> Result<PipelineCredentials, LoadCredentialsError> {
    from_lookup(spec, |name| std::env::var(name).ok())
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
    use signal_model::tls::{TlsPart, TlsServer};

    fn plain_spec() -> SignalPipelineSpec {
        SignalPipelineSpec::default()
    }

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
        let credentials = from_lookup(
            &plain_spec(),
            lookup(vec![
                (ENV_NATS_CREDS_FILE, path.display().to_string()),
                (ENV_NATS_TOKEN, "t".to_string()),
            ]),
        )
        .unwrap();
        assert_eq!(
            credentials.nats,
            NatsAuth::Creds("-----BEGIN NATS USER JWT-----".into())
        );
    }

    #[test]
    fn inline_creds_win_over_a_file_and_a_missing_file_is_named() {
        let inline = from_lookup(
            &plain_spec(),
            lookup(vec![
                (ENV_NATS_CREDS, "inline".to_string()),
                (ENV_NATS_CREDS_FILE, "/nonexistent/user.creds".to_string()),
            ]),
        )
        .unwrap();
        assert_eq!(inline.nats, NatsAuth::Creds("inline".into()));

        let error = from_lookup(
            &plain_spec(),
            lookup(vec![(
                ENV_NATS_CREDS_FILE,
                "/nonexistent/user.creds".to_string(),
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains(ENV_NATS_CREDS_FILE) && error.contains("/nonexistent/user.creds"),
            "{error}"
        );
    }

    #[test]
    fn tls_files_named_by_variables_are_read_and_a_missing_one_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----").unwrap();
        let mut spec = plain_spec();
        spec.nats.tls = Some(signal_model::TlsSpec {
            ca: Some(signal_model::PemSource {
                secret_key_ref: Some(signal_model::KeyRef {
                    name: "ca".into(),
                    key: "ca.crt".into(),
                }),
                config_map_key_ref: None,
            }),
            ..Default::default()
        });
        let variable = TlsServer::Nats.file_variable(TlsPart::Ca);
        let credentials =
            from_lookup(&spec, lookup(vec![(variable, ca.display().to_string())])).unwrap();
        let nats = credentials.tls.nats.unwrap();
        assert_eq!(nats.ca_pem.as_deref(), Some("-----BEGIN CERTIFICATE-----"));
        assert!(nats.client.is_none() && credentials.tls.clickhouse.is_none());

        let error = from_lookup(&spec, lookup(vec![])).unwrap_err().to_string();
        assert!(
            error.contains("spec.nats.tls.ca") && error.contains(variable),
            "{error}"
        );
        let error = from_lookup(
            &spec,
            lookup(vec![(variable, "/nonexistent/ca.crt".into())]),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("/nonexistent/ca.crt"), "{error}");
    }
}
