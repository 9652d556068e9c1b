//! CMC / mAP / mINP and re-ranking against torchreid's results on every evaluation
//! fixture (a folder with `case.safetensors` and `expected_*.json`).

use reid_eval::{evaluate, Metric, RerankParams};
use reid_fixtures::{folders_with, read_json, read_tensors};

fn check(folder: &std::path::Path, expected_file: &str) {
    let case = read_tensors(&folder.join("case.safetensors"));
    let expected = read_json(&folder.join(expected_file));
    let floats = |k: &str| case[k].data.iter().map(|&v| v as f32).collect::<Vec<_>>();
    let ints = |k: &str| case[k].data.iter().map(|&v| v as i64).collect::<Vec<_>>();
    let (qf, gf) = (floats("q_feats"), floats("g_feats"));
    let dim = case["q_feats"].shape[1];
    let (qp, qc, gp, gc) = (ints("q_pids"), ints("q_camids"), ints("g_pids"), ints("g_camids"));
    let query = reid_eval::FeatureSet {
        features: &qf,
        dim,
        pids: &qp,
        camids: &qc,
    };
    let gallery = reid_eval::FeatureSet {
        features: &gf,
        dim,
        pids: &gp,
        camids: &gc,
    };
    let metric: Metric = expected["metric"].as_str().unwrap().parse().unwrap();
    let rerank = expected.get("rerank").map(|r| RerankParams {
        k1: r["k1"].as_u64().unwrap() as usize,
        k2: r["k2"].as_u64().unwrap() as usize,
        lambda: r["lambda"].as_f64().unwrap() as f32,
    });
    let cmc_truth: Vec<f64> = expected["cmc"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let tol = expected["tolerance"].as_f64().unwrap();
    let got = evaluate(query, gallery, metric, rerank, cmc_truth.len())
        .unwrap()
        .metrics;
    let name = format!("{}/{expected_file}", folder.display());
    if let Some(n) = expected.get("num_valid_q") {
        assert_eq!(
            got.num_valid_queries as u64,
            n.as_u64().unwrap(),
            "{name}: valid queries"
        );
    }
    assert_eq!(got.cmc.len(), cmc_truth.len(), "{name}: cmc length");
    for (k, (a, b)) in got.cmc.iter().zip(&cmc_truth).enumerate() {
        assert!((a - b).abs() <= tol, "{name}: cmc[{k}] {a} vs {b}");
    }
    let map = expected["mAP"].as_f64().unwrap();
    assert!((got.map - map).abs() <= tol, "{name}: mAP {} vs {map}", got.map);
    if let Some(minp) = expected.get("mINP").and_then(|v| v.as_f64()) {
        assert!((got.minp - minp).abs() <= tol, "{name}: mINP {} vs {minp}", got.minp);
    }
}

#[test]
fn every_evaluation_fixture_matches_torchreid() {
    let folders = folders_with(&["case.safetensors"]);
    let mut checked = 0;
    for folder in folders {
        let mut files: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("expected") && n.ends_with(".json"))
            .collect();
        files.sort();
        for f in files {
            check(&folder, &f);
            checked += 1;
        }
    }
    assert!(checked >= 1, "no expected_*.json checked");
}
