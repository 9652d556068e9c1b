//! The Market-1501 protocol for one query: which gallery entries count, and where
//! the correct matches land in the ranking, without sorting the gallery.

/// Where one query's correct matches rank among the gallery entries it keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryOutcome {
    /// 0-based ranks of the correct matches, ascending.
    pub hit_ranks: Vec<usize>,
}

impl QueryOutcome {
    /// Rank of the first correct match.
    pub fn first_hit(&self) -> usize {
        self.hit_ranks[0]
    }

    /// Average precision: the mean of the precision at each correct match.
    pub fn average_precision(&self) -> f64 {
        let sum: f64 = self
            .hit_ranks
            .iter()
            .enumerate()
            .map(|(k, &r)| (k + 1) as f64 / (r + 1) as f64)
            .sum();
        sum / self.hit_ranks.len() as f64
    }

    /// Inverse negative penalty: matches / (rank of the hardest match + 1).
    pub fn inverse_negative_penalty(&self) -> f64 {
        self.hit_ranks.len() as f64 / (*self.hit_ranks.last().unwrap() + 1) as f64
    }
}

/// How the distances of one query's row are to be trusted: `dist` holds f32
/// distances, `exact(j)` computes the distance to gallery entry j in f64, and
/// `tolerance(j)` bounds |dist[j] - exact(j)|.
pub struct Scores<'a> {
    pub dist: &'a [f32],
    pub exact: &'a (dyn Fn(usize) -> f64 + Sync),
    pub tolerance: &'a (dyn Fn(usize) -> f64 + Sync),
}

impl Scores<'_> {
    /// Scores that are exact as they are (no rescoring ever needed).
    pub fn exact_as_given(dist: &[f32]) -> Scores<'_> {
        Scores {
            dist,
            exact: &|_| f64::NAN,
            tolerance: &|_| 0.0,
        }
    }
}

/// Ranks one query against a gallery of `g_pids`, `g_cams`: entries with the
/// query's identity and camera, and junk (pid -1), are removed; the remaining
/// entries of its identity are the correct matches. Returns `None` when no correct
/// match remains.
///
/// The ranking is the one of the float64 distances, ties broken by gallery order:
/// the correct matches are placed by their exact distances, and an other entry
/// is compared in f64 only when its f32 distance lies within its tolerance of a
/// correct match's (elsewhere the f32 order cannot differ from the exact one).
pub fn rank_query(scores: &Scores, q_pid: i64, q_cam: i64, g_pids: &[i64], g_cams: &[i64]) -> Option<QueryOutcome> {
    let dist = scores.dist;
    let exactly = |j: usize| {
        let e = (scores.exact)(j);
        if e.is_nan() {
            dist[j] as f64
        } else {
            e
        }
    };
    let mut positives: Vec<(f64, usize)> = (0..dist.len())
        .filter(|&j| g_pids[j] == q_pid && g_pids[j] != -1 && g_cams[j] != q_cam)
        .map(|j| (exactly(j), j))
        .collect();
    if positives.is_empty() {
        return None;
    }
    positives.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (first, last) = (positives[0].0, positives[positives.len() - 1].0);
    // ahead[k]: negatives that rank between positive k-1 and positive k.
    let mut ahead = vec![0usize; positives.len() + 1];
    for (j, &pid) in g_pids.iter().enumerate().take(dist.len()) {
        if pid == q_pid || pid == -1 {
            continue;
        }
        let (a, tol) = (dist[j] as f64, (scores.tolerance)(j));
        if a - tol > last {
            continue;
        }
        let slot = if a + tol < first {
            0
        } else {
            let lo = positives.partition_point(|p| p.0 < a - tol);
            let hi = positives.partition_point(|p| p.0 <= a + tol);
            if lo == hi {
                lo
            } else {
                let e = (exactly(j), j);
                positives.partition_point(|p| p.0.total_cmp(&e.0).then(p.1.cmp(&e.1)).is_lt())
            }
        };
        ahead[slot] += 1;
    }
    let mut negatives_before = 0;
    let hit_ranks = (0..positives.len())
        .map(|k| {
            negatives_before += ahead[k];
            k + negatives_before
        })
        .collect();
    Some(QueryOutcome { hit_ranks })
}

