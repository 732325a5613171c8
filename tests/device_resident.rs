//! The op interface keeps a model's data on the device: through [`CountingBackend`] (the CPU
//! backend behind opaque buffers that counts every host↔device transfer), a GPT-2 decode step
//! moves only the new token id (and its position) in and the logits out, and gives bitwise the
//! CPU backend's logits.
mod gpt2_common;

use gpt2_common::fixture_dir;
use kiln_models::gpt2::{Gpt2, LoadOptions, Logits};
use kiln_nn::backend::{CountingBackend, Transfers};
use kiln_tensor::DType;

#[test]
fn gpt2_decode_step_moves_only_the_id_in_and_the_logits_out() {
    for dtype in [DType::F32, DType::BF16] {
        let opts = LoadOptions {
            dtype: Some(dtype),
            ..Default::default()
        };
        let cpu = Gpt2::load(fixture_dir(), &opts).unwrap();
        let dev = Gpt2::load_on(fixture_dir(), &opts, CountingBackend::new()).unwrap();
        let be = dev.model.backend();
        // Loading uploads every weight once.
        let loaded = be.transfers();
        assert!(loaded.to_device > 0 && loaded.to_host == 0, "{loaded:?}");
        let v = dev.model.config.vocab_size;

        let prompt = [464u32, 3139, 286, 4881, 318];
        let (mut s_cpu, mut s_dev) = (
            cpu.model.new_state(16).unwrap(),
            dev.model.new_state(16).unwrap(),
        );
        let (mut l_cpu, mut l_dev) = (Vec::new(), Vec::new());
        be.reset();
        dev.model
            .forward(&prompt, &mut s_dev, Logits::Last, &mut l_dev)
            .unwrap();
        // Prefill: the ids and positions in (one transfer), the last row of logits out.
        assert_eq!(
            be.transfers(),
            Transfers {
                to_device: 1,
                to_device_elements: 2 * prompt.len(),
                to_host: 1,
                to_host_elements: v,
            }
        );
        cpu.model
            .forward(&prompt, &mut s_cpu, Logits::Last, &mut l_cpu)
            .unwrap();
        assert_eq!(l_cpu, l_dev);

        for step in 0..3u32 {
            let id = 100 + step;
            be.reset();
            dev.model
                .forward(&[id], &mut s_dev, Logits::Last, &mut l_dev)
                .unwrap();
            assert_eq!(
                be.transfers(),
                Transfers {
                    to_device: 1,
                    to_device_elements: 2,
                    to_host: 1,
                    to_host_elements: v,
                },
                "{dtype} decode step {step}"
            );
            cpu.model
                .forward(&[id], &mut s_cpu, Logits::Last, &mut l_cpu)
                .unwrap();
            assert_eq!(l_cpu, l_dev, "{dtype} decode step {step}");
        }

        // A batched decode step of two sequences: both ids in at once, both rows out.
        let mut s2 = dev.model.new_state(16).unwrap();
        dev.model
            .forward(&prompt[..2], &mut s2, Logits::Last, &mut l_dev)
            .unwrap();
        be.reset();
        dev.model
            .forward_batch(&[7, 8], &mut [&mut s_dev, &mut s2], &mut l_dev)
            .unwrap();
        assert_eq!(
            be.transfers(),
            Transfers {
                to_device: 1,
                to_device_elements: 4,
                to_host: 1,
                to_host_elements: 2 * v,
            }
        );
    }
}
