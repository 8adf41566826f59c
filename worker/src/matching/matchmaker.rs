//! Max-weight matching of one window.
//!
//! A pair's weight is `score − minScore + ε`: every allowed pair (score ≥
//! `minScore`) is worth taking, and among matchings of equal total score the
//! one with more pairs wins.
//!
//! - **Exact** ([`exact`], windows of at most `exactBelow ≤ 20` requests): a DP
//!   over the subsets of the window, `best[S] = max(best[S − i], max_j w(i, j)
//!   + best[S − i − j])` with `i` the lowest member of `S`: O(2^n · n).
//! - **Greedy** ([`greedy`], larger windows): the classic ½-approximation —
//!   take pairs in order of decreasing score while both sides are free — run
//!   without ever holding the n × n matrix. Scores are computed in row blocks
//!   of the upper triangle ([`PairSource::scores`], a batch GEMM) and each
//!   request keeps only its top-K allowed candidates. The candidate edges are
//!   sorted once, best first (the edges refills add go to a heap beside
//!   them). A request whose K candidates were all taken by others while it
//!   is still free may have unseen edges; all of them are below its K-th
//!   candidate (its *floor*), so before the queue yields an edge below a
//!   free request's floor, that request is rescored against the requests
//!   still free (a *refill*). Hence every pop is the heaviest edge between
//!   free requests, and the result is exactly the greedy matching of the
//!   full graph ([`greedy_dense`] is the reference the tests compare with),
//!   with its ½ bound, at the memory of the sparse graph.
//!
//! Ties are broken by a total order on edges (score, then the lower index,
//! then the higher), so the matching is a pure function of the scores.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::config::MAX_EXACT_BELOW;
use super::pairing::PairSource;

/// Added to every allowed pair's weight (see the module docs).
pub const EPSILON: f64 = 1e-6;

/// Rows scored per block in the greedy's first pass: 128 rows × 10,000
/// candidates is a 5 MB score buffer, and re-packing the candidates per block
/// costs ~1/128 of the GEMM.
pub(crate) const BLOCK_ROWS: usize = 128;

/// Requests rescored together when one runs out of candidates: the ones
/// whose floors are next in line would need a refill soon anyway, and one
/// batch shares the gathering of the free requests.
const REFILL_BATCH: usize = 64;

/// One matched pair of window indices (`i < j`) and its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    pub i: u32,
    pub j: u32,
    pub score: f32,
}

/// The matchmaker's knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchParams {
    pub min_score: f64,
    pub exact_below: usize,
    pub top_k: usize,
}

/// Matches a window: exactly when it has at most `exact_below` requests,
/// greedily otherwise.
pub fn match_window(src: &impl PairSource, p: &MatchParams) -> Vec<Pair> {
    match_window_seeded(src, p, || None)
}

/// A pair's weight, if it may be matched at this score.
fn weight(score: f32, min_score: f64) -> Option<f64> {
    let s = f64::from(score);
    // NaN fails the comparison: never matched.
    (s >= min_score).then_some(s - min_score + EPSILON)
}

/// Sum of the weights of `pairs` (what the matchmaker maximises).
pub fn total_weight(pairs: &[Pair], min_score: f64) -> f64 {
    pairs
        .iter()
        .filter_map(|p| weight(p.score, min_score))
        .sum()
}

/// An edge in the greedy's total order: a greater `Edge` is taken first.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Edge {
    pub(crate) score: f32,
    pub(crate) lo: u32,
    pub(crate) hi: u32,
}

impl Edge {
    pub(crate) fn new(score: f32, a: u32, b: u32) -> Self {
        Edge {
            score,
            lo: a.min(b),
            hi: a.max(b),
        }
    }

    /// The edge as one integer whose ascending order is the greedy's order
    /// (best first), for windows of at most 2¹⁶ requests: sorting these is
    /// several times cheaper than sorting edges with `cmp`, and the greedy
    /// sorts n · K of them per window.
    pub(crate) fn sort_key(self) -> u64 {
        (u64::from(!ordered_bits(self.score)) << 32)
            | (u64::from(self.lo) << 16)
            | u64::from(self.hi)
    }

    /// The edge's rank among the edges of request `u` (one of its ends) as
    /// one integer, greater for a greater edge: the score, then the other
    /// end, lower first — [`Ord`]'s order for edges sharing `u`, for any
    /// window size. Selection compares these instead of branching on
    /// `total_cmp` and two tie-breaks.
    #[inline]
    fn rank_at(self, u: u32) -> u64 {
        let other = self.lo ^ self.hi ^ u;
        (u64::from(ordered_bits(self.score)) << 32) | u64::from(!other)
    }

    /// The greatest edge of score `score`: every edge of that score or
    /// lower is below it (no real edge has `lo == hi == 0`). A floor known
    /// only by its score, for candidate lists kept in another index order.
    pub(crate) fn above_all_of(score: f32) -> Self {
        Edge {
            score,
            lo: 0,
            hi: 0,
        }
    }

