//! The language model's settings: a transformers `LlamaConfig` (`language_config` in the
//! original layout, `text_config` in the Hugging Face one), with its defaults for missing keys.

use super::{Obj, TextConfig};
use crate::error::Result;

/// `language_config` / `text_config`: a transformers `LlamaConfig`, with its defaults for missing keys.
pub(super) fn parse(obj: &Obj<'_>, tie_default: bool) -> Result<TextConfig> {
    if let Some(act) = obj.opt_str("hidden_act")?
        && act != "silu"
    {
        return Err(obj.err(
            "hidden_act",
            &format!("`{act}` is not supported (only silu)"),
        ));
    }
    for key in ["attention_bias", "mlp_bias"] {
        if obj.opt_bool(key)? == Some(true) {
            return Err(obj.err(key, "biases in the language model are not supported"));
        }
    }
    let hidden_size = obj.positive("hidden_size", obj.usize_or("hidden_size", 4096)?)?;
    let heads = obj.positive(
        "num_attention_heads",
        obj.usize_or("num_attention_heads", 32)?,
    )?;
    let kv_heads = obj.positive(
        "num_key_value_heads",
        obj.usize_or("num_key_value_heads", heads)?,
    )?;
    if heads % kv_heads != 0 {
        return Err(obj.err(
            "num_key_value_heads",
            &format!("{kv_heads} does not divide the {heads} attention heads"),
        ));
    }
    let head_dim = match obj.opt_usize("head_dim")? {
        Some(h) => obj.positive("head_dim", h)?,
        None => {
            if hidden_size % heads != 0 {
                return Err(obj.err(
                    "num_attention_heads",
                    &format!("{heads} heads do not divide hidden_size {hidden_size}"),
                ));
            }
            hidden_size / heads
        }
    };
    if head_dim % 2 != 0 {
        return Err(obj.err("head_dim", "must be even for rotary embeddings"));
    }
    // RoPE: transformers 4.x writes `rope_theta` (+ `rope_scaling`); 5.x writes `rope_parameters`.
    let mut rope_theta = obj.f64_or("rope_theta", 10000.0)?;
    for key in ["rope_scaling", "rope_parameters"] {
        if let Some(rope) = obj.opt_obj(key)? {
            if let Some(kind) = rope.opt_str("rope_type")?.or(rope.opt_str("type")?)
                && kind != "default"
            {
                return Err(rope.err(
                    "rope_type",
                    &format!("`{kind}` RoPE scaling is not supported"),
                ));
            }
            if let Some(theta) = rope.opt_f64("rope_theta")? {
                rope_theta = theta;
            }
        }
    }
    if rope_theta <= 0.0 {
        return Err(obj.err("rope_theta", "must be positive"));
    }
    let rms_norm_eps = obj.f64_or("rms_norm_eps", 1e-6)?;
    if rms_norm_eps < 0.0 {
        return Err(obj.err("rms_norm_eps", "must not be negative"));
    }
    Ok(TextConfig {
        vocab_size: obj.positive("vocab_size", obj.usize_or("vocab_size", 32000)?)?,
        hidden_size,
        intermediate_size: obj.positive(
            "intermediate_size",
            obj.usize_or("intermediate_size", 11008)?,
        )?,
        num_hidden_layers: obj
            .positive("num_hidden_layers", obj.usize_or("num_hidden_layers", 32)?)?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        max_position_embeddings: obj.positive(
            "max_position_embeddings",
            obj.usize_or("max_position_embeddings", 2048)?,
        )?,
        tie_word_embeddings: obj.opt_bool("tie_word_embeddings")?.unwrap_or(tie_default),
    })
}
