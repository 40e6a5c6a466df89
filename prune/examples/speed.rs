//! Speed sanity of the per-layer work at SmolLM2 sizes (not a benchmark, nothing asserted):
//! `cargo run -p lacuna-prune --example speed`. Uses the global rayon pool (all cores).

use std::time::Instant;

use lacuna_prune::{Hessian, PruneConfig, SparseGptConfig, sparsegpt, wanda};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() -> lacuna_prune::Result<()> {
    let tokens = 65536;
    let batch = 512;
    println!("threads: {}", std::thread::available_parallelism().map_or(1, |n| n.get()));
    for (rows, cols) in [(1536, 576), (576, 1536)] {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // 8 distinct batches, cycled: the timing does not depend on the values.
        let batches: Vec<Vec<f32>> =
            (0..8).map(|_| (0..batch * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect()).collect();
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-0.1f32..0.1)).collect();

        let t = Instant::now();
        let mut h = Hessian::new(cols);
        for b in 0..tokens / batch {
            h.add_batch(&batches[b % batches.len()], batch)?;
        }
        let t_h = t.elapsed().as_secs_f64();

        let mut ws = w.clone();
        let rep = sparsegpt(&mut ws, rows, cols, &h, &SparseGptConfig::default())?;
        let mut ww = w.clone();
        let rw = wanda(&mut ww, rows, cols, h.col_sq_norms(), &PruneConfig::unstructured(0.5))?;
        println!(
            "W {rows}x{cols}, {tokens} tokens: Hessian {t_h:.2} s, SparseGPT 50% {:.2} s, Wanda 50% {:.3} s",
            rep.seconds, rw.seconds
        );
    }
    Ok(())
}
