//! The worker Deployment of a pipeline.
//!
//! One container running `signal-worker` with the manifest mounted read-only, its metrics port and
//! probes, the restricted security profile, and the pipeline's Secret keys as environment variables
//! (`secretKeyRef`, each optional so a Secret may hold only the keys its auth method needs). The
//! replica count is an input: the controller passes the spec's or the autoscaler's.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use signal_model::credentials::{CLICKHOUSE_SECRET_KEYS, NATS_SECRET_KEYS, REDIS_SECRET_KEYS};
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
const CONFIG_VOLUME: &str = "pipeline";
const TMP_VOLUME: &str = "tmp";

/// What the Deployment depends on besides the pipeline itself.
#[derive(Clone, Debug)]
pub struct WorkerDeploymentInputs<'a> {
    /// Replicas to run: `spec.workers.replicas`, or the autoscaler's decision.
    pub replicas: i32,
    /// The operator's `--worker-image`, used when `spec.workers.image` is not set.
    pub default_image: &'a str,
    /// [`super::config_hash`] of the ConfigMap the pods mount.
    pub config_hash: &'a str,
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
    let pod_annotations = BTreeMap::from([
        (
            CONFIG_HASH_ANNOTATION.to_string(),
            inputs.config_hash.to_string(),
        ),
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        (
            "prometheus.io/port".to_string(),
            WORKER_METRICS_PORT.to_string(),
        ),
    ]);
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
    PodSpec {
        containers: vec![worker_container(spec, image)],
        volumes: Some(vec![
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
        ]),
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
    let env = secret_env(spec);
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
        volume_mounts: Some(vec![
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
        ]),
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

/// One `secretKeyRef` variable per key each referenced Secret may hold, all optional.
pub fn secret_env(spec: &SignalPipelineSpec) -> Vec<EnvVar> {
    let sources: [(Option<&AuthSpec>, &[(&str, &str)]); 3] = [
        (spec.nats.auth.as_ref(), &NATS_SECRET_KEYS),
        (spec.clickhouse.auth.as_ref(), &CLICKHOUSE_SECRET_KEYS),
        (
            spec.cache.as_ref().and_then(|cache| cache.redis.auth.as_ref()),
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
