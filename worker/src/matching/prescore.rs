//! Prescoring: a window's pairs scored while the window fills, so that its
//! close only has to run the greedy.
//!
//! Scoring a window is O(n²) and used to happen all at its close, which put
//! the whole cost between the close and the results (a 3,400-request window:
//! tens of ms on one core). An [`OpenWindow`] keeps, per member, the top-K
//! candidate lists the matchmaker's first pass would build; each member is
//! scored once against the members before it (the same GEMM, prefilter and
//! floors as the first pass, [`offer_row`]), a batch at a time as they
//! arrive. At the close, [`OpenWindow::seeds`] turns the lists into the
//! greedy's seeds for the window's participants.
//!
//! **Same matching as scoring at the close.** The greedy is exact for any
//! seeds in which every allowed edge is either present or below its
//! request's floor ([`greedy_seeded`](super::matchmaker::greedy_seeded)).
//! The lists keep that promise for the members, whatever the order they
//! arrived in: an edge left out scores at most the K-th kept score, and the
//! floor handed on is [`Edge::above_all_of`] that score, so ties with it are
//! refilled rather than trusted to an index order that differs between the
//! lists (arrival) and the close (offset). Members that do not take part
//! (a user's second request, held back) are dropped from the lists; pairs
//! are checked at the close against its cooldowns only (they change while
//! the window fills; preferences do not, and the prescoring checks those).
//! Scores are bit-identical either way: each is one dot product summed in
//! feature order, symmetric and independent of its place in the GEMM.

use matchfleet_api::match_pipeline::BuiltinScorer;
use matchfleet_api::matching::MatchRequest;

use super::hash::{FastMap, FastSet};
use super::matchmaker::{offer_hits, radix_sort, sort_ties, Candidates, Edge, Seeds, BLOCK_ROWS};
use super::pairing::{builtin_scores, Lanes, WindowFilter};
use super::score::{normalize_row, score_packed, FeatureMatrix, PackedColumns};

/// Members a window needs before it is prescored: below this a window's
/// close is a millisecond or two anyway, and its members cost no candidate
/// lists (2·K edges each).
pub const PRESCORE_FROM: usize = 256;

/// Columns of a row offered at a time (see `score_new`).
const ROW_PIECE: usize = 256;

/// Gender ids the prefilter's 32-bit lanes hold; a window with more distinct
/// genders (profiles and preferences) is scored at its close instead.
const MAX_GENDERS: usize = 32;

/// One open window's members and their candidate lists so far.
#[derive(Debug, Clone)]
pub struct OpenWindow {
    /// The window's scorer, chosen when it opened.
    scorer: BuiltinScorer,
    dim: usize,
    /// Member index by request offset.
    members: FastMap<i64, u32>,
    /// Unit-length vectors, one row per member.
    vectors: Vec<f32>,
    /// The same, packed for the GEMM as they arrive.
    packed: PackedColumns,
    lanes: Lanes,
    users: FastMap<String, u32>,
    genders: FastMap<String, u32>,
    cands: Candidates,
    /// Members `0..scored` are scored against each other.
    scored: usize,
    /// Too many genders for the lanes: left to the close.
    gave_up: bool,
    /// Buffers of `score_new`, kept between calls (and with the window's
    /// reuse): allocating and zeroing them per call showed in profiles.
    scratch: Scratch,
    presorted: Presorted,
}

/// The seed edges of all members, sorted best first by member index
/// ([`OpenWindow::presort`]).
#[derive(Debug, Clone, Default)]
struct Presorted {
    /// Sort keys ([`Edge::sort_key`]) of the edges in members' lists, each once.
    keys: Vec<u64>,
    /// Members scored when they were sorted; None before.
    scored: Option<usize>,
}

#[derive(Debug, Clone, Default)]
struct Scratch {
    scores: Vec<f32>,
    hits: Vec<u32>,
}

