//! Renders the Helm chart in `charts/signal-operator` with the real `helm` binary and checks what a
//! cluster would receive, without a cluster: `helm lint --strict` passes; every rendered document
//! parses into its `k8s-openapi` type with no field left over (a misspelt or misplaced field would
//! otherwise be dropped silently by the API server's decoder or, worse, by ours); the operator pod
//! runs non-root on a read-only root filesystem; RBAC grants exactly the rules the operator needs,
//! no wildcards and `get` alone on Secrets; the chart's CRD is the one `signal-operator crd` wrote.
//! The development manifests in `deploy/dev` get the same strict parse.
//!
//! `helm` is looked up on PATH, then in `$HOME/.local/bin`; `scripts/install-test-deps.sh` puts it
//! there. A missing `helm` fails the test: a packaging check that skips itself checks nothing.

use std::any::type_name;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use yaml_serde::Value;

const RELEASE: &str = "signal-operator";
const RELEASE_NAMESPACE: &str = "signal-operator";
/// The release name equals the chart name, so the chart's fullname is the chart name.
const FULLNAME: &str = "signal-operator";

/// What the operator may do to pipelines and the objects it manages, per watched namespace (or
/// cluster-wide): (API group, resource, verbs).
const PIPELINE_GRANTS: &[(&str, &str, &[&str])] = &[
    (
        "signals.dev",
        "signalpipelines",
        &["get", "list", "watch", "patch", "update"],
    ),
    (
        "signals.dev",
        "signalpipelines/status",
        &["get", "patch", "update"],
    ),
    (
        "signals.dev",
        "signalpipelines/scale",
        &["get", "patch", "update"],
    ),
    ("signals.dev", "signalpipelines/finalizers", &["update"]),
    (
        "apps",
        "deployments",
        &[
            "get", "list", "watch", "create", "patch", "update", "delete",
        ],
    ),
    (
        "",
        "configmaps",
        &[
            "get", "list", "watch", "create", "patch", "update", "delete",
        ],
    ),
    ("events.k8s.io", "events", &["create", "patch"]),
    ("", "events", &["create", "patch"]),
    // Secrets' metadata is watched (list, watch) so a reconcile reads no Secret it already has;
    // a Secret's data is read by name (get) when a pipeline references it, once per version.
    ("", "secrets", &["get", "list", "watch"]),
];

/// The leader-election Lease, in the release namespace only.
const LEADER_ELECTION_GRANTS: &[(&str, &str, &[&str])] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "create", "update", "patch"],
)];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the operator crate lives inside the workspace")
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    workspace_root().join("charts/signal-operator")
}

/// `helm` from PATH, else from `$HOME/.local/bin`; panics with the way to install it.
fn helm_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let in_home = std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/bin"));
    on_path
        .into_iter()
        .chain(in_home)
        .map(|dir| dir.join("helm"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "helm was not found on PATH or in $HOME/.local/bin; \
                 run scripts/install-test-deps.sh to install it"
            )
        })
}

/// Runs helm with `args` and returns its stdout; panics with stderr when it fails.
fn helm(args: &[&str]) -> String {
    let output = Command::new(helm_binary())
        .args(args)
        .output()
        .expect("helm could not be started");
    assert!(
        output.status.success(),
        "helm {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("helm printed UTF-8")
}

/// `helm template` of the chart as release [`RELEASE`] in [`RELEASE_NAMESPACE`], CRDs included.
fn helm_template(extra_args: &[&str]) -> String {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().expect("UTF-8 path"),
        "--namespace",
        RELEASE_NAMESPACE,
        "--include-crds",
    ];
    args.extend_from_slice(extra_args);
    helm(&args)
}

/// The non-empty documents of a multi-document YAML stream.
fn yaml_documents(text: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).expect("helm printed valid YAML"))
        .filter(|document| !document.is_null())
        .collect()
}

