//! Finding a model by name: a local folder, or a Hugging Face Hub id (`org/name`) looked up in the
//! standard Hugging Face cache and downloaded into it when it is not there.
//!
//! The cache is the one the Python `huggingface_hub` package uses: `$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`, with
//! one `models--org--name/` folder per repository holding `refs/main` (the commit in use) and
//! `snapshots/<commit>/` (the files). `HF_HUB_OFFLINE=1` forbids the network: a model that is not
//! complete in the cache is then an [`Error::Hub`].
//!
//! ```no_run
//! # fn main() -> janus_core::Result<()> {
//! let dir = janus_core::hub::resolve("deepseek-ai/Janus-Pro-1B", None)?;
//! let janus = janus_core::pipeline::Janus::load(&dir, &Default::default())?;
//! # let _ = janus;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// Files a model folder may hold besides the weights; each is fetched when the repository has it.
pub const METADATA_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Weight files in order of preference (an index names its shards), as the loader looks for them.
const WEIGHT_FILES: &[&str] = &[
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
];

/// What [`resolve`] reports while it works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubEvent<'a> {
    /// The model is not complete in the cache: asking the hub for the repository's file list.
    Listing {
        /// The repository id.
        repo: &'a str,
    },
    /// A file download starts.
    Start {
        /// The file's name in the repository.
        file: &'a str,
        /// Its size in bytes (0 when unknown).
        size: u64,
    },
    /// Part of the current file has arrived.
    Progress {
        /// The file's name in the repository.
        file: &'a str,
        /// Bytes received so far.
        done: u64,
        /// Its size in bytes (0 when unknown).
        total: u64,
    },
    /// The current file is complete.
    Finish {
        /// The file's name in the repository.
        file: &'a str,
    },
}

/// A callback receiving [`HubEvent`]s.
pub type Progress<'a> = Option<&'a mut dyn FnMut(HubEvent<'_>)>;

/// The Hugging Face cache folder from the environment (see the module documentation).
pub fn cache_dir() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(home) = var("HF_HOME") {
        return Ok(PathBuf::from(home).join("hub"));
    }
    let cache = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .or_else(|| var("USERPROFILE").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| {
            Error::Hub("cannot find the Hugging Face cache: set HF_HOME or HF_HUB_CACHE".into())
        })?;
    Ok(cache.join("huggingface").join("hub"))
}

/// Whether `HF_HUB_OFFLINE` forbids the network (`1`, `true`, `yes` or `on`).
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// Whether `model` has the form of a hub id, `org/name` (letters, digits, `-`, `_`, `.`).
pub fn is_hub_id(model: &str) -> bool {
    let part = |s: &str| {
        !s.is_empty()
            && !s.starts_with(['.', '-'])
            && !s.contains("..")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(model.split_once('/'), Some((org, name)) if part(org) && part(name))
}

/// The folder of `model`: an existing local folder as is; otherwise a hub id looked up in the
/// cache from the environment and downloaded when missing (see [`resolve_in`]).
pub fn resolve(model: &str, progress: Progress<'_>) -> Result<PathBuf> {
    let local = Path::new(model);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    if local.exists() {
        return Err(crate::pipeline::not_a_folder(local));
    }
    if !is_hub_id(model) {
        return Err(not_found(model));
    }
    resolve_in(model, &cache_dir()?, offline_from_env(), progress)
}

/// [`resolve`] with the cache folder and the offline switch given: an existing local folder as
/// is; a hub id's cached snapshot (`refs/main`) when it holds a complete model; else, unless
/// `offline`, the model's files downloaded into `cache` (configuration, tokenizer, processor and
/// chat-template files that exist, and one set of weights: safetensors preferred, sharded or not).
pub fn resolve_in(
    model: &str,
    cache: &Path,
    offline: bool,
    progress: Progress<'_>,
) -> Result<PathBuf> {
    let local = Path::new(model);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    if local.exists() {
        return Err(crate::pipeline::not_a_folder(local));
    }
    if !is_hub_id(model) {
        return Err(not_found(model));
    }
    if let Some(dir) = cached_snapshot(cache, model) {
        return Ok(dir);
    }
    if offline {
        return Err(Error::Hub(format!(
            "{model} is not (completely) in the Hugging Face cache {} and HF_HUB_OFFLINE forbids downloading it",
            cache.display()
        )));
    }
    download(model, cache, progress)
}

/// The cache folder of a repository: `models--org--name`.
pub fn repo_folder(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The snapshot `refs/main` points at, when it holds a complete model.
pub fn cached_snapshot(cache: &Path, repo: &str) -> Option<PathBuf> {
    let folder = repo_folder(cache, repo);
    let commit = std::fs::read_to_string(folder.join("refs").join("main")).ok()?;
    let commit = commit.trim();
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return None;
    }
    let dir = folder.join("snapshots").join(commit);
    is_complete(&dir).then_some(dir)
}

/// Whether a folder holds a configuration, a tokenizer and a full set of weights (every shard
/// that an index names).
pub fn is_complete(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() || !dir.join("tokenizer.json").is_file() {
        return false;
    }
    let Some(&weights) = WEIGHT_FILES.iter().find(|f| dir.join(f).is_file()) else {
        return false;
    };
    if !weights.ends_with(".index.json") {
        return true;
    }
    match index_shards(&dir.join(weights)) {
        Ok(shards) => shards.iter().all(|s| dir.join(s).is_file()),
        Err(_) => false,
    }
}

fn not_found(model: &str) -> Error {
    Error::MissingFile {
        dir: PathBuf::from(model),
        message: "no such model folder (and not a hub id of the form org/name)".into(),
    }
}

/// The shard files an index's `weight_map` names.
fn index_shards(index: &Path) -> Result<BTreeSet<String>> {
    let value = crate::config::read_json(index)?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Checkpoint {
            path: index.to_path_buf(),
            message: "no `weight_map` object".into(),
        })?;
    map.values()
        .map(|v| match v.as_str() {
            Some(s) if !s.contains("..") && !s.starts_with('/') => Ok(s.to_string()),
            _ => Err(Error::Checkpoint {
                path: index.to_path_buf(),
                message: format!("bad shard name {v}"),
            }),
        })
        .collect()
}

