//! TLS for `https://` downloads: rustls (ring provider) over the same tokio socket, with the
//! Mozilla root store (`webpki-roots`) plus any extra roots from the PEM file named by
//! `SSL_CERT_FILE` (the variable curl and OpenSSL read) or added with [`trust_pem`], for
//! mirrors behind a private CA.

use std::sync::{Arc, Mutex, OnceLock};

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use super::error::RegistryError;

/// Extra trust anchors (DER) added at run time, on top of the built-in roots.
fn extra_roots() -> &'static Mutex<Vec<CertificateDer<'static>>> {
    static EXTRA: OnceLock<Mutex<Vec<CertificateDer<'static>>>> = OnceLock::new();
    EXTRA.get_or_init(|| Mutex::new(Vec::new()))
}

/// Trusts every certificate in `pem` as a root for downloads from now on.
pub fn trust_pem(pem: &[u8]) -> Result<usize, RegistryError> {
    let certs = parse_pem(pem, "trusted roots")?;
    let n = certs.len();
    extra_roots().lock().unwrap_or_else(|p| p.into_inner()).extend(certs);
    Ok(n)
}

fn parse_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, RegistryError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| RegistryError::Tls(format!("{what}: not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(RegistryError::Tls(format!("{what}: no certificate found")));
    }
    Ok(certs)
}

/// The client config for one connection: built-in roots, `SSL_CERT_FILE`, and [`trust_pem`]'s.
fn client_config() -> Result<Arc<ClientConfig>, RegistryError> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let mut extra = extra_roots().lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(file) = std::env::var_os("SSL_CERT_FILE") {
        let pem = std::fs::read(&file)
            .map_err(|e| RegistryError::Tls(format!("SSL_CERT_FILE {}: {e}", file.to_string_lossy())))?;
        extra.extend(parse_pem(&pem, &format!("SSL_CERT_FILE {}", file.to_string_lossy()))?);
    }
    for cert in extra {
        roots.add(cert).map_err(|e| RegistryError::Tls(format!("a trusted root was refused: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RegistryError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Runs the TLS handshake for `host` over `stream`, verifying the server's certificate.
pub(crate) async fn connect(stream: TcpStream, host: &str) -> Result<TlsStream<TcpStream>, RegistryError> {
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
        .map_err(|e| RegistryError::Tls(format!("`{host}` is not a valid server name: {e}")))?;
    TlsConnector::from(client_config()?)
        .connect(name, stream)
        .await
        .map_err(|e| RegistryError::Tls(format!("TLS handshake with {host}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_a_named_error() {
        let e = trust_pem(b"not a certificate").unwrap_err().to_string();
        assert!(e.contains("no certificate found"), "{e}");
    }
}
