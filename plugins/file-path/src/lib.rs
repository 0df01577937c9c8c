//! The file-path plugin: serves `<dir>/<servername>.crt` and `.key` from the directory the operator granted to
//! the plugin (mounted read-only at `/`), falling back to the wildcard files for `*.<parent>`.
//!
//! Settings (all optional):
//! - `dir`: folder inside the granted directory, default `/`.
//! - `cert_template`, `key_template`: file names, `{name}` replaced by the server name (or the wildcard name);
//!   defaults `{name}.crt` and `{name}.key`.
//! - `wildcard`: `true` (default) to try `*.<parent>` when the exact name has no files.
//! - `wildcard_label`: what stands for `*` in wildcard file names, default `*` (e.g. `_wildcard` gives
//!   `_wildcard.example.com.crt`).
//! - `ttl_seconds`: cache TTL hint for every answer; default: the host's TTL.
//!
//! The host guarantees the server name is plain DNS syntax (no `/`, no `..`), and the WASI sandbox confines every
//! path to the granted directory whatever the templates say.

use std::io::ErrorKind;
use std::time::Duration;
use tern_guest::{Certificate, Selection, Selector, config, exact_or_wildcard};

struct FilePath;

impl Selector for FilePath {
    fn select(servername: &str) -> Result<Selection, String> {
        let settings = Settings::load()?;
        // Wildcard files may spell `*` differently (wildcard_label); exact names contain no `*`.
        exact_or_wildcard(servername, settings.wildcard, |name| {
            settings.read_pair(&name.replacen('*', &settings.wildcard_label, 1))
        })
    }
}

tern_guest::export_selector!(FilePath);

/// The longest file name common file systems store (ext4, XFS, btrfs: 255 bytes).
const MAX_FILE_NAME: usize = 255;

/// `ENAMETOOLONG`, however the platform spells it (WASI maps it to `InvalidFilename`).
fn is_name_too_long(err: &std::io::Error) -> bool {
    err.kind() == ErrorKind::InvalidFilename || err.to_string().contains("too long")
}

struct Settings {
    dir: String,
    cert_template: String,
    key_template: String,
    wildcard: bool,
    wildcard_label: String,
    ttl: Option<Duration>,
}

impl Settings {
    fn load() -> Result<Self, String> {
        let wildcard = match config::get_or("wildcard", "true").as_str() {
            "true" => true,
            "false" => false,
            other => {
                return Err(format!("setting wildcard: expected true or false, got {other:?}"));
            }
        };
        let ttl = match config::get("ttl_seconds") {
            None => None,
            Some(raw) => Some(Duration::from_secs(
                raw.parse().map_err(|_| format!("setting ttl_seconds: expected whole seconds, got {raw:?}"))?,
            )),
        };
        let settings = Settings {
            dir: config::get_or("dir", "/").trim_end_matches('/').to_string(),
            cert_template: config::get_or("cert_template", "{name}.crt"),
            key_template: config::get_or("key_template", "{name}.key"),
            wildcard,
            wildcard_label: config::get_or("wildcard_label", "*"),
            ttl,
        };
        for (key, template) in [("cert_template", &settings.cert_template), ("key_template", &settings.key_template)] {
            if !template.contains("{name}") {
                return Err(format!("setting {key}: {template:?} does not contain {{name}}"));
            }
        }
        Ok(settings)
    }

    /// Both files for `name`, `None` if either is missing. Other I/O errors are errors: a permission problem must
    /// not look like "unknown name" and silently fall back to the default certificate.
    fn read_pair(&self, name: &str) -> Result<Option<Certificate>, String> {
        let Some(chain) = self.read(&self.cert_template, name)? else {
            return Ok(None);
        };
        let Some(key) = self.read(&self.key_template, name)? else {
            return Ok(None);
        };
        let cert = Certificate::new(chain, key);
        Ok(Some(match self.ttl {
            Some(ttl) => cert.with_ttl(ttl),
            None => cert,
        }))
    }

    fn read(&self, template: &str, name: &str) -> Result<Option<String>, String> {
        let file = template.replace("{name}", name);
        // A name whose file name could not exist cannot have a certificate here: that is "not found", not a
        // failure (any client can send such a name; an error would count against the plugin).
        if file.rsplit('/').next().is_some_and(|f| f.len() > MAX_FILE_NAME) {
            return Ok(None);
        }
        let path = format!("{}/{}", self.dir, file);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(err) if err.kind() == ErrorKind::NotFound || is_name_too_long(&err) => Ok(None),
            Err(err) => Err(format!("reading {path}: {err}")),
        }
    }
}
