//! Validation during training: rank-1 and mAP of the model on the query and
//! gallery split of the run's manifest, as `reid extract` and `reid evaluate`
//! would compute them (cosine distance, no flip).

use reid_data::{Manifest, Split};
use reid_eval::{FeatureSet, Metric};
use reid_extract::{split_features, ExtractOptions};
use reid_model::ReidModel;
use reid_sampling::InputSpec;

/// (rank-1, mAP) of `model` on the query/gallery split of `manifest`.
pub fn rank1_and_map(model: &ReidModel, manifest: &Manifest, input: InputSpec) -> Result<(f64, f64), String> {
    let options = ExtractOptions {
        batch_size: 64,
        ..ExtractOptions::default()
    };
    let features =
        |split| split_features(model, input, manifest, split, &options, &|_, _| {}).map_err(|e| e.to_string());
    let (query, gallery) = (features(Split::Query)?, features(Split::Gallery)?);
    let m = reid_eval::evaluate(
        FeatureSet::from(&query),
        FeatureSet::from(&gallery),
        Metric::Cosine,
        None,
        10,
    )
    .map_err(|e| format!("validation: {e}"))?
    .metrics;
    Ok((m.rank1, m.map))
}