/// Deserialises `document` into `T`, refusing any field `T` does not know: the paths of such
/// fields are the error.
fn parse_strict<T: DeserializeOwned>(document: &Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    // serde_ignored writes `?` for each Option it passes through; drop those to get the path a
    // person would write.
    let parsed = serde_ignored::deserialize(document.clone(), |path| {
        let segments: Vec<String> = path
            .to_string()
            .split('.')
            .filter(|segment| *segment != "?")
            .map(str::to_string)
            .collect();
        unknown.push(segments.join("."))
    })
    .map_err(|error| format!("does not parse as {}: {error}", type_name::<T>()))?;
    if unknown.is_empty() {
        Ok(parsed)
    } else {
        Err(format!(
            "has fields unknown to {}: {unknown:?}",
            type_name::<T>()
        ))
    }
}

fn strict<T: DeserializeOwned>(document: &Value, label: &str) -> T {
    parse_strict(document).unwrap_or_else(|problem| panic!("{label} {problem}"))
}

fn text_at<'a>(document: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(document, |value, key| value.get(*key))
        .and_then(Value::as_str)
}

/// Every object of a rendering, by kind, each parsed strictly into its typed form.
#[derive(Default)]
struct Rendered {
    deployments: Vec<Deployment>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    services: Vec<Service>,
    config_maps: Vec<ConfigMap>,
    namespaces: Vec<Namespace>,
    secrets: Vec<Secret>,
    custom_resource_definitions: Vec<CustomResourceDefinition>,
    /// No `k8s-openapi` type exists for it; [`check_service_monitor`] checks it by hand.
    service_monitors: Vec<Value>,
}

impl Rendered {
    fn parse(text: &str) -> Self {
        let mut rendered = Rendered::default();
        for document in yaml_documents(text) {
            let kind = text_at(&document, &["kind"]).unwrap_or_default();
            let name = text_at(&document, &["metadata", "name"]).unwrap_or_default();
            let label = format!("{kind}/{name}");
            match kind {
                "Deployment" => rendered.deployments.push(strict(&document, &label)),
                "ServiceAccount" => rendered.service_accounts.push(strict(&document, &label)),
                "ClusterRole" => rendered.cluster_roles.push(strict(&document, &label)),
                "ClusterRoleBinding" => rendered
                    .cluster_role_bindings
                    .push(strict(&document, &label)),
                "Role" => rendered.roles.push(strict(&document, &label)),
                "RoleBinding" => rendered.role_bindings.push(strict(&document, &label)),
                "Service" => rendered.services.push(strict(&document, &label)),
                "ConfigMap" => rendered.config_maps.push(strict(&document, &label)),
                "Namespace" => rendered.namespaces.push(strict(&document, &label)),
                "Secret" => rendered.secrets.push(strict(&document, &label)),
                "CustomResourceDefinition" => rendered
                    .custom_resource_definitions
                    .push(strict(&document, &label)),
                "ServiceMonitor" => rendered.service_monitors.push(document),
                other => panic!("{label}: no check knows the kind `{other}`; add one"),
            }
        }
        rendered
    }

    fn the_deployment(&self) -> &Deployment {
        assert_eq!(self.deployments.len(), 1, "one operator Deployment");
        &self.deployments[0]
    }

    fn the_service(&self) -> &Service {
        assert_eq!(self.services.len(), 1, "one metrics Service");
        &self.services[0]
    }
}

