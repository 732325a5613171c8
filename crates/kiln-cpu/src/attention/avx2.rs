//! AVX2 + FMA tile kernels (8 f32 lanes). Only called after `Isa::Avx2.is_available()`.
//!
//! * scores: a 6-row × 16-key register tile of `Q·Kᵀ` (12 accumulators), the packed `Kᵀ` row
//!   loaded once per `c` and each query element broadcast.
//! * accumulate: a 6-row × 16-column register tile of `O`, rescaled by `alpha` on load, then one
//!   FMA per (row, key, 8 columns) with `p_ij` broadcast and the V row streamed.
use super::{Tiles, BLOCK_K};

pub(crate) struct Avx2;

#[cfg(not(target_arch = "x86_64"))]
impl Tiles for Avx2 {
    fn scores(q_rows: &[&[f32]], kt: &[f32], d: usize, c: f32, s: &mut [f32]) {
        super::scalar::Scalar::scores(q_rows, kt, d, c, s)
    }
    fn softmax_step(s_row: &mut [f32], m: f32, l: f32) -> (f32, f32, f32) {
        super::scalar::Scalar::softmax_step(s_row, m, l)
    }
    fn accumulate(o: &mut [f32], alpha: &[f32], p: &[f32], v_rows: &[&[f32]], d: usize) {
        super::scalar::Scalar::accumulate(o, alpha, p, v_rows, d)
    }
}

