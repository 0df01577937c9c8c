//! Set-up before the clock starts: folders, certificates, the two plugin builds, the import, tern's config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::args::Args;
use crate::state::Rng;
use crate::{CHANNEL, DOMAIN, PREFIX};

/// Where a run writes and works, and its seed.
#[derive(Debug)]
pub struct Workspace {
    /// The output folder (absolute).
    pub out: PathBuf,
    /// The scratch folder, removed when the workspace drops.
    _work: tempfile::TempDir,
    /// The scratch folder's absolute path.
    pub dir: PathBuf,
    pub seed: u64,
}

impl Workspace {
    pub fn new(args: &Args) -> Result<Self> {
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("bench/results/soak-{stamp}")));
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let out = std::path::absolute(&out)?;
        let work = tempfile::tempdir()?;
        let dir = std::path::absolute(work.path())?;
        let seed = args
            .seed
            .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1);
        Ok(Self { out, _work: work, dir, seed })
    }
}

/// The soak's certificates: its CA, the host certificates' folder and names, and the default leaf.
#[derive(Debug)]
pub struct Certificates {
    pub ca: Arc<tern_fixtures::TestCa>,
    pub dir: PathBuf,
    pub names: Arc<Vec<String>>,
    pub default_leaf: CertificateDer<'static>,
}

/// A CA, `count` host certificates (in `dir/certs`) and the default certificate.
pub fn issue_certificates(dir: &Path, count: usize) -> Result<Certificates> {
    let ca = Arc::new(tern_fixtures::TestCa::new("tern soak CA")?);
    std::fs::write(dir.join("ca.crt"), ca.pem())?;
    let certs_dir = dir.join("certs");
    std::fs::create_dir_all(&certs_dir)?;
    let names: Arc<Vec<String>> = Arc::new((0..count).map(|i| format!("host{i}.{DOMAIN}")).collect());
    for name in names.iter() {
        let (chain, key) = ca.issue(&[name])?;
        std::fs::write(certs_dir.join(format!("{name}.crt")), chain)?;
        std::fs::write(certs_dir.join(format!("{name}.key")), key)?;
    }
    let (default_chain, default_key) = ca.issue(&[&format!("default.{DOMAIN}")])?;
    std::fs::write(dir.join("default.crt"), &default_chain)?;
    std::fs::write(dir.join("default.key"), default_key)?;
    let default_leaf = CertificateDer::from_pem_slice(default_chain.as_bytes())?;
    Ok(Certificates { ca, dir: certs_dir, names, default_leaf })
}

/// Two builds of the same plugin with different hashes: the second carries one more custom section.
pub fn write_plugin_builds(plugin: &Path, dir: &Path) -> Result<()> {
    let component = std::fs::read(plugin)?;
    std::fs::write(dir.join("plugin-a.wasm"), &component)?;
    std::fs::write(dir.join("plugin-b.wasm"), with_custom_section(&component, "tern-soak", b"build b"))?;
    Ok(())
}

/// `tern certs import` of the certificates' folder into Redis; prints how long generating and importing took.
pub fn import_certificates(
    tern: &Path,
    certs_dir: &Path,
    redis_url: &str,
    count: usize,
    started: Instant,
) -> Result<()> {
    let import = std::process::Command::new(tern)
        .args(["certs", "import"])
        .arg(certs_dir)
        .args(["--redis", redis_url, "--prefix", PREFIX])
        .output()
        .context("tern certs import")?;
    anyhow::ensure!(import.status.success(), "certs import: {}", String::from_utf8_lossy(&import.stderr));
    println!(
        "soak: {} certificates generated and imported in {:.1?} ({})",
        count,
        started.elapsed(),
        String::from_utf8_lossy(&import.stdout).lines().last().unwrap_or("").trim()
    );
    Ok(())
}

/// What tern's config is made of.
#[derive(Debug, Clone)]
pub struct Setup {
    pub dir: PathBuf,
    pub redis_url: String,
    pub backend: SocketAddr,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub probe: String,
    pub cache_ttl: u64,
    pub max_stale: u64,
}

impl Setup {
    /// Writes the config (atomically: tern may read it at any moment) with the plugin at `plugin_file`.
    pub fn write_config(&self, path: &Path, plugin_file: &str) -> Result<()> {
        let Setup { dir, redis_url, backend, listen, admin, probe, cache_ttl, max_stale } = self;
        let config = format!(
            "# Written by bench/src/soak/.\n\
             [server]\nhandshake_timeout = \"10s\"\nshutdown_grace = \"5s\"\n\n\
             [log]\nlevel = \"info\"\naccess = false\n\n\
             [cache]\nmax_entries = 20000\nttl = \"{cache_ttl}s\"\nnegative_ttl = \"30s\"\nmax_stale = \"{max_stale}s\"\n\n\
             [[redis]]\nname = \"certs\"\nurls = [\"{redis_url}\"]\ntimeout = \"250ms\"\n\n\
             [invalidation]\nredis = \"certs\"\nchannel = \"{CHANNEL}\"\n\n\
             [[certificate]]\nname = \"fallback\"\ncert = \"default.crt\"\nkey = \"default.key\"\nnames = []\n\n\
             [[plugin]]\nname = \"redis\"\npath = \"{plugin_file}\"\nprobe_names = [\"{probe}\"]\n\
             grants.kv = {{ redis = \"certs\", prefixes = [\"{PREFIX}\"] }}\n\
             settings = {{ cert_key = \"{PREFIX}{{name}}.crt\", key_key = \"{PREFIX}{{name}}.key\" }}\n\n\
             [[listener]]\nname = \"soak\"\nbind = \"{listen}\"\nplugin = \"redis\"\ndefault_certificate = \"fallback\"\n\
             backend = \"http://{backend}\"\n\n\
             [admin]\nbind = \"{admin}\"\n"
        );
        let tmp = dir.join(".tern.toml.tmp");
        std::fs::write(&tmp, config)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// `component` with one more custom section at the end (a different SHA-256, the same behaviour).
fn with_custom_section(component: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut body = Vec::new();
    leb128(name.len(), &mut body);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(payload);
    let mut out = component.to_vec();
    out.push(0);
    leb128(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

/// A free loopback port below the kernel's ephemeral range (so no outgoing connection can be given it).
pub fn quiet_port(seed: u64) -> Result<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u16 = range.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(32768);
    let mut rng = Rng::new(seed);
    if low > 11_000 {
        for _ in 0..500 {
            let port = 10_000 + rng.below(usize::from(low) - 10_000) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
