//! AVX2 + FMA tile kernels (8 f32 lanes). Only called after `Isa::Avx2.is_available()`.
//!
//! * scores: a 6-key × 16-query register tile of `Sᵀ = K·(c·Q)ᵀ` (12 accumulators): per `c`,
//!   two loads of the packed `Qᵀ` row and one broadcast of each key element.
//! * scores_dot (one or two queries, decode): dot products of streamed K rows, four keys at once.
//! * softmax: key-major, vertical over 8 queries at a time (max, `2^x`, sum need no shuffles);
//!   query-major, along each query's row of keys.
//! * accumulate: a 6-query × 16-column register tile of `O`, rescaled by `alpha` on load, then
//!   one FMA per (query, key, 8 columns) with `p_ji` broadcast and the V row streamed.
use super::simd::Isa;
use super::{Tiles, BLOCK_K, BLOCK_Q};

pub(crate) struct Avx2;

#[cfg(not(target_arch = "x86_64"))]
impl Tiles for Avx2 {
    fn scores(qt: &[f32], k_rows: &[&[f32]], d: usize, ncols: usize, st: &mut [f32]) {
        super::scalar::Scalar::scores(qt, k_rows, d, ncols, st)
    }
    fn scores_dot(qs: &[f32], rows: usize, k_rows: &[&[f32]], d: usize, st: &mut [f32]) {
        super::scalar::Scalar::scores_dot(qs, rows, k_rows, d, st)
    }
    fn softmax(
        st: &mut [f32],
        sj: usize,
        si: usize,
        nk: usize,
        ncols: usize,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
    ) {
        super::scalar::Scalar::softmax(st, sj, si, nk, ncols, m, l, alpha)
    }
    fn accumulate(
        o: &mut [f32],
        alpha: &[f32],
        p: &[f32],
        sj: usize,
        si: usize,
        v_rows: &[&[f32]],
        d: usize,
    ) {
        super::scalar::Scalar::accumulate(o, alpha, p, sj, si, v_rows, d)
    }
}

#[cfg(target_arch = "x86_64")]
impl Tiles for Avx2 {
    fn scores(qt: &[f32], k_rows: &[&[f32]], d: usize, ncols: usize, st: &mut [f32]) {
        let nk = k_rows.len();
        assert!(Isa::Avx2.is_available());
        assert!(ncols.is_multiple_of(8) && ncols <= BLOCK_Q && nk <= BLOCK_K);
        assert!(qt.len() >= d * BLOCK_Q && st.len() >= BLOCK_K * BLOCK_Q);
        assert!(k_rows.iter().all(|k| k.len() >= d));
        let mut i0 = 0;
        while i0 < ncols {
            let wide = ncols - i0 >= 16;
            let mut j = 0;
            while j < nk {
                let n = (nk - j).min(6);
                let ks = &k_rows[j..j + n];
                // SAFETY: AVX2+FMA present (asserted); reads `qt[c·BLOCK_Q + i0 ..+16]` for
                // `c < d` and `ks[r][..d]`, writes `st[(j+r)·BLOCK_Q + i0 ..+16]`: all inside the
                // lengths asserted above.
                unsafe {
                    macro_rules! go {
                        ($r:literal) => {
                            if wide {
                                x86::scores_tile::<$r, 2>(qt, ks, d, i0, j, st)
                            } else {
                                x86::scores_tile::<$r, 1>(qt, ks, d, i0, j, st)
                            }
                        };
                    }
                    match n {
                        6 => go!(6),
                        5 => go!(5),
                        4 => go!(4),
                        3 => go!(3),
                        2 => go!(2),
                        _ => go!(1),
                    }
                }
                j += n;
            }
            i0 += if wide { 16 } else { 8 };
        }
    }

    fn scores_dot(qs: &[f32], rows: usize, k_rows: &[&[f32]], d: usize, st: &mut [f32]) {
        assert!(Isa::Avx2.is_available());
        assert!(rows <= 2 && k_rows.len() <= BLOCK_K && qs.len() >= rows * d);
        assert!(st.len() >= BLOCK_Q * BLOCK_K && k_rows.iter().all(|k| k.len() >= d));
        for i in 0..rows {
            // SAFETY: AVX2+FMA present; reads `qs[i·d..][..d]` and `k_rows[j][..d]`, writes
            // `st[i·BLOCK_K + j]` for `j < k_rows.len() ≤ BLOCK_K`, inside asserted lengths.
            unsafe { x86::dots(&qs[i * d..(i + 1) * d], k_rows, &mut st[i * BLOCK_K..]) }
        }
    }

