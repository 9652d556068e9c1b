#![allow(clippy::disallowed_methods)] // tests read and build tensors freely
//! Training steps give the same bits whatever the thread count, and whether or
//! not a step also measures the per-term gradient norms (which run the
//! backbone's tape backward once per term before the update's backward).

use candle_core::{DType, Device};
use rand::SeedableRng;
use reid_model::{Exec, LossSettings, ModelConfig, ReidModel};
mod common;

use common::batch;
use reid_train::{train_step, Sgd, SgdConfig, StepSettings};

type Values = Vec<(String, Vec<f32>)>;

/// Every variable's values of `model`.
fn values(model: &ReidModel) -> Values {
    let value = |v: &candle_core::Var| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n.clone(), value(&v)))
        .collect()
}

/// Every variable's values before and after three steps of `arch` (f32, on the
/// CPU) on `threads` threads, with or without gradient norms, and the norms of
/// the last step.
fn run(arch: &str, threads: usize, grad_norms: bool) -> (Values, Values, Option<[f64; 2]>) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let config = ModelConfig {
            arch: arch.parse().unwrap(),
            last_stride: 1,
            num_classes: 6,
            bnneck: true,
        };
        let model = ReidModel::new(config, Exec::default(), DType::F32, &Device::Cpu).unwrap();
        model.initialize(3).unwrap();
        let initial = values(&model);
        let mut sgd = Sgd::for_model(&model, SgdConfig::default());
        let (batch, mut rng) = (batch(11), rand_chacha::ChaCha8Rng::seed_from_u64(2));
        let settings = StepSettings {
            grad_norms,
            ..StepSettings::pairs(LossSettings::default(), 0.1)
        };
        let mut norms = None;
        for _ in 0..3 {
            let stats = train_step(&model, &mut sgd, &batch, settings, 0.01, &mut rng).unwrap();
            norms = stats.grad_norms.map(|n| [n.id1, n.total]);
        }
        (initial, values(&model), norms)
    })
}

#[test]
fn steps_give_the_same_bits_on_any_thread_count_with_or_without_norms() {
    for arch in ["res2net_tiny", "resnet_tiny"] {
        let (initial, one, _) = run(arch, 1, false);
        let (_, three, norms) = run(arch, 3, true);
        let [id1, total] = norms.expect("norms were asked for");
        assert!(id1 > 0.0 && total > 0.0, "{arch}: norms {id1} {total}");
        assert!(one.len() > 50, "{arch}: {} variables", one.len());
        let moved = one.iter().zip(&initial).filter(|((_, a), (_, b))| a != b).count();
        assert!(moved > one.len() / 2, "{arch}: the steps moved {moved} variables");
        for ((name, a), (_, b)) in one.iter().zip(&three) {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{arch}: {name} differs between 1 and 3 threads");
        }
    }
}
