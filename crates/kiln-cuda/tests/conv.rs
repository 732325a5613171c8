//! Convolutions against kiln-cpu's conv2d / conv_transpose2d, forward and backward: stride,
//! padding, dilation, groups, output padding, odd sizes, bf16 weights.
mod common;
use common::{assert_close, emulators, gpu, values};
use kiln_cpu::conv::{self as cpu, Conv2dParams, ConvGeometry};
use kiln_cuda::ops::conv;
use kiln_cuda::CudaDevice;
use kiln_tensor::DType;

#[derive(Clone, Copy, Debug)]
struct Case {
    x: [usize; 4],
    w: [usize; 4],
    p: Conv2dParams,
    transposed: bool,
}

fn params(
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
    output_padding: usize,
) -> Conv2dParams {
    Conv2dParams {
        stride: [stride, stride],
        padding: [padding, padding],
        dilation: [dilation, dilation],
        groups,
        output_padding: [output_padding, output_padding],
    }
}

fn check(dev: &CudaDevice, c: Case, bf16_weights: bool) {
    let g = if c.transposed {
        ConvGeometry::conv_transpose2d(c.x, c.w, &c.p).unwrap()
    } else {
        ConvGeometry::conv2d(c.x, c.w, &c.p).unwrap()
    };
    let what = format!("{c:?} bf16 weights {bf16_weights}");
    let x = values(g.input_len(), 1);
    let mut w = values(g.weight_len(), 2);
    if bf16_weights {
        w = w
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
    }
    let bias = values(g.out_channels(), 3);
    let dy = values(g.output_len(), 4);
    let xb = dev.upload(&x).unwrap();
    let wb = if bf16_weights {
        dev.upload(
            &w.iter()
                .map(|&v| half::bf16::from_f32(v))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    } else {
        dev.upload(&w).unwrap()
    };
    let wf = dev.upload(&w).unwrap();
    let bb = dev.upload(&bias).unwrap();
    let dyb = dev.upload(&dy).unwrap();
    let mut y = dev.alloc(DType::F32, g.output_len()).unwrap();
    let mut want_y = vec![0f32; g.output_len()];
    let (mut dx, mut dw, mut db) = (
        dev.alloc(DType::F32, g.input_len()).unwrap(),
        dev.alloc(DType::F32, g.weight_len()).unwrap(),
        dev.alloc(DType::F32, g.out_channels()).unwrap(),
    );
    let (mut wdx, mut wdw, mut wdb) = (
        vec![0f32; g.input_len()],
        vec![0f32; g.weight_len()],
        vec![0f32; g.out_channels()],
    );
    if c.transposed {
        conv::conv_transpose2d_forward(dev, &g, &xb, &wb, Some(&bb), &mut y).unwrap();
        cpu::conv_transpose2d_forward(&g, &x, &w, Some(&bias), &mut want_y).unwrap();
        conv::conv_transpose2d_backward(
            dev,
            &g,
            &xb,
            &wf,
            &dyb,
            Some(&mut dx),
            Some(&mut dw),
            Some(&mut db),
        )
        .unwrap();
        cpu::conv_transpose2d_backward(
            &g,
            &x,
            &w,
            &dy,
            Some(&mut wdx),
            Some(&mut wdw),
            Some(&mut wdb),
        )
        .unwrap();
    } else {
        conv::conv2d_forward(dev, &g, &xb, &wb, Some(&bb), &mut y).unwrap();
        cpu::conv2d_forward(&g, &x, &w, Some(&bias), &mut want_y).unwrap();
        conv::conv2d_backward(
            dev,
            &g,
            &xb,
            &wf,
            &dyb,
            Some(&mut dx),
            Some(&mut dw),
            Some(&mut db),
        )
        .unwrap();
        cpu::conv2d_backward(
            &g,
            &x,
            &w,
            &dy,
            Some(&mut wdx),
            Some(&mut wdw),
            Some(&mut wdb),
        )
        .unwrap();
    }
    let k = (g.big[0] / g.groups * g.kernel[0] * g.kernel[1]).max(g.small[0]) as f32;
    let tol = 1e-6 * (k + 8.0);
    assert_close(
        &format!("{what}: y"),
        &dev.download::<f32>(&y).unwrap(),
        &want_y,
        tol,
        tol,
    );
    assert_close(
        &format!("{what}: dx"),
        &dev.download::<f32>(&dx).unwrap(),
        &wdx,
        tol,
        tol,
    );
    let r = (g.batch * g.small[1] * g.small[2]) as f32;
    let tol_w = 1e-6 * (r + 8.0);
    assert_close(
        &format!("{what}: dw"),
        &dev.download::<f32>(&dw).unwrap(),
        &wdw,
        tol_w,
        tol_w,
    );
    assert_close(
        &format!("{what}: db"),
        &dev.download::<f32>(&db).unwrap(),
        &wdb,
        tol_w,
        tol_w,
    );
}

fn small_cases() -> Vec<Case> {
    vec![
        // DCGAN's discriminator layer: 4×4, stride 2, padding 1.
        Case {
            x: [2, 3, 9, 7],
            w: [5, 3, 4, 4],
            p: params(2, 1, 1, 1, 0),
            transposed: false,
        },
        // dilation, groups, 3×3.
        Case {
            x: [1, 4, 8, 9],
            w: [6, 2, 3, 3],
            p: params(1, 2, 2, 2, 0),
            transposed: false,
        },
        // 1×1 (pointwise) and a kernel covering the whole image (dense).
        Case {
            x: [3, 5, 4, 4],
            w: [3, 5, 1, 1],
            p: params(1, 0, 1, 1, 0),
            transposed: false,
        },
        Case {
            x: [2, 3, 4, 4],
            w: [7, 3, 4, 4],
            p: params(1, 0, 1, 1, 0),
            transposed: false,
        },
        // DCGAN's generator: transposed 4×4, stride 2, padding 1; output padding, groups.
        Case {
            x: [2, 5, 4, 3],
            w: [5, 3, 4, 4],
            p: params(2, 1, 1, 1, 0),
            transposed: true,
        },
        Case {
            x: [1, 4, 5, 5],
            w: [4, 3, 3, 3],
            p: params(2, 1, 1, 2, 1),
            transposed: true,
        },
        // the generator's first layer: 1×1 input to 4×4.
        Case {
            x: [3, 6, 1, 1],
            w: [6, 4, 4, 4],
            p: params(1, 0, 1, 1, 0),
            transposed: true,
        },
        // dilated transposed conv.
        Case {
            x: [1, 2, 4, 5],
            w: [2, 3, 3, 2],
            p: params(1, 1, 2, 1, 0),
            transposed: true,
        },
    ]
}

#[test]
fn emu_conv_matches_cpu() {
    for dev in emulators("emu_conv_matches_cpu") {
        for c in small_cases() {
            check(dev, c, false);
        }
        check(dev, small_cases()[0], true);
        check(dev, small_cases()[4], true);
    }
}

#[test]
fn conv_rejects_bad_buffers() {
    for dev in emulators("conv_rejects_bad_buffers") {
        let g = ConvGeometry::conv2d([1, 2, 5, 5], [3, 2, 3, 3], &Conv2dParams::new(1, 1)).unwrap();
        let x = dev.zeros(DType::F32, g.input_len() - 1).unwrap();
        let w = dev.zeros(DType::F32, g.weight_len()).unwrap();
        let mut y = dev.zeros(DType::F32, g.output_len()).unwrap();
        assert!(conv::conv2d_forward(dev, &g, &x, &w, None, &mut y).is_err());
        let x = dev.zeros(DType::F32, g.input_len()).unwrap();
        assert!(conv::conv_transpose2d_forward(dev, &g, &x, &w, None, &mut y).is_err());
        let short_bias = dev.zeros(DType::F32, 2).unwrap();
        assert!(conv::conv2d_forward(dev, &g, &x, &w, Some(&short_bias), &mut y).is_err());
    }
}

#[test]
fn gpu_conv_matches_cpu() {
    let Some(dev) = gpu("gpu_conv_matches_cpu") else {
        return;
    };
    for c in small_cases() {
        check(dev, c, false);
    }
    // DCGAN 64×64 layers at batch 16.
    check(
        dev,
        Case {
            x: [16, 3, 64, 64],
            w: [64, 3, 4, 4],
            p: params(2, 1, 1, 1, 0),
            transposed: false,
        },
        false,
    );
    check(
        dev,
        Case {
            x: [16, 128, 16, 16],
            w: [256, 128, 4, 4],
            p: params(2, 1, 1, 1, 0),
            transposed: false,
        },
        false,
    );
    check(
        dev,
        Case {
            x: [16, 100, 1, 1],
            w: [100, 512, 4, 4],
            p: params(1, 0, 1, 1, 0),
            transposed: true,
        },
        false,
    );
    check(
        dev,
        Case {
            x: [16, 128, 16, 16],
            w: [128, 64, 4, 4],
            p: params(2, 1, 1, 1, 0),
            transposed: true,
        },
        true,
    );
}
