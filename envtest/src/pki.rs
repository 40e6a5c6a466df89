//! A throwaway PKI: a CA, a serving certificate for `127.0.0.1` / `localhost` signed by it, and
//! an ECDSA key for signing service-account tokens.

use std::path::Path;

use anyhow::{Context as _, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    /// PKCS#8 PEM, and its public key (kube-apiserver wants the two in separate files).
    pub sa_key_pem: String,
    pub sa_pub_pem: String,
}

impl Pki {
    pub fn generate() -> Result<Pki> {
        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "lacuna-envtest-ca");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key).context("self-signing the CA")?;
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate().context("generating the serving key")?;
        let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        server.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        let server_cert = server.signed_by(&server_key, &issuer).context("signing the serving certificate")?;

        let sa_key = KeyPair::generate().context("generating the service-account key")?;
        Ok(Pki {
            ca_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            sa_key_pem: sa_key.serialize_pem(),
            sa_pub_pem: sa_key.public_key_pem(),
        })
    }

    /// Writes `ca.crt`, `serving.crt`, `serving.key`, `sa.key` and `sa.pub` into `dir`.
    pub fn write_to(&self, dir: &Path) -> Result<()> {
        for (name, pem) in [
            ("ca.crt", &self.ca_pem),
            ("serving.crt", &self.server_cert_pem),
            ("serving.key", &self.server_key_pem),
            ("sa.key", &self.sa_key_pem),
            ("sa.pub", &self.sa_pub_pem),
        ] {
            std::fs::write(dir.join(name), pem).with_context(|| format!("writing {name}"))?;
        }
        Ok(())
    }
}