    pub(crate) fn from_sort_key(key: u64) -> Self {
        let t = ((!((key >> 32) as u32)) ^ 0x8000_0000) as i32;
        let bits = t ^ ((((t >> 31) as u32) >> 1) as i32);
        Edge {
            score: f32::from_bits(bits as u32),
            lo: ((key >> 16) & 0xffff) as u32,
            hi: (key & 0xffff) as u32,
        }
    }
}

/// Sorts edges best first.
fn sort_best_first(edges: &mut Vec<Edge>, n: usize) {
    if n <= 1 << 16 {
        let mut keys: Vec<u64> = edges.iter().map(|e| e.sort_key()).collect();
        radix_sort(&mut keys);
        edges.clear();
        edges.extend(keys.into_iter().map(Edge::from_sort_key));
    } else {
        edges.sort_unstable_by(|a, b| b.cmp(a));
    }
}

/// Sorts `keys` ascending: a least-significant-digit radix sort over the
/// upper four bytes (an edge key's score), skipping the bytes every key
/// shares, then a comparison sort of each run of keys equal in those bytes.
/// For a window's n · K edge keys ~3× faster than a comparison sort, and
/// half the passes of sorting all eight bytes: equal scores are rare, so
/// the runs are short and the lower bytes (the ends) mostly never looked at.
pub(crate) fn radix_sort(keys: &mut Vec<u64>) {
    if keys.len() < 512 {
        keys.sort_unstable();
        return;
    }
    let mut counts = [[0usize; 256]; 4];
    for &k in keys.iter() {
        for (d, c) in counts.iter_mut().enumerate() {
            c[(k >> (32 + 8 * d)) as usize & 0xff] += 1;
        }
    }
    let mut from = std::mem::take(keys);
    let mut to = vec![0u64; from.len()];
    for (d, c) in counts.iter().enumerate() {
        if c.contains(&from.len()) {
            continue;
        }
        let mut at = [0usize; 256];
        let mut sum = 0;
        for (a, &n) in at.iter_mut().zip(c) {
            *a = sum;
            sum += n;
        }
        for &k in &from {
            let b = (k >> (32 + 8 * d)) as usize & 0xff;
            to[at[b]] = k;
            at[b] += 1;
        }
        std::mem::swap(&mut from, &mut to);
    }
    sort_ties(&mut from);
    *keys = from;
}

/// Sorts each run of `keys` that are equal in their upper four bytes (an
/// edge key's score): keys sorted by score, made sorted whole.
pub(crate) fn sort_ties(keys: &mut [u64]) {
    for run in keys.chunk_by_mut(|a, b| a >> 32 == b >> 32) {
        if run.len() > 1 {
            run.sort_unstable();
        }
    }
}

impl Ord for Edge {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then(o.lo.cmp(&self.lo))
            .then(o.hi.cmp(&self.hi))
    }
}

impl PartialOrd for Edge {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl PartialEq for Edge {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}

impl Eq for Edge {}

/// Maximum-weight matching by DP over subsets. Windows above
/// [`MAX_EXACT_BELOW`] requests are matched greedily instead (the DP would
/// need 2^n memory).
pub fn exact(src: &impl PairSource, min_score: f64) -> Vec<Pair> {
    let n = src.len();
    if n < 2 {
        return Vec::new();
    }
    if n > MAX_EXACT_BELOW {
        return greedy(src, min_score, n);
    }
    let idx: Vec<u32> = (0..n as u32).collect();
    let mut scores = vec![0.0f32; n * n];
    src.scores(&idx, &idx, &mut scores);
    let mut w = vec![None; n * n];
    for i in 0..n {
        for j in i + 1..n {
            if src.allowed(i as u32, j as u32) {
                w[i * n + j] = weight(scores[i * n + j], min_score);
            }
        }
    }
    const UNMATCHED: u8 = u8::MAX;
    let full = (1usize << n) - 1;
    let mut best = vec![0.0f64; full + 1];
    let mut partner = vec![UNMATCHED; full + 1];
    for mask in 1..=full {
        let i = mask.trailing_zeros() as usize;
        let rest = mask & !(1 << i);
        let (mut b, mut c) = (best[rest], UNMATCHED);
        let mut others = rest;
        while others != 0 {
            let j = others.trailing_zeros() as usize;
            others &= others - 1;
            if let Some(wij) = w[i * n + j] {
                let v = wij + best[rest & !(1 << j)];
                if v > b {
                    (b, c) = (v, j as u8);
                }
            }
        }
        best[mask] = b;
        partner[mask] = c;
    }
    let mut pairs = Vec::new();
    let mut mask = full;
    while mask != 0 {
        let i = mask.trailing_zeros() as usize;
        mask &= !(1 << i);
        let j = partner[mask | (1 << i)];
        if j != UNMATCHED {
            let j = usize::from(j);
            mask &= !(1 << j);
            pairs.push(Pair {
                i: i as u32,
                j: j as u32,
                score: scores[i * n + j],
            });
        }
    }
    pairs
}

/// `f32::total_cmp`'s order as an unsigned integer.
#[inline]
fn ordered_bits(score: f32) -> u32 {
    let bits = score.to_bits() as i32;
    (bits ^ ((((bits >> 31) as u32) >> 1) as i32)) as u32 ^ 0x8000_0000
}

/// Every request's best K edges in one flat buffer of 2K slots per request.
/// An edge above the request's floor is appended; a full buffer is cut to
/// its best K by linear-time selection, which raises the floor. Appends are
/// O(1) amortised and touch one contiguous slot range (a heap per request
/// costs a pointer chase and a sift per candidate).
#[derive(Debug, Clone)]
pub(crate) struct Candidates {
    k: usize,
    slots: Vec<Edge>,
    len: Vec<u32>,
    /// The K-th best after the last cut: nothing at or below it can be in
    /// the top K any more.
    floor: Vec<Option<Edge>>,
    /// The floor's score, or −∞: the one-compare reject of the hot loop.
    threshold: Vec<f32>,
}

impl Candidates {
    pub(crate) fn new(n: usize, k: usize) -> Self {
        let mut c = Candidates {
            k,
            slots: Vec::new(),
            len: Vec::new(),
            floor: Vec::new(),
            threshold: Vec::new(),
        };
        c.grow_to(n);
        c
    }

