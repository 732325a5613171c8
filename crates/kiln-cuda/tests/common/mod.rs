//! Shared by the integration tests: the devices to run on, and comparisons.
#![allow(dead_code)]
use kiln_cuda::{CudaDevice, EmuOptions};
use std::sync::OnceLock;

fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// The CPU emulators (forward and reverse thread order). Without a C++ compiler: SKIP, except
/// under CI, where that fails the test. `KILN_SKIP_EMU` skips them (GPU runs).
pub fn emulators(test: &str) -> Vec<&'static CudaDevice> {
    if std::env::var_os("KILN_SKIP_EMU").is_some() {
        println!("SKIP {test}: KILN_SKIP_EMU is set");
        return Vec::new();
    }
    static EMUS: OnceLock<Result<[CudaDevice; 2], String>> = OnceLock::new();
    let r = EMUS.get_or_init(|| {
        let f =
            CudaDevice::emulator_with(EmuOptions { reverse: false }).map_err(|e| e.to_string())?;
        let r =
            CudaDevice::emulator_with(EmuOptions { reverse: true }).map_err(|e| e.to_string())?;
        Ok([f, r])
    });
    match r {
        Ok(devs) => devs.iter().collect(),
        Err(e) => {
            if in_ci() {
                panic!("{test}: the CPU emulator is required under CI: {e}");
            }
            println!("SKIP {test}: {e}");
            Vec::new()
        }
    }
}

/// The forward-order emulator only (for the slower checks).
pub fn emulator(test: &str) -> Option<&'static CudaDevice> {
    emulators(test).into_iter().next()
}

/// Device 0, or None after printing `SKIP <test>: <reason>`.
pub fn gpu(test: &str) -> Option<&'static CudaDevice> {
    static GPU: OnceLock<Result<CudaDevice, String>> = OnceLock::new();
    match GPU.get_or_init(|| CudaDevice::new(0).map_err(|e| e.to_string())) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("SKIP {test}: {e}");
            None
        }
    }
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Largest |a − b| / (atol + rtol·|b|); panics with the position when above 1.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = (0.0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let r = if g.is_nan() != w.is_nan() {
            f32::INFINITY
        } else if g.is_nan() || g == w {
            0.0
        } else {
            (g - w).abs() / (atol + rtol * w.abs())
        };
        if r > worst.0 || r.is_nan() {
            worst = (r, i);
        }
    }
    let (r, i) = worst;
    assert!(
        r <= 1.0,
        "{what}: element {i}: got {}, want {} (error ratio {r})",
        got[i],
        want[i]
    );
}
