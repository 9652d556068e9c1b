#![allow(clippy::disallowed_methods)] // tests read and build tensors freely
//! NaN and infinities through the batch-norm layer, fused and generic: a NaN
//! spreads over its channel in training (through the batch statistics) and
//! stays where it is in eval mode, and both kernels agree value for value.

use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};
use reid_model::layers::{Activation, BatchNorm};
use reid_ops::testing::{both_kernels_agree, random, values};
use reid_ops::Kernels;

fn batch_norm(channels: usize) -> (VarMap, BatchNorm) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let bn = BatchNorm::new(channels, reid_ops::Exec::default(), vb).unwrap();
    (varmap, bn)
}

#[test]
fn batch_norm_spreads_a_nan_over_its_channel_in_training_and_not_in_eval() {
    let shape = [2, 4, 3, 3];
    for then in [Activation::Identity, Activation::Relu] {
        for train in [true, false] {
            let y = both_kernels_agree(
                &shape,
                |k, x| {
                    let (_, bn) = batch_norm(4);
                    bn.forward_with(k, x, train, then)
                },
                "batch_norm",
            );
            let v = values(&y);
            let nan_channels: std::collections::BTreeSet<usize> =
                (0..v.len()).filter(|&i| v[i].is_nan()).map(|i| (i / 9) % 4).collect();
            assert_eq!(nan_channels.len(), if train { 3 } else { 1 }, "train {train} {then:?}");
        }
    }
}

#[test]
fn the_generic_batch_norm_matches_the_fused_one_in_training() {
    let x = Var::from_tensor(&random(&[3, 5, 4, 4], 7)).unwrap();
    let mut results = Vec::new();
    for k in [Kernels::Fused, Kernels::Generic] {
        let (varmap, bn) = batch_norm(5);
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name == "weight" || name == "bias" {
                var.set(&random(&[5], name.len() as u64)).unwrap();
            }
        }
        let y = bn.forward_with(k, x.as_tensor(), true, Activation::Relu).unwrap();
        let g = random(y.dims(), 8);
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let vars = varmap.data().lock().unwrap().clone();
        let (rm, rv) = bn.running_stats();
        results.push(vec![
            y.clone(),
            rm.clone(),
            rv.clone(),
            grads.get(x.as_tensor()).unwrap().clone(),
            grads.get(vars["weight"].as_tensor()).unwrap().clone(),
            grads.get(vars["bias"].as_tensor()).unwrap().clone(),
        ]);
    }
    let names = [
        "output",
        "running mean",
        "running var",
        "grad x",
        "grad weight",
        "grad bias",
    ];
    for (i, name) in names.iter().enumerate() {
        let d = values(&(&results[0][i] - &results[1][i]).unwrap().abs().unwrap())
            .into_iter()
            .fold(0.0, f64::max);
        assert!(d < 1e-12, "{name}: {d}");
    }
}
