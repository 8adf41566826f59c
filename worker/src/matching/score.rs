//! Batch pair scores for a MatchPipeline window.
//!
//! A window holds `n` requests and `m` candidates, each a fixed-length f32
//! feature vector (`dim`, e.g. 32, fixed per pipeline). The built-in scorer is
//! the dot product of every request with every candidate (cosine similarity
//! when the rows were normalised first, see [`FeatureMatrix::normalize_rows`]),
//! i.e. the GEMM `out = R · Cᵀ` with `out` row-major `n × m`.
//!
//! [`score_batch`] computes it with a register-blocked micro-kernel: the
//! candidates are packed into panels of [`NR`] columns (`dim × NR`, so a panel
//! row is one contiguous vector load), requests into blocks of up to [`MR`]
//! rows, and each `MR × NR` tile of the output is accumulated over `dim` in
//! registers (6 × 16 f32 = 12 AVX2 registers of accumulators, the classic
//! BLIS shape for 16 ymm registers). The kernel is plain Rust on fixed-size
//! arrays that LLVM vectorises; on x86_64 with AVX2+FMA detected at run time
//! the same code is compiled inside a `#[target_feature]` function and uses
//! fused multiply-adds. [`score_naive`] is the pair-by-pair reference.

use thiserror::Error;

/// Rows of the output computed per micro-tile (requests).
pub const MR: usize = 6;
/// Columns of the output computed per micro-tile (candidates): two 8-lane
/// AVX2 vectors.
pub const NR: usize = 16;

/// Invalid input to the scorer: always reported, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ScoreError {
    #[error("feature dimension must be at least 1")]
    ZeroDim,
    #[error("{len} values is not a whole number of rows of dimension {dim}")]
    RaggedLength { len: usize, dim: usize },
    #[error("row {row}, feature {feature} is not finite")]
    NotFinite { row: usize, feature: usize },
    #[error("requests have dimension {requests}, candidates {candidates}")]
    DimMismatch { requests: usize, candidates: usize },
    #[error("output holds {got} scores, expected {rows} × {cols} = {expected}")]
    OutputLength {
        got: usize,
        rows: usize,
        cols: usize,
        expected: usize,
    },
}

/// A window's feature vectors: `rows × dim` f32, row-major, all finite.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMatrix {
    data: Vec<f32>,
    rows: usize,
    dim: usize,
}

impl FeatureMatrix {
    /// Copies `data` (row-major) into a matrix of `dim` columns.
    pub fn from_slice(data: &[f32], dim: usize) -> Result<Self, ScoreError> {
        Self::from_vec(data.to_vec(), dim)
    }

    /// Takes `data` (row-major) as a matrix of `dim` columns. NaN and ±inf are
    /// refused here so that one bad request cannot poison a whole window's
    /// scores (the caller dead-letters it with the row and feature).
    pub fn from_vec(data: Vec<f32>, dim: usize) -> Result<Self, ScoreError> {
        if dim == 0 {
            return Err(ScoreError::ZeroDim);
        }
        if !data.len().is_multiple_of(dim) {
            return Err(ScoreError::RaggedLength {
                len: data.len(),
                dim,
            });
        }
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(ScoreError::NotFinite {
                row: i / dim,
                feature: i % dim,
            });
        }
        let rows = data.len() / dim;
        Ok(Self { data, rows, dim })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// Row `i`; panics if `i >= rows()` like slice indexing.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Scales every row to unit L2 norm so that dot products are cosine
    /// similarities. An all-zero row stays zero (similarity 0 with anything)
    /// rather than becoming NaN.
    pub fn normalize_rows(&mut self) {
        self.data.chunks_exact_mut(self.dim).for_each(normalize_row);
    }
}

