//! The understanding vision path against the reference: SigLIP features and aligner output, for
//! the tiny transformers checkpoint and the official SigLIP-L/16 at 384 px.

mod common;

use burn::tensor::{Tensor, TensorData};
use common::*;
use janus_core::{ComputeDType, JanusModel};

fn pixels(t: &RefTensor, device: &janus_core::Device) -> Tensor<4> {
    let v: Vec<f32> = t.values.iter().map(|&x| x as f32).collect();
    let s = &t.shape;
    Tensor::from_data(TensorData::new(v, [s[0], s[1], s[2], s[3]]), device)
}

#[test]
fn hf_vision_and_aligner_match_transformers() {
    let device = device();
    for dir in ["hf-tiny", "hf-tiny-bf16-sharded"] {
        let model = JanusModel::load(&fixture(dir), &device, ComputeDType::F32).unwrap();
        let r = read_reference(&fixture(dir).join("expected/multimodal.safetensors"));
        let feats = model.vision.forward(pixels(&r["pixel_values"], &device));
        let (shape, v) = values(feats.clone());
        let d_feats = max_abs_diff(&shape, &v, &r["vision_hidden"]);
        let (shape, v) = values(model.heads.aligner.forward(feats));
        let d_embeds = max_abs_diff(&shape, &v, &r["image_embeds"]);
        println!("{dir}: SigLIP max |Δ| {d_feats:.2e}, aligner {d_embeds:.2e}");
        assert!(
            d_feats < 1e-4 && d_embeds < 1e-4,
            "{dir}: {d_feats} {d_embeds}"
        );
    }
}

#[test]
fn original_siglip_l16_matches_the_official_tower() {
    let device = device();
    let model = JanusModel::load(
        &original_checkpoint("safetensors"),
        &device,
        ComputeDType::F32,
    )
    .unwrap();
    let r = read_reference(&fixture("original-tiny/expected/understand.safetensors"));
    // The input: the 48×48 image upscaled 8× (nearest) to 384, (u8/255 − 0.5)/0.5 (a square
    // image at the model's size passes the processor unresized).
    let s = 384;
    let chw = upscaled_pixels(&r["image_small_u8"], s);
    let input = RefTensor {
        shape: vec![1, 3, s, s],
        values: chw,
    };
    let feats = model.vision.forward(pixels(&input, &device));
    assert_eq!(feats.dims(), [1, 576, 1024]);
    let (shape, v) = values(feats.clone().narrow(1, 0, 8));
    let d_feats = max_abs_diff(&shape, &v, &r["vision_features_head"]);
    let (shape, v) = values(model.heads.aligner.forward(feats));
    let d_embeds = max_abs_diff(&shape, &v, &r["image_embeds"]);
    println!("official SigLIP-L/16: features max |Δ| {d_feats:.2e}, aligner {d_embeds:.2e}");
    assert!(d_feats < 1e-4 && d_embeds < 1e-4, "{d_feats} {d_embeds}");
}