    /// Edges kept per request.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Forgets every list (keeping the buffers).
    pub(crate) fn clear(&mut self) {
        self.slots.clear();
        self.len.clear();
        self.floor.clear();
        self.threshold.clear();
    }

    /// Adds empty lists up to `n` requests.
    pub(crate) fn grow_to(&mut self, n: usize) {
        let blank = Edge::new(f32::NEG_INFINITY, 0, 0);
        self.slots.resize(n * 2 * self.k, blank);
        self.len.resize(n, 0);
        self.floor.resize(n, None);
        self.threshold.resize(n, f32::NEG_INFINITY);
    }

    /// The thresholds of requests `0..u` and of `u` itself (see
    /// [`offer_row`]).
    #[inline]
    pub(crate) fn thresholds(&self, u: usize) -> (&[f32], f32) {
        (&self.threshold[..u], self.threshold[u])
    }

    #[inline]
    pub(crate) fn admits(&self, u: usize, e: Edge) -> bool {
        self.floor[u].is_none_or(|f| e > f)
    }

    #[inline]
    pub(crate) fn push(&mut self, u: usize, e: Edge) {
        let l = self.len[u] as usize;
        self.slots[u * 2 * self.k + l] = e;
        self.len[u] += 1;
        if l + 1 == 2 * self.k {
            self.cut(u);
        }
    }

    /// Keeps `u`'s best K; sets the floor once there are K.
    fn cut(&mut self, u: usize) {
        let k = self.k;
        let l = self.len[u] as usize;
        let s = &mut self.slots[u * 2 * k..u * 2 * k + l];
        if l > k {
            s.select_nth_unstable_by_key(k - 1, |e| std::cmp::Reverse(e.rank_at(u as u32)));
            self.len[u] = k as u32;
        }
        if l >= k {
            let f = s[k - 1];
            self.floor[u] = Some(f);
            self.threshold[u] = f.score;
        }
    }

    /// Cuts every list holding more than K down to its best K, so that
    /// [`Self::finish`] has nothing left to sort.
    pub(crate) fn cut_long(&mut self) {
        for u in 0..self.len.len() {
            if self.len[u] as usize > self.k {
                self.cut(u);
            }
        }
    }

    /// `u`'s best K edges, and its floor if it has K (there may be more below).
    pub(crate) fn finish(&mut self, u: usize) -> (&[Edge], Option<Edge>) {
        self.cut(u);
        self.kept(u)
    }

    /// What [`Self::finish`] returned for `u` (unchanged until the next push).
    pub(crate) fn kept(&self, u: usize) -> (&[Edge], Option<Edge>) {
        let base = u * 2 * self.k;
        let list = &self.slots[base..base + self.len[u] as usize];
        let floor = (list.len() == self.k).then(|| self.floor[u]).flatten();
        (list, floor)
    }

    /// Whether `u`'s finished list holds `e`, an edge of `u`: every edge
    /// offered to `u` at or above its floor is kept, nothing below it.
    pub(crate) fn holds(&self, u: usize, e: Edge) -> bool {
        self.kept(u).1.is_none_or(|f| e >= f)
    }
}

/// A max-queue for the greedy: what it starts with sorted once (best
/// first), plus a heap for the few items that refills add. Cheaper than one
/// heap of everything: most pops are a step along the sorted part.
struct SortedQueue<T> {
    sorted: Vec<T>,
    at: usize,
    extra: BinaryHeap<T>,
}

impl<T: Ord + Copy> SortedQueue<T> {
    /// `sorted` must be best first.
    fn new(sorted: Vec<T>) -> Self {
        SortedQueue {
            sorted,
            at: 0,
            extra: BinaryHeap::new(),
        }
    }