/// Scales `row` to unit L2 norm (a zero row stays zero): what
/// [`FeatureMatrix::normalize_rows`] does to each row.
pub(crate) fn normalize_row(row: &mut [f32]) {
    let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        let inv = 1.0 / norm;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

fn check(
    requests: &FeatureMatrix,
    candidates: &FeatureMatrix,
    out: &[f32],
) -> Result<(), ScoreError> {
    if requests.dim != candidates.dim {
        return Err(ScoreError::DimMismatch {
            requests: requests.dim,
            candidates: candidates.dim,
        });
    }
    let expected = requests.rows * candidates.rows;
    if out.len() != expected {
        return Err(ScoreError::OutputLength {
            got: out.len(),
            rows: requests.rows,
            cols: candidates.rows,
            expected,
        });
    }
    Ok(())
}

/// The pair-by-pair reference: for each request, for each candidate, one dot
/// product into `out[i * m + j]`.
pub fn score_naive(
    requests: &FeatureMatrix,
    candidates: &FeatureMatrix,
    out: &mut [f32],
) -> Result<(), ScoreError> {
    check(requests, candidates, out)?;
    let m = candidates.rows;
    if m == 0 {
        return Ok(());
    }
    for (r, out_row) in requests
        .data
        .chunks_exact(requests.dim)
        .zip(out.chunks_exact_mut(m))
    {
        for (c, o) in candidates.data.chunks_exact(candidates.dim).zip(out_row) {
            *o = r.iter().zip(c).map(|(x, y)| x * y).sum();
        }
    }
    Ok(())
}

/// Which kernel [`score_batch`] uses on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScorePath {
    /// x86_64 with AVX2 and FMA detected at run time.
    Avx2Fma,
    /// The same kernel compiled for the build's baseline target features.
    Portable,
}

impl std::fmt::Display for ScorePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScorePath::Avx2Fma => "AVX2+FMA",
            ScorePath::Portable => "portable",
        })
    }
}

/// The path [`score_batch`] takes here.
pub fn score_path() -> ScorePath {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        return ScorePath::Avx2Fma;
    }
    ScorePath::Portable
}

/// Dot-product scores of every request against every candidate into `out`
/// (`requests.rows() × candidates.rows()`, row-major), as a register-blocked
/// GEMM. Equal to [`score_naive`] up to float rounding (the sums are
/// associated differently, and fused on the AVX2+FMA path).
pub fn score_batch(
    requests: &FeatureMatrix,
    candidates: &FeatureMatrix,
    out: &mut [f32],
) -> Result<(), ScoreError> {
    score_batch_on(score_path(), requests, candidates, out)
}

/// [`score_batch`] on a chosen path; `Avx2Fma` falls back to portable where
/// the CPU lacks it, so every path is always safe to ask for.
pub(crate) fn score_batch_on(
    path: ScorePath,
    requests: &FeatureMatrix,
    candidates: &FeatureMatrix,
    out: &mut [f32],
) -> Result<(), ScoreError> {
    check(requests, candidates, out)?;
    if requests.rows == 0 || candidates.rows == 0 {
        return Ok(());
    }
    let packed = pack_candidates(candidates);
    match path {
        ScorePath::Avx2Fma => avx2::run(requests, &packed, candidates.rows, out),
        ScorePath::Portable => gemm::<false>(requests, &packed, candidates.rows, out),
    }
    Ok(())
}

/// Candidates kept packed as they arrive (the layout of
/// [`pack_candidates`]), so that scoring a few new rows against a growing set
/// does not copy and repack the whole set each time.
#[derive(Debug, Clone)]
pub(crate) struct PackedColumns {
    dim: usize,
    rows: usize,
    panels: Vec<f32>,
}

impl PackedColumns {
    pub(crate) fn new(dim: usize) -> Self {
        PackedColumns {
            dim: dim.max(1),
            rows: 0,
            panels: Vec::new(),
        }
    }

    /// Forgets every candidate (keeping the buffer).
    pub(crate) fn clear(&mut self) {
        self.rows = 0;
        self.panels.clear();
    }

    /// Appends a candidate of `dim` values (the caller checked them finite).
    pub(crate) fn push(&mut self, row: &[f32]) {
        let d = self.dim;
        let (panel, j) = (self.rows / NR, self.rows % NR);
        if j == 0 {
            self.panels.resize((panel + 1) * d * NR, 0.0);
        }
        let base = panel * d * NR;
        for (k, &v) in row.iter().take(d).enumerate() {
            self.panels[base + k * NR + j] = v;
        }
        self.rows += 1;
    }
}

