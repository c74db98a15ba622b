//! Runs the language model of a Janus checkpoint on a prompt and prints the most likely next
//! tokens.
//!
//! ```sh
//! cargo run --release -p janus-core --example llm_logits -- <MODEL_DIR> "<PROMPT>"
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use janus_core::{ComputeDType, JanusModel, JanusTokenizer};

fn run(dir: PathBuf, prompt: &str) -> janus_core::Result<()> {
    let device = janus_core::default_device();
    let start = std::time::Instant::now();
    let model = JanusModel::load(&dir, &device, ComputeDType::F32)?;
    let tokenizer = JanusTokenizer::from_dir(&dir)?;
    eprintln!("loaded {} in {:.2?}", dir.display(), start.elapsed());

    let ids = tokenizer.encode(prompt, true)?;
    println!("prompt ids: {ids:?}");
    let mut cache = model.llm.new_cache(ids.len());
    let hidden = model
        .llm
        .forward(model.llm.embed(std::slice::from_ref(&ids))?, &mut cache)?;
    let last = hidden.narrow(1, ids.len() - 1, 1);
    let logits: Vec<f32> = model
        .llm
        .logits(last)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .map_err(|e| janus_core::Error::InvalidInput(format!("{e:?}")))?;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    println!("most likely next tokens:");
    for &id in order.iter().take(5) {
        let text = tokenizer.decode(&[id as u32], false)?;
        println!("  {id:>6}  {:>9.4}  {text:?}", logits[id]);
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(prompt)) = (args.next(), args.next()) else {
        eprintln!("usage: llm_logits <MODEL_DIR> <PROMPT>");
        return ExitCode::from(2);
    };
    match run(PathBuf::from(dir), &prompt) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