/// The `top` best-ranked gallery entries a query keeps (same identity and camera,
/// and junk, removed), best first.
pub fn top_kept(dist: &[f32], q_pid: i64, q_cam: i64, g_pids: &[i64], g_cams: &[i64], top: usize) -> Vec<usize> {
    let mut kept: Vec<usize> = (0..dist.len())
        .filter(|&j| g_pids[j] != -1 && !(g_pids[j] == q_pid && g_cams[j] == q_cam))
        .collect();
    let by = |a: &usize, b: &usize| dist[*a].total_cmp(&dist[*b]).then(a.cmp(b));
    if kept.len() > top {
        kept.select_nth_unstable_by(top, by);
        kept.truncate(top);
    }
    kept.sort_by(by);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook computation: sort everything, drop same-camera matches, scan.
    fn by_sorting(dist: &[f32], q_pid: i64, q_cam: i64, pids: &[i64], cams: &[i64]) -> Option<Vec<usize>> {
        let mut order: Vec<usize> = (0..dist.len()).collect();
        order.sort_by(|&a, &b| dist[a].total_cmp(&dist[b]).then(a.cmp(&b)));
        let kept: Vec<usize> = order
            .into_iter()
            .filter(|&j| !(pids[j] == q_pid && cams[j] == q_cam))
            .collect();
        let hits: Vec<usize> = kept
            .iter()
            .enumerate()
            .filter(|(_, &j)| pids[j] == q_pid)
            .map(|(r, _)| r)
            .collect();
        (!hits.is_empty()).then_some(hits)
    }

    #[test]
    fn counting_equals_sorting_on_random_cases_with_ties() {
        let mut state = 12345u64;
        let mut next = |m: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % m
        };
        for _ in 0..300 {
            let n = 1 + next(40) as usize;
            let dist: Vec<f32> = (0..n).map(|_| next(8) as f32 / 4.0).collect();
            let pids: Vec<i64> = (0..n).map(|_| next(4) as i64).collect();
            let cams: Vec<i64> = (0..n).map(|_| next(3) as i64).collect();
            let (qp, qc) = (next(4) as i64, next(3) as i64);
            let got = rank_query(&Scores::exact_as_given(&dist), qp, qc, &pids, &cams).map(|o| o.hit_ranks);
            assert_eq!(got, by_sorting(&dist, qp, qc, &pids, &cams));
        }
    }

    #[test]
    fn near_ties_are_decided_by_the_exact_distances() {
        // f32 distances that put the negative (entry 1) first, exact ones that put
        // the positive (entry 0) first; entry 2 is far and never rescored.
        let dist = [0.50000006f32, 0.5, 0.9];
        let exact = |j: usize| [0.4999999, 0.5, 0.9][j];
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let counted = |j: usize| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            exact(j)
        };
        let scores = Scores {
            dist: &dist,
            exact: &counted,
            tolerance: &|_| 1e-6,
        };
        let (pids, cams) = ([7, 3, 3], [1, 1, 1]);
        assert_eq!(rank_query(&scores, 7, 0, &pids, &cams).unwrap().hit_ranks, vec![0]);
        assert_eq!(calls.into_inner(), 2, "the positive and the near negative only");
        let plain = Scores::exact_as_given(&dist);
        assert_eq!(rank_query(&plain, 7, 0, &pids, &cams).unwrap().hit_ranks, vec![1]);
        // Junk never counts, as a match or as a negative.
        let (pids, cams) = ([7, -1, 3], [1, 1, 1]);
        assert_eq!(rank_query(&plain, 7, 0, &pids, &cams).unwrap().hit_ranks, vec![0]);
    }

    #[test]
    fn ap_and_inp_by_hand() {
        // Hits at ranks 0, 2, 5: AP = (1/1 + 2/3 + 3/6) / 3, INP = 3 / 6.
        let o = QueryOutcome {
            hit_ranks: vec![0, 2, 5],
        };
        assert!((o.average_precision() - (1.0 + 2.0 / 3.0 + 0.5) / 3.0).abs() < 1e-12);
        assert!((o.inverse_negative_penalty() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn same_camera_matches_are_removed_and_distractors_stay() {
        // gallery: same pid same cam (removed), distractor (negative), same pid other cam.
        let dist = [0.1, 0.2, 0.3];
        let pids = [5, 0, 5];
        let cams = [1, 2, 2];
        let s = Scores::exact_as_given(&dist);
        let o = rank_query(&s, 5, 1, &pids, &cams).unwrap();
        assert_eq!(o.hit_ranks, vec![1]);
        assert_eq!(rank_query(&s, 5, 2, &pids, &cams).unwrap().hit_ranks, vec![0]);
        assert_eq!(rank_query(&s, 9, 1, &pids, &cams), None);
        assert_eq!(top_kept(&dist, 5, 1, &pids, &cams, 5), vec![1, 2]);
    }
}
