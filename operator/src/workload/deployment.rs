//! The worker Deployment of a pipeline.
//!
//! One container running `signal-worker` with the manifest mounted read-only, its metrics port and
//! probes, the restricted security profile, and the pipeline's Secret keys as environment variables
//! (`secretKeyRef`, each optional so a Secret may hold only the keys its auth method needs). The
//! replica count is an input: the controller passes the spec's or the autoscaler's.
//!
//! TLS material never travels in variables: each key a `tls` block references is a read-only
//! Secret or ConfigMap volume mounted under [`TLS_DIR`], and the worker learns the file's path from
//! `SIGNAL_<SERVER>_TLS_<PART>_FILE` ([`tls_mounts`]).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use signal_model::credentials::{CLICKHOUSE_SECRET_KEYS, NATS_SECRET_KEYS, REDIS_SECRET_KEYS};
use signal_model::tls::{TlsPart, TlsServer};
use signal_model::{AuthSpec, ResourcesSpec, SignalPipeline, SignalPipelineSpec};

use super::{
    CONFIG_HASH_ANNOTATION, MANIFEST_DIR, MANIFEST_KEY, WORKER_APP_NAME, WORKER_METRICS_PORT,
    WorkloadError, configmap_name, deployment_name, labels, name_and_namespace, owner_reference,
    selector_labels,
};

/// The non-root user of distroless images; any fixed non-zero id satisfies `runAsNonRoot`.
pub const WORKER_UID: i64 = 65532;
/// The worker flushes its open batch and acks on SIGTERM; this is how long it gets.
pub const TERMINATION_GRACE_SECONDS: i64 = 30;
/// The keys a Secret may hold for one server, each with the variable the worker reads it from.
type SecretKeys = &'static [(&'static str, &'static str)];
const CONFIG_VOLUME: &str = "pipeline";
const TMP_VOLUME: &str = "tmp";
/// Where the TLS files are mounted: `<TLS_DIR>/<server>/<part>/<file>`, e.g.
/// `/etc/signal/tls/nats/ca/ca.crt`.
pub const TLS_DIR: &str = "/etc/signal/tls";

/// What the Deployment depends on besides the pipeline itself.
#[derive(Clone, Debug)]
pub struct WorkerDeploymentInputs<'a> {
    /// Replicas to run: `spec.workers.replicas`, or the autoscaler's decision.
    pub replicas: i32,
    /// The operator's `--worker-image`, used when `spec.workers.image` is not set.
    pub default_image: &'a str,
    /// [`super::config_hash`] of the ConfigMap the pods run with; `None` leaves the annotation
    /// out (a running Deployment that had none, kept as it is while the manifest waits).
    pub config_hash: Option<&'a str>,
}

/// The Deployment `<pipeline>-worker`, owned by the pipeline.
pub fn build_deployment(
    pipeline: &SignalPipeline,
    inputs: &WorkerDeploymentInputs<'_>,
) -> Result<Deployment, WorkloadError> {
    let (name, namespace) = name_and_namespace(pipeline)?;
    let spec = &pipeline.spec;
    let image = spec
        .workers
        .image
        .clone()
        .unwrap_or_else(|| inputs.default_image.to_string());
    let mut pod_annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        (
            "prometheus.io/port".to_string(),
            WORKER_METRICS_PORT.to_string(),
        ),
    ]);
    if let Some(hash) = inputs.config_hash {
        pod_annotations.insert(CONFIG_HASH_ANNOTATION.to_string(), hash.to_string());
    }
    Ok(Deployment {
        metadata: ObjectMeta {
            name: Some(deployment_name(&name)),
            namespace: Some(namespace),
            labels: Some(labels(&name)),
            owner_references: Some(vec![owner_reference(pipeline)?]),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(inputs.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&name)),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(&name, spec, image)),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}

