//! Training (`lacuna-train`): the training forward equals the reference model's on SmolLM2, and
//! bad inputs are refused, naming the problem, before any step.

use candle_core::{Device, Tensor};
use lacuna_api::PretrainRecipe;
use lacuna_model::KvCache;
use lacuna_tests::smollm2;
use lacuna_train::data::{TextSource, load_source};
use lacuna_train::testing::{tiny_config, tiny_llama};
use lacuna_train::trainer::{self, RunOptions};
use lacuna_train::{Error, TrainLlama};

#[test]
fn training_forward_equals_the_reference_logits_on_smollm2() {
    let ck = smollm2();
    let text = "The capital of France is Paris, and the capital of Italy is";
    let ids = ck.tokenizer.encode(text, false).unwrap();
    let n = ids.len();
    let mut cache = KvCache::new(ck.model.config(), n);
    let hidden = ck.model.forward(&ids, &mut cache).unwrap();
    let want = ck.model.logits(&hidden, n).unwrap();

    let m = TrainLlama::from_model(&ck.model, &Device::Cpu).unwrap();
    let t = Tensor::from_vec(ids.clone(), (1, n), &Device::Cpu).unwrap();
    let out = m.forward_no_grad(&t, true).unwrap();
    assert_eq!(out.hidden.len(), ck.model.num_layers());
    let got = out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1e-3, "training logits differ from the reference by {d}");
}

fn recipe(yaml: &str) -> PretrainRecipe {
    lacuna_api::from_yaml(yaml).unwrap()
}

fn source(name: &str, docs: &[&str]) -> TextSource {
    TextSource {
        name: name.into(),
        train: docs.iter().map(|s| s.to_string()).collect(),
        heldout: docs.iter().map(|s| s.to_string()).collect(),
    }
}

const TEXT: &str = "Sparse models keep most of their quality when they continue to pretrain with the mask frozen. ";

#[test]
fn weights_summing_to_zero_are_refused() {
    let r = recipe(
        "data:\n  sources:\n    - {name: wiki, weight: 0}\n    - {name: python, weight: 0}\nschedule: {steps: 1}\n",
    );
    let e = r.validate().unwrap_err().to_string();
    assert!(e.contains("positive"), "{e}");
    let ck = smollm2();
    let err = trainer::pretrain(
        &ck.model,
        &ck.tokenizer,
        &r,
        vec![source("wiki", &[TEXT]), source("python", &[TEXT])],
        &RunOptions::default(),
        &mut |_| panic!("no training event may happen"),
    )
    .err()
    .expect("refused");
    assert!(matches!(err, Error::Recipe(_)) && err.to_string().contains("data.sources"), "{err}");
}

#[test]
fn missing_and_empty_sources_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = format!("file://{}", tmp.path().join("nope.txt").display());
    let e = load_source(None, &missing, &|_| {}).err().expect("missing").to_string();
    assert!(e.contains("nope.txt") && e.contains("does not exist"), "{e}");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n\n   \n").unwrap();
    let e = load_source(None, &format!("file://{}", empty.display()), &|_| {}).err().expect("empty").to_string();
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    let e = load_source(None, "wikipedia", &|_| {}).err().expect("unknown").to_string();
    assert!(e.contains("wikipedia") && e.contains("known datasets"), "{e}");
}

fn tiny(seed: u64) -> lacuna_model::Llama {
    let smol = smollm2();
    let mut cfg = tiny_config(smol.model.config().vocab_size, 32, 2, 4, 2, true);
    cfg.eos_token_ids = smol.model.config().eos_token_ids.clone();
    tiny_llama(&cfg, seed, 0.5).unwrap()
}

const PRETRAIN: &str = "data:\n  sources:\n    - {name: prose, weight: 1}\n  sequenceLength: 8\n\
                        schedule: {steps: 3, checkpointEvery: 1, evalSequences: 1}\n";

