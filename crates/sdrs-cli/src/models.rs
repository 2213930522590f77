//! `sdrs models list|pull|rm`: the catalogue of well-known models and the Hub cache.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use indicatif::HumanBytes;
use sdrs::hub::{catalogue, CatalogueEntry, Hub, CATALOGUE};

use crate::download::{announce, DownloadBars};

/// Arguments of `sdrs models`.
#[derive(Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// The catalogue, where each model is, and the model folder's contents.
    List,
    /// Download a catalogue model into the Hugging Face cache.
    Pull { name: String },
    /// Delete a catalogue model's files from the Hugging Face cache.
    Rm { name: String },
}

pub fn run(args: ModelsArgs) -> Result<()> {
    let hub = Hub::from_env();
    match args.action {
        Action::List => list(&hub),
        Action::Pull { name } => {
            let entry = entry(&name)?;
            if let Some(path) = hub.cached(entry) {
                eprintln!("{name} is already downloaded");
                println!("{}", path.display());
                return Ok(());
            }
            announce(&hub, entry);
            let path = hub.pull(entry, &mut DownloadBars::default())?;
            println!("{}", path.display());
            Ok(())
        }
        Action::Rm { name } => {
            let entry = entry(&name)?;
            let freed = hub.remove(entry)?;
            if freed == 0 {
                eprintln!("{name} is not in the Hub cache {}", hub.cache_dir.display());
            } else {
                eprintln!("removed {name}: {} freed", HumanBytes(freed));
            }
            if let Some(path) = hub.local(&name) {
                eprintln!("{} is yours and was left in place", path.display());
            }
            Ok(())
        }
    }
}

fn entry(name: &str) -> Result<&'static CatalogueEntry> {
    match catalogue::find(name) {
        Some(entry) => Ok(entry),
        None => bail!(
            "{name:?} is not in the catalogue; known models: {}",
            CATALOGUE
                .iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn list(hub: &Hub) -> Result<()> {
    for entry in CATALOGUE {
        let default = if entry.name == hub.default_model {
            " (default)"
        } else {
            ""
        };
        let place = match (hub.local(entry.name), hub.cached(entry)) {
            (Some(path), _) => format!("in the model folder: {}", path.display()),
            (None, Some(path)) => format!(
                "downloaded, {}: {}",
                HumanBytes(folder_size(&path)),
                path.display()
            ),
            (None, None) => "not downloaded".into(),
        };
        println!("{}{default}  {}", entry.name, entry.description);
        println!("    {}  {place}", entry.repo);
    }
    let others: Vec<String> = std::fs::read_dir(&hub.model_dir)
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    let stem = n.trim_end_matches(".safetensors").trim_end_matches(".ckpt");
                    catalogue::find(stem).is_none()
                })
                .collect()
        })
        .unwrap_or_default();
    println!("model folder {}:", hub.model_dir.display());
    if others.is_empty() {
        println!("    (nothing else)");
    }
    for name in others {
        println!("    {name}");
    }
    let loras = sdrs::addon_dir(&hub.model_dir, "loras");
    println!("LoRA folder {} (<lora:NAME:1>):", loras.display());
    let list = sdrs::lora::LoraLibrary::new(Some(loras)).list();
    if list.is_empty() {
        println!("    (none)");
    }
    for entry in list {
        match entry.alias {
            Some(alias) => println!("    {}  (alias {alias})", entry.name),
            None => println!("    {}", entry.name),
        }
    }
    let embeddings = sdrs::addon_dir(&hub.model_dir, "embeddings");
    println!(
        "embeddings folder {} (by name in a prompt):",
        embeddings.display()
    );
    let mut names: Vec<String> = std::fs::read_dir(&embeddings)
        .map(|dir| {
            dir.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| sdrs::embeddings::EXTENSIONS.contains(&e))
                })
                .filter_map(|p| Some(p.file_stem()?.to_string_lossy().into_owned()))
                .take(sdrs::limits::MAX_ADDON_FILES)
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        println!("    (none)");
    }
    for name in names {
        println!("    {name}");
    }
    Ok(())
}

/// Bytes under `dir`, following the snapshot's links to their blobs.
fn folder_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let path = e.path();
                    if path.is_dir() {
                        folder_size(&path)
                    } else {
                        std::fs::metadata(&path).map_or(0, |m| m.len())
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
