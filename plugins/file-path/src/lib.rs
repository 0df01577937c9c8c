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
//! - `rsa_cert_template`, `rsa_key_template`: a second certificate for the same name, served to clients that
//!   cannot use the first one's key type (an RSA one beside ECDSA); defaults: the certificate and key templates
//!   with `.rsa` appended (`{name}.crt.rsa`, `{name}.key.rsa`: appended, so that no client-chosen name such as
//!   `x.rsa` can make one name's RSA file be read as another name's certificate).
//! - `route_template`: where the name's traffic goes, default `{name}.route`. The file holds one line:
//!   `pool NAME` (an `[[upstream]]`), `origin http://host:port` or `origin https://host:port`, or
//!   `passthrough host:port` (no certificate needed: tern forwards the connection untouched). Without the file,
//!   the listener's backend. A route file for the exact name applies when the certificate comes from the
//!   wildcard files (one wildcard certificate, a route per tenant); the wildcard's own route file applies to names
//!   without one. The host checks every route against the plugin's `grants.routes`.
//!
//! The host guarantees the server name is plain DNS syntax (no `/`, no `..`), and the WASI sandbox confines every
//! path to the granted directory whatever the templates say.

use std::io::ErrorKind;
use std::time::Duration;
use tern_guest::{Answer, Certificate, Hello, Plugin, RouteLine, Served, config, log, wildcard_of};

struct FilePath;

impl Plugin for FilePath {
    fn select(hello: &Hello) -> Result<Answer, String> {
        let settings = Settings::load()?;
        let wildcard = settings.wildcard.then(|| wildcard_of(&hello.servername)).flatten();
        // The exact name's route wins, whichever entry the certificate comes from.
        let mut route = None;
        for name in std::iter::once(hello.servername.clone()).chain(wildcard) {
            // Wildcard files may spell `*` differently (wildcard_label); exact names contain no `*`.
            let file = name.replacen('*', &settings.wildcard_label, 1);
            if route.is_none() {
                route = settings.route(&file)?;
            }
            if let Some(RouteLine::Passthrough(target)) = route {
                return Ok(Answer::Passthrough { target, ttl: settings.ttl });
            }
            if let Some(mut served) = settings.served(&file)? {
                if name != hello.servername {
                    log::debug(&format!("serving wildcard {name}"));
                }
                served.route = route.and_then(|line| match line {
                    RouteLine::Route(route) => Some(route),
                    RouteLine::Passthrough(_) => None,
                });
                return Ok(Answer::Serve(served));
            }
        }
        Ok(Answer::NotFound)
    }
}

tern_guest::export_plugin!(FilePath);

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
    rsa_cert_template: String,
    rsa_key_template: String,
    route_template: String,
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
        let (cert_template, key_template) =
            (config::get_or("cert_template", "{name}.crt"), config::get_or("key_template", "{name}.key"));
        let settings = Settings {
            dir: config::get_or("dir", "/").trim_end_matches('/').to_string(),
            wildcard,
            wildcard_label: config::get_or("wildcard_label", "*"),
            rsa_cert_template: config::get("rsa_cert_template").unwrap_or_else(|| format!("{cert_template}.rsa")),
            rsa_key_template: config::get("rsa_key_template").unwrap_or_else(|| format!("{key_template}.rsa")),
            route_template: config::get_or("route_template", "{name}.route"),
            cert_template,
            key_template,
            ttl,
        };
        for (key, template) in [
            ("cert_template", &settings.cert_template),
            ("key_template", &settings.key_template),
            ("rsa_cert_template", &settings.rsa_cert_template),
            ("rsa_key_template", &settings.rsa_key_template),
            ("route_template", &settings.route_template),
        ] {
            if !template.contains("{name}") {
                return Err(format!("setting {key}: {template:?} does not contain {{name}}"));
            }
        }
        Ok(settings)
    }

    /// The route file of `name`, if there is one.
    fn route(&self, name: &str) -> Result<Option<RouteLine>, String> {
        let Some(text) = self.read(&self.route_template, name)? else { return Ok(None) };
        let file = self.route_template.replace("{name}", name);
        RouteLine::parse(&text).map(Some).map_err(|why| format!("{file}: {why}"))
    }

    /// The certificate set the files for `name` make (no route yet), `None` if there is none.
    fn served(&self, name: &str) -> Result<Option<Served>, String> {
        let Some(first) = self.read_pair(&self.cert_template, &self.key_template, name)? else {
            return Ok(None);
        };
        let mut served = Served::one(first);
        if let Some(second) = self.read_pair(&self.rsa_cert_template, &self.rsa_key_template, name)? {
            served = served.and(second);
        }
        Ok(Some(served))
    }

    /// Both files for `name`, `None` if either is missing. Other I/O errors are errors: a permission problem must
    /// not look like "unknown name" and silently fall back to the default certificate.
    fn read_pair(&self, cert_template: &str, key_template: &str, name: &str) -> Result<Option<Certificate>, String> {
        let Some(chain) = self.read(cert_template, name)? else {
            return Ok(None);
        };
        let Some(key) = self.read(key_template, name)? else {
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