/// [`score_batch`] against the first `m` of `columns` (`out`: `requests.rows()
/// × m`). Each score is computed exactly as `score_batch` computes it.
pub(crate) fn score_packed(
    requests: &FeatureMatrix,
    columns: &PackedColumns,
    m: usize,
    out: &mut [f32],
) -> Result<(), ScoreError> {
    if requests.dim != columns.dim {
        return Err(ScoreError::DimMismatch {
            requests: requests.dim,
            candidates: columns.dim,
        });
    }
    let m = m.min(columns.rows);
    let expected = requests.rows * m;
    if out.len() != expected {
        return Err(ScoreError::OutputLength {
            got: out.len(),
            rows: requests.rows,
            cols: m,
            expected,
        });
    }
    if requests.rows == 0 || m == 0 {
        return Ok(());
    }
    // Panels past the first `m` columns are left out; the last one kept may
    // hold later columns, which are computed and not written.
    let packed = &columns.panels[..m.div_ceil(NR) * columns.dim * NR];
    match score_path() {
        ScorePath::Avx2Fma => avx2::run(requests, packed, m, out),
        ScorePath::Portable => gemm::<false>(requests, packed, m, out),
    }
    Ok(())
}

/// Candidates as panels of `NR` columns: panel `p` holds, for each feature
/// `k`, the `NR` values `c[p*NR + j][k]` contiguously; missing columns of the
/// last panel are zero (their scores are computed and discarded).
fn pack_candidates(c: &FeatureMatrix) -> Vec<f32> {
    let d = c.dim;
    let mut packed = vec![0.0; c.rows.div_ceil(NR) * d * NR];
    for (panel, cols) in packed.chunks_exact_mut(d * NR).zip(c.data.chunks(d * NR)) {
        for (j, col) in cols.chunks_exact(d).enumerate() {
            for (k, &v) in col.iter().enumerate() {
                panel[k * NR + j] = v;
            }
        }
    }
    packed
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::FeatureMatrix;

    /// The generic kernel compiled with AVX2+FMA enabled: everything below
    /// is `#[inline(always)]`, so it is generated with these features.
    #[target_feature(enable = "avx2,fma")]
    fn gemm_avx2(a: &FeatureMatrix, packed: &[f32], m: usize, out: &mut [f32]) {
        super::gemm::<true>(a, packed, m, out)
    }

    /// Calls the target-feature function where the CPU has what it needs.
    #[allow(unsafe_code)]
    pub(super) fn run(a: &FeatureMatrix, packed: &[f32], m: usize, out: &mut [f32]) {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: `gemm_avx2` only requires the avx2 and fma target
            // features, and both were detected on this CPU just above.
            unsafe { gemm_avx2(a, packed, m, out) }
        } else {
            super::gemm::<false>(a, packed, m, out)
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    use super::FeatureMatrix;

    pub(super) fn run(a: &FeatureMatrix, packed: &[f32], m: usize, out: &mut [f32]) {
        super::gemm::<false>(a, packed, m, out)
    }
}

/// Requests in blocks of `MR` rows (a last, shorter block gets its own
/// monomorphised kernel), each block against every candidate panel. The
/// packed candidates (`m × d` f32: 300 KB for 2,400 × 32) stay in L2 while
/// the request block lives in L1; the output is written once, row-contiguous.
#[inline(always)]
fn gemm<const FMA: bool>(a: &FeatureMatrix, packed: &[f32], m: usize, out: &mut [f32]) {
    let d = a.dim;
    let mut apack = vec![0.0f32; d * MR];
    for (rows, out_rows) in a.data.chunks(d * MR).zip(out.chunks_mut(MR * m)) {
        match rows.len() / d {
            6 => block::<6, FMA>(rows, d, packed, m, out_rows, &mut apack),
            5 => block::<5, FMA>(rows, d, packed, m, out_rows, &mut apack),
            4 => block::<4, FMA>(rows, d, packed, m, out_rows, &mut apack),
            3 => block::<3, FMA>(rows, d, packed, m, out_rows, &mut apack),
            2 => block::<2, FMA>(rows, d, packed, m, out_rows, &mut apack),
            _ => block::<1, FMA>(rows, d, packed, m, out_rows, &mut apack),
        }
    }
}

/// `R` request rows against all panels. The rows are interleaved first
/// (`apack[k*R + r]`) so the kernel walks both operands with `chunks_exact`
/// and no bounds checks.
#[inline(always)]
fn block<const R: usize, const FMA: bool>(
    rows: &[f32],
    d: usize,
    packed: &[f32],
    m: usize,
    out_rows: &mut [f32],
    apack: &mut [f32],
) {
    let apack = &mut apack[..d * R];
    for (r, row) in rows.chunks_exact(d).enumerate() {
        for (k, &v) in row.iter().enumerate() {
            apack[k * R + r] = v;
        }
    }
    for (p, panel) in packed.chunks_exact(d * NR).enumerate() {
        let acc = tile::<R, FMA>(apack, panel);
        let c0 = p * NR;
        let w = (m - c0).min(NR);
        for (r, acc_row) in acc.iter().enumerate() {
            let dst = &mut out_rows[r * m + c0..r * m + c0 + w];
            // Whole panels as a fixed-size store, not a memcpy call each.
            match <&mut [f32; NR]>::try_from(&mut *dst) {
                Ok(whole) => *whole = *acc_row,
                Err(_) => dst.copy_from_slice(&acc_row[..w]),
            }
        }
    }
}

/// The micro-kernel: an `R × NR` tile accumulated over the feature axis,
/// entirely in registers for `R ≤ 6`.
#[inline(always)]
fn tile<const R: usize, const FMA: bool>(apack: &[f32], panel: &[f32]) -> [[f32; NR]; R] {
    let mut acc = [[0.0f32; NR]; R];
    for (a, b) in apack.chunks_exact(R).zip(panel.chunks_exact(NR)) {
        for (acc_row, &x) in acc.iter_mut().zip(a) {
            for (s, &y) in acc_row.iter_mut().zip(b) {
                *s = if FMA { x.mul_add(y, *s) } else { *s + x * y };
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic values in [-1, 1) without a dependency.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Batch equals naive within float rounding: the error of a sum of `d`
    /// products is bounded by about `d · ε · Σ|a_k b_k|`.
    fn assert_close(r: &FeatureMatrix, c: &FeatureMatrix, got: &[f32], want: &[f32]) {
        let m = c.rows();
        let tol = 4.0 * (r.dim() as f32) * f32::EPSILON;
        for (idx, (g, w)) in got.iter().zip(want).enumerate() {
            let (i, j) = (idx / m, idx % m);
            let mag: f32 = r
                .row(i)
                .iter()
                .zip(c.row(j))
                .map(|(x, y)| (x * y).abs())
                .sum();
            assert!(
                (g - w).abs() <= tol * mag + f32::MIN_POSITIVE,
                "({i}, {j}) of {}x{}x{}: batch {g}, naive {w}",
                r.rows(),
                m,
                r.dim()
            );
        }
    }

    fn check_shape(n: usize, m: usize, d: usize, seed: u64) {
        let r = FeatureMatrix::from_vec(values(n * d, seed), d).unwrap();
        let c = FeatureMatrix::from_vec(values(m * d, seed + 1), d).unwrap();
        let mut want = vec![f32::NAN; n * m];
        score_naive(&r, &c, &mut want).unwrap();
        for path in [ScorePath::Portable, ScorePath::Avx2Fma] {
            let mut got = vec![f32::NAN; n * m];
            score_batch_on(path, &r, &c, &mut got).unwrap();
            assert_close(&r, &c, &got, &want);
        }
        let mut got = vec![f32::NAN; n * m];
        score_batch(&r, &c, &mut got).unwrap();
        assert_close(&r, &c, &got, &want);
    }

    #[test]
    fn batch_matches_naive_on_edge_shapes() {
        let rows = [0, 1, 2, MR - 1, MR, MR + 1, 2 * MR + 3, 50];
        let cols = [0, 1, NR - 1, NR, NR + 1, 2 * NR + 5, 70];
        for d in [1, 2, 8, 31, 32, 33] {
            for &n in &rows {
                for &m in &cols {
                    check_shape(n, m, d, (n * 1000 + m * 10 + d) as u64);
                }
            }
        }
    }

    #[test]
    fn packed_columns_score_bit_for_bit_like_a_batch() {
        let d = 32;
        let c = FeatureMatrix::from_vec(values(53 * d, 11), d).unwrap();
        let r = FeatureMatrix::from_vec(values(7 * d, 12), d).unwrap();
        let mut packed = PackedColumns::new(d);
        for j in 0..c.rows() {
            packed.push(c.row(j));
        }
        for m in [0, 1, NR - 1, NR, NR + 1, 40, 53] {
            let first = FeatureMatrix::from_slice(&c.as_slice()[..m * d], d).unwrap();
            let mut want = vec![f32::NAN; r.rows() * m];
            score_batch(&r, &first, &mut want).unwrap();
            let mut got = vec![f32::NAN; r.rows() * m];
            score_packed(&r, &packed, m, &mut got).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "first {m} columns");
        }
        // Transposed: the same pair scores the same either way round.
        let mut ab = vec![0.0; r.rows() * c.rows()];
        score_batch(&r, &c, &mut ab).unwrap();
        let mut ba = vec![0.0; c.rows() * r.rows()];
        score_batch(&c, &r, &mut ba).unwrap();
        for i in 0..r.rows() {
            for j in 0..c.rows() {
                assert_eq!(
                    ab[i * c.rows() + j].to_bits(),
                    ba[j * r.rows() + i].to_bits()
                );
            }
        }
    }

    #[test]
    fn batch_matches_naive_on_a_window() {
        check_shape(97, 301, 32, 7);
    }

    #[test]
    fn normalized_rows_give_cosine() {
        let mut r = FeatureMatrix::from_slice(&[3.0, 4.0, 0.0, 0.0, 1.0, 0.0], 2).unwrap();
        r.normalize_rows();
        assert_eq!(r.as_slice(), &[0.6, 0.8, 0.0, 0.0, 1.0, 0.0]);
        let mut out = vec![0.0; 9];
        score_batch(&r, &r, &mut out).unwrap();
        assert!((out[0] - 1.0).abs() < 1e-6);
        assert_eq!(out[4], 0.0, "a zero row scores 0, not NaN");
        assert!((out[2] - 0.6).abs() < 1e-6, "(0.6, 0.8) · (1, 0)");
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert_eq!(
            FeatureMatrix::from_slice(&[1.0], 0),
            Err(ScoreError::ZeroDim)
        );
        assert_eq!(
            FeatureMatrix::from_slice(&[1.0; 5], 2),
            Err(ScoreError::RaggedLength { len: 5, dim: 2 })
        );
        assert_eq!(
            FeatureMatrix::from_slice(&[1.0, 2.0, 3.0, f32::NAN], 2),
            Err(ScoreError::NotFinite { row: 1, feature: 1 })
        );
        assert_eq!(
            FeatureMatrix::from_slice(&[f32::INFINITY], 1),
            Err(ScoreError::NotFinite { row: 0, feature: 0 })
        );
        let empty = FeatureMatrix::from_slice(&[], 4).unwrap();
        assert_eq!(empty.rows(), 0);

        let r = FeatureMatrix::from_slice(&[1.0; 6], 3).unwrap();
        let c = FeatureMatrix::from_slice(&[1.0; 6], 2).unwrap();
        let mut out = vec![0.0; 6];
        let dims = ScoreError::DimMismatch {
            requests: 3,
            candidates: 2,
        };
        assert_eq!(score_batch(&r, &c, &mut out), Err(dims.clone()));
        assert_eq!(score_naive(&r, &c, &mut out), Err(dims));

        let c = FeatureMatrix::from_slice(&[1.0; 9], 3).unwrap();
        let mut out = vec![0.0; 5];
        let len = ScoreError::OutputLength {
            got: 5,
            rows: 2,
            cols: 3,
            expected: 6,
        };
        assert_eq!(score_batch(&r, &c, &mut out), Err(len.clone()));
        assert_eq!(score_naive(&r, &c, &mut out), Err(len.clone()));
        assert_eq!(len.to_string(), "output holds 5 scores, expected 2 × 3 = 6");
    }

    proptest! {
        #[test]
        fn batch_matches_naive_on_random_inputs(
            (n, m, d, r, c) in (0usize..20, 0usize..40, 1usize..40).prop_flat_map(|(n, m, d)| (
                Just(n),
                Just(m),
                Just(d),
                proptest::collection::vec(-100.0f32..100.0, n * d),
                proptest::collection::vec(-100.0f32..100.0, m * d),
            ))
        ) {
            let r = FeatureMatrix::from_vec(r, d).unwrap();
            let c = FeatureMatrix::from_vec(c, d).unwrap();
            let mut want = vec![0.0; n * m];
            score_naive(&r, &c, &mut want).unwrap();
            for path in [ScorePath::Portable, ScorePath::Avx2Fma] {
                let mut got = vec![0.0; n * m];
                score_batch_on(path, &r, &c, &mut got).unwrap();
                assert_close(&r, &c, &got, &want);
            }
        }
    }
}
