//! The small heads around the language model: understanding aligner, generation embedding,
//! generation aligner and generation head.

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::activation::gelu;

use crate::config::JanusConfig;
use crate::load::Weights;

use super::{Linear, Mlp};

/// Image-token head: `Linear(D, H) → GELU → Linear(H, codebook)`, read from the hidden state after
/// the language model's final norm.
#[derive(Module, Debug)]
pub struct GenHead {
    output_mlp_projector: Linear,
    vision_head: Linear,
}

impl GenHead {
    /// Under a quantized weight format the head keeps the file's storage (bf16 for Janus): its
    /// logits feed classifier-free guidance, which multiplies their errors by the guidance weight.
    /// At Janus-Pro-1B size this raised the `q8_0` guided-logit cosine against f32 from 0.99903 to
    /// 0.99913 (mean over 576 steps) and top-1 agreement from 89.7 % to 91.5 %, for 2 % of the
    /// weights (`BENCHMARKS.md`, quality table).
    pub(crate) fn load(w: &mut Weights<'_>, c: &JanusConfig) -> Self {
        let h = &c.gen_head;
        GenHead {
            output_mlp_projector: Linear::load_as(
                w,
                "gen_head.output_mlp_projector",
                h.input_dim,
                h.hidden_dim,
                true,
                false,
            ),
            vision_head: Linear::load_as(
                w,
                "gen_head.vision_head",
                h.hidden_dim,
                h.num_tokens,
                true,
                false,
            ),
        }
    }

    /// Image-token logits for hidden states `[.., D]`, with the row-invariant products of a
    /// decoding step ([`Linear::forward_step`]): a row's logits do not depend on the other rows.
    pub fn forward<const D: usize>(&self, hidden: Tensor<D>) -> Tensor<D> {
        self.vision_head
            .forward_step(gelu(self.output_mlp_projector.forward_step(hidden)))
    }
}

/// The parts that connect images to the language model: the parameters Janus' first training
/// stage trains.
#[derive(Module, Debug)]
pub struct Heads {
    /// Understanding aligner: SigLIP features → LLM embeddings.
    pub aligner: Mlp,
    /// Generation embedding table (its own table, not the VQ codebook).
    pub gen_embed: Param<Tensor<2>>,
    /// Generation aligner: `gen_embed` rows → LLM embeddings.
    pub gen_aligner: Mlp,
    /// Generation head: hidden states → image-token logits.
    pub gen_head: GenHead,
}

impl Heads {
    pub(crate) fn load(w: &mut Weights<'_>, c: &JanusConfig) -> Self {
        Heads {
            aligner: Mlp::load(w, "aligner", &c.aligner),
            gen_embed: w.param("gen_embed.weight", [c.gen_embed_tokens, c.gen_embed_dim]),
            gen_aligner: Mlp::load(w, "gen_aligner", &c.gen_aligner),
            gen_head: GenHead::load(w, c),
        }
    }
}