impl OpenWindow {
    pub fn new(scorer: BuiltinScorer, dim: usize, top_k: usize) -> Self {
        OpenWindow {
            scorer,
            dim,
            members: FastMap::default(),
            vectors: Vec::new(),
            packed: PackedColumns::new(dim),
            lanes: Lanes::default(),
            users: FastMap::default(),
            genders: FastMap::default(),
            cands: Candidates::new(0, top_k.max(1)),
            scored: 0,
            gave_up: false,
            scratch: Scratch::default(),
            presorted: Presorted::default(),
        }
    }

    /// Empties the window for reuse (keeping its buffers) with `scorer`.
    pub fn reset(&mut self, scorer: BuiltinScorer) {
        self.scorer = scorer;
        self.members.clear();
        self.vectors.clear();
        self.packed.clear();
        self.lanes.clear();
        self.users.clear();
        self.genders.clear();
        self.cands.clear();
        self.scored = 0;
        self.gave_up = false;
        self.presorted.keys.clear();
        self.presorted.scored = None;
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Members scored so far.
    pub fn scored(&self) -> usize {
        self.scored
    }

    /// Adds the request read at `offset` (a valid request of the window's
    /// dimension; a second add of an offset is ignored).
    pub fn add(&mut self, offset: i64, req: &MatchRequest) {
        if self.gave_up || self.members.contains_key(&offset) || req.vector.len() != self.dim {
            return;
        }
        let (Some(gender), Some(wants)) = (self.gender(&req.profile.gender), self.wants(req))
        else {
            self.give_up();
            return;
        };
        let next = self.users.len() as u32;
        let user = *self.users.entry(req.user.clone()).or_insert(next);
        let ages = (req.wants.min_age, req.wants.max_age);
        self.lanes.push(user, gender, wants, req.profile.age, ages);
        let at = self.vectors.len();
        self.vectors.extend_from_slice(&req.vector);
        normalize_row(&mut self.vectors[at..]);
        self.packed.push(&self.vectors[at..]);
        self.members.insert(offset, self.members.len() as u32);
    }

    /// The gender's window id; None past [`MAX_GENDERS`].
    fn gender(&mut self, name: &str) -> Option<u32> {
        if let Some(&g) = self.genders.get(name) {
            return Some(g);
        }
        let next = self.genders.len();
        (next < MAX_GENDERS).then(|| {
            self.genders.insert(name.to_string(), next as u32);
            next as u32
        })
    }

    /// The bit set of the gender ids `req` accepts (all for "anyone").
    fn wants(&mut self, req: &MatchRequest) -> Option<u32> {
        if req.wants.genders.is_empty() {
            return Some(u32::MAX);
        }
        let mut bits = 0;
        for g in &req.wants.genders {
            bits |= 1 << self.gender(g)?;
        }
        Some(bits)
    }

    fn give_up(&mut self) {
        *self = OpenWindow {
            gave_up: true,
            ..OpenWindow::new(self.scorer, self.dim, self.cands.k())
        };
    }

    /// Scores the members not scored yet against all before them, once the
    /// window has at least `from` members.
    pub fn score_new(&mut self, min: f32, from: usize) {
        let n = self.len();
        if self.gave_up || self.scored == n || n < from {
            return;
        }
        self.cands.grow_to(n);
        let d = self.dim;
        let Scratch {
            scores: mut out,
            mut hits,
        } = std::mem::take(&mut self.scratch);
        // Every hit is written by the scan before it is used.
        hits.resize(n, 0);
        for r0 in (self.scored..n).step_by(BLOCK_ROWS) {
            let r1 = (r0 + BLOCK_ROWS).min(n);
            out.resize((r1 - r0) * r1, 0.0);
            let scored = FeatureMatrix::from_slice(&self.vectors[r0 * d..r1 * d], d)
                .and_then(|rows| score_packed(&rows, &self.packed, r1, &mut out));
            if scored.is_err() {
                // Vectors are checked on ingest: unreachable; the close
                // scores the window itself.
                self.give_up();
                return;
            }
            builtin_scores(self.scorer, &mut out);
            for (a, row) in out.chunks_exact(r1).enumerate() {
                // Against the members before it: each pair once.
                let i = r0 + a;
                let row = &row[..i];
                // A member's own list is empty when its row comes: a row in
                // one piece would offer it every allowed column. In pieces,
                // its threshold rises after the first and filters the rest.
                for first in (0..i).step_by(ROW_PIECE) {
                    let piece = &row[first..(first + ROW_PIECE).min(i)];
                    let (thresholds, ti) = self.cands.thresholds(i);
                    let thresholds = &thresholds[first..first + piece.len()];
                    let found = self
                        .lanes
                        .offers(i, first, piece, thresholds, ti, min, &mut hits);
                    // The lanes are exact for preferences and users.
                    offer_hits(&mut self.cands, i, first, piece, &hits[..found], |_| true);
                }
            }
        }
        self.scored = n;
        self.scratch = Scratch { scores: out, hits };
    }

    /// Called once the window takes only stragglers (event time is past its
    /// end), after scoring: the first time, cuts every list to its best K
    /// and sorts the edges of all lists best first, so that a close whose
    /// members were all scored by then only has to pick the participants'
    /// edges in that order (sorting them was ~1–2 ms of a large window's
    /// close). Built once: when stragglers are scored after it, later calls
    /// only cut the lists down (the close then sorts its seeds itself).
    pub fn presort(&mut self) {
        let n = self.len();
        if self.presorted.scored.is_some() || self.gave_up || self.scored < n || n > 1 << 16 {
            self.cands.cut_long();
            return;
        }
        let mut keys = std::mem::take(&mut self.presorted.keys);
        keys.clear();
        for m in 0..n {
            self.cands.finish(m);
        }
        for m in 0..n {
            for &e in self.cands.kept(m).0 {
                let other = if e.lo == m as u32 { e.hi } else { e.lo };
                // An edge in both lists is taken from the lower member's.
                if !((other as usize) < m && self.cands.holds(other as usize, e)) {
                    keys.push(e.sort_key());
                }
            }
        }
        radix_sort(&mut keys);
        self.presorted = Presorted {
            keys,
            scored: Some(n),
        };
    }

    /// The member indices of a close's participants (their offsets, in
    /// the close's index order, distinct users). None when the window was
    /// never prescored, is scored by another scorer than `scorer`, or a
    /// participant is not a member: the close then scores the window itself.
    pub(crate) fn members_of(
        &self,
        scorer: BuiltinScorer,
        participants: &[i64],
    ) -> Option<Vec<u32>> {
        if self.gave_up || self.scored == 0 || scorer != self.scorer {
            return None;
        }
        participants
            .iter()
            .map(|o| self.members.get(o).copied())
            .collect()
    }

    /// The participants' filter (`members` from [`Self::members_of`];
    /// `blocked`: their index pairs in cooldown), from the lanes compiled
    /// as they arrived.
    pub(crate) fn filter(&self, members: &[u32], blocked: FastSet<(u32, u32)>) -> WindowFilter {
        WindowFilter::from_lanes(&self.lanes, members, blocked)
    }

    /// The greedy's seeds for the participants (`members` from
    /// [`Self::members_of`]), after scoring whatever is left; `in_cooldown(p,
    /// q)` is the close's cooldown check of a pair of participant indices
    /// (the lists hold only pairs whose preferences match, of distinct
    /// users).
    pub(crate) fn seeds(
        &mut self,
        min: f32,
        members: &[u32],
        in_cooldown: impl Fn(u32, u32) -> bool,
    ) -> Seeds {
        self.score_new(min, 0);
        if self.presorted.scored == Some(self.scored) {
            return self.presorted_seeds(members, in_cooldown);
        }
        let mut by_member = vec![u32::MAX; self.len()];
        for (p, &m) in members.iter().enumerate() {
            by_member[m as usize] = p as u32;
            self.cands.finish(m as usize);
        }
        let mut seeds = Seeds::with_capacity(members.len() * self.cands.k());
        for (p, &m) in members.iter().enumerate() {
            let (list, floor) = self.cands.kept(m as usize);
            for &e in list {
                let other = if e.lo == m { e.hi } else { e.lo };
                let q = by_member[other as usize];
                // An edge in both lists is taken from the lower member's.
                let twice = other < m && self.cands.holds(other as usize, e);
                if q != u32::MAX && !twice && !in_cooldown(p as u32, q) {
                    seeds.edges.push(Edge::new(e.score, p as u32, q));
                }
            }
            if let Some(f) = floor {
                seeds.floors.push((Edge::above_all_of(f.score), p as u32));
            }
        }
        seeds
    }

    /// [`Self::seeds`] from the presorted edges: the participants' ones in
    /// that order, renumbered; only ties (equal scores) need sorting again
    /// for the participants' numbering.
    fn presorted_seeds(&self, members: &[u32], in_cooldown: impl Fn(u32, u32) -> bool) -> Seeds {
        let mut by_member = vec![u32::MAX; self.len()];
        for (p, &m) in members.iter().enumerate() {
            by_member[m as usize] = p as u32;
        }
        let mut keys = Vec::with_capacity(self.presorted.keys.len());
        for &k in &self.presorted.keys {
            let e = Edge::from_sort_key(k);
            let (p, q) = (by_member[e.lo as usize], by_member[e.hi as usize]);
            if p != u32::MAX && q != u32::MAX && !in_cooldown(p, q) {
                keys.push(Edge::new(e.score, p, q).sort_key());
            }
        }
        sort_ties(&mut keys);
        let floors = members
            .iter()
            .enumerate()
            .filter_map(|(p, &m)| {
                let floor = self.cands.kept(m as usize).1?;
                Some((Edge::above_all_of(floor.score), p as u32))
            })
            .collect();
        Seeds {
            edges: keys.into_iter().map(Edge::from_sort_key).collect(),
            floors,
            sorted: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matching::matchmaker::{greedy, greedy_seeded, min_score_f32, Pair};
    use crate::matching::pairing::tests::{filter, filter_blocked, request};
    use crate::matching::pairing::{Scores, WindowPairs};
    use proptest::prelude::*;

    /// The participants' pair source, as a close that was not prescored
    /// builds it (or with another `filter`).
    fn pairs<'a>(reqs: &[&MatchRequest], scorer: BuiltinScorer) -> WindowPairs<'a> {
        pairs_with(reqs, scorer, filter(reqs))
    }

    fn pairs_with<'a>(
        reqs: &[&MatchRequest],
        scorer: BuiltinScorer,
        filter: WindowFilter,
    ) -> WindowPairs<'a> {
        let data: Vec<f32> = reqs.iter().flat_map(|r| r.vector.clone()).collect();
        WindowPairs {
            filter,
            scores: Scores::builtin(FeatureMatrix::from_vec(data, 2).unwrap(), scorer),
            len: reqs.len(),
        }
    }

    /// Prescores `arrivals` (offset, request) in batches of `batch`
    /// (presorting after batch `presort_after`, as if the window's end had
    /// passed: later batches are stragglers), then matches `participants`
    /// (offsets, in order) from the seeds.
    #[allow(clippy::too_many_arguments)]
    fn prescored(
        arrivals: &[(i64, MatchRequest)],
        participants: &[i64],
        k: usize,
        batch: usize,
        presort_after: Option<usize>,
        blocked: &FastSet<(u32, u32)>,
        min: f64,
        scorer: BuiltinScorer,
    ) -> Option<Vec<Pair>> {
        let mut w = OpenWindow::new(scorer, 2, k);
        for (b, chunk) in arrivals.chunks(batch.max(1)).enumerate() {
            for (offset, r) in chunk {
                w.add(*offset, r);
            }
            w.score_new(min_score_f32(min), 0);
            if presort_after.is_some_and(|a| b >= a) {
                w.presort();
            }
        }
        let by_offset: FastMap<i64, &MatchRequest> =
            arrivals.iter().map(|(o, r)| (*o, r)).collect();
        let reqs: Vec<&MatchRequest> = participants.iter().map(|o| by_offset[o]).collect();
        let members = w.members_of(scorer, participants)?;
        // As the close does it: the filter from the window's lanes.
        let src = pairs_with(&reqs, scorer, w.filter(&members, blocked.clone()));
        let seeds = w.seeds(min_score_f32(min), &members, |p, q| {
            src.filter.in_cooldown(p, q)
        });
        Some(greedy_seeded(&src, min, k, seeds))
    }

    fn anyone(id: usize, user: usize, v: [f32; 2]) -> MatchRequest {
        let mut r = request(&format!("r{id}"), &format!("u{user}"), "f", 30, &[], 18, 99);
        r.vector = v.to_vec();
        r
    }

    #[test]
    fn ties_at_the_floor_are_refilled_not_trusted() {
        // Equal vectors: every pair scores 1, so the index order decides.
        // They arrive in reverse offset order, so the lists (arrival order)
        // and the close (offset order) break the ties differently.
        let arrivals: Vec<(i64, MatchRequest)> = (0..6)
            .rev()
            .map(|i| (i as i64, anyone(i, i, [1.0, 1.0])))
            .collect();
        let participants: Vec<i64> = (0..6).collect();
        let none = FastSet::default();
        let got = prescored(
            &arrivals,
            &participants,
            1,
            1,
            None,
            &none,
            -1.0,
            BuiltinScorer::Cosine,
        )
        .unwrap();
        let reqs: Vec<&MatchRequest> = (0..6).map(|i| &arrivals[5 - i].1).collect();
        let want = greedy(&pairs(&reqs, BuiltinScorer::Cosine), -1.0, 1);
        assert_eq!(got, want);
        let ids: Vec<(u32, u32)> = got.iter().map(|p| (p.i, p.j)).collect();
        assert_eq!(ids, vec![(0, 1), (2, 3), (4, 5)]);
    }

    #[test]
    fn a_window_never_prescored_or_with_too_many_genders_is_left_to_the_close() {
        let mut w = OpenWindow::new(BuiltinScorer::Cosine, 2, 4);
        w.add(0, &anyone(0, 0, [1.0, 0.0]));
        w.add(1, &anyone(1, 1, [1.0, 0.0]));
        let min = min_score_f32(-1.0);
        w.score_new(min, 3);
        assert_eq!(w.scored(), 0, "below `from`: not scored yet");
        assert!(w.members_of(BuiltinScorer::Cosine, &[0, 1]).is_none());
        w.score_new(min, 2);
        assert_eq!(w.scored(), 2);
        assert_eq!(
            w.members_of(BuiltinScorer::Cosine, &[1, 0]),
            Some(vec![1, 0])
        );
        assert!(
            w.members_of(BuiltinScorer::Cosine, &[0, 7]).is_none(),
            "a participant that is not a member"
        );
        assert!(
            w.members_of(BuiltinScorer::Complement, &[0, 1]).is_none(),
            "scored by another scorer"
        );

        let mut many = OpenWindow::new(BuiltinScorer::Cosine, 2, 4);
        for g in 0..MAX_GENDERS + 1 {
            let mut r = anyone(g, g, [1.0, 0.0]);
            r.profile.gender = format!("g{g}");
            many.add(g as i64, &r);
        }
        many.score_new(min, 0);
        assert!(many.is_empty() && many.scored() == 0);
        assert!(many.members_of(BuiltinScorer::Cosine, &[0]).is_none());
    }

    fn arb_window() -> impl Strategy<Value = Vec<MatchRequest>> {
        let one = (
            0usize..12,
            0usize..3,
            20u8..40,
            0usize..4,
            -3i8..4,
            -3i8..4,
            0u8..10,
        );
        prop::collection::vec(one, 2..60).prop_map(|rows| {
            rows.into_iter()
                .enumerate()
                .map(|(i, (user, g, age, wants, x, y, span))| {
                    let gender = ["f", "m", "x"][g];
                    let wanted: &[&str] = [&[][..], &["f"], &["m"], &["f", "x"]][wants];
                    let mut r = request(
                        &format!("r{i}"),
                        &format!("u{user}"),
                        gender,
                        age,
                        wanted,
                        age - span,
                        age + span,
                    );
                    r.vector = vec![f32::from(x), f32::from(y)];
                    r
                })
                .collect()
        })
    }

    /// `arrivals`' offsets shuffled by `seed` (xorshift; Fisher-Yates).
    fn shuffled(mut arrivals: Vec<(i64, MatchRequest)>, seed: u64) -> Vec<(i64, MatchRequest)> {
        let mut s = seed | 1;
        for i in (1..arrivals.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            arrivals.swap(i, (s % (i as u64 + 1)) as usize);
        }
        arrivals
    }

    proptest! {
        /// The filter gathered from a window's lanes answers every question
        /// the matchmaker asks exactly as the one compiled from the
        /// participants' requests, whatever order the members arrived in.
        #[test]
        fn the_filter_from_the_lanes_is_the_filter_of_the_requests(
            window in arb_window(),
            order_seed in any::<u64>(),
            drop_mask in any::<u64>(),
            free_mask in any::<u64>(),
        ) {
            let arrivals = shuffled(
                window.iter().cloned().enumerate().map(|(i, r)| (i as i64, r)).collect(),
                order_seed,
            );
            let mut w = OpenWindow::new(BuiltinScorer::Cosine, 2, 3);
            for (offset, r) in &arrivals {
                w.add(*offset, r);
            }
            w.score_new(-1.0, 0);
            let participants: Vec<i64> = (0..window.len() as i64)
                .filter(|&o| drop_mask & (1 << (o % 64)) == 0)
                .collect();
            let reqs: Vec<&MatchRequest> = participants.iter().map(|&o| &window[o as usize]).collect();
            let members = w.members_of(BuiltinScorer::Cosine, &participants).unwrap();
            let (want, got) = (filter(&reqs), w.filter(&members, FastSet::default()));
            let n = reqs.len() as u32;
            let free: Vec<bool> = (0..n).map(|x| free_mask & (1 << (x % 64)) != 0).collect();
            for i in 0..n {
                for j in 0..n {
                    prop_assert_eq!(got.allowed(i, j), want.allowed(i, j), "{} {}", i, j);
                }
                let (mut a, mut b) = (vec![0u8; n as usize], vec![0u8; n as usize]);
                got.prefilter(i, 0, &mut a);
                want.prefilter(i, 0, &mut b);
                prop_assert_eq!(a, b);
                let rows = [i, (i * 7 + 3) % n];
                let (mut a, mut b) = (Vec::new(), Vec::new());
                got.reachable(&rows, &free, &mut a);
                want.reachable(&rows, &free, &mut b);
                prop_assert_eq!(a, b);
            }
        }

        /// Whatever the arrival order, batch sizes and participants, the
        /// seeds give exactly the greedy of the participants' full graph.
        #[test]
        fn prescored_seeds_give_the_greedy_of_the_full_graph(
            window in arb_window(),
            order_seed in any::<u64>(),
            drop_mask in any::<u64>(),
            k in 1usize..5,
            batch in 1usize..20,
            presort_after in prop::option::of(0usize..6),
            cooldown_seed in any::<u64>(),
            min in prop::sample::select(vec![-1.0, 0.0, 0.5]),
            complement in any::<bool>(),
        ) {
            let scorer = if complement { BuiltinScorer::Complement } else { BuiltinScorer::Cosine };
            // Offsets in window order; arrival order shuffled.
            let arrivals = shuffled(
                window.iter().cloned().enumerate().map(|(i, r)| (i as i64, r)).collect(),
                order_seed,
            );
            let participants: Vec<i64> = (0..window.len() as i64)
                .filter(|&o| drop_mask & (1 << (o % 64)) == 0 || o % 5 == 0)
                .collect();
            let reqs: Vec<&MatchRequest> = participants.iter().map(|&o| &window[o as usize]).collect();
            // Some participant pairs in cooldown (about one in six).
            let n = reqs.len() as u32;
            let blocked: FastSet<(u32, u32)> = (0..n)
                .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
                .filter(|&(i, j)| (u64::from(i * 61 + j * 17) ^ cooldown_seed) % 6 == 0)
                .collect();
            let want = greedy(&pairs_with(&reqs, scorer, filter_blocked(&reqs, blocked.clone())), min, k);
            let got = prescored(&arrivals, &participants, k, batch, presort_after, &blocked, min, scorer)
                .unwrap();
            prop_assert_eq!(got, want);
        }
    }
}
