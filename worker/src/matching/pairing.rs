//! A window's pair generation: which pairs are allowed (preferences both
//! ways, distinct users, no cooldown) and what they score, in the shape the
//! matchmaker consumes ([`PairSource`]).
//!
//! Preferences are compiled once per window into integers and bitsets
//! ([`WindowFilter`]) because the matchmaker asks about millions of pairs in
//! a 10,000-request window; it answers exactly as
//! [`matchfleet_api::matching::mutually_acceptable`] would (property-tested).

use super::hash::{FastMap, FastSet};

use matchfleet_api::match_pipeline::BuiltinScorer;
use matchfleet_api::matching::MatchRequest;

use super::score::{score_batch, FeatureMatrix};
use super::users::UserId;

/// What the matchmaker needs of a window of `len()` requests.
pub trait PairSource {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Scores of every `rows[a]` against every `cols[b]` into
    /// `out[a * cols.len() + b]`. Symmetric: (i, j) and (j, i) score the
    /// same. A score that is not a number never matches.
    fn scores(&self, rows: &[u32], cols: &[u32], out: &mut [f32]);

    /// Whether `i` and `j` may be matched at all (the score threshold aside).
    fn allowed(&self, i: u32, j: u32) -> bool;

    /// A fast superset of [`allowed`](Self::allowed) for `i` against the
    /// columns `first..first + out.len()`: `out[b] == 0` means never
    /// allowed, 1 maybe. The matchmaker's hot loop; it confirms with `allowed`.
    fn prefilter(&self, i: u32, first: usize, out: &mut [u8]) {
        let _ = (i, first);
        out.fill(1);
    }

    /// [`prefilter`](Self::prefilter) of every `rows[a]` against every
    /// `cols[b]` (any order) into `out[a * cols.len() + b]`.
    fn prefilter_block(&self, rows: &[u32], cols: &[u32], out: &mut [u8]) {
        let _ = (rows, cols);
        out.fill(1);
    }

    /// Requests with equal kinship accept, and are accepted by, the same
    /// kinds of partner, so the columns [`reachable`](Self::reachable) gives
    /// for a group of them fit each one closely.
    fn kinship(&self, i: u32) -> u64 {
        let _ = i;
        0
    }

    /// The requests `x` with `free[x]`, ascending, into `out`: at least every
    /// one of them [`allowed`](Self::allowed) with some of `rows` (all, by
    /// default). A refill scores its rows against these only.
    fn reachable(&self, rows: &[u32], free: &[bool], out: &mut Vec<u32>) {
        let _ = rows;
        out.clear();
        out.extend((0..free.len() as u32).filter(|&x| free[x as usize]));
    }
}

/// Preferences and cooldowns of one window, compiled.
#[derive(Debug, Clone)]
pub struct WindowFilter {
    user: Vec<u32>,
    gender: Vec<u32>,
    age: Vec<u8>,
    min_age: Vec<u8>,
    max_age: Vec<u8>,
    /// The prefilter's form, when the window has at most 32 genders.
    lanes: Option<Lanes>,
    /// Bitset words per request in `wants`.
    words: usize,
    /// Request `i` accepts gender id `g` iff bit `g` of `wants[i * words..]`.
    wants: Vec<u64>,
    /// Index pairs `(lo, hi)` in cooldown.
    blocked: FastSet<(u32, u32)>,
    /// Requests in some pair of `blocked`: most are in none, and checking
    /// this first spares the set lookup for almost every pair.
    in_blocked: Vec<bool>,
}

impl WindowFilter {
    /// Compiles `requests` (in window order), their users' ids (equal for
    /// the same user) and the index pairs of `requests` in cooldown
    /// ([`CooldownBook::blocked`](super::cooldown::CooldownBook::blocked)).
    pub fn new(requests: &[&MatchRequest], users: &[UserId], blocked: FastSet<(u32, u32)>) -> Self {
        let mut genders: FastMap<&str, u32> = FastMap::default();
        let mut gender = Vec::with_capacity(requests.len());
        for r in requests {
            let next = genders.len() as u32;
            gender.push(*genders.entry(r.profile.gender.as_str()).or_insert(next));
        }
        let words = genders.len().div_ceil(64).max(1);
        let mut wants = vec![0u64; requests.len() * words];
        for (r, bits) in requests.iter().zip(wants.chunks_exact_mut(words)) {
            if r.wants.genders.is_empty() {
                bits.fill(u64::MAX);
            }
            // A wanted gender nobody in the window has cannot match here.
            for g in r
                .wants
                .genders
                .iter()
                .filter_map(|g| genders.get(g.as_str()))
            {
                bits[*g as usize / 64] |= 1 << (g % 64);
            }
        }
        let in_blocked = members_of(&blocked, requests.len());
        let mut filter = WindowFilter {
            user: users.to_vec(),
            lanes: None,
            gender,
            age: requests.iter().map(|r| r.profile.age).collect(),
            min_age: requests.iter().map(|r| r.wants.min_age).collect(),
            max_age: requests.iter().map(|r| r.wants.max_age).collect(),
            words,
            wants,
            blocked,
            in_blocked,
        };
        filter.lanes = Lanes::new(&filter);
        filter
    }

