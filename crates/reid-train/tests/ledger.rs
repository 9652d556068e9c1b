#![allow(clippy::disallowed_methods)] // tests read and build tensors freely
//! The ledger of a Res2Net-50 training step: what it asks of the device, counted
//! the same way under every plan. The counts depend on the network, not on the
//! images' size or the batch (but for the bytes, and a copy that a last stage
//! of 1x1 pixels does not need), so a small batch shows those of batch 64 at
//! 256 x 128 (`reid bench train --ledger` shows them there).

mod common;

use candle_core::{DType, Device};
use rand::SeedableRng;
use reid_model::{Exec, LossSettings, ModelConfig, Ops, Precision, ReidModel};
use reid_ops::ledger::{counting, Ledger};
use reid_train::{train_step, Sgd, SgdConfig, StepSettings};

/// The counts of one step (dropout on) of `arch` under `ops`, on images of
/// `height` x `width`.
fn one_step(arch: &str, ops: Ops, size: (usize, usize)) -> Ledger {
    one_step_in(arch, Exec::new(ops, Precision::F32), size).0
}

/// [`one_step`] under the plan `exec`, with the number of weights that have a
/// bf16 copy.
fn one_step_in(arch: &str, exec: Exec, (height, width): (usize, usize)) -> (Ledger, usize) {
    let config = ModelConfig {
        arch: arch.parse().unwrap(),
        last_stride: 2,
        num_classes: 6,
        bnneck: false,
    };
    let model = ReidModel::new(config, exec, DType::F32, &Device::Cpu).unwrap();
    model.initialize(1).unwrap();
    let mut sgd = Sgd::for_model(&model, SgdConfig::default());
    let mut batch = common::batch(2);
    if (height, width) != (64, 32) {
        let resize = |t: &candle_core::Tensor| t.narrow(2, 0, height).unwrap().narrow(3, 0, width).unwrap();
        batch.x1 = resize(&batch.x1).contiguous().unwrap();
        batch.x2 = resize(&batch.x2).contiguous().unwrap();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let settings = StepSettings::pairs(LossSettings::default(), 0.5);
    let (stats, ledger) = counting(|| train_step(&model, &mut sgd, &batch, settings, 0.01, &mut rng));
    assert!(stats.unwrap().loss.is_finite());
    (ledger, model.weight_copies().len())
}

#[test]
fn a_res2net50_step_reads_once_uploads_only_dropout_masks_and_fills_no_zeros() {
    for ops in [Ops::Auto, Ops::AsCuda] {
        let ledger = one_step("res2net50_26w_4s", ops, (64, 32));
        // The losses and accuracies, in one read; the three dropout masks, in
        // one upload. Batch norm keeps statistics, scale and shift and its sums
        // on the device.
        assert_eq!(ledger.device_to_host, 1, "{ops}: {ledger:?}");
        assert_eq!(ledger.host_to_device, 1, "{ops}: {ledger:?}");
        // The whole step, heads included, runs on the tape: no candle backward,
        // and no gradient started as zeros.
        assert_eq!(
            (ledger.graph_ops, ledger.zero_filled_grads),
            (0, 0),
            "{ops}: {ledger:?}"
        );
        // Smaller images, whose last stage is still more than one pixel (a 1x1
        // one broadcasts the pooled gradient without a copy).
        let smaller = one_step("res2net50_26w_4s", ops, (48, 24));
        assert!(smaller.bytes_allocated < ledger.bytes_allocated, "{ops}: {smaller:?}");
        let counts = |l: Ledger| Ledger {
            bytes_allocated: 0,
            ..l
        };
        assert_eq!(counts(ledger), counts(smaller), "{ops}: counts of the network");
    }
}

#[test]
fn the_step_cuda_runs_launches_at_most_1500_kernels() {
    let ledger = one_step("res2net50_26w_4s", Ops::AsCuda, (64, 32));
    // Every launch of the step: the backbone forward and backward (batch norm
    // two launches each way, a convolution one forward and two back, the
    // Res2Net split and concatenation one launch each way), the running
    // statistics (one launch per batch norm), SGD (one per parameter), the
    // heads and losses, the two sides' concatenation and the losses' read.
    assert!(ledger.launches_counted(), "{ledger:?}");
    assert!(ledger.launches <= 1500, "{ledger:?}");
    assert_eq!(ledger.launches, 1215, "{ledger:?}");
    // One tensor per launch at most (in-place updates make none).
    assert!(ledger.allocations < ledger.launches, "{ledger:?}");
}

#[test]
fn the_backbone_runs_on_the_tape_with_no_zero_filled_gradient() {
    let graph = one_step("res2net50_26w_4s", Ops::Generic, (64, 32));
    assert_eq!(graph.tape_ops, 0, "{graph:?}");
    // The CPU's fused ops, and the ops CUDA runs, both record the backbone.
    for ops in [Ops::Auto, Ops::AsCuda] {
        let taped = one_step("res2net50_26w_4s", ops, (64, 32));
        assert!(taped.tape_ops > 150, "{ops}: {taped:?}");
        // Nothing is left on candle's graph, the heads included.
        assert_eq!(taped.graph_ops, 0, "{ops}: {taped:?}");
        assert!(graph.graph_ops > taped.graph_ops + 5000, "{graph:?}");
    }
}

#[test]
fn bf16_activations_stay_on_the_tape_and_cast_once_each_way() {
    let params = {
        let config = ModelConfig {
            arch: "res2net50_26w_4s".parse().unwrap(),
            last_stride: 2,
            num_classes: 6,
            bnneck: false,
        };
        let model = ReidModel::new(config, Exec::default(), DType::F32, &Device::Cpu).unwrap();
        model.trainable_vars().len() as u64
    };
    for ops in [Ops::Auto, Ops::AsCuda] {
        let (f32, _) = one_step_in("res2net50_26w_4s", Exec::new(ops, Precision::F32), (64, 32));
        let (bf16, copies) = one_step_in("res2net50_26w_4s", Exec::new(ops, Precision::Bf16), (64, 32));
        // Every convolution weight has its copy: the stem, 5 per block, 4 downsamples.
        assert_eq!(copies, 1 + 16 * 5 + 4);
        assert!(bf16.tape_ops > 150, "{ops}: {bf16:?}");
        assert_eq!((bf16.graph_ops, bf16.zero_filled_grads), (0, 0), "{ops}: {bf16:?}");
        assert_eq!((bf16.device_to_host, bf16.host_to_device), (1, 1), "{ops}: {bf16:?}");
        // Beyond f32's casts (the labels and the losses'): the images to bf16,
        // the last activations to f32 and their gradient back, and the heads'
        // three matrix products (operands in, product out). None per
        // convolution or batch norm: SGD writes each weight's copy in its update.
        let extra = 3 + 3 * 3;
        assert_eq!(bf16.casts, f32.casts + extra, "{ops}: {bf16:?} vs {f32:?}");
        if ops == Ops::AsCuda {
            // CUDA's launches: f32's plus those casts, within one per parameter.
            assert_eq!(bf16.launches, f32.launches + extra, "{bf16:?} vs {f32:?}");
            assert!(bf16.launches <= f32.launches + params, "{bf16:?}, {params} parameters");
            // Activations of half the bytes.
            assert!(
                bf16.bytes_allocated < f32.bytes_allocated * 2 / 3,
                "{bf16:?} vs {f32:?}"
            );
        }
    }
}

#[test]
fn a_step_run_inside_another_forward_sees_no_tape_of_it() {
    // rayon's workers steal jobs while they wait: a worker inside one step's
    // taped forward may run another step whole, on the same thread. Here that
    // happens on purpose: the generic step runs inside a recording forward, on
    // the worker it records on; it must neither see that tape nor feed it.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let alone = one_step("res2net_tiny", Ops::Generic, (64, 32));
    let (nested, tape) =
        pool.install(|| reid_ops::tape::record(|| Ok(one_step("res2net_tiny", Ops::Generic, (64, 32)))).unwrap());
    assert_eq!(nested, alone);
    assert_eq!(format!("{tape:?}"), "Tape(0 ops)");
}