/// (API group, resource) → verbs granted by a set of rules; fails on wildcards and on rules that
/// name URLs or single objects, which this chart never needs.
fn grants(rules: &[PolicyRule], owner: &str) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in rules {
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        for word in groups.iter().chain(&resources).chain(&rule.verbs) {
            assert!(
                !word.contains('*'),
                "{owner}: wildcard `{word}` in rule {rule:?}"
            );
        }
        if resources.iter().any(|resource| resource == "secrets") {
            assert_eq!(
                rule.verbs,
                ["get", "list", "watch"],
                "{owner}: Secrets are read and watched, never written: {rule:?}"
            );
        }
        assert!(
            rule.non_resource_urls.is_none() && rule.resource_names.is_none(),
            "{owner}: unexpected URL or resourceNames rule {rule:?}"
        );
        for group in &groups {
            for resource in &resources {
                granted
                    .entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    granted
}

fn expected(table: &[(&str, &str, &[&str])]) -> BTreeMap<(String, String), BTreeSet<String>> {
    table
        .iter()
        .map(|(group, resource, verbs)| {
            (
                (group.to_string(), resource.to_string()),
                verbs.iter().map(|verb| verb.to_string()).collect(),
            )
        })
        .collect()
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or_default()
}

/// The operator Deployment: arguments, identity, probes, security and how it is selected.
fn check_operator_deployment(rendered: &Rendered, watch_namespaces: &[&str]) {
    let deployment = rendered.the_deployment();
    assert_eq!(name_of(&deployment.metadata), FULLNAME);
    assert_eq!(namespace_of(&deployment.metadata), RELEASE_NAMESPACE);
    let spec = deployment.spec.as_ref().expect("Deployment spec");
    assert_eq!(spec.replicas, Some(2), "two replicas with leader election");

    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|meta| meta.labels.clone())
        .unwrap_or_default();
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    assert!(!selector.is_empty(), "the Deployment selects by labels");
    for (key, value) in &selector {
        assert_eq!(
            template_labels.get(key),
            Some(value),
            "pod template lacks selector label {key}"
        );
    }

    let pod = spec.template.spec.as_ref().expect("pod spec");
    let service_account = pod
        .service_account_name
        .as_deref()
        .expect("serviceAccountName");
    assert!(
        rendered
            .service_accounts
            .iter()
            .any(|account| name_of(&account.metadata) == service_account
                && namespace_of(&account.metadata) == RELEASE_NAMESPACE),
        "the pod's ServiceAccount `{service_account}` is rendered"
    );

    let pod_security = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(pod_security.run_as_user, Some(65532));
    assert_eq!(
        pod_security
            .seccomp_profile
            .as_ref()
            .map(|profile| profile.type_.as_str()),
        Some("RuntimeDefault")
    );

    assert_eq!(pod.containers.len(), 1, "one operator container");
    let container = &pod.containers[0];
    let security = container
        .security_context
        .as_ref()
        .expect("container securityContext");
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security
            .capabilities
            .as_ref()
            .and_then(|caps| caps.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    assert_eq!(security.privileged, None);
    let resources = container.resources.as_ref().expect("resources");
    assert!(
        resources
            .requests
            .as_ref()
            .is_some_and(|r| r.contains_key("memory"))
    );
    assert!(
        resources
            .limits
            .as_ref()
            .is_some_and(|l| l.contains_key("memory"))
    );

    let args = container.args.clone().unwrap_or_default();
    let mut expected_args: Vec<String> = [
        "run",
        "--leader-election",
        "--metrics-addr",
        "0.0.0.0:8080",
        "--worker-image",
        "ghcr.io/signal-operator/signal-worker:0.1.0",
        "--log-format",
        "json",
        "--log-level",
        "info",
    ]
    .map(String::from)
    .to_vec();
    for namespace in watch_namespaces {
        expected_args.extend(["--namespace".to_string(), namespace.to_string()]);
    }
    assert_eq!(args, expected_args);
    assert_eq!(
        container.image.as_deref(),
        Some("ghcr.io/signal-operator/signal-operator:0.1.0")
    );

    let env = container.env.clone().unwrap_or_default();
    for (variable, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let from = env
            .iter()
            .find(|var| var.name == variable)
            .and_then(|var| var.value_from.as_ref())
            .and_then(|source| source.field_ref.as_ref())
            .map(|selector| selector.field_path.as_str());
        assert_eq!(from, Some(field), "{variable} from the downward API");
    }

    let ports = container.ports.clone().unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|port| port.name.as_deref() == Some("metrics") && port.container_port == 8080),
        "container port `metrics` 8080: {ports:?}"
    );
    for (probe, path) in [
        (&container.liveness_probe, "/healthz"),
        (&container.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|probe| probe.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("metrics".into()));
    }

    // The metrics Service reaches these pods on that port.
    let service = rendered.the_service();
    let service_spec = service.spec.as_ref().expect("Service spec");
    let service_selector = service_spec.selector.clone().unwrap_or_default();
    assert!(!service_selector.is_empty());
    for (key, value) in &service_selector {
        assert_eq!(
            template_labels.get(key),
            Some(value),
            "Service selector {key}"
        );
    }
    let service_ports = service_spec.ports.clone().unwrap_or_default();
    assert!(service_ports.iter().any(|port| {
        port.name.as_deref() == Some("metrics")
            && port.port == 8080
            && port.target_port == Some(IntOrString::String("metrics".into()))
    }));
}