    /// The filter of the requests `members[0]`, `members[1]`, … of a
    /// prescored window (indices into its `lanes`, distinct) with the index
    /// pairs (of `members`) in cooldown: the same answers as
    /// [`Self::new`] over those requests, gathered from lanes compiled as
    /// they arrived instead of compiled again from the requests.
    pub(crate) fn from_lanes(lanes: &Lanes, members: &[u32], blocked: FastSet<(u32, u32)>) -> Self {
        let gathered = lanes.gather(members);
        let n = members.len();
        let (mut gender, mut min_age, mut max_age) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for i in 0..n {
            gender.push(gathered.gender_bit[i].trailing_zeros());
            min_age.push(gathered.min_age[i] as u8);
            max_age.push((gathered.min_age[i] + gathered.age_span[i]) as u8);
        }
        WindowFilter {
            user: gathered.user.clone(),
            gender,
            age: gathered.age.iter().map(|&a| a as u8).collect(),
            min_age,
            max_age,
            words: 1,
            wants: gathered.wants.iter().map(|&w| u64::from(w)).collect(),
            in_blocked: members_of(&blocked, n),
            blocked,
            lanes: Some(gathered),
        }
    }

    /// `i` accepts `j`'s profile.
    #[inline]
    fn accepts(&self, i: usize, j: usize) -> bool {
        let g = self.gender[j] as usize;
        let word = self.wants[i * self.words + g / 64];
        (word >> (g % 64)) & 1 == 1
            && self.min_age[i] <= self.age[j]
            && self.age[j] <= self.max_age[i]
    }

    /// [`PairSource::prefilter`] without the cooldowns: preferences both
    /// ways and distinct users, branch-free over 32-bit lanes so the
    /// compiler vectorises it. Windows with more than 32 genders skip it.
    pub fn prefilter(&self, i: u32, first: usize, out: &mut [u8]) {
        match &self.lanes {
            Some(lanes) => lanes.prefilter(i as usize, first, out),
            None => out.fill(1),
        }
    }

    /// [`PairSource::prefilter_block`].
    pub fn prefilter_block(&self, rows: &[u32], cols: &[u32], out: &mut [u8]) {
        match &self.lanes {
            Some(lanes) => lanes.prefilter_block(rows, cols, out),
            None => out.fill(1),
        }
    }

    /// [`PairSource::kinship`]: the gender and the genders accepted.
    pub fn kinship(&self, i: u32) -> u64 {
        let i = i as usize;
        match &self.lanes {
            Some(lanes) => (u64::from(lanes.gender_bit[i]) << 32) | u64::from(lanes.wants[i]),
            None => 0,
        }
    }

    /// [`PairSource::reachable`]: the free requests whose gender and age
    /// some of `rows` accept and who accept the gender and age of some of
    /// `rows` (every free one when the window has no lanes).
    pub fn reachable(&self, rows: &[u32], free: &[bool], out: &mut Vec<u32>) {
        out.clear();
        let free = (0..free.len() as u32).filter(|&x| free[x as usize]);
        match self
            .lanes
            .as_ref()
            .and_then(|l| Some((l, Reach::of(l, rows)?)))
        {
            Some((lanes, reach)) => {
                out.extend(free.filter(|&x| reach.touches(lanes.lane(x as usize))))
            }
            None => out.extend(free),
        }
    }

    /// Distinct users who accept each other and are not in cooldown.
    #[inline]
    pub fn allowed(&self, i: u32, j: u32) -> bool {
        let (a, b) = (i as usize, j as usize);
        self.user[a] != self.user[b]
            && self.accepts(a, b)
            && self.accepts(b, a)
            && !self.in_cooldown(i, j)
    }

    /// Whether the pair is in cooldown (its preferences aside).
    #[inline]
    pub fn in_cooldown(&self, i: u32, j: u32) -> bool {
        self.in_blocked[i as usize]
            && self.in_blocked[j as usize]
            && self.blocked.contains(&(i.min(j), i.max(j)))
    }
}

/// Which of `n` requests are in some pair of `pairs`.
fn members_of(pairs: &FastSet<(u32, u32)>, n: usize) -> Vec<bool> {
    let mut member = vec![false; n];
    for &(i, j) in pairs {
        member[i as usize] = true;
        member[j as usize] = true;
    }
    member
}