#[test]
fn a_mask_whose_shape_disagrees_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(3);
    let mask = tmp.path().join("mask.safetensors");
    let bad = Tensor::ones((5, 7), candle_core::DType::U8, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("model.layers.0.mlp.down_proj.weight".to_owned(), bad)]),
        &mask,
    )
    .unwrap();
    let opts = RunOptions { masks: Some(mask), ..Default::default() };
    let err = trainer::pretrain(
        &model,
        &smollm2().tokenizer,
        &recipe(PRETRAIN),
        vec![source("prose", &[TEXT, TEXT])],
        &opts,
        &mut |_| panic!("no training event may happen"),
    )
    .err()
    .expect("refused");
    let e = err.to_string();
    assert!(e.contains("down_proj") && e.contains("[5, 7]") && e.contains("shape"), "{e}");
}

#[test]
fn resuming_another_models_checkpoint_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tiny(1), tiny(2));
    let dir = tmp.path().join("ck");
    let tok = &smollm2().tokenizer;
    let r = recipe(PRETRAIN);
    let opts = RunOptions { checkpoint_dir: Some(dir.clone()), ..Default::default() };
    let (_, s) = trainer::pretrain(&a, tok, &r, vec![source("prose", &[TEXT, TEXT])], &opts, &mut |_| {}).unwrap();
    assert_eq!(s.steps, 3);
    assert!(dir.join("state.json").is_file(), "checkpoints of steps 1 and 2 were written");
    let opts = RunOptions { checkpoint_dir: Some(dir.clone()), resume: true, ..Default::default() };
    let err = trainer::pretrain(&b, tok, &r, vec![source("prose", &[TEXT, TEXT])], &opts, &mut |e| {
        panic!("no training event may happen: {e:?}")
    })
    .err()
    .expect("refused");
    assert!(err.to_string().contains("another model"), "{err}");
    // The right model resumes (at step 2, the last checkpoint) and finishes.
    let mut resumed = None;
    let (_, s) = trainer::pretrain(&a, tok, &r, vec![source("prose", &[TEXT, TEXT])], &opts, &mut |e| {
        if let trainer::Event::Start { step, .. } = e {
            resumed = Some(step);
        }
    })
    .unwrap();
    assert_eq!((resumed, s.steps, s.resumed_at), (Some(2), 3, Some(2)));
}

/// The sparse trainer (masked layers as their kept values, sparse products) follows the dense
/// masked reference: 20 steps of the same run give the same loss curve within f32 rounding, the
/// same sparsity and nearly the same weights. Sequences of 80 tokens in batches of 2 take the
/// prefill-sized kernels (160 rows: more than one token tile).
#[test]
fn sparse_kernels_follow_the_dense_masked_loss_curve() {
    let model = tiny(21);
    let tok = &smollm2().tokenizer;
    let r = recipe(
        "data:\n  sources:\n    - {name: prose, weight: 1}\n  sequenceLength: 80\n\
         schedule: {steps: 20, batchSize: 2, evalSequences: 1}\noptimizer: {learningRate: 0.003, warmupSteps: 2}\n",
    );
    let docs: Vec<String> =
        (0..40).map(|i| format!("{TEXT} Document {i} of the corpus, with its own words. ")).collect();
    let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let run = |masked_dense: bool| {
        let mut losses = Vec::new();
        let opts = RunOptions { masked_dense, ..Default::default() };
        let (m, s) = trainer::pretrain(&model, tok, &r, vec![source("prose", &docs)], &opts, &mut |e| {
            if let trainer::Event::Step(st) = e {
                losses.push(st.loss);
            }
        })
        .unwrap();
        (m.to_model(std::path::Path::new("tiny")).unwrap(), s, losses)
    };
    let (dm, ds, dl) = run(true);
    let (sm, ss, sl) = run(false);
    assert_eq!((dl.len(), sl.len()), (20, 20));
    assert!(dl[19] < dl[0] - 0.5, "the run learns: {dl:?}");
    for (i, (a, b)) in dl.iter().zip(&sl).enumerate() {
        assert!((a - b).abs() <= 2e-3 * a.abs(), "step {}: dense masked {a}, sparse {b}", i + 1);
    }
    assert_eq!(ds.global_sparsity, ss.global_sparsity);
    for ((name, a), (_, b)) in dm.tensors().into_iter().zip(sm.tensors()) {
        let (a, b) = (a.to_f32_vec(), b.to_f32_vec());
        let zeros = |v: &[f32]| v.iter().filter(|x| **x == 0.0).count();
        assert_eq!(zeros(&a), zeros(&b), "{name}: sparsity");
        let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < 1e-3, "{name}: weights differ by {d}");
    }
}