fn pod_spec(pipeline_name: &str, spec: &SignalPipelineSpec, image: String) -> PodSpec {
    let tls_volumes = tls_mounts(spec).into_iter().map(|mount| mount.volume);
    PodSpec {
        containers: vec![worker_container(spec, image)],
        volumes: Some(
            vec![
                Volume {
                    name: CONFIG_VOLUME.to_string(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: configmap_name(pipeline_name),
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                },
                // The root filesystem is read-only; give the process a scratch directory.
                Volume {
                    name: TMP_VOLUME.to_string(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                },
            ]
            .into_iter()
            .chain(tls_volumes)
            .collect(),
        ),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_UID),
            run_as_group: Some(WORKER_UID),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..PodSecurityContext::default()
        }),
        // Workers never talk to the Kubernetes API.
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        ..PodSpec::default()
    }
}

fn worker_container(spec: &SignalPipelineSpec, image: String) -> Container {
    let manifest_path = format!("{MANIFEST_DIR}/{MANIFEST_KEY}");
    let listen = format!("0.0.0.0:{WORKER_METRICS_PORT}");
    let tls = tls_mounts(spec);
    let mut env = secret_env(spec);
    env.extend(tls.iter().map(|mount| mount.variable.clone()));
    let tls_mounts = tls.into_iter().map(|mount| mount.mount);
    Container {
        name: WORKER_APP_NAME.to_string(),
        image: Some(image),
        args: Some(
            [
                "--pipeline",
                &manifest_path,
                "--listen",
                &listen,
                "--log-format",
                "json",
            ]
            .map(String::from)
            .to_vec(),
        ),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".to_string()),
            container_port: WORKER_METRICS_PORT,
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
        env: (!env.is_empty()).then_some(env),
        resources: spec.workers.resources.as_ref().map(resource_requirements),
        liveness_probe: Some(http_probe("/healthz", 10)),
        readiness_probe: Some(http_probe("/readyz", 5)),
        volume_mounts: Some(
            vec![
                VolumeMount {
                    name: CONFIG_VOLUME.to_string(),
                    mount_path: MANIFEST_DIR.to_string(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: TMP_VOLUME.to_string(),
                    mount_path: "/tmp".to_string(),
                    ..VolumeMount::default()
                },
            ]
            .into_iter()
            .chain(tls_mounts)
            .collect(),
        ),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_UID),
            run_as_group: Some(WORKER_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// One TLS file of the worker: its volume, where it is mounted, and the variable naming it.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsMount {
    pub volume: Volume,
    pub mount: VolumeMount,
    pub variable: EnvVar,
}

/// A read-only volume, mount and path variable for every key the spec's `tls` blocks reference.
/// Only the referenced key is projected, under the part's usual file name (`ca.crt`, `tls.crt`,
/// `tls.key`); a missing Secret, ConfigMap or key keeps the pod from starting, which the
/// operator's own read of the same keys reports in the status.
pub fn tls_mounts(spec: &SignalPipelineSpec) -> Vec<TlsMount> {
    let mut mounts = Vec::new();
    for server in TlsServer::ALL {
        let Some(block) = server.spec(spec) else {
            continue;
        };
        for part in TlsPart::ALL {
            let Some(source) = block.source(part) else {
                continue;
            };
            let name = format!("tls-{}-{}", server.slug(), part.field());
            let dir = format!("{TLS_DIR}/{}/{}", server.slug(), part.field());
            let volume = match (&source.secret_key_ref, &source.config_map_key_ref) {
                (Some(key_ref), _) => Volume {
                    name: name.clone(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(key_ref.name.clone()),
                        items: Some(vec![key_to_path(&key_ref.key, part)]),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                },
                (None, Some(key_ref)) => Volume {
                    name: name.clone(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: key_ref.name.clone(),
                        items: Some(vec![key_to_path(&key_ref.key, part)]),
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                },
                // Refused by validation before a Deployment is built.
                (None, None) => continue,
            };
            mounts.push(TlsMount {
                volume,
                mount: VolumeMount {
                    name,
                    mount_path: dir.clone(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
                variable: EnvVar {
                    name: server.file_variable(part).to_string(),
                    value: Some(format!("{dir}/{}", part.file_name())),
                    ..EnvVar::default()
                },
            });
        }
    }
    mounts
}

fn key_to_path(key: &str, part: TlsPart) -> KeyToPath {
    KeyToPath {
        key: key.to_string(),
        path: part.file_name().to_string(),
        mode: None,
    }
}

/// One `secretKeyRef` variable per key each referenced Secret may hold, all optional.
pub fn secret_env(spec: &SignalPipelineSpec) -> Vec<EnvVar> {
    let sources: [(Option<&AuthSpec>, SecretKeys); 3] = [
        (spec.nats.auth.as_ref(), &NATS_SECRET_KEYS),
        (spec.clickhouse.auth.as_ref(), &CLICKHOUSE_SECRET_KEYS),
        (
            spec.cache
                .as_ref()
                .and_then(|cache| cache.redis.auth.as_ref()),
            &REDIS_SECRET_KEYS,
        ),
    ];
    sources
        .into_iter()
        .filter_map(|(auth, keys)| auth.map(|auth| (auth, keys)))
        .flat_map(|(auth, keys)| {
            keys.iter().map(|(key, variable)| EnvVar {
                name: variable.to_string(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: auth.secret_ref.name.clone(),
                        key: key.to_string(),
                        optional: Some(true),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            })
        })
        .collect()
}

fn resource_requirements(resources: &ResourcesSpec) -> ResourceRequirements {
    let quantities = |map: &BTreeMap<String, String>| {
        (!map.is_empty()).then(|| {
            map.iter()
                .map(|(name, amount)| (name.clone(), Quantity(amount.clone())))
                .collect()
        })
    };
    ResourceRequirements {
        requests: quantities(&resources.requests),
        limits: quantities(&resources.limits),
        ..ResourceRequirements::default()
    }
}

fn http_probe(path: &str, period_seconds: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("metrics".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_string(),
        ..SeccompProfile::default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::workload::fixtures::{
        NAMESPACE, minimal_spec, stored_pipeline, stored_pipeline_with,
    };

    const DEFAULT_IMAGE: &str = "ghcr.io/signal-operator/signal-worker:test";
    const HASH: &str = "0123abcd";

    fn inputs(replicas: i32) -> WorkerDeploymentInputs<'static> {
        WorkerDeploymentInputs {
            replicas,
            default_image: DEFAULT_IMAGE,
            config_hash: Some(HASH),
        }
    }

    fn build(pipeline: &SignalPipeline, replicas: i32) -> Deployment {
        build_deployment(pipeline, &inputs(replicas)).expect("built")
    }

    fn pod_spec_of(deployment: &Deployment) -> &PodSpec {
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("a pod spec")
    }

    fn container_of(deployment: &Deployment) -> &Container {
        let containers = &pod_spec_of(deployment).containers;
        assert_eq!(containers.len(), 1, "one worker container");
        &containers[0]
    }

    #[test]
    fn replicas_come_from_the_inputs_and_the_selector_matches_the_pods() {
        let deployment = build(&stored_pipeline("orders"), 4);
        assert_eq!(deployment.metadata.name.as_deref(), Some("orders-worker"));
        assert_eq!(deployment.metadata.namespace.as_deref(), Some(NAMESPACE));
        let spec = deployment.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(4));
        let selector = spec.selector.match_labels.as_ref().expect("match labels");
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .expect("pod labels");
        for (key, value) in selector {
            assert_eq!(pod_labels.get(key), Some(value), "pod label {key}");
        }
        assert_eq!(
            build(&stored_pipeline("orders"), 0)
                .spec
                .expect("spec")
                .replicas,
            Some(0)
        );
    }

    #[test]
    fn the_pods_carry_the_config_hash_so_a_manifest_change_rolls_them() {
        let deployment = build(&stored_pipeline("orders"), 1);
        let annotations = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .expect("pod annotations");
        assert_eq!(
            annotations.get(CONFIG_HASH_ANNOTATION).map(String::as_str),
            Some(HASH)
        );
    }

    #[test]
    fn without_a_config_hash_the_pods_carry_none() {
        let deployment = build_deployment(
            &stored_pipeline("orders"),
            &WorkerDeploymentInputs {
                config_hash: None,
                ..inputs(1)
            },
        )
        .expect("built");
        let annotations = deployment
            .spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.annotations)
            .expect("pod annotations");
        assert!(!annotations.contains_key(CONFIG_HASH_ANNOTATION));
        assert_eq!(
            annotations.get("prometheus.io/scrape").map(String::as_str),
            Some("true")
        );
    }

    #[test]
    fn the_image_is_the_spec_one_else_the_operator_default() {
        let pipeline = stored_pipeline("orders");
        assert_eq!(
            container_of(&build(&pipeline, 1)).image.as_deref(),
            Some(DEFAULT_IMAGE)
        );
        let mut spec = minimal_spec();
        spec["workers"] = json!({"image": "registry.example/worker:1.2"});
        let custom = build(&stored_pipeline_with("orders", spec, 0), 1);
        assert_eq!(
            container_of(&custom).image.as_deref(),
            Some("registry.example/worker:1.2")
        );
    }

    #[test]
    fn the_worker_reads_the_mounted_manifest_and_serves_its_health_endpoints() {
        let deployment = build(&stored_pipeline("orders"), 1);
        let container = container_of(&deployment);
        let args = container.args.as_ref().expect("args");
        assert!(
            args.windows(2)
                .any(|pair| pair == ["--pipeline", "/etc/signal/pipeline.yaml"]),
            "{args:?}"
        );
        let ports = container.ports.as_ref().expect("ports");
        assert_eq!(ports[0].name.as_deref(), Some("metrics"));
        assert_eq!(ports[0].container_port, WORKER_METRICS_PORT);
        for (probe, path) in [
            (&container.liveness_probe, "/healthz"),
            (&container.readiness_probe, "/readyz"),
        ] {
            let http = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .expect("an HTTP probe");
            assert_eq!(http.path.as_deref(), Some(path));
            assert_eq!(http.port, IntOrString::String("metrics".to_string()));
        }
        let mount = &container.volume_mounts.as_ref().expect("mounts")[0];
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (MANIFEST_DIR, Some(true))
        );
        let volume = &pod_spec_of(&deployment).volumes.as_ref().expect("volumes")[0];
        assert_eq!(
            volume.config_map.as_ref().map(|c| c.name.as_str()),
            Some("orders-pipeline")
        );
    }

    #[test]
    fn pods_run_under_the_restricted_security_profile() {
        let deployment = build(&stored_pipeline("orders"), 1);
        let pod = pod_spec_of(&deployment);
        let pod_security = pod.security_context.as_ref().expect("pod security context");
        assert_eq!(pod_security.run_as_non_root, Some(true));
        assert_eq!(
            pod_security
                .seccomp_profile
                .as_ref()
                .map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        assert_eq!(pod.automount_service_account_token, Some(false));

        let security = container_of(&deployment)
            .security_context
            .as_ref()
            .expect("container security context");
        assert_eq!(security.run_as_non_root, Some(true));
        assert!(security.run_as_user.is_some_and(|uid| uid > 0));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()])
        );
        assert!(
            security
                .capabilities
                .as_ref()
                .is_some_and(|c| c.add.is_none())
        );
        assert_eq!(
            security.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
    }

    #[test]
    fn secrets_reach_the_worker_only_through_secret_key_refs() {
        let mut spec = minimal_spec();
        spec["nats"]["auth"] = json!({"secretRef": {"name": "nats-auth"}});
        spec["clickhouse"]["auth"] = json!({"secretRef": {"name": "clickhouse-auth"}});
        let deployment = build(&stored_pipeline_with("orders", spec, 0), 1);
        let env = container_of(&deployment).env.as_ref().expect("env");
        assert_eq!(
            env.len(),
            NATS_SECRET_KEYS.len() + CLICKHOUSE_SECRET_KEYS.len()
        );
        for variable in env {
            assert!(
                variable.value.is_none(),
                "{} has a literal value",
                variable.name
            );
            let reference = variable
                .value_from
                .as_ref()
                .and_then(|source| source.secret_key_ref.as_ref())
                .unwrap_or_else(|| panic!("{} is not from a Secret", variable.name));
            let expected_secret = if CLICKHOUSE_SECRET_KEYS
                .iter()
                .any(|(_, name)| *name == variable.name)
            {
                "clickhouse-auth"
            } else {
                "nats-auth"
            };
            assert_eq!(reference.name, expected_secret, "{}", variable.name);
            assert_eq!(reference.optional, Some(true), "{}", variable.name);
        }
        let without_auth = build(&stored_pipeline("orders"), 1);
        assert!(container_of(&without_auth).env.is_none());
    }

    #[test]
    fn tls_files_are_read_only_volumes_and_variables_hold_only_their_paths() {
        let mut spec = minimal_spec();
        spec["nats"]["url"] = json!("tls://nats:4222");
        spec["nats"]["tls"] = json!({
            "ca": {"configMapKeyRef": {"name": "signal-ca", "key": "ca.pem"}},
            "cert": {"secretKeyRef": {"name": "nats-client", "key": "tls.crt"}},
            "key": {"secretKeyRef": {"name": "nats-client", "key": "tls.key"}},
        });
        let deployment = build(&stored_pipeline_with("orders", spec, 0), 1);
        let pod = pod_spec_of(&deployment);
        let container = container_of(&deployment);
        let volume = |name: &str| {
            pod.volumes
                .as_ref()
                .and_then(|volumes| volumes.iter().find(|v| v.name == name))
                .unwrap_or_else(|| panic!("no volume {name}"))
        };
        let ca = volume("tls-nats-ca")
            .config_map
            .as_ref()
            .expect("a ConfigMap");
        assert_eq!(ca.name, "signal-ca");
        assert_eq!(ca.items.as_ref().unwrap()[0].key, "ca.pem");
        assert_eq!(ca.items.as_ref().unwrap()[0].path, "ca.crt");
        let key = volume("tls-nats-key").secret.as_ref().expect("a Secret");
        assert_eq!(key.secret_name.as_deref(), Some("nats-client"));
        let mounts = container.volume_mounts.as_ref().unwrap();
        let key_mount = mounts.iter().find(|m| m.name == "tls-nats-key").unwrap();
        assert_eq!(key_mount.read_only, Some(true));
        let env = container.env.as_ref().unwrap();
        let key_path = env
            .iter()
            .find(|v| v.name == "SIGNAL_NATS_TLS_KEY_FILE")
            .and_then(|v| v.value.as_deref());
        assert_eq!(key_path, Some("/etc/signal/tls/nats/key/tls.key"));
        assert!(key_path.unwrap().starts_with(&key_mount.mount_path));
        assert_eq!(env.len(), 3, "one path per file, nothing else: {env:?}");
    }

    #[test]
    fn resources_are_copied_as_quantities() {
        let mut spec = minimal_spec();
        spec["workers"] = json!({"resources": {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        }});
        let deployment = build(&stored_pipeline_with("orders", spec, 0), 1);
        let resources = container_of(&deployment)
            .resources
            .as_ref()
            .expect("resources");
        let requests = resources.requests.as_ref().expect("requests");
        assert_eq!(requests.get("cpu"), Some(&Quantity("100m".to_string())));
        assert_eq!(requests.get("memory"), Some(&Quantity("64Mi".to_string())));
        let limits = resources.limits.as_ref().expect("limits");
        assert_eq!(limits.get("memory"), Some(&Quantity("256Mi".to_string())));
        assert!(
            container_of(&build(&stored_pipeline("orders"), 1))
                .resources
                .is_none()
        );
    }

    #[test]
    fn the_deployment_is_owned_by_its_pipeline() {
        let deployment = build(&stored_pipeline("orders"), 1);
        let owners = deployment
            .metadata
            .owner_references
            .expect("owner references");
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "SignalPipeline");
        assert_eq!(owners[0].uid, "uid-orders");
        assert_eq!(owners[0].controller, Some(true));
    }
}