/// Preferences as 32-bit lanes (eight to an AVX2 vector), for the prefilter.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lanes {
    gender_bit: Vec<u32>,
    wants: Vec<u32>,
    age: Vec<u32>,
    min_age: Vec<u32>,
    /// `max_age − min_age` (validated ≥ 0): an age range is one unsigned compare.
    age_span: Vec<u32>,
    user: Vec<u32>,
}

impl Lanes {
    fn new(f: &WindowFilter) -> Option<Self> {
        if f.words != 1 || f.gender.iter().any(|&g| g >= 32) {
            return None;
        }
        let mut lanes = Lanes::default();
        for i in 0..f.user.len() {
            lanes.push(
                f.user[i],
                f.gender[i],
                f.wants[i] as u32,
                f.age[i],
                (f.min_age[i], f.max_age[i]),
            );
        }
        Some(lanes)
    }

    /// Forgets every request (keeping the buffers).
    pub(crate) fn clear(&mut self) {
        self.gender_bit.clear();
        self.wants.clear();
        self.age.clear();
        self.min_age.clear();
        self.age_span.clear();
        self.user.clear();
    }

    /// Appends a request: its user and gender ids (gender < 32), the bit set
    /// of the gender ids it accepts, its age and the ages it accepts.
    pub(crate) fn push(&mut self, user: u32, gender: u32, wants: u32, age: u8, ages: (u8, u8)) {
        self.gender_bit.push(1 << gender);
        self.wants.push(wants);
        self.age.push(u32::from(age));
        self.min_age.push(u32::from(ages.0));
        self.age_span.push(u32::from(ages.1.saturating_sub(ages.0)));
        self.user.push(user);
    }

    /// Exactly "distinct users, each accepting the other" for `i` against
    /// the columns `first..first + out.len()`: 1 or 0 per column.
    pub(crate) fn prefilter(&self, i: usize, first: usize, out: &mut [u8]) {
        self.scan(self.lane(i), first, out);
    }

    /// [`Self::prefilter`] of every `rows[a]` against every `cols[b]` into
    /// `out[a * cols.len() + b]`. The columns are gathered once, so each row
    /// is the same contiguous, vectorised scan as [`Self::prefilter`].
    pub(crate) fn prefilter_block(&self, rows: &[u32], cols: &[u32], out: &mut [u8]) {
        let gathered = self.gather(cols);
        for (&r, out) in rows.iter().zip(out.chunks_exact_mut(cols.len().max(1))) {
            gathered.scan(self.lane(r as usize), 0, out);
        }
    }

    /// The columns `first..first + row.len()` worth offering to request `i`
    /// (`row` holds its scores against them): distinct users who accept each
    /// other, scoring at least `min` and at least `i`'s threshold `ti` or the
    /// column's own `thresholds[b]`. Their positions in `row` go to the
    /// front of `hits` (as long as `row`); returns how many. The prefilter, the
    /// bounds and the scan for the few percent that pass in one pass: the
    /// prescoring's hot loop (n²/2 pairs a window).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn offers(
        &self,
        i: usize,
        first: usize,
        row: &[f32],
        thresholds: &[f32],
        ti: f32,
        min: f32,
        hits: &mut [u32],
    ) -> usize {
        let (me, b) = (self.lane(i), Bounds { ti, min, first });
        #[cfg(target_arch = "x86_64")]
        if let Some(found) = avx2::offers(self, me, row, thresholds, b, hits) {
            return found;
        }
        offers_in(self, me, row, thresholds, b, hits)
    }

    /// The lanes of requests `which[0]`, `which[1]`, … in that order.
    fn gather(&self, which: &[u32]) -> Lanes {
        let pick = |v: &[u32]| which.iter().map(|&i| v[i as usize]).collect();
        Lanes {
            gender_bit: pick(&self.gender_bit),
            wants: pick(&self.wants),
            age: pick(&self.age),
            min_age: pick(&self.min_age),
            age_span: pick(&self.age_span),
            user: pick(&self.user),
        }
    }

    /// Request `i`'s lanes.
    fn lane(&self, i: usize) -> Lane {
        Lane {
            gender_bit: self.gender_bit[i],
            wants: self.wants[i],
            age: self.age[i],
            min_age: self.min_age[i],
            age_span: self.age_span[i],
            user: self.user[i],
        }
    }

    /// Whether `me` and each of the requests `first..first + out.len()` are
    /// distinct users who accept each other: 1 or 0 per column.
    fn scan(&self, me: Lane, first: usize, out: &mut [u8]) {
        let end = first + out.len();
        let (g, w) = (&self.gender_bit[first..end], &self.wants[first..end]);
        let (a, lo, span) = (
            &self.age[first..end],
            &self.min_age[first..end],
            &self.age_span[first..end],
        );
        let u = &self.user[first..end];
        for b in 0..out.len() {
            out[b] = u8::from(me.mutual(Lane {
                gender_bit: g[b],
                wants: w[b],
                age: a[b],
                min_age: lo[b],
                age_span: span[b],
                user: u[b],
            }));
        }
    }
}

