//! conv2d / conv_transpose2d against PyTorch: outputs and all three gradients for every DCGAN
//! layer shape (batch 2) and a spread of odd cases (bias, groups, depthwise, dilation,
//! output_padding, non-square, 1×1, 7×7), at 1 and 2 threads.
mod conv_support;
use conv_support::{make, pair, shape4, Fixtures};
use kiln::cpu::conv::{
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward,
    Conv2dParams, ConvGeometry,
};

fn run_all(fx: &Fixtures) {
    let cases = fx.manifest["conv"].as_array().unwrap();
    assert!(cases.len() >= 19);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let transposed = c["transposed"].as_bool().unwrap();
        let x_shape = shape4(&c["x_shape"]);
        let w_shape = shape4(&c["w_shape"]);
        let p = Conv2dParams {
            stride: pair(&c["stride"]),
            padding: pair(&c["padding"]),
            dilation: pair(&c["dilation"]),
            groups: c["groups"].as_u64().unwrap() as usize,
            output_padding: pair(&c["output_padding"]),
        };
        let g = if transposed {
            ConvGeometry::conv_transpose2d(x_shape, w_shape, &p).unwrap()
        } else {
            ConvGeometry::conv2d(x_shape, w_shape, &p).unwrap()
        };
        assert_eq!(
            g.output_shape().to_vec(),
            conv_support::usizes(&c["y_shape"]),
            "{name}"
        );
        let seed = c["seed"].as_u64().unwrap();
        let x = make(g.input_len(), seed, 1.0, 0.0);
        let w = make(
            g.weight_len(),
            seed + 1,
            c["w_scale"].as_f64().unwrap() as f32,
            0.0,
        );
        let has_bias = c["bias"].as_bool().unwrap();
        let b = has_bias.then(|| make(g.out_channels(), seed + 2, 0.5, 0.0));
        let dy = make(g.output_len(), seed + 3, 1.0, 0.0);
        let mut y = vec![0f32; g.output_len()];
        let mut dx = vec![0f32; g.input_len()];
        let mut dw = vec![0f32; g.weight_len()];
        let mut db = vec![0f32; g.out_channels()];
        if transposed {
            conv_transpose2d_forward(&g, &x, &w, b.as_deref(), &mut y).unwrap();
            conv_transpose2d_backward(&g, &x, &w, &dy, Some(&mut dx), Some(&mut dw), Some(&mut db))
                .unwrap();
        } else {
            conv2d_forward(&g, &x, &w, b.as_deref(), &mut y).unwrap();
            conv2d_backward(&g, &x, &w, &dy, Some(&mut dx), Some(&mut dw), Some(&mut db)).unwrap();
        }
        fx.check(&format!("{name}/y"), &y, 1e-4);
        fx.check(&format!("{name}/dx"), &dx, 1e-4);
        fx.check(&format!("{name}/dw"), &dw, 1e-4);
        if has_bias {
            fx.check(&format!("{name}/db"), &db, 1e-4);
        }
    }
}

#[test]
fn conv_layers_match_pytorch_one_thread() {
    let fx = Fixtures::load();
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| run_all(&fx));
}

#[test]
fn conv_layers_match_pytorch_two_threads() {
    let fx = Fixtures::load();
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
        .install(|| run_all(&fx));
}