/// Every binding points at a rendered role and at the operator's ServiceAccount only.
fn check_bindings(rendered: &Rendered) {
    let subject_ok = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        let subjects = subjects.clone().unwrap_or_default();
        subjects.len() == 1
            && subjects[0].kind == "ServiceAccount"
            && subjects[0].name == FULLNAME
            && subjects[0].namespace.as_deref() == Some(RELEASE_NAMESPACE)
    };
    for binding in &rendered.cluster_role_bindings {
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert!(
            rendered
                .cluster_roles
                .iter()
                .any(|role| name_of(&role.metadata) == binding.role_ref.name),
            "ClusterRoleBinding refers to a rendered ClusterRole"
        );
        assert!(subject_ok(&binding.subjects), "{binding:?}");
    }
    for binding in &rendered.role_bindings {
        assert_eq!(binding.role_ref.kind, "Role");
        assert!(
            rendered.roles.iter().any(|role| {
                name_of(&role.metadata) == binding.role_ref.name
                    && namespace_of(&role.metadata) == namespace_of(&binding.metadata)
            }),
            "RoleBinding {:?} refers to a Role in its namespace",
            binding.metadata.name
        );
        assert!(subject_ok(&binding.subjects), "{binding:?}");
    }
    let roles = rendered.roles.len() + rendered.cluster_roles.len();
    let bindings = rendered.role_bindings.len() + rendered.cluster_role_bindings.len();
    assert_eq!(roles, bindings, "each role has its binding");
}

fn role_grants(role: &Role) -> BTreeMap<(String, String), BTreeSet<String>> {
    let owner = format!(
        "Role {}/{}",
        namespace_of(&role.metadata),
        name_of(&role.metadata)
    );
    grants(role.rules.as_deref().unwrap_or_default(), &owner)
}

fn leader_election_role(rendered: &Rendered) -> &Role {
    let leader_name = format!("{FULLNAME}-leader-election");
    rendered
        .roles
        .iter()
        .find(|role| name_of(&role.metadata) == leader_name)
        .expect("the leader-election Role")
}

/// The hand check of the ServiceMonitor: the fields the Prometheus Operator needs, pointing at the
/// metrics Service, and no field this test does not look at.
fn check_service_monitor(monitor: &Value, service: &Service) {
    assert_eq!(
        text_at(monitor, &["apiVersion"]),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(text_at(monitor, &["metadata", "name"]), Some(FULLNAME));
    assert_eq!(
        text_at(monitor, &["metadata", "namespace"]),
        Some(RELEASE_NAMESPACE)
    );
    let spec = monitor
        .get("spec")
        .and_then(Value::as_mapping)
        .expect("ServiceMonitor spec");
    let spec_keys: BTreeSet<&str> = spec.keys().filter_map(Value::as_str).collect();
    assert_eq!(
        spec_keys,
        BTreeSet::from(["endpoints", "namespaceSelector", "selector"])
    );

    let service_labels = service.metadata.labels.clone().unwrap_or_default();
    let match_labels = monitor
        .get("spec")
        .and_then(|spec| spec.get("selector"))
        .and_then(|selector| selector.get("matchLabels"))
        .and_then(Value::as_mapping)
        .expect("spec.selector.matchLabels");
    assert!(!match_labels.is_empty());
    for (key, value) in match_labels {
        let (key, value) = (key.as_str().expect("key"), value.as_str().expect("value"));
        assert_eq!(
            service_labels.get(key).map(String::as_str),
            Some(value),
            "the ServiceMonitor selects the metrics Service by {key}"
        );
    }
    let match_names = monitor
        .get("spec")
        .and_then(|spec| spec.get("namespaceSelector"))
        .and_then(|selector| selector.get("matchNames"))
        .and_then(Value::as_sequence)
        .expect("spec.namespaceSelector.matchNames");
    assert_eq!(match_names, &[Value::from(RELEASE_NAMESPACE)]);

    let endpoints = monitor
        .get("spec")
        .and_then(|spec| spec.get("endpoints"))
        .and_then(Value::as_sequence)
        .expect("spec.endpoints");
    assert_eq!(endpoints.len(), 1);
    let endpoint = endpoints[0].as_mapping().expect("an endpoint mapping");
    let endpoint_keys: BTreeSet<&str> = endpoint.keys().filter_map(Value::as_str).collect();
    assert_eq!(
        endpoint_keys,
        BTreeSet::from(["interval", "path", "port", "scrapeTimeout"])
    );
    assert_eq!(text_at(&endpoints[0], &["port"]), Some("metrics"));
    assert_eq!(text_at(&endpoints[0], &["path"]), Some("/metrics"));
    assert_eq!(text_at(&endpoints[0], &["interval"]), Some("30s"));
    let service_port_names: Vec<_> = service
        .spec
        .as_ref()
        .and_then(|spec| spec.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|port| port.name)
        .collect();
    assert!(service_port_names.contains(&"metrics".to_string()));
}

#[test]
fn chart_passes_helm_lint_strict() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("UTF-8 path");
    helm(&["lint", "--strict", chart]);
    helm(&[
        "lint",
        "--strict",
        chart,
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "watchNamespaces={a,b}",
    ]);
}