/// The score bounds and the first column of [`Lanes::offers`].
#[derive(Debug, Clone, Copy)]
struct Bounds {
    ti: f32,
    min: f32,
    first: usize,
}

/// Columns [`offers_in`] decides at a time: one bit each in a `u16`.
const OFFER_CHUNK: usize = 16;

/// [`Lanes::offers`]. Plain Rust on fixed-size chunks that LLVM turns into
/// vector compares and a mask; `#[inline(always)]` so that [`avx2`]
/// compiles it with wider vectors.
#[inline(always)]
fn offers_in(
    lanes: &Lanes,
    me: Lane,
    row: &[f32],
    thresholds: &[f32],
    b: Bounds,
    hits: &mut [u32],
) -> usize {
    let n = row.len();
    let cols = b.first..b.first + n;
    let (thresholds, g, w) = (
        &thresholds[..n],
        &lanes.gender_bit[cols.clone()],
        &lanes.wants[cols.clone()],
    );
    let (a, lo, span, u) = (
        &lanes.age[cols.clone()],
        &lanes.min_age[cols.clone()],
        &lanes.age_span[cols.clone()],
        &lanes.user[cols],
    );
    let passes = |s: f32, t: f32, g: u32, w: u32, a: u32, lo: u32, span: u32, u: u32| {
        let other = Lane {
            gender_bit: g,
            wants: w,
            age: a,
            min_age: lo,
            age_span: span,
            user: u,
        };
        me.mutual(other) & (s >= b.min) & ((s >= b.ti) | (s >= t))
    };
    let mut found = 0;
    let whole = n - n % OFFER_CHUNK;
    for c in (0..whole).step_by(OFFER_CHUNK) {
        let chunk = |v: &[u32]| -> [u32; OFFER_CHUNK] {
            v[c..c + OFFER_CHUNK].try_into().expect("a whole chunk")
        };
        let s: [f32; OFFER_CHUNK] = row[c..c + OFFER_CHUNK].try_into().expect("a whole chunk");
        let t: [f32; OFFER_CHUNK] = thresholds[c..c + OFFER_CHUNK]
            .try_into()
            .expect("a whole chunk");
        let (g, w, a, lo, span, u) = (
            chunk(g),
            chunk(w),
            chunk(a),
            chunk(lo),
            chunk(span),
            chunk(u),
        );
        let mut bits = 0u16;
        for k in 0..OFFER_CHUNK {
            bits |= u16::from(passes(s[k], t[k], g[k], w[k], a[k], lo[k], span[k], u[k])) << k;
        }
        while bits != 0 {
            hits[found] = (c + bits.trailing_zeros() as usize) as u32;
            found += 1;
            bits &= bits - 1;
        }
    }
    for c in whole..n {
        if passes(
            row[c],
            thresholds[c],
            g[c],
            w[c],
            a[c],
            lo[c],
            span[c],
            u[c],
        ) {
            hits[found] = c as u32;
            found += 1;
        }
    }
    found
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{offers_in, Bounds, Lane, Lanes};

    /// [`offers_in`] compiled with AVX2: eight lanes per compare.
    #[target_feature(enable = "avx2")]
    fn offers_avx2(
        lanes: &Lanes,
        me: Lane,
        row: &[f32],
        thresholds: &[f32],
        b: Bounds,
        hits: &mut [u32],
    ) -> usize {
        offers_in(lanes, me, row, thresholds, b, hits)
    }

    /// [`offers_avx2`] where the CPU has AVX2; None elsewhere.
    #[allow(unsafe_code)]
    pub(super) fn offers(
        lanes: &Lanes,
        me: Lane,
        row: &[f32],
        thresholds: &[f32],
        b: Bounds,
        hits: &mut [u32],
    ) -> Option<usize> {
        // SAFETY: `offers_avx2` only requires the avx2 target feature,
        // detected on this CPU first.
        std::is_x86_feature_detected!("avx2")
            .then(|| unsafe { offers_avx2(lanes, me, row, thresholds, b, hits) })
    }
}

/// What a group of requests accepts and offers, as one envelope: a request
/// that one of them accepts, and that accepts it back, is inside it.
#[derive(Debug, Clone, Copy)]
struct Reach {
    /// Genders any of them accepts; their genders.
    wants: u32,
    genders: u32,
    /// The ages any of them accepts, and their own ages (inclusive).
    accepted: (u32, u32),
    ages: (u32, u32),
}

