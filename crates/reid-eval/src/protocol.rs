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
    /// An upper bound of `tolerance` over the row (for the quick tests).
    pub max_tolerance: f64,
}

impl Scores<'_> {
    /// Scores that are exact as they are (no rescoring ever needed).
    pub fn exact_as_given(dist: &[f32]) -> Scores<'_> {
        Scores {
            dist,
            exact: &|_| f64::NAN,
            tolerance: &|_| 0.0,
            max_tolerance: 0.0,
        }
    }
}

/// Buckets over the distances where a query's correct matches lie, each holding
/// how many matches rank before any distance in it, when that is certain (no
/// match within the tolerance of the bucket); the ranking loop then places most
/// entries by one lookup instead of a binary search. Slots are 16-bit, so that a
/// query's table (8 KiB) is cheap to bring back into cache for every panel.
struct SlotTable {
    lo: f64,
    scale: f64,
    slots: Vec<u16>,
}

const BUCKETS: usize = 4096;
const UNSURE: u16 = u16::MAX;

impl SlotTable {
    /// The table of `positives` (sorted by distance) for entries of tolerance at
    /// most `tol`.
    fn new(positives: &[(f64, usize)], tol: f64) -> Self {
        let (lo, hi) = (positives[0].0 - tol, positives[positives.len() - 1].0 + tol);
        let width = (hi - lo) / BUCKETS as f64;
        // Without a table (no width, or more matches than a slot counts), every
        // entry near the matches is placed by binary search.
        if width.is_nan() || width <= 0.0 || positives.len() >= UNSURE as usize {
            return SlotTable {
                lo,
                scale: 0.0,
                slots: Vec::new(),
            };
        }
        // A bucket's margin: the tolerance, and a hundredth of a bucket for the
        // rounding of the index computation.
        let margin = tol + 0.01 * width;
        let (mut before, mut upto) = (0, 0);
        let slots = (0..BUCKETS)
            .map(|k| {
                let x0 = lo + k as f64 * width;
                while before < positives.len() && positives[before].0 < x0 - margin {
                    before += 1;
                }
                while upto < positives.len() && positives[upto].0 <= x0 + width + margin {
                    upto += 1;
                }
                if before == upto {
                    before as u16
                } else {
                    UNSURE
                }
            })
            .collect();
        SlotTable {
            lo,
            scale: 1.0 / width,
            slots,
        }
    }

    /// The number of matches certainly ranked before distance `x` (at most the
    /// table's top: 0 below the table), or `None` when it takes a closer look.
    #[inline(always)]
    fn lookup(&self, x: f64) -> Option<usize> {
        // t + 1 lies in [0, buckets + 1], so truncation is the floor, without a
        // branch; an entry a rounding below `lo` lands in bucket 0 (0 or unsure),
        // an entry at the top lands past the last bucket (unsure).
        let t = ((x - self.lo) * self.scale).clamp(-1.0, self.slots.len() as f64);
        match (t + 1.0) as usize {
            0 => Some(0),
            k => match self.slots.get(k - 1) {
                Some(&s) if s != UNSURE => Some(s as usize),
                _ => None,
            },
        }
    }
}

/// One query's ranking, built entry by entry: its correct matches placed by their
/// exact distances, then every other gallery entry counted between the matches it
/// ranks among (the ranking of the float64 distances, ties broken by gallery
/// order). An entry is compared in f64 only when its f32 distance lies within its
/// tolerance of a match's; elsewhere the f32 order cannot differ from the exact one.
pub struct QueryRanker {
    pid: i64,
    positives: Vec<(f64, usize)>,
    table: SlotTable,
    skip_above: f64,
    /// ahead[k]: entries that rank between match k-1 and match k.
    ahead: Vec<usize>,
}

impl QueryRanker {
    /// The ranking of a query of identity `pid` whose correct matches are
    /// `positives` (exact distance, gallery row); `None` without any. Entries will
    /// come with a tolerance of at most `max_tolerance`.
    pub fn new(pid: i64, mut positives: Vec<(f64, usize)>, max_tolerance: f64) -> Option<Self> {
        if positives.is_empty() {
            return None;
        }
        positives.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let skip_above = positives[positives.len() - 1].0 + max_tolerance;
        let table = SlotTable::new(&positives, max_tolerance);
        let ahead = vec![0; positives.len() + 1];
        Some(QueryRanker {
            pid,
            positives,
            table,
            skip_above,
            ahead,
        })
    }

    /// Places gallery entry `j` of identity `pid` at f32 distance `a`: skipped when
    /// it is the query's identity or junk; `tolerance(j)` and `exact(j)` are asked
    /// for only when the placement needs them.
    #[inline]
    pub fn place(
        &mut self,
        j: usize,
        pid: i64,
        a: f64,
        tolerance: &dyn Fn(usize) -> f64,
        exact: &dyn Fn(usize) -> f64,
    ) {
        if a > self.skip_above || pid == self.pid || pid == -1 {
            return;
        }
        let slot = match self.table.lookup(a) {
            Some(slot) => slot,
            None => self.slot_near_a_match(j, a, tolerance, exact),
        };
        self.ahead[slot] += 1;
    }

    /// The slot of entry `j` at distance `a` where a bucket holds a match: by its
    /// tolerance, and by its exact distance when a match lies within it.
    #[cold]
    fn slot_near_a_match(
        &self,
        j: usize,
        a: f64,
        tolerance: &dyn Fn(usize) -> f64,
        exact: &dyn Fn(usize) -> f64,
    ) -> usize {
        let tol = tolerance(j);
        let lo = self.positives.partition_point(|p| p.0 < a - tol);
        let hi = self.positives.partition_point(|p| p.0 <= a + tol);
        if lo == hi {
            return lo;
        }
        let e = exact(j);
        self.positives
            .partition_point(|p| p.0.total_cmp(&e).then(p.1.cmp(&j)).is_lt())
    }

    /// The distance beyond which every entry is left out (it ranks after every
    /// match, whatever its rounding).
    pub fn skip_above(&self) -> f64 {
        self.skip_above
    }

    /// The ranks of the correct matches.
    pub fn finish(self) -> QueryOutcome {
        let mut negatives_before = 0;
        let hit_ranks = (0..self.positives.len())
            .map(|k| {
                negatives_before += self.ahead[k];
                k + negatives_before
            })
            .collect();
        QueryOutcome { hit_ranks }
    }
}

/// Ranks one query against a gallery of `g_pids`, `g_cams` from its whole row of
/// distances (see [`QueryRanker`]): entries with the query's identity and camera,
/// and junk (pid -1), are removed; the remaining entries of its identity are the
/// correct matches. Returns `None` when no correct match remains.
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
    let positives = correct_matches(q_pid, q_cam, g_pids, g_cams)
        .map(|j| (exactly(j), j))
        .collect();
    let mut ranker = QueryRanker::new(q_pid, positives, scores.max_tolerance)?;
    for (j, (&pid, &a)) in g_pids.iter().zip(dist).enumerate() {
        ranker.place(j, pid, a as f64, scores.tolerance, &exactly);
    }
    Some(ranker.finish())
}

/// The gallery rows that are correct matches of a query: its identity, another
/// camera, not junk.
pub fn correct_matches<'a>(
    q_pid: i64,
    q_cam: i64,
    g_pids: &'a [i64],
    g_cams: &'a [i64],
) -> impl Iterator<Item = usize> + 'a {
    (0..g_pids.len()).filter(move |&j| g_pids[j] == q_pid && q_pid != -1 && g_cams[j] != q_cam)
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
            max_tolerance: 1e-6,
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
