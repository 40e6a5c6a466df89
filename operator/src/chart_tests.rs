//! The Helm chart: `helm lint`, then `helm template` in both database modes, every rendered
//! document parsed into its typed Kubernetes object (and nothing dropped on the way: an unknown or
//! misspelt field fails), pods locked down, and RBAC exactly what the operator calls.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The helm binary from `scripts/helm.sh` (which installs it on first use).
fn helm() -> PathBuf {
    let out = Command::new(repo().join("scripts/helm.sh")).output().expect("running scripts/helm.sh");
    assert!(out.status.success(), "scripts/helm.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn run(helm: &Path, args: &[&str]) -> String {
    let out = Command::new(helm).args(args).current_dir(repo()).output().expect("running helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Parses `doc` as `T` and back: a field the type does not know would be lost, so it fails.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let t: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc}"));
    let back = serde_json::to_value(&t).expect("JSON");
    assert_eq!(&back, doc, "fields lost parsing {}", doc["kind"]);
    t
}

#[derive(Default)]
struct Rendered {
    crds: Vec<CustomResourceDefinition>,
    deployments: Vec<Deployment>,
    statefulsets: Vec<StatefulSet>,
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    secrets: usize,
    others: usize,
}

fn render(helm: &Path, extra: &[&str]) -> Rendered {
    let mut args = vec!["template", "lacuna", "charts/lacuna", "--namespace", "lacuna-system", "--include-crds"];
    args.extend_from_slice(extra);
    let text = run(helm, &args);
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("rendered YAML");
    let mut r = Rendered::default();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let kind = doc["kind"].as_str().unwrap_or("").to_owned();
        match (doc["apiVersion"].as_str().unwrap_or(""), kind.as_str()) {
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => r.crds.push(typed(&doc)),
            ("apps/v1", "Deployment") => r.deployments.push(typed(&doc)),
            ("apps/v1", "StatefulSet") => r.statefulsets.push(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => r.cluster_roles.push(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "Role") => r.roles.push(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => drop(typed::<ClusterRoleBinding>(&doc)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => drop(typed::<RoleBinding>(&doc)),
            ("v1", "ServiceAccount") => drop(typed::<ServiceAccount>(&doc)),
            ("v1", "Service") => drop(typed::<Service>(&doc)),
            ("v1", "Secret") => {
                typed::<Secret>(&doc);
                r.secrets += 1;
            }
            (v, k) => panic!("the chart renders an unexpected {v} {k}"),
        }
        if !matches!(
            kind.as_str(),
            "CustomResourceDefinition" | "Deployment" | "StatefulSet" | "ClusterRole" | "Role" | "Secret"
        ) {
            r.others += 1;
        }
    }
    r
}

fn assert_locked_down(name: &str, pod: &PodSpec) {
    let psc = pod.security_context.as_ref().unwrap_or_else(|| panic!("{name}: no pod securityContext"));
    assert_eq!(psc.run_as_non_root, Some(true), "{name}");
    for c in pod.containers.iter().chain(pod.init_containers.iter().flatten()) {
        let sc = c.security_context.as_ref().unwrap_or_else(|| panic!("{name}/{}: no securityContext", c.name));
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{name}/{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{name}/{}", c.name);
        assert_eq!(sc.run_as_non_root, Some(true), "{name}/{}", c.name);
        let drop = sc.capabilities.as_ref().and_then(|c| c.drop.clone()).unwrap_or_default();
        assert_eq!(drop, ["ALL"], "{name}/{}", c.name);
        assert!(c.resources.is_some(), "{name}/{}: no resources", c.name);
    }
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let v = |s: &[&str]| Some(s.iter().map(|x| x.to_string()).collect());
    PolicyRule {
        api_groups: v(groups),
        resources: v(resources),
        verbs: verbs.iter().map(|x| x.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn chart_lints_renders_and_every_object_is_typed_and_locked_down() {
    let helm = helm();
    run(&helm, &["lint", "charts/lacuna", "--strict"]);
    run(
        &helm,
        &[
            "lint",
            "charts/lacuna",
            "--strict",
            "--set",
            "postgresql.mode=external,postgresql.external.existingSecret=pg",
        ],
    );

    let bundled = render(&helm, &[]);
    assert_eq!(bundled.crds.len(), 4);
    let generated = lacuna_api::crd::crds();
    for crd in &bundled.crds {
        assert!(generated.contains(crd), "the chart's {:?} differs from the types", crd.metadata.name);
    }
    assert_eq!(bundled.deployments.len(), 1);
    assert_eq!(bundled.statefulsets.len(), 1, "bundled PostgreSQL");
    assert_eq!(bundled.secrets, 1);
    assert!(bundled.others >= 5, "ServiceAccount, Services, bindings");
    for d in &bundled.deployments {
        assert_locked_down("operator", d.spec.template.spec.as_ref().expect("pod spec"));
    }
    for s in &bundled.statefulsets {
        assert_locked_down("postgresql", s.spec.template.spec.as_ref().expect("pod spec"));
    }

    let external = render(
        &helm,
        &[
            "--set",
            "postgresql.mode=external,postgresql.external.existingSecret=pg",
            "--set",
            "opentelemetry.endpoint=http://otel:4318",
        ],
    );
    assert!(external.statefulsets.is_empty() && external.secrets == 0, "no bundled database");
    let pod = external.deployments[0].spec.template.spec.clone().expect("pod spec");
    let env = pod.containers[0].env.clone().unwrap_or_default();
    let url = env.iter().find(|e| e.name == "LACUNA_LINEAGE_URL").expect("LACUNA_LINEAGE_URL");
    let secret = url.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).expect("from a Secret");
    assert_eq!((secret.name.as_str(), secret.key.as_str()), ("pg", "url"));
    assert!(
        env.iter().any(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT" && e.value.as_deref() == Some("http://otel:4318"))
    );

    // RBAC: exactly the API calls the operator makes, nothing wider.
    let kinds = ["sparsepretrainjobs", "finetunejobs", "quantizejobs", "sparseinferenceservices"];
    let status: Vec<String> = kinds.iter().map(|k| format!("{k}/status")).collect();
    let status: Vec<&str> = status.iter().map(String::as_str).collect();
    let expected = vec![
        rule(&["lacuna.dev"], &kinds, &["get", "list", "watch", "patch"]),
        rule(&["lacuna.dev"], &status, &["patch"]),
        rule(&["batch"], &["jobs"], &["list", "watch", "create", "patch"]),
        rule(&[""], &["configmaps"], &["create", "patch"]),
        rule(&[""], &["pods"], &["list", "watch"]),
        rule(&["apps"], &["deployments"], &["list", "watch", "create", "patch"]),
        rule(&[""], &["services"], &["list", "watch", "create", "patch"]),
        rule(&["autoscaling"], &["horizontalpodautoscalers"], &["list", "watch", "create", "patch", "delete"]),
    ];
    assert_eq!(bundled.cluster_roles.len(), 1);
    assert_eq!(bundled.cluster_roles[0].rules.clone().unwrap_or_default(), expected);
    let lease_rules = bundled.roles[0].rules.clone().unwrap_or_default();
    assert!(
        lease_rules.iter().all(|r| r.api_groups.as_deref() == Some(&["coordination.k8s.io".to_owned()][..])),
        "{lease_rules:?}"
    );
    assert!(lease_rules.iter().all(|r| !r.verbs.iter().any(|v| v == "*" || v == "delete")), "{lease_rules:?}");
}
