//! Operator tools behind `tern certs ...`: bulk import of certificate files into Redis in the Redis plugin's
//! layout.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use std::time::{Duration, Instant};

use tern::certs;
use tern::sni::ServerName;
use tern::store::{RedisStore, StoreError};

/// How certificates are laid out in Redis (the Redis plugin's `layout` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// `<prefix><name>.crt` and `<prefix><name>.key` string keys.
    Keys,
    /// One hash `<prefix><name>` with fields `crt` and `key`.
    Hash,
}

/// What an import did.
#[derive(Debug, Default)]
pub struct ImportReport {
    /// Pairs written.
    pub imported: usize,
    /// Files skipped, with the reason.
    pub skipped: Skipped,
    /// Time spent reading and validating.
    pub validate_time: Duration,
    /// Time spent writing to Redis.
    pub write_time: Duration,
}

/// A validated pair ready to write.
struct Pair {
    name: String,
    chain: Vec<u8>,
    key: Vec<u8>,
}

/// Imports every `<name>.crt` with its `<name>.key` from `dir`. Each pair is validated first (PEM parses, key
/// matches the leaf, the leaf covers `<name>`, wildcards included); invalid pairs are skipped and reported.
pub async fn import_dir(
    dir: &Path,
    store: &RedisStore,
    layout: Layout,
    prefix: &str,
) -> Result<ImportReport, ImportError> {
    let started = Instant::now();
    let dir = dir.to_path_buf();
    let (pairs, skipped) = tokio::task::spawn_blocking(move || read_and_validate(&dir))
        .await
        .map_err(|e| ImportError::Read(e.to_string()))??;
    let validate_time = started.elapsed();
    let started = Instant::now();
    let mut commands = Vec::with_capacity(pairs.len() * 2);
    for pair in &pairs {
        match layout {
            Layout::Keys => {
                commands.push(redis::cmd("SET").arg(format!("{prefix}{}.crt", pair.name)).arg(&pair.chain).clone());
                commands.push(redis::cmd("SET").arg(format!("{prefix}{}.key", pair.name)).arg(&pair.key).clone());
            }
            Layout::Hash => commands.push(
                redis::cmd("HSET")
                    .arg(format!("{prefix}{}", pair.name))
                    .arg("crt")
                    .arg(&pair.chain)
                    .arg("key")
                    .arg(&pair.key)
                    .clone(),
            ),
        }
    }
    store.write_all(commands).await?;
    Ok(ImportReport { imported: pairs.len(), skipped, validate_time, write_time: started.elapsed() })
}

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The directory could not be read.
    #[error("reading the directory: {0}")]
    Read(String),
    /// Writing to Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Files skipped by an import, with the reason.
type Skipped = Vec<(PathBuf, String)>;

fn read_and_validate(dir: &Path) -> Result<(Vec<Pair>, Skipped), ImportError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ImportError::Read(format!("{}: {e}", dir.display())))?;
    let mut cert_files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "crt"))
        .collect();
    cert_files.sort();
    // Parsing dominates (tens of microseconds a pair): spread it over the cores.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = cert_files.len().div_ceil(threads).max(1);
    let results: Vec<Result<Pair, (PathBuf, String)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = cert_files
            .chunks(chunk)
            .map(|files| scope.spawn(move || files.iter().map(|f| validate(f)).collect::<Vec<_>>()))
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    let mut pairs = Vec::new();
    let mut skipped = Vec::new();
    for result in results {
        match result {
            Ok(pair) => pairs.push(pair),
            Err(reason) => skipped.push(reason),
        }
    }
    Ok((pairs, skipped))
}

fn validate(cert_file: &Path) -> Result<Pair, (PathBuf, String)> {
    let skip = |reason: String| (cert_file.to_path_buf(), reason);
    let name = cert_file.file_stem().and_then(|s| s.to_str()).ok_or_else(|| skip("file name is not UTF-8".into()))?;
    // A wildcard file (`*.example.com.crt`) is checked through a name it must cover.
    let probe = ServerName::probe_for_pattern(name).map_err(|e| skip(format!("{name:?} is not a host name: {e}")))?;
    let key_file = cert_file.with_extension("key");
    let chain = std::fs::read(cert_file).map_err(|e| skip(e.to_string()))?;
    let key = std::fs::read(&key_file).map_err(|e| skip(format!("{}: {e}", key_file.display())))?;
    // The same checks as serving: a pair tern would refuse is not imported.
    certs::validate_answer(&chain, &key, &probe).map_err(|e| skip(e.to_string()))?;
    Ok(Pair { name: name.to_ascii_lowercase(), chain, key })
}

/// Runs `tern certs import`: fails when nothing was imported.
pub async fn run(dir: PathBuf, url: String, cluster: bool, layout: Layout, prefix: &str) -> Result<()> {
    let store = crate::redis_store(url, cluster);
    let report = import_dir(&dir, &store, layout, prefix).await?;
    for (file, reason) in &report.skipped {
        println!("skipped {}: {reason}", file.display());
    }
    let rate = report.imported as f64 / report.write_time.as_secs_f64().max(1e-9);
    println!(
        "imported {} pair(s), skipped {}; validated in {:.2?}, written in {:.2?} ({rate:.0} pairs/s)",
        report.imported,
        report.skipped.len(),
        report.validate_time,
        report.write_time
    );
    if report.imported == 0 {
        bail!("nothing imported from {}: no valid <name>.crt / <name>.key pair", dir.display());
    }
    Ok(())
}