/// Downloads what the model needs into `cache` and returns its snapshot folder.
fn download(model: &str, cache: &Path, mut progress: Progress<'_>) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;

    let hub_error =
        |what: &str, e: &dyn std::fmt::Display| Error::Hub(format!("{model}: {what}: {e}"));
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| hf_hub::Cache::new(cache.to_path_buf()).token());
    let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf()))
        .with_progress(false)
        .with_token(token)
        .with_retries(2);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT")
        && !endpoint.trim().is_empty()
    {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    let api = builder
        .build()
        .map_err(|e| hub_error("cannot start the hub client", &e))?;
    let repo = api.model(model.to_string());

    if let Some(cb) = progress.as_deref_mut() {
        cb(HubEvent::Listing { repo: model });
    }
    let info = repo.info().map_err(|e| {
        hub_error(
            "cannot list the repository (HF_HUB_OFFLINE=1 uses the cache only)",
            &e,
        )
    })?;
    let listed: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let snapshot = repo_folder(cache, model).join("snapshots").join(&info.sha);

    let mut fetch = |file: &str| -> Result<PathBuf> {
        let here = snapshot.join(file);
        if here.is_file() {
            return Ok(here);
        }
        let reporter = Reporter {
            callback: progress.as_deref_mut(),
            file: file.to_string(),
            done: 0,
            total: 0,
        };
        repo.download_with_progress(file, reporter)
            .map_err(|e| hub_error(&format!("cannot download {file}"), &e))
    };

    for file in METADATA_FILES {
        if listed.contains(file) {
            fetch(file)?;
        }
    }
    let Some(&weights) = WEIGHT_FILES.iter().find(|f| listed.contains(*f)) else {
        return Err(Error::Hub(format!(
            "{model}: the repository has no weights (model.safetensors or pytorch_model.bin, with or without an index)"
        )));
    };
    let weights_path = fetch(weights)?;
    if weights.ends_with(".index.json") {
        for shard in index_shards(&weights_path)? {
            fetch(&shard)?;
        }
    }
    // The files land in the snapshot of the commit the hub served them from.
    let dir = weights_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(snapshot);
    if is_complete(&dir) {
        Ok(dir)
    } else {
        Err(Error::Hub(format!(
            "{model}: the downloaded snapshot {} is not a complete model (config.json, tokenizer.json and weights)",
            dir.display()
        )))
    }
}

/// Passes hf-hub's download progress on as [`HubEvent`]s.
struct Reporter<'a, 'b> {
    callback: Option<&'a mut (dyn FnMut(HubEvent<'_>) + 'b)>,
    file: String,
    done: u64,
    total: u64,
}

