//! A chain shaped like a public CA's: an RSA-2048 leaf for two names with the usual extensions (AIA with OCSP
//! and issuer URLs, certificate policies, key usages, key identifiers, and 240 random bytes where the SCT list
//! sits: incompressible, like real SCTs), issued by an RSA-2048 intermediate that an RSA-4096 root signed. Made
//! with the `openssl` command (scripts/setup.sh test installs it): about 2.6 KB of DER for the two certificates
//! served, the size of a Let's Encrypt RSA chain.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

/// The names the leaf is for; the first is the one clients ask for.
pub const NAMES: [&str; 2] = ["chain.example", "www.chain.example"];

/// Writes `leaf.key` and `chain.crt` (leaf, then intermediate) into `dir`, and returns the DER of both
/// certificates, leaf first.
pub fn write(dir: &Path) -> Result<Vec<Vec<u8>>> {
    let mut random = [0u8; 240];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut random)?;
    let sct: String = random.iter().map(|b| format!("{b:02X}")).collect();
    let extensions = format!(
        "[root]\nbasicConstraints = critical, CA:true\nkeyUsage = critical, keyCertSign, cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [intermediate]\nbasicConstraints = critical, CA:true, pathlen:0\n\
         keyUsage = critical, digitalSignature, keyCertSign, cRLSign\nextendedKeyUsage = serverAuth, clientAuth\n\
         subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n\
         authorityInfoAccess = caIssuers;URI:http://x1.i.bench-ca.example/\n\
         crlDistributionPoints = URI:http://x1.c.bench-ca.example/\ncertificatePolicies = 2.23.140.1.2.1\n\
         [leaf]\nbasicConstraints = critical, CA:false\nkeyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth, clientAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n\
         authorityInfoAccess = OCSP;URI:http://r11.o.bench-ca.example, caIssuers;URI:http://r11.i.bench-ca.example/\n\
         subjectAltName = DNS:{}, DNS:{}\ncertificatePolicies = 2.23.140.1.2.1\n\
         1.3.6.1.4.1.11129.2.4.2 = DER:0481F0{sct}\n",
        NAMES[0], NAMES[1]
    );
    std::fs::write(dir.join("ext.cnf"), extensions)?;
    // Each command: its words, then the subject (which holds spaces), if any.
    let openssl = |words: &str, subject: Option<&str>| -> Result<()> {
        let mut command = Command::new("openssl");
        command.args(words.split_whitespace()).current_dir(dir);
        if let Some(subject) = subject {
            command.args(["-subj", subject]);
        }
        let out = command.output().context("running openssl")?;
        ensure!(out.status.success(), "openssl {words}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    for (key, bits) in [("root.key", 4096), ("intermediate.key", 2048), ("leaf.key", 2048)] {
        openssl(&format!("genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:{bits} -out {key}"), None)?;
    }
    let root = "/C=US/O=Bench Security Research Group/CN=Bench Root X1";
    openssl("req -new -x509 -key root.key -out root.crt -extensions root -config ext.cnf -days 3650", Some(root))?;
    openssl("req -new -key intermediate.key -out intermediate.csr", Some("/C=US/O=Bench Encrypt/CN=R11"))?;
    openssl(
        "x509 -req -in intermediate.csr -CA root.crt -CAkey root.key -out intermediate.crt -extfile ext.cnf \
         -extensions intermediate -days 1095 -set_serial 0x8a7d3e13d62f30ef2386bd29076b34f8",
        None,
    )?;
    openssl("req -new -key leaf.key -out leaf.csr", Some(&format!("/CN={}", NAMES[0])))?;
    openssl(
        "x509 -req -in leaf.csr -CA intermediate.crt -CAkey intermediate.key -out leaf.crt -extfile ext.cnf \
         -extensions leaf -days 90 -set_serial 0x04a1b2c3d4e5f60718293a4b5c6d7e8f9a0b",
        None,
    )?;
    let leaf = std::fs::read_to_string(dir.join("leaf.crt"))?;
    let intermediate = std::fs::read_to_string(dir.join("intermediate.crt"))?;
    std::fs::write(dir.join("chain.crt"), format!("{leaf}{intermediate}"))?;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    [leaf, intermediate].iter().map(|pem| Ok(CertificateDer::from_pem_slice(pem.as_bytes())?.to_vec())).collect()
}

/// The TLS 1.3 Certificate message body rustls compresses: an empty context, then each certificate with no
/// extensions (RFC 8446 §4.4.2).
pub fn certificate_message(chain: &[Vec<u8>]) -> Vec<u8> {
    let u24 = |n: usize| [(n >> 16) as u8, (n >> 8) as u8, n as u8];
    let mut list = Vec::new();
    for der in chain {
        list.extend_from_slice(&u24(der.len()));
        list.extend_from_slice(der);
        list.extend_from_slice(&[0, 0]);
    }
    let mut message = vec![0];
    message.extend_from_slice(&u24(list.len()));
    message.extend_from_slice(&list);
    message
}