    fn peek(&self) -> Option<T> {
        match (self.sorted.get(self.at), self.extra.peek()) {
            (Some(&a), Some(&b)) => Some(a.max(b)),
            (a, b) => a.or(b).copied(),
        }
    }

    fn pop(&mut self) -> Option<T> {
        let e = self.peek()?;
        if self.sorted.get(self.at) == Some(&e) {
            self.at += 1;
        } else {
            self.extra.pop();
        }
        Some(e)
    }

    fn push(&mut self, item: T) {
        self.extra.push(item);
    }
}

/// How many leading edges of `run` (best first) are above `bound`: a
/// galloping search, as the answer is mostly a few edges in and a binary
/// search over the whole run misses the cache at every step.
fn leading_above(run: &[Edge], bound: Edge) -> usize {
    let mut hi = 1;
    while hi <= run.len() && run[hi - 1] > bound {
        hi *= 2;
    }
    // run[..hi / 2] are above the bound; the first that is not is before hi.
    let lo = hi / 2;
    lo + run[lo..hi.min(run.len())].partition_point(|&e| e > bound)
}

/// Greedy max-weight matching of the full allowed graph, keeping at most
/// `top_k` candidates per request in memory (see the module docs).
pub fn greedy(src: &impl PairSource, min_score: f64, top_k: usize) -> Vec<Pair> {
    let n = src.len();
    if n < 2 {
        return Vec::new();
    }
    // A request has at most n − 1 edges: a larger K only costs memory.
    let k = top_k.clamp(1, n);
    let mut cands = first_pass(src, min_score, k);
    let mut seeds = Seeds::with_capacity(n * k);
    for u in 0..n {
        let (list, floor) = cands.finish(u);
        seeds.edges.extend_from_slice(list);
        if let Some(f) = floor {
            seeds.floors.push((f, u as u32));
        }
    }
    drop(cands);
    greedy_seeded(src, min_score, k, seeds)
}

/// What the greedy starts from: candidate edges (duplicates allowed) and the
/// floors of the requests that may have edges not among them — each such
/// edge is below its request's floor.
#[derive(Debug, Default)]
pub(crate) struct Seeds {
    pub(crate) edges: Vec<Edge>,
    pub(crate) floors: Vec<(Edge, u32)>,
    /// The edges are already best first.
    pub(crate) sorted: bool,
}

impl Seeds {
    pub(crate) fn with_capacity(edges: usize) -> Self {
        Seeds {
            edges: Vec::with_capacity(edges),
            floors: Vec::new(),
            sorted: false,
        }
    }
}

/// The greedy from `seeds` instead of a first pass of its own: the same
/// matching as [`greedy`] whenever the seeds keep its promise (every allowed
/// edge of `src` is among the edges or below its request's floor), whatever
/// produced them — e.g. candidate lists kept while the window filled.
pub(crate) fn greedy_seeded(
    src: &impl PairSource,
    min_score: f64,
    top_k: usize,
    seeds: Seeds,
) -> Vec<Pair> {
    let n = src.len();
    if n < 2 {
        return Vec::new();
    }
    let k = top_k.clamp(1, n);
    let Seeds {
        mut edges,
        mut floors,
        sorted,
    } = seeds;
    // Requests whose lists are full (there may be more edges below), by floor.
    floors.sort_unstable_by(|a, b| b.cmp(a));
    let mut floors = SortedQueue::new(floors);
    if !sorted {
        sort_best_first(&mut edges, n);
    }
    let mut queue = SortedQueue::new(edges);

    let mut free = vec![true; n];
    let mut pairs = Vec::new();
    loop {
        let next = queue.peek();
        let mut batch = Vec::new();
        while let Some((floor, u)) = floors.peek() {
            if !free[u as usize] {
                floors.pop();
            } else if next.is_some_and(|e| floor <= e) {
                break;
            } else {
                floors.pop();
                batch.push((u, floor));
            }
        }
        if !batch.is_empty() {
            while batch.len() < REFILL_BATCH {
                let Some((floor, u)) = floors.pop() else {
                    break;
                };
                if free[u as usize] {
                    batch.push((u, floor));
                }
            }
            refill(src, min_score, k, &batch, &free, &mut queue, &mut floors);
            continue;
        }
        let Some(e) = queue.pop() else {
            break;
        };
        take(e, &mut free, &mut pairs);
        // The sorted edges above every refill edge and every floor (free or
        // not: a stale one only ends the run early) come next in order
        // whatever is taken: run through them without the queue's merging.
        let bound = queue.extra.peek().copied().max(floors.peek().map(|f| f.0));
        let run = &queue.sorted[queue.at..];
        let end = match bound {
            Some(b) => leading_above(run, b),
            None => run.len(),
        };
        for &e in &run[..end] {
            take(e, &mut free, &mut pairs);
        }
        queue.at += end;
    }
    pairs
}

/// Matches `e`'s ends if both are free.
#[inline]
fn take(e: Edge, free: &mut [bool], pairs: &mut Vec<Pair>) {
    let (lo, hi) = (e.lo as usize, e.hi as usize);
    if free[lo] && free[hi] {
        free[lo] = false;
        free[hi] = false;
        pairs.push(Pair {
            i: e.lo,
            j: e.hi,
            score: e.score,
        });
    }
}

/// Scores the upper triangle in row blocks and keeps each request's top-K
/// allowed edges. The scan is the hot loop (n²/2 pairs): per row, a
/// branch-free pass marks the columns that beat either side's floor, reach
/// minScore and pass the prefilter (a few percent of them), and only those
/// take the slow path that confirms and records them.
fn first_pass(src: &impl PairSource, min_score: f64, k: usize) -> Candidates {
    let n = src.len();
    let mut cands = Candidates::new(n, k);
    let min = min_score_f32(min_score);
    let all: Vec<u32> = (0..n as u32).collect();
    let mut out = Vec::new();
    let mut marks = vec![0u8; n];
    let mut hits = vec![0u32; n];
    for r0 in (0..n).step_by(BLOCK_ROWS) {
        let r1 = (r0 + BLOCK_ROWS).min(n);
        let rows = &all[r0..r1];
        let cols = &all[r0..];
        out.resize(rows.len() * cols.len(), 0.0);
        src.scores(rows, cols, &mut out);
        for (a, row) in out.chunks_exact(cols.len()).enumerate() {
            let i = r0 + a;
            // Only j > i: the block's diagonal part and everything right of it.
            let first = i + 1;
            let row = &row[a + 1..];
            let marks = &mut marks[..row.len()];
            src.prefilter(i as u32, first, marks);
            offer_row(&mut cands, i, first, row, marks, &mut hits, min, |j| {
                src.allowed(i as u32, j as u32)
            });
        }
    }
    cands
}

/// Offers request `i`'s scores against the requests `first..first +
/// row.len()` to both sides' candidate lists. `marks` holds the prefilter's
/// verdicts (0: never allowed) and is overwritten; `allowed(j)` confirms a
/// pair that beats a floor. Branch-free first: only the few percent of
/// columns that reach minScore, beat either side's floor and pass the
/// prefilter take the slow path.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn offer_row(
    cands: &mut Candidates,
    i: usize,
    first: usize,
    row: &[f32],
    marks: &mut [u8],
    hits: &mut [u32],
    min: f32,
    allowed: impl Fn(usize) -> bool,
) {
    let ti = cands.threshold[i];
    let thresholds = &cands.threshold[first..first + row.len()];
    for ((m, &s), &tj) in marks.iter_mut().zip(row).zip(thresholds) {
        *m &= u8::from((s >= min) & ((s >= ti) | (s >= tj)));
    }
    let found = marked(marks, hits);
    offer_hits(cands, i, first, row, &hits[..found], allowed);
}

