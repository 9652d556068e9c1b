#![allow(clippy::disallowed_methods)] // tests read and build tensors freely
//! The tape's backward against candle's on the tiny backbones: the same
//! gradients bit for bit, for every backbone parameter, in f32 and f64, with
//! the CPU's fused ops (`auto`) and with the ops CUDA runs (`as-cuda`).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, ModuleT, Tensor};
use reid_model::model::{is_head, ModelConfig, ReidModel};
use reid_model::{Exec, Ops, Precision};
use reid_ops::tape::TapedOutput;
use reid_ops::testing::random;

/// A tiny model of `arch` in `dtype`, and images whose batch covers every
/// block kind (a stage's first block pools its last split).
fn model(arch: &str, dtype: DType) -> (ReidModel, Tensor) {
    model_as(arch, dtype, Exec::default())
}

/// [`model`], run as `exec` says.
fn model_as(arch: &str, dtype: DType, exec: Exec) -> (ReidModel, Tensor) {
    let config = ModelConfig {
        arch: arch.parse().unwrap(),
        last_stride: 1,
        num_classes: 5,
        bnneck: false,
    };
    let m = ReidModel::new(config, exec, dtype, &Device::Cpu).unwrap();
    m.initialize(7).unwrap();
    let x = random(&[4, 3, 32, 16], 8).to_dtype(dtype).unwrap();
    (m, x)
}

#[test]
fn the_tape_gives_candles_gradients_bit_for_bit() {
    let plans = [Ops::Auto, Ops::AsCuda].map(|ops| Exec::new(ops, Precision::F32));
    for (arch, exec) in ["res2net_tiny", "resnet_tiny"]
        .into_iter()
        .flat_map(|a| plans.map(|p| (a, p)))
    {
        for dtype in [DType::F32, DType::F64] {
            let (m, x) = model_as(arch, dtype, exec);
            let pooled = m.backbone.forward_t(&x, true).unwrap();
            let g = random(pooled.dims(), 9).to_dtype(dtype).unwrap();
            let graph = (pooled * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let taped = TapedOutput::record(|| m.backbone.forward_t(&x, true)).unwrap();
            let mut store = (taped.leaf() * &g).unwrap().sum_all().unwrap().backward().unwrap();
            taped.backward(&mut store).unwrap();
            compare(arch, dtype, &m, &graph, &store);
        }
    }
}

/// Asserts that the backbone's gradients in `graph` and `store` are the same bits.
fn compare(arch: &str, dtype: DType, m: &ReidModel, graph: &GradStore, store: &GradStore) {
    let mut compared = 0;
    for (name, var) in m.trainable_vars().into_iter().filter(|(n, _)| !is_head(n)) {
        let values = |s: &GradStore| -> Vec<f64> {
            let t = s
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{arch}: no gradient for {name}"));
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (want, got) = (values(graph), values(store));
        assert!(want.iter().any(|v| *v != 0.0), "{arch} {name}: a gradient");
        assert_eq!(want, got, "{arch} {dtype:?} {name}");
        compared += 1;
    }
    assert!(compared > 20, "{arch}: {compared} variables compared");
}

#[test]
fn a_kept_tape_gives_the_same_gradients_twice() {
    let (m, x) = model("res2net_tiny", DType::F64);
    let taped = TapedOutput::record(|| m.backbone.forward_t(&x, true)).unwrap();
    let run = || {
        let mut store = taped.leaf().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        taped.backward_kept(&mut store).unwrap();
        let w = m.backbone.stem.conv.weight.clone();
        let g: Vec<f64> = store.get(&w).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        g
    };
    let first = run();
    assert!(first.iter().any(|v| *v != 0.0));
    assert_eq!(first, run());
}