impl hf_hub::api::Progress for Reporter<'_, '_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size as u64;
        self.done = 0;
        if let Some(cb) = self.callback.as_deref_mut() {
            cb(HubEvent::Start {
                file: &self.file,
                size: self.total,
            });
        }
    }

    fn update(&mut self, size: usize) {
        self.done += size as u64;
        if let Some(cb) = self.callback.as_deref_mut() {
            cb(HubEvent::Progress {
                file: &self.file,
                done: self.done,
                total: self.total,
            });
        }
    }

    fn finish(&mut self) {
        if let Some(cb) = self.callback.as_deref_mut() {
            cb(HubEvent::Finish { file: &self.file });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
    }

    /// A cache holding `repo` at commit `rev` with the files of a fixture folder (`skip` left out).
    fn fake_cache(repo: &str, fixture_dir: &str, skip: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let cache = tempfile::tempdir().unwrap();
        let folder = repo_folder(cache.path(), repo);
        let rev = "0123456789abcdef0123456789abcdef01234567";
        let snap = folder.join("snapshots").join(rev);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::write(folder.join("refs/main"), format!("{rev}\n")).unwrap();
        for entry in std::fs::read_dir(fixture(fixture_dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            if path.is_file() && !skip.contains(&name.as_str()) {
                std::fs::copy(&path, snap.join(&name)).unwrap();
            }
        }
        (cache, snap)
    }

    #[test]
    fn hub_ids_are_told_from_paths() {
        for id in [
            "deepseek-ai/Janus-Pro-1B",
            "deepseek-community/Janus-Pro-1B",
            "a/b.c_d",
        ] {
            assert!(is_hub_id(id), "{id}");
        }
        for not in [
            "Janus-Pro-1B",
            "./a/b",
            "/a/b",
            "a/b/c",
            "a/",
            "/b",
            "a/..",
            "../b",
            "a b/c",
            "",
        ] {
            assert!(!is_hub_id(not), "{not}");
        }
    }

    #[test]
    fn a_local_folder_is_returned_as_is() {
        let dir = fixture("hf-tiny");
        let empty = tempfile::tempdir().unwrap();
        let got = resolve_in(dir.to_str().unwrap(), empty.path(), true, None).unwrap();
        assert_eq!(got, dir);
    }

    #[test]
    fn a_cached_model_is_found_offline() {
        for fixture_dir in [
            "hf-tiny",
            "hf-tiny-bf16-sharded",
            "hf-tiny-bin-sharded-bf16",
        ] {
            let (cache, snap) = fake_cache("org/tiny", fixture_dir, &[]);
            let mut events = 0;
            let mut count = |_: HubEvent<'_>| events += 1;
            let got = resolve_in("org/tiny", cache.path(), true, Some(&mut count)).unwrap();
            assert_eq!(got, snap, "{fixture_dir}");
            assert_eq!(events, 0, "nothing to download");
            // What it finds loads.
            crate::config::JanusConfig::from_dir(&got).unwrap();
            crate::Checkpoint::open(&got).unwrap();
        }
    }

    #[test]
    fn a_missing_or_incomplete_model_offline_is_a_hub_error() {
        let (cache, _) = fake_cache("org/tiny", "hf-tiny-bf16-sharded", &[]);
        let err = resolve_in("org/other", cache.path(), true, None).unwrap_err();
        assert!(matches!(err, Error::Hub(_)), "{err}");
        assert!(err.to_string().contains("org/other"), "{err}");
        assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");

        // A shard missing: the snapshot is not used.
        let (cache, _) = fake_cache(
            "org/tiny",
            "hf-tiny-bf16-sharded",
            &["model-00002-of-00003.safetensors"],
        );
        let err = resolve_in("org/tiny", cache.path(), true, None).unwrap_err();
        assert!(matches!(err, Error::Hub(_)), "{err}");
        // No tokenizer.
        let (cache, _) = fake_cache("org/tiny", "hf-tiny", &["tokenizer.json"]);
        assert!(resolve_in("org/tiny", cache.path(), true, None).is_err());
        // refs/main pointing nowhere.
        let (cache, _) = fake_cache("org/tiny", "hf-tiny", &[]);
        std::fs::write(
            repo_folder(cache.path(), "org/tiny").join("refs/main"),
            "f00",
        )
        .unwrap();
        assert!(resolve_in("org/tiny", cache.path(), true, None).is_err());
    }

    #[test]
    fn a_path_that_is_not_there_is_a_missing_file_error() {
        let empty = tempfile::tempdir().unwrap();
        let err = resolve_in("no/such/folder", empty.path(), false, None).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    }
}
