//! Model-level pruning on SmolLM2: resume after an interruption is bit-identical, iterative
//! pruning only grows masks, N:M patterns are exact, and bad recipes fail before any work.

use lacuna_api::PruneRecipe;
use lacuna_model::{LinearKind, Llama};
use lacuna_prune::pipeline::{self, RunOptions};
use lacuna_tests::smollm2;

/// A fresh copy of SmolLM2's model (the shared one is not mutated).
fn model() -> Llama {
    let ck = smollm2();
    let tensors = ck.model.tensors().into_iter().map(|(n, w)| (n, w.clone())).collect();
    Llama::load(ck.model.config().clone(), tensors, &ck.path).unwrap()
}

fn recipe(y: &str) -> PruneRecipe {
    let r: PruneRecipe = lacuna_api::from_yaml(y).unwrap();
    r.validate().unwrap();
    r
}

/// A small deterministic calibration set: windows of a tokenized paragraph.
fn calibration(samples: usize, seq_len: usize) -> Vec<Vec<u32>> {
    let ck = smollm2();
    let text = "The committee met on Tuesday to discuss the budget for the new library. Several members \
                argued that the reading rooms should stay open late, while others wanted more computers. \
                def mean(xs):\n    return sum(xs) / len(xs)\n\nIn 1887 the railway reached the town. ";
    let stream: Vec<u32> = (0..8).flat_map(|_| ck.tokenizer.encode(text, false).unwrap()).collect();
    pipeline::calibration_windows(&stream, samples, seq_len, 0).unwrap()
}

fn linears(m: &Llama) -> Vec<(String, Vec<f32>)> {
    let mut v = Vec::new();
    for b in 0..m.num_layers() {
        for k in LinearKind::ALL {
            v.push((format!("{b}.{}", k.hf_name()), m.linear(b, k).unwrap().to_f32_vec()));
        }
    }
    v
}

