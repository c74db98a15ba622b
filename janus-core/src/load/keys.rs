//! Tensor names: the module tree uses the original DeepSeek names; the Hugging Face layout is
//! one translation table away (its SigLIP splits the fused `qkv` into three tensors).

use crate::config::Layout;

/// Translates canonical tensor names into the file names of one layout.
pub(crate) struct FileKeys {
    layout: Layout,
}

impl FileKeys {
    pub(crate) fn new(layout: Layout) -> Self {
        FileKeys { layout }
    }

    /// The file tensors that make up the canonical tensor `name` (several are concatenated
    /// along the first axis).
    pub(crate) fn file_keys(&self, name: &str) -> Vec<String> {
        match self.layout {
            Layout::Original => vec![name.to_string()],
            Layout::HuggingFace => hf_keys(name),
        }
    }

    /// Tensors present in real checkpoints that inference does not use (the reference ignores
    /// them too): SigLIP's attention-pool head, the VQ usage counter, RoPE buffers.
    pub(crate) fn ignored(&self, file_key: &str) -> bool {
        if file_key.ends_with("rotary_emb.inv_freq") {
            return true;
        }
        match self.layout {
            Layout::Original => {
                file_key.starts_with("vision_model.vision_tower.attn_pool.")
                    || file_key == "gen_vision_model.quantize.codebook_used"
            }
            Layout::HuggingFace => file_key.ends_with("embeddings.position_ids"),
        }
    }
}

/// `aligner.layers.{2k}` (Linear layers between GELUs) → HF `fc1` / `hidden_layers.{k-1}`.
fn mlp_layer(rest: &str, hf_prefix: &str) -> Option<String> {
    let (idx, tail) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    if !idx.is_multiple_of(2) {
        return None;
    }
    Some(if idx == 0 {
        format!("{hf_prefix}.fc1.{tail}")
    } else {
        format!("{hf_prefix}.hidden_layers.{}.{tail}", idx / 2 - 1)
    })
}

