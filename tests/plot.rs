//! The PNG line-plot renderer: valid files of the requested size, curves where the frame says
//! they are, nice ticks, and no panic on degenerate input.
use kiln::models::dcgan::image::read_png_rgb;
use kiln_cli::plot::{render, render_png, Plot, Rendered, Series};

const RED: [u8; 3] = [220, 30, 30];
const BLUE: [u8; 3] = [30, 60, 220];
const GREEN: [u8; 3] = [20, 160, 40];

fn series(name: &str, color: [u8; 3], points: Vec<(f64, f64)>) -> Series {
    Series {
        name: name.into(),
        color,
        points,
    }
}

fn pixel(img: &Rendered, x: f64, y: f64) -> [u8; 3] {
    let (x, y) = (x.floor() as usize, y.floor() as usize);
    let o = (y * img.width + x) * 3;
    [img.rgb[o], img.rgb[o + 1], img.rgb[o + 2]]
}

/// Inside the plot area, off its frame lines, and not under the legend.
fn visible(img: &Rendered, px: f64, py: f64) -> bool {
    let f = &img.frame;
    let in_frame = px > f.left as f64 + 3.0
        && px < f.right as f64 - 3.0
        && py > f.top as f64 + 3.0
        && py < f.bottom as f64 - 3.0;
    let under_legend = img.legend.is_some_and(|(x, y, w, h)| {
        px >= x as f64 - 2.0
            && px <= (x + w) as f64 + 2.0
            && py >= y as f64 - 2.0
            && py <= (y + h) as f64 + 2.0
    });
    in_frame && !under_legend
}

fn near(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
    a.iter()
        .zip(&b)
        .all(|(&x, &y)| (x as i32 - y as i32).abs() <= tol)
}

fn dcgan_like_plot(steps: usize) -> Plot {
    let loss_d: Vec<(f64, f64)> = (0..steps)
        .map(|i| (i as f64, 1.4 * (-(i as f64) / 300.0).exp() + 0.3))
        .collect();
    let loss_g: Vec<(f64, f64)> = (0..steps)
        .map(|i| (i as f64, 0.7 + 2.0 * (1.0 - (-(i as f64) / 200.0).exp())))
        .collect();
    let swd: Vec<(f64, f64)> = (0..steps)
        .step_by(100)
        .map(|i| (i as f64, 0.15 * (-(i as f64) / 400.0).exp() + 0.01))
        .collect();
    Plot {
        title: "DCGAN losses".into(),
        x_label: "step".into(),
        y_label: "loss".into(),
        series: vec![
            series("loss_d", RED, loss_d),
            series("loss_g", BLUE, loss_g),
        ],
        log_y: false,
        right: vec![series("swd", GREEN, swd)],
        right_label: "SWD".into(),
    }
}