/// The slow path of [`offer_row`] for the columns `hits` (positions in
/// `row`) that passed the branch-free bounds: each edge goes to whichever
/// side still admits it, once `allowed(j)` confirms it.
#[inline]
pub(crate) fn offer_hits(
    cands: &mut Candidates,
    i: usize,
    first: usize,
    row: &[f32],
    hits: &[u32],
    allowed: impl Fn(usize) -> bool,
) {
    for &b in hits {
        let j = first + b as usize;
        let s = row[b as usize];
        let e = Edge::new(s, i as u32, j as u32);
        // A score above a side's threshold is above its floor; only a tie
        // needs the edge order. (Both callers keep NaN out of `hits`.)
        let admits = |u: usize| {
            let t = cands.threshold[u];
            if s == t {
                cands.admits(u, e)
            } else {
                s > t
            }
        };
        let (to_i, to_j) = (admits(i), admits(j));
        if (to_i || to_j) && allowed(j) {
            if to_i {
                cands.push(i, e);
            }
            if to_j {
                cands.push(j, e);
            }
        }
    }
}

/// Writes the positions of the nonzero `marks` (each 0 or 1) to the front
/// of `hits` (as long as `marks`); how many. Marks are mostly a few
/// percent: eight are skipped at a time.
#[inline]
fn marked(marks: &[u8], hits: &mut [u32]) -> usize {
    let mut found = 0;
    let chunks = marks.chunks_exact(8);
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    let words = chunks.map(|c| c.try_into().expect("eight marks"));
    for (c, word) in words.chain(std::iter::once(tail)).enumerate() {
        let mut bits = u64::from_le_bytes(word);
        while bits != 0 {
            let b = c * 8 + bits.trailing_zeros() as usize / 8;
            bits &= bits - 1;
            hits[found] = b as u32;
            found += 1;
        }
    }
    found
}

