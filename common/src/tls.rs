//! Optional TLS (rustls, with the `ring` provider): `--tls-cert` / `--tls-key` make a server speak
//! TLS only — the two gRPC services through tonic, the gateway through its own accept loop — and
//! `--upstream-ca` lets the gateway trust the certificate authority of `https://` upstreams.
//! Certificates are PEM files, read and checked at start (a bad file stops the binary with its
//! path in the error); a change needs a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How long a client has to finish its TLS handshake (a stalled handshake holds a connection,
/// as a slow request head would).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's TLS flags, flattened into each binary's serve flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain to present (the server's first); with `--tls-key`, the server
    /// accepts TLS connections only.
    #[arg(long, env = "LLORCH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert` (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "LLORCH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The identity to serve with, or none when the flags are not set; checked: the files
    /// parse, and the key belongs to the certificate.
    pub fn load(&self) -> anyhow::Result<Option<ServerTls>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => ServerTls::from_files(cert, key).map(Some),
            (None, None) => Ok(None),
            _ => bail!("--tls-cert and --tls-key go together"),
        }
    }
}

/// A server's certificate chain and key, checked.
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("certs", &self.certs.len()).finish_non_exhaustive()
    }
}

impl Clone for ServerTls {
    fn clone(&self) -> Self {
        Self {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            certs: self.certs.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl ServerTls {
    /// Reads and checks `cert` and `key`.
    pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let cert_pem =
            std::fs::read(cert).with_context(|| format!("--tls-cert {}", cert.display()))?;
        let key_pem = std::fs::read(key).with_context(|| format!("--tls-key {}", key.display()))?;
        Self::from_pem(cert_pem, key_pem)
            .with_context(|| format!("--tls-cert {} / --tls-key {}", cert.display(), key.display()))
    }

    /// Checks PEM text: at least one certificate, one private key, and a key that matches.
    pub fn from_pem(cert_pem: Vec<u8>, key_pem: Vec<u8>) -> anyhow::Result<Self> {
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .context("the certificate file is not PEM certificates")?;
        anyhow::ensure!(!certs.is_empty(), "the certificate file holds no certificate");
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .context("the key file holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")?;
        let tls = Self { cert_pem, key_pem, certs, key };
        // Building a config checks that the key is usable and is the certificate's.
        tls.rustls_config(&[])?;
        Ok(tls)
    }

    /// A rustls server configuration offering `alpn` (e.g. `http/1.1`).
    pub fn rustls_config(&self, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(self.certs.clone(), self.key.clone_key())
        .context("the key does not fit the certificate")?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// The same identity for tonic's server (HTTP/2, with [`HANDSHAKE_TIMEOUT`]).
    pub fn tonic(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// Certificate authorities a client trusts for `https://` URLs (`--upstream-ca`), checked.
#[derive(Debug, Clone)]
pub struct ClientCa {
    pem: Vec<u8>,
}

impl ClientCa {
    /// Reads a PEM file of one or more CA certificates.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let pem =
            std::fs::read(path).with_context(|| format!("--upstream-ca {}", path.display()))?;
        Self::from_pem(pem).with_context(|| format!("--upstream-ca {}", path.display()))
    }

    /// Checks PEM text: at least one certificate, each one a valid trust anchor.
    pub fn from_pem(pem: Vec<u8>) -> anyhow::Result<Self> {
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .context("not PEM certificates")?;
        anyhow::ensure!(!certs.is_empty(), "no certificate in the file");
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs {
            roots.add(cert).context("a certificate is not a usable trust anchor")?;
        }
        Ok(Self { pem })
    }

    /// The PEM text.
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }

    /// `endpoint` over TLS, its server's certificate checked for `host` (default: the
    /// endpoint's own host).
    pub fn apply(
        &self,
        endpoint: tonic::transport::Endpoint,
        host: Option<&str>,
    ) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
        let host = match host {
            Some(h) => h.to_owned(),
            None => endpoint.uri().host().unwrap_or_default().trim_matches(['[', ']']).to_owned(),
        };
        endpoint.tls_config(self.tonic(&host))
    }

    /// tonic's client configuration for a server named `host` (checked against the server's
    /// certificate, whatever address the connection goes to).
    pub fn tonic(&self, host: &str) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.pem))
            .domain_name(host)
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_mismatched_files_are_refused_with_a_reason() {
        let e = ServerTls::from_pem(b"not pem".to_vec(), b"not pem".to_vec()).unwrap_err();
        assert!(format!("{e:#}").contains("no certificate"), "{e:#}");
        let e = ClientCa::from_pem(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec(),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("trust anchor"), "{e:#}");
        let e = TlsArgs { tls_cert: Some("/nonexistent.pem".into()), tls_key: Some("/k".into()) }
            .load()
            .unwrap_err();
        assert!(format!("{e:#}").contains("--tls-cert /nonexistent.pem"), "{e:#}");
    }
}