#[test]
fn interrupted_run_resumes_bit_identically() {
    let r = recipe("method: sparsegpt\nsparsity: 0.5\ntargets: ['^model\\.layers\\.[0-4]\\.']\n");
    let calib = calibration(4, 64);
    let mut whole = model();
    let s = pipeline::prune_model(&mut whole, &r, &calib, &RunOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(s.layers.len(), 5 * 7);
    assert!(s.resumed_at_block.is_none());

    let dir = tempfile::tempdir().unwrap();
    let opts = RunOptions { checkpoint_dir: Some(dir.path().to_path_buf()), stop_after_blocks: Some(3) };
    let mut first = model();
    let err = pipeline::prune_model(&mut first, &r, &calib, &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(err, lacuna_prune::Error::Interrupted { next_block: 3 }), "{err}");
    // A new process: the original model again, the same recipe and calibration.
    let mut resumed = model();
    let opts = RunOptions { checkpoint_dir: Some(dir.path().to_path_buf()), stop_after_blocks: None };
    let s2 = pipeline::prune_model(&mut resumed, &r, &calib, &opts, &mut |_| {}).unwrap();
    assert_eq!(s2.resumed_at_block, Some(3));
    for ((name, a), (_, b)) in linears(&whole).into_iter().zip(linears(&resumed)) {
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs after resume");
    }

    // A checkpoint of another recipe is refused, never silently mixed in.
    let other = recipe("method: sparsegpt\nsparsity: 0.6\ntargets: ['^model\\.layers\\.[0-4]\\.']\n");
    let dir2 = tempfile::tempdir().unwrap();
    let o = RunOptions { checkpoint_dir: Some(dir2.path().to_path_buf()), stop_after_blocks: Some(1) };
    let _ = pipeline::prune_model(&mut model(), &r, &calib, &o, &mut |_| {});
    let o = RunOptions { checkpoint_dir: Some(dir2.path().to_path_buf()), stop_after_blocks: None };
    let e = pipeline::prune_model(&mut model(), &other, &calib, &o, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("another model, recipe or calibration"), "{e}");
}

#[test]
fn iterative_pruning_only_grows_masks_and_hits_exact_sparsity() {
    let calib = calibration(2, 64);
    let mut m = model();
    let r50 = recipe("method: wanda\nsparsity: 0.5\n");
    pipeline::prune_model(&mut m, &r50, &calib, &RunOptions::default(), &mut |_| {}).unwrap();
    let at50 = linears(&m);
    let r70 = recipe("method: wanda\nsparsity: 0.7\n");
    let s = pipeline::prune_model(&mut m, &r70, &calib, &RunOptions::default(), &mut |_| {}).unwrap();
    for ((name, a), (_, b)) in at50.iter().zip(linears(&m)) {
        for (x, y) in a.iter().zip(&b) {
            assert!(*x != 0.0 || *y == 0.0, "{name}: a zero of the 50% model came back");
        }
        let z = b.iter().filter(|v| **v == 0.0).count() as f64 / b.len() as f64;
        assert!((z - 0.7).abs() < 1e-3, "{name}: sparsity {z}");
    }
    assert!((s.sparsity - 0.7).abs() < 1e-3);
}

#[test]
fn two_four_pattern_is_exact() {
    let mut m = model();
    let r = recipe("method: magnitude\nstructure: '2:4'\n");
    pipeline::prune_model(&mut m, &r, &[], &RunOptions::default(), &mut |_| {}).unwrap();
    for (name, w) in linears(&m) {
        for g in w.chunks(4) {
            assert!(g.iter().filter(|v| **v == 0.0).count() >= 2, "{name}: group {g:?}");
        }
    }
}

#[test]
fn bad_recipes_fail_before_any_work() {
    let m = model();
    let e = pipeline::preflight(&m, &recipe("method: wanda\nsparsity: 0.5\ntargets: ['^nothing$']\n")).unwrap_err();
    assert!(e.to_string().contains("match no layer"), "{e}");
    let e =
        pipeline::preflight(&m, &recipe("method: wanda\nsparsity: 0.5\ncalibration: {seqLen: 100000}\n")).unwrap_err();
    assert!(e.to_string().contains("exceeds the model's context"), "{e}");
    let r: PruneRecipe = lacuna_api::from_yaml("method: wanda\nsparsity: 1.5\n").unwrap();
    assert!(pipeline::preflight(&m, &r).unwrap_err().to_string().contains("sparsity"));
    let e = lacuna_api::from_yaml::<PruneRecipe>("method: wanda\nsparsity: 0.5\nblocksize: 64\n").unwrap_err();
    assert!(e.to_string().contains("blocksize"), "{e}");
    let e = lacuna_api::from_yaml::<PruneRecipe>("method: wanda\nstructure: '3:2'\n").unwrap_err();
    assert!(e.to_string().contains("structure"), "{e}");
}

/// The engine's bitmask path on a 70% model equals the dense reference path: logits within f32
/// summation noise, the same greedy tokens, and fewer bytes streamed per token.
#[test]
fn bitmask_kernels_match_the_dense_reference_on_a_pruned_model() {
    use lacuna_model::hf::{self, SaveOptions};
    use lacuna_model::{Checkpoint, Kernels, KvCache};
    let mut m = model();
    pipeline::prune_model(
        &mut m,
        &recipe("method: magnitude\nsparsity: 0.7\n"),
        &[],
        &RunOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m70");
    hf::save_dir(&dir, m.config(), &m.tensors(), Some(&smollm2().tokenizer), &SaveOptions::default()).unwrap();
    let dense = Checkpoint::open_with(&dir, Kernels::Dense).unwrap();
    let sparse = Checkpoint::open_with(&dir, Kernels::Auto).unwrap();
    let bitmask = sparse.model.tensors().iter().filter(|(_, w)| w.is_bitmask()).count();
    assert_eq!(bitmask, 7 * sparse.model.num_layers(), "every 70% linear should be served as a bitmask");
    assert!(dense.model.tensors().iter().all(|(_, w)| !w.is_bitmask()));
    let (db, sb) = (dense.model.weight_bytes_per_token(), sparse.model.weight_bytes_per_token());
    assert!((sb as f64) < 0.7 * db as f64, "bitmask bytes {sb} vs dense {db}");

    let ids = smollm2().tokenizer.encode("The old lighthouse keeper climbed the stairs and", false).unwrap();
    let run = |ck: &Checkpoint| {
        let mut cache = KvCache::new(ck.model.config(), ids.len());
        let h = ck.model.forward(&ids, &mut cache).unwrap();
        ck.model.logits(&h, ids.len()).unwrap()
    };
    let (a, b) = (run(&dense), run(&sparse));
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d < 1e-3, "bitmask vs dense logits differ by {d}");
    let params = lacuna_model::generate::GenerateParams { max_new_tokens: 16, ignore_eos: true, ..Default::default() };
    let ga = lacuna_model::generate::generate(&dense.model, &dense.tokenizer, &ids, &params, |_| {}).unwrap();
    let gb = lacuna_model::generate::generate(&sparse.model, &sparse.tokenizer, &ids, &params, |_| {}).unwrap();
    assert_eq!(ga.ids, gb.ids);
}