#[test]
fn default_render_watches_all_namespaces_with_least_privilege() {
    let rendered = Rendered::parse(&helm_template(&[]));
    check_operator_deployment(&rendered, &[]);
    check_bindings(&rendered);
    assert!(
        rendered.service_monitors.is_empty(),
        "ServiceMonitor is opt-in"
    );
    assert!(rendered.config_maps.is_empty() && rendered.secrets.is_empty());
    assert_eq!(rendered.service_accounts.len(), 1);
    assert_eq!(rendered.custom_resource_definitions.len(), 1);

    assert_eq!(rendered.cluster_roles.len(), 1, "one ClusterRole");
    let cluster_role = &rendered.cluster_roles[0];
    assert_eq!(
        grants(
            cluster_role.rules.as_deref().unwrap_or_default(),
            "ClusterRole"
        ),
        expected(PIPELINE_GRANTS)
    );
    assert!(cluster_role.aggregation_rule.is_none());

    assert_eq!(rendered.roles.len(), 1, "only the leader-election Role");
    let leader = leader_election_role(&rendered);
    assert_eq!(namespace_of(&leader.metadata), RELEASE_NAMESPACE);
    assert_eq!(role_grants(leader), expected(LEADER_ELECTION_GRANTS));
}

#[test]
fn namespaced_render_grants_roles_per_namespace_and_a_service_monitor() {
    let rendered = Rendered::parse(&helm_template(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "watchNamespaces={a,b}",
    ]));
    check_operator_deployment(&rendered, &["a", "b"]);
    check_bindings(&rendered);
    assert!(
        rendered.cluster_roles.is_empty() && rendered.cluster_role_bindings.is_empty(),
        "nothing cluster-wide when namespaces are listed"
    );

    let mut pipeline_role_namespaces = Vec::new();
    for role in &rendered.roles {
        if name_of(&role.metadata) == FULLNAME {
            pipeline_role_namespaces.push(namespace_of(&role.metadata).to_string());
            assert_eq!(role_grants(role), expected(PIPELINE_GRANTS));
        }
    }
    pipeline_role_namespaces.sort();
    assert_eq!(pipeline_role_namespaces, ["a", "b"]);
    let leader = leader_election_role(&rendered);
    assert_eq!(namespace_of(&leader.metadata), RELEASE_NAMESPACE);
    assert_eq!(role_grants(leader), expected(LEADER_ELECTION_GRANTS));
    assert_eq!(rendered.roles.len(), 3);

    assert_eq!(rendered.service_monitors.len(), 1);
    check_service_monitor(&rendered.service_monitors[0], rendered.the_service());
}

#[test]
fn values_schema_refuses_unknown_and_malformed_values() {
    let chart = chart_dir();
    for bad in [
        "replicas=3",
        "logFormat=xml",
        "watchNamespaces={Not_A_Namespace}",
    ] {
        let output = Command::new(helm_binary())
            .args(["template", RELEASE, chart.to_str().expect("UTF-8 path")])
            .args(["--set", bad])
            .output()
            .expect("helm could not be started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains("schema"),
            "helm accepted --set {bad}: {stderr}"
        );
    }
}