impl Reach {
    fn of(lanes: &Lanes, rows: &[u32]) -> Option<Self> {
        let mut rows = rows.iter().map(|&r| lanes.lane(r as usize));
        let first = rows.next()?;
        let one = |l: Lane| Reach {
            wants: l.wants,
            genders: l.gender_bit,
            accepted: (l.min_age, l.min_age + l.age_span),
            ages: (l.age, l.age),
        };
        Some(rows.fold(one(first), |r, l| {
            let o = one(l);
            Reach {
                wants: r.wants | o.wants,
                genders: r.genders | o.genders,
                accepted: (
                    r.accepted.0.min(o.accepted.0),
                    r.accepted.1.max(o.accepted.1),
                ),
                ages: (r.ages.0.min(o.ages.0), r.ages.1.max(o.ages.1)),
            }
        }))
    }

    /// Whether `o` may be mutual with one of the group: [`Lane::mutual`]
    /// against the envelope, so never false where that is true for a member.
    fn touches(self, o: Lane) -> bool {
        (self.wants & o.gender_bit != 0)
            && (o.wants & self.genders != 0)
            && (self.accepted.0..=self.accepted.1).contains(&o.age)
            && o.min_age <= self.ages.1
            && o.min_age + o.age_span >= self.ages.0
    }
}

/// One request's lanes (see [`Lanes`]).
#[derive(Debug, Clone, Copy)]
struct Lane {
    gender_bit: u32,
    wants: u32,
    age: u32,
    min_age: u32,
    age_span: u32,
    user: u32,
}

impl Lane {
    /// Distinct users, each accepting the other: branch-free, so the scans
    /// that call it per column vectorise.
    #[inline(always)]
    fn mutual(self, o: Lane) -> bool {
        (self.wants & o.gender_bit != 0)
            & (o.wants & self.gender_bit != 0)
            & (o.age.wrapping_sub(self.min_age) <= self.age_span)
            & (self.age.wrapping_sub(o.min_age) <= o.age_span)
            & (o.user != self.user)
    }
}

/// Where a window's scores come from.
#[derive(Debug, Clone)]
pub enum Scores<'a> {
    /// Cosine (or its negation) over L2-normalised vectors, batch GEMM.
    Builtin {
        vectors: FeatureMatrix,
        scorer: BuiltinScorer,
    },
    /// An external scorer's `n × n` row-major matrix. A pair scores the mean
    /// of its two entries, so an asymmetric answer still gives one score.
    External { n: usize, scores: &'a [f32] },
}

impl<'a> Scores<'a> {
    /// Builtin scores of `vectors` (rows of the window, in order).
    pub fn builtin(mut vectors: FeatureMatrix, scorer: BuiltinScorer) -> Self {
        vectors.normalize_rows();
        Scores::Builtin { vectors, scorer }
    }

    /// `None` unless `scores` holds `n × n` values.
    pub fn external(n: usize, scores: &'a [f32]) -> Option<Self> {
        (n.checked_mul(n) == Some(scores.len())).then_some(Scores::External { n, scores })
    }

    fn fill(&self, rows: &[u32], cols: &[u32], out: &mut [f32]) {
        match self {
            Scores::Builtin { vectors, scorer } => {
                let gather = |idx: &[u32]| {
                    let mut data = Vec::with_capacity(idx.len() * vectors.dim());
                    for &i in idx {
                        data.extend_from_slice(vectors.row(i as usize));
                    }
                    FeatureMatrix::from_vec(data, vectors.dim())
                };
                let done = match (gather(rows), gather(cols)) {
                    (Ok(r), Ok(c)) => score_batch(&r, &c, out).is_ok(),
                    _ => false,
                };
                if !done {
                    // Unreachable with the shapes built here; refuse every pair
                    // rather than match on garbage.
                    out.fill(f32::NAN);
                } else {
                    builtin_scores(*scorer, out);
                }
            }
            Scores::External { n, scores } => {
                for (&i, out_row) in rows.iter().zip(out.chunks_exact_mut(cols.len().max(1))) {
                    for (&j, o) in cols.iter().zip(out_row) {
                        let (i, j) = (i as usize, j as usize);
                        *o = (scores[i * n + j] + scores[j * n + i]) * 0.5;
                    }
                }
            }
        }
    }
}

/// A window ready for the matchmaker: its filter and its scores.
/// Turns dot products of unit vectors into `scorer`'s scores, in place.
/// Clamped: rounding lets the cosine of equal unit vectors exceed 1, and so
/// its complement fall below a minScore of -1.
pub(crate) fn builtin_scores(scorer: BuiltinScorer, dots: &mut [f32]) {
    let sign = if scorer == BuiltinScorer::Complement {
        -1.0
    } else {
        1.0
    };
    dots.iter_mut().for_each(|s| *s = sign * s.clamp(-1.0, 1.0));
}

#[derive(Debug, Clone)]
pub struct WindowPairs<'a> {
    pub filter: WindowFilter,
    pub scores: Scores<'a>,
    pub len: usize,
}

