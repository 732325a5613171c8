//! Reference tile kernels in plain Rust (the path every SIMD kernel is tested against).
use super::{Tiles, BLOCK_K};

pub(crate) struct Scalar;

impl Tiles for Scalar {
    fn scores(q_rows: &[&[f32]], kt: &[f32], d: usize, c: f32, s: &mut [f32]) {
        for (i, q) in q_rows.iter().enumerate() {
            let srow = &mut s[i * BLOCK_K..(i + 1) * BLOCK_K];
            srow.fill(0.0);
            // s_ij = Σ_c q_i[c] · kᵀ[c][j]  (j innermost: contiguous in the packed Kᵀ)
            for (cc, &qc) in q[..d].iter().enumerate() {
                let ktr = &kt[cc * BLOCK_K..(cc + 1) * BLOCK_K];
                for (sv, &kv) in srow.iter_mut().zip(ktr) {
                    *sv += qc * kv;
                }
            }
            for sv in srow.iter_mut() {
                *sv *= c;
            }
        }
    }

    fn softmax_step(s_row: &mut [f32], m: f32, l: f32) -> (f32, f32, f32) {
        let mb = s_row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let m_new = m.max(mb);
        // m is −∞ only before the first visible key; then alpha multiplies zeros.
        let alpha = if m == f32::NEG_INFINITY {
            0.0
        } else {
            (m - m_new).exp2()
        };
        let mut sum = 0.0f32;
        for x in s_row.iter_mut() {
            *x = (*x - m_new).exp2();
            sum += *x;
        }
        (m_new, alpha * l + sum, alpha)
    }

    fn accumulate(o: &mut [f32], alpha: &[f32], p: &[f32], v_rows: &[&[f32]], d: usize) {
        for (i, &a) in alpha.iter().enumerate() {
            let orow = &mut o[i * d..(i + 1) * d];
            // o_i = alpha_i·o_i + Σ_j p_ij·v_j
            for x in orow.iter_mut() {
                *x *= a;
            }
            let prow = &p[i * BLOCK_K..];
            for (j, v) in v_rows.iter().enumerate() {
                let pj = prow[j];
                for (x, &vv) in orow.iter_mut().zip(&v[..d]) {
                    *x += pj * vv;
                }
            }
        }
    }
}
