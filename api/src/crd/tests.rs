//! The generated CRDs against the checked-in ones, their structure, and every example manifest
//! against them.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::manifest::{self, Manifest, schema_of};
use super::schema::structural_violations;
use super::{crds, file_name};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn generated_schemas_are_structural() {
    for crd in crds() {
        let v = crd.spec.versions.first().expect("a version");
        let schema =
            serde_json::to_value(v.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref())).expect("schema");
        let violations = structural_violations(&schema);
        assert!(violations.is_empty(), "{}: {violations:#?}", crd.spec.names.kind);
        let subresources = v.subresources.as_ref().expect("subresources");
        assert!(subresources.status.is_some(), "{} has a status subresource", crd.spec.names.kind);
    }
}

#[test]
fn checked_in_crds_match_the_types() {
    // `crds/` and the chart's `crds/` are `crdgen --out`; regenerate both when this fails.
    for dir in ["crds", "charts/lacuna/crds"] {
        for crd in crds() {
            let path = repo().join(dir).join(file_name(&crd));
            let on_disk: Value = serde_saphyr::from_str(&read(&path)).expect("YAML");
            let generated = serde_json::to_value(&crd).expect("JSON");
            assert!(
                on_disk == generated,
                "{} is stale: run `cargo run -p lacuna-operator --bin crdgen -- --out {dir}`",
                path.display()
            );
        }
    }
}

