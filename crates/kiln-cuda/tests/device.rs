//! Device discovery, buffers, launches, and the emulator's own checks.
mod common;
use common::{assert_close, emulators, gpu, values};
use kiln_cuda::{sources, Arg, CudaDevice, LaunchDims};
use kiln_tensor::DType;

#[test]
fn discovery_never_panics() {
    let n = CudaDevice::count();
    match CudaDevice::new(0) {
        Ok(d) => {
            assert!(n >= 1);
            println!("device 0: {:?}", d.info());
        }
        Err(e) => {
            assert!(kiln_cuda::is_no_device(&e) || n > 0, "{e}");
            println!("SKIP discovery_never_panics (GPU part): {e}");
        }
    }
    // A bad ordinal is an error, not a panic.
    assert!(CudaDevice::new(1 << 20).is_err());
}

#[test]
fn gpu_upload_download_roundtrip() {
    let Some(dev) = gpu("gpu_upload_download_roundtrip") else {
        return;
    };
    roundtrip(dev);
}

#[test]
fn emu_upload_download_roundtrip() {
    for dev in emulators("emu_upload_download_roundtrip") {
        roundtrip(dev);
    }
}

fn roundtrip(dev: &CudaDevice) {
    let x = values(1001, 1);
    let buf = dev.upload(&x).unwrap();
    assert_eq!(buf.len(), 1001);
    assert_eq!(dev.download::<f32>(&buf).unwrap(), x);
    let mut z = dev.zeros(DType::F32, 10).unwrap();
    assert_eq!(dev.download::<f32>(&z).unwrap(), vec![0.0; 10]);
    dev.write(&mut z, 3, &[1.0f32, 2.0]).unwrap();
    let mut part = [0f32; 4];
    dev.read(&z, 2, &mut part).unwrap();
    assert_eq!(part, [0.0, 1.0, 2.0, 0.0]);
    assert!(dev.write(&mut z, 9, &[1.0f32, 2.0]).is_err());
    assert!(dev.download::<half::bf16>(&z).is_err());
    let b: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let bb = dev.upload(&b).unwrap();
    let back = dev.download_f32(&bb).unwrap();
    let want: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
    assert_eq!(back, want);
}

fn probe(dev: &CudaDevice) {
    // Indexing over 3 blocks of 64.
    let mut out = dev.zeros(DType::I32, 192).unwrap();
    dev.launch(
        &sources::PROBE,
        "probe_index",
        LaunchDims::linear(3, 64, 0),
        &[Arg::Buf(&out)],
    )
    .unwrap();
    let got = dev.download::<i32>(&out).unwrap();
    for (i, &g) in got.iter().enumerate() {
        assert_eq!(g, (1000 * (i / 64) + i % 64) as i32);
    }
    // Block reductions over 2 blocks of 96.
    let x = values(192, 2);
    let xb = dev.upload(&x).unwrap();
    let s = dev.zeros(DType::F32, 2).unwrap();
    let m = dev.zeros(DType::F32, 2).unwrap();
    dev.launch(
        &sources::PROBE,
        "probe_block_reduce",
        LaunchDims::linear(2, 96, 0),
        &[Arg::Buf(&xb), Arg::Buf(&s), Arg::Buf(&m)],
    )
    .unwrap();
    let (gs, gm) = (
        dev.download::<f32>(&s).unwrap(),
        dev.download::<f32>(&m).unwrap(),
    );
    for b in 0..2 {
        let c = &x[b * 96..(b + 1) * 96];
        let want: f32 = c.iter().sum();
        let wmax = c.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        assert_close("block_sum", &gs[b..b + 1], &[want], 1e-5, 1e-5);
        assert_eq!(gm[b], wmax);
    }
    // A butterfly shuffle.
    let x = values(32, 3);
    let xb = dev.upload(&x).unwrap();
    let o = dev.zeros(DType::F32, 32).unwrap();
    dev.launch(
        &sources::PROBE,
        "probe_shuffle",
        LaunchDims::linear(1, 32, 0),
        &[Arg::Buf(&xb), Arg::Buf(&o)],
    )
    .unwrap();
    let got = dev.download::<f32>(&o).unwrap();
    for t in 0..32 {
        assert_eq!(got[t], x[t ^ 5]);
    }
    // The reversal with its barrier.
    let x = values(128, 4);
    let xb = dev.upload(&x).unwrap();
    let o = dev.zeros(DType::F32, 128).unwrap();
    dev.launch(
        &sources::PROBE,
        "probe_reverse",
        LaunchDims::linear(1, 128, 512),
        &[Arg::Buf(&xb), Arg::Buf(&o)],
    )
    .unwrap();
    let got = dev.download::<f32>(&o).unwrap();
    let want: Vec<f32> = x.iter().rev().copied().collect();
    assert_eq!(got, want);
    // Launch limits are checked before anything runs.
    let e = dev
        .launch(
            &sources::PROBE,
            "probe_index",
            LaunchDims::linear(1, 2048, 0),
            &[Arg::Buf(&out)],
        )
        .unwrap_err();
    assert!(e.to_string().contains("probe_index"), "{e}");
    let e = dev
        .launch(
            &sources::PROBE,
            "probe_index",
            LaunchDims::linear(1, 32, 1 << 20),
            &[Arg::Buf(&out)],
        )
        .unwrap_err();
    assert!(e.to_string().contains("shared memory"), "{e}");
    let _ = &mut out;
}

#[test]
fn gpu_probe_kernels() {
    let Some(dev) = gpu("gpu_probe_kernels") else {
        return;
    };
    probe(dev);
}

#[test]
fn emu_probe_kernels() {
    for dev in emulators("emu_probe_kernels") {
        probe(dev);
    }
}

/// The emulator catches a missing barrier (in one of the two thread orders) and a barrier
/// that not every thread reaches.
#[test]
fn emu_catches_barrier_bugs() {
    let devs = emulators("emu_catches_barrier_bugs");
    if devs.is_empty() {
        return;
    }
    let mut wrong = 0;
    for dev in &devs {
        let x = values(64, 5);
        let xb = dev.upload(&x).unwrap();
        let o = dev.zeros(DType::F32, 64).unwrap();
        dev.launch(
            &sources::PROBE,
            "probe_missing_barrier",
            LaunchDims::linear(1, 64, 256),
            &[Arg::Buf(&xb), Arg::Buf(&o)],
        )
        .unwrap();
        let got = dev.download::<f32>(&o).unwrap();
        let want: Vec<f32> = x.iter().rev().copied().collect();
        if got
            .iter()
            .zip(&want)
            .any(|(g, w)| g.to_bits() != w.to_bits())
        {
            wrong += 1;
        }
        let e = dev
            .launch(
                &sources::PROBE,
                "probe_divergent_barrier",
                LaunchDims::linear(1, 64, 0),
                &[Arg::Buf(&o)],
            )
            .unwrap_err();
        assert!(e.to_string().contains("deadlock"), "{e}");
    }
    assert_eq!(
        wrong, 2,
        "each thread order must expose the missing barrier"
    );
}