    fn softmax(
        st: &mut [f32],
        sj: usize,
        si: usize,
        nk: usize,
        ncols: usize,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
    ) {
        assert!(Isa::Avx2.is_available());
        assert!(m.len() >= ncols && l.len() >= ncols && alpha.len() >= ncols);
        if si == 1 && sj == BLOCK_Q && ncols.is_multiple_of(8) {
            assert!(ncols <= BLOCK_Q && nk <= BLOCK_K && st.len() >= BLOCK_K * BLOCK_Q);
            for i0 in (0..ncols).step_by(8) {
                // SAFETY: AVX2+FMA present; touches `st[j·BLOCK_Q + i0 ..+8]` for `j < nk` and
                // `m, l, alpha[i0..i0+8]`, all inside the asserted lengths.
                unsafe { x86::softmax_cols(st, nk, i0, m, l, alpha) }
            }
        } else if sj == 1 && si == BLOCK_K {
            assert!(ncols <= BLOCK_Q && nk <= BLOCK_K && st.len() >= BLOCK_K * BLOCK_Q);
            for i in 0..ncols {
                let row = &mut st[i * BLOCK_K..(i + 1) * BLOCK_K];
                // Pad the row to a multiple of 8 keys with −∞ (gives p = 0, read by nobody).
                let n8 = nk.div_ceil(8) * 8;
                row[nk..n8].fill(f32::NEG_INFINITY);
                // SAFETY: AVX2+FMA present; reads and writes `row[..n8]`, `n8 ≤ BLOCK_K`.
                let mb = unsafe { x86::row_max(&row[..n8]) };
                let m_new = m[i].max(mb);
                let ms = if m_new == f32::NEG_INFINITY {
                    0.0
                } else {
                    m_new
                };
                let a = (m[i] - ms).exp2();
                // SAFETY: as above.
                let sum = unsafe { x86::exp_sum_row(&mut row[..n8], ms) };
                m[i] = m_new;
                l[i] = a * l[i] + sum;
                alpha[i] = a;
            }
        } else {
            super::scalar::Scalar::softmax(st, sj, si, nk, ncols, m, l, alpha)
        }
    }

    fn accumulate(
        o: &mut [f32],
        alpha: &[f32],
        p: &[f32],
        sj: usize,
        si: usize,
        v_rows: &[&[f32]],
        d: usize,
    ) {
        let rows = alpha.len();
        let nk = v_rows.len();
        assert!(Isa::Avx2.is_available());
        assert!(o.len() >= rows * d && v_rows.iter().all(|v| v.len() >= d));
        assert!(rows == 0 || nk == 0 || p.len() > (nk - 1) * sj + (rows - 1) * si);
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(6);
            // SAFETY: AVX2+FMA present; the tile touches rows `r..r+n` of `o` (`[rows, d]`),
            // `p[j·sj + i·si]` for `j < nk`, `i < rows`, and `v[j][..d]`: asserted above.
            unsafe {
                match n {
                    6 => x86::acc_rows::<6>(o, alpha, p, sj, si, v_rows, d, r),
                    5 => x86::acc_rows::<5>(o, alpha, p, sj, si, v_rows, d, r),
                    4 => x86::acc_rows::<4>(o, alpha, p, sj, si, v_rows, d, r),
                    3 => x86::acc_rows::<3>(o, alpha, p, sj, si, v_rows, d, r),
                    2 => x86::acc_rows::<2>(o, alpha, p, sj, si, v_rows, d, r),
                    _ => x86::acc_rows::<1>(o, alpha, p, sj, si, v_rows, d, r),
                }
            }
            r += n;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register tiles read best as acc[r][u]
mod x86 {
    use super::BLOCK_Q;
    use crate::attention::simd::x86::{exp2_ps, hmax_ps, hsum_ps};
    use std::arch::x86_64::*;

    /// `st[(j0+r)·BLOCK_Q + i0 + 8u + x] = Σ_c k[r][c]·qt[c·BLOCK_Q + i0 + 8u + x]` for `r < R`,
    /// `u < NV`, `x < 8`.
    ///
    /// Safety: AVX2+FMA present; `k.len() == R`, `k[r].len() ≥ d`,
    /// `qt.len() ≥ (d−1)·BLOCK_Q + i0 + 8·NV`, `st.len() ≥ (j0+R−1)·BLOCK_Q + i0 + 8·NV`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores_tile<const R: usize, const NV: usize>(
        qt: &[f32],
        k: &[&[f32]],
        d: usize,
        i0: usize,
        j0: usize,
        st: &mut [f32],
    ) {
        let mut kp = [std::ptr::null::<f32>(); R];
        for r in 0..R {
            kp[r] = k[r].as_ptr();
        }
        let mut acc = [[_mm256_setzero_ps(); NV]; R];
        let mut qp = qt.as_ptr().add(i0);
        for cc in 0..d {
            let mut qv = [_mm256_setzero_ps(); NV];
            for (u, x) in qv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(qp.add(8 * u));
            }
            for r in 0..R {
                let kb = _mm256_broadcast_ss(&*kp[r].add(cc));
                for u in 0..NV {
                    acc[r][u] = _mm256_fmadd_ps(kb, qv[u], acc[r][u]);
                }
            }
            qp = qp.add(BLOCK_Q);
        }
        for r in 0..R {
            let sp = st.as_mut_ptr().add((j0 + r) * BLOCK_Q + i0);
            for u in 0..NV {
                _mm256_storeu_ps(sp.add(8 * u), acc[r][u]);
            }
        }
    }