#[test]
fn crds_carry_short_names_printer_columns_and_scale() {
    let all = crds();
    let names: Vec<(&str, Vec<String>)> = all
        .iter()
        .map(|c| (c.spec.names.kind.as_str(), c.spec.names.short_names.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        names,
        [
            ("SparsePretrainJob", vec!["spj".to_owned()]),
            ("FineTuneJob", vec!["ftj".to_owned()]),
            ("QuantizeJob", vec!["qj".to_owned()]),
            ("SparseInferenceService", vec!["sis".to_owned()])
        ]
    );
    for c in &all {
        let cols = c.spec.versions[0].additional_printer_columns.clone().unwrap_or_default();
        let cols: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
        assert!(cols.contains(&"Phase") && cols.contains(&"Age"), "{}: {cols:?}", c.spec.names.kind);
    }
    let sis = &all[3].spec.versions[0];
    let scale = sis.subresources.as_ref().and_then(|s| s.scale.as_ref()).expect("scale");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(scale.label_selector_path.as_deref(), Some(".status.selector"));
    let schema = schema_of(&all, "SparsePretrainJob").expect("schema");
    let model = &schema["properties"]["spec"]["properties"]["model"];
    assert_eq!(model["maxProperties"], 1);
    assert!(model["x-kubernetes-validations"][0]["rule"].as_str().unwrap_or("").contains("fromJob"), "{model}");
    let sparsity = &schema["properties"]["spec"]["properties"]["pruning"]["properties"]["sparsity"];
    assert_eq!(
        (sparsity["maximum"].as_f64(), sparsity["exclusiveMaximum"].as_bool()),
        (Some(1.0), Some(true)),
        "{sparsity}"
    );
}

fn example_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![repo().join("examples")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("entry").path();
            // `examples/recipes/` holds `lacuna train` recipe files, not manifests.
            if p.is_dir() && !p.ends_with("recipes") {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_example_parses_and_validates_and_the_pipeline_chains() {
    let files = example_files();
    assert!(files.len() >= 5, "{files:?}");
    let mut all = Vec::new();
    for f in &files {
        let ms = manifest::from_yaml(&read(f)).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(!ms.is_empty(), "{}: no manifest", f.display());
        all.extend(ms);
    }
    let kinds: Vec<&str> = all.iter().map(Manifest::kind).collect();
    assert_eq!(
        kinds,
        [
            "SparsePretrainJob",
            "SparsePretrainJob",
            "FineTuneJob",
            "QuantizeJob",
            "SparseInferenceService",
            "SparseInferenceService"
        ]
    );
    // Every fromJob names an earlier job of the pipeline.
    for (i, m) in all.iter().enumerate() {
        let input = match m {
            Manifest::SparsePretrainJob(r) => &r.spec.model,
            Manifest::FineTuneJob(r) => &r.spec.model,
            Manifest::QuantizeJob(r) => &r.spec.model,
            Manifest::SparseInferenceService(r) => &r.spec.model,
        };
        if let Some(from) = &input.from_job {
            assert!(
                all[..i].iter().any(|p| p.name() == from),
                "{} reads {from}, which comes later or nowhere",
                m.name()
            );
        } else {
            assert_eq!(i, 0, "only the first stage reads a URI");
        }
    }
    let sparsities: Vec<f64> = all
        .iter()
        .filter_map(|m| match m {
            Manifest::SparsePretrainJob(r) => r.spec.pruning.as_ref().and_then(|p| p.sparsity),
            _ => None,
        })
        .collect();
    assert_eq!(sparsities, [0.5, 0.7]);
}

fn first_example() -> Value {
    let f = repo().join("examples/pipeline/01-prune50-pretrain.yaml");
    serde_saphyr::from_str(&read(&f)).expect("YAML")
}

#[test]
fn invalid_manifests_are_refused_with_the_field_named() {
    let base = first_example();
    let case = |edit: &dyn Fn(&mut Value)| {
        let mut doc = base.clone();
        edit(&mut doc);
        manifest::from_value(&doc).expect_err("invalid").to_string()
    };
    let e = case(&|d| d["spec"]["pruning"]["sparsity"] = json!(1.5));
    assert!(e.starts_with("spec.pruning.sparsity:") && e.contains("maximum"), "{e}");
    let e = case(&|d| d["spec"]["pruning"]["sparsitty"] = json!(0.5));
    assert!(e.starts_with("spec.pruning.sparsitty: unknown field"), "{e}");
    let e = case(&|d| d["spec"]["model"]["fromJob"] = json!("other"));
    assert!(e.starts_with("spec.model:") && e.contains("at most 1"), "{e}");
    let e = case(&|d| d["spec"]["model"] = json!({}));
    assert!(e.starts_with("spec.model:"), "{e}");
    let e = case(&|d| d["spec"]["pruning"]["method"] = json!("obs"));
    assert!(e.starts_with("spec.pruning.method:"), "{e}");
    let e = case(&|d| d["spec"]["model"]["uri"] = json!("http://example.com/model"));
    assert!(e.starts_with("spec.model.uri:"), "{e}");
    let e = case(&|d| d["spec"]["runPolicy"]["backoffLimit"] = json!(-1));
    assert!(e.starts_with("spec.runPolicy.backoffLimit:"), "{e}");
    let e = case(&|d| d["spec"]["pretraining"]["schedule"]["steps"] = json!(0));
    assert!(e.starts_with("spec.pretraining.schedule.steps:"), "{e}");
    let e = case(&|d| d["kind"] = json!("PruneJob"));
    assert!(e.starts_with("kind:"), "{e}");
    // Cross-field rules the schema cannot hold come from the types' own checks.
    let e = case(&|d| d["spec"]["pruning"]["structure"] = json!("1:4"));
    assert!(e.starts_with("spec.pruning.sparsity:") && e.contains("contradicts"), "{e}");
    let serve = read(&repo().join("examples/pipeline/05-serve.yaml"));
    let mut sis: Value = serde_saphyr::from_str(&serve).expect("YAML");
    sis["spec"]["autoscaling"]["target"]["waitingRequests"] = json!(3);
    let e = manifest::from_value(&sis).expect_err("two targets").to_string();
    assert!(e.starts_with("spec.autoscaling.target:"), "{e}");
    sis["spec"]["autoscaling"] = json!({"minReplicas": 5, "maxReplicas": 2, "target": {"cpuUtilization": 50}});
    let e = manifest::from_value(&sis).expect_err("min > max").to_string();
    assert!(e.starts_with("spec.autoscaling.minReplicas:"), "{e}");
    // GPUs per replica: only on the GPU backend, and within the schema's range.
    let mut sis: Value = serde_saphyr::from_str(&serve).expect("YAML");
    sis["spec"]["gpus"] = json!(2);
    let e = manifest::from_value(&sis).expect_err("gpus on cpu").to_string();
    assert!(e.starts_with("spec.gpus:") && e.contains("backend: gpu"), "{e}");
    sis["spec"]["backend"] = json!("gpu");
    manifest::from_value(&sis).expect("two GPUs per replica");
    sis["spec"]["gpus"] = json!(0);
    let e = manifest::from_value(&sis).expect_err("no GPUs").to_string();
    assert!(e.starts_with("spec.gpus:"), "{e}");
}
