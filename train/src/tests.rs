//! Gradient and masking checks on tiny random Llamas.

use candle_core::{DType, Device, Tensor};
use lacuna_api::OptimizerSpec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::llama::TrainLlama;
use crate::loss::{cross_entropy, scalar, squarehead};
use crate::optim::{AdamW, masks_from_zeros};
use crate::testing::{tiny_config, tiny_llama};
use crate::trainer::masked_update;

fn random_ids(rng: &mut ChaCha8Rng, vocab: usize, b: usize, t: usize) -> (Tensor, Tensor) {
    let v: Vec<u32> = (0..b * (t + 1)).map(|_| rng.random_range(0..vocab as u32)).collect();
    let mut ids = Vec::new();
    let mut tg = Vec::new();
    for r in v.chunks(t + 1) {
        ids.extend_from_slice(&r[..t]);
        tg.extend_from_slice(&r[1..]);
    }
    (Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(), Tensor::from_vec(tg, b * t, &Device::Cpu).unwrap())
}

/// Backward of CE + SquareHead equals central finite differences (f64) on a sample of entries of
/// every parameter, for untied and tied embeddings and GQA.
#[test]
fn gradients_match_central_finite_differences() {
    for tied in [false, true] {
        let cfg = tiny_config(40, 16, 2, 4, 2, tied);
        let student = TrainLlama::from_model(&tiny_llama(&cfg, 1, 0.0).unwrap(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let teacher = TrainLlama::from_model(&tiny_llama(&cfg, 2, 0.0).unwrap(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .frozen();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (ids, targets) = random_ids(&mut rng, 40, 2, 5);
        // Some tokens out of the loss, as prompts are.
        let w = Tensor::new(&[0f32, 1., 1., 0., 1., 1., 1., 1., 0., 1.], &Device::Cpu).unwrap();
        let th = teacher.forward(&ids, true).unwrap().hidden;
        let loss = |m: &TrainLlama| -> Tensor {
            let out = m.forward(&ids, true).unwrap();
            let ce = cross_entropy(&out.logits, &targets, &w).unwrap();
            let sh = squarehead(&out.hidden, &th, &w.ones_like().unwrap()).unwrap();
            (ce + (sh * 0.5).unwrap()).unwrap()
        };
        let grads = loss(&student).backward().unwrap();
        let mut checked = 0;
        for (i, p) in student.params().iter().enumerate() {
            let g = grads.get(p.as_tensor()).expect("every parameter has a gradient");
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let orig = p.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let shape = p.as_tensor().dims().to_vec();
            for _ in 0..3 {
                let j = rng.random_range(0..orig.len());
                let h = 1e-5;
                let eval_at = |x: f64| {
                    let mut v = orig.clone();
                    v[j] = x;
                    p.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap()).unwrap();
                    scalar(&loss(&student)).unwrap()
                };
                let fd = (eval_at(orig[j] + h) - eval_at(orig[j] - h)) / (2.0 * h);
                p.set(&Tensor::from_vec(orig.clone(), shape.as_slice(), &Device::Cpu).unwrap()).unwrap();
                let err = (fd - g[j]).abs();
                assert!(
                    err <= 1e-7 + 1e-5 * g[j].abs(),
                    "tied={tied} {}[{j}]: backward {} vs finite difference {fd}",
                    student.names()[i],
                    g[j]
                );
                checked += 1;
            }
        }
        assert!(checked >= 3 * (2 * 9 + 2));
    }
}

/// Algorithm 1: after K steps every masked weight, gradient (as applied) and Adam moment is
/// exactly 0.0, while the unmasked weights trained.
#[test]
fn masked_entries_stay_exactly_zero() {
    let cfg = tiny_config(40, 16, 2, 4, 2, true);
    let input = tiny_llama(&cfg, 5, 0.5).unwrap();
    let m = TrainLlama::from_model(&input, &Device::Cpu).unwrap();
    let masks = masks_from_zeros(&m).unwrap();
    assert_eq!(masks.len(), 14);
    assert!(masks.iter().all(|k| k.sparsity() > 0.3 && k.sparsity() < 0.7));
    let before: Vec<Vec<f32>> =
        m.params().iter().map(|p| p.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect();
    let spec = OptimizerSpec { learning_rate: 1e-2, weight_decay: 0.1, ..Default::default() };
    let mut opt = AdamW::new(&spec, m.params()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut raw_nonzero_on_pruned = false;
    for _ in 0..5 {
        let (ids, targets) = random_ids(&mut rng, 40, 2, 6);
        let out = m.forward(&ids, false).unwrap();
        let l =
            cross_entropy(&out.logits, &targets, &targets.ones_like().unwrap().to_dtype(DType::F32).unwrap()).unwrap();
        let gs = l.backward().unwrap();
        let grads: Vec<Tensor> = m.params().iter().map(|p| gs.get(p.as_tensor()).unwrap().clone()).collect();
        for k in &masks {
            let g = grads[k.param].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let keep = k.keep.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            raw_nonzero_on_pruned |= g.iter().zip(&keep).any(|(g, k)| *k == 0.0 && *g != 0.0);
        }
        let up = masked_update(&m, &masks, &mut opt, grads, 1e-2).unwrap();
        for k in &masks {
            let keep = k.keep.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (what, v) in [
                ("weight", flat(m.params()[k.param].as_tensor())),
                ("gradient", flat(&up.grads[k.param])),
                ("first moment", flat(&opt.m[k.param])),
                ("second moment", flat(&opt.v[k.param])),
            ] {
                for (x, kk) in v.iter().zip(&keep) {
                    if *kk == 0.0 {
                        // Exactly zero (a masked negative gradient is −0.0, which is zero).
                        assert!(*x == 0.0, "{} {what} of a pruned entry is {x}", k.name);
                    }
                }
            }
        }
    }
    assert!(raw_nonzero_on_pruned, "the raw gradients must reach pruned entries, or the test proves nothing");
    // The gradients came from a graph; the optimizer state must not keep it (or every step's
    // activations) alive.
    assert!(opt.m.iter().chain(&opt.v).all(|t| !t.track_op()), "Adam moments hold a backprop graph");
    crate::optim::verify_sparsity(&m, &masks).unwrap();
    opt.verify_masked_moments(&m, &masks).unwrap();
    for k in &masks {
        let after = m.params()[k.param].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let moved = after.iter().zip(&before[k.param]).filter(|(a, b)| a != b).count();
        assert!(moved > 0 && moved == k.numel - k.pruned, "{}: every kept weight trains", k.name);
    }
}

/// The example recipes (the paper's four pathways and sparse pretraining) parse and validate.
#[test]
fn example_recipes_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/recipes");
    let mut pathways = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("finetune") {
            let r: lacuna_api::FinetuneRecipe = lacuna_api::from_yaml(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            r.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            pathways.push(r.pathway);
        } else {
            let r: lacuna_api::PretrainRecipe = lacuna_api::from_yaml(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            r.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    pathways.sort_by_key(|p| format!("{p:?}"));
    pathways.dedup();
    assert_eq!(pathways.len(), 4, "one recipe per pathway");
}

/// The sparse linear inside the model: a model whose masked layers are packed gives the logits
/// and, at the kept positions, the gradients of the same model with dense masked layers (f64),
/// and its packed gradients equal central finite differences.
#[test]
fn packed_layers_give_the_dense_masked_gradients() {
    let cfg = tiny_config(40, 16, 2, 4, 2, true);
    let input = tiny_llama(&cfg, 11, 0.6).unwrap();
    let dense = TrainLlama::from_model(&input, &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
    let mut sparse = TrainLlama::from_model(&input, &Device::Cpu).unwrap();
    let masks = masks_from_zeros(&sparse).unwrap();
    assert_eq!(masks.len(), 14);
    for m in &masks {
        assert!(sparse.pack(m.param, &m.keep).unwrap(), "{} packs on the CPU", m.name);
        assert_eq!(sparse.params()[m.param].as_tensor().dims(), [m.numel - m.pruned]);
    }
    let sparse = sparse.to_dtype(DType::F64).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (ids, targets) = random_ids(&mut rng, 40, 2, 7);
    let w = targets.ones_like().unwrap().to_dtype(DType::F32).unwrap();
    let loss = |m: &TrainLlama| cross_entropy(&m.forward(&ids, false).unwrap().logits, &targets, &w).unwrap();
    let (ld, ls) = (loss(&dense), loss(&sparse));
    assert!((scalar(&ld).unwrap() - scalar(&ls).unwrap()).abs() < 1e-12);
    let (gd, gs) = (ld.backward().unwrap(), ls.backward().unwrap());
    for (i, p) in sparse.params().iter().enumerate() {
        let g = gs.get(p.as_tensor()).expect("every parameter has a gradient");
        let want = gd.get(dense.params()[i].as_tensor()).unwrap();
        let want = match sparse.layout(i) {
            // The dense gradient of a masked layer, read at its kept positions.
            Some(l) => l
                .pack(
                    &want
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
                        .iter()
                        .zip(
                            masks
                                .iter()
                                .find(|m| m.param == i)
                                .unwrap()
                                .keep
                                .flatten_all()
                                .unwrap()
                                .to_vec1::<f32>()
                                .unwrap(),
                        )
                        .map(|(g, k)| g * k as f64)
                        .collect::<Vec<_>>(),
                )
                .unwrap(),
            None => want.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        };
        let got = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(got.len(), want.len(), "{}", sparse.names()[i]);
        for (j, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{}[{j}]: {a} vs {b}", sparse.names()[i]);
        }
        if sparse.layout(i).is_some() {
            let orig = p.as_tensor().to_vec1::<f64>().unwrap();
            for _ in 0..3 {
                let j = rng.random_range(0..orig.len());
                let h = 1e-5;
                let at = |x: f64| {
                    let mut v = orig.clone();
                    v[j] = x;
                    p.set(&Tensor::from_vec(v, orig.len(), &Device::Cpu).unwrap()).unwrap();
                    scalar(&loss(&sparse)).unwrap()
                };
                let fd = (at(orig[j] + h) - at(orig[j] - h)) / (2.0 * h);
                p.set(&Tensor::from_vec(orig.clone(), orig.len(), &Device::Cpu).unwrap()).unwrap();
                assert!(
                    (fd - got[j]).abs() <= 1e-7 + 1e-5 * got[j].abs(),
                    "{}[{j}]: {} vs {fd}",
                    sparse.names()[i],
                    got[j]
                );
            }
        }
    }
    // And back: the packed model expands to the input's weights.
    let back = sparse.to_dtype(DType::F32).unwrap().to_model(std::path::Path::new("tiny")).unwrap();
    for ((n, a), (_, b)) in back.tensors().into_iter().zip(input.tensors()) {
        assert_eq!(a.to_f32_vec(), b.to_f32_vec(), "{n}");
    }
}