fn hf_keys(name: &str) -> Vec<String> {
    const TOWER: &str = "vision_model.vision_tower.";
    if let Some(rest) = name.strip_prefix(TOWER) {
        let v = "model.vision_model";
        let one = |s: String| vec![s];
        if rest == "pos_embed" {
            return one(format!("{v}.embeddings.position_embedding.weight"));
        }
        if let Some(t) = rest.strip_prefix("patch_embed.proj.") {
            return one(format!("{v}.embeddings.patch_embedding.{t}"));
        }
        if let Some(t) = rest.strip_prefix("norm.") {
            return one(format!("{v}.post_layernorm.{t}"));
        }
        if let Some(b) = rest.strip_prefix("blocks.")
            && let Some((i, t)) = b.split_once('.')
        {
            let layer = format!("{v}.encoder.layers.{i}");
            if let Some(p) = t.strip_prefix("attn.qkv.") {
                return ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .map(|q| format!("{layer}.self_attn.{q}.{p}"))
                    .collect();
            }
            if let Some(p) = t.strip_prefix("attn.proj.") {
                return one(format!("{layer}.self_attn.projection_layer.{p}"));
            }
            if let Some(p) = t.strip_prefix("norm1.") {
                return one(format!("{layer}.layer_norm1.{p}"));
            }
            if let Some(p) = t.strip_prefix("norm2.") {
                return one(format!("{layer}.layer_norm2.{p}"));
            }
            if let Some(p) = t.strip_prefix("mlp.") {
                return one(format!("{layer}.mlp.{p}"));
            }
        }
        return one(format!("{v}.unknown.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("aligner.layers.")
        && let Some(k) = mlp_layer(rest, "model.aligner")
    {
        return vec![k];
    }
    if let Some(rest) = name.strip_prefix("gen_aligner.layers.")
        && let Some(k) = mlp_layer(rest, "model.generation_aligner")
    {
        return vec![k];
    }
    if let Some(rest) = name.strip_prefix("gen_head.output_mlp_projector.") {
        return vec![format!("model.generation_head.proj_out.{rest}")];
    }
    if let Some(rest) = name.strip_prefix("gen_head.vision_head.") {
        return vec![format!("model.generation_head.vision_head.{rest}")];
    }
    if name == "gen_embed.weight" {
        return vec!["model.generation_embeddings.weight".into()];
    }
    if let Some(rest) = name.strip_prefix("gen_vision_model.") {
        return vec![format!("model.vqmodel.{}", vq_hf(rest))];
    }
    if name == "language_model.lm_head.weight" {
        return vec!["lm_head.weight".into()];
    }
    if let Some(rest) = name.strip_prefix("language_model.model.") {
        return vec![format!("model.language_model.{rest}")];
    }
    vec![name.to_string()]
}

/// VQ sub-tree: `encoder.conv_blocks` → `encoder.down`, `decoder.conv_blocks` → `decoder.up`,
/// `.res.` → `.block.`, `mid.{0,1,2}` → `mid.{block_1,attn_1,block_2}`.
fn vq_hf(rest: &str) -> String {
    let mut parts: Vec<String> = rest.split('.').map(str::to_string).collect();
    if parts.len() >= 2 && parts[1] == "conv_blocks" {
        parts[1] = match parts[0].as_str() {
            "encoder" => "down".into(),
            _ => "up".into(),
        };
        if parts.len() >= 4 && parts[3] == "res" {
            parts[3] = "block".into();
        }
    }
    if parts.len() >= 3 && parts[1] == "mid" {
        parts[2] = match parts[2].as_str() {
            "0" => "block_1".into(),
            "1" => "attn_1".into(),
            "2" => "block_2".into(),
            other => other.to_string(),
        };
    }
    parts.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf(name: &str) -> Vec<String> {
        FileKeys::new(Layout::HuggingFace).file_keys(name)
    }

    #[test]
    fn hf_translation_table() {
        assert_eq!(
            hf("vision_model.vision_tower.pos_embed"),
            ["model.vision_model.embeddings.position_embedding.weight"]
        );
        assert_eq!(
            hf("vision_model.vision_tower.blocks.3.attn.qkv.bias"),
            [
                "model.vision_model.encoder.layers.3.self_attn.q_proj.bias",
                "model.vision_model.encoder.layers.3.self_attn.k_proj.bias",
                "model.vision_model.encoder.layers.3.self_attn.v_proj.bias"
            ]
        );
        assert_eq!(
            hf("vision_model.vision_tower.blocks.0.attn.proj.weight"),
            ["model.vision_model.encoder.layers.0.self_attn.projection_layer.weight"]
        );
        assert_eq!(
            hf("vision_model.vision_tower.norm.bias"),
            ["model.vision_model.post_layernorm.bias"]
        );
        assert_eq!(hf("aligner.layers.0.weight"), ["model.aligner.fc1.weight"]);
        assert_eq!(
            hf("aligner.layers.2.bias"),
            ["model.aligner.hidden_layers.0.bias"]
        );
        assert_eq!(
            hf("gen_aligner.layers.4.weight"),
            ["model.generation_aligner.hidden_layers.1.weight"]
        );
        assert_eq!(
            hf("gen_vision_model.decoder.conv_blocks.1.res.2.conv1.weight"),
            ["model.vqmodel.decoder.up.1.block.2.conv1.weight"]
        );
        assert_eq!(
            hf("gen_vision_model.encoder.conv_blocks.0.downsample.conv.bias"),
            ["model.vqmodel.encoder.down.0.downsample.conv.bias"]
        );
        assert_eq!(
            hf("gen_vision_model.decoder.mid.1.q.weight"),
            ["model.vqmodel.decoder.mid.attn_1.q.weight"]
        );
        assert_eq!(
            hf("gen_vision_model.quantize.embedding.weight"),
            ["model.vqmodel.quantize.embedding.weight"]
        );
        assert_eq!(
            hf("gen_head.output_mlp_projector.weight"),
            ["model.generation_head.proj_out.weight"]
        );
        assert_eq!(
            hf("gen_embed.weight"),
            ["model.generation_embeddings.weight"]
        );
        assert_eq!(
            hf("language_model.model.layers.1.self_attn.q_proj.weight"),
            ["model.language_model.layers.1.self_attn.q_proj.weight"]
        );
        assert_eq!(hf("language_model.lm_head.weight"), ["lm_head.weight"]);
    }

    #[test]
    fn ignored_tensors() {
        let o = FileKeys::new(Layout::Original);
        assert!(o.ignored("vision_model.vision_tower.attn_pool.latent"));
        assert!(o.ignored("gen_vision_model.quantize.codebook_used"));
        assert!(o.ignored("language_model.model.layers.0.self_attn.rotary_emb.inv_freq"));
        assert!(!o.ignored("language_model.model.norm.weight"));
        let h = FileKeys::new(Layout::HuggingFace);
        assert!(h.ignored("model.vision_model.embeddings.position_ids"));
        assert!(!h.ignored("model.vision_model.post_layernorm.weight"));
    }
}