#[test]
fn writes_a_png_of_the_requested_size() {
    let dir = std::env::temp_dir().join(format!("kiln-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("losses.png");
    render_png(&dcgan_like_plot(2000), 800, 500, &path).unwrap();
    let (rgb, w, h) = read_png_rgb(&path).unwrap();
    assert_eq!((w, h), (800, 500));
    assert_eq!(rgb.len(), 800 * 500 * 3);
    // Not blank: the curves' colours appear.
    let has = |c: [u8; 3]| rgb.chunks(3).any(|p| near([p[0], p[1], p[2]], c, 8));
    assert!(has(RED) && has(BLUE) && has(GREEN));
    // Small sizes render too.
    render_png(&dcgan_like_plot(50), 200, 150, &path).unwrap();
    let (_, w, h) = read_png_rgb(&path).unwrap();
    assert_eq!((w, h), (200, 150));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn curves_land_where_the_frame_maps_them() {
    let plot = dcgan_like_plot(1000);
    let img = render(&plot, 900, 600).unwrap();
    let f = &img.frame;
    assert!(f.left < f.right && f.top < f.bottom);
    // Sample points of each curve away from the other curves and the legend.
    for &(x, y) in plot.series[0].points.iter().step_by(97) {
        let (px, py) = f.to_pixel(x, y).unwrap();
        assert!(px >= f.left as f64 && px <= f.right as f64);
        assert!(py >= f.top as f64 && py <= f.bottom as f64);
        let c = pixel(&img, px.min(f.right as f64 - 1.0), py);
        // Where curves cross, the later one is on top; check only clear spots.
        let (_, gy) = f.to_pixel(x, plot.series[1].points[x as usize].1).unwrap();
        let clear_of_swd = plot.right[0].points.windows(2).all(|w| {
            let a = f.to_pixel_right(w[0].0, w[0].1).unwrap();
            let b = f.to_pixel_right(w[1].0, w[1].1).unwrap();
            px < a.0
                || px > b.0
                || (py - (a.1 + (b.1 - a.1) * (px - a.0) / (b.0 - a.0))).abs() > 8.0
        });
        if visible(&img, px, py) && clear_of_swd && (gy - py).abs() > 6.0 {
            assert!(
                near(c, RED, 40),
                "loss_d at ({x}, {y}) -> ({px}, {py}): {c:?}"
            );
        }
    }
    for &(x, y) in &plot.right[0].points {
        let (px, py) = f.to_pixel_right(x, y).unwrap();
        if visible(&img, px, py) {
            let c = pixel(&img, px, py);
            assert!(near(c, GREEN, 60), "swd at ({x}, {y}): {c:?}");
        }
    }
    // Above and below a horizontal line, the background shows.
    let flat = Plot {
        series: vec![series(
            "flat",
            RED,
            vec![(0.0, 0.0), (1.0, 0.0), (2.0, 1.0)],
        )],
        ..Plot::default()
    };
    let img = render(&flat, 400, 300).unwrap();
    let (px, py) = img.frame.to_pixel(0.5, 0.0).unwrap();
    assert!(near(pixel(&img, px, py), RED, 40));
    assert!(near(pixel(&img, px, py - 8.0), [255, 255, 255], 30));
}

#[test]
fn log_axis_maps_decades_evenly() {
    let pts: Vec<(f64, f64)> = (0..=40)
        .map(|i| (i as f64, 10f64.powf(-(i as f64) / 10.0)))
        .collect();
    let plot = Plot {
        series: vec![series("loss", BLUE, pts)],
        log_y: true,
        ..Plot::default()
    };
    let img = render(&plot, 600, 400).unwrap();
    let f = &img.frame;
    let (_, y1) = f.to_pixel(0.0, 1.0).unwrap();
    let (_, y2) = f.to_pixel(0.0, 0.1).unwrap();
    let (_, y3) = f.to_pixel(0.0, 0.01).unwrap();
    assert!(((y2 - y1) - (y3 - y2)).abs() < 1e-6);
    assert!(f.y.ticks.contains(&1.0) && f.y.ticks.contains(&0.001));
    // A straight line on a log axis: its middle point is on the curve.
    let (px, py) = f.to_pixel(20.0, 0.01).unwrap();
    assert!(near(pixel(&img, px, py), BLUE, 40));
    // Non-positive values cannot be shown and are skipped.
    assert!(f.to_pixel(1.0, 0.0).is_none());
}

#[test]
fn ticks_are_nice_and_labelled() {
    let plot = Plot {
        series: vec![series("a", RED, vec![(0.0, 0.13), (1234.0, 2.71)])],
        ..Plot::default()
    };
    let img = render(&plot, 800, 500).unwrap();
    for axis in [&img.frame.x, &img.frame.y] {
        assert!(axis.ticks.len() >= 2, "{axis:?}");
        assert_eq!(axis.ticks.len(), axis.labels.len());
        let step = axis.ticks[1] - axis.ticks[0];
        let mag = 10f64.powf(step.log10().floor());
        let m = (step / mag * 1e6).round() / 1e6;
        assert!([1.0, 2.0, 5.0, 10.0].contains(&m), "step {step}");
        for (t, l) in axis.ticks.iter().zip(&axis.labels) {
            let parsed: f64 = l.parse().unwrap();
            assert!((parsed - t).abs() <= 1e-9 * t.abs().max(1.0), "{l} vs {t}");
            assert!(*t >= axis.lo - 1e-9 && *t <= axis.hi + 1e-9);
        }
    }
}

#[test]
fn degenerate_inputs_do_not_panic() {
    let cases: Vec<Plot> = vec![
        Plot::default(),
        Plot {
            series: vec![series("empty", RED, vec![])],
            right: vec![series("empty too", BLUE, vec![])],
            ..Plot::default()
        },
        Plot {
            title: "equal values".into(),
            series: vec![series("c", RED, vec![(1.0, 3.0), (2.0, 3.0), (3.0, 3.0)])],
            ..Plot::default()
        },
        Plot {
            series: vec![series("zero", RED, vec![(5.0, 0.0), (5.0, 0.0)])],
            log_y: true,
            ..Plot::default()
        },
        Plot {
            series: vec![series(
                "nan",
                RED,
                vec![
                    (0.0, 1.0),
                    (1.0, f64::NAN),
                    (2.0, f64::INFINITY),
                    (f64::NEG_INFINITY, 2.0),
                    (3.0, 2.0),
                    (4.0, 3.0),
                ],
            )],
            ..Plot::default()
        },
        Plot {
            series: vec![series("all nan", RED, vec![(f64::NAN, f64::NAN); 3])],
            log_y: true,
            right: vec![series("inf", BLUE, vec![(1.0, f64::INFINITY)])],
            ..Plot::default()
        },
        Plot {
            series: vec![series(
                "huge",
                RED,
                vec![(0.0, 1e300), (1.0, -1e300), (2.0, 1e-300)],
            )],
            ..Plot::default()
        },
        Plot {
            title: "non-ASCII title: λ → ∞".into(),
            series: vec![series("tiny", RED, vec![(0.0, 1e-9), (1e-12, 2e-9)])],
            ..Plot::default()
        },
    ];
    for plot in &cases {
        let img = render(plot, 320, 240).unwrap();
        assert_eq!(img.rgb.len(), 320 * 240 * 3);
    }
}

#[test]
fn a_single_point_is_a_dot() {
    let plot = Plot {
        series: vec![series("one", RED, vec![(3.0, 7.0)])],
        ..Plot::default()
    };
    let img = render(&plot, 400, 300).unwrap();
    let (px, py) = img.frame.to_pixel(3.0, 7.0).unwrap();
    assert!(near(pixel(&img, px, py), RED, 10));
    // Isolated by NaN on both sides: also a dot.
    let plot = Plot {
        series: vec![series(
            "gap",
            BLUE,
            vec![
                (0.0, 0.0),
                (1.0, f64::NAN),
                (2.0, 5.0),
                (3.0, f64::NAN),
                (4.0, 1.0),
            ],
        )],
        ..Plot::default()
    };
    let img = render(&plot, 400, 300).unwrap();
    let (px, py) = img.frame.to_pixel(2.0, 5.0).unwrap();
    assert!(near(
        pixel(&img, px, py.max(img.frame.top as f64 + 2.0)),
        BLUE,
        60
    ));
}

#[test]
fn many_points_render() {
    let n = 100_000;
    let pts: Vec<(f64, f64)> = (0..n)
        .map(|i| {
            (
                i as f64,
                ((i * 7919) % 1000) as f64 / 1000.0 + (i as f64 / n as f64),
            )
        })
        .collect();
    let plot = Plot {
        series: vec![series("noisy", RED, pts)],
        log_y: false,
        ..Plot::default()
    };
    let img = render(&plot, 1000, 600).unwrap();
    // Per-column min/max keeps the envelope: the top and bottom of the band are drawn.
    let f = &img.frame;
    let (px, py_top) = f.to_pixel(50_000.0, 0.999 + 0.5).unwrap();
    let (_, py_bottom) = f.to_pixel(50_000.0, 0.5).unwrap();
    let col: Vec<[u8; 3]> = (py_top.floor() as usize..py_bottom.ceil() as usize)
        .map(|y| pixel(&img, px, y as f64))
        .collect();
    assert!(col.iter().filter(|&&c| near(c, RED, 40)).count() > col.len() / 2);
}

#[test]
fn bad_sizes_are_errors() {
    let plot = dcgan_like_plot(10);
    assert!(render(&plot, 0, 100).is_err());
    assert!(render(&plot, 100, 0).is_err());
    assert!(render(&plot, 40, 30).is_err());
    assert!(render(&plot, 100_000, 100).is_err());
}
