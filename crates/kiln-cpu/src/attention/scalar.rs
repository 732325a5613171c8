//! Reference tile kernels in plain Rust (the path every SIMD kernel is tested against).
use super::{Tiles, BLOCK_K, BLOCK_Q};

pub(crate) struct Scalar;

impl Tiles for Scalar {
    fn scores(qt: &[f32], k_rows: &[&[f32]], d: usize, ncols: usize, st: &mut [f32]) {
        for (j, kj) in k_rows.iter().enumerate() {
            let srow = &mut st[j * BLOCK_Q..j * BLOCK_Q + ncols];
            srow.fill(0.0);
            // s_ji = Σ_c k_j[c]·qᵀ[c][i]  (i innermost: contiguous in the packed Qᵀ)
            for (cc, &kc) in kj[..d].iter().enumerate() {
                let qr = &qt[cc * BLOCK_Q..cc * BLOCK_Q + ncols];
                for (sv, &qv) in srow.iter_mut().zip(qr) {
                    *sv += kc * qv;
                }
            }
        }
    }

    fn scores_dot(qs: &[f32], rows: usize, k_rows: &[&[f32]], d: usize, st: &mut [f32]) {
        for (j, kj) in k_rows.iter().enumerate() {
            for i in 0..rows {
                let qi = &qs[i * d..(i + 1) * d];
                st[i * BLOCK_K + j] = qi.iter().zip(&kj[..d]).map(|(a, b)| a * b).sum();
            }
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
        for i in 0..ncols {
            let mut mb = f32::NEG_INFINITY;
            for j in 0..nk {
                mb = mb.max(st[j * sj + i * si]);
            }
            let m_new = m[i].max(mb);
            let ms = if m_new == f32::NEG_INFINITY {
                0.0
            } else {
                m_new
            };
            let a = (m[i] - ms).exp2();
            let mut sum = 0.0f32;
            for j in 0..nk {
                let p = (st[j * sj + i * si] - ms).exp2();
                st[j * sj + i * si] = p;
                sum += p;
            }
            m[i] = m_new;
            l[i] = a * l[i] + sum;
            alpha[i] = a;
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
        for (i, &a) in alpha.iter().enumerate() {
            let orow = &mut o[i * d..(i + 1) * d];
            // o_i = alpha_i·o_i + Σ_j p_ji·v_j
            for x in orow.iter_mut() {
                *x *= a;
            }
            for (j, v) in v_rows.iter().enumerate() {
                let pj = p[j * sj + i * si];
                for (x, &vv) in orow.iter_mut().zip(&v[..d]) {
                    *x += pj * vv;
                }
            }
        }
    }
}