    /// `out[j] = q·k[j]` for every `j`, four keys at a time (8-lane partial sums, fixed order).
    ///
    /// Safety: AVX2+FMA present; `k[j].len() ≥ q.len()`, `out.len() ≥ k.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots(q: &[f32], k: &[&[f32]], out: &mut [f32]) {
        let d = q.len();
        let d8 = d / 8 * 8;
        let qp = q.as_ptr();
        let mut j = 0;
        while j + 4 <= k.len() {
            let kp = [
                k[j].as_ptr(),
                k[j + 1].as_ptr(),
                k[j + 2].as_ptr(),
                k[j + 3].as_ptr(),
            ];
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < d8 {
                let qv = _mm256_loadu_ps(qp.add(c));
                for r in 0..4 {
                    acc[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[r].add(c)), acc[r]);
                }
                c += 8;
            }
            for r in 0..4 {
                let mut s = hsum_ps(acc[r]);
                for c in d8..d {
                    s += *qp.add(c) * *kp[r].add(c);
                }
                out[j + r] = s;
            }
            j += 4;
        }
        while j < k.len() {
            let kp = k[j].as_ptr();
            let mut acc = _mm256_setzero_ps();
            let mut c = 0;
            while c < d8 {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(kp.add(c)), acc);
                c += 8;
            }
            let mut s = hsum_ps(acc);
            for c in d8..d {
                s += *qp.add(c) * *kp.add(c);
            }
            out[j] = s;
            j += 1;
        }
    }

    /// The online-softmax step for queries `i0..i0+8` of a key-major block, vertically.
    ///
    /// Safety: AVX2+FMA present; `st.len() ≥ (nk−1)·BLOCK_Q + i0 + 8` (if `nk > 0`),
    /// `m, l, alpha` hold at least `i0 + 8` elements.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_cols(
        st: &mut [f32],
        nk: usize,
        i0: usize,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
    ) {
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let sp = st.as_mut_ptr().add(i0);
        // Four independent maxima, then combined (max is exact: order does not matter).
        let mut mx = [ninf; 4];
        let mut j = 0;
        while j + 4 <= nk {
            for (u, x) in mx.iter_mut().enumerate() {
                *x = _mm256_max_ps(*x, _mm256_loadu_ps(sp.add((j + u) * BLOCK_Q)));
            }
            j += 4;
        }
        while j < nk {
            mx[0] = _mm256_max_ps(mx[0], _mm256_loadu_ps(sp.add(j * BLOCK_Q)));
            j += 1;
        }
        let mb = _mm256_max_ps(_mm256_max_ps(mx[0], mx[1]), _mm256_max_ps(mx[2], mx[3]));
        let m_old = _mm256_loadu_ps(m.as_ptr().add(i0));
        let m_new = _mm256_max_ps(m_old, mb);
        // ms = m_new, or 0 where m_new = −∞ (then every p and alpha below is exactly 0).
        let ms = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(m_new, ninf), m_new);
        let a = exp2_ps(_mm256_sub_ps(m_old, ms));
        let mut sum = [_mm256_setzero_ps(); 2];
        for j in 0..nk {
            let p = sp.add(j * BLOCK_Q);
            let e = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(p), ms));
            _mm256_storeu_ps(p, e);
            sum[j & 1] = _mm256_add_ps(sum[j & 1], e);
        }
        let sum = _mm256_add_ps(sum[0], sum[1]);
        let lp = l.as_mut_ptr().add(i0);
        _mm256_storeu_ps(lp, _mm256_fmadd_ps(a, _mm256_loadu_ps(lp), sum));
        _mm256_storeu_ps(m.as_mut_ptr().add(i0), m_new);
        _mm256_storeu_ps(alpha.as_mut_ptr().add(i0), a);
    }

    /// Maximum of `s` (`s.len()` a positive multiple of 8). Safety: AVX2 present.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_max(s: &[f32]) -> f32 {
        let p = s.as_ptr();
        let mut m = _mm256_loadu_ps(p);
        for j in (8..s.len()).step_by(8) {
            m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(j)));
        }
        hmax_ps(m)
    }

    /// `s_j = 2^(s_j − m)`; returns `Σ_j s_j` (`s.len()` a multiple of 8). Safety: AVX2 present.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sum_row(s: &mut [f32], m: f32) -> f32 {
        let p = s.as_mut_ptr();
        let mv = _mm256_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        for j in (0..s.len()).step_by(8) {
            let e = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(p.add(j)), mv));
            _mm256_storeu_ps(p.add(j), e);
            sum = _mm256_add_ps(sum, e);
        }
        hsum_ps(sum)
    }

    /// Rows `r0..r0+R` of `o = alpha·o + Pᵀ·V` (`o` `[rows, d]`, `p_ji` at `p[j·sj + i·si]`),
    /// 16 columns at a time (64 or 32 for one or two rows), then 8, then a scalar tail.
    ///
    /// Safety: AVX2+FMA present; `o.len() ≥ (r0+R)·d`, `alpha.len() ≥ r0+R`,
    /// `p.len() > (v.len()−1)·sj + (r0+R−1)·si`, every `v[j].len() ≥ d`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn acc_rows<const R: usize>(
        o: &mut [f32],
        alpha: &[f32],
        p: &[f32],
        sj: usize,
        si: usize,
        v: &[&[f32]],
        d: usize,
        r0: usize,
    ) {
        let op = o.as_mut_ptr().add(r0 * d);
        let pp = p.as_ptr().add(r0 * si);
        let mut c0 = 0;
        // Few rows (decode): wider column tiles, so that enough independent FMA chains run.
        if R == 1 {
            while c0 + 64 <= d {
                acc_tile::<R, 8>(op, alpha, pp, sj, si, v, d, r0, c0);
                c0 += 64;
            }
        }
        if R <= 2 {
            while c0 + 32 <= d {
                acc_tile::<R, 4>(op, alpha, pp, sj, si, v, d, r0, c0);
                c0 += 32;
            }
        }
        while c0 + 16 <= d {
            acc_tile::<R, 2>(op, alpha, pp, sj, si, v, d, r0, c0);
            c0 += 16;
        }
        if c0 + 8 <= d {
            acc_tile::<R, 1>(op, alpha, pp, sj, si, v, d, r0, c0);
            c0 += 8;
        }
        for c in c0..d {
            for r in 0..R {
                let x = op.add(r * d + c);
                let mut a = *x * alpha[r0 + r];
                for (j, vj) in v.iter().enumerate() {
                    a += *pp.add(j * sj + r * si) * *vj.get_unchecked(c);
                }
                *x = a;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn acc_tile<const R: usize, const NV: usize>(
        op: *mut f32,
        alpha: &[f32],
        pp: *const f32,
        sj: usize,
        si: usize,
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
            let pj = pp.add(j * sj);
            for r in 0..R {
                let pb = _mm256_broadcast_ss(&*pj.add(r * si));
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