#[test]
fn chart_crd_is_the_generated_crd() {
    let generated_path = workspace_root().join("crds/signalpipeline.yaml");
    let chart_path = chart_dir().join("crds/signalpipeline.yaml");
    let generated = std::fs::read_to_string(&generated_path)
        .unwrap_or_else(|e| panic!("{}: {e}", generated_path.display()));
    let in_chart = std::fs::read_to_string(&chart_path)
        .unwrap_or_else(|e| panic!("{}: {e}", chart_path.display()));
    assert!(
        generated == in_chart,
        "charts/signal-operator/crds/signalpipeline.yaml differs from crds/signalpipeline.yaml; \
         copy it: cp crds/signalpipeline.yaml charts/signal-operator/crds/"
    );

    let documents = yaml_documents(&in_chart);
    assert_eq!(documents.len(), 1, "one CRD document");
    let crd: CustomResourceDefinition = strict(&documents[0], "the chart's CRD");
    assert_eq!(crd.spec.group, "signals.dev");
    assert_eq!(crd.spec.names.kind, "SignalPipeline");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert!(
        crd.spec
            .names
            .short_names
            .as_ref()
            .is_some_and(|names| names.iter().any(|name| name == "sigp")),
        "`kubectl get sigp` works"
    );
    let version = crd
        .spec
        .versions
        .iter()
        .find(|version| version.name == "v1alpha1")
        .expect("version v1alpha1");
    let subresources = version.subresources.as_ref().expect("subresources");
    assert!(subresources.status.is_some(), "status subresource");
    let scale = subresources.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.workers.replicas");
}

#[test]
fn dev_manifests_are_valid_objects() {
    let dev_dir = workspace_root().join("deploy/dev");
    let mut files: Vec<_> = std::fs::read_dir(&dev_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dev_dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    let text = files
        .iter()
        .map(|path| std::fs::read_to_string(path).expect("readable manifest"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    let rendered = Rendered::parse(&text);

    assert_eq!(rendered.namespaces.len(), 1);
    assert_eq!(name_of(&rendered.namespaces[0].metadata), "signals");
    let mut deployments: Vec<_> = rendered
        .deployments
        .iter()
        .map(|deployment| name_of(&deployment.metadata))
        .collect();
    deployments.sort();
    assert_eq!(deployments, ["clickhouse", "nats", "redis"]);
    let services: BTreeMap<&str, i32> = rendered
        .services
        .iter()
        .map(|service| {
            let port = service
                .spec
                .as_ref()
                .and_then(|spec| spec.ports.as_ref())
                .and_then(|ports| ports.first())
                .map(|port| port.port)
                .unwrap_or_default();
            (name_of(&service.metadata), port)
        })
        .collect();
    assert_eq!(
        services,
        BTreeMap::from([("clickhouse", 8123), ("nats", 4222), ("redis", 6379)])
    );
    // The examples reference this Secret and these keys.
    let auth = rendered
        .secrets
        .iter()
        .find(|secret| name_of(&secret.metadata) == "clickhouse-auth")
        .expect("Secret clickhouse-auth");
    let keys: BTreeSet<&str> = auth
        .string_data
        .as_ref()
        .map(|data| data.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert_eq!(keys, BTreeSet::from(["password", "user"]));
    for object in rendered
        .deployments
        .iter()
        .map(|d| &d.metadata)
        .chain(rendered.services.iter().map(|s| &s.metadata))
        .chain(rendered.secrets.iter().map(|s| &s.metadata))
    {
        assert_eq!(namespace_of(object), "signals", "{:?}", object.name);
    }
}

#[test]
fn strict_parsing_reports_unknown_fields() {
    let misspelt = yaml_documents(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  selector: {}\n  \
         template:\n    spec:\n      containers:\n        - name: c\n          imagePullPolcy: Always\n",
    );
    let problem = parse_strict::<Deployment>(&misspelt[0]).unwrap_err();
    assert!(
        problem.contains("spec.template.spec.containers.0.imagePullPolcy"),
        "{problem}"
    );
    let wrong_kind = yaml_documents("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n");
    assert!(parse_strict::<Deployment>(&wrong_kind[0]).is_err());
}