/// [`match_window`], starting the greedy from `seeds()` when it gives some
/// (and the window is too large for the exact matcher).
pub(crate) fn match_window_seeded(
    src: &impl PairSource,
    p: &MatchParams,
    seeds: impl FnOnce() -> Option<Seeds>,
) -> Vec<Pair> {
    let n = src.len();
    if n < 2 {
        return Vec::new();
    }
    if n <= p.exact_below.min(MAX_EXACT_BELOW) {
        return exact(src, p.min_score);
    }
    match seeds() {
        Some(s) => greedy_seeded(src, p.min_score, p.top_k, s),
        None => greedy(src, p.min_score, p.top_k),
    }
}

/// The smallest f32 at or above `min`: for an f32 score `s`,
/// `s >= min_score_f32(m)` exactly when `f64::from(s) >= m`.
pub(crate) fn min_score_f32(min: f64) -> f32 {
    let m = min as f32;
    if f64::from(m) < min {
        m.next_up()
    } else {
        m
    }
}

/// Rescores `batch` (free requests with their floors) against the requests
/// still free and queues each one's next K edges below its floor. The batch
/// is rescored a kinship group at a time, each against the free requests
/// it can reach ([`PairSource::reachable`]): late in a window the requests
/// still free are mostly ones nobody in the batch accepts (the surplus of
/// one gender looking for the other, say), and scoring them was most of a
/// refill's work.
fn refill(
    src: &impl PairSource,
    min_score: f64,
    k: usize,
    batch: &[(u32, Edge)],
    free: &[bool],
    queue: &mut SortedQueue<Edge>,
    floors: &mut SortedQueue<(Edge, u32)>,
) {
    let mut batch = batch.to_vec();
    batch.sort_by_cached_key(|&(u, _)| (src.kinship(u), u));
    for group in batch.chunk_by(|a, b| src.kinship(a.0) == src.kinship(b.0)) {
        refill_group(src, min_score, k, group, free, queue, floors);
    }
}

/// [`refill`] of one kinship group (free requests with their floors).
fn refill_group(
    src: &impl PairSource,
    min_score: f64,
    k: usize,
    group: &[(u32, Edge)],
    free: &[bool],
    queue: &mut SortedQueue<Edge>,
    floors: &mut SortedQueue<(Edge, u32)>,
) {
    let rows: Vec<u32> = group.iter().map(|&(u, _)| u).collect();
    let mut cols = Vec::new();
    src.reachable(&rows, free, &mut cols);
    let mut out = vec![0.0f32; rows.len() * cols.len()];
    src.scores(&rows, &cols, &mut out);
    let mut all_marks = vec![0u8; rows.len() * cols.len()];
    src.prefilter_block(&rows, &cols, &mut all_marks);
    let min = min_score_f32(min_score);
    let mut hits = vec![0u32; cols.len()];
    let mut list = Vec::new();
    let width = cols.len().max(1);
    for ((&(u, floor), row), marks) in group
        .iter()
        .zip(out.chunks_exact(width))
        .zip(all_marks.chunks_exact_mut(width))
    {
        let top = floor.score;
        for ((m, &s), &x) in marks.iter_mut().zip(row).zip(&cols) {
            *m &= u8::from((s >= min) & (s <= top) & (x != u));
        }
        let found = marked(marks, &mut hits);
        list.clear();
        for &b in &hits[..found] {
            let e = Edge::new(row[b as usize], u, cols[b as usize]);
            if e < floor {
                list.push(e);
            }
        }
        if best_allowed(&mut list, k, |e| src.allowed(e.lo, e.hi)) {
            if let Some(f) = list.iter().min() {
                floors.push((*f, u));
            }
        }
        for &e in &list {
            queue.push(e);
        }
    }
}

/// Keeps the (up to) `k` best edges of `list` that are `allowed`, checking
/// the best `k` first: the prefilter leaves only cooldowns to refuse, so
/// usually nothing else is checked. True when `k` were kept (there may be
/// more below them).
fn best_allowed(list: &mut Vec<Edge>, k: usize, allowed: impl Fn(&Edge) -> bool) -> bool {
    let best_first = |a: &Edge, b: &Edge| b.cmp(a);
    if list.len() > k {
        list.select_nth_unstable_by(k - 1, best_first);
    }
    let head = list.len().min(k);
    if !list[..head].iter().all(&allowed) {
        list.retain(&allowed);
        if list.len() > k {
            list.select_nth_unstable_by(k - 1, best_first);
        }
    }
    list.truncate(k);
    list.len() == k
}

