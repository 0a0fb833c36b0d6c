//! TLS with rustls: certificates for the listeners (with SNI, swapped without dropping
//! connections), and client configurations for `https://` upstreams.
//!
//! Certificates are read and checked when a snapshot is built, like everything else, so a
//! bad certificate is refused with its file named and the running ones stay. A listener's
//! resolver lives outside the snapshot; putting a snapshot in force hands it the new set,
//! and every handshake from then on uses it. Connections already open keep theirs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

use crate::config::Problems;

/// TLS for the listeners. Whether a listener speaks TLS is fixed at start; its
/// certificates reload with the config.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// TLS on the proxy listener.
    #[serde(default)]
    pub proxy: Option<ListenerTls>,
    /// TLS on the admin listener.
    #[serde(default)]
    pub admin: Option<ListenerTls>,
}

/// One listener's certificates.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM certificate chain (leaf first), relative to the config file.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1), relative to the config file.
    pub key: String,
    /// More certificates, chosen by the name the client asks for (SNI).
    #[serde(default)]
    pub sni: Vec<SniCert>,
}

/// A certificate for one host name.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SniCert {
    pub host: String,
    pub cert: String,
    pub key: String,
}

/// A listener's certificates: the default, and any by host name.
#[derive(Debug)]
pub struct CertSet {
    default: Arc<CertifiedKey>,
    by_host: HashMap<String, Arc<CertifiedKey>>,
    /// Every file read, so a change to any of them reloads.
    pub files: Vec<PathBuf>,
}

impl CertSet {
    /// Reads and checks a listener's certificates; problems go under `path`.
    pub fn load(cfg: &ListenerTls, base: &Path, path: &str, p: &mut Problems) -> Option<CertSet> {
        let mut files = Vec::new();
        let default = certified_key(base, &cfg.cert, &cfg.key, path, p, &mut files);
        let mut by_host = HashMap::new();
        for (i, sni) in cfg.sni.iter().enumerate() {
            let at = format!("{path}.sni[{i}]");
            if sni.host.is_empty() || sni.host.contains(['/', ':', ' ']) {
                p.push(
                    format!("{at}.host"),
                    format!("`{}` is not a host name", sni.host),
                );
            }
            if let Some(key) = certified_key(base, &sni.cert, &sni.key, &at, p, &mut files) {
                by_host.insert(sni.host.to_ascii_lowercase(), key);
            }
        }
        Some(CertSet {
            default: default?,
            by_host,
            files,
        })
    }
}

fn certified_key(
    base: &Path,
    cert: &str,
    key: &str,
    path: &str,
    p: &mut Problems,
    files: &mut Vec<PathBuf>,
) -> Option<Arc<CertifiedKey>> {
    let (cert_path, key_path) = (base.join(cert), base.join(key));
    files.push(cert_path.clone());
    files.push(key_path.clone());
    let chain: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(&cert_path) {
        Ok(iter) => match iter.collect::<Result<Vec<_>, _>>() {
            Ok(chain) if !chain.is_empty() => chain,
            Ok(_) => {
                p.push(
                    format!("{path}.cert"),
                    format!("{}: no PEM certificate in it", cert_path.display()),
                );
                return None;
            }
            Err(e) => {
                p.push(
                    format!("{path}.cert"),
                    format!("{}: {e}", cert_path.display()),
                );
                return None;
            }
        },
        Err(e) => {
            p.push(
                format!("{path}.cert"),
                format!("{}: {e}", cert_path.display()),
            );
            return None;
        }
    };
    // The key's text is never echoed: only the file is named.
    let der = match PrivateKeyDer::from_pem_file(&key_path) {
        Ok(der) => der,
        Err(_) => {
            p.push(
                format!("{path}.key"),
                format!("{}: no readable PEM private key", key_path.display()),
            );
            return None;
        }
    };
    let signing = match provider::sign::any_supported_type(&der) {
        Ok(k) => k,
        Err(e) => {
            p.push(
                format!("{path}.key"),
                format!("{}: {e}", key_path.display()),
            );
            return None;
        }
    };
    let certified = CertifiedKey::new(chain, signing);
    if let Err(e) = certified.keys_match() {
        p.push(
            format!("{path}.key"),
            format!(
                "{} does not belong to {} ({e})",
                key_path.display(),
                cert_path.display()
            ),
        );
        return None;
    }
    Some(Arc::new(certified))
}

/// Picks a listener's certificate per handshake from the set in force.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertSet>,
}

impl CertResolver {
    pub fn new(set: Arc<CertSet>) -> Self {
        CertResolver {
            current: ArcSwap::new(set),
        }
    }

    /// Puts a new set in force for the handshakes to come.
    pub fn swap(&self, set: Arc<CertSet>) {
        self.current.store(set);
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.load();
        let by_name = hello
            .server_name()
            .and_then(|n| set.by_host.get(&n.to_ascii_lowercase()));
        Some(by_name.unwrap_or(&set.default).clone())
    }
}

/// The server side: TLS 1.3 and 1.2 only, ALPN offering h2 and http/1.1. Fails only if the
/// provider refuses those versions, which ring does not.
pub fn server_config(
    resolver: Arc<CertResolver>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client side towards upstreams: the web PKI's roots, or only the CAs in `ca_file`.
/// Fails only if the provider refuses TLS 1.3 and 1.2, which ring does not.
pub fn client_config(
    ca: Option<&[CertificateDer<'static>]>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(certs) => {
            for c in certs {
                let _ = roots.add(c.clone());
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Reads a CA bundle, naming the file on error.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}