impl PairSource for WindowPairs<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn scores(&self, rows: &[u32], cols: &[u32], out: &mut [f32]) {
        self.scores.fill(rows, cols, out)
    }

    fn allowed(&self, i: u32, j: u32) -> bool {
        self.filter.allowed(i, j)
    }

    fn prefilter(&self, i: u32, first: usize, out: &mut [u8]) {
        self.filter.prefilter(i, first, out)
    }

    fn prefilter_block(&self, rows: &[u32], cols: &[u32], out: &mut [u8]) {
        self.filter.prefilter_block(rows, cols, out)
    }

    fn kinship(&self, i: u32) -> u64 {
        self.filter.kinship(i)
    }

    fn reachable(&self, rows: &[u32], free: &[bool], out: &mut Vec<u32>) {
        self.filter.reachable(rows, free, out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::matching::cooldown::CooldownBook;
    use crate::matching::users::UserTable;
    use matchfleet_api::matching::{mutually_acceptable, Preferences, Profile};
    use proptest::prelude::*;

    /// The window's filter as the engine builds it, its users held in `users`.
    pub(crate) fn filter_with(
        reqs: &[&MatchRequest],
        book: &CooldownBook,
        users: &mut UserTable,
        start: i64,
    ) -> WindowFilter {
        let ids: Vec<UserId> = reqs.iter().map(|r| users.hold(&r.user)).collect();
        WindowFilter::new(reqs, &ids, book.blocked(&ids, start))
    }

    /// The filter of `reqs` with the index pairs `blocked` in cooldown.
    pub(crate) fn filter_blocked(
        reqs: &[&MatchRequest],
        blocked: FastSet<(u32, u32)>,
    ) -> WindowFilter {
        let mut users = UserTable::default();
        let ids: Vec<UserId> = reqs.iter().map(|r| users.hold(&r.user)).collect();
        WindowFilter::new(reqs, &ids, blocked)
    }

    /// The filter of a window without cooldowns.
    pub(crate) fn filter(reqs: &[&MatchRequest]) -> WindowFilter {
        filter_blocked(reqs, FastSet::default())
    }

    pub(crate) fn request(
        id: &str,
        user: &str,
        gender: &str,
        age: u8,
        wants: &[&str],
        min: u8,
        max: u8,
    ) -> MatchRequest {
        MatchRequest {
            request_id: id.into(),
            user: user.into(),
            segment: "s".into(),
            event_time: 0,
            vector: vec![1.0, 0.0],
            profile: Profile {
                gender: gender.into(),
                age,
            },
            wants: Preferences {
                genders: wants.iter().map(|g| g.to_string()).collect(),
                min_age: min,
                max_age: max,
            },
        }
    }

    fn arb_request() -> impl Strategy<Value = MatchRequest> {
        let gender = prop::sample::select(vec!["f", "m", "x", "y"]);
        (
            0u8..4,
            gender.clone(),
            18u8..30,
            prop::collection::vec(gender, 0..3),
            18u8..30,
            0u8..8,
        )
            .prop_map(|(u, g, age, wants, min, span)| {
                let user = format!("u{u}");
                let wants: Vec<&str> = wants.to_vec();
                request("r", &user, g, age, &wants, min, min.saturating_add(span))
            })
    }

    proptest! {
        #[test]
        fn compiled_filter_equals_mutually_acceptable(reqs in prop::collection::vec(arb_request(), 1..12)) {
            let refs: Vec<&MatchRequest> = reqs.iter().collect();
            let f = filter(&refs);
            for i in 0..reqs.len() {
                for j in 0..reqs.len() {
                    prop_assert_eq!(
                        f.allowed(i as u32, j as u32),
                        mutually_acceptable(&reqs[i], &reqs[j]),
                        "{:?} / {:?}", reqs[i], reqs[j]
                    );
                }
            }
        }
    }

    proptest! {
        #[test]
        fn prefilter_equals_allowed_without_cooldowns(reqs in prop::collection::vec(arb_request(), 1..12), first in 0usize..12) {
            let refs: Vec<&MatchRequest> = reqs.iter().collect();
            let f = filter(&refs);
            let first = first.min(reqs.len());
            for i in 0..reqs.len() {
                let mut out = vec![7u8; reqs.len() - first];
                f.prefilter(i as u32, first, &mut out);
                for (b, &o) in out.iter().enumerate() {
                    prop_assert_eq!(o == 1, f.allowed(i as u32, (first + b) as u32));
                    prop_assert!(o <= 1);
                }
            }
        }

        #[test]
        fn the_block_prefilter_equals_allowed_without_cooldowns(
            reqs in prop::collection::vec(arb_request(), 1..12),
            row_picks in prop::collection::vec(0usize..12, 0..6),
            col_picks in prop::collection::vec(0usize..12, 0..12),
        ) {
            let refs: Vec<&MatchRequest> = reqs.iter().collect();
            let f = filter(&refs);
            let pick = |p: &[usize]| -> Vec<u32> { p.iter().map(|&c| (c % reqs.len()) as u32).collect() };
            let (rows, cols) = (pick(&row_picks), pick(&col_picks));
            let mut out = vec![7u8; rows.len() * cols.len()];
            f.prefilter_block(&rows, &cols, &mut out);
            for (a, &i) in rows.iter().enumerate() {
                for (b, &j) in cols.iter().enumerate() {
                    let o = out[a * cols.len() + b];
                    prop_assert_eq!(o == 1, f.allowed(i, j));
                    prop_assert!(o <= 1);
                }
            }
        }
    }

    fn arb_score() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => -1.0f32..1.0,
            1 => prop::sample::select(vec![f32::NAN, f32::NEG_INFINITY, 0.25, -0.25]),
        ]
    }

    proptest! {
        #[test]
        fn offers_are_the_allowed_columns_within_the_bounds(
            reqs in prop::collection::vec(arb_request(), 1..48),
            scores in prop::collection::vec(arb_score(), 48),
            thresholds in prop::collection::vec(arb_score(), 48),
            ti in arb_score(),
            min in prop::sample::select(vec![f32::NEG_INFINITY, -0.5, 0.0, 0.25]),
        ) {
            let refs: Vec<&MatchRequest> = reqs.iter().collect();
            let f = filter(&refs);
            let lanes = f.lanes.as_ref().expect("four genders fit the lanes");
            let mut hits = vec![u32::MAX; reqs.len()];
            for i in 0..reqs.len() {
                let (row, th) = (&scores[..i], &thresholds[..i]);
                for first in [0, i / 3] {
                    let found = lanes.offers(i, first, &row[first..], &th[first..], ti, min, &mut hits);
                    let want: Vec<u32> = (first..i)
                        .filter(|&j| {
                            let s = row[j];
                            f.allowed(i as u32, j as u32) && s >= min && (s >= ti || s >= th[j])
                        })
                        .map(|j| (j - first) as u32)
                        .collect();
                    prop_assert_eq!(&hits[..found], &want[..]);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn reachable_columns_cover_every_allowed_partner_of_the_rows(
            reqs in prop::collection::vec(arb_request(), 1..14),
            row_picks in prop::collection::vec(0usize..14, 0..5),
            free in prop::collection::vec(any::<bool>(), 14),
        ) {
            let refs: Vec<&MatchRequest> = reqs.iter().collect();
            let f = filter(&refs);
            let rows: Vec<u32> = row_picks.iter().map(|&r| (r % reqs.len()) as u32).collect();
            let free = &free[..reqs.len()];
            let mut out = vec![99];
            f.reachable(&rows, free, &mut out);
            prop_assert!(out.windows(2).all(|w| w[0] < w[1]), "ascending, each once");
            prop_assert!(out.iter().all(|&x| free[x as usize]), "free only");
            for x in (0..reqs.len() as u32).filter(|&x| free[x as usize]) {
                if rows.iter().any(|&r| f.allowed(r, x)) {
                    prop_assert!(out.contains(&x), "{x} is allowed with a row but left out");
                }
            }
        }

        /// Refills score kinship groups against their reachable columns;
        /// the matching must stay the textbook greedy's. Few candidates per
        /// request, so most requests run out and are refilled.
        #[test]
        fn the_greedy_on_a_window_with_preferences_is_the_dense_greedy(
            reqs in prop::collection::vec(arb_request(), 2..60),
            angles in prop::collection::vec(0.0f32..6.3, 60),
            k in 1usize..4,
        ) {
            let mut reqs = reqs;
            for (i, (r, a)) in reqs.iter_mut().zip(&angles).enumerate() {
                r.user = format!("u{i}");
                r.vector = vec![a.cos(), a.sin()];
            }
            let refs: Vec<&MatchRequest> = reqs.iter().collect();
            let data: Vec<f32> = reqs.iter().flat_map(|r| r.vector.clone()).collect();
            let pairs = WindowPairs {
                filter: filter(&refs),
                scores: Scores::builtin(FeatureMatrix::from_vec(data, 2).unwrap(), BuiltinScorer::Cosine),
                len: reqs.len(),
            };
            let sparse = crate::matching::matchmaker::greedy(&pairs, -1.0, k);
            prop_assert_eq!(sparse, crate::matching::matchmaker::greedy_dense(&pairs, -1.0));
        }
    }

    #[test]
    fn reachable_columns_leave_out_who_nobody_in_the_rows_accepts() {
        let reqs = [
            request("r0", "a", "m", 30, &["f"], 25, 35),
            request("r1", "b", "m", 31, &["f"], 25, 35),
            request("r2", "c", "f", 30, &["m"], 25, 35),
            request("r3", "d", "f", 30, &["f"], 25, 35),
            request("r4", "e", "f", 40, &["m"], 25, 35),
            request("r5", "g", "f", 30, &["m"], 35, 45),
            request("r6", "h", "f", 28, &["m"], 18, 99),
        ];
        let refs: Vec<&MatchRequest> = reqs.iter().collect();
        let f = filter(&refs);
        assert_eq!(f.kinship(0), f.kinship(1));
        assert_ne!(f.kinship(0), f.kinship(2));
        let mut out = Vec::new();
        let mut free = [true; 7];
        f.reachable(&[0, 1], &free, &mut out);
        // The other man, a woman who wants women, one too old, one who
        // wants older men: out. A woman for either of them: in.
        assert_eq!(out, [2, 6]);
        free[6] = false;
        f.reachable(&[0, 1], &free, &mut out);
        assert_eq!(out, [2]);
    }

    #[test]
    fn many_genders_use_several_bitset_words() {
        let genders: Vec<String> = (0..130).map(|g| format!("g{g}")).collect();
        let mut reqs: Vec<MatchRequest> = genders
            .iter()
            .enumerate()
            .map(|(i, g)| request("r", &format!("u{i}"), g, 20, &[], 18, 99))
            .collect();
        reqs[0].wants.genders = vec!["g129".into()];
        reqs[129].wants.genders = vec!["g0".into(), "nobody".into()];
        let refs: Vec<&MatchRequest> = reqs.iter().collect();
        let f = filter(&refs);
        assert_eq!(f.words, 3);
        assert!(f.lanes.is_none(), "over 32 genders: no prefilter");
        let mut out = [0u8; 130];
        f.prefilter(0, 0, &mut out);
        assert!(out.iter().all(|&o| o == 1));
        for i in 0..130 {
            for j in 0..130 {
                assert_eq!(
                    f.allowed(i, j),
                    mutually_acceptable(&reqs[i as usize], &reqs[j as usize])
                );
            }
        }
        assert!(f.allowed(0, 129));
        assert!(!f.allowed(0, 1));
    }

    #[test]
    fn cooldown_blocks_pairs_by_user() {
        let reqs = [
            request("r1", "ann", "f", 20, &[], 18, 99),
            request("r2", "bob", "m", 20, &[], 18, 99),
            request("r3", "cat", "f", 20, &[], 18, 99),
        ];
        let refs: Vec<&MatchRequest> = reqs.iter().collect();
        let (mut book, mut users) = (CooldownBook::default(), UserTable::default());
        book.insert_names(&mut users, "bob", "ann", 2000);
        let f = filter_with(&refs, &book, &mut users, 1000);
        assert!(!f.allowed(0, 1) && !f.allowed(1, 0));
        let mut out = [0u8; 3];
        f.prefilter(0, 0, &mut out);
        assert_eq!(out, [0, 1, 1], "the prefilter leaves cooldowns to allowed");
        assert!(f.allowed(0, 2) && f.allowed(1, 2));
        let f = filter_with(&refs, &book, &mut users, 2000);
        assert!(f.allowed(0, 1), "the cooldown ended at the window start");
    }

    #[test]
    fn scores_are_cosine_complement_or_the_external_mean() {
        let v = FeatureMatrix::from_slice(&[3.0, 4.0, 1.0, 0.0, 0.0, 2.0], 2).unwrap();
        let mut out = vec![0.0; 2];
        Scores::builtin(v.clone(), BuiltinScorer::Cosine).fill(&[0], &[1, 2], &mut out);
        assert!(
            (out[0] - 0.6).abs() < 1e-6 && (out[1] - 0.8).abs() < 1e-6,
            "{out:?}"
        );
        Scores::builtin(v, BuiltinScorer::Complement).fill(&[0], &[1, 2], &mut out);
        assert!(
            (out[0] + 0.6).abs() < 1e-6 && (out[1] + 0.8).abs() < 1e-6,
            "{out:?}"
        );

        // Equal vectors: exactly 1 and -1, so a minScore of -1 admits the pair.
        let same = FeatureMatrix::from_slice(&[0.1; 64], 32).unwrap();
        let mut out = vec![0.0; 1];
        Scores::builtin(same.clone(), BuiltinScorer::Cosine).fill(&[0], &[1], &mut out);
        assert_eq!(out[0], 1.0);
        Scores::builtin(same, BuiltinScorer::Complement).fill(&[0], &[1], &mut out);
        assert_eq!(out[0], -1.0);

        let ext = [0.0, 0.2, 0.4, 0.0];
        assert!(Scores::external(3, &ext).is_none());
        let s = Scores::external(2, &ext).unwrap();
        let mut out = vec![0.0; 1];
        s.fill(&[1], &[0], &mut out);
        assert!((out[0] - 0.3).abs() < 1e-6);
    }
}