/// The textbook greedy over the dense graph: every allowed pair scored,
/// sorted, taken while both sides are free. The reference for [`greedy`].
pub fn greedy_dense(src: &impl PairSource, min_score: f64) -> Vec<Pair> {
    let n = src.len();
    let idx: Vec<u32> = (0..n as u32).collect();
    let mut scores = vec![0.0f32; n * n];
    src.scores(&idx, &idx, &mut scores);
    let mut edges = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            let s = scores[i * n + j];
            if weight(s, min_score).is_some() && src.allowed(i as u32, j as u32) {
                edges.push(Edge::new(s, i as u32, j as u32));
            }
        }
    }
    edges.sort_unstable_by(|a, b| b.cmp(a));
    let mut free = vec![true; n];
    let mut pairs = Vec::new();
    for e in edges {
        if free[e.lo as usize] && free[e.hi as usize] {
            free[e.lo as usize] = false;
            free[e.hi as usize] = false;
            pairs.push(Pair {
                i: e.lo,
                j: e.hi,
                score: e.score,
            });
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A window given by a symmetric score matrix and an allowed matrix.
    struct Table {
        n: usize,
        scores: Vec<f32>,
        allowed: Vec<bool>,
    }

    impl PairSource for Table {
        fn len(&self) -> usize {
            self.n
        }
        fn scores(&self, rows: &[u32], cols: &[u32], out: &mut [f32]) {
            for (a, &i) in rows.iter().enumerate() {
                for (b, &j) in cols.iter().enumerate() {
                    out[a * cols.len() + b] = self.scores[i as usize * self.n + j as usize];
                }
            }
        }
        fn allowed(&self, i: u32, j: u32) -> bool {
            i != j && self.allowed[i as usize * self.n + j as usize]
        }
    }

    /// Scores on a coarse grid (many ties) and ~`p_allowed` of pairs allowed.
    fn table(n: usize, seed: u64, p_allowed: u32) -> Table {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut scores = vec![0.0; n * n];
        let mut allowed = vec![false; n * n];
        for i in 0..n {
            for j in i + 1..n {
                let v = (next() % 21) as f32 / 10.0 - 1.0;
                let ok = (next() % 100) < u64::from(p_allowed);
                scores[i * n + j] = v;
                scores[j * n + i] = v;
                allowed[i * n + j] = ok;
                allowed[j * n + i] = ok;
            }
        }
        Table { n, scores, allowed }
    }

    /// Every matching, by recursion: the brute-force optimum.
    fn brute_force(t: &Table, min: f64, free: &mut Vec<bool>) -> f64 {
        let Some(i) = free.iter().position(|&f| f) else {
            return 0.0;
        };
        free[i] = false;
        let mut best = brute_force(t, min, free);
        for j in i + 1..t.n {
            if free[j] && t.allowed(i as u32, j as u32) {
                if let Some(w) = weight(t.scores[i * t.n + j], min) {
                    free[j] = false;
                    best = best.max(w + brute_force(t, min, free));
                    free[j] = true;
                }
            }
        }
        free[i] = true;
        best
    }

    fn check_matching(t: &Table, pairs: &[Pair], min: f64) {
        let mut used = vec![false; t.n];
        for p in pairs {
            assert!(p.i < p.j);
            assert!(t.allowed(p.i, p.j), "{p:?} not allowed");
            assert!(f64::from(p.score) >= min);
            assert_eq!(p.score, t.scores[p.i as usize * t.n + p.j as usize]);
            for v in [p.i, p.j] {
                assert!(
                    !std::mem::replace(&mut used[v as usize], true),
                    "{v} matched twice"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn exact_is_optimal(n in 0usize..10, seed in any::<u64>(), p in 0u32..=100, min in -1.0f64..0.5) {
            let t = table(n, seed, p);
            let pairs = exact(&t, min);
            check_matching(&t, &pairs, min);
            let want = brute_force(&t, min, &mut vec![true; n]);
            prop_assert!((total_weight(&pairs, min) - want).abs() < 1e-9,
                "exact {} vs brute force {}", total_weight(&pairs, min), want);
        }

        #[test]
        fn sparse_greedy_is_the_dense_greedy_and_at_least_half_the_optimum(
            n in 0usize..14, seed in any::<u64>(), p in 0u32..=100, min in -1.0f64..0.5, k in 1usize..5,
        ) {
            let t = table(n, seed, p);
            let sparse = greedy(&t, min, k);
            check_matching(&t, &sparse, min);
            let dense = greedy_dense(&t, min);
            prop_assert_eq!(&sparse, &dense);
            let opt = total_weight(&exact(&t, min), min);
            prop_assert!(total_weight(&sparse, min) >= 0.5 * opt - 1e-9);
        }

        #[test]
        fn sparse_greedy_holds_on_windows_larger_than_a_block(seed in any::<u64>(), k in 1usize..4) {
            let t = table(BLOCK_ROWS + 37, seed, 40);
            let sparse = greedy(&t, 0.0, k);
            check_matching(&t, &sparse, 0.0);
            prop_assert_eq!(sparse, greedy_dense(&t, 0.0));
        }
    }

    #[test]
    fn match_window_picks_exact_for_small_windows() {
        // A path a-b-c-d with weights 2, 3, 2: greedy takes b-c (3), exact
        // a-b + c-d (4).
        let mut t = table(4, 1, 0);
        for (i, j, s) in [(0, 1, 0.2f32), (1, 2, 0.3), (2, 3, 0.2)] {
            t.scores[i * 4 + j] = s;
            t.scores[j * 4 + i] = s;
            t.allowed[i * 4 + j] = true;
            t.allowed[j * 4 + i] = true;
        }
        let p = |exact_below| MatchParams {
            min_score: 0.0,
            exact_below,
            top_k: 8,
        };
        assert_eq!(match_window(&t, &p(4)).len(), 2);
        let g = match_window(&t, &p(3));
        assert_eq!((g.len(), g[0].i, g[0].j), (1, 1, 2));
    }

    #[test]
    fn the_f32_min_score_compares_like_the_f64_one() {
        for min in [-1.0, -0.5, 0.1, 0.3, 1.0 / 3.0, 0.7, -1e-40, 1e300, -1e300] {
            let m = min_score_f32(min);
            for s in [
                m,
                m.next_down(),
                m.next_up(),
                0.1f32,
                0.3,
                -1.0,
                f32::MAX,
                f32::MIN,
            ] {
                assert_eq!(s >= m, f64::from(s) >= min, "score {s:e} against {min:e}");
            }
        }
    }

    #[test]
    fn nan_scores_and_low_scores_never_match() {
        let mut t = table(2, 1, 100);
        t.scores = vec![0.0, f32::NAN, f32::NAN, 0.0];
        assert!(exact(&t, -1.0).is_empty());
        assert!(greedy(&t, -1.0, 4).is_empty());
        t.scores = vec![0.0, 0.1, 0.1, 0.0];
        assert!(exact(&t, 0.2).is_empty());
        assert_eq!(
            exact(&t, 0.1).len(),
            1,
            "a score equal to minScore is allowed"
        );
    }

    proptest! {
        /// Some bytes shared by every key (passes skipped), some not, and
        /// lengths on both sides of the comparison-sort cut-off.
        #[test]
        fn the_radix_sort_sorts(
            mut keys in prop::collection::vec(any::<u64>(), 0..3000),
            shared in any::<u64>(),
            varying in any::<u8>(),
        ) {
            // Bit d of `varying`: byte d differs between keys.
            let mask = (0..8)
                .filter(|d| varying >> d & 1 == 1)
                .fold(0u64, |m, d| m | 0xff << (8 * d));
            for k in keys.iter_mut() {
                *k = (*k & mask) | (shared & !mask);
            }
            let mut expected = keys.clone();
            expected.sort_unstable();
            radix_sort(&mut keys);
            prop_assert_eq!(keys, expected);
        }

        #[test]
        fn the_galloping_search_finds_the_binary_search_s_answer(
            scores in prop::collection::vec(-4i8..4, 0..300),
            bound in -5i8..5,
            lo in 0u32..4,
        ) {
            let mut run: Vec<Edge> = scores
                .iter()
                .enumerate()
                .map(|(i, &s)| Edge::new(f32::from(s), i as u32, 1000))
                .collect();
            run.sort_unstable_by(|a, b| b.cmp(a));
            let bound = Edge::new(f32::from(bound), lo, 1000);
            prop_assert_eq!(leading_above(&run, bound), run.partition_point(|&e| e > bound));
        }

        /// The packed sort key orders edges exactly as `Edge::cmp` (best
        /// first) and gives every edge back bit for bit.
        #[test]
        fn sort_keys_order_edges_like_cmp(
            raw in prop::collection::vec((any::<u32>(), 0u32..65_536, 0u32..65_536), 0..200),
        ) {
            let edges: Vec<Edge> = raw
                .iter()
                .map(|&(bits, a, b)| Edge::new(f32::from_bits(bits), a, b))
                .collect();
            let mut by_key = edges.clone();
            sort_best_first(&mut by_key, 65_536);
            let mut by_cmp = edges.clone();
            by_cmp.sort_unstable_by(|a, b| b.cmp(a));
            let bits = |v: &[Edge]| v.iter().map(|e| (e.score.to_bits(), e.lo, e.hi)).collect::<Vec<_>>();
            prop_assert_eq!(bits(&by_key), bits(&by_cmp));
        }

        /// Among the edges of one request, `rank_at` orders exactly as
        /// `Edge::cmp`, whatever the window's size.
        #[test]
        fn ranks_at_a_request_order_its_edges_like_cmp(
            u in any::<u32>(),
            raw in prop::collection::vec((prop_oneof![any::<u32>(), Just(0x3f00_0000u32), Just(0x8000_0000)], any::<u32>()), 0..100),
        ) {
            let edges: Vec<Edge> = raw
                .iter()
                .filter(|&&(_, v)| v != u)
                .map(|&(bits, v)| Edge::new(f32::from_bits(bits), u, v))
                .collect();
            for a in &edges {
                for b in &edges {
                    prop_assert_eq!(a.rank_at(u).cmp(&b.rank_at(u)), a.cmp(b), "{:?} / {:?}", a, b);
                }
            }
        }
    }
}