#[cfg(target_arch = "x86_64")]
impl Tiles for Avx2 {
    fn scores(q_rows: &[&[f32]], kt: &[f32], d: usize, c: f32, s: &mut [f32]) {
        let rows = q_rows.len();
        assert!(kt.len() >= d * BLOCK_K && s.len() >= rows * BLOCK_K);
        assert!(q_rows.iter().all(|q| q.len() >= d));
        assert!(super::simd::Isa::Avx2.is_available());
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(6);
            let qs = &q_rows[r..r + n];
            let so = &mut s[r * BLOCK_K..];
            // SAFETY: AVX2+FMA are present (asserted); the tile reads `q[..d]`, `kt[..d·BLOCK_K]`
            // and writes `n` rows of `BLOCK_K` in `so`, all inside the asserted lengths.
            unsafe {
                match n {
                    6 => x86::scores_rows::<6>(qs, kt, d, c, so),
                    5 => x86::scores_rows::<5>(qs, kt, d, c, so),
                    4 => x86::scores_rows::<4>(qs, kt, d, c, so),
                    3 => x86::scores_rows::<3>(qs, kt, d, c, so),
                    2 => x86::scores_rows::<2>(qs, kt, d, c, so),
                    _ => x86::scores_rows::<1>(qs, kt, d, c, so),
                }
            }
            r += n;
        }
    }

    fn softmax_step(s_row: &mut [f32], m: f32, l: f32) -> (f32, f32, f32) {
        assert!(s_row.len() >= BLOCK_K);
        assert!(super::simd::Isa::Avx2.is_available());
        // SAFETY: AVX2+FMA are present; reads and writes `s_row[..BLOCK_K]`.
        let mb = unsafe { x86::row_max(s_row) };
        let m_new = m.max(mb);
        // m is −∞ only before the first visible key; then alpha multiplies zeros.
        let alpha = if m == f32::NEG_INFINITY {
            0.0
        } else {
            (m - m_new).exp2()
        };
        // SAFETY: as above.
        let sum = unsafe { x86::exp_sum_row(s_row, m_new) };
        (m_new, alpha * l + sum, alpha)
    }

    fn accumulate(o: &mut [f32], alpha: &[f32], p: &[f32], v_rows: &[&[f32]], d: usize) {
        let rows = alpha.len();
        assert!(o.len() >= rows * d && p.len() >= rows.saturating_sub(1) * BLOCK_K + v_rows.len());
        assert!(v_rows.len() <= BLOCK_K && v_rows.iter().all(|v| v.len() >= d));
        assert!(super::simd::Isa::Avx2.is_available());
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(6);
            // SAFETY: AVX2+FMA are present; the tile touches rows `r..r+n` of `o` (`[rows, d]`),
            // of `p` (stride BLOCK_K, `v_rows.len()` columns) and `v[..d]`, all asserted above.
            unsafe {
                match n {
                    6 => x86::acc_rows::<6>(o, alpha, p, v_rows, d, r),
                    5 => x86::acc_rows::<5>(o, alpha, p, v_rows, d, r),
                    4 => x86::acc_rows::<4>(o, alpha, p, v_rows, d, r),
                    3 => x86::acc_rows::<3>(o, alpha, p, v_rows, d, r),
                    2 => x86::acc_rows::<2>(o, alpha, p, v_rows, d, r),
                    _ => x86::acc_rows::<1>(o, alpha, p, v_rows, d, r),
                }
            }
            r += n;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BLOCK_K;
    use crate::attention::simd::x86::{exp2_ps, hmax_ps, hsum_ps};
    use std::arch::x86_64::*;

    /// `s[r][j] = c · Σ_c q_r[c]·kt[c][j]` for `R` rows and all `BLOCK_K` columns, 16 at a time.
    ///
    /// Safety: AVX2+FMA present; `q.len() == R`, `q[r].len() ≥ d`, `kt.len() ≥ d·BLOCK_K`,
    /// `s.len() ≥ R·BLOCK_K`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores_rows<const R: usize>(
        q: &[&[f32]],
        kt: &[f32],
        d: usize,
        c: f32,
        s: &mut [f32],
    ) {
        let mut qp = [std::ptr::null::<f32>(); R];
        for r in 0..R {
            qp[r] = q[r].as_ptr();
        }
        let cv = _mm256_set1_ps(c);
        for j0 in (0..BLOCK_K).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let mut kp = kt.as_ptr().add(j0);
            for cc in 0..d {
                let k0 = _mm256_loadu_ps(kp);
                let k1 = _mm256_loadu_ps(kp.add(8));
                for r in 0..R {
                    let qv = _mm256_broadcast_ss(&*qp[r].add(cc));
                    acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
                }
                kp = kp.add(BLOCK_K);
            }
            for r in 0..R {
                let sp = s.as_mut_ptr().add(r * BLOCK_K + j0);
                _mm256_storeu_ps(sp, _mm256_mul_ps(acc[r][0], cv));
                _mm256_storeu_ps(sp.add(8), _mm256_mul_ps(acc[r][1], cv));
            }
        }
    }

    /// Maximum of `s[..BLOCK_K]`. Safety: AVX2 present, `s.len() ≥ BLOCK_K`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_max(s: &[f32]) -> f32 {
        let p = s.as_ptr();
        let mut m = _mm256_loadu_ps(p);
        for j in (8..BLOCK_K).step_by(8) {
            m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(j)));
        }
        hmax_ps(m)
    }

    /// `s_j = 2^(s_j − m)` for `j < BLOCK_K`; returns `Σ_j s_j`. Safety: as [`row_max`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sum_row(s: &mut [f32], m: f32) -> f32 {
        let p = s.as_mut_ptr();
        let mv = _mm256_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        for j in (0..BLOCK_K).step_by(8) {
            let e = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(p.add(j)), mv));
            _mm256_storeu_ps(p.add(j), e);
            sum = _mm256_add_ps(sum, e);
        }
        hsum_ps(sum)
    }

    /// Rows `r0..r0+R` of `o = alpha·o + p·V` (`o` `[rows, d]`, `p` stride `BLOCK_K`), 16
    /// columns at a time, then 8, then a scalar tail.
    ///
    /// Safety: AVX2+FMA present; `o.len() ≥ (r0+R)·d`, `alpha.len() ≥ r0+R`,
    /// `p.len() ≥ (r0+R−1)·BLOCK_K + v.len()`, every `v[j].len() ≥ d`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn acc_rows<const R: usize>(
        o: &mut [f32],
        alpha: &[f32],
        p: &[f32],
        v: &[&[f32]],
        d: usize,
        r0: usize,
    ) {
        let op = o.as_mut_ptr().add(r0 * d);
        let pp = p.as_ptr().add(r0 * BLOCK_K);
        let mut c0 = 0;
        while c0 + 16 <= d {
            acc_tile::<R, 2>(op, alpha, pp, v, d, r0, c0);
            c0 += 16;
        }
        if c0 + 8 <= d {
            acc_tile::<R, 1>(op, alpha, pp, v, d, r0, c0);
            c0 += 8;
        }
        for c in c0..d {
            for r in 0..R {
                let x = op.add(r * d + c);
                let mut a = *x * alpha[r0 + r];
                for (j, vj) in v.iter().enumerate() {
                    a += *pp.add(r * BLOCK_K + j) * *vj.get_unchecked(c);
                }
                *x = a;
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn acc_tile<const R: usize, const NV: usize>(
        op: *mut f32,
        alpha: &[f32],
        pp: *const f32,
        v: &[&[f32]],
        d: usize,
        r0: usize,
        c0: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; R];
        for r in 0..R {
            let a = _mm256_set1_ps(alpha[r0 + r]);
            for (u, x) in acc[r].iter_mut().enumerate() {
                *x = _mm256_mul_ps(_mm256_loadu_ps(op.add(r * d + c0 + 8 * u)), a);
            }
        }
        for (j, vj) in v.iter().enumerate() {
            let vp = vj.as_ptr().add(c0);
            let mut vv = [_mm256_setzero_ps(); NV];
            for (u, x) in vv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(vp.add(8 * u));
            }
            for r in 0..R {
                let pb = _mm256_broadcast_ss(&*pp.add(r * BLOCK_K + j));
                for u in 0..NV {
                    acc[r][u] = _mm256_fmadd_ps(pb, vv[u], acc[r][u]);
                }
            }
        }
        for r in 0..R {
            for (u, x) in acc[r].iter().enumerate() {
                _mm256_storeu_ps(op.add(r * d + c0 + 8 * u), *x);
            }
        }
    }
}
